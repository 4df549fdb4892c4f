-- A digest of what a pulled record itself says (its mapped fields without enrichments,
-- and the ids its enrichments look up), written with the deal. An incremental read
-- that meets the same record again, in its lookback overlap, recognises it by this
-- before asking the vendor for its enrichments. NULL for deals from webhooks and for
-- rows written before this column existed: those are read in full, as before.
ALTER TABLE deals ADD COLUMN fingerprint INTEGER;
