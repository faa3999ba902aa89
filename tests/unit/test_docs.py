"""The README keeps up with the code: every setting is in its table, with its real default; the
test files it names exist."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO
from sanic.config import DEFAULT_CONFIG

from imgapi_core import settings
from imgapi_core.pipeline import DRAIN_TIMEOUT_S

README = (REPO / "README.md").read_text(encoding="utf-8")


def settings_table() -> dict[str, str]:
    """The rows of the table under "## Settings" (other tables, e.g. compose's, do not count)."""
    section = README.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| (`[^`]*`|\(empty\)) \|", section, flags=re.M)
    return {name: default.strip("`") for name, default in rows}


def test_readme_lists_every_setting_with_its_default() -> None:
    table = settings_table()
    for name, default, _parse, _help in settings.declared():
        assert name in table, f"README's settings table lacks {name}"
        assert table[name] == (default or "(empty)"), f"README gives {name} another default"


def test_readme_lists_no_setting_that_does_not_exist() -> None:
    known = {name for name, *_ in settings.declared()}
    assert set(settings_table()) <= known


def test_readme_has_the_run_and_test_commands() -> None:
    assert "python imgapi.py" in README
    assert re.search(r"pip install torch==2\.13\.0 .*python -m pytest", README)


def test_api_shutdown_ends_before_compose_kills_the_container() -> None:
    # After SIGTERM Sanic lets requests finish for GRACEFUL_SHUTDOWN_TIMEOUT, then the records of
    # uploads cut short are written (up to DRAIN_TIMEOUT_S) and the database closes; compose
    # sends SIGKILL when stop_grace_period is over, so that must come later.
    compose = REPO / "compose.yaml"
    if not compose.exists():  # inside the image, which leaves its build files out
        pytest.skip("optional: compose.yaml is not in this tree (the test image)")
    api = yaml.safe_load(compose.read_text(encoding="utf-8"))["services"]["api"]
    graceful = float(
        api["environment"].get(
            "SANIC_GRACEFUL_SHUTDOWN_TIMEOUT", DEFAULT_CONFIG["GRACEFUL_SHUTDOWN_TIMEOUT"]
        )
    )
    grace = re.fullmatch(r"(\d+)s", str(api.get("stop_grace_period", "10s")))
    assert grace, f"stop_grace_period {api.get('stop_grace_period')!r}: write it in seconds"
    assert graceful + DRAIN_TIMEOUT_S < int(grace.group(1)), (graceful, api["stop_grace_period"])


def test_readme_keeps_workers_on_the_apis_host() -> None:
    # SQLite's locking needs one host: the jobs table must not send workers to other machines.
    row = next(line for line in README.splitlines() if line.startswith("| set | `off` |"))
    assert "same host" in row, row
    assert "they must run on one host" in README


def test_test_files_named_in_the_docs_exist() -> None:
    # The suite is in layers (tests/unit, contract, api, system): a moved file must not leave the
    # README or docs/ pointing at its old path.
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = 0
    for doc in docs:
        for path in re.findall(r"\btests/[\w/]+\.py\b", doc.read_text(encoding="utf-8")):
            named += 1
            assert (REPO / path).is_file(), f"{doc.name} names {path}, which does not exist"
    assert named, "no test file named in the README or docs/"
