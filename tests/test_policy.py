"""The dispatcher's pure decisions, as tables."""
from __future__ import annotations

import pytest

from dispatcher.policy import Decision, GiveUp, Retry, RetryPolicy, choose_provider


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


@pytest.mark.parametrize(("requested", "previous", "default", "expected"), [
    ("stub", None, None, "stub"),
    ("gone", None, None, "gone"),
    (None, "stub", None, "stub"),
    (None, "removed", None, "file"),
    (None, None, "stub", "stub"),
    (None, None, None, "file"),
])
def test_choose_provider(requested: str | None, previous: str | None, default: str | None, expected: str) -> None:
    """Named, else the one already tried, else the default, else the first enabled."""
    assert choose_provider(requested, previous, ["file", "stub"], default) == expected
