"""Upload validation, thumbnails and EXIF extraction: synchronous Pillow work for a thread pool.

Every function here is CPU-bound and thread-safe (no module state is mutated after import), so the
callers run them with run_in_executor / to_thread. Only stdlib, PIL and the error type are imported.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import ExifTags, Image

from imgapi_core import formats
from imgapi_core.errors import ClientError

THUMB_SIZES: dict[str, int] = {"small": 256, "medium": 768}

# Clients that do not know the type send one of these; the magic bytes decide instead.
_UNKNOWN_MIME = frozenset({"", "application/octet-stream"})

# Pillow's Image.MAX_IMAGE_PIXELS (about 179 MP: a warning above it, DecompressionBombError above
# twice it) is left as it is: it is process-global, so changing it per call would race between pool
# threads. validate_image compares the header's dimensions with the caller's max_pixels right after
# Image.open and before any decoding; that decides every file up to ~358 MP. Pillow's check runs
# inside Image.open, so it fires first only for files over ~358 MP, and backs us up for files that
# never went through validate_image. Its DecompressionBombError becomes a 413 like ours.

THUMB_QUALITY = 85
# Shrink-on-load: libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT while decoding. We take the
# largest scale that stays at or above the biggest target (gap 1.0) and let Lanczos do the rest.
# Measured on the corpus photos of 8 MP or more against a full-decode Lanczos reference: PSNR
# 35.7 dB (medium) / 33.7 dB (small), pyvips 36.0 / 33.3, gap 2.0 (as libvips and
# Image.thumbnail do) 36.2 / 33.7 for about 1.5x the time on 12 MP photos.
_DRAFT_GAP = 1.0
_RESAMPLE = Image.Resampling.LANCZOS
# Image.resize(reducing_gap=2.0) first shrinks by an integer factor with a fast box filter while
# leaving at least 2x for Lanczos. Only PNGs (no shrink-on-load) and large in-between steps use
# it; with 1.0 the small size (a 3x box from medium) lost 0.9 dB.
_REDUCING_GAP = 2.0

_ORIENTATION_TAG = ExifTags.Base.Orientation
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # a name of formats.FORMATS: "jpeg", "png", "heic", ...
    width: int  # as the decoder gives it, before the EXIF orientation is applied
    height: int
    ext: str  # extension of the stored original, from the content
    content_type: str
    frames: int = 1  # frames of an animation, pages of a TIFF, images of a HEIF
    orientation: int = 1  # EXIF orientation (1-8) still to apply to width x height

    @property
    def display_size(self) -> tuple[int, int]:
        return display_size(self.width, self.height, self.orientation)


def display_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The size an image is shown at: orientations 5-8 turn it by 90 degrees."""
    return (height, width) if orientation >= 5 else (width, height)


# --- names, content types, magic bytes -------------------------------------------------------


def _shown(text: str, limit: int = 40) -> str:
    """Client text made safe to echo in an error message: printable and short."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def check_name_and_type(
    original_name: str, content_type: str | None, allowed: Collection[str] = formats.ALL_NAMES
) -> None:
    allowed_ext = ", ".join(formats.all_extensions(allowed))
    # Browsers on Windows may send a full path; only the last component counts. Trailing dots and
    # spaces are dropped as Windows does ("x.php." is "x.php").
    base = re.split(r"[\\/]", original_name or "")[-1].strip().rstrip(". ")
    dot = base.rfind(".")
    if dot <= 0:  # no dot, or a leading-dot name like ".png"
        raise ClientError(415, f"file name has no extension (allowed: {allowed_ext})")
    ext = base[dot:].lower()
    by_ext = formats.by_extension(ext)
    if by_ext is None or by_ext.name not in allowed:
        raise ClientError(415, f'file type "{_shown(ext)}" is not allowed (allowed: {allowed_ext})')

    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime not in _UNKNOWN_MIME and not formats.accepts_mime(mime, allowed):
        allowed_mime = ", ".join(formats.all_mime_types(allowed))
        raise ClientError(
            415, f'content type "{_shown(mime)}" is not allowed (allowed: {allowed_mime})'
        )


# --- validation -------------------------------------------------------------------------------


def _describe(exc: BaseException, path: str) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        # Pillow's message carries the file object's repr, with a server path in it.
        return "cannot identify image file"
    text = str(exc).replace(path, "<file>").strip() or type(exc).__name__
    return _shown(text, 200)


@contextlib.contextmanager
def _rejecting(what: str, path: str) -> Iterator[None]:
    """Turn whatever Pillow raises inside the block into a ClientError that starts with `what`."""
    try:
        yield
    except ClientError:
        raise
    except Image.DecompressionBombError as exc:
        raise ClientError(413, f"image dimensions are over the decoder's limit: {exc}") from exc
    except MemoryError as exc:
        raise ClientError(413, "image is too large to decode in the memory available") from exc
    # Pillow raises OSError, SyntaxError, ValueError, TypeError, struct.error, EOFError,
    # IndexError, KeyError, ZeroDivisionError ... on hostile input: none of them may escape.
    except Exception as exc:
        raise ClientError(400, f"{what}: {_describe(exc, path)}") from exc


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ClientError(
            413,
            f"image is {width}x{height} ({pixels / 1e6:.1f} megapixels), "
            f"over the limit of {max_pixels / 1e6:g} megapixels",
        )


def _open(fp: BinaryIO, fmt: formats.Format) -> Image.Image:
    if fmt.name == "heic":
        formats.register_plugins()
    return Image.open(fp, formats=fmt.pillow)


def _frames(im: Image.Image) -> int:
    return int(getattr(im, "n_frames", 1) or 1)


def _frame_pixels(im: Image.Image, frames: int) -> int:
    """Pixels over every frame. Animations share one canvas size; TIFF pages and the images of a
    HEIF file each have their own, read from their headers (seeking decodes nothing there)."""
    if im.format not in ("TIFF", "HEIF") or frames == 1:
        return im.width * im.height * frames
    total = 0
    for index in range(frames):
        im.seek(index)
        total += im.width * im.height
    im.seek(0)
    return total


def orientation_of(im: Image.Image) -> int:
    """The EXIF orientation still to apply (1-8; 1 when absent or junk). A HEIF decoder has
    applied its own transforms already and reports 1."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a malformed EXIF block: treat as upright
        return 1
    return value if type(value) is int and 1 <= value <= 8 else 1


def validate_image(
    path: str | os.PathLike[str],
    max_pixels: int,
    max_frames: int = 1000,
    allowed: Collection[str] = formats.ALL_NAMES,
) -> ImageInfo:
    """Checks that the file is an image of an allowed format within the limits, by a real decode
    of every frame. MAX_PIXELS caps the first frame before any decoding, then the sum over all
    frames (imgproxy's rule for animations); max_frames caps their count."""
    name = os.fspath(path)
    with open(name, "rb") as fp:
        sniffed = formats.sniff(fp.read(formats.HEAD_BYTES))
        if sniffed is None or sniffed.name not in allowed:
            raise ClientError(415, f"file content is not a {formats.names(allowed)} image")
        fmt = sniffed.name

        fp.seek(0)
        with _rejecting("image header is corrupt", name):
            im = _open(fp, sniffed)
        with im:
            width, height = im.size
            _check_pixels(width, height, max_pixels)
            with _rejecting("image header is corrupt", name):
                frames = _frames(im)
                if frames > max_frames:
                    raise ClientError(
                        413, f"image has {frames} frames, over the limit of {max_frames}"
                    )
                total = _frame_pixels(im, frames)
                # Some decoders turn the pixels themselves: their size is already as shown.
                orientation = 1 if sniffed.upright else orientation_of(im)
            if total > max_pixels:
                raise ClientError(
                    413,
                    f"image has {frames} frames of {total / 1e6:.1f} megapixels in all, "
                    f"over the limit of {max_pixels / 1e6:g} megapixels",
                )
            with _rejecting("image data is truncated or corrupt", name):
                if fmt == "jpeg":
                    # A 1/8-scale decode still reads the whole entropy-coded stream, so truncation
                    # and broken data are found without paying for full-size pixels.
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                    im.load()
                elif fmt == "png" and frames == 1:
                    # verify() checks every chunk's CRC up to IEND (load() does not look at CRCs
                    # nor at what follows the image data). It must come right after an open and
                    # leaves the image unusable: an open of its own, and the full decode below.
                    fp.seek(0)
                    with Image.open(fp, formats=sniffed.pillow) as check:
                        check.verify()
                else:
                    for index in range(frames):
                        im.seek(index)
                        im.load()
        if fmt == "png" and frames == 1:
            fp.seek(0)
            with (
                _rejecting("image data is truncated or corrupt", name),
                Image.open(fp, formats=sniffed.pillow) as again,
            ):
                again.load()

    return image_info(fmt, width, height, frames, orientation)


def image_info(
    fmt: str, width: int, height: int, frames: int = 1, orientation: int = 1
) -> ImageInfo:
    """The ImageInfo of a validated image of this format (a name in formats.FORMATS) and size."""
    row = formats.by_name(fmt)
    return ImageInfo(fmt, width, height, row.stored_ext, row.content_type, frames, orientation)


# --- thumbnails -------------------------------------------------------------------------------


def _fit(width: int, height: int, box: int) -> tuple[int, int]:
    """The size of (width, height) scaled to fit inside box x box, never enlarged."""
    if width <= box and height <= box:
        return width, height
    scale = box / max(width, height)
    return max(1, min(box, round(width * scale))), max(1, min(box, round(height * scale)))


def _transpose_of(im: Image.Image) -> Image.Transpose | None:
    return _TRANSPOSE.get(orientation_of(im))


def _working_copy(im: Image.Image) -> Image.Image:
    """The decoded image in a mode that resizes well: L, RGB, CMYK, LA or RGBA."""
    mode = im.mode
    has_transparency = "transparency" in im.info
    if mode in ("L", "RGB", "CMYK") and not has_transparency:
        return im
    if mode in ("LA", "RGBA"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I") or mode == "F":
        # 16-bit greyscale: Pillow's convert("L") clips at 255 instead of scaling.
        return im.convert("I").point(lambda v: v / 256).convert("L")
    if mode in ("P", "PA", "L", "RGB") and (has_transparency or mode == "PA"):
        return im.convert("RGBA")
    return im.convert("RGB")


def _finished(im: Image.Image, transpose: Image.Transpose | None) -> Image.Image:
    """Alpha flattened onto white, CMYK as RGB, orientation applied, no metadata."""
    if im.mode in ("LA", "RGBA"):
        base_mode = "L" if im.mode == "LA" else "RGB"
        flat = Image.new(base_mode, im.size, 255 if base_mode == "L" else (255, 255, 255))
        flat.paste(im.convert(base_mode), mask=im.getchannel("A"))
        im = flat
    elif im.mode == "CMYK":
        # No colour management: converting through the ICC profile to sRGB is out of scope.
        im = im.convert("RGB")
    if transpose is not None:
        im = im.transpose(transpose)
    # Nothing from the original rides along: the JPEG writer copies info["comment"] (a COM
    # segment can carry a payload) and we want no EXIF, XMP or ICC either. Dropping the ICC
    # profile means wide-gamut originals look slightly flat; that is accepted. (When no step above
    # made a new image, this clears the caller's working copy, which needs no metadata either.)
    im.info = {}
    return im


# Thumbnail output formats: Pillow's writer and its settings. WebP at 80 is about JPEG 85's quality
# in 30% fewer bytes. Its method 2 (of 0-6) was measured on a 768 px photo: 15 ms and 63.6 kB,
# against 35 ms and 62.0 kB for the default 4. AVIF at 55, speed 8, is 40% of JPEG's bytes but
# slow to encode on a CPU (so it is opt-in: THUMB_FORMATS).
THUMB_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "jpeg": ("JPEG", {"quality": THUMB_QUALITY}),
    "webp": ("WEBP", {"quality": 80, "method": 2}),
    "avif": ("AVIF", {"quality": 55, "speed": 8}),
}


def _encode(im: Image.Image, fmt: str = "jpeg") -> bytes:
    writer, options = THUMB_ENCODERS[fmt]
    buffer = io.BytesIO()
    im.save(buffer, writer, **options)
    return buffer.getvalue()


def render_thumbnails(
    src: str | os.PathLike[str], sizes: Mapping[str, int] = THUMB_SIZES
) -> dict[str, bytes]:
    """JPEG bytes per size name, each fitting inside size x size, from one decode of src."""
    return render_thumbnail_set(src, sizes, ("jpeg",)).get("jpeg", {})


def render_thumbnail_set(
    src: str | os.PathLike[str],
    sizes: Mapping[str, int] = THUMB_SIZES,
    out_formats: Collection[str] = ("jpeg",),
) -> dict[str, dict[str, bytes]]:
    """{format: {size name: bytes}}: every size in every output format, from one decode of src
    (the first frame of an animation), upright, without metadata."""
    boxes = sorted(sizes.items(), key=lambda item: item[1], reverse=True)
    for name, box in boxes:
        if type(box) is not int or box < 1:
            raise ValueError(f"bad thumbnail box for {name!r}: {box!r}")
    unknown = set(out_formats) - set(THUMB_ENCODERS)
    if unknown:
        raise ValueError(f"unknown thumbnail formats {sorted(unknown)}")
    if not boxes or not out_formats:
        return {}

    filename = os.fspath(src)
    with open(filename, "rb") as fp, _rejecting("image data is truncated or corrupt", filename):
        sniffed = formats.sniff(fp.read(formats.HEAD_BYTES))
        if sniffed is None:
            raise ClientError(415, f"file content is not a {formats.names()} image")
        fp.seek(0)
        with _open(fp, sniffed) as im:
            width, height = im.size
            # The boxes are square, so fitting the stored (unrotated) image gives the same
            # sizes as fitting the rotated one; rotation happens last, on the small images.
            targets = {size_name: _fit(width, height, box) for size_name, box in boxes}
            largest = targets[boxes[0][0]]
            if im.format in ("JPEG", "MPO") and largest != (width, height):
                im.draft(im.mode, (int(largest[0] * _DRAFT_GAP), int(largest[1] * _DRAFT_GAP)))
            im.load()
            transpose = _transpose_of(im)
            current = _working_copy(im)

            rendered: dict[str, dict[str, bytes]] = {fmt: {} for fmt in out_formats}
            for size_name, _box in boxes:
                target = targets[size_name]
                if current.size != target:
                    # Each size comes from the previous, larger one: one decode serves all.
                    current = current.resize(target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
                finished = _finished(current, transpose)
                for fmt in out_formats:
                    rendered[fmt][size_name] = _encode(finished, fmt)
    return {fmt: {name: by_size[name] for name in sizes} for fmt, by_size in rendered.items()}


# --- EXIF -------------------------------------------------------------------------------------

# Offsets to other IFDs, meaningless once the IFDs are read (the GPS IFD is nested instead).
_POINTER_TAGS = frozenset({0x8769, 0x8825, 0xA005})
_MAKER_NOTE = 0x927C
# Opaque vendor blobs (MakerNote, PrintIM, padding) say nothing to a client and can be large.
_MAX_BYTES_VALUE = 1024
_MAX_DEPTH = 4
_DROP = object()


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of an EXIF value, or _DROP when there is nothing worth keeping."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Real):  # IFDRational, float, Fraction
        try:
            number = float(value)
        except (ArithmeticError, ValueError, TypeError):
            return None
        return number if math.isfinite(number) else None  # 0/0 rationals are NaN
    if isinstance(value, str):
        return value.replace("\x00", "").strip()
    if isinstance(value, (bytes, bytearray)):
        return value.hex() if len(value) <= _MAX_BYTES_VALUE else _DROP
    if isinstance(value, (tuple, list)) and depth < _MAX_DEPTH:
        items = [_json_safe(item, depth + 1) for item in value]
        return [None if item is _DROP else item for item in items]
    return _DROP


def _tag_items(ifd: Any) -> Iterator[tuple[int, Any]]:
    """(tag, value) pairs of one IFD, skipping any tag Pillow fails to read."""
    try:
        tags = list(ifd.keys())
    except Exception:
        return
    for tag in tags:
        try:
            yield tag, ifd[tag]
        except Exception:
            continue


def _named_tags(ifd: Any, names: Mapping[int, str], into: dict[str, Any]) -> None:
    for tag, value in _tag_items(ifd):
        if not isinstance(tag, int) or tag in _POINTER_TAGS or tag == _MAKER_NOTE:
            continue
        safe = _json_safe(value)
        if safe is _DROP:
            continue
        into.setdefault(names.get(tag) or f"0x{tag:04x}", safe)


def _get_ifd(exif: Image.Exif, ifd: ExifTags.IFD) -> Mapping[int, Any]:
    try:
        return exif.get_ifd(ifd)
    except Exception:
        return {}


def _coordinate(value: Any, ref: Any, positive: str, negative: str, limit: float) -> float | None:
    """Signed decimal degrees from EXIF (degrees, minutes, seconds) and a N/S or E/W ref."""
    if not isinstance(ref, str):
        return None
    ref = ref.replace("\x00", "").strip().upper()
    if ref not in (positive, negative):
        return None  # without a valid ref the sign is unknown: better no coordinate
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(parts) <= 3:
        return None
    try:
        numbers_ = [
            float(part)
            for part in parts
            if isinstance(part, numbers.Real) and not isinstance(part, bool)
        ]
    except (ArithmeticError, ValueError, TypeError):
        return None
    if len(numbers_) != len(parts) or not all(math.isfinite(n) and n >= 0 for n in numbers_):
        return None
    degrees = sum(n / 60**i for i, n in enumerate(numbers_))
    if degrees > limit:
        return None
    return round(-degrees if ref == negative else degrees, 7)


def _exif_dict(im: Image.Image) -> dict[str, Any]:
    result: dict[str, Any] = {}
    try:
        # For PNG, getexif() decodes the image when the eXIf chunk comes after the image data.
        exif = im.getexif()
    except Exception:  # an EXIF block Pillow cannot parse at all
        return result
    # Every step below skips what Pillow fails to read (per IFD, per tag) and keeps the rest.
    _named_tags(exif, ExifTags.TAGS, result)
    _named_tags(_get_ifd(exif, ExifTags.IFD.Exif), ExifTags.TAGS, result)
    gps_raw = _get_ifd(exif, ExifTags.IFD.GPSInfo)
    gps: dict[str, Any] = {}
    _named_tags(gps_raw, ExifTags.GPSTAGS, gps)
    if gps:
        result["GPSInfo"] = gps

    raw = dict(_tag_items(gps_raw))
    latitude = _coordinate(raw.get(2), raw.get(1), "N", "S", 90.0)
    longitude = _coordinate(raw.get(4), raw.get(3), "E", "W", 180.0)
    if latitude is not None and longitude is not None:
        result["latitude"] = latitude
        result["longitude"] = longitude
    return result


def extract_exif(src: str | os.PathLike[str]) -> dict[str, Any]:
    """IFD0 and Exif tags flat by Pillow's names, GPS nested under "GPSInfo", plus lat/lon.

    Malformed or absent EXIF gives {} or a partial dict, never an exception. A missing or
    unreadable file does raise OSError: that is the caller's problem, not the content's.
    """
    with open(src, "rb") as fp:
        sniffed = formats.sniff(fp.read(formats.HEAD_BYTES))
        if sniffed is None:
            return {}
        fp.seek(0)
        try:
            im = _open(fp, sniffed)
        except Exception:  # not an image Pillow can open: no EXIF
            return {}
        with im:
            exif = _exif_dict(im)
            if sniffed.upright and "Orientation" in exif:
                # The decoder turned the pixels already (libheif; Pillow's TIFF reader): the tag
                # as the file has it would make a client turn them a second time.
                exif["Orientation"] = 1
            return exif
