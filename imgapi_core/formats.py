"""The one table of accepted image formats. Name and type checks, magic-byte sniffing, the Pillow
plugins allowed to parse a file, the stored extension and the served content type all read it, so
a new format is one more row."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
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
    # The decoder applies the EXIF orientation itself (libheif; Pillow's TIFF reader on load):
    # the size it reports is the displayed size, and nothing is left to turn.
    upright: bool = False


def _starts_with(*magics: bytes) -> Callable[[bytes], bool]:
    return lambda head: head.startswith(magics)


def _riff(kind: bytes) -> Callable[[bytes], bool]:
    return lambda head: head[:4] == b"RIFF" and head[8:12] == kind


def ftyp_brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO-BMFF `ftyp` box at the start (HEIF, AVIF)."""
    if head[4:8] != b"ftyp":
        return set()
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size) if size >= 16 else 16
    brands = {head[8:12]}
    brands.update(head[i : i + 4] for i in range(16, end - 3, 4))
    return brands


_AVIF_BRANDS = {b"avif", b"avis"}
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}


def _is_avif(head: bytes) -> bool:
    return bool(ftyp_brands(head) & _AVIF_BRANDS)


def _is_heic(head: bytes) -> bool:
    brands = ftyp_brands(head)
    # mif1/msf1 alone are any HEIF image; with an AVIF brand it is AVIF (tested first).
    return bool(brands & _HEIC_BRANDS) or (
        bool(brands & {b"mif1", b"msf1"}) and not brands & _AVIF_BRANDS
    )


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
    Format(
        name="webp",
        extensions=(".webp",),
        mime_types=("image/webp",),
        matches=_riff(b"WEBP"),
        pillow=("WEBP",),
        stored_ext="webp",
        content_type="image/webp",
    ),
    Format(
        name="gif",
        extensions=(".gif",),
        mime_types=("image/gif",),
        matches=_starts_with(b"GIF87a", b"GIF89a"),
        pillow=("GIF",),
        stored_ext="gif",
        content_type="image/gif",
    ),
    Format(
        name="tiff",
        extensions=(".tif", ".tiff"),
        mime_types=("image/tiff", "image/x-tiff"),
        matches=_starts_with(b"II*\x00", b"MM\x00*"),
        pillow=("TIFF",),
        stored_ext="tif",
        content_type="image/tiff",
        upright=True,
    ),
    Format(
        name="avif",
        extensions=(".avif",),
        mime_types=("image/avif", "image/avif-sequence"),
        matches=_is_avif,
        pillow=("AVIF",),
        stored_ext="avif",
        content_type="image/avif",
    ),
    Format(
        name="heic",
        extensions=(".heic", ".heif", ".hif"),
        mime_types=("image/heic", "image/heif", "image/heic-sequence", "image/heif-sequence"),
        matches=_is_heic,
        pillow=("HEIF",),  # pillow-heif's plugin, registered by register_plugins()
        stored_ext="heic",
        content_type="image/heic",
        upright=True,
    ),
)

ALL_NAMES = tuple(fmt.name for fmt in FORMATS)

# What thumbnails are served as, by output format (THUMB_FORMATS).
THUMB_CONTENT_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}

# How many leading bytes sniff() needs to see (an ftyp box lists its brands in the first 64).
HEAD_BYTES = 64

_registered = threading.Lock()
_done = False


def register_plugins() -> None:
    """pillow-heif's HEIF opener, once per process (not at import: importing costs nothing)."""
    global _done
    with _registered:
        if not _done:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _done = True


def missing_codecs(names: Collection[str]) -> list[str]:
    """The formats among `names` that this process's Pillow cannot read or write. Pillow's wheels
    carry libavif; a Pillow built from source without it has no AVIF."""
    from PIL import features

    return [name for name in names if name == "avif" and not features.check("avif")]


def check_thumbnail_encoders(thumb_formats: Collection[str]) -> None:
    """Refuses THUMB_FORMATS that name what cannot be made (ValueError): every thumbnail job
    would fail."""
    if missing := missing_codecs(thumb_formats):
        raise ValueError(
            f"THUMB_FORMATS={','.join(thumb_formats)!r}: this Pillow cannot encode"
            f" {', '.join(missing)}; leave it out"
        )


def by_name(name: str) -> Format:
    """Raises KeyError for a format that is not in the table."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(name)


def by_extension(ext: str) -> Format | None:
    ext = ext.lower()
    return next((fmt for fmt in FORMATS if ext in fmt.extensions), None)


def _of(allowed: Collection[str]) -> list[Format]:
    return [fmt for fmt in FORMATS if fmt.name in allowed]


def accepts_mime(mime: str, allowed: Collection[str] = ALL_NAMES) -> bool:
    return any(mime in fmt.mime_types for fmt in _of(allowed))


def sniff(head: bytes) -> Format | None:
    """The format the content is, whatever its name says."""
    head = bytes(head[:HEAD_BYTES])
    return next((fmt for fmt in FORMATS if fmt.matches(head)), None)


def all_extensions(allowed: Collection[str] = ALL_NAMES) -> list[str]:
    return sorted(ext for fmt in _of(allowed) for ext in fmt.extensions)


def all_mime_types(allowed: Collection[str] = ALL_NAMES) -> list[str]:
    return sorted(mime for fmt in _of(allowed) for mime in fmt.mime_types)


def names(allowed: Collection[str] = ALL_NAMES) -> str:
    """For messages: "JPEG, PNG or WEBP"."""
    shown = [fmt.name.upper() for fmt in _of(allowed)]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
