"""Server-Sent Events framing (the WHATWG HTML "event stream" format).

Written here rather than taken from a library: the maintained ones (sse-starlette, aiohttp-sse)
are bound to their frameworks, and the format is three kinds of line.
"""

from __future__ import annotations

import functools

from imgapi_core import records
from imgapi_core.store import Event


# Every stream of a process sends the same event: it is encoded once.
@functools.lru_cache(maxsize=1024)
def frame(event: Event) -> bytes:
    """One event: its id (what Last-Event-ID resumes from), its type, its JSON on one line."""
    # orjson writes no raw newline (they are escaped inside strings), so the data is one line.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.id,
        event.type.encode(),
        records.dumps(event.as_json()),
    )


def comment(text: str) -> bytes:
    """A line the client ignores: keeps proxies from closing an idle stream."""
    return b": " + text.replace("\n", " ").replace("\r", " ").encode() + b"\n\n"


def retry(milliseconds: int) -> bytes:
    """How long a browser's EventSource waits before it reconnects."""
    return b"retry: %d\n\n" % milliseconds
