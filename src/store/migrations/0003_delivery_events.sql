-- Bounces and complaints that arrive after the hand-off: a relay's delivery status
-- notifications and email providers' webhooks. One row per event, recorded against the
-- outbox row it answers when it can be told (by the return path or the Message-ID).
CREATE TABLE delivery_events (
    id          INTEGER PRIMARY KEY,
    -- Dedupes redeliveries: the provider's event id, or a digest of the report.
    event_key   TEXT NOT NULL UNIQUE,
    -- "dsn" or the connection that received it.
    source      TEXT NOT NULL,
    -- Lower-cased.
    email       TEXT NOT NULL,
    -- permanent | transient | policy | undetermined | complaint
    class       TEXT NOT NULL,
    -- The enhanced status code (5.1.1) or reply code it was classified by.
    status      TEXT,
    detail      TEXT,
    outbox_id   INTEGER REFERENCES outbox (id),
    -- The outbox row's rule, kept for the per-rule figures.
    rule        TEXT,
    occurred_at INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE INDEX delivery_events_by_email ON delivery_events (email, class, occurred_at);
CREATE INDEX delivery_events_by_outbox ON delivery_events (outbox_id);
CREATE INDEX delivery_events_by_time ON delivery_events (occurred_at);
-- Bounces name the email by the Message-ID dealsync set.
CREATE INDEX outbox_by_message_id ON outbox (message_id) WHERE message_id IS NOT NULL;

-- Marketing rules paused because their complaint rate passed
-- deliverability.complaint_rate_pause; only an operator's
-- `dealsync deliverability resume RULE` removes a row.
CREATE TABLE rule_pauses (
    rule      TEXT PRIMARY KEY,
    reason    TEXT NOT NULL,
    paused_at INTEGER NOT NULL
);
