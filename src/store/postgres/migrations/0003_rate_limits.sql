-- dealsync PostgreSQL schema, version 3: the vendor limits replicas share (see
-- `store::postgres::rate`), so that a vendor sees one client however many replicas
-- poll it. Times are the server's clock (`clock_timestamp()`), never a replica's.

-- A token bucket per connection: `tokens` (at most the burst) as of `updated_at`,
-- refilled at the connection's rate from then on. `granted` is the answer to the
-- last request, written by the same upsert that decides it, because RETURNING sees
-- only the new row.
CREATE TABLE rate_buckets (
    connection TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    granted    BOOLEAN NOT NULL
);

-- The vendor's daily request budget: requests a connection spent on one UTC day.
CREATE TABLE request_budgets (
    connection TEXT NOT NULL,
    day        DATE NOT NULL,
    used       BIGINT NOT NULL CHECK (used >= 0),
    PRIMARY KEY (connection, day)
);
