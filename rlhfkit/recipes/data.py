"""Data preparation for the application recipes (recipes/*.yaml, docs/recipes.md). Deterministic: the same source
files and arguments give the same bytes.

- `prepare_multi30k(output_dir, ...)`: English->French (or German) translation from Multi30k, read at run time from
  ../shared/data/multi30k (research-only data: never bundled or committed; the files are written into the run's
  folder). Called by the pipeline's prepare stage (`prepare.function: rlhfkit.recipes.data:prepare_multi30k`).
- `hh_dialogues(path, ...)`: Anthropic HH transcripts as chat messages, split by dialogue into train / held-out;
  `scripts/prepare_recipe_data.py` writes the bundled hh_dialogue_* files with it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError

MT_LANGUAGES = {"fr": "French", "de": "German"}
MT_TEMPLATE = "Translate to {language}: {source}\n{language}:"
"""The translation prompt; the completion is " " + the reference translation, then EOS."""


def mt_prompt(source: str, target: str = "fr") -> str:
    """mt_prompt("A dog runs.") -> "Translate to French: A dog runs.\\nFrench:"."""
    return MT_TEMPLATE.format(language=MT_LANGUAGES[target], source=source.strip())


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_multi30k(source: str | Path, split: str, target: str = "fr") -> list[tuple[str, str]]:
    """(English, target) sentence pairs of a Multi30k split (train, val), empty lines dropped."""
    root = Path(source)
    if target not in MT_LANGUAGES:
        raise UserError(f"prepare.args.target: expected one of {', '.join(MT_LANGUAGES)}, got {target!r}")
    files = [root / f"{split}.en.gz", root / f"{split}.{target}.gz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"prepare: {missing[0]} not found: this recipe reads Multi30k (research-only, not shipped "
                        f"with rlhfkit) from {root}; give its folder with prepare.args.source=DIR")
    en, tgt = _lines(files[0]), _lines(files[1])
    if len(en) != len(tgt):
        raise UserError(f"prepare: {files[0]} and {files[1]} have {len(en)} and {len(tgt)} lines (not aligned)")
    return [(e.strip(), t.strip()) for e, t in zip(en, tgt) if e.strip() and t.strip()]


def prepare_multi30k(output_dir: str | Path, source: str = "../shared/data/multi30k", target: str = "fr",
                     rl_prompts: int = 0, valid: int = 0) -> dict:
    """Write the translation recipe's data into output_dir:

    - mt_sft_train.jsonl: every train pair as {"prompt": mt_prompt(en), "completion": " " + translation};
    - mt_rl_prompts.jsonl: {"prompt", "reference"} for the RL and candidate prompts: the first `rl_prompts` train
      pairs (0: all), the reference feeding chrF/BLEU rewards and the simulated crowd;
    - mt_valid.jsonl: {"prompt", "reference"} for the first `valid` validation pairs (0: all 1,014).
    Returns {"files": {name: path}, "counts": {...}}."""
    out = Path(output_dir)
    train = read_multi30k(source, "train", target)
    val = read_multi30k(source, "val", target)
    files = {"sft": out / "mt_sft_train.jsonl", "rl": out / "mt_rl_prompts.jsonl", "valid": out / "mt_valid.jsonl"}
    _write_jsonl(files["sft"], [{"prompt": mt_prompt(e, target), "completion": " " + t} for e, t in train])
    rl = train[:rl_prompts] if rl_prompts else train
    _write_jsonl(files["rl"], [{"prompt": mt_prompt(e, target), "reference": t} for e, t in rl])
    val = val[:valid] if valid else val
    _write_jsonl(files["valid"], [{"prompt": mt_prompt(e, target), "reference": t} for e, t in val])
    return {"files": {k: str(v) for k, v in files.items()},
            "counts": {"sft": len(train), "rl": len(rl), "valid": len(val)}}


# ----------------------------------------------------------------------------------------------------------------
# Anthropic HH dialogues

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ARTEFACT = re.compile(r"(\s*\n\n(Human|Assistant)\s*)+$")
"""A dangling "\n\nHuman" (no colon) that ends some HH turns."""


def hh_messages(prompt: str) -> list[dict]:
    """An HH prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:") as chat messages, without the final
    (empty) assistant turn. Rendering them with rlhfkit's default chat template and a generation prompt gives the
    HH layout back (up to whitespace around each turn)."""
    parts = _TURN.split(prompt)
    if parts[0].strip():
        raise ValueError(f"text before the first turn: {parts[0][:40]!r}")
    msgs = [{"role": "user" if role == "Human" else "assistant", "content": _ARTEFACT.sub("", text).strip()}
            for role, text in zip(parts[1::2], parts[2::2])]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs = msgs[:-1]
    return msgs


def _clean(msgs: list[dict]) -> list[dict]:
    """Merge consecutive turns of the same role (HH has a few "Human: ... Human: ..." artefacts) and drop empty
    ones, so roles alternate."""
    out: list[dict] = []
    for m in msgs:
        if not m["content"]:
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def keep_recent_turns(msgs: list[dict], max_chars: int) -> list[dict]:
    """The longest suffix of whole turns, starting with a user turn, whose contents total at most max_chars; the
    last user turn is always kept (cut from the left, marked with "...", when it alone is longer)."""
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    kept = msgs[last_user:]
    if sum(len(m["content"]) for m in kept) > max_chars:
        text = kept[0]["content"]
        return [{"role": "user", "content": "..." + text[len(text) - max_chars + 3:]}] + kept[1:]
    start = last_user
    for i in range(last_user - 1, -1, -1):
        if msgs[i]["role"] == "user" and sum(len(m["content"]) for m in msgs[i:]) <= max_chars:
            start = i
        elif sum(len(m["content"]) for m in msgs[i:]) > max_chars:
            break
    return msgs[start:]


def _split_of(key: str, eval_fraction: float, seed: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2 ** 64
    return "eval" if h < eval_fraction else "train"


def hh_dialogues(path: str | Path, max_context_chars: int = 700, eval_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, list[dict]]:
    """Anthropic HH pairs as {"prompt": messages, "chosen": reply, "rejected": reply}, split by dialogue (a hash of
    the full context, so the split does not depend on file order) into {"train": [...], "eval": [...]}.
    Pairs with chosen == rejected or an empty reply are dropped; contexts keep their most recent whole turns up to
    max_context_chars characters (keep_recent_turns)."""
    from rlhfkit.data.formats import split_transcripts

    out: dict[str, list[dict]] = {"train": [], "eval": []}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            rec = json.loads(line)
            if rec["chosen"] == rec["rejected"]:
                continue
            prompt, chosen, rejected = split_transcripts(rec["chosen"], rec["rejected"], f"{path}:{lineno}")
            msgs = _clean(hh_messages(prompt))
            if not chosen.strip() or not rejected.strip() or not msgs or msgs[-1]["role"] != "user":
                continue
            row = {"prompt": keep_recent_turns(msgs, max_context_chars), "chosen": chosen.strip(),
                   "rejected": rejected.strip()}
            out[_split_of(prompt, eval_fraction, seed)].append(row)
    return out


def sft_rows(pairs: list[dict]) -> list[dict]:
    """Chosen dialogues as {"messages": context + [chosen reply]} (SFT data; also RL prompts: load_prompts drops
    the final assistant turn)."""
    return [{"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]} for p in pairs]

