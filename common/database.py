"""The database layer: where PostgreSQL is, the aiopg pool, and running SQLAlchemy Core statements through it.

``aiopg.sa`` wants SQLAlchemy < 1.5, so statements are built with SQLAlchemy 2 Core, compiled once for the
psycopg2 dialect (:class:`Query`) and executed on plain aiopg connections.  Every connection runs in UTC with a
server-side statement timeout, and :func:`transaction` never hands a connection back to the pool while a
transaction is open on it: on cancellation (a request deadline, a shutdown) the connection is closed instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

import aiopg
import psycopg2
import psycopg2.extensions
import psycopg2.extras
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ClauseElement

from common.settings import PROJECT_ROOT, Settings

SCHEMA_PATH = PROJECT_ROOT / "schema.sql"
EMBEDDED_DATABASE = "smsgate"
_DIALECT = postgresql.psycopg2.dialect()  # type: ignore[no-untyped-call]

psycopg2.extras.register_uuid()  # uuid.UUID in and out, arrays included

Row = dict[str, Any]

# A transaction's BEGIN waiting to be sent with the connection's next statement (see :func:`transaction`).
_PENDING_BEGIN: weakref.WeakKeyDictionary[aiopg.Connection, Callable[[], str]] = weakref.WeakKeyDictionary()


class DatabaseUnavailable(Exception):
    """The database cannot be reached or did not answer in time."""


def resolve_dsn(settings: Settings) -> str:
    """The configured ``DATABASE_URL``, or the embedded server's (started on first use, kept running)."""
    if settings.database_url:
        return settings.database_url
    return embedded_dsn(settings.data_dir / "postgres")


def embedded_dsn(pgdata: Path, database: str = EMBEDDED_DATABASE) -> str:
    """Start (or find running) the embedded PostgreSQL in ``pgdata`` and return a DSN for ``database`` on it."""
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); pgserver then uses /tmp, which is fine.
        warnings.simplefilter("ignore")
        import pgserver  # pylint: disable=import-outside-toplevel  # only needed without DATABASE_URL

        server = pgserver.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]  # keep it running
    admin_dsn = str(server.get_uri())
    create_database(admin_dsn, database)
    return with_database(admin_dsn, database)


def stop_embedded(pgdata: Path, wait: float = 30.0) -> bool:
    """Stop the embedded PostgreSQL in ``pgdata`` (a fast shutdown); False when none was running there."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text(encoding="ascii").split()[0])
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit
    except (OSError, ValueError, IndexError):
        return False
    deadline = time.monotonic() + wait
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database on the same server."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params["dbname"] = database
    return str(psycopg2.extensions.make_dsn(**params))


def create_database(admin_dsn: str, database: str) -> None:
    """CREATE DATABASE ``database`` unless it exists (synchronous; for start-up and tests)."""
    conn = psycopg2.connect(admin_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                try:
                    cur.execute(f'CREATE DATABASE "{database}"')
                except psycopg2.errors.DuplicateDatabase:  # pylint: disable=no-member  # another process won
                    pass
    finally:
        conn.close()


def apply_schema(dsn: str) -> None:
    """Apply ``schema.sql`` (idempotent; it takes an advisory lock, so concurrent callers queue up)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True  # the file holds its own BEGIN/COMMIT
        with conn.cursor() as cur:
            cur.execute(SCHEMA_PATH.read_text(encoding="utf-8"))
    finally:
        conn.close()


async def create_pool(dsn: str, *, size: int, statement_timeout: float, connect_timeout: float = 2.0,
                      minsize: int = 0, idle_in_transaction_timeout: float | None = None) -> aiopg.Pool:
    """An aiopg pool whose connections run in UTC with a server-side statement timeout.

    ``minsize=0`` lets a process start while the database is down: it answers 503 until the database is back.
    ``idle_in_transaction_timeout`` has the server end a transaction whose client went quiet (paused, hung), so
    the row locks it holds cannot outlive it.
    """
    options = f"-c timezone=UTC -c statement_timeout={int(statement_timeout * 1000)}"
    if idle_in_transaction_timeout is not None:
        options += f" -c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout * 1000)}"
    return await aiopg.create_pool(dsn, minsize=minsize, maxsize=size, timeout=statement_timeout + connect_timeout,
                                   connect_timeout=max(int(connect_timeout), 2), options=options,
                                   application_name="smsgate", enable_hstore=False)


class Query:
    """A SQLAlchemy Core statement compiled once for psycopg2; bind values are given by name at execution."""

    __slots__ = ("sql", "defaults", "name")

    def __init__(self, statement: ClauseElement, name: str = "") -> None:
        """Compile ``statement``; ``name`` appears in logs and errors."""
        # render_postcompile: literal IN lists become plain parameters, so the SQL text is final here.
        compiled = statement.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
        self.sql = str(compiled)
        self.defaults: dict[str, Any] = dict(compiled.params)
        self.name = name

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The full parameter mapping for one execution; unknown names are a programming error."""
        unknown = set(values) - set(self.defaults)
        if unknown:
            raise KeyError(f"{self.name or self.sql[:40]}: unknown parameters {sorted(unknown)}")
        return {**self.defaults, **values}


async def fetch_all(conn: aiopg.Connection, query: Query, **values: Any) -> list[Row]:
    """Run ``query`` and return every row as a dict (a transaction's BEGIN, when pending, goes with it)."""
    prelude = _PENDING_BEGIN.pop(conn, None)
    sql = query.sql if prelude is None else prelude() + query.sql
    async with conn.cursor() as cur:
        await cur.execute(sql, query.params(values))
        if cur.description is None:
            return []
        names = [col.name for col in cur.description]
        return [dict(zip(names, row)) for row in await cur.fetchall()]


async def fetch_one(conn: aiopg.Connection, query: Query, **values: Any) -> Row | None:
    """Run ``query`` and return its first row, or None."""
    rows = await fetch_all(conn, query, **values)
    return rows[0] if rows else None


@contextlib.asynccontextmanager
async def connection(pool: aiopg.Pool) -> AsyncIterator[aiopg.Connection]:
    """A pooled connection in autocommit mode (single statements); errors reaching the server are wrapped."""
    try:
        conn = await pool.acquire()
    except (psycopg2.OperationalError, OSError) as exc:
        raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc
    try:
        yield conn
    except asyncio.CancelledError as exc:
        conn.close()
        task = asyncio.current_task()
        if task is not None and task.cancelling() == 0:
            # Nobody cancelled us: aiopg turns the server's statement timeout (QueryCanceledError) into a
            # CancelledError.  Say what it really is, or the request would be torn down without an answer.
            raise DatabaseUnavailable("statement timeout") from exc
        raise
    except (psycopg2.OperationalError, psycopg2.InterfaceError, TimeoutError) as exc:
        # The server went away, a statement timed out (server side, or aiopg's own operation timeout): say so
        # in one type the callers can answer 503 to.
        conn.close()
        raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc
    except BaseException:
        # Cancelled or failed mid-statement: the connection's state is unknown, so it must not be reused.
        conn.close()
        raise
    finally:
        await pool.release(conn)


@contextlib.asynccontextmanager
async def transaction(pool: aiopg.Pool, *, statement_timeout: Callable[[], float] | None = None,
                      before_commit: Callable[[], None] | None = None) -> AsyncIterator[aiopg.Connection]:
    """A pooled connection inside BEGIN ... COMMIT; any exception (cancellation included) discards it.

    Closing the connection makes the server roll back, and the pool then drops it: a cancelled request can
    never leave a half-done transaction behind for the next user of the connection.  ``statement_timeout``
    gives the seconds the transaction's statements may take from its first one (the API's time left);
    ``before_commit`` runs just before COMMIT is sent (the API uses it to let a commit report its outcome).

    BEGIN is not a round trip of its own: it is sent in one message with the first statement (see
    :func:`fetch_all`), which matters on the API's hot path (two round trips per write instead of three).  The
    COMMIT stays apart, so a statement cut short by the deadline is never committed.
    """

    def begin() -> str:
        if statement_timeout is None:
            return "BEGIN; "
        budget_ms = int(statement_timeout() * 1000)  # measured when the first statement leaves, not before
        if budget_ms < 1:
            raise DatabaseUnavailable("no time left for the statement")
        return f"BEGIN; SET LOCAL statement_timeout = {budget_ms}; "

    async with connection(pool) as conn:
        _PENDING_BEGIN[conn] = begin
        try:
            yield conn
        finally:
            began = _PENDING_BEGIN.pop(conn, None) is None
        if began:  # no statement ran: there is nothing to commit
            if before_commit is not None:
                before_commit()
            async with conn.cursor() as cur:
                await cur.execute("COMMIT")


def quiet_statement_timeouts(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler: aiopg reports every statement timeout to it, though we handle them (503)."""
    if isinstance(context.get("exception"), psycopg2.extensions.QueryCanceledError):
        return
    loop.default_exception_handler(context)


async def ping(pool: aiopg.Pool) -> None:
    """One round trip to the database (raises on failure)."""
    async with connection(pool) as conn:
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
            await cur.fetchone()
