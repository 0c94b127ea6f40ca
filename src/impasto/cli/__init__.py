"""Command line: `impasto serve | worker | generate | run | models | keys | usage`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from impasto.cli.generate import generate
from impasto.cli.keys import keys_app, usage
from impasto.cli.models import models
from impasto.cli.run import run
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


app.command()(run)
app.command()(generate)
app.command()(models)
app.add_typer(keys_app, name="keys")
app.command()(usage)


@app.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown; it is docs/configuration.md)."""
    from impasto.settings_reference import render

    typer.echo(render(), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
