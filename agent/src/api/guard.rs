//! What every request passes before a handler sees it, in this order, before any body byte is
//! read: the `Host` check (DNS rebinding), the content-type rule for changes (cross-site
//! "simple" requests), and authentication. A refused request is answered at once, counted in
//! `sockshift_api_denied_total{reason}` and written to the audit log (rate-limited).
//!
//! The role a route needs is checked afterwards by its [`super::extract::Authorized`]
//! extractor, from the [`Caller`] this layer put in the request's extensions.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, Method},
    middleware::Next,
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;

use super::{
    error::{ApiError, ErrorCode},
    AppState,
};
use crate::{
    audit::AuditEntry,
    config::{Role, Token, TokenDigest},
    control::Caller,
};

/// The tokens the API accepts, swapped whole when the config is reloaded (revocation needs no
/// restart). `None`: no authentication.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    current: Arc<RwLock<Option<Arc<Vec<Token>>>>>,
}

impl Tokens {
    pub fn new(tokens: Option<Vec<Token>>) -> Self {
        Self { current: Arc::new(RwLock::new(tokens.map(Arc::new))) }
    }

    /// The set in force. The lock is held only to clone an `Arc`.
    pub fn get(&self) -> Option<Arc<Vec<Token>>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the set; answers whether it changed.
    pub fn replace(&self, tokens: Option<Vec<Token>>) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.as_deref() == tokens.as_ref() {
            return false;
        }
        *current = tokens.map(Arc::new);
        true
    }
}

/// The caller a presented `Authorization` header identifies. `Bearer` is matched without
/// regard to case (RFC 9110 §11.1). Every configured token is compared, each in constant time
/// on SHA-256 digests: the time taken says nothing about the secret, its length or which token
/// matched.
pub fn authenticate(tokens: &[Token], headers: &HeaderMap) -> Result<Caller, Denied> {
    let value = headers.get(header::AUTHORIZATION).ok_or(Denied::NoToken)?;
    let value = value.to_str().map_err(|_| Denied::BadToken)?;
    let (scheme, credentials) = value.trim().split_once(' ').ok_or(Denied::NoToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::NoToken);
    }
    let presented = TokenDigest::of(credentials.trim().as_bytes());
    let mut found: Option<&Token> = None;
    for token in tokens {
        if bool::from(token.digest.0.ct_eq(&presented.0)) {
            found = Some(token);
        }
    }
    let token = found.ok_or(Denied::BadToken)?;
    Ok(Caller { name: token.name.clone(), role: token.role })
}

/// Why a request was refused before its handler ran (or by its role check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Denied {
    NoToken,
    BadToken,
    Forbidden,
    MediaType,
    Host,
    ConnectionLimit,
}

impl Denied {
    /// The `reason` label of `sockshift_api_denied_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Denied::NoToken => "no_token",
            Denied::BadToken => "unknown_token",
            Denied::Forbidden => "forbidden",
            Denied::MediaType => "unsupported_media_type",
            Denied::Host => "host_not_allowed",
            Denied::ConnectionLimit => "connection_limit",
        }
    }

    pub const ALL: [Denied; 6] = [
        Denied::NoToken,
        Denied::BadToken,
        Denied::Forbidden,
        Denied::MediaType,
        Denied::Host,
        Denied::ConnectionLimit,
    ];
}

/// Which `Host` headers the API answers: the bind address, localhost/127.0.0.1/[::1] with the
/// API's port, any IP literal with the port when bound to the unspecified address, and the
/// configured extra names. A browser led to the API by DNS rebinding sends the attacker's
/// name, which is none of these. A request without `Host` (HTTP/1.0) is let through: browsers
/// always send one.
#[derive(Debug, Clone)]
pub struct HostRule {
    api: SocketAddr,
    /// `name` (any port: the API's) or `name:port`, lowercase.
    extra: Vec<String>,
}

impl HostRule {
    pub fn new(api: SocketAddr, extra: Vec<String>) -> Self {
        Self { api, extra }
    }

    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let port = self.api.port();
        let (name, given_port) = split_host_port(&host);
        let port_ok = given_port.map_or(port == 80, |p| p == port);
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            let ip_ok = ip == self.api.ip() || ip.is_loopback() || self.api.ip().is_unspecified();
            return ip_ok && port_ok;
        }
        if name == "localhost" {
            return port_ok;
        }
        self.extra.iter().any(|allowed| {
            let (allowed_name, allowed_port) = split_host_port(allowed);
            allowed_name == name && given_port.unwrap_or(80) == allowed_port.unwrap_or(port)
        })
    }
}

/// `host[:port]` or `[v6][:port]` to (host, port).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, port.parse().ok()),
        _ => (host, None),
    }
}

/// Counts of refused requests by reason, for `/metrics`.
#[derive(Debug, Default)]
pub struct DeniedCounts {
    counts: [AtomicU64; 6],
}

impl DeniedCounts {
    pub fn count(&self, denied: Denied) {
        self.counts[denied as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(reason, count)` for every reason.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Denied::ALL.iter().map(|d| (d.reason(), self.counts[*d as usize].load(Ordering::Relaxed))).collect()
    }
}

/// Refusals written to the audit log: at most [`AUDIT_BURST`] per second, so a flood of bad
/// requests cannot turn into a flood of fsyncs or fill the disk (every refusal is counted in
/// `/metrics` regardless). The next entry written says how many were left out before it.
#[derive(Debug)]
pub struct RefusalAudit {
    window: Mutex<(Instant, u32, u64)>,
}

/// Refusals audited per second at most.
pub const AUDIT_BURST: u32 = 10;

impl Default for RefusalAudit {
    fn default() -> Self {
        Self { window: Mutex::new((Instant::now(), 0, 0)) }
    }
}

impl RefusalAudit {
    /// `Some(left out before this one)` when this refusal is to be written.
    fn admit(&self) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, written, skipped) = &mut *window;
        if start.elapsed() >= Duration::from_secs(1) {
            *start = Instant::now();
            *written = 0;
        }
        if *written >= AUDIT_BURST {
            *skipped += 1;
            return None;
        }
        *written += 1;
        Some(std::mem::take(skipped))
    }
}

/// Per-connection facts the accept loop puts in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Set once a request on this connection passed authentication: the connection limit
    /// then closes other connections first (see `server`).
    pub authenticated: Arc<AtomicBool>,
}

/// Whether a method changes state.
fn is_change(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A change must say `Content-Type: application/json`, with or without a body. A browser can
/// send a cross-site POST without asking first only with `text/plain`, a form type or none
/// ("simple requests"); `application/json` needs a CORS preflight, which this API never
/// grants. So a page the operator visits cannot trigger a change, even a bodiless one such as
/// `promote`.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The middleware: host, content type, authentication; then the handler.
pub async fn guard(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    // Probes send whatever Host they were configured with and need no token.
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let conn = request.extensions().get::<ConnInfo>().cloned();
    if let Some(host) = request.headers().get(header::HOST) {
        let allowed = host.to_str().is_ok_and(|h| state.hosts.allows(h));
        if !allowed {
            let shown = String::from_utf8_lossy(host.as_bytes()).chars().take(100).collect::<String>();
            let message = format!(
                "this API does not answer to Host {shown:?}; use the address it listens on, or add the name to \
                 agent.api_hosts"
            );
            return refuse(
                &state,
                &request,
                conn.as_ref(),
                None,
                Denied::Host,
                ApiError::new(ErrorCode::HostNotAllowed, message),
            );
        }
    }
    if is_change(request.method()) && !is_json(request.headers()) {
        let message =
            "a request that changes state must carry `Content-Type: application/json`, with or without a body";
        return refuse(
            &state,
            &request,
            conn.as_ref(),
            None,
            Denied::MediaType,
            ApiError::new(ErrorCode::UnsupportedMediaType, message),
        );
    }
    // The OpenAPI document describes the API, it does not reveal state: readable without a token.
    let open_route = request.uri().path() == "/v1/openapi.json";
    let caller = match state.tokens.get() {
        None => Caller { name: "anonymous".into(), role: Role::Release },
        Some(tokens) => match authenticate(&tokens, request.headers()) {
            Ok(caller) => caller,
            Err(_) if open_route => Caller { name: "anonymous".into(), role: Role::Viewer },
            Err(denied) => {
                let message = match denied {
                    Denied::NoToken => "a bearer token is required (Authorization: Bearer <token>)",
                    _ => "unknown token",
                };
                return refuse(
                    &state,
                    &request,
                    conn.as_ref(),
                    None,
                    denied,
                    ApiError::new(ErrorCode::Unauthorized, message),
                );
            }
        },
    };
    if let Some(conn) = &conn {
        conn.authenticated.store(true, Ordering::Relaxed);
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Answers a refusal: counted, audited (rate-limited), logged at debug.
fn refuse(
    state: &AppState,
    request: &Request,
    conn: Option<&ConnInfo>,
    caller: Option<&Caller>,
    denied: Denied,
    error: ApiError,
) -> Response {
    note_refusal(state, request.method(), request.uri().path(), conn.map(|c| c.peer), caller, denied);
    error.into_response()
}

/// Counts and (rate-limited) audits a refused request.
pub fn note_refusal(
    state: &AppState,
    method: &Method,
    path: &str,
    peer: Option<SocketAddr>,
    caller: Option<&Caller>,
    denied: Denied,
) {
    state.denied.count(denied);
    log::debug!("refused {method} {path} from {peer:?}: {}", denied.reason());
    let Some(left_out) = state.refusal_audit.admit() else { return };
    let mut entry = AuditEntry::now(
        caller.map_or("", |c| c.name.as_str()),
        caller.map(|c| c.role),
        method.as_str(),
        &path.chars().take(256).collect::<String>(),
        serde_json::Value::Null,
        serde_json::Value::Null,
    );
    entry.refused = Some(denied.reason().to_string());
    entry.peer = peer.map(|p| p.to_string());
    if left_out > 0 {
        entry.refusals_left_out = Some(left_out);
    }
    state.control.audit_refusal(entry);
}

/// Refusal counts by reason, for `/metrics`.
pub fn denied_counts(state: &AppState) -> BTreeMap<&'static str, u64> {
    state.denied.snapshot().into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenDigest;

    fn tokens() -> Vec<Token> {
        vec![
            Token { name: "a".into(), digest: TokenDigest::of(b"alpha-secret-0001"), role: Role::Viewer },
            Token { name: "b".into(), digest: TokenDigest::of(b"bravo-secret-0002"), role: Role::Release },
        ]
    }

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn bearer_is_case_insensitive_and_tokens_match_exactly() {
        let tokens = tokens();
        for value in ["Bearer bravo-secret-0002", "bearer bravo-secret-0002", "BEARER  bravo-secret-0002 "] {
            assert_eq!(authenticate(&tokens, &headers(value)).unwrap().name, "b", "{value}");
        }
        assert_eq!(authenticate(&tokens, &headers("Bearer bravo-secret-000")).unwrap_err(), Denied::BadToken);
        assert_eq!(authenticate(&tokens, &headers("Basic bravo-secret-0002")).unwrap_err(), Denied::NoToken);
        assert_eq!(authenticate(&tokens, &HeaderMap::new()).unwrap_err(), Denied::NoToken);
    }

    #[test]
    fn host_rule() {
        let rule = HostRule::new("127.0.0.1:9477".parse().unwrap(), vec!["agent.example".into(), "other:80".into()]);
        for ok in ["127.0.0.1:9477", "localhost:9477", "[::1]:9477", "LOCALHOST:9477", "agent.example:9477", "other"] {
            assert!(rule.allows(ok), "{ok}");
        }
        for bad in ["evil.example:9477", "127.0.0.1:80", "localhost", "10.0.0.1:9477", "agent.example:1", "", "[::1]"] {
            assert!(!rule.allows(bad), "{bad}");
        }
        let any = HostRule::new("0.0.0.0:9477".parse().unwrap(), vec![]);
        assert!(any.allows("10.0.0.1:9477") && !any.allows("node.example:9477"));
    }

    #[test]
    fn refusal_audit_is_rate_limited() {
        let audit = RefusalAudit::default();
        let admitted = (0..100).filter(|_| audit.admit().is_some()).count();
        assert_eq!(admitted, AUDIT_BURST as usize);
    }
}
