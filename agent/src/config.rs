//! The agent's TOML config and the validation every service goes through, whether it comes from
//! the file or (later) from the API. Validation names the offending field and changes nothing.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use agent_common::{percent_to_ppm, MAX_BACKENDS_PER_SIDE, MAX_SERVICES};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::discovery::{KubernetesConfig, PortSelector};
use crate::{
    cluster::{ClusterConfig, ClusterSettings},
    gates::prometheus::PrometheusEndpoint,
    paths,
    webhook::AllowList,
};

/// A config or API input problem, naming the field it is about.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// Path of the field, e.g. `service[0] "web".canary_percent`.
    pub field: String,
    pub message: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// When `audit.log` is rotated and how many old files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for AuditRotation {
    fn default() -> Self {
        Self { max_bytes: DEFAULT_AUDIT_MAX_BYTES, keep: DEFAULT_AUDIT_KEEP }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// `message` is the TOML error without the file's text (see [`redacted_toml_error`]).
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {source}")]
    Invalid { path: PathBuf, source: InvalidField },
}

/// The file as written. Unknown keys are errors: a typo must not silently do nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Cluster mode: the desired state lives in etcd (see `crate::cluster`).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// cgroup v2 directory the programs attach to; unset: the machine's cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// Control API listen address: loopback, since the API changes production traffic.
    pub api: String,
    /// bpffs directory for the pinned maps and links.
    pub bpffs: PathBuf,
    /// Directory of the persisted desired state and the audit log.
    pub state_dir: PathBuf,
    /// Bearer tokens and their roles. Required unless `api` is a loopback address or
    /// `insecure_allow_unauthenticated_api` is set.
    pub auth: Option<AuthSection>,
    /// Serve the API without `[agent.auth]` on a non-loopback address: anyone who reaches the
    /// port can then steer every connection on the node. Off; never turn it on in production.
    pub insecure_allow_unauthenticated_api: bool,
    /// Extra names the API answers to in the `Host` header (`name` or `name:port`; without a
    /// port, the API's). The bind address and localhost/127.0.0.1/[::1] with the API's port are
    /// always allowed; any other `Host` is refused (421), so a browser tricked by DNS
    /// rebinding cannot reach the API.
    pub api_hosts: Vec<String>,
    /// Size at which `audit.log` is rotated (to `audit.log.1`, ...), bytes; default 16 MiB.
    pub audit_max_bytes: u64,
    /// Rotated audit files kept (`audit.log.1` to `audit.log.N`); default 4.
    pub audit_keep: u32,
    /// Prometheus server metric gates query (`http://host:port`, optionally with a path prefix);
    /// unset: plans with metric gates are refused. Only here, never in a plan.
    pub prometheus: Option<String>,
    /// File holding a bearer token sent to Prometheus (mode 0600 or stricter); unset: none.
    pub prometheus_bearer_token_file: Option<PathBuf>,
    /// Seconds a Prometheus query may take; unset: 5.
    pub prometheus_timeout_seconds: Option<f64>,
    /// `host:port` pairs webhooks (notifications and checks) may reach; empty: none.
    pub webhook_allow: Vec<String>,
    /// Size of the socket table (steered TCP and connected UDP sockets open at once) and of the
    /// UDP flow table; preallocated, about 120 bytes a socket in each. Fixed when the map is
    /// first pinned: changing it needs `sockshift uninstall`. Unset: the size of the tables
    /// already pinned (so an upgrade keeps them), else 65,536.
    pub steered_socket_capacity: Option<u32>,
    /// Most steered sockets one client network namespace gets records for; unset: a quarter of
    /// the capacity; 0: no bound.
    pub steered_sockets_per_netns: Option<u32>,
    /// Steer only the host network namespace (hostNetwork pods and node processes), for nodes
    /// whose pods run a sidecar mesh.
    pub host_netns_only: bool,
    /// The datapath's own log: `off` (default), `info` (fail-open events), `debug` (every
    /// steering decision). Applied on reload by replacing the programs in place.
    pub datapath_log: DatapathLog,
    /// Kubeconfig for Kubernetes discovery; unset: `KUBECONFIG`, else the in-cluster service
    /// account (the DaemonSet's).
    pub kubeconfig: Option<PathBuf>,
}

/// `agent.datapath_log`: what the eBPF programs log (into the agent's log, target `datapath`).
/// The level is fixed when the programs load, so a statement above it is dead code the verifier
/// removes: `off` costs nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatapathLog {
    /// No datapath log (the default).
    #[default]
    Off,
    /// Fail-open events: a connection to a frontend left untouched, or steered without its record.
    Info,
    /// Also every steering decision: service, side, backend, bucket against weight, affinity key
    /// kind, cohort override.
    Debug,
}

impl std::fmt::Display for DatapathLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Info => "info",
            Self::Debug => "debug",
        })
    }
}

impl DatapathLog {
    /// The value of aya-log's level global in the programs.
    pub fn level(self) -> u8 {
        match self {
            Self::Off => agent_common::LOG_LEVEL_OFF,
            Self::Info => agent_common::LOG_LEVEL_INFO,
            Self::Debug => agent_common::LOG_LEVEL_DEBUG,
        }
    }
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            cgroup: None,
            api: paths::DEFAULT_API.to_string(),
            bpffs: PathBuf::from(paths::DEFAULT_BPFFS_DIR),
            state_dir: PathBuf::from(paths::DEFAULT_STATE_DIR),
            auth: None,
            insecure_allow_unauthenticated_api: false,
            api_hosts: Vec::new(),
            audit_max_bytes: DEFAULT_AUDIT_MAX_BYTES,
            audit_keep: DEFAULT_AUDIT_KEEP,
            prometheus: None,
            prometheus_bearer_token_file: None,
            prometheus_timeout_seconds: None,
            webhook_allow: Vec::new(),
            steered_socket_capacity: None,
            steered_sockets_per_netns: None,
            host_netns_only: false,
            datapath_log: DatapathLog::Off,
            kubeconfig: None,
        }
    }
}

/// Default `agent.audit_max_bytes`: 16 MiB.
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Default `agent.audit_keep`.
pub const DEFAULT_AUDIT_KEEP: u32 = 4;
/// Smallest `agent.audit_max_bytes`: one entry of the largest body must fit.
pub const MIN_AUDIT_MAX_BYTES: u64 = 1024 * 1024;
/// Most rotated audit files kept.
pub const MAX_AUDIT_KEEP: u32 = 100;
/// Shortest bearer token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest bearer token accepted (a token file holding something else is a mistake).
pub const MAX_TOKEN_LEN: usize = 4096;

/// `[agent.auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub tokens: Vec<TokenConfig>,
}

/// `[[agent.auth.tokens]]`: one bearer token. Give the secret inline or, better, in a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: recorded in the audit log.
    pub name: String,
    pub token: Option<Secret>,
    /// A file holding the token (surrounding whitespace ignored); owned by the agent's user,
    /// no group or other permission bits (0400 or 0600).
    pub token_file: Option<PathBuf>,
    pub role: Role,
}

/// A secret from the config file: never shown by `Debug` (or anything else).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What a token may do. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: status, metrics, audit log.
    Viewer,
    /// Also: change weights up to the service's `max_operator_percent`, roll back.
    Operator,
    /// Also: any weight, promote, add, replace and remove services.
    Release,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Release => "release",
        })
    }
}

/// A validated token. Only the SHA-256 digest of the secret is kept: a presented token is
/// hashed and the digests compared in constant time, so neither the secret's content nor its
/// length can be learned from timing, and no secret sits in the agent's memory or `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub digest: TokenDigest,
    pub role: Role,
}

/// SHA-256 of a token's secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    pub fn of(secret: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(secret).into())
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(<redacted>)")
    }
}

/// How the side is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Each connection (socket) is hashed on its own.
    #[default]
    Connection,
    /// Every connection of one client (network namespace, else cgroup) lands on the same side.
    Client,
}

/// What a cohort's clients get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CohortCanary {
    Always,
    Never,
}

/// A cgroup named by path (absolute, or relative to the cgroup v2 root) or by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum CgroupRef {
    Id(u64),
    Path(String),
}

/// `[[service.cohort]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Cohort)]
#[serde(deny_unknown_fields)]
pub struct CohortConfig {
    /// Clients of this cohort: their cgroups, or any cgroup below them.
    pub cgroups: Vec<CgroupRef>,
    pub canary: CohortCanary,
}

/// `[[service]]`: one service as the user writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Addresses clients connect to (`ip:port`, `[v6]:port`); empty with `kubernetes`.
    #[serde(default)]
    pub frontends: Vec<String>,
    #[serde(default)]
    pub stable: Vec<String>,
    #[serde(default)]
    pub canary: Vec<String>,
    #[serde(default)]
    pub canary_percent: f64,
    #[serde(default)]
    pub affinity: Affinity,
    /// Highest weight an `operator` token may set (a `release` token may set any).
    #[serde(default = "default_max_operator_percent")]
    pub max_operator_percent: f64,
    #[serde(default, rename = "cohort", skip_serializing_if = "Vec::is_empty")]
    pub cohorts: Vec<CohortConfig>,
    /// Frontends and backends from Kubernetes Services instead of `frontends`/`stable`/`canary`.
    /// Boxed: most services have none, and a service travels by value through the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Box<KubernetesConfig>>,
}

fn default_max_operator_percent() -> f64 {
    100.0
}

/// A cohort with its cgroups resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cohort {
    pub cgroup_ids: Vec<u64>,
    pub canary: CohortCanary,
}

/// Frontends with backends of their own. A Kubernetes service has one per Service port (port 80
/// goes to the pods' 8080, port 443 to their 8443); a service written by hand has none: all its
/// frontends share its `stable` and `canary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGroup {
    pub frontends: Vec<SocketAddr>,
    pub stable: Vec<SocketAddr>,
    pub canary: Vec<SocketAddr>,
}

/// A validated service, ready for the datapath.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    /// Every frontend (with `port_groups`: the union of theirs).
    pub frontends: Vec<SocketAddr>,
    /// Every stable backend (with `port_groups`: the union of theirs).
    pub stable: Vec<SocketAddr>,
    pub canary: Vec<SocketAddr>,
    /// Set for Kubernetes services, from discovery (see `discovery`); empty otherwise.
    pub port_groups: Vec<PortGroup>,
    pub canary_ppm: u32,
    pub affinity: Affinity,
    pub cohorts: Vec<Cohort>,
    /// What the user wrote, for the API to show back.
    pub source: ServiceConfig,
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub cgroup: PathBuf,
    pub api: SocketAddr,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    /// `None`: no authentication (loopback, or the insecure opt-out).
    pub tokens: Option<Vec<Token>>,
    /// Extra `Host` names the API answers to (see [`AgentSection::api_hosts`]), lowercase.
    pub api_hosts: Vec<String>,
    /// `audit.log` rotation.
    pub audit: AuditRotation,
    pub services: Vec<ServiceSpec>,
    /// `None`: no Prometheus, so no metric gates.
    pub prometheus: Option<PrometheusEndpoint>,
    pub webhook_allow: AllowList,
    /// `None`: the pinned tables' size, else the default (resolved when the datapath loads).
    pub steered_socket_capacity: Option<u32>,
    /// `None`: a quarter of the socket table.
    pub steered_sockets_per_netns: Option<u32>,
    pub host_netns_only: bool,
    pub datapath_log: DatapathLog,
    /// `Some`: cluster mode (`[cluster]`); the config file then holds no services.
    pub cluster: Option<ClusterSettings>,
    /// `agent.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
}

/// Smallest and largest socket table the agent accepts.
pub const SOCKET_CAPACITY_RANGE: std::ops::RangeInclusive<u32> = 16..=(1 << 22);

impl Config {
    /// Reads and validates a config file. Nothing is touched on error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|err| match err {
            ParseError::Toml(message) => ConfigError::Parse { path: path.to_owned(), message },
            ParseError::Invalid(source) => ConfigError::Invalid { path: path.to_owned(), source },
        })
    }

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let file: ConfigFile = toml::from_str(text).map_err(|err| ParseError::Toml(redacted_toml_error(text, &err)))?;
        let cgroup = match file.agent.cgroup {
            Some(path) => path,
            None => paths::cgroup2_root()
                .map_err(|err| InvalidField::new("agent.cgroup", format!("not set and cannot be detected: {err}")))?,
        };
        if !cgroup.is_dir() {
            return Err(InvalidField::new("agent.cgroup", format!("{} is not a directory", cgroup.display())).into());
        }
        let api: SocketAddr =
            file.agent.api.parse().map_err(|_| {
                InvalidField::new("agent.api", format!("{:?} is not an ip:port address", file.agent.api))
            })?;
        if file.agent.bpffs.as_os_str().is_empty() || !file.agent.bpffs.is_absolute() {
            return Err(InvalidField::new("agent.bpffs", "must be an absolute path").into());
        }
        if !file.agent.state_dir.is_absolute() {
            return Err(InvalidField::new("agent.state_dir", "must be an absolute path").into());
        }
        let tokens = file.agent.auth.as_ref().map(validate_tokens).transpose()?;
        if tokens.is_none() && !api.ip().is_loopback() && !file.agent.insecure_allow_unauthenticated_api {
            return Err(InvalidField::new(
                "agent.api",
                format!(
                    "{api} is not a loopback address and [agent.auth] is not set: anyone reaching it could steer \
                     every connection on this node; add [[agent.auth.tokens]] (see config/sockshift.toml), or bind \
                     to 127.0.0.1"
                ),
            )
            .into());
        }
        let api_hosts = validate_api_hosts(&file.agent.api_hosts)?;
        if file.agent.audit_max_bytes < MIN_AUDIT_MAX_BYTES {
            return Err(InvalidField::new(
                "agent.audit_max_bytes",
                format!("must be at least {MIN_AUDIT_MAX_BYTES} (1 MiB), got {}", file.agent.audit_max_bytes),
            )
            .into());
        }
        if !(1..=MAX_AUDIT_KEEP).contains(&file.agent.audit_keep) {
            return Err(InvalidField::new(
                "agent.audit_keep",
                format!("must be from 1 to {MAX_AUDIT_KEEP}, got {}", file.agent.audit_keep),
            )
            .into());
        }
        let audit = AuditRotation { max_bytes: file.agent.audit_max_bytes, keep: file.agent.audit_keep };
        let prometheus = match (&file.agent.prometheus, &file.agent.prometheus_bearer_token_file) {
            (Some(url), token_file) => Some(PrometheusEndpoint::from_config(
                url,
                token_file.as_deref(),
                file.agent.prometheus_timeout_seconds,
            )?),
            (None, Some(_)) => {
                return Err(
                    InvalidField::new("agent.prometheus_bearer_token_file", "set without agent.prometheus").into()
                )
            }
            (None, None) if file.agent.prometheus_timeout_seconds.is_some() => {
                return Err(InvalidField::new("agent.prometheus_timeout_seconds", "set without agent.prometheus").into())
            }
            (None, None) => None,
        };
        let webhook_allow = AllowList::from_config(&file.agent.webhook_allow)?;
        let capacity = file.agent.steered_socket_capacity;
        if let Some(capacity) = capacity.filter(|c| !SOCKET_CAPACITY_RANGE.contains(c)) {
            return Err(InvalidField::new(
                "agent.steered_socket_capacity",
                format!(
                    "{capacity} is out of range: {} to {}",
                    SOCKET_CAPACITY_RANGE.start(),
                    SOCKET_CAPACITY_RANGE.end()
                ),
            )
            .into());
        }
        let per_netns = file.agent.steered_sockets_per_netns;
        if let Some((per_netns, capacity)) = per_netns.zip(capacity).filter(|(n, c)| n > c) {
            return Err(InvalidField::new(
                "agent.steered_sockets_per_netns",
                format!("{per_netns} is more than agent.steered_socket_capacity ({capacity})"),
            )
            .into());
        }
        let cluster = file.cluster.as_ref().map(ClusterConfig::validate).transpose()?;
        if cluster.is_some() && !file.services.is_empty() {
            // Two sources of services would fight: every node's file against the cluster's one
            // desired state.
            return Err(InvalidField::new(
                "service",
                "[[service]] tables are not read in cluster mode ([cluster] is set): the services live in etcd. \
                 Load them with `sockshift apply -f services.toml` (the same [[service]] tables, applied \
                 through any node's API) or `PUT /v1/services/{name}`",
            )
            .into());
        }
        if let Some(path) = &file.agent.kubeconfig {
            if !path.is_file() {
                return Err(InvalidField::new("agent.kubeconfig", format!("{} is not a file", path.display())).into());
            }
        }
        let cgroup_root = paths::cgroup2_root().ok();
        let services = validate_services(&file.services, cgroup_root.as_deref())?;
        Ok(Self {
            cgroup,
            api,
            bpffs: file.agent.bpffs,
            state_dir: file.agent.state_dir,
            tokens,
            api_hosts,
            audit,
            services,
            prometheus,
            webhook_allow,
            steered_socket_capacity: capacity,
            steered_sockets_per_netns: per_netns,
            host_netns_only: file.agent.host_netns_only,
            datapath_log: file.agent.datapath_log,
            cluster,
            kubeconfig: file.agent.kubeconfig,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The TOML error, redacted (see [`redacted_toml_error`]).
    #[error("{0}")]
    Toml(String),
    #[error(transparent)]
    Invalid(#[from] InvalidField),
}

fn validate_tokens(auth: &AuthSection) -> Result<Vec<Token>, InvalidField> {
    if auth.tokens.is_empty() {
        return Err(InvalidField::new("agent.auth.tokens", "at least one token is required when [agent.auth] is set"));
    }
    let mut names = HashSet::new();
    let mut tokens: Vec<Token> = Vec::new();
    for (i, token) in auth.tokens.iter().enumerate() {
        let field = |rest: &str| format!("agent.auth.tokens[{i}].{rest}");
        if token.name.is_empty() || !names.insert(token.name.clone()) {
            return Err(InvalidField::new(field("name"), format!("{:?} is empty or used twice", token.name)));
        }
        let (secret, source) = match (&token.token, &token.token_file) {
            (Some(secret), None) => (secret.expose().to_string(), field("token")),
            (None, Some(path)) => (read_token_file(path, &field("token_file"))?, field("token_file")),
            _ => return Err(InvalidField::new(field("token"), "set exactly one of `token` and `token_file`")),
        };
        // The messages below never include the secret.
        if secret.len() < MIN_TOKEN_LEN || secret.len() > MAX_TOKEN_LEN {
            return Err(InvalidField::new(
                source,
                format!(
                    "the token has {} characters; it must have {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} (e.g. `openssl rand \
                     -hex 32`)",
                    secret.len()
                ),
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidField::new(
                source,
                "the token must be printable ASCII without spaces (it travels in an HTTP header)",
            ));
        }
        let digest = TokenDigest::of(secret.as_bytes());
        if let Some(other) = tokens.iter().find(|t| t.digest == digest) {
            return Err(InvalidField::new(
                source,
                format!("this token's secret is also the secret of token {:?}: each token needs its own", other.name),
            ));
        }
        tokens.push(Token { name: token.name.clone(), digest, role: token.role });
    }
    Ok(tokens)
}

/// Reads a token file, refusing one that other users could read or replace.
fn read_token_file(path: &Path, field: &str) -> Result<String, InvalidField> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|err| InvalidField::new(field, format!("{}: {err}", path.display())))?;
    if !meta.is_file() {
        return Err(InvalidField::new(field, format!("{} is not a regular file", path.display())));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(InvalidField::new(
            field,
            format!(
                "{} has mode {mode:04o}: a token file must not be readable or writable by group or others \
                 (chmod 0400; in Kubernetes, defaultMode: 0400 on the Secret volume)",
                path.display()
            ),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(InvalidField::new(
            field,
            format!("{} is owned by uid {}, not by the agent's uid {euid}", path.display(), meta.uid()),
        ));
    }
    let text = std::fs::read(path).map_err(|err| InvalidField::new(field, format!("{}: {err}", path.display())))?;
    let text = String::from_utf8(text)
        .map_err(|_| InvalidField::new(field, format!("{} is not UTF-8 text", path.display())))?;
    Ok(text.trim().to_string())
}

/// `agent.api_hosts`: host names (lowercase), optionally with a port.
fn validate_api_hosts(hosts: &[String]) -> Result<Vec<String>, InvalidField> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let valid = !host.is_empty()
                && host.len() <= 255
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
            if !valid {
                return Err(InvalidField::new(
                    format!("agent.api_hosts[{i}]"),
                    format!("{host:?} is not a host name or host:port"),
                ));
            }
            Ok(host.to_ascii_lowercase())
        })
        .collect()
}

/// A TOML error as the agent shows it: line, column and serde's message, never the file's
/// text (the toml crate's `Display` quotes the offending line, which may hold an inline token).
/// When the error is on a line that could hold a secret (it mentions `token`, or it lies in an
/// `[agent.auth]` table), quoted values are cut from the message too, since serde quotes the
/// value it refused (`invalid type: integer `12345678``).
pub fn redacted_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    let Some(span) = err.span() else { return message.to_string() };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let end = span.end.clamp(start, text.len());
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text.get(end..).and_then(|rest| rest.find('\n')).map_or(text.len(), |i| end + i);
    let lines = text.get(line_start..line_end).unwrap_or("");
    let in_auth = before
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .is_some_and(|header| header.replace(' ', "").contains("agent.auth"));
    let sensitive = in_auth || lines.to_ascii_lowercase().contains("token");
    // serde quotes the refused value in these; other messages quote keys and variant names.
    let echoes_value = ["invalid type", "invalid value", "invalid length"].iter().any(|m| message.starts_with(m));
    let message = if sensitive && echoes_value { strip_quoted(message) } else { message.to_string() };
    // The key the error is at, from the first line of its span (never the value).
    let key = lines
        .lines()
        .next()
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim().trim_start_matches(['{', '[', ',', ' ']))
        .filter(|key| !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.\" ".contains(&b)));
    match key {
        Some(key) => format!("line {line}, column {column}, at `{key}`: {message}"),
        None => format!("line {line}, column {column}: {message}"),
    }
}

/// `message` with the text between backticks or double quotes replaced by `…`.
fn strip_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None if c == '`' || c == '"' => {
                out.push(c);
                out.push('…');
                open = Some(c);
            }
            None => out.push(c),
        }
    }
    out
}

/// Validates a whole set of services: each on its own, then names and frontends unique.
pub fn validate_services(
    services: &[ServiceConfig],
    cgroup_root: Option<&Path>,
) -> Result<Vec<ServiceSpec>, InvalidField> {
    if services.len() > MAX_SERVICES as usize {
        return Err(InvalidField::new(
            "service",
            format!("{} services, at most {MAX_SERVICES} are supported", services.len()),
        ));
    }
    let mut names = HashSet::new();
    let mut frontends = HashSet::new();
    let mut specs = Vec::with_capacity(services.len());
    for (index, service) in services.iter().enumerate() {
        let prefix = format!("service[{index}]");
        let spec = validate_service(service, &prefix, cgroup_root)?;
        if !names.insert(spec.name.clone()) {
            return Err(InvalidField::new(
                format!("{prefix}.name"),
                format!("service {:?} is defined twice", spec.name),
            ));
        }
        for frontend in &spec.frontends {
            if !frontends.insert(*frontend) {
                return Err(InvalidField::new(
                    format!("{prefix} {:?}.frontends", spec.name),
                    format!("{frontend} is already a frontend of another service"),
                ));
            }
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// Validates one service. `prefix` names it in errors (`service[2]` for the config file; empty
/// for an API body, whose fields are then named bare: `canary_percent`, `stable[1]`).
pub fn validate_service(
    service: &ServiceConfig,
    prefix: &str,
    cgroup_root: Option<&Path>,
) -> Result<ServiceSpec, InvalidField> {
    let name = &service.name;
    let join = |prefix: &str, field: &str| {
        if prefix.is_empty() {
            field.to_string()
        } else {
            format!("{prefix}.{field}")
        }
    };
    if !valid_name(name) {
        return Err(InvalidField::new(
            join(prefix, "name"),
            format!("{name:?} is not a valid name: use 1 to 63 of a-z, 0-9, '-', '_', '.'"),
        ));
    }
    let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix} {name:?}") };
    let field = |rest: &str| join(&prefix, rest);
    if let Some(kubernetes) = &service.kubernetes {
        // Addresses come from the cluster (discovery fills them in at run time).
        for (key, list) in [("frontends", &service.frontends), ("stable", &service.stable), ("canary", &service.canary)]
        {
            if !list.is_empty() {
                return Err(InvalidField::new(
                    field(key),
                    format!("a service takes `{key}` or `kubernetes`, not both: with `kubernetes` frontends and backends come from the cluster"),
                ));
            }
        }
        kubernetes.validate(&field("kubernetes"))?;
    }
    let frontends = parse_addrs(&service.frontends, &field("frontends"))?;
    if frontends.is_empty() && service.kubernetes.is_none() {
        return Err(InvalidField::new(field("frontends"), "at least one is required (or a `kubernetes` table)"));
    }
    let stable = parse_addrs(&service.stable, &field("stable"))?;
    let canary = parse_addrs(&service.canary, &field("canary"))?;
    for (side, addrs) in [("stable", &stable), ("canary", &canary)] {
        for v4 in [true, false] {
            let count = addrs.iter().filter(|a| a.is_ipv4() == v4).count();
            if count > MAX_BACKENDS_PER_SIDE as usize {
                return Err(InvalidField::new(
                    field(side),
                    format!("{count} IPv{} backends, at most {MAX_BACKENDS_PER_SIDE} per side", if v4 { 4 } else { 6 }),
                ));
            }
        }
    }
    let has_backends = !(stable.is_empty() && canary.is_empty());
    for frontend in &frontends {
        let same_family = stable.iter().chain(&canary).any(|b| b.is_ipv4() == frontend.is_ipv4());
        if has_backends && !same_family {
            return Err(InvalidField::new(
                field("frontends"),
                format!(
                    "{frontend} is IPv{} but the service has no IPv{} backend to send it to",
                    if frontend.is_ipv4() { 4 } else { 6 },
                    if frontend.is_ipv4() { 4 } else { 6 }
                ),
            ));
        }
    }
    // Weight 0 must mean no canary traffic: a family the canary serves and stable does not would
    // have nowhere else to go.
    for frontend in &frontends {
        let family = |a: &&SocketAddr| a.is_ipv4() == frontend.is_ipv4();
        if canary.iter().any(|a| family(&a)) && !stable.iter().any(|a| family(&a)) {
            let v = if frontend.is_ipv4() { 4 } else { 6 };
            return Err(InvalidField::new(
                field("stable"),
                format!(
                    "has no IPv{v} backend but canary does, and {frontend} is IPv{v}: at weight 0 (and for `never` \
                     cohorts) its traffic would have nowhere to go but the canary; add an IPv{v} stable backend, or \
                     remove the IPv{v} canary backends"
                ),
            ));
        }
    }
    let canary_ppm = validate_percent(service.canary_percent, &field("canary_percent"))?;
    validate_percent(service.max_operator_percent, &field("max_operator_percent"))?;
    let mut cohorts = Vec::with_capacity(service.cohorts.len());
    for (index, cohort) in service.cohorts.iter().enumerate() {
        let cgroups_field = field(&format!("cohort[{index}].cgroups"));
        if cohort.cgroups.is_empty() {
            return Err(InvalidField::new(cgroups_field, "at least one cgroup is required"));
        }
        let cgroup_ids = cohort
            .cgroups
            .iter()
            .enumerate()
            .map(|(i, cgroup)| resolve_cgroup(cgroup, cgroup_root, &format!("{cgroups_field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        cohorts.push(Cohort { cgroup_ids, canary: cohort.canary });
    }
    Ok(ServiceSpec {
        name: name.clone(),
        frontends,
        stable,
        canary,
        port_groups: Vec::new(),
        canary_ppm,
        affinity: service.affinity,
        cohorts,
        source: service.clone(),
    })
}

/// A canary percent: a finite number within 0..=100, kept to 4 decimals.
pub fn validate_percent(percent: f64, field: &str) -> Result<u32, InvalidField> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(InvalidField::new(field, format!("must be a number from 0 to 100, got {percent}")));
    }
    Ok(percent_to_ppm(percent))
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn parse_addrs(addrs: &[String], field: &str) -> Result<Vec<SocketAddr>, InvalidField> {
    let mut seen = HashSet::new();
    addrs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let field = format!("{field}[{i}]");
            let addr: SocketAddr = text
                .parse()
                .map_err(|_| InvalidField::new(&field, format!("{text:?} is not ip:port (IPv6 as [addr]:port)")))?;
            if addr.port() == 0 {
                return Err(InvalidField::new(&field, format!("{text:?} has port 0")));
            }
            if addr.ip().is_unspecified() {
                return Err(InvalidField::new(&field, format!("{text:?} is the unspecified address")));
            }
            if let SocketAddr::V6(v6) = addr {
                if v6.ip().to_ipv4_mapped().is_some() {
                    return Err(InvalidField::new(&field, format!("{text:?} is v4-mapped: write the IPv4 address")));
                }
            }
            if !seen.insert(addr) {
                return Err(InvalidField::new(&field, format!("{text:?} is listed twice")));
            }
            Ok(addr)
        })
        .collect()
}

fn resolve_cgroup(cgroup: &CgroupRef, cgroup_root: Option<&Path>, field: &str) -> Result<u64, InvalidField> {
    match cgroup {
        CgroupRef::Id(0) => Err(InvalidField::new(field, "cgroup id 0 is not valid")),
        CgroupRef::Id(id) => Ok(*id),
        CgroupRef::Path(path) => {
            let path = Path::new(path);
            let full = if path.is_absolute() {
                path.to_owned()
            } else {
                let root = cgroup_root
                    .ok_or_else(|| InvalidField::new(field, "relative cgroup path but no cgroup v2 root found"))?;
                root.join(path)
            };
            paths::cgroup_id(&full).map_err(|err| InvalidField::new(field, format!("cgroup {}: {err}", full.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [agent]
        cgroup = "/tmp"
        api = "127.0.0.1:9999"
        [[service]]
        name = "web"
        frontends = ["10.96.0.10:80", "[fd00::10]:80"]
        stable = ["10.0.1.5:8080", "[fd00::1:5]:8080"]
        canary = ["10.0.2.7:8080"]
        canary_percent = 12.3456
        affinity = "client"
    "#;

    fn error_of(text: &str) -> String {
        match Config::parse(text) {
            Ok(_) => panic!("config should be refused:\n{text}"),
            Err(err) => err.to_string(),
        }
    }

    fn with_service(service: &str) -> String {
        format!("[agent]\ncgroup = \"/tmp\"\n[[service]]\n{service}")
    }

    #[test]
    fn good_config_parses() {
        let config = Config::parse(GOOD).unwrap();
        assert_eq!(config.api, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(config.bpffs, PathBuf::from(paths::DEFAULT_BPFFS_DIR));
        let web = &config.services[0];
        assert_eq!(web.canary_ppm, 123_456);
        assert_eq!(web.affinity, Affinity::Client);
        assert_eq!(web.frontends.len(), 2);
    }

    #[test]
    fn defaults_apply() {
        let config =
            Config::parse(&with_service("name = \"a\"\nfrontends = [\"127.1.0.1:80\"]\nstable = [\"127.0.0.1:1\"]"))
                .unwrap();
        assert_eq!(config.api, paths::default_api());
        assert_eq!(config.services[0].canary_ppm, 0);
        assert_eq!(config.services[0].affinity, Affinity::Connection);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\ncanary_percent = 120.0", "service[0] \"a\".canary_percent"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\ncanary_percent = -1", "service[0] \"a\".canary_percent"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4\"]", "service[0] \"a\".frontends[0]"),
            ("name = \"a\"\nfrontends = []", "service[0] \"a\".frontends"),
            ("name = \"A b\"\nfrontends = [\"1.2.3.4:80\"]", "service[0].name"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\nstable = [\"1.2.3.4:0\"]", "service[0] \"a\".stable[0]"),
            ("name = \"a\"\nfrontends = [\"[fd00::1]:80\"]\nstable = [\"1.2.3.4:8\"]", "service[0] \"a\".frontends"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\naffinity = \"sticky\"", "affinity"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\ncanary_precent = 5", "canary_precent"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\ncanary_percent = \"5\"", "canary_percent"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\n[[service.cohort]]\ncgroups = [\"/nonexistent/x\"]\ncanary = \"always\"", "service[0] \"a\".cohort[0].cgroups[0]"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\ncanary = [\"1.2.3.5:80\"]", "service[0] \"a\".stable"),
            ("name = \"a\"\nfrontends = [\"1.2.3.4:80\", \"[fd00::1]:80\"]\nstable = [\"1.2.3.5:80\"]\ncanary = [\"1.2.3.6:80\", \"[fd00::6]:80\"]", "service[0] \"a\".stable"),
        ];
        for (service, field) in cases {
            let err = error_of(&with_service(service));
            assert!(err.contains(field), "error {err:?} should name {field}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let twice = "[agent]\ncgroup = \"/tmp\"\n\
            [[service]]\nname = \"a\"\nfrontends = [\"1.2.3.4:80\"]\n\
            [[service]]\nname = \"a\"\nfrontends = [\"1.2.3.5:80\"]\n";
        assert!(error_of(twice).contains("service[1].name"));
        let shared = "[agent]\ncgroup = \"/tmp\"\n\
            [[service]]\nname = \"a\"\nfrontends = [\"1.2.3.4:80\"]\n\
            [[service]]\nname = \"b\"\nfrontends = [\"1.2.3.4:80\"]\n";
        assert!(error_of(shared).contains("service[1] \"b\".frontends"));
    }

    #[test]
    fn datapath_log_defaults_off_and_names_bad_values() {
        assert_eq!(Config::parse("[agent]\ncgroup = \"/tmp\"").unwrap().datapath_log, DatapathLog::Off);
        let debug = Config::parse("[agent]\ncgroup = \"/tmp\"\ndatapath_log = \"debug\"").unwrap();
        assert_eq!(debug.datapath_log, DatapathLog::Debug);
        assert_eq!(debug.datapath_log.level(), agent_common::LOG_LEVEL_DEBUG);
        let error = error_of("[agent]\ncgroup = \"/tmp\"\ndatapath_log = \"verbose\"");
        assert!(error.contains("datapath_log") && error.contains("off"), "{error}");
    }

    #[test]
    fn agent_section_errors_name_the_field() {
        assert!(error_of("[agent]\ncgroup = \"/nonexistent\"").contains("agent.cgroup"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\napi = \"localhost\"").contains("agent.api"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\nbpffs = \"rel\"").contains("agent.bpffs"));
        assert!(error_of("[agent]\ncgroupp = \"/tmp\"").contains("cgroupp"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\nstate_dir = \"x\"").contains("agent.state_dir"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\nsteered_socket_capacity = 0")
            .contains("agent.steered_socket_capacity"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\nsteered_socket_capacity = 64\nsteered_sockets_per_netns = 65")
            .contains("agent.steered_sockets_per_netns"));
        let auth = "[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\nrole = \"operator\"\n";
        assert!(error_of(&format!("{auth}token = \"short\"")).contains("agent.auth.tokens[0].token"));
        assert!(error_of(auth).contains("agent.auth.tokens[0].token"));
        assert!(error_of(&format!("{auth}token = \"long-enough-token-1\"\nrole2 = 1")).contains("role2"));
        let ok = Config::parse(&format!("{auth}token = \"long-enough-token-1\"")).unwrap();
        assert_eq!(ok.tokens.unwrap()[0].role, Role::Operator);
    }

    #[test]
    fn toml_errors_never_show_a_secret() {
        let secret = "s3cr3t-value-do-not-log";
        let cases = [
            format!("[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\ntoken = {{ x = \"{secret}\" }}\nrole = \"viewer\""),
            format!("[agent]\ncgroup = \"/tmp\"\nauth = {{ tokens = [{{ name = \"ci\", token = \"{secret}\", role = \"admn\" }}] }}"),
            format!("[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\ntoken = \"{secret}"),
            format!("[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\ntoken = [\"{secret}\"]\nrole = \"viewer\""),
            "[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\ntoken = 123456789012345678\nrole = \"viewer\"".to_string(),
        ];
        for text in &cases {
            let err = error_of(text);
            assert!(!err.contains(secret) && !err.contains("123456789012345678"), "{err}");
            assert!(err.contains("line "), "{err}");
        }
        let config = Config::parse(&format!(
            "[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\ntoken = \"{secret}\"\nrole = \"viewer\""
        ))
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(secret), "Debug shows the secret: {shown}");
    }

    #[test]
    fn token_rules() {
        let agent = "[agent]\ncgroup = \"/tmp\"\n";
        let token = |name: &str, secret: &str, role: &str| {
            format!("[[agent.auth.tokens]]\nname = \"{name}\"\ntoken = \"{secret}\"\nrole = \"{role}\"\n")
        };
        let short = error_of(&format!("{agent}{}", token("a", "fifteen-chars-x", "viewer")));
        assert!(short.contains("agent.auth.tokens[0].token") && short.contains("16"), "{short}");
        assert!(!short.contains("fifteen-chars-x"), "{short}");
        let twice = error_of(&format!(
            "{agent}{}{}",
            token("admin", "same-secret-0000001", "release"),
            token("dashboard", "same-secret-0000001", "viewer")
        ));
        assert!(twice.contains("agent.auth.tokens[1].token") && twice.contains("\"admin\""), "{twice}");
        assert!(error_of(&format!("{agent}{}", token("a", " spaced-secret-00001", "viewer"))).contains("printable"));
        // No auth on a non-loopback address: refused unless the opt-out is set.
        let open = error_of(&format!("{agent}api = \"0.0.0.0:9477\""));
        assert!(open.contains("agent.api") && open.contains("[agent.auth]"), "{open}");
        assert!(
            Config::parse(&format!("{agent}api = \"0.0.0.0:9477\"\ninsecure_allow_unauthenticated_api = true")).is_ok()
        );
        assert!(Config::parse(&format!(
            "{agent}api = \"10.1.2.3:9477\"\n{}",
            token("a", "a-long-enough-token", "viewer")
        ))
        .is_ok());
        assert!(Config::parse(&format!("{agent}api = \"[::1]:9477\"")).is_ok());
        // Token files: mode and owner checked, content trimmed.
        let dir = std::env::temp_dir().join(format!("sockshift-token-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ci");
        std::fs::write(&file, "from-a-file-token-01\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let with_file = format!(
            "{agent}[[agent.auth.tokens]]\nname = \"ci\"\ntoken_file = {:?}\nrole = \"operator\"\n",
            file.display().to_string()
        );
        let loose = error_of(&with_file);
        assert!(loose.contains(&file.display().to_string()) && loose.contains("0644"), "{loose}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        let config = Config::parse(&with_file).unwrap();
        assert_eq!(config.tokens.unwrap()[0].digest, TokenDigest::of(b"from-a-file-token-01"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_and_webhook_keys_are_validated() {
        let agent = "[agent]\ncgroup = \"/tmp\"\n";
        let config = Config::parse(&format!(
            "{agent}prometheus = \"http://127.0.0.1:9090\"\nprometheus_timeout_seconds = 2.5\n\
             webhook_allow = [\"127.0.0.1:9000\", \"hooks.example.svc:80\"]"
        ))
        .unwrap();
        let prometheus = config.prometheus.unwrap();
        assert_eq!((prometheus.url.port, prometheus.timeout), (9090, std::time::Duration::from_millis(2500)));
        assert!(!config.webhook_allow.is_empty());
        let none = Config::parse(agent).unwrap();
        assert!(none.prometheus.is_none() && none.webhook_allow.is_empty());
        assert!(error_of(&format!("{agent}prometheus = \"https://p:9090\"")).contains("agent.prometheus:"));
        assert!(error_of(&format!("{agent}prometheus_bearer_token_file = \"/x\""))
            .contains("agent.prometheus_bearer_token_file"));
        assert!(
            error_of(&format!("{agent}prometheus_timeout_seconds = 1.0")).contains("agent.prometheus_timeout_seconds")
        );
        assert!(
            error_of(&format!("{agent}webhook_allow = [\"169.254.169.254:80\"]")).contains("agent.webhook_allow[0]")
        );
        assert!(error_of(&format!("{agent}webhook_allow = [\"hooks\"]")).contains("agent.webhook_allow[0]"));
    }

    #[test]
    fn the_example_config_is_valid() {
        let example = include_str!("../../config/sockshift.toml");
        let config = Config::parse(example).unwrap_or_else(|e| panic!("config/sockshift.toml: {e}"));
        assert_eq!(config.services[0].name, "web");
        assert_eq!(config.services[0].source.max_operator_percent, 25.0);
    }

    #[test]
    fn cluster_mode_is_opt_in_and_refuses_file_services() {
        assert!(Config::parse(GOOD).unwrap().cluster.is_none(), "no [cluster]: single node");
        let cluster = "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"worker-1\"\n";
        let config = Config::parse(&format!("[agent]\ncgroup = \"/tmp\"\n{cluster}")).unwrap();
        let settings = config.cluster.expect("[cluster] turns cluster mode on");
        assert_eq!((settings.node.as_str(), settings.prefix.as_str()), ("worker-1", "/sockshift"));
        let err = error_of(&format!("{GOOD}\n{cluster}"));
        assert!(
            err.starts_with("service:") && err.contains("sockshift apply -f") && err.contains("PUT /v1/services/"),
            "{err}"
        );
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\n[cluster]\netcd = []").contains("cluster.etcd"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\n[cluster]\netcd = [\"http://a:1\"]\nfoo = 1").contains("foo"));
    }

    #[test]
    fn kubernetes_services_parse() {
        let config = Config::parse(&with_service(
            "name = \"web\"\ncanary_percent = 5.0\n[service.kubernetes]\nnamespace = \"shop\"\nfrontend = \"web\"\n\
             stable = \"web-stable\"\ncanary = \"web-canary\"\nports = [\"http\", 443]",
        ))
        .unwrap();
        let web = &config.services[0];
        assert!(web.frontends.is_empty() && web.stable.is_empty(), "addresses come from discovery");
        let k8s = web.source.kubernetes.as_ref().unwrap();
        assert_eq!(k8s.frontend_ref(), "shop/web");
        assert_eq!(k8s.ports, [PortSelector::Name("http".into()), PortSelector::Number(443)]);
    }

    #[test]
    fn the_example_kubernetes_service_is_valid() {
        // The commented-out example at the end of config/sockshift.toml, uncommented.
        let example = include_str!("../../config/sockshift.toml");
        let start = example.find("# [[service]]\n# name = \"shop\"").expect("the example is in config/sockshift.toml");
        let service: String = example[start..].lines().map(|l| format!("{}\n", l.trim_start_matches("# "))).collect();
        let config = Config::parse(&format!("[agent]\ncgroup = \"/tmp\"\n{service}"))
            .unwrap_or_else(|e| panic!("{e}\n{service}"));
        let kubernetes = config.services[0].source.kubernetes.as_ref().unwrap();
        assert_eq!((kubernetes.frontend.as_str(), kubernetes.canary.as_deref()), ("web", Some("web-canary")));
    }

    #[test]
    fn kubernetes_errors_name_the_field() {
        let k8s = "[service.kubernetes]\nnamespace = \"shop\"\nfrontend = \"web\"\nstable = \"web-stable\"\n";
        let cases = [
            (format!("name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\n{k8s}"), "service[0] \"a\".frontends"),
            (format!("name = \"a\"\nstable = [\"1.2.3.4:80\"]\n{k8s}"), "service[0] \"a\".stable"),
            (format!("name = \"a\"\n{k8s}ports = [0]"), "service[0] \"a\".kubernetes.ports[0]"),
            (format!("name = \"a\"\n{k8s}namespace2 = \"x\""), "namespace2"),
            ("name = \"a\"\n[service.kubernetes]\nnamespace = \"shop\"\nfrontend = \"web\"".to_string(), "stable"),
            ("name = \"a\"\n".to_string(), "service[0] \"a\".frontends"),
        ];
        for (service, field) in cases {
            let err = error_of(&with_service(&service));
            assert!(err.contains(field), "error {err:?} should name {field}");
        }
        let err = error_of("[agent]\ncgroup = \"/tmp\"\nkubeconfig = \"/nonexistent/kubeconfig\"");
        assert!(err.contains("agent.kubeconfig"), "{err}");
    }

    #[test]
    fn cohorts_resolve_ids_and_paths() {
        let config = Config::parse(&with_service(
            "name = \"a\"\nfrontends = [\"1.2.3.4:80\"]\n[[service.cohort]]\ncgroups = [42, \"/tmp\"]\ncanary = \"never\"",
        ))
        .unwrap();
        let cohort = &config.services[0].cohorts[0];
        assert_eq!(cohort.cgroup_ids[0], 42);
        assert_eq!(cohort.cgroup_ids[1], paths::cgroup_id(Path::new("/tmp")).unwrap());
        assert_eq!(cohort.canary, CohortCanary::Never);
    }
}
