"""Judge functions for tests/trainers/test_eval.py and test_pipeline.py (plugins signature)."""

from rlhfkit.trainers.evaluate import words


def n_words(prompts, completions):
    """Number of word and punctuation tokens of each completion."""
    return [float(len(words(c))) for c in completions]
