"""Real processes for tests and benchmarks: the API (`python imgapi.py`), arq workers
(`arq jobs.WorkerSettings`) and a private redis-server on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {within}s")


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a machine dies."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, within: float = 20) -> int:
        """SIGTERM and wait: a clean shutdown."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("ab")
    # Own process group, so kill() takes any children (Sanic's worker processes) with it.
    popen = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    out.close()
    return Proc(popen, log)


def settings_for(root: Path, **extra: str) -> dict[str, str]:
    """Settings (as env values) for a real API or worker on its own database and media folder
    under root, its own arq queue name, captions off; keyword arguments add or override."""
    return {
        "DB_PATH": str(root / "data" / "imgapi.db"),
        "MEDIA_DIR": str(root / "media"),
        "CAPTION_MODEL": "none",
        "ARQ_QUEUE": f"imgapi-test:{uuid.uuid4().hex}",
        "LOG_LEVEL": "warning",
        # Load tests send far more than a person would: the limit has tests of its own.
        "UPLOAD_RATE_LIMIT": "0",
        **extra,
    }


@contextlib.contextmanager
def read_only(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A service's database, read from the test process on a read-only connection of its own."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def db_rows(db_path: str | Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    with read_only(db_path) as conn:
        return conn.execute(sql, params).fetchall()


def service_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGAPI_", "PYTEST"))}
    env.update(PYTHONUNBUFFERED="1", **settings_env)
    return env


def start_api(
    settings_env: dict[str, str],
    log: Path,
    *,
    port: int | None = None,
    workers: int = 1,
    ready_within: float = 30,
) -> Proc:
    """`python imgapi.py` with these settings (DB_PATH, MEDIA_DIR, ...); waits for /healthz."""
    port = port or free_port()
    args = [
        sys.executable,
        str(REPO / "imgapi.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    proc = _spawn(args, service_env(settings_env), log)
    proc.url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"API exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")
        with urllib.request.urlopen(proc.url + "/healthz", timeout=1) as res:
            return res.status == 200

    try:
        wait_until(healthy, ready_within, "API")
    except BaseException:
        proc.kill()
        raise
    return proc


def start_worker(settings_env: dict[str, str], log: Path, *, burst: bool = False) -> Proc:
    """`arq jobs.WorkerSettings` (REDIS_URL must be in settings_env)."""
    args = [sys.executable, "-m", "arq", "jobs.WorkerSettings"]
    if burst:
        args.append("--burst")
    return _spawn(args, service_env(settings_env), log)


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def need_redis_server() -> None:
    """Skips the test without a redis-server binary (the container's test image has none);
    fails it instead where IMGAPI_REDIS_REQUIRED=1 (CI)."""
    if redis_server_path() is None:
        if os.environ.get("IMGAPI_REDIS_REQUIRED") == "1":
            pytest.fail("redis-server is not installed and IMGAPI_REDIS_REQUIRED=1")
        pytest.skip("redis-server is not installed")


@contextlib.contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, stopped afterwards."""
    server = RedisServer(workdir, port or free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RedisServer:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_server_path()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self.proc = _spawn(args, dict(os.environ), self.workdir / "redis.log")

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(up, 10, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None


def start_sanic_cli(
    settings_env: dict[str, str], log: Path, *, port: int | None = None, ready_within: float = 30
) -> Proc:
    """`sanic imgapi:create_app --factory` (the README's other way to serve); waits for /healthz."""
    port = port or free_port()
    args = [sys.executable, "-m", "sanic", "imgapi:create_app", "--factory"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    proc = _spawn(args, service_env(settings_env), log)
    proc.url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"sanic exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}"
            )
        with urllib.request.urlopen(proc.url + "/healthz", timeout=1) as res:
            return res.status == 200

    try:
        wait_until(healthy, ready_within, "sanic")
    except BaseException:
        proc.kill()
        raise
    return proc


def run_command(
    args: list[str], settings_env: dict[str, str], cwd: Path, *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """A command that should end by itself (a failed start, a health check), run to its end.
    The timeout turns a hang into a failed test (subprocess.TimeoutExpired)."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=service_env(settings_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
