"""The utility tasks' pieces with fakes: the engine's loading and error mapping, the size an
upscale asks for, the background options from either SDK's shape, the models-file rules of
utility entries, and the wire models' compat forms."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from impasto.backends.registry import ModelRegistry, ModelsFileError
from impasto.backends.utility.base import UpscaleRequest, UtilityOutput, UtilityRequest
from impasto.engine.utility import UtilityEngine
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter
from impasto.protocol.parsing import parse_task
from impasto.protocol.utility_tasks import CaptionFields, RemoveBackgroundFields, UpscaleFields
from impasto.service.utility_outcomes import flatten
from impasto.service.utility_tasks import UtilityService, background_request, upscale_size

UUID = "f47ac10b-58cc-4372-a567-0e02b2c3d493"


class FakeModel:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.requests: list[UtilityRequest] = []
        self.closed = False

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return ["ok"]

    async def close(self) -> None:
        self.closed = True


def test_engine_loads_a_model_once_and_closes_it() -> None:
    loads: list[str] = []
    model = FakeModel()

    async def load(air: str) -> FakeModel:
        loads.append(air)
        return model

    async def scenario() -> None:
        engine = UtilityEngine(load)
        request = UpscaleRequest(Image.new("RGB", (4, 4)), 2)
        assert await asyncio.gather(engine.run("a:1@1", request), engine.run("a:1@1", request))
        assert engine.loaded() == ["a:1@1"]
        await engine.close()
        with pytest.raises(InferenceError):
            await engine.run("a:1@1", request)

    asyncio.run(scenario())
    assert loads == ["a:1@1"]
    assert len(model.requests) == 2
    assert model.closed


def test_engine_turns_a_crash_into_an_inference_error_and_keeps_client_errors() -> None:
    crash = FakeModel(RuntimeError("boom"))
    refusal = FakeModel(InvalidParameter("no", parameter="x"))

    async def load(air: str) -> FakeModel:
        return crash if air == "crash:1@1" else refusal

    async def scenario() -> tuple[ImpastoError, ImpastoError]:
        engine = UtilityEngine(load)
        request = UpscaleRequest(Image.new("RGB", (4, 4)), 2)
        errors = []
        for air in ("crash:1@1", "refuse:1@1"):
            try:
                await engine.run(air, request)
            except ImpastoError as exc:
                errors.append(exc)
        return errors[0], errors[1]

    crashed, refused = asyncio.run(scenario())
    assert isinstance(crashed, InferenceError)
    assert "boom" not in crashed.message
    assert isinstance(refused, InvalidParameter)


def upscale(**fields: Any) -> UpscaleFields:
    task = parse_task({"taskType": "upscale", "taskUUID": UUID, "inputImage": "x", **fields})
    assert isinstance(task, UpscaleFields)
    return task


def test_upscale_size_from_factor_or_megapixels() -> None:
    assert upscale_size(upscale(), (40, 30)) == (2, (80, 60))
    assert upscale_size(upscale(upscaleFactor=4), (40, 30)) == (4, (160, 120))
    # 3x each side: the model runs at 3 and the size is exact.
    assert upscale_size(upscale(targetMegapixels=0.0108), (40, 30)) == (3, (120, 90))
    # 1.5x: the smallest factor a model runs at is 2, then it is scaled down.
    assert upscale_size(upscale(targetMegapixels=0.0027), (40, 30)) == (2, (60, 45))
    for megapixels in (0.0001, 1.0):
        with pytest.raises(InvalidParameter) as caught:
            upscale_size(upscale(targetMegapixels=megapixels), (40, 30))
        assert caught.value.parameter == "targetMegapixels"


def test_background_options_come_flat_or_nested() -> None:
    image = Image.new("RGB", (4, 4))
    flat = parse_task(
        {
            "taskType": "imageBackgroundRemoval",
            "taskUUID": UUID,
            "inputImage": "x",
            "rgba": [1, 2, 3, 4],
            "returnOnlyMask": True,
            "alphaMattingErodeSize": 3,
        }
    )
    nested = parse_task(
        {
            "taskType": "removeBackground",
            "taskUUID": UUID,
            "inputs": {"image": "x"},
            "settings": {"rgba": [1, 2, 3, 4], "returnOnlyMask": True, "alphaMattingErodeSize": 3},
        }
    )
    assert isinstance(flat, RemoveBackgroundFields)
    assert isinstance(nested, RemoveBackgroundFields)
    assert background_request(flat, image) == background_request(nested, image)
    request = background_request(flat, image)
    assert request.background == (1, 2, 3, 4)
    assert request.return_only_mask
    assert request.erode_size == 3
    assert request.foreground_threshold == 240
    assert nested.outputFormat == "PNG"


def test_legacy_caption_prompt_list_is_one_prompt() -> None:
    task = parse_task(
        {"taskType": "imageCaption", "taskUUID": UUID, "inputImages": ["x"], "prompt": ["hi"]}
    )
    assert isinstance(task, CaptionFields)
    assert task.prompt == "hi"
    assert task.image() == ("inputImages[0]", "x")


def test_prompt_versions_are_filled_to_the_count_asked() -> None:
    assert UtilityService._versions(["a", "", "b"], 3) == ["a", "b", "a"]
    with pytest.raises(InferenceError):
        UtilityService._versions(["", ""], 2)


def test_flatten_puts_a_cut_out_on_white_for_jpg() -> None:
    cut = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    cut.putpixel((1, 0), (10, 20, 30, 255))
    flat = flatten(cut, "JPG")
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((1, 0)) == (10, 20, 30)
    assert flatten(cut, "PNG") is cut


def write_models(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_a_models_file_utility_entry_is_checked(tmp_path: Path) -> None:
    good = ModelRegistry.load(
        write_models(
            tmp_path,
            '[models."my:up@1"]\ntype = "upscaler"\nbackend = "swin2sr"\npath = "/models/x"\n',
        )
    )
    entry = good.get("my:up@1")
    assert entry is not None
    assert entry.utility_task == "upscale"
    assert entry.is_asset
    with pytest.raises(ModelsFileError, match="takes backend swin2sr or sd-upscaler"):
        ModelRegistry.load(
            write_models(tmp_path, '[models."my:up@1"]\ntype = "upscaler"\nbackend = "tiny"\n')
        )
    with pytest.raises(ModelsFileError, match="runs utility models"):
        ModelRegistry.load(write_models(tmp_path, '[models."my:x@1"]\nbackend = "segmenter"\n'))


def test_every_built_in_default_is_a_model_of_its_task() -> None:
    from impasto.settings import Settings

    registry = ModelRegistry.load(None)
    settings = Settings()
    for air, task_type in (
        (settings.upscale_model, "upscale"),
        (settings.remove_background_model, "removeBackground"),
        (settings.caption_model, "caption"),
        (settings.prompt_enhance_model, "promptEnhance"),
    ):
        entry = registry.get(air)
        assert entry is not None
        assert entry.utility_task == task_type
