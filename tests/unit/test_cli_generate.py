"""The generation loop of `impasto generate` against a scripted task client: what it sends,
how progress reaches the view, what it saves, and how refusals and failures end."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from impasto.cli.generate import (
    GenerateError,
    Saved,
    build_task,
    parse_size,
    reference_uri,
    run_generation,
)
from impasto.cli.task_clients import endpoint


def png(width: int = 8, height: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class ScriptedClient:
    """Answers each send with the next scripted reply, and records what was sent."""

    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies = list(replies)
        self.sent: list[list[dict[str, Any]]] = []

    async def send(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        self.sent.append(tasks)
        return self.replies.pop(0)


class RecordingView:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def progress(self, index: int, percent: int) -> None:
        self.events.append(("progress", index, percent))

    def saved(self, saved: Saved) -> None:
        self.events.append(("saved", saved.index, saved.seed))

    def failed(self, index: int, message: str) -> None:
        self.events.append(("failed", index, message))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def task(number: int = 2) -> dict[str, Any]:
    return build_task(
        "a red kite",
        model="impasto:tiny@1",
        size=(64, 32),
        number=number,
        output_format="png",
        seed=7,
        steps=2,
        negative=None,
        references=[],
    )


def processing(progress: int) -> dict[str, Any]:
    return {"taskType": "imageInference", "status": "processing", "progress": progress}


def success(seed: int) -> dict[str, Any]:
    return {
        "taskType": "imageInference",
        "status": "success",
        "imageUUID": f"uuid-{seed}",
        "imageBase64Data": png(),
        "seed": seed,
        "cost": 0.0,
    }


def run(client: ScriptedClient, spec: dict[str, Any], out: Path, **kwargs: Any) -> Any:
    clock = FakeClock()
    view = RecordingView()
    outcome = asyncio.run(
        run_generation(client, spec, out, view, clock=clock, sleep=clock.sleep, **kwargs)
    )
    return outcome, view, clock


def test_the_task_is_an_async_inference_with_base64_output_and_cost() -> None:
    spec = task()
    assert spec["taskType"] == "imageInference"
    assert spec["deliveryMethod"] == "async"
    assert spec["outputType"] == "base64Data"
    assert spec["outputFormat"] == "PNG"
    assert (spec["width"], spec["height"], spec["seed"], spec["steps"]) == (64, 32, 7, 2)
    assert spec["includeCost"] is True
    assert "negativePrompt" not in spec


def test_progress_then_each_image_saved_once_in_order(tmp_path: Path) -> None:
    spec = task()
    client = ScriptedClient(
        [
            {"data": [{"taskType": "imageInference", "taskUUID": spec["taskUUID"]}]},
            {"data": [processing(0), processing(0)]},
            {"data": [processing(50), processing(0)]},
            {"data": [success(7), processing(40)]},
            {"data": [success(7), success(8)]},
        ]
    )
    outcome, view, clock = run(client, spec, tmp_path / "out")
    assert client.sent[0] == [spec]
    assert all(
        sent == [{"taskType": "getResponse", "taskUUID": spec["taskUUID"]}]
        for sent in client.sent[1:]
    )
    assert view.events == [
        ("progress", 0, 0),
        ("progress", 1, 0),
        ("progress", 0, 50),
        ("progress", 1, 0),
        ("saved", 0, 7),
        ("progress", 1, 40),
        ("saved", 1, 8),
    ]
    assert [s.seed for s in outcome.saved] == [7, 8]
    assert outcome.errors == []
    for saved in outcome.saved:
        assert saved.path.parent == tmp_path / "out"
        assert saved.path.suffix == ".png"
        with Image.open(saved.path) as image:
            assert image.format == "PNG"
    # It waited between polls (3 waits), on the injected clock.
    assert clock.now == pytest.approx(0.75)


def test_a_refused_task_raises_its_error_as_one_line(tmp_path: Path) -> None:
    client = ScriptedClient(
        [
            {
                "errors": [
                    {
                        "code": "invalidPositivePrompt",
                        "message": "positivePrompt is empty.",
                        "parameter": "positivePrompt",
                        "taskUUID": "x",
                    }
                ]
            }
        ]
    )
    with pytest.raises(GenerateError) as caught:
        run(client, task(), tmp_path)
    assert str(caught.value) == (
        "invalidPositivePrompt: positivePrompt is empty. (parameter: positivePrompt)"
    )
    assert len(client.sent) == 1
    assert not tmp_path.joinpath("out").exists()


def test_a_failed_image_is_reported_and_the_others_are_still_saved(tmp_path: Path) -> None:
    failed = {
        "taskType": "imageInference",
        "status": "error",
        "error": {"code": "inferenceFailed", "message": "the device ran out of memory"},
    }
    client = ScriptedClient([{"data": [{}]}, {"data": [success(3), failed]}])
    outcome, view, _ = run(client, task(), tmp_path)
    assert [s.seed for s in outcome.saved] == [3]
    assert outcome.errors == ["inferenceFailed: the device ran out of memory"]
    assert ("failed", 1, "inferenceFailed: the device ran out of memory") in view.events


def test_it_gives_up_at_its_timeout_on_the_injected_clock(tmp_path: Path) -> None:
    client = ScriptedClient([{"data": [{}]}] + [{"data": [processing(10)]}] * 10)
    with pytest.raises(GenerateError, match="gave up after 1 s"):
        run(client, task(number=1), tmp_path, timeout_s=1.0, poll_s=0.25)


def test_sizes_references_and_endpoints(tmp_path: Path) -> None:
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size("64X32") == (64, 32)
    for bad in ("1024", "x768", "axb", "10x-2"):
        with pytest.raises(GenerateError):
            parse_size(bad)
    ref = tmp_path / "ref.png"
    ref.write_bytes(base64.b64decode(png()))
    assert reference_uri(ref).startswith("data:image/png;base64,iVBOR")
    with pytest.raises(GenerateError, match="cannot read reference image"):
        reference_uri(tmp_path / "missing.png")
    assert endpoint("http://h:8080") == "http://h:8080/v1"
    assert endpoint("http://h:8080/") == "http://h:8080/v1"
    assert endpoint("http://h:8080/v1") == "http://h:8080/v1"
