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
from sqlalchemy.dialects.postgresql import ARRAY, UUID, distinct_on
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.database import Query, Row, fetch_all, fetch_one
from common.domain import AttemptResult, DeliveryStatus, SendStatus
from common.tables import (alerts, attempts, cluster_jobs, idempotency_keys, messages, provider_totals,
                           provider_usage, provider_window_stats)

m = messages.c
a = attempts.c
k = idempotency_keys.c
IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)

ABANDONED_ERROR = "the dispatcher's lease ran out before the attempt's outcome was recorded"
MESSAGE_COLUMNS = [m.id, m.username, m.phone, m.text, m.requested_provider, m.provider, m.send_status,
                   m.delivery_status, m.waiting_reason, m.created_at, m.sent_at, m.delivered_at, m.updated_at]
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
    exhausted_providers: list[str]
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
               m.sent_at, m.exhausted_providers, sa.func.now().label("now"))
    .add_cte(_abandoned),
    "claim_due")

# The (message id, provider) pairs to start, passed as two arrays and zipped back into rows by unnest().
_plan = (sa.func.unnest(sa.bindparam("ids", type_=ARRAY(UUID(as_uuid=True))),
                        sa.bindparam("providers", type_=ARRAY(sa.Text)))
         .table_valued("id", "provider")
         .render_derived(name="plan"))
_started = (sa.update(messages)
            .where(m.id == _plan.c.id, m.claim_token == sa.bindparam("token"))
            .values(attempt_count=m.attempt_count + 1, provider=_plan.c.provider, updated_at=sa.func.now(),
                    waiting_reason=None)
            .returning(m.id, m.attempt_count, m.provider)
            .cte("started"))
START_ATTEMPTS = Query(
    sa.insert(attempts)
    .from_select(["message_id", "number", "provider"],
                 sa.select(_started.c.id, _started.c.attempt_count, _started.c.provider))
    .returning(a.message_id, a.number, a.provider, a.started_at),
    "start_attempts")

ATTEMPT_COUNTS = Query(
    sa.select(a.message_id, a.provider, sa.func.count().label("attempts"))
    .where(a.message_id == sa.any_(sa.bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))))
    .group_by(a.message_id, a.provider),
    "attempt_counts")

# Take one rate-limit slot of the current window: the row lock makes concurrent takers line up, and the WHERE
# refuses the slot past the limit (no row comes back).
_slot = pg_insert(provider_usage).values(
    provider=sa.bindparam("provider"), window_start=sa.func.smsgate_window(sa.func.now(), sa.bindparam("window")),
    used=1)
TAKE_SLOT = Query(
    _slot.on_conflict_do_update(index_elements=[provider_usage.c.provider, provider_usage.c.window_start],
                                set_={"used": provider_usage.c.used + 1},
                                where=provider_usage.c.used < sa.bindparam("limit", type_=sa.Integer))
    .returning(provider_usage.c.used),
    "take_slot")

# A claimed message that may not go out yet (rate limits): back to queued until the next window starts.
REQUEUE = Query(
    sa.update(messages)
    .where(m.id == sa.bindparam("id"), m.claim_token == sa.bindparam("token"))
    .values(send_status=SendStatus.QUEUED.value, claim_token=None, waiting_reason=sa.bindparam("reason"),
            updated_at=sa.func.now(),
            due_at=sa.func.smsgate_window(sa.func.now(), sa.bindparam("window", type_=sa.Float))
            + sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.bindparam("window", type_=sa.Float))),
    "requeue")

# An attempt recorded as started but never made (the dispatcher found its lease too short to call the provider):
# remove it and hand the message back, so that it does not count against the provider's attempts.
_unsent = (sa.update(messages)
           .where(m.id == sa.bindparam("id"), m.claim_token == sa.bindparam("token"))
           .values(send_status=SendStatus.QUEUED.value, claim_token=None, attempt_count=m.attempt_count - 1,
                   due_at=sa.func.now(), updated_at=sa.func.now())
           .returning(m.id)
           .cte("unsent"))
RELEASE_UNSENT = Query(
    sa.delete(attempts)
    .where(a.message_id == _unsent.c.id, a.number == sa.bindparam("number", type_=sa.Integer),
           a.finished_at.is_(None))
    .returning(a.message_id)
    .add_cte(_unsent),
    "release_unsent")

_finished_message = (
    sa.update(messages)
    .where(m.id == sa.bindparam("id"), m.claim_token == sa.bindparam("token"))
    .values(send_status=sa.bindparam("send_status"), delivery_status=sa.bindparam("delivery_status"),
            due_at=_later("due_in"), claim_token=None, updated_at=sa.func.now(),
            sent_at=sa.case((sa.bindparam("send_status") == SendStatus.SENT.value, sa.func.now()),
                            else_=m.sent_at),
            exhausted_providers=sa.case(
                (sa.bindparam("exhaust", type_=sa.Text).is_(None), m.exhausted_providers),
                else_=sa.func.array_append(m.exhausted_providers, sa.bindparam("exhaust", type_=sa.Text))))
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


async def attempt_counts(conn: aiopg.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """Attempts made so far per message and provider."""
    counts: dict[uuid.UUID, dict[str, int]] = {i: {} for i in ids}
    if ids:
        for row in await fetch_all(conn, ATTEMPT_COUNTS, ids=list(ids)):
            counts[row["message_id"]][row["provider"]] = int(row["attempts"])
    return counts


async def take_slot(conn: aiopg.Connection, *, provider: str, limit: int, window: float) -> bool:
    """Take one of ``limit`` slots of ``provider`` in the current window; False when none is left."""
    return await fetch_one(conn, TAKE_SLOT, provider=provider, limit=limit, window=window) is not None


async def requeue(conn: aiopg.Connection, *, message_id: uuid.UUID, token: uuid.UUID, reason: str,
                  window: float) -> None:
    """Give a claimed message back to the queue until the next window, saying why."""
    await fetch_all(conn, REQUEUE, id=message_id, token=token, reason=reason, window=window)


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
    exhaust: str | None = None      # a provider this message must not go to again (failover moves on)


async def finish_send(conn: aiopg.Connection, *, message_id: uuid.UUID, token: uuid.UUID, outcome: Outcome) -> bool:
    """Close the attempt and move the message on, only while ``token`` still holds it; False when it does not."""
    row = await fetch_one(conn, FINISH_SEND, id=message_id, token=token, number=outcome.number,
                          result=outcome.result.value if outcome.result else None, error=outcome.error,
                          send_status=outcome.send_status.value, delivery_status=outcome.delivery_status.value,
                          due_in=_delta(outcome.due_in), exhaust=outcome.exhaust)
    return row is not None


async def release_unsent(conn: aiopg.Connection, *, message_id: uuid.UUID, token: uuid.UUID, number: int) -> bool:
    """Undo attempt ``number``, never made, and requeue the message, while ``token`` still holds it."""
    return await fetch_one(conn, RELEASE_UNSENT, id=message_id, token=token, number=number) is not None


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


# --- cluster-wide jobs: per-window statistics, totals, outage alerts ---------------------------------------

STATS_JOB = "provider_window_stats"
ALL_PROVIDERS = "*"  # the alert scope of "every provider together"
s = provider_window_stats.c
t = provider_totals.c
j = cluster_jobs.c
al = alerts.c


def _window(column: Any) -> sa.ColumnElement[Any]:
    """The start of the stats window holding ``column`` (see smsgate_window in schema.sql)."""
    return sa.func.smsgate_window(column, sa.bindparam("window", type_=sa.Float))


def _between(column: Any) -> sa.ColumnElement[bool]:
    """``:start <= column < :until``."""
    return sa.and_(column >= sa.bindparam("start", type_=sa.DateTime(timezone=True)),
                   column < sa.bindparam("until", type_=sa.DateTime(timezone=True)))


TRY_JOB_LOCK = Query(sa.select(sa.func.pg_try_advisory_xact_lock(sa.func.hashtext(sa.bindparam("name")))
                               .label("locked")), "try_job_lock")

# Where the next run starts (after the last computed window, or at the first attempt ever) and ends (the last
# window that closed at least ``grace`` seconds ago, so that no late write can still land in it).
JOB_RANGE = Query(
    sa.select(
        sa.func.coalesce(
            sa.select(j.done_until).where(j.name == sa.bindparam("name")).scalar_subquery(),
            sa.select(_window(sa.func.min(a.started_at))).scalar_subquery(),
            _window(sa.func.now() - sa.cast(sa.bindparam("grace"), sa.Interval))).label("start"),
        _window(sa.func.now() - sa.cast(sa.bindparam("grace"), sa.Interval)).label("until"),
        sa.select(j.first_window).where(j.name == sa.bindparam("name")).scalar_subquery().label("first_window")),
    "job_range")

# One row per event: an attempt started (attempts), an attempt ended (sent or failed; "rated" when it counts as a
# success in the rating), a message delivered (delivered).  Each event falls in the window of its own time.
_events = sa.union_all(
    sa.select(_window(a.started_at).label("w"), a.provider.label("provider"), sa.literal(1).label("attempts"),
              sa.literal(0).label("sent"), sa.literal(0).label("failed"), sa.literal(0).label("delivered"),
              sa.literal(0).label("rated"))
    .where(_between(a.started_at)),
    sa.select(_window(a.finished_at), a.provider, sa.literal(0), sa.cast(a.result == "ok", sa.Integer),
              sa.cast(a.result == "error", sa.Integer), sa.literal(0),
              sa.cast(sa.and_(a.result == "ok", m.delivery_status != DeliveryStatus.UNDELIVERED.value), sa.Integer))
    .select_from(attempts.join(messages, m.id == a.message_id))
    .where(_between(a.finished_at)),
    sa.select(_window(m.updated_at), sa.func.coalesce(m.provider, ""), sa.literal(0), sa.literal(0), sa.literal(0),
              sa.literal(1), sa.literal(0))
    .where(m.delivery_status == DeliveryStatus.DELIVERED.value, _between(m.updated_at)),
).subquery("events")
# The rating: of the attempts that ended in the window, the share that were accepted and then delivered, where a
# send whose report has not come in yet counts as delivered (unless a report already said otherwise), and so
# does every successful send of a provider that cannot report delivery (its messages are "unsupported").
# Deliveries are not taken from the window's own "delivered" count: they arrive later (the file provider's
# 10 s after sending), in a later window, and would rate a provider that works at 0 in the window it sent in:
# it would then get no chosen traffic, and so never a new rating.  A window in which no attempt ended is not rated.
_ended = sa.func.sum(_events.c.sent) + sa.func.sum(_events.c.failed)
# (A "no attempt ended" window must be its own branch, not a division by zero.)
_rating = sa.case((_ended > 0, sa.cast(sa.func.sum(_events.c.rated), sa.Float) / _ended), else_=None)
_window_rows = (
    pg_insert(provider_window_stats)
    .from_select(["window_start", "provider", "attempts", "sent", "failed", "delivered", "rating"],
                 sa.select(_events.c.w, _events.c.provider, sa.func.sum(_events.c.attempts),
                           sa.func.sum(_events.c.sent), sa.func.sum(_events.c.failed),
                           sa.func.sum(_events.c.delivered), _rating)
                 .group_by(_events.c.w, _events.c.provider))
    .on_conflict_do_nothing()
    .returning(s.provider, s.attempts, s.sent, s.failed, s.delivered)
    .cte("window_rows"))
_added = (sa.select(_window_rows.c.provider, sa.func.sum(_window_rows.c.attempts).label("attempts"),
                    sa.func.sum(_window_rows.c.sent).label("sent"), sa.func.sum(_window_rows.c.failed).label("failed"),
                    sa.func.sum(_window_rows.c.delivered).label("delivered"))
          .group_by(_window_rows.c.provider).cte("added"))
_totals = pg_insert(provider_totals).from_select(
    ["provider", "attempts", "sent", "failed", "delivered"],
    sa.select(_added.c.provider, _added.c.attempts, _added.c.sent, _added.c.failed, _added.c.delivered))
COMPUTE_WINDOWS = Query(
    _totals.on_conflict_do_update(
        index_elements=[t.provider],
        set_={col: getattr(provider_totals.c, col) + getattr(_totals.excluded, col)
              for col in ("attempts", "sent", "failed", "delivered")})
    .add_cte(_window_rows),
    "compute_windows")

_job = pg_insert(cluster_jobs).values(name=sa.bindparam("name"), first_window=sa.bindparam("start"),
                                      done_until=sa.bindparam("until"))
SAVE_JOB_PROGRESS = Query(
    _job.on_conflict_do_update(index_elements=[j.name], set_={"done_until": _job.excluded.done_until}),
    "save_job_progress")

# Attempts and successful sends per alert scope in [start, until): each provider, and all of them together.
_scoped = sa.select(s.provider.label("scope"), s.attempts, s.sent).where(_between(s.window_start)).subquery()
SCOPE_ACTIVITY = Query(
    sa.union_all(
        sa.select(_scoped.c.scope, sa.func.sum(_scoped.c.attempts).label("attempts"),
                  sa.func.sum(_scoped.c.sent).label("sent")).group_by(_scoped.c.scope),
        sa.select(sa.literal(ALL_PROVIDERS), sa.func.sum(_scoped.c.attempts), sa.func.sum(_scoped.c.sent))
        .having(sa.func.count() > 0)),
    "scope_activity")

_open_alert = pg_insert(alerts).values(scope=sa.bindparam("scope"))
OPEN_ALERT = Query(
    _open_alert.on_conflict_do_nothing(index_elements=[al.scope], index_where=al.recovered_at.is_(None))
    .returning(al.id),
    "open_alert")
OPEN_ALERT_SCOPES = Query(sa.select(al.scope).where(al.recovered_at.is_(None)), "open_alert_scopes")
RECOVER_ALERT = Query(
    sa.update(alerts).where(al.scope == sa.bindparam("scope"), al.recovered_at.is_(None))
    .values(recovered_at=sa.func.now()).returning(al.id),
    "recover_alert")

_unnotified = (sa.select(al.id)
               .where(sa.or_(al.outage_notified_at.is_(None),
                             sa.and_(al.recovered_at.is_not(None), al.recovery_notified_at.is_(None))),
                      sa.or_(al.claimed_until.is_(None), al.claimed_until < sa.func.now()))
               .order_by(al.id).limit(20).with_for_update(skip_locked=True).scalar_subquery())
CLAIM_NOTIFICATIONS = Query(
    sa.update(alerts).where(al.id.in_(_unnotified))
    .values(claimed_until=sa.func.now() + sa.cast(sa.bindparam("lease"), sa.Interval))
    .returning(al.id, al.scope, al.detected_at, al.recovered_at, al.outage_notified_at, al.recovery_notified_at),
    "claim_notifications")
MARK_NOTIFIED = Query(
    sa.update(alerts).where(al.id == sa.bindparam("id", type_=sa.BigInteger))
    .values(outage_notified_at=sa.func.coalesce(al.outage_notified_at, sa.func.now()),
            recovery_notified_at=sa.case((al.recovered_at.is_not(None), sa.func.now()),
                                         else_=al.recovery_notified_at),
            claimed_until=None),
    "mark_notified")

PROVIDER_TOTALS = Query(sa.select(t.provider, t.attempts, t.sent, t.failed, t.delivered).order_by(t.provider),
                        "provider_totals")
WAITING = Query(
    sa.select(sa.func.coalesce(m.provider, m.requested_provider, "auto").label("provider"),
              sa.func.count().label("waiting"),
              sa.extract("epoch", sa.func.now() - sa.func.min(m.created_at)).label("oldest_seconds"))
    .where(m.due_at.is_not(None), m.send_status.in_([SendStatus.QUEUED.value, SendStatus.SENDING.value]))
    .group_by(sa.func.coalesce(m.provider, m.requested_provider, "auto")),
    "waiting")
DISPATCH_LAG = Query(
    sa.select(sa.func.greatest(0, sa.func.coalesce(
        sa.extract("epoch", sa.func.now() - sa.func.min(m.due_at)), 0)).label("lag"))
    .where(m.due_at.is_not(None)),
    "dispatch_lag")


# A rating ranks providers only while it is fresh: one whose latest rated window is older than this many windows
# (none of its attempts has ended since, because it got no traffic) says nothing about it any more, and would
# otherwise keep a provider that once had a bad window out of the service's choice for good.
RATING_FRESH_WINDOWS = 5
_latest_rating = (sa.select(s.provider, s.rating, s.window_start, s.computed_at,
                            (s.window_start >= sa.func.now() - sa.cast(sa.bindparam("max_age"), sa.Interval))
                            .label("fresh"))
                  .where(s.rating.is_not(None))
                  .order_by(s.provider, s.window_start.desc())
                  .ext(distinct_on(s.provider)))
LATEST_RATINGS = Query(_latest_rating, "latest_ratings")
# Circuit state: the latest window in which attempts of the provider ended; open when none of them succeeded.
LATEST_OUTCOMES = Query(
    sa.select(s.provider, s.sent, s.failed, s.window_start)
    .where(s.sent + s.failed > 0)
    .order_by(s.provider, s.window_start.desc())
    .ext(distinct_on(s.provider)),
    "latest_outcomes")

_now_window = sa.func.smsgate_window(sa.func.now(), sa.bindparam("window", type_=sa.Float))
CURRENT_WINDOW = Query(
    sa.select(a.provider, sa.func.count().label("attempts"),
              sa.func.count().filter(a.result == AttemptResult.OK.value).label("sent"),
              sa.func.count().filter(a.result == AttemptResult.ERROR.value).label("failed"))
    .where(a.started_at >= _now_window)
    .group_by(a.provider),
    "current_window")
CURRENT_DELIVERED = Query(
    sa.select(m.provider, sa.func.count().label("delivered"))
    .where(m.delivery_status == DeliveryStatus.DELIVERED.value, m.updated_at >= _now_window)
    .group_by(m.provider),
    "current_delivered")
CURRENT_USAGE = Query(
    sa.select(provider_usage.c.provider, provider_usage.c.used)
    .where(provider_usage.c.window_start == _now_window),
    "current_usage")
STATS_HISTORY = Query(
    sa.select(s.window_start, s.attempts, s.sent, s.failed, s.delivered, s.rating, s.computed_at)
    .where(s.provider == sa.bindparam("provider"),
           s.window_start >= sa.func.now() - sa.cast(sa.bindparam("span"), sa.Interval))
    .order_by(s.window_start),
    "stats_history")


@dataclass(frozen=True)
class RoutingSnapshot:
    """What the last computed windows say about each provider."""

    ratings: dict[str, Row]   # provider -> rating, window_start, computed_at, fresh (latest rated window)
    open_circuits: set[str]   # providers whose latest finished attempts all failed


async def routing_snapshot(conn: aiopg.Connection, *, window: float) -> RoutingSnapshot:
    """Latest ratings (marked fresh or not, see :data:`RATING_FRESH_WINDOWS`) and circuit states."""
    max_age = _delta(window * RATING_FRESH_WINDOWS)
    ratings = {row["provider"]: row for row in await fetch_all(conn, LATEST_RATINGS, max_age=max_age)}
    open_circuits = {row["provider"] for row in await fetch_all(conn, LATEST_OUTCOMES) if row["sent"] == 0}
    return RoutingSnapshot(ratings, open_circuits)


async def current_window(conn: aiopg.Connection, *, window: float) -> tuple[dict[str, Row], dict[str, int]]:
    """This window's counts per provider so far (attempts, sent, failed, delivered) and rate-limit usage."""
    counts: dict[str, Row] = {}
    for row in await fetch_all(conn, CURRENT_WINDOW, window=window):
        counts[row["provider"]] = {**row, "delivered": 0}
    for row in await fetch_all(conn, CURRENT_DELIVERED, window=window):
        counts.setdefault(row["provider"], {"attempts": 0, "sent": 0, "failed": 0})["delivered"] = row["delivered"]
    usage = {row["provider"]: int(row["used"]) for row in await fetch_all(conn, CURRENT_USAGE, window=window)}
    return counts, usage


async def stats_history(conn: aiopg.Connection, *, provider: str, minutes: int) -> list[Row]:
    """The statistics windows of ``provider`` in the last ``minutes`` minutes, oldest first."""
    return await fetch_all(conn, STATS_HISTORY, provider=provider, span=dt.timedelta(minutes=minutes))


@dataclass(frozen=True)
class WindowRun:
    """What one run of the statistics job computed: windows in [start, until), counted since first_window."""

    start: dt.datetime
    until: dt.datetime
    first_window: dt.datetime


async def compute_windows(conn: aiopg.Connection, *, window: float, grace: float,
                          max_windows: int) -> WindowRun | None:
    """Compute every closed window not computed yet, if this replica holds the cluster's job lock.

    Runs inside the caller's transaction: the advisory lock, the new rows, the totals and the progress mark
    commit together, so each window is counted once however many replicas try.
    """
    locked = await fetch_one(conn, TRY_JOB_LOCK, name=STATS_JOB)
    if not locked or not locked["locked"]:
        return None
    span = await fetch_one(conn, JOB_RANGE, name=STATS_JOB, window=window, grace=_delta(grace))
    assert span is not None
    start, until = span["start"], span["until"]
    until = min(until, start + dt.timedelta(seconds=window * max_windows))
    if until <= start:
        return None
    await fetch_all(conn, COMPUTE_WINDOWS, window=window, start=start, until=until)
    await fetch_all(conn, SAVE_JOB_PROGRESS, name=STATS_JOB, start=start, until=until)
    return WindowRun(start, until, span["first_window"] or start)


PRUNE_KEYS = Query(
    sa.delete(idempotency_keys).where(
        sa.tuple_(k.username, k.key).in_(
            sa.select(k.username, k.key)
            .where(k.created_at < sa.func.now() - sa.cast(sa.bindparam("window"), sa.Interval))
            .limit(sa.bindparam("batch")).scalar_subquery())),
    "prune_idempotency_keys")


async def prune_idempotency_keys(conn: aiopg.Connection, *, batch: int = 1000) -> None:
    """Forget up to ``batch`` Idempotency-Keys older than the replay window."""
    await fetch_all(conn, PRUNE_KEYS, window=IDEMPOTENCY_WINDOW, batch=batch)


async def scope_activity(conn: aiopg.Connection, *, start: dt.datetime, until: dt.datetime) -> dict[str, Row]:
    """Attempts and sends per alert scope in [start, until)."""
    return {row["scope"]: row for row in await fetch_all(conn, SCOPE_ACTIVITY, start=start, until=until)}


async def open_alert(conn: aiopg.Connection, scope: str) -> bool:
    """Record an outage of ``scope``; False when one is already open (another replica was first)."""
    return await fetch_one(conn, OPEN_ALERT, scope=scope) is not None


async def open_alert_scopes(conn: aiopg.Connection) -> set[str]:
    """Scopes with an outage in progress."""
    return {row["scope"] for row in await fetch_all(conn, OPEN_ALERT_SCOPES)}


async def recover_alert(conn: aiopg.Connection, scope: str) -> bool:
    """Close the open outage of ``scope``; False when there is none."""
    return await fetch_one(conn, RECOVER_ALERT, scope=scope) is not None


async def claim_notifications(conn: aiopg.Connection, *, lease: float) -> list[Row]:
    """Alerts whose email/webhook has not gone out, claimed for ``lease`` seconds by this replica."""
    return await fetch_all(conn, CLAIM_NOTIFICATIONS, lease=_delta(lease))


async def mark_notified(conn: aiopg.Connection, alert_id: int) -> None:
    """The pending notifications of an alert went out."""
    await fetch_all(conn, MARK_NOTIFIED, id=alert_id)


async def metrics_snapshot(conn: aiopg.Connection) -> tuple[list[Row], list[Row], float]:
    """Counter totals per provider, waiting messages per provider, and the oldest due work's lateness."""
    totals = await fetch_all(conn, PROVIDER_TOTALS)
    waiting = await fetch_all(conn, WAITING)
    lag = await fetch_one(conn, DISPATCH_LAG)
    return totals, waiting, float(lag["lag"]) if lag else 0.0
