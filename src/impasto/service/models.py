"""modelSearch: the models this server offers, in Runware's model-search result shape."""

from __future__ import annotations

from typing import Any

from impasto.backends.registry import ModelEntry, ModelRegistry
from impasto.protocol.rules import modes_of
from impasto.protocol.tasks import ModelSearchIn


def _result(entry: ModelEntry, registry: ModelRegistry) -> dict[str, Any]:
    width, height = entry.rules.sizes.default
    version = entry.air.rsplit("@", 1)[-1]
    settings = registry.resolve(entry.air).target.settings
    alias = registry.alias_of(entry.air)
    result: dict[str, Any] = {
        "air": entry.air,
        "name": entry.name,
        "version": version,
        "category": entry.category,
        "architecture": entry.architecture,
        "tags": [],
        "heroImage": "",
        "private": False,
        "comment": f"served by {alias}" if alias else "",
        "type": entry.type,
        "defaultWidth": width,
        "defaultHeight": height,
    }
    if "steps" in settings and "steps" in entry.rules.parameters:
        result["defaultSteps"] = int(settings["steps"])
    if "guidance_scale" in settings and "CFGScale" in entry.rules.parameters:
        result["defaultCFG"] = float(settings["guidance_scale"])
    if "scheduler" in entry.rules.parameters:
        result["defaultScheduler"] = "Default"
    # impasto's own: what the model can do (an asset does nothing on its own), and what a
    # request for it may hold (the playground builds its form from these).
    if entry.utility_task is not None:
        # impasto's own: the task type a utility model runs in.
        result["taskType"] = entry.utility_task
    runnable = not (entry.is_asset or entry.type == "refiner")
    result["modes"] = modes_of(entry.rules) if runnable else []
    if runnable:
        rules = entry.rules
        if rules.sizes.allowed is not None:
            result["allowedSizes"] = [
                {"width": w, "height": h} for w, h in sorted(rules.sizes.allowed)
            ]
        else:
            result["minSide"], result["maxSide"] = rules.sizes.min_side, rules.sizes.max_side
        result["parameters"] = sorted(rules.parameters)
        result["maxResults"] = rules.max_results
        result["minReferenceImages"] = rules.min_reference_images
        result["maxReferenceImages"] = rules.max_reference_images
    return result


class ModelSearchService:
    """Filters the registry the way Runware's model search does."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def search(self, task: ModelSearchIn) -> dict[str, Any]:
        entries = self._registry.entries()
        if task.search:
            needle = task.search.lower()
            entries = [e for e in entries if needle in e.air.lower() or needle in e.name.lower()]
        if task.category:
            entries = [e for e in entries if e.category == task.category]
        if task.architecture:
            entries = [e for e in entries if e.architecture == task.architecture]
        if task.type:
            entries = [e for e in entries if e.type == task.type and not e.is_asset]
        if task.visibility == "private":
            entries = []
        page = entries[task.offset : task.offset + task.limit]
        return {
            "taskType": task.taskType,
            "taskUUID": task.taskUUID,
            "totalResults": len(entries),
            "results": [_result(entry, self._registry) for entry in page],
        }
