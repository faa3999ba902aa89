"""Start-up failures of real processes (`python imgapi.py`, `arq jobs.WorkerSettings`): each one
ends by itself with a non-zero status and exactly one line on stderr, no traceback.

A process that hangs instead fails its test: run_command's timeout raises TimeoutExpired.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from procs import REPO, free_port, run_command, settings_for

from imgapi_core import settings, uploads
from imgapi_core.store import open_store

BAD_SETTING = "imgapi: bad setting: "
CANNOT_START = "imgapi: cannot start: "


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start prints on stderr."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def run_api(
    tmp_path: Path, port: int | None = None, **settings: str
) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "imgapi.py"), "--host", "127.0.0.1"]
    args += ["--port", str(port or free_port())]
    # cwd: the test's folder, so that no .env of the checkout is read
    return run_command(args, settings_for(tmp_path, **settings), tmp_path)


def run_worker(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "arq", "jobs.WorkerSettings"]
    env = {**settings_for(tmp_path, **settings), "PYTHONPATH": str(REPO)}
    return run_command(args, env, tmp_path)


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


# -- the API ----------------------------------------------------------------------------------


def test_an_empty_db_path_is_a_bad_setting(tmp_path: Path) -> None:
    # It used to open a temporary database and fail on its first query, with a traceback, and
    # at times hang for ever on the database threads it left open.
    line = only_line(run_api(tmp_path, DB_PATH=""))
    assert line.startswith(BAD_SETTING + "DB_PATH=''"), line


def test_a_db_path_inside_a_file_stops_the_start(tmp_path: Path) -> None:
    db_path = a_file(tmp_path) / "imgapi.db"
    line = only_line(run_api(tmp_path, DB_PATH=str(db_path)))
    assert line.startswith(f"{CANNOT_START}DB_PATH='{db_path}': "), line


def test_a_media_dir_that_cannot_be_made_stops_the_start(tmp_path: Path) -> None:
    media = a_file(tmp_path) / "media"
    line = only_line(run_api(tmp_path, MEDIA_DIR=str(media)))
    assert line.startswith(f"{CANNOT_START}MEDIA_DIR='{media}': "), line
    assert not (tmp_path / "data" / "imgapi.db").exists()  # stopped before the database


def test_a_failure_after_the_database_is_open_closes_it_and_exits(tmp_path: Path) -> None:
    # A leftover upload temp file that cannot be removed (a folder under that name) fails the
    # start-up sweep, after the database is open: its connection threads must be closed, or the
    # process never ends.
    tmp = tmp_path / "media" / "tmp"
    stuck = tmp / f"{uploads.TEMP_PREFIX}{socket.gethostname()}-999999-x.part"
    stuck.mkdir(parents=True)
    line = only_line(run_api(tmp_path))
    assert line.startswith(CANNOT_START) and stuck.name in line, line
    assert (tmp_path / "data" / "imgapi.db").exists()  # it did get that far


def test_a_read_only_database_stops_the_start(tmp_path: Path) -> None:
    # SQLite opens a file it may not write read-only, silently: the service used to start, say
    # ok on /healthz and answer 500 to every upload. chattr +i: read-only even for root (CI).
    db_path = tmp_path / "data" / "imgapi.db"
    asyncio.run(_make_database(settings_for(tmp_path)))
    assert db_path.is_file() and not Path(f"{db_path}-wal").exists()
    done = subprocess.run(["chattr", "+i", str(db_path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"optional: chattr +i is not supported here: {done.stderr.strip()}")
    try:
        line = only_line(run_api(tmp_path))
    finally:
        subprocess.run(["chattr", "-i", str(db_path)], check=True)
    assert line.startswith(f"{CANNOT_START}DB_PATH='{db_path}': "), line
    assert "read-only" in line, line


async def _make_database(env: dict[str, str]) -> None:
    store = await open_store(settings.load(env=env, dotenv=None))
    await store.close()


def test_a_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = only_line(run_api(tmp_path, port=taken.getsockname()[1]))
    assert line.startswith(CANNOT_START) and "in use" in line, line


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:notaport"}, "REDIS_URL='redis://127.0.0.1:notaport'"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/x"}, "REDIS_URL='redis://127.0.0.1:6379/x'"),
        ({"WORKER": "off", "REDIS_URL": ""}, "WORKER='off' needs REDIS_URL"),
    ],
    ids=["redis-port", "redis-db", "worker-off-without-redis"],
)
def test_a_redis_setting_that_cannot_work_stops_the_api(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    line = only_line(run_api(tmp_path, **settings))
    assert line.startswith(BAD_SETTING + named), line
    assert not (tmp_path / "data").exists()  # stopped before opening anything


# -- the arq worker ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("redis_url", "named"),
    [
        ("redis://127.0.0.1:notaport", "REDIS_URL='redis://127.0.0.1:notaport'"),
        ("", "REDIS_URL is empty"),
    ],
    ids=["bad-port", "empty"],
)
def test_a_worker_with_a_bad_redis_url_exits_with_one_line(
    tmp_path: Path, redis_url: str, named: str
) -> None:
    result = run_worker(tmp_path, REDIS_URL=redis_url)
    assert result.returncode == 2, result.stderr
    line = only_line(result)
    assert line.startswith(BAD_SETTING + named), line


def test_a_worker_with_a_bad_value_exits_with_one_line(tmp_path: Path) -> None:
    result = run_worker(tmp_path, REDIS_URL="redis://127.0.0.1:1/0", JOB_CONCURRENCY="many")
    assert result.returncode == 2, result.stderr
    assert only_line(result).startswith(BAD_SETTING + "JOB_CONCURRENCY='many'")
