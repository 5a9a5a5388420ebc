"""RFC 9457 problem answers: the one shape of every non-2xx response."""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Mapping

from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"

# The stable ``code`` for each status when nothing more specific applies.
DEFAULT_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 409: "conflict", 411: "length_required",
    413: "payload_too_large", 414: "uri_too_long", 415: "unsupported_media_type", 422: "validation_error",
    412: "precondition_failed", 416: "range_not_satisfiable", 417: "expectation_failed",
    429: "too_many_requests", 431: "headers_too_large", 500: "internal_error", 501: "not_implemented",
    503: "service_unavailable",
}
# RFC 9110 renamed these; Python before 3.13 still has the old phrases.
TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


class Problem(Exception):
    """An answer in the problem format, raised anywhere below the error middleware."""

    def __init__(self, status: int, detail: str, *, code: str | None = None,
                 errors: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> None:
        """``code`` defaults to the status's generic code; ``errors`` maps fields to their messages."""
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.errors = dict(errors) if errors is not None else None
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The HTTP response for this problem."""
        return problem_response(self.status, self.detail, code=self.code, errors=self.errors, headers=self.headers)


def problem_title(status: int) -> str:
    """The problem's ``title``: the status's RFC 9110 reason phrase."""
    try:
        return TITLES.get(status) or HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(status: int, detail: str, *, code: str | None = None,
                 errors: Mapping[str, Any] | None = None) -> bytes:
    """The JSON body of a problem answer."""
    body: dict[str, Any] = {"type": "about:blank", "title": problem_title(status), "status": status,
                            "detail": detail, "code": code or DEFAULT_CODES.get(status, "error")}
    if errors is not None:
        body["errors"] = errors
    return json.dumps(body).encode()


def problem_response(status: int, detail: str, *, code: str | None = None, errors: Mapping[str, Any] | None = None,
                     headers: Mapping[str, str] | None = None) -> web.Response:
    """Build an ``application/problem+json`` response."""
    return web.Response(status=status, reason=problem_title(status),
                        body=problem_body(status, detail, code=code, errors=errors),
                        content_type=PROBLEM_CONTENT_TYPE, headers=headers)
