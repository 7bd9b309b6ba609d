//! An in-memory stand-in for the gateway's REST v1, just enough for push and pull: the real
//! gateway is tested end to end in `testnet/`. Knobs let tests inject faults.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use podfs_protocol::api::*;
use podfs_protocol::{Change, ContentHash, Entry};

pub const TOKEN: &str = "test-token";

#[derive(Default)]
pub struct Fake {
    pub blobs: HashMap<ContentHash, Vec<u8>>,
    /// Tree of version n at index n-1.
    pub versions: Vec<Vec<Entry>>,
    pub manifest_override: Option<Vec<Entry>>,
    /// Blobs served with one flipped byte.
    pub corrupt: HashSet<ContentHash>,
    /// Hand out "presigned" locations (`/s3/..`, no token) that refuse the first GET.
    pub presigned: bool,
    pub s3_refused: HashSet<ContentHash>,
    pub force_conflict: bool,
    pub uploads: usize,
    pub location_requests: usize,
}

pub type Shared = Arc<Mutex<Fake>>;

pub struct Server {
    pub url: String,
    pub state: Shared,
}

fn err(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(ErrorBody { code: code.into(), message: message.into() })).into_response()
}

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

macro_rules! auth {
    ($h:expr) => {
        if !authorized(&$h) {
            return err(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong token");
        }
    };
}

pub async fn start() -> Server {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/workspaces/{ws}", get(workspace))
        .route("/v1/workspaces/{ws}/versions", post(commit).get(versions))
        .route("/v1/workspaces/{ws}/versions/{v}/manifest", get(manifest))
        .route("/v1/workspaces/{ws}/blobs/missing", post(missing))
        .route("/v1/workspaces/{ws}/blobs/locations", post(locations))
        .route("/v1/workspaces/{ws}/blobs/{hash}", put(upload).get(blob))
        .route("/s3/{hash}", get(s3))
        .with_state(state.clone())
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { url, state }
}

fn info(ws: &str, version: u64, tree: &[Entry]) -> VersionInfo {
    VersionInfo {
        workspace: ws.into(),
        version,
        parent: (version > 1).then(|| version - 1),
        created_at: "2026-01-01T00:00:00Z".into(),
        message: String::new(),
        author: "test".into(),
        file_count: tree.iter().filter(|e| e.hash.is_some()).count() as u64,
        total_bytes: tree.iter().map(|e| e.size).sum(),
        changes: 0,
    }
}

async fn workspace(State(s): State<Shared>, h: HeaderMap, Path(ws): Path<String>) -> Response {
    auth!(h);
    if ws != "demo" {
        return err(StatusCode::NOT_FOUND, "not_found", "no such workspace");
    }
    let s = s.lock().unwrap();
    Json(Workspace {
        name: ws,
        created_at: "2026-01-01T00:00:00Z".into(),
        head: s.versions.len() as u64,
        file_count: 0,
        total_bytes: 0,
    })
    .into_response()
}

async fn versions(State(s): State<Shared>, h: HeaderMap, Path(ws): Path<String>) -> Response {
    auth!(h);
    let s = s.lock().unwrap();
    let versions = (1..=s.versions.len() as u64).rev().map(|v| info(&ws, v, &s.versions[v as usize - 1])).collect();
    Json(VersionList { versions }).into_response()
}

async fn manifest(State(s): State<Shared>, h: HeaderMap, Path((ws, v)): Path<(String, String)>) -> Response {
    auth!(h);
    let s = s.lock().unwrap();
    let head = s.versions.len() as u64;
    let n = if v == "head" { head } else { v.parse().unwrap_or(0) };
    if let Some(entries) = &s.manifest_override {
        return Json(Manifest { workspace: ws, version: n.max(1), entries: entries.clone() }).into_response();
    }
    if n == 0 || n > head {
        return err(StatusCode::NOT_FOUND, "not_found", "no such version");
    }
    Json(Manifest { workspace: ws, version: n, entries: s.versions[n as usize - 1].clone() }).into_response()
}

async fn missing(State(s): State<Shared>, h: HeaderMap, Json(b): Json<HashBatch>) -> Response {
    auth!(h);
    assert!(b.hashes.len() <= MAX_HASH_BATCH);
    let s = s.lock().unwrap();
    Json(MissingBlobs { missing: b.hashes.into_iter().filter(|h| !s.blobs.contains_key(h)).collect() }).into_response()
}

async fn upload(
    State(s): State<Shared>,
    h: HeaderMap,
    Path((_ws, hash)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    auth!(h);
    let hash: ContentHash = hash.parse().unwrap();
    if ContentHash::of(&body) != hash {
        return err(StatusCode::BAD_REQUEST, "hash_mismatch", "content does not match the hash");
    }
    let mut s = s.lock().unwrap();
    s.uploads += 1;
    let stored = podfs_protocol::blob::encode(&body);
    let stored_size = stored.len() as u64;
    let created = s.blobs.insert(hash, stored).is_none();
    (StatusCode::CREATED, Json(BlobUploaded { hash, size: body.len() as u64, stored_size, created })).into_response()
}

async fn locations(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(ws): Path<String>,
    Json(b): Json<HashBatch>,
) -> Response {
    auth!(h);
    assert!(b.hashes.len() <= MAX_HASH_BATCH);
    let mut s = s.lock().unwrap();
    s.location_requests += 1;
    let presigned = s.presigned;
    let locations = b
        .hashes
        .into_iter()
        .map(|hash| BlobLocation {
            hash,
            url: if presigned { format!("/s3/{hash}") } else { format!("/v1/workspaces/{ws}/blobs/{hash}") },
            gateway: !presigned,
        })
        .collect();
    Json(BlobLocations { expires_in_secs: 60, locations }).into_response()
}

fn stored(s: &Fake, hash: &str) -> Response {
    let Ok(hash) = hash.parse::<ContentHash>() else {
        return err(StatusCode::BAD_REQUEST, "bad_request", "bad hash");
    };
    match s.blobs.get(&hash) {
        None => err(StatusCode::NOT_FOUND, "not_found", "no such blob"),
        Some(b) => {
            let mut b = b.clone();
            if s.corrupt.contains(&hash) {
                let last = b.len() - 1;
                b[last] ^= 1;
            }
            ([("content-type", BLOB_CONTENT_TYPE)], b).into_response()
        }
    }
}

async fn blob(State(s): State<Shared>, h: HeaderMap, Path((_ws, hash)): Path<(String, String)>) -> Response {
    auth!(h);
    stored(&s.lock().unwrap(), &hash)
}

/// A "presigned" URL: must come without a token; refuses each blob's first GET (expired).
async fn s3(State(s): State<Shared>, h: HeaderMap, Path(hash): Path<String>) -> Response {
    if h.contains_key("authorization") {
        return (StatusCode::BAD_REQUEST, "token sent to S3").into_response();
    }
    let mut s = s.lock().unwrap();
    let parsed: ContentHash = hash.parse().unwrap();
    if s.s3_refused.insert(parsed) {
        return (
            StatusCode::FORBIDDEN,
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )
            .into_response();
    }
    stored(&s, &hash)
}

async fn commit(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(ws): Path<String>,
    Json(req): Json<CommitRequest>,
) -> Response {
    auth!(h);
    let mut s = s.lock().unwrap();
    let head = s.versions.len() as u64;
    if s.force_conflict || req.parent_version != head {
        return err(StatusCode::CONFLICT, "conflict", "parent_version is not the head");
    }
    if req.changes.is_empty() {
        return err(StatusCode::BAD_REQUEST, "bad_request", "empty change list");
    }
    let mut tree: BTreeMap<String, Entry> =
        s.versions.last().cloned().unwrap_or_default().into_iter().map(|e| (e.path.to_string(), e)).collect();
    for c in &req.changes {
        match c {
            Change::Put(e) => {
                if let Some(h) = e.hash
                    && !s.blobs.contains_key(&h)
                {
                    return err(StatusCode::BAD_REQUEST, "missing_blobs", "blob never uploaded");
                }
                tree.insert(e.path.to_string(), e.clone());
            }
            Change::Delete(p) => {
                tree.remove(p.as_str());
            }
        }
    }
    let tree: Vec<Entry> = tree.into_values().collect();
    // the closed-tree rule
    let dirs: HashSet<&str> = tree.iter().filter(|e| e.hash.is_none()).map(|e| e.path.as_str()).collect();
    if let Some(orphan) = tree.iter().find(|e| !e.path.parent_str().is_empty() && !dirs.contains(e.path.parent_str())) {
        return err(StatusCode::BAD_REQUEST, "bad_request", &format!("{} has no parent directory", orphan.path));
    }
    s.versions.push(tree.clone());
    let mut i = info(&ws, head + 1, &tree);
    i.changes = req.changes.len() as u64;
    (StatusCode::CREATED, Json(i)).into_response()
}
