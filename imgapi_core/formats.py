"""The one table of accepted image formats. Name and type checks, magic-byte sniffing, the Pillow
plugins allowed to parse a file, the stored extension and the served content type all read it, so
a new format is one more row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str  # what records say: "jpeg", "png"
    extensions: tuple[str, ...]  # accepted file-name extensions, lower case with the dot
    mime_types: tuple[str, ...]  # accepted Content-Types of the file part
    matches: Callable[[bytes], bool]  # the magic bytes, given the file's first 32 bytes
    pillow: tuple[str, ...]  # Pillow plugins allowed to parse it ("JPEG" also yields MPO)
    stored_ext: str  # extension of the stored original
    content_type: str  # Content-Type it is served with


def _starts_with(magic: bytes) -> Callable[[bytes], bool]:
    return lambda head: head.startswith(magic)


FORMATS: tuple[Format, ...] = (
    Format(
        name="jpeg",
        # ".jpe" is left out on purpose: browsers and cameras do not produce it, and a short
        # list keeps the client-facing message simple.
        extensions=(".jpg", ".jpeg"),
        mime_types=("image/jpeg", "image/pjpeg"),
        matches=_starts_with(b"\xff\xd8\xff"),
        pillow=("JPEG",),
        stored_ext="jpg",
        content_type="image/jpeg",
    ),
    Format(
        name="png",
        extensions=(".png",),
        mime_types=("image/png", "image/x-png"),
        matches=_starts_with(b"\x89PNG\r\n\x1a\n"),
        pillow=("PNG",),
        stored_ext="png",
        content_type="image/png",
    ),
)

# How many leading bytes sniff() needs to see.
HEAD_BYTES = 32


def by_name(name: str) -> Format:
    """Raises KeyError for a format that is not in the table."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(name)


def by_extension(ext: str) -> Format | None:
    ext = ext.lower()
    return next((fmt for fmt in FORMATS if ext in fmt.extensions), None)


def accepts_mime(mime: str) -> bool:
    return any(mime in fmt.mime_types for fmt in FORMATS)


def sniff(head: bytes) -> Format | None:
    """The format the content is, whatever its name says."""
    head = bytes(head[:HEAD_BYTES])
    return next((fmt for fmt in FORMATS if fmt.matches(head)), None)


def all_extensions() -> list[str]:
    return sorted(ext for fmt in FORMATS for ext in fmt.extensions)


def all_mime_types() -> list[str]:
    return sorted(mime for fmt in FORMATS for mime in fmt.mime_types)


def names() -> str:
    """For messages: "JPEG or PNG"."""
    shown = [fmt.name.upper() for fmt in FORMATS]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
