//! API errors: a stable machine-readable code, a status that follows from it, a message for
//! people and the field it is about.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoResponses, ToSchema};

use crate::{
    control::{
        store::{StoreError, Value},
        ControlError,
    },
    datapath::DatapathError,
};

/// Every error code the API answers with. The HTTP status follows from the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON (includes `NaN` and numbers out of range), or is empty.
    MalformedJson,
    /// 400: a value (or the body) has the wrong JSON type.
    InvalidType,
    /// 400: a required field is missing.
    MissingField,
    /// 400: a field this route does not know.
    UnknownField,
    /// 400: a value is not valid; `field` names it.
    InvalidField,
    /// 400: a number outside its range.
    OutOfRange,
    /// 413: the body is over 64 KiB.
    BodyTooLarge,
    /// 408: the body did not arrive within 10 s.
    BodyTimeout,
    /// 415: a request that changes state without `Content-Type: application/json`.
    UnsupportedMediaType,
    /// 421: the `Host` header names neither the API's address nor one of `agent.api_hosts`.
    HostNotAllowed,
    /// 401: no valid bearer token.
    Unauthorized,
    /// 403: the token's role does not allow this.
    Forbidden,
    /// 404
    ServiceNotFound,
    /// 404
    RolloutNotFound,
    /// 404: no such route.
    NotFound,
    /// 404: a cluster-mode route on an agent without `[cluster]`.
    ClusterDisabled,
    /// 405
    MethodNotAllowed,
    /// 409: another service has this frontend.
    FrontendInUse,
    /// 409: a rollout drives the weight.
    RolloutActive,
    /// 409: the rollout is not in a state that allows this.
    RolloutState,
    /// 409: the state was changed concurrently; read it and try again.
    Conflict,
    /// 500: the change could not be persisted; nothing changed.
    StateNotSaved,
    /// 500: the datapath refused the change; nothing changed.
    DatapathRefused,
    /// 500
    InternalError,
    /// 503: the control core did not answer in time, or has stopped.
    CoreUnavailable,
    /// 503: cluster mode, etcd cannot be reached: nothing changed; the node keeps steering with
    /// the state it last applied.
    ClusterUnavailable,
    /// 504: cluster mode, `?wait=cluster`: the change is committed, but not every live node
    /// applied it in time; the message names them.
    ClusterTimeout,
    /// 429: as many clients as allowed already follow the datapath's log.
    TooManyFollowers,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            MalformedJson | InvalidType | MissingField | UnknownField | InvalidField | OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HostNotAllowed => StatusCode::MISDIRECTED_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden => StatusCode::FORBIDDEN,
            ServiceNotFound | RolloutNotFound | NotFound | ClusterDisabled => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            FrontendInUse | RolloutActive | RolloutState | Conflict => StatusCode::CONFLICT,
            StateNotSaved | DatapathRefused | InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            CoreUnavailable | ClusterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ClusterTimeout => StatusCode::GATEWAY_TIMEOUT,
            TooManyFollowers => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The field the error is about (`percent`, `gates.max_srtt_ratio`, `frontends[1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorBody { code, message: message.into(), field: None })
    }

    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(ErrorBody { code, message: message.into(), field: Some(field.into()) })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.0.code.status();
        let mut response = (status, Json(self.0)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ControlError> for ApiError {
    fn from(err: ControlError) -> Self {
        let message = err.to_string();
        match err {
            ControlError::Invalid(invalid) => ApiError::field(ErrorCode::InvalidField, invalid.field, message),
            ControlError::UnknownService(_) | ControlError::Datapath(DatapathError::UnknownService(_)) => {
                ApiError::new(ErrorCode::ServiceNotFound, message)
            }
            ControlError::FrontendInUse { .. } => ApiError::field(ErrorCode::FrontendInUse, "frontends", message),
            ControlError::RolloutActive(_) => ApiError::new(ErrorCode::RolloutActive, message),
            ControlError::NoRollout(_) => ApiError::new(ErrorCode::RolloutNotFound, message),
            ControlError::RolloutState { .. } => ApiError::new(ErrorCode::RolloutState, message),
            ControlError::Forbidden(_) => ApiError::new(ErrorCode::Forbidden, message),
            ControlError::Delegation(invalid) => ApiError::field(ErrorCode::Forbidden, invalid.field, message),
            ControlError::Store(StoreError::Conflict { current, .. }) => {
                // The node has adopted the current values: a read now shows them too.
                let now: Vec<String> = current
                    .iter()
                    .filter_map(|c| match &c.value {
                        Some(Value::Service(Some(service))) => serde_json::to_string(service).ok(),
                        Some(Value::Service(None)) => Some(format!("{} is absent", c.key)),
                        _ => None,
                    })
                    .collect();
                if now.is_empty() {
                    ApiError::new(ErrorCode::Conflict, message)
                } else {
                    ApiError::new(ErrorCode::Conflict, format!("{message}; it is now {}", now.join("; ")))
                }
            }
            ControlError::Store(StoreError::Unavailable(_)) => ApiError::new(ErrorCode::ClusterUnavailable, message),
            ControlError::Store(err) => {
                log::error!("change refused: {err}");
                ApiError::new(ErrorCode::StateNotSaved, format!("the change was not made: {err}"))
            }
            ControlError::Datapath(err) => {
                log::error!("change refused by the datapath: {err}");
                ApiError::new(ErrorCode::DatapathRefused, message)
            }
            ControlError::NotAppliedHere { .. } => ApiError::new(ErrorCode::DatapathRefused, message),
            ControlError::CoreStuck(_) | ControlError::CoreDead => ApiError::new(ErrorCode::CoreUnavailable, message),
        }
    }
}

// Response sets for the OpenAPI document, by what can go wrong on a route.

/// `?wait=cluster` ran out of time.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ClusterWaitError {
    /// `cluster_timeout`: the change is committed, but not every live node applied it in time;
    /// the message names them.
    #[response(status = 504)]
    Timeout(ErrorBody),
}

/// A token is required (when `[agent.auth]` is set) and its role must be high enough; the
/// `Host` header must name the API.
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only
pub enum AuthErrors {
    /// `Host` names neither the API's address nor one of `agent.api_hosts` (`host_not_allowed`).
    #[response(status = 421)]
    Misdirected(ErrorBody),
    /// No valid bearer token (`unauthorized`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's role is too low (`forbidden`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// The body could not be used.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum BodyErrors {
    /// `body_timeout`: the body did not arrive within 10 s.
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// `unsupported_media_type`: a change without `Content-Type: application/json`.
    #[response(status = 415)]
    MediaType(ErrorBody),
    /// `malformed_json`, `invalid_type`, `missing_field`, `unknown_field`, `invalid_field`,
    /// `out_of_range`; `field` names the field.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `body_too_large`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
}

/// The service does not exist.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum NotFoundError {
    /// `service_not_found` (or `rollout_not_found` on rollout routes, `not_found` for an unknown
    /// rollout action).
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// The change does not fit the current state.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ConflictError {
    /// `frontend_in_use`, `rollout_active`, `rollout_state`, `conflict`: nothing changed.
    #[response(status = 409)]
    Conflict(ErrorBody),
}

/// The agent could not do it.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ServerErrors {
    /// `state_not_saved` (the change could not be persisted), `datapath_refused`,
    /// `internal_error`: nothing changed.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `core_unavailable` (the control core is stuck or has stopped), `cluster_unavailable`
    /// (cluster mode: etcd cannot be reached; nothing changed).
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
