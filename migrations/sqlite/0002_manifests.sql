-- Built manifest.sqlite files (issue 2/3). Keep in step with ../postgres/0002_manifests.sql.
--
-- A manifest is built lazily, the first time a version's is asked for, and never on commit.
-- `hash`/`size` describe the SQLite file (what clients verify); `stored_hash`/`stored_size`
-- the zstd frame kept in the blob store at `manifests/<2 hex>/<hash>.sqlite.zst`.
CREATE TABLE manifests (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      INTEGER NOT NULL,
    hash         BLOB NOT NULL CHECK (length(hash) = 32),
    size         INTEGER NOT NULL,
    stored_hash  BLOB NOT NULL CHECK (length(stored_hash) = 32),
    stored_size  INTEGER NOT NULL,
    entries      INTEGER NOT NULL,
    blobs        INTEGER NOT NULL,
    -- The earlier manifest this one was derived from (plus the diff), NULL for a full build.
    base_version INTEGER,
    small_file_limit INTEGER NOT NULL,
    build_ms     INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, version)
);

-- One builder at a time per version across gateway replicas: a replica inserts its claim and
-- builds; others wait for the manifests row. A claim older than the lease is taken over.
CREATE TABLE manifest_builds (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      INTEGER NOT NULL,
    owner        TEXT NOT NULL,
    claimed_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, version)
);
