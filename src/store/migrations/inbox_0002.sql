-- dealsync webhook inbox, version 2.
--
-- The SHA-256 of the body of deliveries whose
-- signature covers the body alone (Shopify, WooCommerce). The same body received again
-- by the connection within the scheme's replay window is a duplicate, whatever
-- (unsigned) delivery id and topic it comes with. Rows are kept longer than any such
-- window (processed 7 days, failed 30, pending until processed), so the lookup needs
-- no table of its own.
ALTER TABLE webhook_inbox ADD COLUMN body_sha256 BLOB;
CREATE INDEX webhook_inbox_body ON webhook_inbox (connection, body_sha256, received_at)
    WHERE body_sha256 IS NOT NULL;

-- Dead letters can be replayed.
-- The delivery id and topic the delivery came with, so a replay is deduplicated like
-- the delivery itself (against a vendor retry that was accepted later, and against a
-- second replay); and whether and as which inbox row it was replayed.
ALTER TABLE webhook_dead_letters ADD COLUMN delivery_id TEXT;
ALTER TABLE webhook_dead_letters ADD COLUMN topic TEXT;
ALTER TABLE webhook_dead_letters ADD COLUMN replayed_at INTEGER;
ALTER TABLE webhook_dead_letters ADD COLUMN replayed_as INTEGER;
