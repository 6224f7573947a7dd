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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not valid: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
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
    /// Bearer tokens and their roles; unset: the API is open (it listens on loopback).
    pub auth: Option<AuthSection>,
    /// Prometheus server metric gates query (`http://host:port`, optionally with a path prefix);
    /// unset: plans with metric gates are refused. Only here, never in a plan.
    pub prometheus: Option<String>,
    /// File holding a bearer token sent to Prometheus (mode 0600 or stricter); unset: none.
    pub prometheus_bearer_token_file: Option<PathBuf>,
    /// Seconds a Prometheus query may take; unset: 5.
    pub prometheus_timeout_seconds: Option<f64>,
    /// `host:port` pairs webhooks (notifications and checks) may reach; empty: none.
    pub webhook_allow: Vec<String>,
    /// Kubeconfig for Kubernetes discovery; unset: `KUBECONFIG`, else the in-cluster service
    /// account (the DaemonSet's).
    pub kubeconfig: Option<PathBuf>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            cgroup: None,
            api: paths::DEFAULT_API.to_string(),
            bpffs: PathBuf::from(paths::DEFAULT_BPFFS_DIR),
            state_dir: PathBuf::from(paths::DEFAULT_STATE_DIR),
            auth: None,
            prometheus: None,
            prometheus_bearer_token_file: None,
            prometheus_timeout_seconds: None,
            webhook_allow: Vec::new(),
            kubeconfig: None,
        }
    }
}

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
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub role: Role,
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

/// A validated token.
#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    pub secret: String,
    pub role: Role,
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
    /// `None`: no authentication.
    pub tokens: Option<Vec<Token>>,
    pub services: Vec<ServiceSpec>,
    /// `None`: no Prometheus, so no metric gates.
    pub prometheus: Option<PrometheusEndpoint>,
    pub webhook_allow: AllowList,
    /// `Some`: cluster mode (`[cluster]`); the config file then holds no services.
    pub cluster: Option<ClusterSettings>,
    /// `agent.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
}

impl Config {
    /// Reads and validates a config file. Nothing is touched on error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|err| match err {
            ParseError::Toml(source) => ConfigError::Parse { path: path.to_owned(), source },
            ParseError::Invalid(source) => ConfigError::Invalid { path: path.to_owned(), source },
        })
    }

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let file: ConfigFile = toml::from_str(text).map_err(ParseError::Toml)?;
        let cgroup = match file.agent.cgroup {
            Some(path) => path,
            None => paths::cgroup2_root()
                .map_err(|err| InvalidField::new("agent.cgroup", format!("not set and cannot be detected: {err}")))?,
        };
        if !cgroup.is_dir() {
            return Err(InvalidField::new("agent.cgroup", format!("{} is not a directory", cgroup.display())).into());
        }
        let api =
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
            services,
            prometheus,
            webhook_allow,
            cluster,
            kubeconfig: file.agent.kubeconfig,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Toml(toml::de::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidField),
}

fn validate_tokens(auth: &AuthSection) -> Result<Vec<Token>, InvalidField> {
    if auth.tokens.is_empty() {
        return Err(InvalidField::new("agent.auth.tokens", "at least one token is required when [agent.auth] is set"));
    }
    let mut names = HashSet::new();
    let mut tokens = Vec::new();
    for (i, token) in auth.tokens.iter().enumerate() {
        let field = |rest: &str| format!("agent.auth.tokens[{i}].{rest}");
        if token.name.is_empty() || !names.insert(token.name.clone()) {
            return Err(InvalidField::new(field("name"), format!("{:?} is empty or used twice", token.name)));
        }
        let secret = match (&token.token, &token.token_file) {
            (Some(secret), None) => secret.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|err| InvalidField::new(field("token_file"), format!("{}: {err}", path.display())))?
                .trim()
                .to_string(),
            _ => return Err(InvalidField::new(field("token"), "set exactly one of `token` and `token_file`")),
        };
        if secret.len() < 8 {
            return Err(InvalidField::new(field("token"), "must be at least 8 characters"));
        }
        tokens.push(Token { name: token.name.clone(), secret, role: token.role });
    }
    Ok(tokens)
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
    fn agent_section_errors_name_the_field() {
        assert!(error_of("[agent]\ncgroup = \"/nonexistent\"").contains("agent.cgroup"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\napi = \"localhost\"").contains("agent.api"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\nbpffs = \"rel\"").contains("agent.bpffs"));
        assert!(error_of("[agent]\ncgroupp = \"/tmp\"").contains("cgroupp"));
        assert!(error_of("[agent]\ncgroup = \"/tmp\"\nstate_dir = \"x\"").contains("agent.state_dir"));
        let auth = "[agent]\ncgroup = \"/tmp\"\n[[agent.auth.tokens]]\nname = \"a\"\nrole = \"operator\"\n";
        assert!(error_of(&format!("{auth}token = \"short\"")).contains("agent.auth.tokens[0].token"));
        assert!(error_of(auth).contains("agent.auth.tokens[0].token"));
        assert!(error_of(&format!("{auth}token = \"longenough\"\nrole2 = 1")).contains("role2"));
        let ok = Config::parse(&format!("{auth}token = \"longenough\"")).unwrap();
        assert_eq!(ok.tokens.unwrap()[0].role, Role::Operator);
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
