"""The dispatcher's own HTTP port for orchestrators: ``/health`` (alive), ``/ready`` (database answers),
``/metrics`` (this replica's in-flight sends and passes)."""
from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common.database import DatabaseUnavailable, ping
from dispatcher.worker import Dispatcher

DISPATCHER = web.AppKey("dispatcher", Dispatcher)


async def health(_: web.Request) -> web.Response:
    """Alive while the event loop answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready while the database answers."""
    try:
        await ping(request.app[DISPATCHER].pool)
    except DatabaseUnavailable:
        return web.json_response({"type": "about:blank", "title": "Service Unavailable", "status": 503,
                                  "detail": "The database is not available.", "code": "database_unavailable"},
                                 status=503, content_type="application/problem+json")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """This replica's gauges (the cluster's counters are served by the API)."""
    dispatcher = request.app[DISPATCHER]
    registry = CollectorRegistry(auto_describe=False)
    Gauge("smsgate_dispatcher_in_flight", "Sends and delivery checks under way in this replica.",
          registry=registry).set(dispatcher.in_flight)
    Gauge("smsgate_dispatcher_passes", "Claim passes this replica has made since it started.",
          registry=registry).set(dispatcher.passes)
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_health_server(dispatcher: Dispatcher, host: str, port: int) -> web.AppRunner:
    """Serve the health routes; the caller cleans the returned runner up."""
    app = web.Application()
    app[DISPATCHER] = dispatcher
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
