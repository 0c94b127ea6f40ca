"""Seeds of the N images of a task, and what an image costs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from impasto.backends.registry import ModelRegistry
from impasto.protocol.rules import RUNWAY_SIZES, PriceTable
from impasto.service.jobs import seeds_for

SEED_TASKS = json.loads((Path(__file__).parents[1] / "data" / "seed-tasks.json").read_text())

RUNWAY_720P = [(1280, 720), (720, 1280), (720, 720), (960, 720), (720, 960), (1680, 720)]
RUNWAY_1K_AND_1080P = [
    (1024, 1024),
    (1360, 768),
    (1168, 880),
    (1808, 768),
    (1920, 1080),
    (1080, 1920),
    (1080, 1080),
    (1440, 1080),
    (1080, 1440),
    (2112, 912),
]


# -- seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "count", "expected"),
    [
        (42, 1, [42]),
        (42, 4, [42, 43, 44, 45]),
        (0, 3, [0, 1, 2]),
        (2**63 - 1, 1, [2**63 - 1]),
        (2**63 - 2, 4, [2**63 - 2, 2**63 - 1, 0, 1]),
        (7, 0, []),
    ],
)
def test_given_seed_gives_consecutive_seeds_wrapping_at_2_to_the_63(
    seed: int, count: int, expected: list[int]
) -> None:
    assert seeds_for(seed, count) == expected


def test_given_seed_is_reproducible() -> None:
    assert seeds_for(123456789, 20) == seeds_for(123456789, 20)


def test_random_seeds_are_distinct_and_exact_in_a_javascript_number() -> None:
    # @runware/sdk-js parses seeds as doubles: beyond 2**53 they come back rounded.
    seeds = [s for _ in range(50) for s in seeds_for(None, 20)]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s <= 2**53 - 1 for s in seeds)
    assert all(float(s) == s and int(float(s)) == s for s in seeds)
    # Still spread over the whole safe range, not a small corner of it.
    assert max(seeds) > 2**50


def test_random_seeds_differ_between_tasks() -> None:
    assert seeds_for(None, 4) != seeds_for(None, 4)


# -- prices -----------------------------------------------------------------------------------


def test_runway_size_lists_cover_the_sixteen_sizes_once() -> None:
    assert sorted(RUNWAY_720P + RUNWAY_1K_AND_1080P) == sorted(RUNWAY_SIZES)


@pytest.mark.parametrize("size", RUNWAY_720P)
def test_runway_gen4_costs_five_cents_at_720p(size: tuple[int, int]) -> None:
    price = ModelRegistry.load(None).resolve("runway:4@1").rules.price
    assert price.cost(size) == pytest.approx(0.05)


@pytest.mark.parametrize("size", RUNWAY_1K_AND_1080P)
def test_runway_gen4_costs_eight_cents_at_1k_and_1080p(size: tuple[int, int]) -> None:
    price = ModelRegistry.load(None).resolve("runway:4@1").rules.price
    assert price.cost(size) == pytest.approx(0.08)


@pytest.mark.parametrize("size", RUNWAY_SIZES)
def test_runway_gen4_turbo_costs_two_cents_at_every_size(size: tuple[int, int]) -> None:
    price = ModelRegistry.load(None).resolve("runway:4@2").rules.price
    assert price.cost(size) == pytest.approx(0.02)


@pytest.mark.parametrize("example", SEED_TASKS, ids=[str(e["name"]) for e in SEED_TASKS])
def test_seed_example_cost_matches_the_recorded_runware_cost(example: dict[str, Any]) -> None:
    request, response = example["request"], example["response"]
    price = ModelRegistry.load(None).resolve(request["model"]).rules.price
    assert price.cost((request["width"], request["height"])) == pytest.approx(response["cost"])


def test_local_models_cost_nothing_by_default() -> None:
    price = ModelRegistry.load(None).resolve("impasto:tiny@1").rules.price
    assert price.cost((512, 512)) == 0.0


def test_price_table_uses_the_size_price_else_the_per_image_price() -> None:
    table = PriceTable(per_image=0.01, by_size={(512, 512): 0.003})
    assert table.cost((512, 512)) == pytest.approx(0.003)
    assert table.cost((1024, 1024)) == pytest.approx(0.01)
    assert isinstance(PriceTable(per_image=1).cost((1, 1)), float)


def test_models_file_overrides_prices_and_keeps_the_other_size_prices(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        """
        [models."runway:4@1"]
        price_usd = 0.1
        size_prices = {"1280x720" = 0.04}
        """
    )
    price = ModelRegistry.load(path).resolve("runway:4@1").rules.price
    assert price.cost((1280, 720)) == pytest.approx(0.04)
    assert price.cost((720, 720)) == pytest.approx(0.05)
    assert price.cost((1920, 1080)) == pytest.approx(0.1)


def test_models_file_size_prices_alone_keep_the_per_image_price(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models."runway:4@2"]\nsize_prices = {"1920x1080" = 0.03}\n')
    price = ModelRegistry.load(path).resolve("runway:4@2").rules.price
    assert price.cost((1920, 1080)) == pytest.approx(0.03)
    assert price.cost((1024, 1024)) == pytest.approx(0.02)


def test_models_file_price_of_a_local_model(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models."impasto:tiny@1"]\nprice_usd = 0.0015\n')
    price = ModelRegistry.load(path).resolve("impasto:tiny@1").rules.price
    assert price.cost((512, 512)) == pytest.approx(0.0015)
