//! The REST API v1: routes, OpenAPI document, middleware.
//!
//! One file per resource. Handlers check rights through [`auth::Caller`], call the metadata
//! and blob stores, and return [`crate::error::Error`] for every failure (mapped to HTTP in
//! one place). The OpenAPI document is generated from the handlers' annotations, served at
//! `/v1/openapi.json` and committed as `docs/openapi.json` (a test keeps the two equal).

pub mod auth;
pub mod blobs;
pub mod files;
pub mod json;
pub mod manifests;
pub mod system;
pub mod tree;
pub mod versions;
pub mod workspaces;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::Error;
use crate::server::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "podfs gateway", description = "Workspaces, versions and content of devpod filesystems. \
        Every /v1 route except /v1/openapi.json needs `Authorization: Bearer <token>`. \
        Errors are JSON bodies `{\"code\", \"message\"}`."),
    paths(files::get_file),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "workspaces"), (name = "versions"), (name = "trees"), (name = "files"), (name = "blobs"), (name = "system"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(workspaces::create, workspaces::list))
        .routes(routes!(workspaces::get, workspaces::delete))
        .routes(routes!(workspaces::create_token))
        .routes(routes!(versions::list, versions::commit))
        .routes(routes!(versions::get))
        .routes(routes!(tree::manifest))
        .routes(routes!(manifests::get_manifest))
        .routes(routes!(tree::list_dir))
        .routes(routes!(tree::diff))
        .routes(routes!(tree::history))
        .routes(routes!(blobs::missing))
        .routes(routes!(blobs::locations))
        .routes(routes!(system::healthz))
        .routes(routes!(system::readyz))
        .routes(routes!(system::metrics))
}

/// The routes that take JSON bodies and those that take uploads (which enforce their own limit,
/// max_blob_size, while streaming), with the OpenAPI document of both.
fn parts() -> (axum::Router<AppState>, axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (json_routes, mut doc) = api().split_for_parts();
    let (upload_routes, upload_doc) =
        OpenApiRouter::<AppState>::new().routes(routes!(blobs::upload, blobs::download)).split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.merge(upload_doc);
    (json_routes, upload_routes, doc)
}

/// The OpenAPI document of the API, as served at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().2
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let (json_routes, upload_routes, doc) = parts();
    let doc = doc.to_pretty_json().unwrap_or_default();
    json_routes
        .route("/v1/workspaces/{workspace}/versions/{version}/files/{*path}", get(files::get_file))
        .route("/v1/openapi.json", get(move || async move { ([("content-type", "application/json")], doc) }))
        .layer(DefaultBodyLimit::max(state.config.max_json_body))
        .merge(upload_routes.layer(DefaultBodyLimit::disable()))
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .layer(middleware::from_fn(track))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| Error::Internal("the request handler panicked".into()).into_response()))
        .with_state(state)
}

/// Counts requests and their latency by route and status.
async fn track(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("podfs_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("podfs_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}
