"""Pure decisions of the dispatcher: which providers to try, whether to start another attempt, and what a failed
attempt leads to.  No I/O here, so ``tests/test_policy.py`` can check every rule as a table.
"""
from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from typing import Collection, Sequence

from common.settings import ProviderSettings
from common.store import RoutingSnapshot


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


def rank_providers(message_id: uuid.UUID, *, region: str | None, providers: Sequence[ProviderSettings],
                   snapshot: RoutingSnapshot, exhausted: Collection[str], current: str | None,
                   default: str | None = None) -> list[tuple[str, bool]]:
    """The providers to try for a message the service routes, best first, as (name, only_as_probe).

    Eligible: enabled, serving the number's region, not exhausted for this message.  Ranked by the latest
    stability rating (to two decimals; a provider not rated yet, or whose rating is no longer fresh, counts as
    1.0: it gets a share of the traffic again and so a new rating), then ``default``, then
    ``priority`` (lower first), then a hash of (message, provider) that spreads ties evenly.  The provider the
    message is already on stays first while it is eligible, so its retries keep their interval.  Providers
    whose circuit is open are listed first but only as probes: the dispatcher sends to one only when it wins
    that provider's single probe slot of the window (cluster-wide), so a failing provider gets one message a
    window, and recovers its traffic once a probe succeeds.
    """
    def key(p: ProviderSettings) -> tuple[float, int, int, int]:
        rated = snapshot.ratings.get(p.name)
        if rated is None or rated["rating"] is None or not rated["fresh"]:
            rating = 1.0
        else:
            rating = float(rated["rating"])
        spread = zlib.crc32(f"{message_id}/{p.name}".encode())
        return -round(rating, 2), 0 if p.name == default else 1, p.priority, spread

    eligible = sorted((p for p in providers if p.enabled and p.serves(region) and p.name not in exhausted), key=key)
    closed = [p.name for p in eligible if p.name not in snapshot.open_circuits]
    if current in closed:
        closed.remove(current)
        closed.insert(0, current)
    probes = [p.name for p in eligible if p.name in snapshot.open_circuits]
    return [(name, True) for name in probes] + [(name, False) for name in closed]
