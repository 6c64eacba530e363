"""The data formats every stage reads (TRL's field names, so TRL datasets load unchanged).

| kind        | fields                                                                                  |
|-------------|-----------------------------------------------------------------------------------------|
| prompts     | {"prompt"} or {"messages"} (a conversation; the last turn is the user's)                 |
| sft         | {"prompt", "completion"}, {"messages"} (loss on the last assistant turn), or {"text"}    |
| preference  | {"prompt", "chosen", "rejected"} (strings or message lists), {"chosen", "rejected"}      |
|             | holding whole transcripts (Anthropic HH text or message lists: the shared part is the     |
|             | prompt), optional "margin" (label strength >= 0) and "label" (chosen|tie|both_bad)       |
| rating      | {"prompt", "completion", "score"}                                                       |
| edit        | {"prompt", "completion", "edited"} (a preference edited > completion)                    |

A text is a non-empty string; a conversation is a non-empty list of {"role": system|user|assistant, "content": str}.
Other fields are kept in `extra` (e.g. a translation "reference" that a reward function may use).
Each loader raises a `UserError` naming file, line and field on bad input.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Union

from rlhfkit.data.io import Record, field_value, number, read_records
from rlhfkit.errors import UserError

Text = Union[str, list]
"""A plain string, or a list of chat messages {"role", "content"}."""

ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass
class PromptExample:
    prompt: Text
    where: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    prompt: Text
    """"" for plain-text language modelling ({"text"}): then the loss covers every token."""
    completion: Text
    where: str = ""


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    label: str = "chosen"
    """chosen (chosen is better), tie (equally good) or both_bad."""
    where: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class RatingExample:
    prompt: Text
    completion: Text
    score: float
    where: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class EditExample:
    prompt: Text
    completion: Text
    edited: Text
    where: str = ""


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    read: int = 0
    """Records read from the source."""
    dropped_identical: int = 0
    """Pairs dropped because chosen == rejected (they carry no preference)."""
    dropped_empty: int = 0
    """Whole-transcript pairs dropped because a final reply was empty after the split."""
    duplicates: int = 0
    """Pairs that repeat an earlier (prompt, chosen, rejected) exactly (kept, counted)."""
    ties: int = 0
    both_bad: int = 0

    def summary(self) -> str:
        return (f"{len(self.pairs)} pairs from {self.read} records (dropped {self.dropped_identical} with chosen == "
                f"rejected, {self.dropped_empty} with an empty reply; {self.duplicates} duplicates, {self.ties} ties, "
                f"{self.both_bad} both-bad)")


# ----------------------------------------------------------------------------------------------------------------
# Field checks


def _missing(rec: Record, key: str, expected: tuple[str, ...] = ()) -> UserError:
    known = set(expected) | {key}
    unknown = [k for k in rec.data if k not in known]
    close = difflib.get_close_matches(key, unknown, n=1, cutoff=0.6)
    hint = f" (found '{close[0]}': misspelt?)" if close else ""
    return UserError(f"{rec.where}: missing field '{key}'{hint}")


def _text(rec: Record, key: str) -> str:
    value = rec.data.get(key)
    if value is None and key not in rec.data:
        raise _missing(rec, key)
    if not isinstance(value, str):
        raise UserError(f"{rec.where}: field '{key}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{rec.where}: field '{key}': empty text")
    return value


def _messages(rec: Record, key: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{rec.where}: field '{key}': expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise UserError(f"{rec.where}: field '{key}[{i}]': expected an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise UserError(f"{rec.where}: field '{key}[{i}].role': expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"{rec.where}: field '{key}[{i}].content': expected a string, got "
                            f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _text_or_messages(rec: Record, key: str) -> Text:
    if key not in rec.data:
        raise _missing(rec, key)
    value = rec.data[key]
    if isinstance(value, list):
        return _messages(rec, key, value)
    return _text(rec, key)


def _extra(rec: Record, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in rec.data.items() if k not in used}


# ----------------------------------------------------------------------------------------------------------------
# Loaders


def load_prompts(source: Any, name: str | None = None) -> list[PromptExample]:
    """Prompts for generation and RL. Also accepts SFT and preference files (their prompt part is used)."""
    out = []
    for rec in read_records(source, name):
        d = rec.data
        if "prompt" in d:
            prompt = _text_or_messages(rec, "prompt")
        elif "messages" in d:
            msgs = _messages(rec, "messages", d["messages"])
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise UserError(f"{rec.where}: field 'messages': no turn before the final assistant reply")
            prompt = msgs
        elif "chosen" in d and "rejected" in d:
            prompt = _pair_from_record(rec).prompt
        elif "text" in d or "query" in d:  # a plain-text file's lines; TRL's older PPO datasets call it query
            prompt = _text(rec, "text" if "text" in d else "query")
        else:
            raise _missing(rec, "prompt", ("messages", "text", "query"))
        out.append(PromptExample(prompt, rec.where, _extra(rec, ("prompt", "messages", "text", "query"))))
    return out


def load_sft(source: Any, name: str | None = None) -> list[SFTExample]:
    out = []
    for rec in read_records(source, name):
        d = rec.data
        if "messages" in d:
            msgs = _messages(rec, "messages", d["messages"])
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{rec.where}: field 'messages': the last turn must be the assistant's")
            if len(msgs) < 2:
                raise UserError(f"{rec.where}: field 'messages': needs a turn before the assistant reply")
            if not msgs[-1]["content"].strip():
                raise UserError(f"{rec.where}: field 'messages': empty final assistant reply")
            out.append(SFTExample(msgs[:-1], [msgs[-1]], rec.where))
        elif "text" in d:
            out.append(SFTExample("", _text(rec, "text"), rec.where))
        else:
            if "prompt" not in d and "completion" in d:
                raise _missing(rec, "prompt", ("completion",))
            prompt = _text_or_messages(rec, "prompt") if "prompt" in d else None
            if prompt is None:
                raise _missing(rec, "completion", ("prompt", "messages", "text"))
            out.append(SFTExample(prompt, _text_or_messages(rec, "completion"), rec.where))
    return out


def split_transcripts(chosen: str, rejected: str, where: str = "") -> tuple[str, str, str]:
    """Split two Anthropic HH transcripts into (shared prompt ending in "\\n\\nAssistant:", chosen, rejected).

    The prompt is the longest common prefix cut at its last "\\n\\nAssistant:" marker, so replies that differ
    in more than the final turn still split where they first diverge."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise UserError(f"{where}: fields 'chosen'/'rejected': no shared '\\n\\nAssistant:' turn to split the "
                        "transcripts at (expected Anthropic HH format, or give a 'prompt' field)")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _split_conversations(rec: Record, chosen: list, rejected: list) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # the completion starts at an assistant turn
        n -= 1
    if n == 0 or n >= len(chosen) or n >= len(rejected):
        raise UserError(f"{rec.where}: fields 'chosen'/'rejected': conversations share no prompt before the "
                        "differing assistant turn")
    return chosen[:n], chosen[n:], rejected[n:]


def _pair_from_record(rec: Record) -> PreferencePair:
    d = rec.data
    for key in ("chosen", "rejected"):
        if key not in d:
            raise _missing(rec, key, ("prompt", "chosen", "rejected"))
    margin = number(rec, "margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin) or margin < 0):
        raise UserError(f"{rec.where}: field 'margin': expected a finite number >= 0, got {margin!r}")
    label = field_value(rec, "label", "chosen")
    if label not in ("chosen", "tie", "both_bad"):
        raise UserError(f"{rec.where}: field 'label': expected chosen, tie or both_bad, got {label!r}")
    extra = _extra(rec, ("prompt", "chosen", "rejected", "margin", "label"))
    if "prompt" not in d and difflib.get_close_matches("prompt", list(extra), n=1, cutoff=0.6):
        raise _missing(rec, "prompt", ("chosen", "rejected"))
    if "prompt" in d:
        prompt = _text_or_messages(rec, "prompt")
        chosen, rejected = _text_or_messages(rec, "chosen"), _text_or_messages(rec, "rejected")
    elif isinstance(d["chosen"], list) or isinstance(d["rejected"], list):
        c = _messages(rec, "chosen", d["chosen"])
        r = _messages(rec, "rejected", d["rejected"])
        if c == r:
            return PreferencePair(c, c, r, margin, label, rec.where, extra)
        prompt, chosen, rejected = _split_conversations(rec, c, r)
    else:
        c, r = _text(rec, "chosen"), _text(rec, "rejected")
        if c == r:
            cut = c.rfind(HH_ASSISTANT)
            prompt = c[: cut + len(HH_ASSISTANT)] if cut >= 0 else ""
            return PreferencePair(prompt, c[len(prompt):], r[len(prompt):], margin, label, rec.where, extra)
        prompt, chosen, rejected = split_transcripts(c, r, rec.where)
    return PreferencePair(prompt, chosen, rejected, margin, label, rec.where, extra)


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not any(m["content"].strip() for m in text)


def load_preferences(source: Any, name: str | None = None) -> PreferenceData:
    """Preference pairs; chosen == rejected pairs are dropped and counted, duplicates and ties counted."""
    data = PreferenceData(pairs=[])
    seen: set[str] = set()
    for rec in read_records(source, name):
        data.read += 1
        pair = _pair_from_record(rec)
        if pair.chosen == pair.rejected:
            data.dropped_identical += 1
            continue
        if _is_empty(pair.chosen) or _is_empty(pair.rejected):
            if "prompt" in rec.data:
                which = "chosen" if _is_empty(pair.chosen) else "rejected"
                raise UserError(f"{rec.where}: field '{which}': empty text")
            data.dropped_empty += 1
            continue
        key = repr((pair.prompt, pair.chosen, pair.rejected))
        if key in seen:
            data.duplicates += 1
        seen.add(key)
        data.ties += pair.label == "tie"
        data.both_bad += pair.label == "both_bad"
        data.pairs.append(pair)
    if not data.pairs:
        raise UserError(f"{name or source}: no usable preference pairs ({data.summary()})")
    return data


def load_ratings(source: Any, name: str | None = None) -> list[RatingExample]:
    out = []
    for rec in read_records(source, name):
        prompt = _text_or_messages(rec, "prompt")
        completion = _text_or_messages(rec, "completion")
        if "score" not in rec.data:
            raise _missing(rec, "score", ("prompt", "completion"))
        score = number(rec, "score")
        if score is None and rec.table:  # a blank CSV/TSV cell (JSON null fails the type check below)
            raise UserError(f"{rec.where}: field 'score': empty cell, expected a number")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise UserError(f"{rec.where}: field 'score': expected a finite number, got {score!r}")
        out.append(RatingExample(prompt, completion, float(score), rec.where,
                                 _extra(rec, ("prompt", "completion", "score"))))
    return out


def load_edits(source: Any, name: str | None = None) -> list[EditExample]:
    out = []
    for rec in read_records(source, name):
        out.append(EditExample(_text_or_messages(rec, "prompt"), _text_or_messages(rec, "completion"),
                               _text_or_messages(rec, "edited"), rec.where))
    return out


def edits_to_preferences(edits: list[EditExample]) -> list[PreferencePair]:
    """An edit is a preference: the edited text is better than the original completion."""
    return [PreferencePair(e.prompt, e.edited, e.completion, where=e.where) for e in edits if e.edited != e.completion]


def detect_kind(source: Any, name: str | None = None) -> str:
    """Guess which format a file holds from its first record: preference, rating, edit, sft or prompts."""
    d = read_records(source, name)[0].data
    if "chosen" in d and "rejected" in d:
        return "preference"
    if "edited" in d:
        return "edit"
    if "score" in d and "completion" in d:
        return "rating"
    if "completion" in d or "messages" in d or "text" in d:
        return "sft"
    return "prompts"
