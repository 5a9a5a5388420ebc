"""Helpers the tests share: settings for tests, in-process dispatcher replicas, polling with a bound."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiopg

from common.database import create_pool
from common.providers import build_providers
from common.settings import Settings, settings_from_mapping
from dispatcher.worker import Dispatcher, claim_transaction_limit


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Settings for tests: short leases and timeouts; ``sections`` overlay the TOML-shaped mapping."""
    raw: dict[str, Any] = {
        "sent_sms_dir": str(tmp_path / "sent_sms"),
        "dispatcher": {"lease_seconds": 6.0, "poll_interval": 0.2, "shutdown_grace": 2.0},
        "providers": {"file": {"timeout": 1.0, "delivery_delay": 0.3}, "stub": {"timeout": 1.0}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            for sub, sub_value in value.items():
                if isinstance(sub_value, dict) and isinstance(raw[key].get(sub), dict):
                    raw[key][sub] = {**raw[key][sub], **sub_value}
                else:
                    raw[key][sub] = sub_value
        else:
            raw[key] = value
    return settings_from_mapping(raw)


class Dispatchers:
    """Start dispatcher replicas in the test's event loop; all are stopped when the test ends."""

    def __init__(self, dsn: str) -> None:
        """Replicas will work on ``dsn``."""
        self.dsn = dsn
        self.running: list[tuple[Dispatcher, asyncio.Task[None], aiopg.Pool]] = []

    async def start(self, settings: Settings, count: int = 1) -> list[Dispatcher]:
        """Start ``count`` replicas with ``settings``."""
        started = []
        for _ in range(count):
            idle_limit = claim_transaction_limit(settings.dispatcher.lease_seconds)
            db_pool = await create_pool(self.dsn, size=8, statement_timeout=5.0,
                                        idle_in_transaction_timeout=idle_limit)
            dispatcher = Dispatcher(settings, db_pool, build_providers(settings), self.dsn)
            self.running.append((dispatcher, asyncio.create_task(dispatcher.run()), db_pool))
            started.append(dispatcher)
        return started

    async def stop_all(self) -> None:
        """Stop every replica and close its pool."""
        for dispatcher, _, _ in self.running:
            dispatcher.stop()
        for _, task, db_pool in self.running:
            await task
            db_pool.close()
            await db_pool.wait_closed()
        self.running.clear()


async def wait_until(check: Callable[[], Awaitable[bool]], within: float, step: float = 0.02) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds (a bound, not a sleep: it returns at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)


def auth(user: str = "alice") -> dict[str, str]:
    """The Authorization header for ``user``."""
    return {"Authorization": f"SMSAUTH:{user}"}
