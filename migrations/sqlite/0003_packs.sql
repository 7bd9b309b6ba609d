-- Packs (issue 2/5): small blobs stored many to one object. Keep in step with ../postgres/0003_packs.sql.
--
-- A pack is stored at `packs/<2 hex>/<hash>` (hash = BLAKE3 of the whole pack) and recorded here
-- only after the blob store acknowledged it. A pack object without a row is an orphan of a
-- crash between the two; garbage collection finds it by listing `packs/` against this table.
CREATE TABLE packs (
    hash       BLOB PRIMARY KEY CHECK (length(hash) = 32),
    size       INTEGER NOT NULL,
    blobs      INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

-- Every stored blob written into a pack, including copies of content another upload recorded
-- first (a race between two batches): what garbage collection counts as live or dead bytes.
CREATE TABLE pack_spans (
    pack        BLOB NOT NULL REFERENCES packs (hash),
    pack_offset INTEGER NOT NULL,
    length      INTEGER NOT NULL,
    hash        BLOB NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (pack, pack_offset)
);

-- Where a blob is read from: NULL = its own object `blobs/<2 hex>/<hash>`; else `stored_size`
-- bytes at `pack_offset` of the pack.
ALTER TABLE blobs ADD COLUMN pack BLOB REFERENCES packs (hash);
ALTER TABLE blobs ADD COLUMN pack_offset INTEGER;
CREATE INDEX blobs_by_pack ON blobs (pack) WHERE pack IS NOT NULL;
