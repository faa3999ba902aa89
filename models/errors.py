"""The error types the captioner raises to its callers: CaptionError, and CaptionUnavailable."""

from __future__ import annotations

import os

NOT_INSTALLED = "captioning is not installed (pip install 'imgapi[caption]')"


class CaptionError(Exception):
    """A caption that cannot be made: .message is what the job records as its error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CaptionUnavailable(CaptionError):
    """This process cannot caption at all: captioning is not installed, the model is not there
    (or cannot be loaded), or the requested device is absent.

    No image is at fault and another image would fare no better, so the job ends as
    `unavailable` with this reason rather than `failed`, and is retried once the operator has
    fixed the cause. A failure of one image (it cannot be decoded, generation fails) stays a
    plain CaptionError.
    """


def redact(text: str, *paths: str | None) -> str:
    """`text` with each of `paths` shortened to its last component.

    Caption errors end up in API responses, which must never show a server path; the full
    path goes to the log instead.
    """
    for path in sorted((p for p in paths if p), key=len, reverse=True):
        short = os.path.basename(os.path.normpath(path)) or path
        text = text.replace(os.path.realpath(path), short).replace(path, short)
    return text
