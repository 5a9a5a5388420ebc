"""``python -m api``: the HTTP API, until SIGTERM or Ctrl-C."""
from __future__ import annotations

import sys

from aiohttp import web

from api.app import create_app
from common.database import resolve_dsn
from common.logs import setup_logging
from common.providers import ProviderConfigError
from common.settings import SettingsError, load_settings


def main() -> int:
    """Entry point; returns the process's exit status."""
    try:
        settings = load_settings()
        setup_logging(settings.log_level)
        app = create_app(settings, resolve_dsn(settings))
    except (SettingsError, ProviderConfigError) as exc:
        print(f"smsgate api: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=settings.api.host, port=settings.api.port, print=None, access_log=None,
                shutdown_timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
