//! The route handlers. Each one authorizes (through its extractor), reads its typed body, sends
//! one command to the control core and answers what the core answers: the core validates the
//! whole change before it touches anything, so a refused request changes nothing.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Path, Query, State},
    http::{header, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{
    error::{ApiError, AuthErrors, BodyErrors, ConflictError, ErrorBody, ErrorCode, NotFoundError, ServerErrors},
    extract::{ApiJson, Authorized, NoBody, Operator, Release, Viewer},
    types::{
        AuditLog, CanaryUpdate, DatapathStatus, Health, NoFields, RolloutView, ServiceBody, ServiceList, ServiceState,
    },
    AppState,
};
use crate::{
    config::Role,
    control::{Caller, Command, ControlError, Origin, RolloutAction, WeightChange},
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
    let text = crate::metrics::render(&services, &state.denied.snapshot());
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
    Ok(Json(ServiceList { services }))
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
    Ok(Json(state.control.ask(|reply| Command::Service { name, reply }).await?))
}

/// Adds (201) or replaces (200) a service; the body is a `[[service]]` table as JSON. Needs
/// `release`.
#[utoipa::path(put, path = "/v1/services/{name}", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    request_body = ServiceBody,
    responses(
        (status = 200, description = "Replaced", body = ServiceState),
        (status = 201, description = "Added", body = ServiceState),
        BodyErrors, AuthErrors, ConflictError, ServerErrors,
    ))]
pub async fn put_service(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Release>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    ApiJson(body): ApiJson<ServiceBody>,
) -> Result<(StatusCode, Json<ServiceState>), ApiError> {
    if let Some(given) = body.name.as_ref().filter(|given| **given != name) {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "name",
            format!("`name` in the body ({given:?}) differs from the service in the path ({name:?})"),
        ));
    }
    let origin = origin(caller, &method, &uri);
    let (created, service) = state.control.ask(|reply| Command::PutService { name, body, origin, reply }).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(service)))
}

/// Removes a service (and its rollout); answers its last state. Needs `release`.
#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    responses(
        (status = 200, description = "Removed; its last state", body = ServiceState),
        (status = 415, description = "`unsupported_media_type`: no `Content-Type: application/json`", body = ErrorBody),
        AuthErrors, NotFoundError, ServerErrors,
    ))]
pub async fn delete_service(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Release>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
) -> Result<Json<ServiceState>, ApiError> {
    let origin = origin(caller, &method, &uri);
    Ok(Json(state.control.ask(|reply| Command::DeleteService { name, origin, reply }).await?))
}

/// Sets the canary weight. Needs `operator` (up to the service's `max_operator_percent`) or
/// `release` (any weight); refused with `rollout_active` while a rollout drives the weight.
#[utoipa::path(put, path = "/v1/services/{name}/canary", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    request_body = CanaryUpdate,
    responses((status = 200, description = "The service's state after the call", body = ServiceState), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors))]
pub async fn put_canary(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    ApiJson(body): ApiJson<CanaryUpdate>,
) -> Result<Json<ServiceState>, ApiError> {
    crate::config::validate_percent(body.percent, "percent")
        .map_err(|err| ApiError::field(ErrorCode::OutOfRange, "percent", format!("`percent` {}", err.message)))?;
    change_weight(&state, caller, name, WeightChange::Set(body.percent), &method, &uri).await
}

/// The kill switch: weight 0 at once, whatever else is going on; an active rollout ends
/// `rolled_back`. Needs `operator`. The body is empty or `{}`.
#[utoipa::path(post, path = "/v1/services/{name}/rollback", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    request_body(content = Option<NoFields>, description = "Nothing, or `{}`"),
    responses((status = 200, description = "The service's state after the call", body = ServiceState), BodyErrors, AuthErrors, NotFoundError, ServerErrors))]
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    _: NoBody,
) -> Result<Json<ServiceState>, ApiError> {
    change_weight(&state, caller, name, WeightChange::KillSwitch, &method, &uri).await
}

/// Weight 100. Needs `release`; refused with `rollout_active` during a rollout. The body is
/// empty or `{}`.
#[utoipa::path(post, path = "/v1/services/{name}/promote", tag = "services", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    request_body(content = Option<NoFields>, description = "Nothing, or `{}`"),
    responses((status = 200, description = "The service's state after the call", body = ServiceState), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors))]
pub async fn promote(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Release>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    _: NoBody,
) -> Result<Json<ServiceState>, ApiError> {
    change_weight(&state, caller, name, WeightChange::Promote, &method, &uri).await
}

async fn change_weight(
    state: &AppState,
    caller: Caller,
    name: String,
    change: WeightChange,
    method: &Method,
    uri: &Uri,
) -> Result<Json<ServiceState>, ApiError> {
    let origin = origin(caller, method, uri);
    Ok(Json(state.control.ask(|reply| Command::SetWeight { name, change, origin, reply }).await?))
}

/// Starts a rollout (201). Needs `operator`.
#[utoipa::path(post, path = "/v1/services/{name}/rollout", tag = "rollouts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Service name")),
    request_body = Plan,
    responses((status = 201, description = "Started", body = RolloutView), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors))]
pub async fn start_rollout(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    ApiJson(plan): ApiJson<Plan>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
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
    ),
    request_body(content = Option<NoFields>, description = "Nothing, or `{}`"),
    responses((status = 200, description = "The rollout", body = RolloutView), BodyErrors, AuthErrors, NotFoundError, ConflictError, ServerErrors))]
pub async fn rollout_action(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Operator>,
    Path((name, action)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    _: NoBody,
) -> Result<Json<RolloutView>, ApiError> {
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
    Ok(Json(state.control.ask(|reply| Command::RolloutAction { name, action, origin, reply }).await?))
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
    responses((status = 200, description = "The last entries, oldest first", body = AuditLog), (status = 400, description = "`invalid_field`: a bad `limit`", body = ErrorBody), AuthErrors, ServerErrors))]
pub async fn audit_log(
    State(state): State<Arc<AppState>>,
    Authorized(caller, ..): Authorized<Viewer>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditLog>, ApiError> {
    let Query(query) = query.map_err(|err| ApiError::field(ErrorCode::InvalidField, "limit", err.body_text()))?;
    let limit = query.limit.unwrap_or(AUDIT_LIMIT_MAX).min(AUDIT_LIMIT_MAX);
    let mut entries =
        state.audit.tail(limit).await.map_err(|err| ApiError::new(ErrorCode::InternalError, err.to_string()))?;
    if caller.role < Role::Operator {
        for entry in &mut entries {
            redact_webhooks(&mut entry.before);
            redact_webhooks(&mut entry.after);
        }
    }
    Ok(Json(AuditLog { entries }))
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
}
