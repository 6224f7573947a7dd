//! The API's client, for the CLI and the tests: ureq underneath, typed bodies on top.

use std::{net::SocketAddr, time::Duration};

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use ureq::http;

use crate::api::error::ErrorBody;

/// Largest response body read (a full audit log is well under this).
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the sockshift API at {addr}: {source} (is `sockshift agent` running? set --api)")]
    Connect { addr: SocketAddr, source: ureq::Error },
    #[error("talking to the sockshift API at {addr}: {source}")]
    Transport { addr: SocketAddr, source: ureq::Error },
    #[error("the sockshift API at {addr} sent a response this client does not understand: {source}")]
    Malformed { addr: SocketAddr, source: serde_json::Error },
    /// The API answered with an error; `message` is its own.
    #[error("{} (HTTP {status}, {code})", body.message, code = serde_json::to_value(body.code).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())]
    Api { status: u16, body: ErrorBody },
    #[error("the sockshift API at {addr} answered HTTP {status}: {text}")]
    Unexpected { addr: SocketAddr, status: u16, text: String },
}

impl ClientError {
    /// The API's error code, when the API answered with one.
    pub fn code(&self) -> Option<crate::api::error::ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

/// A response: status and parsed JSON body (Null when empty, a string when not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

/// A client of one agent's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: Option<String>,
    agent: ureq::Agent,
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Self { addr, token, agent }
    }

    /// One request with a raw body: the status and the body parsed as JSON when it is JSON.
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let addr = self.addr;
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(body.unwrap_or_default().to_vec())
            .map_err(|err| ClientError::Transport { addr, source: ureq::Error::from(err) })?;
        let mut response = self.agent.run(request).map_err(|source| match source {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::Connect { addr, source }
            }
            source => ClientError::Transport { addr, source },
        })?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|source| ClientError::Transport { addr, source })?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Response { status, body })
    }

    /// Follows a GET answered with server-sent events (`/v1/datapath/log`), giving `each` every
    /// event (its name, `message` when unnamed, and its data) until the agent ends the stream or
    /// `each` returns false. No overall timeout: the stream is meant to stay open.
    pub fn follow_events(&self, path: &str, mut each: impl FnMut(&str, &str) -> bool) -> Result<(), ClientError> {
        use std::io::BufRead;
        let addr = self.addr;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        let mut request = agent.get(format!("http://{addr}{path}"));
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut response = request.call().map_err(|source| match source {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::Connect { addr, source }
            }
            source => ClientError::Transport { addr, source },
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => ClientError::Api { status, body },
                Err(_) => ClientError::Unexpected { addr, status, text },
            });
        }
        let reader = std::io::BufReader::new(response.body_mut().as_reader());
        let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
        for line in reader.lines() {
            let line = line.map_err(|err| ClientError::Transport { addr, source: ureq::Error::Io(err) })?;
            // The event stream format: `field: value` lines, `:` comments, a blank line ends an
            // event; several `data` lines join with newlines.
            if line.is_empty() {
                if let Some(data) = data.take() {
                    if !each(name.as_deref().unwrap_or("message"), &data) {
                        break;
                    }
                }
                name = None;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => match &mut data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                "event" => name = Some(value.to_string()),
                _ => {} // comments (keep-alives), ids, retry
            }
        }
        Ok(())
    }

    /// One request with a JSON body (or none).
    pub fn request(&self, method: &str, path: &str, body: Option<&impl Serialize>) -> Result<Response, ClientError> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|source| ClientError::Malformed { addr: self.addr, source })?;
        self.raw(method, path, bytes.as_deref())
    }

    /// A request whose success answer is a `T`; an error answer is [`ClientError::Api`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let addr = self.addr;
        let response = self.request(method, path, body)?;
        if (200..300).contains(&response.status) {
            return serde_json::from_value(response.body).map_err(|source| ClientError::Malformed { addr, source });
        }
        match serde_json::from_value::<ErrorBody>(response.body.clone()) {
            Ok(body) => Err(ClientError::Api { status: response.status, body }),
            Err(_) => Err(ClientError::Unexpected { addr, status: response.status, text: response.body.to_string() }),
        }
    }
}

/// One request with an untyped body (the test harness and benchmark use this).
pub fn request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response, ClientError> {
    ApiClient::new(addr, token.map(String::from)).request(method, path, body)
}
