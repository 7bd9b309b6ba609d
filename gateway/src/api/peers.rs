//! The peer tracker (`docs/peer-protocol.md`): devpods announce where they serve and which
//! versions they hold; a cold start asks once for a plan (holders in its zone, a capability,
//! every unit with its fallback location, and which units it fetches from S3 for the zone).
//! Its state is soft and lives in the metadata database, so that every replica answers alike.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use podfs_protocol::api::{
    ErrorBody, PeerAnnounce, PeerAnnounced, PeerHolder, PeerPlan, PlanRequest, PlanUnit, Right, UnitKind,
};
use podfs_protocol::peer::{Capability, public_key, valid_zone};
use ring::signature::Ed25519KeyPair;

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath, VersionPath, WorkspacePath};
use super::versions::resolve;
use crate::error::{Error, Result};
use crate::meta::{PeerSeat, PlanTerms};
use crate::server::AppState;

/// An announcement lives this long: about three missed heartbeats of a daemon.
pub const ANNOUNCE_TTL_MS: i64 = 15_000;
/// A capability lives this long.
pub const CAPABILITY_TTL_MS: u64 = 10 * 60 * 1000;
/// Holders a plan names at most.
pub const MAX_HOLDERS: usize = 4;
/// Large files a plan lists at most (the rest come from S3).
pub const MAX_PLAN_UNITS: usize = 10_000;
/// Versions and reports one announcement may carry.
pub const MAX_ANNOUNCED: usize = 16;

/// A single-flight lease: long enough to fetch `size` bytes from S3 at a slow 20 MB/s, plus 10 s.
fn lease_ms(size: u64) -> i64 {
    10_000 + i64::try_from(size / 20_000).unwrap_or(i64::MAX / 2)
}

fn check_seat(zone: &str, address: &str) -> Result<()> {
    if !valid_zone(zone) {
        return Err(Error::BadRequest(format!("invalid zone {zone:?}: 1-64 of [A-Za-z0-9._-]")));
    }
    match address.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Ok(()),
        _ => Err(Error::BadRequest(format!("invalid address {address:?}: an IP address and a port, as 10.0.0.5:7070"))),
    }
}

async fn signing_key(state: &AppState) -> Result<Arc<Ed25519KeyPair>> {
    state
        .peer_key
        .get_or_try_init(|| async {
            let rng = ring::rand::SystemRandom::new();
            let fresh = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| Error::Internal("cannot generate the capability key".into()))?;
            let stored = state.meta.peer_signing_key(fresh.as_ref()).await?;
            Ed25519KeyPair::from_pkcs8(&stored)
                .map(Arc::new)
                .map_err(|_| Error::Internal("the stored capability key is not an Ed25519 key".into()))
        })
        .await
        .cloned()
}

/// Announce a devpod serving this workspace (a heartbeat: repeat well within `expires_in_secs`).
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/peers", tag = "peers",
    params(WorkspacePath), request_body = PeerAnnounce,
    responses((status = 200, description = "recorded; the key capabilities are signed with", body = PeerAnnounced),
        (status = 400, description = "invalid zone or address, or more than 16 versions or reports", body = ErrorBody)))]
pub async fn announce(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiJson(a): ApiJson<PeerAnnounce>,
) -> Result<Json<PeerAnnounced>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    check_seat(&a.zone, &a.address)?;
    if a.versions.len() > MAX_ANNOUNCED || a.reports.len() > MAX_ANNOUNCED {
        return Err(Error::BadRequest(format!("at most {MAX_ANNOUNCED} versions and {MAX_ANNOUNCED} reports")));
    }
    let head = match a.versions.is_empty() {
        true => 0,
        false => state.meta.resolve_version(&ws, podfs_protocol::VersionRef::Head).await?,
    };
    if let Some(v) = a.versions.iter().find(|v| **v == 0 || **v > head) {
        return Err(Error::BadRequest(format!("workspace {name} has no version {v}")));
    }
    let key = signing_key(&state).await?;
    let seat = PeerSeat { peer: a.peer, zone: &a.zone, address: &a.address, serving: a.serving.into() };
    state.meta.announce_peer(ws.id, &seat, &a.versions, &a.reports, ANNOUNCE_TTL_MS).await?;
    metrics::counter!("podfs_peer_announcements_total").increment(1);
    Ok(Json(PeerAnnounced {
        expires_in_secs: (ANNOUNCE_TTL_MS / 1000) as u64,
        capability_key: hex::encode(public_key(&key)),
    }))
}

/// A cold start's fetch plan: holders of the version in the asker's zone, a capability, every
/// unit with its fallback location, and single-flight leases.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/versions/{version}/plan", tag = "peers",
    params(VersionPath), request_body = PlanRequest,
    responses((status = 200, description = "the plan", body = PeerPlan),
        (status = 400, description = "invalid version, zone or address", body = ErrorBody)))]
pub async fn plan(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(VersionPath { workspace: name, version }): ApiPath<VersionPath>,
    ApiJson(req): ApiJson<PlanRequest>,
) -> Result<Json<PeerPlan>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    check_seat(&req.zone, &req.address)?;
    if req.exclude.len() > MAX_ANNOUNCED {
        return Err(Error::BadRequest(format!("at most {MAX_ANNOUNCED} excluded peers")));
    }
    let v = resolve(&state, &ws, &version).await?;
    let key = signing_key(&state).await?;
    let manifest = state.manifests.get_or_build(&ws, v).await?.row;
    let mut large = state.meta.large_contents(ws.id, v, manifest.small_file_limit, MAX_PLAN_UNITS + 1).await?;
    let truncated = large.len() > MAX_PLAN_UNITS;
    large.truncate(MAX_PLAN_UNITS);
    let hashes: Vec<_> = large.iter().map(|(h, _)| *h).collect();
    let mut locations = state.blobs.locations(&hashes, |h| format!("/v1/workspaces/{name}/blobs/{h}")).await?;
    let mut units = Vec::with_capacity(large.len() + 1);
    units.push((manifest.stored_hash, manifest.stored_size));
    units.extend(large.iter().copied());
    let seat = PeerSeat { peer: req.peer, zone: &req.zone, address: &req.address, serving: 0 };
    let (holders, fetchers) = state
        .meta
        .peer_plan(
            ws.id,
            v,
            &seat,
            &units,
            &req.exclude,
            &PlanTerms {
                ttl_ms: ANNOUNCE_TTL_MS.max(lease_ms(manifest.stored_size)),
                lease_ms,
                max_holders: MAX_HOLDERS,
            },
        )
        .await?;
    let expires_at_ms = u64::try_from(crate::meta::now_unix_ms()).unwrap_or(0) + CAPABILITY_TTL_MS;
    let capability = Capability { requester: req.peer, workspace: name.clone(), version: v, expires_at_ms };
    let fetcher = |h| fetchers.get(h).copied().filter(|p| *p != req.peer);
    let mut plan_units = Vec::with_capacity(units.len());
    plan_units.push(PlanUnit {
        kind: UnitKind::Manifest,
        hash: manifest.stored_hash,
        size: manifest.stored_size,
        fetcher: fetcher(&manifest.stored_hash),
        location: None,
        file_hash: Some(manifest.hash),
        file_size: Some(manifest.size),
    });
    for ((hash, size), loc) in large.iter().zip(locations.drain(..)) {
        plan_units.push(PlanUnit {
            kind: UnitKind::File,
            hash: *hash,
            size: *size,
            fetcher: fetcher(hash),
            location: Some(loc),
            file_hash: None,
            file_size: None,
        });
    }
    metrics::counter!("podfs_peer_plans_total").increment(1);
    Ok(Json(PeerPlan {
        version: v,
        capability: hex::encode(capability.sign(&key)),
        capability_key: hex::encode(public_key(&key)),
        expires_in_secs: CAPABILITY_TTL_MS / 1000,
        holders: holders
            .into_iter()
            .map(|h| PeerHolder { peer: h.peer, address: h.address, complete: h.complete })
            .collect(),
        units: plan_units,
        truncated,
    }))
}
