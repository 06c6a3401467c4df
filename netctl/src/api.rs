//! The agent's HTTP/JSON API on a unix socket (mode 0600: root only).
//!
//! Versioned paths under `/v1`. Errors are `{"error": "one line"}` with a 4xx status for
//! bad requests and 5xx for failures of the node.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::{AgentError, Shared};
use crate::model::{Connect, CreateNetwork};

/// The error body of every failed call.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
}

pub struct ApiError(StatusCode, String);

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `POST /v1/sandboxes`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateSandbox {
    pub name: String,
}

/// `POST /v1/networks/{name}/connect` (the network comes from the path).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConnectBody {
    pub sandbox: String,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `POST /v1/services/{name}/attach` and `.../detach`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetBody {
    /// A sandbox name.
    pub target: String,
}

/// `POST /v1/networks/{name}/disconnect`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DisconnectBody {
    pub sandbox: String,
}

#[derive(Clone)]
struct Ctx {
    agent: Shared,
    shutdown: watch::Sender<bool>,
}

pub fn router(agent: Shared, shutdown: watch::Sender<bool>) -> Router {
    Router::new()
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(inspect_network).delete(remove_network),
        )
        .route("/v1/networks/{name}/connect", post(connect))
        .route("/v1/networks/{name}/disconnect", post(disconnect))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/v1/sandboxes/{name}",
            get(inspect_sandbox).delete(remove_sandbox),
        )
        .route("/v1/services", get(list_services).post(add_service))
        .route("/v1/services/batch", post(add_services))
        .route(
            "/v1/services/{name}",
            get(inspect_service).delete(remove_service),
        )
        .route("/v1/services/{name}/attach", post(attach))
        .route("/v1/services/{name}/detach", post(detach))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/reconcile", post(reconcile))
        .route("/v1/down", post(down))
        // A batch of 100k services is ~15 MB of JSON; the socket is root-only.
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such API path".into()).into_response()
        })
        .with_state(Ctx { agent, shutdown })
}

async fn list_networks(State(c): State<Ctx>) -> ApiResult<Vec<crate::agent::NetworkView>> {
    Ok(Json(c.agent.lock().await.list_networks()))
}

async fn create_network(
    State(c): State<Ctx>,
    Json(req): Json<CreateNetwork>,
) -> ApiResult<crate::agent::NetworkView> {
    Ok(Json(c.agent.lock().await.create_network(req).await?))
}

async fn inspect_network(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<crate::agent::NetworkView> {
    Ok(Json(c.agent.lock().await.inspect_network(&name)?))
}

async fn remove_network(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    c.agent.lock().await.remove_network(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn connect(
    State(c): State<Ctx>,
    UrlPath(network): UrlPath<String>,
    Json(b): Json<ConnectBody>,
) -> ApiResult<crate::model::Endpoint> {
    let req = Connect {
        network,
        sandbox: b.sandbox,
        ip: b.ip,
        aliases: b.aliases,
    };
    Ok(Json(c.agent.lock().await.connect(req).await?))
}

async fn disconnect(
    State(c): State<Ctx>,
    UrlPath(network): UrlPath<String>,
    Json(b): Json<DisconnectBody>,
) -> ApiResult<serde_json::Value> {
    c.agent
        .lock()
        .await
        .disconnect(&network, &b.sandbox)
        .await?;
    Ok(Json(
        serde_json::json!({ "network": network, "sandbox": b.sandbox }),
    ))
}

async fn list_sandboxes(State(c): State<Ctx>) -> ApiResult<Vec<crate::agent::SandboxView>> {
    Ok(Json(c.agent.lock().await.list_sandboxes()))
}

async fn inspect_sandbox(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<crate::agent::SandboxView> {
    let a = c.agent.lock().await;
    a.list_sandboxes()
        .into_iter()
        .find(|s| s.sandbox.name == name)
        .map(Json)
        .ok_or_else(|| {
            AgentError::from(crate::model::ModelError::NotFound {
                kind: "sandbox",
                name,
            })
            .into()
        })
}

async fn create_sandbox(
    State(c): State<Ctx>,
    Json(b): Json<CreateSandbox>,
) -> ApiResult<crate::agent::SandboxView> {
    Ok(Json(c.agent.lock().await.create_sandbox(&b.name).await?))
}

async fn remove_sandbox(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    c.agent.lock().await.remove_sandbox(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn list_services(State(c): State<Ctx>) -> ApiResult<Vec<crate::model::Service>> {
    Ok(Json(c.agent.lock().await.list_services()))
}

async fn add_service(
    State(c): State<Ctx>,
    Json(req): Json<crate::model::AddService>,
) -> ApiResult<crate::model::Service> {
    Ok(Json(c.agent.lock().await.add_service(req).await?))
}

/// `POST /v1/services/batch`: services to add (with their backends) and names to remove,
/// all in one transaction.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BatchBody {
    #[serde(default)]
    pub services: Vec<crate::model::BatchService>,
    #[serde(default)]
    pub remove: Vec<String>,
}

async fn add_services(
    State(c): State<Ctx>,
    Json(b): Json<BatchBody>,
) -> ApiResult<serde_json::Value> {
    let (added, removed) = c
        .agent
        .lock()
        .await
        .batch_services(b.services, b.remove)
        .await?;
    Ok(Json(
        serde_json::json!({ "added": added, "removed": removed }),
    ))
}

async fn inspect_service(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<crate::model::Service> {
    Ok(Json(c.agent.lock().await.inspect_service(&name)?))
}

async fn remove_service(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    c.agent.lock().await.remove_service(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn attach(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
    Json(b): Json<TargetBody>,
) -> ApiResult<crate::model::Service> {
    Ok(Json(c.agent.lock().await.attach(&name, &b.target).await?))
}

async fn detach(
    State(c): State<Ctx>,
    UrlPath(name): UrlPath<String>,
    Json(b): Json<TargetBody>,
) -> ApiResult<crate::model::Service> {
    Ok(Json(c.agent.lock().await.detach(&name, &b.target).await?))
}

async fn status(State(c): State<Ctx>) -> ApiResult<crate::agent::Status> {
    Ok(Json(c.agent.lock().await.status()?))
}

async fn stats(State(c): State<Ctx>) -> ApiResult<crate::datapath::Stats> {
    Ok(Json(c.agent.lock().await.stats()?))
}

async fn reconcile(State(c): State<Ctx>) -> ApiResult<crate::reconcile::Report> {
    Ok(Json(c.agent.lock().await.full_reconcile().await))
}

async fn down(State(c): State<Ctx>) -> ApiResult<serde_json::Value> {
    c.agent.lock().await.teardown().await?;
    let _ = c.shutdown.send(true);
    Ok(Json(serde_json::json!({ "down": true })))
}

/// Binds the socket (refusing if another agent answers on it), root-only.
pub async fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "socket: another agent is already serving {}; stop it with `netctl down` or pick another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let l =
        tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Serves the API until a `down` call or a signal; removes the socket on the way out.
pub async fn serve(
    agent: Shared,
    listener: tokio::net::UnixListener,
    path: &Path,
) -> anyhow::Result<()> {
    let (tx, mut rx) = watch::channel(false);
    let app = router(agent, tx);
    let shutdown = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = rx.wait_for(|v| *v) => tracing::info!("down requested"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => tracing::info!("terminated"),
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
