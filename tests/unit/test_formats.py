"""Every accepted format, made at test time from a corpus photo: sniffed by content, validated under
the same limits (pixels over all frames, frame count), decoded for real, EXIF read, thumbnails
upright in every output format; hostile variants of each are clear 4xx, never another error."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from format_samples import (
    MAKE,
    SHOWN,
    STILLS,
    huge_heic,
    huge_tiff,
    make_samples,
    top_left_is_red,
    two_sized_heic,
)
from PIL import Image

from imgapi_core import app, formats, imaging, settings
from imgapi_core.errors import ClientError


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_samples(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("name", list(STILLS))
def test_each_format_validates_with_its_true_shown_size(samples, name):
    info = imaging.validate_image(samples[name], 50_000_000)
    assert info.format == name
    assert info.frames == 1
    assert info.display_size == SHOWN, (info.width, info.height, info.orientation)
    _writer, has_exif = STILLS[name]
    # A decoder that turns the pixels itself (libheif, Pillow's TIFF reader) leaves nothing to
    # turn; the others report orientation 6 on stored landscape pixels.
    if has_exif and not formats.by_name(name).upright:
        assert (info.orientation, info.width, info.height) == (6, SHOWN[1], SHOWN[0])
    else:
        assert (info.orientation, info.width, info.height) == (1, *SHOWN)
    assert info.ext == formats.by_name(name).stored_ext
    assert info.content_type == formats.by_name(name).content_type


@pytest.mark.parametrize("name", list(STILLS))
def test_thumbnails_are_upright_in_every_output_format(samples, name):
    rendered = imaging.render_thumbnail_set(
        samples[name], imaging.THUMB_SIZES, ("jpeg", "webp", "avif")
    )
    assert set(rendered) == {"jpeg", "webp", "avif"}
    for fmt, by_size in rendered.items():
        for size, data in by_size.items():
            thumb = Image.open(io.BytesIO(data))
            assert thumb.format == {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}[fmt]
            box = imaging.THUMB_SIZES[size]
            assert max(thumb.size) == min(box, max(SHOWN)) and thumb.height > thumb.width
            assert top_left_is_red(thumb), (name, fmt, size)
            assert not thumb.getexif(), "thumbnails carry no EXIF"


@pytest.mark.parametrize("name", [n for n, (_, has_exif) in STILLS.items() if has_exif])
def test_exif_is_read_from_every_format_that_carries_it(samples, name):
    exif = imaging.extract_exif(samples[name])
    assert exif.get("Make") == MAKE
    # The orientation a client would apply to what it is served: none left where the decoder
    # turned the pixels already.
    expected = 1 if formats.by_name(name).upright else 6
    assert exif.get("Orientation") == expected


@pytest.mark.parametrize("name", ["gif", "webp", "tiff"])
def test_animations_and_pages_count_frames_and_thumbnail_the_first(samples, name):
    path = samples[f"animated-{name}"]
    info = imaging.validate_image(path, 50_000_000)
    assert (info.format, info.frames, info.width, info.height) == (name, 4, 150, 225)
    first = Image.open(io.BytesIO(imaging.render_thumbnails(path)["small"]))
    assert top_left_is_red(first)


@pytest.mark.parametrize("name", ["gif", "webp", "tiff"])
def test_pixels_are_capped_over_all_frames_and_frames_by_count(samples, name):
    path = samples[f"animated-{name}"]
    one_frame = 150 * 225
    imaging.validate_image(path, one_frame * 4)  # exactly at the cap: fine
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, one_frame * 3)
    assert caught.value.status == 413 and "4 frames" in caught.value.message
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, 50_000_000, max_frames=3)
    assert caught.value.status == 413 and "frames" in caught.value.message


def test_every_image_of_a_heif_file_counts_at_its_own_size(tmp_path):
    """A HEIF file may hold images of different sizes: a small first one must not let a large
    second one past the cap (nor into a full-size decode)."""
    path = tmp_path / "two.heic"
    path.write_bytes(two_sized_heic())
    total = 64 * 64 + 640 * 480
    info = imaging.validate_image(path, total)  # exactly at the cap: fine
    assert (info.format, info.frames, info.width, info.height) == ("heic", 2, 64, 64)
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, total - 1)
    assert caught.value.status == 413 and "2 frames" in caught.value.message


@pytest.mark.parametrize("name", [*STILLS, "animated-gif", "animated-webp", "animated-tiff"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_truncated_files_of_every_format_are_a_clear_4xx(samples, tmp_path, name, keep):
    data = samples[name].read_bytes()
    cut = tmp_path / f"cut-{samples[name].name}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(cut, 50_000_000)
    assert caught.value.status in (400, 413, 415), caught.value.message


@pytest.mark.parametrize("make", [lambda s: huge_tiff(), huge_heic], ids=["tiff", "heic"])
def test_a_huge_declared_size_is_refused_before_decoding(samples, tmp_path, make: Callable):
    path = tmp_path / "bomb"
    path.write_bytes(make(samples))
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, 50_000_000)
    assert caught.value.status in (400, 413), caught.value.message


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"BM" + b"\0" * 60, "bmp"),
        (b"\0\0\1\0\1\0" + b"\0" * 58, "ico"),
        (b"8BPS\0\1" + b"\0" * 58, "psd"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"\0" * 40, "eps"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>' + b" " * 30, "svg"),
    ],
)
def test_other_formats_are_415_naming_the_allowed_ones(tmp_path, head, kind):
    path = tmp_path / f"x.{kind}"
    path.write_bytes(head)
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, 50_000_000)
    assert caught.value.status == 415
    assert "JPEG" in caught.value.message and "HEIC" in caught.value.message
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type(f"x.{kind}", None)
    assert caught.value.status == 415 and ".heic" in caught.value.message


def test_allowed_formats_narrow_names_types_and_content(samples):
    allowed = ("jpeg", "png")
    imaging.check_name_and_type("a.jpg", "image/jpeg", allowed)
    for name, ctype in (("a.heic", None), ("a.jpg", "image/heic"), ("a.webp", "image/webp")):
        with pytest.raises(ClientError) as caught:
            imaging.check_name_and_type(name, ctype, allowed)
        assert caught.value.status == 415
        assert "(allowed: .jpeg, .jpg, .png)" in caught.value.message or (
            "(allowed: image/jpeg, image/pjpeg, image/png, image/x-png)" in caught.value.message
        )
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(samples["heic"], 50_000_000, allowed=allowed)
    assert caught.value.status == 415 and "JPEG or PNG" in caught.value.message


@pytest.mark.parametrize("name", list(STILLS))
def test_the_content_decides_the_format(samples, name):
    assert formats.sniff(samples[name].read_bytes()[: formats.HEAD_BYTES]).name == name


def test_ftyp_brands_tell_heif_from_avif():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body

    assert formats.sniff(ftyp(b"heic", b"mif1", b"heic")).name == "heic"
    assert formats.sniff(ftyp(b"mif1", b"mif1", b"heic")).name == "heic"
    assert formats.sniff(ftyp(b"avif", b"avif", b"mif1")).name == "avif"
    assert formats.sniff(ftyp(b"mif1", b"avif", b"mif1")).name == "avif"
    assert formats.sniff(ftyp(b"isom", b"mp41")) is None  # an MP4 video
    assert formats.sniff(b"\0\0\0\x08ftyp") is None


def test_the_settings_know_the_formats_of_the_table():
    from imgapi_core import settings

    assert set(settings.INPUT_FORMATS) == set(formats.ALL_NAMES)
    assert set(settings.OUTPUT_FORMATS) == set(imaging.THUMB_ENCODERS)
    assert set(formats.THUMB_CONTENT_TYPES) == set(imaging.THUMB_ENCODERS)


def _thumb(path: Path) -> Image.Image:
    return Image.open(io.BytesIO(imaging.render_thumbnails(path, {"t": 64})["t"])).convert("RGB")


def test_colours_come_out_right_in_the_new_formats(tmp_path):
    """CMYK and 16-bit TIFF, palette GIF and WebP with transparency (alpha lands on white)."""
    red_cmyk = Image.new("CMYK", (80, 60), (0, 255, 255, 0))
    red_cmyk.save(tmp_path / "cmyk.tif", "TIFF")
    grey16 = Image.new("I;16", (80, 60), 32768)  # mid-grey on 16 bits
    grey16.save(tmp_path / "grey16.tif", "TIFF")
    clear = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    clear.paste((30, 60, 200, 255), (0, 0, 40, 60))  # left half blue, right half transparent
    clear.save(tmp_path / "alpha.webp", "WEBP", lossless=True)
    _transparent_gif(tmp_path / "alpha.gif")

    r, g, b = _thumb(tmp_path / "cmyk.tif").getpixel((32, 30))
    assert r > 200 and g < 60 and b < 60, (r, g, b)  # red, not inverted
    grey = _thumb(tmp_path / "grey16.tif").getpixel((32, 30))
    assert all(110 <= channel <= 145 for channel in grey), grey  # scaled, not clipped to white
    for name in ("alpha.webp", "alpha.gif"):
        thumb = _thumb(tmp_path / name)
        assert thumb.getpixel((5, 30))[2] > 150, name  # the blue half
        assert thumb.getpixel((60, 30)) == (255, 255, 255), name  # transparent: white


def _transparent_gif(path: Path) -> None:
    image = Image.new("P", (80, 60), 0)
    image.putpalette([0, 0, 0, 30, 60, 200] + [0] * (254 * 3))
    image.paste(1, (0, 0, 40, 60))
    image.save(path, "GIF", transparency=0)


def test_a_pillow_without_avif_accepts_no_avif_and_makes_none(monkeypatch, caplog):
    """A Pillow built without libavif: AVIF uploads would be a 400 blaming the file, and every
    AVIF thumbnail a failed job. The formats it lacks leave ALLOWED_FORMATS (with a warning) and
    are a bad setting in THUMB_FORMATS."""
    from PIL import features

    real_check = features.check
    monkeypatch.setattr(features, "check", lambda name: name != "avif" and real_check(name))
    assert formats.missing_codecs(("jpeg", "avif", "heic")) == ["avif"]
    cfg = settings.load(env={"DB_PATH": "x.db"}, dotenv=None)
    fitted = app.with_codecs_at_hand(cfg)
    assert "avif" in cfg.allowed_formats and "avif" not in fitted.allowed_formats
    assert fitted.allowed_formats == tuple(n for n in cfg.allowed_formats if n != "avif")
    assert "not accepting avif uploads" in caplog.text
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type("a.avif", "image/avif", fitted.allowed_formats)
    assert caught.value.status == 415

    for env in ({"THUMB_FORMATS": "jpeg,avif"}, {"ALLOWED_FORMATS": "avif"}):
        bad = settings.load(env={"DB_PATH": "x.db", **env}, dotenv=None)
        with pytest.raises(SystemExit) as exited:
            app.with_codecs_at_hand(bad)
        assert exited.value.code == 2
