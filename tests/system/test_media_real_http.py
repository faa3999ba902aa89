"""The original's byte ranges and validators against a real `python imgapi.py` over HTTP/1 with
urllib (the same semantics through sanic-testing's ASGI client: api/test_media_http.py)."""

from __future__ import annotations

import hashlib
import io
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import procs
import pytest
from conftest import multipart
from PIL import Image

from imgapi_core.media.local import CHUNK as CHUNK_BYTES


# The same two helpers as api/test_media_http.py (no test file imports another).
def noise_png(side: int, seed: int = 1) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 * side * side."""
    pixels = random.Random(seed).randbytes(3 * side * side)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, "PNG")
    return buffer.getvalue()


def quoted_sha256(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()}"'


def fetch(url: str, method: str = "GET", **headers: str) -> tuple[int, Any, bytes]:
    """(status, headers, body) by urllib, whatever the status."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


@pytest.mark.slow
def test_ranges_and_validators_over_a_real_http1_server(tmp_path: Path):
    data = noise_png(500)
    n = len(data)
    assert n > 2 * CHUNK_BYTES
    api = procs.start_api(procs.settings_for(tmp_path), tmp_path / "api.log")
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            res = http.post("/api/images", files=multipart(data, "noise.png", "image/png"))
        assert res.status_code == 201, res.text
        url = f"{api.url}/api/images/{res.json()['data']['image_id']}/original"

        status, headers, body = fetch(url)
        assert status == 200 and body == data
        assert headers["Content-Length"] == str(n) and "Transfer-Encoding" not in headers
        assert headers["ETag"] == quoted_sha256(data) and headers["Accept-Ranges"] == "bytes"

        for spec, first, last in (
            ("bytes=0-99", 0, 99),
            ("bytes=100-", 100, n - 1),
            ("bytes=-100", n - 100, n - 1),
            (f"bytes=17-{CHUNK_BYTES + 99}", 17, CHUNK_BYTES + 99),
        ):
            status, headers, body = fetch(url, Range=spec)
            assert status == 206, spec
            assert headers["Content-Range"] == f"bytes {first}-{last}/{n}", spec
            assert headers["Content-Length"] == str(last - first + 1), spec
            assert body == data[first : last + 1], spec

        status, headers, body = fetch(url, Range=f"bytes={n}-")
        assert status == 416 and headers["Content-Range"] == f"bytes */{n}"
        assert b'"status":"failed"' in body

        # HEAD (sanic-ext runs the GET handler): the same headers, no body.
        status, headers, body = fetch(url, "HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == str(n)
        status, headers, body = fetch(url, "HEAD", Range="bytes=-10")
        assert status == 206 and body == b"" and headers["Content-Length"] == "10"
        assert headers["Content-Range"] == f"bytes {n - 10}-{n - 1}/{n}"

        status, headers, body = fetch(url, **{"If-None-Match": "*"})
        assert status == 304 and body == b""
        status, _, body = fetch(url, Range="bytes=0-0")
        assert status == 206 and body == data[:1]
    finally:
        api.stop()
