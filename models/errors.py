"""The one error type the captioner raises to its callers."""

from __future__ import annotations

import os

NOT_INSTALLED = "captioning is not installed (pip install 'imgapi[caption]')"


class CaptionError(Exception):
    """A caption that cannot be made: .message is what the job records as its error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def redact(text: str, *paths: str | None) -> str:
    """`text` with each of `paths` shortened to its last component.

    Caption errors end up in API responses, which must never show a server path; the full
    path goes to the log instead.
    """
    for path in sorted((p for p in paths if p), key=len, reverse=True):
        short = os.path.basename(os.path.normpath(path)) or path
        text = text.replace(os.path.realpath(path), short).replace(path, short)
    return text
