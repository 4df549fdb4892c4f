-- dealsync webhook inbox, version 1: its own SQLite file beside the main database, so
-- that committing deliveries never waits for deal writes (and the reverse). Times are
-- UTC milliseconds since the epoch.

-- One row per verified delivery. States: pending -> processed | failed. The headers
-- and body live in `webhook_bodies`, so that settling a row rewrites this small row and
-- not the pages of a 2-4 KB body (half the WAL traffic per delivery).
CREATE TABLE webhook_inbox (
    id              INTEGER PRIMARY KEY,
    connection      TEXT NOT NULL,
    delivery_id     TEXT NOT NULL,
    topic           TEXT,
    received_at     INTEGER NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    processed_at    INTEGER,
    -- The dedupe key: a redelivery is acknowledged and never stored twice.
    UNIQUE (connection, delivery_id)
);
-- The worker's scan: pending rows in arrival order, and those waiting for a retry.
CREATE INDEX webhook_inbox_pending ON webhook_inbox (id) WHERE state = 'pending';
CREATE INDEX webhook_inbox_retrying ON webhook_inbox (next_attempt_at)
    WHERE state = 'pending' AND next_attempt_at IS NOT NULL;
-- Pruning by age once settled, and counting by state without reading the bodies.
CREATE INDEX webhook_inbox_settled ON webhook_inbox (state, processed_at)
    WHERE state <> 'pending';

-- The delivery as received, one row per `webhook_inbox` row (same id), written once
-- with it and deleted with it.
CREATE TABLE webhook_bodies (
    id      INTEGER PRIMARY KEY,
    headers TEXT NOT NULL,
    body    BLOB NOT NULL
);

-- Authentic deliveries whose body could not be parsed, kept for inspection.
CREATE TABLE webhook_dead_letters (
    id          INTEGER PRIMARY KEY,
    connection  TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    headers     TEXT NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX webhook_dead_letters_by_age ON webhook_dead_letters (received_at);
