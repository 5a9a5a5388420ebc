-- smsgate schema (PostgreSQL 13 or newer).
--
-- Idempotent: applying it twice changes nothing and fails nothing, so `make run` applies it at every start.
-- It runs in one transaction under an advisory lock, so replicas that apply it at the same moment queue up
-- instead of racing on the catalog.  Apply with `.venv/bin/python -m common migrate` or `psql -f schema.sql`.

BEGIN;
SELECT pg_advisory_xact_lock(hashtext('smsgate.schema'));

-- One row per message.  The API inserts it; dispatchers move it forward (see the trigger below).
CREATE TABLE IF NOT EXISTS messages (
    id                 uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    username           text        NOT NULL,
    phone              text        NOT NULL,
    text               text        NOT NULL,
    requested_provider text,                    -- what the client asked for; NULL: the service chooses
    provider           text,                    -- provider of the latest attempt
    send_status        text        NOT NULL DEFAULT 'queued',
    delivery_status    text        NOT NULL DEFAULT 'pending',
    attempt_count      integer     NOT NULL DEFAULT 0,
    -- When a dispatcher must next look at the row: the next attempt (queued), the end of the lease (sending)
    -- or the delivery check (sent, pending).  NULL once nothing is left to do.
    due_at             timestamptz          DEFAULT now(),
    claim_token        uuid,                    -- the holder of the current claim; stale writes do not match it
    created_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    delivered_at       timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_username_format CHECK (username ~ '^[A-Za-z0-9._@+-]{1,64}$'),
    CONSTRAINT messages_phone_e164 CHECK (phone ~ '^\+[1-9][0-9]{1,14}$'),
    CONSTRAINT messages_text_format CHECK (char_length(text) BETWEEN 1 AND 140 AND text ~ '^[\t\n\r -~]+$'),
    CONSTRAINT messages_requested_provider_name CHECK (requested_provider ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT messages_send_status CHECK (send_status IN ('queued', 'sending', 'sent', 'failed')),
    CONSTRAINT messages_delivery_status
        CHECK (delivery_status IN ('pending', 'delivered', 'undelivered', 'unsupported')),
    CONSTRAINT messages_attempt_count CHECK (attempt_count >= 0),
    -- Unfinished work always has a due time, so no message can be forgotten in any status.
    CONSTRAINT messages_due_while_unfinished
        CHECK ((due_at IS NULL) = (send_status IN ('sent', 'failed') AND delivery_status <> 'pending')),
    CONSTRAINT messages_sending_is_claimed CHECK (send_status <> 'sending' OR claim_token IS NOT NULL),
    CONSTRAINT messages_sent_has_time CHECK ((send_status = 'sent') = (sent_at IS NOT NULL)),
    CONSTRAINT messages_delivered_has_time CHECK ((delivery_status = 'delivered') = (delivered_at IS NOT NULL)),
    CONSTRAINT messages_failed_is_undelivered CHECK (send_status <> 'failed' OR delivery_status = 'undelivered')
);

-- Columns added after the first release: ADD COLUMN IF NOT EXISTS keeps older databases in step.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS waiting_reason text;       -- why a queued message waits (rate limits)
ALTER TABLE messages ADD COLUMN IF NOT EXISTS exhausted_providers text[] NOT NULL DEFAULT '{}';  -- not again

-- Every attempt to hand a message to a provider.  The row is written when the attempt starts, so an attempt
-- whose dispatcher died still counts toward the provider's limit.
CREATE TABLE IF NOT EXISTS attempts (
    message_id  uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    number      integer     NOT NULL,
    provider    text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    result      text,
    error       text,
    PRIMARY KEY (message_id, number),           -- also the index for "attempts of these messages"
    CONSTRAINT attempts_number CHECK (number >= 1),
    CONSTRAINT attempts_result CHECK (result IN ('ok', 'error')),
    CONSTRAINT attempts_finished_has_result CHECK ((finished_at IS NULL) = (result IS NULL)),
    CONSTRAINT attempts_error_only_on_error CHECK (result = 'error' OR error IS NULL),
    CONSTRAINT attempts_error_length CHECK (char_length(error) <= 500)
);

-- Idempotency-Key of POST /api/v1/messages: the same user and key within 24 h replays the first message.
-- The primary key makes concurrent requests with one key create one message; an entry older than 24 h is
-- taken over by the next request that uses the key.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    username     text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,          -- sha256 of the normalised request
    message_id   uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (username, key),
    CONSTRAINT idempotency_keys_key_format CHECK (key ~ '^[ -~]{1,255}$'),
    CONSTRAINT idempotency_keys_hash_format CHECK (request_hash ~ '^[0-9a-f]{64}$')
);
CREATE INDEX IF NOT EXISTS idempotency_keys_message_idx ON idempotency_keys (message_id);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_idx ON idempotency_keys (created_at);  -- pruning

-- Per-provider counts per time window (a minute in production), computed once for the whole cluster by the
-- dispatcher that wins the cluster-jobs lock; /metrics sums them into counters.
CREATE TABLE IF NOT EXISTS provider_window_stats (
    window_start timestamptz NOT NULL,
    provider     text        NOT NULL,
    attempts     integer     NOT NULL,          -- attempts started in the window
    sent         integer     NOT NULL,          -- attempts that ended ok in the window
    failed       integer     NOT NULL,          -- attempts that ended in an error in the window
    delivered    integer     NOT NULL,          -- deliveries recorded in the window
    computed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, provider),
    CONSTRAINT provider_window_stats_counts CHECK (attempts >= 0 AND sent >= 0 AND failed >= 0 AND delivered >= 0)
);

-- How far each cluster-wide job has got (windows before done_until are computed).
CREATE TABLE IF NOT EXISTS cluster_jobs (
    name         text        PRIMARY KEY,
    first_window timestamptz NOT NULL,          -- the first window the job computed
    done_until   timestamptz NOT NULL,
    CONSTRAINT cluster_jobs_order CHECK (done_until >= first_window)
);

-- The stability rating of each provider in each window: of the attempts that ended in the window, the share
-- delivered (a send whose report is still to come counts, as does any successful send of a provider that
-- cannot report delivery); NULL when none ended.  See compute_windows in common/store.py.
ALTER TABLE provider_window_stats ADD COLUMN IF NOT EXISTS rating double precision;
CREATE INDEX IF NOT EXISTS provider_window_stats_latest_idx ON provider_window_stats (provider, window_start DESC);

-- Rate limits: attempts started per provider per window, across every replica.  A dispatcher takes a slot with
-- one INSERT ... ON CONFLICT DO UPDATE ... WHERE used < limit, which the row lock makes atomic.
CREATE TABLE IF NOT EXISTS provider_usage (
    provider     text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         integer     NOT NULL,
    PRIMARY KEY (provider, window_start),
    CONSTRAINT provider_usage_used CHECK (used >= 0)
);

-- Running totals of provider_window_stats, so that a scrape of /metrics reads one row per provider.
CREATE TABLE IF NOT EXISTS provider_totals (
    provider  text    PRIMARY KEY,
    attempts  bigint  NOT NULL,
    sent      bigint  NOT NULL,
    failed    bigint  NOT NULL,
    delivered bigint  NOT NULL
);

-- Outage alerts: one row per outage of one provider (scope = its name) or of all of them (scope = '*').  The
-- partial unique index allows one open outage per scope, so replicas that detect it together make one row.
CREATE TABLE IF NOT EXISTS alerts (
    id                   bigserial   PRIMARY KEY,
    scope                text        NOT NULL,
    detected_at          timestamptz NOT NULL DEFAULT now(),
    recovered_at         timestamptz,
    outage_notified_at   timestamptz,        -- the outage email/webhook went out
    recovery_notified_at timestamptz,        -- the recovery email/webhook went out
    claimed_until        timestamptz,        -- a replica is sending a notification until then
    CONSTRAINT alerts_recovery_after_detection CHECK (recovered_at IS NULL OR recovered_at >= detected_at)
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open_per_scope ON alerts (scope) WHERE recovered_at IS NULL;
CREATE INDEX IF NOT EXISTS alerts_unnotified_idx ON alerts (id)
    WHERE outage_notified_at IS NULL OR (recovered_at IS NOT NULL AND recovery_notified_at IS NULL);

-- The start of the window of length `seconds` that holds `ts` (windows are aligned to the Unix epoch).
CREATE OR REPLACE FUNCTION smsgate_window(ts timestamptz, seconds double precision) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN to_timestamp(floor(extract(epoch FROM ts) / seconds) * seconds);

-- The per-window counts read attempts by start and by end, and deliveries by when they were recorded.
CREATE INDEX IF NOT EXISTS attempts_started_idx ON attempts (started_at);
CREATE INDEX IF NOT EXISTS attempts_finished_idx ON attempts (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_delivered_idx ON messages (updated_at) WHERE delivery_status = 'delivered';

-- The dispatchers' "what is due now": small, because finished messages leave it.
CREATE INDEX IF NOT EXISTS messages_due_idx ON messages (due_at) WHERE due_at IS NOT NULL;
-- A user's messages, newest first, with keyset paging on (created_at, id).
CREATE INDEX IF NOT EXISTS messages_user_created_idx ON messages (username, created_at DESC, id DESC);

-- Statuses only move forward (a retry may return a message from 'sending' to 'queued').  common/domain.py holds
-- the same table; tests/test_domain.py checks that the two agree.
CREATE OR REPLACE FUNCTION smsgate_guard_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.send_status <> OLD.send_status AND (OLD.send_status, NEW.send_status) NOT IN (
        ('queued', 'sending'), ('queued', 'failed'),
        ('sending', 'queued'), ('sending', 'sent'), ('sending', 'failed')) THEN
        RAISE EXCEPTION 'send_status may not move from % to %', OLD.send_status, NEW.send_status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.delivery_status <> OLD.delivery_status AND OLD.delivery_status <> 'pending' THEN
        RAISE EXCEPTION 'delivery_status may not move from % to %', OLD.delivery_status, NEW.delivery_status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER messages_guard_status
    BEFORE UPDATE OF send_status, delivery_status ON messages
    FOR EACH ROW EXECUTE FUNCTION smsgate_guard_status();

-- New work wakes the dispatchers at once (they LISTEN on this channel) instead of at their next poll.
-- Once per statement, and PostgreSQL folds equal notifications of one transaction into one.
CREATE OR REPLACE FUNCTION smsgate_notify_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('smsgate_due', '');
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER messages_notify_new
    AFTER INSERT ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION smsgate_notify_new();

COMMIT;
