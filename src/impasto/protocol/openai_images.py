"""OpenAI's Images API on impasto's own tasks: a request of `POST /v1/images/generations` or
`/v1/images/edits` becomes one sync imageInference task, its image items become OpenAI's
`data`, and its error items OpenAI's `{"error": {message, type, param, code}}`.

One service, two transports: the task goes through the same dispatcher as a Runware task, so
validation, models, batching, storage, safety, API keys and quotas are the same.

Fields (as the `openai` SDKs send them):
- `prompt`, `model` (an AIR or an alias; default IMPASTO_OPENAI_DEFAULT_MODEL, else the first
  preloaded model, else the registry's first), `n`, `size`
  (`WxH`, or `auto`/absent for the model's default), `response_format` (`url` default, or
  `b64_json`), `output_format` (png, jpeg, webp), `output_compression` (0-100; impasto's
  encoder takes 20-99, so it is clamped), `user` and `safety_identifier` (recorded nowhere).
- Taken but not honoured (named in the reply's `impasto_notes`): `quality` other than
  auto/standard (the model's steps decide), `background: transparent` (outputs are opaque),
  `style`, `moderation` (content checks are the operator's setting), `input_fidelity`.
- Refused (400 naming the field): `stream: true`, `partial_images` > 0, `gif`/`svg` output, and
  fields OpenAI does not have, except the ones OpenAI-compatible engines commonly take, which
  map onto Runware's: `negative_prompt`, `seed`, `num_inference_steps`, `guidance_scale`.
- Edits: the first `image` is the seed image (its size, on the 8-pixel grid, is the output's
  unless `size` says otherwise); further ones are reference images. A `mask`
  follows OpenAI's convention (transparent where the image is to change) and is turned into
  Runware's (white where it changes). With a mask the model must take inpainting; without
  one, or when the model has no inpainting, the edit is img2img from the image.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from impasto.protocol.errors import ImpastoError, InvalidParameter, ModelNotFound

MAX_N = 10
# OpenAI parameter -> Runware task field, for the fields that carry over as they are.
ENGINE_EXTRAS = {
    "negative_prompt": "negativePrompt",
    "seed": "seed",
    "num_inference_steps": "steps",
    "guidance_scale": "CFGScale",
}
IGNORED = {
    "quality": ("auto", "standard"),
    "background": ("auto", "opaque"),
    "style": (),
    "moderation": (),
    "input_fidelity": (),
}
ACCEPTED = {"prompt", "model", "n", "size", "response_format", "output_format"}
ACCEPTED |= {"output_compression", "user", "safety_identifier", "stream", "partial_images"}
ACCEPTED |= set(ENGINE_EXTRAS) | set(IGNORED)
EDIT_FILES = {"image", "image[]", "mask"}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
# Runware parameter names in error items -> the OpenAI field a client sent.
PARAMETERS = {
    "width": "size",
    "height": "size",
    "positivePrompt": "prompt",
    "numberResults": "n",
    "outputFormat": "output_format",
    "outputQuality": "output_compression",
    "outputType": "response_format",
    "seedImage": "image",
    "referenceImages": "image",
    "maskImage": "mask",
    "negativePrompt": "negative_prompt",
    "steps": "num_inference_steps",
    "CFGScale": "guidance_scale",
}
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def bad(message: str, parameter: str, code: str = "invalid_value") -> InvalidParameter:
    return InvalidParameter(message, code=code, parameter=parameter)


@dataclass
class ImagesRequest:
    """An OpenAI images request, as the Runware task it runs as."""

    task: dict[str, Any]
    response_format: str
    output_format: str
    notes: list[str] = field(default_factory=list)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise bad(f"{name} must be an integer.", name)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise bad(f"{name} must be an integer, not {value!r}.", name)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise bad(f"{name} must be a number.", name)
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise bad(f"{name} must be a number, not {value!r}.", name) from None


def parse_size(value: Any) -> tuple[int, int] | None:
    """`WxH` as (width, height); None for `auto` or nothing (the model's default)."""
    if value is None or value == "auto":
        return None
    if not isinstance(value, str):
        raise bad("size must be a string such as 1024x1024, or auto.", "size")
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise bad(f"Invalid size {value!r}: use WIDTHxHEIGHT, such as 1024x1024, or auto.", "size")
    return int(width), int(height)


def images_request(
    fields: dict[str, Any], *, default_model: str, task_uuid: str | None = None
) -> ImagesRequest:
    """The sync imageInference task for an images request's fields (JSON body or form)."""
    unknown = sorted(set(fields) - ACCEPTED - EDIT_FILES)
    if unknown:
        raise bad(
            f"Unrecognized request argument supplied: {unknown[0]}.",
            unknown[0],
            "unknown_parameter",
        )
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt is required and must be a non-empty string.", "prompt", "missing")
    model = fields.get("model") or default_model
    if not isinstance(model, str):
        raise bad("model must be a string (an AIR such as impasto:tiny@1).", "model")
    n = _integer(fields.get("n", 1) if fields.get("n") is not None else 1, "n")
    if not 1 <= n <= MAX_N:
        raise bad(f"n must be between 1 and {MAX_N}, not {n}.", "n")
    response_format = fields.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise bad(
            f"response_format must be url or b64_json, not {response_format!r}.", "response_format"
        )
    output_format = str(fields.get("output_format") or "png").lower()
    if output_format not in FORMATS:
        raise bad(
            f"output_format {output_format!r} is not supported here; use png, jpeg or webp.",
            "output_format",
        )
    stream = fields.get("stream")
    if stream not in (None, False, "false", "False", "0"):
        raise bad("Streaming image responses are not supported by this server.", "stream")
    partial = fields.get("partial_images")
    if partial not in (None, "") and _integer(partial, "partial_images") > 0:
        raise bad("partial_images are not supported by this server.", "partial_images")
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": task_uuid or str(uuid.uuid4()),
        "model": model,
        "positivePrompt": prompt,
        "numberResults": n,
        "outputType": "URL" if response_format == "url" else "base64Data",
        "outputFormat": FORMATS[output_format],
        "includeCost": True,
        "deliveryMethod": "sync",
    }
    size = parse_size(fields.get("size"))
    if size is not None:
        task["width"], task["height"] = size
    compression = fields.get("output_compression")
    if compression not in (None, ""):
        quality = _integer(compression, "output_compression")
        if not 0 <= quality <= 100:
            raise bad("output_compression must be between 0 and 100.", "output_compression")
        task["outputQuality"] = min(99, max(20, quality))
    for name, target in ENGINE_EXTRAS.items():
        extra = fields.get(name)
        if extra in (None, ""):
            continue
        if name == "negative_prompt":
            task[target] = str(extra)
        elif name == "guidance_scale":
            task[target] = _number(extra, name)
        else:
            task[target] = _integer(extra, name)
    notes = []
    for name, honoured in IGNORED.items():
        given = fields.get(name)
        if given not in (None, "") and given not in honoured:
            notes.append(f"{name}={given} is not honoured by this server and was ignored")
    return ImagesRequest(task, response_format, output_format, notes)


def openai_mask(data: bytes) -> str:
    """An OpenAI mask (transparent where the image changes) as a Runware maskImage data URI
    (white where it changes). A mask without transparency is taken as it is (white changes)."""
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except Exception:
        raise bad("mask is not an image this server can read.", "mask") from None
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        converted = ImageOps.invert(alpha.point(lambda a: 255 if a > 0 else 0))
    else:
        converted = mask.convert("L")
    buffer = io.BytesIO()
    converted.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def data_uri(data: bytes) -> str:
    """An uploaded file as a data URI (its type is sniffed by the decoder, not trusted)."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def edit_task(
    request: ImagesRequest,
    images: list[bytes],
    mask: bytes | None,
    *,
    inpainting: bool,
) -> None:
    """Put the edit's images on its task: the seed image, references, and the mask (or not,
    for a model without inpainting, which then edits by img2img)."""
    if not images:
        raise bad("image is required: the image to edit, as a file.", "image", "missing")
    task = request.task
    task["seedImage"] = data_uri(images[0])
    if "width" not in task:
        # No size (or auto): the edit keeps the image's size, on the 8-pixel grid diffusion
        # models work on.
        try:
            with Image.open(io.BytesIO(images[0])) as first:
                width, height = first.size
        except Exception:
            raise bad("image is not an image this server can read.", "image") from None
        task["width"], task["height"] = max(8, width // 8 * 8), max(8, height // 8 * 8)
    if len(images) > 1:
        task["referenceImages"] = [data_uri(data) for data in images[1:]]
    if mask is not None:
        if inpainting:
            task["maskImage"] = openai_mask(mask)
        else:
            request.notes.append(
                "this model has no inpainting: the mask was ignored and the image edited as "
                "a whole (img2img)"
            )


def images_response(request: ImagesRequest, items: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's ImagesResponse for the task's image items."""
    data = []
    for item in items:
        if request.response_format == "b64_json":
            data.append({"b64_json": item.get("imageBase64Data", "")})
        else:
            data.append({"url": item.get("imageURL", "")})
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "output_format": "jpeg" if request.output_format == "jpg" else request.output_format,
    }
    task = request.task
    if "width" in task:
        body["size"] = f"{task['width']}x{task['height']}"
    cost = sum(float(i["cost"]) for i in items if isinstance(i.get("cost"), int | float))
    if cost:
        body["impasto_cost"] = round(cost, 10)
    if request.notes:
        body["impasto_notes"] = list(request.notes)
    return body


def openai_error(error: ImpastoError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of an impasto error."""
    status = error.http_status
    if status == 200 or status == 202:
        # An error after acceptance (a failed generation) or a sync timeout: the request as
        # a whole failed, and OpenAI's API has no partial answers.
        status = 504 if error.code == "syncTimeout" else 500
    if isinstance(error, ModelNotFound):
        status = 404
    kind = ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    parameter = PARAMETERS.get(error.parameter or "", error.parameter)
    code = "model_not_found" if isinstance(error, ModelNotFound) else error.code
    body = {"error": {"message": error.message, "type": kind, "param": parameter, "code": code}}
    return status, body
