//! Single files of any version over plain HTTP: `GET .../versions/{version}/files/{path}`.
//!
//! Full bodies, one byte range (`Range: bytes=a-b`, `a-`, `-n`; several ranges get the whole
//! body, as RFC 9110 allows), `ETag` = the content hash, `If-None-Match` -> 304. HEAD works too.
//! The content is verified against its hash before the first byte is sent.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use podfs_protocol::api::{ErrorBody, KIND_HEADER, Right, VERSION_HEADER};
use podfs_protocol::{EntryKind, WsPath};

use super::auth::Caller;
use super::extract::{ApiPath, FilePath};
use super::versions::resolve;
use crate::error::{Error, Result};
use crate::server::AppState;

/// Get one file (or a symlink's link text) of a version.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions/{version}/files/{path}", tag = "files",
    params(FilePath, ("Range" = Option<String>, Header, description = "one byte range"),
        ("If-None-Match" = Option<String>, Header)),
    responses(
        (status = 200, description = "the content, typed by its name's extension \
            (`application/octet-stream` when unknown, and for a symlink's text)", content_type = "*/*"),
        (status = 206, description = "the requested range, typed as the whole", content_type = "*/*"),
        (status = 304, description = "the ETag matches"),
        (status = 400, description = "invalid path, or a directory", body = ErrorBody),
        (status = 416, description = "the range is outside the file", body = ErrorBody)))]
pub async fn get_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(FilePath { workspace: name, version, path }): ApiPath<FilePath>,
    headers: HeaderMap,
) -> Result<Response> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let path = WsPath::new(path)?;
    let v = resolve(&state, &ws, &version).await?;
    let entry = state
        .meta
        .entry(ws.id, v, &path)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{path} does not exist in {name}@{v}")))?;
    let hash = match (entry.kind, entry.hash) {
        (EntryKind::Dir, _) => {
            return Err(Error::BadRequest(format!(
                "{path} is a directory in {name}@{v}; list it with /v1/workspaces/{name}/versions/{v}/tree?path={path}"
            )));
        }
        (_, Some(h)) => h,
        (_, None) => return Err(Error::Internal(format!("{path} in {name}@{v} has no content hash"))),
    };
    let etag = format!("\"{hash}\"");
    let mut common = HeaderMap::new();
    common.insert(header::ETAG, header_value(&etag)?);
    common.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    common.insert(KIND_HEADER, HeaderValue::from_static(entry.kind.as_str()));
    common.insert(VERSION_HEADER, header_value(&v.to_string())?);
    let immutable = version != "head";
    common.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if immutable { "private, max-age=31536000, immutable" } else { "private, no-cache" }),
    );
    if let Some(inm) = headers.get(header::IF_NONE_MATCH).and_then(|h| h.to_str().ok())
        && etag_matches(inm, &etag)
    {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let size = entry.size;
    let range = match headers.get(header::RANGE).and_then(|h| h.to_str().ok()) {
        Some(r) => match parse_range(r, size) {
            RangeSpec::Whole => None,
            RangeSpec::Part(a, b) => Some((a, b)),
            RangeSpec::Unsatisfiable => {
                common.insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}"))?);
                let err = Error::RangeNotSatisfiable(format!("range {r:?} is outside the {size} bytes of {path}"));
                return Ok((common, err).into_response());
            }
        },
        None => None,
    };
    // after the 416, which is an ErrorBody like every error
    let content_type = match entry.kind {
        EntryKind::Symlink => "application/octet-stream".to_string(),
        _ => mime_guess::from_path(path.as_str()).first_or_octet_stream().essence_str().to_string(),
    };
    common.insert(header::CONTENT_TYPE, header_value(&content_type)?);
    let content = state.blobs.read(&hash, size).await?;
    if content.len() != size {
        return Err(Error::Corrupt(format!("{path}: the blob holds {} bytes, the tree says {size}", content.len())));
    }
    let (status, start, end) = match range {
        Some((a, b)) => {
            common.insert(header::CONTENT_RANGE, header_value(&format!("bytes {a}-{b}/{size}"))?);
            (StatusCode::PARTIAL_CONTENT, a, b + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    common.insert(header::CONTENT_LENGTH, header_value(&(end - start).to_string())?);
    metrics::counter!("podfs_file_bytes_served_total").increment(end - start);
    Ok((status, common, Body::from_stream(content.stream_range(start, end))).into_response())
}

pub(super) fn header_value(s: &str) -> Result<HeaderValue> {
    // the values are numbers, hashes and mime types: never invalid
    HeaderValue::from_str(s).map_err(|_| Error::Internal(format!("{s:?} is not a valid header value")))
}

pub(super) fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    Whole,
    /// Inclusive first and last byte.
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(header: &str, size: u64) -> RangeSpec {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeSpec::Whole; // an unknown unit is ignored
    };
    if spec.contains(',') {
        return RangeSpec::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(first), Ok(last)) if first <= last => {
            if first >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Part(first, last.min(size - 1))
            }
        }
        (Ok(first), Err(_)) if b.is_empty() => {
            if first >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Part(first, size - 1)
            }
        }
        (Err(_), Ok(n)) if a.is_empty() => {
            if n == 0 || size == 0 {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Part(size - n.min(size), size - 1)
            }
        }
        _ => RangeSpec::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-4", 11), RangeSpec::Part(0, 4));
        assert_eq!(parse_range("bytes=6-", 11), RangeSpec::Part(6, 10));
        assert_eq!(parse_range("bytes=-3", 11), RangeSpec::Part(8, 10));
        assert_eq!(parse_range("bytes=-30", 11), RangeSpec::Part(0, 10));
        assert_eq!(parse_range("bytes=5-100", 11), RangeSpec::Part(5, 10));
        assert_eq!(parse_range("bytes=11-", 11), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,3-4", 11), RangeSpec::Whole);
        assert_eq!(parse_range("bytes=4-2", 11), RangeSpec::Whole);
        assert_eq!(parse_range("items=0-1", 11), RangeSpec::Whole);
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("\"x\", W/\"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }
}
