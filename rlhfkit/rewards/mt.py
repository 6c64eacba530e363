"""Translation rewards: sentence-level chrF and BLEU (sacrebleu) of each completion against its reference.

    rlhfkit ppo reward.function=rlhfkit.rewards.mt:chrf data.prompts=mt_train_prompts.jsonl ...
    rlhfkit pipeline recipes/translation_chrf.yaml            # RL with chrF, then chrF/BLEU on the validation set

The functions have the reward signature of rlhfkit.plugins, fn(prompts, completions, **columns) -> list[float]:
the trainers, the evaluation and the pipeline's simulated crowd pass a prompt record's extra fields by name, so a
record {"prompt": "Translate to French: ...\\nFrench:", "reference": "Un homme ..."} reaches `reference`, and
{"references": [...]} (several references) reaches `references`. The completion is compared as the model wrote it,
stripped of surrounding whitespace (text after the translation, such as a second line, lowers chrF precision,
which is what teaches the policy to stop).

- chrF (Popović, 2015): character n-gram F-score, n = 1..6, β = 2 (sacrebleu defaults), 0-100. Smooth in small
  edits, meaningful for one sentence, hence the default RL reward.
- BLEU (Papineni et al., 2002) per sentence: sacrebleu's sentence_bleu with effective order (n-gram orders longer
  than the hypothesis are ignored) and exponential smoothing, 0-100; the tokenizer is "zh" when the reference has
  CJK characters, else "13a". Sparse for short sentences (often 0), so a noisy reward on its own.
- chrf_bleu: their mean.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from rlhfkit.errors import UserError

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _text(completion: Any) -> str:
    """A completion as text: a string, or chat messages (their contents joined)."""
    if isinstance(completion, str):
        return completion.strip()
    return "\n".join(str(m.get("content", "")) for m in completion).strip()


def references_for(n: int, reference: list | None, references: list | None, what: str) -> list[list[str]]:
    """One list of reference strings per completion, from a `reference` column (strings) or a `references` column
    (lists of strings); a one-line UserError when a completion has none."""
    out: list[list[str]] = []
    for i in range(n):
        refs = references[i] if references is not None else None
        if refs is None and reference is not None:
            refs = [reference[i]] if reference[i] is not None else None
        if isinstance(refs, str):
            refs = [refs]
        if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise UserError(f"{what}: completion {i} has no reference; every prompt record needs a \"reference\" "
                            "string (or a \"references\" list of strings)")
        out.append([r.strip() for r in refs])
    return out


@functools.lru_cache(maxsize=4)
def _metric(name: str, tokenize: str = "13a", beta: int = 2) -> Any:
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise UserError("rlhfkit.rewards.mt needs the package sacrebleu (pip install sacrebleu)") from None
    return CHRF(beta=beta) if name == "chrf" else BLEU(effective_order=True, tokenize=tokenize)


def chrf(prompts: list[Any], completions: list[Any], reference: list | None = None,
         references: list | None = None) -> list[float]:
    """Sentence chrF (0-100) of each completion against its reference(s).
    chrf(["p"], ["le chat"], reference=["le chat"]) -> [100.0]; an empty completion scores 0."""
    return _chrf(completions, reference, references, beta=2, name="chrf")


def chrf1(prompts: list[Any], completions: list[Any], reference: list | None = None,
          references: list | None = None) -> list[float]:
    """Sentence chrF with beta = 1: precision and recall weigh the same (chrF's default beta = 2 weighs recall
    4x, which a policy can game by writing longer translations)."""
    return _chrf(completions, reference, references, beta=1, name="chrf1")


def _chrf(completions: list[Any], reference: list | None, references: list | None, beta: int, name: str
          ) -> list[float]:
    refs = references_for(len(completions), reference, references, f"rlhfkit.rewards.mt:{name}")
    metric = _metric("chrf", beta=beta)
    return [float(metric.sentence_score(_text(c), r).score) for c, r in zip(completions, refs)]


def bleu(prompts: list[Any], completions: list[Any], reference: list | None = None,
         references: list | None = None) -> list[float]:
    """Sentence BLEU (0-100, effective order, exponential smoothing) of each completion against its reference(s)."""
    refs = references_for(len(completions), reference, references, "rlhfkit.rewards.mt:bleu")
    out = []
    for c, r in zip(completions, refs):
        metric = _metric("bleu", "zh" if any(_CJK.search(x) for x in r) else "13a")
        out.append(float(metric.sentence_score(_text(c), r).score))
    return out


def chrf_bleu(prompts: list[Any], completions: list[Any], reference: list | None = None,
              references: list | None = None) -> list[float]:
    """(chrF + BLEU) / 2 per sentence: chrF's smooth signal plus BLEU's word-order and exact-word credit."""
    c = chrf(prompts, completions, reference, references)
    b = bleu(prompts, completions, reference, references)
    return [(x + y) / 2 for x, y in zip(c, b)]
