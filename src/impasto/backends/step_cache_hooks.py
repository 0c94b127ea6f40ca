"""The hook bookkeeping both step caches share: a plain base for the hooks diffusers'
HookRegistry calls, and the set of hooks one `step_cache` installs, which comes off leaving every
module exactly as it was. Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import Any

HOOK_NAME = "impasto_step_cache"


class StepCacheHooks:
    """The hooks one `step_cache` registers, and how to take them off leaving each module as it
    was: no hook, no `_diffusers_hook` registry or instance `forward` that it did not have."""

    def __init__(self, root: Any) -> None:
        self._root = root
        self._added: list[tuple[Any, bool, bool]] = []

    def add(self, module: Any, hook: Any) -> None:
        """Registers `hook` on `module` under our name, noting what the module had before."""
        from diffusers.hooks import HookRegistry

        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in vars(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        self._added.append((module, had_registry, had_forward))

    def done(self) -> None:
        """All hooks are added (call once, before the pipeline runs)."""
        # The pipeline's `cache_context` finds stateful hooks through a cached list of the
        # registries under the denoiser, made before ours existed.
        self._invalidate()

    def remove(self) -> None:
        """Takes every hook off, dropping what each kept."""
        for module, had_registry, had_forward in reversed(self._added):
            registry = module._diffusers_hook
            registry.hooks[HOOK_NAME].reset_state(module)  # drops what the hook kept
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks:
                if not had_forward:
                    vars(module).pop("forward", None)
                if not had_registry:
                    del module._diffusers_hook
        self._added.clear()
        self._invalidate()

    def _invalidate(self) -> None:
        registry = getattr(self._root, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


class PlainHook:
    """What diffusers' HookRegistry calls on a hook (`diffusers.hooks.ModelHook`'s methods), in a
    plain class, so that importing the step caches imports neither torch nor diffusers."""

    _is_stateful = False

    def __init__(self) -> None:
        self.fn_ref: Any = None

    def initialize_hook(self, module: Any) -> Any:
        return module

    def deinitalize_hook(self, module: Any) -> Any:  # sic: diffusers' spelling
        return module

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        return output

    def reset_state(self, module: Any) -> Any:
        return module


def has_step_cache_hooks(denoiser: Any) -> bool:
    """Whether a step cache is installed on the denoiser or any module under it."""
    return any(
        HOOK_NAME in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
        for module in denoiser.modules()
    )
