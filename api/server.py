"""Serving the application: aiohttp's runner, with HTTP-level errors answered as problems too.

aiohttp answers requests it cannot even parse (a malformed request line, a header over 8 KiB, a NUL in a
header) itself, before any middleware runs, with a text/plain body.  :class:`AppRunner` swaps in a connection
handler that answers those in the problem format like every other error.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from api.problems import problem_response
from common.signals import handle_stop_signals

log = logging.getLogger("smsgate.api")
# Connections the kernel queues before the API accepts them (capped by net.core.somaxconn).  aiohttp's 128
# overflowed when a few hundred clients connected at once: the dropped SYNs were retried a second later, so
# those answers came after the 1 s promise although the API answered them in a few milliseconds.
LISTEN_BACKLOG = 1024


class ProblemRequestHandler(RequestHandler):
    """aiohttp's per-connection handler, with protocol errors in the problem format."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A problem answer that closes the connection (the request could not be read to its end)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; no problem answer can follow")
        if status >= 500:
            log.error("error handling a request", exc_info=exc, extra={"event": "protocol_error"})
        else:
            log.info("unreadable HTTP request: %s", type(exc).__name__ if exc else status,
                     extra={"event": "bad_http_request"})
        detail = ("The HTTP request could not be parsed (malformed request line or headers, or headers too large)."
                  if status < 500 else "An unexpected error occurred; it has been logged.")
        response = problem_response(status, detail, code="bad_http_request" if status < 500 else None,
                                    headers={"X-Request-ID": uuid.uuid4().hex})
        response.force_close()
        return response


class ProblemServer(web.Server):
    """A ``web.Server`` whose connections use :class:`ProblemRequestHandler`."""

    def __call__(self) -> RequestHandler:
        """A handler for a new connection."""
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` serving through :class:`ProblemServer`, with request bodies left as they came.

    aiohttp would inflate a gzip or deflate body as its bytes arrive, on the event loop, to any size and whether
    or not a handler ever reads it: a 1 MB body that inflates to 1 GiB, sent to any route, stalled every request
    for two seconds.  The one view that reads a body inflates it itself, bounded (see
    :func:`api.bodies.read_json_object`).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        """aiohttp's runner, with ``auto_decompress`` off unless asked for."""
        kwargs.setdefault("auto_decompress", False)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        """The server aiohttp would make, rebuilt as a :class:`ProblemServer` with the same settings."""
        server = await super()._make_server()
        # pylint: disable-next=protected-access  # aiohttp has no public way to read the handler settings
        handler_settings = server._kwargs
        return ProblemServer(server.request_handler, request_factory=server.request_factory,
                             handler_cancellation=server.handler_cancellation, loop=asyncio.get_running_loop(),
                             **handler_settings)


async def serve(app: web.Application, host: str, port: int, **runner_args: Any) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully."""
    # Idle keep-alive connections (and half-sent requests) are dropped after 15 s rather than aiohttp's 75 s.
    runner = AppRunner(app, access_log=None, keepalive_timeout=15, **runner_args)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, shutdown_timeout=5, backlog=LISTEN_BACKLOG).start()
        log.info("api listening on http://%s:%s", host, port, extra={"event": "api_started"})
        stop = asyncio.Event()
        handle_stop_signals(asyncio.get_running_loop(), stop.set)
        await stop.wait()
        log.info("api stopping", extra={"event": "api_stopping"})
    finally:
        await runner.cleanup()
    log.info("api stopped", extra={"event": "api_stopped"})
