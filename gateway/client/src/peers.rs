//! The peer tracker: announcements (heartbeats) and cold-start plans.

use podfs_protocol::api::{PeerAnnounce, PeerAnnounced, PeerPlan, PlanRequest};

use crate::{Client, Result};

impl Client {
    /// Announces where this devpod serves `ws` and the versions it holds whole. Sent once; a
    /// heartbeat that fails is simply sent again at the next beat.
    pub async fn announce_peer(&self, ws: &str, a: &PeerAnnounce) -> Result<PeerAnnounced> {
        let url = self.url(["v1", "workspaces", ws, "peers"]);
        self.call_json_once("peer announcement", || self.post_json(url.clone(), a)).await
    }

    /// The fetch plan of `ws@version` for a cold start (retried like any idempotent read:
    /// callers bound the time they give it).
    pub async fn peer_plan(&self, ws: &str, version: u64, req: &PlanRequest) -> Result<PeerPlan> {
        let v = version.to_string();
        let url = self.url(["v1", "workspaces", ws, "versions", &v, "plan"]);
        self.call_json("peer plan", || self.post_json(url.clone(), req)).await
    }
}
