-- People and companies across connections (`domain::people`): every deal's contact
-- address normalised to a person key, and its domain to a company key unless a free
-- mail or shared mailbox domain. Both are derived from `contact_email` by the one
-- normaliser in Rust: the write path sets them with the contact, and the migration's
-- backfill (`store::people::backfill`, in this migration's transaction) sets them on
-- the deals stored before. NULL where the deal has no usable address.
ALTER TABLE deals ADD COLUMN person_key TEXT;
ALTER TABLE deals ADD COLUMN company_key TEXT;
CREATE INDEX deals_by_person ON deals (person_key);
CREATE INDEX deals_by_company ON deals (company_key);
