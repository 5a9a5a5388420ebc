"""The routes of the contract, one ``web.View`` class each; ``VIEWS`` lists them with their paths."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiopg
from aiohttp import web
from prometheus_client import generate_latest

from api.bodies import read_json_object
from api.keys import COMMITTING, CREATE_SCHEMA, DEADLINE, METRICS, METRICS_PAGE, POOL, PROVIDERS, SETTINGS, USERNAME
from api.metrics import CONTENT_TYPE_LATEST
from api.openapi import docs, querystring_schema, request_schema
from api.problems import Problem
from api.schemas import (MessageCreateSchema, MessageListQuerySchema, MessageListSchema, MessageSchema, NoQuerySchema,
                         ProblemSchema, ProviderListSchema, ProviderStatsQuerySchema, ProviderStatsSchema, StatusSchema,
                         encode_cursor)
from common import store
from common.database import DatabaseUnavailable, connection, ping, transaction
from common.metrics import cluster_registry
from common.phones import PhoneNumber
from common.settings import Settings

MESSAGE_SCHEMA = MessageSchema()
LIST_SCHEMA = MessageListSchema()
PROVIDER_LIST_SCHEMA = ProviderListSchema()
PROVIDER_STATS_SCHEMA = ProviderStatsSchema()
LIST_QUERY_SCHEMA = MessageListQuerySchema()  # schemas are built once: making one costs more than using it
STATS_QUERY_SCHEMA = ProviderStatsQuerySchema()
NO_QUERY_SCHEMA = NoQuerySchema()
CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CLUSTER_UP = (b"# HELP smsgate_cluster_metrics_up 1 when the cluster metrics above could be read from PostgreSQL.\n"
              b"# TYPE smsgate_cluster_metrics_up gauge\nsmsgate_cluster_metrics_up %s\n")
STATEMENT_MARGIN = 0.05  # seconds between the server's statement limit and the request's deadline
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY = re.compile(r"[ -~]{1,255}")


def _problems(*statuses: int) -> dict[int, dict[str, Any]]:
    """OpenAPI entries for problem answers."""
    return {status: {"schema": ProblemSchema, "description": "problem (RFC 9457)"} for status in statuses}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (marshmallow has already turned values into JSON types)."""
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json",
                        headers=headers)


def query_params(request: web.Request) -> dict[str, str]:
    """The query string as a plain mapping.  An empty parameter (``?phone=``, as forms send) counts as absent;
    one given twice is a 422 problem."""
    params: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in request.query.items():
        if key in seen:
            raise Problem(422, "Request is invalid.", code="validation_error", errors={key: ["Given more than once."]})
        seen.add(key)
        if value != "":
            params[key] = value
    return params


def write_transaction(request: web.Request) -> AbstractAsyncContextManager[aiopg.Connection]:
    """A transaction whose statements the server stops before the request's deadline.

    So a write that cannot finish in time is rolled back by the server, and the 503 the client then gets means
    that nothing was stored.  The COMMIT is flagged, so the deadline lets it report its real outcome.
    """
    loop = asyncio.get_running_loop()

    def time_left() -> float:
        return request[DEADLINE] - loop.time() - STATEMENT_MARGIN

    def committing() -> None:
        request[COMMITTING] = True

    return transaction(request.app[POOL], statement_timeout=time_left, before_commit=committing)


def check_region(settings: Settings, phone: PhoneNumber, provider: str | None) -> None:
    """422 when the named provider does not serve the number's country, or when no enabled provider does."""
    region = phone.region
    where = region or "non-geographic"
    if provider is not None:
        named = settings.provider(provider)
        if named is not None and not named.serves(region):
            raise Problem(422, f"Provider {provider} does not serve {where} numbers.",
                          code="provider_region_mismatch",
                          errors={"provider": [f"Serves {', '.join(named.regions)}, not {where}."]})
    elif not any(p.enabled and p.serves(region) for p in settings.providers):
        raise Problem(422, f"No provider serves {where} numbers.", code="no_provider_for_region",
                      errors={"phone": [f"No provider serves {where} numbers."]})


def idempotency_key(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header (1-255 printable ASCII characters), None when absent, else a 400 problem."""
    values = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not values:
        return None
    if len(values) > 1 or not IDEMPOTENCY_KEY.fullmatch(values[0]):
        raise Problem(400, "Idempotency-Key must be given once, as 1-255 printable ASCII characters.",
                      code="invalid_idempotency_key")
    return str(values[0])


def request_hash(fields: dict[str, Any]) -> str:
    """A digest of the normalised request: the same message written differently hashes the same."""
    canonical = json.dumps({"phone": fields["phone"].e164, "text": fields["text"], "provider": fields["provider"]},
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def message_body(row: dict[str, Any]) -> dict[str, Any]:
    """The public form of a message row."""
    body: dict[str, Any] = MESSAGE_SCHEMA.dump(row)
    return body


class ReadView(web.View):
    """A view whose GET also answers HEAD (status and headers, no body), as load balancers and caches expect."""

    async def get(self) -> web.StreamResponse:
        """Subclasses answer GET."""
        raise web.HTTPMethodNotAllowed(self.request.method, [])

    async def head(self) -> web.StreamResponse:
        """The GET answer; aiohttp sends no body for HEAD."""
        return await self.get()


class MessagesView(ReadView):
    """``/api/v1/messages``: send a message; list the caller's messages."""

    @docs(tags=["messages"], summary="Send an SMS",
          description="Validates, stores the message as queued and answers at once; dispatchers send it.",
          parameters=[{"in": "header", "name": "Idempotency-Key", "required": False, "type": "string",
                       "minLength": 1, "maxLength": 255,
                       "description": "repeat a request safely: the same key and body within 24 h replay it"}],
          responses={201: {"schema": MessageSchema, "description": "the new message"},
                     200: {"schema": MessageSchema, "description": "replayed (Idempotent-Replayed: true)"},
                     **_problems(400, 401, 413, 415, 422, 503)})
    @request_schema(MessageCreateSchema)
    async def post(self) -> web.Response:
        """Validate and insert (one INSERT); the answer carries the new message and its Location.

        With an ``Idempotency-Key``, a repeat of the same request within 24 h answers 200 with the message the
        first one made (``Idempotent-Replayed: true``) and sends nothing again.
        """
        key = idempotency_key(self.request)
        data = await read_json_object(self.request)
        fields = self.request.app[CREATE_SCHEMA].load(data)
        check_region(self.request.app[SETTINGS], fields["phone"], fields["provider"])
        username = self.request[USERNAME]
        async with write_transaction(self.request) as conn:
            if key is None:
                row = await store.insert_message(conn, username=username, phone=fields["phone"].e164,
                                                 text=fields["text"], requested_provider=fields["provider"])
                created = True
            else:
                result = await store.insert_message_with_key(
                    conn, username=username, key=key, request_hash=request_hash(fields), phone=fields["phone"].e164,
                    text=fields["text"], requested_provider=fields["provider"])
                if not result.same_request:
                    raise Problem(422, "This Idempotency-Key was used for a different request in the last 24 h.",
                                  code="idempotency_key_reused")
                row, created = result.message, result.created
        headers = {"Location": f"/api/v1/messages/{row['id']}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return json_response(message_body(row), status=201 if created else 200, headers=headers)

    @docs(tags=["messages"], summary="List your messages, newest first",
          responses={200: {"schema": MessageListSchema, "description": "a page"}, **_problems(401, 422, 503)})
    @querystring_schema(MessageListQuerySchema)
    async def get(self) -> web.Response:
        """A page of the caller's messages, optionally filtered, with a cursor for the next page."""
        query = LIST_QUERY_SCHEMA.load(query_params(self.request))
        limit = query["limit"]
        async with connection(self.request.app[POOL]) as conn:
            rows = await store.list_messages(conn, username=self.request[USERNAME], limit=limit + 1,
                                             before=query["cursor"], send_status=query["send_status"],
                                             delivery_status=query["delivery_status"],
                                             phone=query["phone"].e164 if query["phone"] else None)
        page, more = rows[:limit], len(rows) > limit
        cursor = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None
        return json_response({"items": [message_body(r) for r in page], "next_cursor": cursor})


class MessageView(ReadView):
    """``/api/v1/messages/{id}``: one of the caller's messages."""

    @docs(tags=["messages"], summary="A message with its attempts",
          parameters=[{"in": "path", "name": "id", "required": True, "type": "string", "format": "uuid"}],
          responses={200: {"schema": MessageSchema, "description": "the message"}, **_problems(401, 404, 503)})
    async def get(self) -> web.Response:
        """The message, or 404 when it does not exist or belongs to someone else (never 403: no leak)."""
        raw_id = self.request.match_info["id"]
        if not CANONICAL_UUID.fullmatch(raw_id):
            raise Problem(404, "No such message.", code="message_not_found")
        async with connection(self.request.app[POOL]) as conn:
            row = await store.get_message(conn, username=self.request[USERNAME], message_id=uuid.UUID(raw_id))
        if row is None:
            raise Problem(404, "No such message.", code="message_not_found")
        return json_response(message_body(row))


class ProvidersView(ReadView):
    """``/api/v1/providers``: every configured provider with its settings, capabilities and current state."""

    @docs(tags=["providers"], summary="Configured providers and how they are doing",
          description="Settings, regions, this window's counts and rate-limit usage, the latest stability rating "
                      "and the circuit state. A window is metrics.window_seconds long (a minute in production).",
          responses={200: {"schema": ProviderListSchema, "description": "providers"}, **_problems(401, 422, 503)})
    async def get(self) -> web.Response:
        """Settings from the configuration, capabilities from the implementations, state from PostgreSQL."""
        NO_QUERY_SCHEMA.load(query_params(self.request))
        app = self.request.app
        settings = app[SETTINGS]
        window = settings.metrics.window_seconds
        async with connection(app[POOL]) as conn:
            counts, usage = await store.current_window(conn, window=window)
            routing = await store.routing_snapshot(conn, window=window)
        built = app[PROVIDERS]
        items = []
        for ps in settings.providers:
            provider = built.get(ps.name)
            rated = routing.ratings.get(ps.name)
            now = counts.get(ps.name, {})
            items.append({
                "name": ps.name, "type": ps.type, "enabled": ps.enabled, "max_attempts": ps.max_attempts,
                "retry_interval": ps.retry_interval, "timeout": ps.timeout, "priority": ps.priority,
                "supports_delivery_reports": bool(provider and provider.supports_delivery_reports),
                "regions": list(ps.regions), "rate_limit_per_minute": ps.rate_limit_per_minute,
                "rate_limit_used": usage.get(ps.name, 0), "window_seconds": window,
                "current_window": {k: int(now.get(k, 0)) for k in ("attempts", "sent", "failed", "delivered")},
                "rating": rated["rating"] if rated else None, "rated_at": rated["computed_at"] if rated else None,
                "circuit": "open" if ps.name in routing.open_circuits else "closed",
            })
        return json_response(PROVIDER_LIST_SCHEMA.dump({"items": items}))


class ProviderStatsView(ReadView):
    """``/api/v1/providers/{name}/stats``: a provider's per-window history."""

    @docs(tags=["providers"], summary="A provider's per-window counts and ratings",
          parameters=[{"in": "path", "name": "name", "required": True, "type": "string"}],
          responses={200: {"schema": ProviderStatsSchema, "description": "oldest window first"},
                     **_problems(401, 404, 422, 503)})
    @querystring_schema(ProviderStatsQuerySchema)
    async def get(self) -> web.Response:
        """The windows of the last ``?minutes=`` minutes (60 by default), oldest first."""
        app = self.request.app
        name = self.request.match_info["name"]
        if app[SETTINGS].provider(name) is None:
            raise Problem(404, "No such provider.", code="provider_not_found")
        query = STATS_QUERY_SCHEMA.load(query_params(self.request))
        async with connection(app[POOL]) as conn:
            rows = await store.stats_history(conn, provider=name, minutes=query["minutes"])
        return json_response(PROVIDER_STATS_SCHEMA.dump(
            {"provider": name, "window_seconds": app[SETTINGS].metrics.window_seconds, "items": rows}))


class HealthView(ReadView):
    """``/health``: the process is alive (no database involved)."""

    @docs(tags=["service"], summary="Liveness", responses={200: {"schema": StatusSchema, "description": "alive"}})
    async def get(self) -> web.Response:
        """Always ok while the process serves requests."""
        return json_response({"status": "ok"})


class ReadyView(ReadView):
    """``/ready``: the database answers."""

    @docs(tags=["service"], summary="Readiness",
          responses={200: {"schema": StatusSchema, "description": "ready"}, **_problems(503)})
    async def get(self) -> web.Response:
        """200 when a query round trip succeeds within the deadline; 503 otherwise (the middlewares say so)."""
        await ping(self.request.app[POOL])
        return json_response({"status": "ready"})


class MetricsView(ReadView):
    """``/metrics``: Prometheus text format."""

    @docs(tags=["service"], summary="Prometheus metrics",
          responses={200: {"description": "Prometheus text exposition format"}})
    async def get(self) -> web.Response:
        """The cluster's counters and gauges from PostgreSQL, then this process's request metrics.

        Without the database the cluster part is left out (and ``smsgate_cluster_metrics_up`` says 0), so the
        request metrics still show what the outage looks like from here.
        """
        page = await self.request.app[METRICS_PAGE].get(self._render)
        return web.Response(body=page, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _render(self) -> bytes:
        """The page as it is now (see :class:`api.metrics.RenderedPage` for how often)."""
        app = self.request.app
        body = app[METRICS].render()
        try:
            async with connection(app[POOL]) as conn:
                totals, waiting, lag = await store.metrics_snapshot(conn)
        except DatabaseUnavailable:
            return body + CLUSTER_UP % b"0"
        return generate_latest(cluster_registry(totals, waiting, lag, app[PROVIDERS].keys())) + body + CLUSTER_UP % b"1"


VIEWS: tuple[tuple[str, type[web.View]], ...] = (
    ("/api/v1/messages", MessagesView),
    ("/api/v1/messages/{id}", MessageView),
    ("/api/v1/providers", ProvidersView),
    ("/api/v1/providers/{name}/stats", ProviderStatsView),
    ("/health", HealthView),
    ("/ready", ReadyView),
    ("/metrics", MetricsView),
)
