"""imgapi: the service's command line, and `create_app` for Sanic's loader.

python imgapi.py [--host 127.0.0.1] [--port 8000] [--workers N]
sanic imgapi:create_app --factory
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from sanic import Sanic

from imgapi_core import settings as settings_mod
from imgapi_core.app import create_app
from imgapi_core.logs import setup_logging

__all__ = ["create_app", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="imgapi: image upload and processing service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--dev", action="store_true", help="debug mode with auto-reload")
    args = parser.parse_args(argv)
    try:
        cfg = settings_mod.load()
    except settings_mod.SettingsError as exc:
        print(f"imgapi: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    from sanic.worker.loader import AppLoader

    loader = AppLoader(factory=partial(create_app, cfg))
    app = loader.load()
    app.prepare(
        host=args.host,
        port=args.port,
        workers=args.workers,
        dev=args.dev,
        access_log=False,
        single_process=args.workers == 1 and not args.dev,
    )
    if args.workers == 1 and not args.dev:
        # One process: Sanic.serve would still add a manager process (and its memory).
        Sanic.serve_single(primary=app)
    else:
        Sanic.serve(primary=app, app_loader=loader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
