"""SQLAlchemy Core descriptions of the tables in ``schema.sql`` (which stays the one source of the DDL).

Only what statements need is described here: names and types.  Constraints, indexes and triggers live in
``schema.sql``; ``tests/test_schema.py`` checks that the columns here and there agree.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID

metadata = sa.MetaData()

messages = sa.Table(
    "messages", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("username", sa.Text, nullable=False),
    sa.Column("phone", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("requested_provider", sa.Text),
    sa.Column("provider", sa.Text),
    sa.Column("send_status", sa.Text, nullable=False),
    sa.Column("delivery_status", sa.Text, nullable=False),
    sa.Column("attempt_count", sa.Integer, nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True)),
    sa.Column("claim_token", UUID(as_uuid=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("waiting_reason", sa.Text),
    sa.Column("exhausted_providers", ARRAY(sa.Text), nullable=False),
)

idempotency_keys = sa.Table(
    "idempotency_keys", metadata,
    sa.Column("username", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("message_id", UUID(as_uuid=True), sa.ForeignKey("messages.id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

attempts = sa.Table(
    "attempts", metadata,
    sa.Column("message_id", UUID(as_uuid=True), sa.ForeignKey("messages.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("result", sa.Text),
    sa.Column("error", sa.Text),
)

provider_window_stats = sa.Table(
    "provider_window_stats", metadata,
    sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("provider", sa.Text, primary_key=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("sent", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("delivered", sa.Integer, nullable=False),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("rating", sa.Float),
)

provider_usage = sa.Table(
    "provider_usage", metadata,
    sa.Column("provider", sa.Text, primary_key=True),
    sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("used", sa.Integer, nullable=False),
)

provider_totals = sa.Table(
    "provider_totals", metadata,
    sa.Column("provider", sa.Text, primary_key=True),
    sa.Column("attempts", sa.BigInteger, nullable=False),
    sa.Column("sent", sa.BigInteger, nullable=False),
    sa.Column("failed", sa.BigInteger, nullable=False),
    sa.Column("delivered", sa.BigInteger, nullable=False),
)

cluster_jobs = sa.Table(
    "cluster_jobs", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("first_window", sa.DateTime(timezone=True), nullable=False),
    sa.Column("done_until", sa.DateTime(timezone=True), nullable=False),
)

alerts = sa.Table(
    "alerts", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recovered_at", sa.DateTime(timezone=True)),
    sa.Column("outage_notified_at", sa.DateTime(timezone=True)),
    sa.Column("recovery_notified_at", sa.DateTime(timezone=True)),
    sa.Column("claimed_until", sa.DateTime(timezone=True)),
)
