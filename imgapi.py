"""imgapi: the service's command line, and `create_app` for Sanic's loader.

python imgapi.py [--host 127.0.0.1] [--port 8000] [--workers N]
python imgapi.py --check [--host 127.0.0.1] [--port 8000]
python imgapi.py keys create NAME [--scopes read,upload] | keys list | keys revoke NAME
python imgapi.py migrate-store [--to s3://BUCKET/PREFIX] [--database-to postgresql://...]
sanic imgapi:create_app --factory
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import urllib.error
import urllib.request
from functools import partial

from sanic import Sanic

from imgapi_core import metrics, worker
from imgapi_core import settings as settings_mod
from imgapi_core.app import create_app
from imgapi_core.logs import setup_logging

__all__ = ["create_app", "main"]

log = logging.getLogger("imgapi")

# What Sanic logs, with its traceback, for an error that stopped the server from starting
# (Sanic.serve_single, before it raises the error again). main() reports that error in one line.
SANIC_START_FAILURE = "Experienced exception while trying to serve"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        from imgapi_core.access import cli

        return cli.main(argv[1:])
    if argv[:1] == ["migrate-store"]:
        from imgapi_core import migrate

        return migrate.main(argv[1:])
    parser = argparse.ArgumentParser(description="imgapi: image upload and processing service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--dev", action="store_true", help="debug mode with auto-reload")
    parser.add_argument(
        "--check",
        action="store_true",
        help="health check: the API on --host/--port; where none listens, this host's arq worker",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(args.host, args.port)
    cfg = settings_mod.load_or_exit()
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
        logging.getLogger("sanic.error").addFilter(_drop_start_failure_traceback)
        try:
            Sanic.serve_single(primary=app)
        except Exception as exc:
            # A port in use, a database or media folder that cannot be opened, ...: the listeners
            # have closed what they opened, so the process can end now, with one line.
            log.debug("start-up failed", exc_info=True)
            print(f"imgapi: cannot start: {_one_line(exc)}", file=sys.stderr)
            return 1
    else:
        # Several processes: each scrape of /metrics sums their metrics, kept in one folder.
        _spare_the_state_manager(app)
        with metrics.shared_folder():
            Sanic.serve(primary=app, app_loader=loader)
    return 0


def _spare_the_state_manager(app: Sanic) -> None:
    """Sanic.serve starts a multiprocessing manager process that holds its workers' states, then
    reads them until the workers have stopped. A SIGTERM sent to the whole process group (systemd's
    default KillMode, `kill -- -PGID`) would end that manager at once, and the server with a
    BrokenPipeError and exit status 1 before its workers had finished. So the manager is started
    with SIGTERM ignored (a spawned process inherits that) and ended by Sanic's own shutdown call;
    everything started after it gets SIGTERM back."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def restore(*_: object) -> None:
        signal.signal(signal.SIGTERM, previous)

    app.register_listener(restore, "main_process_start")


def _drop_start_failure_traceback(record: logging.LogRecord) -> bool:
    return record.getMessage() != SANIC_START_FAILURE


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, OSError | RuntimeError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def check(host: str, port: int) -> int:
    """The container health check, one command for both roles of the image: the API answers
    /healthz; a worker container has no HTTP port (nothing listens), so there the check is its
    arq worker's live health key. 0 healthy, 1 not; one line either way."""
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as res:
            print(f"imgapi: healthy: {url} answered {res.status}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"imgapi: unhealthy: {url} answered {exc.code}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        if not isinstance(exc.reason, ConnectionRefusedError):
            print(f"imgapi: unhealthy: {url}: {exc.reason}", file=sys.stderr)
            return 1
    except (TimeoutError, ConnectionError) as exc:
        print(f"imgapi: unhealthy: {url}: {type(exc).__name__}", file=sys.stderr)
        return 1
    alive, what = worker.health(settings_mod.load_or_exit())
    if alive:
        print(f"imgapi: healthy: {what}")
        return 0
    print(f"imgapi: unhealthy: nothing listens at {url}, and {what}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
