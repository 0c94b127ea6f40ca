"""Run the official SDK clients that cannot live in the test process (runware-sdk, which imports
as `runware` like the legacy SDK, and @runware/sdk-js on Node) as subprocesses, and check what
they got back: the images themselves, decoded and measured."""

from __future__ import annotations

import base64
import io
import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SDK_DIR = ROOT / "tests" / "sdk"
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
JS_DIR = SDK_DIR / "js"
INSTALL_HINT = "run ./scripts/install (it installs the official SDK clients the tests use)"


NEW_SDK_VERSION = "1.8.0"
JS_SDK_VERSION = "1.3.2"


def new_sdk_command() -> list[str]:
    """The runware-sdk client command; fails (not skips) the test when it is not installed."""
    version = "import importlib.metadata as m, runware.client; print(m.version('runware-sdk'))"
    try:
        probe = subprocess.run(
            [str(SDK_PYTHON), "-c", version], capture_output=True, text=True, timeout=60
        )
    except OSError:
        pytest.fail(f"there is no {SDK_PYTHON}: {INSTALL_HINT}")
    if probe.returncode != 0:
        pytest.fail(f"runware-sdk is not installed in {SDK_PYTHON.parent.parent}: {INSTALL_HINT}")
    if probe.stdout.strip() != NEW_SDK_VERSION:
        pytest.fail(
            f"runware-sdk {probe.stdout.strip()} is installed, the tests pin "
            f"{NEW_SDK_VERSION}: {INSTALL_HINT}"
        )
    return [str(SDK_PYTHON), str(SDK_DIR / "python_new_client.py")]


def js_sdk_command() -> list[str]:
    """The @runware/sdk-js client command; fails (not skips) the test when it is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node (Node.js 20) is not on PATH: install it, then {INSTALL_HINT}")
    package = JS_DIR / "node_modules" / "@runware" / "sdk-js" / "package.json"
    if not package.is_file():
        pytest.fail(f"@runware/sdk-js is not installed in {JS_DIR}/node_modules: {INSTALL_HINT}")
    version = json.loads(package.read_text())["version"]
    if version != JS_SDK_VERSION:
        pytest.fail(
            f"@runware/sdk-js {version} is installed, the tests pin {JS_SDK_VERSION}: "
            f"{INSTALL_HINT}"
        )
    return [node, str(JS_DIR / "client.mjs")]


class ClientProcess:
    """One client run: JSON lines out (events, then a result or an error), lines in."""

    def __init__(self, command: list[str], url: str, scenario: str, args: dict[str, Any]) -> None:
        self.argv = [*command, url, scenario, json.dumps(args)]
        self._process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                self._stderr.append(f"(stdout) {line}")
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._stderr.append(line.rstrip())

    def _explain(self, what: str) -> str:
        tail = "\n".join(self._stderr[-40:])
        return f"{what}\ncommand: {self.argv[:4]}\nevents: {self.events}\nstderr:\n{tail}"

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.kill()
            raise AssertionError(self._explain("the client did not answer in time")) from None
        if line is None:
            self._process.wait(timeout=30)
            raise AssertionError(self._explain(f"the client exited ({self._process.returncode})"))
        if "event" in line:
            self.events.append(line)
        return line

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next event called `name` (earlier events are kept in `events`)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(deadline)
            if line.get("event") == name:
                return line
            if "event" not in line:
                raise AssertionError(self._explain(f"ended before event {name!r}: {line}"))

    def tell(self, line: str = "go") -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(line + "\n")
        self._process.stdin.flush()

    def outcome(self, timeout: float = 120.0) -> dict[str, Any]:
        """The final line: {"result": …} or {"error": …}."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(deadline)
            if "event" not in line:
                self._process.wait(timeout=30)
                return line

    def result(self, timeout: float = 120.0) -> Any:
        line = self.outcome(timeout)
        if "result" not in line:
            raise AssertionError(self._explain(f"the client failed: {line}"))
        return line["result"]

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=30)


def run_client(
    command: list[str], url: str, scenario: str, args: dict[str, Any], timeout: float = 120.0
) -> Any:
    client = ClientProcess(command, url, scenario, args)
    try:
        return client.result(timeout)
    finally:
        client.kill()


def image_of(item: dict[str, Any], output_type: str) -> Image.Image:
    """The image a result item carries, in the form `output_type` asked for."""
    if output_type == "URL":
        response = httpx.get(item["imageURL"], timeout=30)
        response.raise_for_status()
        data = response.content
    elif output_type == "base64Data":
        data = base64.b64decode(item["imageBase64Data"], validate=True)
    else:
        header, _, encoded = item["imageDataURI"].partition(",")
        assert header.startswith("data:image/"), header
        assert header.endswith(";base64"), header
        data = base64.b64decode(encoded, validate=True)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_images(
    items: Iterable[dict[str, Any]], count: int, output_type: str, size: tuple[int, int]
) -> None:
    """`count` distinct images of `size`, each in the requested output field only."""
    items = list(items)
    assert len(items) == count, items
    fields = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}
    uuids = set()
    pixels = set()
    for item in items:
        assert item.get(fields[output_type]), item.keys()
        assert not ({"imageURL", "imageBase64Data", "imageDataURI"} - {fields[output_type]}) & set(
            item
        ), item.keys()
        image = image_of(item, output_type)
        assert image.size == size
        uuids.add(item["imageUUID"])
        pixels.add(image.convert("RGB").tobytes())
    assert len(uuids) == count, "every image has its own imageUUID"
    assert len(pixels) == count, "every image is a different picture (its own seed)"


def png_data_uri(size: tuple[int, int] = (64, 48), color: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
