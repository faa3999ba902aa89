"""Every setting of imgapi, declared once: name, default, type and one line of help.

Values come from the environment, then from a `.env` file, then from the defaults. `load()` checks
them all and raises SettingsError with a one-line message naming the first bad one.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, NoReturn


class SettingsError(ValueError):
    pass


def _positive_int(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if not value:
        return value
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix:// (or be empty)")
    # Parsed now by both parsers that will read it (redis-py's for the connections, arq's for the
    # worker's RedisSettings), so that a bad port or database number stops start-up instead of
    # failing every enqueue later. Imported here: reading settings needs no Redis client.
    from arq.connections import RedisSettings
    from redis.connection import parse_url

    try:
        parse_url(value)
        # redis-py skips a database path that is not a number; arq's parser refuses it.
        database = RedisSettings.from_dsn(value).database
    except ValueError as exc:
        raise ValueError(f"not a valid Redis URL ({exc})") from None
    if database < 0:
        raise ValueError("the database number must not be negative")
    return value


def _path(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _caption_model(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty (none turns captions off)")
    return value


def _public_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https:// (or be empty)")
    return value


def _database_url(raw: str) -> str:
    value = raw.strip()
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql:// (or be empty: SQLite at DB_PATH)")
    return value


def _storage_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not value:
        return value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            "must look like s3://BUCKET or s3://BUCKET/PREFIX (or be empty: MEDIA_DIR)"
        )
    return value


def _endpoint_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https:// (or be empty: AWS)")
    return value


def _text(raw: str) -> str:
    return raw.strip()


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0")


def _port(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535 (or 0: off)")
    return value


def _rate_limit(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("", "0"):
        return ""
    # The limits library reads it when the service starts; parsed now so a typo stops start-up.
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError:
        raise ValueError("must look like 120/minute (or 0: no limit)") from None
    return value


# The names of imgapi_core.formats (a test holds the two lists together; settings import nothing).
INPUT_FORMATS = ("jpeg", "png", "webp", "gif", "tiff", "avif", "heic")
OUTPUT_FORMATS = ("jpeg", "webp", "avif")


def _format_list(known: tuple[str, ...], required: str | None = None) -> Callable[[str], tuple]:
    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"must be a comma-separated list of {', '.join(known)}")
        if required and required not in names:
            raise ValueError(f"must include {required}")
        return names

    return parse


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"{origin!r} is not an origin (https://host[:port]) or *")
    return origins


def _webhook_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(dict.fromkeys(u.strip() for u in raw.split(",") if u.strip()))
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
    return urls


class Setting(NamedTuple):
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str


def setting(default: str, parse: Callable[[str], Any], help: str) -> Any:
    """A Settings field's declaration: its default as it would be written in the environment,
    the parser that checks and converts it, and one line of help."""
    return field(metadata={"default": default, "parse": parse, "help": help})


@dataclass(frozen=True)
class Settings:
    """Each field is one setting: its environment name is the field name in upper case. The
    README's settings table is checked against these fields."""

    db_path: str = setting(
        "./data/imgapi.db", _path, "SQLite database file (its folder is created)"
    )
    media_dir: str = setting(
        "./media", _path, "folder for originals/, thumbnails/ and upload temp files"
    )
    database_url: str = setting(
        "",
        _database_url,
        "postgresql://user:password@host/db: PostgreSQL instead of SQLite at DB_PATH",
    )
    storage_url: str = setting(
        "",
        _storage_url,
        "s3://BUCKET/PREFIX: originals and thumbnails in S3-compatible storage instead of"
        " MEDIA_DIR (which then holds upload temp files only)",
    )
    s3_endpoint_url: str = setting(
        "", _endpoint_url, "S3 API endpoint (MinIO, Garage, R2, ...); empty: AWS"
    )
    aws_access_key_id: str = setting("", _text, "S3 access key (empty: the AWS default chain)")
    aws_secret_access_key: str = setting("", _text, "S3 secret key")
    aws_region: str = setting("us-east-1", _text, "S3 region")
    s3_redirect: bool = setting(
        "0",
        _flag,
        "answer image and thumbnail reads with a 302 to a presigned S3 URL instead of streaming",
    )
    redis_url: str = setting(
        "", _redis_url, "Redis for arq jobs; empty runs jobs in-process, no Redis needed"
    )
    worker: str = setting(
        "inline",
        _choice("inline", "off"),
        "inline: this process runs jobs (an arq worker when REDIS_URL is set); "
        "off: only enqueue (needs REDIS_URL)",
    )
    job_concurrency: int = setting("4", _positive_int, "jobs one process runs at the same time")
    job_max_attempts: int = setting(
        "3", _positive_int, "tries of a failing job before it is marked failed"
    )
    job_lease_seconds: float = setting(
        "30",
        _positive_float,
        "a running job whose runner has not renewed its lease this long is handed out again",
    )
    sweep_seconds: float = setting(
        "2", _positive_float, "how often queued and stale jobs are looked for and handed out again"
    )
    arq_queue: str = setting(
        "imgapi:queue", _text, "arq queue name (Redis key) shared by API and workers"
    )
    arq_poll_seconds: float = setting(
        "0.05", _positive_float, "how often an idle arq worker polls Redis"
    )
    max_upload_bytes: int = setting(
        "50000000", _positive_int, "largest accepted file, checked as bytes arrive"
    )
    max_pixels: int = setting(
        "50000000",
        _positive_int,
        "largest accepted width x height, checked from the header before decoding",
    )
    public_url: str = setting(
        "",
        _public_url,
        "base of the absolute URLs in responses (default: from the request's Host header)",
    )
    request_timeout: float = setting(
        "60",
        _positive_float,
        "seconds a client may stay silent while sending a request (headers, or within an upload)",
    )
    upload_timeout: float = setting(
        "600", _positive_float, "seconds an upload's whole body may take"
    )
    caption_model: str = setting(
        "Salesforce/blip-image-captioning-base",
        _caption_model,
        "BLIP hub id (downloaded first), a local model folder, or none: captions off",
    )
    caption_device: str = setting(
        "auto", _choice("auto", "cpu", "cuda"), "auto: CUDA with fp16 when present, else CPU"
    )
    caption_batch: int = setting("8", _positive_int, "most images captioned in one generate call")
    caption_max_wait_ms: float = setting(
        "50", _positive_float, "longest wait for a caption batch to fill"
    )
    caption_threads: int = setting(
        "0", _non_negative_int, "torch CPU threads for captions (0: all cores)"
    )
    caption_retry_seconds: float = setting(
        "60",
        _positive_float,
        "after a failed model load, caption jobs end as unavailable at once for this long before"
        " a new try",
    )
    hf_token: str = setting("", _text, "Hugging Face token used by `python -m models download`")
    slow_callback_ms: int = setting(
        "0",
        _non_negative_int,
        "diagnostics: log event-loop callbacks slower than this (asyncio debug mode; 0: off)",
    )
    log_level: str = setting("INFO", _choice("debug", "info", "warning", "error"), "log level")
    allowed_formats: tuple[str, ...] = setting(
        ",".join(INPUT_FORMATS),
        _format_list(INPUT_FORMATS),
        "image formats accepted for upload (by their content)",
    )
    max_frames: int = setting(
        "1000", _positive_int, "most frames (animations) or pages (TIFF) of one upload"
    )
    thumb_formats: tuple[str, ...] = setting(
        "jpeg,webp",
        _format_list(OUTPUT_FORMATS, required="jpeg"),
        "thumbnail formats made (jpeg, webp, avif; jpeg always; avif is slow on a CPU)",
    )
    auth: str = setting(
        "auto",
        _choice("auto", "open", "keys"),
        "open: no keys; keys: API keys required; auto: open on a loopback address, else keys",
    )
    public_read: bool = setting("0", _flag, "keys mode: reads need no key (uploads, deletes do)")
    url_secret: str = setting(
        "", _text, "secret for signed image URLs (default: made once, kept in the database)"
    )
    signed_url_ttl: int = setting(
        "3600", _positive_int, "seconds a signed thumbnail or original URL stays valid"
    )
    upload_rate_limit: str = setting(
        "600/minute",
        _rate_limit,
        "uploads per key (open mode: per client address), e.g. 120/minute; 0: no limit",
    )
    cors_origins: tuple[str, ...] = setting(
        "", _origins, "origins allowed to call the API from a browser, comma-separated"
    )
    webhook_url: tuple[str, ...] = setting(
        "", _webhook_urls, "http(s) URLs that get image.ready and job.failed, comma-separated"
    )
    webhook_secret: str = setting(
        "", _text, "key of the X-Imgapi-Signature HMAC (required with WEBHOOK_URL)"
    )
    webhook_max_attempts: int = setting(
        "8", _positive_int, "tries of one webhook delivery before it is marked failed"
    )
    webhook_timeout: float = setting(
        "10", _positive_float, "seconds a webhook receiver has to answer"
    )
    events_heartbeat_seconds: float = setting(
        "15", _positive_float, "an idle event stream gets a comment line this often"
    )
    events_keep_seconds: int = setting(
        "86400", _positive_int, "how long events are kept for Last-Event-ID to resume from"
    )
    metrics_public: bool = setting(
        "0", _flag, "keys mode: GET /metrics needs no key (else the admin scope)"
    )
    worker_metrics_port: int = setting(
        "0",
        _port,
        "arq workers serve their own job metrics for Prometheus on this port, all interfaces"
        " (0: off)",
    )

    @property
    def tmp_dir(self) -> Path:
        return Path(self.media_dir) / "tmp"

    @property
    def captions_enabled(self) -> bool:
        return self.caption_model.lower() != "none"

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def redacted(url: str) -> str:
    """A URL without its password, fit for a log line or an error message."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def database_setting(settings: Settings) -> str:
    """The setting that says where the database is, as NAME='value', for error messages."""
    if settings.database_url:
        return f"DATABASE_URL={redacted(settings.database_url)!r}"
    return f"DB_PATH={settings.db_path!r}"


def media_setting(settings: Settings) -> str:
    if settings.storage_url:
        return f"STORAGE_URL={settings.storage_url!r}"
    return f"MEDIA_DIR={settings.media_dir!r}"


def declared() -> tuple[Setting, ...]:
    """Every setting, in the order of the fields."""
    return tuple(
        Setting(f.name.upper(), f.metadata["default"], f.metadata["parse"], f.metadata["help"])
        for f in fields(Settings)
    )


def read_dotenv(path: str | os.PathLike[str]) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; one pair of quotes stripped."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load(
    env: Mapping[str, str] | None = None,
    dotenv: str | os.PathLike[str] | None = ".env",
    **overrides: Any,
) -> Settings:
    """Settings from env (default os.environ) over `.env` over defaults; overrides win over all.

    Each value is checked, then the combinations; overrides are the caller's own choice and are
    not checked (as with Settings.replace).
    """
    env = os.environ if env is None else env
    file_values = read_dotenv(dotenv) if dotenv else {}
    values: dict[str, Any] = {}
    for name, default, parse, _help in declared():
        raw = env.get(name, file_values.get(name, default))
        try:
            values[name.lower()] = parse(raw)
        except ValueError as exc:
            shown = redacted(raw) if name == "DATABASE_URL" else raw
            raise SettingsError(f"{name}={shown!r}: {exc}") from None
    _check_combinations(values)
    values.update(overrides)
    return Settings(**values)


def parse_value(name: str, raw: str) -> Any:
    """One setting's value, checked as load() checks it (for a command line option)."""
    for declared_name, _default, parse, _help in declared():
        if declared_name == name:
            try:
                return parse(raw)
            except ValueError as exc:
                shown = redacted(raw) if name == "DATABASE_URL" else raw
                raise SettingsError(f"{name}={shown!r}: {exc}") from None
    raise KeyError(name)


def _check_combinations(values: Mapping[str, Any]) -> None:
    # WORKER=off only enqueues to Redis for `arq jobs.WorkerSettings`; without Redis nothing would
    # ever run the jobs, and every upload would wait for ever.
    if values["worker"] == "off" and not values["redis_url"]:
        raise SettingsError(
            "WORKER='off' needs REDIS_URL: with REDIS_URL empty nothing would run the jobs "
            "(set REDIS_URL and run `arq jobs.WorkerSettings`, or use WORKER=inline)"
        )

    if values["webhook_url"] and not values["webhook_secret"]:
        raise SettingsError(
            "WEBHOOK_URL needs WEBHOOK_SECRET: receivers check each delivery's signature with it"
        )

    if values["s3_redirect"] and not values["storage_url"]:
        raise SettingsError("S3_REDIRECT=1 needs STORAGE_URL: only S3 objects have presigned URLs")


def defaults() -> Settings:
    return load(env={}, dotenv=None)


def exit_bad_setting(exc: SettingsError) -> NoReturn:
    """The one line every command prints for a bad setting (the API, the arq worker,
    `python -m models`), and exit status 2: a traceback would bury the one thing to fix."""
    print(f"imgapi: bad setting: {exc}", file=sys.stderr)
    raise SystemExit(2)


def load_or_exit(**kwargs: Any) -> Settings:
    """load() for a command line: a bad setting is one line on stderr and exit status 2."""
    try:
        return load(**kwargs)
    except SettingsError as exc:
        exit_bad_setting(exc)
