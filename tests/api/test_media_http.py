"""HTTP semantics of an image's bytes (RFC 9110): the original's validators (ETag, Last-Modified),
conditional requests (If-None-Match, If-Modified-Since, If-Match, If-Unmodified-Since, If-Range),
single byte ranges (206 / 416), and If-None-Match on thumbnails. Through sanic-testing's ASGI
client; against a real `python imgapi.py` over HTTP/1: system/test_media_real_http.py."""

from __future__ import annotations

import hashlib
import io
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import media_view
from conftest import multipart
from PIL import Image

from imgapi_core.media import original_key
from imgapi_core.media.local import CHUNK as CHUNK_BYTES

THUMB_CACHE = "public, max-age=31536000, immutable"


# -- helpers ------------------------------------------------------------------------------------


def noise_png(side: int, seed: int = 1) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 * side * side."""
    pixels = random.Random(seed).randbytes(3 * side * side)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, "PNG")
    return buffer.getvalue()


def quoted_sha256(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()}"'


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def path_of(url: str) -> str:
    return urlsplit(url).path


async def upload_ok(client: Any, data: bytes) -> dict:
    _, res = await client.post("/api/images", files=multipart(data, "noise.png", "image/png"))
    assert res.status == 201, res.text
    return res.json


async def uploaded_original(client: Any, data: bytes) -> tuple[str, dict]:
    """The original's URL and the upload's record."""
    body = await upload_ok(client, data)
    return f"/api/images/{body['data']['image_id']}/original", body["data"]


def assert_error_shape(res: Any, status: int) -> dict:
    assert res.status == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = res.json
    assert set(body) == {"status", "data", "error"} and body["status"] == "failed", body
    assert isinstance(body["error"], str) and body["error"], body
    return body


def assert_whole(res: Any, data: bytes, what: str) -> None:
    assert res.status == 200, (what, res.status, res.text[:200])
    assert res.headers["content-length"] == str(len(data)), what
    assert "content-range" not in res.headers, what
    assert res.content == data, what


def assert_partial(res: Any, data: bytes, first: int, last: int, what: str) -> None:
    assert res.status == 206, (what, res.status, res.text[:200])
    assert res.headers["content-range"] == f"bytes {first}-{last}/{len(data)}", what
    assert res.headers["content-length"] == str(last - first + 1), what
    assert res.headers["content-type"] == "image/png", what
    assert res.headers["etag"] == quoted_sha256(data), what
    assert res.content == data[first : last + 1], what


# -- the original: validators -------------------------------------------------------------------


async def test_original_carries_length_etag_last_modified_and_accept_ranges(client):
    data = noise_png(40)
    url, record = await uploaded_original(client, data)
    _, res = await client.get(url)
    assert_whole(res, data, "plain GET")
    assert res.headers["content-type"] == "image/png"
    assert res.headers["etag"] == quoted_sha256(data)  # strong: the sha256 of these very bytes
    assert res.headers["accept-ranges"] == "bytes"
    assert res.headers["cache-control"] == THUMB_CACHE
    # Last-Modified is the record's processed_at, to the second.
    processed_at = datetime.fromisoformat(record["processed_at"]).replace(microsecond=0)
    assert res.headers["last-modified"] == http_date(processed_at)


# -- the original: byte ranges ------------------------------------------------------------------


async def test_single_byte_ranges_answer_206_with_that_slice(client):
    data = noise_png(40)
    n = len(data)
    url, _ = await uploaded_original(client, data)
    for spec, first, last in (
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, n - 1),
        ("bytes=-100", n - 100, n - 1),
        ("bytes=7-7", 7, 7),
        ("bytes=0-", 0, n - 1),
        (f"bytes={n - 1}-", n - 1, n - 1),
        ("bytes=10-999999999", 10, n - 1),  # a last-pos past the end stops at the end
        ("bytes=-999999999", 0, n - 1),  # a suffix longer than the file is all of it
        ("Bytes=0-9", 0, 9),  # range units are case-insensitive
        ("bytes= 5-9 ,", 5, 9),  # list whitespace and an empty member
        ("bytes=0-" + "9" * 5000, 0, n - 1),  # more digits than int() takes, still clamped
        ("bytes=" + "0" * 5000 + "3-4", 3, 4),
        ("bytes=-" + "9" * 5000, 0, n - 1),
    ):
        _, res = await client.get(url, headers={"range": spec})
        assert_partial(res, data, first, last, spec)


async def test_a_range_spanning_several_chunks_is_exactly_that_range(client):
    data = noise_png(700)
    n = len(data)
    assert n > 3 * CHUNK_BYTES + 100
    url, _ = await uploaded_original(client, data)
    for first, last in ((1000, 3 * CHUNK_BYTES + 17), (CHUNK_BYTES, 2 * CHUNK_BYTES - 1)):
        _, res = await client.get(url, headers={"range": f"bytes={first}-{last}"})
        assert_partial(res, data, first, last, f"{first}-{last}")
    suffix = 2 * CHUNK_BYTES + 5
    _, res = await client.get(url, headers={"range": f"bytes=-{suffix}"})
    assert_partial(res, data, n - suffix, n - 1, "suffix")
    _, res = await client.get(url)
    assert_whole(res, data, "whole")


async def test_unsatisfiable_range_is_416_with_the_length_in_content_range(client):
    data = noise_png(40)
    n = len(data)
    url, _ = await uploaded_original(client, data)
    for spec in (
        f"bytes={n}-",
        f"bytes={n + 10}-{n + 20}",
        "bytes=-0",
        "bytes=" + "9" * 5000 + "-",
    ):
        _, res = await client.get(url, headers={"range": spec})
        body = assert_error_shape(res, 416)
        assert res.headers["content-range"] == f"bytes */{n}", spec
        assert str(n) in body["error"]


async def test_ranges_that_are_not_served_get_the_whole_original(client):
    """Several ranges (no multipart/byteranges), another unit, and malformed or invalid range
    sets are ignored, as RFC 9110 allows: a 200 with the whole original."""
    data = noise_png(40)
    url, _ = await uploaded_original(client, data)
    for spec in (
        "bytes=0-1,5-6",
        "bytes=-5,0-1",
        "items=0-10",
        "bytes=abc",
        "bytes=10-5",
        "bytes=--5",
        "bytes=-",
        "bytes=+1-2",
        "bytes=0x10-20",
        "0-10",
    ):
        _, res = await client.get(url, headers={"range": spec})
        assert_whole(res, data, spec)
        assert res.headers["accept-ranges"] == "bytes", spec


# -- the original: conditional requests ---------------------------------------------------------


async def test_if_none_match_answers_304_for_a_matching_tag_or_star(client):
    data = noise_png(40)
    url, _ = await uploaded_original(client, data)
    etag = quoted_sha256(data)
    for value in (etag, "*", f'"other", {etag}', f"W/{etag}", f' "x" ,, W/"y", {etag} '):
        _, res = await client.get(url, headers={"if-none-match": value})
        assert res.status == 304, (value, res.status)
        assert res.content == b""
        assert res.headers["etag"] == etag
        assert res.headers["cache-control"] == THUMB_CACHE
    # A matching If-None-Match beats a Range: the client's copy is current.
    _, res = await client.get(url, headers={"if-none-match": etag, "range": "bytes=0-9"})
    assert res.status == 304
    for value in ('"other"', f'"{etag}"', etag.strip('"'), f"{etag}junk"):
        _, res = await client.get(url, headers={"if-none-match": value})
        assert_whole(res, data, value)


async def test_if_modified_since_and_if_none_match_wins_over_it(client):
    data = noise_png(40)
    url, _ = await uploaded_original(client, data)
    etag = quoted_sha256(data)
    _, first = await client.get(url)
    modified = parsedate_to_datetime(first.headers["last-modified"])
    later = http_date(modified + timedelta(days=1))
    earlier = http_date(modified - timedelta(seconds=1))
    for value in (first.headers["last-modified"], later):
        _, res = await client.get(url, headers={"if-modified-since": value})
        assert res.status == 304, value
        assert res.headers["etag"] == etag
    for value in (earlier, "not a date", ""):
        _, res = await client.get(url, headers={"if-modified-since": value})
        assert_whole(res, data, value)
    # If-None-Match present: If-Modified-Since is not evaluated (RFC 9110 section 13.1.3).
    headers = {"if-none-match": '"other"', "if-modified-since": later}
    _, res = await client.get(url, headers=headers)
    assert_whole(res, data, "non-matching If-None-Match with a later If-Modified-Since")
    assert res.headers["etag"] == etag
    headers = {"if-none-match": etag, "if-modified-since": earlier}
    _, res = await client.get(url, headers=headers)
    assert res.status == 304


async def test_if_range_gets_the_range_only_while_the_validator_matches(client):
    data = noise_png(40)
    url, _ = await uploaded_original(client, data)
    etag = quoted_sha256(data)
    _, first = await client.get(url)
    modified = first.headers["last-modified"]
    earlier = http_date(parsedate_to_datetime(modified) - timedelta(seconds=1))
    for value in (etag, f" {etag} ", modified):
        _, res = await client.get(url, headers={"range": "bytes=0-9", "if-range": value})
        assert_partial(res, data, 0, 9, f"If-Range {value}")
    # Stale or weak (If-Range compares strongly): the whole original, not a piece of it.
    for value in ('"other"', f"W/{etag}", f'"other", {etag}', earlier, "garbage"):
        _, res = await client.get(url, headers={"range": "bytes=0-9", "if-range": value})
        assert_whole(res, data, f"If-Range {value}")
    # An If-Range that does not match also turns an unsatisfiable range into the whole original.
    headers = {"range": f"bytes={len(data)}-", "if-range": '"other"'}
    _, res = await client.get(url, headers=headers)
    assert_whole(res, data, "stale If-Range with an unsatisfiable range")


async def test_if_match_and_if_unmodified_since_answer_412_when_they_fail(client):
    data = noise_png(40)
    url, _ = await uploaded_original(client, data)
    etag = quoted_sha256(data)
    _, first = await client.get(url)
    modified = parsedate_to_datetime(first.headers["last-modified"])
    earlier = http_date(modified - timedelta(seconds=1))
    for headers in (
        {"if-match": '"other"'},
        {"if-match": f"W/{etag}"},  # If-Match compares strongly
        {"if-unmodified-since": earlier},
    ):
        _, res = await client.get(url, headers=headers)
        assert_error_shape(res, 412)
    for headers in (
        {"if-match": etag},
        {"if-match": "*"},
        {"if-match": f'"other", {etag}'},
        {"if-unmodified-since": first.headers["last-modified"]},
        {"if-unmodified-since": "not a date"},
        # If-Match present: If-Unmodified-Since is not evaluated.
        {"if-match": etag, "if-unmodified-since": earlier},
    ):
        _, res = await client.get(url, headers=headers)
        assert_whole(res, data, str(headers))


async def test_original_whose_file_is_gone_is_404(client, cfg):
    data = noise_png(40)
    url, record = await uploaded_original(client, data)
    key = original_key(record["image_id"], "png")
    assert media_view.keys(cfg, "originals/") == [key]
    media_view.remove(cfg, key)  # lost behind the app's back (a disk, a bucket policy)
    assert not media_view.exists(cfg, key)
    for headers in ({"range": "bytes=0-9"}, {}):
        _, res = await client.get(url, headers=headers)
        assert_error_shape(res, 404)


# -- thumbnails: If-None-Match ------------------------------------------------------------------


async def test_thumbnail_if_none_match_star_is_304(client):
    body = await upload_ok(client, noise_png(40))
    url = path_of(body["thumbnails"]["small"])
    _, first = await client.get(url)
    assert first.status == 200
    _, res = await client.get(url, headers={"if-none-match": "*"})
    assert res.status == 304 and res.content == b""
    assert res.headers["etag"] == first.headers["etag"]
    assert res.headers["cache-control"] == THUMB_CACHE


async def test_thumbnail_if_none_match_is_a_list_of_entity_tags(client):
    body = await upload_ok(client, noise_png(40))
    url = path_of(body["thumbnails"]["small"])
    _, first = await client.get(url)
    etag = first.headers["etag"]
    for headers in (
        {"if-none-match": f'"other", W/{etag}'},  # weak comparison: W/ tags match
        [("if-none-match", '"other"'), ("if-none-match", etag)],  # one list over two lines
    ):
        _, res = await client.get(url, headers=headers)
        assert res.status == 304, headers
    # Not a list of entity tags, though the ETag's text is in it: no match.
    for value in (f"{etag}junk", f"x{etag}", f"{etag} {etag}"):
        _, res = await client.get(url, headers={"if-none-match": value})
        assert res.status == 200 and res.content == first.content, value
