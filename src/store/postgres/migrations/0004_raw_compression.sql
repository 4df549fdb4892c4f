-- dealsync PostgreSQL schema, version 4: a deal's source record (`raw`, a few KB of
-- JSON) is compressed with lz4 where the server has it (PostgreSQL 14+ built with
-- lz4, as the Debian, Ubuntu, RDS and Cloud SQL builds are), instead of the default
-- pglz: storing a page of deals took about twice as long with pglz (BENCHMARKS.md).
-- A server without lz4 keeps pglz. Values written before keep their compression.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE deals ALTER COLUMN raw SET COMPRESSION lz4;
    END IF;
END
$$;
