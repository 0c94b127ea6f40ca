"""The image checkers themselves: NudeNet's real detector on drawn images, and a Hugging Face
image classifier loaded from a local directory the way an operator's model would be."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from impasto.backends.safety import (
    NUDENET_DEFAULT_LABELS,
    NUDENET_LABELS,
    CheckerUnavailable,
    HuggingFaceImageChecker,
    NudeNetChecker,
    load_image_checker,
)
from tests import safety_images


@pytest.fixture(scope="module")
def nudenet() -> NudeNetChecker:
    return NudeNetChecker.load()


class SessionSpy:
    """Wraps NudeNet's ONNX session to see what the model is fed."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.inputs: list[np.ndarray[Any, Any]] = []

    def run(self, outputs: Any, feeds: dict[str, Any]) -> Any:
        self.inputs.extend(feeds.values())
        return self._session.run(outputs, feeds)


@pytest.fixture
def spied(nudenet: NudeNetChecker) -> Any:
    detector = nudenet._detector
    spy = SessionSpy(detector.onnx_session)
    detector.onnx_session = spy
    yield spy
    detector.onnx_session = spy._session


def test_nudenet_labels_are_the_installed_detectors() -> None:
    from nudenet import nudenet as module

    assert tuple(getattr(module, "__labels")) == NUDENET_LABELS
    assert set(NUDENET_LABELS) >= NUDENET_DEFAULT_LABELS
    assert all(label.endswith("_EXPOSED") for label in NUDENET_DEFAULT_LABELS)


@pytest.mark.parametrize("name", list(safety_images.clean_images()))
def test_nudenet_finds_nothing_in_clean_images(nudenet: NudeNetChecker, name: str) -> None:
    [scores] = nudenet.scores([safety_images.clean_images()[name]])

    assert not set(scores) & NUDENET_DEFAULT_LABELS
    assert all(score < 0.5 for score in scores.values())


def test_nudenet_finds_a_drawn_face(nudenet: NudeNetChecker) -> None:
    [scores] = nudenet.scores([safety_images.face(320)])

    assert scores.get("FACE_FEMALE", 0.0) >= 0.6
    assert not set(scores) & NUDENET_DEFAULT_LABELS


def test_nudenet_scores_a_batch_in_one_model_run_in_order(
    nudenet: NudeNetChecker, spied: SessionSpy
) -> None:
    images = [safety_images.landscape(), safety_images.face(320), safety_images.gradient()]

    scores = nudenet.scores(images)

    assert len(spied.inputs) == 1
    assert spied.inputs[0].shape == (3, 3, 320, 320)
    assert [("FACE_FEMALE" in s) for s in scores] == [False, True, False]
    assert scores == [nudenet.scores([image])[0] for image in images]


def test_nudenet_model_is_fed_rgb(nudenet: NudeNetChecker, spied: SessionSpy) -> None:
    # NudeNet's own reader swaps channels twice; an upgrade that changes this shows up here.
    nudenet.scores([safety_images.solid((255, 0, 0), 640).convert("RGBA")])
    nudenet.scores([safety_images.solid((255, 0, 0), 640).convert("L").convert("RGB")])

    red = spied.inputs[0][0]
    assert red.shape == (3, 320, 320)
    assert red[0].mean() == pytest.approx(1.0)
    assert red[1].mean() == pytest.approx(0.0)
    assert red[2].mean() == pytest.approx(0.0)
    grey = spied.inputs[1][0]
    assert grey[0].mean() == pytest.approx(grey[2].mean())


def test_nudenet_missing_is_reported_with_the_extra_and_its_license(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)

    with pytest.raises(CheckerUnavailable, match=r"impasto\[safety\].*AGPL"):
        load_image_checker("nudenet")


@pytest.mark.parametrize("spec", ["opennsfw", "hf:", "nudenet2"])
def test_unknown_checker_spec_is_unavailable(spec: str) -> None:
    with pytest.raises(CheckerUnavailable, match="unknown checker"):
        load_image_checker(spec)


def test_hf_checker_at_a_missing_path_is_unavailable_without_a_download(tmp_path: Path) -> None:
    with pytest.raises(CheckerUnavailable, match="no model directory"):
        load_image_checker(f"hf:{tmp_path / 'no-such-model'}")


def test_hf_checker_from_a_directory_that_is_no_model_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a model\n")

    with pytest.raises(CheckerUnavailable, match="could not load image classifier"):
        load_image_checker(f"hf:{tmp_path}")


# -- a Hugging Face image classifier built in code -------------------------------------------


def build_tiny_classifier(directory: Path, labels: tuple[str, ...] = ("normal", "nsfw")) -> Path:
    """A randomly initialised ViT image classifier saved like a downloaded model."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("classifier"))


def test_hf_checker_loads_a_local_model_and_scores_every_label(tiny_classifier: Path) -> None:
    checker = load_image_checker(f"hf:{tiny_classifier}", max_batch_size=4)
    images = [safety_images.landscape(), safety_images.face(320), safety_images.noise(256)]

    scores = checker.scores(images)

    assert isinstance(checker, HuggingFaceImageChecker)
    assert checker.name == f"hf:{tiny_classifier}"
    assert checker.labels == {"normal", "nsfw"}
    assert checker.default_labels == {"nsfw"}
    assert checker.input_size == 32
    assert len(scores) == 3
    for result in scores:
        assert set(result) == {"normal", "nsfw"}
        assert sum(result.values()) == pytest.approx(1.0, abs=1e-5)
    for image, batched in zip(images, scores, strict=True):
        assert checker.scores([image])[0] == pytest.approx(batched)


def test_hf_checker_without_known_nsfw_labels_has_no_defaults(tmp_path: Path) -> None:
    path = build_tiny_classifier(tmp_path / "m", labels=("cat", "dog", "bird"))

    checker = load_image_checker(f"hf:{path}")

    assert checker.labels == {"cat", "dog", "bird"}
    assert checker.default_labels == frozenset()
    [scores] = checker.scores([Image.new("RGBA", (40, 30), (1, 2, 3, 4))])
    assert set(scores) == {"cat", "dog", "bird"}
