"""`impasto keys create | list | revoke` and `impasto usage`: managed API keys and what they
spent, in the same state store the server reads (the SQLite file of the data dir, or Redis
with `--state redis://…`). A running server picks changes up within IMPASTO_KEY_REFRESH_S.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer

from impasto.settings import Settings
from impasto.tenancy.keys import (
    ApiKey,
    KeyNotFound,
    Limits,
    TenancyStore,
    UsageTotals,
    digest_of,
    new_secret,
)

T = TypeVar("T")

keys_app = typer.Typer(help="Managed API keys: create, list, revoke.", no_args_is_help=True)

StateOption = Annotated[
    str | None, typer.Option("--state", help="redis://… shared state [IMPASTO_STATE]")
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON, for scripts")]

_RATE = re.compile(r"^\s*(\d+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*$", re.I)
_PER_MINUTE = {"s": 60.0, "sec": 60.0, "second": 60.0, "m": 1.0, "min": 1.0, "minute": 1.0}
_PER_MINUTE.update({"h": 1 / 60, "hour": 1 / 60})
_DURATION = re.compile(r"^\s*(\d+)\s*(m|min|h|d|w)\s*$", re.I)
_SECONDS = {"m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_rate(text: str) -> int:
    """`60/min`, `2/s`, `600/hour` or a bare `60` (a minute) as whole tasks a minute."""
    match = _RATE.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a rate such as 60/min, 2/s or 600/hour")
    count, unit = int(match.group(1)), (match.group(2) or "min").lower()
    per_minute = count * _PER_MINUTE[unit]
    if per_minute < 1 or per_minute != int(per_minute):
        raise typer.BadParameter(f"{text!r} is not a whole number a minute (at least 1/min)")
    return int(per_minute)


def parse_when(text: str, now: float) -> float:
    """A moment: a duration from now (`30d`, `12h`, `90min`, `2w`) or an ISO date/time (UTC
    unless it says otherwise)."""
    match = _DURATION.match(text)
    if match is not None:
        return now + int(match.group(1)) * _SECONDS[match.group(2).lower()]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither a duration (30d, 12h, 90min) nor an ISO date (2027-01-31)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_since(text: str, now: float) -> float:
    """A moment in the past: a duration back from now (`30d`, `12h`) or an ISO date."""
    if _DURATION.match(text):
        return 2 * now - parse_when(text, now)
    return parse_when(text, now)


def iso(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@asynccontextmanager
async def opened_store(state: str | None) -> AsyncIterator[TenancyStore]:
    settings = Settings(state=state) if state else Settings()
    store: Any
    if settings.distributed:
        from impasto.tenancy.redis_store import RedisTenancyStore

        store = RedisTenancyStore(str(settings.state), prefix=settings.redis_prefix)
    else:
        from impasto.tenancy.sqlite_store import SqliteTenancyStore

        store = SqliteTenancyStore(settings.state_path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def with_store(state: str | None, work: Callable[[TenancyStore], Awaitable[T]]) -> T:
    """Run `work` on the store; a store that cannot be used is one line and exit 1."""
    from impasto.protocol.errors import ServiceUnavailable

    async def main() -> T:
        async with opened_store(state) as store:
            return await work(store)

    try:
        return asyncio.run(main())
    except ServiceUnavailable as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def key_row(key: ApiKey, now: float) -> dict[str, Any]:
    return {
        "id": key.key_id,
        "name": key.name,
        "hint": key.hint + "…",
        "status": key.status(now),
        "created": iso(key.created_at),
        "expires": iso(key.expires_at),
        "tasksPerMinute": key.limits.tasks_per_minute,
        "imagesPerMinute": key.limits.images_per_minute,
        "maxConcurrent": key.limits.max_concurrent,
        "models": list(key.limits.models),
    }


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="who the key is for (shown in usage)")],
    rate: Annotated[
        str | None, typer.Option("--rate", help="tasks a minute, e.g. 60/min or 2/s")
    ] = None,
    images_rate: Annotated[
        str | None, typer.Option("--images-rate", help="images a minute, e.g. 120/min")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", min=1, help="imageInference tasks at once")
    ] = None,
    models: Annotated[
        str | None, typer.Option("--models", help="comma-separated AIRs it may use (default all)")
    ] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="30d, 12h, or an ISO date (UTC)")
    ] = None,
    state: StateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make a key. Its secret is printed once, now; only a digest of it is stored."""
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() and c != " " for c in name):
        raise typer.BadParameter("--name must be 1 to 64 characters on one line")
    now = time.time()
    secret = new_secret()
    key = ApiKey(
        key_id="key_" + uuid.uuid4().hex[:12],
        name=name,
        digest=digest_of(secret),
        hint=secret[:8],
        created_at=now,
        limits=Limits(
            tasks_per_minute=parse_rate(rate) if rate else None,
            images_per_minute=parse_rate(images_rate) if images_rate else None,
            max_concurrent=max_concurrent,
            models=tuple(m.strip() for m in (models or "").split(",") if m.strip()),
        ),
        expires_at=parse_when(expires, now) if expires else None,
    )
    if key.expires_at is not None and key.expires_at <= now:
        raise typer.BadParameter("--expires is in the past")

    async def work(store: TenancyStore) -> None:
        await store.create_key(key)

    try:
        with_store(state, work)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({**key_row(key, now), "apiKey": secret}, indent=2))
        return
    typer.echo(secret)
    typer.echo(
        f"key {key.key_id} for {name!r} made; the line above is its secret, shown only now.",
        err=True,
    )


@keys_app.command("list")
def list_keys(
    show_all: Annotated[bool, typer.Option("--all", help="revoked and expired keys too")] = False,
    state: StateOption = None,
    as_json: JsonOption = False,
) -> None:
    """The managed keys (never their secrets), oldest first."""
    now = time.time()
    keys = with_store(state, lambda store: store.list_keys())
    rows = [key_row(k, now) for k in keys if show_all or k.active(now)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    columns = ("id", "name", "hint", "status", "created", "expires", "limits")
    table = [{**row, "limits": _limits_text(row)} for row in rows]
    typer.echo(_columns(columns, table), nl=False)


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="the key's name or id")],
    state: StateOption = None,
) -> None:
    """Revoke a key (every active key of that name): its requests fail from now on and its
    open WebSocket sessions are closed."""

    async def work(store: TenancyStore) -> list[ApiKey]:
        return await store.revoke_key(key, time.time())

    try:
        revoked = with_store(state, work)
    except KeyNotFound:
        typer.echo(f"error: no key named {key!r} (or with that id) that is not revoked", err=True)
        raise typer.Exit(1) from None
    for item in revoked:
        typer.echo(f"revoked {item.key_id} ({item.name})")


def usage(
    key: Annotated[str | None, typer.Option("--key", help="only this key (name or id)")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="30d, 12h, or an ISO date (UTC)")
    ] = None,
    state: StateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Images and cost per key and model, with totals."""
    now = time.time()
    start = parse_since(since, now) if since else None

    async def work(store: TenancyStore) -> list[UsageTotals]:
        rows = await store.usage_totals(since=start)
        # By id or by name: a name covers every key it was given (revoked ones too), and
        # operator keys and an open server have names but no managed key.
        return [r for r in rows if key in (r.key_id, r.key_name)] if key else rows

    rows = with_store(state, work)
    totals = {
        "images": sum(r.images for r in rows),
        "cost": round(sum(r.cost for r in rows), 10),
        "megapixels": round(sum(r.pixels for r in rows) / 1e6, 3),
    }
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "since": iso(start) if start else None,
                    "rows": [
                        {
                            "keyId": r.key_id,
                            "key": r.key_name,
                            "model": r.model,
                            "images": r.images,
                            "cost": r.cost,
                            "megapixels": round(r.pixels / 1e6, 3),
                            "first": iso(r.first_at),
                            "last": iso(r.last_at),
                        }
                        for r in rows
                    ],
                    "total": totals,
                },
                indent=2,
            )
        )
        return
    table = [
        {
            "key": r.key_name,
            "model": r.model,
            "images": str(r.images),
            "cost": f"{r.cost:.4f}",
            "megapixels": f"{r.pixels / 1e6:.3f}",
            "last": iso(r.last_at),
        }
        for r in rows
    ]
    table.append(
        {
            "key": "total",
            "model": "",
            "images": str(totals["images"]),
            "cost": f"{totals['cost']:.4f}",
            "megapixels": f"{totals['megapixels']:.3f}",
            "last": "",
        }
    )
    if start is not None:
        typer.echo(f"since {iso(start)}", err=True)
    typer.echo(_columns(("key", "model", "images", "cost", "megapixels", "last"), table), nl=False)


def _limits_text(row: dict[str, Any]) -> str:
    parts = []
    if row["tasksPerMinute"] is not None:
        parts.append(f"{row['tasksPerMinute']} tasks/min")
    if row["imagesPerMinute"] is not None:
        parts.append(f"{row['imagesPerMinute']} images/min")
    if row["maxConcurrent"] is not None:
        parts.append(f"{row['maxConcurrent']} at once")
    if row["models"]:
        parts.append("models " + ",".join(row["models"]))
    return "; ".join(parts) or "none"


def _columns(names: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """Plain, aligned columns (no cut values): readable in a terminal and in a pipe."""
    cells = [[str(row.get(n, "")) for n in names] for row in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells
    ]
    return "\n".join(lines) + "\n"
