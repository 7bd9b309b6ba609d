-- Packs (issue 2/5): small blobs stored many to one object. Keep in step with ../sqlite/0003_packs.sql.
--
-- A pack is stored at `packs/<2 hex>/<hash>` (hash = BLAKE3 of the whole pack) and recorded here
-- only after the blob store acknowledged it. A pack object without a row is an orphan of a
-- crash between the two; garbage collection finds it by listing `packs/` against this table.
CREATE TABLE packs (
    hash       BYTEA PRIMARY KEY CHECK (octet_length(hash) = 32),
    size       BIGINT NOT NULL,
    blobs      BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Every stored blob written into a pack, including copies of content another upload recorded
-- first (a race between two batches): what garbage collection counts as live or dead bytes.
CREATE TABLE pack_spans (
    pack        BYTEA NOT NULL REFERENCES packs (hash),
    pack_offset BIGINT NOT NULL,
    length      BIGINT NOT NULL,
    hash        BYTEA NOT NULL CHECK (octet_length(hash) = 32),
    PRIMARY KEY (pack, pack_offset)
);

-- Where a blob is read from: NULL = its own object `blobs/<2 hex>/<hash>`; else `stored_size`
-- bytes at `pack_offset` of the pack.
ALTER TABLE blobs ADD COLUMN pack BYTEA REFERENCES packs (hash);
ALTER TABLE blobs ADD COLUMN pack_offset BIGINT;
CREATE INDEX blobs_by_pack ON blobs (pack) WHERE pack IS NOT NULL;
