-- Pack span lists (issue 2/5, measured). Keep in step with ../sqlite/0004_pack_span_lists.sql.
--
-- 0003 kept one `pack_spans` row per stored blob written into a pack, and a foreign key plus an
-- index from `blobs.pack` to `packs`. On a cold push of 20,000 small files those cost about 700 ms
-- of PostgreSQL time (a third of it): three index entries and a foreign-key check per blob.
--
-- Now a pack row carries its span list: `spans` holds, for every stored blob written into the
-- pack (copies of content recorded first included), the 48-byte entry of the pack's own trailer
-- (BLAKE3 of the content, offset u64 LE, stored length u64 LE), in offset order. Garbage collection
-- reads it to find which blobs a pack holds (their rows by primary key: a row whose `pack` is this
-- pack is live there, every other span is dead bytes). No index on `blobs.pack` is needed for that,
-- and no foreign key: a pack row is written in the transaction that writes the rows naming it, and
-- is removed only in the transaction that moves or deletes them (see ARCHITECTURE.md).
ALTER TABLE packs ADD COLUMN spans BYTEA;

-- The 8 bytes of `x` little endian, as hex.
CREATE FUNCTION pg_temp.le_hex(x BIGINT) RETURNS TEXT LANGUAGE SQL IMMUTABLE AS $$
    SELECT string_agg(lpad(to_hex((x >> (8 * i)) & 255), 2, '0'), '' ORDER BY i) FROM generate_series(0, 7) AS i
$$;

UPDATE packs SET spans = COALESCE(
    (SELECT decode(string_agg(encode(s.hash, 'hex') || pg_temp.le_hex(s.pack_offset) || pg_temp.le_hex(s.length), ''
                              ORDER BY s.pack_offset), 'hex')
     FROM pack_spans AS s WHERE s.pack = packs.hash),
    '\x'::BYTEA);
ALTER TABLE packs ALTER COLUMN spans SET NOT NULL;
ALTER TABLE packs ADD CONSTRAINT packs_spans_entries CHECK (octet_length(spans) = 48 * blobs);

DROP TABLE pack_spans;
DROP INDEX blobs_by_pack;
ALTER TABLE blobs DROP CONSTRAINT blobs_pack_fkey;
