"""The message's life: statuses, the moves allowed between them, and the rules every input must satisfy.

The same transition rules are enforced by a trigger in ``schema.sql``; ``tests/test_domain.py`` checks that the
two agree, so that neither a bug here nor a hand-written UPDATE can move a message backwards.
"""
from __future__ import annotations

import enum
import re


class SendStatus(str, enum.Enum):
    """Where a message is on its way to the provider."""

    QUEUED = "queued"      # waiting for its next attempt
    SENDING = "sending"    # a dispatcher holds it (claimed, under a lease)
    SENT = "sent"          # a provider accepted it
    FAILED = "failed"      # every allowed attempt failed

    @property
    def is_final(self) -> bool:
        """True when nothing will change this status again."""
        return self in (SendStatus.SENT, SendStatus.FAILED)


class DeliveryStatus(str, enum.Enum):
    """What became of a message after sending."""

    PENDING = "pending"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    UNSUPPORTED = "unsupported"


class AttemptResult(str, enum.Enum):
    """How one attempt ended (an attempt still under way has no result yet)."""

    OK = "ok"
    ERROR = "error"


# Allowed moves (including staying put, which any UPDATE of other columns does).  A retry goes back from
# ``sending`` to ``queued``: the contract describes ``queued`` as "waiting for its next attempt".
SEND_TRANSITIONS: dict[SendStatus, frozenset[SendStatus]] = {
    SendStatus.QUEUED: frozenset({SendStatus.QUEUED, SendStatus.SENDING, SendStatus.FAILED}),
    SendStatus.SENDING: frozenset({SendStatus.SENDING, SendStatus.QUEUED, SendStatus.SENT, SendStatus.FAILED}),
    SendStatus.SENT: frozenset({SendStatus.SENT}),
    SendStatus.FAILED: frozenset({SendStatus.FAILED}),
}
DELIVERY_TRANSITIONS: dict[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.PENDING: frozenset(DeliveryStatus),
    DeliveryStatus.DELIVERED: frozenset({DeliveryStatus.DELIVERED}),
    DeliveryStatus.UNDELIVERED: frozenset({DeliveryStatus.UNDELIVERED}),
    DeliveryStatus.UNSUPPORTED: frozenset({DeliveryStatus.UNSUPPORTED}),
}


def can_move(old: SendStatus, new: SendStatus) -> bool:
    """True when a message may go from send status ``old`` to ``new``."""
    return new in SEND_TRANSITIONS[old]


def can_move_delivery(old: DeliveryStatus, new: DeliveryStatus) -> bool:
    """True when a message may go from delivery status ``old`` to ``new``."""
    return new in DELIVERY_TRANSITIONS[old]


TEXT_MAX_LENGTH = 140
# Printable ASCII plus tab, newline and carriage return; schema.sql's CHECK holds the same class.
TEXT_PATTERN = re.compile(r"[\t\n\r\x20-\x7e]*")
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9._@+\-]{1,64}")
USERNAME_MAX_LENGTH = 64
