"""`impasto run`: post a task file to a running server and save the images it returns."""

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

console = Console()


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
