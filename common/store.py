"""Every statement smsgate runs, in one place, built with SQLAlchemy Core and compiled once at import.

The API uses the first group (one INSERT per POST, keyset-paged reads scoped to the caller); the dispatchers use
the second: claim due rows with ``FOR UPDATE SKIP LOCKED``, start attempts, and finish them with writes that
only apply while the writer still holds the claim (its ``claim_token``), so a dispatcher that lost its lease
cannot overwrite what another one did.  All times are the database's ``now()``; the processes' clocks are never
stored.
"""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import aiopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.database import Query, Row, fetch_all, fetch_one
from common.domain import AttemptResult, DeliveryStatus, SendStatus
from common.tables import attempts, idempotency_keys, messages

m = messages.c
a = attempts.c
k = idempotency_keys.c
IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)

ABANDONED_ERROR = "the dispatcher's lease ran out before the attempt's outcome was recorded"
MESSAGE_COLUMNS = [m.id, m.username, m.phone, m.text, m.requested_provider, m.provider, m.send_status,
                   m.delivery_status, m.created_at, m.sent_at, m.delivered_at, m.updated_at]
ATTEMPT_COLUMNS = [a.message_id, a.number, a.provider, a.started_at, a.finished_at, a.result, a.error]


def _later(name: str) -> sa.ColumnElement[Any]:
    """``now()`` plus the interval parameter ``name`` (a timedelta), or NULL when the parameter is None."""
    return sa.func.now() + sa.cast(sa.bindparam(name), sa.Interval)


def _delta(seconds: float | None) -> dt.timedelta | None:
    """Seconds as the timedelta that :func:`_later` parameters take."""
    return None if seconds is None else dt.timedelta(seconds=seconds)


def _optional_eq(column: sa.Column[str]) -> sa.ColumnElement[bool]:
    """``column = :<name>``, or true when that parameter is NULL (a filter the caller left out)."""
    param = sa.bindparam(column.name, type_=sa.Text)
    return sa.or_(param.is_(None), column == param)


# --- the API's statements ---------------------------------------------------------------------------------

INSERT_MESSAGE = Query(
    sa.insert(messages)
    .values(username=sa.bindparam("username"), phone=sa.bindparam("phone"), text=sa.bindparam("text"),
            requested_provider=sa.bindparam("requested_provider"))
    .returning(*MESSAGE_COLUMNS),
    "insert_message")

# With an Idempotency-Key: claim the key and insert the message in one statement.  A fresh entry for the key
# (another request's, committed or still in flight: the primary key makes us wait for it) stops the INSERT, and
# the caller then reads that entry; an entry older than the window is taken over.
_key = (pg_insert(idempotency_keys)
        .values(username=sa.bindparam("username"), key=sa.bindparam("key"), request_hash=sa.bindparam("hash"),
                message_id=sa.bindparam("id", type_=UUID(as_uuid=True)))
        .on_conflict_do_update(
            index_elements=[k.username, k.key],
            set_={"request_hash": sa.bindparam("hash"), "message_id": sa.bindparam("id"), "created_at": sa.func.now()},
            where=k.created_at < sa.func.now() - sa.cast(sa.bindparam("window"), sa.Interval))
        .returning(k.message_id)
        .cte("claimed_key"))
INSERT_MESSAGE_WITH_KEY = Query(
    sa.insert(messages)
    .from_select(["id", "username", "phone", "text", "requested_provider"],
                 sa.select(_key.c.message_id, sa.bindparam("username"), sa.bindparam("phone"), sa.bindparam("text"),
                           sa.bindparam("requested_provider", type_=sa.Text)))
    .returning(*MESSAGE_COLUMNS),
    "insert_message_with_key")

GET_BY_KEY = Query(
    sa.select(k.request_hash, *MESSAGE_COLUMNS)
    .select_from(idempotency_keys.join(messages, m.id == k.message_id))
    .where(k.username == sa.bindparam("username"), k.key == sa.bindparam("key")),
    "get_by_idempotency_key")

GET_MESSAGE = Query(
    sa.select(*MESSAGE_COLUMNS)
    .where(m.id == sa.bindparam("id"), m.username == sa.bindparam("username")),
    "get_message")

# Keyset paging on (created_at, id), newest first, served by messages_user_created_idx.  Optional filters are
# written as "param IS NULL OR ...": psycopg2 inlines the values, so the planner folds the unused ones away.
LIST_MESSAGES = Query(
    sa.select(*MESSAGE_COLUMNS)
    .where(
        m.username == sa.bindparam("username"),
        sa.or_(sa.bindparam("before_created", type_=sa.DateTime(timezone=True)).is_(None),
               sa.tuple_(m.created_at, m.id) < sa.tuple_(sa.bindparam("before_created"),
                                                         sa.bindparam("before_id", type_=UUID(as_uuid=True)))),
        _optional_eq(m.send_status), _optional_eq(m.delivery_status), _optional_eq(m.phone),
    )
    .order_by(m.created_at.desc(), m.id.desc())
    .limit(sa.bindparam("limit")),
    "list_messages")

ATTEMPTS_OF = Query(
    sa.select(*ATTEMPT_COLUMNS)
    .where(a.message_id == sa.any_(sa.bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))))
    .order_by(a.message_id, a.number),
    "attempts_of")


async def insert_message(conn: aiopg.Connection, *, username: str, phone: str, text: str,
                         requested_provider: str | None) -> Row:
    """Store a new queued message and return it (one INSERT; its trigger wakes the dispatchers)."""
    row = await fetch_one(conn, INSERT_MESSAGE, username=username, phone=phone, text=text,
                          requested_provider=requested_provider)
    assert row is not None
    row["attempts"] = []
    return row


@dataclass(frozen=True)
class KeyedInsert:
    """What a POST with an Idempotency-Key came to."""

    message: Row
    created: bool       # False: an earlier request with this key made the message
    same_request: bool  # False: the key was used before for a different request


async def insert_message_with_key(conn: aiopg.Connection, *, username: str, key: str, request_hash: str,
                                  phone: str, text: str, requested_provider: str | None) -> KeyedInsert:
    """Insert a message under an Idempotency-Key, or find the one an earlier request with the key made."""
    for _ in range(2):  # the entry found may expire or vanish between the two statements: look once more
        row = await fetch_one(conn, INSERT_MESSAGE_WITH_KEY, id=uuid.uuid4(), username=username, key=key,
                              hash=request_hash, window=IDEMPOTENCY_WINDOW, phone=phone, text=text,
                              requested_provider=requested_provider)
        if row is not None:
            row["attempts"] = []
            return KeyedInsert(row, created=True, same_request=True)
        earlier = await fetch_one(conn, GET_BY_KEY, username=username, key=key)
        if earlier is not None:
            same = earlier.pop("request_hash") == request_hash
            await _attach_attempts(conn, [earlier])
            return KeyedInsert(earlier, created=False, same_request=same)
    raise RuntimeError("the idempotency key kept changing under us")  # pragma: no cover


async def get_message(conn: aiopg.Connection, *, username: str, message_id: uuid.UUID) -> Row | None:
    """The caller's message with its attempts, or None (also when it belongs to someone else)."""
    row = await fetch_one(conn, GET_MESSAGE, id=message_id, username=username)
    if row is not None:
        await _attach_attempts(conn, [row])
    return row


async def list_messages(conn: aiopg.Connection, *, username: str, limit: int,
                        before: tuple[dt.datetime, uuid.UUID] | None = None, send_status: str | None = None,
                        delivery_status: str | None = None, phone: str | None = None) -> list[Row]:
    """Up to ``limit`` of the caller's messages older than ``before``, newest first, with their attempts."""
    rows = await fetch_all(conn, LIST_MESSAGES, username=username, limit=limit,
                           before_created=before[0] if before else None, before_id=before[1] if before else None,
                           send_status=send_status, delivery_status=delivery_status, phone=phone)
    await _attach_attempts(conn, rows)
    return rows


async def _attach_attempts(conn: aiopg.Connection, rows: list[Row]) -> None:
    """Fill ``row["attempts"]`` for each row with one query."""
    by_id: dict[uuid.UUID, list[Row]] = {row["id"]: [] for row in rows}
    if by_id:
        for att in await fetch_all(conn, ATTEMPTS_OF, ids=list(by_id)):
            by_id[att["message_id"]].append(att)
    for row in rows:
        row["attempts"] = by_id[row["id"]]


# --- the dispatchers' statements --------------------------------------------------------------------------

@dataclass(frozen=True)
class Claimed:  # pylint: disable=too-many-instance-attributes
    """A message a dispatcher now holds: for a send attempt (``sending``) or a delivery check (``sent``)."""

    id: uuid.UUID
    phone: str
    text: str
    requested_provider: str | None
    provider: str | None
    send_status: SendStatus
    attempt_count: int
    sent_at: dt.datetime | None
    now: dt.datetime


@dataclass(frozen=True)
class Started:
    """An attempt that has been recorded as started (and so counts, whatever happens next)."""

    message_id: uuid.UUID
    number: int
    provider: str
    started_at: dt.datetime


_due = (sa.select(m.id)
        .where(m.due_at <= sa.func.now())
        .order_by(m.due_at)
        .limit(sa.bindparam("batch"))
        .with_for_update(skip_locked=True)
        .cte("due"))
# A due row in 'sending' was held by a dispatcher whose lease ran out (it died or hung): close its open attempt.
_abandoned = (sa.update(attempts)
              .where(a.message_id == _due.c.id, a.finished_at.is_(None))
              .values(finished_at=sa.func.now(), result=AttemptResult.ERROR.value, error=ABANDONED_ERROR)
              .cte("abandoned"))
CLAIM_DUE = Query(
    sa.update(messages)
    .where(m.id == _due.c.id)
    .values(claim_token=sa.bindparam("token"), due_at=_later("lease"), updated_at=sa.func.now(),
            send_status=sa.case((m.send_status == SendStatus.SENT.value, SendStatus.SENT.value),
                                else_=SendStatus.SENDING.value))
    .returning(m.id, m.phone, m.text, m.requested_provider, m.provider, m.send_status, m.attempt_count,
               m.sent_at, sa.func.now().label("now"))
    .add_cte(_abandoned),
    "claim_due")

# The (message id, provider) pairs to start, passed as two arrays and zipped back into rows by unnest().
_plan = (sa.func.unnest(sa.bindparam("ids", type_=ARRAY(UUID(as_uuid=True))),
                        sa.bindparam("providers", type_=ARRAY(sa.Text)))
         .table_valued("id", "provider")
         .render_derived(name="plan"))
_started = (sa.update(messages)
            .where(m.id == _plan.c.id, m.claim_token == sa.bindparam("token"))
            .values(attempt_count=m.attempt_count + 1, provider=_plan.c.provider, updated_at=sa.func.now())
            .returning(m.id, m.attempt_count, m.provider)
            .cte("started"))
START_ATTEMPTS = Query(
    sa.insert(attempts)
    .from_select(["message_id", "number", "provider"],
                 sa.select(_started.c.id, _started.c.attempt_count, _started.c.provider))
    .returning(a.message_id, a.number, a.provider, a.started_at),
    "start_attempts")

_finished_message = (
    sa.update(messages)
    .where(m.id == sa.bindparam("id"), m.claim_token == sa.bindparam("token"))
    .values(send_status=sa.bindparam("send_status"), delivery_status=sa.bindparam("delivery_status"),
            due_at=_later("due_in"), claim_token=None, updated_at=sa.func.now(),
            sent_at=sa.case((sa.bindparam("send_status") == SendStatus.SENT.value, sa.func.now()),
                            else_=m.sent_at))
    .returning(m.id, m.sent_at)
    .cte("finished_message"))
_finished_attempt = (
    sa.update(attempts)
    .where(a.message_id == _finished_message.c.id, a.number == sa.bindparam("number", type_=sa.Integer),
           a.finished_at.is_(None))
    .values(finished_at=sa.func.now(), result=sa.bindparam("result"), error=sa.bindparam("error"))
    .cte("finished_attempt"))
FINISH_SEND = Query(
    sa.select(_finished_message.c.id, _finished_message.c.sent_at).add_cte(_finished_attempt),
    "finish_send")

FINISH_DELIVERY_CHECK = Query(
    sa.update(messages)
    .where(m.id == sa.bindparam("id"), m.claim_token == sa.bindparam("token"),
           m.delivery_status == DeliveryStatus.PENDING.value)
    .values(delivery_status=sa.bindparam("delivery_status"), delivered_at=sa.bindparam("delivered_at"),
            due_at=_later("due_in"), claim_token=None, updated_at=sa.func.now())
    .returning(m.id),
    "finish_delivery_check")

SECONDS_UNTIL_DUE = Query(
    sa.select(sa.extract("epoch", sa.func.min(m.due_at) - sa.func.clock_timestamp()).label("wait"))
    .where(m.due_at.is_not(None)),
    "seconds_until_due")


async def claim_due(conn: aiopg.Connection, *, token: uuid.UUID, lease: float, batch: int) -> list[Claimed]:
    """Claim up to ``batch`` due messages for ``lease`` seconds; rows other dispatchers hold are skipped."""
    rows = await fetch_all(conn, CLAIM_DUE, token=token, lease=_delta(lease), batch=batch)
    return [Claimed(**{**row, "send_status": SendStatus(row["send_status"])}) for row in rows]


async def start_attempts(conn: aiopg.Connection, *, token: uuid.UUID,
                         plan: Sequence[tuple[uuid.UUID, str]]) -> list[Started]:
    """Record one new attempt per (message id, provider) in ``plan``, for messages still under ``token``."""
    if not plan:
        return []
    rows = await fetch_all(conn, START_ATTEMPTS, token=token, ids=[p[0] for p in plan],
                           providers=[p[1] for p in plan])
    return [Started(**row) for row in rows]


@dataclass(frozen=True)
class Outcome:
    """How a send attempt (or a decision not to make one) leaves a message."""

    send_status: SendStatus
    delivery_status: DeliveryStatus
    due_in: float | None            # seconds until the message is due again; None: nothing left to do
    number: int | None = None       # the attempt to close; None when no attempt was made
    result: AttemptResult | None = None
    error: str | None = None


async def finish_send(conn: aiopg.Connection, *, message_id: uuid.UUID, token: uuid.UUID, outcome: Outcome) -> bool:
    """Close the attempt and move the message on, only while ``token`` still holds it; False when it does not."""
    row = await fetch_one(conn, FINISH_SEND, id=message_id, token=token, number=outcome.number,
                          result=outcome.result.value if outcome.result else None, error=outcome.error,
                          send_status=outcome.send_status.value, delivery_status=outcome.delivery_status.value,
                          due_in=_delta(outcome.due_in))
    return row is not None


async def finish_delivery_check(conn: aiopg.Connection, *, message_id: uuid.UUID, token: uuid.UUID,
                                delivery_status: DeliveryStatus, delivered_at: dt.datetime | None,
                                due_in: float | None) -> bool:
    """Record a delivery check's outcome while ``token`` still holds the message; False when it does not."""
    row = await fetch_one(conn, FINISH_DELIVERY_CHECK, id=message_id, token=token,
                          delivery_status=delivery_status.value, delivered_at=delivered_at, due_in=_delta(due_in))
    return row is not None


async def seconds_until_due(conn: aiopg.Connection) -> float | None:
    """Seconds until the earliest due message by the database's clock (negative: overdue); None: nothing due."""
    row = await fetch_one(conn, SECONDS_UNTIL_DUE)
    wait = row["wait"] if row else None
    return None if wait is None else float(wait)
