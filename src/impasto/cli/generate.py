"""`impasto generate "prompt"`: make images and save them, with a progress bar per image.

With no `--url` it runs in this process on the embedded defaults (SQLite, local files, the
models file and data directory of `impasto serve`): no server needed. With `--url` it sends
the same task to a running server. Either way the task goes through the dispatcher as an async
`imageInference`, and `getResponse` polls feed the bars (their `progress` comes from the
diffusers step callback). Any failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer

from impasto.cli.task_clients import ClientError, TaskClient, in_process, remote
from impasto.settings import Settings

FORMATS = ("png", "jpg", "webp")


class GenerateError(Exception):
    """What stops a generation, as the one line the user sees."""


@dataclass(frozen=True)
class Saved:
    index: int
    path: Path
    seed: int | None
    cost: float | None


@dataclass
class Outcome:
    saved: list[Saved] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class GenerationView(Protocol):
    """What the generation loop reports, image by image (a rich display, or a test's fake)."""

    def progress(self, index: int, percent: int) -> None: ...

    def saved(self, saved: Saved) -> None: ...

    def failed(self, index: int, message: str) -> None: ...


def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise GenerateError(f"--size must look like 1024x768, not {size!r}")
    return int(width), int(height)


def reference_uri(path: Path) -> str:
    """A reference image file as a data URI (the server checks and stores it at acceptance)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GenerateError(f"cannot read reference image {path}: {exc.strerror}") from None
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def build_task(
    prompt: str,
    *,
    model: str,
    size: tuple[int, int] | None,
    number: int,
    output_format: str,
    seed: int | None,
    steps: int | None,
    negative: str | None,
    references: list[Path],
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": model,
        "positivePrompt": prompt,
        "numberResults": number,
        "outputFormat": output_format.upper().replace("JPEG", "JPG"),
        "outputType": "base64Data",
        "deliveryMethod": "async",
        "includeCost": True,
    }
    if size is not None:
        task["width"], task["height"] = size
    if seed is not None:
        task["seed"] = seed
    if steps is not None:
        task["steps"] = steps
    if negative:
        task["negativePrompt"] = negative
    if references:
        task["referenceImages"] = [reference_uri(path) for path in references]
    return task


def error_line(error: dict[str, Any]) -> str:
    line = f"{error.get('code', 'error')}: {error.get('message', 'failed')}"
    if error.get("parameter"):
        line += f" (parameter: {error['parameter']})"
    return line


async def run_generation(
    client: TaskClient,
    task: dict[str, Any],
    out: Path,
    view: GenerationView,
    *,
    poll_s: float = 0.25,
    timeout_s: float = 3600.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Outcome:
    """Submit `task`, follow it with getResponse until every image is saved or has failed."""
    reply = await client.send([task])
    if reply.get("errors"):
        raise GenerateError(error_line(reply["errors"][0]))
    expected = int(task["numberResults"])
    outcome = Outcome()
    settled: set[int] = set()
    poll = [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]
    deadline = clock() + timeout_s
    while len(settled) < expected:
        if clock() > deadline:
            raise GenerateError(f"gave up after {timeout_s:.0f} s; the task may still finish")
        reply = await client.send(poll)
        if reply.get("errors"):
            raise GenerateError(error_line(reply["errors"][0]))
        # getResponse answers one item per image, in order.
        for index, item in enumerate(reply.get("data", [])[:expected]):
            if index in settled:
                continue
            status = item.get("status")
            if status == "success":
                saved = save_image(item, index, task, out)
                outcome.saved.append(saved)
                view.saved(saved)
                settled.add(index)
            elif status == "error":
                message = error_line(item.get("error") or item)
                outcome.errors.append(message)
                view.failed(index, message)
                settled.add(index)
            else:
                view.progress(index, int(item.get("progress") or 0))
        if len(settled) < expected:
            await sleep(poll_s)
    outcome.saved.sort(key=lambda s: s.index)
    return outcome


def save_image(item: dict[str, Any], index: int, task: dict[str, Any], out: Path) -> Saved:
    data = base64.b64decode(item["imageBase64Data"])
    ext = task["outputFormat"].lower()
    seed = item.get("seed")
    path = out / f"{task['taskUUID'][:8]}-{index + 1}-{seed}.{ext}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise GenerateError(f"cannot write {path}: {exc.strerror}") from None
    return Saved(index, path, seed, item.get("cost"))


class RichView:
    """One progress bar per image (on stderr); a line per saved image with its seed and cost
    (on stdout, for scripts; above the bars in a terminal)."""

    def __init__(self, number: int, model: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[state]}"),
            console=self._console,
        )
        self._bars = [
            self._progress.add_task(f"image {i + 1}/{number}", total=100, state=model)
            for i in range(number)
        ]

        self._started = False

    def __enter__(self) -> RichView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def _start(self) -> None:
        # Once the task is accepted: a refused one is just its error line.
        if not self._started:
            self._started = True
            self._progress.start()

    def progress(self, index: int, percent: int) -> None:
        self._start()
        self._progress.update(self._bars[index], completed=percent, state="generating")

    def saved(self, saved: Saved) -> None:
        self._start()
        self._progress.update(self._bars[saved.index], completed=100, state="saved")
        cost = "" if saved.cost is None else f"  cost {saved.cost}"
        line = f"{saved.path}  seed {saved.seed}{cost}"
        if sys.stdout.isatty():
            self._console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def failed(self, index: int, message: str) -> None:
        self._start()
        self._progress.update(self._bars[index], state=f"failed: {message}")


def generate(
    prompt: Annotated[str, typer.Argument(help="what the image shows")],
    model: Annotated[str, typer.Option(help="the model's AIR id")] = "impasto:tiny@1",
    size: Annotated[
        str | None, typer.Option(help="WxH, e.g. 1024x768 (default: the model's)")
    ] = None,
    number: Annotated[int, typer.Option("-n", "--number", min=1, max=20, help="images")] = 1,
    output_format: Annotated[str, typer.Option("--format", help="png | jpg | webp")] = "png",
    seed: Annotated[int | None, typer.Option(help="seed of the first image (then +1)")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps")] = None,
    negative: Annotated[str | None, typer.Option(help="negative prompt")] = None,
    out: Annotated[Path, typer.Option(help="where images are saved")] = Path("out"),
    ref: Annotated[
        list[Path] | None, typer.Option("--ref", help="reference image file (repeatable)")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="a running server (else: in this process)")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="IMPASTO_API_KEY")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for all images")] = 3600.0,
) -> None:
    """Generate images and save them: in this process, or on a server with --url."""
    try:
        if output_format.lower() not in (*FORMATS, "jpeg"):
            raise GenerateError(f"--format must be one of {', '.join(FORMATS)}")
        task = build_task(
            prompt,
            model=model,
            size=parse_size(size) if size else None,
            number=number,
            output_format=output_format,
            seed=seed,
            steps=steps,
            negative=negative,
            references=ref or [],
        )
        outcome = asyncio.run(_generate(task, out, url, api_key, timeout))
    except (GenerateError, ClientError) as exc:
        typer.echo(f"impasto generate: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("impasto generate: interrupted", err=True)
        raise typer.Exit(130) from None
    for message in outcome.errors:
        typer.echo(f"impasto generate: {message}", err=True)
    if outcome.errors:
        raise typer.Exit(1)


async def _generate(
    task: dict[str, Any], out: Path, url: str | None, api_key: str | None, timeout_s: float
) -> Outcome:
    view = RichView(int(task["numberResults"]), task["model"])
    if url is not None:
        async with remote(url, api_key, timeout_s=60.0) as client:
            with view:
                return await run_generation(client, task, out, view, timeout_s=timeout_s)
    _quiet_logging()
    settings = Settings()
    try:
        context = in_process(settings)
        client = await context.__aenter__()
    except Exception as exc:
        raise GenerateError(f"cannot start on {settings.data_dir}: {exc}") from None
    try:
        with view:
            return await run_generation(client, task, out, view, timeout_s=timeout_s)
    finally:
        await context.__aexit__(None, None, None)


def _quiet_logging() -> None:
    """Errors only, and no library progress bars: the bars per image are the output."""
    import os

    from impasto.logcontext import configure_logging

    configure_logging("ERROR")
    for name, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(name, value)
