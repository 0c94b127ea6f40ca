"""A Runway API double: a real HTTP server on loopback that checks every request the way
Runway's published schema (API version 2024-11-06) does, and runs each task as a state machine
that moves one step per poll, so tests are deterministic without clocks.

Endpoints: POST /v1/text_to_image, GET and DELETE /v1/tasks/{id}, and GET /outputs/{id}.png
(the "CDN": public, no key). What it refuses, with Runway's 400 shape
`{"error": ..., "issues": [{"code", "path", "message"}]}`: a missing or other X-Runway-Version,
a missing or wrong Bearer key (401), an unknown model, a ratio outside the enum, promptText
outside 1-1000 UTF-16 code units, more than 3 references (or none for gen4_image_turbo), a bad
tag, a URI that is neither https, runway:// nor data:image (data URIs over 5 MiB refused),
extra properties anywhere. Asset problems (a data URI that is not an image of its declared
type, an https URL with an IP host) get a 400 without issues, as Runway's do.

Tag case: Runway's spec regex is lowercase-only (`^[a-z][a-z0-9_]+$`) while its own examples
use `EiffelTower`; the double accepts both cases (letter first, then letters, digits, `_`)
like impasto does. Set `lowercase_tags = True` to model the strict reading.

Tasks go THROTTLED (script.throttled_polls times) → PENDING → RUNNING 0.25 → RUNNING 0.75 →
SUCCEEDED (or FAILED with script.failure_code, or CANCELLED), one step per GET. While `hold`
is set, a GET answers the current state without advancing. Every request is recorded.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

RUNWAY_VERSION = "2024-11-06"
TEST_KEY = "key_" + "0123456789abcdef" * 8
RATIOS = (
    "1024:1024",
    "1080:1080",
    "1168:880",
    "1360:768",
    "1440:1080",
    "1080:1440",
    "1808:768",
    "1920:1080",
    "1080:1920",
    "2112:912",
    "1280:720",
    "720:1280",
    "720:720",
    "960:720",
    "720:960",
    "1680:720",
)
RATIOS_720P = frozenset(RATIOS[10:])
MODELS = ("gen4_image", "gen4_image_turbo")
BODY_KEYS = frozenset(
    {"model", "promptText", "ratio", "seed", "referenceImages", "contentModeration"}
)
DATA_URI_MAX = 5_242_880
RAW_FAILURE_TEXT = "RAW-RUNWAY-FAILURE-TEXT: do not show users"
_DATA_URI = re.compile(r"^data:(image/[\w.+-]+);base64,(.*)$", re.S)
_IMAGE_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


@dataclass
class Script:
    """How the double behaves for what comes next; a test changes it as it likes."""

    create_status: int | None = None  # answer creates with this status ...
    create_failures: int | None = None  # ... this many times (None: always)
    create_hold: threading.Event | None = None  # hold each create until set
    poll_status: int | None = None  # answer polls with this status ...
    poll_failures: int | None = None  # ... this many times (None: always)
    throttled_polls: int = 0
    failure_code: str | None = None  # tasks end FAILED with this code
    cancelled: bool = False  # tasks end CANCELLED
    credits: int | None = None  # None: by model and ratio
    omit_cost: bool = False
    output_size: tuple[int, int] | None = None  # serve another size than the ratio
    output_format: str = "PNG"
    output_status: int | None = None  # the output URL answers this status
    output_corrupt: bool = False  # the output URL serves bytes that are no image


@dataclass
class Call:
    """One request the double received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class DoubleTask:
    id: str
    model: str
    ratio: str
    seed: int
    body: dict[str, Any]
    states: list[dict[str, Any]]
    output: bytes
    deleted: bool = False


def _issue(code: str, path: list[str | int], message: str) -> dict[str, Any]:
    return {"code": code, "path": path, "message": message}


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class RunwayDouble:
    """The server's state; `url` is the base URL to give the SDK."""

    port: int = 0
    key: str = TEST_KEY
    script: Script = field(default_factory=Script)
    hold: bool = False
    lowercase_tags: bool = False
    calls: list[Call] = field(default_factory=list)
    tasks: dict[str, DoubleTask] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def creates(self) -> list[Call]:
        return [c for c in self.calls if c.method == "POST" and c.path == "/v1/text_to_image"]

    def polls(self, task_id: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == "GET"
            and c.path.startswith("/v1/tasks/")
            and (task_id is None or c.path == f"/v1/tasks/{task_id}")
        ]

    def deletes(self) -> list[Call]:
        return [c for c in self.calls if c.method == "DELETE"]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Block until `predicate()` holds (checked after each request), or fail."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError("the Runway double did not see the expected requests")

    # -- tasks --------------------------------------------------------------------------------

    def add_task(
        self, *, model: str = "gen4_image", ratio: str = "1024:1024", seed: int = 7
    ) -> DoubleTask:
        """A task as if created earlier (e.g. by a process that has since stopped)."""
        body = {"model": model, "promptText": "earlier", "ratio": ratio, "seed": seed}
        return self._new_task(body)

    def _credits(self, model: str, ratio: str) -> int:
        if self.script.credits is not None:
            return self.script.credits
        if model == "gen4_image_turbo":
            return 2
        return 5 if ratio in RATIOS_720P else 8

    def _new_task(self, body: dict[str, Any]) -> DoubleTask:
        task_id = str(uuid.uuid4())
        model, ratio = str(body["model"]), str(body["ratio"])
        seed = int(body.get("seed", 0))
        width, height = self.script.output_size or tuple(int(p) for p in ratio.split(":"))
        color = (seed % 251, (seed // 251) % 251, (seed // 63001) % 251)
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), color).save(buffer, format=self.script.output_format)
        created = "2026-08-01T12:00:00.000Z"
        estimate = {"credits": self._credits(model, ratio)}
        common = {"id": task_id, "createdAt": created}
        states: list[dict[str, Any]] = [
            {**common, "status": "THROTTLED", "estimatedCost": estimate}
        ] * self.script.throttled_polls
        states += [
            {**common, "status": "PENDING", "estimatedCost": estimate},
            {**common, "status": "RUNNING", "progress": 0.25, "estimatedCost": estimate},
            {**common, "status": "RUNNING", "progress": 0.75, "estimatedCost": estimate},
        ]
        if self.script.cancelled:
            terminal: dict[str, Any] = {**common, "status": "CANCELLED", "cost": {"credits": 0}}
        elif self.script.failure_code is not None:
            terminal = {
                **common,
                "status": "FAILED",
                "failure": RAW_FAILURE_TEXT,
                "failureCode": self.script.failure_code,
                "cost": {"credits": 0},
            }
        else:
            extension = "png" if self.script.output_format == "PNG" else "jpg"
            terminal = {
                **common,
                "status": "SUCCEEDED",
                "output": [f"{self.url}/outputs/{task_id}.{extension}?_jwt=signed"],
            }
            if not self.script.omit_cost:
                terminal["cost"] = {"credits": self._credits(model, ratio)}
        task = DoubleTask(task_id, model, ratio, seed, body, [*states, terminal], buffer.getvalue())
        self.tasks[task_id] = task
        return task

    # -- validation ---------------------------------------------------------------------------

    def _tag_ok(self, tag: str) -> bool:
        first = "[a-z]" if self.lowercase_tags else "[A-Za-z]"
        rest = "[a-z0-9_]" if self.lowercase_tags else "[A-Za-z0-9_]"
        return re.fullmatch(f"{first}{rest}+", tag) is not None

    def validate_create(self, body: Any) -> list[dict[str, Any]]:
        """Runway's schema checks of a text_to_image body, as zod-style issues."""
        if not isinstance(body, dict):
            return [_issue("invalid_type", [], "Expected object")]
        model = body.get("model")
        if model not in MODELS:
            return [_issue("invalid_union_discriminator", ["model"], "Invalid model")]
        issues = []
        extra = sorted(set(body) - BODY_KEYS)
        if extra:
            issues.append(_issue("unrecognized_keys", [], f"Unrecognized key(s): {extra}"))
        prompt = body.get("promptText")
        if not isinstance(prompt, str):
            issues.append(_issue("invalid_type", ["promptText"], "Expected string"))
        elif _utf16_units(prompt) < 1:
            issues.append(_issue("too_small", ["promptText"], "Too short"))
        elif _utf16_units(prompt) > 1000:
            issues.append(_issue("too_big", ["promptText"], "Too long"))
        if body.get("ratio") not in RATIOS:
            issues.append(_issue("invalid_enum_value", ["ratio"], "Invalid enum value"))
        if "seed" in body:
            seed = body["seed"]
            if not isinstance(seed, int) or isinstance(seed, bool):
                issues.append(_issue("invalid_type", ["seed"], "Expected integer"))
            elif not 0 <= seed <= 4294967295:
                issues.append(_issue("too_big", ["seed"], "Out of range"))
        issues += self._validate_references(body, model)
        if "contentModeration" in body:
            moderation = body["contentModeration"]
            if not isinstance(moderation, dict):
                issues.append(_issue("invalid_type", ["contentModeration"], "Expected object"))
            else:
                if set(moderation) - {"publicFigureThreshold"}:
                    issues.append(_issue("unrecognized_keys", ["contentModeration"], "Extra"))
                threshold = moderation.get("publicFigureThreshold", "auto")
                if threshold not in ("auto", "low"):
                    path: list[str | int] = ["contentModeration", "publicFigureThreshold"]
                    issues.append(_issue("invalid_enum_value", path, "Invalid enum value"))
        return issues

    def _validate_references(self, body: dict[str, Any], model: str) -> list[dict[str, Any]]:
        if "referenceImages" not in body:
            if model == "gen4_image_turbo":
                return [_issue("invalid_type", ["referenceImages"], "Required")]
            return []
        references = body["referenceImages"]
        if not isinstance(references, list):
            return [_issue("invalid_type", ["referenceImages"], "Expected array")]
        if len(references) > 3:
            return [_issue("too_big", ["referenceImages"], "At most 3")]
        if model == "gen4_image_turbo" and not references:
            return [_issue("too_small", ["referenceImages"], "At least 1")]
        issues = []
        for i, item in enumerate(references):
            if not isinstance(item, dict):
                issues.append(_issue("invalid_type", ["referenceImages", i], "Expected object"))
                continue
            if set(item) - {"uri", "tag"}:
                issues.append(_issue("unrecognized_keys", ["referenceImages", i], "Extra"))
            uri = item.get("uri")
            if not isinstance(uri, str):
                issues.append(_issue("invalid_type", ["referenceImages", i, "uri"], "Required"))
            elif uri.startswith("https://"):
                if not 13 <= len(uri) <= 2048:
                    issues.append(_issue("too_big", ["referenceImages", i, "uri"], "Length"))
            elif uri.startswith("runway://"):
                if not 13 <= len(uri) <= 5000:
                    issues.append(_issue("too_big", ["referenceImages", i, "uri"], "Length"))
            elif uri.startswith("data:image/"):
                if len(uri) > DATA_URI_MAX:
                    issues.append(_issue("too_big", ["referenceImages", i, "uri"], "Over 5MB"))
            else:
                issues.append(_issue("invalid_string", ["referenceImages", i, "uri"], "URI"))
            if "tag" in item:
                tag = item["tag"]
                path: list[str | int] = ["referenceImages", i, "tag"]
                if not isinstance(tag, str):
                    issues.append(_issue("invalid_type", path, "Expected string"))
                elif len(tag) < 3:
                    issues.append(_issue("too_small", path, "At least 3"))
                elif len(tag) > 16:
                    issues.append(_issue("too_big", path, "At most 16"))
                elif not self._tag_ok(tag):
                    issues.append(_issue("invalid_string", path, "Invalid tag"))
        return issues

    def check_assets(self, body: dict[str, Any]) -> str | None:
        """Runway's checks of the images themselves; the error text, or None."""
        for i, item in enumerate(body.get("referenceImages") or []):
            uri = item["uri"]
            if uri.startswith("https://"):
                host = urlsplit(uri).hostname or ""
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    continue
                return f"referenceImages[{i}].uri: the URL host must be a domain name"
            match = _DATA_URI.match(uri)
            if uri.startswith("data:") and match is None:
                return f"Invalid data URI for referenceImages[{i}]"
            if match is None:
                continue
            try:
                data = base64.b64decode(match.group(2), validate=True)
                image = Image.open(io.BytesIO(data))
                image.verify()
            except (binascii.Error, ValueError, OSError):
                return f"Invalid asset in referenceImages[{i}]: not a readable image"
            if _IMAGE_TYPES.get(match.group(1)) != image.format:
                return f"Invalid asset in referenceImages[{i}]: content type does not match"
        return None

    # -- answers ------------------------------------------------------------------------------

    def answer(self, call: Call) -> tuple[int, dict[str, Any] | None, bytes | None]:
        """(status, JSON body, raw body) for one request."""
        if call.method == "GET" and call.path.startswith("/outputs/"):
            task = self.tasks.get(call.path.split("/")[-1].split(".")[0])
            if task is None or task.deleted:
                return 404, None, b"not found"
            if self.script.output_status is not None:
                return self.script.output_status, None, b"unavailable"
            if self.script.output_corrupt:
                return 200, None, b"this is not an image"
            return 200, None, task.output
        if call.headers.get("authorization") != f"Bearer {self.key}":
            return 401, {"error": "Unauthorized: invalid or missing API key."}, None
        if call.headers.get("x-runway-version") != RUNWAY_VERSION:
            return 400, {"error": "Invalid or missing X-Runway-Version header."}, None
        if call.method == "POST" and call.path == "/v1/text_to_image":
            return self._create(call)
        match = re.fullmatch(r"/v1/tasks/([0-9a-f-]+)", call.path)
        if match is None:
            return 404, {"error": "Not found"}, None
        task = self.tasks.get(match.group(1))
        if call.method == "DELETE":
            if task is None or task.deleted:
                return 404, {"error": "The task does not exist, or was deleted or canceled."}, None
            task.deleted = True
            return 204, None, b""
        if call.method != "GET":
            return 405, {"error": "Method not allowed"}, None
        script = self.script
        if script.poll_status is not None and script.poll_failures != 0:
            if script.poll_failures is not None:
                script.poll_failures -= 1
            return script.poll_status, {"error": "Service unavailable"}, None
        if task is None or task.deleted:
            return 404, {"error": "The task does not exist, or was deleted or canceled."}, None
        state = task.states[0]
        if not self.hold and len(task.states) > 1:
            task.states.pop(0)
        return 200, state, None

    def _create(self, call: Call) -> tuple[int, dict[str, Any] | None, bytes | None]:
        script = self.script
        if script.create_status is not None and script.create_failures != 0:
            if script.create_failures is not None:
                script.create_failures -= 1
            messages = {
                401: "Unauthorized",
                429: "You have exceeded your daily generation limit.",
            }
            return script.create_status, {"error": messages.get(script.create_status, "")}, None
        issues = self.validate_create(call.body)
        if issues:
            return 400, {"error": "Validation of body failed", "issues": issues}, None
        asset_error = self.check_assets(call.body)
        if asset_error is not None:
            return 400, {"error": asset_error}, None
        task = self._new_task(call.body)
        estimate = {"credits": self._credits(task.model, task.ratio)}
        return 200, {"id": task.id, "estimatedCost": estimate}, None


@contextmanager
def running_double(**kwargs: Any) -> Iterator[RunwayDouble]:
    """Start a double on a free loopback port; stopped when the block ends."""
    double = RunwayDouble(**kwargs)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            headers = {k.lower(): v for k, v in self.headers.items()}
            call = Call(self.command, self.path.split("?")[0], headers, body)
            with double.changed:
                double.calls.append(call)
            hold = double.script.create_hold
            if hold is not None and call.method == "POST":
                hold.wait(30)
            try:
                with double.lock:
                    status, document, payload = double.answer(call)
            finally:
                with double.changed:
                    double.changed.notify_all()
            data = payload if document is None else json.dumps(document).encode()
            self.send_response(status)
            if document is not None:
                self.send_header("Content-Type", "application/json")
            elif status == 200:
                is_png = (data or b"").startswith(b"\x89PNG")
                self.send_header("Content-Type", "image/png" if is_png else "image/jpeg")
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            if data:
                self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    double.port = httpd.server_address[1]
    # A short poll interval: shutdown() waits for the serving loop to look up.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield double
    finally:
        hold = double.script.create_hold
        if hold is not None:
            hold.set()
        httpd.shutdown()
        httpd.server_close()
