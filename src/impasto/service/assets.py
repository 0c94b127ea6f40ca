"""The models a task uses besides its checkpoint: LoRAs, ControlNets, IP-Adapters, a VAE,
embeddings and a refiner, each named by AIR. Each must be a models-file entry of the right
kind and for the checkpoint's architecture; checked before the task is accepted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from impasto.backends.registry import ModelEntry, ModelRegistry, ResolvedModel
from impasto.protocol.accelerators import accelerator_problems
from impasto.protocol.errors import InvalidParameter
from impasto.protocol.tasks import ImageInferenceIn

T = TypeVar("T")

_KIND_NAMES = {
    "lora": "a LoRA",
    "controlnet": "a ControlNet",
    "ipadapter": "an IP-Adapter",
    "vae": "a VAE",
    "embeddings": "an embedding",
    "checkpoint": "a checkpoint",
}


def check_model_kind(resolved: ResolvedModel) -> None:
    """The task's own model must be a runnable checkpoint."""
    entry = resolved.requested
    if entry.utility_task is not None:
        raise InvalidParameter(
            f"Model {entry.air} is a {entry.category} model, not a checkpoint; run it with a "
            f"{entry.utility_task} task.",
            code="invalidModel",
            parameter="model",
        )
    if entry.is_asset:
        raise InvalidParameter(
            f"Model {entry.air} is {_KIND_NAMES.get(entry.category, entry.category)}, not a "
            f"checkpoint; use it in {_USE[entry.category]} of a task for a checkpoint.",
            code="invalidModel",
            parameter="model",
        )
    if entry.type == "refiner":
        raise InvalidParameter(
            f"Model {entry.air} is a refiner; use it as refiner.model with an SDXL checkpoint.",
            code="invalidModel",
            parameter="model",
        )


_USE = {
    "lora": "lora[].model",
    "controlnet": "controlNet[].model",
    "ipadapter": "ipAdapters[].model",
    "vae": "vae",
    "embeddings": "embeddings[].model",
}


def check_accelerators(task: ImageInferenceIn, resolved: ResolvedModel) -> None:
    """acceleratorOptions: one caching method, a window in order, and a method the model's
    denoiser has (DeepCache for UNets, First Block Cache and TeaCache for transformers)."""
    if task.acceleratorOptions is None:
        return
    for parameter, code, message in accelerator_problems(
        task.acceleratorOptions, resolved.target.architecture
    ):
        raise InvalidParameter(
            f"Invalid value for {parameter} parameter: {message}.", code=code, parameter=parameter
        )


def check_assets(task: ImageInferenceIn, registry: ModelRegistry, resolved: ResolvedModel) -> None:
    """Every asset AIR names an entry of its kind, for the checkpoint's architecture."""
    base = resolved.target
    uses: list[tuple[str, str, str, str]] = []
    uses += [(f"lora[{i}].model", u.model, "lora", "invalidLora") for i, u in _each(task.lora)]
    uses += [
        (f"controlNet[{i}].model", u.model, "controlnet", "invalidControlNet")
        for i, u in _each(task.controlNet)
    ]
    uses += [
        (f"ipAdapters[{i}].model", u.model, "ipadapter", "invalidIpAdapters")
        for i, u in _each(task.ipAdapters)
    ]
    uses += [
        (f"embeddings[{i}].model", u.model, "embeddings", "invalidEmbeddings")
        for i, u in _each(task.embeddings)
    ]
    if task.vae is not None:
        uses.append(("vae", task.vae, "vae", "invalidVae"))
    for parameter, air, kind, code in uses:
        _check(registry.get(air), air, kind, base, parameter, code)
    if task.refiner is not None:
        refiner = registry.get(task.refiner.model)
        if refiner is None or refiner.is_asset:
            _refuse(
                task.refiner.model,
                "is not a refiner on this server"
                if refiner is None
                else f"is {_KIND_NAMES[refiner.category]}, not a refiner",
                "refiner.model",
                "invalidRefiner",
            )
        elif refiner.architecture != base.architecture:
            _refuse(
                refiner.air,
                f"is for {refiner.architecture} and model {task.model} is {base.architecture}",
                "refiner.model",
                "invalidRefiner",
            )
    seen: set[str] = set()
    for i, lora in _each(task.lora):
        if lora.model in seen:
            raise InvalidParameter(
                f"LoRA {lora.model} is given twice; give it once with the weight you want.",
                code="invalidLora",
                parameter=f"lora[{i}].model",
            )
        seen.add(lora.model)


def _each(items: Sequence[T] | None) -> list[tuple[int, T]]:
    return list(enumerate(items or ()))


def _check(
    entry: ModelEntry | None, air: str, kind: str, base: ModelEntry, parameter: str, code: str
) -> None:
    if entry is None:
        _refuse(
            air, "is not available on this server (list them with modelSearch)", parameter, code
        )
        return
    if entry.category != kind:
        _refuse(
            air,
            f"is {_KIND_NAMES.get(entry.category, entry.category)}, not "
            f"{_KIND_NAMES[kind].split(' ', 1)[1]}",
            parameter,
            code,
        )
    if entry.architecture != base.architecture:
        _refuse(
            air,
            f"is for {entry.architecture} models and {base.air} is {base.architecture}",
            parameter,
            code,
        )


def _refuse(air: str, why: str, parameter: str, code: str) -> None:
    raise InvalidParameter(
        f"Invalid value for {parameter} parameter: {air} {why}.", code=code, parameter=parameter
    )
