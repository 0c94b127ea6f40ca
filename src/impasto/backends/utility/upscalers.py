"""Upscalers for Runware's `upscale` task: Swin2SR (transformers), a fast single-pass
super-resolution transformer, and Stable Diffusion's x4 upscaler (diffusers), which
re-imagines detail under a prompt.

Both load on their first request, on the device's worker thread, and work in overlapping
tiles (tiling.py) so that memory stays bounded on large inputs. A model upscales by a fixed
native factor; other factors are made from repeated passes or a Lanczos resize, and the result
is always exactly `factor` times the input on each side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from impasto.backends.utility.base import UpscaleRequest, UtilityRequest
from impasto.backends.utility.local import LocalUtilityModel, weights_bytes
from impasto.backends.utility.tiling import upscale_tiled
from impasto.protocol.errors import InvalidParameter

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


class _LazyUpscaler(LocalUtilityModel[UpscaleRequest, Any]):
    """What both upscalers share: the request check and the exact output size. Subclasses
    load and upscale."""

    action = "upscale the image"
    memory_setting = "tile"

    def _check(self, request: UtilityRequest) -> UpscaleRequest:
        if not isinstance(request, UpscaleRequest):
            raise TypeError(f"{type(self).__name__} runs UpscaleRequest, not {type(request)}")
        if request.factor < 1:
            raise InvalidParameter(
                f"The upscale factor must be at least 1, not {request.factor}.",
                code="invalidUpscaleFactor",
                parameter="upscaleFactor",
            )
        return request

    def _doing(self, request: UpscaleRequest) -> str:
        return f"upscale a {request.image.width}x{request.image.height} image"

    def _infer(self, model: Any, request: UpscaleRequest) -> Image.Image:
        image = request.image.convert("RGB")
        result = self._upscale(model, image, request)
        return _fit(result, (image.width * request.factor, image.height * request.factor))

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

    def _configure(self, settings: Mapping[str, Any]) -> None:
        self._tile = int(settings.get("tile", 512))
        self._overlap = int(settings.get("tile_overlap", 32))

    def _load(self, device: str) -> tuple[Any, int]:
        from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

        model = Swin2SRForImageSuperResolution.from_pretrained(
            self.source, local_files_only=self.offline, dtype=self._torch_dtype()
        )
        model.to(device).eval()
        processor = AutoImageProcessor.from_pretrained(self.source, local_files_only=self.offline)
        return (model, processor), weights_bytes(model)

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

    def _configure(self, settings: Mapping[str, Any]) -> None:
        self._steps = int(settings.get("steps", 20))
        self._guidance = float(settings.get("guidance_scale", 7.5))
        self._noise_level = int(settings.get("noise_level", 20))
        self._tile = int(settings.get("tile", 128))
        self._overlap = int(settings.get("tile_overlap", 16))

    def _check(self, request: UtilityRequest) -> UpscaleRequest:
        if isinstance(request, UpscaleRequest) and request.steps is not None and request.steps < 1:
            raise InvalidParameter(
                f"Steps must be at least 1, not {request.steps}.",
                code="invalidSteps",
                parameter="steps",
            )
        return super()._check(request)

    def _load(self, device: str) -> tuple[Any, int]:
        from diffusers import StableDiffusionUpscalePipeline

        pipeline = StableDiffusionUpscalePipeline.from_pretrained(
            self.source,
            local_files_only=self.offline,
            dtype=self._torch_dtype(),
            # The upscaler ships no safety checker; the server's own safety policy applies.
            safety_checker=None,
            watermarker=None,
        )
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline, weights_bytes(pipeline.unet, pipeline.vae, pipeline.text_encoder)

    def _upscale(self, model: Any, image: Image.Image, request: UpscaleRequest) -> Image.Image:
        import torch

        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.worker.device).manual_seed(request.seed)
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
