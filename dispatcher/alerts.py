"""Telling the admins: one email (and optionally one webhook call) when an outage starts, one when it ends."""
from __future__ import annotations

import json
import logging
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib

from common.database import Row
from common.settings import AlertSettings

log = logging.getLogger("smsgate.alerts")
SMTP_TIMEOUT = 10.0
WEBHOOK_TIMEOUT = 5.0


class NotificationFailed(Exception):
    """A notification could not be delivered; it stays pending and is tried again."""


def describe(scope: str) -> str:
    """'provider file' or 'every provider'."""
    return "every provider" if scope == "*" else f"provider {scope}"


class Notifier:
    """Sends outage and recovery notices through the configured channels (the log always gets one)."""

    def __init__(self, settings: AlertSettings) -> None:
        """Channels come from ``settings``: SMTP when a host and admins are set, a webhook when its URL is."""
        self.settings = settings

    async def send(self, alert: Row, kind: str) -> None:
        """Send the ``kind`` ('outage' or 'recovery') notice of ``alert``; raise NotificationFailed on failure."""
        cfg = self.settings
        what = describe(alert["scope"])
        if kind == "outage":
            subject = f"[smsgate] OUTAGE: {what}: no successful send for {cfg.window_minutes:g} min"
            body = (f"smsgate has had attempts through {what} but not one successful send for "
                    f"{cfg.window_minutes:g} minutes.\nDetected at {alert['detected_at'].isoformat()}.\n")
        else:
            subject = f"[smsgate] RECOVERED: {what} is sending again"
            body = (f"{what.capitalize()} sent successfully again.\nOutage detected at "
                    f"{alert['detected_at'].isoformat()}, recovered at {alert['recovered_at'].isoformat()}.\n")
        log.warning(subject, extra={"event": f"alert_{kind}", "scope": alert["scope"], "alert_id": alert["id"]})
        if cfg.smtp_host and cfg.admins:
            await self._email(subject, body)
        if cfg.webhook_url:
            await self._webhook({"event": kind, "scope": alert["scope"], "subject": subject,
                                 "detected_at": alert["detected_at"].isoformat(),
                                 "recovered_at": alert["recovered_at"].isoformat() if alert["recovered_at"] else None})

    async def _email(self, subject: str, body: str) -> None:
        """One email addressed to every admin."""
        cfg = self.settings
        message = EmailMessage()
        message["From"] = cfg.sender
        message["To"] = ", ".join(cfg.admins)
        message["Subject"] = subject
        message.set_content(body)
        try:
            await aiosmtplib.send(message, hostname=cfg.smtp_host, port=cfg.smtp_port, use_tls=cfg.smtp_tls,
                                  username=cfg.smtp_username, password=cfg.smtp_password, timeout=SMTP_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise NotificationFailed(f"email: {exc}") from exc

    async def _webhook(self, payload: dict[str, Any]) -> None:
        """POST the notice as JSON."""
        assert self.settings.webhook_url is not None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)) as session:
                async with session.post(self.settings.webhook_url, data=json.dumps(payload),
                                        headers={"Content-Type": "application/json"}) as resp:
                    if resp.status >= 300:
                        raise NotificationFailed(f"webhook answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NotificationFailed(f"webhook: {exc}") from exc
