"""Uploads against a real API process (`python imgapi.py`) over raw sockets, where what matters
is the bytes on the wire or a real shutdown: `Expect: 100-continue` with a body over the cap is
answered 413 without a `100 Continue` first, and an upload cut short by SIGTERM is recorded as
interrupted by the shutdown."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from procs import REPO, Proc, db_rows, free_port, service_env, settings_for, start_api, wait_until

from imgapi_core.uploads import OVERHEAD

pytestmark = [pytest.mark.slow]

MAX_UPLOAD = 100_000
BOUNDARY = b"upload-http-boundary"
MULTIPART_TYPE = b"multipart/form-data; boundary=" + BOUNDARY


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def part_head(filename: bytes = b"photo.jpg") -> bytes:
    return (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )


def form(data: bytes, filename: bytes = b"photo.jpg") -> bytes:
    return part_head(filename) + data + b"\r\n--" + BOUNDARY + b"--\r\n"


def request_head(length: int, *extra: bytes, content_type: bytes = MULTIPART_TYPE) -> bytes:
    lines = [
        b"POST /api/images HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Length: %d" % length,
        b"Content-Type: " + content_type,
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def read_until_closed(sock: socket.socket, within: float = 15) -> bytes:
    """Everything the server sends until it closes the connection (or `within` passes)."""
    sock.settimeout(within)
    received = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    return received


def split_reply(raw: bytes) -> tuple[dict[str, str], dict]:
    """The headers and the JSON body of one answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return headers, json.loads(body[: int(headers["content-length"])])


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {head!r}"
        head += byte
    return head


@dataclass
class Api:
    proc: Proc
    env: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.proc.url.rsplit(":", 1)[1])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=15)

    def failures(self) -> dict[str, tuple]:
        rows = db_rows(
            self.env["DB_PATH"],
            "SELECT images.image_id, original_name, error, status FROM images"
            " JOIN stats USING (image_id) WHERE error IS NOT NULL",
        )
        return {row[0]: tuple(row[1:]) for row in rows}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("upload-http")
    env = settings_for(root, MAX_UPLOAD_BYTES=str(MAX_UPLOAD), REQUEST_TIMEOUT="10")
    proc = start_api(env, root / "api.log")
    try:
        yield Api(proc, env)
    finally:
        proc.kill()


# -- Expect: 100-continue ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [MAX_UPLOAD + OVERHEAD + 1, 10 * MAX_UPLOAD, 10**15],
    ids=["just-over", "over-request-max-size", "petabyte"],
)
def test_expect_continue_over_the_cap_is_413_without_100_continue(api: Api, length: int) -> None:
    """Sanic sent `100 Continue` in front of the 413 (the client, told to go ahead, then sent the
    whole body for nothing). Now the 413 comes alone, the connection closes, and the failure is
    recorded."""
    before = api.failures()
    with api.connect() as sock:
        sock.sendall(request_head(length, b"Expect: 100-continue"))
        raw = read_until_closed(sock)  # the body is never sent: no go-ahead came
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    assert b"100 Continue" not in raw, raw[:200]
    headers, body = split_reply(raw)
    assert headers["connection"] == "close", headers
    assert headers["content-type"] == "application/json"
    assert body["status"] == "failed" and str(MAX_UPLOAD) in body["error"], body
    image_id = body["data"]["image_id"]
    after = api.failures()
    assert set(after) - set(before) == {image_id}
    assert after[image_id] == ("", body["error"], 0)


def test_expect_continue_with_a_body_that_is_not_multipart_is_refused_without_100(api: Api) -> None:
    with api.connect() as sock:
        sock.sendall(request_head(1000, b"Expect: 100-continue", content_type=b"text/plain"))
        raw = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 415 "), raw[:200]
    assert b"100 Continue" not in raw


def test_expect_continue_within_the_cap_gets_100_continue_then_201(api: Api) -> None:
    body = form(jpeg_bytes())
    with api.connect() as sock:
        sock.sendall(request_head(len(body), b"Expect: 100-continue"))
        assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 201 "), head


# -- shutdown during an upload -------------------------------------------------------------------

# `python imgapi.py` with what app.py is to gain: before_server_stop tells the pipeline that the
# server is stopping, and the pipeline is drained before close_resources closes the store (Sanic
# runs after_server_stop listeners in reverse order: this one first). With those lines in app.py
# this is plain imgapi.py.
LAUNCHER = """
import sys

import imgapi
from imgapi_core import app as app_module


def create_app(*args, **kwargs):
    app = app_module.create_app(*args, **kwargs)
    app.before_server_stop(lambda app: app.ctx.pipeline.begin_shutdown())

    async def drain(app):
        await app.ctx.pipeline.drain()

    app.after_server_stop(drain)
    return app


imgapi.create_app = create_app
sys.exit(imgapi.main())
"""


def start_api_with_shutdown_listener(env: dict[str, str], log: Path) -> Proc:
    port = free_port()
    args = [sys.executable, "-c", LAUNCHER, "--host", "127.0.0.1", "--port", str(port)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            args,
            cwd=REPO,
            env=service_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Proc(popen, log, f"http://127.0.0.1:{port}")

    def up() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"API exited with {popen.returncode}:\n{proc.output()[-3000:]}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_until(up, 30, "API")
    except BaseException:
        proc.kill()
        raise
    return proc


def test_upload_cut_short_by_sigterm_is_recorded_as_a_shutdown(tmp_path: Path) -> None:
    """It was recorded as "the client closed the connection"."""
    env = settings_for(
        tmp_path,
        REQUEST_TIMEOUT="60",
        UPLOAD_TIMEOUT="120",
        # Sanic waits this long for running requests after SIGTERM, then cancels them.
        SANIC_GRACEFUL_SHUTDOWN_TIMEOUT="1",
    )
    proc = start_api_with_shutdown_listener(env, tmp_path / "api.log")
    tmp_dir = Path(env["MEDIA_DIR"]) / "tmp"
    try:
        with socket.create_connection(("127.0.0.1", int(proc.url.rsplit(":", 1)[1]))) as sock:
            # Half a body, then nothing: the upload is in progress when the server stops.
            sock.sendall(request_head(50_000) + part_head(b"half.jpg") + jpeg_bytes()[:200])
            wait_until(lambda: any(tmp_dir.iterdir()), 10, "the upload's temp file")
            assert proc.stop(within=20) == 0, proc.output()[-3000:]
    finally:
        proc.kill()
    rows = db_rows(
        env["DB_PATH"],
        "SELECT original_name, error, status FROM images JOIN stats USING (image_id)",
    )
    assert [tuple(r) for r in rows] == [
        ("half.jpg", "upload interrupted: the server was shutting down", 0)
    ], proc.output()[-3000:]
    assert list(tmp_dir.iterdir()) == []


def test_plain_api_records_client_disconnects_as_such(api: Api) -> None:
    before = api.failures()
    tmp_dir = Path(api.env["MEDIA_DIR"]) / "tmp"
    with api.connect() as sock:
        sock.sendall(request_head(50_000) + part_head(b"gone.jpg") + jpeg_bytes()[:200])
        wait_until(lambda: any(tmp_dir.iterdir()), 10, "the upload's temp file")
    wait_until(lambda: len(api.failures()) > len(before), 10, "the failure record")
    (new,) = set(api.failures()) - set(before)
    assert api.failures()[new] == (
        "gone.jpg",
        "upload interrupted: the client closed the connection",
        0,
    )
