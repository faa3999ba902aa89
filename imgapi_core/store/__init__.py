"""The store: where uploads, metadata, jobs and stats live (SQLite: imgapi_core.store.sqlite)."""

from __future__ import annotations

from imgapi_core.store.sqlite import FINISHED, JOB_KINDS, Deleted, Job, NotWritable, SqliteStore
from imgapi_core.timestamps import now_iso

Store = SqliteStore

__all__ = ["FINISHED", "JOB_KINDS", "Deleted", "Job", "NotWritable", "Store", "now_iso"]
