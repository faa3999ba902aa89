"""Numbers sent by clients, read one way everywhere."""

from __future__ import annotations

import re

# Numbers a client sends (query parameters, Content-Length) are ASCII digits and nothing else.
_ASCII_DIGITS = re.compile(r"[0-9]+")
_MAX_DIGITS = 30


def whole_number(text: str | None) -> int | None:
    """A non-negative whole number sent by a client, or None when `text` is not one.

    The one way numbers from clients are read: str.isdigit() and int() also accept "²" (isdigit
    is true, then int raises), "١٢", " 12", "+1" or "1_0", and int() raises past 4300 digits.
    Only ASCII digits are taken; a number of more than 30 significant digits comes back as 10**30,
    which is above every limit it is compared with."""
    if text is None or not _ASCII_DIGITS.fullmatch(text):
        return None
    significant = text.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        return 10**_MAX_DIGITS
    return int(significant or "0")
