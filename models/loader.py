"""Load a BLIP captioning model from a local folder or the local hub cache, never the network.

torch, transformers and huggingface_hub are imported here at load time only: they are the
optional `caption` extra, and importing `models` must stay cheap without them.

Every failure here is a CaptionUnavailable: a model that does not load leaves this process
unable to caption any image, whatever the image.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Any

from models.errors import NOT_INSTALLED, CaptionUnavailable, redact

DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


@dataclass(frozen=True)
class LoadedBlip:
    """A loaded processor + model pair; `pixels` may run in any thread, `generate` in one."""

    processor: Any
    model: Any
    device: str
    dtype: str
    input_size: tuple[int, int]

    def pixels(self, image: Any) -> Any:
        """The processor's float32 tensor (1, 3, H, W) for one PIL image."""
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]

    def generate(self, pixels: list[Any], *, max_new_tokens: int, min_new_tokens: int) -> list[str]:
        torch = importlib.import_module("torch")
        batch = torch.cat(pixels).to(device=self.device, dtype=getattr(torch, self.dtype))
        with torch.inference_mode():
            tokens = self.model.generate(
                pixel_values=batch,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]


def load_blip(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    token: str | None = None,
    cache_dir: str | None = None,
) -> LoadedBlip:
    """Load `model` (a local directory or a hub id already in the cache); CaptionUnavailable if
    it cannot, with a reason that names no server path."""
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
        hub = importlib.import_module("huggingface_hub")
    except ImportError as exc:
        raise CaptionUnavailable(NOT_INSTALLED) from exc

    source, label = _locate(model, cache_dir, hub)
    resolved_device = resolve_device(device, torch)
    resolved_dtype = choose_dtype(resolved_device, dtype, torch)
    torch.set_num_threads(threads if threads > 0 else _cpu_count())
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per worker

    options: dict[str, Any] = {"local_files_only": True, "token": token, "cache_dir": cache_dir}
    local = source if os.path.isdir(source) else None
    try:
        config = transformers.AutoConfig.from_pretrained(source, **options)
        if config.model_type != "blip":
            raise CaptionUnavailable(
                f"caption model {label!r} is a {config.model_type!r} model, not BLIP captioning"
            )
        processor = transformers.BlipProcessor.from_pretrained(source, backend="pil", **options)
        blip = transformers.BlipForConditionalGeneration.from_pretrained(
            source, dtype=getattr(torch, resolved_dtype), attn_implementation="eager", **options
        )
        _check_tokenizer(processor.tokenizer, config, label)
    except CaptionUnavailable:
        raise
    except Exception as exc:  # JSON, safetensors, OSError, ValueError, ...
        if local is None and _not_cached(exc, hub):
            raise CaptionUnavailable(_not_cached_message(model)) from exc
        cause = redact(f"{type(exc).__name__}: {exc}", local, cache_dir, hub.constants.HF_HUB_CACHE)
        raise CaptionUnavailable(
            f"caption model {label!r} cannot be loaded: corrupt or missing files: {cause}"
        ) from exc
    try:
        blip = blip.to(resolved_device).eval()
    except Exception as exc:  # out of device memory, a broken driver, ...
        cause = redact(f"{type(exc).__name__}: {exc}", local, cache_dir)
        raise CaptionUnavailable(
            f"caption model {label!r} cannot be put on {resolved_device}: {cause}"
        ) from exc
    size = processor.image_processor.size
    loaded = LoadedBlip(
        processor=processor,
        model=blip,
        device=resolved_device,
        dtype=resolved_dtype,
        input_size=(int(size.width or size.shortest_edge), int(size.height or size.shortest_edge)),
    )
    try:
        # The first generate() pays one-time kernel and memory set-up (seconds on CPU, measured
        # with bench/bench_captions.py); pay it here rather than in the first caption job.
        width, height = loaded.input_size
        loaded.generate([torch.zeros(1, 3, height, width)], max_new_tokens=2, min_new_tokens=0)
    except Exception as exc:
        cause = redact(f"{type(exc).__name__}: {exc}", local, cache_dir)
        raise CaptionUnavailable(
            f"caption model {label!r} loads but cannot caption: {cause}"
        ) from exc
    return loaded


def resolve_device(requested: str, torch: Any) -> str:
    """The device to load on; CaptionUnavailable when the one asked for is not in this machine
    (a setting of the process, not a fault of any image)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionUnavailable(
            f"caption device {requested!r} was asked for but CUDA is not available"
        )
    return requested


def choose_dtype(device: str, requested: str, torch: Any) -> str:
    """fp16 on CUDA; on CPU bfloat16 where the CPU computes it natively, else float32.

    Measured on this project's 2-core AVX512-BF16 CPU (bench/bench_captions.py, BLIP-base size,
    20 tokens): bfloat16 at batch 8 is about 2.5x the captions/s of float32, and beats int8
    dynamic quantisation (slower at batch 8, and it rewrites every Linear layer). bf16 keeps
    fp32's exponent range, so the greedy captions stay the same kind of sentence; without
    native support (no AVX512-BF16/AMX) torch emulates it and it is slower than float32.
    """
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if _cpu_has_bf16(torch) else "float32"


def _cpu_has_bf16(torch: Any) -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # private torch API: when it moves, fall back to float32
        return False


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers)
    return os.cpu_count() or 1


def model_label(model: str) -> str:
    """How error messages name `model`: a hub id as it is, a directory by its last component."""
    if os.path.isdir(model) or _looks_like_path(model):
        return os.path.basename(os.path.normpath(model)) or model
    return model


def _locate(model: str, cache_dir: str | None, hub: Any) -> tuple[str, str]:
    """(what from_pretrained gets, how messages name it); CaptionUnavailable when there is
    nothing to load."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            # transformers says "Unrecognized model ... should have a `model_type` key" here,
            # which hides the plain fact an operator acts on: the files are not there.
            raise CaptionUnavailable(
                f"caption model {model_label(model)!r} cannot be loaded: the folder has no "
                "config.json (empty, not a model folder, or an unfinished copy)"
            )
        return model, model_label(model)
    if _looks_like_path(model):
        raise CaptionUnavailable(
            f"caption model {model_label(model)!r} cannot be loaded: no such directory"
        )
    if not _HUB_ID.fullmatch(model):
        raise CaptionUnavailable(
            f"caption model {model!r} is neither a local directory nor a hub id (owner/name)"
        )
    if not isinstance(hub.try_to_load_from_cache(model, "config.json", cache_dir=cache_dir), str):
        raise CaptionUnavailable(_not_cached_message(model))
    return model, model


def _looks_like_path(model: str) -> bool:
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep in model.replace("/", "")
        or os.path.exists(model)
    )


def _not_cached_message(model: str) -> str:
    return (
        f"caption model {model!r} is not in the local cache and cannot be downloaded here: "
        f"run `python -m models download {model}`"
    )


def _not_cached(exc: BaseException, hub: Any) -> bool:
    missing = hub.errors.LocalEntryNotFoundError
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, missing):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_tokenizer(tokenizer: Any, config: Any, label: str) -> None:
    # transformers quietly builds a 5-token BertTokenizer when vocab files are missing;
    # the model then loads fine and captions nonsense, so check the pair matches.
    text = config.text_config
    bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token) if tokenizer.bos_token else None
    wrong_start = text.bos_token_id is not None and bos != text.bos_token_id
    if wrong_start or len(tokenizer) < text.vocab_size // 2:
        raise CaptionUnavailable(
            f"caption model {label!r} cannot be loaded: corrupt or missing files: the tokenizer "
            f"({len(tokenizer)} tokens, start token {bos}) does not match the model "
            f"({text.vocab_size} tokens, start token {text.bos_token_id})"
        )
