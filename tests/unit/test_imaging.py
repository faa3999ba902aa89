"""imaging.py against the corpus and hand-made files: validation, thumbnails, EXIF."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CORPUS, corpus_folder, manifest
from PIL import Image, ImageChops, ImageStat
from PIL.TiffImagePlugin import IFDRational

from imgapi_core import formats, imaging
from imgapi_core.errors import ClientError

MAX_PIXELS = 50_000_000
SHA = "ab" * 32
CLIENT_STATUSES = (400, 413, 415)


def _names(folder: str) -> list[str]:
    """File names for parametrize, read without skipping at collection time."""
    path = CORPUS / folder / "MANIFEST.tsv"
    if not path.is_file():
        return ["<corpus absent>"]  # the test itself then skips (or fails when required)
    return [line.split("\t", 1)[0] for line in path.read_text().splitlines()[1:] if line]


def _row(folder: str, name: str) -> dict[str, str]:
    rows = {row["file"]: row for row in manifest(folder)}
    return rows[name]


def _pillow13(row: dict[str, str]) -> tuple[str, str, int, int]:
    """'ok: JPEG RGB 4000x3000; exif ...' -> ("JPEG", "RGB", 4000, 3000)."""
    assert row["pillow13"].startswith("ok: "), row["pillow13"]
    fmt, mode, dims = row["pillow13"][4:].split(";")[0].split()
    width, height = dims.split("x")
    return fmt, mode, int(width), int(height)


def _decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


def _jpeg_markers(data: bytes) -> list[int]:
    """The marker of every segment before the scan, e.g. [0xD8, 0xE0, 0xDB, 0xC0, 0xC4, 0xDA]."""
    assert data[:2] == b"\xff\xd8"
    markers, pos = [0xD8], 2
    while pos < len(data):
        assert data[pos] == 0xFF, f"no marker at {pos}"
        marker = data[pos + 1]
        markers.append(marker)
        if marker == 0xDA:
            return markers
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    raise AssertionError("no SOS")


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / len(a.getbands())


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- names, content types, magic bytes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("photo.jpg", "image/jpeg"),
        ("PHOTO.JPEG", None),
        ("scan.png", "image/png"),
        ("scan.png", "image/x-png"),
        ("old.jpg", "image/pjpeg"),
        ("x.png", ""),
        ("x.jpg", "application/octet-stream"),
        ("x.jpg", "IMAGE/JPEG; charset=binary"),
        ("really-a-png.jpg", "image/png"),  # content decides the stored type
        ("C:\\Users\\me\\Pictures\\pic.JPG", "image/jpeg"),
        ("../../etc/pic.png", None),
        ("trailing.jpg. ", "image/jpeg"),
    ],
)
def test_name_and_type_accepted(name: str, content_type: str | None) -> None:
    imaging.check_name_and_type(name, content_type)


def test_extension_not_allowed_message() -> None:
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type("report.xlsx", "application/octet-stream")
    assert caught.value.status == 415
    assert caught.value.message == (
        'file type ".xlsx" is not allowed (allowed: .avif, .gif, .heic, .heif, .hif, .jpeg,'
        " .jpg, .png, .tif, .tiff, .webp)"
    )
    assert str(caught.value) == caught.value.message
    # ALLOWED_FORMATS narrows the list, and the message with it.
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type("report.xlsx", None, ("jpeg", "png"))
    assert caught.value.message == 'file type ".xlsx" is not allowed (allowed: .jpeg, .jpg, .png)'


@pytest.mark.parametrize(
    "name",
    ["noext", "", ".png", "dir.jpg/noext", "x.gif", "x.jpg.php", "shell.php.", "x.jpe", "x.webp"],
)
def test_extension_rejected(name: str) -> None:
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type(name, "image/jpeg", ("jpeg", "png"))
    assert caught.value.status == 415
    assert "allowed: .jpeg, .jpg, .png" in caught.value.message


@pytest.mark.parametrize("content_type", ["text/html", "image/bmp", "image/svg+xml", "multipart/x"])
def test_mime_rejected(content_type: str) -> None:
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type("photo.jpg", content_type)
    assert caught.value.status == 415
    assert f'content type "{content_type}" is not allowed' in caught.value.message


def test_extension_is_checked_before_mime() -> None:
    with pytest.raises(ClientError, match="file type"):
        imaging.check_name_and_type("x.exe", "text/html")


def test_rejected_message_does_not_echo_control_characters() -> None:
    with pytest.raises(ClientError) as caught:
        imaging.check_name_and_type("x.\x1b[31mred\n" + "a" * 500, None)
    assert caught.value.message.isprintable()
    assert len(caught.value.message) < 200


def test_rejected_survives_pickle() -> None:
    copy = pickle.loads(pickle.dumps(ClientError(413, "too big")))
    assert (copy.status, copy.message, str(copy)) == (413, "too big", "too big")


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
        (b"\xff\xd8\xff\xdb", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"),
        (b"\x89PNG\r\n\x1a", None),  # signature cut short
        (b"PNG\r\n\x1a\n\x00\x00", None),  # missing 0x89 (png-bad-signature.png)
        (b"\xff\xd8", None),
        (b"GIF89a\x01\x00", "gif"),
        (b"BM\x00\x00", None),
        (b"PK\x03\x04", None),
        (b"", None),
        (bytearray(b"\xff\xd8\xff\xe1"), "jpeg"),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    sniffed = formats.sniff(head)
    assert (sniffed.name if sniffed else None) == expected


# --- validation against the corpus ---------------------------------------------------------------


@pytest.mark.parametrize("name", _names("photos"))
def test_every_photo_validates_with_manifest_dimensions(name: str) -> None:
    row = _row("photos", name)
    fmt, _mode, width, height = _pillow13(row)
    info = imaging.validate_image(corpus_folder("photos") / name, MAX_PIXELS)
    assert (info.format, info.width, info.height) == (fmt.lower(), width, height)
    expected = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png")}[info.format]
    assert (info.ext, info.content_type) == expected


@pytest.mark.parametrize("name", _names("hostile"))
def test_hostile_file_validates_cleanly_or_is_rejected(name: str) -> None:
    row = _row("hostile", name)
    path = corpus_folder("hostile") / name
    try:
        info = imaging.validate_image(path, MAX_PIXELS)
    except ClientError as exc:
        print(f"{name}: rejected {exc.status}: {exc.message}")
        assert exc.status in CLIENT_STATUSES
        assert exc.message.strip()
        assert str(path.parent) not in exc.message  # no server path in a client message
        return

    print(f"{name}: validated as {info}")
    assert row["expected"] != "reject", f"{name} must be rejected ({row['what']})"
    # Consistent with a clean, full-scale decode by Pillow.
    with Image.open(path) as im:
        im.load()
        assert im.size == (info.width, info.height)
        assert {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}[im.format] == info.format
    if row["pillow13"].startswith("ok: "):
        assert (info.width, info.height) == _pillow13(row)[2:]
    # Whatever validates must also thumbnail and give JSON-safe EXIF.
    thumbs = imaging.render_thumbnails(path)
    assert set(thumbs) == set(imaging.THUMB_SIZES)
    json.dumps(imaging.extract_exif(path), allow_nan=False)


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("notimage-xlsx-as.png", 415),
        ("zero-length.jpeg", 415),
        ("bomb-gif-40k-frames.gif", 413),  # a GIF now: over MAX_FRAMES
        ("bomb-lottapixel-64250x64250.jpg", 413),
        ("bomb-spark-225000x225000.png", 413),
        ("jpeg-truncated-10000b.jpg", 400),
        ("jpeg-headers-only-ultrahdr.jpg", 400),
        ("png-truncated-mid-idat.png", 400),
        ("png-idat-bad-crc.png", 400),
        ("png-photo-1mb-iccp.png", 400),
    ],
)
def test_hostile_statuses(hostile: Path, name: str, status: int) -> None:
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(hostile / name, MAX_PIXELS)
    assert caught.value.status == status


def test_truncated_jpeg_is_caught_by_the_reduced_scale_decode(photos: Path, tmp_path: Path) -> None:
    data = (photos / "canon-eos20d-8mp.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(cut, MAX_PIXELS)
    assert caught.value.status == 400
    assert caught.value.message.startswith("image data is truncated or corrupt: ")
    assert str(tmp_path) not in caught.value.message


def test_unidentifiable_message_has_no_server_path(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(100))  # Pillow's message would name the file
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, MAX_PIXELS)
    assert caught.value.status == 400
    assert str(tmp_path) not in caught.value.message
    assert "cannot identify image file" in caught.value.message


# --- the pixel cap comes before any decoding ---------------------------------------------------


def _png_with_garbage_data(path: Path, width: int, height: int) -> None:
    """A PNG whose header is fine and whose image data cannot be decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"not zlib at all")
        + _png_chunk(b"IEND", b"")
    )


def test_pixel_cap_rejects_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    _png_with_garbage_data(path, 300, 200)
    # Under the cap the decode runs and fails: the file is really undecodable...
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, 60_000)
    assert caught.value.status == 400
    # ...so a 413 below the cap proves that no decoding happened before the check.
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, 59_999)
    assert caught.value.status == 413
    assert caught.value.message.startswith("image is 300x200 (0.1 megapixels), over the limit")


def test_pixel_cap_on_a_real_photo(photos: Path) -> None:
    path = photos / "xiaomi-mi9t-12mp-orient6.jpg"
    assert imaging.validate_image(path, 12_000_000).width == 4000  # exactly at the cap
    with pytest.raises(ClientError) as caught:
        imaging.validate_image(path, 11_999_999)
    assert caught.value.status == 413
    assert caught.value.message == (
        "image is 4000x3000 (12.0 megapixels), over the limit of 12 megapixels"
    )


# --- robustness: mangled files raise ClientError and nothing else ---------------------------------


def test_mangled_files_only_ever_raise_rejected(photos: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    originals = [
        (photos / "nikon-p6000-gps.jpg").read_bytes(),
        (photos / "png-palette-trns.png").read_bytes(),
        (photos / "png-gray8.png").read_bytes(),
    ]
    path = tmp_path / "mangled"
    outcomes = {"valid": 0, "rejected": 0}
    for original in originals:
        for _ in range(40):
            data = bytearray(original)
            if rng.random() < 0.5:
                data = data[: rng.randrange(1, len(data))]
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data))
            try:
                imaging.validate_image(path, MAX_PIXELS)
            except ClientError as exc:
                assert exc.status in CLIENT_STATUSES and exc.message
                outcomes["rejected"] += 1
                continue
            outcomes["valid"] += 1
            try:
                imaging.render_thumbnails(path)
            except ClientError as exc:
                assert exc.status == 400
            json.dumps(imaging.extract_exif(path), allow_nan=False)
    print(outcomes)
    assert outcomes["rejected"] > 0


# --- thumbnails ------------------------------------------------------------------------------


def _render(path: Path) -> dict[str, Image.Image]:
    return {name: _decoded(data) for name, data in imaging.render_thumbnails(path).items()}


def test_orientations_are_upright(photos: Path) -> None:
    upright = _render(photos / "orient1.jpg")
    assert upright["small"].size == (256, 171)
    assert upright["medium"].size == (768, 512)
    for n in range(2, 9):
        thumbs = _render(photos / f"orient{n}.jpg")
        for size in ("small", "medium"):
            assert thumbs[size].size == upright[size].size, (n, size)
            difference = _mean_difference(thumbs[size], upright[size])
            assert difference < 8, (n, size, difference)
    # The threshold tells orientations apart: every wrong one is far above it.
    for wrong in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180):
        assert _mean_difference(upright["small"].transpose(wrong), upright["small"]) > 40


def test_junk_orientation_does_not_crash(hostile: Path) -> None:
    thumbs = _render(hostile / "payload-php-in-exif.jpg")
    assert thumbs["medium"].size == (640, 356)  # smaller than the box: never enlarged, not rotated


@pytest.mark.parametrize("name", _names("photos"))
def test_thumbnails_fit_the_box_and_keep_the_aspect(name: str) -> None:
    path = corpus_folder("photos") / name
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
    rendered = imaging.render_thumbnails(path)
    assert list(rendered) == list(imaging.THUMB_SIZES)
    for size, box in imaging.THUMB_SIZES.items():
        assert rendered[size].startswith(b"\xff\xd8\xff")
        thumb = _decoded(rendered[size])
        assert thumb.mode in ("RGB", "L")
        if width <= box and height <= box:
            assert thumb.size == (width, height)  # never enlarged
        else:
            assert max(thumb.size) == box
            assert abs(thumb.width / thumb.height - width / height) < 2 / min(thumb.size)


def _exif_from_thumbnails(path: Path) -> None:
    for data in imaging.render_thumbnails(path).values():
        markers = _jpeg_markers(data)
        assert set(markers) <= {0xD8, 0xE0, 0xDB, 0xC0, 0xC4, 0xDA}, [hex(m) for m in markers]
        assert b"Exif" not in data and b"ICC_PROFILE" not in data
        assert not _decoded(data).getexif()


@pytest.mark.parametrize(
    "name",
    [
        "samsung-s7-12mp-gps-orient6.jpg",
        "iphone6plus-8mp-gps.jpg",
        "nikon-p6000-gps.jpg",
        "cmyk-adobe.jpg",
        "png-rgb-large-icc.png",
    ],
)
def test_thumbnails_carry_no_metadata(name: str) -> None:
    _exif_from_thumbnails(corpus_folder("photos") / name)


def test_payloads_do_not_survive_into_thumbnails(hostile: Path) -> None:
    for name in ("payload-php-in-exif.jpg", "polyglot-mp3-in-jpeg-com.jpg"):
        _exif_from_thumbnails(hostile / name)
        for data in imaging.render_thumbnails(hostile / name).values():
            assert b"<?php" not in data
    com = (hostile / "polyglot-mp3-in-jpeg-com.jpg").read_bytes()
    for data in imaging.render_thumbnails(hostile / "polyglot-mp3-in-jpeg-com.jpg").values():
        assert len(data) < len(com) // 4  # the 15 KB COM segment is gone


def _white_ratio(im: Image.Image) -> float:
    rgb = im.convert("RGB")
    white = sum(1 for pixel in rgb.get_flattened_data() if min(pixel) >= 245)
    return white / (rgb.width * rgb.height)


def test_alpha_is_flattened_onto_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (600, 400), (255, 0, 0, 0))  # red, fully transparent
    im.paste((0, 0, 255, 255), (0, 0, 300, 400))  # opaque blue left half
    im.paste((0, 0, 0, 128), (300, 0, 600, 200))  # half-transparent black top right
    path = tmp_path / "rgba.png"
    im.save(path)
    small = _decoded(imaging.render_thumbnails(path)["small"]).convert("RGB")
    assert small.size == (256, 171)
    r, g, b = small.getpixel((200, 150))  # transparent red: must be white, not red or black
    assert min(r, g, b) >= 245, (r, g, b)
    r, g, b = small.getpixel((60, 80))
    assert b > 200 and r < 40 and g < 40, (r, g, b)
    grey = small.getpixel((200, 30))  # 50% black on white
    assert all(110 <= c <= 145 for c in grey), grey


def _half_transparent(mode: str) -> tuple[Image.Image, dict[str, object]]:
    """64x64 in `mode`: left half opaque black, right half a colour marked transparent."""
    if mode == "LA":
        im = Image.new("LA", (64, 64), (90, 0))
        im.paste((0, 255), (0, 0, 32, 64))
        return im, {}
    if mode == "P":
        im = Image.new("P", (64, 64), 1)
        im.putpalette([0, 0, 0, 255, 0, 0])
        im.paste(0, (0, 0, 32, 64))
        return im, {"transparency": 1}
    colour = (255, 0, 0) if mode == "RGB" else 90
    im = Image.new(mode, (64, 64), colour)
    im.paste((0, 0, 0) if mode == "RGB" else 0, (0, 0, 32, 64))
    return im, {"transparency": colour}


@pytest.mark.parametrize("mode", ["P", "LA", "L", "RGB"])
def test_transparency_modes_are_flattened(tmp_path: Path, mode: str) -> None:
    im, options = _half_transparent(mode)
    path = tmp_path / f"{mode}.png"
    im.save(path, **options)
    thumb = _decoded(imaging.render_thumbnails(path)["small"]).convert("RGB")
    assert thumb.size == (64, 64)
    assert min(thumb.getpixel((60, 30))) >= 245  # the transparent colour became white
    assert max(thumb.getpixel((4, 30))) <= 10  # the opaque side stayed black


def test_corpus_alpha_and_palette_pngs(photos: Path) -> None:
    for name in ("png-rgba-drawing.png", "png-palette-trns.png"):
        thumb = _decoded(imaging.render_thumbnails(photos / name)["small"])
        assert thumb.mode == "RGB"
        # Both are mostly transparent background: flattened onto white, not black.
        assert _white_ratio(thumb) > 0.3, name


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    im = Image.new("I;16", (32, 32), 0x8000)  # mid grey in 16 bits
    path = tmp_path / "grey16.png"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    thumb = _decoded(imaging.render_thumbnails(path)["small"])
    assert 120 <= thumb.getpixel((16, 16)) <= 136


def test_cmyk_and_grey_photos(photos: Path) -> None:
    thumb = _decoded(imaging.render_thumbnails(photos / "cmyk-adobe.jpg")["small"])
    assert thumb.mode == "RGB" and thumb.size == (100, 100)
    with Image.open(photos / "cmyk-adobe.jpg") as im:
        reference = im.convert("RGB")
    assert _mean_difference(thumb, reference) < 10  # inverted or raw CMYK would be far off
    grey = _decoded(imaging.render_thumbnails(photos / "png-gray8.png")["medium"])
    assert grey.mode == "L" and grey.size == (450, 332)


def test_custom_sizes_and_one_decode(photos: Path) -> None:
    thumbs = imaging.render_thumbnails(photos / "orient1.jpg", {"tiny": 32, "big": 1000})
    assert list(thumbs) == ["tiny", "big"]
    assert _decoded(thumbs["tiny"]).size == (32, 21)
    assert _decoded(thumbs["big"]).size == (1000, 667)
    assert imaging.render_thumbnails(photos / "orient1.jpg", {}) == {}
    with pytest.raises(ValueError):
        imaging.render_thumbnails(photos / "orient1.jpg", {"zero": 0})


def test_thumbnails_of_an_undecodable_file_are_rejected(hostile: Path, tmp_path: Path) -> None:
    for name in ("jpeg-truncated-10000b.jpg", "notimage-xlsx-as.png", "png-idat-bad-adler.png"):
        with pytest.raises(ClientError) as caught:
            imaging.render_thumbnails(hostile / name)
        assert caught.value.status in (400, 413, 415)
    with pytest.raises(FileNotFoundError):  # a missing file is our bug, not the client's
        imaging.render_thumbnails(tmp_path / "missing.jpg")


def test_thread_pool_gives_the_same_results(photos: Path) -> None:
    names = ["orient6.jpg", "png-rgba-drawing.png", "cmyk-adobe.jpg", "nikon-p6000-gps.jpg"] * 3

    def work(name: str) -> tuple[imaging.ImageInfo, dict[str, bytes], str]:
        path = photos / name
        return (
            imaging.validate_image(path, MAX_PIXELS),
            imaging.render_thumbnails(path),
            json.dumps(imaging.extract_exif(path), sort_keys=True),
        )

    serial = [work(name) for name in names]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(work, names)) == serial


# --- EXIF ------------------------------------------------------------------------------------

GPS_PHOTOS = {
    "iphone6plus-8mp-gps.jpg": (51.48, -3.19),
    "nokia83-9mp-gps.jpg": (60.15, 24.91),
    "nikon-p6000-gps.jpg": (43.47, 11.89),
    "samsung-s7-12mp-gps-orient6.jpg": (37.79, -122.39),
}


@pytest.mark.parametrize("name", sorted(GPS_PHOTOS))
def test_gps_photos_give_signed_decimal_degrees(name: str) -> None:
    exif = imaging.extract_exif(corpus_folder("photos") / name)
    latitude, longitude = exif["latitude"], exif["longitude"]
    assert isinstance(latitude, float) and isinstance(longitude, float)
    assert -90 <= latitude <= 90 and -180 <= longitude <= 180
    assert (round(latitude, 2), round(longitude, 2)) == GPS_PHOTOS[name]
    assert latitude == round(latitude, 7)
    assert exif["GPSInfo"]["GPSLatitudeRef"] in ("N", "S")
    json.dumps(exif, allow_nan=False)


@pytest.mark.parametrize("name", ["leica-t-16mp-orient8-nangps.jpg", "motog9plus-16mp-nangps.jpg"])
def test_nan_gps_gives_valid_json_without_coordinates(name: str) -> None:
    exif = imaging.extract_exif(corpus_folder("photos") / name)
    text = json.dumps(exif, allow_nan=False)
    assert "NaN" not in text
    assert "latitude" not in exif and "longitude" not in exif
    assert "GPSInfo" in exif
    assert None in exif["GPSInfo"]["GPSLatitude"]


@pytest.mark.parametrize("name", _names("photos"))
def test_every_photo_gives_json_safe_exif(name: str) -> None:
    row = _row("photos", name)
    exif = imaging.extract_exif(corpus_folder("photos") / name)
    json.dumps(exif, allow_nan=False)
    assert "MakerNote" not in exif
    if "no EXIF" in row["pillow13"]:
        assert exif == {}
    else:
        assert exif
        if "Orientation=" in row["pillow13"]:
            assert exif["Orientation"] == int(row["pillow13"].split("Orientation=")[1][0])
        assert "ExifOffset" not in exif  # pointers are followed, not reported


def test_exif_of_known_camera(photos: Path) -> None:
    exif = imaging.extract_exif(photos / "canon-eos20d-8mp.jpg")
    assert exif["Make"] == "Canon" and exif["Model"] == "Canon EOS 20D"
    assert isinstance(exif["ExposureTime"], float)  # a rational
    assert isinstance(exif["ISOSpeedRatings"], int)  # ints stay ints
    assert exif["ExifVersion"] == b"0221".hex()  # bytes as hex


def test_hostile_exif_never_raises(hostile: Path) -> None:
    results = {}
    for row in manifest("hostile"):
        exif = imaging.extract_exif(hostile / row["file"])
        json.dumps(exif, allow_nan=False)
        results[row["file"]] = exif
    php = results["payload-php-in-exif.jpg"]
    assert php["Orientation"] == "<?php phpinfo(); ?>"  # kept as text, never used as a number
    assert results["exif-unparseable.jpg"] == {}
    assert results["notimage-xlsx-as.png"] == {}
    assert results["exif-corrupt-ifd-count.jpg"]  # partial, not empty


def test_exif_value_conversion(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010E] = "hello\x00\x00 "  # ImageDescription
    exif[0x0112] = 6
    exif[0x8769] = {
        0x927C: b"maker" * 10,  # MakerNote: dropped
        0x9286: b"A" * 2000,  # UserComment over 1 KiB: dropped
        0xA000: b"0100",  # FlashPixVersion: hex
        0x829A: IFDRational(1, 0),  # ExposureTime 1/0: not a number
        0x829D: IFDRational(28, 10),  # FNumber
    }
    exif[0x8825] = {
        1: "S",
        2: (IFDRational(33, 1), IFDRational(51, 1), IFDRational(3600, 100)),
        3: "W",
        4: (IFDRational(151, 1), IFDRational(12, 1), IFDRational(0, 1)),
        6: IFDRational(0, 0),
    }
    for suffix in ("jpg", "png"):  # PNG keeps EXIF in an eXIf chunk
        path = tmp_path / f"exif.{suffix}"
        Image.new("RGB", (40, 20), "red").save(path, exif=exif)
        result = imaging.extract_exif(path)
        json.dumps(result, allow_nan=False)
        assert result["ImageDescription"] == "hello"
        assert result["Orientation"] == 6
        assert "MakerNote" not in result and "UserComment" not in result
        assert result["FlashPixVersion"] == "30313030"
        assert result["ExposureTime"] is None
        assert result["FNumber"] == pytest.approx(2.8)
        assert result["GPSInfo"]["GPSLatitude"] == [33.0, 51.0, 36.0]
        assert result["GPSInfo"]["GPSAltitude"] is None
        assert (result["latitude"], result["longitude"]) == (-33.86, -151.2)
        # Orientation 6 applies to PNG too: stored 40x20, shown 10x20 in a 20 box.
        assert _decoded(imaging.render_thumbnails(path, {"t": 20})["t"]).size == (10, 20)


@pytest.mark.parametrize(
    "gps",
    [
        {2: (IFDRational(95, 1),), 1: "N", 4: (IFDRational(10, 1),), 3: "E"},  # latitude > 90
        {2: (IFDRational(45, 1),), 1: "X", 4: (IFDRational(10, 1),), 3: "E"},  # bad ref
        {2: (IFDRational(45, 1),), 4: (IFDRational(10, 1),), 3: "E"},  # no latitude ref
        {2: (IFDRational(45, 1),), 1: "N", 3: "E"},  # no longitude
        {2: (IFDRational(0, 0),) * 3, 1: "N", 4: (IFDRational(0, 0),) * 3, 3: "E"},  # NaN
    ],
)
def test_unusable_gps_gives_no_coordinates(tmp_path: Path, gps: dict[int, object]) -> None:
    exif = Image.Exif()
    exif[0x8825] = gps
    path = tmp_path / "gps.jpg"
    Image.new("RGB", (8, 8)).save(path, exif=exif)
    result = imaging.extract_exif(path)
    json.dumps(result, allow_nan=False)
    assert "GPSInfo" in result
    assert "latitude" not in result and "longitude" not in result


def test_exif_of_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert imaging.extract_exif(empty) == {}
    with pytest.raises(FileNotFoundError):  # a missing original is our bug: the job must fail
        imaging.extract_exif(tmp_path / "missing.jpg")
