"""Marshmallow schemas: every input the API takes and every body it gives, also the source of the OpenAPI doc."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import uuid
from typing import Any, Mapping

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from common.domain import TEXT_MAX_LENGTH, TEXT_PATTERN, DeliveryStatus, SendStatus
from common.phones import InvalidPhone, PhoneNumber, parse_phone

MAX_PAGE = 100
DEFAULT_PAGE = 20
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ASCII_INT = re.compile(r"[0-9]{1,9}")


class AsciiInteger(fields.Integer):
    """An integer written in plain ASCII digits (``int()`` alone would take "١٠", "1_0" and " 1 ")."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> int:
        """Digits only, then the usual checks."""
        if isinstance(value, str) and not ASCII_INT.fullmatch(value):
            raise self.make_error("invalid")
        result = super()._deserialize(value, attr, data, **kwargs)
        if result is None:  # pragma: no cover  # marshmallow passes None only for allow_none fields
            raise self.make_error("null")
        return int(result)


class Phone(fields.String):
    """A phone number in; a :class:`common.phones.PhoneNumber` (E.164 and region) out."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> PhoneNumber:
        """Normalise, or fail with the reason."""
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parse_phone(text)
        except InvalidPhone as exc:
            raise ValidationError(str(exc)) from exc


class Cursor(fields.String):
    """An opaque paging cursor: the (created_at, id) of the last message of the previous page."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> tuple[dt.datetime, uuid.UUID]:
        """Decode a cursor made by :func:`encode_cursor`."""
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            if len(text) > 200:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
            stamp, _, ident = raw.partition("|")
            created = dt.datetime.fromisoformat(stamp)
            if created.utcoffset() != dt.timedelta(0):
                raise ValueError("cursors are made in UTC")
            if not CANONICAL_UUID.fullmatch(ident):
                raise ValueError("not a canonical uuid")
            return created, uuid.UUID(ident)
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            raise ValidationError("Not a valid cursor; use next_cursor from a previous page.") from exc


def encode_cursor(created_at: dt.datetime, message_id: uuid.UUID) -> str:
    """The cursor that continues after the message with this created_at and id."""
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{message_id}".encode()).decode().rstrip("=")


class StrictSchema(Schema):
    """Unknown fields are errors, so a typo never passes silently."""

    class Meta:  # pylint: disable=too-few-public-methods
        """marshmallow options."""

        unknown = RAISE


class MessageCreateSchema(StrictSchema):
    """The body of ``POST /api/v1/messages``.  ``context["providers"]`` holds the names that may be asked for."""

    phone = Phone(required=True, metadata={"description": "International number; normalised to E.164.",
                                           "example": "+79991234568"})
    text = fields.String(required=True, metadata={"description": "1-140 ASCII characters.", "example": "Hello"})
    provider = fields.String(load_default=None, allow_none=True,
                             metadata={"description": "A configured provider; left out, the service chooses.",
                                       "example": "file"})

    @validates("text")
    def check_text(self, value: str, **_: Any) -> None:
        """1-140 characters of printable ASCII, tab, newline or carriage return."""
        if not value:
            raise ValidationError("Must not be empty.")
        if len(value) > TEXT_MAX_LENGTH:
            raise ValidationError(f"Longer than {TEXT_MAX_LENGTH} characters.")
        if not value.isascii():
            raise ValidationError("Only ASCII characters are allowed.")
        if not TEXT_PATTERN.fullmatch(value):
            raise ValidationError("Control characters other than newline, carriage return and tab are not allowed.")

    @validates("provider")
    def check_provider(self, value: str | None, **_: Any) -> None:
        """A configured, enabled provider (or none)."""
        known = self.context.get("providers", ())
        if value is not None and value not in known:
            raise ValidationError(f"Unknown provider; one of: {', '.join(known)}.")


class AttemptSchema(Schema):
    """One attempt to hand a message to a provider."""

    number = fields.Integer(required=True)
    provider = fields.String(required=True)
    started_at = fields.AwareDateTime(required=True)
    finished_at = fields.AwareDateTime(allow_none=True, metadata={"description": "null while under way"})
    result = fields.String(allow_none=True, validate=validate.OneOf(["ok", "error"]),
                           metadata={"description": "ok, error, or null while under way"})
    error = fields.String(allow_none=True)


class MessageSchema(Schema):
    """A message as the API shows it."""

    id = fields.UUID(required=True)
    phone = fields.String(required=True)
    text = fields.String(required=True)
    requested_provider = fields.String(allow_none=True)
    provider = fields.String(allow_none=True, metadata={"description": "provider of the latest attempt"})
    send_status = fields.String(required=True, validate=validate.OneOf([s.value for s in SendStatus]))
    delivery_status = fields.String(required=True, validate=validate.OneOf([s.value for s in DeliveryStatus]))
    waiting_reason = fields.String(allow_none=True, metadata={
        "description": "why a queued message is not going out yet (a rate limit); null otherwise"})
    attempts = fields.List(fields.Nested(AttemptSchema), required=True)
    created_at = fields.AwareDateTime(required=True)
    sent_at = fields.AwareDateTime(allow_none=True)
    delivered_at = fields.AwareDateTime(allow_none=True)
    updated_at = fields.AwareDateTime(required=True)


class MessageListQuerySchema(StrictSchema):
    """Query parameters of ``GET /api/v1/messages``."""

    limit = AsciiInteger(load_default=DEFAULT_PAGE, validate=validate.Range(1, MAX_PAGE))
    cursor = Cursor(load_default=None)
    send_status = fields.String(load_default=None, validate=validate.OneOf([s.value for s in SendStatus]))
    delivery_status = fields.String(load_default=None,
                                    validate=validate.OneOf([s.value for s in DeliveryStatus]))
    phone = Phone(load_default=None)


class MessageListSchema(Schema):
    """A page of the caller's messages, newest first."""

    items = fields.List(fields.Nested(MessageSchema), required=True)
    next_cursor = fields.String(allow_none=True, required=True,
                                metadata={"description": "pass as ?cursor= for the next page; null on the last"})


class WindowCountsSchema(Schema):
    """Counts of one window for one provider."""

    attempts = fields.Integer(required=True)
    sent = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    delivered = fields.Integer(required=True)


class ProviderSchema(Schema):
    """A configured provider: its settings and what it can do."""

    name = fields.String(required=True)
    type = fields.String(required=True, metadata={"description": "the implementation"})
    enabled = fields.Boolean(required=True)
    max_attempts = fields.Integer(required=True)
    retry_interval = fields.Float(required=True, metadata={"description": "seconds between attempts"})
    timeout = fields.Float(required=True, metadata={"description": "seconds one attempt may take"})
    priority = fields.Integer(required=True, metadata={"description": "among providers rated alike, lower first"})
    supports_delivery_reports = fields.Boolean(required=True)
    regions = fields.List(fields.String(), required=True, metadata={"description": "ISO 3166 alpha-2, or *"})
    rate_limit_per_minute = fields.Integer(allow_none=True, required=True,
                                           metadata={"description": "attempts per window; null: unlimited"})
    rate_limit_used = fields.Integer(required=True, metadata={"description": "slots taken in the current window"})
    window_seconds = fields.Float(required=True, metadata={"description": "the length of a window (60 in production)"})
    current_window = fields.Nested(WindowCountsSchema, required=True)
    rating = fields.Float(allow_none=True, required=True, metadata={
        "description": "latest stability rating: the share of the attempts ended in the window that were delivered "
                       "(or sent, delivery still to come); null: no data"})
    rated_at = fields.AwareDateTime(allow_none=True, required=True,
                                    metadata={"description": "when the latest rating was computed"})
    circuit = fields.String(required=True, validate=validate.OneOf(["closed", "open"]), metadata={
        "description": "open: the latest window's attempts all failed; only probes and named traffic go there"})


class WindowStatsSchema(WindowCountsSchema):
    """One computed window of a provider's history."""

    window_start = fields.AwareDateTime(required=True)
    rating = fields.Float(allow_none=True, required=True)
    computed_at = fields.AwareDateTime(required=True)


class ProviderStatsSchema(Schema):
    """A provider's per-window history."""

    provider = fields.String(required=True)
    window_seconds = fields.Float(required=True)
    items = fields.List(fields.Nested(WindowStatsSchema), required=True)


class NoQuerySchema(StrictSchema):
    """A listing without parameters: any query parameter is refused, as on the other listings."""


class ProviderStatsQuerySchema(StrictSchema):
    """Query parameters of ``GET /api/v1/providers/<name>/stats``."""

    minutes = AsciiInteger(load_default=60, validate=validate.Range(1, 10_080))


class ProviderListSchema(Schema):
    """Every configured provider."""

    items = fields.List(fields.Nested(ProviderSchema), required=True)


class StatusSchema(Schema):
    """A liveness or readiness answer."""

    status = fields.String(required=True)


class ProblemSchema(Schema):
    """An RFC 9457 problem: the body of every non-2xx answer."""

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    code = fields.String(required=True, metadata={"description": "stable snake_case word"})
    errors = fields.Dict(keys=fields.String(), values=fields.Raw(),
                         metadata={"description": "field -> messages, where fields are at fault"})
