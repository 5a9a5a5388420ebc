"""``python -m dispatcher``: one dispatcher replica, until SIGTERM or Ctrl-C (in-flight sends finish first)."""
from __future__ import annotations

import asyncio
import logging
import sys

from common.database import create_pool, quiet_statement_timeouts, resolve_dsn
from common.logs import setup_logging
from common.providers import ProviderConfigError, build_providers
from common.settings import Settings, SettingsError, load_settings
from common.signals import handle_stop_signals
from dispatcher.health import start_health_server
from dispatcher.worker import Dispatcher, claim_transaction_limit

log = logging.getLogger("smsgate.dispatcher")


async def serve(settings: Settings) -> None:
    """Run one dispatcher until a stop signal."""
    dsn = resolve_dsn(settings)
    providers = build_providers(settings)
    cfg = settings.dispatcher
    # Connections are held only for single statements and short transactions: a few serve many sends in flight
    # (and keep several replicas within a server's max_connections).
    pool = await create_pool(dsn, size=min(cfg.max_in_flight, 8) + 2, statement_timeout=cfg.statement_timeout,
                             idle_in_transaction_timeout=claim_transaction_limit(cfg.lease_seconds))
    try:
        dispatcher = Dispatcher(settings, pool, providers, dsn)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet_statement_timeouts)
        handle_stop_signals(loop, dispatcher.stop)
        health = None
        if cfg.health_port is not None:
            health = await start_health_server(dispatcher, settings.api.host, cfg.health_port)
        try:
            await dispatcher.run()
        finally:
            if health is not None:
                await health.cleanup()
    finally:
        pool.close()
        await pool.wait_closed()


def main() -> int:
    """Entry point; returns the process's exit status."""
    try:
        settings = load_settings()
        setup_logging(settings.log_level)
        asyncio.run(serve(settings))
    except (SettingsError, ProviderConfigError) as exc:
        print(f"smsgate dispatcher: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
