"""The utility tasks on a CUDA device through a real server: each tiny utility model (the real
transformers and diffusers code paths, random weights) runs on the GPU with the right output
shapes. Opt-in with the rest of tests/gpu."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import RunningServer, image_bytes

pytestmark = pytest.mark.gpu

CUDA = "cuda:0"
PHOTO = "data:image/png;base64," + base64.b64encode(image_bytes((96, 64))).decode()


def one(server: RunningServer, **fields: Any) -> list[dict[str, Any]]:
    body = {"taskUUID": str(uuid.uuid4()), **fields}
    response = server.post([body])
    assert response.status_code == 200, response.text
    assert "errors" not in response.json(), response.text
    return list(response.json()["data"])


def decoded(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"])))


def test_utility_models_run_on_cuda(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(devices=[CUDA])
    before = torch.cuda.memory_allocated(CUDA)
    for model, factor in (
        ("impasto:tiny-upscaler@1", 4),
        ("impasto:tiny-upscaler@2", 2),
        ("impasto:tiny-sd-upscaler@1", 4),
    ):
        (item,) = one(
            server,
            taskType="upscale",
            model=model,
            inputImage=PHOTO,
            upscaleFactor=factor,
            outputType="base64Data",
        )
        assert decoded(item).size == (96 * factor, 64 * factor)
    (cut,) = one(
        server,
        taskType="removeBackground",
        model="impasto:tiny-segmenter@1",
        inputImage=PHOTO,
        outputType="base64Data",
    )
    alpha = np.asarray(decoded(cut).getchannel("A"))
    assert len(np.unique(alpha)) > 1
    (caption,) = one(server, taskType="caption", model="impasto:tiny-captioner@1", inputImage=PHOTO)
    assert caption["text"].strip()
    texts = one(
        server,
        taskType="promptEnhance",
        model="impasto:tiny-enhancer@1",
        prompt="a lighthouse",
        promptVersions=2,
    )
    assert len(texts) == 2
    assert torch.cuda.memory_allocated(CUDA) > before  # the models now live on the GPU
