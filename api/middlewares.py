"""Middlewares, outermost first: problem answers for every error, the 1-second deadline, authentication."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from marshmallow import ValidationError

from api.keys import METRICS, SETTINGS, USERNAME
from api.problems import Problem, problem_response
from common.database import DatabaseUnavailable
from common.domain import USERNAME_PATTERN

log = logging.getLogger("smsgate.api")

AUTH_SCHEME = "SMSAUTH:"
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
    """``/api/...`` needs ``Authorization: SMSAUTH:<username>``; the username is kept on the request."""
    if request.path.startswith("/api/") and not request.path.startswith(PUBLIC_PREFIXES):
        request[USERNAME] = authenticate(request.headers.get("Authorization"))
    return await handler(request)


def authenticate(header: str | None) -> str:
    """The username in an ``SMSAUTH:<username>`` header, or a 401 problem."""
    challenge = {"WWW-Authenticate": 'SMSAUTH realm="smsgate"'}
    if not header:
        raise Problem(401, "Send 'Authorization: SMSAUTH:<username>'.", code="authentication_required",
                      headers=challenge)
    if not header.startswith(AUTH_SCHEME):
        raise Problem(401, "Unsupported authorization scheme; send 'SMSAUTH:<username>'.",
                      code="unsupported_auth_scheme", headers=challenge)
    username = header[len(AUTH_SCHEME):]
    if not USERNAME_PATTERN.fullmatch(username):
        raise Problem(401, "The username must be 1-64 characters of A-Z a-z 0-9 . _ @ + -.",
                      code="invalid_credentials", headers=challenge)
    return username


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
