"""Shared fixtures: the corpus folders, fresh settings on a temp directory per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
