"""Secrets handed to clients (API keys, delete tokens) and how they are kept: only a SHA-256 of a
token is stored, and tokens are compared in constant time.

An API key token is `imgapi_<key id>_<secret>`: the key id (public, random) finds the stored key
without a search by secret; the hash of the whole token is then compared with hmac.compare_digest.
A plain SHA-256 (not a slow password hash) is right here: tokens are 256-bit random, not guessable.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_KEY_TOKEN = re.compile(r"imgapi_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key_token() -> tuple[str, str]:
    """(key id, token)."""
    key_id = secrets.token_hex(6)
    return key_id, f"imgapi_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(token: str) -> str | None:
    match = _KEY_TOKEN.fullmatch(token)
    return match.group(1) if match else None


def new_delete_token() -> str:
    return secrets.token_urlsafe(32)


def matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)
