"""Signed image URLs: `?exp=UNIX_SECONDS&sig=...`, an HMAC-SHA256 over the path and the expiry,
so an `<img>` tag can load a thumbnail or original without sending a key.

Expiries are rounded up to a step (a tenth of the TTL, at most 5 minutes): the URLs of an image stay
the same for that long, so browsers and proxies can cache them. A URL is valid for at least the TTL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from urllib.parse import urlencode

VALID, EXPIRED, BAD = "valid", "expired", "bad"


class UrlSigner:
    def __init__(self, secret: str, ttl_s: int, clock: Callable[[], float] = time.time) -> None:
        self._key = secret.encode()
        self.ttl_s = ttl_s
        self.step_s = max(1, min(300, ttl_s // 10))
        self.clock = clock

    def _sig(self, path: str, exp: int) -> str:
        mac = hmac.new(self._key, f"{path}\n{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def query(self, path: str) -> str:
        exp = math.ceil((self.clock() + self.ttl_s) / self.step_s) * self.step_s
        return urlencode({"exp": exp, "sig": self._sig(path, exp)})

    def verify(self, path: str, exp: str | None, sig: str | None) -> str:
        if exp is None or sig is None or not exp.isascii() or not exp.isdigit() or len(exp) > 12:
            return BAD
        if not hmac.compare_digest(self._sig(path, int(exp)).encode(), sig.encode()):
            return BAD
        return VALID if int(exp) >= self.clock() else EXPIRED

    def seconds_left(self, exp: str) -> int:
        return max(0, int(exp) - int(self.clock()))
