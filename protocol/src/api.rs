//! REST v1 request and response bodies. The routes themselves are documented by the gateway's
//! OpenAPI document (`/v1/openapi.json`, committed as `docs/openapi.json`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{Change, ContentHash, Entry};

/// Most hashes accepted in one batch request (missing, locations).
pub const MAX_HASH_BATCH: usize = 10_000;
/// Longest workspace name.
pub const MAX_WORKSPACE_NAME: usize = 128;
/// Response header naming the entry kind on single-file GETs (`file` or `symlink`).
pub const KIND_HEADER: &str = "x-podfs-kind";
/// Response header carrying the resolved version number on single-file GETs.
pub const VERSION_HEADER: &str = "x-podfs-version";
/// BLAKE3 (hex) of the decompressed manifest.sqlite a response carries.
pub const MANIFEST_HASH_HEADER: &str = "x-podfs-manifest-hash";
/// Length in bytes of the decompressed manifest.sqlite a response carries.
pub const MANIFEST_SIZE_HEADER: &str = "x-podfs-manifest-size";
/// For a delta manifest: the version it starts from.
pub const MANIFEST_BASE_HEADER: &str = "x-podfs-manifest-base";
/// Content type of a stored blob (the `blob` module's format) when downloaded as is.
pub const BLOB_CONTENT_TYPE: &str = "application/vnd.podfs.blob";

/// Every error response: `{"code": "...", "message": "..."}`, with `content-type:
/// application/json`, whatever the route and whatever refused the request (a handler, the
/// authentication, a malformed path, query or body, an unknown route or method).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code; the HTTP status it comes with:
    /// - `bad_request` (400): malformed path, query or body, or a request breaking a rule;
    /// - `hash_mismatch` (400): uploaded content does not hash to the blob name;
    /// - `missing_blobs` (400): a commit references blobs never uploaded;
    /// - `unauthorized` (401): missing, malformed or unknown bearer token;
    /// - `forbidden` (403): the token lacks the right or the workspace;
    /// - `not_found` (404): unknown workspace, version, path, blob or route;
    /// - `method_not_allowed` (405): the route exists, the method does not;
    /// - `conflict` (409): workspace name taken, or the commit parent is no longer the head;
    /// - `payload_too_large` (413): body, blob or batch over its limit;
    /// - `unsupported_media_type` (415): a JSON body sent without `content-type: application/json`;
    /// - `range_not_satisfiable` (416): the `Range` is outside the file;
    /// - `corrupt` (500): stored data failed verification;
    /// - `internal` (500): a bug or an unexpected failure of the gateway;
    /// - `unavailable` (503, with `Retry-After`): the database or blob store cannot be reached.
    pub code: ErrorCode,
    /// Human-readable explanation naming the problem.
    pub message: String,
}

/// The wire error codes of [`ErrorBody`]. New codes may appear in later gateways: a client
/// reads a code it does not know as [`ErrorCode::Unknown`] and goes by the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    HashMismatch,
    MissingBlobs,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RangeNotSatisfiable,
    Corrupt,
    Internal,
    Unavailable,
    /// A code this build does not know (sent by a newer gateway, or not a podfs code at all).
    /// Never sent by the gateway.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code the gateway sends (all but `Unknown`).
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::HashMismatch,
        ErrorCode::MissingBlobs,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::Corrupt,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
    ];

    /// The code as it is on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::MissingBlobs => "missing_blobs",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The code the gateway sends with `status` when nothing more specific applies: what a
    /// client assumes for an error answer that carries no `ErrorBody`.
    pub fn for_status(status: u16) -> Self {
        match status {
            400 => ErrorCode::BadRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::PayloadTooLarge,
            415 => ErrorCode::UnsupportedMediaType,
            416 => ErrorCode::RangeNotSatisfiable,
            503 => ErrorCode::Unavailable,
            500..=599 => ErrorCode::Internal,
            _ => ErrorCode::Unknown,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads a wire code; anything unknown is [`ErrorCode::Unknown`].
impl From<&str> for ErrorCode {
    fn from(s: &str) -> Self {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s).unwrap_or(ErrorCode::Unknown)
    }
}

/// True when `name` is an acceptable workspace name: 1-128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_workspace_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_WORKSPACE_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateWorkspace {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Workspace {
    pub name: String,
    /// RFC 3339 time of creation.
    pub created_at: String,
    /// Newest version number; 0 while the workspace has no version.
    pub head: u64,
    /// Files and symlinks in the head version.
    pub file_count: u64,
    /// Bytes of content in the head version.
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceList {
    pub workspaces: Vec<Workspace>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    Read,
    Write,
    Admin,
}

impl Right {
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Right::Read),
            "write" => Some(Right::Write),
            "admin" => Some(Right::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateToken {
    /// `read` or `write` (a workspace token cannot be `admin`).
    pub right: Right,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    /// The bearer token. Shown once: the gateway keeps only its hash.
    pub token: String,
    pub workspace: String,
    pub right: Right,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    pub workspace: String,
    pub version: u64,
    /// The version this one was committed on; absent for version 1.
    pub parent: Option<u64>,
    /// RFC 3339 time of the commit.
    pub created_at: String,
    pub message: String,
    pub author: String,
    /// Files and symlinks in this version.
    pub file_count: u64,
    /// Bytes of content in this version.
    pub total_bytes: u64,
    /// Paths this version changed relative to its parent.
    pub changes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionList {
    pub versions: Vec<VersionInfo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionListQuery {
    /// Most versions to return, newest first (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Only versions older than this number.
    pub before: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommitRequest {
    /// The version the changes apply to: must be the current head (0 for an empty workspace),
    /// otherwise the commit is refused with 409.
    pub parent_version: u64,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub author: Option<String>,
    #[schema(value_type = Vec<crate::tree::ChangeWire>)]
    pub changes: Vec<Change>,
}

/// The whole tree of a version (Phase 1 manifest), entries sorted by path.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Manifest {
    pub workspace: String,
    pub version: u64,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub workspace: String,
    pub version: u64,
    /// The directory listed, `""` for the top.
    pub path: String,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DirQuery {
    /// Directory to list; the top of the tree when absent.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ManifestQuery {
    /// Send only the changes since this version (a delta manifest) instead of the whole tree.
    pub since: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// Older version (number or `head`).
    pub from: String,
    /// Newer version (number or `head`).
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiffEntry {
    pub path: String,
    pub change: DiffKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Entry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Diff {
    pub workspace: String,
    pub from: u64,
    pub to: u64,
    /// Sorted by path.
    pub changes: Vec<DiffEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PathRevision {
    /// First version holding this content.
    pub from_version: u64,
    /// First version no longer holding it; absent while it is current.
    pub until_version: Option<u64>,
    pub entry: Entry,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PathHistory {
    pub workspace: String,
    pub path: String,
    /// Oldest first.
    pub revisions: Vec<PathRevision>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HashBatch {
    pub hashes: Vec<ContentHash>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissingBlobs {
    /// The hashes of the batch the gateway does not hold, in request order.
    pub missing: Vec<ContentHash>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlobUploaded {
    pub hash: ContentHash,
    /// Content length.
    pub size: u64,
    /// Bytes the blob takes in the store (after compression).
    pub stored_size: u64,
    /// False when the content was already stored (deduplicated).
    pub created: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlobLocation {
    pub hash: ContentHash,
    /// Where to GET the stored blob (format of the `blob` module, verify before use).
    /// A presigned object-store URL, or a gateway path starting with `/` when `gateway` is true.
    pub url: String,
    /// True when the URL is the gateway's own: send the bearer token with it. Presigned URLs
    /// carry their own short-lived authorization and must be fetched without the token.
    pub gateway: bool,
    /// For a blob kept in a pack behind a presigned URL: the bytes of the pack to ask for. Send
    /// exactly `Range: bytes={start}-{start + len - 1}`; the signature covers that header, so
    /// any other range (or none) is refused by the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<ByteRange>,
}

/// A range of bytes of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ByteRange {
    pub start: u64,
    pub len: u64,
}

impl From<std::ops::Range<u64>> for ByteRange {
    fn from(r: std::ops::Range<u64>) -> Self {
        Self { start: r.start, len: r.end.saturating_sub(r.start) }
    }
}

impl ByteRange {
    /// The HTTP `Range` header value asking for exactly these bytes (`len` is at least 1).
    pub fn header(&self) -> String {
        format!("bytes={}-{}", self.start, self.start + self.len.max(1) - 1)
    }
}

/// The answer to a batch upload (`POST .../blobs/batch`), sent once every pack holding the
/// accepted records is durable in the blob store and recorded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchUploaded {
    /// Records in the batch.
    pub records: u64,
    /// Blobs this batch stored and recorded.
    pub stored: u64,
    /// Records already held by the gateway, or repeating an earlier record of this batch (not
    /// stored again). `stored + duplicates + refused` is `records`.
    pub duplicates: u64,
    /// Packs written to the blob store.
    pub packs: u64,
    /// Stored bytes written.
    pub stored_bytes: u64,
    /// Records refused, each alone: the others are stored. Never stored.
    pub refused: Vec<RefusedBlob>,
}

/// A record of a batch the gateway did not store, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RefusedBlob {
    pub hash: ContentHash,
    /// `hash_mismatch` (the bytes are not the content the name says, or not a valid stored
    /// blob) or `payload_too_large` (content over the pack limit: upload it alone with PUT).
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlobLocations {
    /// Seconds the presigned URLs stay valid.
    pub expires_in_secs: u64,
    pub locations: Vec<BlobLocation>,
}

/// A devpod announcing itself to the tracker of a workspace (`POST .../peers`): where it serves
/// (`podfs-peer/1` over QUIC) and which versions it holds whole. Repeated as a heartbeat; an
/// announcement expires after [`PeerAnnounced::expires_in_secs`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerAnnounce {
    /// The BLAKE3 hash of the certificate the devpod presents.
    pub peer: crate::peer::PeerId,
    /// Peers share only within a zone (a network where they reach each other directly).
    pub zone: String,
    /// `host:port` of its QUIC endpoint.
    pub address: String,
    /// Streams it is serving now (the tracker hands out the least loaded first).
    #[serde(default)]
    pub serving: u32,
    /// Versions of this workspace it holds whole and serves (at most 16).
    #[serde(default)]
    pub versions: Vec<u64>,
    /// Peers that sent it bytes failing verification since its last announcement.
    #[serde(default)]
    pub reports: Vec<crate::peer::PeerId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerAnnounced {
    /// Announce again well before this.
    pub expires_in_secs: u64,
    /// The gateway's Ed25519 public key (hex) that capabilities are signed with.
    pub capability_key: String,
}

/// A cold start asking for a fetch plan (`POST .../versions/{version}/plan`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanRequest {
    pub peer: crate::peer::PeerId,
    pub zone: String,
    /// `host:port` where the asker serves what it fetches (it becomes a holder).
    pub address: String,
    /// Peers that failed this asker during this cold start (dead, stalled, or sending bad
    /// bytes): their leases of this version in the zone are handed out again, and the answer
    /// names them nowhere. A repeated plan call with this is how a cold start recovers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<crate::peer::PeerId>,
}

/// Where a cold start gets the units of a version: peers of its zone first, S3 for what no
/// peer has or is fetching. Everything needed to fall back is in it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerPlan {
    pub version: u64,
    /// The signed capability (hex) the asker presents to every peer.
    pub capability: String,
    /// The gateway's public key (hex) that signed it.
    pub capability_key: String,
    pub expires_in_secs: u64,
    /// Peers of the zone holding the version whole (first) or fetching it, least loaded first.
    pub holders: Vec<PeerHolder>,
    /// The manifest unit first, then every file above the manifest's small-file limit.
    pub units: Vec<PlanUnit>,
    /// True when the version has more large files than a plan lists: the rest come from S3.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerHolder {
    pub peer: crate::peer::PeerId,
    pub address: String,
    /// Holds the version whole; else it is fetching it.
    pub complete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// The version's manifest.sqlite in its stored transfer form (one zstd frame: the bytes the
    /// manifest download sends).
    Manifest,
    /// The content of one or more files.
    File,
}

/// One unit: a byte string named by its BLAKE3 hash and length.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanUnit {
    pub kind: UnitKind,
    pub hash: ContentHash,
    pub size: u64,
    /// The peer fetching this unit from S3 for the zone (single flight): ask it and it answers
    /// once it has the unit. Absent: the asker holds the lease and fetches it from S3 itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetcher: Option<crate::peer::PeerId>,
    /// The blob-store location of a file unit (for the manifest: the manifest download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<BlobLocation>,
    /// For the manifest, whose unit is its stored zstd frame: BLAKE3 and length of the SQLite
    /// file it decompresses to (the `x-podfs-manifest-hash` and `-size` of the download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_hash: Option<ContentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_names() {
        for ok in ["demo", "a", "my-ws_1.2"] {
            assert!(valid_workspace_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(!valid_workspace_name(bad), "{bad}");
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for c in ErrorCode::ALL {
            let wire = serde_json::to_string(&c).expect("serializes");
            assert_eq!(wire, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&wire).expect("parses"), c);
            assert_eq!(ErrorCode::from(c.as_str()), c);
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!(ErrorCode::from("brand_new_code"), ErrorCode::Unknown);
    }

    #[test]
    fn unknown_codes_are_read() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"code": "quota_exceeded", "message": "m"}"#).expect("an old client survives");
        assert_eq!(body.code, ErrorCode::Unknown);
        assert_eq!(ErrorCode::for_status(404), ErrorCode::NotFound);
        assert_eq!(ErrorCode::for_status(502), ErrorCode::Internal);
        assert_eq!(ErrorCode::for_status(418), ErrorCode::Unknown);
    }
}
