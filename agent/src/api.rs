//! The local control API (JSON over HTTP). Every handler validates fully before it touches the
//! datapath, so a refused request changes nothing.

use std::sync::{Arc, Mutex};

use agent_common::{ppm_to_percent, SideCounters};
use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, put},
    Json, Router,
};
use serde_json::{json, Map, Value};

use crate::{
    config::validate_percent,
    datapath::{Datapath, DatapathError, ServiceCounters, ServiceView},
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub datapath: Mutex<Datapath>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service))
        .route("/v1/services/{name}/canary", put(put_canary))
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
    let mut datapath = state.datapath.lock().expect("datapath lock");
    datapath.set_weight(&name, ppm)?;
    log::info!("service {name}: canary weight set to {} %", ppm_to_percent(ppm));
    Ok(Json(service_state(&datapath, &name)?))
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
