"""Media in S3-compatible object storage (STORAGE_URL=s3://BUCKET/PREFIX): key K is the object
PREFIX/K. Only the plain S3 API is used, so AWS, MinIO, Garage, R2 and Ceph all serve.

Originals are written as multipart uploads at their final key. stage_file uploads the parts and
leaves the upload open: S3 shows nothing under the key until CompleteMultipartUpload, which is
publish(). A process that dies in between leaves an open upload; the start-up sweep completes it
when a record refers to its key, and aborts it otherwise. Every S3 write is atomic, so a key
never holds a partial object.

Reads of an opened object name the ETag seen at open (If-Match): a replaced object is never mixed
into the bytes sent. Unlike a local file handle, S3 cannot keep a deleted object readable, so a
read after a delete or a replace raises MediaMissing instead of giving the old bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import os
import socket
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from imgapi_core.media import (
    ORIGINALS,
    THUMBNAILS,
    MediaMissing,
    MediaStat,
    MediaUnavailable,
    Referenced,
    Staged,
    is_valid_key,
)

if TYPE_CHECKING:
    from imgapi_core.settings import Settings

log = logging.getLogger("imgapi")


@functools.cache
def _session() -> AioSession:
    """One botocore session per process: it keeps the parsed service models, which take a
    tenth of a second to load for every client of a session of its own."""
    return get_session()


T = TypeVar("T")

MiB = 1024 * 1024
CHUNK = 256 * 1024  # what a reader yields at a time
LOCAL_FILE_CHUNK = MiB
# Above this a file goes up in parts: a failed part is retried alone, and no more than one part is
# in memory. S3 wants parts of 5 MiB at least (except the last) and at most 10,000 of them.
MULTIPART_THRESHOLD = 16 * MiB
PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
BATCH = 1000  # DeleteObjects takes at most 1000 keys; referenced() is asked as many at a time
PRESIGN_MAX_S = 7 * 24 * 3600  # SigV4 refuses longer
# How long a read of an original that is staged (not yet published) waits, in steps, before it
# says MediaUnavailable: publish follows the record's commit within milliseconds.
PUBLISH_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8)
# A stream cut in the middle of a ranged read is taken up again from where it broke, this often.
STREAM_RESUMES = 2

# Error codes that say "try again later", whatever the status (S3 sends SlowDown as a 503, and
# some servers RequestTimeout as a 400).
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
)
_UNREACHABLE = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError, proxies
    HTTPClientError,  # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError
    IncompleteReadError,  # a body cut short of its Content-Length
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
)


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """S3's and the network's errors as the media interface's: MediaMissing for a missing object
    (or one changed since it was opened), MediaUnavailable for a store that cannot answer now.
    Anything else (access denied, a bad request) goes on as it is: a retry would not help."""
    try:
        yield
    except ClientError as exc:
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            raise MediaUnavailable(f"S3 bucket is gone ({what})") from exc
        if status in (404, 412) or code in ("NoSuchKey", "NoSuchUpload", "PreconditionFailed"):
            raise MediaMissing(what) from exc
        if status >= 500 or code in _TRANSIENT_CODES:
            raise MediaUnavailable(f"S3 answered {status} {code} ({what})") from exc
        raise
    except _UNREACHABLE as exc:
        raise MediaUnavailable(f"S3 cannot be reached ({what}): {exc}") from exc


def _md5(data: bytes) -> str:
    # Content-MD5: every S3-compatible server checks it, so a corrupted upload is refused.
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _read_all(source: Path) -> tuple[bytes, str]:
    data = source.read_bytes()
    return data, _md5(data)


def _read_part(fd: int, offset: int, length: int) -> tuple[bytes, str]:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise OSError(f"file ended at byte {offset}: it changed while being uploaded")
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    data = b"".join(chunks)
    return data, _md5(data)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _add_content_md5(params: dict[str, Any], **_kwargs: Any) -> None:
    """botocore sends DeleteObjects with a CRC32 checksum only; older MinIO, Ceph and other
    servers insist on the Content-MD5 that S3 long required for this call."""
    body = params.get("body")
    headers = params.setdefault("headers", {})
    if isinstance(body, bytes) and "Content-MD5" not in headers:
        headers["Content-MD5"] = _md5(body)


def content_disposition(filename: str) -> str:
    """`inline` with the name: RFC 6266's ASCII fallback, then RFC 8187's UTF-8 form, which
    every current browser prefers. Both are plain ASCII whatever the name holds."""
    fallback = "".join(
        ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\%' else "_" for ch in filename
    ).strip()
    encoded = urllib.parse.quote(filename, safe="")
    return f"inline; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{encoded}"


@dataclass(frozen=True)
class _Head:
    size: int
    mtime: float
    etag: str


async def _ask(referenced: Referenced, keys: list[str]) -> set[str]:
    """referenced() about BATCH keys at a time, however many a server put in one page."""
    claimed: set[str] = set()
    for start in range(0, len(keys), BATCH):
        claimed |= await referenced(keys[start : start + BATCH])
    return claimed


class S3Media:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        tmp_dir: Path,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 parts are {MIN_PART_SIZE} bytes at least, not {part_size}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.tmp_dir = tmp_dir
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Standard mode retries throttling, 5xx and connection errors with backoff; a few
            # attempts keep a server that is down a matter of seconds, not minutes.
            retries={"mode": "standard", "max_attempts": max_attempts},
            signature_version="s3v4",
            # A streamed original holds a connection while it is sent: more than the default 10.
            max_pool_connections=64,
            # botocore's default CRC32 checksums (since 1.36; aws-chunked trailers over HTTPS)
            # are refused by several S3-compatible servers; integrity comes from Content-MD5.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # MinIO, Garage and Ceph are mostly set up without wildcard DNS for bucket names.
            s3={"addressing_style": "path"} if self.endpoint_url else {},
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._s3: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> S3Media:
        parts = urllib.parse.urlsplit(settings.storage_url)
        return cls(
            parts.netloc,
            parts.path,
            tmp_dir=settings.tmp_dir,
            endpoint_url=settings.s3_endpoint_url,
            access_key_id=settings.aws_access_key_id,
            secret_access_key=settings.aws_secret_access_key,
            region=settings.aws_region,
            **options,
        )

    @property
    def where(self) -> str:
        """The bucket and endpoint, for messages."""
        path = f"/{self.prefix}" if self.prefix else ""
        return f"s3://{self.bucket}{path} at {self.endpoint_url or 'AWS'}"

    async def open(self) -> S3Media:
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                _session().create_client(
                    "s3",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    config=self._config,
                )
            )
            client.meta.events.register("before-call.s3.DeleteObjects", _add_content_md5)
            await client.head_bucket(Bucket=self.bucket)
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, ClientError | BotoCoreError | aiohttp.ClientError | TimeoutError):
                raise MediaUnavailable(self._open_failure(exc)) from exc
            raise
        self._stack, self._s3 = stack, client
        return self

    def _open_failure(self, exc: BaseException) -> str:
        if isinstance(exc, ClientError):
            code, status = _error_code(exc)
            if status == 404 or code == "NoSuchBucket":
                return f"no bucket {self.bucket!r} at {self.endpoint_url or 'AWS'}"
            if status == 403:
                return f"access to {self.where} denied: check AWS_ACCESS_KEY_ID/SECRET"
            return f"{self.where} answered {status} {code}"
        if isinstance(exc, NoCredentialsError):
            return f"no S3 credentials for {self.where}: set AWS_ACCESS_KEY_ID/SECRET"
        return f"cannot reach {self.where}: {exc or type(exc).__name__}"

    async def ping(self) -> None:
        with _errors(f"bucket {self.bucket}"):
            await self.client.head_bucket(Bucket=self.bucket)

    async def close(self) -> None:
        stack, self._stack, self._s3 = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        if self._s3 is None:
            raise RuntimeError("S3Media is not open")
        return self._s3

    def name(self, key: str) -> str:
        """The object name of a storage key."""
        if not is_valid_key(key):
            raise ValueError(f"not a storage key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key_of(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    # -- writing ----------------------------------------------------------------------------

    async def put_file(self, key: str, source: Path) -> None:
        name = self.name(key)
        size = (await asyncio.to_thread(source.stat)).st_size
        if size > self.multipart_threshold:
            upload_id = await self._create_upload(key)
            try:
                parts = await self._upload_parts(key, upload_id, source, size)
                await self._complete(key, upload_id, parts)
            except BaseException:
                await self._abort_quietly(key, upload_id)
                raise
        else:
            data, md5 = await asyncio.to_thread(_read_all, source)
            with _errors(key):
                await self.client.put_object(
                    Bucket=self.bucket, Key=name, Body=data, ContentMD5=md5
                )
        await asyncio.to_thread(_unlink, source)

    async def stage_file(self, key: str, source: Path) -> Staged:
        size = (await asyncio.to_thread(source.stat)).st_size
        upload_id = await self._create_upload(key)
        try:
            await self._upload_parts(key, upload_id, source, size)
        except BaseException:
            await self._abort_quietly(key, upload_id)
            raise
        await asyncio.to_thread(_unlink, source)
        return Staged(key, upload_id)

    async def publish(self, staged: Staged) -> None:
        try:
            if not staged.token:
                raise MediaMissing(staged.key)
            parts = await self._list_parts(staged.key, staged.token)
            await self._complete(staged.key, staged.token, parts)
        except MediaMissing:
            # No such upload: published already (by the sweep, or an earlier try) when the
            # object is there; else the staged bytes are lost.
            if await self._head(staged.key) is None:
                raise
            return None

    async def discard(self, staged: Staged) -> None:
        if staged.token:
            await self._abort(staged.key, staged.token)
        # Published after all (a publish that failed on the way back): the object goes too.
        with _errors(staged.key):
            await self.client.delete_object(Bucket=self.bucket, Key=self.name(staged.key))

    async def presigned_url(
        self, key: str, expires_s: int, content_type: str, filename: str | None = None
    ) -> str | None:
        params = {"Bucket": self.bucket, "Key": self.name(key), "ResponseContentType": content_type}
        if filename is not None:
            params["ResponseContentDisposition"] = content_disposition(filename)
        expires = max(1, min(int(expires_s), PRESIGN_MAX_S))
        return await self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires
        )

    async def put_bytes(self, key: str, data: bytes) -> None:
        name = self.name(key)
        with _errors(key):
            await self.client.put_object(
                Bucket=self.bucket, Key=name, Body=data, ContentMD5=_md5(data)
            )

    async def delete(self, keys: Iterable[str]) -> None:
        names = [self.name(key) for key in keys]
        for start in range(0, len(names), BATCH):
            await self._delete_names(names[start : start + BATCH])

    async def _delete_names(self, names: list[str]) -> None:
        if not names:
            return
        with _errors(f"{len(names)} objects"):
            answer = await self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
            )
        # S3 reports a missing key as deleted; a few servers report NoSuchKey: both are fine.
        errors = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            message = (
                f"S3 did not delete {len(errors)} of {len(names)} objects, e.g. "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip()
            )
            if first.get("Code") in _TRANSIENT_CODES:
                raise MediaUnavailable(message)
            raise OSError(message)

    # -- multipart uploads -------------------------------------------------------------------

    async def _create_upload(self, key: str) -> str:
        with _errors(key):
            answer = await self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.name(key)
            )
        return answer["UploadId"]

    def _part_size_for(self, size: int) -> int:
        return max(self.part_size, -(-size // MAX_PARTS))

    async def _upload_parts(
        self, key: str, upload_id: str, source: Path, size: int
    ) -> list[dict[str, Any]]:
        """Uploads the file in parts, one in memory at a time, read off the event loop. Always
        one part at least: an empty file is one empty part."""
        name, part_size = self.name(key), self._part_size_for(size)
        parts: list[dict[str, Any]] = []
        fd = await asyncio.to_thread(os.open, source, os.O_RDONLY)
        try:
            offset, number = 0, 1
            while offset < size or number == 1:
                length = min(part_size, size - offset)
                data, md5 = await asyncio.to_thread(_read_part, fd, offset, length)
                with _errors(key):
                    answer = await self.client.upload_part(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ContentMD5=md5,
                    )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                offset += length
                number += 1
                del data  # not kept while the next part is read
        finally:
            os.close(fd)
        return parts

    async def _list_parts(self, key: str, upload_id: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=self.name(key), UploadId=upload_id
        )
        with _errors(key):
            async for page in pages:
                for part in page.get("Parts", []):
                    parts.append({"PartNumber": part["PartNumber"], "ETag": part["ETag"]})
        return sorted(parts, key=lambda part: part["PartNumber"])

    async def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        with _errors(key):
            await self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.name(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )

    async def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(MediaMissing), _errors(key):
            await self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.name(key), UploadId=upload_id
            )

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        """After a failed write, whose own error is the one to raise. An upload left open is
        aborted by the next sweep (or by the bucket's lifecycle rule, where there is one)."""
        try:
            await self._abort(key, upload_id)
        except Exception:
            log.warning("could not abort the S3 upload of %s", key, exc_info=True)

    # -- reading ----------------------------------------------------------------------------

    async def _head(self, key: str) -> _Head | None:
        try:
            with _errors(key):
                answer = await self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        except MediaMissing:
            return None
        return _Head(answer["ContentLength"], answer["LastModified"].timestamp(), answer["ETag"])

    async def stat(self, key: str) -> MediaStat | None:
        head = await self._head(key)
        if head is None or head.size == 0:
            return None
        return MediaStat(head.size, head.mtime)

    async def read_bytes(self, key: str) -> bytes:
        with _errors(key):
            answer = await self.client.get_object(Bucket=self.bucket, Key=self.name(key))
            async with answer["Body"] as body:
                data = await body.read()
        if not data:
            raise MediaMissing(key)
        return data

    async def _missing(self, key: str) -> MediaMissing | MediaUnavailable:
        """What a read of a missing object raises. An original whose record committed a moment
        ago may still be an open upload (stage_file, the commit, then publish): that is a wait
        (a job retries it, a client gets a 503), not a loss."""
        if key.startswith(f"{ORIGINALS}/"):
            with _errors(key):
                answer = await self.client.list_multipart_uploads(
                    Bucket=self.bucket, Prefix=self.name(key), MaxUploads=10
                )
            if any(u["Key"] == self.name(key) for u in answer.get("Uploads", [])):
                return MediaUnavailable(f"{key} is stored but not published yet")
            # Or published between the failed read and that listing.
            if await self._head(key) is not None:
                return MediaUnavailable(f"{key} was published while it was read; read it again")
        return MediaMissing(key)

    async def _until_published(self, key: str, attempt: Callable[[], Awaitable[T | None]]) -> T:
        """attempt() until it finds the object. While the object is an original whose upload is
        staged (its record committed a moment ago, its publish is on the way), it waits a little
        and asks again, so that a job or a reader that comes that early spends none of its
        tries; past PUBLISH_WAITS it publishes the upload itself. A missing object is
        MediaMissing; an upload that cannot be published now, MediaUnavailable."""
        for wait in (*PUBLISH_WAITS, None):
            found = await attempt()
            if found is not None:
                return found
            problem = await self._missing(key)
            if isinstance(problem, MediaMissing):
                raise problem
            if wait is None:
                break
            await asyncio.sleep(wait)
        # Still staged after every wait: its publish failed (the S3 server refused it, or the
        # process died right after the commit). Only a committed record leads a reader to an
        # original's key, so the reader publishes it rather than leave it unreadable until the
        # next start-up sweep.
        if await self._publish_left_staged(key):
            found = await attempt()
            if found is not None:
                return found
        raise problem

    async def _publish_left_staged(self, key: str) -> bool:
        with _errors(key):
            answer = await self.client.list_multipart_uploads(
                Bucket=self.bucket, Prefix=self.name(key), MaxUploads=10
            )
        uploads_ = [u for u in answer.get("Uploads", []) if u["Key"] == self.name(key)]
        if not uploads_:
            return await self._head(key) is not None  # published meanwhile, by someone else
        latest = max(uploads_, key=lambda u: u["Initiated"])
        try:
            await self.publish(Staged(key, latest["UploadId"]))
        except MediaMissing:
            return False
        log.warning("published %s on read: its upload had been left staged", key)
        return True

    @contextlib.asynccontextmanager
    async def reader(self, key: str) -> AsyncIterator[S3Reader]:
        async def opened() -> _Head | None:
            head = await self._head(key)
            return head if head is not None and head.size > 0 else None

        head = await self._until_published(key, opened)
        yield S3Reader(self, key, head.etag, MediaStat(head.size, head.mtime))

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        await asyncio.to_thread(self.tmp_dir.mkdir, parents=True, exist_ok=True)
        # Named as uploads.temp_owner() names an upload's temp file (the media layer imports
        # nothing above it): a process killed while holding it leaves a file the next
        # start-up's sweep_temp_files removes.
        owner = f"upload-{socket.gethostname()}-{os.getpid()}-"
        fd, raw_path = await asyncio.to_thread(
            tempfile.mkstemp, prefix=owner, suffix=".part", dir=self.tmp_dir
        )
        path = Path(raw_path)

        async def download() -> Path | None:
            # Each try starts the file afresh (a cheap syscall pair).
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(fd, "wb", closefd=False) as out:
                written = 0
                try:
                    with _errors(key):
                        answer = await self.client.get_object(
                            Bucket=self.bucket, Key=self.name(key)
                        )
                        async with answer["Body"] as body:
                            while chunk := await body.read(LOCAL_FILE_CHUNK):
                                await asyncio.to_thread(out.write, chunk)
                                written += len(chunk)
                except MediaMissing:
                    return None
            return path if written else None

        try:
            yield await self._until_published(key, download)
        finally:
            os.close(fd)
            await asyncio.to_thread(_unlink, path)

    # -- the start-up sweep ------------------------------------------------------------------

    async def sweep_orphans(self, referenced: Referenced, older_than: float) -> int:
        """Removes objects older than `older_than` that no record claims, and objects under
        originals/ or thumbnails/ that are no storage key (nothing of ours reads them); completes
        open uploads that a record refers to (a process died between its commit and publish) and
        aborts unclaimed ones begun before `older_than`. Nothing outside PREFIX/originals/ and
        PREFIX/thumbnails/ is touched: the bucket may hold other things."""
        removed = 0
        for folder in (ORIGINALS, THUMBNAILS):
            removed += await self._sweep_objects(self._folder(folder), referenced, older_than)
        published = aborted = 0
        for folder in (ORIGINALS, THUMBNAILS):
            done = await self._sweep_uploads(self._folder(folder), referenced, older_than)
            published += done[0]
            aborted += done[1]
        if published:
            log.info("published %d staged originals whose records were committed", published)
        return removed + aborted

    def _folder(self, folder: str) -> str:
        return f"{self.prefix}/{folder}/" if self.prefix else f"{folder}/"

    async def _sweep_objects(self, folder: str, referenced: Referenced, older_than: float) -> int:
        removed = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=folder, PaginationConfig={"PageSize": BATCH}
        )
        with _errors(f"listing {folder}"):
            # A page (BATCH keys) at a time: memory stays flat however big the bucket, and
            # referenced() is asked about one page at a time.
            async for page in pages:
                old = [
                    obj["Key"]
                    for obj in page.get("Contents", [])
                    if obj["LastModified"].timestamp() < older_than
                ]
                keys = [self._key_of(name) for name in old if is_valid_key(self._key_of(name))]
                keep = await _ask(referenced, keys)
                doomed = [
                    name
                    for name in old
                    if not is_valid_key(self._key_of(name)) or self._key_of(name) not in keep
                ]
                await self._delete_names(doomed)
                removed += len(doomed)
        return removed

    async def _sweep_uploads(
        self, folder: str, referenced: Referenced, older_than: float
    ) -> tuple[int, int]:
        published = aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=folder, PaginationConfig={"PageSize": BATCH}
        )
        with _errors(f"listing uploads under {folder}"):
            async for page in pages:
                # Oldest first: were a key staged twice, the latest upload is the one that stays.
                uploads_ = sorted(page.get("Uploads", []), key=lambda u: u["Initiated"])
                keys = [self._key_of(u["Key"]) for u in uploads_]
                valid = [key for key in keys if is_valid_key(key)]
                claimed = await _ask(referenced, valid)
                for upload, key in zip(uploads_, keys, strict=True):
                    # Whatever its age: the record has committed, so its writer is done with it
                    # but for publish(), which finds the work done.
                    if key in claimed:
                        staged = Staged(key, upload["UploadId"])
                        published += await self._sweep_one(self.publish, staged)
                    elif upload["Initiated"].timestamp() < older_than:
                        aborted += await self._sweep_one(self._abort_name, upload)
        return published, aborted

    async def _abort_name(self, upload: dict[str, Any]) -> None:
        with contextlib.suppress(MediaMissing), _errors(upload["Key"]):
            await self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )

    @staticmethod
    async def _sweep_one(action: Any, item: Any) -> bool:
        """One leftover that S3 refuses to complete or abort must not stop the sweep (and with
        it the start-up); a store that cannot be reached does."""
        try:
            await action(item)
        except MediaUnavailable:
            raise
        except (MediaMissing, ClientError) as exc:
            log.warning("sweep: could not clear the S3 upload %s: %s", item, exc)
            return False
        return True


class S3Reader:
    """An object as it was at open: ranged GETs that name its ETag (If-Match), so a replaced
    object fails (MediaMissing) instead of mixing versions."""

    def __init__(self, media: S3Media, key: str, etag: str, stat: MediaStat) -> None:
        self._media = media
        self._key = key
        self._etag = etag
        self.stat = stat

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        end = self.stat.size if end is None else min(end, self.stat.size)
        offset = max(0, start)
        resumes = 0
        while offset < end:
            before = offset
            try:
                # Closed at once when the caller stops early: the connection goes back now.
                async with contextlib.aclosing(self._ranged_get(offset, end)) as stream:
                    async for chunk in stream:
                        offset += len(chunk)
                        yield chunk
            except MediaUnavailable:
                # A connection cut mid-body: go on from where it broke, a few times.
                if offset == before or resumes >= STREAM_RESUMES:
                    raise
                resumes += 1
                continue
            if offset == before:
                # The caller may have promised the length already: fail rather than come up short.
                raise OSError(f"object ended at byte {offset} of {end}")

    async def _ranged_get(self, offset: int, end: int) -> AsyncIterator[bytes]:
        media = self._media
        with _errors(self._key):
            answer = await media.client.get_object(
                Bucket=media.bucket,
                Key=media.name(self._key),
                Range=f"bytes={offset}-{end - 1}",
                IfMatch=self._etag,
            )
            async with answer["Body"] as body:
                while offset < end:
                    chunk = await body.read(min(CHUNK, end - offset))
                    if not chunk:
                        return
                    offset += len(chunk)
                    yield chunk
