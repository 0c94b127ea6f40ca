"""`impasto keys` and `impasto usage` on a real SQLite state file in a temporary data dir:
the secret is shown once and only its digest is stored, limits are parsed and kept, revoke
and list agree, usage sums what the ledger holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from impasto.cli import app
from impasto.cli.keys import parse_rate, parse_since, parse_when
from impasto.tenancy.keys import UsageRecord, digest_of
from impasto.tenancy.sqlite_store import SqliteTenancyStore


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMPASTO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("IMPASTO_STATE", raising=False)
    return tmp_path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_rates_in_any_unit_become_whole_tasks_a_minute() -> None:
    assert parse_rate("60/min") == 60
    assert parse_rate("60") == 60
    assert parse_rate("2/s") == 120
    assert parse_rate("600/hour") == 10
    for bad in ("fast", "0/min", "1/hour", "-3/min", "3/fortnight"):
        with pytest.raises(typer.BadParameter):
            parse_rate(bad)


def test_moments_are_durations_from_now_or_iso_dates_in_utc() -> None:
    now = 1_000_000.0
    assert parse_when("30d", now) == now + 30 * 86_400
    assert parse_when("90min", now) == now + 5400
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_when("2027-01-31", now) == 1_801_353_600.0
    assert parse_when("2027-01-31T01:00:00+01:00", now) == 1_801_353_600.0
    with pytest.raises(typer.BadParameter):
        parse_when("next tuesday", now)


def test_create_prints_the_secret_once_and_stores_only_its_digest(data_dir: Path) -> None:
    code, out, err = invoke(
        "keys", "create", "--name", "team-a", "--rate", "60/min", "--images-rate", "2/s",
        "--max-concurrent", "4", "--models", "impasto:tiny@1, runway:4@1", "--expires", "30d",
    )  # fmt: skip
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("imp_")
    assert "shown only now" in err
    stored = (data_dir / "impasto.sqlite3").read_bytes()
    assert secret.encode() not in stored

    async def read() -> None:
        store = SqliteTenancyStore(data_dir / "impasto.sqlite3")
        await store.open()
        try:
            key = await store.key_by_digest(digest_of(secret))
        finally:
            await store.close()
        assert key is not None
        assert key.name == "team-a"
        assert key.limits.tasks_per_minute == 60
        assert key.limits.images_per_minute == 120
        assert key.limits.max_concurrent == 4
        assert key.limits.models == ("impasto:tiny@1", "runway:4@1")
        assert key.expires_at is not None
        assert key.expires_at - key.created_at == pytest.approx(30 * 86_400)

    asyncio.run(read())
    code, out, _ = invoke("keys", "list")
    assert code == 0
    assert "team-a" in out
    assert "60 tasks/min; 120 images/min; 4 at once" in out
    assert secret not in out


def test_a_second_active_key_of_a_name_is_refused_until_the_first_is_revoked(
    data_dir: Path,
) -> None:
    assert invoke("keys", "create", "--name", "ci")[0] == 0
    code, _, err = invoke("keys", "create", "--name", "ci")
    assert code == 1
    assert "already named 'ci'" in err
    code, out, _ = invoke("keys", "revoke", "ci")
    assert code == 0
    assert "revoked key_" in out
    assert invoke("keys", "create", "--name", "ci")[0] == 0
    code, out, _ = invoke("keys", "list", "--all", "--json")
    statuses = [row["status"] for row in json.loads(out)]
    assert statuses == ["revoked", "active"]
    code, out, _ = invoke("keys", "list", "--json")
    assert [row["status"] for row in json.loads(out)] == ["active"]


def test_bad_options_exit_with_a_usage_error_and_store_nothing(data_dir: Path) -> None:
    assert invoke("keys", "create", "--name", "x", "--rate", "lots")[0] == 2
    assert invoke("keys", "create", "--name", "x", "--expires", "2001-01-01")[0] == 2
    assert invoke("keys", "create", "--name", "   ")[0] == 2
    code, out, _ = invoke("keys", "list", "--all", "--json")
    assert json.loads(out) == []
    code, _, err = invoke("keys", "revoke", "nobody")
    assert code == 1
    assert "no key named 'nobody'" in err


def test_usage_sums_per_key_and_model_with_filters(data_dir: Path) -> None:
    async def record() -> None:
        store = SqliteTenancyStore(data_dir / "impasto.sqlite3")
        await store.open()
        try:
            await store.record_usage(
                [
                    UsageRecord("t1", 0, "key_a", "a", "impasto:tiny@1", 64, 64, 0.0013, 100.0),
                    UsageRecord("t1", 1, "key_a", "a", "impasto:tiny@1", 64, 64, 0.0013, 100.0),
                    UsageRecord("t2", 0, "key_b", "b", "runway:4@1", 1024, 1024, 0.05, 2e9),
                ]
            )
        finally:
            await store.close()

    asyncio.run(record())
    code, out, _ = invoke("usage", "--json")
    body = json.loads(out)
    assert body["total"]["images"] == 3
    assert body["total"]["cost"] == pytest.approx(0.0526)
    assert [(r["key"], r["images"]) for r in body["rows"]] == [("a", 2), ("b", 1)]
    code, out, _ = invoke("usage", "--key", "a", "--json")
    assert json.loads(out)["total"] == {"images": 2, "cost": 0.0026, "megapixels": 0.008}
    code, out, _ = invoke("usage", "--since", "2030-01-01", "--json")
    assert json.loads(out)["total"]["images"] == 1
    code, out, _ = invoke("usage")
    assert code == 0
    assert out.splitlines()[-1].split() == ["total", "3", "0.0526", "1.057"]
