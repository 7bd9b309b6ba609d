//! Routes for the gateway's health, workspaces and tokens.

use podfs_protocol::api::{CreateToken, CreateWorkspace, Health, Right, TokenCreated, Workspace, WorkspaceList};
use reqwest::Method;

use crate::Client;
use crate::client::send;
use crate::error::Result;
use crate::retry::retry_if;

impl Client {
    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health> {
        self.call_json("health", || self.get(self.url(["healthz"]))).await
    }

    /// `POST /v1/workspaces` (admin token). Not resent once it reached the gateway.
    pub async fn create_workspace(&self, name: &str) -> Result<Workspace> {
        let body = CreateWorkspace { name: name.to_string() };
        self.call_json_once("create workspace", || self.post_json(self.url(["v1", "workspaces"]), &body)).await
    }

    /// `GET /v1/workspaces`: the workspaces this token can see.
    pub async fn list_workspaces(&self) -> Result<WorkspaceList> {
        self.call_json("list workspaces", || self.get(self.url(["v1", "workspaces"]))).await
    }

    /// `GET /v1/workspaces/{ws}`.
    pub async fn workspace(&self, ws: &str) -> Result<Workspace> {
        self.call_json("get workspace", || self.get(self.url(["v1", "workspaces", ws]))).await
    }

    /// `DELETE /v1/workspaces/{ws}` (admin token). Resent only when the connection was never made.
    pub async fn delete_workspace(&self, ws: &str) -> Result<()> {
        retry_if(self.retry_policy(), "delete workspace", crate::Error::is_connect, || async {
            send(self.request(Method::DELETE, self.url(["v1", "workspaces", ws]))).await.map(drop)
        })
        .await
    }

    /// `POST /v1/workspaces/{ws}/tokens` (admin token): a new `read` or `write` token.
    pub async fn create_token(&self, ws: &str, right: Right, name: Option<String>) -> Result<TokenCreated> {
        let body = CreateToken { right, name };
        self.call_json_once("create token", || self.post_json(self.url(["v1", "workspaces", ws, "tokens"]), &body))
            .await
    }
}
