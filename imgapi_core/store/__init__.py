"""The store interface: where uploads, metadata, jobs and stats live.

One protocol with the domain methods the service uses, returning the small dataclasses below
(never a driver's row type), and `open_store(settings)` to get the configured implementation.
SQLite (imgapi_core.store.sqlite) is the one today; a PostgreSQL one slots in beside it without
touching callers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from imgapi_core.timestamps import now_iso

if TYPE_CHECKING:
    from imgapi_core.settings import Settings

JOB_KINDS = ("thumbnail", "exif", "caption")
JOB_STATES = ("queued", "running", "done", "failed", "skipped", "unavailable")
# A job in one of these will not run again unless it is retried; an image whose jobs are all
# finished is ready. "unavailable": it could not run here (captioning not installed, no model).
FINISHED = ("done", "failed", "skipped", "unavailable")

# What the event log records, in the transaction of the change it describes.
EVENT_TYPES = (
    "image.uploaded",  # state: success or failed (a failed upload is recorded too)
    "image.ready",  # every job of the image is finished
    "image.deleted",
    "job.started",
    "job.queued",  # queued again: a retry after an error, a lapsed runner, or a manual retry
    "job.done",  # state: done, skipped or unavailable
    "job.failed",
)
# The events a webhook delivery is made for.
WEBHOOK_EVENTS = ("image.ready", "job.failed")
DELIVERY_STATES = ("pending", "delivering", "delivered", "failed")


@dataclass(frozen=True)
class Record:
    """One upload, failed or stored, with the metadata of its bytes when it was stored."""

    image_id: str
    original_name: str
    processed_at: str
    error: str | None = None
    original_key: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    size_bytes: int | None = None
    first_upload: str | None = None
    exif_json: str | None = None
    caption: str | None = None
    frames: int | None = None
    orientation: int | None = None
    # EXIF DateTimeOriginal on the camera's clock, YYYY-MM-DDTHH:MM:SS (no zone: EXIF has none)
    taken_at: str | None = None


@dataclass(frozen=True)
class ImageQuery:
    """What a listing asks for: filters (all must hold), words, and an order. Words match the
    name, the caption and the camera, each as a prefix ("sun" finds "sunset")."""

    status: str | None = None  # success | failed
    words: tuple[str, ...] = ()
    format: str | None = None
    camera: str | None = None  # the make or the model, whole, case-insensitive
    taken_after: str | None = None  # YYYY-MM-DDTHH:MM:SS, inclusive
    taken_before: str | None = None  # exclusive
    has_gps: bool | None = None
    uploaded_after: str | None = None  # RFC 3339 UTC as stored, inclusive
    uploaded_before: str | None = None  # exclusive
    sort: str = "uploaded"  # uploaded | taken (newest first) | relevance (needs words)


SORTS = ("uploaded", "taken", "relevance")


@dataclass(frozen=True)
class JobState:
    kind: str
    state: str
    attempts: int
    error: str | None = None
    runner: str | None = None


@dataclass(frozen=True)
class KnownImage:
    """What an earlier, successful upload of the same bytes established."""

    sha256: str
    width: int
    height: int
    format: str
    frames: int = 1
    orientation: int = 1


@dataclass(frozen=True)
class Stats:
    total: int
    failed: int
    processing: int
    average_processing_time_seconds: float | None
    jobs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    sha256: str
    kind: str
    attempts: int


@dataclass(frozen=True)
class Deleted:
    original_key: str | None
    sha256: str | None
    last_reference: bool


@dataclass(frozen=True)
class NewUpload:
    """A validated upload, ready to be recorded with its jobs."""

    image_id: str
    original_name: str
    processed_at: str
    start_time: str
    original_key: str
    sha256: str
    width: int
    height: int
    format: str
    size_bytes: int
    # Each job kind's first state and a note ("queued", or "skipped" with why).
    jobs: Mapping[str, tuple[str, str | None]]
    # SHA-256 of the upload's delete token (shown once, in the 201 answer), when it has one.
    delete_token_hash: str | None = None
    frames: int = 1
    orientation: int = 1


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: never its token, only the token's hash."""

    name: str
    key_id: str  # the public part of the token, by which a request's token is looked up
    token_hash: str
    scopes: tuple[str, ...]
    created_at: str
    last_used_at: str | None = None
    revoked_at: str | None = None


@dataclass(frozen=True)
class Event:
    """One row of the event log; ids grow in commit order."""

    id: int
    type: str
    image_id: str
    kind: str | None
    state: str | None
    error: str | None
    at: str

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.type,
            "image_id": self.image_id,
            "kind": self.kind,
            "state": self.state,
            "error": self.error,
            "at": self.at,
        }


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery: one event to one URL, retried until delivered or given up."""

    delivery_id: str
    event_id: int
    event_type: str
    image_id: str
    url: str
    state: str
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    event_json: str
    body: str | None
    created_at: str
    updated_at: str
    delivered_at: str | None


class KeyExists(ValueError):
    """A key of that name exists (and is not revoked)."""


class NotWritable(RuntimeError):
    """The database can be read but not written (a read-only file, folder or mount)."""


class StoreUnavailable(ConnectionError):
    """The database server cannot be reached now (restarting, network down): worth a retry. The
    API answers 503 with Retry-After; nothing half-written is left (the transaction rolled back)."""


JobsByImage = dict[str, dict[str, JobState]]


def all_finished(jobs: Mapping[str, JobState]) -> bool:
    """Whether an image is ready: none of its jobs is queued or running."""
    return all(job.state in FINISHED for job in jobs.values())


class Store(Protocol):
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def check_writable(self) -> None:
        """Raises NotWritable when a write would fail."""
        ...

    # uploads
    async def record_success(self, upload: NewUpload) -> bool:
        """All rows of a stored upload at once; True when it has jobs still to run."""
        ...

    async def record_failure(
        self, *, image_id: str, original_name: str, processed_at: str, start_time: str, error: str
    ) -> None: ...
    async def known_image(self, sha256: str) -> KnownImage | None: ...

    # reading
    async def get_record(self, image_id: str) -> Record | None: ...
    async def record_with_jobs(self, image_id: str) -> tuple[Record | None, dict[str, JobState]]:
        """One record and its jobs, read in one snapshot."""
        ...

    async def search_with_jobs(
        self, query: ImageQuery, *, limit: int, after: tuple[str, str] | None = None
    ) -> tuple[list[Record], JobsByImage, list[tuple[str, str]]]:
        """A page of the records the query selects, in its order, their jobs, and each record's
        position (sort key, image_id): the last one is where the next page starts (`after`)."""
        ...

    async def stats(self) -> Stats: ...
    async def job_counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (kind, state)."""
        ...

    # deleting, and what the start-up sweep compares files with
    async def delete_image(self, image_id: str) -> Deleted | None: ...
    async def original_keys(self) -> set[str]: ...
    async def original_hashes(self) -> dict[str, str]:
        """Storage key of every stored original -> the SHA-256 of its bytes (migrate-store
        checks each copy against it)."""
        ...

    async def known_sha256s(self, sha256s: Iterable[str]) -> set[str]:
        """Those of `sha256s` that some stored image still refers to."""
        ...

    async def original_of(self, sha256: str) -> str | None:
        """The storage key of any stored original of these bytes."""
        ...

    # jobs
    async def claim_job(
        self, sha256: str, kind: str, runner: str, lease_s: float
    ) -> Job | None: ...
    async def renew_leases(
        self, runner: str, jobs: Iterable[tuple[str, str]], lease_s: float
    ) -> int: ...
    async def finish_job(
        self, sha256: str, kind: str, runner: str, state: str, error: str | None = None
    ) -> bool: ...
    async def retry_job(
        self, sha256: str, kind: str, runner: str, error: str, delay_s: float
    ) -> bool: ...
    async def skip_queued(self, kind: str, reason: str) -> int: ...
    async def requeue_jobs(
        self, kind: str, states: Iterable[str], sha256: str | None = None
    ) -> list[Job]:
        """Jobs of `kind` in one of `states` (of one image's bytes, or all) queued again with
        their attempts reset; their uploads count as processing again. Returns them."""
        ...

    async def due_jobs(self, limit: int, updated_before: str | None = None) -> list[Job]: ...
    async def release_lapsed(
        self, max_attempts: int, backoff_s: Callable[[int], float]
    ) -> list[Job]: ...
    async def job_state(self, sha256: str, kind: str) -> JobState | None: ...
    async def set_exif(self, sha256: str, exif_json: str) -> None: ...
    async def set_caption(self, sha256: str, caption: str) -> None: ...

    # access: API keys, server secrets, delete tokens
    async def create_key(self, key: ApiKey) -> None:
        """Raises KeyExists when a key of that name is in use; a revoked name may be reused."""
        ...

    async def list_keys(self) -> list[ApiKey]: ...
    async def revoke_key(self, name: str, at: str) -> bool: ...
    async def active_keys(self) -> list[ApiKey]:
        """Every key that is not revoked: what a process caches to check requests."""
        ...

    async def mark_keys_used(self, used: Mapping[str, str]) -> None:
        """key_id -> when it was last used."""
        ...

    async def secret(self, name: str, make: Callable[[], str]) -> str:
        """The server secret of that name; made with `make` and kept the first time (once,
        whichever process asks first)."""
        ...

    async def delete_token_hash(self, image_id: str) -> str | None:
        """The hash of the upload's delete token; None when it has none (or no such image)."""
        ...

    # events: every state change above writes its events (and, for WEBHOOK_EVENTS, one
    # delivery per webhook URL) in its own transaction
    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(last_event_id)` after each commit that added events. It may be called from
        another thread and must not block."""
        ...

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        """Events with ids above `after_id`, oldest first."""
        ...

    async def last_event_id(self) -> int: ...
    async def prune_events(self, before: str) -> int:
        """Removes events made before that time (RFC 3339), and deliveries delivered by then."""
        ...

    # webhook deliveries
    async def claim_deliveries(self, runner: str, limit: int, lease_s: float) -> list[Delivery]:
        """Due pending deliveries (and ones whose runner vanished) -> delivering, attempts + 1."""
        ...

    async def keep_delivery_body(self, delivery_id: str, runner: str, body: str) -> str | None:
        """Keeps `body` as the delivery's body unless it has one; returns the body kept (None when
        the delivery is no longer held by `runner`). Kept before the first send, so that every
        attempt, even after a crash, sends the same bytes."""
        ...

    async def finish_delivery(
        self,
        delivery_id: str,
        runner: str,
        *,
        state: str,
        status: int | None,
        error: str | None,
        body: str,
        retry_at: float = 0.0,
    ) -> bool:
        """delivered, failed, or pending again (due at `retry_at`); the body sent is kept, so
        that a retry sends the same bytes."""
        ...

    async def deliveries(
        self, *, state: str | None, limit: int, before: tuple[str, str] | None = None
    ) -> list[Delivery]:
        """Newest first; `before` is the (created_at, delivery_id) of the last one seen."""
        ...

    async def requeue_deliveries(self, state: str = "failed") -> int:
        """Failed deliveries due again at once, with their attempts reset."""
        ...


async def open_store(settings: Settings) -> Store:
    """The configured store, opened: migrations applied, writability checked. DATABASE_URL picks
    PostgreSQL; unset, SQLite at DB_PATH."""
    if settings.database_url:
        from imgapi_core.store.postgres import PostgresStore

        return await PostgresStore(settings.database_url, webhook_urls=settings.webhook_url).open()
    from imgapi_core.store.sqlite import SqliteStore

    return await SqliteStore(settings.db_path, webhook_urls=settings.webhook_url).open()


__all__ = [
    "DELIVERY_STATES",
    "EVENT_TYPES",
    "FINISHED",
    "JOB_KINDS",
    "JOB_STATES",
    "SORTS",
    "WEBHOOK_EVENTS",
    "ApiKey",
    "Deleted",
    "Delivery",
    "Event",
    "ImageQuery",
    "Job",
    "JobState",
    "JobsByImage",
    "KeyExists",
    "KnownImage",
    "NewUpload",
    "NotWritable",
    "Record",
    "Stats",
    "Store",
    "StoreUnavailable",
    "all_finished",
    "now_iso",
    "open_store",
]
