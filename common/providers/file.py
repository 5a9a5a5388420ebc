"""The ``file`` provider: "sends" an SMS by writing it to ``SENT_SMS_DIR/<ISO 8601 datetime>_<phone>.txt``.

Numbers ending in an even digit succeed and count as delivered ``delivery_delay`` seconds (10 by default) after
sending; numbers ending in an odd digit fail every attempt.  Each success makes exactly one file: the text is
written and synced under a temporary name first and then hard-linked to its final name, which fails instead of
overwriting when the name exists, so a burst of sends to one number in the same microsecond moves the later
ones on by a microsecond each.  Readers never see a half-written file.  The blocking file work runs in a thread.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from common.domain import DeliveryStatus
from common.providers import register
from common.providers.base import DeliveryReport, Provider, ProviderError, ProviderTimeout, SendReceipt, Sms

MAX_NAME_TRIES = 10_000  # more same-microsecond sends to one number than this is not a burst but a bug
STALE_TEMPORARY = 3600.0  # seconds after which a temporary file is surely abandoned
LINK_MARGIN = 0.05  # seconds before the provider timeout after which no file takes its final name


class OddNumberRefused(ProviderError):
    """the file provider refuses numbers that end in an odd digit"""


@register("file")
class FileProvider(Provider):
    """Writes each SMS to a file of its own; delivery is confirmed a fixed delay after sending."""

    supports_delivery_reports = True
    delivery_delay = 10.0

    def configure(self, options: Mapping[str, Any]) -> None:
        """Accepts ``delivery_delay`` (seconds, >= 0)."""
        rest = dict(options)
        self.delivery_delay = self.seconds_option(rest.pop("delivery_delay", self.delivery_delay), "delivery_delay")
        super().configure(rest)
        remove_stale_temporaries(self.context.sent_sms_dir)

    async def _send(self, sms: Sms) -> SendReceipt:
        """Write the file, or refuse an odd number.

        A thread cannot be cancelled, so the timeout is enforced inside it: the write gives up before the file
        takes its final name once the time is up.  If the caller's timeout fires while the thread is still
        finishing, the outcome of the thread decides: a file that did appear is reported as sent, never as a
        failure (which would lead to a retry, and a second file).
        """
        if int(sms.phone[-1]) % 2:
            raise OddNumberRefused()
        deadline = time.monotonic() + self.settings.timeout - LINK_MARGIN
        write = asyncio.ensure_future(asyncio.to_thread(
            write_exclusive, self.context.sent_sms_dir, sms.started_at, sms.phone, sms.text, deadline))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            try:
                await write  # ends by the deadline at the latest
            except ProviderError:
                raise asyncio.CancelledError() from None  # nothing was written: let the timeout stand
            # The file is there: the SMS went out.  Not re-raising the cancellation makes this a success
            # (asyncio.timeout then raises nothing; it uncancels the task itself).
        return SendReceipt(check_delivery_after=self.delivery_delay)

    async def _check_delivery(self, message_id: uuid.UUID, sent_at: dt.datetime,
                              now: dt.datetime) -> DeliveryReport:
        """Delivered exactly ``delivery_delay`` seconds after sending, by the database's clock."""
        delivered_at = sent_at + dt.timedelta(seconds=self.delivery_delay)
        if now >= delivered_at:
            return DeliveryReport(DeliveryStatus.DELIVERED, delivered_at=delivered_at)
        return DeliveryReport(DeliveryStatus.PENDING, check_again_after=(delivered_at - now).total_seconds())


def remove_stale_temporaries(folder: Path, older_than: float = STALE_TEMPORARY) -> int:
    """Remove temporary files a killed process left half-written (they never got a final name); their count."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        candidates = list(folder.glob(".*.tmp"))
    except OSError:
        return 0
    for path in candidates:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            pass  # another process removed or is writing it
    return removed


def write_exclusive(folder: Path, when: dt.datetime, phone: str, text: str, deadline: float | None = None) -> Path:
    """Write ``text`` to ``folder/<when>_<phone>.txt`` without ever replacing a file; return the path used.

    With a ``deadline`` (``time.monotonic()``), give up before linking the final name once it has passed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamp = when.astimezone(dt.timezone.utc)
    temp = folder / f".{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "x", encoding="ascii", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for _ in range(MAX_NAME_TRIES):
            if deadline is not None and time.monotonic() > deadline:
                raise ProviderTimeout("the file could not be written in time")
            final = folder / f"{stamp.isoformat(timespec='microseconds')}_{phone}.txt"
            try:
                os.link(temp, final)  # atomic, and fails when the name is taken
                return final
            except FileExistsError:
                stamp += dt.timedelta(microseconds=1)
        raise ProviderError(f"no free file name after {MAX_NAME_TRIES} tries")
    finally:
        temp.unlink(missing_ok=True)
