"""LoraAdapters: the LoRAs resident in one loaded pipeline (one replica on one device).

Each LoRA is loaded into the pipeline once, as a peft adapter named after its AIR, and stays
there; a call's LoRA set is then applied with `set_adapters` (names and weights), which costs
no I/O, so switching between sets already loaded is cheap (bench/lora_switch.py measures it).
An empty set disables the adapters: the LoRA layers then call only their base layers, and the
pipeline's outputs are bit-identical to a pipeline that never saw a LoRA (tests pin this). Past
`max_resident`, the least recently used adapters not wanted by the current call are deleted.

Not thread-safe: the device's worker thread, which runs the pipeline, is its only caller. An
img2img or other pipeline made with `from_pipe` shares the same modules, so the LoRA set
applied here holds for it too.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impasto.backends.devices import LOAD_LOCK
from impasto.protocol.errors import InvalidParameter

log = logging.getLogger("impasto.backends.loras")

# The file name diffusers writes and looks for first.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class LoraLoadError(InvalidParameter):
    """A LoRA could not be loaded into the model: unreadable file, or made for another
    architecture (no matching layers, or layers of other shapes)."""

    code = "invalidLora"

    def __init__(self, air: str, reason: str) -> None:
        super().__init__(f"LoRA {air} could not be loaded: {reason}", parameter="lora")
        self.air = air
        self.reason = reason


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA wanted for a call: its AIR, where its weights are (a directory, a file or a
    Hugging Face id), its weight, and the weights file inside a directory or repository when
    there is more than one."""

    air: str
    source: str | Path
    weight: float = 1.0
    weight_name: str | None = None


def adapter_name(air: str) -> str:
    """A peft adapter name for an AIR: readable, distinct for distinct AIRs (a short hash of
    the AIR itself), without the dots module names cannot hold and without underscores, so
    that it never contains `lora_`, the prefix peft finds its own parameter names by."""
    slug = re.sub(r"[^0-9A-Za-z]+", "-", air).strip("-")[:48]
    digest = hashlib.sha1(air.encode()).hexdigest()[:8]
    return f"air-{slug}-{digest}"


def _weights_location(request: LoraRequest) -> tuple[str, str | None]:
    """(what to pass to load_lora_weights, weight_name) for a request."""
    source = Path(request.source)
    if source.is_file():
        return str(source.parent), source.name
    if not source.is_dir():
        # A Hugging Face id: diffusers finds the file (or uses the one named).
        return str(request.source), request.weight_name
    if request.weight_name is not None:
        if not (source / request.weight_name).is_file():
            log.warning("LoRA %s: %s is not in %s", request.air, request.weight_name, source)
            raise LoraLoadError(request.air, f"its weights file {request.weight_name} is missing")
        return str(source), request.weight_name
    if (source / DEFAULT_WEIGHT_NAME).is_file():
        return str(source), DEFAULT_WEIGHT_NAME
    candidates = sorted(p.name for p in source.glob("*.safetensors"))
    if len(candidates) == 1:
        return str(source), candidates[0]
    log.warning("LoRA %s: %s holds .safetensors files %s", request.air, source, candidates)
    if not candidates:
        raise LoraLoadError(request.air, "it has no .safetensors weights file")
    raise LoraLoadError(
        request.air, f"it has several weights files ({', '.join(candidates)}); set weight_name"
    )


def _normalise(wanted: Sequence[LoraRequest | tuple[str, str | Path, float]]) -> list[LoraRequest]:
    merged: dict[str, LoraRequest] = {}
    for item in wanted:
        request = item if isinstance(item, LoraRequest) else LoraRequest(*item)
        previous = merged.get(request.air)
        if previous is not None:
            # A LoRA's effect is linear in its weight: listing it twice is one at the sum.
            request = LoraRequest(
                request.air, previous.source, previous.weight + request.weight, previous.weight_name
            )
        merged[request.air] = request
    return list(merged.values())


class LoraAdapters:
    """The LoRA adapters resident in one pipeline, loaded once each and switched by name."""

    def __init__(self, max_resident: int = 8, *, local_files_only: bool = False) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.max_resident = max_resident
        self._local_files_only = local_files_only
        # AIR -> parameter bytes, least recently used first.
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._active: tuple[tuple[str, float], ...] = ()
        # Whether the LoRA layers are switched on (enable_lora walks every module: only call
        # it after a disable_lora).
        self._enabled = True
        # Successful loads (from disk or hub) so far, for tests and metrics.
        self.loads = 0

    @property
    def resident(self) -> tuple[str, ...]:
        """AIRs of the adapters in the pipeline, least recently used first."""
        return tuple(self._resident)

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(AIR, weight) of the adapters the pipeline now applies."""
        return self._active

    @property
    def resident_bytes(self) -> int:
        """Parameter bytes of the resident adapters, for the device's memory budget."""
        return sum(self._resident.values())

    def activate(
        self, pipeline: Any, wanted: Sequence[LoraRequest | tuple[str, str | Path, float]]
    ) -> None:
        """Make `pipeline` apply exactly the LoRAs `wanted` (AIR, source, weight), loading the
        ones not resident yet; an empty `wanted` turns LoRA off."""
        requests = _normalise(wanted)
        wanted_airs = {request.air for request in requests}
        for request in requests:
            if request.air not in self._resident:
                self._make_room(pipeline, keep=wanted_airs)
                try:
                    self._load(pipeline, request)
                except LoraLoadError:
                    # What was active before may be half replaced: run the base model until
                    # the next call asks for a set again.
                    self._disable(pipeline)
                    raise
            self._resident.move_to_end(request.air)
        if not requests:
            self._disable(pipeline)
            return
        active = tuple((request.air, float(request.weight)) for request in requests)
        if active == self._active and self._enabled:
            return
        if not self._enabled:
            pipeline.enable_lora()
            self._enabled = True
        pipeline.set_adapters(
            [adapter_name(air) for air, _ in active], adapter_weights=[w for _, w in active]
        )
        self._active = active

    def clear(self, pipeline: Any) -> None:
        """Delete every resident adapter from `pipeline` (before it is unloaded or reused)."""
        if self._resident:
            pipeline.delete_adapters([adapter_name(air) for air in self._resident])
        self._resident.clear()
        self._active = ()

    def _disable(self, pipeline: Any) -> None:
        if self._resident and self._enabled:
            pipeline.disable_lora()
            self._enabled = False
        self._active = ()

    def _make_room(self, pipeline: Any, keep: set[str]) -> None:
        while len(self._resident) >= self.max_resident:
            victim = next((air for air in self._resident if air not in keep), None)
            if victim is None:
                # Every resident adapter is wanted by this call: it holds more than the limit.
                return
            pipeline.delete_adapters([adapter_name(victim)])
            del self._resident[victim]
            log.info("deleted LoRA %s to make room (at most %d)", victim, self.max_resident)

    def _load(self, pipeline: Any, request: LoraRequest) -> None:
        with LOAD_LOCK:
            self._load_unlocked(pipeline, request)

    def _load_unlocked(self, pipeline: Any, request: LoraRequest) -> None:
        import torch
        from safetensors import SafetensorError

        if not hasattr(pipeline, "load_lora_weights"):
            raise LoraLoadError(request.air, f"{type(pipeline).__name__} cannot take LoRAs")
        name = adapter_name(request.air)
        location, weight_name = _weights_location(request)
        options: dict[str, Any] = {"adapter_name": name}
        if weight_name is not None:
            options["weight_name"] = weight_name
        if self._local_files_only:
            options["local_files_only"] = True
        try:
            pipeline.load_lora_weights(location, **options)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            self._discard_partial(pipeline, name)
            log.warning("cannot load LoRA %s from %s: %s", request.air, location, exc)
            raise LoraLoadError(request.air, _reason(exc, SafetensorError)) from None
        loaded_into = [
            component for component, names in pipeline.get_list_adapters().items() if name in names
        ]
        if not loaded_into:
            log.warning("LoRA %s from %s has no layer of this model", request.air, location)
            raise LoraLoadError(request.air, "none of its layers match this model's")
        self._resident[request.air] = _adapter_bytes(pipeline, name)
        self.loads += 1
        log.info(
            "loaded LoRA %s into %s (%d bytes)",
            request.air,
            ", ".join(loaded_into),
            self._resident[request.air],
        )

    @staticmethod
    def _discard_partial(pipeline: Any, name: str) -> None:
        # The UNet may hold the adapter when the text encoder then failed (or the reverse).
        try:
            present = pipeline.get_list_adapters()
        except ValueError:
            return
        if any(name in names for names in present.values()):
            pipeline.delete_adapters([name])


def _reason(exc: BaseException, unreadable: Any) -> str:
    """What went wrong, in words for the client: the library's own message (logged) can name
    server paths."""
    text = str(exc)
    if "size mismatch" in text or "mismatched_sizes" in text:
        return "its layers have other shapes than this model's (a LoRA for another architecture)"
    if "Target modules" in text or "not found in the base model" in text:
        return "its layers are not in this model (a LoRA for another architecture)"
    if isinstance(exc, unreadable) or "Unable to load weights" in text or "header" in text:
        return "its weights file is damaged or in a format that cannot be read"
    if isinstance(exc, OSError):
        return "its weights could not be found or read"
    if "offline mode" in text:
        # diffusers cannot guess a file name in a repository without asking the Hub.
        return "this server is offline and no weight_name is set to find it in the local cache"
    return "its weights are not a LoRA this model can use"


def _adapter_bytes(pipeline: Any, name: str) -> int:
    total = 0
    for component in getattr(pipeline, "_lora_loadable_modules", ("unet", "text_encoder")):
        module = getattr(pipeline, component, None)
        if module is None or not hasattr(module, "named_parameters"):
            continue
        for parameter_name, parameter in module.named_parameters():
            # peft names an adapter's parameters `<layer>.lora_A.<adapter>.weight` and so on.
            if name in parameter_name.split("."):
                total += parameter.numel() * parameter.element_size()
    return total
