"""Fixtures: a real PostgreSQL database per test session, emptied before each test, and the service's parts.

The server is ``DATABASE_URL`` when set (CI also runs the suite against the machine's PostgreSQL 15), else the
embedded one in ``.data/postgres``.  Each session works in a database of its own, dropped at the end.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import aiopg
import psycopg2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import BaseRunner

from api.app import create_app
from api.server import AppRunner
from common.database import apply_schema, create_database, create_pool, embedded_dsn, with_database
from common.settings import PROJECT_ROOT, Settings
from common.tables import metadata
from tests.helpers import Dispatchers, make_settings

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class ServiceTestServer(TestServer):
    """aiohttp's test server, serving through the service's own runner, as ``python -m api`` does: protocol
    errors answered as problems, request bodies left for the view to inflate (bounded)."""

    async def _make_runner(self, **kwargs: object) -> BaseRunner:
        """:class:`api.server.AppRunner` instead of aiohttp's."""
        return AppRunner(self.app, **kwargs)


@pytest.fixture(name="aiohttp_client")
def fixture_aiohttp_client(aiohttp_client: ClientFactory) -> ClientFactory:
    """pytest-aiohttp's client factory, for an app served by :class:`ServiceTestServer`."""

    async def client(app: web.Application, **kwargs: object) -> TestClient[web.Request, web.Application]:
        return await aiohttp_client(ServiceTestServer(app), **kwargs)

    return client


@pytest.fixture(name="server_dsn", scope="session")
def fixture_server_dsn() -> str:
    """An administrative DSN of the PostgreSQL server the tests use."""
    url = os.environ.get("DATABASE_URL")
    return url if url else embedded_dsn(PROJECT_ROOT / ".data" / "postgres", database="postgres")


@pytest.fixture(name="dsn", scope="session")
def fixture_dsn(server_dsn: str) -> Iterator[str]:
    """A fresh database with the schema applied, for this test session only."""
    name = f"smsgate_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    create_database(server_dsn, name)
    test_dsn = with_database(server_dsn, name)
    apply_schema(test_dsn)
    yield test_dsn
    conn = psycopg2.connect(server_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(autouse=True)
def clean_database(request: pytest.FixtureRequest) -> None:
    """Empty the tables before every test that uses the database."""
    if "dsn" not in request.fixturenames:
        return
    test_dsn = request.getfixturevalue("dsn")
    conn = psycopg2.connect(test_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {', '.join(table.name for table in metadata.sorted_tables)}")
    conn.close()


@pytest.fixture(name="settings")
def fixture_settings(tmp_path: Path) -> Settings:
    """Test settings (see :func:`make_settings`)."""
    return make_settings(tmp_path)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[aiopg.Pool]:
    """A pool on the test database, for tests that look at rows directly."""
    db_pool = await create_pool(dsn, size=5, statement_timeout=5.0)
    yield db_pool
    db_pool.close()
    await db_pool.wait_closed()


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings,
              dsn: str) -> TestClient[web.Request, web.Application]:
    """A test client of the API."""
    return await aiohttp_client(create_app(settings, dsn))


@pytest.fixture
async def dispatchers(dsn: str) -> AsyncIterator[Dispatchers]:
    """Dispatcher replicas for the test (see :class:`Dispatchers`)."""
    group = Dispatchers(dsn)
    yield group
    await group.stop_all()
