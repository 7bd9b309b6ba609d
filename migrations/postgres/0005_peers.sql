-- The peer tracker (issue 3/5, docs/peer-protocol.md). Keep in step with ../sqlite/0005_peers.sql.
--
-- Soft state: losing any of it costs one round of S3 fetches, never data. It lives here and not in
-- a gateway's memory so that every replica answers the same (a devpod's heartbeat may reach one
-- replica and its neighbour's plan request another). Times are unix milliseconds; rows past
-- `expires_at` are ignored and deleted on the next write of their workspace.

-- The Ed25519 key (PKCS#8) capabilities are signed with: one row, created by the first gateway
-- that needs it, so that every replica signs with the same key.
CREATE TABLE peer_keys (
    id         BIGINT PRIMARY KEY,
    pkcs8      BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

-- Devpods serving a workspace: where, in which zone, how loaded.
CREATE TABLE peers (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    peer         BYTEA NOT NULL,
    zone         TEXT NOT NULL,
    address      TEXT NOT NULL,
    serving      BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, peer)
);

-- Versions a peer holds whole (`complete` 1, from its heartbeat) or is fetching (0, from its plan).
CREATE TABLE peer_versions (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      BIGINT NOT NULL,
    peer         BYTEA NOT NULL,
    complete     BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, version, peer)
);

-- Single flight: per zone, the one peer fetching each unit of a version from S3.
CREATE TABLE peer_leases (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      BIGINT NOT NULL,
    zone         TEXT NOT NULL,
    hash         BYTEA NOT NULL,
    peer         BYTEA NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, version, zone, hash)
);

-- Peers reported for sending bytes that failed verification; one row per (peer, reporter).
CREATE TABLE peer_reports (
    peer     BYTEA NOT NULL,
    reporter BYTEA NOT NULL,
    at       BIGINT NOT NULL,
    PRIMARY KEY (peer, reporter)
);
