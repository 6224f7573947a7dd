//! The local control API (JSON over HTTP). Every handler authorizes and validates fully before it
//! touches anything, so a refused request changes nothing; every accepted change is audited.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use agent_common::{ppm_to_percent, SideCounters};
use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use serde_json::{json, Map, Value};

use crate::{
    audit::AuditLog,
    config::{Role, ServiceConfig, Token},
    control::{ControlError, Core, FollowUp},
    datapath::DatapathError,
    rollout::{Plan, Rollout},
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The OpenAPI description of this API, served at /v1/openapi.json.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub struct AppState {
    pub core: Mutex<Core>,
    /// Where rollout follow-ups (webhooks, connection termination) are sent to be carried out
    /// outside the core's lock.
    pub follow_ups: tokio::sync::mpsc::UnboundedSender<FollowUp>,
    /// `None`: no authentication (the API listens on loopback).
    pub tokens: Option<Vec<Token>>,
    pub audit: AuditLog,
    /// Config file, re-read on change and SIGHUP.
    pub config_path: PathBuf,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service).put(put_service).delete(delete_service))
        .route("/v1/services/{name}/canary", put(put_canary))
        .route("/v1/services/{name}/rollback", post(rollback))
        .route("/v1/services/{name}/promote", post(promote))
        .route("/v1/services/{name}/rollout", get(get_rollout).post(start_rollout))
        .route("/v1/services/{name}/rollout/{action}", post(rollout_action))
        .route("/v1/datapath", get(datapath_status))
        .route("/v1/audit", get(audit_log))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An API error: a status, a stable machine-readable `code`, a human `message`, and the field
/// it is about when there is one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }

    fn invalid(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code, message: message.into(), field: Some(field.to_string()) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(field) = self.field {
            body["field"] = Value::String(field);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
        }
        response
    }
}

impl From<ControlError> for ApiError {
    fn from(err: ControlError) -> Self {
        match err {
            ControlError::Invalid(field) => ApiError::invalid("invalid_field", &field.field.clone(), field.to_string()),
            ControlError::UnknownService(name) => {
                ApiError::new(StatusCode::NOT_FOUND, "service_not_found", format!("no service named {name:?}"))
            }
            ControlError::FrontendInUse { .. } => ApiError {
                status: StatusCode::CONFLICT,
                code: "frontend_in_use",
                message: err.to_string(),
                field: Some("frontends".into()),
            },
            ControlError::RolloutActive(_) => ApiError::new(StatusCode::CONFLICT, "rollout_active", err.to_string()),
            ControlError::NoRollout(_) => ApiError::new(StatusCode::NOT_FOUND, "rollout_not_found", err.to_string()),
            ControlError::RolloutState { .. } => ApiError::new(StatusCode::CONFLICT, "rollout_state", err.to_string()),
            ControlError::Datapath(DatapathError::UnknownService(name)) => {
                ApiError::new(StatusCode::NOT_FOUND, "service_not_found", format!("no service named {name:?}"))
            }
            other => {
                log::error!("change failed: {other}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", other.to_string())
            }
        }
    }
}

impl From<DatapathError> for ApiError {
    fn from(err: DatapathError) -> Self {
        ControlError::Datapath(err).into()
    }
}

/// Who is calling, as established by `authorize`.
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Checks the bearer token against the configured ones and the role `needed`. 401 without a
/// valid token, 403 with a token whose role is too low. Without auth everyone is `release`.
fn authorize(state: &AppState, headers: &HeaderMap, needed: Role) -> Result<Caller, ApiError> {
    let Some(tokens) = &state.tokens else {
        return Ok(Caller { name: "anonymous".into(), role: Role::Release });
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a bearer token is required"))?;
    let token = tokens
        .iter()
        .find(|t| constant_time_eq(t.secret.as_bytes(), presented.trim().as_bytes()))
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"))?;
    if token.role < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token {:?} has role {}, this needs {}", token.name, role_name(token.role), role_name(needed)),
        ));
    }
    Ok(Caller { name: token.name.clone(), role: token.role })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Release => "release",
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Viewer)?;
    let core = state.core.lock().expect("core lock");
    let text = crate::metrics::render(&core)?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

async fn list_services(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::Viewer)?;
    let core = state.core.lock().expect("core lock");
    let services =
        core.datapath.service_names().iter().map(|name| service_state(&core, name)).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "services": services })))
}

async fn get_service(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::Viewer)?;
    let core = state.core.lock().expect("core lock");
    Ok(Json(service_state(&core, &name)?))
}

async fn put_canary(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = authorize(&state, &headers, Role::Operator)?;
    let body = read_json_object(body)?;
    reject_unknown_fields(&body, &["percent"])?;
    let percent = match body.get("percent") {
        None => return Err(ApiError::invalid("missing_field", "percent", "field `percent` is required")),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => {
            return Err(ApiError::invalid(
                "invalid_type",
                "percent",
                format!("`percent` must be a number, got {}", json_type(other)),
            ))
        }
    };
    crate::config::validate_percent(percent, "percent")
        .map_err(|err| ApiError::invalid("out_of_range", "percent", format!("`percent` {}", err.message)))?;
    change_weight(&state, &caller, &name, WeightChange::Set(percent))
}

async fn start_rollout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = authorize(&state, &headers, Role::Operator)?;
    let body = read_json_object(body)?;
    let plan: Plan = deserialize_body(body)?;
    plan.validate().map_err(|err| ApiError::invalid("invalid_field", &err.field.clone(), err.to_string()))?;
    let mut core = state.core.lock().expect("core lock");
    let before = core.service(&name)?.clone();
    let follow = core.start_rollout(&name, plan.clone(), &caller.name)?;
    let route = format!("/v1/services/{name}/rollout");
    state.audit.record(&caller.name, role_name(caller.role), "POST", &route, json!(before), json!({ "rollout": plan }));
    log::info!("service {name}: rollout started by {}", caller.name);
    let view = rollout_view(&core, &name)?;
    drop(core);
    send_follow_ups(&state, follow);
    Ok((StatusCode::CREATED, Json(view)))
}

async fn get_rollout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::Viewer)?;
    let core = state.core.lock().expect("core lock");
    Ok(Json(rollout_view(&core, &name)?))
}

/// pause, resume, abort (operator) and approve (the role the plan names).
async fn rollout_action(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let action: &'static str = match action.as_str() {
        "pause" => "pause",
        "resume" => "resume",
        "abort" => "abort",
        "approve" => "approve",
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no rollout action {action:?}: pause, resume, approve or abort"),
            ))
        }
    };
    let mut caller = authorize(&state, &headers, Role::Operator)?;
    require_empty_body(body)?;
    let mut core = state.core.lock().expect("core lock");
    if action == "approve" {
        if let Some(needed) = core.rollout(&name)?.approval_role() {
            caller = authorize(&state, &headers, needed)?;
        }
    }
    let before = json!(core.rollout(&name)?.state);
    let follow = core.rollout_action(&name, action, &caller.name)?;
    let view = rollout_view(&core, &name)?;
    let route = format!("/v1/services/{name}/rollout/{action}");
    state.audit.record(
        &caller.name,
        role_name(caller.role),
        "POST",
        &route,
        json!({ "state": before }),
        json!({ "state": view["state"] }),
    );
    log::info!("service {name}: rollout {action} by {}", caller.name);
    drop(core);
    send_follow_ups(&state, follow);
    Ok(Json(view))
}

fn send_follow_ups(state: &AppState, follow: Vec<FollowUp>) {
    for item in follow {
        let _ = state.follow_ups.send(item);
    }
}

/// A rollout as the API shows it: state, step, weights, the gates of the last judged window and
/// of the window in progress, and the history.
pub fn rollout_view(core: &Core, name: &str) -> Result<Value, ApiError> {
    let rollout: &Rollout = core.rollout(name)?;
    let now = crate::control::now_ms();
    let current = core
        .snapshot(name)
        .ok()
        .map(|now_counters| crate::rollout::read_gates(&rollout.plan.gates, &rollout.window_baseline, &now_counters));
    let elapsed = match rollout.paused_at_elapsed_ms {
        Some(ms) => ms,
        None => now.saturating_sub(rollout.window_started_unix_ms),
    };
    Ok(json!({
        "service": name,
        "state": rollout.state,
        "step": rollout.step,
        "steps": rollout.plan.steps,
        "percent": rollout.percent,
        "step_seconds": rollout.plan.step_seconds,
        "window_elapsed_ms": elapsed,
        "consecutive_failures": rollout.consecutive_failures,
        "awaiting_role": rollout.approval_role().map(role_name),
        "last_gates": rollout.last_gates,
        "current_window": current,
        "terminated_connections": rollout.terminated_connections,
        "started_by": rollout.started_by,
        "plan": rollout.plan,
        "history": rollout.history,
    }))
}

/// Kill switch: canary to 0 at once.
async fn rollback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = authorize(&state, &headers, Role::Operator)?;
    require_empty_body(body)?;
    change_weight(&state, &caller, &name, WeightChange::KillSwitch)
}

async fn promote(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = authorize(&state, &headers, Role::Release)?;
    require_empty_body(body)?;
    change_weight(&state, &caller, &name, WeightChange::Promote)
}

/// The three ways a caller changes a weight by hand.
#[derive(Clone, Copy)]
enum WeightChange {
    /// `PUT .../canary`: refused while a rollout drives the weight.
    Set(f64),
    /// `POST .../promote`: 100 %, likewise refused during a rollout.
    Promote,
    /// `POST .../rollback`: 0 % whatever else is going on; ends an active rollout.
    KillSwitch,
}

fn change_weight(state: &AppState, caller: &Caller, name: &str, change: WeightChange) -> Result<Json<Value>, ApiError> {
    let (percent, route) = match change {
        WeightChange::Set(percent) => (percent, format!("/v1/services/{name}/canary")),
        WeightChange::Promote => (100.0, format!("/v1/services/{name}/promote")),
        WeightChange::KillSwitch => (0.0, format!("/v1/services/{name}/rollback")),
    };
    let route = route.as_str();
    let mut core = state.core.lock().expect("core lock");
    let before = core.service(name)?.clone();
    if caller.role < Role::Release && percent > before.max_operator_percent {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} (operator) may set {name} up to {} %, not {percent} %",
                caller.name, before.max_operator_percent
            ),
        ));
    }
    let follow = match change {
        WeightChange::KillSwitch => core.kill_switch(name, &caller.name)?,
        WeightChange::Set(_) | WeightChange::Promote => {
            core.set_percent_by_hand(name, percent)?;
            Vec::new()
        }
    };
    let after = core.service(name)?.clone();
    state.audit.record(&caller.name, role_name(caller.role), "PUT/POST", route, json!(before), json!(after));
    log::info!("service {name}: canary weight set to {percent} % by {}", caller.name);
    let reply = service_state(&core, name)?;
    drop(core);
    send_follow_ups(state, follow);
    Ok(Json(reply))
}

/// Creates or replaces a service; the body has the fields of a `[[service]]` table (`name` may be
/// left out; if given it must match the path). 201 when created, 200 when replaced.
async fn put_service(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = authorize(&state, &headers, Role::Release)?;
    let mut body = read_json_object(body)?;
    match body.get("name") {
        None => {
            body.insert("name".into(), Value::String(name.clone()));
        }
        Some(Value::String(given)) if *given == name => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "invalid_field",
                "name",
                format!("`name` in the body ({other}) differs from the service in the path ({name:?})"),
            ))
        }
    }
    let config: ServiceConfig = deserialize_body(body)?;
    // Validated on its own first so the error names the body's field, not the set's.
    crate::config::validate_service(&config, "", None)
        .map_err(|err| ApiError::invalid("invalid_field", &err.field, err.to_string()))?;

    let mut core = state.core.lock().expect("core lock");
    let before = core.service(&name).ok().cloned();
    let created = core.put_service(config)?;
    let after = core.service(&name)?.clone();
    state.audit.record(
        &caller.name,
        role_name(caller.role),
        "PUT",
        &format!("/v1/services/{name}"),
        json!(before),
        json!(after),
    );
    log::info!("service {name}: {} by {}", if created { "added" } else { "replaced" }, caller.name);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(service_state(&core, &name)?)))
}

async fn delete_service(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = authorize(&state, &headers, Role::Release)?;
    let mut core = state.core.lock().expect("core lock");
    let last_state = service_state(&core, &name)?;
    let removed = core.delete_service(&name)?;
    state.audit.record(
        &caller.name,
        role_name(caller.role),
        "DELETE",
        &format!("/v1/services/{name}"),
        json!(removed),
        Value::Null,
    );
    log::info!("service {name}: removed by {}", caller.name);
    Ok(Json(last_state))
}

/// Datapath-wide figures: services and the socket table's use.
async fn datapath_status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::Viewer)?;
    let core = state.core.lock().expect("core lock");
    Ok(Json(json!({
        "services": core.datapath.service_names().len(),
        "open_steered_sockets": core.datapath.open_steered_sockets(),
        "steered_socket_capacity": agent_common::MAX_STEERED_SOCKETS,
    })))
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit_log(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::Viewer)?;
    let Query(query) = query.map_err(|err| ApiError::invalid("invalid_field", "limit", err.body_text()))?;
    let entries = state
        .audit
        .tail(query.limit.unwrap_or(1000))
        .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", err.to_string()))?;
    Ok(Json(json!({ "entries": entries })))
}

/// Routes that take no input accept an empty body or `{}`, and refuse anything else rather
/// than act on a request they may have misunderstood.
fn require_empty_body(body: Result<Bytes, BytesRejection>) -> Result<(), ApiError> {
    if matches!(&body, Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace)) {
        return Ok(());
    }
    let body = read_json_object(body)?;
    reject_unknown_fields(&body, &[])
}

/// Deserializes a JSON object into `T`; the error names the field (`gates.max_srtt_ratio`) and
/// says whether it was unknown, missing or of the wrong type.
fn deserialize_body<T: serde::de::DeserializeOwned>(body: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(body)).map_err(|err| {
        let field = err.path().to_string();
        let message = err.inner().to_string();
        let code = if message.starts_with("unknown field") {
            "unknown_field"
        } else if message.starts_with("missing field") {
            "missing_field"
        } else if message.starts_with("invalid type") {
            "invalid_type"
        } else {
            "invalid_field"
        };
        ApiError::invalid(code, &field, format!("`{field}`: {message}"))
    })
}

/// Parses a request body that must be a JSON object.
fn read_json_object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body rejected (limit {MAX_BODY_BYTES} bytes): {rejection}"),
        )
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("request body is not valid JSON: {err}"))
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            format!("request body must be a JSON object, got {}", json_type(&other)),
        )),
    }
}

fn reject_unknown_fields(body: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match body.keys().find(|k| !known.contains(&k.as_str())) {
        Some(field) => Err(ApiError::invalid(
            "unknown_field",
            field,
            if known.is_empty() {
                format!("unknown field `{field}`: this route takes no fields")
            } else {
                format!("unknown field `{field}`; expected one of: {}", known.join(", "))
            },
        )),
        None => Ok(()),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The JSON state of one service: its config, current weight and what the kernel counted.
pub fn service_state(core: &Core, name: &str) -> Result<Value, ApiError> {
    let datapath = &core.datapath;
    let view = datapath.service(name).ok_or_else(|| DatapathError::UnknownService(name.to_string()))?;
    let counters = datapath.counters(name)?;
    let spec = &view.spec;
    // `null` for services written by hand.
    let kubernetes = core.service(name).ok().and_then(|config| core.discovery().status(config));
    Ok(json!({
        "name": spec.name,
        "canary_percent": ppm_to_percent(spec.canary_ppm),
        "canary_ppm": spec.canary_ppm,
        "affinity": spec.affinity,
        "max_operator_percent": spec.source.max_operator_percent,
        "frontends": spec.frontends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "stable": spec.stable.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "canary": spec.canary.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "cohorts": spec.source.cohorts,
        "revision": view.revision,
        "kubernetes": kubernetes,
        "sides": {
            "stable": render_side(&counters.stable),
            "canary": render_side(&counters.canary),
        },
    }))
}

fn render_side(c: &SideCounters) -> Value {
    let srtt_avg_us = c.srtt_sum_us.checked_div(c.srtt_samples).map_or(Value::Null, |avg| json!(avg));
    json!({
        "connections_steered": c.connections_steered,
        "datagrams_steered": c.datagrams_steered,
        "health": {
            "established": c.established,
            "failed_attempts": c.failed_attempts,
            "resets": c.resets,
            "retransmission_timeouts": c.rto,
            "srtt_avg_us": srtt_avg_us,
            "srtt_sum_us": c.srtt_sum_us,
            "srtt_samples": c.srtt_samples,
        },
        "fail_open": {
            "backend_missing": c.fail_open_backend_missing,
            "socket_table_full": c.fail_open_socket_table_full,
        },
    })
}
