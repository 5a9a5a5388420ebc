"""Typed keys for what the application and each request carry."""
from __future__ import annotations

import aiopg
from aiohttp import web

from api.auth import Authenticator
from api.metrics import HttpMetrics, LoadState, RenderedPage
from api.schemas import MessageCreateSchema
from common.providers import Provider
from common.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DSN = web.AppKey("dsn", str)
POOL = web.AppKey("pool", aiopg.Pool)
PROVIDERS = web.AppKey("providers", dict[str, Provider])
METRICS = web.AppKey("metrics", HttpMetrics)
LOAD = web.AppKey("load", LoadState)
METRICS_PAGE = web.AppKey("metrics_page", RenderedPage)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
CREATE_SCHEMA = web.AppKey("create_schema", MessageCreateSchema)  # built once: a schema costs more to make than to use
USERNAME = web.RequestKey("username", str)
REQUEST_ID = web.RequestKey("request_id", str)
DEADLINE = web.RequestKey("deadline", float)       # loop time by which the answer must be under way
COMMITTING = web.RequestKey("committing", bool)    # a COMMIT has been sent and its outcome is awaited
