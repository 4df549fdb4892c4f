-- dealsync webhook inbox, version 2: the SHA-256 of the body of deliveries whose
-- signature covers the body alone (Shopify, WooCommerce). The same body received again
-- by the connection within the scheme's replay window is a duplicate, whatever
-- (unsigned) delivery id and topic it comes with. Rows are kept longer than any such
-- window (processed 7 days, failed 30, pending until processed), so the lookup needs
-- no table of its own.
ALTER TABLE webhook_inbox ADD COLUMN body_sha256 BLOB;
CREATE INDEX webhook_inbox_body ON webhook_inbox (connection, body_sha256, received_at)
    WHERE body_sha256 IS NOT NULL;
