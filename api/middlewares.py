"""Middlewares, outermost first: request ids, metrics, problem answers for every error, the deadline, auth."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from marshmallow import ValidationError

from api.keys import AUTHENTICATOR, METRICS, REQUEST_ID, SETTINGS, USERNAME
from api.problems import Problem, problem_response
from common.database import DatabaseUnavailable
from common.logs import current_request_id

log = logging.getLogger("smsgate.api")

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PUBLIC_PREFIXES = ("/api/docs", "/api/static")  # the Swagger UI and its OpenAPI document need no auth


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
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer within ``request_deadline``: past it, cancel the work (and its database statement) and say 503.

    Cancelling an aiopg statement closes its connection, and :func:`common.database.transaction` discards a
    connection on any exception, so no connection goes back to the pool inside a transaction.
    """
    deadline = request.app[SETTINGS].api.request_deadline
    try:
        async with asyncio.timeout(deadline):
            return await handler(request)
    except TimeoutError as exc:
        raise Problem(503, f"No answer could be had within {deadline:g}s; try again.", code="deadline_exceeded",
                      headers={"Retry-After": "1"}) from exc


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/api/...`` needs credentials (see :mod:`api.auth`); the username is kept on the request."""
    if request.path.startswith("/api/") and not request.path.startswith(PUBLIC_PREFIXES):
        request[USERNAME] = request.app[AUTHENTICATOR].username(request.headers.get("Authorization"))
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
    """Count requests and time them, labelled by route (not by raw path, which would explode the series)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].observe(request.method, route, status, time.perf_counter() - started)
