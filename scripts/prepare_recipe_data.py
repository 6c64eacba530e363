"""Build the bundled data of the dialogue recipes (recipes/dialogue_hh.yaml, recipes/text_generation_hh_rm.yaml)
from Anthropic HH-RLHF helpful-base (MIT; ../shared/data/anthropic-hh-rlhf/helpful-base-test.jsonl.gz).

    python scripts/prepare_recipe_data.py [--hh ../shared/data/anthropic-hh-rlhf]

Writes into rlhfkit/assets/data (deterministic: re-running gives the same bytes):
- hh_dialogue_pairs.jsonl.gz       {"prompt": [messages], "chosen", "rejected"}: the training dialogues (80%)
- hh_dialogue_pairs_eval.jsonl.gz  the same for the held-out dialogues (20%): reward-model accuracy, eval prompts
- hh_dialogue_sft.jsonl.gz         {"messages": context + chosen reply} of the training dialogues: SFT data and
                                   RL prompts (rlhfkit's prompt loader drops the final assistant turn)
How (rlhfkit.recipes.data.hh_dialogues): each pair is split at its last shared "\\n\\nAssistant:" into the context
and the two replies; pairs with chosen == rejected or an empty reply are dropped; the context becomes chat messages
(dangling "\\n\\nHuman" artefacts removed, repeated roles merged) keeping its most recent whole turns up to 700
characters (the last user turn always, cut from the left when longer); the split is a seeded hash of the context.
The translation recipes need no bundled data: Multi30k is research-only and is prepared at run time into the
run folder (rlhfkit.recipes.data.prepare_multi30k).
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "rlhfkit/assets/data"
sys.path.insert(0, str(ROOT))

from rlhfkit.recipes.data import hh_dialogues, sft_rows  # noqa: E402


def write(path: Path, rows: list[dict]) -> None:
    data = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(), mtime=0)
    path.write_bytes(data)
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows, {len(data):,} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hh", default=str(ROOT.parent / "shared/data/anthropic-hh-rlhf"),
                    help="folder holding helpful-base-test.jsonl.gz")
    args = ap.parse_args()
    source = Path(args.hh) / "helpful-base-test.jsonl.gz"
    if not source.is_file():
        sys.exit(f"error: {source} not found (Anthropic HH-RLHF helpful-base test split; see --hh)")
    split = hh_dialogues(source, max_context_chars=700, eval_fraction=0.2, seed=0)
    write(DATA / "hh_dialogue_pairs.jsonl.gz", split["train"])
    write(DATA / "hh_dialogue_pairs_eval.jsonl.gz", split["eval"])
    write(DATA / "hh_dialogue_sft.jsonl.gz", sft_rows(split["train"]))


if __name__ == "__main__":
    main()
