"""SqliteTenancyStore: keys and usage in the embedded state file (tables of their own).

Its statements run on one thread of its own, on a connection of its own, so the CLI (another
process) and the server can both use the file: SQLite's busy timeout waits out the other's
writes, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from impasto.state.sqlite import SqliteFailures
from impasto.tenancy.keys import ApiKey, KeyNotFound, Limits, UsageRecord, UsageTotals

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    digest     TEXT NOT NULL UNIQUE,
    hint       TEXT NOT NULL,
    limits     TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS usage (
    task_uuid  TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    key_id     TEXT NOT NULL,
    key_name   TEXT NOT NULL,
    model      TEXT NOT NULL,
    width      INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    cost       REAL NOT NULL,
    at         REAL NOT NULL,
    PRIMARY KEY (task_uuid, idx)
);
CREATE INDEX IF NOT EXISTS usage_key_at ON usage(key_id, at);
"""


def limits_json(limits: Limits) -> str:
    return json.dumps(
        {
            "tasksPerMinute": limits.tasks_per_minute,
            "imagesPerMinute": limits.images_per_minute,
            "maxConcurrent": limits.max_concurrent,
            "models": list(limits.models),
        }
    )


def limits_of(text: str) -> Limits:
    raw = json.loads(text)
    return Limits(
        tasks_per_minute=raw.get("tasksPerMinute"),
        images_per_minute=raw.get("imagesPerMinute"),
        max_concurrent=raw.get("maxConcurrent"),
        models=tuple(raw.get("models") or ()),
    )


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        name=row["name"],
        digest=row["digest"],
        hint=row["hint"],
        limits=limits_of(row["limits"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


class SqliteTenancyStore:
    """KeyStore and UsageLedger on the state's SQLite file."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._failures = SqliteFailures(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="impasto-keys")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        with self._failures:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(lambda conn: None)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._failures:
                return work(self._connection())

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one write transaction (taken at once: no other writer in between)."""

        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(run)

    async def create_key(self, key: ApiKey) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            taken = conn.execute(
                "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (key.name, key.created_at),
            ).fetchone()
            if taken:
                raise ValueError(f"an active key is already named {key.name!r}")
            try:
                conn.execute(
                    "INSERT INTO api_keys (key_id, name, digest, hint, limits, created_at,"
                    " expires_at, revoked_at) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        key.key_id,
                        key.name,
                        key.digest,
                        key.hint,
                        limits_json(key.limits),
                        key.created_at,
                        key.expires_at,
                        key.revoked_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"key {key.key_id} (or its secret) exists already") from None

        await self._transaction(insert)

    async def key_by_digest(self, digest: str) -> ApiKey | None:
        def read(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute("SELECT * FROM api_keys WHERE digest = ?", (digest,)).fetchone()
            return _key(row) if row else None

        return await self._run(read)

    async def list_keys(self) -> list[ApiKey]:
        def read(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute("SELECT * FROM api_keys ORDER BY created_at, key_id").fetchall()
            return [_key(row) for row in rows]

        return await self._run(read)

    async def revoke_key(self, name_or_id: str, at: float) -> list[ApiKey]:
        def revoke(conn: sqlite3.Connection) -> list[ApiKey]:
            where = "(key_id = ? OR name = ?) AND revoked_at IS NULL"
            rows = conn.execute(
                f"SELECT * FROM api_keys WHERE {where}", (name_or_id, name_or_id)
            ).fetchall()
            if not rows:
                raise KeyNotFound(name_or_id)
            conn.execute(
                f"UPDATE api_keys SET revoked_at = ? WHERE {where}", (at, name_or_id, name_or_id)
            )
            return [_key(row) for row in rows]

        return [replace(key, revoked_at=at) for key in await self._transaction(revoke)]

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO usage (task_uuid, idx, key_id, key_name, model, width,"
                " height, cost, at) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.task_uuid,
                        r.index,
                        r.key_id,
                        r.key_name,
                        r.model,
                        r.width,
                        r.height,
                        r.cost,
                        r.at,
                    )
                    for r in records
                ],
            )

        await self._transaction(insert)

    async def usage_totals(
        self, *, key_ids: Sequence[str] = (), since: float | None = None
    ) -> list[UsageTotals]:
        clauses: list[str] = []
        args: list[object] = []
        if key_ids:
            clauses.append(f"key_id IN ({','.join('?' * len(key_ids))})")
            args.extend(key_ids)
        if since is not None:
            clauses.append("at >= ?")
            args.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def read(conn: sqlite3.Connection) -> list[UsageTotals]:
            rows = conn.execute(
                "SELECT key_id, MAX(key_name) AS key_name, model, COUNT(*) AS images,"
                " SUM(cost) AS cost, SUM(width * height) AS pixels, MIN(at) AS first_at,"
                f" MAX(at) AS last_at FROM usage {where} GROUP BY key_id, model"
                " ORDER BY key_name, model",
                args,
            ).fetchall()
            return [
                UsageTotals(
                    key_id=row["key_id"],
                    key_name=row["key_name"],
                    model=row["model"],
                    images=row["images"],
                    cost=round(row["cost"] or 0.0, 10),
                    pixels=row["pixels"] or 0,
                    first_at=row["first_at"],
                    last_at=row["last_at"],
                )
                for row in rows
            ]

        return await self._run(read)

    async def task_usage(self, task_uuid: str) -> list[UsageRecord]:
        def read(conn: sqlite3.Connection) -> list[UsageRecord]:
            rows = conn.execute(
                "SELECT * FROM usage WHERE task_uuid = ? ORDER BY idx", (task_uuid,)
            ).fetchall()
            return [
                UsageRecord(
                    task_uuid=row["task_uuid"],
                    index=row["idx"],
                    key_id=row["key_id"],
                    key_name=row["key_name"],
                    model=row["model"],
                    width=row["width"],
                    height=row["height"],
                    cost=row["cost"],
                    at=row["at"],
                )
                for row in rows
            ]

        return await self._run(read)

    async def close(self) -> None:
        def shut(conn: sqlite3.Connection) -> None:
            conn.close()

        if self._conn is not None:
            await self._run(shut)
            self._conn = None
        self._executor.shutdown(wait=True)
