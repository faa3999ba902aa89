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
    return token_of(keys_cli(env, *args))


def token_of(done: subprocess.CompletedProcess[str]) -> str:
    """The token a `keys create` printed, as its last line."""
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


def first_refusals(
    servers: list[Proc], token: str, since: float, give_up_after: float
) -> dict[str, float]:
    """Asks each server, over and over, for /api/stats with this key until it answers 401:
    {server url: seconds from `since` to its first 401} (inf for one that never did within
    give_up_after). Any answer but 200 or 401 fails the test."""
    refused: dict[str, float] = {}
    clients = {
        s.url: httpx.Client(base_url=s.url, headers=bearer(token), timeout=5) for s in servers
    }
    try:
        while len(refused) < len(servers) and time.monotonic() - since < give_up_after:
            for url, client in clients.items():
                if url in refused:
                    continue
                res = client.get("/api/stats")
                if res.status_code == 401:
                    refused[url] = time.monotonic() - since
                else:
                    assert res.status_code == 200, (url, res.status_code, res.text)
            time.sleep(0.02)
    finally:
        for client in clients.values():
            client.close()
    return {s.url: refused.get(s.url, float("inf")) for s in servers}


OPEN_WORDS = "no API key is checked; anyone who can reach it"


def open_warnings(server: Proc) -> list[str]:
    """The log lines of a server that warn that anyone may read and delete every image."""
    return [line for line in server.output().splitlines() if OPEN_WORDS in line]


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
    warnings = open_warnings(server)
    assert len(warnings) == 1, f"not one AUTH=open warning in the log:\n{server.output()[-3000:]}"
    assert "WARNING" in warnings[0] and address in warnings[0], warnings
    assert "NOT a loopback address" in warnings[0], warnings


def test_auth_open_set_on_purpose_warns_on_loopback_too_and_auto_does_not(
    tmp_path: Path, procs_to_stop: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    # AUTH unset: nothing in the environment the services inherit (service_env copies it).
    monkeypatch.delenv("AUTH", raising=False)
    chosen = start_server(env_for(tmp_path / "open", AUTH="open"), tmp_path / "open.log")
    procs_to_stop.append(chosen)
    unset_env = env_for(tmp_path / "auto")
    assert "AUTH" not in unset_env
    unset = start_server(unset_env, tmp_path / "auto.log")
    procs_to_stop.append(unset)

    # Both open: no key asked.
    for server in (chosen, unset):
        res = httpx.get(server.url + "/api/stats", timeout=10)
        assert res.status_code == 200, (server.url, res.text)

    # AUTH=open set on purpose: one warning line at start, on loopback as elsewhere.
    warnings = open_warnings(chosen)
    assert len(warnings) == 1, f"not one AUTH=open warning in the log:\n{chosen.output()[-3000:]}"
    assert "WARNING" in warnings[0], warnings
    assert "AUTH=open" in warnings[0] and "127.0.0.1" in warnings[0], warnings
    # AUTH unset on loopback (auto, so open): no such line, nor any other access warning.
    assert open_warnings(unset) == [], unset.output()[-3000:]
    assert "imgapi.access" not in unset.output(), unset.output()[-3000:]


# -- 2. the keys command line against a running server ------------------------------------------


def test_keys_cli_against_two_running_servers(tmp_path: Path, procs_to_stop: list[Proc]) -> None:
    env = env_for(tmp_path, AUTH="keys")
    # Two API processes on the same database: each keeps its own key cache.
    servers = [start_server(env, tmp_path / f"api{i}.log") for i in range(2)]
    procs_to_stop.extend(servers)
    server = servers[0]
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
    # X-API-Key is the other way to send it; the other process takes the key too.
    for each in servers:
        res = httpx.get(each.url + "/api/stats", headers={"X-API-Key": token}, timeout=10)
        assert res.status_code == 200, (each.url, res.text)

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

    # Revoked: every process refuses the key within 2 s of the command returning.
    revoked = keys_cli(env, "revoke", "alice")
    returned = time.monotonic()
    assert revoked.returncode == 0, revoked.stderr
    refused_after = first_refusals(servers, token, returned, give_up_after=5.0)
    figures = ", ".join(f"api{i} {refused_after[s.url]:.2f} s" for i, s in enumerate(servers))
    print(f"revoked key refused after: {figures}")
    for i, each in enumerate(servers):
        assert refused_after[each.url] < 2.0, f"api{i} still took the revoked key: {figures}"
    seed = iter(range(3, 10))
    for each in servers:
        # And it stays refused, for reads and uploads alike.
        res = httpx.get(each.url + "/api/stats", headers=bearer(token), timeout=10)
        assert_failure(res, 401)
        assert res.headers["www-authenticate"].startswith("Bearer")
        assert_failure(upload(each.url, seeded_jpeg(next(seed)), bearer(token)), 401)
    assert image_count(env) == 1
    # Revoking what is no longer active fails.
    assert keys_cli(env, "revoke", "alice").returncode != 0


FIRST_KEY_COMMAND = re.compile(r"python imgapi\.py (keys create .+?)\s*$")


def first_key_hints(server: Proc) -> list[str]:
    """The log lines of a server that name the command making the first key."""
    return [line for line in server.output().splitlines() if "python imgapi.py keys create" in line]


def test_keys_mode_without_a_key_logs_the_command_that_makes_the_first(
    tmp_path: Path, procs_to_stop: list[Proc]
) -> None:
    env = env_for(tmp_path, AUTH="keys")
    server = start_server(env, tmp_path / "first.log")
    procs_to_stop.append(server)
    hints = first_key_hints(server)
    assert len(hints) == 1, f"no one line naming the command:\n{server.output()[-3000:]}"
    assert "WARNING" in hints[0], hints
    assert_failure(httpx.get(server.url + "/api/stats", timeout=10), 401)

    # The command it names, run as it stands, makes a key this server takes.
    match = FIRST_KEY_COMMAND.search(hints[0])
    assert match is not None, hints
    token = token_of(keys_cli(env, *match.group(1).split()[1:]))
    res = httpx.get(server.url + "/api/stats", headers=bearer(token), timeout=10)
    assert res.status_code == 200, res.text
    assert server.stop() == 0, server.output()[-3000:]

    # Once a key exists, a restart on the same database says nothing of the sort.
    again = start_server(env, tmp_path / "again.log")
    procs_to_stop.append(again)
    assert_failure(httpx.get(again.url + "/api/stats", timeout=10), 401)  # still keys mode
    assert first_key_hints(again) == [], again.output()[-3000:]
    assert "no API key yet" not in again.output(), again.output()[-3000:]
    res = httpx.get(again.url + "/api/stats", headers=bearer(token), timeout=10)
    assert res.status_code == 200, res.text


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


def database_files(db: Path) -> dict[str, bytes]:
    """The bytes of the database file and of its -wal and -shm files, where they exist."""
    paths = (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
    return {p.name: p.read_bytes() for p in paths if p.exists()}


def secrets_of(tokens: dict[str, str], delete_token: str) -> list[tuple[str, bytes]]:
    """Every form of a secret the database must not hold: each API token, its secret part (raw
    and base64-decoded), the delete token (raw and decoded)."""
    forms = []
    for name, token in tokens.items():
        secret = token.split("_", 2)[2]  # imgapi_<key id>_<secret>: the secret may hold "_" too
        forms += [
            (f"{name}'s token", token.encode()),
            (f"{name}'s token's secret", secret.encode()),
            (f"{name}'s token's secret, decoded", urlsafe_raw(secret)),
        ]
    forms += [
        ("delete token", delete_token.encode()),
        ("delete token, decoded", urlsafe_raw(delete_token)),
    ]
    return forms


def assert_no_secret_in(files: dict[str, bytes], forms: list[tuple[str, bytes]]) -> None:
    for what, value in forms:
        holding = [name for name, content in files.items() if value in content]
        assert holding == [], f"the {what} is in {holding}"


def test_the_database_holds_no_token(tmp_path: Path, procs_to_stop: list[Proc]) -> None:
    env = env_for(tmp_path, AUTH="keys")
    server = start_server(env, tmp_path / "api.log")
    procs_to_stop.append(server)
    tokens = {
        "keeper": create_key(env, "keeper", "read,upload,delete"),
        "boss": create_key(env, "boss", "admin"),
    }
    res = upload(server.url, seeded_jpeg(42), bearer(tokens["keeper"]))
    assert res.status_code == 201, res.text
    delete_token = res.json()["delete_token"]
    assert isinstance(delete_token, str) and len(delete_token) >= 32
    res = httpx.get(server.url + "/api/stats", headers=bearer(tokens["boss"]), timeout=10)
    assert res.status_code == 200, res.text
    forms = secrets_of(tokens, delete_token)
    hashes = [
        hashlib.sha256(t.encode()).hexdigest().encode() for t in (*tokens.values(), delete_token)
    ]
    db = Path(env["DB_PATH"])

    # While the server runs, with the WAL in use: the uses of both keys written back (last used,
    # once per cache reload) are recent writes too.
    procs.wait_until(
        lambda: all(row[0] for row in procs.db_rows(db, "SELECT last_used_at FROM api_keys")),
        10,
        "both keys' last use written",
    )
    live = database_files(db)
    assert set(live) == {db.name, f"{db.name}-wal", f"{db.name}-shm"}, sorted(live)
    assert live[f"{db.name}-wal"], "the WAL is empty while the server runs"
    assert_no_secret_in(live, forms)
    # The scan reads the right files: the hashes are there.
    content = b"".join(live.values())
    for digest in hashes:
        assert digest in content

    # And after a clean stop (the WAL checkpointed into the file and removed).
    assert server.stop() == 0, server.output()[-3000:]
    stopped = database_files(db)
    assert db.name in stopped and len(stopped[db.name]) > 0
    assert_no_secret_in(stopped, forms)
    content = b"".join(stopped.values())
    for digest in hashes:
        assert digest in content
    # Nor does the service's log hold either.
    log = server.output()
    for what, value in forms:
        if value.isascii():  # the decoded forms are binary: no log line holds them as such
            assert value.decode() not in log, f"the {what} is in the log"
