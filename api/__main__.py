"""``python -m api``: the HTTP API, until SIGTERM or Ctrl-C."""
from __future__ import annotations

import asyncio
import sys

from api.app import create_app
from api.server import serve
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
    asyncio.run(serve(app, settings.api.host, settings.api.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
