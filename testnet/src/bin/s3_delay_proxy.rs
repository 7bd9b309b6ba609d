//! `podfs-s3-delay-proxy`: an HTTP reverse proxy that adds a fixed delay to every request sent to
//! an S3 server, and counts requests and bytes.
//!
//! ```text
//! podfs-s3-delay-proxy --listen 127.0.0.1:PORT --upstream http://127.0.0.1:3900 --delay-ms 20 \
//!     [--stats-file PATH]
//! ```
//!
//! Why: benchmarks must show how podfs behaves against an S3 service tens of milliseconds away
//! (AWS S3 first-byte latency is 20-40 ms), but the kernels of the benchmark machines have no
//! `tc netem`, so latency is added in user space, here.
//!
//! The delay is per HTTP request, not per connection: every request (including each one sent on
//! a reused keep-alive connection) waits `--delay-ms` before it is forwarded, as each request to
//! a distant S3 server pays a round trip and the server's first-byte latency. Bandwidth is not
//! limited. Requests are forwarded unchanged: method, path and query, and every header except
//! the hop-by-hop ones, `Host` included (SigV4 signatures and presigned URLs cover it). Bodies
//! are streamed both ways, never buffered, so large objects cost no memory.
//!
//! Statistics, on paths no S3 request uses:
//! - `GET /__podfs_proxy/stats`: `{"requests":N,"bytes_in":N,"bytes_out":N,"errors":N,"max_in_flight":N}`
//!   (`bytes_in`: request body bytes sent to S3; `bytes_out`: response body bytes from S3;
//!   `errors`: requests the upstream could not answer, returned as 502);
//! - `POST /__podfs_proxy/reset`: zero them (answers with the values before the reset).
//!
//! With `--stats-file`, the totals since the last reset are also written there as JSON when
//! the proxy stops (SIGTERM or SIGINT).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use clap::Parser;
use futures::TryStreamExt;

#[derive(Parser)]
#[command(
    name = "podfs-s3-delay-proxy",
    about = "Delays every HTTP request to an S3 server; counts requests and bytes"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3980")]
    listen: SocketAddr,
    /// The S3 server, `http://HOST:PORT`.
    #[arg(long, default_value = "http://127.0.0.1:3900")]
    upstream: String,
    /// Milliseconds every request waits before it is forwarded.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Where to write the statistics as JSON when the proxy stops.
    #[arg(long)]
    stats_file: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl Stats {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "bytes_in": self.bytes_in.load(Ordering::Relaxed),
            "bytes_out": self.bytes_out.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "max_in_flight": self.max_in_flight.load(Ordering::Relaxed),
        })
    }

    fn reset(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.swap(0, Ordering::Relaxed),
            "bytes_in": self.bytes_in.swap(0, Ordering::Relaxed),
            "bytes_out": self.bytes_out.swap(0, Ordering::Relaxed),
            "errors": self.errors.swap(0, Ordering::Relaxed),
            "max_in_flight": self.max_in_flight.swap(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed),
        })
    }
}

/// Decrements the in-flight count when a request is done (response body sent, or dropped).
struct InFlight(Arc<App>);

impl InFlight {
    fn new(app: Arc<App>) -> Self {
        let now = app.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        app.stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        Self(app)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct App {
    upstream: String,
    delay: Duration,
    client: reqwest::Client,
    stats: Stats,
}

/// Headers that belong to one connection, not to the request (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(listed) = h.get(header::CONNECTION).and_then(|v| v.to_str().ok()).map(str::to_owned) {
        for name in listed.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            h.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    h.remove(header::TRANSFER_ENCODING);
}

async fn forward(State(app): State<Arc<App>>, req: Request) -> Response {
    app.stats.requests.fetch_add(1, Ordering::Relaxed);
    let guard = InFlight::new(app.clone());
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let (parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!("{}{}", app.upstream, path_and_query);
    let chunked = parts.headers.get(header::TRANSFER_ENCODING).is_some();
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let mut upstream_req = app.client.request(parts.method, url).headers(headers);
    if chunked || content_length > 0 {
        // hyper keeps the Content-Length header we pass on, so a streamed body of known
        // length goes out with it, not chunked.
        let counter = app.clone();
        let stream = body.into_data_stream().inspect_ok(move |b| {
            counter.stats.bytes_in.fetch_add(b.len() as u64, Ordering::Relaxed);
        });
        upstream_req = upstream_req.body(reqwest::Body::wrap_stream(stream));
    }
    let resp = match upstream_req.send().await {
        Ok(r) => r,
        Err(e) => {
            app.stats.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("podfs-s3-delay-proxy: upstream: {e:#}");
            return (StatusCode::BAD_GATEWAY, format!("upstream: {e}\n")).into_response();
        }
    };
    let status = resp.status();
    let mut headers = resp.headers().clone();
    strip_hop_by_hop(&mut headers);
    let counter = app.clone();
    let stream = resp.bytes_stream().inspect_ok(move |b| {
        let _ = &guard;
        counter.stats.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    json_response(app.stats.json())
}

async fn reset(State(app): State<Arc<App>>) -> Response {
    json_response(app.stats.reset())
}

fn json_response(v: serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(format!("{v}\n")));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // the one rustls provider of the workspace (ring), chosen explicitly
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let upstream = args.upstream.trim_end_matches('/').to_string();
    anyhow::ensure!(upstream.starts_with("http://"), "--upstream must be http://HOST:PORT, got {upstream:?}");
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .http1_only()
        .build()
        .context("building the HTTP client")?;
    let app = Arc::new(App { upstream, delay: Duration::from_millis(args.delay_ms), client, stats: Stats::default() });
    let router = Router::new()
        .route("/__podfs_proxy/stats", get(stats))
        .route("/__podfs_proxy/reset", post(reset))
        .fallback(forward)
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    eprintln!(
        "podfs-s3-delay-proxy: {} -> {} with {} ms per request",
        args.listen,
        app.upstream,
        app.delay.as_millis()
    );
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.context("serving")?;
    if let Some(path) = &args.stats_file {
        std::fs::write(path, format!("{}\n", app.stats.json()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
