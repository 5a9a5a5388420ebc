"""The provider interface: what the dispatcher hands over, what comes back, and which failures are worth a retry.

A provider implements :meth:`Provider._send` (and :meth:`Provider._check_delivery` when it can report delivery).
Callers use the public :meth:`Provider.send` / :meth:`Provider.check_delivery`, which add the timeout, the timing
log line and the translation of anything unexpected into a :class:`ProviderError`, so every provider behaves the
same way towards the dispatcher.
"""
from __future__ import annotations

import abc
import asyncio
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from common.domain import DeliveryStatus
from common.settings import ProviderSettings

log = logging.getLogger("smsgate.providers")


class ProviderError(Exception):
    """The provider did not take the message; another attempt may succeed."""

    retryable: ClassVar[bool] = True

    def __init__(self, reason: str | None = None) -> None:
        """``reason`` is short and safe to store and show to the client; the docstring is the default."""
        super().__init__(reason or (self.__doc__ or type(self).__name__).strip())
        self.reason = str(self)


class PermanentProviderError(ProviderError):
    """The provider refused the message for good; retrying cannot help."""

    retryable = False


class ProviderTimeout(ProviderError):
    """The provider did not answer in time."""


class ProviderConfigError(ValueError):
    """A provider's settings are invalid."""


@dataclass(frozen=True)
class Sms:
    """One attempt to send one message, as the provider sees it."""

    message_id: uuid.UUID
    phone: str          # E.164
    text: str
    attempt: int        # 1 for the first attempt
    started_at: dt.datetime  # the attempt's start by the database's clock (UTC)


@dataclass(frozen=True)
class SendReceipt:
    """A provider took the message."""

    # Seconds after sending to ask about delivery; None when the provider cannot report it.
    check_delivery_after: float | None = None


@dataclass(frozen=True)
class DeliveryReport:
    """What a provider knows about a sent message's delivery."""

    status: DeliveryStatus  # PENDING: not known yet
    delivered_at: dt.datetime | None = None
    check_again_after: float | None = None  # seconds; with PENDING only


@dataclass(frozen=True)
class ProviderContext:
    """What the running service gives every provider."""

    sent_sms_dir: Path


class Provider(abc.ABC):
    """A way to send SMS.  Subclasses set ``type_name`` and implement :meth:`_send`."""

    type_name: ClassVar[str]
    supports_delivery_reports: ClassVar[bool] = False

    def __init__(self, settings: ProviderSettings, context: ProviderContext) -> None:
        """Configure from ``settings`` (``settings.options`` holds implementation-specific values)."""
        self.settings = settings
        self.context = context
        self.configure(settings.options)

    @property
    def name(self) -> str:
        """The configured name (several configured providers may share one implementation)."""
        return self.settings.name

    def configure(self, options: Mapping[str, Any]) -> None:
        """Read implementation-specific options; the default accepts none."""
        if options:
            raise ProviderConfigError(f"providers.{self.name}: unknown setting(s) {', '.join(sorted(options))}")

    def seconds_option(self, value: Any, key: str) -> float:
        """An option that is a number of seconds >= 0 (text from the environment is accepted)."""
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = -1.0
        if isinstance(value, bool) or not seconds >= 0 or seconds == float("inf"):
            raise ProviderConfigError(f"providers.{self.name}.{key} must be a number of seconds >= 0, not {value!r}")
        return seconds

    async def send(self, sms: Sms) -> SendReceipt:
        """Hand ``sms`` to the provider within its timeout; raise :class:`ProviderError` when it did not take it."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout):
                receipt = await self._send(sms)
        except TimeoutError as exc:
            error: ProviderError = ProviderTimeout(f"no answer within {self.settings.timeout:g}s")
            self._log_attempt(sms, started, error)
            raise error from exc
        except ProviderError as exc:
            self._log_attempt(sms, started, exc)
            raise
        except Exception as exc:  # pylint: disable=broad-exception-caught  # a provider bug must not kill a worker
            log.exception("provider %s crashed on message %s", self.name, sms.message_id)
            error = ProviderError(f"provider error: {type(exc).__name__}")
            self._log_attempt(sms, started, error)
            raise error from exc
        self._log_attempt(sms, started, None)
        return receipt

    async def check_delivery(self, message_id: uuid.UUID, sent_at: dt.datetime, now: dt.datetime) -> DeliveryReport:
        """Ask what became of a sent message; ``now`` is the database's clock."""
        if not self.supports_delivery_reports:
            return DeliveryReport(DeliveryStatus.UNSUPPORTED)
        async with asyncio.timeout(self.settings.timeout):
            return await self._check_delivery(message_id, sent_at, now)

    @abc.abstractmethod
    async def _send(self, sms: Sms) -> SendReceipt:
        """Send ``sms``; raise :class:`ProviderError` (or :class:`PermanentProviderError`) when it fails."""

    async def _check_delivery(self, message_id: uuid.UUID, sent_at: dt.datetime,  # pylint: disable=unused-argument
                              now: dt.datetime) -> DeliveryReport:  # pylint: disable=unused-argument
        """Providers that report delivery override this; the others never know."""
        return DeliveryReport(DeliveryStatus.UNSUPPORTED)

    def _log_attempt(self, sms: Sms, started: float, error: ProviderError | None) -> None:
        """One line per attempt, without the text or the full number (they are personal data)."""
        log.info("provider attempt", extra={
            "event": "provider_attempt", "provider": self.name, "message_id": str(sms.message_id),
            "attempt": sms.attempt, "phone_tail": sms.phone[-2:], "ok": error is None,
            "error": error.reason if error else None, "duration_ms": round((time.monotonic() - started) * 1000, 1),
        })
