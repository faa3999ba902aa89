"""`python -m models download [MODEL]`: fetch a caption model into the local cache."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

# The service's settings, read the service's way (environment over .env over defaults): the one
# source of CAPTION_MODEL, its default and HF_TOKEN. Nothing else of the service is imported.
from imgapi_core import settings as settings_mod
from models.download import DEFAULT_TIMEOUT_S, DownloadError, download
from models.errors import NOT_INSTALLED, CaptionError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = settings_mod.load_or_exit()  # a bad setting: the service's one line, exit status 2
    if args.model:
        cfg = cfg.replace(caption_model=args.model)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = cfg.caption_model
    if not cfg.captions_enabled:
        print(f"CAPTION_MODEL is {model!r}: captions are off, nothing to download")
        return 0
    if os.path.isdir(model):
        print(f"{model} is a local directory: nothing to download")
        return 0
    try:
        path = download(
            model,
            token=args.token or cfg.hf_token or None,
            cache_dir=args.cache_dir,
            timeout_s=args.timeout,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded {model} to {path}")
    if args.no_verify:
        return 0
    return _verify(model, args.cache_dir)


def _verify(model: str, cache_dir: str | None) -> int:
    """Load it the way the service will (local files only, on CPU)."""
    from models.loader import load_blip

    try:
        loaded = load_blip(model, device="cpu", dtype="float32", cache_dir=cache_dir)
    except CaptionError as exc:
        if exc.message == NOT_INSTALLED:
            print(f"not verified: {exc.message}")
            return 0
        print(f"error: downloaded, but it does not load: {exc.message}", file=sys.stderr)
        return 2
    print(f"verified: {model} loads from the local cache (input {loaded.input_size})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download a caption model into the HF cache")
    default_model = settings_mod.defaults().caption_model
    fetch.add_argument(
        "model",
        nargs="?",
        help=f"hub id (default: CAPTION_MODEL from the environment or .env, else {default_model})",
    )
    fetch.add_argument("--token", help="hub token (default: HF_TOKEN from the environment or .env)")
    fetch.add_argument("--cache-dir", help="cache folder (default: the HF cache, $HF_HOME)")
    fetch.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"give up after this many seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    fetch.add_argument("--no-verify", action="store_true", help="skip the test load afterwards")
    return parser


if __name__ == "__main__":
    sys.exit(main())
