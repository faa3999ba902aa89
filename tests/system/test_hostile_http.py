"""Hostile input against a real stack (API WORKER=off + one arq worker + Redis): every file of
the hostile corpus, and the HTTP surface spoken over raw sockets where an HTTP client would
refuse (odd file names, broken multipart framing, bodies that stop or crawl). Each gets a clear
4xx, a clean success, or a timeout/close; never a 5xx; no response ever shows a server path;
thumbnails carry no metadata; and the API and the worker stay up throughout."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from conftest import corpus_folder, manifest
from PIL import ExifTags, Image
from procs import Proc, db_rows, redis_server, redis_server_path, start_api, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.redis]

REQUEST_TIMEOUT = 2.0  # longest silence from a client
UPLOAD_TIMEOUT = 4.0  # longest whole upload body
MAX_UPLOAD = 8_000_000
BOUNDARY = b"hostileboundary"


@dataclass
class Stack:
    api: Proc
    worker: Proc
    env: dict[str, str]
    root: Path
    secrets: list[str] = field(default_factory=list)  # strings no response may contain

    @property
    def port(self) -> int:
        return int(self.api.url.rsplit(":", 1)[1])

    @property
    def media(self) -> Path:
        return Path(self.env["MEDIA_DIR"])

    def rows(self, sql: str) -> list[sqlite3.Row]:
        return db_rows(self.env["DB_PATH"], sql)

    def assert_no_path(self, *texts: str | bytes) -> None:
        for text in texts:
            shown = text.decode("latin-1") if isinstance(text, bytes) else text
            for secret in self.secrets:
                assert secret not in shown, f"a response shows a server path ({secret!r})"

    def assert_up(self) -> None:
        res = httpx.get(self.api.url + "/healthz", timeout=10)
        assert res.status_code == 200, res.text
        assert self.worker.popen.poll() is None, "worker died:\n" + self.worker.output()[-3000:]


@contextlib.contextmanager
def redis_url_for(workdir: Path) -> Iterator[str]:
    """A private redis-server when one is installed, else IMGAPI_TEST_REDIS_URL (DB 12)."""
    if redis_server_path() is not None:
        with redis_server(workdir) as server:
            yield server.url
        return
    base = os.environ.get("IMGAPI_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
    url = base if base.count("/") > 2 else base + "/12"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        message = f"no redis-server installed and no Redis at {url} ({exc})"
        if os.environ.get("IMGAPI_REDIS_REQUIRED") == "1":
            pytest.fail(message + " and IMGAPI_REDIS_REQUIRED=1")
        pytest.skip(message)
    yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("hostile-http")
    with redis_url_for(root / "redis") as redis_url:
        env = {
            "DB_PATH": str(root / "data" / "imgapi.db"),
            "MEDIA_DIR": str(root / "media"),
            "REDIS_URL": redis_url,
            "WORKER": "off",
            "ARQ_QUEUE": f"imgapi-test:{uuid.uuid4().hex}",
            "CAPTION_MODEL": "none",
            "UPLOAD_RATE_LIMIT": "0",
            "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
            "UPLOAD_TIMEOUT": str(UPLOAD_TIMEOUT),
            "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "SWEEP_SECONDS": "0.2",
            "JOB_LEASE_SECONDS": "3",
            "LOG_LEVEL": "info",
        }
        api = start_api(env, root / "api.log")
        worker = start_worker(env, root / "worker.log")
        secrets = [str(root), str(root.resolve()), env["MEDIA_DIR"], env["DB_PATH"]]
        # The temp file name of an upload, should an error message carry it without its folder.
        secrets.append(f"upload-{socket.gethostname()}-")
        try:
            yield Stack(api, worker, env, root, secrets)
        finally:
            worker.kill()
            api.kill()


def wait_jobs_finished(stack: Stack, within: float = 60) -> None:
    deadline = time.monotonic() + within
    sql = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
    while stack.rows(sql)[0][0]:
        assert time.monotonic() < deadline, "jobs still open"
        time.sleep(0.1)


def assert_clear_rejection(res: httpx.Response) -> None:
    assert 400 <= res.status_code < 500, (res.status_code, res.text)
    body = res.json()
    assert body["status"] == "failed", body
    assert isinstance(body["error"], str) and len(body["error"]) > 5, body
    assert "Traceback" not in body["error"]


def assert_no_metadata(thumb: bytes) -> None:
    assert thumb.startswith(b"\xff\xd8\xff")
    for marker in (b"Exif\x00\x00", b"http://ns.adobe.com/xap", b"ICC_PROFILE", b"<?php"):
        assert marker not in thumb, marker
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == "JPEG"
        assert not im.getexif(), dict(im.getexif())
        for key in ("exif", "icc_profile", "comment", "xmp", "dpi"):
            assert key not in im.info, key


# -- the hostile corpus ------------------------------------------------------------------------


def test_every_hostile_file(stack: Stack) -> None:
    folder = corpus_folder("hostile")
    problems: list[str] = []
    accepted: dict[str, dict] = {}
    with httpx.Client(base_url=stack.api.url, timeout=60) as http:
        for entry in manifest("hostile"):
            name = entry["file"]
            data = (folder / name).read_bytes()
            res = http.post("/api/images", files={"file": (name, data, "application/octet-stream")})
            stack.assert_no_path(res.text, str(res.headers))
            if res.status_code == 201:
                accepted[name] = res.json()["data"]
                continue
            try:
                assert_clear_rejection(res)
            except AssertionError as exc:
                problems.append(f"{name}: {exc}")
        assert not problems, "\n".join(problems)

        wait_jobs_finished(stack)
        stack.assert_up()
        for name, data in accepted.items():
            record = http.get(f"/api/images/{data['image_id']}")
            assert record.status_code == 200
            stack.assert_no_path(record.text)
            jobs = record.json()["data"]["jobs"]
            for kind in ("thumbnail", "exif"):
                job = jobs[kind]
                assert job["state"] in ("done", "failed"), (name, kind, job)
                if job["state"] == "failed":
                    assert job.get("error"), (name, kind, job)
            for size in ("small", "medium"):
                res = http.get(f"/api/images/{data['image_id']}/thumbnails/{size}")
                stack.assert_no_path(res.text if res.status_code != 200 else "", str(res.headers))
                if res.status_code == 200:
                    assert_no_metadata(res.content)
                else:
                    assert_clear_rejection(res)
    # Either verdict is allowed; how it compares with the corpus's own verdicts is reported.
    expected = {e["file"]: e["expected"] for e in manifest("hostile")}
    differ = sorted(n for n in expected if (n in accepted) != (expected[n] == "valid"))
    print(
        f"RELIABILITY hostile corpus: {len(accepted)} accepted, "
        f"{len(expected) - len(accepted)} rejected with a 4xx, 0 5xx; "
        f"verdicts differing from MANIFEST.tsv: {differ or 'none'}"
    )


def test_thumbnails_carry_no_exif_or_gps(stack: Stack) -> None:
    photos = corpus_folder("photos")
    hostile = corpus_folder("hostile")
    sources = [
        photos / "nikon-p6000-gps.jpg",
        hostile / "exif-64kb-app1-8x8.jpg",
        hostile / "payload-php-in-exif.jpg",
    ]
    made = io.BytesIO()
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "imgapi-test"
    exif[ExifTags.IFD.GPSInfo] = {1: "S", 2: (33.0, 51.0, 54.0), 3: "E", 4: (151.0, 12.0, 36.0)}
    Image.new("RGB", (900, 600), (90, 140, 30)).save(
        made, "JPEG", exif=exif, comment=b"<?php echo 1; ?>", icc_profile=b"ICC_PROFILE" * 10
    )
    uploads = [(p.name, p.read_bytes()) for p in sources] + [("made-gps.jpg", made.getvalue())]
    with httpx.Client(base_url=stack.api.url, timeout=60) as http:
        ids = []
        for name, data in uploads:
            res = http.post("/api/images", files={"file": (name, data, "image/jpeg")})
            assert res.status_code == 201, res.text
            ids.append(res.json()["data"]["image_id"])
            # Asked at once: rendered on demand, or by the worker if it was quicker.
            thumb = http.get(f"/api/images/{ids[-1]}/thumbnails/small")
            assert thumb.status_code == 200, thumb.text
            assert_no_metadata(thumb.content)
        wait_jobs_finished(stack)
        with_gps = 0
        for image_id in ids:
            record = http.get(f"/api/images/{image_id}").json()["data"]
            with_gps += "GPSInfo" in (record["metadata"]["exif"] or {})
            for size in ("small", "medium"):
                thumb = http.get(f"/api/images/{image_id}/thumbnails/{size}")
                assert thumb.status_code == 200
                assert thumb.headers["content-type"] == "image/jpeg"
                assert_no_metadata(thumb.content)
    assert with_gps >= 3, "the originals did carry GPS, and their records show it"


# -- the HTTP surface over raw sockets ----------------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes
    seconds: float


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def part(name: bytes, data: bytes, filename: bytes | None = None) -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return b"--" + BOUNDARY + b"\r\n" + disposition + b"\r\nContent-Type: image/jpeg\r\n\r\n" + data


def form(*parts: bytes, boundary: bytes = BOUNDARY) -> bytes:
    return b"\r\n".join(parts) + b"\r\n--" + boundary + b"--\r\n"


def head(
    length: int,
    content_type: bytes | None = b"multipart/form-data; boundary=" + BOUNDARY,
    path: bytes = b"/api/images",
) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Length: %d" % length]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def read_reply(reader: asyncio.StreamReader, began: float, within: float) -> Reply:
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    except (asyncio.IncompleteReadError, ConnectionError):
        return Reply(None, {}, b"", time.monotonic() - began)
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), within)
    return Reply(int(status_line.split()[1]), headers, body, time.monotonic() - began)


async def exchange(stack: Stack, request: bytes, within: float = 15) -> Reply:
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    try:
        writer.write(request)
        await writer.drain()
        reply = await read_reply(reader, began, within)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    stack.assert_no_path(str(reply.headers), reply.body)
    return reply


async def upload_raw(stack: Stack, body: bytes, **head_args: bytes | None) -> Reply:
    return await exchange(stack, head(len(body), **head_args) + body)


def assert_4xx(reply: Reply, *words: str) -> dict:
    assert reply.status is not None and 400 <= reply.status < 500, reply
    assert reply.headers.get("content-type") == "application/json", reply.headers
    body = json.loads(reply.body)
    assert body["status"] == "failed" and body["error"], body
    for word in words:
        assert word in body["error"], (word, body["error"])
    return body


def assert_201_or_4xx(reply: Reply) -> dict:
    assert reply.status == 201 or (reply.status is not None and 400 <= reply.status < 500), reply
    return json.loads(reply.body)


@pytest.mark.parametrize(
    "filename",
    [
        b"../../../../etc/cron.d/evil.jpg",
        b"..\\..\\..\\windows\\evil.jpg",
        b"/etc/passwd.jpg",
        b"a\x00b.jpg",
        b"nul-then-ext.php\x00.jpg",
        b"\xff\xfe\xfd broken utf-8 \xc3\x28.jpg",
        b"x" * 996 + b".jpg",
        b"%2e%2e%2fencoded.jpg",
    ],
    ids=["dotdot", "backslash", "absolute", "nul", "nul-ext", "non-utf8", "1000-chars", "encoded"],
)
async def test_hostile_file_names(stack: Stack, filename: bytes) -> None:
    before = set(os.listdir(stack.root))
    reply = await upload_raw(stack, form(part(b"file", jpeg_bytes(), filename)))
    body = assert_201_or_4xx(reply)
    if reply.status == 201:
        data = body["data"]
        name = data["original_name"]
        assert "\x00" not in name and len(name) <= 255, name
        stored = list((stack.media / "originals").glob(data["image_id"] + ".*"))
        assert [p.name for p in stored] == [data["image_id"] + ".jpg"]
        assert reply.headers["location"] == f"/api/images/{data['image_id']}"
    else:
        assert_4xx(reply)
    # Nothing was written anywhere the client's name points to.
    assert set(os.listdir(stack.root)) == before
    assert not Path("/etc/cron.d/evil.jpg").exists()
    assert all(len(p.stem) == 24 for p in (stack.media / "originals").iterdir())
    stack.assert_up()


async def test_crlf_in_file_name_injects_nothing(stack: Stack) -> None:
    name = b"a.jpg\r\nX-Injected: yes\r\nSet-Cookie: pwned=1"
    reply = await upload_raw(stack, form(part(b"file", jpeg_bytes(), name)))
    assert_201_or_4xx(reply)
    assert "x-injected" not in reply.headers and "set-cookie" not in reply.headers
    stack.assert_up()


async def test_missing_file_field(stack: Stack) -> None:
    reply = await upload_raw(stack, form(part(b"photo", jpeg_bytes(), b"a.jpg")))
    assert_4xx(reply, "file")
    reply = await upload_raw(stack, form())
    assert_4xx(reply)
    stack.assert_up()


async def test_two_file_fields(stack: Stack) -> None:
    data = jpeg_bytes()
    reply = await upload_raw(
        stack, form(part(b"file", data, b"a.jpg"), part(b"file", data, b"b.jpg"))
    )
    assert_4xx(reply, "more than one")
    assert list((stack.media / "tmp").iterdir()) == []
    stack.assert_up()


async def test_thousands_of_tiny_parts(stack: Stack) -> None:
    parts = [part(b"f%d" % i, b"x") for i in range(5000)]
    reply = await upload_raw(stack, form(part(b"file", jpeg_bytes(), b"a.jpg"), *parts))
    assert_4xx(reply, "parts")
    stack.assert_up()


@pytest.mark.parametrize(
    "content_type",
    [None, b"application/json", b"text/plain", b"application/x-www-form-urlencoded"],
    ids=["none", "json", "text", "urlencoded"],
)
async def test_not_multipart(stack: Stack, content_type: bytes | None) -> None:
    reply = await upload_raw(stack, b'{"file": "x.jpg"}', content_type=content_type)
    assert_4xx(reply)
    assert reply.status == 415, reply
    stack.assert_up()


async def test_wrong_or_missing_boundary(stack: Stack) -> None:
    body = form(part(b"file", jpeg_bytes(), b"a.jpg"))
    reply = await upload_raw(stack, body, content_type=b"multipart/form-data; boundary=other")
    assert_4xx(reply)
    reply = await upload_raw(stack, body, content_type=b"multipart/form-data")
    assert_4xx(reply, "boundary")
    reply = await upload_raw(
        stack, body, content_type=b"multipart/form-data; boundary=" + b"b" * 300
    )
    assert_4xx(reply)
    stack.assert_up()


async def test_body_stops_mid_stream(stack: Stack) -> None:
    """The client sends a third of the body and closes the connection."""
    failed = "SELECT count(*) FROM images WHERE error IS NOT NULL"
    before = stack.rows(failed)[0][0]
    body = form(part(b"file", b"\xff\xd8\xff" + b"\x00" * 300_000, b"a.jpg"))
    _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(head(len(body)) + body[: len(body) // 3])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    # The failure is recorded and the temp file removed.
    deadline = time.monotonic() + 10
    while stack.rows(failed)[0][0] == before or list((stack.media / "tmp").iterdir()):
        assert time.monotonic() < deadline, "no failure recorded, or a temp file left"
        await asyncio.sleep(0.1)
    stack.assert_up()


async def test_stalled_body_times_out(stack: Stack) -> None:
    """Content-Length promises more than is sent, then the client waits: REQUEST_TIMEOUT ends it
    with a 4xx (408) or a close, never a 5xx and never only after minutes."""
    body = form(part(b"file", b"\xff\xd8\xff" + b"\x00" * 10_000, b"a.jpg"))
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    reply: Reply | None = None
    try:
        writer.write(head(len(body) + 100_000) + body[:-200])
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            reply = await read_reply(reader, began, REQUEST_TIMEOUT + 8)
    finally:
        writer.close()
    assert reply is not None, f"no answer and no close {REQUEST_TIMEOUT + 8:.0f}s after the stall"
    assert reply.status in (None, 408), reply
    stack.assert_no_path(reply.body)
    await asyncio.sleep(0.5)
    assert list((stack.media / "tmp").iterdir()) == []
    stack.assert_up()


async def test_slow_client_is_cut_off(stack: Stack) -> None:
    """A client trickling its body a few bytes at a time, never silent for REQUEST_TIMEOUT, gets
    a 408 or a close once the body has taken UPLOAD_TIMEOUT."""
    body = form(part(b"file", b"\xff\xd8\xff" + b"\x00" * 100_000, b"a.jpg"))
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(head(len(body)) + body[:200])
    await writer.drain()
    limit = UPLOAD_TIMEOUT + 6
    reply: Reply | None = None
    sent = 200
    try:
        while time.monotonic() - began < limit:
            with contextlib.suppress(TimeoutError):
                reply = await read_reply(reader, began, 0.25)
                break
            try:
                writer.write(body[sent : sent + 4])
                await writer.drain()
            except ConnectionError:
                reply = Reply(None, {}, b"", time.monotonic() - began)
                break
            sent += 4
    finally:
        writer.close()
    assert reply is not None, f"still connected {limit:.0f}s into a trickled upload"
    assert reply.status in (None, 408), reply
    stack.assert_no_path(reply.body)
    stack.assert_up()


async def test_body_far_over_the_cap(stack: Stack) -> None:
    """32 MB against an 8 MB cap: a 413 or a close, nothing stored, the service up."""
    originals = len(list((stack.media / "originals").iterdir()))
    size = 4 * MAX_UPLOAD
    chunk = b"\x00" * 65536
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    prefix = part(b"file", b"\xff\xd8\xff", b"big.jpg")
    writer.write(head(len(prefix) + size + len(BOUNDARY) + 8) + prefix)
    reply: Reply | None = None
    try:
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        reply = Reply(None, {}, b"", time.monotonic() - began)
    if reply is None:
        reply = await read_reply(reader, began, 15)
    writer.close()
    assert reply.status in (None, 413), reply
    if reply.status == 413:
        assert_4xx(reply, "larger than")
    assert len(list((stack.media / "originals").iterdir())) == originals
    stack.assert_up()
