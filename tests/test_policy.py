"""The dispatcher's pure decisions, as tables."""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from common.settings import ProviderSettings
from common.store import RoutingSnapshot
from dispatcher.policy import Decision, GiveUp, Retry, RetryPolicy, rank_providers


@pytest.mark.parametrize(("max_attempts", "made", "retryable", "expected"), [
    (3, 1, True, Retry(0.5)),
    (3, 2, True, Retry(0.5)),
    (3, 3, True, GiveUp("all 3 attempt(s) failed")),
    (3, 1, False, GiveUp("the provider refused the message for good")),
    (1, 1, True, GiveUp("all 1 attempt(s) failed")),
    (3, 4, True, GiveUp("all 3 attempt(s) failed")),
])
def test_after_failure(max_attempts: int, made: int, retryable: bool, expected: Decision) -> None:
    """Retry within the limit and only for retryable errors."""
    assert RetryPolicy(max_attempts, 0.5).after_failure(made, retryable=retryable) == expected


@pytest.mark.parametrize(("max_attempts", "made", "allowed"), [
    (3, 0, True), (3, 2, True), (3, 3, False), (1, 0, True), (1, 1, False)])
def test_may_attempt(max_attempts: int, made: int, allowed: bool) -> None:
    """Attempts already started (even by a dead dispatcher) count."""
    assert RetryPolicy(max_attempts, 0.5).may_attempt(made) is allowed


MID = uuid.UUID(int=7)
A = ProviderSettings(name="a", type="stub", priority=10)
B = ProviderSettings(name="b", type="stub", priority=20)
RU_ONLY = ProviderSettings(name="ru", type="stub", priority=5, regions=("RU",))
OFF = ProviderSettings(name="off", type="stub", enabled=False)


def rated(**ratings: float) -> dict[str, dict[str, float | bool]]:
    """Fresh ratings as the routing snapshot holds them."""
    return {name: {"rating": value, "fresh": True} for name, value in ratings.items()}


@pytest.mark.parametrize(("providers", "region", "ratings", "open_circuits", "exhausted", "current", "expected"), [
    # unrated providers count as 1.0: priority decides
    ([A, B], "RU", {}, set(), set(), None, [("a", False), ("b", False)]),
    # the better rating wins over priority
    ([A, B], "RU", rated(a=0.5, b=0.9), set(), set(), None, [("b", False), ("a", False)]),
    # ratings equal to two decimals are a tie: priority decides
    ([A, B], "RU", rated(a=0.901, b=0.899), set(), set(), None, [("a", False), ("b", False)]),
    # a rating that is no longer fresh (no attempt of the provider ended for a while) counts as none: 1.0
    ([A, B], "RU", {"a": {"rating": 0.4, "fresh": False}, "b": {"rating": 1.0, "fresh": True}}, set(), set(), None,
     [("a", False), ("b", False)]),
    ([A, B], "RU", {"a": {"rating": 0.4, "fresh": True}, "b": {"rating": 1.0, "fresh": True}}, set(), set(), None,
     [("b", False), ("a", False)]),
    # regions: a provider that does not serve the number is not a candidate
    ([RU_ONLY, A], "GB", {}, set(), set(), None, [("a", False)]),
    ([RU_ONLY, A], "RU", {}, set(), set(), None, [("ru", False), ("a", False)]),
    ([RU_ONLY], None, {}, set(), set(), None, []),
    # disabled and exhausted providers are skipped
    ([A, B, OFF], "RU", {}, set(), {"a"}, None, [("b", False)]),
    ([A, B], "RU", {}, set(), {"a", "b"}, None, []),
    # an open circuit: only as a probe (tried first: the window's single probe slot decides)
    ([A, B], "RU", {}, {"a"}, set(), None, [("a", True), ("b", False)]),
    # the provider a message is on stays first while eligible (its retries keep their interval)
    ([A, B], "RU", {}, set(), set(), "b", [("b", False), ("a", False)]),
    ([A, B], "RU", {}, {"b"}, set(), "b", [("b", True), ("a", False)]),
])
def test_rank_providers(  # pylint: disable=too-many-positional-arguments  # one per table column
        providers: list[ProviderSettings], region: str | None, ratings: dict[str, Any], open_circuits: set[str],
        exhausted: set[str], current: str | None, expected: list[tuple[str, bool]]) -> None:
    """Eligibility, rating, priority, stickiness and probes."""
    snapshot = RoutingSnapshot(ratings, open_circuits)
    assert rank_providers(MID, region=region, providers=providers, snapshot=snapshot, exhausted=exhausted,
                          current=current) == expected


def test_default_provider_wins_ties_and_ties_spread() -> None:
    """dispatcher.default_provider goes first among equals; without it, equal providers share the traffic."""
    twins = [ProviderSettings(name="x", type="stub"), ProviderSettings(name="y", type="stub")]
    empty = RoutingSnapshot({}, set())
    assert rank_providers(MID, region="RU", providers=twins, snapshot=empty, exhausted=(), current=None,
                          default="y")[0] == ("y", False)
    firsts = [rank_providers(uuid.UUID(int=i), region="RU", providers=twins, snapshot=empty, exhausted=(),
                             current=None)[0][0] for i in range(200)]
    assert 60 < firsts.count("x") < 140
