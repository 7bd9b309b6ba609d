//! The HTTP API in-process (axum `oneshot`) on the embedded default: auth, bad input, the
//! single-file GET, limits, and the committed OpenAPI document.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use podfs_gateway::config::Config;
use podfs_gateway::{api, server};
use podfs_protocol::ContentHash;
use serde_json::{Value, json};
use tower::ServiceExt;

const ADMIN: &str = "test-admin-token-0123456789";

struct Gw {
    app: Router,
    dir: tempfile::TempDir,
}

async fn gateway_with(tune: impl FnOnce(&mut Config)) -> Gw {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::embedded(dir.path(), ADMIN).expect("config");
    tune(&mut config);
    let state = server::build(config).await.expect("build gateway");
    Gw { app: api::router(state), dir }
}

async fn gateway() -> Gw {
    gateway_with(|_| {}).await
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

impl Gw {
    async fn call(&self, method: &str, uri: &str, token: Option<&str>, headers: &[(&str, &str)], body: Body) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.app.clone().oneshot(req.body(body).expect("request")).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes().to_vec();
        Resp { status, headers, body }
    }

    /// A GET whose body may break off: the status and the body, or the error that ended it.
    async fn get_stream(&self, uri: &str) -> (StatusCode, Result<Vec<u8>, String>) {
        let req = Request::get(uri).header(header::AUTHORIZATION, format!("Bearer {ADMIN}")).body(Body::empty());
        let resp = self.app.clone().oneshot(req.expect("request")).await.expect("infallible");
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes().to_vec()).map_err(|e| e.to_string());
        (status, body)
    }

    async fn json(&self, method: &str, uri: &str, token: Option<&str>, body: Value) -> Resp {
        self.call(method, uri, token, &[("content-type", "application/json")], Body::from(body.to_string())).await
    }

    async fn get(&self, uri: &str, headers: &[(&str, &str)]) -> Resp {
        self.call("GET", uri, Some(ADMIN), headers, Body::empty()).await
    }

    async fn upload(&self, ws: &str, content: &[u8]) -> ContentHash {
        let h = ContentHash::of(content);
        let r = self
            .call("PUT", &format!("/v1/workspaces/{ws}/blobs/{h}"), Some(ADMIN), &[], Body::from(content.to_vec()))
            .await;
        assert!(r.status.is_success(), "upload: {} {}", r.status, String::from_utf8_lossy(&r.body));
        h
    }

    async fn head_version(&self, ws: &str) -> u64 {
        self.get(&format!("/v1/workspaces/{ws}"), &[]).await.json()["head"].as_u64().expect("head")
    }
}

/// A workspace `demo` at version 1 with README.md, a directory, a symlink and an exec file.
async fn demo() -> Gw {
    let gw = gateway().await;
    assert_eq!(
        gw.json("POST", "/v1/workspaces", Some(ADMIN), json!({"name": "demo"})).await.status,
        StatusCode::CREATED
    );
    let readme = gw.upload("demo", b"hello world").await;
    let link = gw.upload("demo", b"README.md").await;
    let r = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions",
            Some(ADMIN),
            json!({"parent_version": 0, "message": "first", "changes": [
                {"path": "README.md", "kind": "file", "hash": readme, "size": 11, "mode": 420},
                {"path": "src", "kind": "dir", "mode": 493},
                {"path": "src/run.sh", "kind": "file", "hash": readme, "size": 11, "mode": 493},
                {"path": "link", "kind": "symlink", "hash": link, "size": 9},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    gw
}

#[tokio::test]
async fn tokens_and_rights() {
    let gw = demo().await;
    let r = gw.call("GET", "/v1/workspaces", None, &[], Body::empty()).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let r = gw.call("GET", "/v1/workspaces", Some("wrong-token"), &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let read = gw.json("POST", "/v1/workspaces/demo/tokens", Some(ADMIN), json!({"right": "read"})).await;
    assert_eq!(read.status, StatusCode::CREATED);
    let read = read.json()["token"].as_str().expect("token").to_string();
    let write =
        gw.json("POST", "/v1/workspaces/demo/tokens", Some(ADMIN), json!({"right": "write"})).await.json()["token"]
            .as_str()
            .expect("token")
            .to_string();
    assert_eq!(
        gw.json("POST", "/v1/workspaces", Some(ADMIN), json!({"name": "other"})).await.status,
        StatusCode::CREATED
    );

    // read token: reads its workspace, cannot write, cannot see others, cannot administer
    let r = gw.call("GET", "/v1/workspaces/demo/versions/1/files/README.md", Some(&read), &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = gw.json("POST", "/v1/workspaces/demo/blobs/missing", Some(&read), json!({"hashes": []})).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = gw.call("GET", "/v1/workspaces/other", Some(&read), &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = gw.call("GET", "/v1/workspaces/nonexistent", Some(&read), &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a scoped token must not learn which workspaces exist");
    let r = gw.json("POST", "/v1/workspaces", Some(&write), json!({"name": "mine"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let list = gw.call("GET", "/v1/workspaces", Some(&read), &[], Body::empty()).await.json();
    assert_eq!(list["workspaces"].as_array().map(Vec::len), Some(1));

    // write token commits
    let r = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions",
            Some(&write),
            json!({"parent_version": 1, "changes": [{"path": "link", "kind": "delete"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["author"], "token:demo");
    // a workspace token cannot be admin
    let r = gw.json("POST", "/v1/workspaces/demo/tokens", Some(ADMIN), json!({"right": "admin"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn single_file_get() {
    let gw = demo().await;
    let base = "/v1/workspaces/demo/versions";
    let r = gw.get(&format!("{base}/1/files/README.md"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, b"hello world");
    assert_eq!(r.headers[header::CONTENT_LENGTH], "11");
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/markdown");
    let etag = r.headers[header::ETAG].to_str().expect("etag").to_string();
    assert_eq!(etag, format!("\"{}\"", ContentHash::of(b"hello world")));

    let r = gw.get(&format!("{base}/1/files/README.md"), &[("range", "bytes=0-4")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, b"hello");
    assert_eq!(r.headers[header::CONTENT_RANGE], "bytes 0-4/11");
    let r = gw.get(&format!("{base}/1/files/README.md"), &[("range", "bytes=-5")]).await;
    assert_eq!(r.body, b"world");
    let r = gw.get(&format!("{base}/1/files/README.md"), &[("range", "bytes=50-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers[header::CONTENT_RANGE], "bytes */11");

    let r = gw.get(&format!("{base}/1/files/README.md"), &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    let r = gw.get(&format!("{base}/1/files/README.md"), &[("if-none-match", "\"other\"")]).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = gw.get(&format!("{base}/head/files/src/run.sh"), &[]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, b"hello world".as_slice()));
    assert_eq!(r.headers["x-podfs-version"], "1");
    let r = gw.get(&format!("{base}/1/files/link"), &[]).await;
    assert_eq!(
        (r.body.as_slice(), r.headers["x-podfs-kind"].to_str().ok()),
        (b"README.md".as_slice(), Some("symlink"))
    );

    for (uri, status) in [
        (format!("{base}/1/files/nope.txt"), StatusCode::NOT_FOUND),
        (format!("{base}/7/files/README.md"), StatusCode::NOT_FOUND),
        (format!("{base}/x/files/README.md"), StatusCode::BAD_REQUEST),
        (format!("{base}/1/files/src"), StatusCode::BAD_REQUEST),
        (format!("{base}/1/files/../../etc/passwd"), StatusCode::BAD_REQUEST),
        (format!("{base}/1/files/src//run.sh"), StatusCode::BAD_REQUEST),
        ("/v1/workspaces/nope/versions/1/files/README.md".to_string(), StatusCode::NOT_FOUND),
    ] {
        let r = gw.get(&uri, &[]).await;
        assert_eq!(r.status, status, "{uri}: {}", String::from_utf8_lossy(&r.body));
        assert!(!r.code().is_empty(), "{uri}: error body must be JSON with a code");
    }
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let gw = demo().await;
    let readme = ContentHash::of(b"hello world");
    let commit = |changes: Value, parent: u64| json!({"parent_version": parent, "changes": changes});
    let cases = [
        (
            commit(json!([{"path": "../escape", "kind": "file", "hash": readme, "size": 11, "mode": 420}]), 1),
            "bad_request",
        ),
        (
            commit(json!([{"path": "/etc/passwd", "kind": "file", "hash": readme, "size": 11, "mode": 420}]), 1),
            "bad_request",
        ),
        (
            commit(json!([{"path": "a\u{0}b", "kind": "file", "hash": readme, "size": 11, "mode": 420}]), 1),
            "bad_request",
        ),
        (
            commit(json!([{"path": "x".repeat(300), "kind": "file", "hash": readme, "size": 11, "mode": 420}]), 1),
            "bad_request",
        ),
        (
            commit(
                json!([{"path": "new.txt", "kind": "file", "hash": ContentHash::of(b"never uploaded"), "size": 14, "mode": 420}]),
                1,
            ),
            "missing_blobs",
        ),
        (
            commit(json!([{"path": "README.md/inner", "kind": "file", "hash": readme, "size": 11, "mode": 420}]), 1),
            "bad_request",
        ),
        (
            commit(json!([{"path": "nodir/f", "kind": "file", "hash": readme, "size": 11, "mode": 420}]), 1),
            "bad_request",
        ),
        (commit(json!([{"path": "README.md", "kind": "delete"}]), 0), "conflict"),
        (commit(json!([]), 1), "bad_request"),
        (json!({"changes": "nope"}), "bad_request"),
    ];
    for (body, code) in cases {
        let r = gw.json("POST", "/v1/workspaces/demo/versions", Some(ADMIN), body.clone()).await;
        assert!(r.status.is_client_error(), "{body}: {}", r.status);
        assert_eq!(r.code(), code, "{body}: {}", String::from_utf8_lossy(&r.body));
        assert!(!r.json()["message"].as_str().unwrap_or_default().is_empty());
    }
    let r = gw.json("POST", "/v1/workspaces/nope/versions", Some(ADMIN), commit(json!([]), 0)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = gw.json("POST", "/v1/workspaces", Some(ADMIN), json!({"name": "../x"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = gw.json("POST", "/v1/workspaces", Some(ADMIN), json!({"name": "demo"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // wrong bytes under a hash: refused, and the blob is still missing
    let claimed = ContentHash::of(b"the real content");
    let r = gw
        .call("PUT", &format!("/v1/workspaces/demo/blobs/{claimed}"), Some(ADMIN), &[], Body::from("forged content"))
        .await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, "hash_mismatch"));
    let r = gw.json("POST", "/v1/workspaces/demo/blobs/missing", Some(ADMIN), json!({"hashes": [claimed]})).await;
    assert_eq!(r.json()["missing"], json!([claimed]));
    let r = gw.call("PUT", "/v1/workspaces/demo/blobs/nothex", Some(ADMIN), &[], Body::from("x")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // nothing changed: still version 1 with the same tree
    assert_eq!(gw.head_version("demo").await, 1);
    let m = gw.get("/v1/workspaces/demo/versions/head/manifest", &[]).await.json();
    let paths: Vec<&str> =
        m["entries"].as_array().expect("entries").iter().filter_map(|e| e["path"].as_str()).collect();
    assert_eq!(paths, ["README.md", "link", "src", "src/run.sh"]);
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let gw = gateway_with(|c| {
        c.max_json_body = 64 * 1024;
        c.max_blob_size = 1024;
    })
    .await;
    assert_eq!(
        gw.json("POST", "/v1/workspaces", Some(ADMIN), json!({"name": "demo"})).await.status,
        StatusCode::CREATED
    );
    let big = vec![b'x'; 2048];
    let r = gw
        .call(
            "PUT",
            &format!("/v1/workspaces/demo/blobs/{}", ContentHash::of(&big)),
            Some(ADMIN),
            &[],
            Body::from(big.clone()),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    let r = gw
        .json("POST", "/v1/workspaces/demo/blobs/missing", Some(ADMIN), json!({"hashes": [ContentHash::of(&big)]}))
        .await;
    assert_eq!(r.json()["missing"].as_array().map(Vec::len), Some(1), "the refused blob must not be stored");
    let changes: Vec<Value> = (0..2000)
        .map(|i| json!({"path": format!("f{i}"), "kind": "file", "hash": ContentHash::of(b""), "size": 0, "mode": 420}))
        .collect();
    let r = gw
        .json("POST", "/v1/workspaces/demo/versions", Some(ADMIN), json!({"parent_version": 0, "changes": changes}))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let hashes: Vec<ContentHash> = (0..10_001u32).map(|i| ContentHash::of(&i.to_le_bytes())).collect();
    let gw2 = gateway().await;
    gw2.json("POST", "/v1/workspaces", Some(ADMIN), json!({"name": "demo"})).await;
    let r = gw2.json("POST", "/v1/workspaces/demo/blobs/missing", Some(ADMIN), json!({"hashes": hashes})).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(gw.head_version("demo").await, 0);
}

#[tokio::test]
async fn trees_diffs_history_and_blob_downloads() {
    let gw = demo().await;
    let v2 = gw.upload("demo", b"changed").await;
    let r = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions",
            Some(ADMIN),
            json!({"parent_version": 1, "changes": [
                {"path": "README.md", "kind": "file", "hash": v2, "size": 7, "mode": 420},
                {"path": "link", "kind": "delete"},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let d = gw.get("/v1/workspaces/demo/diff?from=1&to=head", &[]).await.json();
    let changes: Vec<(String, String)> = d["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| (c["path"].as_str().unwrap_or_default().into(), c["change"].as_str().unwrap_or_default().into()))
        .collect();
    assert_eq!(changes, [("README.md".into(), "modified".into()), ("link".into(), "deleted".into())]);
    let l = gw.get("/v1/workspaces/demo/versions/1/tree?path=src", &[]).await.json();
    assert_eq!(l["entries"][0]["path"], "src/run.sh");
    let top = gw.get("/v1/workspaces/demo/versions/2/tree", &[]).await.json();
    assert_eq!(top["entries"].as_array().map(Vec::len), Some(2));
    let h = gw.get("/v1/workspaces/demo/history?path=README.md", &[]).await.json();
    assert_eq!(h["revisions"].as_array().map(Vec::len), Some(2));
    assert_eq!(h["revisions"][0]["until_version"], 2);

    // locations point at the gateway for a local store; the stored blob verifies
    let loc = gw.json("POST", "/v1/workspaces/demo/blobs/locations", Some(ADMIN), json!({"hashes": [v2]})).await.json();
    let url = loc["locations"][0]["url"].as_str().expect("url").to_string();
    assert_eq!(loc["locations"][0]["gateway"], true);
    let stored = gw.get(&url, &[]).await;
    assert_eq!(podfs_protocol::blob::decode(&stored.body, &v2).expect("verifies"), b"changed");
    // content that the workspace does not reference is not handed out
    let foreign = ContentHash::of(b"not here");
    let r = gw.json("POST", "/v1/workspaces/demo/blobs/locations", Some(ADMIN), json!({"hashes": [foreign]})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let gw = demo().await;
    assert_eq!(gw.call("GET", "/healthz", None, &[], Body::empty()).await.json()["status"], "ok");
    assert_eq!(gw.call("GET", "/readyz", None, &[], Body::empty()).await.status, StatusCode::OK);
    let m = gw.call("GET", "/metrics", None, &[], Body::empty()).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("podfs_http_requests_total"), "{text}");
    assert!(text.contains("podfs_commits_total"), "{text}");
    let served = gw.call("GET", "/v1/openapi.json", None, &[], Body::empty()).await.json();
    assert!(served["paths"]["/v1/workspaces/{workspace}/versions/{version}/files/{path}"]["get"].is_object());
    assert!(served["paths"]["/v1/workspaces/{workspace}/blobs/{hash}"]["put"].is_object());
}

/// The committed `docs/openapi.json` is the document the code generates.
/// Regenerate with `PODFS_UPDATE_OPENAPI=1 cargo nextest run -p podfs-gateway openapi_document_is_committed`.
#[test]
fn openapi_document_is_committed() {
    let generated = api::openapi().to_pretty_json().expect("openapi json") + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    if std::env::var_os("PODFS_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is stale: regenerate it with PODFS_UPDATE_OPENAPI=1 (see this test's doc)"
    );
}

/// Method, URI, headers, body; the status and code expected.
type Refusal =
    (&'static str, &'static str, &'static [(&'static str, &'static str)], &'static str, StatusCode, &'static str);

/// Every refusal is the JSON `ErrorBody`, whoever refuses: the path, query and body extractors,
/// the router (unknown route, wrong method), the handlers.
#[tokio::test]
async fn every_error_is_a_json_body_with_a_code() {
    let gw = demo().await;
    let cases: [Refusal; 10] = [
        ("GET", "/v1/workspaces/demo/versions?limit=many", &[], "", StatusCode::BAD_REQUEST, "bad_request"),
        ("GET", "/v1/workspaces/demo/diff?from=1", &[], "", StatusCode::BAD_REQUEST, "bad_request"),
        (
            "GET",
            "/v1/workspaces/demo/versions/1/manifest.sqlite?since=-1",
            &[],
            "",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("GET", "/v1/workspaces/%FF/versions", &[], "", StatusCode::BAD_REQUEST, "bad_request"),
        (
            "POST",
            "/v1/workspaces",
            &[],
            "{\"name\": \"x\"}",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/workspaces",
            &[("content-type", "application/json")],
            "{nope",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("GET", "/v1/no/such/route", &[], "", StatusCode::NOT_FOUND, "not_found"),
        ("PATCH", "/v1/workspaces/demo", &[], "", StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("GET", "/v1/workspaces/demo/blobs/xyz", &[], "", StatusCode::BAD_REQUEST, "bad_request"),
        (
            "GET",
            "/v1/workspaces/demo/versions/1/files/README.md",
            &[("range", "bytes=99-")],
            "",
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
        ),
    ];
    for (method, uri, headers, body, status, code) in cases {
        let r = gw.call(method, uri, Some(ADMIN), headers, Body::from(body)).await;
        let what = format!("{method} {uri}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        assert_eq!(r.status, status, "{what}");
        assert_eq!(r.headers[header::CONTENT_TYPE], "application/json", "{what}");
        assert_eq!(r.code(), code, "{what}");
        assert!(!r.json()["message"].as_str().unwrap_or_default().is_empty(), "{what}");
    }
    let r = gw.call("GET", "/v1/workspaces", None, &[], Body::empty()).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
}

/// `GET .../blobs/{hash}` serves only verified blobs: a small stored object that is not the
/// content it is named after is a 500 `corrupt` answer, a large one never arrives as a
/// complete body (the transfer breaks off after the status went out).
#[tokio::test]
async fn blob_downloads_are_refused_or_break_off_when_the_stored_blob_is_bad() {
    let gw = demo().await;
    let readme = ContentHash::of(b"hello world");
    let uri = format!("/v1/workspaces/demo/blobs/{readme}");
    let (status, body) = gw.get_stream(&uri).await;
    let good = body.expect("a good blob streams whole");
    assert_eq!(
        (status, podfs_protocol::blob::decode(&good, &readme).ok()),
        (StatusCode::OK, Some(b"hello world".to_vec()))
    );

    let object = |hash: &ContentHash| {
        let hex = hash.to_hex();
        gw.dir.path().join("blobs/blobs").join(&hex[..2]).join(&hex)
    };
    let tampered = [
        ("other content", podfs_protocol::blob::encode(b"hello World")),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("trailing bytes", [good.as_slice(), b"x"].concat()),
        ("not a blob", b"garbage, not even a header".to_vec()),
    ];
    for (what, bytes) in tampered {
        std::fs::write(object(&readme), &bytes).expect("tamper with the stored object");
        let r = gw.get(&uri, &[]).await;
        assert_eq!((r.status, r.code().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "corrupt"), "{what}");
        assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("failed verification")), "{what}");
    }

    // larger than the gateway verifies in memory: checked as it streams
    let mut x = 0x9e37_79b9_7f4a_7c15u64; // xorshift: incompressible, so stored > 4 MiB
    let big: Vec<u8> = (0..6 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let hash = gw.upload("demo", &big).await;
    let head = gw.head_version("demo").await;
    let r = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions",
            Some(ADMIN),
            json!({"parent_version": head, "changes": [
                {"path": "big.bin", "kind": "file", "hash": hash, "size": big.len(), "mode": 420},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    let uri = format!("/v1/workspaces/demo/blobs/{hash}");
    let (status, body) = gw.get_stream(&uri).await;
    let stored = body.expect("a good large blob streams whole");
    assert_eq!(status, StatusCode::OK);
    let mut flipped = stored.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(object(&hash), &flipped).expect("tamper with the stored object");
    let (status, body) = gw.get_stream(&uri).await;
    assert_eq!(status, StatusCode::OK, "the status went out before the bytes");
    let err = body.expect_err("a bad large blob breaks off");
    assert!(err.contains("failed verification"), "{err}");
}

/// The tracker: a plan names the manifest unit with the hash the manifest download states, a
/// capability the announced key verifies, and refuses bad seats with JSON errors.
#[tokio::test]
async fn peer_plans_and_announcements() {
    let gw = demo().await;
    let me = ContentHash::of(b"peer one");
    let plan = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions/1/plan",
            Some(ADMIN),
            json!({"peer": me, "zone": "z", "address": "10.0.0.1:7070"}),
        )
        .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", String::from_utf8_lossy(&plan.body));
    let plan: podfs_protocol::api::PeerPlan = serde_json::from_slice(&plan.body).expect("a plan");
    assert_eq!(plan.version, 1);
    assert!(plan.holders.is_empty());
    let m = gw.get("/v1/workspaces/demo/versions/1/manifest.sqlite", &[]).await;
    let stated = m.headers["x-podfs-manifest-hash"].to_str().expect("hash header").to_string();
    assert_eq!(plan.units[0].kind, podfs_protocol::api::UnitKind::Manifest);
    assert_eq!(plan.units[0].file_hash.map(|h| h.to_hex()), Some(stated));
    assert_eq!(plan.units[0].hash, ContentHash::of(&m.body), "the unit is the frame the download sends");
    assert_eq!(plan.units[0].size, m.body.len() as u64);
    assert!(plan.units[0].fetcher.is_none(), "the first asker holds the lease");
    let cap = hex::decode(&plan.capability).expect("hex");
    let key = hex::decode(&plan.capability_key).expect("hex");
    let c = podfs_protocol::peer::Capability::verify(&cap, &key, &podfs_protocol::peer::PeerId(me), 1).expect("valid");
    assert_eq!((c.workspace.as_str(), c.version), ("demo", 1));
    // an announcement returns the same key; a second asker is sent to the first
    let a = gw
        .json(
            "POST",
            "/v1/workspaces/demo/peers",
            Some(ADMIN),
            json!({"peer": me, "zone": "z", "address": "10.0.0.1:7070", "versions": [1]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["capability_key"], plan.capability_key.as_str());
    let other = ContentHash::of(b"peer two");
    let p2 = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions/head/plan",
            Some(ADMIN),
            json!({"peer": other, "zone": "z", "address": "10.0.0.2:7070"}),
        )
        .await
        .json();
    assert_eq!(p2["holders"][0]["peer"], me.to_hex());
    assert_eq!(p2["holders"][0]["complete"], true);
    for (uri, body) in [
        ("/v1/workspaces/demo/peers", json!({"peer": me, "zone": "bad zone", "address": "10.0.0.1:7070"})),
        ("/v1/workspaces/demo/peers", json!({"peer": me, "zone": "z", "address": "0.0.0.0:7070"})),
        ("/v1/workspaces/demo/peers", json!({"peer": me, "zone": "z", "address": "10.0.0.1:7070", "versions": [9]})),
        ("/v1/workspaces/demo/peers", json!({"peer": "not-a-hash", "zone": "z", "address": "10.0.0.1:7070"})),
        ("/v1/workspaces/demo/versions/1/plan", json!({"peer": me, "zone": "z", "address": "localhost"})),
    ] {
        let r = gw.json("POST", uri, Some(ADMIN), body.clone()).await;
        assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, "bad_request"), "{body}");
    }
    let r = gw
        .json(
            "POST",
            "/v1/workspaces/demo/versions/7/plan",
            Some(ADMIN),
            json!({"peer": me, "zone": "z", "address": "10.0.0.1:7070"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
