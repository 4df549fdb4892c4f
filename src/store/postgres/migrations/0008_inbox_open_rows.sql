-- dealsync PostgreSQL schema, version 8: the webhook inbox's open rows (`pending` and
-- `claimed`) by id, so that a worker's claim and the intake's pending count read the
-- open rows alone. Before, the claim (`postgres::claims::INBOX`: pending rows OR
-- expired claims, in id order) was planned as a walk of the primary key over every
-- row the inbox still keeps, processed ones included, and the count as a scan of the
-- table: both grew with the retention (66 ms and 27 ms at 120,000 kept rows), not
-- with the work. The pending-only index it replaces is implied by this one.
CREATE INDEX webhook_inbox_open ON webhook_inbox (id) WHERE state IN ('pending', 'claimed');
DROP INDEX webhook_inbox_pending;

-- A delivery's body (a few KB of JSON) is compressed with lz4 where the server has
-- it, as `deals.raw` is (version 4): pglz took about a tenth of the server's CPU under
-- webhook load. A server without lz4 keeps pglz.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE webhook_bodies ALTER COLUMN body SET COMPRESSION lz4;
    END IF;
END
$$;
