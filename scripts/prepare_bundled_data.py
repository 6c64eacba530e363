"""Build the small TinyStories files bundled in rlhfkit/assets/data from ../shared/data/tinystories.

    python scripts/prepare_bundled_data.py [--src ../shared/data/tinystories/tinystories_valid_head.txt]

Stories are split at paragraphs that open with "Once upon a time" (the file marks no story boundaries). The last
200 stories are held out: their openings become the evaluation prompts. Deterministic: re-running gives the same
bytes.
"""

import argparse
import gzip
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split_stories(text: str) -> list[str]:
    stories: list[list[str]] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        if para.startswith("Once upon a time") or not stories:
            stories.append([para])
        else:
            stories[-1].append(para)
    return ["\n\n".join(s) for s in stories]


def opening(story: str, words: int = 8) -> str:
    return " ".join(story.split()[:words])


def write(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows, {len(data):,} bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(ROOT.parent / "shared/data/tinystories/tinystories_valid_head.txt"))
    ap.add_argument("--out", default=str(ROOT / "rlhfkit/assets/data"))
    args = ap.parse_args()
    stories = split_stories(Path(args.src).read_text(encoding="utf-8"))
    train, held = stories[:-200], stories[-200:]
    out = Path(args.out)
    write(out / "tinystories_train.jsonl.gz", [{"text": s} for s in train])
    write(out / "tinystories_prompts.jsonl", [{"prompt": opening(s)} for s in train[:512]])
    write(out / "tinystories_eval_prompts.jsonl", [{"prompt": opening(s)} for s in held])
    write(out / "tinystories_eval.jsonl.gz", [{"text": s} for s in held])


if __name__ == "__main__":
    main()
