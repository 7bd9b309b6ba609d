//! Routes for versions and their content: listing, commits, manifests, directory listings,
//! single files, diffs and path history.

use bytes::Bytes;
use podfs_protocol::api::{
    CommitRequest, Diff, DirListing, KIND_HEADER, Manifest, PathHistory, VERSION_HEADER, VersionInfo, VersionList,
};
use podfs_protocol::{ContentHash, EntryKind, VersionRef, WsPath};
use reqwest::Response;
use reqwest::header::{CONTENT_LENGTH, ETAG};

use crate::Client;
use crate::error::{Error, Result};

/// A single file's content as the gateway serves it (`GET .../files/{path}`), not yet read.
#[derive(Debug)]
pub struct FileResponse {
    /// `file` or `symlink` (from the `x-podfs-kind` header; `file` when absent).
    pub kind: EntryKind,
    /// The content hash from the ETag, when the gateway sent one.
    pub hash: Option<ContentHash>,
    /// The version the path was read from, when the gateway said.
    pub version: Option<u64>,
    /// Content length, when the gateway said.
    pub size: Option<u64>,
    resp: Response,
}

impl FileResponse {
    /// The next piece of the content; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        self.resp.chunk().await.map_err(Error::Transport)
    }

    /// The whole content in memory.
    pub async fn bytes(self) -> Result<Bytes> {
        self.resp.bytes().await.map_err(Error::Transport)
    }
}

/// Reads an ETag as a content hash: `"<hex>"` or `W/"<hex>"`.
pub(crate) fn etag_hash(value: &str) -> Option<ContentHash> {
    value.trim().trim_start_matches("W/").trim_matches('"').parse().ok()
}

impl Client {
    /// `GET /v1/workspaces/{ws}/versions`: newest first, at most `limit`, older than `before`.
    pub async fn versions(&self, ws: &str, limit: Option<u32>, before: Option<u64>) -> Result<VersionList> {
        let mut url = self.url(["v1", "workspaces", ws, "versions"]);
        let pairs: Vec<(&str, String)> = [("limit", limit.map(u64::from)), ("before", before)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v.to_string())))
            .collect();
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        self.call_json("list versions", || self.get(url.clone())).await
    }

    /// `GET /v1/workspaces/{ws}/versions/{v}`.
    pub async fn version(&self, ws: &str, v: VersionRef) -> Result<VersionInfo> {
        let v = v.to_string();
        self.call_json("get version", || self.get(self.url(["v1", "workspaces", ws, "versions", &v]))).await
    }

    /// `POST /v1/workspaces/{ws}/versions`. 409 (`is_conflict`) when `parent_version` is not
    /// the head; 400 `missing_blobs` when a hash was never uploaded. Resent only when the
    /// connection was never made.
    pub async fn commit(&self, ws: &str, req: &CommitRequest) -> Result<VersionInfo> {
        self.call_json_once("commit", || self.post_json(self.url(["v1", "workspaces", ws, "versions"]), req)).await
    }

    /// `GET /v1/workspaces/{ws}/versions/{v}/manifest`: the whole tree. 404 when the workspace
    /// has no version yet (or does not exist).
    pub async fn manifest(&self, ws: &str, v: VersionRef) -> Result<Manifest> {
        let v = v.to_string();
        self.call_json("get manifest", || self.get(self.url(["v1", "workspaces", ws, "versions", &v, "manifest"])))
            .await
    }

    /// `GET /v1/workspaces/{ws}/versions/{v}/tree?path=DIR`: one directory (`None`: the top).
    pub async fn tree(&self, ws: &str, v: VersionRef, path: Option<&str>) -> Result<DirListing> {
        let v = v.to_string();
        let mut url = self.url(["v1", "workspaces", ws, "versions", &v, "tree"]);
        if let Some(p) = path {
            url.query_pairs_mut().append_pair("path", p);
        }
        self.call_json("list directory", || self.get(url.clone())).await
    }

    /// `GET /v1/workspaces/{ws}/versions/{v}/files/{path}`: the raw content (a symlink's link
    /// text for symlinks). The request is retried; reading the body is up to the caller.
    pub async fn get_file(&self, ws: &str, v: VersionRef, path: &WsPath) -> Result<FileResponse> {
        let v = v.to_string();
        let mut url = self.url(["v1", "workspaces", ws, "versions", &v, "files"]);
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.extend(path.components());
        }
        let resp = self.call("get file", || self.get(url.clone())).await?;
        let header = |name| resp.headers().get(name).and_then(|h| h.to_str().ok());
        let kind = match header(KIND_HEADER) {
            None => EntryKind::File,
            Some(k) => EntryKind::parse(k).ok_or_else(|| Error::Decode {
                url: url.to_string(),
                message: format!("unknown {KIND_HEADER} {k:?}"),
            })?,
        };
        let hash = header(ETAG.as_str()).and_then(etag_hash);
        let version = header(VERSION_HEADER).and_then(|v| v.parse().ok());
        let size = header(CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok());
        Ok(FileResponse { kind, hash, version, size, resp })
    }

    /// `GET /v1/workspaces/{ws}/diff?from=&to=`.
    pub async fn diff(&self, ws: &str, from: VersionRef, to: VersionRef) -> Result<Diff> {
        let mut url = self.url(["v1", "workspaces", ws, "diff"]);
        url.query_pairs_mut().append_pair("from", &from.to_string()).append_pair("to", &to.to_string());
        self.call_json("diff", || self.get(url.clone())).await
    }

    /// `GET /v1/workspaces/{ws}/history?path=P`: every revision of one path, oldest first.
    pub async fn history(&self, ws: &str, path: &str) -> Result<PathHistory> {
        let mut url = self.url(["v1", "workspaces", ws, "history"]);
        url.query_pairs_mut().append_pair("path", path);
        self.call_json("path history", || self.get(url.clone())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        let h = ContentHash::of(b"x");
        assert_eq!(etag_hash(&format!("\"{h}\"")), Some(h));
        assert_eq!(etag_hash(&format!("W/\"{h}\"")), Some(h));
        assert_eq!(etag_hash("\"nope\""), None);
    }
}
