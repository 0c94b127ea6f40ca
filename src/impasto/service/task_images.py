"""The images a task names: reference images, the seed and mask images of img2img and
inpainting, ControlNet guide images and IP-Adapter images. Each is a slot at a path of the
request (`seedImage`, `controlNet[0].guideImage`, ...).

At acceptance every slot is fetched and decoded once, checked (a mask must match its seed
image), and stored as an input image; the stored request names each by its UUID at the same
path. A re-run after a restart, or a worker on another machine, resolves the same slots from
the image store and never fetches a client URL again.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from impasto.backends.base import ReferenceImage
from impasto.protocol.errors import InvalidParameter
from impasto.protocol.rules import SizeRule
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.images import ImageInput, ImageResolver


@dataclass(frozen=True)
class Slot:
    """One image string of a task, where it is and the error code that names it."""

    parameter: str
    value: str
    code: str


@dataclass(frozen=True)
class TaskImages:
    """A task's decoded images: references in order, the rest by parameter path."""

    references: tuple[ReferenceImage, ...] = ()
    by_parameter: Mapping[str, Image.Image] = field(default_factory=dict)

    def get(self, parameter: str) -> Image.Image | None:
        return self.by_parameter.get(parameter)


def slots_of(task: ImageInferenceIn) -> list[Slot]:
    """Every image the task names, references first."""
    base = task.reference_parameter()
    slots = [
        Slot(f"{base}[{i}]", ref.image, "invalidReferenceImages")
        for i, ref in enumerate(task.reference_images())
    ]
    seed = task.seed_image()
    if seed is not None:
        slots.append(Slot(seed[0], seed[1], "invalidSeedImage"))
    mask = task.mask_image()
    if mask is not None:
        slots.append(Slot(mask[0], mask[1], "invalidMaskImage"))
    for i, control in enumerate(task.controlNet or ()):
        slots.append(Slot(f"controlNet[{i}].guideImage", control.guideImage, "invalidGuideImage"))
    for i, adapter in enumerate(task.ipAdapters or ()):
        if adapter.guideImage is not None:
            slots.append(
                Slot(f"ipAdapters[{i}].guideImage", adapter.guideImage, "invalidGuideImage")
            )
        for j, image in enumerate(adapter.guideImages or ()):
            slots.append(Slot(f"ipAdapters[{i}].guideImages[{j}]", image, "invalidGuideImage"))
    return slots


async def resolve_slots(
    resolver: ImageResolver, slots: list[Slot], owner: str | None = None
) -> list[ImageInput]:
    """Each distinct image string is fetched and decoded once, however many slots name it (a
    photo that is both the seed and the ControlNet guide); errors name its first slot."""
    first: dict[str, Slot] = {}
    for slot in slots:
        first.setdefault(slot.value, slot)

    async def one(slot: Slot) -> ImageInput:
        return await resolver.resolve(
            slot.value, parameter=slot.parameter, code=slot.code, owner=owner
        )

    unique = list(first.values())
    resolved = dict(
        zip(
            (slot.value for slot in unique),
            await asyncio.gather(*(one(slot) for slot in unique)),
            strict=True,
        )
    )
    return [resolved[slot.value] for slot in slots]


def check_inputs(
    task: ImageInferenceIn, slots: list[Slot], inputs: list[ImageInput], sizes_rule: SizeRule
) -> None:
    """What can only be checked once the images are decoded: a mask matches its seed image,
    and an outpainted image fits the model."""
    sizes = {slot.parameter: i.image.size for slot, i in zip(slots, inputs, strict=True)}
    seed = task.seed_image()
    mask = task.mask_image()
    if seed is not None and mask is not None and sizes[mask[0]] != sizes[seed[0]]:
        (mw, mh), (sw, sh) = sizes[mask[0]], sizes[seed[0]]
        raise InvalidParameter(
            f"Invalid value for {mask[0]} parameter: the mask is {mw}x{mh} and the seed image "
            f"{sw}x{sh}; they must be the same size.",
            code="invalidMaskImage",
            parameter=mask[0],
        )
    if task.outpaint is not None and seed is not None:
        top, right, bottom, left = task.outpaint.sides()
        (sw, sh) = sizes[seed[0]]
        if task.width is not None and task.height is not None:
            inner = (task.width - left - right, task.height - top - bottom)
            if min(inner) < 64:
                raise InvalidParameter(
                    f"Invalid value for outpaint parameter: width x height "
                    f"{task.width}x{task.height} leaves {inner[0]}x{inner[1]} for the seed image "
                    "after the sides added; width and height are the final size.",
                    code="invalidOutpaint",
                    parameter="outpaint",
                )
        else:
            final = (sw // 8 * 8 + left + right, sh // 8 * 8 + top + bottom)
            problem = sizes_rule.check(final)
            if problem is not None:
                raise InvalidParameter(
                    f"Invalid value for outpaint parameter: the outpainted image would be "
                    f"{final[0]}x{final[1]} ({problem}).",
                    code="invalidOutpaint",
                    parameter="outpaint",
                )


def task_images(
    task: ImageInferenceIn,
    slots: list[Slot],
    inputs: list[ImageInput],
    source_urls: list[str | None] | None = None,
) -> TaskImages:
    refs = task.reference_images()
    urls = source_urls or [_https(i.url) for i in inputs]
    references = tuple(
        ReferenceImage(image=inputs[i].image, tag=ref.tag, source_url=urls[i])
        for i, ref in enumerate(refs)
    )
    by_parameter = {slot.parameter: i.image for slot, i in zip(slots, inputs, strict=True)}
    return TaskImages(references=references, by_parameter=by_parameter)


def with_stored_images(
    task: ImageInferenceIn, slots: list[Slot], stored: list[str]
) -> dict[str, Any]:
    """The request as it is kept: every image named by its stored UUID, at the same path."""
    request = task.model_dump(mode="json", exclude_unset=True)
    if not stored:
        return request
    request = copy.deepcopy(request)
    for slot, image_uuid in zip(slots, stored, strict=True):
        _set_path(request, slot.parameter, image_uuid)
    return request


_PART = re.compile(r"([A-Za-z]+)(?:\[(\d+)\])?")


def _set_path(document: dict[str, Any], path: str, value: str) -> None:
    holder: Any = document
    parts = path.split(".")
    for n, part in enumerate(parts):
        match = _PART.fullmatch(part)
        if match is None:
            raise ValueError(f"not a slot path: {path}")
        name, index = match.group(1), match.group(2)
        last = n == len(parts) - 1
        if index is None:
            if last:
                holder[name] = value
            else:
                holder = holder[name]
            continue
        item = holder[name][int(index)]
        if last:
            # A reference image kept as {image, tag}, or a bare string in a list.
            if isinstance(item, dict):
                item["image"] = value
            else:
                holder[name][int(index)] = value
        else:
            holder = item


def _https(url: str | None) -> str | None:
    # Providers that fetch images themselves are given the client's own https URL.
    return url if url and url.startswith("https://") else None
