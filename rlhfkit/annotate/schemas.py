"""Request bodies of the JSON API (pydantic, unknown fields rejected) and the per-project label check.

Shape errors (a missing field, a wrong type, a string too long) are caught by pydantic and become a 422 naming
the field; rules that depend on the project (which label kinds it collects, its rating scale and criteria) are
checked by `check_label`, also a 422.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlhfkit.annotate.errors import invalid

KINDS = ("pairwise", "rating", "edit")
CHOICES = ("A", "B", "tie", "both_bad")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$"
MAX_TEXT = 100_000
"""Longest prompt, completion or edit accepted, in characters."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    kinds: list[Literal["pairwise", "rating", "edit"]] = Field(default=["pairwise"], min_length=1)
    k: int = Field(default=3, ge=1, le=100)
    scale_min: int = Field(default=1, ge=-100, le=100)
    scale_max: int = Field(default=7, ge=-100, le=100)
    criteria: list[str] = Field(default=["overall"], min_length=1, max_length=20)
    lease_seconds: int = Field(default=600, ge=1, le=7 * 86400)
    gold_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    instructions: str = Field(default="", max_length=20_000)

    @field_validator("kinds")
    @classmethod
    def _unique_kinds(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        out = [c.strip() for c in v]
        if any(not c or len(c) > 50 for c in out):
            raise ValueError("each criterion is a name of 1 to 50 characters")
        if len(set(out)) != len(out):
            raise ValueError("criteria must be distinct")
        return out

    @model_validator(mode="after")
    def _scale(self) -> "ProjectCreate":
        if self.scale_max <= self.scale_min:
            raise ValueError(f"scale_max ({self.scale_max}) must be greater than scale_min ({self.scale_min})")
        return self


class UserCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["admin", "annotator"] = "annotator"
    password: Optional[str] = Field(default=None, min_length=1, max_length=200)
    projects: list[str] = Field(default=[], max_length=100)


class MemberAdd(Strict):
    user: str = Field(pattern=NAME_PATTERN)


class ItemsImport(Strict):
    records: list[dict] = Field(min_length=1, max_length=10_000)
    shuffle_pairs: bool = True
    pairs: Literal["all", "adjacent", "first"] = "all"


class LabelCreate(Strict):
    item_id: int = Field(ge=1)
    client_key: str = Field(min_length=1, max_length=100)
    choice: Optional[Literal["A", "B", "tie", "both_bad"]] = None
    strength: Optional[int] = Field(default=None, ge=1, le=3)
    ratings: Optional[dict[str, int]] = None
    edited: Optional[str] = Field(default=None, min_length=1, max_length=MAX_TEXT)
    tags: list[str] = Field(default=[], max_length=20)
    comment: str = Field(default="", max_length=5000)
    duration_ms: Optional[int] = Field(default=None, ge=0, le=10**9)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        out = [t.strip() for t in v if t.strip()]
        if any(len(t) > 50 for t in out):
            raise ValueError("each tag is at most 50 characters")
        return list(dict.fromkeys(out))


@dataclass
class Project:
    id: int
    name: str
    kinds: list
    k: int
    scale_min: int
    scale_max: int
    criteria: list
    lease_seconds: int
    gold_rate: float
    instructions: str

    def public(self) -> dict:
        return dict(self.__dict__)


@dataclass
class User:
    id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def check_label(project: Project, item_kind: str, label: LabelCreate) -> dict:
    """The stored payload of `label` for an item of `item_kind`, or a 422 saying what is wrong with it."""
    if item_kind == "pairwise":
        if label.choice is None:
            raise invalid("field 'choice': required for a pairwise item (A, B, tie or both_bad)")
        if label.ratings is not None or label.edited is not None:
            raise invalid("a pairwise label takes 'choice' (and optional 'strength'), not 'ratings' or 'edited'")
        if label.strength is not None and label.choice not in ("A", "B"):
            raise invalid("field 'strength': only for choice A or B")
    elif item_kind == "rating":
        if label.ratings is None:
            raise invalid(f"field 'ratings': required for a rating item, e.g. {{\"{project.criteria[0]}\": "
                          f"{project.scale_max}}}")
        if label.choice is not None or label.edited is not None or label.strength is not None:
            raise invalid("a rating label takes 'ratings', not 'choice', 'strength' or 'edited'")
        missing = [c for c in project.criteria if c not in label.ratings]
        unknown = [c for c in label.ratings if c not in project.criteria]
        if missing or unknown:
            raise invalid(f"field 'ratings': expected exactly the criteria {project.criteria}"
                          + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
        for c, v in label.ratings.items():
            if not project.scale_min <= v <= project.scale_max:
                raise invalid(f"field 'ratings.{c}': {v} is outside the scale {project.scale_min}..{project.scale_max}")
    elif item_kind == "edit":
        if label.edited is None:
            raise invalid("field 'edited': required for an edit item (the rewritten completion)")
        if label.choice is not None or label.ratings is not None or label.strength is not None:
            raise invalid("an edit label takes 'edited', not 'choice', 'strength' or 'ratings'")
    payload = {"item_id": label.item_id, "choice": label.choice, "strength": label.strength,
               "ratings": label.ratings, "edited": label.edited, "tags": label.tags, "comment": label.comment}
    payload["hash"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
    payload["duration_ms"] = label.duration_ms
    payload["client_key"] = label.client_key
    payload["kind"] = item_kind
    return payload


def pydantic_message(errors: list[dict]) -> str:
    """One line per validation error: "field 'choice': Input should be 'A', 'B', 'tie' or 'both_bad'"."""
    parts = []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")]
        where = f"field '{'.'.join(loc)}': " if loc else ""
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            where, msg = "", f"request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        elif e.get("type") == "missing" and loc:
            msg = "required"
        parts.append(where + msg)
    return "; ".join(parts)
