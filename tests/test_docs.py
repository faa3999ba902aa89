"""The README keeps up with the code: every setting is in its table, with its real default."""

from __future__ import annotations

import re

from conftest import REPO

from imgapi_core import settings

README = (REPO / "README.md").read_text(encoding="utf-8")


def settings_table() -> dict[str, str]:
    """The rows of the table under "## Settings" (other tables, e.g. compose's, do not count)."""
    section = README.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (`[^`]*`|\(empty\)) \|", section, flags=re.M)
    return {name: default.strip("`") for name, default in rows}


def test_readme_lists_every_setting_with_its_default() -> None:
    table = settings_table()
    for name, default, _parse, _help in settings.SETTINGS:
        assert name in table, f"README's settings table lacks {name}"
        assert table[name] == (default or "(empty)"), f"README gives {name} another default"


def test_readme_lists_no_setting_that_does_not_exist() -> None:
    known = {name for name, *_ in settings.SETTINGS}
    assert set(settings_table()) <= known


def test_readme_has_the_run_and_test_commands() -> None:
    assert "python imgapi.py" in README
    assert re.search(r"pip install torch==2\.13\.0 .*python -m pytest", README)
