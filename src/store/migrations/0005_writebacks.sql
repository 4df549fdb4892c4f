-- CRM write-back: one row per sent follow-up email whose connection records it on the
-- deal in its CRM (a note, an activity, a task). Written in the transaction that marks
-- the email sent, so it is never lost and never holds the email up; the write-back
-- worker carries it out later (`store::writeback`).
--
-- `key` is the idempotency key, stored before any request: the note carries it, so an
-- attempt whose outcome is unknown (a timeout after the vendor stored the note) is
-- followed by a lookup of the key before anything is created again.
-- States: pending (due at next_attempt_at), claimed (a request in flight), done,
-- failed (given up or refused; `reason` says why).
CREATE TABLE writebacks (
    id              INTEGER PRIMARY KEY,
    outbox_id       INTEGER NOT NULL UNIQUE REFERENCES outbox (id),
    deal_id         INTEGER NOT NULL REFERENCES deals (id),
    connection      TEXT NOT NULL,
    key             TEXT NOT NULL UNIQUE,
    -- What the templates render, copied when the email was recorded as sent.
    external_id     TEXT NOT NULL,
    deal_title      TEXT NOT NULL,
    rule            TEXT NOT NULL,
    step            INTEGER NOT NULL,
    recipient       TEXT NOT NULL,
    subject         TEXT NOT NULL,
    sent_at         INTEGER NOT NULL,
    state           TEXT NOT NULL,
    -- Requests started (a claim counts one before its request goes out).
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    reason          TEXT,
    -- The vendor's id of the record written.
    remote_id       TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    done_at         INTEGER
);
CREATE INDEX writebacks_due ON writebacks (next_attempt_at) WHERE state = 'pending';
CREATE INDEX writebacks_by_deal ON writebacks (deal_id);
