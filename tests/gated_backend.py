"""The tiny model behind a gate the test holds: a generation waits at the gate until the test
lets it through, so "a connection dropped while the task is generating" is a fact, not a race.

The server under test loads `GatedTinyBackend` through the models file (the operator's
`backend = "package.module:Class"` hook), for `impasto:tiny@1` itself: rules, sizes and the real
diffusers path stay those of the tiny model.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from impasto.backends.base import CheckpointCallback, GenerationJob, Outcome, ProgressCallback
from impasto.backends.factory import BackendContext, create_backend
from impasto.backends.registry import ModelEntry
from tests.conftest import RunningServer, make_settings, start_server

# A held job gives up waiting after this long, so a failed test cannot hang the server.
MAX_HOLD_S = 60.0

_GATES: dict[str, Gate] = {}


class Gate:
    """Open by default. `hold(passes=n)` lets n generations through, then holds the rest."""

    def __init__(self) -> None:
        self.name = uuid.uuid4().hex
        self._cond = threading.Condition()
        self._open = True
        self._passes = 0
        self._held = 0
        self.entered = 0
        _GATES[self.name] = self

    @contextmanager
    def hold(self, passes: int = 0) -> Iterator[Gate]:
        """Hold generations (after `passes` of them) until `release` or the end of the block."""
        with self._cond:
            self._open = False
            self._passes = passes
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def wait_held(self, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until `count` generations are waiting at the gate."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held >= count, timeout):
                raise AssertionError(f"{self._held} generation(s) held, expected {count}")

    def passage(self) -> None:
        """Called by the backend (in a thread) before each generation."""
        with self._cond:
            self.entered += 1
            if self._open:
                return
            if self._passes > 0:
                self._passes -= 1
                return
            self._held += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open, MAX_HOLD_S)
            self._held -= 1

    def models_file(self, directory: Path) -> Path:
        """A models file that serves impasto:tiny@1 through this gate."""
        return tiny_models_file(directory / f"gated-{self.name}.toml", GatedTinyBackend, self.name)


class WrappedTinyBackend:
    """The tiny diffusers backend with a test's hand on it: the entry's setting `hook_setting`
    names the test object (a Gate, a ProgressHold) in the subclass's `hooks`; everything else
    of the Backend protocol is the tiny backend's own."""

    hooks: ClassVar[Mapping[str, Any]] = {}
    hook_setting: ClassVar[str] = "hook"

    def __init__(self, entry: ModelEntry, context: BackendContext) -> None:
        settings = dict(entry.settings)
        self.hook = self.hooks[str(settings.pop(self.hook_setting))]
        self._inner: Any = create_backend(
            replace(entry, backend="tiny", settings=settings), context
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def tiny_models_file(path: Path, backend: type[WrappedTinyBackend], hook: str) -> Path:
    """A models file that serves impasto:tiny@1 through `backend`, consulting `hook`."""
    path.write_text(
        '[models."impasto:tiny@1"]\n'
        f'backend = "{backend.__module__}:{backend.__qualname__}"\n'
        f'settings = {{ {backend.hook_setting} = "{hook}" }}\n'
    )
    return path


class GatedTinyBackend(WrappedTinyBackend):
    """Each generate() call first passes the gate."""

    hooks = _GATES
    hook_setting = "gate"

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        await asyncio.to_thread(self.hook.passage)
        outcomes: list[Outcome] = await self._inner.generate(jobs, progress, checkpoint)
        return outcomes


@contextmanager
def gated_server(
    root: Path, models_dir: Path, gate: Gate, **overrides: Any
) -> Iterator[RunningServer]:
    """A real impasto server on loopback whose impasto:tiny@1 passes `gate`."""
    server = start_server(
        make_settings(root / "data", models_dir, models=gate.models_file(root), **overrides)
    )
    try:
        yield server
    finally:
        gate.release()
        server.stop()
