"""The whole RLHF loop from one YAML file: sft -> generate -> annotate -> rm -> ppo|grpo|rloo|dpo -> eval -> report.

    rlhfkit pipeline recipes/my.yaml                       # every stage in its own folder under run.output_dir
    rlhfkit pipeline recipes/my.yaml rounds=3 rl.method=dpo run.output_dir=runs/x
    rlhfkit pipeline recipes/my.yaml                       # again: finished stages are skipped, a crashed one resumes

Defaults are the demo (`rlhfkit demo`): bundled stories260k, TinyStories prompts, a simulated crowd with the gold
preference rlhfkit.gold:sentiment, a linear reward model on MiniLM features, PPO, evaluation on held-out prompts.
A recipe is a YAML file that changes some of these keys; each stage's `args` holds keys of that stage's own command
(`rlhfkit sft|generate|rm train|ppo|dpo|eval --help`), dotted or nested, checked before anything runs.

Layout of run.output_dir:
    data/                 prepare.function's files (data prepared at run time; ${run.output_dir} names them)
    sft/                  rlhfkit sft (sft.enabled)              -> sft/model, the base policy of every later stage
    roundR/generate/      candidates.jsonl: generate.num_samples completions of the current policy per prompt
    roundR/annotate/      prefs.jsonl: pairs labelled by the simulated crowd, people (web app) or read from a file
    roundR/rm/            rlhfkit rm train on the pairs of rounds 1..R        -> roundR/rm/model
    roundR/rl/            the RL method, starting from round R-1's policy     -> roundR/rl/model
    eval/                 rlhfkit eval: final policy vs base on held-out prompts, plus the gold-vs-reward curve
    feedback.db           the feedback app's SQLite database (one project per round)
    report.html, summary.json, pipeline.json (stage results and times)
A stage is finished when its DONE.json exists and records the same fingerprint (a hash of the stage's resolved
config and of its inputs' fingerprints); a stage whose config or inputs changed runs again, and so does everything
after it. A stage that stopped half-way resumes from its newest checkpoint (trainers) or its database (labels).
Rounds (`rounds: N`, iterated online RLHF): round R samples from round R-1's policy, collects new labels, retrains
the reward model on all labels so far and continues RL from that policy; the KL leash stays on the base policy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rlhfkit.config import GenConfig, ModelConfig, RunConfig, atomic_write_text, load_config, to_dict
from rlhfkit.errors import UserError
from rlhfkit.trainers import pipeline_stages as S


@dataclass
class PrepareStage:
    function: str = ""
    """MODULE:FN or FILE.py:FN called first as fn(output_dir, **args) to write the run's data into OUT/data (e.g.
    rlhfkit.recipes.data:prepare_multi30k); other keys name its files as ${run.output_dir}/data/NAME."""
    args: dict = field(default_factory=dict)
    """Keyword arguments of the prepare function."""


@dataclass
class SFTStage:
    enabled: bool = False
    """Fine-tune model.name first; the result is the base policy (and KL reference) of every later stage."""
    args: dict = field(default_factory=dict)
    """Keys of `rlhfkit sft`, e.g. {data.train: FILE, train.steps: 200}."""


@dataclass
class GenerateStage:
    prompts: str = "bundled:tinystories_prompts.jsonl"
    """Prompts whose completions are compared (also the RL prompts unless rl.prompts is set)."""
    prompts_per_round: int = 0
    """Prompts per round, a new slice of the file each round (wrapping around); 0: all of them."""
    num_samples: int = 4
    """Completions per prompt; annotate.pairs decides which pairs of them become comparisons."""
    args: dict = field(default_factory=dict)
    """Keys of `rlhfkit generate` (its gen.* start from the pipeline's gen section)."""


@dataclass
class AnnotateStage:
    source: Literal["simulate", "human", "file"] = "simulate"
    """simulate: a crowd labels through the feedback app's API with `preference` + Bradley-Terry noise; human:
    people label in the web app (URL and login printed) and the pipeline waits; file: use `file`, no generate."""
    preference: str = "rlhfkit.gold:sentiment"
    """The simulated crowd's hidden utility fn(prompts, completions) -> list[float]; also the default eval judge."""
    file: str = ""
    """source=file: preference pairs to train on (any preference format, e.g. Anthropic HH)."""
    crowd: int = 5
    """Simulated annotators labelling concurrently."""
    k: int = 1
    """Labels per pair (distinct annotators); the export takes the majority."""
    temperature: float = 0.25
    """Bradley-Terry noise T: P(A preferred) = sigmoid((u_A - u_B) / T)."""
    length_bias: float = 0.0
    """Simulated bias added to the utility per word."""
    position_bias: float = 0.0
    """Simulated bias for the left completion."""
    pairs: Literal["all", "adjacent", "first"] = "all"
    """Which pairs of a prompt's completions become items (all: every pair)."""
    host: str = "127.0.0.1"
    """source=human: address the web app listens on (0.0.0.0 for other machines)."""
    port: int = 8000
    """source=human: port of the web app (0: any free port)."""
    user: str = "annotator"
    """source=human: the annotator account created (a fresh password is printed each run)."""
    wait_seconds: float = 0.0
    """source=human: stop waiting after this long and train on the labels so far; 0 waits for every item."""
    instructions: str = "Which continuation of the story is better?"
    """source=human: the question shown on the labelling page."""


@dataclass
class RMStage:
    enabled: bool = True
    """Train a reward model (needed by ppo/grpo/rloo unless rl.reward_function is set)."""
    args: dict = field(default_factory=lambda: {
        "model.kind": "linear", "model.features": "minilm", "model.context_chars": 0,
        "train.l2_grid": [0.3, 1.0, 3.0, 10.0]})
    """Keys of `rlhfkit rm train`. Default: a linear model on MiniLM sentence embeddings of the completion, the
    L2 penalty picked by 5-fold cross-validation (measured best of linear/deep options for the demo: docs/demo.md)."""


@dataclass
class RLStage:
    method: str = "ppo"
    """ppo, grpo, rloo (the `rlhfkit METHOD` trainer, same keys as ppo) or dpo (trains on the labelled pairs)."""
    prompts: str = ""
    """RL prompts; empty: generate.prompts."""
    reward_function: str = ""
    """ppo/grpo/rloo: a reward fn(prompts, completions) -> list[float] instead of the reward model (e.g. chrF)."""
    checkpoints: int = 8
    """Checkpoints kept per round (every train.steps / N updates) for resuming and for the gold-vs-reward curve."""
    args: dict = field(default_factory=lambda: {
        "train.steps": 40, "train.rollout_batch_size": 64, "train.num_minibatches": 2, "train.update_epochs": 2,
        "train.micro_batch_size": 32, "optim.lr": 3e-4, "kl_coef": 0.15, "train.sample_every": 10})
    """Keys of the method's command (`rlhfkit ppo --help`); for dpo, e.g. {train.steps: 100, train.beta: 0.1}."""


@dataclass
class EvalStage:
    enabled: bool = True
    """Compare the final policy with the base on held-out prompts (`rlhfkit eval`)."""
    prompts: str = "bundled:tinystories_eval_prompts.jsonl"
    """Held-out prompts."""
    judge: str = ""
    """Judge function for the win rate; empty: annotate.preference when the crowd is simulated (the gold)."""
    curve_prompts: int = 100
    """Held-out prompts per point of the gold-vs-reward curve over RL checkpoints (0: no curve)."""
    args: dict = field(default_factory=lambda: {"num_samples": 2})
    """Keys of `rlhfkit eval`."""


@dataclass
class PipelineConfig:
    config_positional = True  # `rlhfkit pipeline recipe.yaml key=value ...`
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/pipeline", threads=1))
    """run.threads=1: on a busy 2-core machine two torch threads made small models 5-12x slower (docs/demo.md)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting policy (and the tokenizer of every policy stage)."""
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=48, temperature=1.0, batch_size=128))
    """Sampling for candidates, RL rollouts and evaluation (each stage's args may override it)."""
    rounds: int = 1
    """Rounds of generate -> annotate -> rm -> rl (iterated online RLHF)."""
    prepare: PrepareStage = field(default_factory=PrepareStage)
    sft: SFTStage = field(default_factory=SFTStage)
    generate: GenerateStage = field(default_factory=GenerateStage)
    annotate: AnnotateStage = field(default_factory=AnnotateStage)
    rm: RMStage = field(default_factory=RMStage)
    rl: RLStage = field(default_factory=RLStage)
    eval: EvalStage = field(default_factory=EvalStage)
    report: bool = True
    """Write report.html (one self-contained file) and summary.json."""

    def validate(self) -> None:
        if self.rounds < 1:
            raise UserError(f"rounds: must be >= 1, got {self.rounds}")
        a = self.annotate
        if a.source == "file" and not a.file:
            raise UserError("annotate.file: required with annotate.source=file")
        if a.source == "file" and self.rounds > 1:
            raise UserError("rounds > 1 needs new labels each round: annotate.source simulate or human")
        if a.source == "simulate" and not a.preference:
            raise UserError("annotate.preference: required with annotate.source=simulate")
        if a.crowd < 1 or a.k < 1 or a.temperature < 0 or self.generate.num_samples < 2 and a.source != "file":
            raise UserError("annotate.crowd and k: >= 1; annotate.temperature >= 0; generate.num_samples >= 2")
        method = self.rl.method
        if self.eval.enabled and not (self.eval.judge or a.source == "simulate" or self.rm.enabled):
            raise UserError("eval: needs a judge: eval.judge=MODULE:FN, a simulated crowd's preference or rm.enabled")
        if method != "dpo" and not self.rm.enabled and not self.rl.reward_function:
            raise UserError(f"rl.method={method}: needs a reward: rm.enabled=true or rl.reward_function=MODULE:FN")
        if self.rl.checkpoints < 0 or self.eval.curve_prompts < 0 or self.generate.prompts_per_round < 0:
            raise UserError("rl.checkpoints, eval.curve_prompts, generate.prompts_per_round: must be >= 0")
        S.rl_command(method)  # unknown methods fail before anything runs


# ----------------------------------------------------------------------------------------------------------------
# Stage bookkeeping

# Keys that change how a stage runs but not what it computes: editing them does not re-run a finished stage, so a
# crashed run can be continued with different run.threads or without run.stop_after_steps.
VOLATILE = {"progress", "threads", "resume", "device", "log_every", "save_every", "keep_checkpoints", "report_to",
            "stop_after_steps", "eval_every", "sample_every", "num_samples_shown", "batch_size_eval", "cache_dir"}


SIMULATE_KEYS = ("source", "preference", "crowd", "k", "temperature", "length_bias", "position_bias", "pairs")
"""The annotate keys that change simulated labels (the others only concern people or files)."""


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if str(k).split(".")[-1] not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def fingerprint(name: str, config: Any, inputs: list[str]) -> str:
    """sha256 of a stage's name, resolved config (without VOLATILE keys) and the fingerprints of its inputs."""
    payload = json.dumps({"stage": name, "config": _strip(to_dict(config) if not isinstance(config, dict) else config),
                          "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Stages:
    """Runs stages in order, skipping finished ones (DONE.json with the same fingerprint), and records times."""

    def __init__(self, out: Path, total: int):
        self.out, self.total, self.index = out, total, 0
        self.records: list[dict] = []

    def run(self, name: str, folder: Path, fp: str, fn: Callable[[bool], dict]) -> dict:
        """fn(resume) -> result dict. Returns the result (stored or fresh)."""
        self.index += 1
        done, started = folder / "DONE.json", folder / "STARTED.json"
        label = f"[{self.index}/{self.total}] {name}"
        if done.is_file():
            state = json.loads(done.read_text(encoding="utf-8"))
            if state.get("fingerprint") == fp:
                print(f"{label}: finished earlier ({state['seconds']:.0f}s), skipped", flush=True)
                self.records.append({"name": name, "seconds": state["seconds"], "status": "skipped (done earlier)"})
                return state["result"]
            print(f"{label}: its config or inputs changed since it finished: running it again", flush=True)
            done.unlink()
        resume = started.is_file() and json.loads(started.read_text(encoding="utf-8")).get("fingerprint") == fp
        if started.is_file() and not resume and folder.exists():
            shutil.rmtree(folder)  # a half-finished stage of another config: start clean
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(started, json.dumps({"fingerprint": fp, "started_at": time.time()}) + "\n")
        print(f"{label}{' (resuming)' if resume else ''} -> {folder}", flush=True)
        t0 = time.perf_counter()
        result = fn(resume)
        seconds = time.perf_counter() - t0
        atomic_write_text(done, json.dumps({"fingerprint": fp, "seconds": seconds, "finished_at": time.time(),
                                            "result": result}, indent=1, default=str) + "\n")
        self.records.append({"name": name, "seconds": seconds, "status": "ran" + (" (resumed)" if resume else "")})
        return result


# ----------------------------------------------------------------------------------------------------------------
# The loop


def run_pipeline(cfg: PipelineConfig, argv: list[str] | None = None, on_human_ready: Callable | None = None) -> dict:
    """Run (or continue) every stage; returns the summary dict (also written to summary.json)."""
    import torch

    from rlhfkit.config import write_run_files

    S.expand_output_dir(cfg)
    S.check_stage_args(cfg)
    t_start, cpu_start, load_start = time.perf_counter(), S.cpu_seconds(), S.loadavg()
    out = Path(cfg.run.output_dir)
    write_run_files(cfg, out, argv)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # candidates and labels only feed a reward model or DPO (RL on a reward function needs neither)
    labels = cfg.annotate.source != "file" and (cfg.rm.enabled or cfg.rl.method == "dpo")
    stages = Stages(out, int(bool(cfg.prepare.function)) + int(cfg.sft.enabled) + int(cfg.eval.enabled)
                    + cfg.rounds * (2 * labels + int(cfg.rm.enabled) + 1))
    db = str(out / "feedback.db")

    data_fp = []  # the prepared files' digest feeds every later fingerprint
    if cfg.prepare.function:
        prep = stages.run("prepare", out / "data", fingerprint("prepare", to_dict(cfg.prepare), []),
                          lambda resume: S.run_prepare(cfg, out / "data"))
        data_fp = [prep["digest"]]
    base, base_fp = cfg.model.name, fingerprint("model", to_dict(cfg.model), data_fp)
    if cfg.sft.enabled:
        scfg = S.sft_config(cfg, str(out / "sft"))
        base_fp = fingerprint("sft", scfg, [base_fp])
        stages.run("sft", out / "sft", base_fp, lambda resume: S._sft(scfg, resume))
        base = str(out / "sft" / "model")

    policy, policy_fp = base, base_fp
    pair_files: list[str] = []
    cand_files: list[str] = []
    rm_dir, rm_fp, rl_results, rm_results, checkpoints = "", "", [], [], []
    for r in range(1, cfg.rounds + 1):
        rd = out / f"round{r}"
        if labels:
            prompts_file = S.round_prompts(cfg, r - 1, rd)
            gen_fp = fingerprint("generate", {"g": to_dict(cfg.generate), "gen": to_dict(cfg.gen), "round": r,
                                              "prompts": S._file_digest(prompts_file)}, [policy_fp])
            cands = rd / "generate" / "candidates.jsonl"
            stages.run(f"round {r}: generate", rd / "generate", gen_fp,
                       lambda resume, p=policy, pf=prompts_file, c=cands, s=cfg.run.seed * 1000 + r:
                       S.run_generate(cfg, p, pf, c, s))
            a = cfg.annotate
            ann_fp = fingerprint("annotate", {**{k: getattr(a, k) for k in SIMULATE_KEYS}, "seed": cfg.run.seed}
                                 if a.source == "simulate" else {"source": "human", "k": a.k, "pairs": a.pairs},
                                 [gen_fp])
            # people's labels are kept under one project name per round whatever the settings; simulated ones
            # are redone when the crowd's settings change
            project = f"round{r}" if a.source == "human" else f"round{r}-{ann_fp[:8]}"
            prefs = rd / "annotate" / "prefs.jsonl"
            stages.run(f"round {r}: annotate ({a.source})", rd / "annotate", ann_fp,
                       lambda resume, c=cands, p=prefs, pr=project: S.run_annotate(cfg, c, p, db, pr, on_human_ready))
            pair_files.append(str(prefs))
            cand_files.append(str(cands))
            pairs_fp = ann_fp
        elif cfg.annotate.source == "file":
            pair_files = [cfg.annotate.file]
            pairs_fp = fingerprint("pairs", {"digest": S._file_digest(Path(S._resolve(cfg.annotate.file)))}, [])
        else:
            pairs_fp = ""
        if cfg.rm.enabled:
            rm_fp = fingerprint("rm", {"args": cfg.rm.args, "seed": cfg.run.seed, "gold": S.judge_of(cfg)},
                                [pairs_fp, rm_fp])
            rm_results.append(stages.run(f"round {r}: rm", rd / "rm", rm_fp,
                                         lambda resume, files=list(pair_files), f=rd / "rm", c=list(cand_files):
                                         S.run_rm(cfg, files, f, resume, c)))
            rm_dir = str(rd / "rm")
        rl_fp = fingerprint("rl", {"rl": to_dict(cfg.rl), "model": to_dict(cfg.model), "gen": to_dict(cfg.gen),
                                   "seed": cfg.run.seed}, [policy_fp, rm_fp, pairs_fp])
        rl_results.append(stages.run(f"round {r}: {cfg.rl.method}", rd / "rl", rl_fp,
                                     lambda resume, p=policy, pf=(pair_files or [""])[-1], f=rd / "rl", m=rm_dir:
                                     S.run_rl(cfg, p, cfg.rl.prompts or cfg.generate.prompts, m, pf, f, resume,
                                              reference=base)))
        checkpoints += S.rl_checkpoints(rd / "rl", r, int(rl_results[-1].get("step", 0)))
        policy, policy_fp = str(rd / "rl" / "model"), rl_fp

    eval_res = None
    if cfg.eval.enabled:
        ev_fp = fingerprint("eval", {"eval": to_dict(cfg.eval), "gen": to_dict(cfg.gen), "seed": cfg.run.seed,
                                     "judge": S.judge_of(cfg)}, [policy_fp, rm_fp])
        eval_res = stages.run("eval", out / "eval", ev_fp,
                              lambda resume: S.run_eval(cfg, policy, base, rm_dir, out / "eval", checkpoints))
    summary = S.make_summary(cfg, stages, rm_results, rl_results, eval_res, policy, base,
                           time.perf_counter() - t_start, S.cpu_seconds() - cpu_start, load_start)
    rm_light = [{k: v for k, v in r.items() if k != "scatter"} for r in rm_results]
    atomic_write_text(out / "pipeline.json", json.dumps({"stages": stages.records, "rm": rm_light, "rl": rl_results},
                                                        indent=1, default=str) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if cfg.report:
        from rlhfkit.report import pipeline_report

        data = S.report_data(cfg, out, summary, stages, rm_results, eval_res)
        atomic_write_text(out / "report.html", pipeline_report(data))
    return summary


def main(cfg: PipelineConfig, argv: list[str] | None = None) -> dict:
    summary = run_pipeline(cfg, argv)
    print(format_summary(summary, Path(cfg.run.output_dir), cfg.report))
    return summary


def format_summary(s: dict, out: Path, report: bool) -> str:
    lines = [f"\ndone in {s['seconds']:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
             + f"); load average {s['load_average_start']:.1f} -> {s['load_average_end']:.1f}"]
    gold = "gold" if "gold_score_before" in s else "score" if "score_score_before" in s else None
    if gold:
        lines.append(f"  {gold} score on {s['eval_prompts']} held-out prompts: base {s[f'{gold}_score_before']:.4f}"
                     f" -> tuned {s[f'{gold}_score_after']:.4f}")
    if "win_rate" in s:
        lines.append(f"  win rate of tuned over base ({s['win_rate_judge']}): {s['win_rate']:.3f} "
                     f"± {s['win_rate_stderr']:.3f} ({s['eval_comparisons']} comparisons)")
    if "rm_score_before" in s:
        lines.append(f"  reward-model score: base {s['rm_score_before']:.4f} -> tuned {s['rm_score_after']:.4f}")
    if s.get("rm_accuracy") is not None:
        extra = f", {s['rm_gold_accuracy']:.3f} vs gold" if "rm_gold_accuracy" in s else ""
        lines.append(f"  reward model held-out accuracy: {s['rm_accuracy']:.3f} vs crowd labels{extra}")
    if s.get("kl") is not None:
        lines.append(f"  KL(tuned || base): {s['kl']:.3f} nats per completion")
    lines.append(f"  {out / 'summary.json'}" + (f", {out / 'report.html'}" if report else ""))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: rlhfkit pipeline CONFIG.yaml")
