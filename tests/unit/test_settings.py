"""settings: defaults, where values come from (env over .env over defaults), and bad values."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from imgapi_core import settings as settings_mod
from imgapi_core.settings import SettingsError


def test_defaults_match_the_design():
    cfg = settings_mod.defaults()
    assert cfg.db_path == "./data/imgapi.db"
    assert cfg.media_dir == "./media"
    assert cfg.redis_url == ""
    assert cfg.worker == "inline"
    assert cfg.max_upload_bytes == 50_000_000
    assert cfg.max_pixels == 50_000_000
    assert cfg.caption_model == "Salesforce/blip-image-captioning-base"
    assert cfg.caption_device == "auto"
    assert cfg.caption_batch >= 1 and cfg.job_concurrency >= 1
    assert cfg.hf_token == ""
    assert cfg.captions_enabled
    assert cfg.tmp_dir == Path("./media/tmp")


def test_every_setting_is_declared_once_with_help():
    names = [name for name, *_ in settings_mod.declared()]
    assert len(names) == len(set(names))
    fields = {f.name for f in dataclasses.fields(settings_mod.Settings)}
    assert {name.lower() for name in names} == fields
    for name, default, parse, help_text in settings_mod.declared():
        assert name.isupper() and help_text.strip(), name
        parse(default)  # every default is valid


def test_env_wins_over_dotenv_which_wins_over_defaults(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\n"
        "\n"
        "MAX_PIXELS=1000\n"
        "WORKER=off\n"
        "REDIS_URL=redis://127.0.0.1:6379/3\n"
        "export HF_TOKEN='hf_from_file'\n"
        'CAPTION_MODEL="none"\n'
        "not a setting line\n"
    )
    cfg = settings_mod.load(env={"MAX_PIXELS": "2000", "DB_PATH": "/x/y.db"}, dotenv=dotenv)
    assert cfg.max_pixels == 2000  # env
    assert cfg.db_path == "/x/y.db"  # env, not in the file
    assert cfg.worker == "off"  # .env
    assert cfg.redis_url == "redis://127.0.0.1:6379/3"  # .env
    assert cfg.hf_token == "hf_from_file"  # .env, `export` and quotes stripped
    assert cfg.caption_model == "none" and not cfg.captions_enabled
    assert cfg.max_upload_bytes == 50_000_000  # default


def test_missing_dotenv_is_fine(tmp_path):
    cfg = settings_mod.load(env={}, dotenv=tmp_path / "absent.env")
    assert cfg == settings_mod.defaults()


def test_load_reads_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "1_000")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/9")
    cfg = settings_mod.load(dotenv=None)
    assert cfg.max_upload_bytes == 1000
    assert cfg.redis_url == "redis://127.0.0.1:6379/9"


def test_values_are_normalised():
    cfg = settings_mod.load(
        env={
            "WORKER": " OFF ",
            "REDIS_URL": " redis://127.0.0.1:6379/0 ",
            "PUBLIC_URL": "https://img.example.com/",
            "LOG_LEVEL": "DEBUG",
        },
        dotenv=None,
    )
    assert cfg.worker == "off"
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"
    assert cfg.public_url == "https://img.example.com"
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_PIXELS", "abc"),
        ("MAX_PIXELS", "0"),
        ("MAX_UPLOAD_BYTES", "-1"),
        ("MAX_UPLOAD_BYTES", "1.5"),
        ("WORKER", "maybe"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", "redis://127.0.0.1:notaport"),
        ("REDIS_URL", "redis://127.0.0.1:99999/0"),
        ("REDIS_URL", "redis://127.0.0.1:6379/x"),
        ("REDIS_URL", "redis://127.0.0.1:6379/-1"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=soon"),
        ("DB_PATH", ""),
        ("DB_PATH", "  "),
        ("MEDIA_DIR", ""),
        ("CAPTION_MODEL", ""),
        ("CAPTION_DEVICE", "tpu"),
        ("JOB_LEASE_SECONDS", "0"),
        ("SWEEP_SECONDS", "nan"),
        ("PUBLIC_URL", "ftp://x"),
        ("JOB_CONCURRENCY", ""),
        ("AUTH", "password"),
        ("PUBLIC_READ", "maybe"),
        ("SIGNED_URL_TTL", "0"),
        ("UPLOAD_RATE_LIMIT", "fast"),
        ("CORS_ORIGINS", "app.example"),
        ("ALLOWED_FORMATS", "jpeg,bmp"),
        ("ALLOWED_FORMATS", ","),
        ("MAX_FRAMES", "0"),
        ("THUMB_FORMATS", "webp"),  # JPEG is what `*/*` gets: always made
        ("THUMB_FORMATS", "jpeg,png"),
        ("WEBHOOK_URL", "ftp://hooks.example/in"),
        ("WEBHOOK_URL", "https://"),
        ("WEBHOOK_MAX_ATTEMPTS", "0"),
        ("WEBHOOK_TIMEOUT", "0"),
        ("EVENTS_HEARTBEAT_SECONDS", "-1"),
        ("EVENTS_KEEP_SECONDS", "1.5"),
        ("METRICS_PUBLIC", "maybe"),
        ("WORKER_METRICS_PORT", "70000"),
        ("WORKER_METRICS_PORT", "x"),
        ("DATABASE_URL", "mysql://db/imgapi"),
        ("STORAGE_URL", "/srv/media"),
        ("STORAGE_URL", "s3://"),
        ("STORAGE_URL", "s3://bucket/p?versionId=1"),
        ("S3_ENDPOINT_URL", "minio:9000"),
        ("S3_REDIRECT", "sometimes"),
    ],
)
def test_bad_value_raises_settings_error_naming_the_setting(name, value):
    with pytest.raises(SettingsError) as caught:
        settings_mod.load(env={name: value}, dotenv=None)
    message = str(caught.value)
    assert name in message and repr(value) in message, message
    assert "\n" not in message


def test_bad_value_in_dotenv_is_named_too(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WORKER=sometimes\n")
    with pytest.raises(SettingsError, match="WORKER"):
        settings_mod.load(env={}, dotenv=dotenv)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379", "redis://:pw@h:6380/2", "rediss://h/0?db=3", "unix:///r.sock"]
)
def test_good_redis_urls_pass(url):
    assert settings_mod.load(env={"REDIS_URL": url}, dotenv=None).redis_url == url


def test_webhook_urls_need_a_secret():
    # Without one, receivers could not tell a delivery from a forgery.
    with pytest.raises(SettingsError) as caught:
        settings_mod.load(env={"WEBHOOK_URL": "https://hooks.example/in"}, dotenv=None)
    assert str(caught.value).startswith("WEBHOOK_URL needs WEBHOOK_SECRET")
    cfg = settings_mod.load(
        env={"WEBHOOK_URL": "https://a.example/x, http://b.example/y", "WEBHOOK_SECRET": "s"},
        dotenv=None,
    )
    assert cfg.webhook_url == ("https://a.example/x", "http://b.example/y")


def test_a_database_url_password_never_shows_in_an_error():
    with pytest.raises(SettingsError) as caught:
        settings_mod.load(env={"DATABASE_URL": "mysql://u:hunter2@db/x"}, dotenv=None)
    assert "hunter2" not in str(caught.value) and "u:***@db" in str(caught.value)


def test_s3_redirect_needs_storage_url():
    # Only S3 objects have presigned URLs: with a local folder the setting would do nothing.
    with pytest.raises(SettingsError, match="S3_REDIRECT=1 needs STORAGE_URL"):
        settings_mod.load(env={"S3_REDIRECT": "1"}, dotenv=None)
    cfg = settings_mod.load(
        env={"S3_REDIRECT": "1", "STORAGE_URL": "s3://photos/imgapi/"}, dotenv=None
    )
    assert cfg.s3_redirect and cfg.storage_url == "s3://photos/imgapi"


@pytest.mark.parametrize("where", ["env", "dotenv"])
def test_worker_off_needs_redis_url(tmp_path, where):
    # The API would only enqueue, and there is no queue: nothing would ever run the jobs.
    dotenv = tmp_path / ".env"
    dotenv.write_text("WORKER=off\n" if where == "dotenv" else "")
    env = {"WORKER": "off"} if where == "env" else {}
    with pytest.raises(SettingsError) as caught:
        settings_mod.load(env=env, dotenv=dotenv)
    message = str(caught.value)
    assert message.startswith("WORKER='off' needs REDIS_URL") and "\n" not in message
    cfg = settings_mod.load(env={**env, "REDIS_URL": "redis://h:6379/0"}, dotenv=dotenv)
    assert cfg.worker == "off"


def test_replace_keeps_the_rest():
    cfg = settings_mod.defaults()
    changed = cfg.replace(worker="off")
    assert changed.worker == "off" and cfg.worker == "inline"
    assert dataclasses.replace(changed, worker="inline") == cfg


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_PIXELS", "abc"),
        ("WORKER", "maybe"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", "redis://127.0.0.1:notaport"),
        ("CAPTION_MODEL", ""),
    ],
)
def test_start_with_a_bad_value_exits_with_one_line_on_stderr(tmp_path, name, value):
    names = {setting for setting, *_ in settings_mod.declared()}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({name: value, "DB_PATH": str(tmp_path / "db.sqlite")})
    env["MEDIA_DIR"] = str(tmp_path / "media")
    result = subprocess.run(
        [sys.executable, str(REPO / "imgapi.py"), "--port", "1"],
        cwd=tmp_path,  # no .env here
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert name in lines[0] and value in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "db.sqlite").exists()  # stopped before opening anything


def test_readme_lists_every_setting():
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not written yet")
    text = readme.read_text()
    missing = [name for name, *_ in settings_mod.declared() if name not in text]
    assert not missing, f"README.md does not list {missing}"
