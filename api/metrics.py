"""Request metrics for Prometheus, kept in a registry of the application's own (tests build many apps)."""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "HttpMetrics", "LoadState", "RenderedPage"]

# The method label takes these, and "other" for any other token a client sends: a label value per made-up
# method would let anyone grow the page (and the process's memory) without end.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class LoadState:
    """Requests in progress now, and how many were shed since start (see the overload middleware)."""

    in_flight: int = 0
    shed: int = 0


class HttpMetrics:
    """Count and latency of API requests by method, route and status."""

    def __init__(self) -> None:
        """Create the collectors in a fresh registry."""
        self.registry = CollectorRegistry()
        self.requests = Counter("smsgate_http_requests", "HTTP requests answered.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("smsgate_http_request_duration_seconds", "Time to answer an HTTP request.",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        # Routes are the app's own (unmatched paths share one), so this stays as small as the label sets.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        if method not in METHODS:
            method = "other"
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # labels() validates and locks on every call: look each series up once
            children = self._children[key] = (self.requests.labels(method, route, str(status)),
                                              self.latency.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)


class RenderedPage:
    """The ``/metrics`` page, rendered at most once per ``max_age`` seconds however often it is asked for.

    Rendering costs CPU on the event loop and a database round trip: a flood of scrapes must not stall every
    other request past its deadline.  Prometheus scrapes every 15 s or so; a page a second old serves it as well.
    While one render is under way, other requests wait for it rather than start their own.
    """

    def __init__(self, max_age: float) -> None:
        """Keep a rendered page for ``max_age`` seconds."""
        self.max_age = max_age
        self._body = b""
        self._rendered_at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self, render: Callable[[], Awaitable[bytes]]) -> bytes:
        """The page, from ``render`` when the last one is older than ``max_age``."""
        async with self._lock:
            if time.monotonic() - self._rendered_at >= self.max_age:
                self._body = await render()
                self._rendered_at = time.monotonic()
            return self._body
