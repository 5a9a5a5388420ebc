"""Typed keys for what the application and each request carry."""
from __future__ import annotations

import aiopg
from aiohttp import web

from api.metrics import HttpMetrics
from common.providers import Provider
from common.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DSN = web.AppKey("dsn", str)
POOL = web.AppKey("pool", aiopg.Pool)
PROVIDERS = web.AppKey("providers", dict[str, Provider])
METRICS = web.AppKey("metrics", HttpMetrics)
USERNAME = web.RequestKey("username", str)
