"""The application factory: settings in, a ready ``web.Application`` out."""
from __future__ import annotations

import asyncio
import logging
import warnings
from typing import AsyncIterator

from aiohttp import web
from aiohttp_apispec import setup_aiohttp_apispec

from api.auth import Authenticator
from api.keys import AUTHENTICATOR, CREATE_SCHEMA, DSN, LOAD, METRICS, METRICS_PAGE, POOL, PROVIDERS, SETTINGS
from api.metrics import HttpMetrics, LoadState, RenderedPage
from api.openapi import finish_document, reset_view_docs
from api.middlewares import (auth_middleware, deadline_middleware, docs_static_middleware, error_middleware,
                             metrics_middleware, overload_middleware, problems_only, request_id_middleware,
                             validation_problem)
from api.schemas import MessageCreateSchema
from api.views import VIEWS
from common.database import create_pool, quiet_statement_timeouts
from common.providers import build_providers
from common.settings import Settings

API_VERSION = "1.0.0"
log = logging.getLogger("smsgate.api")


async def database_context(app: web.Application) -> AsyncIterator[None]:
    """Open the pool on start-up, close it on shutdown."""
    cfg = app[SETTINGS].api
    asyncio.get_running_loop().set_exception_handler(quiet_statement_timeouts)
    app[POOL] = await create_pool(app[DSN], size=cfg.pool_size, statement_timeout=cfg.statement_timeout,
                                  connect_timeout=min(2.0, cfg.request_deadline))
    yield
    app[POOL].close()
    await app[POOL].wait_closed()


def create_app(settings: Settings, dsn: str) -> web.Application:
    """Build the API for ``settings`` against the database at ``dsn``."""
    # Outermost first: excess load is shed before any other work; every answer gets its request id; metrics see
    # the final status; errors become problems; the deadline bounds everything below it, authentication included.
    app = web.Application(
        middlewares=[overload_middleware, request_id_middleware, metrics_middleware, error_middleware,
                     docs_static_middleware, deadline_middleware, auth_middleware],
        client_max_size=settings.api.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[DSN] = dsn
    providers = app[PROVIDERS] = build_providers(settings)
    app[CREATE_SCHEMA] = MessageCreateSchema(context={"providers": list(providers)})
    app[AUTHENTICATOR] = Authenticator(settings.auth)
    app[METRICS] = HttpMetrics()
    app[LOAD] = LoadState()
    # A second at most (the cluster's counters change once per window; tests run windows of a fraction of one).
    app[METRICS_PAGE] = RenderedPage(max_age=min(1.0, settings.metrics.window_seconds / 10))
    app.cleanup_ctx.append(database_context)
    app.on_response_prepare.append(problems_only)
    for path, view in VIEWS:
        app.router.add_view(path, view)
    reset_view_docs(view for _, view in VIEWS)
    with warnings.catch_warnings():
        # aiohttp-apispec 2.2.3 (the newest) keeps its state under string keys, which aiohttp now warns about.
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        setup_aiohttp_apispec(app, title="smsgate", version=API_VERSION, url="/api/docs/swagger.json",
                              swagger_path="/api/docs", static_path="/api/static/swagger",
                              error_callback=_raise_validation_problem, in_place=True)
    finish_document(app["swagger_dict"], list(app[PROVIDERS].keys()), settings.auth.schemes)
    if "smsauth" in settings.auth.schemes and "jwt" in settings.auth.schemes:
        log.warning("SMSAUTH is on next to SSO tokens: anyone can claim any username with it; set "
                    "auth.schemes = [\"jwt\"] in production", extra={"event": "smsauth_enabled_with_jwt"})
    return app


def _raise_validation_problem(error, *_args, **_kwargs):  # type: ignore[no-untyped-def]
    """aiohttp-apispec's error callback: the same 422 problem as everywhere else."""
    raise validation_problem(error)
