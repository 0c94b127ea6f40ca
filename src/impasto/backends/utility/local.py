"""What every utility model that runs in this process shares (the upscalers, the background
remover, the captioner and the local prompt enhancer): loading on the first request, on the
device's worker thread under LOAD_LOCK; the device's memory budget; unloading on close or
eviction; and one translation of failures into ImpastoErrors. A subclass checks its requests,
loads its model and runs it.

torch is imported inside the functions that need it: importing this module does not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from impasto.backends.devices import LOAD_LOCK, DeviceWorker
from impasto.backends.diffusers_loading import ModelUnavailable
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import UtilityOutput, UtilityRequest
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter

log = logging.getLogger("impasto.backends.utility")

DTYPES = ("float32", "float16", "bfloat16")
# Other spellings of DTYPES a models file may use.
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

RequestT = TypeVar("RequestT")
ModelT = TypeVar("ModelT")


class LocalUtilityModel(Generic[RequestT, ModelT]):
    """A utility model loaded from `source` (a hub id or a directory) onto its worker's
    device on its first request, kept within the device's memory budget and unloaded on
    close. Subclasses implement `_check` (the request it takes), `_load` and `_infer`, and
    read their own settings in `_configure`.

    The `dtype` setting (float32, float16 or bfloat16; half precision applies on CUDA
    only, a CPU computes in float32) is read here for every subclass.
    """

    # The model's key in the device's model cache: this prefix and the entry's AIR.
    key_prefix: ClassVar[str] = ""
    # What `_infer` does, for its failure messages ("failed to upscale the image").
    action: ClassVar[str] = "run"
    # The setting that lowers its peak memory, named when it runs out of GPU memory.
    memory_setting: ClassVar[str | None] = None
    # What `_load` raises for a source that does not hold a loadable model (a missing package
    # and running out of GPU memory are load failures too, always).
    load_errors: ClassVar[tuple[type[Exception], ...]] = (OSError, ValueError, KeyError)
    # What `_infer` raises when the model fails (CUDA running out of memory is a RuntimeError).
    inference_errors: ClassVar[tuple[type[Exception], ...]] = (
        RuntimeError,
        ValueError,
        TypeError,
        IndexError,
    )

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        *,
        offline: bool = False,
    ) -> None:
        self.entry = entry
        self.source = source
        self.worker = worker
        self.offline = offline
        self._configure(entry.settings)
        self._dtype_name = dtype_setting(entry)
        self._key = f"{self.key_prefix}{entry.air}"
        # The loaded model and its size in bytes; None until the first request.
        self._loaded: ModelT | None = None
        self._size_bytes = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.entry.air!r}, {str(self.source)!r}, "
            f"{self.worker.device!r})"
        )

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        checked = self._check(request)
        return await self.worker.run(self._run_on_device, checked)

    async def close(self) -> None:
        await self.worker.run(self._close_on_device)

    # -- for subclasses ---------------------------------------------------------------------

    def _configure(self, settings: Mapping[str, Any]) -> None:
        """Read the entry's own settings; raises ValueError naming a bad one."""

    def _check(self, request: UtilityRequest) -> RequestT:
        """`request` if this model takes it; raises (InvalidParameter, TypeError) if not."""
        raise NotImplementedError

    def _load(self, device: str) -> tuple[ModelT, int]:
        """Load the model onto `device` (LOAD_LOCK is held); returns it and its size in
        bytes."""
        raise NotImplementedError

    def _infer(self, model: ModelT, request: RequestT) -> UtilityOutput:
        """Answer `request` with the loaded model, on the worker thread."""
        raise NotImplementedError

    def _doing(self, request: RequestT) -> str:
        """What `_infer` was doing, for the out-of-memory message."""
        return self.action

    def _torch_dtype(self) -> Any:
        """The torch dtype of the `dtype` setting on this model's device."""
        return torch_dtype(self._dtype_name, self.worker.device)

    # -- on the worker thread ---------------------------------------------------------------

    def _ensure_loaded(self) -> ModelT:
        """The model, loaded if it is not, and marked most recent in the device's budget."""
        loaded = self._loaded
        if loaded is None:
            with LOAD_LOCK:
                loaded, self._size_bytes = self._load_translated()
            self._loaded = loaded
            log.info("loaded %s from %s on %s", self.entry.air, self.source, self.worker.device)
        # Every use marks the model most recent, so the budget evicts others first.
        self.worker.models.use(self._key, self._size_bytes, self._unload)
        return loaded

    def _load_translated(self) -> tuple[ModelT, int]:
        try:
            return self._load(self.worker.device)
        except ImpastoError:
            raise
        except Exception as exc:
            if not isinstance(exc, (ImportError, *self.load_errors)) and not _out_of_memory(exc):
                raise
            log.error("cannot load %s from %s: %s", self.entry.air, self.source, exc)
            # Hand back the cache of what the failed load allocated and freed.
            release_memory(self.worker.device)
            raise ModelUnavailable(self._load_failure(exc), parameter="model") from None

    def _load_failure(self, exc: Exception) -> str:
        if isinstance(exc, ImportError):
            # transformers names the packages a model's own code imports and lacks.
            return f"Model {self.entry.air} needs packages that are not installed: {exc}"
        if _out_of_memory(exc):
            return (
                f"Model {self.entry.air} does not fit in the memory left on {self.worker.device}."
            )
        if Path(str(self.source)).exists():
            return (
                f"Model {self.entry.air} could not be loaded from {self.source}: the directory "
                "does not hold a model of this kind."
            )
        return (
            f"Model {self.entry.air} could not be loaded from {self.source}: its weights are "
            "not in the local cache and could not be downloaded. Download them where there is "
            f"internet (huggingface-cli download {self.source}) or set `path` to a local "
            "directory in the models file."
        )

    def _run_on_device(self, request: RequestT) -> UtilityOutput:
        model = self._ensure_loaded()
        try:
            return self._infer(model, request)
        except ImpastoError:
            raise
        except self.inference_errors as exc:
            release_memory(self.worker.device)
            if _out_of_memory(exc):
                log.warning("%s ran out of GPU memory: %s", self.entry.air, exc)
                hint = f"; lower its `{self.memory_setting}` setting" if self.memory_setting else ""
                raise InferenceError(
                    f"Model {self.entry.air} ran out of GPU memory to {self._doing(request)}{hint}."
                ) from None
            log.exception("%s failed to %s", self.entry.air, self.action)
            raise InferenceError(f"Model {self.entry.air} failed to {self.action}.") from exc

    def _close_on_device(self) -> None:
        self.worker.models.forget(self._key)
        self._unload()

    def _unload(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            release_memory(self.worker.device)


# -- helpers --------------------------------------------------------------------------------


def _out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (a RuntimeError), named so as not to import torch here.
    return type(exc).__name__ == "OutOfMemoryError"


def other_task(air: str, what: str, task: str) -> InvalidParameter:
    """The error for a request of another task than the model serves."""
    return InvalidParameter(
        f"Model {air} is {what}; it only serves {task} tasks.",
        code="invalidModel",
        parameter="model",
    )


def check_dtype(settings: Mapping[str, Any]) -> list[str]:
    """What is wrong with a `dtype` setting (empty: nothing)."""
    dtype = settings.get("dtype")
    if dtype is not None and _DTYPE_ALIASES.get(dtype, dtype) not in DTYPES:
        return [f"settings.dtype must be one of {', '.join(DTYPES)}"]
    return []


def dtype_setting(entry: ModelEntry) -> str:
    """An entry's `dtype` setting, one of DTYPES (default float32); ValueError if it is not
    one."""
    problems = check_dtype(entry.settings)
    if problems:
        raise ValueError(f"model {entry.air}: {problems[0]}")
    dtype = entry.settings.get("dtype") or "float32"
    return _DTYPE_ALIASES.get(dtype, dtype)


def torch_dtype(name: str | None, device: str) -> Any:
    """The torch dtype for a `dtype` setting on `device`."""
    import torch

    # Half precision on a CPU is slow or unsupported: CPUs compute in float32.
    if not device.startswith("cuda") or name in (None, "float32"):
        return torch.float32
    return torch.float16 if name == "float16" else torch.bfloat16


def weights_bytes(*modules: Any) -> int:
    """The memory the modules' parameters and buffers take, for the device's budget (None
    for a module is skipped)."""
    tensors = [
        tensor
        for module in modules
        if module is not None
        for tensor in (*module.parameters(), *module.buffers())
    ]
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors)


def to_device(inputs: Mapping[str, Any], device: str, dtype: Any) -> dict[str, Any]:
    """Move a processor's tensors to `device`; floating ones (pixels) take the model's dtype."""
    moved: dict[str, Any] = {}
    for name, value in inputs.items():
        if hasattr(value, "to") and hasattr(value, "is_floating_point"):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[name] = value
    return moved


def release_memory(device: str) -> None:
    """Hand the CUDA caching allocator's free blocks back to the device."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
