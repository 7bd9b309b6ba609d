-- Pack span lists (issue 2/5, measured). Keep in step with ../postgres/0004_pack_span_lists.sql,
-- which says why: a pack row carries its span list (`spans`: the 48-byte trailer entry of every
-- stored blob written into the pack, in offset order) instead of one `pack_spans` row per blob,
-- and `blobs.pack` has neither an index nor a foreign key.
--
-- SQLite can neither drop a foreign key nor add a CHECK to existing rows: both tables are
-- rebuilt, `blobs` first (it referenced `packs`).
DROP INDEX blobs_by_pack;
CREATE TABLE blobs_new (
    hash        BLOB PRIMARY KEY CHECK (length(hash) = 32),
    size        INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    pack        BLOB,
    pack_offset INTEGER
) STRICT, WITHOUT ROWID;
INSERT INTO blobs_new (hash, size, stored_size, created_at, pack, pack_offset)
    SELECT hash, size, stored_size, created_at, pack, pack_offset FROM blobs;
DROP TABLE blobs;
ALTER TABLE blobs_new RENAME TO blobs;

CREATE TABLE packs_new (
    hash       BLOB PRIMARY KEY CHECK (length(hash) = 32),
    size       INTEGER NOT NULL,
    blobs      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    spans      BLOB NOT NULL CHECK (length(spans) = 48 * blobs)
);
INSERT INTO packs_new (hash, size, blobs, created_at, spans)
    SELECT p.hash, p.size, p.blobs, p.created_at, COALESCE(
        (SELECT unhex(group_concat(
                    hex(s.hash)
                    || printf('%02X%02X%02X%02X%02X%02X%02X%02X', s.pack_offset & 255, (s.pack_offset >> 8) & 255,
                              (s.pack_offset >> 16) & 255, (s.pack_offset >> 24) & 255, (s.pack_offset >> 32) & 255,
                              (s.pack_offset >> 40) & 255, (s.pack_offset >> 48) & 255, (s.pack_offset >> 56) & 255)
                    || printf('%02X%02X%02X%02X%02X%02X%02X%02X', s.length & 255, (s.length >> 8) & 255,
                              (s.length >> 16) & 255, (s.length >> 24) & 255, (s.length >> 32) & 255,
                              (s.length >> 40) & 255, (s.length >> 48) & 255, (s.length >> 56) & 255),
                    '' ORDER BY s.pack_offset))
         FROM pack_spans AS s WHERE s.pack = p.hash),
        x'')
    FROM packs AS p;
DROP TABLE pack_spans;
DROP TABLE packs;
ALTER TABLE packs_new RENAME TO packs;
