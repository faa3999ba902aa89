"""Timestamps as the service stores and shows them: RFC 3339 UTC with milliseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_iso(ago_s: float = 0.0) -> str:
    """Now (or `ago_s` seconds before): sorts as text, and SQLite's julianday() reads it."""
    return iso_of(time.time() - ago_s)


def iso_of(epoch_s: float) -> str:
    """A Unix time in the same form."""
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
