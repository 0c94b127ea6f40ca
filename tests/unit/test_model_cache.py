"""The per-device model cache keeps resident weights within a budget, least recently used out."""

from __future__ import annotations

from impasto.backends.devices import ModelCache


def test_models_within_budget_stay_resident() -> None:
    cache = ModelCache(budget_bytes=100)
    unloaded: list[str] = []
    assert cache.use("a", 40, lambda: unloaded.append("a")) == []
    assert cache.use("b", 50, lambda: unloaded.append("b")) == []
    assert cache.resident() == ["a", "b"]
    assert cache.used_bytes == 90
    assert unloaded == []


def test_loading_past_the_budget_unloads_the_least_recently_used() -> None:
    cache = ModelCache(budget_bytes=100)
    unloaded: list[str] = []
    cache.use("a", 40, lambda: unloaded.append("a"))
    cache.use("b", 40, lambda: unloaded.append("b"))
    cache.use("a", 40, lambda: unloaded.append("a"))  # a is now the most recent

    evicted = cache.use("c", 40, lambda: unloaded.append("c"))

    assert evicted == ["b"]
    assert unloaded == ["b"]
    assert cache.resident() == ["a", "c"]


def test_a_model_larger_than_the_budget_evicts_everything_else_but_stays() -> None:
    cache = ModelCache(budget_bytes=100)
    unloaded: list[str] = []
    cache.use("a", 30, lambda: unloaded.append("a"))
    cache.use("b", 30, lambda: unloaded.append("b"))

    evicted = cache.use("huge", 500, lambda: unloaded.append("huge"))

    assert evicted == ["a", "b"]
    assert cache.resident() == ["huge"]


def test_no_budget_means_nothing_is_unloaded() -> None:
    cache = ModelCache(budget_bytes=None)
    for name in "abcdef":
        assert cache.use(name, 10**12, lambda: None) == []
    assert len(cache.resident()) == 6


def test_forget_drops_a_model_without_unloading_it() -> None:
    cache = ModelCache(budget_bytes=100)
    unloaded: list[str] = []
    cache.use("a", 60, lambda: unloaded.append("a"))
    cache.forget("a")
    assert cache.use("b", 60, lambda: unloaded.append("b")) == []
    assert unloaded == []
