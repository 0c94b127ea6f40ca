"""Input images of a task: every slot is found, named by its stored UUID at the same path in
the kept request, and found again there by a re-run."""

from __future__ import annotations

import uuid

from impasto.protocol.parsing import parse_task
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.task_images import slots_of, with_stored_images

URL = "https://example.com/a.png"


def task(**fields: object) -> ImageInferenceIn:
    raw = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a cat",
        **fields,
    }
    parsed = parse_task(raw)
    assert isinstance(parsed, ImageInferenceIn)
    return parsed


def test_every_image_slot_is_found_and_renamed_by_uuid_at_its_path() -> None:
    original = task(
        inputs={"seedImage": URL, "mask": URL, "referenceImages": [{"image": URL, "tag": "x"}]},
        controlNet=[{"model": "impasto:tiny-controlnet@1", "guideImage": URL}],
        ipAdapters=[{"model": "impasto:tiny-ip-adapter@1", "guideImages": [URL, URL]}],
    )
    slots = slots_of(original)
    assert [s.parameter for s in slots] == [
        "inputs.referenceImages[0]",
        "inputs.seedImage",
        "inputs.mask",
        "controlNet[0].guideImage",
        "ipAdapters[0].guideImages[0]",
        "ipAdapters[0].guideImages[1]",
    ]
    stored = [str(uuid.uuid4()) for _ in slots]
    kept = with_stored_images(original, slots, stored)
    assert kept["inputs"]["referenceImages"][0] == {"image": stored[0], "tag": "x"}
    again = ImageInferenceIn.model_validate(kept)
    assert [s.value for s in slots_of(again)] == stored
    assert [s.parameter for s in slots_of(again)] == [s.parameter for s in slots]
    # The client's own request is not changed.
    assert original.controlNet is not None
    assert original.controlNet[0].guideImage == URL


def test_a_task_without_images_is_kept_as_sent() -> None:
    plain = task(lora=[{"model": "impasto:tiny-lora@1", "weight": 0.5}])
    assert slots_of(plain) == []
    assert with_stored_images(plain, [], []) == plain.model_dump(mode="json", exclude_unset=True)


def test_block_content_screens_every_input_but_the_mask_and_the_references() -> None:
    from PIL import Image

    from impasto.service.acceptance import screened_inputs
    from impasto.service.task_images import TaskImages

    asked = task(
        seedImage=URL,
        maskImage=URL,
        referenceImages=[URL],
        controlNet=[{"model": "impasto:tiny-controlnet@1", "guideImage": URL}],
    )
    slots = slots_of(asked)
    images = TaskImages(by_parameter={s.parameter: Image.new("RGB", (8, 8)) for s in slots})
    names = [name for name, _ in screened_inputs(asked, images)]
    assert names == ["seedImage", "controlNet[0].guideImage"]
