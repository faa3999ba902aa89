"""Property-based fuzzing of a real API process (mode 1: jobs in the API process, so accepted
fuzz also goes through thumbnails and EXIF): uploads of valid JPEG and PNG bytes with random
damage under any file name, valid multipart bodies with damaged framing, and the list endpoint's
query parameters. Text is drawn from all of Unicode (surrogates included, sent as the bytes
Python's "surrogatepass" gives), not only ASCII. The property: never a 5xx, always the JSON answer
shape, and the service (and its jobs) still fine afterwards."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageDraw
from procs import Proc, db_rows, settings_for, start_api

pytestmark = [pytest.mark.slow]

# About 5 ms per example here: the four tests together take some 25 s on 2 busy cores.
IMAGE_EXAMPLES = 1500
FRAMING_EXAMPLES = 1000
NAME_EXAMPLES = 400
QUERY_EXAMPLES = 600

# Any code point, not only ASCII: "²".isdigit() is true, int("²") raises; the fuzz missed that
# while its text was ASCII.
any_text = st.text(st.characters(), max_size=40)


def wire(text: str) -> bytes:
    """Text as the bytes a client sends: UTF-8, lone surrogates too (as invalid UTF-8)."""
    return text.encode("utf-8", "surrogatepass")


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def seed_jpeg() -> bytes:
    image = Image.new("RGB", (96, 64), (30, 90, 200))
    ImageDraw.Draw(image).rectangle((10, 10, 60, 40), fill=(250, 200, 0))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "fuzz"
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (1.0, 2.0, 3.0), 3: "W", 4: (4.0, 5.0, 6.0)}
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80, exif=exif)
    return buffer.getvalue()


def seed_progressive_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (70, 50), 128).save(buffer, "JPEG", progressive=True)
    return buffer.getvalue()


def seed_png() -> bytes:
    image = Image.new("RGBA", (48, 40), (0, 120, 60, 128))
    ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill=(255, 0, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    # A tEXt chunk before IEND, so chunk-level damage has metadata to land in.
    text = b"Comment\x00fuzz"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return data[:-12] + chunk + data[-12:]


SEEDS = {"jpeg": seed_jpeg(), "progressive": seed_progressive_jpeg(), "png": seed_png()}


@st.composite
def damaged(draw: st.DrawFn, data: bytes, keep: int = 0) -> bytes:
    """`data` with one to four random edits: bit flips, overwrites, inserts, cuts, truncation.
    Most of the time the first `keep` bytes (the magic number) are left alone, so that the damage
    reaches the decoders rather than the cheap signature check."""
    out = bytearray(data)
    low = draw(st.sampled_from([keep, keep, keep, 0]))
    for _ in range(draw(st.integers(1, 4))):
        if len(out) <= low:
            break
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "dup"]))
        at = draw(st.integers(low, len(out) - 1))
        if kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=16))
            out[at : at + len(patch)] = patch
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del out[at:]
        else:
            length = draw(st.integers(1, 128))
            out[at:at] = out[at : at + length]
    return bytes(out)


@dataclass
class Live:
    api: Proc
    env: dict[str, str]
    statuses: dict[int, int]

    def open_jobs(self) -> int:
        return db_rows(
            self.env["DB_PATH"], "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
        )[0][0]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("fuzz")
    env = settings_for(root, MAX_UPLOAD_BYTES="1000000", MAX_PIXELS="4000000", REQUEST_TIMEOUT="5")
    api = start_api(env, root / "api.log")
    try:
        yield Live(api, env, {})
    finally:
        api.kill()


@pytest.fixture(scope="module")
def http(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.api.url, timeout=30) as client:
        yield client


def check_answer(live: Live, res: httpx.Response) -> None:
    live.statuses[res.status_code] = live.statuses.get(res.status_code, 0) + 1
    assert res.status_code < 500, (res.status_code, res.text[:500])
    assert res.headers["content-type"] == "application/json", res.headers
    body = res.json()
    if res.status_code == 201:
        assert body["status"] == "success" and body["error"] is None
    else:
        assert 400 <= res.status_code < 500, res.status_code
        assert body["status"] == "failed" and isinstance(body["error"], str) and body["error"]


def form_quoted(name: bytes) -> bytes:
    """A file name escaped as browsers and httpx do in a quoted multipart parameter."""
    return name.replace(b"\r", b"%0D").replace(b"\n", b"%0A").replace(b'"', b"%22")


@fuzz_settings(IMAGE_EXAMPLES)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    data=st.data(),
    # Half of the names and most types pass the cheap checks, so that most damage is decoded.
    name=st.one_of(
        st.sampled_from(["a.jpg", "a.png", "a.jpeg", "a.JPG", "a.jpg", "a.png", "a.gif", "x"]),
        st.tuples(any_text, st.sampled_from(["", ".jpg", ".png"])).map("".join),
    ),
    content_type=st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", ""]),
)
def test_damaged_images_never_5xx(
    live: Live, http: httpx.Client, seed: str, data: st.DataObject, name: str, content_type: str
) -> None:
    body = data.draw(damaged(SEEDS[seed], keep=8 if seed == "png" else 3))
    boundary = b"fuzz-image-boundary"
    upload = multipart(
        boundary, body, form_quoted(wire(name)), content_type=content_type.encode() or None
    )
    res = http.post(
        "/api/images",
        content=upload,
        headers={"Content-Type": b"multipart/form-data; boundary=" + boundary},
    )
    check_answer(live, res)


def multipart(
    boundary: bytes,
    payload: bytes,
    filename: bytes = b"a.jpg",
    extra: bytes = b"",
    content_type: bytes | None = b"image/jpeg",
) -> bytes:
    """One `file` part; `extra` goes at the end of its Content-Disposition."""
    head = b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"' + extra
    if content_type is not None:
        head += b"\r\nContent-Type: " + content_type
    return (
        b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + payload + b"\r\n--" + boundary + b"--\r\n"
    )


# RFC 5987 `filename*`: the charsets it allows, Python codecs it does not (some refuse
# errors="replace", some are not text codecs), and any text at all.
star_charset = st.one_of(
    st.sampled_from(
        [b"UTF-8", b"utf-8", b"ISO-8859-1", b"latin1", b"", b"idna", b"utf-16", b"rot13"]
    ),
    any_text.map(wire),
)


@fuzz_settings(NAME_EXAMPLES)
@given(
    filename=st.one_of(st.none(), st.binary(max_size=40), any_text.map(wire)),
    charset=star_charset,
    language=st.sampled_from([b"", b"en", b"x'y"]),
    name=any_text.map(wire),
    percent_encoded=st.booleans(),
)
def test_file_names_never_5xx(
    live: Live,
    http: httpx.Client,
    filename: bytes | None,
    charset: bytes,
    language: bytes,
    name: bytes,
    percent_encoded: bool,
) -> None:
    """An intact body whose Content-Disposition carries an RFC 5987 `filename*` in any charset
    (`idna` was a 500), with or without a plain `filename`."""
    value = quote(name).encode() if percent_encoded else name.replace(b";", b"")
    star = charset + b"'" + language + b"'" + value
    disposition = b'form-data; name="file"'
    if filename is not None:
        disposition += b'; filename="' + form_quoted(filename) + b'"'
    disposition += b"; filename*=" + star.replace(b"\r", b"").replace(b"\n", b"")
    boundary = b"fuzz-name-boundary"
    body = (
        b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        b"Content-Type: image/jpeg\r\n\r\n" + SEEDS["jpeg"] + b"\r\n--" + boundary + b"--\r\n"
    )
    res = http.post(
        "/api/images",
        content=body,
        headers={"Content-Type": b"multipart/form-data; boundary=" + boundary},
    )
    check_answer(live, res)


@fuzz_settings(FRAMING_EXAMPLES)
@given(
    data=st.data(),
    boundary=st.binary(min_size=1, max_size=80).filter(lambda b: b"\r" not in b),
    header_boundary=st.one_of(st.none(), st.binary(min_size=0, max_size=80), any_text.map(wire)),
    quoted=st.booleans(),
    extra=st.sampled_from(["", "; charset=utf-8", "; boundary=second", ";;", "; x"]),
    mime=st.sampled_from(["multipart/form-data", "MULTIPART/FORM-DATA", "multipart/mixed"]),
    filename=st.one_of(st.binary(max_size=40), any_text.map(wire)),
    star=st.one_of(st.none(), st.tuples(star_charset, any_text.map(wire))),
    where=st.sampled_from(["head", "tail", "anywhere", "none"]),
)
def test_damaged_multipart_framing_never_5xx(
    live: Live,
    http: httpx.Client,
    data: st.DataObject,
    boundary: bytes,
    header_boundary: bytes | None,
    quoted: bool,
    extra: str,
    mime: str,
    filename: bytes,
    star: tuple[bytes, bytes] | None,
    where: str,
) -> None:
    """The boundary (in the header and in the body, equal or not), the Content-Type around it,
    the part's file name (plain and RFC 5987 `filename*`) and the framing bytes themselves are
    all fuzzed."""
    star_param = b""
    if star is not None:
        charset, name = star
        star_param = b"; filename*=" + charset + b"''" + quote(name).encode()
    body = multipart(
        boundary,
        SEEDS["jpeg"],
        filename.replace(b'"', b"").replace(b"\r", b""),
        extra=star_param.replace(b"\r", b"").replace(b"\n", b""),
    )
    if where != "none":
        # The damage lands in the framing: the first 150 bytes, the last 60, or anywhere.
        start, end = {"head": (0, 150), "tail": (-60, None), "anywhere": (0, None)}[where]
        region = body[start:end]
        region = data.draw(damaged(region)) if region else region
        body = body[:start] + region + (body[end:] if end is not None else b"")
    value = boundary if header_boundary is None else header_boundary
    if quoted:
        value = b'"' + value.replace(b'"', b"") + b'"'
    content_type = mime.encode() + b"; boundary=" + value + extra.encode()
    # httpx (h11) sends no control characters and no whitespace at either end of a header value;
    # other bytes go as they are, non-ASCII included.
    raw_type = bytes(b for b in content_type if b == 9 or 32 <= b != 127).strip(b" \t")
    try:
        res = http.post("/api/images", content=body, headers={"Content-Type": raw_type})
    except httpx.RemoteProtocolError as exc:
        pytest.fail(f"the server dropped the connection: {exc}")
    check_answer(live, res)


# The list's query parameters: any text (percent-encoded UTF-8), any bytes, digits of every
# script, and cursors that decode (base64 of any bytes) so that the store sees them too.
query_value = st.one_of(
    st.none(),
    any_text.map(wire),
    st.binary(max_size=40),
    st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6).map(wire),
    st.integers(-5, 10**6).map(lambda n: str(n).encode()),
)
cursor_value = st.one_of(
    query_value,
    st.binary(max_size=80).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")),
    st.tuples(any_text, any_text).map(
        lambda t: base64.urlsafe_b64encode(wire(t[0]) + b"|" + wire(t[1])).rstrip(b"=")
    ),
)


@fuzz_settings(QUERY_EXAMPLES)
@given(
    limit=query_value,
    status=st.one_of(query_value, st.sampled_from([b"success", b"failed", b"SUCCESS"])),
    cursor=cursor_value,
    repeat=st.booleans(),
)
def test_list_query_never_5xx(
    live: Live,
    http: httpx.Client,
    limit: bytes | None,
    status: bytes | None,
    cursor: bytes | None,
    repeat: bool,
) -> None:
    pairs = [(k, v) for k, v in (("limit", limit), ("status", status), ("cursor", cursor)) if v]
    if repeat:
        pairs += pairs  # each parameter twice
    query = "&".join(f"{key}={quote(value, safe='')}" for key, value in pairs)
    res = http.get(f"/api/images?{query}")
    live.statuses[res.status_code] = live.statuses.get(res.status_code, 0) + 1
    assert res.status_code in (200, 400), (query, res.status_code, res.text[:500])
    assert res.headers["content-type"] == "application/json", res.headers
    if res.status_code == 200:
        assert isinstance(res.json(), list)
    else:
        body = res.json()
        assert body["status"] == "failed" and body["data"] is None and body["error"], body


def test_service_fine_after_fuzzing(live: Live, http: httpx.Client) -> None:
    """Runs after the fuzz tests (file order): every job of what they got accepted finished,
    the API is alive and healthy, and nothing reached its unhandled-error path."""
    deadline = time.monotonic() + 60
    while live.open_jobs():
        assert time.monotonic() < deadline, "jobs of fuzzed uploads still open after 60 s"
        time.sleep(0.2)
    assert live.api.popen.poll() is None
    assert http.get("/healthz").status_code == 200
    assert "unhandled error" not in live.api.output()
    print(f"RELIABILITY fuzz answers by status: {dict(sorted(live.statuses.items()))}")
