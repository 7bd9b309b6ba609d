-- podfs metadata schema, PostgreSQL flavour. Keep it in step with ../sqlite/0001_init.sql: the
-- gateway runs the same portable statements against both (gateway/src/meta).
--
-- Conventions: integers are BIGINT (i64), hashes are 32-byte BYTEA, times are BIGINT unix
-- milliseconds, no booleans, no arrays. Paths use the "C" collation so that ordering and
-- ranges are bytewise, as in SQLite.

CREATE TABLE workspaces (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    -- Newest version number; 0 before the first commit. Commits compare-and-set it.
    head        BIGINT NOT NULL DEFAULT 0,
    -- Files and symlinks in the head version, and their bytes.
    file_count  BIGINT NOT NULL DEFAULT 0,
    total_bytes BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE versions (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    number       BIGINT NOT NULL,
    parent       BIGINT,
    created_at   BIGINT NOT NULL,
    message      TEXT NOT NULL,
    author       TEXT NOT NULL,
    file_count   BIGINT NOT NULL,
    total_bytes  BIGINT NOT NULL,
    -- Paths this version changed relative to its parent.
    changes      BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, number)
);

-- Path history as intervals: `path` had this content from `from_version` up to, not including,
-- `until_version` (9223372036854775807 while live).
CREATE TABLE entries (
    workspace_id  BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    path          TEXT COLLATE "C" NOT NULL,
    from_version  BIGINT NOT NULL,
    until_version BIGINT NOT NULL,
    -- The directory holding `path`, '' at the top.
    parent        TEXT COLLATE "C" NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('file', 'symlink', 'dir')),
    hash          BYTEA CHECK (octet_length(hash) = 32),
    size          BIGINT NOT NULL,
    mode          BIGINT NOT NULL,
    -- Also serves the history of one path and the tree read in path order.
    PRIMARY KEY (workspace_id, path, from_version),
    CHECK (from_version < until_version)
);
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
    hash        BYTEA PRIMARY KEY CHECK (octet_length(hash) = 32),
    size        BIGINT NOT NULL,
    stored_size BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Bearer tokens, kept only as the BLAKE3 hash of the token text.
CREATE TABLE tokens (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash   BYTEA NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    "right"      TEXT NOT NULL CHECK ("right" IN ('read', 'write', 'admin')),
    name         TEXT,
    created_at   BIGINT NOT NULL
);
CREATE INDEX tokens_workspace ON tokens (workspace_id);
