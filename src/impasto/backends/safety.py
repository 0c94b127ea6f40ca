"""Image checkers for content safety: NudeNet's offline nudity detector (the optional `safety`
extra; AGPL-3.0) and any Hugging Face image-classification model, by id or local path (the
`local` extra). Each scores images for labels; the service decides which labels count and at
what threshold (`impasto.service.safety`).

Checkers are called from worker threads, never on the event loop. Loading one imports its
library and reads its weights: that happens only in `load_image_checker`, never at import.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

# Every class NudeNet 3.4's detector reports, in its output order.
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# What counts as NSFW unless the operator says otherwise: exposed genitalia, breasts, anus,
# buttocks. (MALE_BREAST_EXPOSED, bellies, feet and armpits do not.)
NUDENET_DEFAULT_LABELS = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
    }
)

# Label names that published NSFW image classifiers use for their unsafe classes, compared
# case-insensitively (e.g. "nsfw" of Falconsai/nsfw_image_detection, "porn"/"hentai" of the
# five-class GantMan-style models).
HF_DEFAULT_LABELS = frozenset({"nsfw", "porn", "hentai", "explicit", "unsafe", "sexual"})


class CheckerUnavailable(Exception):
    """The configured checker cannot be used: not installed, not found, or failed to load."""


class ImageChecker(Protocol):
    """Scores images for content labels. Thread-safe; called off the event loop."""

    name: str
    labels: frozenset[str]
    default_labels: frozenset[str]
    # The side the model looks at; larger images are downscaled to about this.
    input_size: int
    max_batch_size: int

    def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """One {label: score in [0, 1]} per image, in order; a label left out scored 0."""


class NudeNetChecker:
    """NudeNet 3.4's ONNX detector (shipped in its wheel, runs offline on CPU).

    An image's score for a label is the highest confidence of any detection of that label;
    NudeNet reports only detections of confidence 0.2 or more.
    """

    name = "nudenet"
    labels = frozenset(NUDENET_LABELS)
    default_labels = NUDENET_DEFAULT_LABELS

    def __init__(self, detector: Any, max_batch_size: int = 8) -> None:
        self._detector = detector
        self.input_size = int(getattr(detector, "input_width", 320))
        self.max_batch_size = max(1, max_batch_size)

    @classmethod
    def load(cls, max_batch_size: int = 8) -> NudeNetChecker:
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise CheckerUnavailable(
                "NudeNet is not installed (pip install 'impasto[safety]'; NudeNet is AGPL-3.0)"
            ) from exc
        try:
            detector = NudeDetector()
        except Exception as exc:
            raise CheckerUnavailable(f"NudeNet's detector failed to load: {exc}") from exc
        return cls(detector, max_batch_size)

    def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        # RGBA on purpose: NudeNet 3.4 converts its input with COLOR_RGBA2BGR and then swaps
        # R and B again when it builds the blob, so an RGBA array reaches the model as RGB,
        # the order it was trained on (notAI-tech/NudeNet#203: file paths arrive as BGR).
        arrays = [np.asarray(image.convert("RGBA")) for image in images]
        found = self._detector.detect_batch(arrays, batch_size=self.max_batch_size)
        results: list[dict[str, float]] = []
        for detections in found:
            best: dict[str, float] = {}
            for detection in detections:
                label = str(detection["class"])
                best[label] = max(best.get(label, 0.0), float(detection["score"]))
            results.append(best)
        return results


def _input_size(processor: Any, default: int = 224) -> int:
    size = getattr(processor, "size", None)
    for key in ("shortest_edge", "height", "longest_edge"):
        value = getattr(size, key, None)
        if value is None and isinstance(size, dict):
            value = size.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return default


class HuggingFaceImageChecker:
    """A Hugging Face image-classification model through transformers' pipeline; the scores
    are the model's own (softmax or sigmoid, as its config says)."""

    def __init__(self, pipe: Any, source: str, max_batch_size: int = 8) -> None:
        self._pipe = pipe
        # One call at a time: a pipeline object is not documented as thread-safe.
        self._lock = threading.Lock()
        self.name = f"hf:{source}"
        id2label: dict[Any, str] = dict(pipe.model.config.id2label)
        self.labels = frozenset(str(label) for label in id2label.values())
        self.default_labels = frozenset(
            label for label in self.labels if label.casefold() in HF_DEFAULT_LABELS
        )
        self.input_size = _input_size(getattr(pipe, "image_processor", None))
        self.max_batch_size = max(1, max_batch_size)

    @classmethod
    def load(
        cls, source: str, *, device: str = "cpu", max_batch_size: int = 8
    ) -> HuggingFaceImageChecker:
        path = Path(source).expanduser()
        looks_local = source.startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.is_dir():
            raise CheckerUnavailable(f"no model directory at {source}")
        try:
            from transformers import pipeline
        except ImportError as exc:
            raise CheckerUnavailable(
                "transformers is not installed (pip install 'impasto[local]')"
            ) from exc
        model = str(path) if looks_local else source
        try:
            pipe = pipeline("image-classification", model=model, device=device)
        except Exception as exc:
            raise CheckerUnavailable(f"could not load image classifier {source!r}: {exc}") from exc
        return cls(pipe, source, max_batch_size)

    def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        rgb = [image.convert("RGB") for image in images]
        with self._lock:
            found = self._pipe(rgb, top_k=len(self.labels), batch_size=self.max_batch_size)
        return [{str(r["label"]): float(r["score"]) for r in ranked} for ranked in found]


def load_image_checker(spec: str, *, device: str = "cpu", max_batch_size: int = 8) -> ImageChecker:
    """`nudenet` or `hf:<model id or path>`; raises CheckerUnavailable with the reason."""
    spec = spec.strip()
    if spec.casefold() == "nudenet":
        return NudeNetChecker.load(max_batch_size)
    if spec.casefold().startswith("hf:") and spec[3:].strip():
        checker: ImageChecker = HuggingFaceImageChecker.load(
            spec[3:].strip(), device=device, max_batch_size=max_batch_size
        )
        return checker
    raise CheckerUnavailable(
        f"unknown checker {spec!r}; use nudenet, hf:<model id or local path>, or none"
    )
