"""Command line: `impasto serve | run | models`."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from impasto.settings import Settings

app = typer.Typer(add_completion=False, help="impasto: a self-hosted Runware-compatible server.")
console = Console()


def _configure_logging(level: str, fmt: str = "text") -> None:
    from impasto.logcontext import configure_logging

    configure_logging(level, fmt)


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [IMPASTO_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [IMPASTO_PORT]")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="state, images and models [IMPASTO_DATA_DIR]")
    ] = None,
    models: Annotated[Path | None, typer.Option(help="models file, TOML [IMPASTO_MODELS]")] = None,
    public_url: Annotated[
        str | None, typer.Option(help="base URL of image links [IMPASTO_PUBLIC_URL]")
    ] = None,
    state: Annotated[
        str | None, typer.Option(help="redis://… for a stateless API node [IMPASTO_STATE]")
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="s3://bucket/prefix shared images [IMPASTO_STORAGE]")
    ] = None,
) -> None:
    """Run the server (REST and WebSocket on /v1) until interrupted."""
    import uvicorn

    from impasto.api.app import create_app

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        models=models,
        public_url=public_url,
        state=state,
        storage=storage,
    )
    _configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=settings.max_body_bytes,
    )


def _load_tasks(path: Path, new_uuids: bool) -> list[dict[str, Any]]:
    document = json.loads(path.read_text())
    entries = document if isinstance(document, list) else [document]
    tasks: list[dict[str, Any]] = []
    for entry in entries:
        # The examples file keeps each task under "request", beside its expected response.
        is_example = "request" in entry and "taskType" not in entry
        task = dict(entry["request"]) if is_example else dict(entry)
        if new_uuids or "taskUUID" not in task:
            task["taskUUID"] = str(uuid.uuid4())
        tasks.append(task)
    return tasks


def _save_item(client: httpx.Client, item: dict[str, Any], out: Path) -> Path | None:
    if "imageUUID" not in item:
        return None
    name = f"{item.get('taskUUID', 'task')}-{item['imageUUID']}"
    if "imageURL" in item:
        response = client.get(item["imageURL"])
        response.raise_for_status()
        ext = item["imageURL"].rsplit(".", 1)[-1].split("?")[0]
        data = response.content
    elif "imageBase64Data" in item:
        data = base64.b64decode(item["imageBase64Data"])
        ext = "png" if data[:4] == b"\x89PNG" else "webp" if data[8:12] == b"WEBP" else "jpg"
    elif "imageDataURI" in item:
        header, _, payload = item["imageDataURI"].partition(",")
        ext = header.split("/")[1].split(";")[0].replace("jpeg", "jpg")
        data = base64.b64decode(payload)
    else:
        return None
    path = out / f"{name}.{ext}"
    path.write_bytes(data)
    return path


@app.command()
def worker(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="AIR to serve (repeat) [IMPASTO_WORKER_MODELS]"),
    ] = None,
    state: Annotated[
        str | None, typer.Option(help="redis://… shared state [IMPASTO_STATE]")
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="s3://bucket/prefix shared images [IMPASTO_STORAGE]")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="models cache [IMPASTO_DATA_DIR]")] = None,
    models: Annotated[Path | None, typer.Option(help="models file, TOML [IMPASTO_MODELS]")] = None,
) -> None:
    """Run generation jobs from the shared queue (with `serve --state redis://…` API nodes)."""
    import asyncio
    import contextlib
    import signal

    from impasto.service.runtime import Runtime

    settings = _settings(
        worker_models=model or None, state=state, storage=storage, data_dir=data_dir, models=models
    )
    _configure_logging(settings.log_level, settings.log_format)
    if not settings.distributed:
        console.print("[red]impasto worker needs shared state: --state redis://host:6379/0[/]")
        raise typer.Exit(2)
    if not settings.worker_models:
        console.print("[red]name the models this worker serves: --model AIR (repeatable)[/]")
        raise typer.Exit(2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Runtime.start(settings, role="worker") as runtime:
            assert runtime.worker is not None
            # Supervised: a worker loop that crashes is started again (and /healthz says so
            # meanwhile); the runtime's teardown stops it.
            runtime.supervisor.start("worker", runtime.worker.run)
            tasks: list[asyncio.Task[None]] = []
            http = None
            if settings.worker_port:
                import uvicorn

                from impasto.api.worker_app import create_worker_app

                http = uvicorn.Server(
                    uvicorn.Config(
                        create_worker_app(runtime),
                        host=settings.host,
                        port=settings.worker_port,
                        lifespan="off",
                        log_level="warning",
                    )
                )
                # This process's own handlers stop the worker and then the endpoint.
                http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
                tasks.append(asyncio.create_task(http.serve()))
            await stop.wait()
            if http is not None:
                http.should_exit = True
            await runtime.supervisor.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


@app.command()
def run(
    tasks_file: Annotated[Path, typer.Argument(help="JSON task array (or the examples file)")],
    url: Annotated[str, typer.Option(help="the server's /v1 endpoint")] = (
        "http://127.0.0.1:8080/v1"
    ),
    out: Annotated[Path, typer.Option(help="where images are saved")] = Path("out"),
    api_key: Annotated[str | None, typer.Option(envvar="IMPASTO_API_KEY")] = None,
    new_uuids: Annotated[
        bool, typer.Option("--new-uuids", help="give every task a fresh taskUUID")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the reply")] = 600.0,
) -> None:
    """Post a task file to a running server and save the images it returns."""
    tasks = _load_tasks(tasks_file, new_uuids)
    out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, headers=headers) as client:
        with console.status(f"running {len(tasks)} task(s) on {url}"):
            response = client.post(url, json=tasks)
        try:
            body = response.json()
        except ValueError:
            console.print(f"[red]server answered HTTP {response.status_code} without JSON[/]")
            raise typer.Exit(1) from None
        table = Table("taskUUID", "imageUUID", "seed", "cost", "saved to")
        for item in body.get("data", []):
            saved = _save_item(client, item, out)
            table.add_row(
                item.get("taskUUID", ""),
                item.get("imageUUID", ""),
                str(item.get("seed", "")),
                str(item.get("cost", "")),
                str(saved or ""),
            )
        console.print(table)
    errors = body.get("errors", [])
    for error in errors:
        console.print(
            f"[red]{error.get('taskUUID', '-')}: {error.get('code')}: {error.get('message')}"
            f" (parameter: {error.get('parameter', '-')})[/]"
        )
    if errors:
        raise typer.Exit(1)


@app.command()
def models(
    models_file: Annotated[
        Path | None, typer.Option("--models", help="models file [IMPASTO_MODELS]")
    ] = None,
) -> None:
    """List the models this server would offer."""
    from impasto.backends.registry import ModelRegistry

    settings = _settings(models=models_file)
    registry = ModelRegistry.load(settings.models)
    from impasto.protocol.rules import modes_of

    table = Table("AIR", "name", "kind", "architecture", "backend", "modes", "alias of")
    for entry in registry.entries():
        target = registry.alias_of(entry.air)
        width, height = entry.rules.sizes.default
        runnable = not entry.is_asset and entry.type != "refiner"
        table.add_row(
            entry.air,
            entry.name,
            entry.category if entry.is_asset else f"{entry.type} {width}x{height}",
            entry.architecture,
            registry.resolve(entry.air).target.backend,
            ", ".join(modes_of(entry.rules)) if runnable else "",
            target or "",
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
