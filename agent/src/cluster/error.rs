//! What can go wrong talking to etcd, in terms an operator can act on.

use std::{path::PathBuf, time::Duration};

use super::{
    keys::Key,
    store::Expect,
    values::{Value, Versioned},
};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A TLS file named in `[cluster]` cannot be read.
    #[error("{field}: cannot read {path}: {source}")]
    TlsFile { field: &'static str, path: PathBuf, source: std::io::Error },
    /// The client could not be set up (a TLS file that is not PEM, an endpoint tonic refuses).
    #[error("cannot set up the etcd client for {endpoints}: {detail}")]
    Setup { endpoints: String, detail: String, source: etcd_client::Error },
    /// No endpoint answered a first request within the connect timeout.
    #[error("cannot use etcd at {endpoints} (tried for {after:?}): {} ({detail})", .problem.text)]
    Unreachable { endpoints: String, after: Duration, problem: Problem, detail: String, source: etcd_client::Error },
    /// A request failed or timed out: etcd is unavailable (no quorum, all members down) or the
    /// request's outcome is unknown.
    #[error("etcd {what} failed: {detail}")]
    Etcd { what: &'static str, detail: String, source: Option<etcd_client::Error> },
    /// A compare-and-swap found other revisions than expected: nothing was written. Each entry
    /// holds the key's current value, for a 409 answer or a retry.
    #[error("conflict: {}", describe_conflicts(.0))]
    Conflict(Vec<Conflict>),
    /// A fenced write whose leadership is gone (its lease expired or it resigned): nothing was
    /// written.
    #[error("not the leader any more: the leader key {key} was replaced or has expired")]
    NotLeader { key: String },
    /// A value this node was asked to write does not validate: nothing was written.
    #[error("refusing to write {key}: {error}")]
    InvalidWrite { key: Key, error: String },
}

impl ClusterError {
    /// Whether etcd could not be used at all (answer 503 and keep serving from the local copy),
    /// as opposed to a refused write (409, 400) or a setup error.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ClusterError::Etcd { .. } | ClusterError::Unreachable { .. })
    }

    /// Whether the problem is this node's configuration (a TLS file, a certificate etcd refuses
    /// or that does not match, a scheme etcd does not serve), which waiting will not fix, as
    /// opposed to etcd being down or without quorum, which it may.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            ClusterError::TlsFile { .. } | ClusterError::Setup { .. } => true,
            ClusterError::Unreachable { problem, .. } => problem.misconfigured,
            _ => false,
        }
    }
}

/// What an operator should check after a failed first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub text: &'static str,
    /// The node's own setup is wrong (see [`ClusterError::is_misconfiguration`]).
    pub misconfigured: bool,
}

/// One key whose revision did not match.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub key: Key,
    pub expected: Expect,
    /// The key's value now (`None`: absent); `Err` holds why the stored value is invalid.
    pub current: Option<Versioned<Result<Value, String>>>,
    /// etcd's revision when `current` was read (for an absent key: it was deleted at or before
    /// this revision).
    pub read_at: i64,
}

fn describe_conflicts(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(|c| {
            let now = match &c.current {
                Some(current) => format!("revision {}", current.mod_revision),
                None => "absent".to_string(),
            };
            format!("{} expected {} but is {now}", c.key, c.expected)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// An etcd client error with its causes, `: `-joined (tonic's status, then hyper's, then
/// rustls's or the socket's): the top level alone often says only "transport error".
pub(crate) fn error_chain(err: &etcd_client::Error) -> String {
    chain_of(err)
}

/// Any error with its causes, `: `-joined, each cause once.
pub(crate) fn chain_of(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// What an operator should check, read from the error chain of a failed first request.
/// `tls`: whether the endpoints are https://, and whether a client certificate was offered.
pub(crate) fn diagnose(chain: &str, tls: Option<bool>) -> Problem {
    let (text, misconfigured) = diagnose_text(chain, tls);
    Problem { text, misconfigured }
}

fn diagnose_text(chain: &str, tls: Option<bool>) -> (&'static str, bool) {
    let lower = chain.to_lowercase();
    let says = |needles: &[&str]| needles.iter().any(|n| lower.contains(&n.to_lowercase()));
    let refused_client = says(&[
        "CertificateRequired",
        "certificate required",
        "BadCertificate",
        "bad certificate",
        "UnknownCA",
        "unknown ca",
        "closed the connection right after the TLS handshake",
    ]);
    if refused_client && tls == Some(false) {
        ("etcd requires a client certificate: set cluster.cert_file and cluster.key_file", true)
    } else if refused_client {
        ("etcd refused the client certificate (cluster.cert_file): not signed by a CA etcd trusts, or expired", true)
    } else if says(&["UnknownIssuer", "unknown issuer"]) {
        ("the etcd server's certificate is not signed by cluster.ca_file", true)
    } else if says(&["NotValidForName", "not valid for name"]) {
        ("the etcd server's certificate does not name the host of the endpoint", true)
    } else if says(&["expired"]) {
        ("a certificate has expired", true)
    } else if tls.is_some()
        && says(&["InvalidContentType", "corrupt message", "http2 error", "frame with invalid size"])
    {
        ("the endpoints are https:// but etcd does not serve TLS there: use http://", true)
    } else if tls.is_none() && says(&["broken pipe", "connection closed", "connection reset"]) {
        ("etcd closed the connection: if it serves TLS, use https:// endpoints and set cluster.ca_file", true)
    } else if says(&["connection refused"]) {
        ("nothing listens at the endpoints (is etcd running, is the port its client port?)", false)
    } else if says(&["no leader"]) {
        ("etcd answers but has no leader (no quorum)", false)
    } else if says(&["timed out", "deadline", "elapsed"]) {
        ("no answer in time (a firewall, a wrong address, or an overloaded etcd)", false)
    } else if says(&["authentication", "permission denied", "user name is empty"]) {
        ("etcd refused the client: authentication or permission", true)
    } else {
        ("etcd is unreachable", false)
    }
}

#[cfg(test)]
mod tests {
    use super::diagnose;

    #[test]
    fn problems_are_named() {
        let cases = [
            ("transport error: invalid peer certificate: UnknownIssuer", Some(true), "cluster.ca_file"),
            ("TLS: received fatal alert: CertificateRequired", Some(false), "requires a client certificate"),
            ("TLS: received fatal alert: BadCertificate", Some(false), "requires a client certificate"),
            ("TLS: received fatal alert: BadCertificate", Some(true), "refused the client certificate"),
            (
                "hyper::Error(Io, Custom { kind: BrokenPipe, error: \"stream closed because of a broken pipe\" })",
                None,
                "https://",
            ),
            ("tcp connect error: Connection refused (os error 111)", None, "nothing listens"),
            ("status: Unavailable, message: \"etcdserver: no leader\"", None, "no quorum"),
        ];
        for (chain, tls, expected) in cases {
            assert!(diagnose(chain, tls).text.contains(expected), "{chain}: {:?}", diagnose(chain, tls));
        }
        // Waiting fixes an etcd that is down or without quorum, not a certificate etcd refuses.
        assert!(diagnose("TLS: received fatal alert: CertificateRequired", Some(false)).misconfigured);
        assert!(diagnose("invalid peer certificate: UnknownIssuer", Some(true)).misconfigured);
        assert!(!diagnose("tcp connect error: Connection refused (os error 111)", None).misconfigured);
        assert!(!diagnose("status: Unavailable, message: \"etcdserver: no leader\"", None).misconfigured);
        assert!(!diagnose("deadline has elapsed", Some(true)).misconfigured);
    }
}
