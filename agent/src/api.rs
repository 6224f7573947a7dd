//! The local control API (JSON over HTTP). Every handler validates fully before it touches the
//! datapath, so a refused request changes nothing.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use agent_common::{ppm_to_percent, SideCounters};
use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use serde_json::{json, Map, Value};

use crate::{
    config::{validate_percent, validate_service, ServiceConfig},
    datapath::{Datapath, DatapathError, ServiceCounters, ServiceView},
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub datapath: Mutex<Datapath>,
    /// cgroup v2 root, for cohort cgroups given as relative paths.
    pub cgroup_root: Option<PathBuf>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service).put(put_service).delete(delete_service))
        .route("/v1/services/{name}/canary", put(put_canary))
        .route("/v1/services/{name}/rollback", post(rollback))
        .route("/v1/services/{name}/promote", post(promote))
        .route("/v1/datapath", get(datapath_status))
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
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(field) = self.field {
            body["field"] = Value::String(field);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<DatapathError> for ApiError {
    fn from(err: DatapathError) -> Self {
        match err {
            DatapathError::UnknownService(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "service_not_found",
                format!("no service named {name:?}"),
            ),
            other => {
                log::error!("datapath update failed: {other}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "datapath_error", other.to_string())
            }
        }
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

async fn list_services(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let datapath = state.datapath.lock().expect("datapath lock");
    let mut services = Vec::new();
    for name in datapath.service_names() {
        services.push(service_state(&datapath, &name)?);
    }
    Ok(Json(json!({ "services": services })))
}

async fn get_service(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let datapath = state.datapath.lock().expect("datapath lock");
    Ok(Json(service_state(&datapath, &name)?))
}

async fn put_canary(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
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
    let ppm = validate_percent(percent, "percent")
        .map_err(|err| ApiError::invalid("out_of_range", "percent", format!("`percent` {}", err.message)))?;
    set_weight(&state, &name, ppm)
}

/// Creates or replaces a service; the body has the fields of a `[[service]]` table (`name` may be
/// left out; if given it must match the path). 201 when created, 200 when replaced.
async fn put_service(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let config: ServiceConfig = serde_path_to_error::deserialize(Value::Object(body)).map_err(|err| {
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
    })?;
    let spec = validate_service(&config, "", state.cgroup_root.as_deref())
        .map_err(|err| ApiError::invalid("invalid_field", &err.field, err.to_string()))?;

    let mut datapath = state.datapath.lock().expect("datapath lock");
    for frontend in &spec.frontends {
        if let Some(owner) = datapath.frontend_owner(frontend).filter(|owner| *owner != name) {
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                code: "frontend_in_use",
                message: format!("frontend {frontend} already belongs to service {owner:?}"),
                field: Some("frontends".into()),
            });
        }
    }
    let created = datapath.service(&name).is_none();
    datapath.replace_service(spec)?;
    log::info!("service {name}: {}", if created { "added" } else { "replaced" });
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(service_state(&datapath, &name)?)))
}

async fn delete_service(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut datapath = state.datapath.lock().expect("datapath lock");
    let before = service_state(&datapath, &name)?;
    datapath.remove_service(&name)?;
    log::info!("service {name}: removed");
    Ok(Json(before))
}

/// Kill switch: canary to 0 in one map update per frontend.
async fn rollback(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_weight(&state, &name, 0)
}

async fn promote(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_weight(&state, &name, agent_common::PPM_MAX)
}

fn set_weight(state: &AppState, name: &str, ppm: u32) -> Result<Json<Value>, ApiError> {
    let mut datapath = state.datapath.lock().expect("datapath lock");
    datapath.set_weight(name, ppm)?;
    log::info!("service {name}: canary weight set to {} %", ppm_to_percent(ppm));
    Ok(Json(service_state(&datapath, name)?))
}

/// Datapath-wide figures: services and the socket table's use.
async fn datapath_status(State(state): State<Arc<AppState>>) -> Json<Value> {
    let datapath = state.datapath.lock().expect("datapath lock");
    Json(json!({
        "services": datapath.service_names().len(),
        "open_steered_sockets": datapath.open_steered_sockets(),
        "steered_socket_capacity": agent_common::MAX_STEERED_SOCKETS,
    }))
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
            format!("unknown field `{field}`; expected one of: {}", known.join(", ")),
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
pub fn service_state(datapath: &Datapath, name: &str) -> Result<Value, ApiError> {
    let view = datapath
        .service(name)
        .ok_or_else(|| DatapathError::UnknownService(name.to_string()))?;
    let counters = datapath.counters(name)?;
    Ok(render_service(&view, &counters))
}

fn render_service(view: &ServiceView, counters: &ServiceCounters) -> Value {
    let spec = &view.spec;
    json!({
        "name": spec.name,
        "canary_percent": ppm_to_percent(spec.canary_ppm),
        "canary_ppm": spec.canary_ppm,
        "affinity": spec.affinity,
        "frontends": spec.frontends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "stable": spec.stable.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "canary": spec.canary.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "cohorts": spec.source.cohorts,
        "revision": view.revision,
        "sides": {
            "stable": render_side(&counters.stable),
            "canary": render_side(&counters.canary),
        },
    })
}

fn render_side(c: &SideCounters) -> Value {
    let srtt_avg_us = if c.srtt_samples == 0 { Value::Null } else { json!(c.srtt_sum_us / c.srtt_samples) };
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
