-- podfs metadata schema, SQLite flavour. Keep it in step with ../postgres/0001_init.sql: the
-- gateway runs the same portable statements against both (gateway/src/meta).
--
-- Conventions: integers are INTEGER (i64), hashes are 32-byte BLOBs, times are unix
-- milliseconds, no booleans. STRICT tables refuse values of the wrong type. The BINARY
-- collation orders paths bytewise, like "C" in PostgreSQL. Foreign keys need
-- `PRAGMA foreign_keys = ON` (set on every connection); the store also deletes children itself.

CREATE TABLE workspaces (
    -- AUTOINCREMENT: an id is never reused after a workspace is deleted.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    -- Newest version number; 0 before the first commit. Commits compare-and-set it.
    head        INTEGER NOT NULL DEFAULT 0,
    -- Files and symlinks in the head version, and their bytes.
    file_count  INTEGER NOT NULL DEFAULT 0,
    total_bytes INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE versions (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    parent       INTEGER,
    created_at   INTEGER NOT NULL,
    message      TEXT NOT NULL,
    author       TEXT NOT NULL,
    file_count   INTEGER NOT NULL,
    total_bytes  INTEGER NOT NULL,
    -- Paths this version changed relative to its parent.
    changes      INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, number)
) STRICT;

-- Path history as intervals: `path` had this content from `from_version` up to, not including,
-- `until_version` (9223372036854775807 while live). WITHOUT ROWID: rows live in primary-key
-- order, which is the order of a tree read and of a path's history.
CREATE TABLE entries (
    workspace_id  INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    path          TEXT NOT NULL,
    from_version  INTEGER NOT NULL,
    until_version INTEGER NOT NULL,
    -- The directory holding `path`, '' at the top.
    parent        TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('file', 'symlink', 'dir')),
    hash          BLOB CHECK (length(hash) = 32),
    size          INTEGER NOT NULL,
    mode          INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, path, from_version),
    CHECK (from_version < until_version)
) STRICT, WITHOUT ROWID;
-- Live rows of a path set (commit), tree at V, rows closed in a version range (diff).
CREATE INDEX entries_until ON entries (workspace_id, until_version, path);
-- Rows opened in a version range (diff).
CREATE INDEX entries_from ON entries (workspace_id, from_version);
-- Directory listings (children in path order) and "does this directory still have live
-- children".
CREATE INDEX entries_parent ON entries (workspace_id, parent, path, until_version);
-- "Is this hash referenced by the workspace".
CREATE INDEX entries_hash ON entries (workspace_id, hash);

-- Content the gateway has verified against its name and stored.
CREATE TABLE blobs (
    hash        BLOB PRIMARY KEY CHECK (length(hash) = 32),
    size        INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Bearer tokens, kept only as the BLAKE3 hash of the token text.
CREATE TABLE tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash   BLOB NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    "right"      TEXT NOT NULL CHECK ("right" IN ('read', 'write', 'admin')),
    name         TEXT,
    created_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX tokens_workspace ON tokens (workspace_id);
