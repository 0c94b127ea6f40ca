"""SqliteStateStore: the embedded StateStore, one SQLite file in the data dir.

All SQL runs on one dedicated thread, so the event loop never waits on the disk and the
connection is never shared between threads.

Every call goes through `_run`, where `SqliteFailures` turns SQLite's failures of the file
itself (locked, cannot be opened, I/O error, damaged) into ServiceUnavailable and a full disk
into StorageFull; constraint violations and our own mistakes keep their own errors.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from impasto.protocol.errors import ConflictTaskUUID, ServiceUnavailable, StorageFull
from impasto.state.failures import FailureTranslation
from impasto.state.records import (
    DeliveryRecord,
    DeliveryStatus,
    ImageRecord,
    ResultRecord,
    TaskRecord,
    TaskStatus,
    TaskView,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_uuid   TEXT PRIMARY KEY,
    task_type   TEXT NOT NULL,
    model       TEXT,
    request     TEXT NOT NULL,
    expected    INTEGER NOT NULL,
    status      TEXT NOT NULL,
    error       TEXT,
    extra       TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at);
CREATE TABLE IF NOT EXISTS results (
    task_uuid  TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    status     TEXT NOT NULL,
    item       TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (task_uuid, idx)
);
CREATE TABLE IF NOT EXISTS images (
    image_uuid   TEXT PRIMARY KEY,
    key          TEXT NOT NULL,
    content_type TEXT NOT NULL,
    kind         TEXT NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    task_uuid    TEXT,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_expiry ON images(expires_at);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id     TEXT PRIMARY KEY,
    task_uuid       TEXT NOT NULL,
    idx             INTEGER,
    kind            TEXT NOT NULL,
    url             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    status          TEXT NOT NULL,
    last_error      TEXT,
    then_json       TEXT,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_task ON deliveries(task_uuid);
"""


def _task(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_uuid=row["task_uuid"],
        task_type=row["task_type"],
        model=row["model"],
        request=json.loads(row["request"]),
        expected=row["expected"],
        status=row["status"],
        error=json.loads(row["error"]) if row["error"] else None,
        extra=json.loads(row["extra"]),
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


def _image(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        image_uuid=row["image_uuid"],
        key=row["key"],
        content_type=row["content_type"],
        kind=row["kind"],
        width=row["width"],
        height=row["height"],
        task_uuid=row["task_uuid"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
    )


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=row["delivery_id"],
        task_uuid=row["task_uuid"],
        index=row["idx"],
        kind=row["kind"],
        url=row["url"],
        payload=row["payload"],
        content_type=row["content_type"],
        attempts=row["attempts"],
        status=row["status"],
        last_error=json.loads(row["last_error"]) if row["last_error"] else None,
        then=json.loads(row["then_json"]) if row["then_json"] else None,
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
    )


def _insert_image(conn: sqlite3.Connection, image: ImageRecord) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO images (image_uuid, key, content_type, kind, width,"
        " height, task_uuid, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
        (
            image.image_uuid,
            image.key,
            image.content_type,
            image.kind,
            image.width,
            image.height,
            image.task_uuid,
            image.created_at,
            image.expires_at,
        ),
    )


def _insert_deliveries(conn: sqlite3.Connection, deliveries: Sequence[DeliveryRecord]) -> None:
    for d in deliveries:
        conn.execute(
            "INSERT INTO deliveries (delivery_id, task_uuid, idx, kind, url, payload,"
            " content_type, attempts, status, last_error, then_json, created_at,"
            " next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                d.delivery_id,
                d.task_uuid,
                d.index,
                d.kind,
                d.url,
                d.payload,
                d.content_type,
                d.attempts,
                d.status,
                json.dumps(d.last_error) if d.last_error else None,
                json.dumps(d.then) if d.then else None,
                d.created_at,
                d.next_attempt_at,
            ),
        )


# By primary result code (the low byte of the extended one).
_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY: "is locked by another process",
    sqlite3.SQLITE_LOCKED: "is locked by another process",
    sqlite3.SQLITE_PROTOCOL: "is locked by another process",
    sqlite3.SQLITE_CANTOPEN: "cannot be opened",
    sqlite3.SQLITE_PERM: "cannot be opened",
    sqlite3.SQLITE_IOERR: "cannot be read or written (I/O error)",
    sqlite3.SQLITE_READONLY: "is read-only",
    sqlite3.SQLITE_CORRUPT: "is damaged",
    sqlite3.SQLITE_NOTADB: "is not a SQLite database",
    sqlite3.SQLITE_NOMEM: "ran out of memory",
}
# For an error without a result code; SQLite's own wording.
_CODE_OF_TEXT = {
    "database is locked": sqlite3.SQLITE_BUSY,
    "unable to open": sqlite3.SQLITE_CANTOPEN,
    "disk i/o error": sqlite3.SQLITE_IOERR,
    "database or disk is full": sqlite3.SQLITE_FULL,
}
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class SqliteFailures(FailureTranslation):
    """Re-raises failures of the database file as ServiceUnavailable (StorageFull for a full
    disk) naming the store, e.g. "The state store (SQLite file impasto.sqlite) is locked by
    another process."; the file's directory stays out of the message."""

    def __init__(self, path: Path) -> None:
        self.what = f"The state store (SQLite file {path.name})"

    def translate(self, exc: BaseException) -> ServiceUnavailable | None:
        """The error to raise instead of `exc`, or None to let `exc` through."""
        if isinstance(exc, OSError):  # creating the data directory
            if exc.errno in _NO_SPACE:
                return StorageFull(f"{self.what} has no space left on its disk.")
            return ServiceUnavailable(f"{self.what} cannot be opened ({exc.strerror}).")
        # IntegrityError (a taskUUID conflict) and ProgrammingError (a bug) are not outages.
        if not isinstance(exc, sqlite3.DatabaseError) or isinstance(
            exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
        ):
            return None
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            text = str(exc).lower()
            code = next((c for t, c in _CODE_OF_TEXT.items() if t in text), None)
        if code is None:
            return None
        code &= 0xFF
        if code == sqlite3.SQLITE_FULL:
            return StorageFull(f"{self.what} has no space left (disk full or size limit).")
        reason = _UNAVAILABLE.get(code)
        return ServiceUnavailable(f"{self.what} {reason}.") if reason else None


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc).lower()
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SqliteStateStore:
    """StateStore on a SQLite file (WAL mode; survives a kill -9 of the process).

    Statements run in the event loop's own thread: on a WAL file that this process owns, one
    takes tens of microseconds, less than handing it to a thread and back (measured: two thread
    hops per statement were most of the state store's cost per task). SQLite's own busy wait
    would block the loop, so the connection does not wait for a lock another process holds:
    the call is retried with asyncio sleeps until `busy_timeout_s` has passed, then reported
    as locked. The one long statement, the sweep of old tasks, runs in a thread on a
    connection of its own.
    """

    def __init__(
        self, path: Path, *, busy_timeout_s: float = 5.0, ping_timeout_s: float | None = None
    ) -> None:
        self._path = path
        # How long a statement waits for a lock another process holds before it fails.
        self._busy_timeout_s = busy_timeout_s
        # Past the busy timeout, so that a locked file is reported as locked.
        self._ping_timeout_s = ping_timeout_s or busy_timeout_s + 1.0
        self._failures = SqliteFailures(path)
        # The sweep's thread and connection (made in that thread, used only there).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="impasto-sqlite")
        self._sweep_conn: sqlite3.Connection | None = None
        self._conn: sqlite3.Connection | None = None
        # Progress is ephemeral and only this process produces it: no need for the disk.
        self._progress: dict[str, dict[int, int]] = {}

    async def open(self) -> None:
        with self._failures:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(self._connect)

    def _open_connection(self, busy_timeout_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> None:
        conn = self._open_connection(0.0)
        try:
            conn.executescript(SCHEMA)
            # One process owns this file: delivery leases taken by a previous run are void.
            conn.execute(
                "UPDATE deliveries SET next_attempt_at = MIN(next_attempt_at, ?)"
                " WHERE status = 'pending'",
                (time.time(),),
            )
        except BaseException:
            conn.close()  # retried after a lock with a new connection
            raise
        self._conn = conn

    async def _run(self, fn: Callable[[], T]) -> T:
        """`fn` (one statement or one transaction) on the connection, here in the loop's
        thread; retried while another process holds the write lock, up to busy_timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout_s
        delay = 0.002
        while True:
            with self._failures:
                try:
                    return fn()
                except sqlite3.OperationalError as exc:
                    if not _busy(exc) or loop.time() >= deadline:
                        raise
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteStateStore used before open()")
        return self._conn

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless the file can be locked for writing right now."""

        def lock_and_release() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

        try:
            async with asyncio.timeout(self._ping_timeout_s):
                await self._run(lock_and_release)
        except TimeoutError:
            raise ServiceUnavailable(
                f"{self._failures.what} did not answer within {self._ping_timeout_s:g} s."
            ) from None

    async def create_task(self, task: TaskRecord) -> None:
        def insert() -> None:
            try:
                self._db.execute(
                    "INSERT INTO tasks (task_uuid, task_type, model, request, expected, status,"
                    " error, extra, created_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        task.task_uuid,
                        task.task_type,
                        task.model,
                        json.dumps(task.request),
                        task.expected,
                        task.status,
                        json.dumps(task.error) if task.error else None,
                        json.dumps(task.extra),
                        task.created_at,
                        task.finished_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise ConflictTaskUUID(
                    f"taskUUID {task.task_uuid} was already used; fetch its results with "
                    "getResponse or send a new taskUUID.",
                    parameter="taskUUID",
                ) from None

        await self._run(insert)

    async def get_task(self, task_uuid: str) -> TaskRecord | None:
        def select() -> TaskRecord | None:
            row = self._db.execute(
                "SELECT * FROM tasks WHERE task_uuid = ?", (task_uuid,)
            ).fetchone()
            return _task(row) if row else None

        return await self._run(select)

    async def finish_task(
        self,
        task_uuid: str,
        status: TaskStatus,
        error: dict[str, Any] | None,
        at: float,
        deliveries: Sequence[DeliveryRecord] = (),
    ) -> bool:
        def update() -> bool:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                cursor = self._db.execute(
                    "UPDATE tasks SET status = ?, error = ?, finished_at = ?"
                    " WHERE task_uuid = ? AND status = 'processing'",
                    (status, json.dumps(error) if error else None, at, task_uuid),
                )
                if cursor.rowcount != 1:
                    return False
                _insert_deliveries(self._db, deliveries)
                return True

        self._progress.pop(task_uuid, None)
        return await self._run(update)

    async def update_task_extra(self, task_uuid: str, extra: dict[str, Any]) -> None:
        def update() -> None:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT extra FROM tasks WHERE task_uuid = ?", (task_uuid,)
                ).fetchone()
                if row is None:
                    return
                merged = {**json.loads(row["extra"]), **extra}
                self._db.execute(
                    "UPDATE tasks SET extra = ? WHERE task_uuid = ?",
                    (json.dumps(merged), task_uuid),
                )

        await self._run(update)

    async def add_result(
        self,
        result: ResultRecord,
        deliveries: Sequence[DeliveryRecord] = (),
        image: ImageRecord | None = None,
    ) -> bool:
        def insert() -> bool:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO results (task_uuid, idx, status, item, created_at)"
                    " VALUES (?,?,?,?,?)",
                    (
                        result.task_uuid,
                        result.index,
                        result.status,
                        json.dumps(result.item),
                        result.created_at,
                    ),
                )
                if cursor.rowcount != 1:
                    return False
                if image is not None:
                    _insert_image(self._db, image)
                _insert_deliveries(self._db, deliveries)
                return True

        stored = await self._run(insert)
        if stored:
            self._progress.get(result.task_uuid, {}).pop(result.index, None)
        return stored

    async def results(self, task_uuid: str) -> list[ResultRecord]:
        return await self._run(lambda: self._results(task_uuid))

    def _results(self, task_uuid: str) -> list[ResultRecord]:
        rows = self._db.execute(
            "SELECT * FROM results WHERE task_uuid = ? ORDER BY idx", (task_uuid,)
        ).fetchall()
        return [
            ResultRecord(
                task_uuid=row["task_uuid"],
                index=row["idx"],
                status=row["status"],
                item=json.loads(row["item"]),
                created_at=row["created_at"],
            )
            for row in rows
        ]

    def _deliveries(self, task_uuid: str) -> list[DeliveryRecord]:
        rows = self._db.execute(
            "SELECT * FROM deliveries WHERE task_uuid = ? ORDER BY created_at, idx",
            (task_uuid,),
        ).fetchall()
        return [_delivery(row) for row in rows]

    async def task_view(self, task_uuid: str) -> TaskView | None:
        def select() -> TaskView | None:
            # One read transaction: the three reads see the same moment.
            with self._db:
                self._db.execute("BEGIN")
                row = self._db.execute(
                    "SELECT * FROM tasks WHERE task_uuid = ?", (task_uuid,)
                ).fetchone()
                if row is None:
                    return None
                return TaskView(_task(row), self._results(task_uuid), self._deliveries(task_uuid))

        return await self._run(select)

    async def set_progress(self, task_uuid: str, index: int, percent: int) -> None:
        self._progress.setdefault(task_uuid, {})[index] = percent

    async def progress(self, task_uuid: str) -> dict[int, int]:
        return dict(self._progress.get(task_uuid, {}))

    async def unfinished_tasks(self) -> list[TaskRecord]:
        def select() -> list[TaskRecord]:
            rows = self._db.execute(
                "SELECT * FROM tasks WHERE status = 'processing' ORDER BY created_at"
            ).fetchall()
            return [_task(row) for row in rows]

        return await self._run(select)

    async def deliveries(self, task_uuid: str) -> list[DeliveryRecord]:
        return await self._run(lambda: self._deliveries(task_uuid))

    async def claim_deliveries(
        self, now: float, limit: int, lease_s: float
    ) -> list[DeliveryRecord]:
        def claim() -> list[DeliveryRecord]:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                rows = self._db.execute(
                    "SELECT * FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?"
                    " ORDER BY next_attempt_at LIMIT ?",
                    (now, limit),
                ).fetchall()
                self._db.executemany(
                    "UPDATE deliveries SET next_attempt_at = ? WHERE delivery_id = ?",
                    [(now + lease_s, row["delivery_id"]) for row in rows],
                )
                return [_delivery(row) for row in rows]

        return await self._run(claim)

    async def next_delivery_at(self) -> float | None:
        def select() -> float | None:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) AS due FROM deliveries WHERE status = 'pending'"
            ).fetchone()
            return float(row["due"]) if row and row["due"] is not None else None

        return await self._run(select)

    async def reschedule_delivery(
        self, delivery_id: str, attempts: int, next_attempt_at: float, error: dict[str, Any]
    ) -> None:
        await self._run(
            lambda: self._db.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt_at = ?, last_error = ?"
                " WHERE delivery_id = ? AND status = 'pending'",
                (attempts, next_attempt_at, json.dumps(error), delivery_id),
            )
        )

    async def settle_delivery(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        attempts: int,
        error: dict[str, Any] | None,
        follow_ups: Sequence[DeliveryRecord] = (),
    ) -> bool:
        def update() -> bool:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                cursor = self._db.execute(
                    "UPDATE deliveries SET status = ?, attempts = ?, last_error = ?"
                    " WHERE delivery_id = ? AND status = 'pending'",
                    (status, attempts, json.dumps(error) if error else None, delivery_id),
                )
                if cursor.rowcount != 1:
                    return False
                _insert_deliveries(self._db, follow_ups)
                return True

        return await self._run(update)

    async def put_image(self, image: ImageRecord) -> None:
        await self._run(lambda: _insert_image(self._db, image))

    async def get_image(self, image_uuid: str) -> ImageRecord | None:
        def select() -> ImageRecord | None:
            row = self._db.execute(
                "SELECT * FROM images WHERE image_uuid = ?", (image_uuid,)
            ).fetchone()
            return _image(row) if row else None

        return await self._run(select)

    async def delete_image(self, image_uuid: str) -> None:
        await self._run(
            lambda: self._db.execute("DELETE FROM images WHERE image_uuid = ?", (image_uuid,))
        )

    async def expired_images(self, now: float, limit: int) -> list[ImageRecord]:
        def select() -> list[ImageRecord]:
            rows = self._db.execute(
                "SELECT * FROM images WHERE expires_at <= ? ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
            return [_image(row) for row in rows]

        return await self._run(select)

    async def sweep_tasks(self, finished_before: float) -> int:
        # Deleting a day of tasks can take a while: in a thread, on the sweep's own connection,
        # which may wait for the lock SQLite's way (the loop's statements retry meanwhile).
        def delete() -> int:
            if self._sweep_conn is None:
                self._sweep_conn = self._open_connection(self._busy_timeout_s)
            db = self._sweep_conn
            with db:
                db.execute("BEGIN IMMEDIATE")
                for table in ("results", "deliveries"):
                    db.execute(
                        f"DELETE FROM {table} WHERE task_uuid IN (SELECT task_uuid FROM tasks"
                        " WHERE finished_at IS NOT NULL AND finished_at < ?)"
                        + (" AND status != 'pending'" if table == "deliveries" else ""),
                        (finished_before,),
                    )
                cursor = db.execute(
                    "DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?",
                    (finished_before,),
                )
                return cursor.rowcount

        if self._conn is None:
            raise RuntimeError("SqliteStateStore used before open()")
        with self._failures:
            return await asyncio.get_running_loop().run_in_executor(self._executor, delete)

    async def close(self) -> None:
        def close_sweep() -> None:
            if self._sweep_conn is not None:
                self._sweep_conn.close()
                self._sweep_conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close_sweep)
        self._executor.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
