"""GET /api/images's query: its parameters read into an ImageQuery (a 400 naming the parameter
for a bad one), and the cursor that carries a page's end to the next request."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, date, datetime

from sanic import Request

from imgapi_core.errors import ClientError
from imgapi_core.formats import ALL_NAMES
from imgapi_core.store import SORTS, ImageQuery
from imgapi_core.timestamps import iso_of

MAX_WORDS = 16
MAX_QUERY_CHARS = 200
# Words are what the full-text index splits text into: letters and digits (any script).
_WORD = re.compile(r"\w+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_DATE_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)
FILTERS = (
    "q",
    "status",
    "format",
    "camera",
    "taken_after",
    "taken_before",
    "has_gps",
    "uploaded_after",
    "uploaded_before",
    "sort",
)


def _moment(name: str, text: str) -> datetime:
    """A date (2024-05-01) or an RFC 3339 date-time (2024-05-01T12:00:00Z, with or without an
    offset or fractions)."""
    try:
        if _DATE.fullmatch(text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time())
        if not _DATE_TIME.fullmatch(text):
            raise ValueError
        return datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ClientError(
            400, f"{name} must be a date (2024-05-01) or an RFC 3339 date-time"
        ) from None


def _taken(name: str, text: str) -> str:
    # EXIF dates carry no zone: the camera's clock is compared with the time as written.
    return _moment(name, text).replace(tzinfo=None).isoformat(timespec="seconds")


def _uploaded(name: str, text: str) -> str:
    moment = _moment(name, text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return iso_of(moment.timestamp())


def image_query(request: Request) -> ImageQuery:
    args = request.args
    status = args.get("status")
    if status not in (None, "success", "failed"):
        raise ClientError(400, "status must be success or failed")
    words: tuple[str, ...] = ()
    q = args.get("q")
    if q is not None:
        if len(q) > MAX_QUERY_CHARS:
            raise ClientError(400, f"q must be at most {MAX_QUERY_CHARS} characters")
        words = tuple(dict.fromkeys(_WORD.findall(q.lower())))
        if not words:
            raise ClientError(400, "q must hold at least one word (letters or digits)")
        if len(words) > MAX_WORDS:
            raise ClientError(400, f"q must hold at most {MAX_WORDS} words")
    fmt = args.get("format")
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in ALL_NAMES:
            raise ClientError(400, f"format must be one of {', '.join(ALL_NAMES)}")
    camera = args.get("camera")
    if camera is not None:
        camera = camera.strip()
        if not camera or len(camera) > MAX_QUERY_CHARS:
            raise ClientError(400, "camera must be a camera make or model")
    has_gps = None
    if "has_gps" in args:
        value = args.get("has_gps", "").lower()
        if value not in ("true", "false"):
            raise ClientError(400, "has_gps must be true or false")
        has_gps = value == "true"
    sort = args.get("sort", "relevance" if words else "uploaded")
    if sort not in SORTS:
        raise ClientError(400, f"sort must be one of {', '.join(SORTS)}")
    if sort == "relevance" and not words:
        raise ClientError(400, "sort=relevance needs q")

    def moment(name: str, parse) -> str | None:
        text = args.get(name)
        return None if text is None else parse(name, text)

    return ImageQuery(
        status=status,
        words=words,
        format=fmt,
        camera=camera,
        taken_after=moment("taken_after", _taken),
        taken_before=moment("taken_before", _taken),
        has_gps=has_gps,
        uploaded_after=moment("uploaded_after", _uploaded),
        uploaded_before=moment("uploaded_before", _uploaded),
        sort=sort,
    )


def encode_cursor(query: ImageQuery, key: tuple[str, str]) -> str:
    """The position of a page's last record, and the order it is a position in."""
    raw = f"{query.sort}|{key[0]}|{key[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, query: ImageQuery) -> tuple[str, str]:
    bad = ClientError(400, "cursor is not valid: use the Link header of the previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    parts = raw.split("|")
    if len(parts) == 2:  # a cursor from before search: newest first by upload
        parts = ["uploaded", *parts]
    if len(parts) != 3 or parts[0] != query.sort or not parts[2]:
        raise bad
    sort, key, image_id = parts
    if sort == "relevance":
        try:
            float(key)
        except ValueError:
            raise bad from None
    elif sort == "uploaded" and not key:
        raise bad
    return key, image_id
