"""Work done once for the whole cluster, by whichever dispatcher replica gets to it first.

Every replica ticks a few times per statistics window.  A tick takes a transaction-scoped advisory lock with
``pg_try_advisory_xact_lock``: the replica that gets it computes every window that has closed (counts per
provider, running totals), decides which outages opened or ended, and commits it all at once; the others skip.
Notifications are then claimed row by row (``FOR UPDATE SKIP LOCKED`` with a short lease), sent, and marked,
so an alert whose replica died before notifying is picked up by another, and none is sent twice unless a
replica dies between sending and marking.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from urllib.parse import urlsplit

import aiopg
from prometheus_client import push_to_gateway

from common import store
from common.database import DatabaseUnavailable, connection, transaction
from common.metrics import cluster_registry
from common.settings import Settings
from dispatcher.alerts import NotificationFailed, Notifier

log = logging.getLogger("smsgate.cluster")
MAX_WINDOWS_PER_RUN = 1440   # a day of minutes: a long-stopped cluster catches up in bounded steps
NOTIFY_LEASE = 60.0          # seconds a replica has to send a notification before another may


class ClusterJobs:
    """Statistics windows, outage alerts and metric pushes for the cluster; run by every dispatcher."""

    def __init__(self, settings: Settings, pool: aiopg.Pool) -> None:
        """Work through ``pool``."""
        self.settings = settings
        self.pool = pool
        self.window = settings.metrics.window_seconds
        # A window is computed once it has been closed this long: writes stamped inside it have landed by then.
        self.grace = min(5.0, self.window / 2)
        self.notifier = Notifier(settings.alerts)

    @property
    def tick_seconds(self) -> float:
        """How often each replica tries."""
        return max(0.05, self.window / 4)

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick until ``stopping`` is set; trouble with the database or a channel is logged and retried."""
        while not stopping.is_set():
            try:
                await self.tick()
            except DatabaseUnavailable as exc:
                log.warning("cluster jobs: database unavailable: %s", exc, extra={"event": "database_unavailable"})
            except Exception:  # pylint: disable=broad-exception-caught  # the dispatcher must keep sending
                log.exception("cluster jobs failed", extra={"event": "cluster_jobs_failed"})
            try:
                await asyncio.wait_for(stopping.wait(), self.tick_seconds)
            except TimeoutError:
                pass

    async def tick(self) -> store.WindowRun | None:
        """Compute closed windows and alerts if no other replica is; then send pending notifications."""
        async with transaction(self.pool) as conn:
            run = await store.compute_windows(conn, window=self.window, grace=self.grace,
                                              max_windows=MAX_WINDOWS_PER_RUN)
            if run is not None:
                await self._evaluate_alerts(conn, run)
                await store.prune_idempotency_keys(conn)
        if run is not None and self.settings.metrics.pushgateway_url:
            await self._push()
        await self.send_notifications()
        return run

    async def _evaluate_alerts(self, conn: aiopg.Connection, run: store.WindowRun) -> None:
        """Open an outage for each scope with attempts but no success over the whole alert window; close the
        open ones that succeeded in the windows just computed."""
        recent = await store.scope_activity(conn, start=run.start, until=run.until)
        for scope in await store.open_alert_scopes(conn):
            if int(recent.get(scope, {}).get("sent") or 0) > 0 and await store.recover_alert(conn, scope):
                log.info("outage over: %s", scope, extra={"event": "outage_recovered", "scope": scope})
        since = run.until - dt.timedelta(minutes=self.settings.alerts.window_minutes)
        if since < run.first_window:
            return  # the cluster has not watched a whole alert window yet
        for scope, row in (await store.scope_activity(conn, start=since, until=run.until)).items():
            if int(row["attempts"] or 0) > 0 and int(row["sent"] or 0) == 0 and await store.open_alert(conn, scope):
                log.warning("outage: %s", scope, extra={"event": "outage_detected", "scope": scope})

    async def send_notifications(self) -> int:
        """Send every notification no replica has sent; returns how many alerts were handled."""
        async with transaction(self.pool) as conn:
            pending = await store.claim_notifications(conn, lease=NOTIFY_LEASE)
        handled = 0
        for alert in pending:
            try:
                if alert["outage_notified_at"] is None:
                    await self.notifier.send(alert, "outage")
                if alert["recovered_at"] is not None:
                    await self.notifier.send(alert, "recovery")
            except NotificationFailed as exc:
                log.error("alert notification failed, will retry: %s", exc, extra={"event": "alert_failed"})
                continue  # the claim runs out and a later tick tries again
            async with connection(self.pool) as conn:
                await store.mark_notified(conn, alert["id"])
            handled += 1
        return handled

    async def _push(self) -> None:
        """Push the cluster's metrics to the Pushgateway (one replica per window does this)."""
        url = self.settings.metrics.pushgateway_url
        assert url is not None
        async with connection(self.pool) as conn:
            totals, waiting, lag = await store.metrics_snapshot(conn)
        registry = cluster_registry(totals, waiting, lag, self.settings.provider_names)
        try:
            await asyncio.to_thread(push_to_gateway, url, job=self.settings.metrics.pushgateway_job,
                                    registry=registry, timeout=5)
        except OSError as exc:
            log.warning("pushgateway %s: %s", urlsplit(url).netloc, exc, extra={"event": "push_failed"})
