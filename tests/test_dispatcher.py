"""Dispatchers against a real PostgreSQL: sending, retries, delivery, replicas, crashes and stale writes."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiopg
import pytest

from common import store
from common.database import DatabaseUnavailable, connection, create_pool, transaction
from common.domain import AttemptResult, DeliveryStatus, SendStatus
from common.providers import Provider, SendReceipt, Sms, register
from common.settings import PROJECT_ROOT, Settings
from tests.helpers import Dispatchers, make_settings, wait_until


@register("slow_test")
class SlowProvider(Provider):
    """Takes ``delay`` seconds per send (an option), for tests of in-flight work."""

    delay = 0.3

    def configure(self, options: Any) -> None:
        """Accepts ``delay``."""
        self.delay = float(dict(options).pop("delay", 0.3))

    async def _send(self, sms: Sms) -> SendReceipt:
        """Sleep, then succeed."""
        await asyncio.sleep(self.delay)
        return SendReceipt()


async def insert(pool: aiopg.Pool, count: int, phone: str, provider: str | None,
                 user: str = "alice") -> list[uuid.UUID]:
    """Insert ``count`` queued messages in one statement, as the API would one by one."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO messages (username, phone, text, requested_provider) "
            "SELECT %s, %s, 'm' || g, %s FROM generate_series(1, %s) AS g RETURNING id",
            (user, phone, provider, count))
        return [row[0] for row in await cur.fetchall()]


async def rows(pool: aiopg.Pool, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Run a query; rows as dicts."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, params)
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, r)) for r in await cur.fetchall()]


async def message(pool: aiopg.Pool, message_id: uuid.UUID) -> dict[str, Any]:
    """One message with its attempts."""
    async with connection(pool) as conn:
        row = await store.get_message(conn, username="alice", message_id=message_id)
    assert row is not None
    return row


async def all_final(pool: aiopg.Pool) -> bool:
    """True when no message has work left (sending or delivery)."""
    left = await rows(pool, "SELECT count(*) AS n FROM messages WHERE due_at IS NOT NULL")
    return bool(left[0]["n"] == 0)


async def test_stub_sends_once_without_delivery_reports(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                        settings: Settings) -> None:
    """stub: one ok attempt, sent, delivery unsupported, no file."""
    [mid] = await insert(pool, 1, "+79991234561", "stub")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    msg = await message(pool, mid)
    assert (msg["send_status"], msg["delivery_status"], msg["provider"]) == ("sent", "unsupported", "stub")
    assert [(a["number"], a["result"], a["error"]) for a in msg["attempts"]] == [(1, "ok", None)]
    assert msg["sent_at"] is not None and msg["delivered_at"] is None
    assert not settings.sent_sms_dir.exists() or not list(settings.sent_sms_dir.iterdir())


async def test_file_even_is_sent_and_delivered_after_the_delay(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                               settings: Settings) -> None:
    """file + even: a file with the text, then delivered exactly delivery_delay after sending."""
    [mid] = await insert(pool, 1, "+79991234568", "file")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    msg = await message(pool, mid)
    assert (msg["send_status"], msg["delivery_status"]) == ("sent", "delivered")
    assert msg["delivered_at"] - msg["sent_at"] == dt.timedelta(seconds=0.3)
    [path] = list(settings.sent_sms_dir.iterdir())
    stamp, phone = re.fullmatch(r"(.+)_(\+\d+)\.txt", path.name).groups()  # type: ignore[union-attr]
    assert phone == "+79991234568"
    assert dt.datetime.fromisoformat(stamp) == msg["attempts"][0]["started_at"]
    assert path.read_text(encoding="ascii") == "m1"


async def test_file_odd_fails_after_max_attempts_spaced_by_the_interval(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                                        settings: Settings) -> None:
    """file + odd: three failed attempts retry_interval (0.5 s) apart, then failed/undelivered, no file."""
    [mid] = await insert(pool, 1, "+79991234567", "file")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    msg = await message(pool, mid)
    assert (msg["send_status"], msg["delivery_status"]) == ("failed", "undelivered")
    attempts = msg["attempts"]
    assert [(a["number"], a["result"]) for a in attempts] == [(1, "error"), (2, "error"), (3, "error")]
    assert all("odd" in a["error"] for a in attempts)
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in zip(attempts, attempts[1:])]
    assert all(0.5 <= g <= 0.6 for g in gaps), gaps
    assert not settings.sent_sms_dir.exists() or not list(settings.sent_sms_dir.iterdir())


async def test_retry_interval_and_attempts_come_from_settings(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                              tmp_path: Path) -> None:
    """Five attempts 0.1 s apart when the settings say so."""
    settings = make_settings(tmp_path, providers={"file": {"max_attempts": 5, "retry_interval": 0.1}})
    [mid] = await insert(pool, 1, "+79991234567", "file")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    attempts = (await message(pool, mid))["attempts"]
    assert len(attempts) == 5
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in zip(attempts, attempts[1:])]
    assert all(0.1 <= g <= 0.2 for g in gaps), gaps


async def test_service_chooses_the_default_provider(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                    tmp_path: Path) -> None:
    """No provider named: unrated equals share the traffic; dispatcher.default_provider wins ties."""
    first = await insert(pool, 40, "+79991234568", None)
    await dispatchers.start(make_settings(tmp_path))
    await wait_until(lambda: all_final(pool), within=5)
    chosen = [(await message(pool, mid))["provider"] for mid in first]
    assert set(chosen) == {"file", "stub"}
    await dispatchers.stop_all()
    [second] = await insert(pool, 1, "+79991234568", None)
    await dispatchers.start(make_settings(tmp_path, dispatcher={"default_provider": "stub"}))
    await wait_until(lambda: all_final(pool), within=5)
    msg = await message(pool, second)
    assert (msg["provider"], msg["requested_provider"], msg["send_status"]) == ("stub", None, "sent")


async def test_new_work_is_picked_up_by_notify_not_by_polling(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                              tmp_path: Path) -> None:
    """With a 30 s poll, a new message still goes out at once: the INSERT trigger's NOTIFY wakes the loop."""
    settings = make_settings(tmp_path, dispatcher={"poll_interval": 30.0, "lease_seconds": 40.0})
    await dispatchers.start(settings)
    await asyncio.sleep(0.2)  # let the dispatcher finish its first (empty) pass and go to sleep
    [mid] = await insert(pool, 1, "+79991234561", "stub")
    await wait_until(lambda: all_final(pool), within=3)
    msg = await message(pool, mid)
    assert msg["attempts"][0]["started_at"] - msg["created_at"] < dt.timedelta(seconds=3)


@pytest.mark.parametrize("replicas", [2, 4])
async def test_replicas_send_each_message_exactly_once(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                       settings: Settings, replicas: int) -> None:
    """Hundreds of messages, several replicas: one attempt and one file per message."""
    ids = await insert(pool, 200, "+79991234568", "file") + await insert(pool, 200, "+79991234561", "stub")
    started = await dispatchers.start(make_settings(settings.sent_sms_dir.parent,
                                                    dispatcher={"batch_size": 8}), count=replicas)
    await wait_until(lambda: all_final(pool), within=30)
    counts = await rows(pool, "SELECT message_id, count(*) AS n FROM attempts GROUP BY message_id")
    assert len(counts) == len(ids) and all(c["n"] == 1 for c in counts)
    states = await rows(pool, "SELECT send_status, delivery_status, count(*) AS n FROM messages GROUP BY 1, 2")
    assert {(s["send_status"], s["delivery_status"], s["n"]) for s in states} == {
        ("sent", "delivered", 200), ("sent", "unsupported", 200)}
    assert len(list(settings.sent_sms_dir.iterdir())) == 200
    assert all(d.passes > 0 for d in started)


async def test_a_dead_dispatchers_claims_are_reclaimed_and_its_attempts_count(pool: aiopg.Pool,
                                                                              dispatchers: Dispatchers,
                                                                              settings: Settings) -> None:
    """Claims a dead dispatcher held are taken over after the lease; the attempt it started counts."""
    [stub_id] = await insert(pool, 1, "+79991234561", "stub")
    [file_id] = await insert(pool, 1, "+79991234568", "file")
    token = uuid.uuid4()
    async with transaction(pool) as conn:  # what a dispatcher does before it dies mid-send
        claimed = await store.claim_due(conn, token=token, lease=0.3, batch=10)
        await store.start_attempts(conn, token=token, plan=[(c.id, c.requested_provider or "") for c in claimed])
    assert {c.id for c in claimed} == {stub_id, file_id}
    assert (await message(pool, stub_id))["send_status"] == "sending"
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    stub_msg, file_msg = await message(pool, stub_id), await message(pool, file_id)
    # stub allows one attempt, and the dead dispatcher used it.
    assert (stub_msg["send_status"], stub_msg["delivery_status"]) == ("failed", "undelivered")
    assert [(a["result"], a["error"]) for a in stub_msg["attempts"]] == [("error", store.ABANDONED_ERROR)]
    # file allows three: the abandoned one plus a successful second.
    assert file_msg["send_status"] == "sent"
    assert [(a["number"], a["result"]) for a in file_msg["attempts"]] == [(1, "error"), (2, "ok")]


async def test_a_stale_dispatchers_late_write_is_rejected(pool: aiopg.Pool) -> None:
    """A dispatcher paused past its lease cannot overwrite what the new holder recorded."""
    [mid] = await insert(pool, 1, "+79991234568", "file")
    stale, fresh = uuid.uuid4(), uuid.uuid4()
    async with transaction(pool) as conn:
        await store.claim_due(conn, token=stale, lease=0.05, batch=1)
        await store.start_attempts(conn, token=stale, plan=[(mid, "file")])
    await asyncio.sleep(0.1)  # the lease runs out
    async with transaction(pool) as conn:
        [again] = await store.claim_due(conn, token=fresh, lease=10, batch=1)
        [second] = await store.start_attempts(conn, token=fresh, plan=[(mid, "file")])
    assert again.id == mid and second.number == 2
    sent = store.Outcome(SendStatus.SENT, DeliveryStatus.UNSUPPORTED, None, number=2, result=AttemptResult.OK)
    failed = store.Outcome(SendStatus.FAILED, DeliveryStatus.UNDELIVERED, None, number=1,
                           result=AttemptResult.ERROR, error="late")
    async with connection(pool) as conn:
        assert await store.finish_send(conn, message_id=mid, token=stale, outcome=failed) is False
        assert await store.finish_send(conn, message_id=mid, token=fresh, outcome=sent) is True
        assert await store.finish_send(conn, message_id=mid, token=fresh, outcome=sent) is False
        assert await store.finish_delivery_check(conn, message_id=mid, token=stale,
                                                 delivery_status=DeliveryStatus.DELIVERED,
                                                 delivered_at=None, due_in=None) is False
    msg = await message(pool, mid)
    assert (msg["send_status"], msg["delivery_status"]) == ("sent", "unsupported")
    assert [(a["number"], a["result"], a["error"]) for a in msg["attempts"]] == [
        (1, "error", store.ABANDONED_ERROR), (2, "ok", None)]


async def test_a_claimer_paused_inside_its_transaction_lets_go(pool: aiopg.Pool, dsn: str) -> None:
    """The server ends a claim transaction left idle (its dispatcher paused): the rows are free again at once,
    and the paused claim can never commit."""
    [mid] = await insert(pool, 1, "+79991234568", "file")
    paused_pool = await create_pool(dsn, size=1, statement_timeout=5.0, idle_in_transaction_timeout=0.2)
    try:
        with pytest.raises(DatabaseUnavailable):
            async with transaction(paused_pool) as conn:
                [claimed] = await store.claim_due(conn, token=uuid.uuid4(), lease=30, batch=1)
                await asyncio.sleep(0.5)  # "SIGSTOP": the server gives up on us meanwhile
        async with transaction(pool) as conn:
            [again] = await store.claim_due(conn, token=uuid.uuid4(), lease=30, batch=1)
        assert claimed.id == again.id == mid
    finally:
        paused_pool.close()
        await paused_pool.wait_closed()


async def test_no_send_once_the_lease_cannot_cover_it(pool: aiopg.Pool, settings: Settings) -> None:
    """A dispatcher held up past the point where the provider call could outlast its lease does not call it."""
    from common.providers import build_providers  # pylint: disable=import-outside-toplevel
    from dispatcher.worker import Dispatcher  # pylint: disable=import-outside-toplevel

    [mid] = await insert(pool, 1, "+79991234568", "file")
    token = uuid.uuid4()
    async with transaction(pool) as conn:
        [claimed] = await store.claim_due(conn, token=token, lease=30, batch=1)
        [started] = await store.start_attempts(conn, token=token, plan=[(mid, "file")])
    dispatcher = Dispatcher(settings, pool, build_providers(settings), "")
    await dispatcher._send(claimed, started, 1, token, lease_end=time.monotonic() + 0.5)  # pylint: disable=W0212
    msg = await message(pool, mid)
    # Handed back as it was: queued, due now, and the attempt never made does not count.
    assert (msg["send_status"], msg["attempts"]) == ("queued", [])
    assert (await rows(pool, "SELECT attempt_count FROM messages"))[0]["attempt_count"] == 0
    assert not settings.sent_sms_dir.exists() or not list(settings.sent_sms_dir.iterdir())


async def test_stop_finishes_sends_in_flight(pool: aiopg.Pool, dispatchers: Dispatchers, tmp_path: Path) -> None:
    """stop() while a send is under way: the send completes and is recorded before run() returns."""
    settings = make_settings(tmp_path, providers={"slow": {"type": "slow_test", "delay": 0.4, "timeout": 1.0}})
    [mid] = await insert(pool, 1, "+79991234561", "slow")
    [dispatcher] = await dispatchers.start(settings)

    async def in_flight() -> bool:
        return bool((await message(pool, mid))["attempts"])
    await wait_until(in_flight, within=3)
    await dispatchers.stop_all()
    msg = await message(pool, mid)
    assert msg["send_status"] == "sent" and msg["attempts"][0]["result"] == "ok"
    assert dispatcher.passes > 0


async def test_provider_timeout_is_a_failed_attempt(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                    tmp_path: Path) -> None:
    """A provider slower than its timeout: the attempt fails with a timeout reason and is retried."""
    settings = make_settings(tmp_path, providers={"slow": {"type": "slow_test", "delay": 1.0, "timeout": 0.1,
                                                           "max_attempts": 2, "retry_interval": 0.05}})
    [mid] = await insert(pool, 1, "+79991234561", "slow")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    msg = await message(pool, mid)
    assert msg["send_status"] == "failed"
    assert [a["error"] for a in msg["attempts"]] == ["no answer within 0.1s"] * 2


async def test_unconfigured_provider_fails_for_good(pool: aiopg.Pool, dispatchers: Dispatchers,
                                                    settings: Settings) -> None:
    """A message naming a provider that was removed from the settings fails at once, with the reason."""
    [mid] = await insert(pool, 1, "+79991234568", "gone")
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=5)
    msg = await message(pool, mid)
    assert msg["send_status"] == "failed"
    assert [a["error"] for a in msg["attempts"]] == ["provider 'gone' is not configured"]


async def test_dispatcher_survives_an_unreachable_database(settings: Settings, tmp_path: Path) -> None:
    """No database: the loop logs, waits and keeps going; stop() still ends it promptly."""
    from common.providers import build_providers  # pylint: disable=import-outside-toplevel
    from dispatcher.worker import Dispatcher  # pylint: disable=import-outside-toplevel

    bad_dsn = f"host={tmp_path} port=1 dbname=nothing user=nobody connect_timeout=2"
    db_pool = await create_pool(bad_dsn, size=1, statement_timeout=1.0)
    dispatcher = Dispatcher(settings, db_pool, build_providers(settings), bad_dsn)
    task = asyncio.create_task(dispatcher.run())
    await wait_until(lambda: asyncio.sleep(0, dispatcher.passes >= 2), within=5)
    dispatcher.stop()
    await asyncio.wait_for(task, 5)
    db_pool.close()
    await db_pool.wait_closed()


def _spawn_dispatcher(dsn: str, sent_dir: Path, **env: str) -> subprocess.Popen[bytes]:
    """``python -m dispatcher`` as a separate process, as in production."""
    environ = {**os.environ, "DATABASE_URL": dsn, "SENT_SMS_DIR": str(sent_dir),
               "SMSGATE_DISPATCHER__LEASE_SECONDS": "1.5", "SMSGATE_PROVIDERS__FILE__TIMEOUT": "1",
               "SMSGATE_PROVIDERS__STUB__TIMEOUT": "1", "SMSGATE_PROVIDERS__FILE__RETRY_INTERVAL": "0.05",
               "SMSGATE_PROVIDERS__FILE__DELIVERY_DELAY": "0.3", **env}
    return subprocess.Popen([sys.executable, "-m", "dispatcher"], cwd=PROJECT_ROOT, env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_kill_9_mid_stream_loses_nothing(pool: aiopg.Pool, dispatchers: Dispatchers, dsn: str,
                                               settings: Settings) -> None:
    """A dispatcher process killed with SIGKILL while working: another finishes everything, within limits."""
    ids = (await insert(pool, 150, "+79991234568", "file") + await insert(pool, 150, "+79991234561", "file")
           + await insert(pool, 150, "+79991234561", "stub"))
    proc = _spawn_dispatcher(dsn, settings.sent_sms_dir, SMSGATE_DISPATCHER__BATCH_SIZE="4")

    async def some_attempts() -> bool:
        assert proc.poll() is None, "the dispatcher process died"
        return bool((await rows(pool, "SELECT count(*) AS n FROM attempts"))[0]["n"] > 20)
    await wait_until(some_attempts, within=20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()
    await dispatchers.start(settings)
    await wait_until(lambda: all_final(pool), within=30)
    final = await rows(pool, """
        SELECT m.id, m.requested_provider, m.phone, m.send_status, m.attempt_count, count(a.*) AS attempts,
               count(a.*) FILTER (WHERE a.finished_at IS NULL) AS open
        FROM messages m JOIN attempts a ON a.message_id = m.id GROUP BY m.id""")
    assert len(final) == len(ids)
    limits = {"file": 3, "stub": 1}
    for row in final:
        assert row["send_status"] in ("sent", "failed") and row["open"] == 0
        assert row["attempts"] == row["attempt_count"] <= limits[row["requested_provider"]]
    sent_files = [r for r in final if r["requested_provider"] == "file" and r["send_status"] == "sent"]
    assert len(sent_files) == 150
    assert len(list(settings.sent_sms_dir.iterdir())) >= 150  # a send cut off before its record may repeat


async def test_sigterm_stops_a_dispatcher_process_cleanly(dsn: str, settings: Settings) -> None:
    """SIGTERM: the process finishes and exits with status 0."""
    proc = _spawn_dispatcher(dsn, settings.sent_sms_dir)
    assert proc.stderr is not None
    line = await asyncio.to_thread(proc.stderr.readline)
    assert b"dispatcher started" in line
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    proc.stderr.close()
