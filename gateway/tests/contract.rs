//! The served OpenAPI document as a contract: schemathesis (PyPI) fuzzes every operation of a real
//! gateway (embedded default, on a real socket) from `/v1/openapi.json` and fails on any 5xx,
//! any status the document does not list for the operation, and any content type it does not
//! list (an error answered as `text/plain` instead of the JSON `ErrorBody`, say).
//!
//! schemathesis comes from `PODFS_SCHEMATHESIS` (the executable), which `scripts/test` sets
//! after installing it into a venv under the dev-services state directory. Without it the test
//! fails, in CI and outside it: run `scripts/test`, or install schemathesis and set the variable.
//! `PODFS_SCHEMATHESIS_EXAMPLES` (default 25 per operation) and `PODFS_SCHEMATHESIS_SEED` tune a run.

use std::process::{Command, Stdio};

use axum::body::Body;
use axum::http::{Request, header};
use podfs_gateway::config::Config;
use podfs_gateway::server;
use podfs_protocol::ContentHash;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const ADMIN: &str = "contract-admin-token-0123456789";
/// Test cases per operation: ~20 operations x 25 cases x 3 phases stays well under a minute.
const DEFAULT_EXAMPLES: &str = "25";
/// The checks that must hold for every answer (names as schemathesis 4 spells them).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance";
const README: &[u8] = b"hello world";
/// schemathesis hooks: bodies for the batch upload's media type (which it cannot serialize on
/// its own), half of them behind a valid batch header so the framing checks are reached.
const HOOKS: &str = r#"
import schemathesis
from hypothesis import strategies as st

schemathesis.openapi.media_type(
    "application/vnd.podfs.batch",
    st.one_of(st.binary(max_size=4096), st.binary(max_size=4096).map(lambda b: b"PFSU\x01\x00\x00\x00" + b)),
)
"#;
/// Identifiers of the seeded data, each used for half of the generated values of its parameter.
const CONFIG: &str = r#"
[dictionaries.workspaces]
values = ["demo"]
[dictionaries.versions]
values = ["1", "head"]
[dictionaries.hashes]
values = ["HASH"]
[dictionaries.paths]
values = ["README.md", "src"]

[parameters]
"path.workspace" = { dictionary = "workspaces", probability = 0.5 }
"path.version" = { dictionary = "versions", probability = 0.5 }
"path.hash" = { dictionary = "hashes", probability = 0.5 }
"path.path" = { dictionary = "paths", probability = 0.5 }
"query.path" = { dictionary = "paths", probability = 0.5 }

# deleting demo would leave the other operations nothing to find
[[operations]]
include-method = "DELETE"
parameters = { "path.workspace" = "gone" }
"#;

fn schemathesis() -> String {
    match std::env::var("PODFS_SCHEMATHESIS") {
        Ok(path) if !path.is_empty() => path,
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            panic!(
                "the OpenAPI contract test needs schemathesis{}: run scripts/test (it installs it into \
                 $PODFS_DEV_STATE/venv and sets PODFS_SCHEMATHESIS), or `pip install schemathesis` and set \
                 PODFS_SCHEMATHESIS=/path/to/bin/schemathesis",
                if ci { " (CI=true: this test never skips)" } else { "" }
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_openapi_document_holds_under_fuzzing() {
    let schemathesis = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::embedded(&dir.path().join("gateway"), ADMIN).expect("config");
    let state = server::build(config).await.expect("build gateway");
    // Something to find besides 404s: workspace `demo` at version 1 with README.md and src/,
    // which the fuzzer picks half of the time for those parameters (see `CONFIG`).
    let app = podfs_gateway::api::router(state.clone());
    let readme = ContentHash::of(README);
    let seed = [
        ("POST", "/v1/workspaces".to_string(), json!({"name": "demo"}).to_string().into_bytes()),
        ("PUT", format!("/v1/workspaces/demo/blobs/{readme}"), README.to_vec()),
        (
            "POST",
            "/v1/workspaces/demo/versions".to_string(),
            json!({"parent_version": 0, "changes": [
                {"path": "README.md", "kind": "file", "hash": readme, "size": README.len(), "mode": 420},
                {"path": "src", "kind": "dir", "mode": 493},
            ]})
            .to_string()
            .into_bytes(),
        ),
    ];
    for (method, uri, body) in seed {
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        assert!(resp.status().is_success(), "{method} {uri}: {}", resp.status());
    }
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, CONFIG.replace("HASH", &readme.to_hex())).expect("write schemathesis.toml");
    std::fs::write(dir.path().join("podfs_hooks.py"), HOOKS).expect("write podfs_hooks.py");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server::serve(listener, state, shutdown.clone()));

    let examples = std::env::var("PODFS_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| DEFAULT_EXAMPLES.into());
    let mut cmd = Command::new(&schemathesis);
    cmd.arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &examples])
        .args(["--workers", "2"])
        .args(["--request-timeout", "10"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--output-sanitize", "false"])
        .arg("--no-color")
        // .hypothesis and any report stay in the temp dir
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "podfs_hooks")
        .env("PYTHONPATH", dir.path())
        .stdin(Stdio::null());
    if let Ok(seed) = std::env::var("PODFS_SCHEMATHESIS_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("schemathesis task")
        .unwrap_or_else(|e| panic!("cannot run {schemathesis}: {e} (run scripts/test to install it)"));
    shutdown.cancel();
    let _ = server.await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // shown by the test runner on failure, or with --no-capture
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found answers that break the OpenAPI document ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // a run that tested nothing would pass too
    assert!(stdout.contains("passed") && !stdout.contains("No operations"), "nothing was tested:\n{stdout}\n{stderr}");
}
