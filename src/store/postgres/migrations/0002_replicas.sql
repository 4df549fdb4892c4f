-- dealsync PostgreSQL schema, version 2: what several processes on one database need
-- to share work (see `store::postgres::leases` and `store::postgres::claims`).
-- Times here are TIMESTAMPTZ from the server's clock (`clock_timestamp()`), never a
-- replica's: a lease or a claim expires when the server says so, so replicas whose
-- clocks disagree still agree on who holds what.

-- A named lease (a connection's polling, a leader-only duty), held by one replica at
-- a time until `expires_at` unless renewed. The row is never deleted, so `token` (the
-- fencing token) only grows: every new acquisition adds one, and a write guarded by
-- the token it was given fails once anyone has acquired the lease after it.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    token       BIGINT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    renewed_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

-- Claims: a row taken by a replica is `claimed` (the inbox, the outbox and digests),
-- by `claimed_by` until `claimed_until`. A claim that expired (its replica died) is
-- due again; a ledger row that had gone on to `sending` becomes `uncertain` instead.
ALTER TABLE webhook_inbox ADD COLUMN claimed_by TEXT, ADD COLUMN claimed_until TIMESTAMPTZ;
ALTER TABLE outbox ADD COLUMN claimed_by TEXT, ADD COLUMN claimed_until TIMESTAMPTZ;
ALTER TABLE digests ADD COLUMN claimed_by TEXT, ADD COLUMN claimed_until TIMESTAMPTZ;
-- The claims in force, by expiry: the reclaim reads these, not the table.
CREATE INDEX webhook_inbox_claims ON webhook_inbox (claimed_until)
    WHERE state = 'claimed';
CREATE INDEX outbox_claims ON outbox (claimed_until) WHERE state IN ('claimed', 'sending');
CREATE INDEX digests_claims ON digests (claimed_until) WHERE state IN ('claimed', 'sending');
