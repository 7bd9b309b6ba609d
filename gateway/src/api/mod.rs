//! The REST API v1: routes, OpenAPI document, middleware.
//!
//! One file per resource. Handlers check rights through [`auth::Caller`], take their path,
//! query and body through the extractors of [`extract`], call the metadata and blob stores,
//! and return [`crate::error::Error`] for every failure (mapped to HTTP in one place): every
//! error answer, extractor rejections, unknown routes and methods included, is a JSON
//! `ErrorBody`. The OpenAPI document is generated from the handlers' annotations plus the
//! error statuses the shared extractors add ([`shared_error_responses`]), served at
//! `/v1/openapi.json` and committed as `docs/openapi.json` (a test keeps the two equal).

pub mod auth;
pub mod blobs;
pub mod extract;
pub mod files;
pub mod manifests;
pub mod peers;
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
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::Error;
use crate::server::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "podfs gateway", description = "Workspaces, versions and content of devpod filesystems. \
        Every /v1 route except /v1/openapi.json needs `Authorization: Bearer <token>`; \
        /healthz, /readyz and /metrics are public. \
        Every error answer is a JSON body `{\"code\", \"message\"}` (ErrorBody lists the codes)."),
    paths(files::get_file),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "workspaces"), (name = "versions"), (name = "trees"), (name = "files"), (name = "blobs"), (name = "peers"), (name = "system"))
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
        .routes(routes!(peers::announce))
        .routes(routes!(peers::plan))
        .routes(routes!(system::healthz))
        .routes(routes!(system::readyz))
        .routes(routes!(system::metrics))
}

/// The routes that take JSON bodies and those that take uploads (which enforce their own limit,
/// max_blob_size, while streaming), with the OpenAPI document of both.
fn parts() -> (axum::Router<AppState>, axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (json_routes, mut doc) = api().split_for_parts();
    let (upload_routes, upload_doc) = OpenApiRouter::<AppState>::new()
        .routes(routes!(blobs::upload, blobs::download))
        .routes(routes!(blobs::batch))
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.merge(upload_doc);
    shared_error_responses(&mut doc);
    (json_routes, upload_routes, doc)
}

/// Adds to every operation the error statuses that come from what it shares with others rather
/// than from its handler: 401 from the bearer check, 400/403/404 from a workspace in the path,
/// 400 from a query, 400/413/415 from a JSON body, 500 and 503 from the stores. Statuses a
/// handler documents itself keep its description.
fn shared_error_responses(doc: &mut utoipa::openapi::OpenApi) {
    for item in doc.paths.paths.values_mut() {
        let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.head, &mut item.patch];
        for op in ops.into_iter().flatten() {
            for (status, description) in shared_statuses(op) {
                op.responses.responses.entry(status.to_string()).or_insert_with(|| error_response(description));
            }
        }
    }
}

fn shared_statuses(op: &Operation) -> Vec<(u16, &'static str)> {
    // `security(())`: an empty requirement, which overrides the global bearer one
    let public = op.security.as_ref().is_some_and(|s| s.iter().all(|r| *r == SecurityRequirement::default()));
    let params = op.parameters.iter().flatten().filter_map(|p| match p {
        RefOr::T(p) => Some(p),
        RefOr::Ref(_) => None,
    });
    let (mut in_path, mut workspace, mut in_query) = (false, false, false);
    for p in params {
        in_path |= p.parameter_in == ParameterIn::Path;
        workspace |= p.parameter_in == ParameterIn::Path && p.name == "workspace";
        in_query |= p.parameter_in == ParameterIn::Query;
    }
    let json_body = matches!(&op.request_body, Some(RefOr::T(b)) if b.content.contains_key("application/json"));
    let mut out = Vec::new();
    if in_path || in_query || json_body {
        out.push((400, "`bad_request`: a malformed path, query or body"));
    }
    if !public {
        out.push((401, "`unauthorized`: missing, malformed or unknown bearer token"));
    }
    if workspace {
        out.push((403, "`forbidden`: the token has no access to this workspace, or not this right"));
        out.push((404, "`not_found`: no such workspace (or version, path, blob)"));
    }
    if json_body {
        out.push((413, "`payload_too_large`: the body is over the JSON body limit"));
        out.push((415, "`unsupported_media_type`: the body is not sent as `application/json`"));
    }
    // every authenticated route looks its token up; of the public ones only readyz (which
    // documents its 503) touches a store
    if !public || op.responses.responses.contains_key("503") {
        out.push((500, "`internal` or `corrupt`: a gateway bug, or stored data failed verification"));
        out.push((503, "`unavailable`: the metadata database or blob store cannot be reached; retry (Retry-After)"));
    }
    out
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    RefOr::T(ResponseBuilder::new().description(description).content("application/json", content).build())
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
        .method_not_allowed_fallback(|req: Request| async move {
            Error::MethodNotAllowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
        })
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
