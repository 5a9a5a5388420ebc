"""``python -m bench.baseline``: the bare aiohttp + aiopg application smsgate's API is measured against.

It does the least an HTTP service storing messages in PostgreSQL can do: no validation, no authentication (the
username is whatever follows ``SMSAUTH:``), no middlewares, no deadline, no logging.  ``POST /messages`` runs one
INSERT into ``bench_baseline_messages`` (a table shaped like ``messages``: a uuid default, username, phone, text,
created_at, and the same per-user index) and answers the id as JSON; ``GET /messages/{id}`` and
``GET /messages?limit=`` read smsgate's own ``messages`` table with one query each.  Environment: ``BENCH_DSN``
(the database) and ``PORT``; it listens on 127.0.0.1 with a pool of ``POOL_SIZE`` (10, as the API's) connections.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
import uuid
from typing import Any, AsyncIterator

import aiopg
from aiohttp import web

BASELINE_DDL = """
CREATE TABLE IF NOT EXISTS bench_baseline_messages (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    username   text        NOT NULL,
    phone      text        NOT NULL,
    text       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS bench_baseline_messages_user_idx
    ON bench_baseline_messages (username, created_at DESC, id DESC);
"""
COLUMNS = ("id, username, phone, text, requested_provider, provider, send_status, delivery_status, created_at, "
           "sent_at, delivered_at, updated_at")
POOL: web.AppKey[aiopg.Pool] = web.AppKey("pool", aiopg.Pool)
DSN: web.AppKey[str] = web.AppKey("dsn", str)


def username(request: web.Request) -> str:
    """The name after ``SMSAUTH:`` (unchecked)."""
    return request.headers.get("Authorization", "").partition(":")[2]


def jsonable(row: tuple[Any, ...], names: list[str]) -> dict[str, Any]:
    """A row as a JSON-ready dict (uuids and datetimes as text)."""
    out: dict[str, Any] = {}
    for name, value in zip(names, row):
        out[name] = value.isoformat() if isinstance(value, dt.datetime) else \
            str(value) if isinstance(value, uuid.UUID) else value
    return out


async def create_message(request: web.Request) -> web.Response:
    """One INSERT ... RETURNING id."""
    data = await request.json()
    async with request.app[POOL].acquire() as conn, conn.cursor() as cur:
        await cur.execute("INSERT INTO bench_baseline_messages (username, phone, text) VALUES (%s, %s, %s) "
                          "RETURNING id, created_at", (username(request), data["phone"], data["text"]))
        row = await cur.fetchone()
    return web.json_response({"id": str(row[0]), "created_at": row[1].isoformat()}, status=201)


async def get_message(request: web.Request) -> web.Response:
    """One SELECT by primary key (and owner) from smsgate's ``messages``."""
    async with request.app[POOL].acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT {COLUMNS} FROM messages WHERE id = %s AND username = %s",
                          (request.match_info["id"], username(request)))
        row = await cur.fetchone()
        names = [col.name for col in cur.description or ()]
    if row is None:
        raise web.HTTPNotFound()
    return web.json_response(jsonable(row, names))


async def list_messages(request: web.Request) -> web.Response:
    """The newest ``limit`` messages of the caller from smsgate's ``messages``."""
    limit = int(request.query.get("limit", "20"))
    async with request.app[POOL].acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT {COLUMNS} FROM messages WHERE username = %s "
                          "ORDER BY created_at DESC, id DESC LIMIT %s", (username(request), limit))
        rows = await cur.fetchall()
        names = [col.name for col in cur.description or ()]
    return web.json_response({"items": [jsonable(row, names) for row in rows]})


async def pool_context(app: web.Application) -> AsyncIterator[None]:
    """The connection pool, for the application's lifetime."""
    app[POOL] = await aiopg.create_pool(app[DSN], minsize=1, maxsize=int(os.environ.get("POOL_SIZE", "10")))
    yield
    app[POOL].close()
    await app[POOL].wait_closed()


async def health(_request: web.Request) -> web.Response:
    """200, for the runner's readiness poll."""
    return web.json_response({"status": "ok"})


def create_app(dsn: str) -> web.Application:
    """The baseline application on ``dsn``."""
    app = web.Application()
    app[DSN] = dsn
    app.cleanup_ctx.append(pool_context)
    app.router.add_post("/messages", create_message)
    app.router.add_get("/messages/{id}", get_message)
    app.router.add_get("/messages", list_messages)
    app.router.add_get("/health", health)
    return app


def main() -> int:
    """Serve until SIGTERM or SIGINT."""
    web.run_app(create_app(os.environ["BENCH_DSN"]), host="127.0.0.1", port=int(os.environ["PORT"]),
                access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
