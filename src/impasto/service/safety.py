"""Content safety as the inference service sees it: screening a request before generation
(`safety.blockContent`) and checking each output (`safety.checkContent`, legacy `checkNSFW`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from impasto.backends.base import ReferenceImage
from impasto.protocol.errors import InvalidParameter
from impasto.protocol.tasks import ImageInferenceIn


@dataclass(frozen=True)
class OutputVerdict:
    """What the output check found: the NSFWContent flag, and whether to withhold the image."""

    nsfw: bool | None
    withhold: bool = False


def wants_output_check(task: ImageInferenceIn) -> bool:
    safety = task.safety
    if safety is not None and safety.mode == "none":
        return False
    legacy = bool(task.checkNSFW or task.checkNsfw)
    return legacy or bool(safety is not None and safety.checkContent)


def wants_input_check(task: ImageInferenceIn) -> bool:
    safety = task.safety
    if safety is not None and safety.mode == "none":
        return False
    return bool(safety is not None and safety.blockContent)


class ContentSafety(Protocol):
    """The inference service's safety hooks."""

    def validate(self, task: ImageInferenceIn) -> None:
        """Raise an error item if the task asks for checks this server cannot do."""

    async def screen_input(
        self, task: ImageInferenceIn, references: Sequence[ReferenceImage]
    ) -> None:
        """For blockContent: raise ContentBlocked if the prompt or an input image is flagged."""

    async def check_outputs(
        self, task: ImageInferenceIn, images: Sequence[Image.Image]
    ) -> list[OutputVerdict]:
        """For checkContent: one verdict per generated image."""


class UnavailableSafety:
    """Used when no checker is installed: tasks that ask for checks fail with a clear error."""

    def validate(self, task: ImageInferenceIn) -> None:
        if wants_output_check(task) or wants_input_check(task):
            raise InvalidParameter(
                "Content checking is not available on this server (install impasto[safety] "
                "or configure a checker).",
                code="unsupportedParameter",
                parameter="safety",
            )

    async def screen_input(
        self, task: ImageInferenceIn, references: Sequence[ReferenceImage]
    ) -> None:
        self.validate(task)

    async def check_outputs(
        self, task: ImageInferenceIn, images: Sequence[Image.Image]
    ) -> list[OutputVerdict]:
        self.validate(task)
        return [OutputVerdict(nsfw=None) for _ in images]
