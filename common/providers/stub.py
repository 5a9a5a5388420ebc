"""The ``stub`` provider: accepts every message and does nothing; it cannot report delivery."""
from __future__ import annotations

from common.providers import register
from common.providers.base import Provider, SendReceipt, Sms


@register("stub")
class StubProvider(Provider):
    """Always succeeds at once; for tests, demos and load runs."""

    supports_delivery_reports = False

    async def _send(self, sms: Sms) -> SendReceipt:
        """Take the message and forget it."""
        return SendReceipt()
