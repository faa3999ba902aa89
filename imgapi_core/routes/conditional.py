"""HTTP validators, conditional requests and byte ranges (RFC 9110 sections 8.8, 13 and 14)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from sanic import Request

from imgapi_core.errors import ClientError


def last_modified(processed_at: str | None, mtime: float) -> datetime:
    """The record's processed_at, to the second (HTTP dates have no fractions).

    processed_at rather than the file's mtime: it is stamped after the file is renamed into place,
    so it is never earlier than the bytes; it is the same in every process and survives copying
    the media folder (or moving it to object storage), where mtimes are reset or absent. The
    mtime is the fallback for a row whose processed_at does not parse.
    """
    try:
        moment = datetime.fromisoformat(processed_at or "")
    except ValueError:
        moment = datetime.fromtimestamp(mtime, UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


# -- conditional requests (RFC 9110 section 13) -------------------------------------------------

# One member of an entity-tag list: optional W/, a quoted opaque tag, then a comma or the end.
# Empty members (",,") are allowed, as in every HTTP list.
_LIST_MEMBER = re.compile(
    r'[ \t]*(?:(?P<weak>W/)?(?P<tag>"[\x21\x23-\x7e\x80-\xff]*"))?[ \t]*(?:,|\Z)'
)


def header_value(request: Request, name: str) -> str | None:
    """All field lines of a list header, joined with commas (RFC 9110 section 5.3); None if none."""
    values = request.headers.getall(name, [])
    return ", ".join(values) if values else None


def parse_entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """[(weak, opaque-tag)] of an If-None-Match / If-Match / If-Range value; None when malformed."""
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        member = _LIST_MEMBER.match(value, pos)
        if member is None:
            return None
        if member["tag"] is not None:
            tags.append((member["weak"] is not None, member["tag"]))
        pos = member.end()
    return tags


def _matches(value: str, etag: str, *, strong: bool) -> bool:
    """Whether the list holds `etag` (or is `*`), by strong or weak comparison (section 8.8.3.2)."""
    if value.strip() == "*":
        return True
    our_weak, ours = etag.startswith("W/"), etag.removeprefix("W/")
    for weak, tag in parse_entity_tags(value) or []:
        if tag == ours and not (strong and (weak or our_weak)):
            return True
    return False


def none_match(value: str | None, etag: str) -> bool:
    """If-None-Match is satisfied by a match (weak comparison): the client's copy is current."""
    return value is not None and _matches(value, etag, strong=False)


def http_date(value: str | None) -> datetime | None:
    """An HTTP-date as aware UTC; None when absent or invalid (such a header is ignored)."""
    if value is None:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def precondition_check(request: Request, etag: str, modified: datetime) -> None:
    """If-Match, else If-Unmodified-Since: 412 when the client's version is not this one."""
    if_match = header_value(request, "if-match")
    if if_match is not None:
        if not _matches(if_match, etag, strong=True):
            raise ClientError(412, "precondition failed: If-Match does not match the ETag")
        return
    since = http_date(request.headers.get("if-unmodified-since"))
    if since is not None and modified > since:
        raise ClientError(412, "precondition failed: modified after If-Unmodified-Since")


def not_modified(request: Request, etag: str, modified: datetime) -> bool:
    """304 by If-None-Match when present (If-Modified-Since is then ignored), else by the date."""
    if_none_match = header_value(request, "if-none-match")
    if if_none_match is not None:
        return none_match(if_none_match, etag)
    since = http_date(request.headers.get("if-modified-since"))
    return since is not None and modified <= since


# -- byte ranges (RFC 9110 section 14) ----------------------------------------------------------

_BYTE_RANGE = re.compile(r"(\d*)-(\d*)", re.ASCII)
# Past any file's size; longer digit strings are capped to it rather than given to int(), which
# refuses more than 4300 digits (a 500) and would spend time on a hostile header.
_FAR = 10**18


class RangeNotSatisfiable(Exception):
    """A well-formed single byte range that starts past the end, or the last zero bytes."""


def requested_range(
    request: Request, size: int, etag: str, modified: datetime
) -> tuple[int, int] | None:
    """The inclusive (first, last) byte to send, or None for the whole original.

    None, per RFC 9110, for: no Range, a unit other than bytes, a malformed range set, an If-Range
    that does not match (the client's partial copy is stale: it needs all of it), and several
    ranges (served whole rather than as multipart/byteranges).
    """
    value = request.headers.get("range")
    if value is None or size == 0:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and not _if_range_matches(if_range, etag, modified):
        return None
    unit, equals, spec = value.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    members = [member.strip() for member in spec.split(",") if member.strip()]
    if len(members) != 1:
        return None
    parts = _BYTE_RANGE.fullmatch(members[0])
    if parts is None or parts[0] == "-":
        return None
    first, last = _position(parts[1]), _position(parts[2])
    if first is None:  # bytes=-N: the last N bytes, all of them when N exceeds the size
        suffix = last or 0
        if suffix == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size - 1
    if last is not None and last < first:
        return None  # invalid, so ignored (section 14.1.1)
    if first >= size:
        raise RangeNotSatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


def _position(digits: str) -> int | None:
    """A byte position of a range-spec; None when absent."""
    if not digits:
        return None
    digits = digits.lstrip("0") or "0"
    return _FAR if len(digits) > len(str(_FAR)) else int(digits)


def _if_range_matches(value: str, etag: str, modified: datetime) -> bool:
    """If-Range holds one validator: an entity tag compared strongly, or exactly Last-Modified."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return parse_entity_tags(value) == [(False, etag)]
    return http_date(value) == modified
