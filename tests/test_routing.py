"""Routing across providers: rate limits shared by replicas, overflow, circuit breaking, regions, failover,
ratings, and the providers API.  Windows are a fraction of a second long here (metrics.window_seconds)."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiopg
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from common import store
from common.providers import Provider, ProviderError, SendReceipt, Sms, register
from common.settings import ProviderSettings
from dispatcher.policy import rank_providers
from tests.conftest import ClientFactory
from tests.helpers import Dispatchers, auth, make_settings, wait_until
from tests.test_dispatcher import all_final, insert, message, rows

Client = TestClient[web.Request, web.Application]


@register("switch_test")
class SwitchProvider(Provider):
    """Fails every attempt while ``failing`` holds (class-wide, so a test can flip it)."""

    failing = False

    def configure(self, options: Any) -> None:
        """No options."""

    async def _send(self, sms: Sms) -> SendReceipt:
        """Succeed, or fail while switched to failing."""
        if SwitchProvider.failing:
            raise ProviderError("switched to failing")
        return SendReceipt()


async def attempts_per_window(pool: aiopg.Pool, window: float) -> list[dict[str, Any]]:
    """Attempts started per (window, provider)."""
    return await rows(pool, "SELECT smsgate_window(started_at, %s) AS w, provider, count(*) AS n FROM attempts "
                            "GROUP BY 1, 2 ORDER BY 1, 2", window)


async def test_a_rate_limit_holds_across_three_replicas(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                        tmp_path: Path) -> None:
    """Limit 5 per window, three replicas, messages naming the provider: no window carries more than 5; the
    ones held back wait as queued with a reason, and all go out in later windows."""
    window = 0.5
    settings = make_settings(tmp_path, metrics={"window_seconds": window},
                             providers={"stub": {"rate_limit_per_minute": 5}})
    ids = await insert(pool, 20, "+79991234561", "stub")
    await dispatchers.start(settings, count=3)

    async def someone_waits() -> bool:
        waiting = await rows(pool, "SELECT waiting_reason FROM messages WHERE waiting_reason IS NOT NULL")
        return bool(waiting) and "rate limit" in waiting[0]["waiting_reason"]
    await wait_until(someone_waits, within=3)
    await wait_until(lambda: all_final(pool), within=15)
    counts = await attempts_per_window(pool, window)
    assert max(c["n"] for c in counts) <= 5 and sum(c["n"] for c in counts) == len(ids)
    assert len(counts) >= 4
    assert not await rows(pool, "SELECT id FROM messages WHERE waiting_reason IS NOT NULL")


async def test_the_service_overflows_to_another_provider(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                         tmp_path: Path) -> None:
    """A chosen provider at its limit hands the rest to the next one at once; nobody waits."""
    settings = make_settings(tmp_path, metrics={"window_seconds": 30.0},
                             providers={"stub": {"rate_limit_per_minute": 3, "priority": 1},
                                        "backup": {"type": "stub", "timeout": 1.0, "priority": 2},
                                        "file": {"enabled": False}})
    await insert(pool, 10, "+79991234561", None)
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    used = {r["provider"]: r["n"] for r in await rows(pool, "SELECT provider, count(*) AS n FROM attempts "
                                                            "GROUP BY provider")}
    assert used == {"stub": 3, "backup": 7}


async def test_failover_after_exhausted_attempts_shows_both_providers(
        pool: aiopg.Pool, dispatchers: Dispatchers, tmp_path: Path) -> None:
    """The service chose file (preferred), which failed its three attempts: the message moves to stub and goes
    out; a message that named file never moves."""
    settings = make_settings(tmp_path, providers={"file": {"priority": 1, "retry_interval": 0.05},
                                                  "stub": {"priority": 2}})
    [chosen] = await insert(pool, 1, "+79991234567", None)
    [named] = await insert(pool, 1, "+79991234567", "file")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    moved = await message(pool, chosen)
    assert [(a["provider"], a["result"]) for a in moved["attempts"]] == [
        ("file", "error"), ("file", "error"), ("file", "error"), ("stub", "ok")]
    assert (moved["send_status"], moved["provider"], moved["requested_provider"]) == ("sent", "stub", None)
    stayed = await message(pool, named)
    assert stayed["send_status"] == "failed" and {a["provider"] for a in stayed["attempts"]} == {"file"}


async def test_a_failing_provider_loses_chosen_traffic_and_gets_it_back(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                                        tmp_path: Path) -> None:
    """Every attempt failing: within a window its circuit opens and chosen traffic goes elsewhere, but for one
    probe per window; once a probe succeeds, the circuit closes and the traffic returns."""
    window = 0.4
    settings = make_settings(tmp_path, metrics={"window_seconds": window},
                             providers={"flaky": {"type": "switch_test", "priority": 1, "timeout": 1.0,
                                                  "max_attempts": 1},
                                        "stub": {"priority": 2}, "file": {"enabled": False}})
    SwitchProvider.failing = True
    try:
        await dispatchers.start(settings)

        async def feed(seconds: float) -> None:
            for _ in range(int(seconds / 0.1)):
                await insert(pool, 2, "+79991234561", None)
                await asyncio.sleep(0.1)
        await feed(2.0)
        failing = await attempts_per_window(pool, window)
        flaky = [c["n"] for c in failing if c["provider"] == "flaky"]
        # The first windows carry flaky's failures; once its circuit opened, one probe per window at most.
        assert max(flaky[2:]) <= 1, failing
        assert sum(c["n"] for c in failing if c["provider"] == "stub") > 10
        SwitchProvider.failing = False
        await feed(2.0)
        await wait_until(lambda: all_final(pool), within=5)
        recovered = await attempts_per_window(pool, window)
        assert max(c["n"] for c in recovered[-4:] if c["provider"] == "flaky") > 1, recovered
        stuck = await rows(pool, "SELECT count(*) AS n FROM messages WHERE send_status <> 'sent'")
        assert stuck[0]["n"] == 0
    finally:
        SwitchProvider.failing = False


async def test_ratings_are_computed_per_window(pool: aiopg.Pool, dispatchers: Dispatchers, tmp_path: Path) -> None:
    """delivered / attempts per window: 1.0 for a provider without delivery reports that sends everything, 0
    for one that fails everything; one row per window and provider with three replicas."""
    settings = make_settings(tmp_path, metrics={"window_seconds": 0.3},
                             providers={"file": {"retry_interval": 0.05}})
    await insert(pool, 10, "+79991234561", "stub")
    await insert(pool, 5, "+79991234567", "file")
    await dispatchers.start(settings, count=3)
    await wait_until(lambda: all_final(pool), within=5)

    async def rated() -> bool:
        done = await rows(pool, "SELECT done_until > (SELECT max(finished_at) FROM attempts) AS ok FROM cluster_jobs")
        return bool(done and done[0]["ok"])
    await wait_until(rated, within=5)
    ratings = await rows(pool, "SELECT * FROM provider_window_stats WHERE rating IS NOT NULL")
    assert not await rows(pool, "SELECT 1 FROM provider_window_stats WHERE sent + failed = 0 AND rating IS NOT NULL")
    assert {r["rating"] for r in ratings if r["provider"] == "stub"} == {1.0}, ratings
    assert {r["rating"] for r in ratings if r["provider"] == "file"} == {0.0}, ratings


async def test_a_delivery_after_the_window_still_rates_the_send(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                                tmp_path: Path) -> None:
    """A provider whose deliveries arrive windows after its sends (file: delivery_delay) is rated by what became
    of the attempts that ended in each window, not by the deliveries that happened to land in it: 1.0, never 0."""
    settings = make_settings(tmp_path, metrics={"window_seconds": 0.3}, providers={"file": {"delivery_delay": 1.0}})
    await insert(pool, 5, "+79991234568", "file")
    await dispatchers.start(settings, count=2)

    async def delivered_and_rated() -> bool:
        done = await rows(pool, "SELECT done_until > (SELECT max(delivered_at) FROM messages) AS ok FROM cluster_jobs "
                                "WHERE (SELECT count(*) FROM messages WHERE delivery_status = 'delivered') = 5")
        return bool(done and done[0]["ok"])
    await wait_until(delivered_and_rated, within=8)
    windows = await rows(pool, "SELECT * FROM provider_window_stats WHERE provider = 'file' ORDER BY window_start")
    sending = [w for w in windows if w["sent"] > 0]
    assert sending and all(w["delivered"] == 0 and w["rating"] == 1.0 for w in sending), windows
    delivering = [w for w in windows if w["delivered"] > 0]
    assert sum(w["delivered"] for w in delivering) == 5 and all(w["rating"] is None for w in delivering), windows


async def test_a_rating_stops_ranking_once_it_is_old(pool: aiopg.Pool) -> None:
    """A provider's latest rating is fresh for five windows; after that it ranks as unrated, so a provider that
    had one bad window and then no traffic is chosen again (and rated again) instead of never."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("INSERT INTO provider_window_stats (window_start, provider, attempts, sent, failed, "
                          "delivered, rating) VALUES (now() - interval '1 minute', 'recent', 5, 2, 3, 0, 0.4), "
                          "(now() - interval '6 minutes', 'old', 5, 2, 3, 0, 0.4)")
    async with pool.acquire() as conn:
        snapshot = await store.routing_snapshot(conn, window=60.0)
    assert snapshot.ratings["recent"]["fresh"] is True and snapshot.ratings["old"]["fresh"] is False
    settings = [ProviderSettings(name=n, type="stub") for n in ("recent", "old", "other")]
    ranked = rank_providers(uuid.UUID(int=1), region="RU", providers=settings, snapshot=snapshot, exhausted=(),
                            current=None)
    assert ranked[-1] == ("recent", False) and {name for name, _ in ranked[:2]} == {"old", "other"}


async def test_region_rules_on_post(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """A named provider that does not serve the number's country: 422 provider_region_mismatch; no provider
    serving it: 422 no_provider_for_region."""
    settings = make_settings(tmp_path, providers={"file": {"regions": ["RU", "KZ"]}, "stub": {"regions": ["KZ"]}})
    api: Client = await aiohttp_client(create_app(settings, dsn))
    gb = "+442079460958"
    resp = await api.post("/api/v1/messages", json={"phone": gb, "text": "x", "provider": "file"}, headers=auth())
    body = await resp.json()
    assert (resp.status, body["code"]) == (422, "provider_region_mismatch") and "provider" in body["errors"]
    resp = await api.post("/api/v1/messages", json={"phone": gb, "text": "x"}, headers=auth())
    body = await resp.json()
    assert (resp.status, body["code"]) == (422, "no_provider_for_region") and "phone" in body["errors"]
    resp = await api.post("/api/v1/messages", json={"phone": "+79991234568", "text": "x"}, headers=auth())
    assert resp.status == 201


async def test_the_service_only_chooses_providers_serving_the_region(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                                     tmp_path: Path) -> None:
    """Russian numbers go to the provider serving RU, British ones to the one serving GB."""
    settings = make_settings(tmp_path, providers={"file": {"regions": ["GB"]}, "stub": {"regions": ["RU"]}})
    ru = await insert(pool, 5, "+79991234561", None)
    gb = await insert(pool, 5, "+442079460958", None)
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    assert {(await message(pool, i))["provider"] for i in ru} == {"stub"}
    assert {(await message(pool, i))["provider"] for i in gb} == {"file"}


async def test_providers_api_shows_state_and_history(aiohttp_client: ClientFactory, pool: aiopg.Pool,
                                                     dispatchers: Dispatchers, dsn: str, tmp_path: Path) -> None:
    """/api/v1/providers: settings, regions, this window's counts, rate-limit usage, rating, circuit;
    /api/v1/providers/<name>/stats: the per-window history."""
    settings = make_settings(tmp_path, metrics={"window_seconds": 0.3},
                             providers={"stub": {"rate_limit_per_minute": 100, "regions": ["RU"]}})
    await insert(pool, 4, "+79991234561", "stub")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    api: Client = await aiohttp_client(create_app(settings, dsn))

    async def rated() -> bool:
        body = await (await api.get("/api/v1/providers", headers=auth())).json()
        return bool(next(p for p in body["items"] if p["name"] == "stub")["rating"] == 1.0)
    await wait_until(rated, within=5)
    stub = next(p for p in (await (await api.get("/api/v1/providers", headers=auth())).json())["items"]
                if p["name"] == "stub")
    assert stub["regions"] == ["RU"] and stub["rate_limit_per_minute"] == 100 and stub["circuit"] == "closed"
    assert set(stub["current_window"]) == {"attempts", "sent", "failed", "delivered"}
    assert stub["rated_at"] and stub["window_seconds"] == 0.3 and stub["rate_limit_used"] >= 0
    history = await (await api.get("/api/v1/providers/stub/stats?minutes=5", headers=auth())).json()
    assert sum(w["attempts"] for w in history["items"]) == 4 and history["provider"] == "stub"
    assert (await api.get("/api/v1/providers/pigeon/stats", headers=auth())).status == 404
    assert (await api.get("/api/v1/providers/stub/stats?minutes=0", headers=auth())).status == 422
    assert uuid.UUID(str((await rows(pool, "SELECT id FROM messages LIMIT 1"))[0]["id"]))
