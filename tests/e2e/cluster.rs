//! Cluster mode end to end: a real 3-member etcd cluster (Debian's etcd, tests/src/etcd.rs) and
//! three `sockshift agent` processes as three simulated nodes, each with its own cgroup, client
//! processes, bpffs directory, state directory and API port. Clients run in one network
//! namespace holding the backends, each in its node's cgroup, so what a client sees is what its
//! node's datapath does.
//!
//! The tests run one at a time: each starts its own etcd cluster and three agents, and some time
//! convergence.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use e2e::{
    assert_canary_share, built_binary,
    etcd::{EtcdCluster, TcpProxy},
    kube_double::{endpoint_slice, service, KubeDouble, Pod},
    probe, require_root, serve, tcp_connects, unique_name, Agent, Cgroup, NetNs, Placement, Spawned, TcpReport,
};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const FRONTEND: &str = "127.1.0.1:80";
/// Short, so that a SIGKILLed node leaves the cluster view quickly.
const LEASE_TTL_SECONDS: u64 = 3;
const TOKENS: &str = r#"
[[agent.auth.tokens]]
name = "otto"
token = "operator-token-01"
role = "operator"
[[agent.auth.tokens]]
name = "rita"
token = "release-token-001"
role = "release"
"#;
const RELEASE: &str = "release-token-001";
const OPERATOR: &str = "operator-token-01";

/// One simulated node: an agent attached to its own cgroup. Drops before the lab's namespace.
struct Node {
    name: String,
    agent: Agent,
    cgroup: Cgroup,
}

impl Node {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.agent.call(method, path, body)
    }

    fn cluster(&self) -> Value {
        let (status, body) = self.call("GET", "/v1/cluster", None);
        assert_eq!(status, 200, "{}: GET /v1/cluster: {body}", self.name);
        body
    }

    fn service(&self, name: &str) -> Value {
        let (status, body) = self.call("GET", &format!("/v1/services/{name}"), None);
        assert_eq!(status, 200, "{}: GET {name}: {body}", self.name);
        body
    }

    fn metric(&self, name: &str) -> f64 {
        let r = agent::client::request(self.agent.api, Some(RELEASE), "GET", "/metrics", None).expect("GET /metrics");
        let text = r.body.as_str().unwrap_or_default().to_string();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no {name} in /metrics:\n{text}", self.name))
    }
}

/// Three nodes, the backends they steer to, and etcd. Fields drop in order: the agents leave the
/// cluster while etcd is still up.
struct Lab {
    nodes: Vec<Node>,
    _servers: Spawned,
    netns: NetNs,
    prefix: String,
    /// Added to every agent's `[agent]` table.
    agent_extra: String,
    etcd: EtcdCluster,
}

impl Lab {
    fn new(nodes: usize) -> Self {
        Self::with_etcd(EtcdCluster::start(), nodes)
    }

    fn with_etcd(etcd: EtcdCluster, count: usize) -> Self {
        Self::with_agent_extra(etcd, count, "")
    }

    fn with_agent_extra(etcd: EtcdCluster, count: usize, agent_extra: &str) -> Self {
        require_root();
        let netns = NetNs::new();
        let servers = serve(
            Placement { netns: Some(&netns), cgroup: None },
            &[
                "serve-tcp",
                "--listen",
                "127.0.0.1:8001=stable",
                "--listen",
                "127.0.0.1:8002=canary",
                "--listen",
                "127.0.0.1:8003=canary2",
            ],
        );
        let prefix = format!("/{}", unique_name("cluster"));
        let mut lab =
            Self { nodes: Vec::new(), _servers: servers, netns, prefix, agent_extra: agent_extra.into(), etcd };
        for i in 0..count {
            let name = format!("node-{}", (b'a' + i as u8) as char);
            let node = lab.start_node(&name, &lab.cluster_toml(&name, None));
            lab.nodes.push(node);
        }
        lab
    }

    /// `[cluster]` for `node` (with the good client certificate under TLS); `endpoints` replaces
    /// the cluster's own.
    fn cluster_toml(&self, node: &str, endpoints: Option<Vec<String>>) -> String {
        let mut config = self.etcd.cluster_config(node, &self.prefix);
        config.lease_ttl_seconds = LEASE_TTL_SECONDS;
        if let Some(endpoints) = endpoints {
            config.etcd = endpoints;
        }
        let table: BTreeMap<&str, _> = BTreeMap::from([("cluster", config)]);
        toml::to_string(&table).expect("[cluster] as TOML")
    }

    fn start_node(&self, name: &str, cluster_toml: &str) -> Node {
        let cgroup = Cgroup::new();
        let mut agent = Agent::configure(&cgroup, &format!("{}\n{TOKENS}", self.agent_extra), cluster_toml);
        agent.token = Some(RELEASE.into());
        agent.spawn();
        Node { name: name.into(), agent, cgroup }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Where node `name`'s clients run.
    fn clients_of(&self, name: &str) -> Placement<'_> {
        Placement { netns: Some(&self.netns), cgroup: Some(&self.node(name).cgroup) }
    }

    /// `count` connections from a client of node `name`.
    fn connect(&self, name: &str, count: u32) -> TcpReport {
        tcp_connects(self.clients_of(name), FRONTEND, count)
    }

    /// Adds service `web` (stable 8001, canary 8002) through `via`, waiting for the cluster.
    fn add_web(&self, via: &str, percent: f64) {
        let body = json!({
            "frontends": [FRONTEND], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8002"],
            "canary_percent": percent,
        });
        let (status, answer) = self.node(via).call("PUT", "/v1/services/web?wait=cluster", Some(&body));
        assert_eq!(status, 201, "adding web through {via}: {answer}");
    }

    /// Sets web's weight through `via` and waits for every node to apply it.
    fn set_weight(&self, via: &str, percent: f64) -> Duration {
        let started = Instant::now();
        let (status, body) =
            self.node(via).call("PUT", "/v1/services/web/canary?wait=cluster", Some(&json!({ "percent": percent })));
        let took = started.elapsed();
        assert_eq!(status, 200, "setting web to {percent} % through {via}: {body}");
        took
    }

    /// The value etcd holds for a key under the prefix, as JSON.
    fn etcd_value(&self, key: &str) -> Value {
        let out = self.etcd.etcdctl_ok(&["get", &format!("{}/v1/{key}", self.prefix), "--print-value-only"]);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("etcd {key}: {e}: {out:?}"))
    }

    fn etcdctl_put(&self, key: &str, value: &str) {
        self.etcd.etcdctl_ok(&["put", &format!("{}/v1/{key}", self.prefix), value]);
    }
}

/// Asserts no connection failed and the canary's share (tags starting with `canary`, or exactly
/// `tag`) is what `percent` gives (a 5-sigma binomial bound, see `assert_canary_share`).
fn assert_split(report: &TcpReport, percent: f64, what: &str) {
    let count = report.tags_total();
    assert_eq!(report.errors_total(), 0, "{what}: connections failed (not steered?): {:?}", report.raw);
    assert!(count > 0, "{what}: no connection: {:?}", report.raw);
    assert_canary_share(what, report.hits("canary"), count, percent);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Polls `check` until it holds or `timeout` passes (then panics with `what`).
fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what} within {timeout:?}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn ppm_of(service: &Value) -> u64 {
    service["canary_ppm"].as_u64().expect("canary_ppm")
}

#[test]
fn a_service_added_on_one_node_is_steered_everywhere_and_weight_changes_converge() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.add_web("node-a", 20.0);
    for node in ["node-a", "node-b", "node-c"] {
        assert_split(&lab.connect(node, 600), 20.0, &format!("{node}, web added through node-a at 20 %"));
    }
    lab.set_weight("node-b", 80.0);
    for node in ["node-a", "node-b", "node-c"] {
        assert_split(&lab.connect(node, 600), 80.0, &format!("{node}, weight set to 80 % through node-b"));
    }

    // The time from the API call on node-b to the last node applying it: ?wait=cluster answers
    // when every live node has published that it applied the change. Checked against each
    // node's datapath right after.
    let mut times = Vec::new();
    for i in 0..200u32 {
        let percent = f64::from(i % 100) + 0.5;
        times.push(lab.set_weight("node-b", percent));
        if i % 20 == 0 {
            for node in &lab.nodes {
                let ppm = ppm_of(&node.service("web"));
                assert_eq!(ppm, (percent * 10_000.0) as u64, "{} after ?wait=cluster answered", node.name);
            }
        }
    }
    times.sort();
    eprintln!(
        "weight change on node-b to the last of 3 nodes applying it (?wait=cluster, 200 changes): p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        percentile(&times, 0.5).as_secs_f64() * 1000.0,
        percentile(&times, 0.99).as_secs_f64() * 1000.0,
        times.last().unwrap().as_secs_f64() * 1000.0,
    );
    lab.set_weight("node-c", 35.0);
    for node in ["node-a", "node-b", "node-c"] {
        assert_split(&lab.connect(node, 600), 35.0, &format!("{node}, weight set to 35 % through node-c"));
    }

    // The cluster view: every node, the same revision, a leader.
    let view = lab.node("node-a").cluster();
    assert_eq!(view["node"], "node-a");
    let names: Vec<&str> = view["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-a", "node-b", "node-c"], "{view}");
    for node in view["nodes"].as_array().unwrap() {
        assert_eq!(node["applied_revision"], view["revision"], "{view}");
        assert_eq!((node["healthy"].as_bool(), node["lagging"].as_bool()), (Some(true), Some(false)), "{view}");
    }
    assert!(view["leader"].is_string(), "a node leads the rollouts: {view}");
    let table = Command::new(built_binary("sockshift"))
        .args(["status", "--cluster", "--api", &lab.node("node-b").agent.api.to_string(), "--token", RELEASE])
        .output()
        .expect("sockshift status --cluster");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}{}", String::from_utf8_lossy(&table.stderr));
    for name in ["node-a", "node-b", "node-c"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(name)),
            "sockshift status --cluster shows no {name}:\n{text}"
        );
    }

    // A node that dies holds ?wait=cluster up until its lease expires: 504 naming it, then it is
    // gone from the view and waits succeed again.
    let mut lab = lab;
    lab.nodes[2].agent.stop_with(libc::SIGKILL);
    let (status, body) = lab.node("node-a").call(
        "PUT",
        "/v1/services/web/canary?wait=cluster&timeout_ms=500",
        Some(&json!({ "percent": 40.0 })),
    );
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "cluster_timeout", "{body}");
    assert!(body["message"].as_str().unwrap().contains("node-c"), "the 504 names the lagging node: {body}");
    eventually(Duration::from_secs(LEASE_TTL_SECONDS * 3), "node-c leaves the cluster view", || {
        let view = lab.node("node-a").cluster();
        match view["nodes"].as_array().unwrap().len() {
            2 => Ok(()),
            _ => Err(view.to_string()),
        }
    });
    lab.set_weight("node-a", 45.0);
}

#[test]
fn two_nodes_racing_on_one_service_end_identical_to_etcd_with_every_change_audited() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.add_web("node-a", 10.0);
    const CHANGES: u32 = 100;
    let race = |node: &Node, token: &str, base: f64| {
        let mut accepted = 0;
        let mut refused = Vec::new();
        for i in 0..CHANGES {
            let percent = base + f64::from(i) * 0.25;
            let (status, body) =
                node.agent.call_as(Some(token), "PUT", "/v1/services/web/canary", Some(&json!({ "percent": percent })));
            match status {
                200 => accepted += 1,
                409 => refused.push(body),
                _ => panic!("{}: {status} {body}", node.name),
            }
        }
        (accepted, refused)
    };
    let ((a_accepted, a_refused), (b_accepted, b_refused)) = std::thread::scope(|scope| {
        let a = scope.spawn(|| race(lab.node("node-a"), OPERATOR, 10.0));
        let b = scope.spawn(|| race(lab.node("node-b"), RELEASE, 50.0));
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!(
        "racing: node-a {a_accepted} accepted, {} conflicts; node-b {b_accepted} accepted, {} conflicts",
        a_refused.len(),
        b_refused.len()
    );
    for body in a_refused.iter().chain(&b_refused) {
        eprintln!("refused: {body}");
        assert_eq!(body["code"], "conflict", "a refused change is a 409 conflict: {body}");
    }
    // Conflicts are retried on the current value: a 409 is the exception.
    assert!(a_accepted + b_accepted >= 2 * CHANGES - 10, "too many conflicts: {a_accepted} + {b_accepted}");

    // Every node ends where etcd ended.
    let in_etcd = lab.etcd_value("services/web")["service"]["canary_percent"].as_f64().expect("etcd's weight");
    eventually(Duration::from_secs(10), "every node holds etcd's last commit", || {
        for node in &lab.nodes {
            let service = node.service("web");
            if service["canary_percent"].as_f64() != Some(in_etcd) || ppm_of(&service) != (in_etcd * 10_000.0) as u64 {
                return Err(format!("{} holds {service}, etcd {in_etcd}", node.name));
            }
        }
        Ok(())
    });
    for node in ["node-a", "node-b", "node-c"] {
        assert_split(&lab.connect(node, 400), in_etcd, &format!("{node} after the race"));
    }

    // The audit log, read on the third node, holds every accepted change with its node and token.
    let (status, log) = lab.node("node-c").call("GET", "/v1/audit?limit=1000", None);
    assert_eq!(status, 200, "{log}");
    let weight_changes: Vec<&Value> =
        log["entries"].as_array().unwrap().iter().filter(|e| e["route"] == "/v1/services/web/canary").collect();
    let by = |node: &str, token: &str| {
        weight_changes.iter().filter(|e| e["node"] == node && e["token"] == token).count() as u32
    };
    assert_eq!(by("node-a", "otto"), a_accepted, "node-a's accepted changes in the audit log");
    assert_eq!(by("node-b", "rita"), b_accepted, "node-b's accepted changes in the audit log");
    assert_eq!(weight_changes.len() as u32, a_accepted + b_accepted, "no other weight change is audited");
    let last = weight_changes.last().unwrap();
    assert_eq!(last["after"]["canary_percent"].as_f64(), Some(in_etcd), "the last audited change is etcd's: {last}");

    // Refused requests stay in the audit log of the node that refused them, never in etcd:
    // anyone who reaches an API can make them without a token, and in etcd each would be a
    // commit fanned out to every node, filling etcd's quota.
    let audit_keys = || {
        let keys = lab.etcd.etcdctl_ok(&["get", "--prefix", "--keys-only", &format!("{}/v1/audit/", lab.prefix)]);
        keys.lines().filter(|line| !line.trim().is_empty()).count()
    };
    let keys_before = audit_keys();
    for _ in 0..5 {
        let body = json!({ "percent": 1.0 });
        let (status, body) = lab.node("node-a").agent.call_as(None, "PUT", "/v1/services/web/canary", Some(&body));
        assert_eq!(status, 401, "{body}");
    }
    let refused_on = |node: &str| -> Vec<String> {
        let (status, log) = lab.node(node).call("GET", "/v1/audit?limit=1000", None);
        assert_eq!(status, 200, "{log}");
        let entries = log["entries"].as_array().unwrap();
        entries.iter().filter(|e| e["refused"] == "no_token").map(|e| e["node"].as_str().unwrap().to_string()).collect()
    };
    eventually(Duration::from_secs(5), "node-a's refusals in its audit log, named as its", || {
        let refused = refused_on("node-a");
        match refused.len() == 5 && refused.iter().all(|node| node == "node-a") {
            true => Ok(()),
            false => Err(format!("{refused:?}")),
        }
    });
    assert_eq!(refused_on("node-c"), Vec::<String>::new(), "node-a's refusals are its own");
    assert_eq!(audit_keys(), keys_before, "refusals wrote audit keys to etcd");
}

#[test]
fn etcd_losing_a_member_or_all_of_them_is_not_an_outage() {
    let _serial = serial();
    let mut lab = Lab::new(3);
    lab.add_web("node-a", 30.0);

    // One member killed: writes and convergence continue.
    lab.etcd.kill_member(0);
    for (i, via) in ["node-a", "node-b", "node-c", "node-a", "node-b"].iter().enumerate() {
        lab.set_weight(via, 31.0 + i as f64);
    }
    lab.etcd.start_member(0);
    lab.etcd.wait_healthy(&[0, 1, 2], Duration::from_secs(30));
    lab.set_weight("node-c", 60.0);
    let applied = lab.node("node-a").cluster()["revision"].as_u64().unwrap();

    // Every member stopped.
    lab.etcd.stop_all();
    for node in &lab.nodes {
        eventually(Duration::from_secs(15), &format!("{} sees etcd down", node.name), || {
            let view = node.cluster();
            if view["connected"] == false && view["stale"] == true {
                Ok(())
            } else {
                Err(view.to_string())
            }
        });
    }
    // Every node keeps steering at the last weight for 10 s, as its clients see it.
    let until = Instant::now() + Duration::from_secs(10);
    let mut rounds = 0;
    while Instant::now() < until {
        for node in ["node-a", "node-b", "node-c"] {
            assert_split(&lab.connect(node, 200), 60.0, &format!("{node} with etcd down"));
        }
        rounds += 1;
    }
    assert!(rounds >= 2, "only {rounds} rounds of connections in 10 s");
    // Mutating routes answer 503 cluster_unavailable; reads answer stale, from the local copy.
    for node in &lab.nodes {
        let (status, body) = node.call("PUT", "/v1/services/web/canary", Some(&json!({ "percent": 70.0 })));
        assert_eq!((status, body["code"].as_str()), (503, Some("cluster_unavailable")), "{}: {body}", node.name);
        assert!(body["message"].as_str().unwrap().contains("etcd"), "{body}");
        let (status, body) = node.call("DELETE", "/v1/services/web", None);
        assert_eq!((status, body["code"].as_str()), (503, Some("cluster_unavailable")), "{}: {body}", node.name);
        let service = node.service("web");
        assert_eq!((service["stale"].as_bool(), service["canary_percent"].as_f64()), (Some(true), Some(60.0)));
        assert_eq!(service["as_of_revision"].as_u64(), Some(applied), "{}: {service}", node.name);
        let (status, list) = node.call("GET", "/v1/services", None);
        assert_eq!((status, list["stale"].as_bool()), (200, Some(true)), "{list}");
        let (status, body) = node.call("GET", "/v1/audit", None);
        assert_eq!((status, body["code"].as_str()), (503, Some("cluster_unavailable")), "{body}");
        let (status, _) = node.call("GET", "/healthz", None);
        assert_eq!(status, 200, "{}: the agent is healthy with etcd down (fail static)", node.name);
    }

    // An agent SIGKILLed and started again during the outage restores the last applied state.
    lab.nodes[2].agent.stop_with(libc::SIGKILL);
    lab.nodes[2].agent.spawn();
    let restarted = lab.node("node-c");
    let service = restarted.service("web");
    assert_eq!((service["stale"].as_bool(), service["canary_percent"].as_f64()), (Some(true), Some(60.0)), "{service}");
    assert_eq!(service["as_of_revision"].as_u64(), Some(applied), "{service}");
    assert_split(&lab.connect("node-c", 400), 60.0, "node-c restarted during the outage");
    assert!(restarted.agent.log().contains("local copy"), "{}", restarted.agent.log());

    // etcd back: a new change reaches every node.
    lab.etcd.restart_all();
    eventually(Duration::from_secs(30), "a write through node-b after etcd came back", || {
        let (status, body) =
            lab.node("node-b").call("PUT", "/v1/services/web/canary?wait=cluster", Some(&json!({ "percent": 90.0 })));
        if status == 200 {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    });
    for node in ["node-a", "node-b", "node-c"] {
        assert_split(&lab.connect(node, 400), 90.0, &format!("{node} after etcd came back"));
        assert_eq!(lab.node(node).service("web")["stale"].as_bool(), Some(false));
    }
}

/// Connections from a client at `placement` in batches until `stop`: the tag of every
/// connection in order, and the failures.
fn watch_tags(placement: Placement<'_>, stop: &AtomicBool) -> (Vec<String>, u64) {
    let (mut tags, mut failures) = (Vec::new(), 0);
    let until = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        let report =
            TcpReport { raw: probe(placement, &["tcp", "--target", FRONTEND, "--count", "20", "--segment", "1"]) };
        failures += report.errors_total();
        for segment in report.raw["segments"].as_array().expect("segments") {
            tags.extend(segment.as_object().into_iter().flat_map(|m| m.keys().cloned()));
        }
    }
    (tags, failures)
}

/// Waits until `agent` holds web with the `canary2` backend.
fn wait_for_canary2(agent: &Agent, what: &str) {
    eventually(Duration::from_secs(15), what, || {
        let (status, service) = agent.call("GET", "/v1/services/web", None);
        match service["canary"][0].as_str() {
            Some("127.0.0.1:8003") if status == 200 => Ok(()),
            _ => Err(format!("{status} {service}")),
        }
    });
}

/// Asserts the connections saw only `older` and then only `newer`, and none failed (a service
/// removed and added back would fail them: the frontend leads nowhere).
fn assert_no_flap((tags, failures): &(Vec<String>, u64), older: &str, newer: &str, what: &str) {
    assert_eq!(*failures, 0, "{what}: {failures} connections failed (the service was missing for a moment?)");
    let switched = tags.iter().position(|t| t == newer).unwrap_or_else(|| panic!("{what}: never reached {newer}"));
    let before: BTreeMap<&str, usize> = tags[..switched].iter().fold(BTreeMap::new(), |mut m, t| {
        *m.entry(t.as_str()).or_default() += 1;
        m
    });
    let after: BTreeMap<&str, usize> = tags[switched..].iter().fold(BTreeMap::new(), |mut m, t| {
        *m.entry(t.as_str()).or_default() += 1;
        m
    });
    eprintln!("{what}: {} connections: {before:?} then {after:?}", tags.len());
    assert!(before.keys().all(|t| *t == older), "{what}: before {newer}, a state older than the node had: {before:?}");
    assert!(after.keys().all(|t| *t == newer), "{what}: after {newer}, an older state came back: {after:?}");
}

/// Web at 100 % canary (tag `canary`), then 0 % (tag `stable`): the state a node then holds.
fn steer_to_stable_after_canary(lab: &Lab) {
    lab.add_web("node-a", 100.0);
    lab.set_weight("node-a", 0.0);
    for node in ["node-a", "node-b", "node-c"] {
        assert_eq!(lab.connect(node, 20).tag("stable"), 20, "{node} at 0 %");
    }
}

/// Newer states on node-a, the last one a canary backend `canary2` at 100 %, then compaction.
fn move_on_and_compact(lab: &Lab) {
    lab.set_weight("node-a", 100.0);
    lab.set_weight("node-a", 50.0);
    let body = json!({
        "frontends": [FRONTEND], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8003"], "canary_percent": 100.0,
    });
    let (status, answer) = lab.node("node-a").call("PUT", "/v1/services/web", Some(&body));
    assert_eq!(status, 200, "{answer}");
    let compacted = lab.etcd.compact();
    eprintln!("etcd compacted to revision {compacted}");
}

#[test]
fn an_agent_down_while_etcd_compacts_catches_up_on_start_without_flap() {
    let _serial = serial();
    let mut lab = Lab::new(3);
    steer_to_stable_after_canary(&lab);
    let before = lab.node("node-c").cluster()["as_of_revision"].as_u64().unwrap();
    lab.nodes[2].agent.stop_with(libc::SIGKILL);
    move_on_and_compact(&lab);

    let stop = AtomicBool::new(false);
    let Lab { nodes, netns, .. } = &mut lab;
    let Node { agent, cgroup, .. } = &mut nodes[2];
    let placement = Placement { netns: Some(netns), cgroup: Some(cgroup) };
    let batches = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| watch_tags(placement, &stop));
        std::thread::sleep(Duration::from_millis(500));
        // Started again while its clients connect (the pinned datapath steered them meanwhile).
        agent.spawn();
        wait_for_canary2(agent, "node-c catches up");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert_no_flap(&batches, "stable", "canary2", "node-c restarted after a compaction");
    let after = lab.node("node-c").cluster()["as_of_revision"].as_u64().unwrap();
    assert!(after > before, "node-c applied revision {after}, before it went down {before}");
}

#[test]
fn a_partitioned_agent_relists_after_a_compaction_and_applies_only_the_difference() {
    let _serial = serial();
    let mut lab = Lab::new(2);
    // node-c reaches etcd only through a proxy the test can cut.
    let proxy = TcpProxy::start(lab.etcd.client_port(1));
    let toml = lab.cluster_toml("node-c", Some(vec![proxy.endpoint("http")]));
    let node_c = lab.start_node("node-c", &toml);
    lab.nodes.push(node_c);
    steer_to_stable_after_canary(&lab);
    let resyncs_before = lab.node("node-c").metric("sockshift_cluster_resyncs_total");

    proxy.cut();
    eventually(Duration::from_secs(15), "node-c sees etcd down", || {
        match lab.node("node-c").cluster()["connected"].as_bool() {
            Some(false) => Ok(()),
            _ => Err("still connected".into()),
        }
    });
    move_on_and_compact(&lab);
    let stop = AtomicBool::new(false);
    let batches = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| watch_tags(lab.clients_of("node-c"), &stop));
        std::thread::sleep(Duration::from_millis(500));
        proxy.restore();
        wait_for_canary2(&lab.node("node-c").agent, "node-c catches up");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert_no_flap(&batches, "stable", "canary2", "node-c reconnected after a compaction");
    assert!(
        lab.node("node-c").metric("sockshift_cluster_resyncs_total") > resyncs_before,
        "node-c relisted (a resync), it did not replay"
    );
    eventually(Duration::from_secs(10), "node-c reports the cluster's revision", || {
        let view = lab.node("node-a").cluster();
        let c = view["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "node-c").cloned();
        match c {
            Some(c) if c["lagging"] == false => Ok(()),
            other => Err(format!("{other:?} in {view}")),
        }
    });
}

#[test]
fn tls_with_client_certificates_works_and_an_agent_without_one_is_refused_at_start() {
    let _serial = serial();
    let lab = Lab::with_etcd(EtcdCluster::start_tls(), 1);
    lab.add_web("node-a", 25.0);
    assert_split(&lab.connect("node-a", 400), 25.0, "node-a over TLS");
    assert_eq!(lab.node("node-a").cluster()["nodes"][0]["node"], "node-a");

    let tls = lab.etcd.tls().unwrap().clone();
    for (what, cert, expected) in [
        ("without a client certificate", None, "etcd requires a client certificate"),
        (
            "with a certificate of another CA",
            Some((tls.rogue_client_cert.clone(), tls.rogue_client_key.clone())),
            "etcd refused the client certificate",
        ),
    ] {
        let mut config = lab.etcd.cluster_config("node-x", &lab.prefix);
        (config.cert_file, config.key_file) = match cert {
            Some((cert, key)) => (Some(cert), Some(key)),
            None => (None, None),
        };
        let cgroup = Cgroup::new();
        let toml = toml::to_string(&BTreeMap::from([("cluster", config)])).unwrap();
        let agent = Agent::configure(&cgroup, "", &toml);
        let started = Instant::now();
        let out = Command::new(built_binary("sockshift"))
            .args(["agent", "--config"])
            .arg(&agent.config_path)
            .output()
            .expect("run sockshift agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the agent started:\n{stderr}");
        assert!(stderr.contains(expected), "{what}: the error should say {expected:?}:\n{stderr}");
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: refused only after {:?}", started.elapsed());
        assert!(!agent.bpffs.exists(), "{what}: the datapath was loaded before the refusal");
        eprintln!("{what}: {}", stderr.lines().last().unwrap_or_default());
    }
}

#[test]
fn garbage_under_the_prefix_is_skipped_counted_and_the_service_keeps_steering() {
    let _serial = serial();
    let lab = Lab::new(3);
    lab.add_web("node-a", 25.0);
    let invalid = |node: &Node| node.metric("sockshift_cluster_invalid_values_total");
    let before: Vec<f64> = lab.nodes.iter().map(invalid).collect();

    let mut good = lab.etcd_value("services/web");
    good["service"]["canary_percent"] = json!(150.0);
    let garbage = [
        ("services/web", "{not json".to_string()),
        ("services/web", good.to_string()),
        ("rollouts/web", json!({"schema": 1, "rollout": {"step": 9}}).to_string()),
        ("services/other", json!({"schema": 2, "service": {}}).to_string()),
        ("widgets/x", "1".to_string()),
    ];
    for (key, value) in &garbage {
        lab.etcdctl_put(key, value);
    }
    for (node, before) in lab.nodes.iter().zip(&before) {
        eventually(Duration::from_secs(10), &format!("{} counts the bad values", node.name), || {
            let now = invalid(node);
            if now >= before + garbage.len() as f64 {
                Ok(())
            } else {
                Err(format!("{now} (before {before})"))
            }
        });
        let service = node.service("web");
        assert_eq!(service["canary_percent"].as_f64(), Some(25.0), "{}: {service}", node.name);
        let (status, body) = node.call("GET", "/v1/services/other", None);
        assert_eq!(status, 404, "{}: a bad value creates nothing: {body}", node.name);
        let (status, _) = node.call("GET", "/healthz", None);
        assert_eq!(status, 200, "{} is healthy", node.name);
        assert!(
            node.agent.log().contains(&format!("{}/v1/services/web", lab.prefix)),
            "{}: the log names the bad key",
            node.name
        );
        assert_split(&lab.connect(&node.name, 400), 25.0, &format!("{} with garbage in etcd", node.name));
    }
    // An agent starting now skips the same values (and counts them) and starts; it never saw a
    // valid web, so it holds none.
    let mut lab = lab;
    let late = lab.start_node("node-d", &lab.cluster_toml("node-d", None));
    assert!(invalid(&late) >= 3.0, "node-d counted the bad values it read at start");
    let (status, body) = late.call("GET", "/v1/services/web", None);
    assert_eq!(status, 404, "node-d: {body}");
    lab.nodes.push(late);

    // A write through the API replaces the garbage (compared on its revision) on every node.
    lab.set_weight("node-b", 40.0);
    for node in ["node-a", "node-b", "node-c", "node-d"] {
        assert_split(&lab.connect(node, 400), 40.0, &format!("{node} after the API replaced the garbage"));
    }
    assert_eq!(lab.etcd_value("services/web")["service"]["canary_percent"].as_f64(), Some(40.0));
}

/// Runs the `sockshift` CLI; (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(built_binary("sockshift")).args(args).output().expect("run sockshift");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn services_load_with_sockshift_apply_not_the_config_file() {
    let _serial = serial();
    let lab = Lab::new(2);
    // The config file refuses services in cluster mode, saying how to load them.
    let config = format!(
        "[agent]\ncgroup = {:?}\n{}\n[[service]]\nname = \"web\"\nfrontends = [\"{FRONTEND}\"]\n",
        lab.node("node-a").cgroup.path.display().to_string(),
        lab.cluster_toml("node-z", None)
    );
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name("cluster-config")));
    std::fs::write(&path, config).unwrap();
    let (ok, _, stderr) = cli(&["agent", "--config", path.to_str().unwrap(), "--check"]);
    let _ = std::fs::remove_file(&path);
    assert!(!ok && stderr.contains("sockshift apply -f") && stderr.contains("PUT /v1/services/"), "{stderr}");

    let file = std::env::temp_dir().join(format!("{}.toml", unique_name("services")));
    let services = |web_percent: f64| {
        format!(
            "[[service]]\nname = \"web\"\nfrontends = [\"{FRONTEND}\"]\nstable = [\"127.0.0.1:8001\"]\n\
             canary = [\"127.0.0.1:8002\"]\ncanary_percent = {web_percent}\n\n\
             [[service]]\nname = \"api\"\nfrontends = [\"127.1.0.2:80\"]\nstable = [\"127.0.0.1:8001\"]\n"
        )
    };
    let api = lab.node("node-a").agent.api.to_string();
    let apply = |extra: &[&str]| {
        let mut args = vec!["apply", "-f", file.to_str().unwrap(), "--api", &api, "--token", RELEASE];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = cli(&args);
        assert!(ok, "sockshift apply {extra:?}: {stdout}{stderr}");
        stdout
    };
    std::fs::write(&file, services(15.0)).unwrap();
    let out = apply(&["--wait"]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["service/web created", "service/api created"], "{out}");
    assert_split(&lab.connect("node-b", 400), 15.0, "node-b after sockshift apply on node-a");
    let out = apply(&[]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["service/web unchanged", "service/api unchanged"],
        "idempotent: {out}"
    );

    std::fs::write(&file, services(60.0)).unwrap();
    let out = apply(&["--dry-run"]);
    assert!(out.contains("service/web configured (dry run): canary_percent: 15 -> 60"), "{out}");
    assert_eq!(lab.node("node-b").service("web")["canary_percent"].as_f64(), Some(15.0), "a dry run changes nothing");
    let out = apply(&["--wait"]);
    assert!(out.contains("service/web configured: canary_percent: 15 -> 60") && out.contains("service/api unchanged"));
    assert_split(&lab.connect("node-b", 400), 60.0, "node-b after the second apply");

    // --prune removes what the file no longer names.
    std::fs::write(&file, services(60.0).split("\n\n").next().unwrap()).unwrap();
    let out = apply(&["--prune", "--wait"]);
    assert!(out.contains("service/web unchanged") && out.contains("service/api pruned"), "{out}");
    let (status, _) = lab.node("node-b").call("GET", "/v1/services/api", None);
    assert_eq!(status, 404, "api is pruned on every node");
    // A file that is not only [[service]] tables is refused before anything is sent.
    std::fs::write(&file, "[agent]\napi = \"127.0.0.1:1\"\n").unwrap();
    let (ok, _, stderr) = cli(&["apply", "-f", file.to_str().unwrap(), "--api", &api, "--token", RELEASE]);
    assert!(!ok && stderr.contains("only [[service]] tables"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

/// A service named by Kubernetes objects in cluster mode: its `kubernetes` table is stored in
/// etcd with the weight; every node resolves the Services and EndpointSlices itself (its own
/// watch, like kube-proxy). Against the API-server double of tests/src/kube_double.rs (it speaks
/// the API server's wire protocol; it is not a live cluster), shared by the three nodes.
#[test]
fn a_kubernetes_service_set_on_one_node_is_resolved_and_steered_by_every_node() {
    const KUBE_FRONTEND: &str = "127.1.0.90:80";
    let _serial = serial();
    let double = KubeDouble::start();
    double.apply(&service("shop", "web", &["127.1.0.90"], &[("http", 80, "http")]));
    let slice = |name: &str, backend: &str, port: i32| {
        endpoint_slice("shop", name, backend, "IPv4", &[("http", port)], &[Pod::ready("127.0.0.1")])
    };
    double.apply(&slice("web-stable-v4", "web-stable", 8001));
    double.apply(&slice("web-canary-v4", "web-canary", 8002));
    let dir = std::env::temp_dir().join(unique_name("cluster-kube"));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    double.write_kubeconfig(&kubeconfig);
    let lab =
        Lab::with_agent_extra(EtcdCluster::start(), 3, &format!("kubeconfig = {:?}", kubeconfig.display().to_string()));

    // Added through node-a: only the reference goes to etcd.
    let body = json!({
        "kubernetes": {"namespace": "shop", "frontend": "web", "stable": "web-stable", "canary": "web-canary"},
        "canary_percent": 30.0,
    });
    let (status, answer) = lab.node("node-a").call("PUT", "/v1/services/kweb?wait=cluster", Some(&body));
    assert_eq!(status, 201, "{answer}");
    let stored = lab.etcd_value("services/kweb");
    assert_eq!(stored["service"]["kubernetes"]["frontend"], "web", "etcd holds the reference: {stored}");
    for field in ["frontends", "stable", "canary"] {
        let addresses = &stored["service"][field];
        assert!(
            addresses.is_null() || addresses.as_array().is_some_and(Vec::is_empty),
            "etcd holds no discovered address ({field}): {stored}"
        );
    }
    let synced_on = |node: &str, canary_backend: &str| {
        eventually(Duration::from_secs(30), &format!("{node} resolves kweb"), || {
            let state = lab.node(node).service("kweb");
            let frontends = state["frontends"].as_array().cloned().unwrap_or_default();
            let canary = state["canary"].as_array().cloned().unwrap_or_default();
            if state["kubernetes"]["state"] == "synced"
                && frontends.contains(&json!(KUBE_FRONTEND))
                && canary == [json!(canary_backend)]
            {
                Ok(())
            } else {
                Err(state.to_string())
            }
        });
    };
    for node in ["node-a", "node-b", "node-c"] {
        synced_on(node, "127.0.0.1:8002");
        let report = tcp_connects(lab.clients_of(node), KUBE_FRONTEND, 600);
        assert_split(&report, 30.0, &format!("{node}, kweb added through node-a at 30 %"));
    }

    // The weight is cluster-wide: set on node-c, steered by every node.
    let (status, answer) =
        lab.node("node-c").call("PUT", "/v1/services/kweb/canary?wait=cluster", Some(&json!({ "percent": 70.0 })));
    assert_eq!(status, 200, "{answer}");
    for node in ["node-a", "node-b", "node-c"] {
        let report = tcp_connects(lab.clients_of(node), KUBE_FRONTEND, 600);
        assert_split(&report, 70.0, &format!("{node}, kweb set to 70 % through node-c"));
    }

    // The pods are each node's own view: a canary pod moving (to port 8003, tagged canary2)
    // reaches every node through its API server watch, with no write to etcd.
    let revision = |lab: &Lab| {
        let out = lab.etcd.etcdctl_ok(&["get", &format!("{}/v1/services/kweb", lab.prefix), "-w", "json"]);
        let reply: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        reply["kvs"][0]["mod_revision"].as_u64().expect("mod_revision")
    };
    let before = revision(&lab);
    double.apply(&slice("web-canary-v4", "web-canary", 8003));
    for node in ["node-a", "node-b", "node-c"] {
        synced_on(node, "127.0.0.1:8003");
        let report = tcp_connects(lab.clients_of(node), KUBE_FRONTEND, 400);
        assert_eq!(report.errors_total(), 0, "{node}: {:?}", report.raw);
        assert!(report.share("canary2") > 50.0, "{node} steers to the moved canary pod: {:?}", report.raw);
    }
    assert_eq!(revision(&lab), before, "discovered addresses are not written to etcd");
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
