"""The whole RLHF loop from one YAML file: sft -> generate -> annotate -> rm -> ppo|grpo|rloo|dpo -> eval -> report.

    rlhfkit pipeline recipes/my.yaml                       # every stage in its own folder under run.output_dir
    rlhfkit pipeline recipes/my.yaml rounds=3 rl.method=dpo run.output_dir=runs/x
    rlhfkit pipeline recipes/my.yaml                       # again: finished stages are skipped, a crashed one resumes

Defaults are the demo (`rlhfkit demo`): bundled stories260k, TinyStories prompts, a simulated crowd with the gold
preference rlhfkit.gold:sentiment, a linear reward model on MiniLM features, PPO, evaluation on held-out prompts.
A recipe is a YAML file that changes some of these keys; each stage's `args` holds keys of that stage's own command
(`rlhfkit sft|generate|rm train|ppo|dpo|eval --help`), dotted or nested, checked before anything runs.

Layout of run.output_dir:
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
the reward model on all labels so far and continues RL from that policy (whose KL leash is that round's start).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rlhfkit.config import GenConfig, ModelConfig, RunConfig, atomic_write_text, load_config, to_dict
from rlhfkit.errors import UserError


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
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/pipeline", threads=1))
    """run.threads=1: on a busy 2-core machine two torch threads made small models 5-12x slower (docs/demo.md)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting policy (and the tokenizer of every policy stage)."""
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=48, temperature=1.0, batch_size=128))
    """Sampling for candidates, RL rollouts and evaluation (each stage's args may override it)."""
    rounds: int = 1
    """Rounds of generate -> annotate -> rm -> rl (iterated online RLHF)."""
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
        rl_command(method)  # unknown methods fail before anything runs


@dataclass
class PipelineCLI(PipelineConfig):
    file: str = ""
    """The pipeline YAML (the positional argument); key=value options override its keys."""
    positional = ("file",)


# ----------------------------------------------------------------------------------------------------------------
# Stage bookkeeping

# Keys that change how a stage runs but not what it computes: editing them does not re-run a finished stage, so a
# crashed run can be continued with different run.threads or without run.stop_after_steps.
VOLATILE = {"progress", "threads", "resume", "device", "log_every", "save_every", "keep_checkpoints", "report_to",
            "stop_after_steps", "eval_every", "sample_every", "num_samples_shown", "batch_size_eval", "cache_dir"}


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


def rl_command(method: str) -> tuple[str, str]:
    """(module, config class) of the RL method's command, from rlhfkit.cli.COMMANDS (so new trainers plug in)."""
    from rlhfkit.cli import COMMANDS

    entry = COMMANDS.get(method)
    if method not in ("ppo", "grpo", "rloo", "dpo") or entry is None or isinstance(entry[1], dict):
        known = [m for m in ("ppo", "grpo", "rloo", "dpo") if m in COMMANDS]
        raise UserError(f"rl.method: {method!r} is not available (this rlhfkit has {', '.join(known)})")
    return entry[1], entry[2]


def stage_config(cls: type, defaults: dict, args: dict, forced: dict, where: str) -> Any:
    """cls from its defaults < `defaults` < the user's `args` < the pipeline's `forced` keys (paths), validated.
    Errors name `where` (the pipeline key holding the user's args)."""
    from rlhfkit.config import set_key, validate_tree

    cfg = cls()
    try:
        for layer in (defaults, args, forced):
            for key, value in layer.items():
                set_key(cfg, key, value, from_cli=False)
        validate_tree(cfg)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return cfg


def checkpoint_on(cfg: Any, resume: bool) -> Any:
    """Turn on --resume when the stage folder holds a checkpoint of this same stage."""
    from rlhfkit import train_utils as U

    if resume and U.latest_checkpoint(Path(cfg.run.output_dir)) is not None:
        cfg.run.resume = True
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Stages


def generate_config(cfg: PipelineConfig, policy: str, prompts_file: str, out: str, seed: int) -> Any:
    from rlhfkit.trainers import generate as G

    return stage_config(G.GenerateConfig, {"gen": to_dict(cfg.gen)}, cfg.generate.args, {
        "model.name": policy, "model.tokenizer": cfg.model.tokenizer, "model.dtype": cfg.model.dtype,
        "model.trust_remote_code": cfg.model.trust_remote_code, "data.prompts": prompts_file,
        "num_samples": cfg.generate.num_samples, "output": out, "seed": seed, "progress": cfg.run.progress,
        "device": cfg.run.device}, "generate.args")


def run_generate(cfg: PipelineConfig, policy: str, prompts_file: Path, out: Path, seed: int) -> dict:
    from rlhfkit.trainers import generate as G

    return {**G.main(generate_config(cfg, policy, str(prompts_file), str(out), seed)), "model": policy}


def round_prompts(cfg: PipelineConfig, round_index: int, folder: Path) -> Path:
    """The prompts of round `round_index` (0-based): a slice of generate.prompts, written to folder/prompts.jsonl."""
    from rlhfkit.data import read_records, write_jsonl

    n = cfg.generate.prompts_per_round
    if not n:
        return Path(_resolve(cfg.generate.prompts))
    recs = [r.data for r in read_records(cfg.generate.prompts)]
    rows = [recs[(round_index * n + i) % len(recs)] for i in range(n)]
    path = folder / "prompts.jsonl"
    write_jsonl(path, rows)
    return path


def _resolve(spec: str) -> str:
    from rlhfkit.data.io import resolve_data_path

    return str(resolve_data_path(spec))


class LabelProgress:
    """A progress bar of the labels in a feedback-app project, polled from the database in a thread."""

    def __init__(self, db: str, project: str, total: int, enabled: bool):
        from rlhfkit.train_utils import progress

        self.db, self.project, self.stop = db, project, threading.Event()
        self.bar = progress(total, "annotate", enabled, unit="label")
        self.thread = threading.Thread(target=self._poll, daemon=True) if enabled else None

    def _poll(self) -> None:
        from rlhfkit.annotate.store import Store

        store = None
        while not self.stop.wait(1.0):
            try:
                store = store or Store(self.db, create=False, pool_size=1)
                n = store.count_labels(project_id=store.get_project(name=self.project).id)
                self.bar.update(n - self.bar.n)
            except Exception:  # the project or the database does not exist yet
                continue
        if store is not None:
            store.close()

    def __enter__(self) -> "LabelProgress":
        if self.thread:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()
        self.bar.close()


def n_pairs(n: int, pairs: str) -> int:
    return n * (n - 1) // 2 if pairs == "all" else n - 1 if pairs == "adjacent" else 1


def run_annotate(cfg: PipelineConfig, candidates: Path, out: Path, db: str, project: str,
                 on_ready: Callable | None = None) -> dict:
    from rlhfkit.data import read_records

    a = cfg.annotate
    total = len(read_records(str(candidates))) * n_pairs(cfg.generate.num_samples, a.pairs) * a.k
    if a.source == "human":
        return collect_human(cfg, candidates, out, db, project, on_ready)
    from rlhfkit.annotate.api import collect_preferences
    from rlhfkit.plugins import load_function

    fn = load_function(a.preference, "annotate.preference")
    with LabelProgress(db, project, total, cfg.run.progress):
        res = collect_preferences(str(candidates), str(out), preference=fn, db=db, project=project, k=a.k,
                                  crowd=a.crowd, temperature=a.temperature, length_bias=a.length_bias,
                                  position_bias=a.position_bias, seed=cfg.run.seed, pairs=a.pairs)
    sim = {k: v for k, v in res["simulation"].items() if k != "acknowledged"}
    print(f"annotate: {sim['labels']} labels at {sim['labels_per_s']:.0f}/s; labels equal to the noise-free "
          f"preference: {sim['agreement_with_noise_free']:.3f}; {res['rows']} pairs -> {out}", flush=True)
    return {"rows": res["rows"], "output": str(out), "simulation": sim, "import": res["import"], "db": db}


def collect_human(cfg: PipelineConfig, candidates: Path, out: Path, db: str, project: str,
                  on_ready: Callable | None = None) -> dict:
    """Serve the web app, print where and how to log in, wait until every item has k labels (or
    annotate.wait_seconds), then export the majority preferences."""
    import secrets

    from rlhfkit.annotate.api import LocalServer, export_project
    from rlhfkit.train_utils import progress

    a = cfg.annotate
    with LocalServer(db, host=a.host, port=a.port) as server:
        server.create_project(project, kinds=["pairwise"], k=a.k, gold_rate=0.0,
                              instructions="Which continuation of the story is better?")
        imported = server.import_file(project, str(candidates), pairs=a.pairs)
        store = server.store
        password = secrets.token_urlsafe(9)
        user = store.user_by_name(a.user)
        if user is None:
            user, _ = store.create_user(name=a.user, role="annotator", password=password)
        else:
            store.set_password(name=a.user, password=password)
        proj = store.get_project(name=project)
        store.add_member(project_id=proj.id, user_id=user.id)
        host = a.host if a.host not in ("0.0.0.0", "::") else os.uname().nodename
        print(f"\nannotate: label {imported['items']} pairs in the web app: http://{host}:{server.port}/projects/"
              f"{proj.id}\n          user {a.user}, password {password}   (each item needs {a.k} label(s); "
              "training starts when all are done)\n", flush=True)
        if on_ready is not None:
            on_ready(server, project)
        need = store.progress(project_id=proj.id)["items"]
        bar = progress(need, "annotate (people)", cfg.run.progress, unit="item")
        t0 = time.monotonic()
        while True:
            done = store.progress(project_id=proj.id)["complete_items"]
            bar.update(done - bar.n)
            if done >= need or (a.wait_seconds and time.monotonic() - t0 > a.wait_seconds):
                break
            time.sleep(1.0)
        bar.close()
        res = export_project(store, project=project, kind="preferences", output=str(out), mode="majority")
    print(f"annotate: {res['rows']} labelled pairs -> {out}", flush=True)
    return {"rows": res["rows"], "output": str(out), "import": imported, "db": db}


def rm_config(cfg: PipelineConfig, train: str, folder: str) -> Any:
    from rlhfkit.trainers import rm as RMT

    return stage_config(RMT.RMTrainConfig, {}, cfg.rm.args, {
        "data.train": train, "run.output_dir": folder, "run.seed": cfg.run.seed, "run.progress": cfg.run.progress,
        "run.threads": cfg.run.threads, "run.device": cfg.run.device}, "rm.args")


def run_rm(cfg: PipelineConfig, pair_files: list[str], folder: Path, resume: bool) -> dict:
    from rlhfkit.data import read_records, write_jsonl
    from rlhfkit.trainers import rm as RMT

    train = folder / "pairs.jsonl"
    write_jsonl(train, [r.data for f in pair_files for r in read_records(f)])
    rcfg = rm_config(cfg, str(train), str(folder))
    result = RMT.train(checkpoint_on(rcfg, resume))
    if "model_dir" not in result:
        raise UserError(f"rm: stopped before the end; re-run the pipeline to continue ({folder})")
    result["pairs_file"] = str(train)
    gold = gold_function(cfg)
    if gold is not None and rcfg.data.eval_fraction > 0:
        result.update(rm_gold_check(rcfg, folder, gold))
    return result


def gold_function(cfg: PipelineConfig) -> Callable | None:
    """The known "true" preference: eval.judge, or the simulated crowd's preference."""
    from rlhfkit.plugins import load_function

    spec = cfg.eval.judge or (cfg.annotate.preference if cfg.annotate.source == "simulate" else "")
    return load_function(spec, "eval.judge") if spec else None


def rm_gold_check(rcfg: Any, folder: Path, gold: Callable) -> dict:
    """On the reward model's held-out pairs: how often it orders a pair like the gold function, how often the
    crowd's label did, and (gold, rm) scores of the held-out completions for the report's scatter plot."""
    from rlhfkit.plugins import call_scorer
    from rlhfkit.reward import load_reward_model
    from rlhfkit.trainers import rm as RMT

    pairs = RMT.load_rm_data(rcfg).eval_pairs
    if not pairs:
        return {}
    rm = load_reward_model(folder, cache=True)
    prompts = [p.prompt for p in pairs] * 2
    comps = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    g = call_scorer(gold, prompts, comps, what="gold")
    r = rm.score(prompts, comps)
    n = len(pairs)
    decided = [i for i in range(n) if g[i] != g[n + i]]
    rm_ok = sum((r[i] > r[n + i]) == (g[i] > g[n + i]) for i in decided)
    crowd_ok = sum(g[i] > g[n + i] for i in decided)
    return {"gold_accuracy": rm_ok / max(1, len(decided)), "crowd_gold_agreement": crowd_ok / max(1, len(decided)),
            "gold_decided_pairs": len(decided), "scatter": [g, r]}


def rl_config(cfg: PipelineConfig, policy: str, prompts: str, rm_dir: str, pairs: str, folder: str
              ) -> tuple[Any, Any]:
    """(trainer module, its validated config) of the RL stage."""
    import importlib

    module_name, cls_name = rl_command(cfg.rl.method)
    module = importlib.import_module(module_name)
    forced: dict[str, Any] = {"run.output_dir": folder, "run.seed": cfg.run.seed, "run.progress": cfg.run.progress,
                              "run.threads": cfg.run.threads, "run.device": cfg.run.device, "model.name": policy}
    defaults: dict[str, Any] = {f"model.{k}": v for k, v in to_dict(cfg.model).items() if k != "name"}
    if cfg.rl.method == "dpo":
        forced["data.train"] = pairs
    else:
        defaults["gen"] = to_dict(cfg.gen)
        forced["data.prompts"] = prompts
        forced["reward.function" if cfg.rl.reward_function else "reward.model"] = cfg.rl.reward_function or rm_dir
    rcfg = stage_config(getattr(module, cls_name), defaults, cfg.rl.args, forced, "rl.args")
    if cfg.rl.checkpoints:
        rcfg.run.save_every = max(1, rcfg.train.steps // cfg.rl.checkpoints)
        rcfg.run.keep_checkpoints = cfg.rl.checkpoints + 1
    return module, rcfg


def run_rl(cfg: PipelineConfig, policy: str, prompts: str, rm_dir: str, pairs: str, folder: Path,
           resume: bool) -> dict:
    module, rcfg = rl_config(cfg, policy, prompts, rm_dir, pairs, str(folder))
    result = module.main(checkpoint_on(rcfg, resume), ["rlhfkit", "pipeline", cfg.rl.method])
    if "model_dir" not in result:
        raise UserError(f"rl: {cfg.rl.method} stopped at step {result.get('step')} of {rcfg.train.steps}; re-run "
                        f"the pipeline to continue from its checkpoint in {folder}")
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def judge_of(cfg: PipelineConfig) -> str:
    return cfg.eval.judge or (cfg.annotate.preference if cfg.annotate.source == "simulate" else "")


def eval_config(cfg: PipelineConfig, policy: str, base: str, rm_dir: str, output: str, **extra: Any) -> Any:
    from rlhfkit.trainers import evaluate as E

    forced = {"a.model": policy, "a.name": "tuned", "b.model": base, "b.name": "base", "judge.function": judge_of(cfg),
              "judge.model": rm_dir, "data.prompts": cfg.eval.prompts, "tokenizer": cfg.model.tokenizer,
              "seed": cfg.run.seed, "progress": cfg.run.progress, "device": cfg.run.device, "output": output}
    return stage_config(E.EvalConfig, {"gen": to_dict(cfg.gen)}, cfg.eval.args, {**forced, **extra}, "eval.args")


def run_eval(cfg: PipelineConfig, policy: str, base: str, rm_dir: str, folder: Path,
             checkpoints: list[tuple[str, str]]) -> dict:
    """`rlhfkit eval` of the final policy against the base; then the gold-vs-reward curve: the base and every RL
    checkpoint on eval.curve_prompts held-out prompts (gold score, reward-model score, KL to the base)."""
    from rlhfkit.trainers import evaluate as E

    E.main(eval_config(cfg, policy, base, rm_dir, str(folder / "eval.json")))
    curve = []
    if cfg.eval.curve_prompts and checkpoints:
        for label, path in [("base", base)] + checkpoints:
            pcfg = eval_config(cfg, path, "", rm_dir, str(folder / "curve.json"), **{
                "reference": base, "num_samples": 1, "data.limit": cfg.eval.curve_prompts, "report": False,
                "progress": False})
            point, _ = E.evaluate(pcfg)
            a = point["policies"]["a"]
            curve.append({"point": label, "kl": a.get("kl", 0.0), **a["scores"]})
            print(f"eval: curve {label}: KL {curve[-1]['kl']:.3f}, " +
                  ", ".join(f"{j} {v:.4f}" for j, v in a["scores"].items()), flush=True)
        atomic_write_text(folder / "curve.json", json.dumps(curve, indent=1) + "\n")
    return {"eval": str(folder / "eval.json"), "curve": curve}


def rl_checkpoints(folder: Path, round_index: int, steps: int) -> list[tuple[str, str]]:
    """(label, model folder) of the full-model checkpoints of an RL stage, ending with its final model (steps)."""
    from rlhfkit import train_utils as U

    out = []
    for step, path in U.list_checkpoints(folder):
        if step < steps and (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            out.append((f"round {round_index} step {step}", str(path)))
    if (folder / "model" / "config.json").is_file():
        out.append((f"round {round_index} step {steps}", str(folder / "model")))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


def sft_config(cfg: PipelineConfig, folder: str) -> Any:
    from rlhfkit.trainers import sft as SFT

    return stage_config(SFT.SFTConfig, {}, cfg.sft.args, {
        **{f"model.{k}": v for k, v in to_dict(cfg.model).items()}, "run.output_dir": folder,
        "run.seed": cfg.run.seed, "run.progress": cfg.run.progress, "run.threads": cfg.run.threads,
        "run.device": cfg.run.device}, "sft.args")


def check_stage_args(cfg: PipelineConfig) -> None:
    """Build every stage's config once with placeholder paths: a wrong key in any stage's args fails at once."""
    x = "PLACEHOLDER"
    if cfg.sft.enabled:
        sft_config(cfg, x)
    if cfg.annotate.source != "file":
        generate_config(cfg, x, x, x, 0)
    if cfg.rm.enabled:
        rm_config(cfg, x, x)
    rl_config(cfg, x, x, x, x, x)
    if cfg.eval.enabled:
        eval_config(cfg, x, x, x if cfg.rm.enabled else "", x)


def run_pipeline(cfg: PipelineConfig, argv: list[str] | None = None, on_human_ready: Callable | None = None) -> dict:
    """Run (or continue) every stage; returns the summary dict (also written to summary.json)."""
    import torch

    from rlhfkit.config import write_run_files

    check_stage_args(cfg)
    t_start, cpu_start, load_start = time.perf_counter(), _cpu_seconds(), _loadavg()
    out = Path(cfg.run.output_dir)
    write_run_files(cfg, out, argv)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    labels = cfg.annotate.source != "file"
    stages = Stages(out, int(cfg.sft.enabled) + cfg.rounds * (2 * labels + int(cfg.rm.enabled) + 1)
                    + int(cfg.eval.enabled))
    db = str(out / "feedback.db")

    base, base_fp = cfg.model.name, fingerprint("model", to_dict(cfg.model), [])
    if cfg.sft.enabled:
        scfg = sft_config(cfg, str(out / "sft"))
        base_fp = fingerprint("sft", scfg, [base_fp])
        stages.run("sft", out / "sft", base_fp, lambda resume: _sft(scfg, resume))
        base = str(out / "sft" / "model")

    policy, policy_fp = base, base_fp
    pair_files: list[str] = []
    rm_dir, rm_fp, rl_results, rm_results, checkpoints = "", "", [], [], []
    for r in range(1, cfg.rounds + 1):
        rd = out / f"round{r}"
        if labels:
            prompts_file = round_prompts(cfg, r - 1, rd)
            gen_fp = fingerprint("generate", {"g": to_dict(cfg.generate), "gen": to_dict(cfg.gen), "round": r,
                                              "prompts": _file_digest(prompts_file)}, [policy_fp])
            cands = rd / "generate" / "candidates.jsonl"
            stages.run(f"round {r}: generate", rd / "generate", gen_fp,
                       lambda resume, p=policy, pf=prompts_file, c=cands, s=cfg.run.seed * 1000 + r:
                       run_generate(cfg, p, pf, c, s))
            a = cfg.annotate
            ann_fp = fingerprint("annotate", {"a": to_dict(a), "seed": cfg.run.seed} if a.source == "simulate"
                                 else {"source": "human", "k": a.k, "pairs": a.pairs}, [gen_fp])
            # people's labels are kept under one project name per round whatever the settings; simulated ones
            # are redone when the crowd's settings change
            project = f"round{r}" if a.source == "human" else f"round{r}-{ann_fp[:8]}"
            prefs = rd / "annotate" / "prefs.jsonl"
            stages.run(f"round {r}: annotate ({a.source})", rd / "annotate", ann_fp,
                       lambda resume, c=cands, p=prefs, pr=project: run_annotate(cfg, c, p, db, pr, on_human_ready))
            pair_files.append(str(prefs))
            pairs_fp = ann_fp
        else:
            pair_files = [cfg.annotate.file]
            pairs_fp = fingerprint("pairs", {"digest": _file_digest(Path(_resolve(cfg.annotate.file)))}, [])
        if cfg.rm.enabled:
            rm_fp = fingerprint("rm", {"args": cfg.rm.args, "seed": cfg.run.seed, "gold": judge_of(cfg)},
                                [pairs_fp, rm_fp])
            rm_results.append(stages.run(f"round {r}: rm", rd / "rm", rm_fp,
                                         lambda resume, files=list(pair_files), f=rd / "rm":
                                         run_rm(cfg, files, f, resume)))
            rm_dir = str(rd / "rm")
        rl_fp = fingerprint("rl", {"rl": to_dict(cfg.rl), "model": to_dict(cfg.model), "gen": to_dict(cfg.gen),
                                   "seed": cfg.run.seed}, [policy_fp, rm_fp, pairs_fp])
        rl_results.append(stages.run(f"round {r}: {cfg.rl.method}", rd / "rl", rl_fp,
                                     lambda resume, p=policy, pf=pair_files[-1], f=rd / "rl", m=rm_dir:
                                     run_rl(cfg, p, cfg.rl.prompts or cfg.generate.prompts, m, pf, f, resume)))
        checkpoints += rl_checkpoints(rd / "rl", r, int(rl_results[-1].get("step", 0)))
        policy, policy_fp = str(rd / "rl" / "model"), rl_fp

    eval_res = None
    if cfg.eval.enabled:
        ev_fp = fingerprint("eval", {"eval": to_dict(cfg.eval), "gen": to_dict(cfg.gen), "seed": cfg.run.seed,
                                     "judge": judge_of(cfg)}, [policy_fp, rm_fp])
        eval_res = stages.run("eval", out / "eval", ev_fp,
                              lambda resume: run_eval(cfg, policy, base, rm_dir, out / "eval", checkpoints))
    summary = make_summary(cfg, stages, rm_results, rl_results, eval_res, policy, base,
                           time.perf_counter() - t_start, _cpu_seconds() - cpu_start, load_start)
    rm_light = [{k: v for k, v in r.items() if k != "scatter"} for r in rm_results]
    atomic_write_text(out / "pipeline.json", json.dumps({"stages": stages.records, "rm": rm_light, "rl": rl_results},
                                                        indent=1, default=str) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if cfg.report:
        from rlhfkit.report import pipeline_report

        data = report_data(cfg, out, summary, stages, rm_results, eval_res)
        atomic_write_text(out / "report.html", pipeline_report(data))
    return summary


def _sft(scfg: Any, resume: bool) -> dict:
    from rlhfkit.trainers import sft as SFT

    result = SFT.main(checkpoint_on(scfg, resume))
    if not (Path(scfg.run.output_dir) / "model").is_dir():
        raise UserError(f"sft: stopped before the end; re-run the pipeline to continue ({scfg.run.output_dir})")
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def make_summary(cfg: PipelineConfig, stages: Stages, rm_results: list, rl_results: list,
                 eval_res: dict | None, policy: str, base: str, seconds: float, cpu: float, load_start: float) -> dict:
    s: dict[str, Any] = {}
    if eval_res:
        ev = json.loads(Path(eval_res["eval"]).read_text(encoding="utf-8"))
        a, b = ev["policies"]["a"], ev["policies"]["b"]
        judge = ev.get("judge", "function")
        gold = "gold" if cfg.eval.judge or cfg.annotate.source == "simulate" else "score"
        if "function" in a["scores"]:
            s[f"{gold}_score_before"], s[f"{gold}_score_after"] = b["scores"]["function"], a["scores"]["function"]
        if "reward_model" in a["scores"]:
            s["rm_score_before"], s["rm_score_after"] = b["scores"]["reward_model"], a["scores"]["reward_model"]
        s["win_rate"] = ev["win_rate"][judge]["win_rate"]
        s["win_rate_stderr"] = ev["win_rate"][judge]["stderr"]
        s["win_rate_judge"] = {"function": cfg.eval.judge or cfg.annotate.preference,
                               "reward_model": "reward model"}.get(judge, judge)
        s["kl"] = a.get("kl")
        s["eval_prompts"], s["eval_comparisons"] = ev["prompts"], ev["win_rate"][judge]["n"]
        s["distinct_2_before"], s["distinct_2_after"] = b["distinct_2"], a["distinct_2"]
        s["length_words_before"], s["length_words_after"] = b["length_words"], a["length_words"]
        for key in ("chrf", "bleu"):
            if key in a:
                s[f"{key}_before"], s[f"{key}_after"] = b[key], a[key]
    if rm_results:
        last = rm_results[-1]
        s["rm_accuracy"] = last.get("eval/accuracy")
        if "gold_accuracy" in last:
            s["rm_gold_accuracy"] = last["gold_accuracy"]
            s["crowd_gold_agreement"] = last["crowd_gold_agreement"]
    if rl_results and "objective/kl" in rl_results[-1]:
        s["train_kl_last"] = rl_results[-1]["objective/kl"]
    s.update(method=cfg.rl.method, rounds=cfg.rounds, policy=policy, base=base, seconds=seconds, cpu_seconds=cpu,
             load_average_start=load_start, load_average_end=_loadavg(), threads=cfg.run.threads,
             stage_seconds={st["name"]: round(st["seconds"], 1) for st in stages.records})
    return s


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report_data(cfg: PipelineConfig, out: Path, summary: dict, stages: Stages, rm_results: list,
                eval_res: dict | None) -> dict:
    """Everything pipeline_report draws, read back from the stage folders."""
    gold_label = "gold score" if cfg.annotate.source == "simulate" or cfg.eval.judge else "judge score"
    if cfg.annotate.source == "simulate" and cfg.annotate.preference == "rlhfkit.gold:sentiment":
        gold_label = "gold: VADER sentiment"
    metrics, offset = [], 0
    for r in range(1, cfg.rounds + 1):
        rows = _jsonl(out / f"round{r}" / "rl" / "metrics.jsonl")
        metrics += [{**m, "step": m["step"] + offset} for m in rows]
        offset += rows[-1]["step"] if rows else 0
    data: dict[str, Any] = {
        "title": "rlhfkit: the RLHF loop", "gold_label": gold_label, "rl_metrics": metrics,
        "subtitle": f"{cfg.model.name} policy, {cfg.rounds} round(s), {cfg.rl.method}, labels from "
                    f"{cfg.annotate.source}" + (f" ({cfg.annotate.preference}, crowd of {cfg.annotate.crowd}, "
                                                f"k={cfg.annotate.k}, T={cfg.annotate.temperature})"
                                                if cfg.annotate.source == "simulate" else ""),
        "summary": {k: v for k, v in summary.items() if k != "stage_seconds"}, "stages": stages.records,
        "notes": [f"Measured on {os.cpu_count()} CPU(s) with {summary['threads']} torch thread(s); load average "
                  f"{summary['load_average_start']:.1f} at the start, {summary['load_average_end']:.1f} at the end "
                  f"(other jobs share the machine). CPU time of this process: {summary['cpu_seconds']:.0f}s."]}
    if rm_results:
        last = rm_results[-1]
        data["rm"] = {"held-out accuracy (crowd labels)": last.get("eval/accuracy"),
                      "held-out accuracy vs gold": last.get("gold_accuracy"),
                      "crowd labels agreeing with gold": last.get("crowd_gold_agreement"),
                      "training pairs": last.get("train/pairs") or _count_lines(last.get("pairs_file")),
                      "kind": (cfg.rm.args or {}).get("model.kind", ""),
                      "features": last.get("features", "")}
        if last.get("scatter"):
            data["rm"]["scatter"] = last["scatter"]
    if eval_res:
        ev_path = Path(eval_res["eval"])
        data["eval"] = json.loads(ev_path.read_text(encoding="utf-8"))
        data["eval_rows"] = _jsonl(ev_path.with_name("eval_samples.jsonl"))
        curve = eval_res.get("curve") or []
        if curve and "function" in curve[0] and "reward_model" in curve[0]:
            data["overopt"] = [{"kl": c["kl"], "gold": c["function"], "proxy": c["reward_model"]} for c in curve]
        else:
            data["overopt_note"] = ("Needs a gold function, a reward model and full-model RL checkpoints "
                                    "(eval.curve_prompts > 0, rl.checkpoints > 0).")
    return data


def _count_lines(path: str | None) -> int | None:
    return sum(1 for _ in open(path, encoding="utf-8")) if path and os.path.isfile(path) else None


def resolve_cli(cfg: PipelineCLI, argv: list[str] | None) -> PipelineConfig:
    """defaults < the positional YAML file < key=value options of the command line."""
    if not cfg.file:
        return cfg
    overrides = [a for a in (argv or [])[2:] if "=" in a and not a.startswith("-") and not a.startswith("file=")]
    if "--config" in (argv or []) or any(a.startswith("--config=") for a in argv or []):
        raise UserError("give the pipeline YAML either as the positional argument or with --config, not both")
    return load_config(PipelineConfig, cfg.file, overrides)


def main(cfg: PipelineConfig, argv: list[str] | None = None) -> dict:
    if isinstance(cfg, PipelineCLI):
        cfg = resolve_cli(cfg, argv)
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
