"""One pipeline call for a batch of compatible jobs, in each image mode.

Modes: text-to-image; img2img (a seed image, or the first reference image of a model without
an IP-Adapter) with `strength`; inpainting (seed image + mask, white = repaint) and
outpainting (the seed image on a larger canvas, the new area masked). Around them: LoRAs,
ControlNets, per-request IP-Adapters, a VAE override, textual inversions, prompt weighting and
clip skip, and the SDXL refiner for the end of the schedule.

Geometry (canvas.py): the seed image is scaled to cover the output size and center-cropped,
the mask with it. After decoding, inpainting and outpainting blend the result back into the
source with the mask, so pixels outside the mask are the seed image's exactly (the VAE alone
would shift them). With `maskMargin` only the masked area and that many pixels around it are
inpainted, at the model's full working size, and pasted back ("inpaint only masked").
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from impasto.backends import canvas
from impasto.backends.base import GenerationJob, ProgressCallback
from impasto.backends.call_modes import IMG2IMG, INPAINT, TEXT2IMG, job_mode
from impasto.backends.diffusers_loading import Replica, ReplicaLoader
from impasto.backends.inpaint_canvas import InpaintCanvas, plan_canvas
from impasto.backends.loras import LoraRequest
from impasto.backends.prompting import PromptSyntaxError, UnsupportedPromptOption, prompt_arguments
from impasto.backends.speed import prepare_call
from impasto.backends.step_caches import StepCacheRun, cache_problem, plan_of, step_cache
from impasto.protocol.errors import InvalidParameter, UnsupportedParameter, code_name

log = logging.getLogger("impasto.backends.diffusers")

DEFAULT_STRENGTH = 0.8
PAD_PROMPT = ""


class CallBuilder:
    """Builds and runs the pipeline call of one batch on one replica."""

    def __init__(
        self,
        loader: ReplicaLoader,
        settings: Mapping[str, Any],
        *,
        max_batch_size: int,
        batch_invariant: bool,
    ) -> None:
        self.loader = loader
        self.air = loader.entry.air
        self._settings = settings
        self._max_batch_size = max_batch_size
        self._batch_invariant = batch_invariant

    def mode(self, job: GenerationJob) -> str:
        return job_mode(
            job,
            inpainting_model=self.loader.entry.type == "inpainting",
            ip_adapter=self.loader.ip_adapter is not None,
        )

    # -- the call ----------------------------------------------------------------------------

    def run(
        self,
        replica: Replica,
        device: str,
        jobs: list[GenerationJob],
        progress: ProgressCallback,
        scheduler: Any,
    ) -> list[Image.Image]:
        import torch

        first = jobs[0]
        mode = self.mode(first)
        base = replica.pipeline
        steps = first.steps or int(self._settings.get("steps", 20))
        guidance = (
            first.cfg_scale
            if first.cfg_scale is not None
            else float(self._settings.get("guidance_scale", 7.0))
        )
        multiple = int(getattr(base, "vae_scale_factor", 8)) * int(
            self._settings.get("size_multiple_factor", 1)
        )
        width, height = (
            canvas.round_up(first.width, multiple),
            canvas.round_up(first.height, multiple),
        )
        replica.loras.activate(base, self._lora_requests(first))
        prompts = [self._with_embeddings(replica, job, job.prompt) for job in jobs]
        negatives = [job.negative_prompt or "" for job in jobs]
        seeds = [job.seed for job in jobs]
        padding = self._max_batch_size - len(jobs) if self._batch_invariant else 0
        if padding > 0:
            seeds += [0] * padding
            prompts += [PAD_PROMPT] * padding
            negatives += [""] * padding
        generator_device = "cpu" if device == "cpu" else device
        controls = [
            (
                control,
                self.loader.controlnet(replica, control.air, device, f"controlNet[{i}].model"),
            )
            for i, control in enumerate(first.controlnets)
        ]
        self.loader.ip_adapters(
            replica, tuple(a.air for a in first.ip_adapters), "ipAdapters[0].model"
        )
        pipeline = self._pipeline(replica, mode, [c for c, _ in controls], device, first)
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": [torch.Generator(device=generator_device).manual_seed(s) for s in seeds],
            "output_type": "pil",
        }
        work = (width, height)
        canvases: list[InpaintCanvas] = []
        if mode == INPAINT:
            # The canvas has the job's own size; the pipeline works on the latent grid and the
            # result is scaled back onto the canvas before blending.
            canvases = [self._canvas(job, job.width, job.height, multiple) for job in jobs]
            work_image = canvases[0].work_image or canvases[0].image
            work = (
                canvas.round_up(work_image.width, multiple),
                canvas.round_up(work_image.height, multiple),
            )
            kwargs["image"] = [c.work_image or c.image for c in canvases]
            kwargs["mask_image"] = [c.work_mask or c.mask for c in canvases]
            kwargs["width"], kwargs["height"] = work
            kwargs["strength"] = first.strength if first.strength is not None else 1.0
            kwargs["num_inference_steps"] = _steps_for_strength(steps, kwargs["strength"])
        elif mode == IMG2IMG:
            strength = first.strength if first.strength is not None else DEFAULT_STRENGTH
            kwargs["strength"] = strength
            kwargs["num_inference_steps"] = _steps_for_strength(steps, strength)
            kwargs["image"] = [canvas.fit_image(_source(job), width, height) for job in jobs]
        else:
            kwargs["width"], kwargs["height"] = width, height
            if first.reference_images and self.loader.ip_adapter is not None:
                kwargs["ip_adapter_image"] = [first.reference_images[0].image.convert("RGB")]
        if padding > 0:
            for name in ("image", "mask_image"):
                if name in kwargs:
                    kwargs[name] += kwargs[name][:1] * padding
        if controls:
            self._control_arguments(kwargs, mode, controls, canvases, work, steps)
        if first.ip_adapters:
            pipeline.set_ip_adapter_scale([a.weight for a in first.ip_adapters])
            kwargs["ip_adapter_image"] = [
                a.images[0].convert("RGB")
                if len(a.images) == 1
                else [i.convert("RGB") for i in a.images]
                for a in first.ip_adapters
            ]
        accepted = inspect.signature(pipeline.__call__).parameters
        any_negative = any(job.negative_prompt for job in jobs)
        if any_negative and "negative_prompt" not in accepted:
            raise UnsupportedParameter(
                f"Model {self.air} does not take a negativePrompt.", parameter="negativePrompt"
            )
        kwargs.update(self._prompts(pipeline, prompts, negatives if any_negative else None, first))

        caching: list[StepCacheRun] = []

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            done = max(1, int(getattr(pipe, "_num_timesteps", 0) or steps))
            progress(jobs, min(99, (step + 1) * 100 // done))
            for cache in caching:
                cache.step_end(step)
            return tensors

        if "callback_on_step_end" in accepted:
            kwargs["callback_on_step_end"] = on_step_end
        pipeline.scheduler = scheduler
        prepare_call(pipeline, self._settings, work[0], work[1], len(seeds))
        with self._step_cache(pipeline, first, kwargs) as cache:
            caching[:] = [cache] if cache is not None else []
            if first.refiner is not None:
                images = self._refined(replica, device, pipeline, kwargs, first, steps, seeds)
            else:
                images = pipeline(**kwargs).images
        results = []
        for index, job in enumerate(jobs):
            image = images[index]
            if canvases:
                image = canvases[index].finish(image)
            results.append(canvas.center_crop(image, job.width, job.height))
        return results

    # -- pieces ------------------------------------------------------------------------------

    def _step_cache(
        self, pipeline: Any, job: GenerationJob, kwargs: Mapping[str, Any]
    ) -> contextlib.AbstractContextManager[StepCacheRun | None]:
        """acceleratorOptions' step cache over this call's denoiser, or nothing. A cache the
        denoiser cannot take (acceptance checks the architecture) is logged and skipped."""
        if job.cache is None:
            return contextlib.nullcontext()
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        # img2img and inpainting denoise int(steps * strength) of their steps.
        steps = int(kwargs["num_inference_steps"] * kwargs.get("strength", 1.0))
        plan = plan_of(job.cache, max(1, steps))
        problem = cache_problem(denoiser, plan) if denoiser is not None else "no denoiser"
        if "callback_on_step_end" not in kwargs:
            problem = "the pipeline reports no steps (no callback_on_step_end)"
        if problem is not None:
            log.warning("%s: running without %s: %s", self.air, job.cache.method, problem)
            return contextlib.nullcontext()
        return step_cache(denoiser, plan, max(1, steps))

    def _lora_requests(self, job: GenerationJob) -> list[LoraRequest]:
        requests = []
        for i, lora in enumerate(job.loras):
            entry, source = self.loader.locate(lora.air, f"lora[{i}].model", "invalidLora")
            weight_name = entry.settings.get("weight_name")
            requests.append(
                LoraRequest(
                    lora.air, source, lora.weight, str(weight_name) if weight_name else None
                )
            )
        return requests

    def _with_embeddings(self, replica: Replica, job: GenerationJob, prompt: str) -> str:
        """Load the job's textual inversions, scale their vectors by their weights, and add
        each token to the prompt unless the prompt or negative prompt already names it."""
        if not replica.embeddings and not job.embeddings:
            return prompt
        table = replica.pipeline.text_encoder.get_input_embeddings().weight
        for _, ids, original in replica.embeddings.values():
            table.data[ids] = original
        for i, use in enumerate(job.embeddings):
            token, ids = self.loader.embedding(replica, use.air, f"embeddings[{i}].model")
            original = replica.embeddings[use.air][2]
            table.data[ids] = original * use.weight
            if token not in prompt and token not in (job.negative_prompt or ""):
                prompt = f"{prompt} {token}"
        return prompt

    def _pipeline(
        self,
        replica: Replica,
        mode: str,
        controls: Sequence[Any],
        device: str,
        job: GenerationJob,
    ) -> Any:
        airs = tuple(c.air for c in controls)
        key = (mode, airs, job.vae)
        base = replica.pipeline
        natural = INPAINT if self.loader.entry.type == "inpainting" else TEXT2IMG
        if key == (natural, (), None):
            return base
        if key not in replica.variants:
            import diffusers

            components: dict[str, Any] = {}
            if airs:
                models = [replica.controlnets[air] for air in airs]
                components["controlnet"] = models[0] if len(models) == 1 else models
            if job.vae is not None:
                components["vae"] = self.loader.vae(replica, job.vae, device)
            auto = {
                TEXT2IMG: diffusers.AutoPipelineForText2Image,
                IMG2IMG: diffusers.AutoPipelineForImage2Image,
                INPAINT: diffusers.AutoPipelineForInpainting,
            }[mode]
            try:
                variant = auto.from_pipe(base, **components)
            except (ValueError, TypeError, AttributeError) as exc:
                log.info("%s cannot do %s with %s: %s", self.air, mode, sorted(components), exc)
                parameter = (
                    "controlNet"
                    if airs
                    else "maskImage"
                    if mode == INPAINT
                    else "seedImage"
                    if job.seed_image is not None
                    else "referenceImages"
                )
                raise UnsupportedParameter(
                    f"Model {self.air} cannot do {parameter} ({type(base).__name__}).",
                    parameter=parameter,
                ) from None
            variant.set_progress_bar_config(disable=True)
            replica.variants[key] = variant
        return replica.variants[key]

    def _canvas(self, job: GenerationJob, width: int, height: int, multiple: int) -> InpaintCanvas:
        return plan_canvas(
            _source(job), job.mask_image, job.outpaint, job.mask_margin, width, height, multiple
        )

    def _control_arguments(
        self,
        kwargs: dict[str, Any],
        mode: str,
        controls: list[tuple[Any, Any]],
        canvases: list[InpaintCanvas],
        work: tuple[int, int],
        steps: int,
    ) -> None:
        images = []
        for control, _ in controls:
            guide = control.image.convert("RGB")
            if canvases and canvases[0].box is not None:
                full = canvas.fit_image(guide, *canvases[0].image.size)
                guide = full.crop(canvases[0].box)
            images.append(canvas.fit_image(guide, *work))
        windows = [control.window(steps) for control, _ in controls]
        single = len(controls) == 1
        kwargs["image" if mode == TEXT2IMG else "control_image"] = images[0] if single else images
        scales = [control.weight for control, _ in controls]
        kwargs["controlnet_conditioning_scale"] = scales[0] if single else scales
        starts = [w[0] for w in windows]
        ends = [w[1] for w in windows]
        kwargs["control_guidance_start"] = starts[0] if single else starts
        kwargs["control_guidance_end"] = ends[0] if single else ends
        # A1111's "ControlNet is more important" is diffusers' guess mode.
        kwargs["guess_mode"] = any(control.mode == "controlnet" for control, _ in controls)

    def _prompts(
        self,
        pipeline: Any,
        prompts: list[str],
        negatives: list[str] | None,
        job: GenerationJob,
    ) -> dict[str, Any]:
        if job.prompt_weighting is None and not job.clip_skip:
            arguments: dict[str, Any] = {"prompt": prompts}
            if negatives is not None:
                arguments["negative_prompt"] = negatives
            return arguments
        try:
            return prompt_arguments(
                pipeline,
                prompts,
                negatives,
                weighting=job.prompt_weighting,
                clip_skip=job.clip_skip,
            )
        except PromptSyntaxError as exc:
            raise InvalidParameter(
                f"Invalid value for {exc.parameter} parameter: {exc}",
                code=f"invalid{code_name(exc.parameter)}",
                parameter=exc.parameter,
            ) from None
        except UnsupportedPromptOption as exc:
            raise UnsupportedParameter(
                f"Model {self.air} does not support {exc.parameter}: {exc}",
                parameter=exc.parameter,
            ) from None

    def _refined(
        self,
        replica: Replica,
        device: str,
        pipeline: Any,
        kwargs: dict[str, Any],
        job: GenerationJob,
        steps: int,
        seeds: list[int],
    ) -> list[Image.Image]:
        """The base denoises to the refiner's start in latents; the refiner finishes."""
        import torch

        assert job.refiner is not None
        refiner = self.loader.refiner(replica, job.refiner.air, device)
        start = job.refiner.start(steps)
        latents = pipeline(**{**kwargs, "output_type": "latent", "denoising_end": start}).images
        generator_device = "cpu" if device == "cpu" else device
        refine_kwargs: dict[str, Any] = {
            "image": latents,
            "num_inference_steps": steps,
            "denoising_start": start,
            "guidance_scale": kwargs["guidance_scale"],
            "generator": [torch.Generator(device=generator_device).manual_seed(s) for s in seeds],
            "output_type": "pil",
        }
        for name in ("prompt", "negative_prompt"):
            if name in kwargs:
                refine_kwargs[name] = kwargs[name]
        if "prompt" not in refine_kwargs:
            refine_kwargs["prompt"] = [job.prompt] * len(seeds)
        return list(refiner(**refine_kwargs).images)


def _source(job: GenerationJob) -> Image.Image:
    if job.seed_image is not None:
        return job.seed_image
    return job.reference_images[0].image


def _steps_for_strength(steps: int, strength: float) -> int:
    # img2img and inpainting run int(steps * strength) steps; keep at least one.
    return min(1000, max(steps, math.ceil(1 / max(strength, 1e-3))))
