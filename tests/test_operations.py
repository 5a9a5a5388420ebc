"""Operations: cluster-wide window counters and /metrics, outage alerts by email and webhook, Pushgateway,
the dispatcher's health port."""
from __future__ import annotations

import asyncio
import socket
import threading
from email import message_from_bytes
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from common.settings import Settings
from dispatcher.cluster import ClusterJobs
from dispatcher.health import start_health_server
from tests.conftest import ClientFactory
from tests.helpers import Dispatchers, make_settings, wait_until
from tests.test_dispatcher import all_final, insert, rows


ADMINS = ["ops@example.com", "oncall@example.com"]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Inbox:
    """An aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        """Start empty."""
        self.received: list[tuple[list[str], str]] = []
        self.lock = threading.Lock()

    # pylint: disable-next=invalid-name,unused-argument  # aiosmtpd's hook name and signature
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        """Keep (recipients, subject)."""
        subject = str(message_from_bytes(envelope.content)["Subject"])
        with self.lock:
            self.received.append((list(envelope.rcpt_tos), subject))
        return "250 OK"

    def by_admin(self) -> dict[str, list[str]]:
        """Subjects each recipient got."""
        with self.lock:
            result: dict[str, list[str]] = {}
            for recipients, subject in self.received:
                for rcpt in recipients:
                    result.setdefault(rcpt, []).append(subject)
            return result


@pytest.fixture(name="smtp")
def fixture_smtp() -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server on loopback."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@pytest.fixture(name="hooks")
async def fixture_hooks(aiohttp_server: Any) -> AsyncIterator[tuple[list[Any], str]]:
    """A webhook receiver and fake Pushgateway on loopback: what they received, and their base URL."""
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(("hook", await request.json()))
        return web.Response(status=204)

    async def push(request: web.Request) -> web.Response:
        received.append(("push", request.path, await request.text()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_route("PUT", "/metrics/job/{job}", push)
    server = await aiohttp_server(app)
    yield received, f"http://127.0.0.1:{server.port}"


async def stats_cover_everything(pool: aiopg.Pool) -> bool:
    """True when every attempt and delivery so far lies before the statistics job's progress mark."""
    [row] = await rows(pool, """
        SELECT (SELECT done_until FROM cluster_jobs) >= GREATEST(
                   (SELECT max(finished_at) FROM attempts), (SELECT max(started_at) FROM attempts),
                   (SELECT max(updated_at) FROM messages WHERE delivery_status = 'delivered')) AS covered""")
    return bool(row["covered"])


async def exposed_counters(api: TestClient[web.Request, web.Application]) -> dict[tuple[str, str], float]:
    """The *_total samples of /metrics, parsed with prometheus_client's own parser, by (name, provider)."""
    exposed: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(await (await api.get("/metrics")).text()):
        for sample in family.samples:
            if sample.name.endswith("_total") and "provider" in sample.labels:
                exposed[(sample.name, sample.labels["provider"])] = sample.value
    return exposed


async def test_window_counters_match_the_attempts_with_two_replicas(
        pool: aiopg.Pool, dispatchers: Dispatchers, aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """Two replicas count each window once: totals, window rows and /metrics all equal what was recorded."""
    settings = make_settings(tmp_path, metrics={"window_seconds": 0.3},
                             providers={"file": {"retry_interval": 0.05}})
    await insert(pool, 40, "+79991234568", "file")
    await insert(pool, 40, "+79991234567", "file")
    await insert(pool, 40, "+79991234561", "stub")
    await dispatchers.start(settings, count=2)
    await wait_until(lambda: all_final(pool), within=15)
    await wait_until(lambda: stats_cover_everything(pool), within=10)
    truth = {r["provider"]: r for r in await rows(pool, """
        SELECT a.provider, count(*) AS attempts, count(*) FILTER (WHERE result = 'ok') AS sent,
               count(*) FILTER (WHERE result = 'error') AS failed,
               (SELECT count(*) FROM messages m WHERE m.provider = a.provider
                 AND m.delivery_status = 'delivered') AS delivered
        FROM attempts a GROUP BY a.provider""")}
    assert truth["file"]["attempts"] == 40 + 120 and truth["file"]["delivered"] == 40
    totals = {r["provider"]: r for r in await rows(pool, "SELECT * FROM provider_totals")}
    windows = {r["provider"]: r for r in await rows(pool, """
        SELECT provider, sum(attempts) AS attempts, sum(sent) AS sent, sum(failed) AS failed,
               sum(delivered) AS delivered FROM provider_window_stats GROUP BY provider""")}
    exposed = await exposed_counters(await aiohttp_client(create_app(settings, dsn)))
    for provider in ("file", "stub"):
        for column, metric in (("attempts", "smsgate_attempts_total"), ("sent", "smsgate_sent_total"),
                               ("failed", "smsgate_failed_attempts_total"), ("delivered", "smsgate_delivered_total")):
            assert totals[provider][column] == windows[provider][column] == truth[provider][column], (provider, column)
            assert exposed[(metric, provider)] == truth[provider][column], (provider, metric)


async def test_metrics_gauges_and_database_down(aiohttp_client: ClientFactory, pool: aiopg.Pool, dsn: str,
                                                tmp_path: Path) -> None:
    """Waiting messages and lag are live gauges; without the database the request metrics still answer."""
    await insert(pool, 3, "+79991234568", "stub")
    api = await aiohttp_client(create_app(make_settings(tmp_path), dsn))
    text = await (await api.get("/metrics")).text()
    samples = {(s.name, s.labels.get("provider")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("smsgate_messages_waiting", "stub")] == 3
    assert samples[("smsgate_oldest_waiting_seconds", "stub")] >= 0
    assert samples[("smsgate_dispatch_lag_seconds", None)] >= 0
    assert samples[("smsgate_cluster_metrics_up", None)] == 1
    down = await aiohttp_client(create_app(make_settings(tmp_path), f"host={tmp_path} port=1 dbname=x user=x"))
    resp = await down.get("/metrics")
    assert resp.status == 200 and "smsgate_cluster_metrics_up 0" in await resp.text()


def assert_one_outage_and_recovery_each(inbox: Inbox, admins: list[str]) -> None:
    """Each admin got one outage and one recovery email for the provider and for all providers."""
    for admin in admins:
        subjects = sorted(inbox.by_admin()[admin])
        assert len(subjects) == 4, subjects
        assert sum("OUTAGE" in s and "provider file" in s for s in subjects) == 1
        assert sum("OUTAGE" in s and "every provider" in s for s in subjects) == 1
        assert sum("RECOVERED" in s for s in subjects) == 2


async def test_outage_sends_one_email_per_admin_and_one_on_recovery(
        pool: aiopg.Pool, dispatchers: Dispatchers, tmp_path: Path, smtp: tuple[Inbox, int],
        hooks: tuple[list[Any], str]) -> None:
    """Every file attempt failing for a whole (short) alert window: with two replicas, each admin gets exactly
    one outage email per scope (the provider, and all providers), then exactly one recovery email each."""
    inbox, port = smtp
    received, base = hooks
    settings = make_settings(
        tmp_path, metrics={"window_seconds": 0.2, "pushgateway_url": base},
        providers={"file": {"retry_interval": 0.05, "max_attempts": 2}},
        alerts={"window_minutes": 0.8 / 60, "admins": ADMINS, "smtp_host": "127.0.0.1", "smtp_port": port,
                "sender": "smsgate@example.com", "webhook_url": f"{base}/hook"})
    await dispatchers.start(settings, count=2)
    for _ in range(8):  # failures spread over more than one alert window
        await insert(pool, 2, "+79991234567", "file")
        await asyncio.sleep(0.15)

    async def outage_mailed() -> bool:
        return all(len(subjects) == 2 for subjects in inbox.by_admin().values()) and len(inbox.by_admin()) == 2
    await wait_until(outage_mailed, within=10)
    await insert(pool, 2, "+79991234568", "file")

    async def recovery_mailed() -> bool:
        return all(len(subjects) == 4 for subjects in inbox.by_admin().values())
    await wait_until(recovery_mailed, within=10)
    await asyncio.sleep(1.0)  # several more ticks of both replicas: nothing more may arrive
    assert_one_outage_and_recovery_each(inbox, ADMINS)
    hook_events = sorted((r[1]["event"], r[1]["scope"]) for r in received if r[0] == "hook")
    assert hook_events == [("outage", "*"), ("outage", "file"), ("recovery", "*"), ("recovery", "file")]
    pushes = [r for r in received if r[0] == "push"]
    assert pushes and pushes[-1][1] == "/metrics/job/smsgate" and "smsgate_attempts_total" in pushes[-1][2]
    alerts = await rows(pool, "SELECT scope, recovered_at, outage_notified_at, recovery_notified_at FROM alerts")
    assert sorted(a["scope"] for a in alerts) == ["*", "file"]
    assert all(a["recovered_at"] and a["outage_notified_at"] and a["recovery_notified_at"] for a in alerts)


async def test_notifications_survive_a_dead_channel(pool: aiopg.Pool, tmp_path: Path,
                                                    smtp: tuple[Inbox, int]) -> None:
    """SMTP down: the alert stays pending (nothing lost); once the claim runs out, another try delivers it."""
    inbox, port = smtp
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("INSERT INTO alerts (scope) VALUES ('file')")
    broken = make_settings(tmp_path, alerts={"admins": ["ops@example.com"], "smtp_host": "127.0.0.1",
                                             "smtp_port": free_port()})
    assert await ClusterJobs(broken, pool).send_notifications() == 0
    [pending] = await rows(pool, "SELECT outage_notified_at, claimed_until FROM alerts")
    assert pending["outage_notified_at"] is None and pending["claimed_until"] is not None
    working = make_settings(tmp_path, alerts={"admins": ["ops@example.com"], "smtp_host": "127.0.0.1",
                                              "smtp_port": port})
    assert await ClusterJobs(working, pool).send_notifications() == 0  # still claimed by the failed try
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE alerts SET claimed_until = now() - interval '1 second'")
    assert await ClusterJobs(working, pool).send_notifications() == 1
    assert [s for _, s in inbox.received] == ["[smsgate] OUTAGE: provider file: no successful send for 60 min"]


async def test_dispatcher_health_port(pool: aiopg.Pool, settings: Settings) -> None:
    """/health, /ready and /metrics on the dispatcher's own port."""
    from common.providers import build_providers  # pylint: disable=import-outside-toplevel
    from dispatcher.worker import Dispatcher  # pylint: disable=import-outside-toplevel

    port = free_port()
    runner = await start_health_server(Dispatcher(settings, pool, build_providers(settings), ""), "127.0.0.1", port)
    try:
        import aiohttp  # pylint: disable=import-outside-toplevel
        async with aiohttp.ClientSession() as session:
            for path, expected in (("/health", 200), ("/ready", 200), ("/metrics", 200)):
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == expected
                    if path == "/metrics":
                        assert "smsgate_dispatcher_in_flight 0.0" in await resp.text()
    finally:
        await runner.cleanup()
