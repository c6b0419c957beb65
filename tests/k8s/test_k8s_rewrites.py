"""RewriteStore: precedence (exact beats generic, first wins), weighted draws, legacy objectives."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from igw.datalayer.rewrites import Rewrite, RewriteRule, RewriteStore, RewriteTarget


def rule(name: str, models: set[str], *targets: tuple[str, int]) -> RewriteRule:
    return RewriteRule(name, frozenset(models), tuple(RewriteTarget(m, w) for m, w in targets))


def test_no_rule_leaves_the_model_alone() -> None:
    store = RewriteStore()
    assert store.decide("llama") is None
    assert store.rewrite("llama") is None
    assert store.rewrite(None) is None


def test_exact_match_beats_generic_and_first_rule_wins() -> None:
    store = RewriteStore(
        [
            rule("generic", set(), ("fallback", 1)),
            rule("first", {"a"}, ("a-v1", 1)),
            rule("second", {"a", "b"}, ("ab-v2", 1)),
            rule("generic-2", set(), ("never", 1)),
        ]
    )
    assert store.decide("a") == Rewrite(rule="first", model="a", target="a-v1")
    assert store.rewrite("b") == "ab-v2"
    assert store.decide("zzz") == Rewrite(rule="generic", model="zzz", target="fallback")


def test_set_rules_replaces_everything() -> None:
    store = RewriteStore([rule("r", {"a"}, ("x", 1))])
    store.set_rules([rule("s", {"b"}, ("y", 1))])
    assert store.rewrite("a") is None
    assert store.rewrite("b") == "y"
    assert [r.name for r in store.rules()] == ["s"]


def test_weights_are_honoured_statistically() -> None:
    store = RewriteStore([rule("split", {"m"}, ("m-v1", 90), ("m-v2", 10))], rng=random.Random(7))
    counts = Counter(store.rewrite("m") for _ in range(20_000))
    share = counts["m-v2"] / 20_000
    # binomial(20000, 0.1): sd ~0.0021; 5 sd either side
    assert 0.0895 < share < 0.1105, counts


def test_three_way_split_and_determinism() -> None:
    def draws(seed: int) -> list[str | None]:
        store = RewriteStore([rule("s", {"m"}, ("a", 1), ("b", 2), ("c", 7))], rng=random.Random(seed))
        return [store.rewrite("m") for _ in range(10_000)]

    first = draws(1)
    assert first == draws(1)  # an injected rng makes the draws reproducible
    counts = Counter(first)
    for model, expected in (("a", 0.1), ("b", 0.2), ("c", 0.7)):
        assert abs(counts[model] / 10_000 - expected) < 0.025, counts


def test_all_zero_weights_are_uniform() -> None:
    store = RewriteStore([rule("z", {"m"}, ("a", 0), ("b", 0))], rng=random.Random(3))
    counts = Counter(store.rewrite("m") for _ in range(4000))
    assert abs(counts["a"] / 4000 - 0.5) < 0.05


def test_a_zero_weight_target_is_never_chosen_when_others_are_weighted() -> None:
    store = RewriteStore([rule("z", {"m"}, ("a", 0), ("b", 5))], rng=random.Random(3))
    assert {store.rewrite("m") for _ in range(500)} == {"b"}


@pytest.mark.parametrize(
    ("targets", "message"),
    [((), "no targets"), ((RewriteTarget("a", -1),), "negative")],
    ids=["empty", "negative"],
)
def test_invalid_rules_are_refused(targets: tuple[RewriteTarget, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewriteRule("bad", frozenset(), targets)


def test_model_objectives() -> None:
    store = RewriteStore(model_objectives={"llama": "llama-critical"})
    assert store.objective_for("llama") == "llama-critical"
    assert store.objective_for("other") is None
    assert store.objective_for(None) is None
    store.set_model_objectives({})
    assert store.objective_for("llama") is None
