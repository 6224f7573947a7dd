//! Webhook delivery, shared by rollout notifications and webhook checks, hardened so that a plan
//! cannot turn the node's network position against it (security review F3):
//!
//! - only `host:port` pairs listed in the config file's `agent.webhook_allow` (never settable
//!   through the API) are called; an empty list allows none;
//! - link-local (169.254.0.0/16, fe80::/10) and cloud metadata addresses are always refused, as
//!   written in the URL and again after DNS resolution, just before connecting;
//! - URLs are parsed strictly ([`HttpUrl::parse`]): no control characters, spaces, credentials;
//! - the host name goes in `Host`; one connection per delivery (no pool to reuse);
//! - at most [`MAX_WEBHOOKS_PER_PLAN`] URLs a plan, [`MAX_RESPONSE_BYTES`] of an answer read, one
//!   total deadline per delivery (waiting for a slot included), [`MAX_CONCURRENT_DELIVERIES`] at a
//!   time.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::{
    config::InvalidField,
    gates::checks::{CheckResult, WebhookCheck},
    outbound::{self, excerpt, ExchangeError, HttpUrl, UrlError},
};

/// Notification URLs and check URLs of one plan, together.
pub const MAX_WEBHOOKS_PER_PLAN: usize = 8;
/// Bytes of an answer read; the rest is never received.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024;
/// Total time of one notification (slot wait, DNS, connect, send, answer).
pub const NOTIFY_DEADLINE: Duration = Duration::from_secs(10);
/// Deliveries in flight at once, across all plans.
pub const MAX_CONCURRENT_DELIVERIES: usize = 16;
/// Characters of an answer kept in a check's detail.
const DETAIL_CHARS: usize = 200;

/// `agent.webhook_allow`: the `host:port` pairs webhooks may go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<(String, u16)>,
}

impl AllowList {
    /// Validates the config list; errors name the entry (`agent.webhook_allow[1]`).
    pub fn from_config(entries: &[String]) -> Result<Self, InvalidField> {
        let mut allowed = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let field = format!("agent.webhook_allow[{i}]");
            let bad = |message: String| InvalidField::new(&field, format!("{entry:?} {message}"));
            let authority: http::uri::Authority =
                entry.parse().map_err(|_| bad("is not host:port (IPv6 as [addr]:port)".to_string()))?;
            if authority.port_u16().is_none() || entry.contains('/') {
                return Err(bad("is not host:port: give the port (e.g. hooks.example.svc:80)".to_string()));
            }
            let url = HttpUrl::parse(&format!("http://{entry}/")).map_err(|err| bad(err.to_string()))?;
            if let Some(why) = url.ip().and_then(refusal) {
                return Err(bad(format!("is {why}, which webhooks may never reach")));
            }
            if let Some(why) = name_refusal(&url.host) {
                return Err(bad(format!("is {why}, which webhooks may never reach")));
            }
            allowed.push((url.host, url.port));
        }
        Ok(Self { entries: allowed })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `url`'s host and port are listed. IP addresses compare as addresses (`[::1]`
    /// matches `[0::1]`), names as lowercase text.
    pub fn allows(&self, url: &HttpUrl) -> bool {
        let ip = url.ip();
        self.entries.iter().any(|(host, port)| {
            *port == url.port
                && match (ip, host.parse::<IpAddr>().ok()) {
                    (Some(a), Some(b)) => a == b,
                    _ => *host == url.host,
                }
        })
    }
}

/// Why webhooks may never reach `ip`, if they may not: link-local, cloud metadata, and addresses
/// that are not one host. IPv4 inside IPv6 (mapped, compatible, NAT64) is judged as IPv4.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                Some("a link-local address (169.254.0.0/16, where cloud metadata services answer)")
            } else if METADATA_V4.contains(&v4) {
                Some("a cloud metadata address")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                Some("not a single host's address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unicast_link_local() {
                Some("a link-local address (fe80::/10)")
            } else if METADATA_V6.contains(&v6) {
                Some("a cloud metadata address")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("not a single host's address")
            } else {
                None
            }
        }
    }
}

/// Metadata services outside 169.254.0.0/16: Alibaba Cloud, Oracle Cloud (legacy), Azure's
/// WireServer.
const METADATA_V4: [Ipv4Addr; 3] =
    [Ipv4Addr::new(100, 100, 100, 200), Ipv4Addr::new(192, 0, 0, 192), Ipv4Addr::new(168, 63, 129, 16)];
/// AWS's IPv6 instance metadata endpoint.
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254)];

/// Metadata host names, refused before any DNS lookup (they also resolve to refused addresses).
fn name_refusal(host: &str) -> Option<&'static str> {
    matches!(host, "metadata" | "metadata.google.internal" | "instance-data" | "instance-data.ec2.internal")
        .then_some("a cloud metadata host name")
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = v6.segments();
    let tail = Ipv4Addr::new((segments[6] >> 8) as u8, segments[6] as u8, (segments[7] >> 8) as u8, segments[7] as u8);
    // NAT64 well-known prefix 64:ff9b::/96, and the deprecated IPv4-compatible ::a.b.c.d.
    let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let compatible = segments[..6] == [0; 6] && !matches!(segments[6..], [0, 0] | [0, 1]);
    (nat64 || compatible).then_some(tail)
}

/// Why a delivery did not happen or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {url:?} {source}")]
    Url { url: String, source: UrlError },
    #[error("{authority} is not in agent.webhook_allow (the agent's config file lists the host:port pairs webhooks may reach)")]
    NotAllowed { authority: String },
    #[error("{host} is {why}, which webhooks may never reach")]
    RefusedName { host: String, why: &'static str },
    #[error("{host} resolves to {ip}, {why}, which webhooks may never reach")]
    RefusedAddress { host: String, ip: IpAddr, why: &'static str },
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered HTTP {status}: {excerpt:?}")]
    Status { status: u16, excerpt: String },
}

/// Checks a URL against the syntax rules and the always-refused addresses and names: what a
/// plan must pass whatever the allow list says (a stored plan is checked with this alone).
pub fn check_url_syntax(url: &str) -> Result<HttpUrl, WebhookError> {
    let parsed = HttpUrl::parse(url).map_err(|source| WebhookError::Url {
        // Shown escaped ({url:?}) and shortened: the error goes to logs and history.
        url: url.chars().take(200).collect(),
        source,
    })?;
    if let Some(ip) = parsed.ip() {
        if let Some(why) = refusal(ip) {
            return Err(WebhookError::RefusedAddress { host: parsed.host.clone(), ip, why });
        }
    }
    if let Some(why) = name_refusal(&parsed.host) {
        return Err(WebhookError::RefusedName { host: parsed.host, why });
    }
    Ok(parsed)
}

/// [`check_url_syntax`] and the allow list: what a plan's start calls, and what every delivery
/// calls again (the list may have changed since).
pub fn check_url(url: &str, allow: &AllowList) -> Result<HttpUrl, WebhookError> {
    let parsed = check_url_syntax(url)?;
    if !allow.allows(&parsed) {
        return Err(WebhookError::NotAllowed { authority: parsed.authority });
    }
    Ok(parsed)
}

/// A plan's notification URLs (`webhooks`) and checks (`gates.webhooks`): at most
/// [`MAX_WEBHOOKS_PER_PLAN`] together, each URL valid and, with `allow`, allowed; errors name the
/// field. Without `allow` (a plan read back from the store) the allow list is left to delivery.
pub fn validate_plan_webhooks(
    notify: &[String],
    checks: &[WebhookCheck],
    allow: Option<&AllowList>,
) -> Result<(), InvalidField> {
    crate::gates::checks::validate_webhook_checks(checks, "gates.webhooks")?;
    let total = notify.len() + checks.len();
    if total > MAX_WEBHOOKS_PER_PLAN {
        let field = if notify.len() > MAX_WEBHOOKS_PER_PLAN { "webhooks" } else { "gates.webhooks" };
        return Err(InvalidField::new(
            field,
            format!("{total} webhooks (notifications and checks together), at most {MAX_WEBHOOKS_PER_PLAN} a plan"),
        ));
    }
    let check = |url: &str| match allow {
        Some(allow) => check_url(url, allow),
        None => check_url_syntax(url),
    };
    for (i, url) in notify.iter().enumerate() {
        check(url).map_err(|err| InvalidField::new(format!("webhooks[{i}]"), err.to_string()))?;
    }
    for (i, one) in checks.iter().enumerate() {
        check(&one.url).map_err(|err| InvalidField::new(format!("gates.webhooks[{i}].url"), err.to_string()))?;
    }
    Ok(())
}

/// An answer to a delivery.
#[derive(Debug)]
pub struct Delivered {
    pub status: u16,
    /// At most [`MAX_RESPONSE_BYTES`] of the body.
    pub body: Bytes,
    pub truncated: bool,
}

/// The agent's webhook sender: the allow list and the concurrency slots. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced on config reload; read (and cloned) before any I/O, never held across it.
    allow: RwLock<AllowList>,
    slots: Semaphore,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").field("allow", &self.allow_list()).finish_non_exhaustive()
    }
}

impl Webhooks {
    pub fn new(allow: AllowList) -> Self {
        Self { inner: Arc::new(Inner { allow: RwLock::new(allow), slots: Semaphore::new(MAX_CONCURRENT_DELIVERIES) }) }
    }

    /// The list from a reloaded config: later deliveries (also of running plans) follow it.
    pub fn set_allow_list(&self, allow: AllowList) {
        *self.inner.allow.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = allow;
    }

    pub fn allow_list(&self) -> AllowList {
        self.inner.allow.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Sends a rollout notification (JSON POST). Any 2xx is success.
    pub async fn notify(&self, url: &str, payload: &Value) -> Result<(), WebhookError> {
        let delivered = self.post(url, payload, NOTIFY_DEADLINE).await?;
        if !(200..300).contains(&delivered.status) {
            return Err(WebhookError::Status {
                status: delivered.status,
                excerpt: excerpt(&delivered.body, DETAIL_CHARS),
            });
        }
        Ok(())
    }

    /// Calls a webhook check with the rollout's state (JSON POST): passes on 2xx only.
    pub async fn check(&self, check: &WebhookCheck, payload: &Value) -> CheckResult {
        let started = Instant::now();
        // Validated at plan start; a value from elsewhere (persisted state) still cannot panic.
        let seconds = if check.timeout_seconds.is_finite() {
            check.timeout_seconds.clamp(1.0, crate::gates::checks::MAX_CHECK_TIMEOUT_SECONDS)
        } else {
            crate::gates::checks::DEFAULT_CHECK_TIMEOUT_SECONDS
        };
        let deadline = Duration::from_secs_f64(seconds);
        let result = self.post(&check.url, payload, deadline).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (passed, status, detail) = match result {
            Ok(delivered) if (200..300).contains(&delivered.status) => {
                (true, Some(delivered.status), excerpt(&delivered.body, DETAIL_CHARS))
            }
            Ok(delivered) => (
                false,
                Some(delivered.status),
                WebhookError::Status { status: delivered.status, excerpt: excerpt(&delivered.body, DETAIL_CHARS) }
                    .to_string(),
            ),
            Err(err) => (false, None, err.to_string()),
        };
        CheckResult { name: check.name.clone(), passed, status, detail, elapsed_ms }
    }

    /// Calls every check at once with the same state; results in plan order. Takes as long as
    /// the slowest check (each bounded by its own `timeout_seconds`).
    pub async fn check_all(&self, checks: &[WebhookCheck], payload: &Value) -> Vec<CheckResult> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, check) in checks.iter().enumerate() {
            let (webhooks, check, payload) = (self.clone(), check.clone(), payload.clone());
            tasks.spawn(async move { (i, webhooks.check(&check, &payload).await) });
        }
        let mut results: Vec<Option<CheckResult>> = vec![None; checks.len()];
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, result)) = done {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .zip(checks)
            .map(|(result, check)| {
                result.unwrap_or_else(|| CheckResult {
                    name: check.name.clone(),
                    passed: false,
                    status: None,
                    detail: "the check's task failed".to_string(),
                    elapsed_ms: 0,
                })
            })
            .collect()
    }

    /// POSTs `payload` to `url` within `deadline` (which includes waiting for a slot) and reads at
    /// most [`MAX_RESPONSE_BYTES`] of the answer. Any status is returned, not judged.
    pub async fn post(&self, url: &str, payload: &Value, deadline: Duration) -> Result<Delivered, WebhookError> {
        let url = check_url(url, &self.allow_list())?;
        let body = Bytes::from(serde_json::to_vec(payload).unwrap_or_default());
        tokio::time::timeout(deadline, self.deliver(&url, body)).await.map_err(|_| WebhookError::Timeout(deadline))?
    }

    async fn deliver(&self, url: &HttpUrl, body: Bytes) -> Result<Delivered, WebhookError> {
        let _slot = self.inner.slots.acquire().await.expect("the semaphore is never closed");
        let addrs = resolve(url).await?;
        let mut last = None;
        for addr in addrs {
            let request = outbound::Request {
                method: Method::POST,
                authority: &url.authority,
                path_and_query: &url.path_and_query,
                authorization: None,
                body: Some(("application/json", body.clone())),
            };
            match outbound::exchange(addr, request, MAX_RESPONSE_BYTES).await {
                Ok(response) => {
                    return Ok(Delivered {
                        status: response.status.as_u16(),
                        body: response.body,
                        truncated: response.truncated,
                    })
                }
                // Only an address that cannot be reached at all is worth the next one.
                Err(err @ ExchangeError::Connect { .. }) => last = Some(err),
                Err(err) => return Err(err.into()),
            }
        }
        Err(last.map_or_else(|| WebhookError::NoAddress { host: url.host.clone() }, WebhookError::from))
    }
}

/// The addresses to try, all checked: one refused address refuses the URL (a name that
/// resolves partly to a metadata address is not trusted with the rest either).
async fn resolve(url: &HttpUrl) -> Result<Vec<SocketAddr>, WebhookError> {
    let addrs: Vec<SocketAddr> = match url.ip() {
        Some(ip) => vec![SocketAddr::new(ip, url.port)],
        None => tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|source| WebhookError::Resolve { host: url.host.clone(), source })?
            .collect(),
    };
    for addr in &addrs {
        if let Some(why) = refusal(addr.ip()) {
            return Err(WebhookError::RefusedAddress { host: url.host.clone(), ip: addr.ip(), why });
        }
    }
    if addrs.is_empty() {
        return Err(WebhookError::NoAddress { host: url.host.clone() });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> AllowList {
        AllowList::from_config(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn allow_list_entries_are_validated_naming_the_entry() {
        for (entry, needle) in [
            ("hooks.svc", "give the port"),
            ("http://hooks.svc:80", "host:port"),
            ("hooks.svc:80/x", "host:port"),
            ("169.254.169.254:80", "link-local"),
            ("[fe80::1]:80", "link-local"),
            ("100.100.100.200:80", "metadata"),
            ("metadata.google.internal:80", "metadata"),
            ("a b:80", "host:port"),
            ("user@hooks:80", "credentials"),
            ("hooks:99999", "host:port"),
        ] {
            let err = AllowList::from_config(&["127.0.0.1:9000".to_string(), entry.to_string()]).unwrap_err();
            assert_eq!(err.field, "agent.webhook_allow[1]", "{entry}");
            assert!(err.message.contains(needle), "{entry}: {err}");
        }
        assert!(allow(&[]).is_empty());
    }

    #[test]
    fn only_listed_host_ports_are_allowed() {
        let list = allow(&["127.0.0.1:9000", "Hooks.Example.svc:80", "[::1]:9001"]);
        assert!(check_url("http://127.0.0.1:9000/hook", &list).is_ok());
        assert!(check_url("http://hooks.example.svc/x", &list).is_ok(), "port 80 implied, names case-insensitive");
        assert!(check_url("http://hooks.example.svc.:80/x", &list).is_ok(), "trailing dot");
        assert!(check_url("http://[0:0::1]:9001/", &list).is_ok(), "IPv6 compared as addresses");
        for url in
            ["http://127.0.0.1:9001/", "http://127.0.0.2:9000/", "http://hooks.example.svc:8080/", "http://other.svc/"]
        {
            assert!(matches!(check_url(url, &list), Err(WebhookError::NotAllowed { .. })), "{url}");
        }
        assert!(matches!(
            check_url("http://127.0.0.1:9000/", &AllowList::default()),
            Err(WebhookError::NotAllowed { .. })
        ));
    }

    #[test]
    fn metadata_and_link_local_are_refused_even_if_listed_or_disguised() {
        // The allow list cannot hold them, but a URL naming them is refused before the list.
        let list = allow(&["127.0.0.1:80"]);
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.169.254.:80/",
            "http://[fe80::1%25eth0]/",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[::169.254.169.254]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://0.0.0.0/",
            "http://metadata.google.internal/computeMetadata/v1/",
        ] {
            match check_url(url, &list) {
                Err(
                    WebhookError::RefusedAddress { .. } | WebhookError::RefusedName { .. } | WebhookError::Url { .. },
                ) => {}
                other => panic!("{url}: {other:?}"),
            }
        }
        assert_eq!(refusal("10.0.0.1".parse().unwrap()), None);
        assert_eq!(refusal("127.0.0.1".parse().unwrap()), None);
        assert_eq!(refusal("::1".parse().unwrap()), None);
        assert_eq!(refusal("::".parse().unwrap()), Some("not a single host's address"));
    }

    #[test]
    fn injection_in_a_url_is_refused_with_the_url_escaped() {
        let list = allow(&["10.244.3.9:8080"]);
        let url = "http://10.244.3.9:8080/x HTTP/1.1\r\nHost: a\r\n\r\nPOST /admin HTTP/1.1\r\nX: ";
        let err = check_url(url, &list).unwrap_err();
        assert!(matches!(err, WebhookError::Url { source: UrlError::ForbiddenByte { .. }, .. }), "{err:?}");
        let message = err.to_string();
        assert!(!message.contains('\r') && !message.contains('\n'), "the log line cannot be split: {message}");
        let long = format!("http://10.244.3.9:8080/{}\n", "a".repeat(5000));
        assert!(check_url(&long, &list).unwrap_err().to_string().len() < 400, "errors stay short");
        let err = check_url("http://10.244.3.9:8080/a%0d%0aX:%20y", &list);
        assert!(err.is_ok(), "percent-encoded bytes stay in the path: {err:?}");
    }

    #[test]
    fn plans_get_at_most_eight_allowed_webhooks() {
        let list = allow(&["127.0.0.1:9000"]);
        let url = "http://127.0.0.1:9000/hook".to_string();
        let check = |name: &str| WebhookCheck { name: name.into(), url: url.clone(), timeout_seconds: 5.0 };
        validate_plan_webhooks(&vec![url.clone(); 4], &[check("a"), check("b"), check("c"), check("d")], Some(&list))
            .unwrap();
        let err = validate_plan_webhooks(
            &vec![url.clone(); 5],
            &[check("a"), check("b"), check("c"), check("d")],
            Some(&list),
        )
        .unwrap_err();
        assert_eq!(err.field, "gates.webhooks");
        assert_eq!(validate_plan_webhooks(&vec![url.clone(); 9], &[], Some(&list)).unwrap_err().field, "webhooks");
        let err =
            validate_plan_webhooks(&[url.clone(), "http://127.0.0.1:9001/".into()], &[], Some(&list)).unwrap_err();
        assert_eq!(err.field, "webhooks[1]");
        assert!(err.message.contains("webhook_allow"), "{err}");
        let bad_check = WebhookCheck { url: "http://169.254.169.254/".into(), ..check("a") };
        assert_eq!(
            validate_plan_webhooks(&[], std::slice::from_ref(&bad_check), Some(&list)).unwrap_err().field,
            "gates.webhooks[0].url"
        );
        // Without the list (a stored plan), only what no list can allow is refused.
        validate_plan_webhooks(&["http://127.0.0.1:9001/".into()], &[], None).unwrap();
        assert_eq!(validate_plan_webhooks(&[], &[bad_check], None).unwrap_err().field, "gates.webhooks[0].url");
        assert_eq!(validate_plan_webhooks(&["http://a/\r\n".into()], &[], None).unwrap_err().field, "webhooks[0]");
    }
}
