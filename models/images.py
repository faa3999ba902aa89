"""Decode an image file into the small RGB picture the caption model wants."""

from __future__ import annotations

import os

from PIL import Image, ImageOps

from models.errors import CaptionError, redact


def shrink_for_caption(path: str | os.PathLike[str], size: tuple[int, int]) -> Image.Image:
    """An RGB image at least `size` (width, height) on both sides, or the original when smaller.

    The processor resizes to exactly `size` afterwards (BLIP squashes to a square), so shrinking
    only down to "covers size" loses nothing it would have kept. JPEGs are decoded at a reduced
    DCT scale (draft mode), which is most of the saving on a 12 MP photo.
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as opened:
            side = max(size)
            # draft() wants the size before EXIF rotation; a square request covers both ways.
            opened.draft("RGB", (side, side))
            opened.load()
            image = _upright(opened)
            image = _to_rgb(image)
            return _cover(image, size)
    except CaptionError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise CaptionError(f"cannot decode image: {_describe(exc, name)}") from exc


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the caption
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # Dropping alpha leaves whatever colour hides under transparent pixels (often black).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = size
    scale = max(width / image.width, height / image.height)
    if scale >= 1:
        return image
    target = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _describe(exc: BaseException, path: str) -> str:
    # Pillow puts the file name in some messages; a server path must not reach an API client.
    text = redact(str(exc), path) or "no details"
    return f"{type(exc).__name__}: {text}"
