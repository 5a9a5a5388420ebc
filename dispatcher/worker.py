"""The dispatcher loop: claim due messages, call providers outside any transaction, record what happened.

One pass:

1. In one short transaction, claim up to ``batch_size`` due rows (``FOR UPDATE SKIP LOCKED``, so replicas never
   wait for or double-claim each other's rows), mark them ``sending`` under a lease and this pass's claim token,
   and record an attempt for each message that may have another one.  The attempt counts from here on: if this
   process dies, the lease runs out, another dispatcher reclaims the row, closes the attempt as abandoned and
   goes on within the same limit, so a message that kills its dispatcher cannot retry forever.
2. Call each provider concurrently, with the provider's timeout, holding no transaction and no connection.
3. Record each outcome in one statement that applies only while the claim token still matches: a dispatcher
   that was paused past its lease finds its late write rejected and drops it.

Delivery checks take the same path: a sent message whose delivery is due is claimed, its provider asked, and
the answer written under the claim.  Between passes the loop sleeps until the earliest due time (by the
database's clock), a NOTIFY from a new message, a finished send, or ``poll_interval``, whichever comes first.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, TypeVar

import aiopg

from common import store
from common.database import DatabaseUnavailable, connection, transaction
from common.domain import AttemptResult, DeliveryStatus, SendStatus
from common.phones import region_of
from common.providers import PermanentProviderError, Provider, ProviderError, Sms
from common.settings import Settings
from dispatcher.cluster import ClusterJobs
from dispatcher.policy import GiveUp, RetryPolicy, rank_providers

log = logging.getLogger("smsgate.dispatcher")
T = TypeVar("T")

NOTIFY_CHANNEL = "smsgate_due"
MIN_NAP = 0.005  # seconds; when rows are due but held by another replica, don't spin on them
LEASE_MARGIN = 0.1  # seconds of a lease kept free at its end, for the outcome's write


def claim_transaction_limit(lease_seconds: float) -> float:
    """How long a claim transaction may sit idle before the server ends it (and so releases its row locks).

    A dispatcher paused inside its claim transaction would otherwise hold its rows, skipped by every other
    replica, for as long as it is paused, and then commit a claim whose lease is already over.
    """
    return max(1.0, min(5.0, lease_seconds / 4))


@dataclass
class Plan:
    """What a pass decided for its claimed messages."""

    attempts: dict[uuid.UUID, tuple[str, int]] = field(default_factory=dict)  # id -> (provider, its attempt no.)
    give_up: dict[uuid.UUID, str] = field(default_factory=dict)               # id -> why it fails now


class Dispatcher:  # pylint: disable=too-many-instance-attributes
    """One dispatcher replica.  ``run()`` until ``stop()``; any number may share a database."""

    def __init__(self, settings: Settings, pool: aiopg.Pool, providers: dict[str, Provider], dsn: str) -> None:
        """Dispatch with ``providers`` through ``pool``; ``dsn`` is for the LISTEN connection."""
        self.settings = settings
        self.cfg = settings.dispatcher
        self.pool = pool
        self.providers = providers
        self.dsn = dsn
        self.policies = {p.name: RetryPolicy.of(p) for p in settings.providers}
        self.enabled = [name for name in settings.provider_names if name in providers]
        self.provider_settings = [p for p in settings.providers if p.name in providers]
        self.limits = {p.name: p.rate_limit_per_minute for p in self.provider_settings}
        self.window = settings.metrics.window_seconds
        self.routing = store.RoutingSnapshot({}, set())
        self._routing_read = -1e9
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self.passes = 0

    def stop(self) -> None:
        """Finish what is in flight, claim nothing more, and let ``run()`` return."""
        if not self._stopping.is_set():
            log.info("dispatcher stopping", extra={"event": "dispatcher_stopping", "in_flight": len(self._in_flight)})
        self._stopping.set()
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Sends and delivery checks under way now."""
        return len(self._in_flight)

    async def run(self) -> None:
        """Dispatch until :meth:`stop`; then wait (up to ``shutdown_grace``) for the sends in flight."""
        listener = asyncio.create_task(self._listen(), name="smsgate-listen")
        jobs = asyncio.create_task(ClusterJobs(self.settings, self.pool).run(self._stopping),
                                   name="smsgate-jobs")
        log.info("dispatcher started", extra={"event": "dispatcher_started", "providers": self.enabled})
        try:
            while not self._stopping.is_set():
                try:
                    nap = await self.run_once()
                except DatabaseUnavailable as exc:
                    log.warning("database unavailable: %s", exc, extra={"event": "database_unavailable"})
                    nap = self.cfg.poll_interval
                except Exception:  # pylint: disable=broad-exception-caught  # keep serving; the log shows the bug
                    log.exception("dispatcher pass failed", extra={"event": "dispatch_pass_failed"})
                    nap = self.cfg.poll_interval
                await self._sleep(nap)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self._drain()
            await jobs
        log.info("dispatcher stopped", extra={"event": "dispatcher_stopped"})

    async def run_once(self) -> float:
        """One pass: claim and start what is due.  Returns how long to sleep before the next pass."""
        self.passes += 1
        free = self.cfg.max_in_flight - len(self._in_flight)
        if free <= 0:
            return self.cfg.poll_interval  # a finishing send wakes the loop earlier
        batch = min(self.cfg.batch_size, free)
        token = uuid.uuid4()
        # The lease starts no earlier than this (the server's now() is taken after we begin), so a send that
        # starts by lease_end - timeout is over, by this process's own clock, before any replica may reclaim.
        lease_end = time.monotonic() + self.cfg.lease_seconds - LEASE_MARGIN
        await self._refresh_routing()
        async with transaction(self.pool) as conn:
            claimed = await store.claim_due(conn, token=token, lease=self.cfg.lease_seconds, batch=batch)
            plan = await self._plan(conn, claimed, token)
            started = {s.message_id: s for s in await store.start_attempts(
                conn, token=token, plan=[(message_id, name) for message_id, (name, _) in plan.attempts.items()])}
        for item in claimed:
            if item.id in plan.give_up:
                self._spawn(self._give_up(item, token, plan.give_up[item.id]))
            elif item.send_status is SendStatus.SENT:
                self._spawn(self._check_delivery(item, token))
            elif item.id in started:
                self._spawn(self._send(item, started[item.id], plan.attempts[item.id][1], token, lease_end))
        if len(claimed) == batch:
            return 0.0  # there may be more due right now
        async with connection(self.pool) as conn:
            wait = await store.seconds_until_due(conn)
        if wait is None:
            return self.cfg.poll_interval
        return min(max(wait, MIN_NAP), self.cfg.poll_interval)

    async def _refresh_routing(self) -> None:
        """Re-read ratings and circuit states a few times per window (they change once per window)."""
        if time.monotonic() - self._routing_read < max(0.05, self.window / 4):
            return
        async with connection(self.pool) as conn:
            self.routing = await store.routing_snapshot(conn, window=self.window)
        self._routing_read = time.monotonic()

    def _policy(self, name: str) -> RetryPolicy:
        """The retry policy of provider ``name`` (one attempt for a provider no longer configured)."""
        return self.policies.get(name, RetryPolicy(max_attempts=1, retry_interval=0))

    async def _plan(self, conn: aiopg.Connection, claimed: list[store.Claimed], token: uuid.UUID) -> Plan:
        """Decide, inside the claim transaction, what each claimed message gets: an attempt with a provider (its
        rate-limit slot taken), a return to the queue until the next window, or the end (every allowed attempt
        used).  Named providers are never swapped; the service's own choice fails over in rank order."""
        plan = Plan()
        sending = [item for item in claimed if item.send_status is SendStatus.SENDING]
        counts = await store.attempt_counts(conn, [item.id for item in sending])
        for item in sending:
            made = counts[item.id]
            exhausted = set(item.exhausted_providers) | {
                name for name, n in made.items() if not self._policy(name).may_attempt(n)}
            if item.requested_provider is not None:
                name = item.requested_provider
                if name in exhausted:
                    plan.give_up[item.id] = f"all attempts through {name} used"
                elif name in self.providers and not await self._take_slot(conn, name):
                    await self._wait(conn, item, token, f"provider {name} is at its rate limit")
                else:
                    plan.attempts[item.id] = (name, made.get(name, 0) + 1)
                continue
            ranked = rank_providers(item.id, region=region_of(item.phone), providers=self.provider_settings,
                                    snapshot=self.routing, exhausted=exhausted, current=item.provider,
                                    default=self.cfg.default_provider)
            if not ranked:
                plan.give_up[item.id] = "no eligible provider has attempts left"
                continue
            for name, probe in ranked:
                if probe and not await store.take_slot(conn, provider=f"{name}#probe", limit=1, window=self.window):
                    continue
                if await self._take_slot(conn, name):
                    plan.attempts[item.id] = (name, made.get(name, 0) + 1)
                    break
            else:
                await self._wait(conn, item, token, "every eligible provider is at its rate limit or unhealthy")
        return plan

    async def _take_slot(self, conn: aiopg.Connection, name: str) -> bool:
        """Take a rate-limit slot of ``name`` in the current window (always granted without a limit)."""
        limit = self.limits.get(name)
        return limit is None or await store.take_slot(conn, provider=name, limit=limit, window=self.window)

    async def _wait(self, conn: aiopg.Connection, item: store.Claimed, token: uuid.UUID, reason: str) -> None:
        """Put a message back in the queue until the next window."""
        await store.requeue(conn, message_id=item.id, token=token, reason=reason, window=self.window)

    async def _send(self, item: store.Claimed, started: store.Started, provider_attempt: int, token: uuid.UUID,
                    lease_end: float) -> None:
        """Make one attempt and record its outcome.

        When this process was held up (paused, starved) so long that the provider call could outlast the lease,
        the call is not made at all: another replica will reclaim the message, and a second send is worse than
        an attempt counted as abandoned.
        """
        provider = self.providers.get(started.provider)
        timeout = provider.settings.timeout if provider is not None else 0.0
        if time.monotonic() + timeout > lease_end:
            log.warning("lease too short to send; handed back unsent", extra={
                "event": "send_skipped_lease", "message_id": str(item.id), "attempt": started.number})
            # If the claim is gone too, the lease has run out and the reclaim closes the attempt instead.
            await self._write(store.release_unsent, message_id=item.id, token=token, number=started.number)
            return
        sms = Sms(message_id=item.id, phone=item.phone, text=item.text, attempt=started.number,
                  started_at=started.started_at)
        try:
            if provider is None:
                raise PermanentProviderError(f"provider {started.provider!r} is not configured")
            receipt = await provider.send(sms)
        except ProviderError as exc:
            decision = self._policy(started.provider).after_failure(provider_attempt, retryable=exc.retryable)
            if not isinstance(decision, GiveUp):
                outcome = store.Outcome(SendStatus.QUEUED, DeliveryStatus.PENDING, decision.delay)
            elif item.requested_provider is None:
                # The service chose: fail over now; the next pass picks the next eligible provider, or ends it.
                outcome = store.Outcome(SendStatus.QUEUED, DeliveryStatus.PENDING, 0.0, exhaust=started.provider)
            else:
                outcome = store.Outcome(SendStatus.FAILED, DeliveryStatus.UNDELIVERED, None)
            await self._write(store.finish_send, message_id=item.id, token=token, outcome=replace(
                outcome, number=started.number, result=AttemptResult.ERROR, error=exc.reason[:500]))
            return
        if provider.supports_delivery_reports and receipt.check_delivery_after is not None:
            outcome = store.Outcome(SendStatus.SENT, DeliveryStatus.PENDING, receipt.check_delivery_after)
        else:
            outcome = store.Outcome(SendStatus.SENT, DeliveryStatus.UNSUPPORTED, None)
        await self._write(store.finish_send, message_id=item.id, token=token,
                          outcome=replace(outcome, number=started.number, result=AttemptResult.OK))

    async def _give_up(self, item: store.Claimed, token: uuid.UUID, reason: str) -> None:
        """Mark a reclaimed message whose attempts are used up as failed."""
        log.info("message failed: %s", reason, extra={"event": "message_failed", "message_id": str(item.id)})
        await self._write(store.finish_send, message_id=item.id, token=token,
                          outcome=store.Outcome(SendStatus.FAILED, DeliveryStatus.UNDELIVERED, None))

    async def _check_delivery(self, item: store.Claimed, token: uuid.UUID) -> None:
        """Ask the provider about a sent message's delivery and record the answer."""
        provider = self.providers.get(item.provider or "")
        assert item.sent_at is not None
        if provider is None:
            # The provider was removed from the settings since: nobody can tell any more.
            status, delivered_at, again = DeliveryStatus.UNSUPPORTED, None, None
        else:
            try:
                report = await provider.check_delivery(item.id, item.sent_at, item.now)
                status, delivered_at, again = report.status, report.delivered_at, report.check_again_after
            except (ProviderError, TimeoutError) as exc:
                log.warning("delivery check failed: %s", exc, extra={"event": "delivery_check_failed",
                                                                     "message_id": str(item.id)})
                status, delivered_at, again = DeliveryStatus.PENDING, None, self.cfg.poll_interval
        if status is DeliveryStatus.PENDING and again is None:
            again = self.cfg.poll_interval
        if status is not DeliveryStatus.PENDING:
            log.info("delivery %s", status.value, extra={"event": "delivery_recorded", "message_id": str(item.id),
                                                         "provider": item.provider, "delivery_status": status.value})
        await self._write(store.finish_delivery_check, message_id=item.id, token=token, delivery_status=status,
                          delivered_at=delivered_at, due_in=again if status is DeliveryStatus.PENDING else None)

    async def _write(self, write: Callable[..., Awaitable[T]], **values: object) -> T | None:
        """Run one finishing write, retrying while the database is away, for at most the lease.

        Giving up is safe: the lease then runs out and another pass reclaims the message.
        """
        deadline = time.monotonic() + self.cfg.lease_seconds
        delay = 0.05
        while True:
            try:
                async with connection(self.pool) as conn:
                    result = await write(conn, **values)
            except DatabaseUnavailable as exc:
                if time.monotonic() + delay >= deadline:
                    log.error("could not record an outcome: %s", exc, extra={"event": "write_lost"})
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if result is False:
                log.warning("claim lost; late write rejected", extra={
                    "event": "stale_write_rejected", "message_id": str(values.get("message_id"))})
            return result

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the background, counted as in flight; its end wakes the loop."""
        async def wrapped() -> None:
            try:
                await work
            except Exception:  # pylint: disable=broad-exception-caught  # one message must not stop the loop
                log.exception("unexpected error while dispatching", extra={"event": "dispatch_error"})

        task = asyncio.create_task(wrapped())
        self._in_flight.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._in_flight.discard(finished)
            self._wake.set()  # a slot is free, and a retry may now be the earliest due time

        task.add_done_callback(done)

    async def _sleep(self, seconds: float) -> None:
        """Sleep until woken or ``seconds`` pass."""
        if seconds <= 0 or self._stopping.is_set():
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _drain(self) -> None:
        """Wait for the sends in flight, at most ``shutdown_grace``; leases cover any that are cut off."""
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=self.cfg.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _listen(self) -> None:
        """LISTEN for new messages and wake the loop; reconnect with back-off when the connection drops."""
        delay = 0.1
        while True:
            try:
                async with aiopg.connect(self.dsn, timeout=5) as conn:
                    async with conn.cursor() as cur:
                        await cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    delay = 0.1
                    self._wake.set()  # anything inserted while not listening
                    while True:
                        await conn.notifies.get()
                        self._wake.set()
            except Exception as exc:  # pylint: disable=broad-exception-caught  # polling still covers us
                log.debug("listen connection lost: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
