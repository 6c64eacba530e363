"""The stages of `rlhfkit pipeline` (see rlhfkit/trainers/pipeline.py for the loop and the config): each builds its
command's config from the pipeline's keys (defaults < the stage's `args` < the paths the pipeline sets) and runs it
in-process; then the run's summary.json and the data the HTML report draws.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rlhfkit.config import atomic_write_text, to_dict
from rlhfkit.errors import UserError

if TYPE_CHECKING:
    from rlhfkit.trainers.pipeline import PipelineConfig, Stages


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

OUTPUT_DIR = "${run.output_dir}"
"""Stands for run.output_dir in any string key of a pipeline config (paths of files the prepare stage writes)."""


def expand_output_dir(cfg: Any) -> None:
    """Replace ${run.output_dir} by cfg.run.output_dir in every string of the config tree (stage args included)."""
    import dataclasses

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(OUTPUT_DIR, cfg.run.output_dir)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.name != "run":
                    setattr(value, f.name, sub(getattr(value, f.name)))
        return value

    sub(cfg)


def run_prepare(cfg: PipelineConfig, folder: Path) -> dict:
    """prepare.function(folder, **prepare.args): writes the run's data files; result + a digest of every file."""
    from rlhfkit.plugins import load_function

    fn = load_function(cfg.prepare.function, "prepare.function")
    result = fn(folder, **cfg.prepare.args)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("STARTED.json", "DONE.json"))
    digest = hashlib.sha256("".join(f"{p.relative_to(folder)}:{_file_digest(p)};" for p in files).encode())
    print(f"prepare: {len(files)} file(s) in {folder}", flush=True)
    return {"result": result if isinstance(result, dict) else {}, "files": [str(p) for p in files],
            "digest": digest.hexdigest()[:16]}


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

        store, stopping = None, False
        while not stopping:
            stopping = self.stop.wait(1.0)  # one more count after the stop: the bar ends at the true total
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
    """Items the feedback app makes from n different completions of one prompt."""
    return n * (n - 1) // 2 if pairs == "all" else max(0, n - 1) if pairs == "adjacent" else int(n > 1)


def run_annotate(cfg: PipelineConfig, candidates: Path, out: Path, db: str, project: str,
                 on_ready: Callable | None = None) -> dict:
    from rlhfkit.data import read_records

    a = cfg.annotate
    rows = read_records(str(candidates))
    total = a.k * sum(n_pairs(len(set(map(str, r.data["completions"]))), a.pairs) for r in rows)
    if a.source == "human":
        return collect_human(cfg, candidates, out, db, project, on_ready)
    from rlhfkit.annotate.api import collect_preferences
    from rlhfkit.plugins import load_function

    fn = with_prompt_columns(load_function(a.preference, "annotate.preference"), prompt_columns([str(candidates)]),
                             "annotate.preference")
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
                              instructions=a.instructions)
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


def prompt_columns(files: list[str]) -> dict[str, dict]:
    """Extra fields (e.g. a translation's "reference") of the prompt records in candidates files, by prompt."""
    from rlhfkit.data import read_records

    table: dict[str, dict] = {}
    for f in files:
        for rec in read_records(f):
            extra = {k: v for k, v in rec.data.items() if k not in ("prompt", "completions")}
            table.setdefault(json.dumps(rec.data["prompt"], sort_keys=True), extra)
    return table


def with_prompt_columns(fn: Callable, table: dict[str, dict], what: str) -> Callable:
    """fn(prompts, completions) that passes fn the extra fields of each prompt's record by name (as the RL trainers
    and the evaluation do), so a preference like rlhfkit.rewards.mt:chrf gets its `reference`."""
    from rlhfkit.plugins import call_scorer

    keys = sorted({k for extra in table.values() for k in extra})
    if not keys:
        return fn

    def scored(prompts: list, completions: list) -> list[float]:
        rows = [table.get(json.dumps(p, sort_keys=True), {}) for p in prompts]
        return call_scorer(fn, prompts, completions, {k: [r.get(k) for r in rows] for k in keys}, what=what)

    return scored


def rm_config(cfg: PipelineConfig, train: str, folder: str) -> Any:
    from rlhfkit.trainers import rm as RMT

    return stage_config(RMT.RMTrainConfig, {}, cfg.rm.args, {
        "data.train": train, "run.output_dir": folder, "run.seed": cfg.run.seed, "run.progress": cfg.run.progress,
        "run.threads": cfg.run.threads, "run.device": cfg.run.device}, "rm.args")


def run_rm(cfg: PipelineConfig, pair_files: list[str], folder: Path, resume: bool,
           candidates: list[str] | None = None) -> dict:
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
    if gold is not None and candidates:
        gold = with_prompt_columns(gold, prompt_columns(candidates), "eval.judge")
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
    from rlhfkit.reward.data import load_rm_data

    pairs = load_rm_data(rcfg).eval_pairs  # the split rm train held out (same data keys, same split_seed)
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


def rl_config(cfg: PipelineConfig, policy: str, prompts: str, rm_dir: str, pairs: str, folder: str,
              reference: str = "") -> tuple[Any, Any]:
    """(trainer module, its validated config) of the RL stage. `reference` is the KL anchor when it is not the
    starting policy (rounds after the first keep the base policy as π_ref)."""
    import importlib

    module_name, cls_name = rl_command(cfg.rl.method)
    module = importlib.import_module(module_name)
    forced: dict[str, Any] = {"run.output_dir": folder, "run.seed": cfg.run.seed, "run.progress": cfg.run.progress,
                              "run.threads": cfg.run.threads, "run.device": cfg.run.device, "model.name": policy,
                              "model.reference": reference if reference != policy else ""}
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
           resume: bool, reference: str = "") -> dict:
    module, rcfg = rl_config(cfg, policy, prompts, rm_dir, pairs, str(folder), reference)
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


def _sft(scfg: Any, resume: bool) -> dict:
    from rlhfkit.trainers import sft as SFT

    result = SFT.main(checkpoint_on(scfg, resume))
    if not (Path(scfg.run.output_dir) / "model").is_dir():
        raise UserError(f"sft: stopped before the end; re-run the pipeline to continue ({scfg.run.output_dir})")
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def _file_digest(path: Path) -> str:
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Summary and report data


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
             load_average_start=load_start, load_average_end=loadavg(), threads=cfg.run.threads,
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


def cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")
