//! The API's bodies: what requests carry and what responses hold. The server builds them, the
//! CLI and the tests deserialize them, and the OpenAPI document is generated from them.

use std::collections::BTreeMap;

use agent_common::SideCounters;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    audit::AuditEntry,
    config::{Affinity, CohortConfig, KubernetesConfig, Role, ServiceConfig},
    datapath::{ForeignProgram, LinkOutcome, MapMemory},
    discovery::DiscoveryStatus,
    rollout::{ExternalWindow, GateReadings, Harm, HistoryEntry, Judgement, Plan, RolloutState},
};

/// `PUT /v1/services/{name}/canary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanaryUpdate {
    /// The canary weight in percent, 0 to 100 (4 decimals kept).
    #[schema(minimum = 0, maximum = 100, example = 12.5)]
    pub percent: f64,
}

/// The body of routes that take no input: nothing, or `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

/// `PUT /v1/services/{name}`: a `[[service]]` table of the config file, as JSON. `name` may be
/// left out (the path gives it); if given it must match the path. A service has either
/// `frontends` (with `stable` and `canary` addresses) or a `kubernetes` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Addresses clients connect to (`ip:port`, `[v6]:port`); empty or left out with
    /// `kubernetes`.
    #[serde(default)]
    pub frontends: Vec<String>,
    #[serde(default)]
    pub stable: Vec<String>,
    #[serde(default)]
    pub canary: Vec<String>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub canary_percent: f64,
    #[serde(default)]
    pub affinity: Affinity,
    /// Highest weight an `operator` token may set. Left out: the replaced service's cap is kept
    /// (100 for a new service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 100)]
    pub max_operator_percent: Option<f64>,
    /// Cohort overrides: `{ "cgroups": [...], "canary": "always" | "never" }`.
    #[serde(default, rename = "cohort", skip_serializing_if = "Vec::is_empty")]
    pub cohorts: Vec<CohortConfig>,
    /// Frontends and backends from Kubernetes Services instead of `frontends`, `stable` and
    /// `canary`: the ClusterIPs and ports of `frontend`, the ready endpoints of `stable` and
    /// `canary`, all in `namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
}

impl ServiceBody {
    /// The service this body describes, for the service `name` of the path.
    pub fn into_config(self, name: String, current_max_operator_percent: Option<f64>) -> ServiceConfig {
        ServiceConfig {
            name,
            frontends: self.frontends,
            stable: self.stable,
            canary: self.canary,
            canary_percent: self.canary_percent,
            affinity: self.affinity,
            max_operator_percent: self.max_operator_percent.or(current_max_operator_percent).unwrap_or(100.0),
            cohorts: self.cohorts,
            kubernetes: self.kubernetes.map(Box::new),
        }
    }
}

impl From<&ServiceConfig> for ServiceBody {
    fn from(config: &ServiceConfig) -> Self {
        Self {
            name: Some(config.name.clone()),
            frontends: config.frontends.clone(),
            stable: config.stable.clone(),
            canary: config.canary.clone(),
            canary_percent: config.canary_percent,
            affinity: config.affinity,
            max_operator_percent: Some(config.max_operator_percent),
            cohorts: config.cohorts.clone(),
            kubernetes: config.kubernetes.as_deref().cloned(),
        }
    }
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `failing` (answered with 503).
    pub status: String,
    /// `ok`; `stuck` when the control core did not answer in time; `dead` when it has stopped.
    pub core: String,
    /// Background tasks that stopped although the agent is not shutting down, with why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_tasks: BTreeMap<String, String>,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    pub services: Vec<ServiceState>,
    /// Cluster mode only: `true` when etcd cannot be reached and this is the state the node last
    /// applied (it keeps steering with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<bool>,
    /// Cluster mode only: every change up to this etcd revision is applied on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of_revision: Option<u64>,
}

/// One service: its configuration, current weight and what the kernel counted per side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceState {
    pub name: String,
    pub canary_percent: f64,
    /// The weight as the datapath holds it: parts per million.
    pub canary_ppm: u32,
    pub affinity: Affinity,
    pub max_operator_percent: f64,
    /// The frontends the datapath steers (for a Kubernetes service: discovered).
    pub frontends: Vec<String>,
    pub stable: Vec<String>,
    pub canary: Vec<String>,
    pub cohorts: Vec<CohortConfig>,
    /// The datapath revision of the service's backend set: its first slot in the backend array
    /// (changes when backends, affinity or cohorts change, not with the weight; a number is
    /// reused once the revision that had it is gone, so compare for inequality only).
    pub revision: u32,
    /// A Kubernetes service's table and discovery status; null for services written with
    /// addresses.
    pub kubernetes: Option<DiscoveryStatus>,
    pub sides: Sides,
    /// Cluster mode only: `true` when etcd cannot be reached and this is the state the node last
    /// applied (it keeps steering with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<bool>,
    /// Cluster mode only: every change up to this etcd revision is applied on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of_revision: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sides {
    pub stable: SideState,
    pub canary: SideState,
}

/// What the kernel counted for one side of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SideState {
    /// `connect()` calls steered to this side (TCP and connected UDP).
    pub connections_steered: u64,
    /// Datagrams of unconnected UDP sockets steered to this side.
    pub datagrams_steered: u64,
    /// Steered sockets of this side whose socket records are open now (TCP until the kernel
    /// closes the connection, connected UDP until the socket is released).
    pub open_socket_records: u64,
    pub health: SideHealth,
    pub unrecorded: Unrecorded,
    pub fail_open: FailOpen,
}

/// TCP health as the kernel measured it on steered connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SideHealth {
    /// Connections that reached ESTABLISHED.
    pub established: u64,
    /// Attempts that never established (refused, or timed out by the kernel).
    pub failed_attempts: u64,
    /// Attempts the client gave up while still in SYN_SENT (its own connect timeout fired
    /// first); rollout gates count them as failures.
    pub abandoned_attempts: u64,
    /// Established connections reset by the peer.
    pub resets: u64,
    pub retransmission_timeouts: u64,
    /// Connections that had at least one retransmission timeout.
    pub connections_with_rto: u64,
    /// Average smoothed RTT over the samples below; null before the first sample.
    pub srtt_avg_us: Option<u64>,
    /// Sum and count of non-zero smoothed RTT samples, microseconds: one when a connection is
    /// established, one when it closes.
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
    /// The at-close part of the above (the RTT over each connection's whole life).
    pub srtt_close_sum_us: u64,
    pub srtt_close_samples: u64,
}

/// Sockets steered without a socket record, by reason: each went to its backend, but its
/// `getpeername()` shows the backend and its health is not counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Unrecorded {
    /// The socket table was full (`agent.steered_socket_capacity`); for datagrams of unconnected
    /// UDP sockets, the UDP flow table.
    pub socket_table_full: u64,
    /// The client's network namespace held its share of the table
    /// (`agent.steered_sockets_per_netns`).
    pub socket_netns_full: u64,
}

/// Calls left untouched because of a datapath problem, by reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailOpen {
    /// The chosen backend slot was missing (a revision being retired).
    pub backend_missing: u64,
}

impl From<&SideCounters> for SideState {
    fn from(c: &SideCounters) -> Self {
        Self {
            connections_steered: c.connections_steered,
            datagrams_steered: c.datagrams_steered,
            open_socket_records: c.open_socket_records(),
            health: SideHealth {
                established: c.established,
                failed_attempts: c.failed_attempts,
                abandoned_attempts: c.abandoned_attempts,
                resets: c.resets,
                retransmission_timeouts: c.rto,
                connections_with_rto: c.rto_connections,
                srtt_avg_us: c.srtt_sum_us.checked_div(c.srtt_samples),
                srtt_sum_us: c.srtt_sum_us,
                srtt_samples: c.srtt_samples,
                srtt_close_sum_us: c.srtt_close_sum_us,
                srtt_close_samples: c.srtt_close_samples,
            },
            unrecorded: Unrecorded { socket_table_full: c.table_full(), socket_netns_full: c.socket_netns_full },
            fail_open: FailOpen { backend_missing: c.fail_open_backend_missing },
        }
    }
}

/// `GET /v1/datapath`: the datapath as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DatapathStatus {
    /// Services in the datapath.
    pub services: usize,
    /// The cgroup v2 directory the programs are attached to.
    pub cgroup: String,
    /// Socket records open now: steered TCP and connected UDP sockets (removed services'
    /// included).
    pub open_steered_sockets: u64,
    /// Size of the socket table as pinned in the kernel (not the configured value, if they
    /// differ); when full, new sockets are still steered but not recorded
    /// (`unrecorded.socket_table_full`).
    pub steered_socket_capacity: u32,
    /// Most socket records one client network namespace may hold
    /// (`agent.steered_sockets_per_netns`); 0: no bound.
    pub steered_sockets_per_netns: u32,
    /// Reply translations of unconnected UDP sockets held now.
    pub udp_flows: usize,
    /// Size of the UDP flow table as pinned (least recently used flows are evicted when full).
    pub udp_flow_capacity: u32,
    /// Ids of removed services not handed out again until their open sockets have closed.
    pub draining_service_ids: usize,
    /// Only the host network namespace is steered (`agent.host_netns_only`).
    pub host_netns_only: bool,
    /// What the programs log into the agent's log, target `datapath` (`agent.datapath_log`).
    pub datapath_log: crate::config::DatapathLog,
    /// What happened to each program's pinned link at start, by program.
    pub links: BTreeMap<String, LinkOutcome>,
    /// Other programs on sockshift's hooks for this cgroup (another socket load balancer): which
    /// one steers a connection depends on the order they run in.
    pub foreign_programs: Vec<ForeignProgram>,
    /// Kernel memory of all the datapath's maps, bytes, as the kernel charges it (the sum of
    /// `maps`). No map is per CPU, so it does not grow with the node's CPU count; see "Map
    /// memory" in the README for the formula per service.
    pub map_memory_bytes: u64,
    /// Each pinned map with its size and kernel memory.
    pub maps: Vec<MapMemory>,
}

impl From<crate::datapath::DatapathStatus> for DatapathStatus {
    fn from(status: crate::datapath::DatapathStatus) -> Self {
        Self {
            services: status.services,
            cgroup: status.cgroup.display().to_string(),
            open_steered_sockets: status.open_steered_sockets,
            steered_socket_capacity: status.steered_socket_capacity,
            steered_sockets_per_netns: status.steered_sockets_per_netns,
            udp_flows: status.udp_flows,
            udp_flow_capacity: status.udp_flow_capacity,
            draining_service_ids: status.draining_service_ids,
            host_netns_only: status.host_netns_only,
            datapath_log: status.datapath_log,
            links: status.links.into_iter().map(|(program, outcome)| (program.to_string(), outcome)).collect(),
            foreign_programs: status.foreign_programs,
            map_memory_bytes: status.maps.iter().map(|m| m.bytes).sum(),
            maps: status.maps,
        }
    }
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
}

/// A rollout as the API shows it: state, step, weights, the gates of the last judged window and
/// of the window in progress, and the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    pub service: String,
    pub state: RolloutState,
    /// Index of the current step in `steps`.
    pub step: usize,
    pub steps: Vec<f64>,
    /// The weight the rollout has set.
    pub percent: f64,
    pub step_seconds: f64,
    pub window_elapsed_ms: u64,
    pub consecutive_failures: u32,
    /// The role an approver of the waiting step needs, while one waits.
    pub awaiting_role: Option<Role>,
    pub last_gates: Option<GateReadings>,
    /// The gates over the window in progress.
    pub current_window: Option<GateReadings>,
    /// The last judgement's one verdict over the kernel gates, metric gates and webhook checks,
    /// with every metric reading and check result.
    pub last_judgement: Option<Judgement>,
    /// The metric gates and webhook checks of the window in progress: the latest readings,
    /// out-of-bound streaks, and what holds the step while something does.
    pub external_window: ExternalWindow,
    pub terminated_connections: Option<u64>,
    /// What the rollout cost the canary's clients, the current step counted up to now.
    pub harm: Harm,
    pub started_by: String,
    pub plan: Plan,
    /// The last events (at most 256).
    pub history: Vec<HistoryEntry>,
    /// Events dropped from the front of `history`.
    pub history_dropped: u64,
    /// Cluster mode only: the nodes whose counters the gates sum (the live nodes that published
    /// the service's counters since the rollout started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_nodes: Option<Vec<String>>,
    /// Cluster mode only: `true` when etcd cannot be reached and this is the state the node last
    /// applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<bool>,
    /// Cluster mode only: every change up to this etcd revision is applied on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of_revision: Option<u64>,
}

/// `GET /v1/cluster`: the nodes of the cluster and how far each has applied the desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// The node that answers.
    pub node: String,
    /// The node that drives the rollouts; null while none does.
    pub leader: Option<String>,
    /// The newest desired-state revision any live node has applied: what every node converges
    /// to.
    pub revision: u64,
    /// Whether this node follows etcd now. `false`: etcd cannot be reached; everything here is as
    /// this node last saw it (`stale`).
    pub connected: bool,
    pub stale: bool,
    /// Every change up to this revision is applied on the answering node.
    pub as_of_revision: u64,
    /// The live nodes (each publishes its status under a lease: a node that stops disappears
    /// within `[cluster] lease_ttl_seconds`).
    pub nodes: Vec<ClusterNode>,
}

/// One node of `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterNode {
    pub node: String,
    /// Every change up to this etcd revision is applied to the node's datapath.
    pub applied_revision: u64,
    /// Since the node last changed its status (it does when it applies a change), by its clock.
    pub age_ms: u64,
    /// Whether the node's datapath holds the whole desired state (`detail` says what it refused).
    pub healthy: bool,
    /// `applied_revision` is below `revision`.
    pub lagging: bool,
    pub agent_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl RolloutView {
    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }
}
