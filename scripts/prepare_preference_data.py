"""Build the small preference files bundled in rlhfkit/assets/data (used by `rlhfkit dpo` tests, docs and demos).

    python scripts/prepare_preference_data.py [--hh ../shared/data/anthropic-hh-rlhf]

- tinystories_fluency_pairs{,_eval}.jsonl.gz: synthetic pairs from the bundled TinyStories train / eval stories.
  prompt = the first 8 words of a story, chosen = the next 12 words as written, rejected = the same 12 words
  shuffled (a fixed seed). Same words and length on both sides: only word order (fluency) separates them.
- hh_helpful_pairs.jsonl.gz: human preference pairs from Anthropic HH-RLHF helpful-base (test split, MIT):
  the single-turn dialogues whose prompt is under 200 characters and both replies under 300, in file order,
  split into {"prompt","chosen","rejected"} at the last shared "\\n\\nAssistant:".
Deterministic: re-running gives the same bytes.
"""

import argparse
import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "rlhfkit/assets/data"


def write(path: Path, rows: list[dict]) -> None:
    data = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(), mtime=0)
    path.write_bytes(data)
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows, {len(data):,} bytes")


def fluency_pairs(stories: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for story in stories:
        words = story.split()
        if len(words) < 20:
            continue
        chosen = words[8:20]
        rejected = chosen[:]
        while rejected == chosen:
            rng.shuffle(rejected)
        rows.append({"prompt": " ".join(words[:8]), "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})
    return rows


def hh_pairs(path: Path) -> list[dict]:
    marker = "\n\nAssistant:"
    rows = []
    for line in gzip.open(path, "rt", encoding="utf-8"):
        rec = json.loads(line)
        chosen, rejected = rec["chosen"], rec["rejected"]
        if chosen == rejected or chosen.count("Human:") != 1:
            continue
        cut = chosen.rfind(marker) + len(marker)
        if cut < len(marker) or rejected[:cut] != chosen[:cut]:
            continue
        prompt, c, r = chosen[:cut], chosen[cut:], rejected[cut:]
        if len(prompt) < 200 and 0 < len(c.strip()) and 0 < len(r.strip()) and len(c) < 300 and len(r) < 300:
            rows.append({"prompt": prompt, "chosen": c, "rejected": r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hh", default=str(ROOT.parent / "shared/data/anthropic-hh-rlhf"))
    args = ap.parse_args()
    read = lambda name: [json.loads(x)["text"] for x in gzip.open(DATA / name, "rt", encoding="utf-8")]  # noqa: E731
    write(DATA / "tinystories_fluency_pairs.jsonl.gz", fluency_pairs(read("tinystories_train.jsonl.gz"), seed=0))
    write(DATA / "tinystories_fluency_pairs_eval.jsonl.gz", fluency_pairs(read("tinystories_eval.jsonl.gz"), seed=1))
    write(DATA / "hh_helpful_pairs.jsonl.gz", hh_pairs(Path(args.hh) / "helpful-base-test.jsonl.gz"))


if __name__ == "__main__":
    main()
