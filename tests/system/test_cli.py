"""The other commands, run as they are documented: `python -m models download`,
`sanic imgapi:create_app --factory`, and the health checks (`arq jobs.WorkerSettings --check`,
the image's HEALTHCHECK)."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from procs import (
    REPO,
    Proc,
    RedisServer,
    free_port,
    run_command,
    settings_for,
    start_api,
    start_sanic_cli,
    start_worker,
    wait_until,
)

from imgapi_core import settings as settings_mod
from imgapi_core import worker as worker_mod

SETTING_NAMES = [name for name, *_ in settings_mod.declared()]

# -- python -m models download ----------------------------------------------------------------


def models_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m models download ...` in tmp_path (where its .env is), with no setting in its
    environment but `env`, and a hub that refuses connections (nothing leaves this machine)."""
    base = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    base.update(
        PYTHONPATH=str(REPO),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "models", "download", "--timeout", "20", *args],
        cwd=tmp_path,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("value", ["none", "None", "NONE"])
@pytest.mark.parametrize("source", ["env", "dotenv"])
def test_download_with_captions_off_downloads_nothing(
    tmp_path: Path, source: str, value: str
) -> None:
    # The service reads CAPTION_MODEL from .env too, and `none` in any case turns captions off.
    env = {"CAPTION_MODEL": value} if source == "env" else {}
    if source == "dotenv":
        (tmp_path / ".env").write_text(f"CAPTION_MODEL={value}\n")
    done = models_cli(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert "captions are off, nothing to download" in done.stdout


def test_download_with_a_bad_setting_gives_the_services_one_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CAPTION_DEVICE=tpu\n")
    done = models_cli(tmp_path)
    assert done.returncode == 2, done.stderr
    expected = "imgapi: bad setting: CAPTION_DEVICE='tpu': must be one of auto, cpu, cuda"
    assert [line for line in done.stderr.splitlines() if line.strip()] == [expected], done.stderr


@pytest.fixture
def cli_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`python -m models`'s main() in-process, in tmp_path, with no setting in the environment;
    the download itself is recorded instead of made."""
    cli = importlib.import_module("models.__main__")
    calls: list[dict[str, Any]] = []

    def download(model: str, **kwargs: Any) -> str:
        calls.append({"model": model, **kwargs})
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(cli, "download", download)
    monkeypatch.chdir(tmp_path)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    return calls


def run_models_main(*args: str) -> int:
    return importlib.import_module("models.__main__").main(["download", "--no-verify", *args])


def test_download_takes_its_default_model_from_the_settings(
    cli_downloads: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Declared once: a changed default in settings is the CLI's default too.
    patched = tuple(
        s._replace(default="someone/other-model") if s.name == "CAPTION_MODEL" else s
        for s in settings_mod.declared()
    )
    monkeypatch.setattr(settings_mod, "declared", lambda: patched)
    assert run_models_main() == 0
    assert [call["model"] for call in cli_downloads] == ["someone/other-model"]


def test_download_reads_model_and_token_like_the_service(
    tmp_path: Path, cli_downloads: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "CAPTION_MODEL=someone/from-dotenv\nexport HF_TOKEN='hf_from_dotenv'\n"
    )
    assert run_models_main() == 0  # .env
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert run_models_main() == 0  # the environment wins over .env
    assert run_models_main("someone/given", "--token", "hf_given") == 0  # arguments win over all
    assert [(call["model"], call["token"]) for call in cli_downloads] == [
        ("someone/from-dotenv", "hf_from_dotenv"),
        ("someone/from-dotenv", "hf_from_env"),
        ("someone/given", "hf_given"),
    ]


# -- sanic imgapi:create_app --factory --------------------------------------------------------


def test_the_sanic_factory_command_serves_and_stops_cleanly(tmp_path: Path) -> None:
    proc = start_sanic_cli(settings_for(tmp_path), tmp_path / "sanic.log")
    try:
        with urllib.request.urlopen(proc.url + "/healthz", timeout=5) as res:
            assert res.status == 200
            assert json.loads(res.read())["database"] == "ok"
        # Sanic's process manager sees a worker's readiness on its next poll (every 0.1 s); a
        # SIGTERM before that is lost in its start-up loop and it never ends (a Sanic race, not
        # ours). Let it get there before stopping.
        time.sleep(1)
        # To the main process only, as `docker stop` does: it stops its worker itself (a SIGTERM
        # to the whole group races the worker's exit against the manager's pipe read).
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.popen.wait(30)
    finally:
        proc.stop(within=30)
    assert code == 0, proc.output()[-3000:]
    assert "Traceback" not in proc.output()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def sigterm_action(pid: int) -> str:
    """What SIGTERM does to the process: 'ignored', 'caught' (a handler), or 'default' (ends it)."""
    status = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    bit = 1 << (signal.SIGTERM - 1)
    if int(status["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(status["SigCgt"], 16) & bit else "default"


def test_a_sigterm_to_the_whole_process_group_stops_several_server_processes_cleanly(
    tmp_path: Path,
) -> None:
    """As systemd's default KillMode and `kill -- -PGID` send it: Sanic's state-manager process
    gets the signal too, and used to die before the main process had read its workers' states
    (BrokenPipeError, exit status 1)."""
    proc = start_api(settings_for(tmp_path), tmp_path / "api.log", workers=2)
    try:
        # Every worker past its start-up (see the test above: a signal before that is lost).
        wait_until(lambda: proc.output().count("Worker ready") == 2, 30, "both workers ready")
        time.sleep(1)
        # Whether the race is lost depends on timing; what decides it does not: no process of the
        # server may die of the signal at once, before the main process has seen its workers end.
        actions = sorted(sigterm_action(child) for child in children(proc.pid))
        assert actions.count("caught") == 2, actions  # the two server processes
        assert "default" not in actions, actions
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.popen.wait(30)
    finally:
        proc.stop(within=30)
    assert code == 0, proc.output()[-3000:]
    assert "Traceback" not in proc.output()
    assert proc.output().count("Worker complete") == 2


def test_the_sanic_factory_command_with_a_bad_setting_exits_with_one_line(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "sanic", "imgapi:create_app", "--factory", "--port", "1"]
    env = {**settings_for(tmp_path, WORKER="maybe"), "PYTHONPATH": str(REPO)}
    done = run_command(args, env, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["imgapi: bad setting: WORKER='maybe': must be one of inline, off"], lines


# -- health checks ----------------------------------------------------------------------------


def image_healthcheck() -> list[str]:
    """The Containerfile's HEALTHCHECK command, run here with this Python."""
    containerfile = REPO / "Containerfile"
    if not containerfile.exists():  # inside the image, which leaves its build files out
        pytest.skip("optional: the Containerfile is not in this tree (the test image)")
    text = containerfile.read_text()
    found = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", text, flags=re.M)
    assert found, "the Containerfile has no HEALTHCHECK ... CMD [...]"
    command = json.loads(found.group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def start_workers(env: dict[str, str], tmp_path: Path, count: int) -> list[Proc]:
    """Workers that have each written their health key."""
    cfg = settings_mod.load(env=env, dotenv=None)
    client = redis.Redis.from_url(cfg.redis_url)
    workers = [start_worker(env, tmp_path / f"worker-{n}.log") for n in range(count)]
    try:
        for proc in workers:
            key = worker_mod.health_check_key(cfg, pid=proc.pid)
            wait_until(lambda key=key: client.exists(key), 30, f"health key {key}")
    except BaseException:
        for proc in workers:
            proc.kill()
        raise
    finally:
        client.close()
    return workers


@pytest.mark.redis
def test_worker_check_passes_while_any_worker_of_this_host_lives(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    env = settings_for(tmp_path, REDIS_URL=private_redis.url)
    check = [sys.executable, "-m", "arq", "jobs.WorkerSettings", "--check"]
    first, second = start_workers(env, tmp_path, 2)
    try:
        assert run_command(check, env, REPO).returncode == 0
        assert first.stop() == 0
        # The stopped worker deleted its own health key, not the one of the worker still running.
        done = run_command(check, env, REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        # The image's one HEALTHCHECK, in a worker container: no API listens on its port.
        done = run_command([*image_healthcheck(), "--port", str(free_port())], env, REPO)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        first.stop()
        second.stop()
    done = run_command(check, env, REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no live arq worker" in done.stderr
    done = run_command([*image_healthcheck(), "--port", str(free_port())], env, REPO)
    assert done.returncode == 1, done.stdout + done.stderr


def test_image_healthcheck_asks_the_api_where_one_listens(tmp_path: Path) -> None:
    env = settings_for(tmp_path)
    api = start_api(env, tmp_path / "api.log")
    port = api.url.rsplit(":", 1)[1]
    try:
        done = run_command([*image_healthcheck(), "--port", port], env, REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "/healthz answered 200" in done.stdout
    finally:
        api.stop()
    # Nothing listens now, and with no REDIS_URL no worker can be alive either.
    done = run_command([*image_healthcheck(), "--port", port], env, REPO)
    assert done.returncode == 1, done.stdout + done.stderr
