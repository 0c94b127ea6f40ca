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
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from impasto.backends.devices import LOAD_LOCK, DeviceWorker
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import BackgroundRequest, UtilityOutput, UtilityRequest
from impasto.backends.utility.matting import alpha_matte, compose, post_process_mask
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter

log = logging.getLogger(__name__)

# The model an entry without a `path` loads.
DEFAULT_SOURCE = "ZhengPeng7/BiRefNet"
DEFAULT_RESOLUTION = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = ("float32", "float16", "bfloat16")


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


class BackgroundRemover:
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

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        *,
        offline: bool = False,
    ) -> None:
        self.entry = entry
        self._source = str(source)
        self._worker = worker
        self._offline = offline
        settings = entry.settings
        try:
            self._resolution = _resolution(settings.get("resolution", DEFAULT_RESOLUTION))
            self._mean = _triple(settings, "mean", IMAGENET_MEAN)
            self._std = _triple(settings, "std", IMAGENET_STD)
        except ValueError as exc:
            raise ValueError(f"{entry.air}: settings: {exc}") from None
        if not np.all(self._std > 0):
            raise ValueError(f"{entry.air}: settings: std must be positive, got {self._std}")
        dtype = str(settings.get("dtype", "float32"))
        if dtype not in _DTYPES:
            raise ValueError(f"{entry.air}: settings: dtype must be one of {_DTYPES}")
        self._dtype_name = dtype
        self._revision = settings.get("revision")
        self._model: Any = None
        self._size_bytes = 0

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        if not isinstance(request, BackgroundRequest):
            raise TypeError(
                f"{type(self).__name__} answers BackgroundRequest, not {type(request).__name__}"
            )
        _check_request(request)
        return await self._worker.run(self._remove, request)

    async def close(self) -> None:
        await self._worker.run(self._unload)
        self._worker.models.forget(self.entry.air)

    # Everything below runs on the worker's thread.

    def _torch_dtype(self) -> Any:
        import torch

        if not self._worker.device.startswith("cuda"):
            return torch.float32
        return getattr(torch, self._dtype_name)

    def _loaded(self) -> Any:
        if self._model is None:
            model = self._load()
            self._size_bytes = sum(
                t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
            )
            self._model = model
        # Every use marks it recent, so the cache evicts the models not in use instead.
        self._worker.models.use(self.entry.air, self._size_bytes, self._unload)
        return self._model

    def _load(self) -> Any:
        options: dict[str, Any] = {"trust_remote_code": True, "local_files_only": self._offline}
        if self._revision:
            options["revision"] = str(self._revision)
        with LOAD_LOCK:
            try:
                model = _from_pretrained(self._source, options)
                model = model.to(device=self._worker.device, dtype=self._torch_dtype())
            except ImportError as exc:
                # transformers names the packages the model's own code imports and lacks.
                raise InferenceError(
                    f"Model {self.entry.air} needs packages that are not installed: {exc}"
                ) from exc
            except Exception as exc:
                # The repository's own code runs here: anything it raises is a load failure.
                raise InferenceError(
                    f"Model {self.entry.air} could not be loaded from {self._source}: {exc}"
                ) from exc
            model.eval()
        log.info("loaded %s from %s on %s", self.entry.air, self._source, self._worker.device)
        return model

    def _unload(self) -> None:
        if self._model is None:
            return
        self._model = None
        if self._worker.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _remove(self, request: BackgroundRequest) -> Image.Image:
        image = request.image.convert("RGB")
        mask = self._predict(image)
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

    def _predict(self, image: Image.Image) -> Image.Image:
        """The model's mask for `image`: L, the image's size, white subject."""
        import torch
        from torch.nn import functional

        model = self._loaded()
        pixels = self._pixels(image).to(device=self._worker.device, dtype=self._torch_dtype())
        try:
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
        except ImpastoError:
            raise
        except Exception as exc:
            # The repository's own code runs here; out of memory is a RuntimeError too.
            raise InferenceError(f"Model {self.entry.air} failed: {exc}") from exc
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
