"""The annotation database schema (SQLAlchemy Core tables). Only `store.py` runs queries against them.

SCHEMA_VERSION is stamped into `rlhfkit_meta` when a database is created; `store.Store` refuses to open a
database stamped with another version (unless a migration in `store.MIGRATIONS` brings it up to date), so an old
or newer database is never silently misread. Bump SCHEMA_VERSION and add a migration whenever a table changes.

Times are float seconds since the epoch (UTC); JSON columns hold prompts (a string or a list of chat messages),
completion lists, label payloads and project settings.
"""

from __future__ import annotations

from sqlalchemy import (JSON, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)

SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "rlhfkit_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

users = Table(
    "users", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # admin | annotator
    Column("password_hash", String(255)),  # scrypt$n$r$p$salt$hash, or NULL (token-only user)
    Column("token_hash", String(64), unique=True),  # sha256 of the API token
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False),
)

sessions = Table(
    "sessions", metadata,
    Column("id_hash", String(64), primary_key=True),  # sha256 of the cookie value
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

projects = Table(
    "projects", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("kinds", JSON, nullable=False),  # ["pairwise", "rating", "edit"]
    Column("k", Integer, nullable=False),  # distinct annotators per item
    Column("scale_min", Integer, nullable=False),
    Column("scale_max", Integer, nullable=False),
    Column("criteria", JSON, nullable=False),  # rating criteria names
    Column("lease_seconds", Integer, nullable=False),
    Column("gold_rate", Float, nullable=False),
    Column("instructions", Text, nullable=False, default=""),
    Column("created_at", Float, nullable=False),
)

members = Table(
    "members", metadata,
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)

items = Table(
    "items", metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),  # pairwise | rating | edit
    Column("key", String(64), nullable=False),  # sha256 of (kind, prompt, completions): makes import idempotent
    Column("prompt", JSON, nullable=False),
    Column("completions", JSON, nullable=False),  # 2 for pairwise (A, B), 1 for rating and edit
    Column("gold", JSON(none_as_null=True)),  # known answer: {"choice": "A"} or {"score": 5}
    Column("extra", JSON, nullable=False),  # other fields of the imported record
    Column("source", String(300), nullable=False),  # file:line it came from
    Column("n_labels", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("project_id", "key", name="uq_items_project_key"),
    Index("ix_items_project", "project_id", "id"),
)

assignments = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", Integer, ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("project_id", Integer, nullable=False),
    Column("status", String(8), nullable=False),  # leased | done
    Column("leased_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    UniqueConstraint("item_id", "user_id", name="uq_assignments_item_user"),
    Index("ix_assignments_user", "user_id", "project_id", "status"),
)

labels = Table(
    "labels", metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", Integer, ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("project_id", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("client_key", String(100), nullable=False),  # idempotency key chosen by the client
    Column("payload_hash", String(64), nullable=False),  # a replay with the same key must carry the same payload
    Column("choice", String(10)),  # pairwise: A | B | tie | both_bad
    Column("strength", Integer),  # pairwise: 1 slightly, 2 clearly, 3 much better (optional)
    Column("ratings", JSON(none_as_null=True)),  # rating: {criterion: value}
    Column("edited", Text),  # edit: the rewritten completion
    Column("tags", JSON, nullable=False),
    Column("comment", Text, nullable=False, default=""),
    Column("duration_ms", Integer),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("user_id", "client_key", name="uq_labels_user_key"),
    UniqueConstraint("item_id", "user_id", name="uq_labels_item_user"),
    Index("ix_labels_project", "project_id", "item_id"),
)

OUR_TABLES = {t.name for t in metadata.sorted_tables}
