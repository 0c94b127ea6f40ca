"""The ControlNet preprocessors as pure image functions (synthetic pictures whose right answer is
known), and how a preprocessing task of either form becomes a job or a Runware error item."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from impasto.protocol.errors import ImpastoError
from impasto.protocol.parsing import parse_task
from impasto.protocol.utility import PREPROCESSOR_AIRS, PREPROCESSORS, PreprocessIn
from impasto.service.guides import (
    ALIASES,
    SUPPORTED,
    PreprocessOptions,
    canny,
    guide_size,
    lineart_standard,
    run_preprocessor,
    scribble_xdog,
    shuffle,
    tile_gaussian,
)
from impasto.service.preprocess import PreprocessJob, preprocess_job

# A white square, 32..95 x 24..71, on black.
SQUARE = (32, 24, 95, 71)


def square(size: tuple[int, int] = (128, 96), inside: int = 255, outside: int = 0) -> Image.Image:
    image = Image.new("RGB", size, (outside,) * 3)
    ImageDraw.Draw(image).rectangle(SQUARE, fill=(inside,) * 3)
    return image


def gray(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    # Guides are grey pictures in RGB, as ControlNet pipelines take them.
    assert (pixels[..., 0] == pixels[..., 1]).all()
    assert (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0]


def ring(pixels: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside the square, its border band of `margin` px, well outside it)."""
    left, top, right, bottom = SQUARE
    inside = pixels[top + margin : bottom - margin + 1, left + margin : right - margin + 1]
    band = np.zeros(pixels.shape, bool)
    band[top - margin : bottom + margin + 1, left - margin : right + margin + 1] = True
    band[top + margin : bottom - margin + 1, left + margin : right - margin + 1] = False
    far = np.ones(pixels.shape, bool)
    far[top - 2 * margin : bottom + 2 * margin + 1, left - 2 * margin : right + 2 * margin + 1] = 0
    return inside, pixels[band], pixels[far]


# -- the preprocessors ----------------------------------------------------------------------


def test_canny_of_a_sharp_square_is_its_outline_and_nothing_inside() -> None:
    edges = gray(canny(square()))
    assert edges.shape == (96, 128)
    assert set(np.unique(edges)) == {0, 255}
    inside, band, far = ring(edges, 2)
    assert not inside.any()
    assert not far.any()
    # Every column of the top and bottom side, and every row of the left and right, has an edge.
    left, top, right, bottom = SQUARE
    assert edges[top - 2 : top + 3, left + 2 : right - 1].any(axis=0).all()
    assert edges[bottom - 2 : bottom + 3, left + 2 : right - 1].any(axis=0).all()
    assert edges[top + 2 : bottom - 1, left - 2 : left + 3].any(axis=1).all()
    assert edges[top + 2 : bottom - 1, right - 2 : right + 3].any(axis=1).all()
    assert band.sum() // 255 >= 2 * (right - left + bottom - top)


def test_canny_thresholds_decide_whether_a_faint_edge_counts() -> None:
    # A step of 20 grey levels: a Sobel response of 80, under the default low threshold of 100.
    faint = square(inside=120, outside=100)
    assert not gray(canny(faint)).any()
    assert gray(canny(faint, 10, 50)).any()
    # The defaults are Runware's 100/200.
    assert (gray(canny(square(), None, None)) == gray(canny(square(), 100, 200))).all()


def test_a_transparent_area_reads_as_white_not_as_its_hidden_colour() -> None:
    image = Image.new("RGBA", (128, 96), (255, 255, 255, 255))
    # Black under alpha 0: invisible, so no edge.
    ImageDraw.Draw(image).rectangle(SQUARE, fill=(0, 0, 0, 0))
    assert not gray(canny(image)).any()
    ImageDraw.Draw(image).rectangle(SQUARE, fill=(0, 0, 0, 255))
    assert gray(canny(image)).any()


def test_run_preprocessor_resizes_to_the_guide_size_before_detecting() -> None:
    guide = run_preprocessor("canny", square(), (64, 48))
    assert guide.size == (64, 48)
    edges = gray(guide)
    # The square scaled by half (16..47 x 12..35): its outline, and nothing inside it.
    assert edges[10:14, 20:44].any(axis=0).all()
    assert edges[15:32, 14:18].any(axis=1).all()
    assert not edges[15:32, 19:44].any()
    assert not edges[40:].any()


@pytest.mark.parametrize(
    ("size", "width", "height", "expected"),
    [
        ((200, 100), None, None, (200, 100)),
        ((200, 100), 64, 32, (64, 32)),
        ((200, 100), 100, None, (100, 50)),
        ((200, 100), None, 25, (50, 25)),
        ((200, 100), 30, 90, (30, 90)),
    ],
)
def test_guide_size_keeps_the_aspect_ratio_when_one_side_is_given(
    size: tuple[int, int], width: int | None, height: int | None, expected: tuple[int, int]
) -> None:
    assert guide_size(size, width, height) == expected


def test_tile_gaussian_removes_fine_detail_and_keeps_size_and_colour() -> None:
    # A one-pixel checkerboard on a size that is not a multiple of 8.
    board = (np.indices((90, 70)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(board[..., None], 3, axis=2))
    tiled = np.asarray(tile_gaussian(image)).astype(int)
    assert tiled.shape == (90, 70, 3)
    # The checkerboard averages out to its mean grey.
    assert abs(tiled.mean() - 127.5) < 4
    assert tiled.std() < 10
    # Coarse structure (a half-red, half-blue picture) survives.
    halves = Image.new("RGB", (64, 64), (255, 0, 0))
    halves.paste((0, 0, 255), (32, 0, 64, 64))
    tiled = np.asarray(tile_gaussian(halves)).astype(int)
    assert tiled[32, 4, 0] > 200
    assert tiled[32, 60, 2] > 200


def test_shuffle_is_deterministic_keeps_the_colours_and_moves_them() -> None:
    image = Image.new("RGB", (96, 64), (255, 0, 0))
    ImageDraw.Draw(image).rectangle((0, 0, 47, 63), fill=(0, 0, 255))
    first = np.asarray(shuffle(image))
    assert first.shape == (64, 96, 3)
    assert (first == np.asarray(shuffle(image))).all()
    assert not (first == np.asarray(image)).all()
    # Resampled, not invented: nothing green appears, both colours are still there.
    assert first[..., 1].max() == 0
    assert first[..., 0].max() > 200
    assert first[..., 2].max() > 200
    assert not (first == np.asarray(shuffle(image, seed=1))).all()


def test_lineart_standard_draws_a_dark_line_as_a_white_one_on_black() -> None:
    image = Image.new("RGB", (96, 96), (255, 255, 255))
    ImageDraw.Draw(image).line((10, 48, 85, 48), fill=(0, 0, 0), width=2)
    lines = gray(lineart_standard(image))
    assert lines[48:50, 20:76].min() > 100
    assert lines[:30].max() == 0
    assert lines[70:].max() == 0


def test_scribble_xdog_marks_the_strong_edges_only() -> None:
    strokes = gray(scribble_xdog(square()))
    assert set(np.unique(strokes)) <= {0, 255}
    # The coarse blur (sigma 5) spreads a stroke a few pixels out from the edge.
    inside, band, far = ring(strokes, 5)
    assert band.any()
    assert not inside.any()
    assert not far.any()
    assert not gray(scribble_xdog(Image.new("RGB", (64, 64), (90, 90, 90)))).any()


def test_the_schema_offers_exactly_the_preprocessors_that_run() -> None:
    assert set(PREPROCESSORS) == set(SUPPORTED) | set(ALIASES)
    for name in PREPROCESSORS:
        assert run_preprocessor(name, square(), (32, 24)).size == (32, 24)


# -- tasks to jobs --------------------------------------------------------------------------


def legacy(**fields: Any) -> dict[str, Any]:
    task = {
        "taskType": "imageControlNetPreProcess",
        "taskUUID": str(uuid.uuid4()),
        "inputImage": "iVBORw0KGgo=",
        "preProcessorType": "canny",
    }
    return {**task, **fields}


def new(**fields: Any) -> dict[str, Any]:
    task = {
        "taskType": "controlNetPreprocess",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:controlnet-preprocess@canny",
        "inputs": {"image": "iVBORw0KGgo="},
    }
    return {k: v for k, v in {**task, **fields}.items() if v is not None}


def job_of(raw: dict[str, Any]) -> PreprocessJob:
    task = parse_task(raw)
    assert task.taskType in ("imageControlNetPreProcess", "controlNetPreprocess")
    return preprocess_job(task)  # type: ignore[arg-type]


def refusal(raw: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ImpastoError) as raised:
        job_of(raw)
    return raised.value.to_item()


def test_both_forms_give_the_same_job() -> None:
    flat = job_of(
        legacy(lowThresholdCanny=50, highThresholdCanny=150, width=64, outputType="dataURI")
    )
    nested = job_of(
        new(settings={"lowThresholdCanny": 50, "highThresholdCanny": 150}, width=64)
        | {"outputType": "dataURI"}
    )
    for job in (flat, nested):
        assert (job.preprocessor, job.width, job.height) == ("canny", 64, None)
        assert job.options == PreprocessOptions(50, 150)
        assert job.output_type == "dataURI"
        assert (job.output_format, job.output_quality) == ("JPG", 95)
        assert not job.asynchronous
    assert (flat.image_parameter, flat.image_code) == ("inputImage", "invalidInputImage")
    assert (nested.image_parameter, nested.image_code) == ("inputs.image", "invalidImage")
    # Runware's docs also show the flat form under the new name.
    same = job_of(legacy(taskType="controlNetPreprocess", deliveryMethod="async"))
    assert (same.preprocessor, same.image_parameter, same.asynchronous) == (
        "canny",
        "inputImage",
        True,
    )


@pytest.mark.parametrize(
    ("raw", "preprocessor"),
    [
        (legacy(preProcessorType="tile"), "tile_gaussian"),
        (legacy(preProcessorType="lineart_standard"), "lineart_standard"),
        (new(model="runware:controlnet-preprocess@tile"), "tile_gaussian"),
        (new(model="runware:controlnet-preprocess@scribble-xdog"), "scribble_xdog"),
    ],
)
def test_names_and_airs_map_to_their_preprocessor(raw: dict[str, Any], preprocessor: str) -> None:
    assert job_of(raw).preprocessor == preprocessor


@pytest.mark.parametrize(
    ("raw", "code", "parameter"),
    [
        (legacy(preProcessorType="sobel"), "invalidPreProcessorType", "preProcessorType"),
        (legacy(preProcessorType="depth"), "unsupportedParameter", "preProcessorType"),
        (legacy(preProcessorType="openpose_full"), "unsupportedParameter", "preProcessorType"),
        (new(model="runware:controlnet-preprocess@seg"), "unsupportedParameter", "model"),
        (new(model="runware:101@1"), "invalidModel", "model"),
        (new(model=None), "missingModel", "model"),
        (new(inputs=None), "missingInputs", "inputs"),
        (new(inputImage="iVBORw0KGgo="), "invalidInputImage", "inputImage"),
        (
            legacy(lowThresholdCanny=150, highThresholdCanny=100),
            "invalidLowThresholdCanny",
            "lowThresholdCanny",
        ),
        (
            new(settings={"lowThresholdCanny": 220}),
            "invalidLowThresholdCanny",
            "settings.lowThresholdCanny",
        ),
        (
            legacy(taskType="controlNetPreprocess", preProcessorType=None),
            "missingPreProcessorType",
            "preProcessorType",
        ),
    ],
    ids=[
        "unknown",
        "depth-needs-weights",
        "openpose-needs-weights",
        "seg-air-needs-weights",
        "not-a-preprocessor",
        "no-model",
        "no-inputs",
        "mixed-forms",
        "low-above-high",
        "low-above-default-high",
        "flat-without-type",
    ],
)
def test_a_bad_preprocess_task_is_an_error_naming_its_parameter(
    raw: dict[str, Any], code: str, parameter: str
) -> None:
    error = refusal(raw)
    assert (error["code"], error["parameter"]) == (code, parameter)


def test_an_unsupported_or_unknown_preprocessor_error_lists_what_runs() -> None:
    for raw in (legacy(preProcessorType="depth"), legacy(preProcessorType="nope")):
        message = refusal(raw)["message"]
        assert all(name in message for name in PREPROCESSORS), message
    message = refusal(new(model="runware:controlnet-preprocess@depth"))["message"]
    assert all(air in message for air in PREPROCESSOR_AIRS), message


def test_the_parser_bounds_sizes_and_thresholds() -> None:
    for raw, parameter in (
        (legacy(width=5000), "width"),
        (legacy(lowThresholdCanny=256), "lowThresholdCanny"),
        (new(settings={"highThresholdCanny": -1}), "settings.highThresholdCanny"),
        (new(settings={"sigma": 2}), "settings.sigma"),
    ):
        with pytest.raises(ImpastoError) as raised:
            parse_task(raw)
        assert raised.value.parameter == parameter


def test_preprocess_in_covers_both_task_types() -> None:
    for raw in (legacy(), new()):
        assert isinstance(parse_task(raw), PreprocessIn)
