"""schema.sql: idempotent, in step with common/tables.py and common/domain.py, and indexed for the hot queries."""
from __future__ import annotations

import datetime as dt
import itertools
import threading
import uuid
from typing import Any, Iterator

import psycopg2
import pytest

from common import store
from common.database import Query, apply_schema
from common.domain import DeliveryStatus, SendStatus, can_move, can_move_delivery
from common.tables import metadata


@pytest.fixture(name="db")
def fixture_db(dsn: str) -> Iterator[Any]:
    """A plain psycopg2 connection to the test database."""
    conn = psycopg2.connect(dsn)
    yield conn
    conn.rollback()
    conn.close()


def test_applying_twice_changes_nothing(dsn: str, db: Any) -> None:
    """A second and a concurrent third application succeed and leave the catalog as it was."""
    def catalog() -> list[Any]:
        with db.cursor() as cur:
            cur.execute("""SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
                           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                           JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = 'public' AND a.attnum > 0 ORDER BY 1, 2""")
            columns = cur.fetchall()
            cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint ORDER BY 1")
            return list(columns) + list(cur.fetchall())
    before = catalog()
    threads = [threading.Thread(target=apply_schema, args=(dsn,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    apply_schema(dsn)
    assert catalog() == before


def test_tables_py_matches_schema_sql(db: Any) -> None:
    """Every table and column SQLAlchemy knows exists, and no column is missing from it."""
    with db.cursor() as cur:
        cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'")
        in_db = set(cur.fetchall())
    described = {(t.name, c.name) for t in metadata.sorted_tables for c in t.columns}
    assert described == {row for row in in_db if row[0] in {t.name for t in metadata.sorted_tables}}


def _insert_in(cur: Any, send: SendStatus, delivery: DeliveryStatus) -> uuid.UUID | None:
    """A row in the given statuses, when the constraints allow that pair at all."""
    finished = send in (SendStatus.SENT, SendStatus.FAILED) and delivery is not DeliveryStatus.PENDING
    cur.execute("SAVEPOINT row")
    try:
        cur.execute("""INSERT INTO messages (username, phone, text, send_status, delivery_status, claim_token,
                                             due_at, sent_at, delivered_at)
                       VALUES ('u', '+79991234568', 't', %s, %s, gen_random_uuid(), %s, %s, %s) RETURNING id""",
                    (send.value, delivery.value, None if finished else "now",
                     "now" if send is SendStatus.SENT else None,
                     "now" if delivery is DeliveryStatus.DELIVERED else None))
        return uuid.UUID(str(cur.fetchone()[0]))
    except psycopg2.errors.CheckViolation:  # pylint: disable=no-member
        cur.execute("ROLLBACK TO SAVEPOINT row")
        return None


def _trigger_refuses(cur: Any, message_id: uuid.UUID, column: str, value: str) -> bool:
    """True when the status trigger (not some other constraint) refuses the update."""
    cur.execute("SAVEPOINT move")
    try:
        cur.execute(f"UPDATE messages SET {column} = %s WHERE id = %s", (value, message_id))
    except psycopg2.Error as exc:
        cur.execute("ROLLBACK TO SAVEPOINT move")
        return "may not move" in str(exc)
    cur.execute("ROLLBACK TO SAVEPOINT move")
    return False


def test_trigger_and_domain_agree_on_every_move(db: Any) -> None:
    """For each pair of statuses, the database refuses exactly the moves common/domain.py forbids."""
    checked = 0
    with db.cursor() as cur:
        for send, delivery in itertools.product(SendStatus, DeliveryStatus):
            message_id = _insert_in(cur, send, delivery)
            if message_id is None:
                continue
            for new_send in SendStatus:
                assert _trigger_refuses(cur, message_id, "send_status", new_send.value) is not can_move(send, new_send)
                checked += 1
            for new_delivery in DeliveryStatus:
                refused = _trigger_refuses(cur, message_id, "delivery_status", new_delivery.value)
                assert refused is not can_move_delivery(delivery, new_delivery)
                checked += 1
    assert checked >= 40


def test_final_statuses_are_final() -> None:
    """Only sent and failed are final; a final status has no way out."""
    assert {s for s in SendStatus if s.is_final} == {SendStatus.SENT, SendStatus.FAILED}
    assert not can_move(SendStatus.SENT, SendStatus.QUEUED)
    assert can_move(SendStatus.SENDING, SendStatus.QUEUED)


def _plan(cur: Any, query: Query, **values: Any) -> str:
    """EXPLAIN of a store query with these values."""
    cur.execute("EXPLAIN " + query.sql, query.params(values))
    return "\n".join(r[0] for r in cur.fetchall())


def test_hot_queries_use_their_indexes(db: Any) -> None:
    """With realistic data (most messages finished), each hot path reads through its index."""
    with db.cursor() as cur:
        cur.execute("""INSERT INTO messages (username, phone, text, send_status, delivery_status, due_at, sent_at)
                       SELECT 'user' || (g % 100), '+79991234568', 't', 'sent', 'unsupported', NULL, now()
                       FROM generate_series(1, 20000) g""")
        cur.execute("INSERT INTO messages (username, phone, text) SELECT 'user1', '+79991234568', 'q' "
                    "FROM generate_series(1, 20)")
        cur.execute("""INSERT INTO attempts (message_id, number, provider, finished_at, result)
                       SELECT id, 1, 'stub', now(), 'ok' FROM messages WHERE send_status = 'sent'""")
        cur.execute("ANALYZE messages")
        cur.execute("ANALYZE attempts")
        token, some_id = uuid.uuid4(), uuid.uuid4()
        assert "messages_due_idx" in _plan(cur, store.CLAIM_DUE, token=token, lease=None, batch=32)
        assert "messages_due_idx" in _plan(cur, store.SECONDS_UNTIL_DUE)
        listing = _plan(cur, store.LIST_MESSAGES, username="user1", limit=21, before_created=None, before_id=None,
                        send_status=None, delivery_status=None, phone=None)
        assert "messages_user_created_idx" in listing and "Sort" not in listing
        assert "messages_pkey" in _plan(cur, store.GET_MESSAGE, id=some_id, username="user1")
        assert "attempts_pkey" in _plan(cur, store.ATTEMPTS_OF, ids=[some_id, uuid.uuid4()])
        # Once a window: one window's attempts by their end (joined to their messages by key), not the whole table.
        hour_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        windows = _plan(cur, store.COMPUTE_WINDOWS, window=60.0, start=hour_ago,
                        until=hour_ago + dt.timedelta(minutes=1))
        assert "attempts_finished_idx" in windows and "messages_pkey" in windows, windows
