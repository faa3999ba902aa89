"""The BLIP captioner: lazy load once, remember failures, batch concurrent captions."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from models.batcher import MicroBatcher
from models.errors import CaptionError, CaptionUnavailable, redact
from models.images import shrink_for_caption
from models.loader import DTYPES, LoadedBlip, load_blip, model_label

logger = logging.getLogger("imgapi.captions")


class Captioner:
    """Captions images with one BLIP model, loaded on first use in a dedicated torch thread.

    Building one is cheap (nothing is loaded, imported or started). One instance per process:
    each loads its own copy of the model.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        batch_size: int = 8,
        max_wait_ms: float = 50,
        threads: int = 0,
        token: str | None = None,
        cache_dir: str | None = None,
        retry_after_s: float = 60,
        dtype: str = "auto",
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if batch_size < 1 or max_wait_ms < 0 or threads < 0 or retry_after_s < 0:
            raise ValueError("batch_size must be >= 1; max_wait_ms, threads, retry_after_s >= 0")
        if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
            raise ValueError("need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1")
        self.model = model
        self._load_options: dict[str, Any] = {
            "device": device,
            "dtype": dtype,
            "threads": threads,
            "token": token,
            "cache_dir": cache_dir,
        }
        self._batch_size = batch_size
        # Told each batch's size (the service's metrics): models/ knows nothing of the service.
        self._on_batch = on_batch
        self._max_wait_s = max_wait_ms / 1000
        self._retry_after_s = retry_after_s
        self._max_new_tokens = max_new_tokens
        self._min_new_tokens = min_new_tokens
        self._loaded: LoadedBlip | None = None
        self._load_future: Future[LoadedBlip] | None = None
        # (error class, message, time.monotonic()) of the last failed load: refusals during the
        # retry window raise the same class, so callers tell "cannot caption here" the same way.
        self._failure: tuple[type[CaptionError], str, float] | None = None
        self._loads = 0
        self._load_attempts = 0
        # The last load failure logged at warning level: a new try after the retry window that
        # fails the same way is logged at info, so a missing model is not one warning a minute.
        self._failure_warned: str | None = None
        self._generate_calls = 0
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher[Any, str] | None = None

    @property
    def generate_calls(self) -> int:
        return self._generate_calls

    @property
    def loads(self) -> int:
        """How many times the model was actually loaded (successfully)."""
        return self._loads

    @property
    def load_attempts(self) -> int:
        """Loads started, failed ones included (tests check there is no retry storm)."""
        return self._load_attempts

    @property
    def device(self) -> str | None:
        """The device in use once loaded ("cpu", "cuda"), else None."""
        return self._loaded.device if self._loaded else None

    @property
    def dtype(self) -> str | None:
        """The dtype in use once loaded ("bfloat16", "float16", ...), else None."""
        return self._loaded.dtype if self._loaded else None

    async def load(self) -> None:
        """Load now rather than on the first caption; CaptionUnavailable if it cannot.
        Idempotent."""
        await self._ensure_loaded()

    async def caption(self, image_path: str | os.PathLike[str]) -> str:
        """The caption of one image file. CaptionUnavailable when the model cannot be loaded
        (no image would be captioned); CaptionError when this image cannot be."""
        loaded = await self._ensure_loaded()
        pixels = await asyncio.to_thread(_prepare, loaded, image_path)
        return await self._batcher_here().submit(pixels)

    async def close(self) -> None:
        """Stop the batcher and the torch thread; the model stays loaded. Idempotent.

        A caption() after close() starts them again.
        """
        batcher, self._batcher = self._batcher, None
        if batcher is not None and batcher.loop is asyncio.get_running_loop():
            await batcher.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            # Never wait here: a running generate() would block the event loop.
            executor.shutdown(wait=False)

    async def _ensure_loaded(self) -> LoadedBlip:
        if self._loaded is not None:
            return self._loaded
        future = self._load_future
        if future is None or future.done():
            if self._failure is not None:
                error_class, message, failed_at = self._failure
                if time.monotonic() - failed_at < self._retry_after_s:
                    raise error_class(message)
            self._load_attempts += 1
            future = self._load_future = self._torch_executor().submit(self._load_in_thread)
        # One load serves every caller, on any event loop; a caller that is cancelled while
        # waiting leaves it running for the others.
        return await asyncio.shield(asyncio.wrap_future(future))

    def _load_in_thread(self) -> LoadedBlip:
        started = time.perf_counter()
        try:
            loaded = load_blip(self.model, **self._load_options)
        except Exception as exc:
            error = _load_failure(self.model, exc)
            self._failure = (type(error), error.message, time.monotonic())
            repeated = error.message == self._failure_warned
            self._failure_warned = error.message
            logger.log(
                logging.INFO if repeated else logging.WARNING,
                "caption model %s failed to load in %.2fs: %s (cause: %r)",
                self.model,
                time.perf_counter() - started,
                error.message,
                exc.__cause__ if exc is error else exc,
            )
            if exc is error:
                raise
            raise error from exc
        self._loaded = loaded
        self._loads += 1
        self._failure = None
        logger.info(
            "caption model %s loaded: device=%s dtype=%s in %.2fs",
            self.model,
            loaded.device,
            loaded.dtype,
            time.perf_counter() - started,
        )
        return loaded

    def _generate(self, batch: list[Any]) -> list[str]:
        """Runs in the torch thread only."""
        assert self._loaded is not None
        self._generate_calls += 1
        try:
            return self._loaded.generate(
                batch, max_new_tokens=self._max_new_tokens, min_new_tokens=self._min_new_tokens
            )
        except Exception as exc:
            logger.exception("caption generation failed for a batch of %d", len(batch))
            raise CaptionError(f"caption generation failed: {type(exc).__name__}: {exc}") from exc

    def _torch_executor(self) -> ThreadPoolExecutor:
        # One thread: torch's thread count is set per thread, and batches must not overlap.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgapi-torch")
        return self._executor

    def _batcher_here(self) -> MicroBatcher[Any, str]:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            # A batcher left on another (finished) event loop cannot serve this one.
            self._batcher = MicroBatcher(
                self._generate,
                self._torch_executor(),
                batch_size=self._batch_size,
                max_wait_s=self._max_wait_s,
                closed_error=lambda: CaptionError("the captioner was closed"),
                on_batch=self._on_batch,
            )
        return self._batcher


def _prepare(loaded: LoadedBlip, image_path: str | os.PathLike[str]) -> Any:
    image = shrink_for_caption(image_path, loaded.input_size)
    try:
        return loaded.pixels(image)
    except Exception as exc:  # the processor refusing an odd image is its error
        raise CaptionError(f"cannot prepare image: {type(exc).__name__}: {exc}") from exc


def _load_failure(model: str, exc: BaseException) -> CaptionUnavailable:
    """`exc` from loading as a CaptionUnavailable: whatever went wrong, a model that does not
    load leaves no image captionable in this process."""
    if isinstance(exc, CaptionUnavailable):
        return exc
    if isinstance(exc, CaptionError):
        return CaptionUnavailable(exc.message)
    cause = redact(f"{type(exc).__name__}: {exc}", model if os.path.isdir(model) else None)
    return CaptionUnavailable(f"caption model {model_label(model)!r} cannot be loaded: {cause}")
