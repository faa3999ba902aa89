"""The upload rate limit (UPLOAD_RATE_LIMIT) with the `limits` library: a moving window, kept in
Redis when REDIS_URL is set (shared by every process) and in memory otherwise.

Redis being down must not stop uploads: the limit is then not enforced, and a warning logged.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

log = logging.getLogger("imgapi.access")


class UploadLimiter:
    def __init__(self, spec: str, redis_url: str = "", key_prefix: str = "imgapi") -> None:
        self.items: list[RateLimitItem] = parse_many(spec)
        self.storage: Storage
        if redis_url:
            self.storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                key_prefix=key_prefix,
                socket_timeout=1.0,
                socket_connect_timeout=1.0,
            )
        else:
            self.storage = MemoryStorage()
        self.limiter = MovingWindowRateLimiter(self.storage)

    async def hit(self, identity: str) -> float | None:
        """None when allowed; else the seconds to wait before the next upload may pass."""
        try:
            for item in self.items:
                if not await self.limiter.hit(item, "upload", identity):
                    stats = await self.limiter.get_window_stats(item, "upload", identity)
                    return max(1.0, math.ceil(stats.reset_time - time.time()))
        except Exception as exc:  # the store of the counters is unreachable
            log.warning("upload rate limit not checked: %s: %s", type(exc).__name__, exc)
        return None
