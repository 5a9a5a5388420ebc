"""The routes of the contract, one ``web.View`` class each; ``VIEWS`` lists them with their paths."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
import zlib
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiopg
from aiohttp import web
from prometheus_client import generate_latest

from api.keys import (COMMITTING, CREATE_SCHEMA, DEADLINE, METRICS, METRICS_PAGE, POOL, PROVIDERS, SETTINGS,
                      USERNAME)
from api.metrics import CONTENT_TYPE_LATEST
from api.openapi import docs, querystring_schema, request_schema
from api.problems import Problem
from api.schemas import (MessageCreateSchema, MessageListQuerySchema, MessageListSchema, MessageSchema, NoQuerySchema,
                         ProblemSchema, ProviderListSchema, ProviderStatsQuerySchema, ProviderStatsSchema,
                         StatusSchema, encode_cursor)
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
JSON_TYPES = ("application/json",)
MAX_CONTENT_TYPE = 100  # characters; "application/json; charset=utf-8" is 31
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*{_TOKEN}/{_TOKEN}[ \t]*")
# name=value, the value a token or a quoted string (each character one way only), then the end or the next ";"
_PARAMETER = re.compile(rf'(?P<name>{_TOKEN})=(?P<value>{_TOKEN}|"(?:[\t !#-\[\]-~]|\\[\t -~])*")[ \t]*(?:;|$)')
BODY_ENCODINGS = ("identity", "gzip", "deflate")  # what aiohttp decodes by itself, whatever is installed
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice makes the body ambiguous, so it is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx problem saying what is wrong with it."""
    if not is_json_utf8(request.headers.get("Content-Type", "")):
        raise Problem(415, "Send the body as application/json (UTF-8).", code="unsupported_media_type")
    encoding = request.headers.get("Content-Encoding", "identity").strip(" \t").lower()
    if encoding not in BODY_ENCODINGS:
        raise Problem(415, f"Content-Encoding must be one of: {', '.join(BODY_ENCODINGS)}.",
                      code="unsupported_content_encoding")
    transfer = request.headers.get("Transfer-Encoding")
    if transfer is not None and transfer.strip(" \t").lower() != "chunked":
        raise Problem(501, "The only transfer coding understood is chunked.", code="unsupported_transfer_encoding")
    try:
        raw = await request.read()  # as sent (see api.server.AppRunner); aiohttp answers 413 past client_max_size
    except web.RequestPayloadError as exc:  # e.g. a chunked body with bad framing
        raise Problem(400, "The request body could not be read (check its framing).", code="invalid_body") from exc
    if encoding != "identity":
        raw = inflate(raw, encoding, limit=request.app[SETTINGS].api.max_body_bytes)
    if not raw.strip():
        raise Problem(400, "The request body is empty; send a JSON object.", code="empty_body")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Problem(400, "The request body is not valid UTF-8 JSON with unique keys.", code="invalid_json") from exc
    except RecursionError as exc:
        raise Problem(400, "The request body is nested too deeply.", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise Problem(422, "The request body must be a JSON object.", code="validation_error",
                      errors={"_schema": ["Expected a JSON object."]})
    return data


def is_json_utf8(content_type: str) -> bool:
    """True for ``application/json`` (RFC 9110 syntax), with no charset or a UTF-8 one.

    Parsed here, not through ``request.content_type``: aiohttp hands the header to the standard library's e-mail
    header parser, which raises on some short inputs (a 500) and takes a second of CPU on some long ones, with
    the event loop (and so every other request's deadline) stalled meanwhile.  One pass over at most
    ``MAX_CONTENT_TYPE`` characters, each pattern matched at a fixed place: nothing to backtrack into.
    """
    if len(content_type) > MAX_CONTENT_TYPE:
        return False
    media_type, _, rest = content_type.partition(";")
    if not _MEDIA_TYPE.fullmatch(media_type) or media_type.strip(" \t").lower() not in JSON_TYPES:
        return False
    while rest := rest.lstrip(" \t"):
        if rest.startswith(";"):  # an empty parameter ("application/json;" is seen in the wild)
            rest = rest[1:]
            continue
        param = _PARAMETER.match(rest)
        if param is None:
            return False
        value = param["value"][1:-1] if param["value"].startswith('"') else param["value"]
        if param["name"].lower() == "charset" and value.lower() not in ("utf-8", "utf8"):
            return False
        rest = rest[param.end():]
    return True


def inflate(raw: bytes, encoding: str, *, limit: int) -> bytes:
    """Undo a gzip or deflate (zlib or raw) body, to at most ``limit`` bytes: 413 past it, 400 when broken."""
    for wbits in ((zlib.MAX_WBITS | 16,) if encoding == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
        inflater = zlib.decompressobj(wbits)
        try:
            body = inflater.decompress(raw, limit + 1)  # never more than the cap, whatever the body claims
        except zlib.error:
            continue  # deflate: try the raw form next
        if len(body) > limit:
            raise Problem(413, "Request body is too large.", code="payload_too_large")
        if not inflater.eof or inflater.unused_data:
            break
        return body
    raise Problem(400, f"The request body is not a complete {encoding} stream.", code="invalid_body")


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
