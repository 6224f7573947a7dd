//! `GET /metrics`: Prometheus (OpenMetrics) text, built per scrape from the kernel's counters
//! (read by the control core, rendered here, off the core's thread).

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{cluster::CounterValues, control::ServiceMetrics};

/// Cluster mode's figures for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct ClusterMetrics {
    pub counters: CounterValues,
    /// Whether the etcd watch follows etcd now.
    pub connected: bool,
    /// Whether this node drives the rollouts.
    pub leader: bool,
    /// Every change up to this etcd revision is applied here.
    pub applied_revision: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    service: String,
    side: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailOpenLabels {
    service: String,
    side: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// The text for `services`, plus the API's refused requests by reason (`denied`).
pub fn render(services: &[ServiceMetrics], denied: &[(&str, u64)], cluster: Option<&ClusterMetrics>) -> String {
    let mut registry = Registry::with_prefix("sockshift");
    if let Some(cluster) = cluster {
        register_cluster(&mut registry, cluster);
    }
    let api_denied = Family::<DeniedLabels, Counter>::default();
    registry.register(
        "api_denied",
        "API requests refused before their handler: no or unknown token, role too low, wrong content type, \
         Host not allowed, connection limit",
        api_denied.clone(),
    );
    for (reason, count) in denied {
        api_denied.get_or_create(&DeniedLabels { reason: reason.to_string() }).inc_by(*count);
    }
    let side_counter = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<SideLabels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    };
    let connections = side_counter(&mut registry, "connections_steered", "connect() calls steered to this side");
    let datagrams =
        side_counter(&mut registry, "datagrams_steered", "UDP datagrams of unconnected sockets steered to this side");
    let established =
        side_counter(&mut registry, "tcp_established", "Steered TCP connections that reached ESTABLISHED");
    let failed =
        side_counter(&mut registry, "tcp_failed_attempts", "Steered TCP connection attempts that never established");
    let resets = side_counter(&mut registry, "tcp_resets", "Established steered TCP connections reset by the peer");
    let abandoned = side_counter(
        &mut registry,
        "tcp_abandoned_attempts",
        "Steered TCP connection attempts the client gave up (closed in SYN_SENT)",
    );
    let rto = side_counter(
        &mut registry,
        "tcp_retransmission_timeouts",
        "Retransmission timeouts on steered TCP connections",
    );
    let rto_connections = side_counter(
        &mut registry,
        "tcp_connections_with_rto",
        "Steered TCP connections that had at least one retransmission timeout",
    );
    let srtt_sum =
        side_counter(&mut registry, "tcp_srtt_microseconds_sum", "Sum of smoothed RTT samples, microseconds");
    let srtt_count = side_counter(&mut registry, "tcp_srtt_samples", "Number of smoothed RTT samples");
    let unrecorded = Family::<FailOpenLabels, Counter>::default();
    registry.register(
        "unrecorded_sockets",
        "Sockets steered without a socket record (no getpeername translation, no health), by reason",
        unrecorded.clone(),
    );
    let fail_open = Family::<FailOpenLabels, Counter>::default();
    registry.register("fail_open", "Calls left untouched because of a datapath problem, by reason", fail_open.clone());
    let weight = Family::<ServiceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register("canary_weight_percent", "Current canary weight, percent", weight.clone());
    registry.register(
        "build",
        "Agent build information",
        Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION").to_string() }),
    );

    let kubernetes_stale = Family::<ServiceLabels, Gauge>::default();
    registry.register(
        "kubernetes_stale",
        "1 while the Kubernetes API server does not answer and the service steers with the last state it gave",
        kubernetes_stale.clone(),
    );
    let kubernetes_changes = Family::<ServiceLabels, Counter>::default();
    registry.register(
        "kubernetes_backend_changes",
        "Backend-set switches made because Kubernetes Services or EndpointSlices changed",
        kubernetes_changes.clone(),
    );

    for service in services {
        let name = &service.name;
        weight.get_or_create(&ServiceLabels { service: name.clone() }).set(service.canary_percent);
        if let Some(kubernetes) = &service.kubernetes {
            let labels = ServiceLabels { service: name.clone() };
            kubernetes_stale.get_or_create(&labels).set(i64::from(kubernetes.stale));
            kubernetes_changes.get_or_create(&labels).inc_by(kubernetes.changes_applied);
        }
        let counters = service.counters;
        for (side, c) in [("stable", counters.stable), ("canary", counters.canary)] {
            let labels = SideLabels { service: name.clone(), side: side.to_string() };
            connections.get_or_create(&labels).inc_by(c.connections_steered);
            datagrams.get_or_create(&labels).inc_by(c.datagrams_steered);
            established.get_or_create(&labels).inc_by(c.established);
            failed.get_or_create(&labels).inc_by(c.failed_attempts);
            abandoned.get_or_create(&labels).inc_by(c.abandoned_attempts);
            rto_connections.get_or_create(&labels).inc_by(c.rto_connections);
            resets.get_or_create(&labels).inc_by(c.resets);
            rto.get_or_create(&labels).inc_by(c.rto);
            srtt_sum.get_or_create(&labels).inc_by(c.srtt_sum_us);
            srtt_count.get_or_create(&labels).inc_by(c.srtt_samples);
            let labels =
                FailOpenLabels { service: name.clone(), side: side.to_string(), reason: "backend_missing".into() };
            fail_open.get_or_create(&labels).inc_by(c.fail_open_backend_missing);
            for (reason, value) in [("socket_table_full", c.table_full()), ("socket_netns_full", c.socket_netns_full)] {
                let labels =
                    FailOpenLabels { service: name.clone(), side: side.to_string(), reason: reason.to_string() };
                unrecorded.get_or_create(&labels).inc_by(value);
            }
        }
    }
    let mut text = String::new();
    if let Err(err) = encode(&mut text, &registry) {
        log::error!("encoding metrics: {err}");
    }
    text
}

fn register_cluster(registry: &mut Registry, cluster: &ClusterMetrics) {
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    };
    let c = cluster.counters;
    counter(
        registry,
        "cluster_invalid_values",
        "Values under the cluster prefix that did not parse or validate (skipped; the key keeps its last valid value)",
        c.invalid_values,
    );
    counter(
        registry,
        "cluster_watch_restarts",
        "Times the etcd watch was re-established after a disconnect",
        c.watch_restarts,
    );
    counter(registry, "cluster_resyncs", "Relists after etcd compacted past the watch", c.resyncs);
    counter(
        registry,
        "cluster_lease_losses",
        "Times the node's etcd lease expired before a keep-alive got through",
        c.lease_losses,
    );
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    };
    gauge(
        registry,
        "cluster_connected",
        "1 while the etcd watch follows etcd, 0 while etcd is unreachable",
        cluster.connected.into(),
    );
    gauge(registry, "cluster_leader", "1 while this node drives the rollouts", cluster.leader.into());
    gauge(
        registry,
        "cluster_applied_revision",
        "Every change of the cluster state up to this etcd revision is applied on this node",
        cluster.applied_revision as i64,
    );
}
