"""uploads.receive as a unit: hand-built multipart bodies, fed in chunks, into a real folder."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgapi_core import uploads
from imgapi_core.errors import ClientError

BOUNDARY = b"----imgapiBoundary7MA4YWxkTrZu0gW"
CTYPE = f"multipart/form-data; boundary={BOUNDARY.decode()}"
PAYLOAD = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n" + b"\xff\xd8" * 100
MAX = 1_000_000


def part(disposition: bytes, content: bytes, ctype: bytes | None = b"image/jpeg") -> bytes:
    head = b"Content-Disposition: " + disposition + b"\r\n"
    if ctype is not None:
        head += b"Content-Type: " + ctype + b"\r\n"
    return b"--" + BOUNDARY + b"\r\n" + head + b"\r\n" + content + b"\r\n"


def file_part(filename: bytes = b'"photo.jpg"', content: bytes = PAYLOAD, **kw) -> bytes:
    return part(b'form-data; name="file"; filename=' + filename, content, **kw)


def body(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + BOUNDARY + b"--\r\n" if close else b"")


async def chunked(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def receive(
    tmp_dir: Path,
    data: bytes,
    content_type: str | None = CTYPE,
    max_bytes: int = MAX,
    size: int = 1000,
    **kw: int,
) -> uploads.Received:
    return await uploads.receive(chunked(data, size), content_type, tmp_dir, max_bytes, **kw)


async def rejected(tmp_dir: Path, data: bytes, status: int, **kw) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await receive(tmp_dir, data, **kw)
    assert caught.value.status == status, caught.value.message
    assert list(tmp_dir.iterdir()) == [], "temp file left behind"
    return caught.value


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    return folder


# -- the file part ------------------------------------------------------------------------------


async def test_file_part_goes_to_a_temp_file_with_its_sha256(tmp_dir):
    received = await receive(tmp_dir, body(file_part()))
    try:
        assert received.original_name == "photo.jpg"
        assert received.content_type == "image/jpeg"
        assert received.size == len(PAYLOAD)
        assert received.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
        assert received.temp_path is not None and received.temp_path.parent == tmp_dir
        assert received.temp_path.name.startswith(uploads.temp_owner())
        assert received.temp_path.read_bytes() == PAYLOAD
    finally:
        received.discard()
    assert list(tmp_dir.iterdir()) == []
    received.discard()  # twice is fine


async def test_other_form_fields_are_read_past(tmp_dir):
    data = body(
        part(b'form-data; name="title"', b"my holiday", ctype=None),
        file_part(),
        part(b'form-data; name="tags"', b"a,b,c", ctype=None),
    )
    received = await receive(tmp_dir, data)
    try:
        assert received.temp_path.read_bytes() == PAYLOAD
        assert len(list(tmp_dir.iterdir())) == 1
    finally:
        received.discard()


async def test_missing_part_content_type_is_none(tmp_dir):
    received = await receive(tmp_dir, body(file_part(ctype=None)))
    try:
        assert received.content_type is None
    finally:
        received.discard()


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=11_000), max_size=12))
def test_any_chunking_gives_the_same_result(cuts):
    data = body(part(b'form-data; name="x"', b"y" * 300, ctype=None), file_part())
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]

    async def feed() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def run(folder: Path) -> tuple[str, int, bytes]:
        got = await uploads.receive(feed(), CTYPE, folder, MAX)
        try:
            return got.sha256, got.size, got.temp_path.read_bytes()
        finally:
            got.discard()

    with tempfile.TemporaryDirectory() as folder:
        digest, size, content = asyncio.run(run(Path(folder)))
        assert list(Path(folder).iterdir()) == []
    assert (digest, size, content) == (hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), PAYLOAD)


async def test_one_byte_chunks(tmp_dir):
    received = await receive(tmp_dir, body(file_part(content=b"\xff\xd8\xff" * 50)), size=1)
    try:
        assert received.temp_path.read_bytes() == b"\xff\xd8\xff" * 50
    finally:
        received.discard()


# -- file names ---------------------------------------------------------------------------------


async def name_of(tmp_dir: Path, filename: bytes) -> str:
    received = await receive(tmp_dir, body(file_part(filename)))
    try:
        assert received.temp_path.parent == tmp_dir  # never a path built from the name
        return received.original_name
    finally:
        received.discard()


async def test_path_in_file_name_is_kept_as_text_only(tmp_dir):
    assert await name_of(tmp_dir, b'"../../etc/passwd.jpg"') == "../../etc/passwd.jpg"
    assert not (tmp_dir.parent.parent / "etc").exists()


async def test_control_characters_are_removed_from_file_names(tmp_dir):
    assert await name_of(tmp_dir, b'"a\x00b.jpg"') == "ab.jpg"
    assert await name_of(tmp_dir, b'"tab\there\x1b[31m.jpg"') == "tabhere[31m.jpg"
    assert uploads.clean_name("a\r\nb\x00.jpg\u202e") == "ab.jpg"


async def test_raw_cr_lf_in_a_file_name_never_reaches_the_name(tmp_dir):
    data = body(file_part(b'"evil\r\nX-Injected: 1.jpg"'))
    try:
        received = await receive(tmp_dir, data)
    except ClientError as exc:
        # 400 for the broken header, or 415 when the name is read as "evil" (no extension).
        assert exc.status in (400, 415)
        assert list(tmp_dir.iterdir()) == []
        return
    try:
        assert "\r" not in received.original_name and "\n" not in received.original_name
    finally:
        received.discard()


async def test_long_file_name_is_cut_to_255_characters_keeping_its_extension(tmp_dir):
    name = await name_of(tmp_dir, b'"' + b"x" * 996 + b'.jpg"')
    assert name == "x" * (uploads.MAX_NAME_CHARS - 4) + ".jpg"
    assert uploads.MAX_NAME_CHARS == 255


async def test_non_utf8_file_name_becomes_text(tmp_dir):
    name = await name_of(tmp_dir, b'"caf\xe9-\xff\xfe.jpg"')
    assert name.endswith(".jpg") and name.startswith("caf")
    name.encode("utf-8")  # storable and showable as JSON
    assert await name_of(tmp_dir, '"café.jpg"'.encode()) == "café.jpg"


async def test_rfc5987_filename_star_is_decoded(tmp_dir):
    both = b"\"fallback.jpg\"; filename*=UTF-8''%E2%82%AC%20rates.jpg"
    assert await name_of(tmp_dir, both) == "€ rates.jpg"
    only_star = part(b"form-data; name=\"file\"; filename*=UTF-8''na%C3%AFve%0D%0A%00.png", PAYLOAD)
    received = await receive(tmp_dir, body(only_star))
    try:
        assert received.original_name == "naïve.png"  # decoded, then cleaned of CR, LF, NUL
    finally:
        received.discard()
    with_language = b"\"x.jpg\"; filename*=utf-8'en'%C3%A9t%C3%A9.jpg"
    assert await name_of(tmp_dir, with_language) == "été.jpg"
    latin = b"\"x.jpg\"; filename*=ISO-8859-1''caf%E9.jpg"
    assert await name_of(tmp_dir, latin) == "café.jpg"
    assert await name_of(tmp_dir, latin.replace(b"ISO-8859-1", b"latin1")) == "café.jpg"
    assert await name_of(tmp_dir, b"\"plain.jpg\"; filename*=UTF-8''") == "plain.jpg"


@pytest.mark.parametrize(
    "ext_value",
    [
        b"idna''%41.jpg",  # a codec that rejects errors="replace": was a 500
        b"utf-16''%41%00.jpg",
        b"punycode''a.jpg",
        b"rot13''n.jpg",  # not a text codec at all
        b"x-nonsense''%C3%A9.jpg",
        b"''a.jpg",  # no charset
        b"iso8859-1''a.jpg",  # Python's spelling, not a registered charset name
        b"a.jpg",  # no charset'language' prefix
    ],
)
async def test_filename_star_with_another_charset_is_400_under_the_plain_name(tmp_dir, ext_value):
    """RFC 5987 allows UTF-8 and ISO-8859-1 only; other charsets are a clear 400, and the
    failure keeps the plain filename= (when there is one) to be recorded under."""
    data = body(file_part(b'"plain.jpg"; filename*=' + ext_value))
    err = await rejected(tmp_dir, data, 400)
    assert "filename*" in err.message, err.message
    assert err.received.original_name == "plain.jpg"
    only_star = part(b'form-data; name="file"; filename*=' + ext_value, PAYLOAD)
    err = await rejected(tmp_dir, body(only_star), 400)
    assert err.received.original_name == ""


# -- name and type are checked before the file is read --------------------------------------------


@pytest.mark.parametrize(
    ("filename", "ctype", "words"),
    [
        (b'"setup.exe"', b"image/jpeg", ".exe"),
        (b'"noextension"', b"image/jpeg", "extension"),
        (b'"photo.jpg"', b"application/x-msdownload", "application/x-msdownload"),
    ],
)
async def test_refused_name_or_type_stops_before_the_file_is_read(tmp_dir, filename, ctype, words):
    """415 as soon as the part's headers are in: no more of the body is read, no temp file."""
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        yield file_part(filename, content=b"", ctype=ctype)[:-2]  # headers, then data for ever
        while True:
            read += 1
            assert list(tmp_dir.iterdir()) == [], "a temp file was made for a refused part"
            yield b"MZ" * 4096

    with pytest.raises(ClientError) as caught:
        await uploads.receive(endless(), CTYPE, tmp_dir, 100 * MAX)
    assert caught.value.status == 415, caught.value.message
    assert words in caught.value.message
    assert read == 0, f"{read} chunks of a refused file were read"
    assert caught.value.received.original_name == filename.strip(b'"').decode()
    assert list(tmp_dir.iterdir()) == []


async def test_only_the_file_part_is_checked(tmp_dir):
    other = part(b'form-data; name="doc"; filename="notes.exe"', b"MZ", ctype=b"text/plain")
    received = await receive(tmp_dir, body(other, file_part()))
    received.discard()


# -- malformed requests -------------------------------------------------------------------------


async def test_two_file_parts_are_400(tmp_dir):
    err = await rejected(tmp_dir, body(file_part(), file_part(b'"second.jpg"')), 400)
    assert "more than one" in err.message


async def test_no_file_part_is_400(tmp_dir):
    err = await rejected(tmp_dir, body(part(b'form-data; name="image"', PAYLOAD)), 400)
    assert "`file`" in err.message
    await rejected(tmp_dir, b"--" + BOUNDARY + b"--\r\n", 400)


async def test_more_than_max_parts_is_400(tmp_dir):
    fields = [
        part(f'form-data; name="f{i}"'.encode(), b"v", ctype=None) for i in range(uploads.MAX_PARTS)
    ]
    received = await receive(tmp_dir, body(*fields[:-1], file_part()))  # MAX_PARTS in all: fine
    received.discard()
    err = await rejected(tmp_dir, body(*fields, file_part()), 400)
    assert str(uploads.MAX_PARTS) in err.message


@pytest.mark.parametrize(
    "ctype", [None, "", "application/json", "text/plain; boundary=x", "image/jpeg"]
)
async def test_non_multipart_body_is_415(tmp_dir, ctype):
    await rejected(tmp_dir, body(file_part()), 415, content_type=ctype)


@pytest.mark.parametrize(
    "ctype", ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; x=1"]
)
async def test_multipart_without_boundary_is_400(tmp_dir, ctype):
    err = await rejected(tmp_dir, body(file_part()), 400, content_type=ctype)
    assert "boundary" in err.message


async def test_truncated_body_is_400_and_leaves_no_temp_file(tmp_dir):
    whole = body(file_part())
    for cut in (len(whole) - 3, len(whole) - 40, len(whole) // 2, 60):
        await rejected(tmp_dir, whole[:cut], 400)
    err = await rejected(tmp_dir, body(file_part(), close=False), 400)
    assert "closing boundary" in err.message or "ended early" in err.message


async def test_garbage_body_is_400(tmp_dir):
    await rejected(tmp_dir, b"\x00" * 5000, 400)
    await rejected(tmp_dir, b"--" + BOUNDARY + b"\r\nno header end" + b"x" * 100, 400)


# -- size cap -----------------------------------------------------------------------------------


async def test_size_cap_counts_the_file_bytes(tmp_dir):
    exact = await receive(tmp_dir, body(file_part()), max_bytes=len(PAYLOAD))
    assert exact.size == len(PAYLOAD)
    exact.discard()
    err = await rejected(tmp_dir, body(file_part()), 413, max_bytes=len(PAYLOAD) - 1)
    assert isinstance(err, uploads.TooLarge)
    assert str(len(PAYLOAD) - 1) in err.message


async def test_size_cap_stops_reading_the_body(tmp_dir):
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        yield file_part(content=b"")[:-2]  # the part's headers, then data for ever
        while True:
            read += 1
            yield b"\xff" * 4096

    with pytest.raises(uploads.TooLarge) as caught:
        await uploads.receive(endless(), CTYPE, tmp_dir, 10_000)
    assert read <= 4
    assert caught.value.received.original_name == "photo.jpg"  # for the failure record
    assert list(tmp_dir.iterdir()) == []


async def test_whole_body_cap_covers_other_form_fields(tmp_dir):
    note = part(b'form-data; name="note"', b"n" * 50_000, ctype=None)
    data = body(note, file_part(content=b"\xff\xd8\xff" * 10))
    err = await rejected(tmp_dir, data, 413, max_bytes=MAX, size=4096, max_body_bytes=20_000)
    assert isinstance(err, uploads.TooLarge)
    fits = await uploads.receive(chunked(data), CTYPE, tmp_dir, MAX, len(data))
    fits.discard()
    # By default the body may carry OVERHEAD bytes beyond the file cap, and not more.
    big_note = part(b'form-data; name="note"', b"n" * (uploads.OVERHEAD + 1000), ctype=None)
    await rejected(tmp_dir, body(big_note, file_part(content=b"x")), 413, max_bytes=10)


# -- a full disk --------------------------------------------------------------------------------


def fail_writes_to(folder: Path, monkeypatch: pytest.MonkeyPatch, err: int, after: int = 0) -> None:
    """os.write fails with `err` once `after` bytes went to files in `folder`, as on a full disk
    (other descriptors, such as the event loop's, write as usual)."""
    real_write = os.write
    written = 0

    def write(fd: int, data) -> int:
        nonlocal written
        if os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) == str(folder):
            if written + len(data) > after:
                raise OSError(err, os.strerror(err))
            written += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("after", [0, 5000])
async def test_no_space_for_the_temp_file_is_507(tmp_dir, monkeypatch, err, after):
    fail_writes_to(tmp_dir, monkeypatch, err, after)
    failure = await rejected(tmp_dir, body(file_part()), 507)
    assert isinstance(failure, uploads.NoSpace)
    assert failure.message == "the server has no space left to store this upload"
    assert failure.received.original_name == "photo.jpg"  # for the failure record
    assert failure.received.temp_path is None


async def test_no_space_when_the_temp_file_is_made_or_closed_is_507(tmp_dir, monkeypatch):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(uploads.tempfile, "mkstemp", no_inode)
        await rejected(tmp_dir, body(file_part()), 507)
    # close() reports a write that failed late (NFS, quota): once, for the temp file.
    real_close = os.close
    real_mkstemp = uploads.tempfile.mkstemp
    temp_fds: set[int] = set()

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        temp_fds.add(fd)
        return fd, path

    def failing_close(fd: int) -> None:
        real_close(fd)
        if fd in temp_fds:
            temp_fds.discard(fd)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(uploads.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "close", failing_close)
    await rejected(tmp_dir, body(file_part()), 507)


async def test_other_write_errors_are_not_507(tmp_dir, monkeypatch):
    fail_writes_to(tmp_dir, monkeypatch, errno.EIO)
    with pytest.raises(OSError) as caught:
        await receive(tmp_dir, body(file_part()))
    assert caught.value.errno == errno.EIO
    assert list(tmp_dir.iterdir()) == []


# -- every error removes the temp file ----------------------------------------------------------


async def test_client_disconnect_mid_file_removes_the_temp_file(tmp_dir):
    async def broken() -> AsyncIterator[bytes]:
        yield file_part(content=PAYLOAD[:5000])[:-2]
        assert len(list(tmp_dir.iterdir())) == 1  # the temp file exists while receiving
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError) as caught:
        await uploads.receive(broken(), CTYPE, tmp_dir, MAX)
    assert caught.value.received.original_name == "photo.jpg"
    assert caught.value.received.temp_path is None
    assert list(tmp_dir.iterdir()) == []


async def test_cancellation_mid_file_removes_the_temp_file(tmp_dir):
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield file_part(content=PAYLOAD)[:-2]
        started.set()
        await asyncio.Event().wait()
        yield b""

    task = asyncio.create_task(uploads.receive(stalled(), CTYPE, tmp_dir, MAX))
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(tmp_dir.iterdir()) == []


async def test_rejections_after_the_file_part_remove_the_temp_file(tmp_dir):
    cases: Iterable[bytes] = (
        body(file_part(), file_part()),  # second file part
        body(file_part(), close=False),  # truncated after the file
        body(
            file_part(),
            *(part(f'form-data; name="f{i}"'.encode(), b"v") for i in range(uploads.MAX_PARTS)),
        ),
    )
    for data in cases:
        with pytest.raises(ClientError) as caught:
            await receive(tmp_dir, data)
        assert caught.value.received.original_name == "photo.jpg"
        assert list(tmp_dir.iterdir()) == []


# -- sweeping temp files of dead processes ------------------------------------------------------


def temp_name(pid: int, host: str | None = None, suffix: str = "a1b2c3") -> str:
    return f"{uploads.TEMP_PREFIX}{host or socket.gethostname()}-{pid}-{suffix}.part"


def test_sweep_removes_dead_processes_files_and_keeps_live_siblings(tmp_dir):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": temp_name(dead_pid),
            "live": temp_name(sibling.pid),
            "mine": uploads.temp_owner() + "zz9.part",
            "other_host": temp_name(dead_pid, host="some-other-host"),
            "unrelated": "notes.txt",
            "odd": f"{uploads.TEMP_PREFIX}garbage.part",
            "bad_pid": temp_name(0, suffix="x").replace("-0-", "-abc-"),
        }
        for name in names.values():
            (tmp_dir / name).write_bytes(b"partial")
        assert uploads.sweep_temp_files(tmp_dir) == 2
        left = {p.name for p in tmp_dir.iterdir()}
        assert names["dead"] not in left and names["mine"] not in left
        assert left == {names[k] for k in ("live", "other_host", "unrelated", "odd", "bad_pid")}
        assert uploads.sweep_temp_files(tmp_dir) == 0
    finally:
        sibling.kill()
        sibling.wait(10)
    assert uploads.sweep_temp_files(tmp_dir) == 1  # the sibling is gone now
    assert names["live"] not in {p.name for p in tmp_dir.iterdir()}


def test_sweep_survives_pids_that_are_not_numbers_or_cannot_exist(tmp_dir):
    """A pid of "²" (isdigit() is true, then int() raised ValueError) or one past the C int range
    (os.kill raised OverflowError) stopped the start-up sweep, and with it the server's start."""
    odd = temp_name(0, suffix="y").replace("-0-", "-²-")
    impossible = temp_name(10**40)
    for name in (odd, impossible):
        (tmp_dir / name).write_bytes(b"partial")
    assert uploads.sweep_temp_files(tmp_dir) == 1  # no process has that pid: a leftover
    assert [p.name for p in tmp_dir.iterdir()] == [odd]


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("7", 7), ("0100", 100), ("1000", 1000), ("9" * 30, 10**30 - 1)],
)
def test_whole_number_reads_ascii_digits(text, value):
    assert uploads.whole_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        *(None, "", "²", "١٢", "１２", "𝟙", "Ⅻ", "½"),
        *(" 12", "12 ", "12\n", "+1", "-1", "1_0", "1.5", "0x10"),
    ],
)
def test_whole_number_refuses_everything_else(text):
    """str.isdigit() is true for "²" (and int() then raises), int() takes "١٢", " 12", "1_0"."""
    assert uploads.whole_number(text) is None


def test_whole_number_of_thousands_of_digits_is_larger_than_any_limit():
    # int() raises ValueError past 4300 digits.
    assert uploads.whole_number("9" * 5000) > 10**18
    assert uploads.whole_number("0" * 5000 + "12") == 12


def test_sweep_of_an_empty_or_unrelated_folder(tmp_dir):
    assert uploads.sweep_temp_files(tmp_dir) == 0
    (tmp_dir / "keep.jpg").write_bytes(b"x")
    assert uploads.sweep_temp_files(tmp_dir) == 0
    assert os.listdir(tmp_dir) == ["keep.jpg"]
