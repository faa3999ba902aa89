"""Samples of every accepted format, made at test time from a corpus photo (no generated media is
committed): the tests of formats, in-process and over the API, share them."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import corpus_folder
from PIL import Image

from imgapi_core import formats

MAKE = "imgapi-test"
RED, BLUE = (220, 30, 30), (30, 60, 200)
# The photo as it is shown: portrait, a red block at its top left.
SHOWN = (300, 450)


def shown_image() -> Image.Image:
    photo = Image.open(corpus_folder("photos") / "orient1.jpg").convert("RGB")
    photo = photo.resize(SHOWN)
    photo.paste(RED, (0, 0, SHOWN[0] // 3, SHOWN[1] // 3))
    return photo


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = MAKE
    return exif.tobytes()


def stored_for_orientation_6(shown: Image.Image) -> Image.Image:
    """Pixels that, turned as orientation 6 says (90 degrees clockwise), show `shown`."""
    return shown.transpose(Image.Transpose.ROTATE_90)


def encode(image: Image.Image, writer: str, **options: object) -> bytes:
    out = io.BytesIO()
    if writer == "HEIF":
        formats.register_plugins()
    image.save(out, writer, **options)
    return out.getvalue()


# name -> (writer, carries EXIF)
STILLS = {
    "jpeg": ("JPEG", True),
    "png": ("PNG", False),
    "webp": ("WEBP", True),
    "tiff": ("TIFF", True),
    "avif": ("AVIF", True),
    "heic": ("HEIF", True),
    "gif": ("GIF", False),
}


def make_samples(folder: Path) -> dict[str, Path]:
    """A still of each format (EXIF orientation 6 and a camera make where the format carries
    EXIF) and 4-frame animations / pages, in `folder`."""
    shown = shown_image()
    made: dict[str, Path] = {}
    for name, (writer, has_exif) in STILLS.items():
        if has_exif:
            data = encode(stored_for_orientation_6(shown), writer, exif=exif_bytes(6))
        else:
            data = encode(shown.convert("P") if name == "gif" else shown, writer)
        made[name] = folder / f"still.{formats.by_name(name).stored_ext}"
        made[name].write_bytes(data)
    frames = [shown.rotate(angle).resize((150, 225)) for angle in (0, 10, 20, 30)]
    for name, writer in (("gif", "GIF"), ("webp", "WEBP"), ("tiff", "TIFF")):
        path = folder / f"animated.{formats.by_name(name).stored_ext}"
        frames[0].save(path, writer, save_all=True, append_images=frames[1:], duration=80)
        made[f"animated-{name}"] = path
    return made


def top_left_is_red(thumb: Image.Image) -> bool:
    pixel = thumb.convert("RGB").getpixel((thumb.width // 10, thumb.height // 10))
    return pixel[0] > 150 and pixel[1] < 100 and pixel[2] < 100


# -- bombs: small files that declare (or hold) far more pixels than they seem to ---------------


def huge_tiff() -> bytes:
    """A TIFF whose header declares 100000 x 100000 8-bit grey pixels and holds 10 bytes."""
    side = 100_000
    entries = [  # (tag, type, value): type 3 SHORT, 4 LONG
        (256, 4, side),  # ImageWidth
        (257, 4, side),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 1),  # no compression
        (262, 3, 1),  # BlackIsZero
        (273, 4, 8 + 2 + 9 * 12 + 4),  # StripOffsets: right after the IFD
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, side),  # RowsPerStrip
        (279, 4, 10),  # StripByteCounts
    ]
    ifd = len(entries).to_bytes(2, "little")
    for tag, kind, value in entries:
        ifd += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + (1).to_bytes(4, "little")
        ifd += value.to_bytes(4, "little")
    return b"II*\x00" + (8).to_bytes(4, "little") + ifd + b"\0\0\0\0" + b"\x80" * 10


def huge_heic(samples: dict[str, Path]) -> bytes:
    """A small HEIC whose `ispe` box (the image's declared size) says 100000 x 100000."""
    data = bytearray(samples["heic"].read_bytes())
    at = data.index(b"ispe")
    data[at + 8 : at + 16] = (100_000).to_bytes(4, "big") * 2
    return bytes(data)


def two_sized_heic() -> bytes:
    """A HEIC of two images: 64x64 first (the primary), then 640x480."""
    import pillow_heif

    heif = pillow_heif.from_pillow(Image.new("RGB", (64, 64), "red"))
    heif.add_from_pillow(Image.new("RGB", (640, 480), "blue"))
    buffer = io.BytesIO()
    heif.save(buffer, quality=50)
    return buffer.getvalue()
