"""Access control against real `python imgapi.py` processes: AUTH=auto read from the bind address,
the `keys` command line against a running server, refused uploads that read no body, the upload
rate limit shared by two processes through Redis, and no token ever kept in the database."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import procs
import pytest
from conftest import seeded_jpeg
from procs import Proc, RedisServer, free_port

pytestmark = [pytest.mark.slow]

TOKEN_RE = re.compile(r"imgapi_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


# -- helpers ------------------------------------------------------------------------------------


def env_for(root: Path, **extra: str) -> dict[str, str]:
    return procs.settings_for(root, **extra)


def start_server(env: dict[str, str], log: Path, host: str = "127.0.0.1") -> Proc:
    """`python imgapi.py --host HOST`, ready once /healthz (public in every mode) answers 200."""
    port = free_port()
    args = [sys.executable, str(procs.REPO / "imgapi.py"), "--host", host, "--port", str(port)]
    proc = procs._spawn(args, procs.service_env(env), log)
    url_host = f"[{host}]" if ":" in host else host
    proc.url = f"http://{url_host}:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"API exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")
        with urllib.request.urlopen(proc.url + "/healthz", timeout=1) as res:
            return res.status == 200

    try:
        procs.wait_until(healthy, 30, f"API on {host}")
    except BaseException:
        proc.kill()
        raise
    return proc


def keys_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return procs.run_command(
        [sys.executable, str(procs.REPO / "imgapi.py"), "keys", *args], env, procs.REPO
    )


def create_key(env: dict[str, str], name: str, scopes: str | None = None) -> str:
    args = ["create", name] + (["--scopes", scopes] if scopes else [])
    done = keys_cli(env, *args)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert TOKEN_RE.fullmatch(token), f"last line is not a token: {token!r}"
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(url: str, data: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url + "/api/images",
        files={"file": ("photo.jpg", data, "image/jpeg")},
        headers=headers or {},
        timeout=15,
    )


def assert_failure(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "failed"
    assert body["data"] is None
    assert isinstance(body["error"], str) and body["error"]
    return body


def image_count(env: dict[str, str]) -> int:
    return procs.db_rows(env["DB_PATH"], "SELECT count(*) FROM images")[0][0]


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not a loopback one, or None."""
    candidates: list[str] = []
    for target in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # UDP: sends nothing, only picks the outgoing address
            candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += [
            info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        ]
    for address in candidates:
        ip = ipaddress.ip_address(address)
        if ip.is_loopback or ip.is_unspecified:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind((address, 0))  # an address this machine really has
            return address
    return None


@pytest.fixture
def procs_to_stop() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


# -- 1. AUTH=auto follows the bind address ------------------------------------------------------


def test_auth_auto_is_open_on_loopback_and_keys_elsewhere(
    tmp_path: Path, procs_to_stop: list[Proc]
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("optional: this machine has no non-loopback address")
    loopback_env = env_for(tmp_path / "lo", AUTH="auto")
    outside_env = env_for(tmp_path / "out", AUTH="auto")
    loopback = start_server(loopback_env, tmp_path / "lo.log")
    procs_to_stop.append(loopback)
    outside = start_server(outside_env, tmp_path / "out.log", host=address)
    procs_to_stop.append(outside)

    res = httpx.get(loopback.url + "/api/stats", timeout=10)
    assert res.status_code == 200, res.text

    res = httpx.get(outside.url + "/api/stats", timeout=10)
    assert_failure(res, 401)
    assert res.headers["www-authenticate"].startswith("Bearer")
    # A key makes it pass: the 401 is the access mode, not a broken server.
    token = create_key(outside_env, "reader", "read")
    res = httpx.get(outside.url + "/api/stats", headers=bearer(token), timeout=10)
    assert res.status_code == 200, res.text


def test_auth_open_on_a_non_loopback_address_warns_and_serves(
    tmp_path: Path, procs_to_stop: list[Proc]
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("optional: this machine has no non-loopback address")
    env = env_for(tmp_path, AUTH="open")
    server = start_server(env, tmp_path / "open.log", host=address)
    procs_to_stop.append(server)

    res = httpx.get(server.url + "/api/stats", timeout=10)
    assert res.status_code == 200, res.text
    warnings = [line for line in server.output().splitlines() if "AUTH=open" in line]
    assert warnings, f"no AUTH=open warning in the log:\n{server.output()[-3000:]}"
    assert "WARNING" in warnings[0] and address in warnings[0], warnings


# -- 2. the keys command line against a running server ------------------------------------------


def test_keys_cli_against_a_running_server(tmp_path: Path, procs_to_stop: list[Proc]) -> None:
    env = env_for(tmp_path, AUTH="keys")
    server = start_server(env, tmp_path / "api.log")
    procs_to_stop.append(server)
    assert_failure(upload(server.url, seeded_jpeg(1)), 401)
    assert image_count(env) == 0

    created = keys_cli(env, "create", "alice")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert TOKEN_RE.fullmatch(token), created.stdout
    assert token not in created.stderr

    # Works at once (within a cache reload): an upload with it is stored.
    started = time.monotonic()
    while True:
        res = upload(server.url, seeded_jpeg(2), bearer(token))
        if res.status_code == 201 or time.monotonic() - started > 3:
            break
        time.sleep(0.1)
    assert res.status_code == 201, res.text
    print(f"new key accepted after {time.monotonic() - started:.2f} s")
    assert image_count(env) == 1
    # X-API-Key is the other way to send it.
    res = httpx.get(server.url + "/api/stats", headers={"X-API-Key": token}, timeout=10)
    assert res.status_code == 200, res.text

    listed = keys_cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    line = next((x for x in listed.stdout.splitlines() if x.split()[:1] == ["alice"]), None)
    assert line is not None, listed.stdout
    assert line.split()[1] == "read,upload"
    secret = token.split("_", 2)[2]  # imgapi_<key id>_<secret>: the secret may hold "_" too
    assert token not in listed.stdout and secret not in listed.stdout
    assert hashlib.sha256(token.encode()).hexdigest() not in listed.stdout

    # An existing active name: refused, and the key it names keeps working.
    again = keys_cli(env, "create", "alice", "--scopes", "admin")
    assert again.returncode != 0
    assert "alice" in again.stderr
    assert not TOKEN_RE.search(again.stdout + again.stderr)
    res = httpx.get(server.url + "/api/stats", headers=bearer(token), timeout=10)
    assert res.status_code == 200, res.text

    # An unknown scope: argparse's usage error, exit 2, one error line, no key made.
    bad = keys_cli(env, "create", "carol", "--scopes", "read,fly")
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    errors = [x for x in bad.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and "fly" in errors[0], bad.stderr
    assert bad.stderr.startswith("usage:")
    assert "carol" not in keys_cli(env, "list").stdout

    revoked = keys_cli(env, "revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    while True:
        res = httpx.get(server.url + "/api/stats", headers=bearer(token), timeout=10)
        elapsed = time.monotonic() - started
        if res.status_code != 200 or elapsed > 5:
            break
        time.sleep(0.05)
    print(f"revoked key refused after {elapsed:.2f} s")
    assert_failure(res, 401)
    assert res.headers["www-authenticate"].startswith("Bearer")
    assert_failure(upload(server.url, seeded_jpeg(3), bearer(token)), 401)
    assert image_count(env) == 1
    # Revoking what is no longer active fails.
    assert keys_cli(env, "revoke", "alice").returncode != 0


# -- 3. a refused upload reads no body ----------------------------------------------------------


def raw_exchange(url: str, request: bytes, within: float = 10) -> tuple[bytes, bool]:
    """Sends request bytes, reads until the server closes: (all bytes read, closed by server)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=within) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


def parse_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def assert_raw_401(raw: bytes) -> None:
    assert b"100 Continue" not in raw, raw[:300]
    status_line, headers, body = parse_response(raw)
    assert status_line.startswith("HTTP/1.1 401"), raw[:300]
    assert headers.get("www-authenticate", "").startswith("Bearer"), headers
    assert int(headers["content-length"]) == len(body), (headers, body)
    parsed = json.loads(body)
    assert parsed["status"] == "failed" and parsed["data"] is None and parsed["error"], parsed


def test_a_refused_upload_reads_no_body(tmp_path: Path, procs_to_stop: list[Proc]) -> None:
    env = env_for(tmp_path, AUTH="keys")
    server = start_server(env, tmp_path / "api.log")
    procs_to_stop.append(server)
    host = server.url.removeprefix("http://")
    boundary = "imgapi-test-boundary"

    head = (
        "POST /api/images HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Content-Length: 50000000\r\n"
        "Expect: 100-continue\r\n"
        "\r\n"
    ).encode()
    started = time.monotonic()
    raw, closed = raw_exchange(server.url, head)
    assert raw, "no answer"
    assert_raw_401(raw)
    assert closed, f"connection still open {time.monotonic() - started:.1f} s after the answer"

    # Without Expect, body sent in full: refused all the same, and nothing stored.
    data = seeded_jpeg(7)
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = (
        "POST /api/images HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body
    raw, closed = raw_exchange(server.url, request)
    assert_raw_401(raw)
    assert closed, "connection still open after the refusal"

    assert image_count(env) == 0
    assert procs.db_rows(env["DB_PATH"], "SELECT count(*) FROM stats")[0][0] == 0
    stored = [p for p in Path(env["MEDIA_DIR"]).rglob("*") if p.is_file()]
    assert stored == [], stored
    # The same upload with a key is stored: the counts above read the right database.
    token = create_key(env, "uploader")
    raw, _ = raw_exchange(
        server.url,
        request.replace(
            b"\r\n\r\n",
            f"\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode(),
            1,
        ),
    )
    assert parse_response(raw)[0].startswith("HTTP/1.1 201"), raw[:300]
    assert image_count(env) == 1


# -- 4. the upload rate limit is shared through Redis -------------------------------------------


@pytest.mark.redis
def test_the_upload_rate_limit_is_shared_by_processes_through_redis(
    tmp_path: Path, private_redis: RedisServer, procs_to_stop: list[Proc]
) -> None:
    env = env_for(
        tmp_path,
        AUTH="keys",
        WORKER="inline",
        REDIS_URL=private_redis.url,
        UPLOAD_RATE_LIMIT="3/minute",
    )
    first = create_key(env, "first")
    second = create_key(env, "second")
    servers = [start_server(env, tmp_path / f"api{i}.log") for i in range(2)]
    procs_to_stop.extend(servers)
    seed = iter(range(100, 200))

    for token, offset in ((first, 0), (second, 1)):
        before = image_count(env)
        for i in range(3):
            server = servers[(i + offset) % 2]
            res = upload(server.url, seeded_jpeg(next(seed)), bearer(token))
            assert res.status_code == 201, (server.url, res.text)
        assert image_count(env) == before + 3
        # The 4th, on the process that has seen only one of this key's uploads (an in-memory
        # limit per process would let it through).
        server = servers[(3 + offset) % 2]
        res = upload(server.url, seeded_jpeg(next(seed)), bearer(token))
        body = assert_failure(res, 429)
        assert "3/minute" in body["error"]
        retry_after = res.headers.get("retry-after", "")
        assert retry_after.isdigit() and 0 < int(retry_after) <= 60, res.headers
        assert image_count(env) == before + 3

    import redis

    client = redis.Redis.from_url(private_redis.url)
    try:
        counters = client.keys(f"{env['ARQ_QUEUE']}:ratelimit*")
    finally:
        client.close()
    assert counters, "no rate-limit counters in Redis under the queue's prefix"


# -- 5. the database never holds a token --------------------------------------------------------


def urlsafe_raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def test_the_database_holds_no_token(tmp_path: Path, procs_to_stop: list[Proc]) -> None:
    env = env_for(tmp_path, AUTH="keys")
    server = start_server(env, tmp_path / "api.log")
    procs_to_stop.append(server)
    token = create_key(env, "keeper", "read,upload,delete")
    res = upload(server.url, seeded_jpeg(42), bearer(token))
    assert res.status_code == 201, res.text
    delete_token = res.json()["delete_token"]
    assert isinstance(delete_token, str) and len(delete_token) >= 32
    assert server.stop() == 0, server.output()[-3000:]

    db = Path(env["DB_PATH"])
    files = [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
    content = b"".join(p.read_bytes() for p in files)
    assert len(content) > 0
    secret = token.split("_", 2)[2]  # imgapi_<key id>_<secret>: the secret may hold "_" too
    for what, value in (
        ("API token", token.encode()),
        ("API token's secret", secret.encode()),
        ("API token's secret, decoded", urlsafe_raw(secret)),
        ("delete token", delete_token.encode()),
        ("delete token, decoded", urlsafe_raw(delete_token)),
    ):
        assert value not in content, f"the {what} is in {[p.name for p in files]}"
    # The scan reads the right file: the hashes are there.
    assert hashlib.sha256(token.encode()).hexdigest().encode() in content
    assert hashlib.sha256(delete_token.encode()).hexdigest().encode() in content
    # Nor does the service's log hold either.
    log = server.output()
    assert token not in log and delete_token not in log
