"""Background removal with a dichotomous-segmentation model: BiRefNet (ZhengPeng7/BiRefNet, the
default), BRIA RMBG-2.0 (briaai/RMBG-2.0, which is a BiRefNet) or anything published the same
way, loaded through transformers' AutoModelForImageSegmentation with the repository's own code.

Their convention: ImageNet-normalised pixels [B, 3, R, R] in, a list of logit maps out whose
last is the full-resolution prediction [B, 1, R, R]; its sigmoid is the mask. The mask is
resized back to the image, refined as the request asks (matting.py) and composed into the
output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from impasto.backends.utility.base import BackgroundRequest, UtilityRequest
from impasto.backends.utility.local import LocalUtilityModel, weights_bytes
from impasto.backends.utility.matting import alpha_matte, compose, post_process_mask
from impasto.protocol.errors import InferenceError, InvalidParameter

log = logging.getLogger(__name__)

# The model an entry without a `path` loads.
DEFAULT_SOURCE = "ZhengPeng7/BiRefNet"
DEFAULT_RESOLUTION = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resolution(value: object) -> tuple[int, int]:
    """`resolution` as (width, height): one side for a square, or [width, height]."""
    if isinstance(value, int) and not isinstance(value, bool):
        sides: Sequence[object] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        sides = value
    else:
        raise ValueError(f"resolution must be a side or [width, height], got {value!r}")
    whole = [s for s in sides if isinstance(s, int) and not isinstance(s, bool) and s > 0]
    if len(whole) != 2:
        raise ValueError(f"resolution must be positive whole pixels, got {value!r}")
    return whole[0], whole[1]


def _triple(
    settings: Mapping[str, Any], key: str, default: tuple[float, ...]
) -> npt.NDArray[np.float32]:
    value = settings.get(key, default)
    try:
        values = np.asarray([float(v) for v in value], dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be three numbers (r, g, b), got {value!r}") from None
    if values.shape != (3,):
        raise ValueError(f"{key} must be three numbers (r, g, b), got {value!r}")
    return values


def _check_request(request: BackgroundRequest) -> None:
    # Named as in Runware's removeBackground settings, so the client sees what it sent.
    for name, value in (
        ("alphaMattingForegroundThreshold", request.foreground_threshold),
        ("alphaMattingBackgroundThreshold", request.background_threshold),
        ("alphaMattingErodeSize", request.erode_size),
    ):
        if not 0 <= value <= 255:
            raise InvalidParameter(
                f"{name} must be between 0 and 255, got {value}.",
                code=f"invalid{name[:1].upper()}{name[1:]}",
                parameter=name,
            )
    if request.background is not None and (
        len(request.background) != 4 or any(not 0 <= c <= 255 for c in request.background)
    ):
        raise InvalidParameter(
            f"rgba must be four values between 0 and 255, got {list(request.background)}.",
            code="invalidRgba",
            parameter="rgba",
        )


class BackgroundRemover(LocalUtilityModel[BackgroundRequest, Any]):
    """A BiRefNet-style segmentation model answering BackgroundRequests with an RGBA cut-out
    (or the mask alone, or the subject over a colour).

    The model's own python code (the repository's `auto_map`) is executed: list only sources
    you trust in the models file. BiRefNet's code needs `timm`, `kornia` and `einops`.

    Settings (the entry's `settings`):
      resolution: the side the model sees (int, default 1024), or [width, height]; BiRefNet
        and RMBG-2.0 were trained at 1024, BiRefNet_HR at 2048.
      mean, std: the per-channel normalisation of [0, 1] pixels (ImageNet's by default).
      dtype: float32 (default), float16 or bfloat16; half precision applies on CUDA only, a
        CPU computes in float32.
      revision: the hub revision (commit) to load, pinning the code that runs (default: main).
    """

    action = "remove the background"
    memory_setting = "resolution"
    # The repository's own code runs in loading and inference: anything it raises is a
    # failure of the model.
    load_errors = (Exception,)
    inference_errors = (Exception,)

    def _configure(self, settings: Mapping[str, Any]) -> None:
        air = self.entry.air
        try:
            self._resolution = _resolution(settings.get("resolution", DEFAULT_RESOLUTION))
            self._mean = _triple(settings, "mean", IMAGENET_MEAN)
            self._std = _triple(settings, "std", IMAGENET_STD)
        except ValueError as exc:
            raise ValueError(f"{air}: settings: {exc}") from None
        if not np.all(self._std > 0):
            raise ValueError(f"{air}: settings: std must be positive, got {self._std}")
        self._revision = settings.get("revision")

    def _check(self, request: UtilityRequest) -> BackgroundRequest:
        if not isinstance(request, BackgroundRequest):
            raise TypeError(
                f"{type(self).__name__} answers BackgroundRequest, not {type(request).__name__}"
            )
        _check_request(request)
        return request

    # Everything below runs on the worker's thread.

    def _load(self, device: str) -> tuple[Any, int]:
        options: dict[str, Any] = {"trust_remote_code": True, "local_files_only": self.offline}
        if self._revision:
            options["revision"] = str(self._revision)
        model = _from_pretrained(str(self.source), options)
        model = model.to(device=device, dtype=self._torch_dtype())
        model.eval()
        return model, weights_bytes(model)

    def _infer(self, model: Any, request: BackgroundRequest) -> Image.Image:
        image = request.image.convert("RGB")
        mask = self._predict(model, image)
        if request.post_process_mask:
            mask = post_process_mask(mask)
        if request.alpha_matting:
            mask = alpha_matte(
                image,
                mask,
                request.foreground_threshold,
                request.background_threshold,
                request.erode_size,
            )
        if request.return_only_mask:
            return mask.convert("RGB")
        return compose(image, mask, request.background)

    def _pixels(self, image: Image.Image) -> Any:
        import torch

        resized = image.resize(self._resolution, Image.Resampling.BILINEAR)
        values = np.asarray(resized, dtype=np.float32) / np.float32(255)
        values = (values - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))[None]

    def _predict(self, model: Any, image: Image.Image) -> Image.Image:
        """The model's mask for `image`: L, the image's size, white subject."""
        import torch
        from torch.nn import functional

        pixels = self._pixels(image).to(device=self.worker.device, dtype=self._torch_dtype())
        with torch.inference_mode():
            logits = _logits(model(pixels))
            probabilities = logits.float().sigmoid()
            # Bilinear back to the image's size, as BiRefNet's own examples do.
            resized = functional.interpolate(
                probabilities,
                size=(image.height, image.width),
                mode="bilinear",
                align_corners=False,
            )
        values = resized[0, 0].clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(values, mode="L")


def _from_pretrained(source: str, options: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForImageSegmentation
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return AutoModelForImageSegmentation.from_pretrained(source, **options)
    except AttributeError as exc:
        if "all_tied_weights_keys" not in str(exc):
            raise
    # Remote code written for transformers 4 whose model never calls post_init()
    # (reported for BiRefNet-based repositories) fails in transformers 5, which reads the
    # `all_tied_weights_keys` that post_init() sets. Such models tie no weights: give the
    # class an empty mapping and load again.
    config = AutoConfig.from_pretrained(source, **options)
    reference = config.auto_map["AutoModelForImageSegmentation"]
    model_class = get_class_from_dynamic_module(
        reference,
        source,
        local_files_only=options.get("local_files_only", False),
        revision=options.get("revision"),
    )
    model_class.all_tied_weights_keys = {}
    log.warning("%s does not call post_init(); loading it without tied weights", reference)
    return AutoModelForImageSegmentation.from_pretrained(source, **options)


def _logits(output: Any) -> Any:
    """The full-resolution logit map [B, 1, h, w] in a segmentation model's output: the last
    of a list or tuple (BiRefNet, RMBG-2.0), `.logits` of a ModelOutput, or a tensor."""
    import torch

    found = output
    if isinstance(found, (list, tuple)) and found:
        found = found[-1]
    if not isinstance(found, torch.Tensor) and getattr(found, "logits", None) is not None:
        found = found.logits
    if not isinstance(found, torch.Tensor):
        raise InferenceError(f"the model returned {type(output).__name__}, not logits")
    if found.ndim == 3:
        found = found[:, None]
    if found.ndim != 4 or found.shape[1] != 1:
        raise InferenceError(f"the model's logits have shape {tuple(found.shape)}, not [B,1,H,W]")
    return found
