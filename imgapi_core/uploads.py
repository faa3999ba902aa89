"""Receiving one multipart upload as a stream: the `file` part's name and type are checked as
soon as its headers arrive, then it goes to a temp file while its SHA-256 is computed, and the
size cap is enforced as bytes arrive, so memory stays flat."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import unicodedata
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from imgapi_core import formats, imaging
from imgapi_core.errors import ClientError
from imgapi_core.numbers import whole_number

FIELD = "file"
MAX_PARTS = 32  # a real upload has one part, maybe a few form fields; more is abuse
MAX_NAME_CHARS = 255
# What a multipart body may carry beyond its file: boundaries, part headers, small form fields.
OVERHEAD = 64 * 1024
# Temp names carry host and pid so a start-up sweep removes only what a dead process left.
TEMP_PREFIX = "upload-"


# A full disk, or the writing user's quota used up: the client can do nothing about either.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


class TooLarge(ClientError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"file is larger than the limit of {limit} bytes")


class NoSpace(ClientError):
    """507 Insufficient Storage: the upload is fine, the server's disk (or quota) is full."""

    def __init__(self) -> None:
        super().__init__(507, "the server has no space left to store this upload")


class StorageUnavailable(ClientError):
    """503: the upload is fine, the object store cannot be reached now; the client may retry."""

    retry_after_s = 2

    def __init__(self) -> None:
        super().__init__(503, "the media storage is unavailable; try again shortly")


@dataclass
class Received:
    original_name: str = ""
    content_type: str | None = None
    temp_path: Path | None = None
    size: int = 0
    sha256: str = ""
    # The temp file's descriptor, written with os.write: no buffer that could hold back (and
    # later fail to flush) bytes the size cap and the hash already counted.
    _fd: int | None = field(default=None, repr=False)

    def discard(self) -> None:
        # Cleanup after an error: a failing close() must not hide that error or keep the file.
        with contextlib.suppress(OSError):
            self._close()
        if self.temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()
            self.temp_path = None

    def _close(self) -> None:
        """Closes the temp file's descriptor once; errors of close() itself are the caller's."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def temp_owner() -> str:
    return f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def clean_name(raw: str) -> str:
    """The client's file name as text to store and show: no control characters, bounded.
    A long name is cut in the middle so that its extension stays."""
    name = "".join(ch for ch in raw if unicodedata.category(ch)[0] != "C").strip()
    if len(name) <= MAX_NAME_CHARS:
        return name
    ext = os.path.splitext(name)[1][:16]
    return name[: MAX_NAME_CHARS - len(ext)] + ext


def boundary_of(content_type: str | None) -> bytes:
    if not content_type:
        raise ClientError(415, "expected a multipart/form-data body with a `file` field")
    if not content_type.isascii():  # header values and multipart boundaries are ASCII
        raise ClientError(400, "Content-Type header is not ASCII")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        got = ctype.decode("latin-1")
        raise ClientError(
            415, f"expected a multipart/form-data body with a `file` field, got {got!r}"
        )
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ClientError(400, "multipart body has no valid boundary")
    return boundary


_FILENAME_STAR = re.compile(r";\s*filename\*\s*=\s*([^;]+)", re.IGNORECASE)
# RFC 5987 allows these two charsets (RFC 8187, which replaces it, only UTF-8); "latin1" is an
# alias of ISO-8859-1 in the IANA charset registry. Any other name is refused rather than handed
# to Python's codec lookup, which knows codecs such as "idna" or "utf-16" that no client means.
_STAR_CHARSETS = {"utf-8": "utf-8", "iso-8859-1": "iso-8859-1", "latin1": "iso-8859-1"}


def _extended_filename(disposition: bytes) -> str | None:
    """The RFC 5987 `filename*=UTF-8''percent-encoded` parameter, which some clients send for
    non-ASCII names; None when absent or empty. python-multipart drops starred parameters, so it
    is read from the raw header."""
    star = _FILENAME_STAR.search(disposition.decode("latin-1"))
    if not star:
        return None
    charset, _, rest = star.group(1).strip().strip('"').partition("'")
    _language, quote, encoded = rest.partition("'")
    if not quote:
        raise ClientError(400, "filename* is not of the form charset'language'percent-encoded")
    codec = _STAR_CHARSETS.get(charset.strip().lower())
    if codec is None:
        shown = "".join(ch if ch.isprintable() else "?" for ch in charset)[:40]
        raise ClientError(
            400, f'filename* charset "{shown}" is not supported (use UTF-8 or ISO-8859-1)'
        )
    return unquote(encoded, encoding=codec, errors="replace") or None


class _Receiver:
    """python-multipart callbacks that route the one `file` part to a temp file."""

    def __init__(
        self, tmp_dir: Path, max_bytes: int, allowed: Collection[str] = formats.ALL_NAMES
    ) -> None:
        self.tmp_dir = tmp_dir
        self.allowed = allowed
        self.max_bytes = max_bytes
        self.result = Received()
        self._hash = hashlib.sha256()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._in_file = False
        self._parts = 0
        self._done = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ClientError(400, f"too many parts in the form (the limit is {MAX_PARTS})")
        self._headers = {}
        self._header_field = self._header_value = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _kind, params = parse_options_header(disposition)
        if params.get(b"name", b"").decode("utf-8", "replace") != FIELD:
            return
        result = self.result
        if result.temp_path is not None:
            raise ClientError(400, f"more than one `{FIELD}` part in the form")
        # The plain name first: an upload refused for its filename* is recorded under it.
        plain = params.get(b"filename")
        result.original_name = clean_name(plain.decode("utf-8", "replace") if plain else "")
        extended = _extended_filename(disposition)
        if extended is not None:
            result.original_name = clean_name(extended)
        ctype = self._headers.get(b"content-type")
        result.content_type = ctype.decode("latin-1").strip() if ctype else None
        # Name and type are known now, before the first byte of the file: a refused one is not
        # read any further, and never written to disk.
        imaging.check_name_and_type(result.original_name, result.content_type, self.allowed)
        fd, path = tempfile.mkstemp(prefix=temp_owner(), suffix=".part", dir=self.tmp_dir)
        result.temp_path = Path(path)
        result._fd = fd
        self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file:
            return  # other form fields are read past, never kept
        chunk = memoryview(data)[start:end]
        result = self.result
        result.size += len(chunk)
        if result.size > self.max_bytes:
            raise TooLarge(self.max_bytes)
        self._hash.update(chunk)
        assert result._fd is not None
        _write_all(result._fd, chunk)

    def on_part_end(self) -> None:
        self._in_file = False

    def on_end(self) -> None:
        self._done = True

    def finish(self) -> Received:
        result = self.result
        if not self._done:
            raise ClientError(400, "multipart body ended early (no closing boundary)")
        if result.temp_path is None:
            raise ClientError(
                400, f"no `{FIELD}` part in the form (send it with -F {FIELD}=@photo.jpg)"
            )
        result._close()  # close() reports deferred write errors (quota on NFS): inside the try
        result.sha256 = self._hash.hexdigest()
        return result


async def receive(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    tmp_dir: Path,
    max_bytes: int,
    max_body_bytes: int | None = None,
    allowed: Collection[str] = formats.ALL_NAMES,
) -> Received:
    """Reads the whole body. The file part may hold up to max_bytes, the whole body (other form
    fields too) up to max_body_bytes. On any error the temp file is removed and the error is
    re-raised with the partial Received attached as `exc.received` (to record it by name)."""
    if max_body_bytes is None:
        max_body_bytes = max_bytes + OVERHEAD
    boundary = boundary_of(content_type)
    receiver = _Receiver(tmp_dir, max_bytes, allowed)
    parser = MultipartParser(boundary, receiver.callbacks())
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > max_body_bytes:
                raise TooLarge(max_bytes)
            parser.write(chunk)
        parser.finalize()
        return receiver.finish()
    except MultipartParseError as exc:
        receiver.result.discard()
        err = ClientError(400, f"malformed multipart body: {exc}")
        err.received = receiver.result  # type: ignore[attr-defined]
        raise err from None
    except OSError as exc:
        receiver.result.discard()
        if not is_no_space(exc):
            exc.received = receiver.result  # type: ignore[attr-defined]
            raise
        full = NoSpace()
        full.received = receiver.result  # type: ignore[attr-defined]
        raise full from exc
    except BaseException as exc:
        receiver.result.discard()
        exc.received = receiver.result  # type: ignore[attr-defined]
        raise


def sweep_temp_files(tmp_dir: Path) -> int:
    """Removes upload temp files whose writing process is gone (or was this host's previous run
    under the same pid). Files of live sibling processes on this host are left alone."""
    host = socket.gethostname()
    me = os.getpid()
    removed = 0
    for path in tmp_dir.glob(f"{TEMP_PREFIX}*.part"):
        rest = path.name[len(TEMP_PREFIX) :]
        parts = rest.split("-")
        if len(parts) < 3:
            continue
        owner_host, pid_text = "-".join(parts[:-2]), parts[-2]
        pid = whole_number(pid_text)
        if owner_host != host or pid is None:
            continue
        if pid != me and _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no process has such a pid
        return False
    except PermissionError:
        return True
    # A killed process lingers as a zombie until its parent reaps it: it writes nothing more.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    return True
