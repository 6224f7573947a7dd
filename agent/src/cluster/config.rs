//! `[cluster]`: which etcd to keep the desired state in, as whom, under which prefix, over TLS.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::InvalidField;

/// Key prefix when the config does not set one.
pub const DEFAULT_PREFIX: &str = "/sockshift";
/// Lease TTL of a node's keys and of its leader campaign when the config does not set one: a
/// dead node disappears, and a dead leader is replaced, within this time.
pub const DEFAULT_LEASE_TTL_SECONDS: u64 = 10;
/// Shortest TTL accepted: one keep-alive per TTL/3 must fit comfortably in a loaded machine's
/// scheduling jitter.
pub const MIN_LEASE_TTL_SECONDS: u64 = 2;
pub const MAX_LEASE_TTL_SECONDS: u64 = 300;

/// `[cluster]` as written. Unknown keys are errors, like everywhere else in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client endpoints, `http://host:port` or `https://host:port` (all the same scheme).
    pub etcd: Vec<String>,
    /// This node's name in the cluster; unset: the host name (the DaemonSet sets it from
    /// `spec.nodeName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Read the node name from this environment variable instead (the cluster DaemonSet sets
    /// `NODE_NAME` from the downward API's `spec.nodeName`). Not with `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_env: Option<String>,
    /// Every key lives under `<prefix>/v1/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// CA that signed the etcd servers' certificates (PEM); required with `https://` endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; set with `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// TTL of the lease under which the node publishes itself and campaigns for leadership.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_string()
}

fn default_lease_ttl() -> u64 {
    DEFAULT_LEASE_TTL_SECONDS
}

/// TLS material, by path; read when connecting so that an error names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    /// Client certificate and key, when etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A validated `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub endpoints: Vec<String>,
    pub node: String,
    /// Without a trailing slash, e.g. `/sockshift`.
    pub prefix: String,
    pub tls: Option<TlsFiles>,
    pub lease_ttl: Duration,
}

impl ClusterConfig {
    /// A config with only the endpoints set, everything else at its default.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            etcd: endpoints.into_iter().map(Into::into).collect(),
            node: None,
            node_env: None,
            prefix: default_prefix(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            lease_ttl_seconds: default_lease_ttl(),
        }
    }

    /// Checks every field; errors are named `cluster.<field>`. The node name defaults to the
    /// host name, read here.
    pub fn validate(&self) -> Result<ClusterSettings, InvalidField> {
        if self.etcd.is_empty() {
            return Err(InvalidField::new("cluster.etcd", "at least one etcd endpoint is required"));
        }
        let mut https = None;
        for (i, endpoint) in self.etcd.iter().enumerate() {
            let field = format!("cluster.etcd[{i}]");
            let is_https = validate_endpoint(endpoint).map_err(|message| InvalidField::new(&field, message))?;
            if *https.get_or_insert(is_https) != is_https {
                return Err(InvalidField::new(field, "mixes http:// and https:// endpoints: use one scheme for all"));
            }
        }
        let https = https.unwrap_or(false);
        let (node, node_field) = match (&self.node, &self.node_env) {
            (Some(_), Some(_)) => {
                return Err(InvalidField::new(
                    "cluster.node_env",
                    "set either cluster.node or cluster.node_env, not both",
                ))
            }
            (Some(node), None) => (node.clone(), "cluster.node"),
            (None, Some(variable)) => match std::env::var(variable) {
                Ok(node) => (node, "cluster.node_env"),
                Err(err) => {
                    return Err(InvalidField::new(
                        "cluster.node_env",
                        format!("environment variable {variable:?}: {err} (the DaemonSet sets it from spec.nodeName)"),
                    ))
                }
            },
            (None, None) => (
                host_name().map_err(|err| {
                    InvalidField::new("cluster.node", format!("not set and the host name cannot be read: {err}"))
                })?,
                "cluster.node",
            ),
        };
        validate_node_name(&node).map_err(|message| InvalidField::new(node_field, message))?;
        validate_prefix(&self.prefix).map_err(|message| InvalidField::new("cluster.prefix", message))?;
        if !(MIN_LEASE_TTL_SECONDS..=MAX_LEASE_TTL_SECONDS).contains(&self.lease_ttl_seconds) {
            return Err(InvalidField::new(
                "cluster.lease_ttl_seconds",
                format!(
                    "must be from {MIN_LEASE_TTL_SECONDS} to {MAX_LEASE_TTL_SECONDS}, got {}",
                    self.lease_ttl_seconds
                ),
            ));
        }
        for (field, path) in [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)]
        {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return Err(InvalidField::new(
                        format!("cluster.{field}"),
                        format!("{} must be an absolute path", path.display()),
                    ));
                }
            }
        }
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => return Err(InvalidField::new("cluster.key_file", "required with cluster.cert_file")),
            (None, Some(_)) => return Err(InvalidField::new("cluster.cert_file", "required with cluster.key_file")),
        };
        let tls = match (https, &self.ca_file) {
            (true, Some(ca_file)) => Some(TlsFiles { ca_file: ca_file.clone(), identity }),
            (true, None) => {
                return Err(InvalidField::new(
                    "cluster.ca_file",
                    "required with https:// endpoints: the CA that signed the etcd servers' certificates",
                ))
            }
            (false, _) if self.ca_file.is_some() || identity.is_some() => {
                return Err(InvalidField::new(
                    "cluster.etcd",
                    "TLS files are set but the endpoints are http://: use https:// endpoints",
                ))
            }
            (false, _) => None,
        };
        Ok(ClusterSettings {
            endpoints: self.etcd.clone(),
            node,
            prefix: self.prefix.clone(),
            tls,
            lease_ttl: Duration::from_secs(self.lease_ttl_seconds),
        })
    }
}

/// `http://host:port` or `https://host:port`, nothing after the port; returns whether it is https.
fn validate_endpoint(endpoint: &str) -> Result<bool, String> {
    let (https, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{endpoint:?} must start with http:// or https://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let port = rest.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 && !host.contains(['/', '@', '?', '#']) => Ok(https),
        _ => Err(format!("{endpoint:?} is not scheme://host:port (etcd's client port, e.g. 2379)")),
    }
}

/// A node name becomes one key segment: no `/`, printable, at most 253 bytes (a DNS name).
pub fn validate_node_name(node: &str) -> Result<(), String> {
    if node.is_empty() || node.len() > 253 {
        return Err(format!("{node:?} must be 1 to 253 characters"));
    }
    if !node.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(format!("{node:?} may only hold letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn validate_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') || prefix.contains("//") {
        return Err(format!("{prefix:?} must start with '/', not end with '/', and have no empty segment"));
    }
    if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{prefix:?} may only hold printable ASCII without spaces"));
    }
    Ok(())
}

/// The kernel's host name (what `hostname` prints).
pub fn host_name() -> std::io::Result<String> {
    let name = std::fs::read_to_string(Path::new("/proc/sys/kernel/hostname"))?;
    Ok(name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterSettings, String> {
        #[derive(Deserialize)]
        struct File {
            cluster: ClusterConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        file.cluster.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_apply() {
        let settings = parse("[cluster]\netcd = [\"http://127.0.0.1:2379\"]").unwrap();
        assert_eq!(settings.prefix, "/sockshift");
        assert_eq!(settings.node, host_name().unwrap());
        assert_eq!(settings.lease_ttl, Duration::from_secs(10));
        assert_eq!(settings.tls, None);
    }

    #[test]
    fn the_node_name_can_come_from_the_environment() {
        // PATH is set in every test environment and is not a valid node name: the error names
        // the variable's field.
        let err = parse("[cluster]\netcd = [\"http://a:1\"]\nnode_env = \"PATH\"").unwrap_err();
        assert!(err.contains("cluster.node_env"), "{err}");
        // A variable of this test's own: no other test reads it.
        std::env::set_var("SOCKSHIFT_TEST_NODE_NAME", "worker-9");
        let settings = parse("[cluster]\netcd = [\"http://a:1\"]\nnode_env = \"SOCKSHIFT_TEST_NODE_NAME\"").unwrap();
        assert_eq!(settings.node, "worker-9");
    }

    #[test]
    fn tls_settings() {
        let settings = parse(
            "[cluster]\netcd = [\"https://a:2379\", \"https://b:2379\"]\nnode = \"worker-7\"\nprefix = \"/x/y\"\n\
             ca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"",
        )
        .unwrap();
        assert_eq!(settings.node, "worker-7");
        assert_eq!(settings.prefix, "/x/y");
        let tls = settings.tls.unwrap();
        assert_eq!(tls.ca_file, PathBuf::from("/ca.pem"));
        assert_eq!(tls.identity, Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem"))));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("etcd = []", "cluster.etcd"),
            ("node = \"a\"", "etcd"),
            ("etcd = [\"127.0.0.1:2379\"]", "cluster.etcd[0]"),
            ("etcd = [\"http://127.0.0.1\"]", "cluster.etcd[0]"),
            ("etcd = [\"http://127.0.0.1:2379/x\"]", "cluster.etcd[0]"),
            ("etcd = [\"http://a:1\", \"https://b:1\"]", "cluster.etcd[1]"),
            ("etcd = [\"https://a:1\"]", "cluster.ca_file"),
            ("etcd = [\"http://a:1\"]\nca_file = \"/ca\"", "cluster.etcd"),
            ("etcd = [\"https://a:1\"]\nca_file = \"ca.pem\"", "cluster.ca_file"),
            ("etcd = [\"https://a:1\"]\nca_file = \"/ca\"\ncert_file = \"/c\"", "cluster.key_file"),
            ("etcd = [\"https://a:1\"]\nca_file = \"/ca\"\nkey_file = \"/k\"", "cluster.cert_file"),
            ("etcd = [\"http://a:1\"]\nnode = \"a/b\"", "cluster.node"),
            ("etcd = [\"http://a:1\"]\nnode = \"\"", "cluster.node"),
            ("etcd = [\"http://a:1\"]\nprefix = \"sockshift\"", "cluster.prefix"),
            ("etcd = [\"http://a:1\"]\nprefix = \"/a/\"", "cluster.prefix"),
            ("etcd = [\"http://a:1\"]\nprefix = \"/\"", "cluster.prefix"),
            ("etcd = [\"http://a:1\"]\nlease_ttl_seconds = 1", "cluster.lease_ttl_seconds"),
            ("etcd = [\"http://a:1\"]\nendpoints = []", "endpoints"),
            ("etcd = [\"http://a:1\"]\nnode = \"a\"\nnode_env = \"HOME\"", "cluster.node_env"),
            ("etcd = [\"http://a:1\"]\nnode_env = \"SOCKSHIFT_TEST_NO_SUCH_VARIABLE\"", "cluster.node_env"),
        ];
        for (body, field) in cases {
            let err = parse(&format!("[cluster]\n{body}")).expect_err(body);
            assert!(err.contains(field), "{body:?}: error {err:?} should name {field}");
        }
    }
}
