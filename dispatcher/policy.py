"""Pure decisions of the dispatcher: which provider to use, whether to start another attempt, and what a failed
attempt leads to.  No I/O here, so ``tests/test_policy.py`` can check every rule as a table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from common.settings import ProviderSettings


@dataclass(frozen=True)
class Retry:
    """Try again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Stop: the message has failed."""

    reason: str


Decision = Retry | GiveUp


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one provider is tried."""

    max_attempts: int
    retry_interval: float

    @classmethod
    def of(cls, settings: ProviderSettings) -> RetryPolicy:
        """The policy a provider's settings describe."""
        return cls(max_attempts=settings.max_attempts, retry_interval=settings.retry_interval)

    def may_attempt(self, attempts_made: int) -> bool:
        """True while another attempt is allowed.  Attempts a dead dispatcher started count too."""
        return attempts_made < self.max_attempts

    def after_failure(self, attempts_made: int, *, retryable: bool) -> Decision:
        """What follows a failed attempt, ``attempts_made`` counting it."""
        if not retryable:
            return GiveUp("the provider refused the message for good")
        if not self.may_attempt(attempts_made):
            return GiveUp(f"all {self.max_attempts} attempt(s) failed")
        return Retry(self.retry_interval)


def choose_provider(requested: str | None, previous: str | None, enabled: Sequence[str],
                    default: str | None) -> str:
    """The provider for a message's next attempt.

    The rule until real routing arrives: the provider the client named (even when it is not configured any
    more; the attempt then fails for good with that reason); else the one already tried, so that a message's
    attempts stay with one provider; else ``default``; else the first enabled provider in the settings.
    """
    if requested is not None:
        return requested
    if previous is not None and previous in enabled:
        return previous
    return default if default is not None else enabled[0]
