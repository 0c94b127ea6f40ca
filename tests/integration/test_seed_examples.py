"""The five example tasks of the runway:4@1 model page, served by the tiny model via an alias."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.conftest import LoopbackHTTP, image_bytes

EXAMPLES = json.loads((Path(__file__).parents[1] / "data" / "seed-tasks.json").read_text())


def _aliased_models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text('[aliases]\n"runway:4@1" = "impasto:tiny@1"\n')
    return path


def _point_references_at(task: dict[str, Any], http: LoopbackHTTP) -> dict[str, Any]:
    refs = task.get("referenceImages")
    if refs:
        local = []
        for i, _ in enumerate(refs):
            path = f"/ref-{i}.jpg"
            http.routes[path] = (200, "image/jpeg", image_bytes((640, 480), "JPEG", "blue"))
            local.append(http.url(path))
        task["referenceImages"] = local
    return task


def test_seed_examples_return_documented_items_of_the_requested_size(
    server_factory: Any, loopback_http: LoopbackHTTP, tmp_path: Path
) -> None:
    server = server_factory(models=_aliased_models_file(tmp_path))
    tasks = [_point_references_at(dict(example["request"]), loopback_http) for example in EXAMPLES]

    response = server.post(tasks)

    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body
    items = {item["taskUUID"]: item for item in body["data"]}
    assert len(items) == len(EXAMPLES)
    for example in EXAMPLES:
        request, documented = example["request"], example["response"]
        item = items[request["taskUUID"]]
        # Same fields as the documented response (cost only when asked for).
        expected_keys = set(documented) - {"cost"}
        assert set(item) == expected_keys, example["name"]
        assert item["taskType"] == "imageInference"
        uuid.UUID(item["imageUUID"])
        assert isinstance(item["seed"], int)
        served = httpx.get(item["imageURL"], timeout=30)
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(served.content))
        assert image.format == "JPEG"
        assert image.size == (request["width"], request["height"])
    fetched = {r.path for r in loopback_http.requests}
    assert {"/ref-0.jpg", "/ref-1.jpg"} <= fetched


def test_alias_keeps_the_aliased_models_price_and_rules(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory(models=_aliased_models_file(tmp_path))
    task = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runway:4@1",
        "positivePrompt": "a lighthouse",
        "width": 1280,
        "height": 720,
        "includeCost": True,
    }
    body = server.post([task]).json()
    assert body["data"][0]["cost"] == 0.05

    bad = dict(task, taskUUID=str(uuid.uuid4()), width=512, height=512)
    error = server.post([bad]).json()["errors"][0]
    assert error["code"] == "invalidWidth"
    assert error["parameter"] == "width"
