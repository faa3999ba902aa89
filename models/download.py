"""Fetch a caption model into the local Hugging Face cache: an explicit, bounded step.

The service only ever loads with local_files_only=True, so this is the one place that talks to
the hub. It runs in a child process that is killed at the deadline, because a hub request can
hang for ever (huggingface_hub's metadata calls have no timeout of their own).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from models.errors import NOT_INSTALLED

DEFAULT_TIMEOUT_S = 600.0


class DownloadError(Exception):
    pass


def download(
    model: str,
    *,
    token: str | None = None,
    cache_dir: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Download `model` (a hub id) and return its snapshot folder; DownloadError on failure.

    Only configs, tokenizer files and safetensors weights are fetched (pytorch_model.bin only
    when a repository has no safetensors), not the TF/Flax copies some repositories carry.
    """
    if importlib.util.find_spec("huggingface_hub") is None:
        raise DownloadError(NOT_INSTALLED)
    context = multiprocessing.get_context("spawn")  # no inherited threads or locks
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_fetch, args=(model, token, cache_dir, sender), name="imgapi-download", daemon=True
    )
    started = time.monotonic()
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise DownloadError(
                f"download of {model!r} did not finish within {timeout_s:g}s (stopped); "
                "check the network, or raise --timeout"
            )
        try:
            status, detail = receiver.recv()
        except EOFError:
            child.join(5)
            raise DownloadError(
                f"download of {model!r} failed: the download process died "
                f"(exit code {child.exitcode}) after {time.monotonic() - started:.0f}s"
            ) from None
    finally:
        receiver.close()
        _stop(child)
    if status != "ok":
        raise DownloadError(f"download of {model!r} failed: {detail}")
    return detail


def _fetch(model: str, token: str | None, cache_dir: str | None, sender: Connection) -> None:
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(model, token=token)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        path = snapshot_download(
            model, token=token, cache_dir=cache_dir, allow_patterns=["*.json", "*.txt", weights]
        )
        sender.send(("ok", str(path)))
    except Exception as exc:  # reported to the parent, which owns the message
        sender.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sender.close()


def _stop(child: BaseProcess) -> None:
    child.join(1)
    if child.is_alive():
        child.terminate()
        child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
