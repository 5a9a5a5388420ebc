"""Middlewares, outermost first: request ids, metrics, problem answers for every error, the deadline, auth."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp_apispec
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.typedefs import Handler
from marshmallow import ValidationError

from api.keys import AUTHENTICATOR, COMMITTING, DEADLINE, LOAD, METRICS, REQUEST_ID, SETTINGS, USERNAME
from api.problems import PROBLEM_CONTENT_TYPE, Problem, problem_body, problem_response
from common.database import DatabaseUnavailable
from common.logs import current_request_id

log = logging.getLogger("smsgate.api")
access_log = logging.getLogger("smsgate.access")

MAX_FIELD_NAME = 64  # characters of an unknown field's name echoed in a 422
CANCEL_WAIT = 0.03  # seconds a cancelled handler gets to clean up before the 503 goes out
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PUBLIC_PREFIXES = ("/api/docs", "/api/static")  # the Swagger UI and its OpenAPI document need no auth
SWAGGER_STATIC_PREFIX = "/api/static/swagger/"
SWAGGER_STATIC_DIR = Path(aiohttp_apispec.__file__).parent / "static"
MAX_STATIC_NAME = 100  # the Swagger UI's own files have short names
# Conditional and range headers make aiohttp's file responses answer 412 or 416 with no body, outside every
# middleware; the Swagger UI's files are small and need neither, so such a request gets the whole file.
STATIC_IGNORED_HEADERS = ("Range", "If-Range", "If-Match", "If-Unmodified-Since")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure, aiohttp's own 404/405/413/415 included, into a problem answer; log the unexpected."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except ValidationError as exc:
        return validation_problem(exc).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and other non-errors pass through
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(exc.status, _http_detail(exc), headers=headers)
    except DatabaseUnavailable:
        log.warning("database unavailable", extra={"event": "database_unavailable", "path": request.path})
        return problem_response(503, "The database is not available; try again shortly.",
                                code="database_unavailable", headers={"Retry-After": "1"})
    except Exception:  # pylint: disable=broad-exception-caught  # a 500 is a bug, but it is still a problem answer
        log.exception("unhandled error", extra={"event": "unhandled_error", "path": request.path})
        return problem_response(500, "An unexpected error occurred; it has been logged.")


def validation_problem(exc: ValidationError) -> Problem:
    """A 422 problem naming the fields at fault (aiohttp-apispec's error callback raises the same)."""
    messages: Any = exc.messages
    errors = messages if isinstance(messages, dict) else {"_schema": messages}
    # Unknown fields are reported under their own names; long ones are cut short, not echoed whole.
    errors = {(k if len(k) <= MAX_FIELD_NAME else k[:MAX_FIELD_NAME] + "..."): v for k, v in errors.items()}
    return Problem(422, "Request is invalid.", code="validation_error", errors=errors)


def _http_detail(exc: web.HTTPException) -> str:
    """A sentence for aiohttp's own errors."""
    details = {
        404: "No such resource.",
        405: f"Method not allowed here; allowed: {exc.headers.get('Allow', '')}.",
        413: "Request body is too large.",
    }
    return details.get(exc.status, exc.reason or "Request failed.")


@web.middleware
async def docs_static_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A missing Swagger UI file is a 404 problem (aiohttp's static route finds out only while answering)."""
    if request.path.startswith(SWAGGER_STATIC_PREFIX):
        name = request.path[len(SWAGGER_STATIC_PREFIX):]
        if not name or len(name) > MAX_STATIC_NAME or "/" in name or name.startswith(".") \
                or not _is_static_file(SWAGGER_STATIC_DIR / name):
            raise web.HTTPNotFound()
        if any(header in request.headers for header in STATIC_IGNORED_HEADERS):
            return WholeFileResponse(SWAGGER_STATIC_DIR / name)
    return await handler(request)


def _is_static_file(path: Path) -> bool:
    """True for an existing file; False for a name the file system refuses (100 characters of UTF-8 can be more
    than the 255 bytes a file name may have: ENAMETOOLONG)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


class WholeFileResponse(web.FileResponse):
    """aiohttp's file response (sendfile, ETag, Last-Modified), blind to Range and the preconditions: with those,
    aiohttp answers 412 or 416 with no body, outside every middleware.  The Swagger UI's files are small and
    need neither, so such a request gets the whole file, as RFC 9110 allows."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Prepare for a copy of ``request`` without those headers (it shares the connection's writer)."""
        headers = request.headers.copy()
        for header in STATIC_IGNORED_HEADERS:
            headers.popall(header, None)
        return await super().prepare(request.clone(headers=headers))


async def problems_only(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the last guard of "every error answer is a problem".

    aiohttp answers a few requests itself, before or outside every middleware: an ``Expect`` header it does not
    know (417) is one.  Such an answer, a plain ``web.Response``, is rewritten here while its headers can still
    change.  Everything the middlewares answer is a problem already and passes untouched.
    """
    if response.status < 400 or not isinstance(response, web.Response) \
            or response.content_type == PROBLEM_CONTENT_TYPE:
        return
    body = problem_body(response.status, (response.text or "")[:200] or response.reason or "Request failed.")
    response.body = body
    response.headers["Content-Type"] = PROBLEM_CONTENT_TYPE  # whole: the old one's charset must not stay
    response.headers["Content-Length"] = str(len(body))  # set from the old body before this hook runs
    if REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request.get(REQUEST_ID) or uuid.uuid4().hex


@web.middleware
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer within ``request_deadline``: past it, cancel the work (and its database statement) and say 503.

    A 503 must mean "nothing was stored", so writes run in a transaction whose statements the server itself
    stops before the deadline (see :func:`api.views.write_transaction`); cancelling one mid-statement closes its
    connection, which rolls it back.  Only a COMMIT already sent cannot be taken back: it gets ``commit_grace``
    more to report its outcome truthfully (a 201, or a 503 when it failed).
    """
    cfg = request.app[SETTINGS].api
    loop = asyncio.get_running_loop()
    request[DEADLINE] = loop.time() + cfg.request_deadline
    task = asyncio.ensure_future(handler(request))
    try:
        done, _ = await asyncio.wait({task}, timeout=cfg.request_deadline)
        if not done and request.get(COMMITTING, False):
            done, _ = await asyncio.wait({task}, timeout=cfg.commit_grace)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    # Give it a moment to close its connection, but no more: a task stuck behind the pool's lock (the server
    # hangs) must not hold the answer past the second.
    await asyncio.wait({task}, timeout=CANCEL_WAIT)
    task.add_done_callback(_consume_result)
    if request.get(COMMITTING, False):
        # A COMMIT was sent and no answer came: the server may yet commit it.  Say so; retrying with the same
        # Idempotency-Key tells which (it replays the message if it was stored, and stores it once otherwise).
        raise Problem(503, "The outcome is unknown: the database did not confirm the write in time. Retry with "
                           "the same Idempotency-Key to find out without sending twice.",
                      code="outcome_unknown", headers={"Retry-After": "1"})
    raise Problem(503, f"No answer could be had within {cfg.request_deadline:g}s; nothing was changed; try again.",
                  code="deadline_exceeded", headers={"Retry-After": "1"})


def _consume_result(task: asyncio.Future[web.StreamResponse]) -> None:
    """Retrieve a cancelled handler's outcome so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


@web.middleware
async def overload_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Shed load: past ``max_concurrency`` requests in progress, answer 503 at once instead of slowly.

    Queueing more work than the pool and the CPU can finish in time only turns every answer late; a quick
    503 with Retry-After keeps the rest within the deadline.  The service routes are never shed.
    """
    if not request.path.startswith("/api/v1/"):
        return await handler(request)  # service routes and docs neither count nor get shed
    state = request.app[LOAD]
    if state.in_flight >= request.app[SETTINGS].api.max_concurrency:
        # The outermost middleware, and as cheap as an answer gets: under a flood, the work of refusing must not
        # starve the requests that were let in.
        state.shed += 1
        return problem_response(503, "The service is busy; try again shortly.", code="overloaded",
                                headers={"Retry-After": "1", REQUEST_ID_HEADER: uuid.uuid4().hex})
    state.in_flight += 1
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/api/...`` needs credentials (see :mod:`api.auth`); the username is kept on the request."""
    if request.path.startswith("/api/") and not request.path.startswith(PUBLIC_PREFIXES):
        request[USERNAME] = request.app[AUTHENTICATOR].username(request.headers.getall("Authorization", []))
    return await handler(request)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Echo a sane ``X-Request-ID`` (or make one) on every answer, and put it in every log line of the request."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    token = current_request_id.set(request_id)
    try:
        response = await handler(request)
    finally:
        current_request_id.reset(token)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, time and log each request, labelled by route (not by raw path, which would explode the series)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        seconds = time.perf_counter() - started
        request.app[METRICS].observe(request.method, route, status, seconds)
        access_log.info("%s %s %s", request.method, route, status, extra={
            "event": "http_request", "method": request.method, "route": route, "status": status,
            "duration_ms": round(seconds * 1000, 2), "user": request.get(USERNAME)})
