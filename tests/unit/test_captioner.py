"""models/: the BLIP captioner, loaded by path from a tiny random BLIP through the real loader."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, manifest
from PIL import Image, ImageChops, ImageStat
from tiny_blip import SPECIAL, WORDS, build_tiny_blip

from models import NOT_INSTALLED, Captioner, CaptionError
from models.batcher import MicroBatcher
from models.errors import CaptionUnavailable
from models.images import shrink_for_caption

# Everything imported above works without the caption extra; these need it.
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.caption

HUB_ID = "Salesforce/blip-image-captioning-base"


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture
async def make_captioner() -> AsyncIterator[Callable[..., Captioner]]:
    made: list[Captioner] = []

    def make(model: str | Path, **options: object) -> Captioner:
        made.append(Captioner(str(model), **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for captioner in made:
        await captioner.close()


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    """Four small real JPEGs that the tiny model captions differently."""
    paths = []
    for index, colour in enumerate(["black", "white", "red", "blue"]):
        path = tmp_path / f"picture-{index}.jpg"
        Image.new("RGB", (64, 48), colour).save(path, quality=90)
        paths.append(path)
    return paths


def _copy_model(tiny_blip: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_blip, tmp_path / "copied-blip"))


# --- captions ---------------------------------------------------------------------------------


async def test_a_real_photo_gets_a_caption_of_vocabulary_words(
    tiny_blip: Path, photos: Path, make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu")
    caption = await captioner.caption(photos / "xiaomi-mi9t-12mp-orient6.jpg")
    assert isinstance(caption, str)
    assert caption == caption.strip()
    assert caption, "the seeded tiny model captions this photo with words"
    assert set(caption.split()) <= set(WORDS)
    assert not set(caption.split()) & {*SPECIAL, "[DEC]"}
    assert captioner.device == "cpu"
    assert captioner.dtype in ("bfloat16", "float32")


async def test_every_corpus_photo_gets_a_caption(
    tiny_blip: Path, photos: Path, make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu", batch_size=8)
    names = [row["file"] for row in manifest("photos")]
    captions = await asyncio.gather(*(captioner.caption(photos / name) for name in names))
    assert all(isinstance(caption, str) for caption in captions)
    assert captioner.generate_calls < len(names)  # they were batched


async def test_concurrent_captions_make_one_generate_call(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    # float32: batched and single results are then bit-for-bit comparable.
    captioner = make_captioner(
        tiny_blip, device="cpu", dtype="float32", batch_size=4, max_wait_ms=5000
    )
    batched = await asyncio.gather(*(captioner.caption(path) for path in pictures))
    assert captioner.generate_calls == 1

    single = make_captioner(tiny_blip, device="cpu", dtype="float32", batch_size=1)
    one_by_one = [await single.caption(path) for path in pictures]
    assert len(set(one_by_one)) > 1, "the pictures must get different captions to tell them apart"
    assert batched == one_by_one  # each caller got its own picture's caption
    assert single.generate_calls == len(pictures)


async def test_more_captions_than_batch_size_make_full_batches(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu", batch_size=2, max_wait_ms=500)
    await captioner.load()
    paths = [*pictures, pictures[0]]
    await asyncio.gather(*(captioner.caption(path) for path in paths))
    assert captioner.generate_calls == 3  # 2 + 2 + 1


async def test_a_lone_caption_does_not_wait_for_a_full_batch(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu", batch_size=8, max_wait_ms=50)
    caption = await asyncio.wait_for(captioner.caption(pictures[0]), timeout=60)
    assert isinstance(caption, str)
    assert captioner.generate_calls == 1


async def test_many_captions_load_the_model_once(
    tiny_blip: Path,
    pictures: list[Path],
    make_captioner: Callable[..., Captioner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="imgapi.captions")
    captioner = make_captioner(tiny_blip, device="cpu", batch_size=4)
    assert captioner.loads == 0  # building a Captioner loads nothing
    await asyncio.gather(*(captioner.caption(pictures[i % 4]) for i in range(12)))
    await captioner.load()
    await captioner.caption(pictures[0])
    assert captioner.loads == 1
    assert captioner.load_attempts == 1
    loaded = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(loaded) == 1
    assert "device=cpu" in loaded[0] and "dtype=" in loaded[0]


def test_one_captioner_serves_successive_event_loops(tiny_blip: Path, pictures: list[Path]) -> None:
    captioner = Captioner(str(tiny_blip), device="cpu")
    first = asyncio.run(captioner.caption(pictures[0]))
    second = asyncio.run(captioner.caption(pictures[0]))
    asyncio.run(captioner.close())
    assert first == second
    assert captioner.loads == 1


async def test_close_is_idempotent_and_captioning_resumes(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu")
    before = await captioner.caption(pictures[1])
    await captioner.close()
    await captioner.close()
    assert await captioner.caption(pictures[1]) == before
    assert captioner.loads == 1


async def test_a_cancelled_caller_does_not_disturb_the_others(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu", batch_size=4, max_wait_ms=200)
    await captioner.load()
    doomed = asyncio.create_task(captioner.caption(pictures[0]))
    others = [asyncio.create_task(captioner.caption(path)) for path in pictures[1:]]
    await asyncio.sleep(0)
    doomed.cancel()
    results = await asyncio.gather(*others)
    assert all(isinstance(result, str) for result in results)
    assert doomed.cancelled()


async def test_a_generate_failure_fails_its_batch_only(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    # The tiny model has 64 positions: asking for 100 new tokens makes generate() fail.
    captioner = make_captioner(
        tiny_blip, device="cpu", max_new_tokens=100, min_new_tokens=100, batch_size=2
    )
    outcomes = await asyncio.gather(
        *(captioner.caption(path) for path in pictures[:2]), return_exceptions=True
    )
    assert all(isinstance(outcome, CaptionError) for outcome in outcomes)
    assert all("caption generation failed" in outcome.message for outcome in outcomes)  # type: ignore[union-attr]
    healthy = make_captioner(tiny_blip, device="cpu")
    assert isinstance(await healthy.caption(pictures[0]), str)


# --- load failures ------------------------------------------------------------------------------


async def test_a_hub_id_not_in_the_cache_fails_at_once(
    tmp_path: Path,
    pictures: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    make_captioner: Callable[..., Captioner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    empty = tmp_path / "hf"
    empty.mkdir()
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(name, str(empty))
    lookups: list[object] = []

    def no_network(*args: object, **kwargs: object) -> None:
        lookups.append(args[0] if args else kwargs)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    caplog.set_level(logging.INFO, logger="imgapi.captions")
    captioner = make_captioner(HUB_ID, cache_dir=str(empty))
    started = time.perf_counter()
    with pytest.raises(CaptionError) as raised:
        await captioner.caption(pictures[0])
    print(f"hub id not in cache: CaptionError after {time.perf_counter() - started:.3f}s")
    assert lookups == []  # local_files_only: not even a DNS lookup
    assert raised.value.message == (
        f"caption model {HUB_ID!r} is not in the local cache and cannot be downloaded here: "
        f"run `python -m models download {HUB_ID}`"
    )
    assert [r.levelno for r in caplog.records if "failed to load" in r.getMessage()] == [
        logging.WARNING
    ]


async def test_a_load_failure_is_remembered_until_retry_after(
    tmp_path: Path,
    tiny_blip: Path,
    pictures: list[Path],
    make_captioner: Callable[..., Captioner],
) -> None:
    later = tmp_path / "later-blip"
    captioner = make_captioner(later, device="cpu", retry_after_s=0.5)
    with pytest.raises(CaptionError) as first:
        await captioner.caption(pictures[0])
    assert "no such directory" in first.value.message

    shutil.copytree(tiny_blip, later)  # the model appears, but the failure is still fresh
    with pytest.raises(CaptionError) as second:
        await captioner.caption(pictures[0])
    assert second.value.message == first.value.message
    assert captioner.load_attempts == 1

    await asyncio.sleep(0.6)
    assert isinstance(await captioner.caption(pictures[0]), str)
    assert captioner.load_attempts == 2
    assert captioner.loads == 1


async def test_concurrent_callers_share_one_failed_load(
    tmp_path: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tmp_path / "absent", retry_after_s=60)
    outcomes = await asyncio.gather(
        *(captioner.caption(pictures[0]) for _ in range(10)), return_exceptions=True
    )
    assert {type(outcome) for outcome in outcomes} == {CaptionUnavailable}
    assert len({outcome.message for outcome in outcomes}) == 1  # type: ignore[union-attr]
    assert captioner.load_attempts == 1
    with pytest.raises(CaptionError):
        await captioner.load()
    assert captioner.load_attempts == 1


async def test_a_bad_local_path_names_the_model_but_not_the_server_path(
    tmp_path: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tmp_path / "nowhere" / "my-blip")
    with pytest.raises(CaptionError) as raised:
        await captioner.caption(pictures[0])
    assert raised.value.message == "caption model 'my-blip' cannot be loaded: no such directory"


async def test_a_name_that_is_neither_path_nor_hub_id_is_refused(
    pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    with pytest.raises(CaptionError, match="neither a local directory nor a hub id"):
        await make_captioner("not a model!").caption(pictures[0])


def _garble_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _remove_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _remove_vocabulary(folder: Path) -> None:
    (folder / "vocab.txt").unlink()
    (folder / "tokenizer.json").unlink()


def _garble_processor(folder: Path) -> None:
    (folder / "processor_config.json").write_text("garbage")


def _another_model_type(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "bert"}')


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (_garble_config, "not a valid JSON"),
        (_truncate_weights, "SafetensorError"),
        (_remove_weights, "no file named model.safetensors"),
        (_remove_vocabulary, "the tokenizer"),
        (_garble_processor, "not a valid JSON"),
        (_another_model_type, "is a 'bert' model, not BLIP"),
    ],
)
async def test_corrupt_model_files_give_a_clear_error(
    tiny_blip: Path,
    tmp_path: Path,
    pictures: list[Path],
    make_captioner: Callable[..., Captioner],
    damage: Callable[[Path], None],
    detail: str,
) -> None:
    folder = _copy_model(tiny_blip, tmp_path)
    damage(folder)
    captioner = make_captioner(folder, device="cpu")
    with pytest.raises(CaptionError) as raised:
        await captioner.caption(pictures[0])
    message = raised.value.message
    assert message.startswith("caption model 'copied-blip' ")
    assert detail in message
    assert str(tmp_path) not in message
    assert captioner.loads == 0


@pytest.mark.parametrize("module", ["torch", "transformers", "huggingface_hub"])
async def test_without_the_caption_extra_the_error_says_what_to_install(
    tiny_blip: Path,
    pictures: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    make_captioner: Callable[..., Captioner],
    module: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(CaptionError) as raised:
        await make_captioner(tiny_blip).caption(pictures[0])
    assert raised.value.message == NOT_INSTALLED
    assert NOT_INSTALLED == "captioning is not installed (pip install 'imgapi[caption]')"


@pytest.mark.parametrize(
    "options",
    [
        {"device": "tpu"},
        {"dtype": "int4"},
        {"batch_size": 0},
        {"max_wait_ms": -1},
        {"max_new_tokens": 5, "min_new_tokens": 6},
    ],
)
def test_bad_options_are_refused_when_building(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Captioner("any/model", **options)  # type: ignore[arg-type]


async def test_cuda_without_a_gpu_is_a_clear_error(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("optional: this machine has CUDA")
    with pytest.raises(CaptionError, match="'cuda' was asked for but CUDA is not available"):
        await make_captioner(tiny_blip, device="cuda").caption(pictures[0])


async def test_on_cuda_it_captions_in_float16(
    tiny_blip: Path, pictures: list[Path], make_captioner: Callable[..., Captioner]
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("optional: no CUDA device here")
    captioner = make_captioner(tiny_blip, device="auto", batch_size=4)
    captions = await asyncio.gather(*(captioner.caption(path) for path in pictures))
    assert all(isinstance(caption, str) for caption in captions)
    assert (captioner.device, captioner.dtype) == ("cuda", "float16")
    assert captioner.generate_calls == 1


def test_importing_models_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, models; models.Captioner('x'); import models.download, models.__main__; "
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


# --- images -------------------------------------------------------------------------------------


async def test_an_undecodable_image_is_a_caption_error(
    tiny_blip: Path,
    tmp_path: Path,
    pictures: list[Path],
    make_captioner: Callable[..., Captioner],
) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    truncated = tmp_path / "truncated.jpg"
    Image.effect_noise((300, 200), 60).convert("RGB").save(tmp_path / "whole.jpg")
    truncated.write_bytes((tmp_path / "whole.jpg").read_bytes()[:2000])
    captioner = make_captioner(tiny_blip, device="cpu")
    for bad in (garbage, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(CaptionError) as raised:
            await captioner.caption(bad)
        assert raised.value.message.startswith("cannot decode image: ")
        assert str(tmp_path) not in raised.value.message
    assert isinstance(await captioner.caption(pictures[0]), str)  # still serving


async def test_hostile_files_give_a_caption_or_a_caption_error(
    tiny_blip: Path, hostile: Path, make_captioner: Callable[..., Captioner]
) -> None:
    captioner = make_captioner(tiny_blip, device="cpu")
    for row in manifest("hostile"):
        try:
            result = await asyncio.wait_for(captioner.caption(hostile / row["file"]), timeout=60)
        except CaptionError as exc:
            assert exc.message.startswith("cannot decode image: "), row["file"]
        else:
            assert isinstance(result, str)
            assert "fails at Image.open" not in row["pillow13"], row["file"]
            assert "fails at load()" not in row["pillow13"], row["file"]


def test_shrinking_applies_exif_orientation(photos: Path) -> None:
    upright = shrink_for_caption(photos / "orient1.jpg", (384, 384))
    assert upright.size == (576, 384)
    for number in range(2, 9):
        image = shrink_for_caption(photos / f"orient{number}.jpg", (384, 384))
        assert image.size == upright.size, number
        difference = ImageStat.Stat(ImageChops.difference(image, upright)).mean
        assert max(difference) < 8, (number, difference)


def test_shrinking_covers_the_input_size_without_enlarging(photos: Path, tmp_path: Path) -> None:
    phone = shrink_for_caption(photos / "xiaomi-mi9t-12mp-orient6.jpg", (384, 384))
    assert (phone.mode, phone.size) == ("RGB", (384, 512))  # 4000x3000 stored, Orientation=6
    small = shrink_for_caption(photos / "cmyk-adobe.jpg", (384, 384))
    assert (small.mode, small.size) == ("RGB", (100, 100))


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(path)
    image = shrink_for_caption(path, (32, 32))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)


# --- the batcher on its own ---------------------------------------------------------------------


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


async def test_batcher_routes_results_and_errors(executor: ThreadPoolExecutor) -> None:
    seen: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        seen.append(items)
        if 13 in items:
            raise ValueError("unlucky")
        return [item * 2 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        double, executor, batch_size=3, max_wait_s=0.2, closed_error=lambda: RuntimeError("shut")
    )
    assert await asyncio.gather(*(batcher.submit(n) for n in (1, 2, 3))) == [2, 4, 6]
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in (13, 5)), return_exceptions=True)
    assert [type(outcome) for outcome in outcomes] == [ValueError, ValueError]
    assert await batcher.submit(7) == 14
    assert seen == [[1, 2, 3], [13, 5], [7]]
    await batcher.close()


async def test_closing_the_batcher_releases_every_waiting_caller(
    executor: ThreadPoolExecutor,
) -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(30)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(
        slow, executor, batch_size=1, max_wait_s=0, closed_error=lambda: RuntimeError("shut")
    )
    running = asyncio.create_task(batcher.submit(1))
    queued = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0.1)
    await batcher.close()
    await batcher.close()
    release.set()
    for task in (running, queued):
        with pytest.raises(RuntimeError, match="shut"):
            await task
    with pytest.raises(RuntimeError, match="shut"):
        await batcher.submit(3)


# --- the download step --------------------------------------------------------------------------


def test_download_gives_up_at_its_timeout(tmp_path: Path) -> None:
    # A server that accepts connections and never answers: the hang the timeout exists for.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": "",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "models", "download", "someone/some-model", "--timeout", "2"],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.close()
    assert done.returncode == 1, done.stderr
    assert "did not finish within 2s" in done.stderr
