-- dealsync webhook inbox, version 2: dead letters can be replayed.
-- The delivery id and topic the delivery came with, so a replay is deduplicated like
-- the delivery itself (against a vendor retry that was accepted later, and against a
-- second replay); and whether and as which inbox row it was replayed.
ALTER TABLE webhook_dead_letters ADD COLUMN delivery_id TEXT;
ALTER TABLE webhook_dead_letters ADD COLUMN topic TEXT;
ALTER TABLE webhook_dead_letters ADD COLUMN replayed_at INTEGER;
ALTER TABLE webhook_dead_letters ADD COLUMN replayed_as INTEGER;
