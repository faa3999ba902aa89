"""The scale-out backends' servers for the tests, started once per test session and removed after:
a private PostgreSQL cluster (Debian's `postgresql` package: initdb and pg_ctl, as the postgres
user when the tests run as root, on a free loopback port, fsync off) and moto's standalone S3
server (`moto[server]`) on a free loopback port.

Where one cannot be started, tests that need it skip with an `optional:` reason; with
IMGAPI_SCALE_REQUIRED=1 (CI) they fail instead. Each test gets a database or bucket of its own,
named after its tmp_path, so two stores opened for one test share it (two processes, in effect).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from procs import free_port

REQUIRED = os.environ.get("IMGAPI_SCALE_REQUIRED") == "1"
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"


def unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"IMGAPI_SCALE_REQUIRED=1 but {why}")
    pytest.skip(f"optional: {why}")


def name_for(tmp_path: Path, prefix: str) -> str:
    """A database or bucket name, the same for every call with this tmp_path."""
    return f"{prefix}{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:20]}"


# -- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    data_dir: Path
    run_as: list[str]  # the command prefix that runs a program as the cluster's owner
    bin_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(database)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def create_database(self, name: str, template: str | None = None) -> str:
        """Creates it (empty, or a copy of `template`) unless it exists; its URL."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if not exists.strip():
            copy = f' TEMPLATE "{template}"' if template else ""
            self.psql(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode, "-w")

    def start(self) -> None:
        log = self.data_dir.parent / "server.log"
        done = self.pg_ctl("start", "-w", "-t", "60", "-l", str(log))
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}\n{log.read_text()[-2000:]}")


def start_postgres(root: Path, *, fsync: bool = False) -> PostgresServer:
    """A new cluster in root. fsync=False (tests): nothing in it must survive a machine crash."""
    if not PG_BIN_DIRS or shutil.which("psql") is None:
        raise FileNotFoundError("no PostgreSQL server here (Debian: apt-get install postgresql)")
    bin_dir = PG_BIN_DIRS[0]
    run_as: list[str] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        # initdb refuses root: the cluster belongs to the postgres user, as Debian's do.
        run_as, user = ["runuser", "-u", "postgres", "--"], "postgres"
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres", "postgres")
    data_dir, socket_dir = root / "data", root / "socket"
    port = free_port()
    init = subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", user,
         "-E", "UTF8", "--no-sync", "--locale=C"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
    subprocess.run([*run_as, "mkdir", "-p", str(socket_dir)], check=True)
    conf = (
        f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{socket_dir}'\n"
        "max_connections = 300\n"
    )
    if not fsync:
        conf += "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
    subprocess.run(
        [*run_as, "sh", "-c", f"cat >> {data_dir / 'postgresql.conf'}"],
        input=conf, text=True, check=True,
    )  # fmt: skip
    server = PostgresServer("127.0.0.1", port, user, data_dir, run_as, bin_dir)
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="imgapi-pg-"))
    try:
        server = start_postgres(root)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"cannot start a private PostgreSQL cluster: {exc}")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, tmp_path: Path) -> str:
    """An empty database of this test's own."""
    return postgres_server.create_database(name_for(tmp_path, "t"))


@pytest.fixture(scope="session")
def migrated_template(postgres_server: PostgresServer) -> str:
    """The name of a database with every migration applied. The app tests' databases are copies
    of it (CREATE DATABASE ... TEMPLATE), which takes a third of the time of migrating each one;
    the store's own tests of its migrations start from empty databases (postgres_url)."""
    from imgapi_core import settings
    from imgapi_core.store import open_store

    name = "imgapi_migrated"

    async def migrate() -> None:
        env = {"DATABASE_URL": postgres_server.create_database(name), "DB_PATH": "unused.db"}
        store = await open_store(settings.load(env=env, dotenv=None))
        await store.close()

    # The test's own event loop may be running: the migration gets a loop of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, migrate()).result(timeout=120)
    return name


@pytest.fixture
def migrated_postgres_url(
    postgres_server: PostgresServer, migrated_template: str, tmp_path: Path
) -> str:
    """A database of this test's own, with the schema of today's migrations in place."""
    return postgres_server.create_database(name_for(tmp_path, "t"), template=migrated_template)


# -- S3 (moto's standalone server) ---------------------------------------------------------------


@dataclass
class S3Server:
    endpoint_url: str
    popen: subprocess.Popen
    log: Path

    def settings(self, bucket: str, prefix: str = "media") -> dict[str, str]:
        """The imgapi settings (as environment values) for this bucket on this server."""
        return {
            "STORAGE_URL": f"s3://{bucket}/{prefix}",
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_REGION": S3_REGION,
        }

    def client(self) -> Any:
        """A plain (blocking) boto3 client of this server, for a test's own looks."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name=S3_REGION,
        )

    def create_bucket(self, name: str) -> str:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name


def start_s3_server(log: Path, port: int | None = None) -> S3Server:
    port = port or free_port()
    out = log.open("ab")
    popen = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/moto-api/", timeout=1):
            return S3Server(url, popen, log)
        if time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError("moto server did not answer within 60 s")
        time.sleep(0.1)


def stop_s3_server(server: S3Server) -> None:
    server.popen.terminate()
    try:
        server.popen.wait(10)
    except subprocess.TimeoutExpired:
        server.popen.kill()
        server.popen.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        unavailable("moto[server] is not installed (pip install 'moto[server]')")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    try:
        server = start_s3_server(log)
    except (OSError, RuntimeError) as exc:
        unavailable(f"cannot start moto's S3 server: {exc}")
    try:
        yield server
    finally:
        stop_s3_server(server)


@pytest.fixture
def s3_bucket(s3_server: S3Server, tmp_path: Path) -> str:
    """A bucket of this test's own."""
    return s3_server.create_bucket(name_for(tmp_path, "b"))
