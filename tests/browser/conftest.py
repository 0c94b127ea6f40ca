"""Browser tests of the playground at `GET /`: Debian's chromium, driven by Playwright, against a
real server on loopback.

Playwright's own browser download is never used: the tests launch the system chromium
(`apt-get install chromium`; scripts/install does it). Without chromium or playwright they are
skipped, saying why, except under `CI=true`, where a missing browser fails them.

The module's server runs impasto:tiny@1 through `HeldTinyBackend`, which can hold a generation
right after its first progress report, so "a tile shows the progress getResponse reports" is a
fact the test waits on, not a race against a fast model.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from impasto.backends.base import CheckpointCallback, GenerationJob, Outcome, ProgressCallback
from tests.conftest import RunningServer, make_settings, start_server
from tests.gated_backend import WrappedTinyBackend, tiny_models_file

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, WebSocket

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run scripts/install (apt-get install chromium; pip install playwright)"
# A held generation gives up waiting after this long, so a failed test cannot hang the server.
MAX_HOLD_S = 60.0
EXPECT_TIMEOUT_MS = 30_000

_HOLDS: dict[str, ProgressHold] = {}


def chromium_executable() -> str | None:
    """Debian's chromium (Playwright's own browser download is not used)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def expect(target: Any) -> Any:
    """Playwright's `expect`, imported when used: without playwright the module still imports
    and the `browser` fixture says why it skips (or fails)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run); {INSTALL_HINT}")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless chromium per module (module scope: Playwright's sync API keeps an event
    loop in this thread while it runs, which other modules' `asyncio.run` must not meet)."""
    try:
        from playwright.sync_api import expect as playwright_expect
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    # Conditions, not sleeps; generous, for a 2-core machine running other tests at once.
    playwright_expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    executable = chromium_executable()
    if executable is None:
        _missing("chromium is not installed")
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


class ProgressHold:
    """Armed, it holds a generation in its backend thread right after the first progress
    report, until released; disarmed (the default) it lets everything through."""

    def __init__(self) -> None:
        self.name = uuid.uuid4().hex
        self._armed = False
        self.reached = threading.Event()
        self._released = threading.Event()
        _HOLDS[self.name] = self

    @contextmanager
    def holding(self) -> Iterator[ProgressHold]:
        self._armed = True
        self.reached.clear()
        self._released.clear()
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        self._armed = False
        self._released.set()

    def after_report(self) -> None:
        """Called in the backend thread after a progress report went to the scheduler."""
        if self._armed:
            self.reached.set()
            self._released.wait(MAX_HOLD_S)

    def models_file(self, directory: Path) -> Path:
        return tiny_models_file(directory / f"held-{self.name}.toml", HeldTinyBackend, self.name)


class HeldTinyBackend(WrappedTinyBackend):
    """Its progress reports pass a `ProgressHold`."""

    hooks = _HOLDS
    hook_setting = "progress_hold"

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        def held(batch: Sequence[GenerationJob], percent: int) -> None:
            progress(batch, percent)
            self.hook.after_report()

        outcomes: list[Outcome] = await self._inner.generate(jobs, held, checkpoint)
        return outcomes


@pytest.fixture(scope="module")
def progress_hold() -> ProgressHold:
    return ProgressHold()


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, progress_hold: ProgressHold
) -> Iterator[RunningServer]:
    """One open server (no API keys) for the module; each test's page has its own storage."""
    root = tmp_path_factory.mktemp("playground")
    running = start_server(
        make_settings(
            root / "data",
            tiny_models_dir,
            safety_checker="none",
            models=progress_hold.models_file(root),
        )
    )
    yield running
    running.stop()


@dataclass
class Playground:
    """The page under test, with the frames it sent and any console or page errors."""

    page: Page
    sent: list[Any] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def open(self, server: RunningServer) -> None:
        self.page.goto(server.base + "/")

    def testid(self, name: str) -> Any:
        return self.page.get_by_test_id(name)

    def wait_ready(self, model: str = "impasto:tiny@1") -> None:
        expect(self.testid("connection")).to_have_attribute("data-state", "open")
        expect(self.testid("model").locator(f'option[value="{model}"]')).to_have_count(1)
        self.testid("model").select_option(model)

    def choose_size(self, width: int, height: int) -> None:
        """The listed size when the model reports its sizes, else the width/height inputs."""
        size = self.testid("size")
        if size.locator(f'option[value="{width}x{height}"]').count():
            size.select_option(f"{width}x{height}")
        else:
            size.select_option("custom")
            self.testid("width").fill(str(width))
            self.testid("height").fill(str(height))

    def sent_tasks(self, task_type: str) -> list[dict[str, Any]]:
        return [t for frame in self.sent for t in frame if t.get("taskType") == task_type]

    def received_errors(self, task_uuid: str) -> list[dict[str, Any]]:
        return [
            e
            for frame in self.received
            for e in frame.get("errors", [])
            if e.get("taskUUID") == task_uuid
        ]


@pytest.fixture
def playground(browser: Browser) -> Iterator[Playground]:
    """A fresh browser context (its own localStorage) and page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(EXPECT_TIMEOUT_MS)
    state = Playground(page)

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: _record(state.sent, payload))
        ws.on("framereceived", lambda payload: state.received.append(json.loads(payload)))

    page.on("websocket", on_socket)
    page.on("pageerror", lambda exc: state.problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            state.problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error"
            else None
        ),
    )
    yield state
    context.close()


def _record(frames: list[Any], payload: str | bytes) -> None:
    frame = json.loads(payload)
    frames.append(frame if isinstance(frame, list) else [frame])


@pytest.fixture
def keyed_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server that requires the API key `k1`."""
    return server_factory(api_keys=["k1"], safety_checker="none")
