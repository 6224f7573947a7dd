//! The route handlers. Each one authorizes (through its extractor), reads its typed body, sends
//! one command to the control core and answers what the core answers: the core validates the
//! whole change before it touches anything, so a refused request changes nothing.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{rejection::QueryRejection, Path, Query, State},
    http::{header, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{
    error::{
        ApiError, AuthErrors, BodyErrors, ClusterWaitError, ConflictError, ErrorBody, ErrorCode, NotFoundError,
        ServerErrors,
    },
    extract::{ApiJson, Authorized, NoBody, Operator, Release, Viewer},
    types::{
        AuditLog, CanaryUpdate, ClusterNode, ClusterStatus, DatapathStatus, Health, NoFields, RolloutView, ServiceBody,
        ServiceList, ServiceState,
    },
    AppState,
};
use crate::{
    config::Role,
    control::{store::StoreError, Caller, Command, ControlError, Origin, RolloutAction, WeightChange},
    rollout::Plan,
};

/// How long `/healthz` waits for the core. Kubernetes' probe gives the whole request 2 s.
pub const PING_BOUND: Duration = Duration::from_secs(1);

/// Most audit entries one read returns.
pub const AUDIT_LIMIT_MAX: usize = 1000;

fn origin(caller: Caller, method: &Method, uri: &Uri) -> Origin {
    Origin { caller, method: method.to_string(), route: uri.path().to_string() }
}

/// Liveness and readiness: the control core answers within a second and no background task has
/// died.
#[utoipa::path(get, path = "/healthz", tag = "agent",
    responses(
        (status = 200, description = "`status` is `ok`", body = Health),
        (status = 503, description = "the core is stuck or dead, or a background task died: `status` is `failing`", body = Health),
    ))]
pub async fn healthz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Health>) {
    let core = match state.control.ping(PING_BOUND).await {
        Ok(()) => "ok",
        Err(ControlError::CoreDead) => "dead",
        Err(_) => "stuck",
    };
    let failed_tasks = state.tasks.failed();
    let healthy = core == "ok" && failed_tasks.is_empty();
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let health = Health { status: if healthy { "ok" } else { "failing" }.into(), core: core.into(), failed_tasks };
    (status, Json(health))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "agent",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json", body = Object)))]
pub async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    let document = state.openapi.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// Prometheus (OpenMetrics) text: the kernel's counters per service and side. Needs `viewer`.
#[utoipa::path(get, path = "/metrics", tag = "agent", security(("bearer" = [])),
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        AuthErrors, ServerErrors,
    ))]
pub async fn metrics(State(state): State<Arc<AppState>>, _: Authorized<Viewer>) -> Result<Response, ApiError> {
    let services = state.control.ask(|reply| Command::Metrics { reply }).await?;
    let cluster = state.cluster.as_ref().map(|cluster| {
        let view = cluster.handle.view();
        crate::metrics::ClusterMetrics {
            counters: cluster.handle.counters(),
            connected: view.connected,
            leader: cluster.handle.leads(),
            applied_revision: cluster.progress.borrow().applied,
        }
    });
    let text = crate::metrics::render(&services, &state.denied.snapshot(), cluster.as_ref());
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

/// Every service's state. Needs `viewer`.
#[utoipa::path(get, path = "/v1/services", tag = "services", security(("bearer" = [])),
    responses((status = 200, description = "Every service", body = ServiceList), AuthErrors, ServerErrors))]
pub async fn list_services(
    State(state): State<Arc<AppState>>,
    _: Authorized<Viewer>,
) -> Result<Json<ServiceList>, ApiError> {
    let services = state.control.ask(|reply| Command::Services { reply }).await?;
    let (stale, as_of_revision) = freshness(&state);
    Ok(Json(ServiceList { services, stale, as_of_revision }))
}

/// One service's state: configuration, weight, what the kernel counted. Needs `viewer`.
#[utoipa::path(get, path = "/v1/services/{name}", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "The service's state after the call", body = ServiceState), AuthErrors, NotFoundError, ServerErrors))]
pub async fn get_service(
    State(state): State<Arc<AppState>>,
    _: Authorized<Viewer>,
    Path(name): Path<String>,
) -> Result<Json<ServiceState>, ApiError> {
    let mut service = state.control.ask(|reply| Command::Service { name, reply }).await?;
    (service.stale, service.as_of_revision) = freshness(&state);
    Ok(Json(service))
}

/// Adds (201) or replaces (200) a service; the body is a `[[service]]` table as JSON. Needs
/// `release`.
#[utoipa::path(put, path = "/v1/services/{name}", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name"), WaitQuery),
    request_body = ServiceBody,
    responses(
        (status = 200, description = "Replaced", body = ServiceState),
        (status = 201, description = "Added", body = ServiceState),
        BodyErrors, AuthErrors, ConflictError, ServerErrors, ClusterWaitError,
    ))]
pub async fn put_service(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Release>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    ApiJson(body): ApiJson<ServiceBody>,
) -> Result<(StatusCode, Json<ServiceState>), ApiError> {
    let wait = Wait::parse(wait)?;
    if let Some(given) = body.name.as_ref().filter(|given| **given != name) {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "name",
            format!("`name` in the body ({given:?}) differs from the service in the path ({name:?})"),
        ));
    }
    let origin = origin(caller, &method, &uri);
    let (created, service) = state.control.ask(|reply| Command::PutService { name, body, origin, reply }).await?;
    wait.for_cluster(&state).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(service)))
}

/// Removes a service (and its rollout); answers its last state. Needs `release`.
#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name"), WaitQuery),
    responses(
        (status = 200, description = "Removed; its last state", body = ServiceState),
        (status = 415, description = "`unsupported_media_type`: no `Content-Type: application/json`", body = ErrorBody),
        AuthErrors, NotFoundError, ConflictError, ServerErrors, ClusterWaitError,
    ))]
pub async fn delete_service(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Release>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<ServiceState>, ApiError> {
    let wait = Wait::parse(wait)?;
    let origin = origin(caller, &method, &uri);
    let service = state.control.ask(|reply| Command::DeleteService { name, origin, reply }).await?;
    wait.for_cluster(&state).await?;
    Ok(Json(service))
}

/// Sets the canary weight. Needs `operator` (up to the service's `max_operator_percent`) or
/// `release` (any weight); refused with `rollout_active` while a rollout drives the weight.
#[utoipa::path(put, path = "/v1/services/{name}/canary", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name"), WaitQuery),
    request_body = CanaryUpdate,
    responses((status = 200, description = "The service's state after the call", body = ServiceState), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors, ClusterWaitError))]
pub async fn put_canary(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    ApiJson(body): ApiJson<CanaryUpdate>,
) -> Result<Json<ServiceState>, ApiError> {
    let wait = Wait::parse(wait)?;
    crate::config::validate_percent(body.percent, "percent")
        .map_err(|err| ApiError::field(ErrorCode::OutOfRange, "percent", format!("`percent` {}", err.message)))?;
    change_weight(&state, caller, name, WeightChange::Set(body.percent), &method, &uri, wait).await
}

/// The kill switch: weight 0 at once, whatever else is going on; an active rollout ends
/// `rolled_back`. Needs `operator`. The body is empty or `{}`.
#[utoipa::path(post, path = "/v1/services/{name}/rollback", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name"), WaitQuery),
    request_body(content = Option<NoFields>, description = "Nothing, or `{}`"),
    responses((status = 200, description = "The service's state after the call", body = ServiceState), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors, ClusterWaitError))]
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    _: NoBody,
) -> Result<Json<ServiceState>, ApiError> {
    let wait = Wait::parse(wait)?;
    change_weight(&state, caller, name, WeightChange::KillSwitch, &method, &uri, wait).await
}

/// Weight 100. Needs `release`; refused with `rollout_active` during a rollout. The body is
/// empty or `{}`.
#[utoipa::path(post, path = "/v1/services/{name}/promote", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name"), WaitQuery),
    request_body(content = Option<NoFields>, description = "Nothing, or `{}`"),
    responses((status = 200, description = "The service's state after the call", body = ServiceState), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors, ClusterWaitError))]
pub async fn promote(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Release>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    _: NoBody,
) -> Result<Json<ServiceState>, ApiError> {
    let wait = Wait::parse(wait)?;
    change_weight(&state, caller, name, WeightChange::Promote, &method, &uri, wait).await
}

async fn change_weight(
    state: &AppState,
    caller: Caller,
    name: String,
    change: WeightChange,
    method: &Method,
    uri: &Uri,
    wait: Wait,
) -> Result<Json<ServiceState>, ApiError> {
    let origin = origin(caller, method, uri);
    let service = state.control.ask(|reply| Command::SetWeight { name, change, origin, reply }).await?;
    wait.for_cluster(state).await?;
    Ok(Json(service))
}

/// Starts a rollout (201). Needs `operator`.
#[utoipa::path(post, path = "/v1/services/{name}/rollout", tag = "rollouts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name"), WaitQuery),
    request_body = Plan,
    responses((status = 201, description = "Started", body = RolloutView), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors, ClusterWaitError))]
pub async fn start_rollout(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    ApiJson(plan): ApiJson<Plan>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let wait = Wait::parse(wait)?;
    plan.validate().map_err(|err| ApiError::field(ErrorCode::InvalidField, err.field.clone(), err.to_string()))?;
    // Webhook URLs against the allow list, and queries against Prometheus' parser: network I/O,
    // so here and not on the core's thread.
    state
        .gates
        .check_plan(&name, &plan)
        .await
        .map_err(|err| ApiError::field(ErrorCode::InvalidField, err.field.clone(), err.to_string()))?;
    let origin = origin(caller, &method, &uri);
    let view = state.control.ask(|reply| Command::StartRollout { name, plan, origin, reply }).await?;
    wait.for_cluster(&state).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The service's rollout (the active one, or the last one). Needs `viewer`; a viewer sees
/// webhook URLs without their query strings.
#[utoipa::path(get, path = "/v1/services/{name}/rollout", tag = "rollouts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "The rollout", body = RolloutView), AuthErrors, NotFoundError, ServerErrors))]
pub async fn get_rollout(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Viewer>,
    Path(name): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    let mut view = state.control.ask(|reply| Command::Rollout { name, reply }).await?;
    (view.stale, view.as_of_revision) = freshness(&state);
    if caller.role < Role::Operator {
        view.plan.webhooks.iter_mut().for_each(|url| *url = redact_url(url));
    }
    Ok(Json(view))
}

/// A webhook URL as a `viewer` sees it: without its query string, where a receiver's
/// credentials usually travel. Operators, who may start rollouts with webhooks, see it whole.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => url.to_string(),
    }
}

/// Redacts webhook URLs (`"webhooks": [...]` at any depth) in an audit entry's before/after.
fn redact_webhooks(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                match inner {
                    serde_json::Value::Array(items) if key == "webhooks" => {
                        for item in items.iter_mut() {
                            if let serde_json::Value::String(url) = item {
                                *url = redact_url(url);
                            }
                        }
                    }
                    other => redact_webhooks(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_webhooks),
        _ => {}
    }
}

/// `pause`, `resume`, `abort` (needs `operator`) or `approve` (needs `operator` and the role the
/// plan names). The body is empty or `{}`.
#[utoipa::path(post, path = "/v1/services/{name}/rollout/{action}", tag = "rollouts", security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Service name"),
        ("action" = RolloutAction, Path, description = "pause, resume, approve or abort"),
        WaitQuery,
    ),
    request_body(content = Option<NoFields>, description = "Nothing, or `{}`"),
    responses((status = 200, description = "The rollout", body = RolloutView), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors, ClusterWaitError))]
pub async fn rollout_action(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path((name, action)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    _: NoBody,
) -> Result<Json<RolloutView>, ApiError> {
    let wait = Wait::parse(wait)?;
    let action = match action.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "approve" => RolloutAction::Approve,
        "abort" => RolloutAction::Abort,
        _ => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no rollout action {action:?}: pause, resume, approve or abort"),
            ))
        }
    };
    let origin = origin(caller, &method, &uri);
    let rollout = state.control.ask(|reply| Command::RolloutAction { name, action, origin, reply }).await?;
    wait.for_cluster(&state).await?;
    Ok(Json(rollout))
}

/// Datapath-wide figures: services and the socket table's use. Needs `viewer`.
#[utoipa::path(get, path = "/v1/datapath", tag = "agent", security(("bearer" = [])),
    responses((status = 200, description = "Datapath figures", body = DatapathStatus), AuthErrors, ServerErrors))]
pub async fn datapath_status(
    State(state): State<Arc<AppState>>,
    _: Authorized<Viewer>,
) -> Result<Json<DatapathStatus>, ApiError> {
    Ok(Json(state.control.ask(|reply| Command::Datapath { reply }).await?))
}

/// Clients following the datapath's log at once, at most.
pub const DATAPATH_LOG_FOLLOWERS: usize = 8;

/// Follows the datapath's log records (`agent.datapath_log`) as the agent reads them, as
/// server-sent events (`text/event-stream`): each record is one event's `data`; a client that
/// reads too slowly gets an event `missed` whose `data` says how many records it missed; a
/// comment every 10 s of silence keeps the connection checked. From now on, until the client goes
/// or the agent stops; at `off` the programs log nothing and the stream stays open until the
/// level is raised. At most 8 clients follow at once. Needs `viewer`.
#[utoipa::path(get, path = "/v1/datapath/log", tag = "agent", security(("bearer" = [])),
    responses(
        (status = 200, description = "Records as they come, one event each", content_type = "text/event-stream", body = String),
        (status = 429, description = "`too_many_followers`: 8 clients already follow the log", body = ErrorBody),
        AuthErrors, ServerErrors,
    ))]
pub async fn datapath_log(
    State(state): State<Arc<AppState>>,
    _: Authorized<Viewer>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let follower = state.datapath_followers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorCode::TooManyFollowers,
            format!("{DATAPATH_LOG_FOLLOWERS} clients already follow the datapath's log; stop one and try again"),
        )
    })?;
    let records = state.datapath_log.subscribe();
    let shutdown = state.shutdown.clone();
    // The permit lives as long as the stream. A client that goes is noticed at the next write,
    // a record or the keep-alive comment, and its place freed.
    let events =
        futures_util::stream::unfold((records, shutdown, follower), |(mut records, shutdown, follower)| async move {
            let event = tokio::select! {
                () = shutdown.cancelled() => return None,
                next = records.recv() => match next {
                    Ok(record) => Event::default().data(record),
                    Err(RecvError::Lagged(missed)) => Event::default().event("missed").data(missed.to_string()),
                    Err(RecvError::Closed) => return None,
                },
            };
            Some((Ok::<_, std::convert::Infallible>(event), (records, shutdown, follower)))
        });
    let keep_alive = KeepAlive::new().interval(DATAPATH_LOG_KEEP_ALIVE);
    let mut response = Sse::new(events).keep_alive(keep_alive).into_response();
    response.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Silence after which a follower of the datapath's log gets a keep-alive comment.
pub const DATAPATH_LOG_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// How many of the last entries (default and most: 1000).
    #[param(minimum = 0, maximum = 1000)]
    limit: Option<usize>,
}

/// The last accepted changes and refused requests (`refused` set), oldest first; read from the
/// end of the log (and its rotated files). Needs `viewer`; a viewer sees webhook URLs without
/// their query strings.
#[utoipa::path(get, path = "/v1/audit", tag = "agent", security(("bearer" = [])),
    params(AuditQuery),
    responses((status = 200, description = "The last entries, oldest first", body = AuditLog), (status = 400, description = "`invalid_field`: `limit` is not a number; `out_of_range`: `limit` above 1000", body = ErrorBody), AuthErrors, ServerErrors))]
pub async fn audit_log(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Viewer>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditLog>, ApiError> {
    let Query(query) = query.map_err(|err| ApiError::field(ErrorCode::InvalidField, "limit", err.body_text()))?;
    let limit = query.limit.unwrap_or(AUDIT_LIMIT_MAX);
    if limit > AUDIT_LIMIT_MAX {
        return Err(ApiError::field(
            ErrorCode::OutOfRange,
            "limit",
            format!("limit {limit} is above {AUDIT_LIMIT_MAX}, the most one read returns"),
        ));
    }
    let mut entries = state.audit.tail(limit).await.map_err(|err| match err {
        // Cluster mode keeps the log in etcd.
        StoreError::Unavailable(_) => ApiError::new(ErrorCode::ClusterUnavailable, err.to_string()),
        err => ApiError::new(ErrorCode::InternalError, err.to_string()),
    })?;
    if caller.role < Role::Operator {
        for entry in &mut entries {
            redact_webhooks(&mut entry.before);
            redact_webhooks(&mut entry.after);
        }
    }
    Ok(Json(AuditLog { entries }))
}

/// The cluster's nodes, the leader, and how far each node has applied the desired state (cluster
/// mode; 404 on a single node). Needs `viewer`.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster", security(("bearer" = [])),
    responses(
        (status = 200, description = "The cluster as this node sees it", body = ClusterStatus),
        (status = 404, description = "`cluster_disabled`: cluster mode is off (no `[cluster]` in the config)", body = ErrorBody),
        AuthErrors, ServerErrors,
    ))]
pub async fn cluster_status(
    State(state): State<Arc<AppState>>,
    _: Authorized<Viewer>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Err(ApiError::new(
            ErrorCode::ClusterDisabled,
            "cluster mode is off: the agent's config has no [cluster] table",
        ));
    };
    let view = cluster.handle.view();
    let applied = cluster.progress.borrow().applied;
    let revision = view.nodes.values().map(|n| n.applied_revision.max(0) as u64).fold(applied, u64::max);
    let now = crate::cluster::unix_ms();
    let nodes = view
        .nodes
        .values()
        .map(|n| ClusterNode {
            node: n.node.clone(),
            applied_revision: n.applied_revision.max(0) as u64,
            age_ms: now.saturating_sub(n.at_unix_ms),
            healthy: n.healthy,
            lagging: (n.applied_revision.max(0) as u64) < revision,
            agent_version: n.agent_version.clone(),
            detail: n.detail.clone(),
        })
        .collect();
    Ok(Json(ClusterStatus {
        node: cluster.handle.node().to_string(),
        leader: view.leader.clone(),
        revision,
        connected: view.connected,
        stale: !view.connected,
        as_of_revision: applied,
        nodes,
    }))
}

/// `stale` and `as_of_revision` of a read: cluster mode only.
fn freshness(state: &AppState) -> (Option<bool>, Option<u64>) {
    match &state.cluster {
        Some(cluster) => (Some(!cluster.handle.view().connected), Some(cluster.progress.borrow().applied)),
        None => (None, None),
    }
}

/// How long `?wait=cluster` waits when the request does not say.
pub const CLUSTER_WAIT_DEFAULT: Duration = Duration::from_secs(10);
/// The longest `timeout_ms` accepted.
pub const CLUSTER_WAIT_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// `cluster`: answer once every live node has applied the change (cluster mode; a single
    /// node applied it when it answers), or 504 `cluster_timeout` naming the nodes that lag. The
    /// change is committed either way.
    wait: Option<String>,
    /// How long `wait=cluster` waits, in milliseconds (default 10000, at most 60000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

/// A validated `?wait=`: how long to wait for the cluster, if at all.
struct Wait(Option<Duration>);

impl Wait {
    /// Checked before the change is made: a bad query changes nothing.
    fn parse(query: Result<Query<WaitQuery>, QueryRejection>) -> Result<Self, ApiError> {
        let Query(query) = query.map_err(|err| ApiError::field(ErrorCode::InvalidField, "wait", err.body_text()))?;
        let timeout = match query.timeout_ms {
            None => CLUSTER_WAIT_DEFAULT,
            Some(ms) if (1..=CLUSTER_WAIT_MAX.as_millis() as u64).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(ApiError::field(
                    ErrorCode::OutOfRange,
                    "timeout_ms",
                    format!("`timeout_ms` must be from 1 to {}, got {ms}", CLUSTER_WAIT_MAX.as_millis()),
                ))
            }
        };
        match query.wait.as_deref() {
            None if query.timeout_ms.is_some() => {
                Err(ApiError::field(ErrorCode::InvalidField, "timeout_ms", "`timeout_ms` goes with `wait=cluster`"))
            }
            None => Ok(Self(None)),
            Some("cluster") => Ok(Self(Some(timeout))),
            Some(other) => Err(ApiError::field(
                ErrorCode::InvalidField,
                "wait",
                format!("`wait` can only be `cluster`, got {other:?}"),
            )),
        }
    }

    /// Waits until every live node has applied this node's last commit (at least the change
    /// just made), or answers 504 naming the nodes that lag.
    async fn for_cluster(self, state: &AppState) -> Result<(), ApiError> {
        let (Some(timeout), Some(cluster)) = (self.0, &state.cluster) else { return Ok(()) };
        let target = cluster.progress.borrow().committed;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut views = cluster.handle.views();
        loop {
            let lagging: Vec<String> = views
                .borrow_and_update()
                .nodes
                .values()
                .filter(|n| (n.applied_revision.max(0) as u64) < target)
                .map(|n| format!("{} (applied {})", n.node, n.applied_revision))
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, views.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ApiError::new(ErrorCode::InternalError, "the cluster view stopped (shutting down?)"))
                }
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorCode::ClusterTimeout,
                        format!(
                            "the change is committed (revision {target}) but not every live node applied it within \
                             {timeout:?}: {}",
                            lagging.join(", ")
                        ),
                    ))
                }
            }
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
}
