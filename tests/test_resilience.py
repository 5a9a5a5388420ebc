"""The 1-second promise when the database is slow, locked or gone, and recovery afterwards."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
import contextlib
from typing import Any, AsyncIterator, Iterator
from unittest import mock

import psycopg2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api import views
from api.app import create_app
from api.keys import POOL
from common.database import transaction
from tests.conftest import ClientFactory
from tests.helpers import auth, make_settings

Client = TestClient[web.Request, web.Application]
BODY = {"phone": "+79991234568", "text": "x"}


@pytest.fixture(name="locked")
def fixture_locked(dsn: str) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on messages (as a long migration would) for the test's duration."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    yield None
    conn.rollback()
    conn.close()


def idle_in_transaction(dsn: str) -> list[Any]:
    """Backends of the API left inside a transaction (there must never be any)."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT pid, state FROM pg_stat_activity WHERE application_name = 'smsgate' "
                    "AND state LIKE 'idle in transaction%%'")
        found = list(cur.fetchall())
    conn.close()
    return found


async def timed(api: Client, method: str, path: str, **kwargs: Any) -> tuple[int, float, dict[str, Any]]:
    """One request: status, seconds taken, body."""
    started = time.monotonic()
    resp = await api.request(method, path, headers=auth(), **kwargs)
    body = await resp.json(content_type=None)
    return resp.status, time.monotonic() - started, body


@pytest.mark.usefixtures("locked")
async def test_locked_table_answers_503_within_a_second(aiohttp_client: ClientFactory, dsn: str,
                                                        tmp_path: Path) -> None:
    """Requests that cannot get their rows in time: quick 503 problems, even 20 at once on a pool of 2."""
    settings = make_settings(tmp_path, api={"pool_size": 2})
    api = await aiohttp_client(create_app(settings, dsn))
    results = await asyncio.gather(*[timed(api, "POST", "/api/v1/messages", json=BODY) for _ in range(20)],
                                   timed(api, "GET", "/api/v1/messages"))
    for status, seconds, body in results:
        assert status == 503 and seconds < 1.0, (status, seconds, body)
        assert body["code"] in ("database_unavailable", "deadline_exceeded")
    assert not idle_in_transaction(dsn)


@pytest.mark.usefixtures("locked")
async def test_deadline_cancels_database_work_cleanly(aiohttp_client: ClientFactory, dsn: str,
                                                      tmp_path: Path) -> None:
    """When the deadline, not the server, cuts a read off: 503, and no connection stays in a transaction."""
    settings = make_settings(tmp_path, api={"request_deadline": 0.3, "statement_timeout": 10.0})
    api = await aiohttp_client(create_app(settings, dsn))
    status, seconds, body = await timed(api, "GET", "/api/v1/messages")
    assert (status, body["code"]) == (503, "deadline_exceeded") and seconds < 1.0
    assert not idle_in_transaction(dsn)
    assert api.app[POOL].size == 0  # the cancelled connection was closed, not pooled


async def test_writes_that_cannot_finish_in_time_store_nothing(aiohttp_client: ClientFactory, dsn: str,
                                                               tmp_path: Path) -> None:
    """A 503 means nothing was stored: POSTs stuck behind a lock are rolled back by the server, not left to
    commit after their client was told they failed."""
    settings = make_settings(tmp_path, api={"statement_timeout": 10.0})
    api = await aiohttp_client(create_app(settings, dsn))
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    results = await asyncio.gather(*[timed(api, "POST", "/api/v1/messages", json=BODY) for _ in range(30)])
    conn.rollback()
    assert all(status == 503 and seconds < 1.0 for status, seconds, _ in results), results
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM messages")
        assert cur.fetchone() == (0,)
    conn.close()


async def test_a_commit_that_gets_no_answer_is_reported_as_unknown(
        aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """A COMMIT sent but never confirmed (a frozen server) may still land: the answer says the outcome is
    unknown, within the second, rather than claiming that nothing was stored."""
    api = await aiohttp_client(create_app(make_settings(tmp_path), dsn))
    real = transaction

    @contextlib.asynccontextmanager
    async def hanging_commit(pool: Any, *, statement_timeout: Any = None,
                             before_commit: Any = None) -> AsyncIterator[Any]:
        # pylint: disable-next=contextmanager-generator-missing-cleanup  # it is meant to hang, then be cancelled
        async with real(pool, statement_timeout=statement_timeout) as conn:
            yield conn
            before_commit()
            await asyncio.sleep(5)  # the COMMIT's answer never comes
    with mock.patch.object(views, "transaction", hanging_commit):
        status, seconds, body = await timed(api, "POST", "/api/v1/messages", json=BODY)
    assert (status, body["code"]) == (503, "outcome_unknown") and seconds < 1.0
    assert "Idempotency-Key" in body["detail"]


async def test_excess_load_is_shed_at_once(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """Past max_concurrency, /api requests get a quick 503 'overloaded' instead of a late answer."""
    api = await aiohttp_client(create_app(make_settings(tmp_path, api={"max_concurrency": 2}), dsn))
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    results = await asyncio.gather(*[timed(api, "GET", "/api/v1/messages") for _ in range(10)],
                                   timed(api, "GET", "/health"))
    conn.rollback()
    conn.close()
    codes = sorted(body.get("code", "ok") for _, _, body in results)
    assert codes.count("overloaded") == 8 and codes.count("ok") == 1, codes


async def test_recovers_after_the_lock_is_released(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """Once the lock is gone, the same app answers 201 again."""
    api = await aiohttp_client(create_app(make_settings(tmp_path), dsn))
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    assert (await timed(api, "POST", "/api/v1/messages", json=BODY))[0] == 503
    conn.rollback()
    conn.close()
    assert (await timed(api, "POST", "/api/v1/messages", json=BODY))[0] == 201


async def test_unreachable_database_is_503_and_ready_says_so(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    """No server at all: every database route is a quick 503; /health stays 200 (the process is alive)."""
    api = await aiohttp_client(create_app(make_settings(tmp_path), f"host={tmp_path} port=1 dbname=x user=x"))
    for method, path in (("POST", "/api/v1/messages"), ("GET", "/api/v1/messages")):
        status, seconds, body = await timed(api, method, path, json=BODY)
        assert (status, body["code"]) == (503, "database_unavailable") and seconds < 1.0
    ready = await api.get("/ready")
    assert ready.status == 503 and ready.headers["Retry-After"] == "1"
    assert (await api.get("/health")).status == 200


async def test_connections_killed_by_the_server_are_replaced(aiohttp_client: ClientFactory, dsn: str,
                                                             tmp_path: Path) -> None:
    """After the server drops every connection (a restart, a failover), the API recovers by itself."""
    api = await aiohttp_client(create_app(make_settings(tmp_path), dsn))
    assert (await timed(api, "POST", "/api/v1/messages", json=BODY))[0] == 201
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'smsgate' AND datname = current_database() "
                    "AND pid <> pg_backend_pid()")
    conn.close()
    statuses = [(await timed(api, "POST", "/api/v1/messages", json=BODY))[0] for _ in range(3)]
    assert statuses[-1] == 201 and set(statuses) <= {201, 503}, statuses
