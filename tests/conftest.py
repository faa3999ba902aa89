"""Shared fixtures: the corpus folders; settings, app and client on a fresh temp folder per test."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from procs import RedisServer, need_redis_server, redis_server
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import app as imgapi_app
from imgapi_core import settings as settings_mod

# The scale-out servers (a private PostgreSQL cluster, moto's S3), and the store backends and the
# fixtures that open them (make_store, store), for the contract tests.
pytest_plugins = ["services", "store_backends"]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port, which it may stop and start (skipped
    without the binary, or failed where IMGAPI_REDIS_REQUIRED=1)."""
    need_redis_server()
    with redis_server(tmp_path / "redis") as server:
        yield server


def seeded_jpeg(seed: int) -> bytes:
    """A small JPEG, distinct per seed: bytes of their own, with jobs of their own."""
    image = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    ImageDraw.Draw(image).rectangle((seed % 40, 5, seed % 40 + 20, 30), fill=(250, 250, 10))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("IMGAPI_CORPUS", REPO.parent / "shared" / "corpus"))


def corpus_folder(name: str) -> Path:
    """A corpus folder, or a skip when it is absent (a failure when IMGAPI_CORPUS_REQUIRED=1)."""
    folder = CORPUS / name
    if not (folder / "MANIFEST.tsv").is_file():
        message = f"corpus folder {folder} is absent"
        if os.environ.get("IMGAPI_CORPUS_REQUIRED") == "1":
            pytest.fail(message + " and IMGAPI_CORPUS_REQUIRED=1")
        pytest.skip(message)
    return folder


def manifest(name: str) -> list[dict[str, str]]:
    folder = corpus_folder(name)
    lines = (folder / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


@pytest.fixture
def photos() -> Path:
    return corpus_folder("photos")


@pytest.fixture
def hostile() -> Path:
    return corpus_folder("hostile")


# -- the app on a fresh temp directory --------------------------------------------------------

TEST_ENV = {
    "CAPTION_MODEL": "none",
    "SWEEP_SECONDS": "0.2",
    "JOB_LEASE_SECONDS": "3",
    "LOG_LEVEL": "warning",
    # The ASGI test client binds no address, which AUTH=auto reads as "keys": tests of access
    # control ask for keys themselves.
    "AUTH": "open",
    "UPLOAD_RATE_LIMIT": "0",
}


# The engines the API tests run on: the default (SQLite + a local folder) and the scale-out one
# (PostgreSQL + S3, on the session's private servers, tests/services.py). Every test of tests/api
# (and of other modules marked `both_engines`) that builds the app through make_settings runs on
# both, but for those marked `local_engines("why")`: what they test exists only there (a media
# folder moved, a file system that fills up, SQLite's own locking). Tests look at stored data
# through db_query and media_view, which read either engine.
ENGINES = ("sqlite+local", "postgresql+s3")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engines" not in metafunc.fixturenames:
        return
    both = metafunc.definition.path.parent.name == "api" or (
        metafunc.definition.get_closest_marker("both_engines") is not None
    )
    local = metafunc.definition.get_closest_marker("local_engines")
    if local is not None and not (local.args and isinstance(local.args[0], str)):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: local_engines needs its reason")
    local_only = local is not None
    chosen = ENGINES if both and not local_only else ENGINES[:1]
    metafunc.parametrize("engines", chosen, indirect=True)


@pytest.fixture
def engines(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The settings (env values) that put this test's data on its engines."""
    if request.param == "sqlite+local":
        return {}
    s3 = request.getfixturevalue("s3_server")
    return {
        "DATABASE_URL": request.getfixturevalue("migrated_postgres_url"),
        **s3.settings(request.getfixturevalue("s3_bucket")),
    }


@pytest.fixture
def make_settings(tmp_path: Path, engines: dict[str, str]) -> Callable[..., settings_mod.Settings]:
    """Settings on this test's own database and media folder (or PostgreSQL database and bucket);
    keyword arguments are env values."""

    def make(**env: str) -> settings_mod.Settings:
        values = {
            "DB_PATH": str(tmp_path / "data" / "imgapi.db"),
            "MEDIA_DIR": str(tmp_path / "media"),
            **TEST_ENV,
            **engines,
            **env,
        }
        # WORKER=off without REDIS_URL (no job runner at all: the test runs or inspects the jobs
        # itself) is refused by load(), since nothing would ever run them; here it is on purpose.
        overrides = {}
        if values.get("WORKER", "").strip().lower() == "off" and not values.get("REDIS_URL"):
            overrides["worker"] = values.pop("WORKER").strip().lower()
        return settings_mod.load(env=values, dotenv=None, **overrides)

    return make


@pytest.fixture
def cfg(
    make_settings: Callable[..., settings_mod.Settings], request: pytest.FixtureRequest
) -> settings_mod.Settings:
    """Settings for this test, with the env values a test asks for through indirect
    parametrization (`pytest.mark.parametrize("cfg", [{"WORKER": "off"}], indirect=True)`)."""
    return make_settings(**getattr(request, "param", {}))


@contextlib.asynccontextmanager
async def running_app(cfg: settings_mod.Settings) -> AsyncIterator[Sanic]:
    """The app with its resources open (in-process jobs keep running between requests); a test
    may stop it and start another on the same database."""
    Sanic.test_mode = True
    application = imgapi_app.create_app(cfg, own_resources=False)
    await imgapi_app.open_resources(application)
    try:
        yield application
    finally:
        await imgapi_app.close_resources(application)
        Sanic._app_registry.pop(application.name, None)


@pytest.fixture
async def app(cfg: settings_mod.Settings) -> AsyncIterator[Sanic]:
    async with running_app(cfg) as application:
        yield application


@pytest.fixture
def client(app: Sanic) -> SanicASGITestClient:
    """sanic-testing's async client: `_, response = await client.get(...)`."""
    return SanicASGITestClient(app)


def multipart(
    content: bytes, filename: str = "photo.jpg", content_type: str = "image/jpeg"
) -> dict:
    """httpx `files=` for one `file` part."""
    return {"file": (filename, content, content_type)}


async def wait_for(predicate: Callable[[], object], within: float = 20.0) -> None:
    """Polls an async or sync predicate until it is truthy, or fails the test."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.05)
