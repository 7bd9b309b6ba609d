-- Built manifest.sqlite files (issue 2/3). Keep in step with ../sqlite/0002_manifests.sql.
--
-- A manifest is built lazily, the first time a version's is asked for, and never on commit.
-- `hash`/`size` describe the SQLite file (what clients verify); `stored_hash`/`stored_size`
-- the zstd frame kept in the blob store at `manifests/<2 hex>/<hash>.sqlite.zst`.
CREATE TABLE manifests (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      BIGINT NOT NULL,
    hash         BYTEA NOT NULL CHECK (octet_length(hash) = 32),
    size         BIGINT NOT NULL,
    stored_hash  BYTEA NOT NULL CHECK (octet_length(stored_hash) = 32),
    stored_size  BIGINT NOT NULL,
    entries      BIGINT NOT NULL,
    blobs        BIGINT NOT NULL,
    -- The earlier manifest this one was derived from (plus the diff), NULL for a full build.
    base_version BIGINT,
    small_file_limit BIGINT NOT NULL,
    build_ms     BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, version)
);

-- One builder at a time per version across gateway replicas: a replica inserts its claim and
-- builds; others wait for the manifests row. A claim older than the lease is taken over.
CREATE TABLE manifest_builds (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      BIGINT NOT NULL,
    owner        TEXT NOT NULL,
    claimed_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, version)
);
