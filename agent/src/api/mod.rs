//! The local control API (JSON over HTTP). Handlers authorize through their extractors, read
//! typed bodies and send one command each to the control core; the OpenAPI document served at
//! `/v1/openapi.json` is generated from the same handlers and types, so it cannot drift from them.

pub mod error;
pub mod extract;
pub mod guard;
pub mod handlers;
pub mod server;
pub mod types;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use axum::{extract::DefaultBodyLimit, middleware, Router};
use utoipa::{
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
    Modify, OpenApi,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::control::{
    store::{etcd::ClusterHandle, AuditSource},
    ControlHandle, Progress,
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AppState {
    pub control: ControlHandle,
    /// The accepted tokens (swapped on reload); `None` inside: no authentication.
    pub tokens: guard::Tokens,
    /// Which `Host` headers are answered.
    pub hosts: guard::HostRule,
    /// Refused requests by reason, for `/metrics`.
    pub denied: guard::DeniedCounts,
    /// Rate limit of refusals written to the audit log.
    pub refusal_audit: guard::RefusalAudit,
    pub audit: Arc<dyn AuditSource>,
    /// Background tasks that died, reported by `/healthz`.
    pub tasks: TaskHealth,
    /// Prometheus and the webhook allow list, for the checks at a rollout's start.
    pub gates: crate::gates::GateClients,
    /// The generated OpenAPI document, as served.
    pub openapi: OnceLock<String>,
    /// Cluster mode; `None` on a single node.
    pub cluster: Option<ClusterApi>,
    /// The datapath's log records, for `GET /v1/datapath/log`.
    pub datapath_log: crate::datapath::RecordFeed,
    /// Followers of the datapath's log at once: a stream holds its connection busy, which the
    /// connection limit never closes, so their number is bounded well below it.
    pub datapath_followers: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the agent shuts down: ends the responses that follow a stream.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// What the API reads of cluster mode: the cluster view and how far the core got.
#[derive(Clone)]
pub struct ClusterApi {
    pub handle: ClusterHandle,
    pub progress: tokio::sync::watch::Receiver<Progress>,
}

/// Background tasks that stopped while the agent is not shutting down, by name, with why.
#[derive(Debug, Clone, Default)]
pub struct TaskHealth {
    failed: Arc<Mutex<BTreeMap<String, String>>>,
}

impl TaskHealth {
    pub fn record_failure(&self, task: &str, why: String) {
        // Held only to insert or copy: never across I/O; a poisoned lock still holds the map.
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).insert(task.to_string(), why);
    }

    pub fn failed(&self) -> BTreeMap<String, String> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sockshift agent API",
        description = "The node agent's control API: services, canary weights, rollouts, audit log, metrics. \
            Errors are `{\"code\", \"message\", \"field\"}` with a stable `code` (the `Error` schema lists them \
            all); a refused request changes nothing. With `[agent.auth]` every route but `/healthz` and \
            `/v1/openapi.json` needs `Authorization: Bearer <token>` (`Bearer` in any case); each route names the \
            role it needs (`viewer` < `operator` < `release`). Every request that changes state (PUT, POST, \
            DELETE) must carry `Content-Type: application/json`, with or without a body (415 otherwise), and the \
            `Host` header must name the API's address, localhost, or one of `agent.api_hosts` (421 otherwise).",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    components(schemas(error::ErrorCode, crate::control::RolloutAction)),
    tags(
        (name = "services", description = "Services and their canary weights"),
        (name = "rollouts", description = "Progressive rollouts"),
        (name = "agent", description = "Health, metrics, datapath, audit log"),
        (name = "cluster", description = "Cluster mode: the nodes and how far each has applied the desired state"),
    ),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The routes and their description, from one list.
fn parts() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    use handlers::*;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
        .routes(routes!(list_services))
        .routes(routes!(get_service, put_service, delete_service))
        .routes(routes!(put_canary))
        .routes(routes!(rollback))
        .routes(routes!(promote))
        .routes(routes!(get_rollout, start_rollout))
        .routes(routes!(rollout_action))
        .routes(routes!(datapath_status))
        .routes(routes!(datapath_log))
        .routes(routes!(audit_log))
        .routes(routes!(cluster_status))
        .split_for_parts()
}

/// The generated OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}

pub fn router(state: Arc<AppState>) -> Router {
    let (router, document) = parts();
    let json = document.to_pretty_json().unwrap_or_else(|err| {
        log::error!("rendering the OpenAPI document: {err}");
        String::new()
    });
    let _ = state.openapi.set(json);
    router
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost: host, content type and token are checked before any handler or extractor
        // runs, so no body byte of a refused request is read.
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .with_state(state)
}
