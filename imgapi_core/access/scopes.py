"""What each route needs, declared on the route itself: a scope, or nothing (public).

A route without a declaration is refused in keys mode: a new endpoint must say who may call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

READ, UPLOAD, DELETE, ADMIN = "read", "upload", "delete", "admin"
SCOPES = (READ, UPLOAD, DELETE, ADMIN)
DEFAULT_SCOPES = (READ, UPLOAD)
PUBLIC = "public"

_ATTRIBUTE = "__imgapi_access__"
F = TypeVar("F", bound=Callable[..., Any])


def requires(scope: str) -> Callable[[F], F]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def declare(handler: F) -> F:
        setattr(handler, _ATTRIBUTE, scope)
        return handler

    return declare


def public(handler: F) -> F:
    setattr(handler, _ATTRIBUTE, PUBLIC)
    return handler


def access_of(handler: Callable[..., Any]) -> str | None:
    """The handler's declaration: a scope, PUBLIC, or None when it has none."""
    return getattr(handler, _ATTRIBUTE, None)


def grants(scopes: tuple[str, ...], needed: str) -> bool:
    return needed in scopes or ADMIN in scopes


def parse_scopes(text: str) -> tuple[str, ...]:
    """ "read,upload" -> ("read", "upload"); raises ValueError naming an unknown scope."""
    scopes = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(
            f"unknown scope {', '.join(unknown) or '(none)'}: choose from {', '.join(SCOPES)}"
        )
    return scopes
