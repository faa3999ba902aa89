"""CaptionUnavailable ("this process cannot caption at all") apart from CaptionError ("this image
cannot be captioned"), and the runtime's one log line about it. The tests that need no model run
without the caption extra too."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from tiny_blip import build_tiny_blip

from imgapi_core.runtime import RETRY_CAPTIONS, Runtime
from imgapi_core.settings import Settings
from models import NOT_INSTALLED, Captioner, CaptionError
from models.errors import CaptionUnavailable
from models.images import shrink_for_caption
from models.loader import resolve_device


class Records(logging.Handler):
    """Caught on the logger itself: the app's setup_logging stops propagation to caplog's root."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, text: str) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in self.records if text in r.getMessage()]


@pytest.fixture
def listen() -> Iterator[Callable[[str], Records]]:
    attached: list[tuple[logging.Logger, Records, int]] = []

    def attach(name: str) -> Records:
        logger, handler = logging.getLogger(name), Records()
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        return handler

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "picture.jpg"
    Image.new("RGB", (64, 48), "red").save(path, quality=90)
    return path


def test_unavailable_is_a_caption_error_with_a_message() -> None:
    error = CaptionUnavailable("no model")
    assert isinstance(error, CaptionError) and error.message == "no model"


@pytest.mark.parametrize("module", ["torch", "transformers", "huggingface_hub"])
async def test_not_installed_is_unavailable(
    tmp_path: Path, picture: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    captioner = Captioner(str(tmp_path / "blip"), retry_after_s=60)
    try:
        with pytest.raises(CaptionUnavailable) as raised:
            await captioner.caption(picture)
        assert raised.value.message == NOT_INSTALLED
        # Refused from memory during the retry window: the same class, the same reason.
        with pytest.raises(CaptionUnavailable) as again:
            await captioner.load()
        assert again.value.message == NOT_INSTALLED
        assert captioner.load_attempts == 1
    finally:
        await captioner.close()


def test_a_cuda_device_that_is_absent_is_unavailable() -> None:
    # A setting of the process, not a fault of any image.
    no_gpu = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    with pytest.raises(CaptionUnavailable, match="'cuda' was asked for but CUDA is not available"):
        resolve_device("cuda", no_gpu)
    assert resolve_device("auto", no_gpu) == "cpu"


def test_an_image_that_cannot_be_decoded_is_a_plain_caption_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    with pytest.raises(CaptionError) as raised:
        shrink_for_caption(garbage, (32, 32))
    assert not isinstance(raised.value, CaptionUnavailable)
    assert raised.value.message.startswith("cannot decode image: ")
    assert str(tmp_path) not in raised.value.message


# --- the runtime's log line -------------------------------------------------------------------


async def test_the_runtime_says_once_per_reason_why_captions_are_unavailable(
    make_settings: Callable[..., Settings], listen: Callable[[str], Records]
) -> None:
    jobs_log = listen("imgapi.jobs")
    runtime = Runtime(make_settings(CAPTION_RETRY_SECONDS="30"), store=None, media=None)  # type: ignore[arg-type]
    try:
        for _ in range(3):  # three jobs, one line
            runtime.captions_unavailable("no model here")
        runtime.captions_unavailable("another reason")
    finally:
        await runtime.close()
    lines = jobs_log.matching("captions unavailable: ")
    assert lines == [
        (
            logging.WARNING,
            "captions unavailable: no model here; caption jobs end as 'unavailable' until this is "
            f"fixed, then {RETRY_CAPTIONS} (a failed model load is tried again after "
            "CAPTION_RETRY_SECONDS=30s)",
        ),
        (logging.WARNING, jobs_log.matching("another reason")[0][1]),
    ]


async def test_the_preload_logs_the_reason_and_never_raises(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    listen: Callable[[str], Records],
) -> None:
    jobs_log = listen("imgapi.jobs")
    cfg = make_settings(CAPTION_MODEL=str(tmp_path / "absent-blip"))
    runtime = Runtime(cfg, store=None, media=None)  # type: ignore[arg-type]
    try:
        await runtime.preload_captioner()
        await runtime.preload_captioner()  # refused from memory: the same reason, no new line
    finally:
        await runtime.close()
    ((level, line),) = jobs_log.matching("captions unavailable: ")
    assert level == logging.WARNING
    # Without the caption extra the reason is that; with it, the missing folder.
    assert NOT_INSTALLED in line or "'absent-blip' cannot be loaded: no such directory" in line
    assert RETRY_CAPTIONS in line
    assert str(tmp_path) not in line


# --- with a model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_tiny_blip(tmp_path_factory.mktemp("unavailable-unit") / "tiny-blip")


@pytest.mark.caption
async def test_a_missing_or_empty_model_folder_is_unavailable_without_its_path(
    tiny_blip: Path, tmp_path: Path, picture: Path, listen: Callable[[str], Records]
) -> None:
    captions_log = listen("imgapi.captions")
    folder = tmp_path / "models" / "my-blip"
    captioner = Captioner(str(folder), device="cpu", retry_after_s=0)
    try:
        with pytest.raises(CaptionUnavailable) as missing:
            await captioner.caption(picture)
        assert (
            missing.value.message == "caption model 'my-blip' cannot be loaded: no such directory"
        )
        # retry_after_s=0: every caption tries to load again; the same failure is no new warning.
        with pytest.raises(CaptionUnavailable):
            await captioner.caption(picture)
        assert [level for level, _ in captions_log.matching("failed to load")] == [
            logging.WARNING,
            logging.INFO,
        ]

        folder.mkdir(parents=True)
        with pytest.raises(CaptionUnavailable) as empty:
            await captioner.caption(picture)
        assert empty.value.message.startswith(
            "caption model 'my-blip' cannot be loaded: the folder has no config.json"
        )
        assert str(tmp_path) not in empty.value.message
        assert captions_log.matching("failed to load")[-1][0] == logging.WARNING  # a new reason

        shutil.rmtree(folder)
        shutil.copytree(tiny_blip, folder)  # the model arrives: the next caption loads it
        assert isinstance(await captioner.caption(picture), str)
        assert captioner.loads == 1
    finally:
        await captioner.close()


@pytest.mark.caption
async def test_corrupt_model_files_are_unavailable(
    tiny_blip: Path, tmp_path: Path, picture: Path
) -> None:
    folder = Path(shutil.copytree(tiny_blip, tmp_path / "copied-blip"))
    (folder / "model.safetensors").unlink()
    captioner = Captioner(str(folder), device="cpu")
    try:
        with pytest.raises(CaptionUnavailable) as raised:
            await captioner.caption(picture)
        assert raised.value.message.startswith("caption model 'copied-blip' cannot be loaded: ")
        assert str(tmp_path) not in raised.value.message
    finally:
        await captioner.close()


@pytest.mark.caption
async def test_a_generation_failure_stays_a_caption_error(tiny_blip: Path, picture: Path) -> None:
    # The tiny model has 64 positions: asking for 100 new tokens makes generate() fail.
    captioner = Captioner(str(tiny_blip), device="cpu", max_new_tokens=100, min_new_tokens=100)
    try:
        with pytest.raises(CaptionError) as raised:
            await captioner.caption(picture)
        assert not isinstance(raised.value, CaptionUnavailable)
        assert raised.value.message.startswith("caption generation failed")
    finally:
        await captioner.close()
