"""Loading a diffusers checkpoint and what a call adds to it (ControlNets, a VAE, a refiner,
textual inversions, IP-Adapters), kept in one `Replica` per device.

Everything a replica holds shares the checkpoint's modules: an img2img, inpainting or
ControlNet pipeline is made with `from_pipe` (no weights copied) and cached by what it adds,
and LoRAs are peft adapters inside the shared UNet and text encoder (loras.py). The replica's
size, for the device's memory budget, counts the checkpoint and every extra it has loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from impasto.backends.devices import LOAD_LOCK
from impasto.backends.loras import LoraAdapters
from impasto.backends.registry import ModelEntry
from impasto.backends.speed import SpeedReport, apply_speed_settings
from impasto.protocol.errors import ImpastoError, InvalidParameter

log = logging.getLogger("impasto.backends.diffusers")

# An asset AIR -> (its entry, where its weights are).
AssetLocator = Callable[[str], tuple[ModelEntry, "str | Path"]]


class ModelUnavailable(ImpastoError):
    code = "modelUnavailable"
    http_status = 503


def dtype_for(name: str | None, device: str) -> Any:
    import torch

    # Half precision on a CPU is slow or unsupported: CPUs compute in float32.
    if device == "cpu" or name in (None, "float32", "fp32"):
        return torch.float32
    return {"float16": torch.float16, "fp16": torch.float16}.get(name, torch.bfloat16)


def module_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Replica:
    """A checkpoint on one device, and what calls have added to it."""

    pipeline: Any
    size_bytes: int
    schedulers: dict[str, Any] = field(default_factory=dict)
    # (mode, ControlNet AIRs, VAE AIR) -> a pipeline made with from_pipe.
    variants: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    controlnets: dict[str, Any] = field(default_factory=dict)
    vaes: dict[str, Any] = field(default_factory=dict)
    refiners: dict[str, Any] = field(default_factory=dict)
    # Textual inversions: AIR -> (token, token ids, their original embedding rows).
    embeddings: dict[str, tuple[str, list[int], Any]] = field(default_factory=dict)
    # The per-request IP-Adapters now loaded (their AIRs), if any.
    ip_adapters: tuple[str, ...] = ()
    loras: LoraAdapters = field(default_factory=LoraAdapters)
    extra_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.size_bytes + self.extra_bytes + self.loras.resident_bytes


class ReplicaLoader:
    """Loads checkpoints and their extras for one model entry."""

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        assets: AssetLocator | None,
        *,
        offline: bool,
        compile_cache: Path | None = None,
    ) -> None:
        self.entry = entry
        self.source = source
        self._assets = assets
        self._settings: Mapping[str, Any] = entry.settings
        self._offline = offline
        adapter = self._settings.get("ip_adapter")
        self.ip_adapter: Mapping[str, Any] | None = adapter if isinstance(adapter, dict) else None
        # Where `fetch` downloaded the checkpoint to, once it has.
        self._fetched: Path | None = None
        # torch.compile's artifacts on disk, so a restart compiles from the cache.
        self.compile_cache = compile_cache
        # What the speed options did on the last device loaded.
        self.speed = SpeedReport()

    def _options(self, device: str) -> dict[str, Any]:
        options: dict[str, Any] = {"dtype": dtype_for(self._settings.get("dtype"), device)}
        if self._offline:
            options["local_files_only"] = True
        return options

    def fetch(self) -> None:
        """Download the checkpoint into the Hugging Face cache if it is not there yet. Runs
        off the device thread and outside LOAD_LOCK: a new model's first download does not
        stall the other models on its device. A failure is left to `load`, which reports it."""
        if self._fetched is not None or self._offline or Path(str(self.source)).exists():
            return
        import diffusers

        started = time.monotonic()
        try:
            folder = diffusers.DiffusionPipeline.download(str(self.source), **self._download())
        except (OSError, ValueError) as exc:
            log.warning("downloading %s from %s failed: %s", self.entry.air, self.source, exc)
            return
        self._fetched = Path(folder)
        log.info(
            "weights of %s are in %s (%.1f s)", self.entry.air, folder, time.monotonic() - started
        )

    def _download(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if "variant" in self._settings:
            options["variant"] = self._settings["variant"]
        return options

    def load(self, device: str) -> Replica:
        with LOAD_LOCK:
            return self._load(device)

    def _load(self, device: str) -> Replica:
        import diffusers
        import torch

        options = self._options(device)
        if "variant" in self._settings and device != "cpu":
            options["variant"] = self._settings["variant"]
        class_name = self._settings.get("pipeline_class")
        if class_name:
            loader = getattr(diffusers, class_name)
        elif self.entry.type == "inpainting":
            loader = diffusers.AutoPipelineForInpainting
        else:
            loader = diffusers.AutoPipelineForText2Image
        started = time.monotonic()
        try:
            pipeline = loader.from_pretrained(str(self._fetched or self.source), **options)
        except (OSError, ValueError) as exc:
            log.error("cannot load %s from %s: %s", self.entry.air, self.source, exc)
            raise ModelUnavailable(
                f"Model {self.entry.air} could not be loaded from {self.source}: its weights "
                "are not in the local cache and could not be downloaded. Download them where "
                f"there is internet (huggingface-cli download {self.source}) or set `path` to a "
                "local directory in the models file.",
                parameter="model",
            ) from None
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        if self.ip_adapter is not None:
            self._load_ip_adapter(pipeline)
        # Layout, fused QKV, attention backend, fp8, compile: each fails soft (speed.py).
        self.speed = apply_speed_settings(
            pipeline, self._settings, device, cache_dir=self.compile_cache
        )
        # Counted after the speed options: fused QKV keeps the projections twice.
        size_bytes = sum(
            module_bytes(module)
            for name in pipeline.components
            if isinstance(module := getattr(pipeline, name, None), torch.nn.Module)
        )
        replica = Replica(
            pipeline=pipeline,
            size_bytes=size_bytes,
            loras=LoraAdapters(
                int(self._settings.get("max_loras", 8)), local_files_only=self._offline
            ),
        )
        replica.schedulers["Default"] = pipeline.scheduler
        log.info(
            "loaded %s from %s on %s (%.2f GB) in %.1f s",
            self.entry.air,
            self.source,
            device,
            size_bytes / 1024**3,
            time.monotonic() - started,
        )
        return replica

    def _load_ip_adapter(self, pipeline: Any) -> None:
        adapter = self.ip_adapter or {}
        if not hasattr(pipeline, "load_ip_adapter"):
            raise ModelUnavailable(
                f"Model {self.entry.air} is configured with an IP-Adapter, but its pipeline "
                f"({type(pipeline).__name__}) cannot load one.",
                parameter="model",
            )
        try:
            pipeline.load_ip_adapter(
                str(adapter["path"]),
                subfolder=str(adapter.get("subfolder", "models")),
                weight_name=str(adapter["weight_name"]),
                image_encoder_folder=adapter.get("image_encoder_folder", "image_encoder"),
                local_files_only=self._offline,
            )
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot load the IP-Adapter of %s: %s", self.entry.air, exc)
            raise ModelUnavailable(
                f"The IP-Adapter configured for model {self.entry.air} "
                f"({adapter.get('path')}) could not be loaded.",
                parameter="model",
            ) from None
        pipeline.set_ip_adapter_scale(float(adapter.get("scale", 0.6)))

    # -- extras -------------------------------------------------------------------------------

    def locate(self, air: str, parameter: str, code: str) -> tuple[ModelEntry, str | Path]:
        if self._assets is None:
            raise InvalidParameter(
                f"Model {self.entry.air} cannot use {air} here.", code=code, parameter=parameter
            )
        return self._assets(air)

    def _unavailable(self, air: str, source: str | Path, parameter: str, exc: Exception) -> Any:
        log.error("cannot load %s from %s: %s", air, source, exc)
        return ModelUnavailable(
            f"{air} could not be loaded from {source} for model {self.entry.air}.",
            parameter=parameter,
        )

    def controlnet(self, replica: Replica, air: str, device: str, parameter: str) -> Any:
        with LOAD_LOCK:
            return self._controlnet(replica, air, device, parameter)

    def _controlnet(self, replica: Replica, air: str, device: str, parameter: str) -> Any:
        if air not in replica.controlnets:
            from diffusers import ControlNetModel

            _, source = self.locate(air, parameter, "invalidControlNet")
            options = self._options(device)
            try:
                model = ControlNetModel.from_pretrained(str(source), **options)
            except (OSError, ValueError) as exc:
                raise self._unavailable(air, source, parameter, exc) from None
            model.to(device)
            replica.controlnets[air] = model
            replica.extra_bytes += module_bytes(model)
        return replica.controlnets[air]

    def vae(self, replica: Replica, air: str, device: str) -> Any:
        with LOAD_LOCK:
            return self._vae(replica, air, device)

    def _vae(self, replica: Replica, air: str, device: str) -> Any:
        if air not in replica.vaes:
            from diffusers import AutoencoderKL

            entry, source = self.locate(air, "vae", "invalidVae")
            options = self._options(device)
            subfolder = entry.settings.get("subfolder")
            if subfolder:
                options["subfolder"] = str(subfolder)
            try:
                model = AutoencoderKL.from_pretrained(str(source), **options)
            except (OSError, ValueError) as exc:
                raise self._unavailable(air, source, "vae", exc) from None
            model.to(device)
            replica.vaes[air] = model
            replica.extra_bytes += module_bytes(model)
        return replica.vaes[air]

    def refiner(self, replica: Replica, air: str, device: str) -> Any:
        with LOAD_LOCK:
            return self._refiner(replica, air, device)

    def _refiner(self, replica: Replica, air: str, device: str) -> Any:
        if air not in replica.refiners:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            _, source = self.locate(air, "refiner.model", "invalidRefiner")
            base = replica.pipeline
            shared = {"vae": base.vae}
            if getattr(base, "text_encoder_2", None) is not None:
                shared["text_encoder_2"] = base.text_encoder_2
                shared["tokenizer_2"] = base.tokenizer_2
            try:
                refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                    str(source), **shared, **self._options(device)
                )
            except (OSError, ValueError) as exc:
                raise self._unavailable(air, source, "refiner.model", exc) from None
            refiner.set_progress_bar_config(disable=True)
            refiner.to(device)
            replica.refiners[air] = refiner
            replica.extra_bytes += module_bytes(refiner.unet)
        return replica.refiners[air]

    def embedding(self, replica: Replica, air: str, parameter: str) -> tuple[str, list[int]]:
        """Load a textual inversion once; returns its token and token ids."""
        with LOAD_LOCK:
            return self._embedding(replica, air, parameter)

    def _embedding(self, replica: Replica, air: str, parameter: str) -> tuple[str, list[int]]:
        if air not in replica.embeddings:
            entry, source = self.locate(air, parameter, "invalidEmbeddings")
            token = str(entry.settings.get("token") or f"<{air}>")
            pipeline = replica.pipeline
            weight_name = entry.settings.get("weight_name")
            try:
                pipeline.load_textual_inversion(
                    str(source),
                    token=token,
                    weight_name=str(weight_name) if weight_name else None,
                    local_files_only=self._offline,
                )
            except (OSError, ValueError) as exc:
                raise self._unavailable(air, source, parameter, exc) from None
            tokenizer = pipeline.tokenizer
            ids = [int(i) for i in tokenizer.convert_tokens_to_ids(_token_pieces(tokenizer, token))]
            table = pipeline.text_encoder.get_input_embeddings().weight
            replica.embeddings[air] = (token, ids, table.data[ids].clone())
        token, ids, _ = replica.embeddings[air]
        return token, ids

    def ip_adapters(self, replica: Replica, airs: tuple[str, ...], parameter: str) -> None:
        """Make the pipeline hold exactly the per-request IP-Adapters `airs`."""
        with LOAD_LOCK:
            self._ip_adapters(replica, airs, parameter)

    def _ip_adapters(self, replica: Replica, airs: tuple[str, ...], parameter: str) -> None:
        pipeline = replica.pipeline
        if replica.ip_adapters == airs:
            return
        if replica.ip_adapters:
            pipeline.unload_ip_adapter()
            replica.ip_adapters = ()
            replica.variants.clear()
        if not airs:
            return
        paths, subfolders, weights, encoders = [], [], [], []
        for air in airs:
            entry, source = self.locate(air, parameter, "invalidIpAdapters")
            paths.append(str(source))
            subfolders.append(str(entry.settings.get("subfolder", "models")))
            weights.append(str(entry.settings.get("weight_name", "")))
            encoders.append(entry.settings.get("image_encoder_folder", "image_encoder"))
        try:
            pipeline.load_ip_adapter(
                paths,
                subfolder=subfolders,
                weight_name=weights,
                image_encoder_folder=encoders[0],
                local_files_only=self._offline,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise self._unavailable(", ".join(airs), paths[0], parameter, exc) from None
        replica.ip_adapters = airs
        # Pipelines made before share the UNet, but not the image encoder now registered.
        replica.variants.clear()


def _token_pieces(tokenizer: Any, token: str) -> list[str]:
    """A multi-vector textual inversion registers `token`, `token_1`, ...; all of them."""
    pieces = [token]
    n = 1
    vocab = tokenizer.get_vocab()
    while f"{token}_{n}" in vocab:
        pieces.append(f"{token}_{n}")
        n += 1
    return pieces
