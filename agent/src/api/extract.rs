//! Extractors: typed request bodies with path-precise errors, and the caller's role.
//!
//! A body is read in two steps. serde_json parses the bytes into a JSON value (a syntax error,
//! `NaN` or a number out of range is `malformed_json`). The value is then deserialized into the
//! route's type through [`JsonValue`], a deserializer whose error type records which of serde's
//! error constructors fired (unknown field, missing field, invalid type, invalid value), while
//! serde_path_to_error records where: so the answer's `code` and `field` come from the types,
//! not from the wording of serde's messages.

use std::{fmt, marker::PhantomData, sync::Arc};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, FromRequest, FromRequestParts, Request},
    http::request::Parts,
};
use serde::{
    de::{
        self,
        value::{MapDeserializer, SeqDeserializer},
        DeserializeOwned, IntoDeserializer, Unexpected, Visitor,
    },
    forward_to_deserialize_any,
};
use serde_json::Value;

use super::{
    error::{ApiError, ErrorCode},
    guard::{note_refusal, ConnInfo, Denied},
    AppState, BODY_TIMEOUT, MAX_BODY_BYTES,
};
use crate::{config::Role, control::Caller};

/// A JSON request body deserialized into `T`; anything else is answered with an [`ApiError`].
pub struct ApiJson<T>(pub T);

/// The body of a route that takes no input: nothing, or `{}`.
pub struct NoBody;

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        Ok(ApiJson(parse_body(&bytes)?))
    }
}

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoBody);
        }
        // Refuse what it may have misunderstood rather than act on it.
        parse_body::<super::types::NoFields>(&bytes).map(|_| NoBody)
    }
}

/// Reads the body, at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`]: a client that trickles
/// its body is cut off rather than holding a connection and its buffer.
async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let read = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state)).await.map_err(|_| {
        ApiError::new(ErrorCode::BodyTimeout, format!("the request body did not arrive within {BODY_TIMEOUT:?}"))
    })?;
    read.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(inner) if inner.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::BodyTooLarge, format!("request body over the limit of {MAX_BODY_BYTES} bytes"))
        }
        other => ApiError::new(ErrorCode::MalformedJson, format!("reading the request body: {}", other.body_text())),
    })
}

/// Parses a body into `T` (see the module docs).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(ErrorCode::MalformedJson, "the request body is empty; a JSON object is expected"));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| ApiError::new(ErrorCode::MalformedJson, format!("request body is not valid JSON: {err}")))?;
    serde_path_to_error::deserialize(JsonValue(value)).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let field = match (&inner.kind, path.as_str()) {
            (BodyErrorKind::MissingField(name), "." | "") => name.to_string(),
            (BodyErrorKind::MissingField(name), path) => format!("{path}.{name}"),
            (_, ".") => String::new(),
            (_, path) => path.to_string(),
        };
        let code = match inner.kind {
            BodyErrorKind::UnknownField => ErrorCode::UnknownField,
            BodyErrorKind::MissingField(_) => ErrorCode::MissingField,
            BodyErrorKind::InvalidType => ErrorCode::InvalidType,
            BodyErrorKind::InvalidValue => ErrorCode::InvalidField,
        };
        let message = if field.is_empty() {
            format!("request body: {}", inner.message)
        } else {
            format!("`{field}`: {}", inner.message)
        };
        ApiError::field(code, field, message)
    })
}

/// Which of serde's error constructors made a [`BodyError`].
#[derive(Debug)]
enum BodyErrorKind {
    UnknownField,
    MissingField(&'static str),
    InvalidType,
    InvalidValue,
}

/// The error type of [`JsonValue`].
#[derive(Debug)]
pub struct BodyError {
    kind: BodyErrorKind,
    message: String,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BodyError {}

impl de::Error for BodyError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self { kind: BodyErrorKind::InvalidValue, message: msg.to_string() }
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self { kind: BodyErrorKind::InvalidType, message: format!("invalid type: {unexp}, expected {exp}") }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let message = if expected.is_empty() {
            format!("unknown field `{field}`: this takes no fields")
        } else {
            format!("unknown field `{field}`, expected one of: {}", expected.join(", "))
        };
        Self { kind: BodyErrorKind::UnknownField, message }
    }

    fn missing_field(field: &'static str) -> Self {
        Self { kind: BodyErrorKind::MissingField(field), message: format!("missing field `{field}`") }
    }
}

/// A parsed JSON value as a serde deserializer with [`BodyError`] errors. Structs must be JSON
/// objects (serde would otherwise also take an array of their fields in order).
struct JsonValue(Value);

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl<'de> IntoDeserializer<'de, BodyError> for JsonValue {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> de::Deserializer<'de> for JsonValue {
    type Error = BodyError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BodyError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, Some(f)) => visitor.visit_f64(f),
                _ => Err(de::Error::custom(format!("number {n} cannot be represented"))),
            },
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(JsonValue));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(map) => {
                let mut map = MapDeserializer::new(map.into_iter().map(|(k, v)| (k, JsonValue(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BodyError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(JsonValue(other)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, BodyError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            other => Err(de::Error::invalid_type(unexpected(&other), &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, BodyError> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(&other), &"a JSON object")),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, BodyError> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// The caller, authorized for role `R` (see [`RoleNeeded`]): 401 without a valid token, 403 with
/// a token whose role is too low. Without `[agent.auth]` everyone is `release`.
pub struct Authorized<R>(pub Caller, pub PhantomData<R>);

/// A role a route needs, as a type.
pub trait RoleNeeded {
    const ROLE: Role;
}

pub struct Viewer;
pub struct Operator;
pub struct Release;

impl RoleNeeded for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl RoleNeeded for Operator {
    const ROLE: Role = Role::Operator;
}
impl RoleNeeded for Release {
    const ROLE: Role = Role::Release;
}

impl<R: RoleNeeded> FromRequestParts<Arc<AppState>> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        authorize(state, parts, R::ROLE).map(|caller| Authorized(caller, PhantomData))
    }
}

/// The caller the guard authenticated (see [`super::guard`]), checked against the role the
/// route needs. Runs before any body extractor, so a refused caller's body is never read.
fn authorize(state: &AppState, parts: &Parts, needed: Role) -> Result<Caller, ApiError> {
    let Some(caller) = parts.extensions.get::<Caller>().cloned() else {
        // Every route is behind the guard; a request that skipped it is refused, not trusted.
        return Err(ApiError::new(ErrorCode::Unauthorized, "a bearer token is required"));
    };
    if caller.role < needed {
        let peer = parts.extensions.get::<ConnInfo>().map(|c| c.peer);
        note_refusal(state, &parts.method, parts.uri.path(), peer, Some(&caller), Denied::Forbidden);
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("token {:?} has role {}, this needs {needed}", caller.name, caller.role),
        ));
    }
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::types::CanaryUpdate, rollout::Plan};

    fn error_of<T: DeserializeOwned + fmt::Debug>(body: &str) -> (ErrorCode, Option<String>) {
        let err = parse_body::<T>(body.as_bytes()).unwrap_err().0;
        (err.code, err.field)
    }

    #[test]
    fn errors_say_what_and_where_from_the_types() {
        use ErrorCode::*;
        let some = |s: &str| Some(s.to_string());
        assert_eq!(error_of::<CanaryUpdate>(r#"{"percent": "5"}"#), (InvalidType, some("percent")));
        assert_eq!(error_of::<CanaryUpdate>(r#"{"percent": null}"#), (InvalidType, some("percent")));
        assert_eq!(error_of::<CanaryUpdate>(r#"{}"#), (MissingField, some("percent")));
        assert_eq!(error_of::<CanaryUpdate>(r#"{"percent": 5, "x": 1}"#), (UnknownField, some("x")));
        assert_eq!(error_of::<CanaryUpdate>(r#"[5]"#), (InvalidType, some("")));
        assert_eq!(error_of::<CanaryUpdate>(r#"{"percent": NaN}"#).0, MalformedJson);
        assert_eq!(error_of::<CanaryUpdate>(r#"{"percent": 1e400}"#).0, MalformedJson);
        assert_eq!(error_of::<CanaryUpdate>("").0, MalformedJson);
        let plan = r#"{"steps": [10], "step_seconds": 1, "gates": {"max_error_budget": 1}}"#;
        assert_eq!(error_of::<Plan>(plan), (UnknownField, some("gates.max_error_budget")));
        let plan = r#"{"steps": [10], "step_seconds": 1, "approval": {"at_percent": 5, "role": "boss"}}"#;
        assert_eq!(error_of::<Plan>(plan), (InvalidField, some("approval.role")));
        assert_eq!(
            error_of::<Plan>(r#"{"steps": [10], "step_seconds": 1, "approval": {"role": "release"}}"#),
            (MissingField, some("approval.at_percent"))
        );
        assert_eq!(error_of::<Plan>(r#"{"steps": [10, "x"], "step_seconds": 1}"#), (InvalidType, some("steps[1]")));
        let ok: CanaryUpdate = parse_body(br#"{"percent": 5}"#).unwrap();
        assert_eq!(ok.percent, 5.0);
    }
}
