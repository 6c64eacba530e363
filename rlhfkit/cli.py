"""The `rlhfkit` command: a thin dispatcher. Each stage module exposes a config dataclass and `main(cfg, argv)`.

    rlhfkit --help
    rlhfkit STAGE --help                     # every key, with its type, default and docstring
    rlhfkit STAGE [--config FILE] [--print-config] [--resume] [key.sub=value ...]
"""

from __future__ import annotations

import importlib
import os
import sys

from rlhfkit.errors import UserError

# name -> (one-line help, module, config class) or name -> (one-line help, {sub: ...}) for command groups.
# Modules are imported only when their command runs, so `rlhfkit --help` stays fast.
COMMANDS: dict[str, tuple] = {
    "sft": ("Supervised fine-tuning on prompt/completion, chat or plain-text data",
            "rlhfkit.trainers.sft", "SFTConfig"),
    "dpo": ("Direct preference optimisation (DPO, IPO, cDPO, rDPO) on preference pairs", "rlhfkit.trainers.dpo", "DPOConfig"),
    "generate": ("Sample completions for a prompts file; writes JSONL {prompt, completions}",
                 "rlhfkit.trainers.generate", "GenerateConfig"),
    "ppo": ("PPO with a KL penalty against the reference policy (reward function or reward model)",
            "rlhfkit.trainers.ppo", "PPOConfig"),
    "grpo": ("GRPO, Dr. GRPO or REINFORCE++: k completions per prompt, group-relative advantages, no value model",
             "rlhfkit.trainers.grpo", "GRPOConfig"),
    "rloo": ("RLOO: REINFORCE with a leave-one-out baseline over k completions per prompt, KL in the reward",
             "rlhfkit.trainers.grpo", "RLOOConfig"),
    "bon": ("Best-of-n rejection sampling: the top-scored of n completions per prompt as SFT data (+ pairs)",
            "rlhfkit.trainers.bon", "BoNConfig"),
    "annotate": ("Human feedback: annotation web app, users, import, simulated crowd, export", {
        "serve": ("Start the annotation web app and JSON API (FastAPI + uvicorn)", "rlhfkit.annotate.cli", "ServeConfig"),
        "project": ("Manage projects", {
            "add": ("Create a project (label kinds, k per item, scale)", "rlhfkit.annotate.cli", "ProjectAddConfig")}),
        "import": ("Import candidates (generate output) into a project", "rlhfkit.annotate.cli", "ImportConfig"),
        "export": ("Write preference/rating/edit JSONL for rm and dpo", "rlhfkit.annotate.cli", "ExportConfig"),
        "simulate": ("Label a project with a simulated crowd over HTTP", "rlhfkit.annotate.cli", "SimulateConfig"),
        "user": ("Manage users", {
            "add": ("Create a user and print its API token", "rlhfkit.annotate.cli", "UserAddConfig"),
            "token": ("Replace a user's API token and print it", "rlhfkit.annotate.cli", "UserTokenConfig"),
            "deactivate": ("Lock a user out (token, password, sessions); undo=true reactivates",
                           "rlhfkit.annotate.cli", "UserDeactivateConfig"),
            "list": ("List users, roles and deactivated accounts", "rlhfkit.annotate.cli", "UserListConfig")}),
        "stats": ("Progress per project and annotator, gold accuracy", "rlhfkit.annotate.cli", "StatsConfig"),
        "agreement": ("Percent agreement, Krippendorff's alpha, per pair", "rlhfkit.annotate.cli", "AgreementConfig"),
        "migrate": ("Upgrade a database to this version's schema", "rlhfkit.annotate.cli", "MigrateConfig"),
    }),
    "demo": ("The whole RLHF loop on bundled defaults, with an HTML report (no arguments needed)",
             "rlhfkit.trainers.demo", "DemoConfig"),
    "pipeline": ("Run the RLHF loop from one YAML: sft, generate, annotate, rm, ppo|grpo|rloo|dpo, eval, rounds",
                 "rlhfkit.trainers.pipeline", "PipelineConfig"),
    "eval": ("Win rate, mean score, KL, diversity, length, chrF/BLEU of policy A vs B; JSON + HTML report",
             "rlhfkit.trainers.evaluate", "EvalConfig"),
    "rm": ("Train, evaluate and apply reward models", {
        "train": ("Train a linear (wᵀφ) or deep (scalar-head) reward model on pairs and/or ratings",
                  "rlhfkit.trainers.rm", "RMTrainConfig"),
        "eval": ("Pairwise accuracy, BT loss, calibration and length bias on preference pairs; JSON + plots",
                 "rlhfkit.trainers.rm", "RMEvalConfig"),
        "score": ("Add reward-model scores to a JSONL of prompt/completion(s)", "rlhfkit.trainers.rm",
                  "RMScoreConfig"),
    }),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    lines = ["usage: rlhfkit COMMAND [--config FILE] [--print-config] [key=value ...]", "",
             "RLHF toolkit: collect feedback, train reward models, fine-tune with PPO/GRPO/RLOO/DPO.", "",
             "commands:"]
    for name, entry in COMMANDS.items():
        lines.append(f"  {name:<{width}}{entry[0]}")
        if isinstance(entry[1], dict):
            for sub, sub_entry in entry[1].items():
                lines.append(f"  {'':<{width}}  {sub:<10}{sub_entry[0]}")
    lines += ["", "`rlhfkit COMMAND --help` lists every option of a command with its documentation."]
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[tuple, list[str], str]:
    """Walk command groups: returns (leaf entry, remaining argv, program name)."""
    entry: tuple = ("", COMMANDS)
    prog = "rlhfkit"
    while isinstance(entry[1], dict):
        table = entry[1]
        if not argv or argv[0] in ("-h", "--help"):
            if prog == "rlhfkit":
                print(_usage())
            else:
                print(f"usage: {prog} SUBCOMMAND ...\n\nsubcommands:")
                for sub, sub_entry in table.items():
                    print(f"  {sub:<12}{sub_entry[0]}")
            raise SystemExit(0 if argv else 2)
        name = argv[0]
        if name not in table:
            import difflib

            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown command '{name}'{hint}; see {prog} --help")
        entry, argv, prog = table[name], argv[1:], f"{prog} {name}"
    return entry, argv, prog


def run_command(argv: list[str]) -> object:
    from rlhfkit.config import parse_cli

    entry, rest, prog = _resolve(argv)
    _, module_name, cls_name = entry
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    cfg = parse_cli(cls, rest, prog, description=(module.__doc__ or "").strip())
    return module.main(cfg, ["rlhfkit", *argv])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        run_command(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
