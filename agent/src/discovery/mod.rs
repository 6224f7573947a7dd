//! Kubernetes discovery: services whose frontends and backends are named by Kubernetes objects.
//!
//! Like kube-proxy, each agent watches the Services and `discovery.k8s.io/v1` EndpointSlices it
//! needs (only those: one field-selected Service watch per frontend Service, one label-selected
//! EndpointSlice watch per backend Service) with kube-rs' watcher and reflector, and turns them
//! into frontends (the Service's ClusterIPs and ports) and backends (the ready endpoints, with
//! target ports matched by port name as kube-proxy does).
//!
//! Split of responsibilities:
//! - `spec`: the `[service.kubernetes]` table and its validation.
//! - `resolve`: pure functions from Kubernetes objects to port groups (unit-tested).
//! - `watch`: the watch tasks and the loop that sends each service's result to the control core
//!   through ONE command (`Command::SetDiscovered`), only when it changed.
//! - `Discovery` (here): what the control core keeps of it, owned by the core like the rest of
//!   its state. The core overlays the discovered addresses on the desired services before they
//!   reach the datapath, and publishes the references to watch. The discovered addresses are
//!   runtime facts of this node, never desired state: not in `state.json` nor in a cluster store
//!   (only in a node-local cache that a restarted agent starts from), and in cluster mode each
//!   node has its own (weights and rollouts come from the store; backends from the node's own
//!   watch). sockshift never writes a Kubernetes object.

mod resolve;
mod spec;
mod watch;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
pub use spec::{KubernetesConfig, PortSelector};
use utoipa::ToSchema;
pub use watch::run;

use crate::{
    config::{PortGroup, ServiceConfig, ServiceSpec},
    control::now_ms,
};

/// What each Kubernetes service should be built from: the services the core holds that have a
/// `kubernetes` table. The core publishes it on every change; the watch loop follows it.
pub type Wanted = BTreeMap<String, KubernetesConfig>;

/// Where a Kubernetes service stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryState {
    /// The Service and its endpoints are known and steered.
    Synced,
    /// Not steering yet: the Service does not exist (yet), or is not listed yet, or there are no
    /// credentials. `message` says which.
    Waiting,
    /// The Service exists but cannot be steered (headless, ExternalName, no such port).
    Refused,
    /// The API server cannot be reached: steering goes on with the last state it gave.
    Stale,
}

/// One service's discovery result, sent by the watch loop to the core.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// The table this was built from: a result for an older table is ignored.
    pub reference: KubernetesConfig,
    pub state: DiscoveryState,
    /// Why waiting or refused, what is stale, or a note (a port without ready endpoints).
    pub message: Option<String>,
    /// Unix ms since the API server has been unreachable (only `Stale`).
    pub stale_since_ms: Option<u64>,
    /// Frontends and backends per Service port; while stale, the last state the API server gave.
    pub groups: Vec<PortGroup>,
    /// The watches have listed their objects, so `groups` is what the API server says. `false`:
    /// nothing is known yet (just started, no credentials, the first list fails), and the core
    /// keeps steering with what it had (from before a restart).
    pub listed: bool,
}

/// The `kubernetes` object of `GET /v1/services/{name}`: the service's `kubernetes` table and
/// where its discovery stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiscoveryStatus {
    // The table's fields one by one rather than flattened: the table's schema refuses unknown
    // fields (as a request body must), which a flattened `allOf` would apply to these too.
    pub namespace: String,
    pub frontend: String,
    pub stable: String,
    pub canary: Option<String>,
    /// The selected ports; empty: all of them.
    pub ports: Vec<PortSelector>,
    pub state: DiscoveryState,
    /// Why `waiting` or `refused`; `kubernetes: stale since ...` while `stale`; notes (a port
    /// without ready endpoints, a frontend another service has).
    pub message: Option<String>,
    /// RFC 3339, set while `stale`.
    pub stale_since: Option<String>,
    /// Backend-set switches discovery made in the datapath since the agent started.
    pub changes_applied: u64,
    /// RFC 3339 time of the last of them.
    pub last_change: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    update: Discovered,
    changes_applied: u64,
    last_change_ms: Option<u64>,
}

/// The control core's side of discovery: the last result per service, and the channel that
/// tells the watch loop which services to watch for.
#[derive(Debug)]
pub struct Discovery {
    entries: BTreeMap<String, Entry>,
    wanted: tokio::sync::watch::Sender<Wanted>,
    /// Node-local cache of the last listed addresses (`paths::DISCOVERED_CACHE_FILE`).
    cache: Option<PathBuf>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self { entries: BTreeMap::new(), wanted: tokio::sync::watch::Sender::new(Wanted::new()), cache: None }
    }
}

/// The cache file: what was listed last, per service.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    saved_unix_ms: u64,
    services: BTreeMap<String, CachedService>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedService {
    reference: KubernetesConfig,
    groups: Vec<PortGroup>,
}

impl Discovery {
    /// Starts from the addresses cached in `state_dir` by the previous run, so that a restarted
    /// agent steers Kubernetes services with their last known state until its watches have
    /// listed (fail static, also when the API server is down during the restart). They are
    /// reported `stale` until then.
    pub fn restore(state_dir: &Path) -> Self {
        let path = state_dir.join(crate::paths::DISCOVERED_CACHE_FILE);
        let cache: Cache = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                log::warn!("ignoring {}: {err}", path.display());
                Cache::default()
            }),
            Err(_) => Cache::default(),
        };
        let entries = cache
            .services
            .into_iter()
            .map(|(name, cached)| {
                let update = Discovered {
                    reference: cached.reference,
                    state: DiscoveryState::Stale,
                    message: Some(
                        "restored from before the agent restarted; not listed from the API server yet".into(),
                    ),
                    stale_since_ms: Some(cache.saved_unix_ms),
                    groups: cached.groups,
                    listed: false,
                };
                (name, Entry { update, changes_applied: 0, last_change_ms: None })
            })
            .collect();
        Self { entries, cache: Some(path), ..Self::default() }
    }

    fn save_cache(&self) {
        let Some(path) = &self.cache else { return };
        let services = self
            .entries
            .iter()
            .filter(|(_, e)| e.update.listed)
            .map(|(name, e)| {
                (name.clone(), CachedService { reference: e.update.reference.clone(), groups: e.update.groups.clone() })
            })
            .collect();
        let cache = Cache { saved_unix_ms: now_ms(), services };
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&cache)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(err) = written {
            log::warn!("writing the discovery cache {}: {err}", path.display());
        }
    }

    /// The services to watch for, updated whenever the core's services change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Wanted> {
        self.wanted.subscribe()
    }

    /// Called by the core after a change of its services' `kubernetes` tables: drops results of
    /// services that are gone or now name other objects, and tells the watch loop.
    pub fn publish_wanted<'a>(&mut self, services: impl Iterator<Item = &'a ServiceConfig>) {
        let wanted: Wanted =
            services.filter_map(|s| Some((s.name.clone(), s.kubernetes.as_deref()?.clone()))).collect();
        self.entries.retain(|name, entry| wanted.get(name) == Some(&entry.update.reference));
        self.wanted.send_if_modified(|current| {
            let changed = *current != wanted;
            *current = wanted;
            changed
        });
    }

    /// Stores a result; `false` when it is for a service or table the core no longer has.
    pub fn record(&mut self, service: &ServiceConfig, update: Discovered) -> bool {
        if service.kubernetes.as_deref() != Some(&update.reference) {
            return false;
        }
        let entry = self.entries.entry(service.name.clone()).or_insert_with(|| Entry {
            update: update.clone(),
            changes_applied: 0,
            last_change_ms: None,
        });
        if !update.listed && !entry.update.listed && !entry.update.groups.is_empty() {
            // Nothing listed yet since the restart: keep steering with the restored addresses.
            let why = update.message.unwrap_or_default();
            entry.update.message = Some(format!("{why}; steering with the state from before the agent restarted"));
            return true;
        }
        let save = update.listed && (!entry.update.listed || entry.update.groups != update.groups);
        entry.update = update;
        if save {
            self.save_cache();
        }
        true
    }

    /// Counts a backend-set switch made because of discovery.
    pub fn note_applied(&mut self, name: &str, now_ms: u64) {
        if let Some(entry) = self.entries.get_mut(name) {
            entry.changes_applied += 1;
            entry.last_change_ms = Some(now_ms);
        }
    }

    /// Fills a Kubernetes service's addresses from its last result; a hand-written service
    /// (or one without a result for its current table) is left as it is. A discovered frontend
    /// for which `taken` holds (another service has it) is left out: the core's status of the
    /// service names it.
    pub fn overlay(&self, spec: &mut ServiceSpec, taken: impl Fn(&SocketAddr) -> bool) {
        let Some(entry) = self.entry(&spec.source) else { return };
        let groups: Vec<PortGroup> = entry
            .update
            .groups
            .iter()
            .map(|group| PortGroup {
                frontends: group.frontends.iter().copied().filter(|f| !taken(f)).collect(),
                ..group.clone()
            })
            .collect();
        fill_spec(spec, groups);
    }

    /// The result for `service`'s current `kubernetes` table, if any.
    fn entry(&self, service: &ServiceConfig) -> Option<&Entry> {
        let reference = service.kubernetes.as_deref()?;
        self.entries.get(&service.name).filter(|e| e.update.reference == *reference)
    }

    /// Every frontend discovery found for `service`.
    pub fn frontends(&self, service: &ServiceConfig) -> Vec<SocketAddr> {
        self.entry(service)
            .map(|e| e.update.groups.iter().flat_map(|g| g.frontends.iter().copied()).collect())
            .unwrap_or_default()
    }

    /// The services discovery has reported on.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// The status of a Kubernetes service, `None` for others; `note` is added to its message
    /// (the core's word on frontends the service does not steer).
    pub fn status(&self, service: &ServiceConfig, note: Option<String>) -> Option<DiscoveryStatus> {
        let KubernetesConfig { namespace, frontend, stable, canary, ports } = *service.kubernetes.clone()?;
        let Some(entry) = self.entry(service) else {
            return Some(DiscoveryStatus {
                namespace,
                frontend,
                stable,
                canary,
                ports,
                state: DiscoveryState::Waiting,
                message: Some("waiting for the first answer from the Kubernetes API server".into()),
                stale_since: None,
                changes_applied: 0,
                last_change: None,
            });
        };
        let update = &entry.update;
        let stale_since = update.stale_since_ms.map(rfc3339);
        let mut message = match (&stale_since, &update.message) {
            (Some(since), Some(why)) => Some(format!("kubernetes: stale since {since}: {why}")),
            (_, message) => message.clone(),
        };
        if let Some(note) = note {
            message = Some(match message {
                Some(m) => format!("{m}; {note}"),
                None => note,
            });
        }
        Some(DiscoveryStatus {
            namespace,
            frontend,
            stable,
            canary,
            ports,
            state: update.state,
            message,
            stale_since,
            changes_applied: entry.changes_applied,
            last_change: entry.last_change_ms.map(rfc3339),
        })
    }

    /// Whether a service's watch is stale, for the metrics.
    pub fn is_stale(&self, name: &str) -> Option<bool> {
        self.entries.get(name).map(|e| e.update.state == DiscoveryState::Stale)
    }

    /// Backend-set switches discovery made for a service, for the metrics.
    pub fn changes_applied(&self, name: &str) -> u64 {
        self.entries.get(name).map_or(0, |e| e.changes_applied)
    }
}

/// Sets a spec's addresses from port groups: the unions for display, health and connection
/// termination, the groups for the datapath.
fn fill_spec(spec: &mut ServiceSpec, groups: Vec<PortGroup>) {
    let union = |pick: fn(&PortGroup) -> &Vec<SocketAddr>| {
        let mut all: Vec<SocketAddr> = Vec::new();
        for addr in groups.iter().flat_map(|g| pick(g).iter()) {
            if !all.contains(addr) {
                all.push(*addr);
            }
        }
        all
    };
    spec.frontends = union(|g| &g.frontends);
    spec.stable = union(|g| &g.stable);
    spec.canary = union(|g| &g.canary);
    spec.port_groups = groups;
}

fn rfc3339(unix_ms: u64) -> String {
    jiff::Timestamp::from_millisecond(i64::try_from(unix_ms).unwrap_or(i64::MAX))
        .map(|t| t.round(jiff::Unit::Millisecond).unwrap_or(t).to_string())
        .unwrap_or_default()
}
