"""Upscalers for Runware's `upscale` task: Swin2SR (transformers), a fast single-pass
super-resolution transformer, and Stable Diffusion's x4 upscaler (diffusers), which
re-imagines detail under a prompt.

Both load on their first request, on the device's worker thread, and work in overlapping
tiles (tiling.py) so that memory stays bounded on large inputs. A model upscales by a fixed
native factor; other factors are made from repeated passes or a Lanczos resize, and the result
is always exactly `factor` times the input on each side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from impasto.backends.devices import LOAD_LOCK, DeviceWorker
from impasto.backends.diffusers_loading import ModelUnavailable, dtype_for, module_bytes
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import UpscaleRequest, UtilityOutput, UtilityRequest
from impasto.backends.utility.tiling import upscale_tiled
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter

log = logging.getLogger("impasto.backends.utility")

# The x4 upscaler's UNet halves its input three times; padding the input to this multiple
# keeps its skip connections aligned (and the pipeline from cropping to a multiple of 4).
_DIFFUSION_MULTIPLE = 8


def model_passes(native: int, factor: int) -> int:
    """How many native passes make `factor` exactly (native 2, factor 4: 2); 1 when no
    number does, and the one pass is then resized to `factor`."""
    if native <= 1:
        return 1
    passes, reached = 1, native
    while reached < factor:
        reached *= native
        passes += 1
    return passes if reached == factor else 1


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def _setting_int(entry: ModelEntry, key: str, default: int) -> int:
    return int(entry.settings.get(key, default))


def _release_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class _LazyUpscaler:
    """What both upscalers share: lazy loading on the worker thread, the memory budget, the
    request check and the error translation. Subclasses load and upscale."""

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        *,
        offline: bool = False,
    ) -> None:
        self.entry = entry
        self._source = source
        self._worker = worker
        self._offline = offline
        self._dtype_name: str | None = entry.settings.get("dtype")
        # The loaded model and its size in bytes; None until the first request.
        self._loaded: Any = None
        self._size_bytes = 0

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        if not isinstance(request, UpscaleRequest):
            raise TypeError(f"{type(self).__name__} runs UpscaleRequest, not {type(request)}")
        if request.factor < 1:
            raise InvalidParameter(
                f"The upscale factor must be at least 1, not {request.factor}.",
                code="invalidUpscaleFactor",
                parameter="upscaleFactor",
            )
        return await self._worker.run(self._run_on_device, request)

    async def close(self) -> None:
        await self._worker.run(self._close_on_device)

    def _run_on_device(self, request: UpscaleRequest) -> Image.Image:
        if self._loaded is None:
            with LOAD_LOCK:
                try:
                    self._loaded, self._size_bytes = self._load(self._worker.device)
                except (OSError, ValueError) as exc:
                    log.error("cannot load %s from %s: %s", self.entry.air, self._source, exc)
                    raise ModelUnavailable(self._load_failure(), parameter="model") from None
        # Every use marks the model most recent, so the budget evicts others first.
        self._worker.models.use(self.entry.air, self._size_bytes, self._unload)
        image = request.image.convert("RGB")
        try:
            result = self._upscale(self._loaded, image, request)
        except ImpastoError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                _release_memory(self._worker.device)
                raise InferenceError(
                    f"Model {self.entry.air} ran out of GPU memory upscaling "
                    f"{image.width}x{image.height}; lower its `tile` setting."
                ) from None
            log.exception("upscaling with %s failed", self.entry.air)
            raise InferenceError(f"Model {self.entry.air} failed to upscale the image.") from exc
        return _fit(result, (image.width * request.factor, image.height * request.factor))

    def _load_failure(self) -> str:
        if Path(str(self._source)).exists():
            return (
                f"Model {self.entry.air} could not be loaded from {self._source}: the directory "
                "does not hold a model of this kind."
            )
        return (
            f"Model {self.entry.air} could not be loaded from {self._source}: its weights are "
            "not in the local cache and could not be downloaded. Download them where there is "
            f"internet (huggingface-cli download {self._source}) or set `path` to a local "
            "directory in the models file."
        )

    def _close_on_device(self) -> None:
        self._unload()
        self._worker.models.forget(self.entry.air)

    def _unload(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            _release_memory(self._worker.device)

    def _load(self, device: str) -> tuple[Any, int]:
        """Load the model onto `device` (LOAD_LOCK is held); returns it and its size."""
        raise NotImplementedError

    def _upscale(self, model: Any, image: Image.Image, request: UpscaleRequest) -> Image.Image:
        """Upscale on the worker thread; the result is resized to the exact size after."""
        raise NotImplementedError


class Swin2SRUpscaler(_LazyUpscaler):
    """A Swin2SR super-resolution model (`Swin2SRForImageSuperResolution` and its image
    processor), e.g. caidas/swin2SR-classical-sr-x2-64, caidas/swin2SR-classical-sr-x4-64 or
    caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr.

    Its native factor is the checkpoint's `config.upscale`; a factor that is a power of it
    runs that many passes, any other runs one pass and is resized with Lanczos.

    Settings: `tile` (512) input px per tile side and `tile_overlap` (32) px between tiles;
    `dtype` (float32; "float16" or "bfloat16" on CUDA).
    """

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        *,
        offline: bool = False,
    ) -> None:
        super().__init__(entry, source, worker, offline=offline)
        self._tile = _setting_int(entry, "tile", 512)
        self._overlap = _setting_int(entry, "tile_overlap", 32)

    def _load(self, device: str) -> tuple[Any, int]:
        from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

        dtype = dtype_for(self._dtype_name, device)
        model = Swin2SRForImageSuperResolution.from_pretrained(
            self._source, local_files_only=self._offline, dtype=dtype
        )
        model.to(device).eval()
        processor = AutoImageProcessor.from_pretrained(self._source, local_files_only=self._offline)
        return (model, processor), module_bytes(model)

    def _upscale(self, model: Any, image: Image.Image, request: UpscaleRequest) -> Image.Image:
        network, processor = model
        native = int(network.config.upscale)
        run_tile = self._tile_runner(network, processor, native)
        for _ in range(model_passes(native, request.factor)):
            image = upscale_tiled(image, native, run_tile, self._tile, self._overlap)
        return image

    def _tile_runner(
        self, network: Any, processor: Any, native: int
    ) -> Callable[[Image.Image], Image.Image]:
        import torch

        parameter = next(network.parameters())

        def run_tile(tile: Image.Image) -> Image.Image:
            # The processor scales to [0, 1] and pads (bottom and right) to the window size
            # the checkpoint was trained with; the padding is cropped off the output.
            pixels = processor(tile, return_tensors="pt").pixel_values
            pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
            with torch.inference_mode():
                output = network(pixel_values=pixels).reconstruction
            output = output[0, :, : tile.height * native, : tile.width * native]
            array = output.clamp(0, 1).float().mul(255).round().byte().permute(1, 2, 0)
            return Image.fromarray(np.ascontiguousarray(array.cpu().numpy()))

        return run_tile


class DiffusionUpscaler(_LazyUpscaler):
    """Stable Diffusion's x4 upscaler (`StableDiffusionUpscalePipeline`, e.g.
    stabilityai/stable-diffusion-x4-upscaler): it denoises new detail into the image, guided
    by the request's prompt, negative prompt, steps, CFG scale and seed.

    Natively x4; factor 2 or 3 upscales 4 times and resizes down with Lanczos, 16 runs two
    passes. Its memory grows fast with size, so it works in small tiles.

    Settings: `steps` (20) and `guidance_scale` (7.5) unless the request gives them;
    `noise_level` (20, up to the pipeline's max_noise_level 350): how much noise is added to
    the low-res image, more lets the model invent more; `tile` (128) input px per tile side
    and `tile_overlap` (16); `dtype` (float32; "float16" on CUDA).
    """

    native = 4

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        *,
        offline: bool = False,
    ) -> None:
        super().__init__(entry, source, worker, offline=offline)
        self._steps = _setting_int(entry, "steps", 20)
        self._guidance = float(entry.settings.get("guidance_scale", 7.5))
        self._noise_level = _setting_int(entry, "noise_level", 20)
        self._tile = _setting_int(entry, "tile", 128)
        self._overlap = _setting_int(entry, "tile_overlap", 16)

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        if isinstance(request, UpscaleRequest) and request.steps is not None and request.steps < 1:
            raise InvalidParameter(
                f"Steps must be at least 1, not {request.steps}.",
                code="invalidSteps",
                parameter="steps",
            )
        return await super().run(request)

    def _load(self, device: str) -> tuple[Any, int]:
        from diffusers import StableDiffusionUpscalePipeline

        pipeline = StableDiffusionUpscalePipeline.from_pretrained(
            self._source,
            local_files_only=self._offline,
            dtype=dtype_for(self._dtype_name, device),
            # The upscaler ships no safety checker; the server's own safety policy applies.
            safety_checker=None,
            watermarker=None,
        )
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        size = sum(
            module_bytes(module)
            for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder)
            if module is not None
        )
        return pipeline, size

    def _upscale(self, model: Any, image: Image.Image, request: UpscaleRequest) -> Image.Image:
        import torch

        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self._worker.device).manual_seed(request.seed)
        options = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "num_inference_steps": request.steps if request.steps is not None else self._steps,
            "guidance_scale": (
                request.cfg_scale if request.cfg_scale is not None else self._guidance
            ),
            "noise_level": self._noise_level,
            "generator": generator,
        }

        def run_tile(tile: Image.Image) -> Image.Image:
            padded = _pad_to_multiple(tile, _DIFFUSION_MULTIPLE)
            # One generator through all tiles: the same seed gives the same image.
            output: Image.Image = model(image=padded, **options).images[0]
            return output.crop((0, 0, tile.width * self.native, tile.height * self.native))

        for _ in range(model_passes(self.native, request.factor)):
            image = upscale_tiled(image, self.native, run_tile, self._tile, self._overlap)
        return image


def _pad_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """`image` extended at the bottom and right to a multiple of `multiple` px by repeating
    its edge pixels (a flat border would bleed a dark frame into the model's output)."""
    width, height = image.size
    pad_w, pad_h = -width % multiple, -height % multiple
    if not pad_w and not pad_h:
        return image
    array = np.pad(np.asarray(image), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return Image.fromarray(array)
