"""What each route needs, declared on the route itself: a scope, or nothing (public).

A route without a declaration is refused in keys mode: a new endpoint must say who may call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from imgapi_core.settings import Settings

READ, UPLOAD, DELETE, ADMIN = "read", "upload", "delete", "admin"
SCOPES = (READ, UPLOAD, DELETE, ADMIN)
DEFAULT_SCOPES = (READ, UPLOAD)
PUBLIC = "public"

_ATTRIBUTE = "__imgapi_access__"
_PUBLIC_WHEN = "__imgapi_public_when__"
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


def public_when(setting: str) -> Callable[[F], F]:
    """Beside `requires(...)`: the route needs no key while the named boolean setting (a
    Settings field, e.g. "metrics_public") is on. The operator opts in; the scope stays the rule
    otherwise, and in the document."""
    if setting not in {f.name for f in fields(Settings)}:
        raise ValueError(f"unknown setting {setting!r}")

    def declare(handler: F) -> F:
        setattr(handler, _PUBLIC_WHEN, setting)
        return handler

    return declare


def access_of(handler: Callable[..., Any]) -> str | None:
    """The handler's declaration: a scope, PUBLIC, or None when it has none."""
    return getattr(handler, _ATTRIBUTE, None)


def public_when_of(handler: Callable[..., Any]) -> str | None:
    """The setting that makes the route public (`public_when`), or None."""
    return getattr(handler, _PUBLIC_WHEN, None)


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
