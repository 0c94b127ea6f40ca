"""Whether a model can run here now, and why not: weights present, provider key set, the
packages and device it needs. `impasto models` prints it; nothing here loads a model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from impasto.backends.entries import ModelEntry
from impasto.backends.registry import ModelRegistry


@dataclass(frozen=True)
class Availability:
    ready: bool
    note: str


def availability(
    registry: ModelRegistry,
    air: str,
    *,
    models_dir: Path,
    provider_keys: dict[str, str],
    offline: bool,
) -> Availability:
    """What running `air` needs, judged from the files and settings on this machine."""
    entry = registry.resolve(air).target
    if entry.backend == "runway":
        return _provider(entry, "runway", "runwayml", provider_keys)
    if entry.backend in ("tiny", "diffusers") and importlib.util.find_spec("torch") is None:
        return Availability(False, "needs the local extra (pip install 'impasto[local]')")
    if entry.backend == "tiny":
        built = (models_dir / "impasto-tiny" / "model_index.json").exists()
        return Availability(True, "built in" if built else "built in (made on first use)")
    if entry.backend == "diffusers":
        return _weights(entry.path or "", offline)
    if entry.utility_task is not None:
        return _utility(entry, offline)
    return Availability(True, f"backend {entry.backend}")


def _utility(entry: ModelEntry, offline: bool) -> Availability:
    if entry.backend == "openai-chat":
        url = entry.settings.get("url")
        return Availability(bool(url), f"chat endpoint {url}" if url else "no settings.url")
    if importlib.util.find_spec("torch") is None:
        return Availability(False, "needs the local extra (pip install 'impasto[local]')")
    if entry.settings.get("tiny"):
        return Availability(True, "built in (made on first use)")
    # transformers models have config.json, diffusers pipelines model_index.json.
    marker = "model_index.json" if entry.backend == "sd-upscaler" else "config.json"
    return _weights(entry.path or "", offline, marker)


def _provider(
    entry: ModelEntry, provider: str, package: str, provider_keys: dict[str, str]
) -> Availability:
    if not (entry.settings.get("api_key") or provider_keys.get(provider)):
        return Availability(False, f"no {provider.title()} API key (RUNWAYML_API_SECRET)")
    if importlib.util.find_spec(package) is None:
        return Availability(False, f"needs {package} (pip install 'impasto[{provider}]')")
    return Availability(True, f"{provider.title()} API key set")


def _weights(path: str, offline: bool, marker: str = "model_index.json") -> Availability:
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if (local / marker).exists() or local.is_file():
            return Availability(True, f"weights in {local}")
        return Availability(False, f"no weights at {local}")
    if _in_hub_cache(path, marker):
        return Availability(True, "weights in the Hugging Face cache")
    if offline:
        return Availability(False, f"{path} is not in the Hugging Face cache (offline)")
    return Availability(True, f"downloads {path} on first use")


def _in_hub_cache(repo_id: str, marker: str = "model_index.json") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, marker)
    return isinstance(found, str)


def device_summary(requested: list[str]) -> str:
    """The devices local models would run on (`auto` picks every CUDA device, else the CPU)."""
    if importlib.util.find_spec("torch") is None:
        return "none (torch not installed)"
    from impasto.backends.devices import resolve_devices

    return ", ".join(resolve_devices(requested))
