-- The peer tracker (issue 3/5, docs/peer-protocol.md). Keep in step with ../postgres/0005_peers.sql.
--
-- Soft state: losing any of it costs one round of S3 fetches, never data. It lives here and not in
-- a gateway's memory so that every replica answers the same (a devpod's heartbeat may reach one
-- replica and its neighbour's plan request another). Times are unix milliseconds; rows past
-- `expires_at` are ignored and deleted on the next write of their workspace.

-- The Ed25519 key (PKCS#8) capabilities are signed with: one row, created by the first gateway
-- that needs it, so that every replica signs with the same key.
CREATE TABLE peer_keys (
    id         INTEGER PRIMARY KEY,
    pkcs8      BLOB NOT NULL,
    created_at INTEGER NOT NULL
);

-- Devpods serving a workspace: where, in which zone, how loaded.
CREATE TABLE peers (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    peer         BLOB NOT NULL,
    zone         TEXT NOT NULL,
    address      TEXT NOT NULL,
    serving      INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, peer)
);

-- Versions a peer holds whole (`complete` 1, from its heartbeat) or is fetching (0, from its plan).
CREATE TABLE peer_versions (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      INTEGER NOT NULL,
    peer         BLOB NOT NULL,
    complete     INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, version, peer)
);

-- Single flight: per zone, the one peer fetching each unit of a version from S3.
CREATE TABLE peer_leases (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    version      INTEGER NOT NULL,
    zone         TEXT NOT NULL,
    hash         BLOB NOT NULL,
    peer         BLOB NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, version, zone, hash)
);

-- Peers reported for sending bytes that failed verification; one row per (peer, reporter).
CREATE TABLE peer_reports (
    peer     BLOB NOT NULL,
    reporter BLOB NOT NULL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (peer, reporter)
);
