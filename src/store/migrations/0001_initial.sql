-- dealsync schema, version 1. Times are UTC milliseconds since the epoch; money is
-- integer minor units beside an ISO-4217 code.

CREATE TABLE connections (
    name            TEXT PRIMARY KEY,
    connector       TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    last_sync_started_at  INTEGER,
    last_sync_finished_at INTEGER,
    last_success_at INTEGER,
    last_error      TEXT
);

CREATE TABLE deals (
    id                INTEGER PRIMARY KEY,
    connection        TEXT NOT NULL,
    external_id       TEXT NOT NULL,
    title             TEXT NOT NULL,
    amount_minor      INTEGER,
    currency          TEXT,
    pipeline          TEXT,
    stage             TEXT NOT NULL,
    status            TEXT NOT NULL,
    native_pipeline   TEXT NOT NULL,
    native_stage      TEXT NOT NULL,
    contact_email     TEXT,
    contact_name      TEXT,
    owner             TEXT,
    owner_email       TEXT,
    marketing_consent INTEGER,
    source_created_at INTEGER,
    source_updated_at INTEGER,
    stage_entered_at  INTEGER NOT NULL,
    last_activity_at  INTEGER NOT NULL,
    expected_close    TEXT,
    recovery_url      TEXT,
    line_items        TEXT NOT NULL DEFAULT '[]',
    cart_keys         TEXT NOT NULL DEFAULT '[]',
    deleted_at        INTEGER,
    first_seen_at     INTEGER NOT NULL,
    synced_at         INTEGER NOT NULL,
    -- Hash of the source record plus its mapped stage: equal means nothing to do.
    content_hash      INTEGER NOT NULL,
    raw               TEXT NOT NULL,
    UNIQUE (connection, external_id)
);
CREATE INDEX deals_by_stage ON deals (pipeline, stage, stage_entered_at);
CREATE INDEX deals_by_contact ON deals (contact_email);

-- Keys that tie carts and orders together (checkout token, cart token, session id).
CREATE TABLE deal_keys (
    key     TEXT NOT NULL,
    deal_id INTEGER NOT NULL REFERENCES deals (id),
    PRIMARY KEY (key, deal_id)
) WITHOUT ROWID;

CREATE TABLE stage_history (
    id            INTEGER PRIMARY KEY,
    deal_id       INTEGER NOT NULL REFERENCES deals (id),
    at            INTEGER NOT NULL,
    from_pipeline TEXT,
    from_stage    TEXT,
    to_pipeline   TEXT,
    to_stage      TEXT NOT NULL,
    native_from   TEXT,
    native_to     TEXT NOT NULL,
    cause         TEXT NOT NULL
);
CREATE INDEX stage_history_by_deal ON stage_history (deal_id, at);

CREATE TABLE sync_cursors (
    connection TEXT NOT NULL,
    stream     TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (connection, stream)
);

-- What each connection's discovery found: native pipelines and stages, as JSON.
CREATE TABLE native_pipelines (
    connection    TEXT PRIMARY KEY,
    pipelines     TEXT NOT NULL,
    discovered_at INTEGER NOT NULL
);

CREATE TABLE sync_runs (
    id            INTEGER PRIMARY KEY,
    connection    TEXT NOT NULL,
    full          INTEGER NOT NULL,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    status        TEXT NOT NULL,
    summary       TEXT,
    error         TEXT
);
CREATE INDEX sync_runs_by_connection ON sync_runs (connection, started_at);

-- Records that failed to parse, kept with the error; the sync goes on without them.
CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY,
    connection  TEXT NOT NULL,
    external_id TEXT,
    error       TEXT NOT NULL,
    raw         TEXT NOT NULL,
    at          INTEGER NOT NULL
);

-- Records a pull connector's enrichment read (a HubSpot contact), per id, kept while
-- fresh so later incremental reads need not request them again (`cache` of an
-- enrichment in the manifest, at most 7 days). Written with the page that read them.
CREATE TABLE enrichment_cache (
    connection TEXT NOT NULL,
    step       TEXT NOT NULL,
    id         TEXT NOT NULL,
    record     TEXT NOT NULL,
    fetched_at INTEGER NOT NULL,
    PRIMARY KEY (connection, step, id)
) WITHOUT ROWID;
-- Rows past `ENRICHMENT_RETENTION` are deleted when a run of their connection starts.
CREATE INDEX enrichment_cache_age ON enrichment_cache (connection, fetched_at);

-- The webhook inbox and its dead letters live in their own file (inbox_0001.sql).

-- Follow-up emails and expiries: one row per (deal, rule, step), created when the deal
-- is enrolled into the rule. States: pending -> sending -> sent | failed | skipped;
-- a row left in `sending` by a crash becomes `uncertain` at the next start and is never
-- sent again; an expiry row ends `done`.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    deal_id         INTEGER NOT NULL REFERENCES deals (id),
    rule            TEXT NOT NULL,
    step            INTEGER NOT NULL,
    action          TEXT NOT NULL DEFAULT 'email',
    recipient       TEXT NOT NULL,
    state           TEXT NOT NULL,
    -- When the deal entered the rule's trigger stage; every step counts from here.
    anchor_at       INTEGER NOT NULL,
    -- When the rule says the step is due.
    due_at          INTEGER NOT NULL,
    -- When the worker looks at it next (retries, quiet hours and the cap move it).
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    reason          TEXT,
    message_id      TEXT,
    claimed_at      INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (deal_id, rule, step)
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_by_recipient ON outbox (recipient, claimed_at);
CREATE INDEX outbox_by_rule_recipient ON outbox (rule, recipient, created_at);
CREATE INDEX outbox_by_state ON outbox (state, updated_at);

-- Daily digests: one row per (rule, local day, recipient), created when the day's
-- digest is assembled; the same states as the outbox (a row left in `sending` by a
-- crash becomes `uncertain` and is never resent).
CREATE TABLE digests (
    id              INTEGER PRIMARY KEY,
    rule            TEXT NOT NULL,
    -- The local day in the rule's time zone, YYYY-MM-DD.
    day             TEXT NOT NULL,
    -- The owner's address, lowercased, or the rule's fixed address.
    recipient       TEXT NOT NULL,
    state           TEXT NOT NULL,
    -- The scheduled time of the day's digest; the late grace counts from here.
    slot_at         INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- The ids of the deals the claimed digest lists, as JSON.
    deals           TEXT NOT NULL DEFAULT '[]',
    reason          TEXT,
    message_id      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (rule, day, recipient)
);
CREATE INDEX digests_pending ON digests (next_attempt_at) WHERE state = 'pending';

-- Each (rule, day) whose digests were assembled, or found missed after downtime.
CREATE TABLE digest_runs (
    rule         TEXT NOT NULL,
    day          TEXT NOT NULL,
    slot_at      INTEGER NOT NULL,
    assembled_at INTEGER NOT NULL,
    recipients   INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    PRIMARY KEY (rule, day)
) WITHOUT ROWID;

-- Addresses that get no email at all: unsubscribed, hard-bounced, or added by hand.
CREATE TABLE suppressions (
    email      TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    source     TEXT,
    created_at INTEGER NOT NULL
);

CREATE TABLE oauth_tokens (
    connection    TEXT PRIMARY KEY,
    access_token  TEXT,
    refresh_token TEXT,
    expires_at    INTEGER,
    extra         TEXT NOT NULL DEFAULT '{}',
    needs_reauth  INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL
);
