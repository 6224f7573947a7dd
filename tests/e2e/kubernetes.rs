//! Kubernetes discovery end to end: the real agent (its kube-rs watchers and reflectors, the real
//! eBPF datapath, real sockets) against the API-server double in `e2e::kube_double`, which speaks
//! the API server's wire protocol for Services and EndpointSlices. It is a double, NOT a live
//! cluster: no API server can be installed on the test machines (the README's "Kubernetes
//! discovery" section has the step-by-step check against a real cluster).
//!
//! "Pods" are probe servers on loopback addresses inside the test's network namespace
//! (127.0.0.11, 127.0.0.21, fd00:5eed:1::11, ...), and the EndpointSlices the double serves carry
//! those addresses; ClusterIPs are 127.1.0.0/16 and fd00:5eed::/64 addresses nothing listens on.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use e2e::{
    assert_canary_share,
    kube_double::{endpoint_slice, service, Kind, KubeDouble, Pod},
    require_root, run, serve, spawn_probe, tcp_connects, unique_name, Agent, Cgroup, NetNs, Placement, Spawned,
};
use serde_json::{json, Value};

const NS: &str = "shop";
const CLUSTER_IP: &str = "127.1.0.80";
const CLUSTER_IP6: &str = "fd00:5eed::80";
const FRONTEND: &str = "127.1.0.80:80";
const FRONTEND6: &str = "[fd00:5eed::80]:80";
/// The pods' IPv6 addresses, added to the namespace's loopback.
const POD6: [&str; 2] = ["fd00:5eed:1::11", "fd00:5eed:1::21"];
/// Ports the EndpointSlices publish, the admin one first: a resolver that went by position
/// instead of by name would pick it.
const SLICE_PORTS: [(&str, i32); 2] = [("admin", 9090), ("http", 8080)];

/// Fields drop in order: the agent detaches first, the namespace goes last.
struct KubeLab {
    agent: Agent,
    pods: Spawned,
    double: KubeDouble,
    dir: PathBuf,
    cgroup: Cgroup,
    netns: NetNs,
}

impl KubeLab {
    /// The double with the frontend Service (unless `frontend_exists` is false) and slices of
    /// `web-stable` (pods .11 and .12) and `web-canary` (`canary` pods), the pods serving, and an
    /// agent whose `services` (TOML) name them.
    fn new(canary: &[Pod<'_>], frontend_exists: bool, services: &str) -> Self {
        require_root();
        let netns = NetNs::new();
        for addr in POD6 {
            run("ip", &["-n", &netns.name, "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"]);
        }
        let cgroup = Cgroup::new();
        let mut listen = Vec::new();
        for (addr, tag) in [
            ("127.0.0.11", "stable-1"),
            ("127.0.0.12", "stable-2"),
            ("127.0.0.21", "canary-1"),
            ("127.0.0.22", "canary-2"),
            ("127.0.0.23", "canary-3"),
            ("[fd00:5eed:1::11]", "stable6-1"),
            ("[fd00:5eed:1::21]", "canary6-1"),
        ] {
            listen.extend(["--listen".to_string(), format!("{addr}:8080={tag}")]);
            listen.extend(["--listen".to_string(), format!("{addr}:9090={tag}-admin")]);
        }
        let mut args = vec!["serve-tcp"];
        args.extend(listen.iter().map(String::as_str));
        let pods = serve(Placement { netns: Some(&netns), cgroup: None }, &args);

        let double = KubeDouble::start();
        if frontend_exists {
            double.apply(&web_service(CLUSTER_IP, &[("http", 80, "http")]));
        }
        double.apply(&service(NS, "web-stable", &["127.1.0.81"], &[("http", 80, "http"), ("admin", 81, "9090")]));
        double.apply(&service(NS, "web-canary", &["127.1.0.82"], &[("http", 80, "http"), ("admin", 81, "9090")]));
        double.apply(&stable_slice());
        double.apply(&endpoint_slice(NS, "web-stable-v6", "web-stable", "IPv6", &SLICE_PORTS, &[Pod::ready(POD6[0])]));
        double.apply(&canary_slice(canary));
        double.apply(&endpoint_slice(NS, "web-canary-v6", "web-canary", "IPv6", &SLICE_PORTS, &[Pod::ready(POD6[1])]));

        let dir = std::env::temp_dir().join(unique_name("kube"));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        double.write_kubeconfig(&kubeconfig);
        let agent =
            Agent::start_with(&cgroup, &format!("kubeconfig = {:?}", kubeconfig.display().to_string()), services);
        Self { agent, pods, double, dir, cgroup, netns }
    }

    fn inside(&self) -> Placement<'_> {
        Placement { netns: Some(&self.netns), cgroup: Some(&self.cgroup) }
    }

    /// Polls `GET /v1/services/{name}` until `done` holds; when it first did, and the state.
    fn wait_for(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> (Instant, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, state) = self.agent.call("GET", &format!("/v1/services/{name}"), None);
            let seen = Instant::now();
            if status == 200 && done(&state) {
                return (seen, state);
            }
            assert!(Instant::now() < deadline, "waiting for {what}: last state {state}\n{}", self.agent.log());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Closes a pod's listeners (a pod that went away): a connection sent there now fails.
    fn close_pod(&mut self, tag: &str) {
        let stdin = self.pods.child.stdin.as_mut().expect("pods' stdin");
        writeln!(stdin, "close {tag}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn web_service(cluster_ip: &str, ports: &[(&str, i32, &str)]) -> k8s_openapi::api::core::v1::Service {
    let ips: Vec<&str> = if cluster_ip == CLUSTER_IP { vec![CLUSTER_IP, CLUSTER_IP6] } else { vec![cluster_ip] };
    service(NS, "web", &ips, ports)
}

fn stable_slice() -> k8s_openapi::api::discovery::v1::EndpointSlice {
    endpoint_slice(
        NS,
        "web-stable-v4",
        "web-stable",
        "IPv4",
        &SLICE_PORTS,
        &[Pod::ready("127.0.0.11"), Pod::ready("127.0.0.12")],
    )
}

fn canary_slice(pods: &[Pod<'_>]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    endpoint_slice(NS, "web-canary-v4", "web-canary", "IPv4", &SLICE_PORTS, pods)
}

/// The `[[service]]` of "web" named by Kubernetes objects.
fn web_config(percent: f64, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\ncanary_percent = {percent}\n[service.kubernetes]\nnamespace = \"{NS}\"\n\
         frontend = \"web\"\nstable = \"web-stable\"\ncanary = \"web-canary\"\n{extra}"
    )
}

fn strings(value: &Value) -> BTreeSet<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn tags(report: &e2e::TcpReport) -> BTreeSet<String> {
    report.raw["tags"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

fn kube_state(state: &Value) -> &str {
    state["kubernetes"]["state"].as_str().unwrap_or("")
}

#[test]
fn steers_to_the_ready_endpoints_of_both_services_at_the_weight() {
    let lab = KubeLab::new(
        &[Pod::ready("127.0.0.21"), Pod::not_ready("127.0.0.22"), Pod::terminating("127.0.0.23")],
        true,
        &web_config(30.0, ""),
    );
    let (_, state) = lab.wait_for("web", "the first sync", |s| kube_state(s) == "synced");
    assert_eq!(strings(&state["frontends"]), set(&[FRONTEND, FRONTEND6]), "both ClusterIPs are frontends: {state}");
    assert_eq!(strings(&state["stable"]), set(&["127.0.0.11:8080", "127.0.0.12:8080", "[fd00:5eed:1::11]:8080"]));
    assert_eq!(
        strings(&state["canary"]),
        set(&["127.0.0.21:8080", "[fd00:5eed:1::21]:8080"]),
        "not-ready and terminating endpoints are no backends"
    );
    assert_eq!(state["kubernetes"]["namespace"], "shop");
    assert_eq!(state["kubernetes"]["frontend"], "web");

    let report = tcp_connects(lab.inside(), FRONTEND, 1000);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert!(
        tags(&report).is_subset(&set(&["stable-1", "stable-2", "canary-1"])),
        "only ready endpoints: {:?}",
        report.raw
    );
    assert_canary_share("weight 30 %", report.hits("canary"), report.tags_total(), 30.0);
    assert!(report.tag("stable-1") > 0 && report.tag("stable-2") > 0, "both stable pods get connections");

    let report6 = tcp_connects(lab.inside(), FRONTEND6, 300);
    assert_eq!(report6.errors_total(), 0, "{:?}", report6.raw);
    assert_eq!(tags(&report6), set(&["stable6-1", "canary6-1"]), "the IPv6 ClusterIP goes to the IPv6 endpoints");

    // Only what is needed is asked for: the frontend Service by name, the slices by service label,
    // all in the service's namespace, with watch bookmarks.
    let requests = lab.double.requests();
    for request in &requests {
        assert!(
            request.starts_with(&format!("/api/v1/namespaces/{NS}/services?"))
                || request.starts_with(&format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?")),
            "unexpected request {request}"
        );
        assert!(
            request.contains("fieldSelector=metadata.name%3Dweb")
                || request.contains("labelSelector=kubernetes.io%2Fservice-name%3Dweb-"),
            "request without a selector: {request}"
        );
    }
    assert!(
        requests.iter().any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{requests:#?}"
    );
}

#[test]
fn endpoint_changes_reach_the_datapath_within_100ms_and_no_connection_fails() {
    let mut lab = KubeLab::new(&[Pod::ready("127.0.0.21")], true, &web_config(50.0, "ports = [\"http\"]"));
    lab.wait_for("web", "the first sync", |s| kube_state(s) == "synced");

    // Clients connect flat out through every change.
    let mut clients =
        spawn_probe(lab.inside(), &["tcp", "--target", FRONTEND, "--count", "1000000", "--max-seconds", "8"]);
    std::thread::sleep(Duration::from_millis(300));

    /// One change of the canary's EndpointSlice: its pods, the tags of the ready ones, and the
    /// pod that leaves for good (its server is closed once the datapath no longer has it).
    struct Change<'a> {
        what: &'a str,
        pods: Vec<Pod<'a>>,
        ready_tags: &'a [&'a str],
        gone: Option<&'a str>,
    }
    let (c1, c2, c3) = ("127.0.0.21", "127.0.0.22", "127.0.0.23");
    let changes = [
        Change {
            what: "scale 1 → 2",
            pods: vec![Pod::ready(c1), Pod::ready(c2)],
            ready_tags: &["canary-1", "canary-2"],
            gone: None,
        },
        Change {
            what: "scale 2 → 3",
            pods: vec![Pod::ready(c1), Pod::ready(c2), Pod::ready(c3)],
            ready_tags: &["canary-1", "canary-2", "canary-3"],
            gone: None,
        },
        Change {
            what: "one not ready",
            pods: vec![Pod::ready(c1), Pod::not_ready(c2), Pod::ready(c3)],
            ready_tags: &["canary-1", "canary-3"],
            gone: Some("canary-2"),
        },
        Change {
            what: "one deleted",
            pods: vec![Pod::ready(c1), Pod::not_ready(c2)],
            ready_tags: &["canary-1"],
            gone: Some("canary-3"),
        },
    ];
    let mut latencies = Vec::new();
    for Change { what, pods, ready_tags, gone } in changes {
        let expected: BTreeSet<String> = pods
            .iter()
            .filter(|p| p.ready)
            .map(|p| format!("{}:8080", p.address))
            .chain(["[fd00:5eed:1::21]:8080".to_string()])
            .collect();
        let rv = lab.double.apply(&canary_slice(&pods));
        let (seen, _) = lab.wait_for("web", what, |s| strings(&s["canary"]) == expected);
        let sent = lab.double.sent_at(rv).expect("the double sent the change on a watch");
        let latency = seen.saturating_duration_since(sent);
        println!("kubernetes discovery latency, {what}: {:.1} ms", latency.as_secs_f64() * 1000.0);
        latencies.push((what, latency));
        // The pod that stopped being ready goes away for real: a connection steered there now
        // fails, so the clients' zero errors below prove none was.
        if let Some(tag) = gone {
            lab.close_pod(tag);
        }
        let report = tcp_connects(lab.inside(), FRONTEND, 200);
        assert_eq!(report.errors_total(), 0, "{what}: {:?}", report.raw);
        let allowed: BTreeSet<String> =
            ["stable-1", "stable-2"].iter().chain(ready_tags).map(|t| t.to_string()).collect();
        assert!(tags(&report).is_subset(&allowed), "{what}: new connections only to ready endpoints: {:?}", report.raw);
        std::thread::sleep(Duration::from_millis(300));
    }

    let status = clients.child.wait().unwrap();
    let mut output = String::new();
    clients.stdout.take().unwrap().read_to_string(&mut output).unwrap();
    assert!(status.success(), "clients: {output}");
    let report = e2e::TcpReport { raw: serde_json::from_str(&output).unwrap() };
    println!("clients during the changes: {} connections, {} failed", report.tags_total(), report.errors_total());
    assert!(report.tags_total() > 500, "the clients kept connecting: {:?}", report.raw);
    assert_eq!(report.errors_total(), 0, "no connection fails during the changes: {:?}", report.raw);
    for (what, latency) in latencies {
        assert!(latency < Duration::from_millis(100), "{what}: {latency:?} from the watch event to the datapath");
    }
}

#[test]
fn the_frontend_follows_the_cluster_ip_and_a_missing_service_says_why() {
    let lab = KubeLab::new(&[Pod::ready("127.0.0.21")], false, &web_config(0.0, ""));
    // The Service does not exist yet: the service exists, steers nothing, and says why.
    let (_, state) = lab.wait_for("web", "waiting for the Service", |s| {
        kube_state(s) == "waiting"
            && s["kubernetes"]["message"].as_str().is_some_and(|m| m.contains("Service shop/web does not exist"))
    });
    assert_eq!(strings(&state["frontends"]), BTreeSet::new(), "{state}");

    lab.double.apply(&web_service("127.1.0.90", &[("http", 80, "http")]));
    lab.wait_for("web", "the Service's ClusterIP", |s| strings(&s["frontends"]) == set(&["127.1.0.90:80"]));
    let report = tcp_connects(lab.inside(), "127.1.0.90:80", 100);
    assert_eq!((report.errors_total(), tags(&report)), (0, set(&["stable-1", "stable-2"])), "{:?}", report.raw);

    // Deleted and recreated with another ClusterIP: the frontend follows.
    lab.double.delete(Kind::Service, NS, "web");
    lab.wait_for("web", "the Service gone", |s| kube_state(s) == "waiting" && strings(&s["frontends"]).is_empty());
    lab.double.apply(&web_service("127.1.0.91", &[("http", 80, "http")]));
    lab.wait_for("web", "the new ClusterIP", |s| strings(&s["frontends"]) == set(&["127.1.0.91:80"]));
    let report = tcp_connects(lab.inside(), "127.1.0.91:80", 100);
    assert_eq!((report.errors_total(), tags(&report)), (0, set(&["stable-1", "stable-2"])), "{:?}", report.raw);

    // A headless frontend Service is refused with a clear message.
    lab.double.apply(&service(NS, "db", &["None"], &[("pg", 5432, "5432")]));
    let body = json!({ "kubernetes": { "namespace": NS, "frontend": "db", "stable": "web-stable" } });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/db", Some(&body));
    assert_eq!(status, 201, "{reply}");
    let (_, state) = lab.wait_for("db", "the headless refusal", |s| kube_state(s) == "refused");
    let message = state["kubernetes"]["message"].as_str().unwrap();
    assert!(message.contains("shop/db is headless (clusterIP: None)"), "{message}");
    assert!(strings(&state["frontends"]).is_empty());

    // Bad input names the field and changes nothing.
    for (body, field) in [
        (
            json!({ "frontends": ["127.1.0.99:80"], "kubernetes": { "namespace": NS, "frontend": "web", "stable": "web-stable" } }),
            "frontends",
        ),
        (
            json!({ "kubernetes": { "namespace": "Shop", "frontend": "web", "stable": "web-stable" } }),
            "kubernetes.namespace",
        ),
        (
            json!({ "kubernetes": { "namespace": NS, "frontend": "web", "stable": "web-stable", "ports": [0] } }),
            "kubernetes.ports[0]",
        ),
        (json!({ "kubernetes": { "namespace": NS, "frontend": "web" } }), "kubernetes"),
        (
            json!({ "kubernetes": { "namespace": NS, "frontend": "web", "stable": "a", "color": "x" } }),
            "kubernetes.color",
        ),
    ] {
        let (status, reply) = lab.agent.call("PUT", "/v1/services/bad", Some(&body));
        assert_eq!(status, 400, "{body} → {reply}");
        assert!(reply["field"].as_str().is_some_and(|f| f.starts_with(field)), "{body} → {reply} should name {field}");
    }
    assert_eq!(lab.agent.call("GET", "/v1/services/bad", None).0, 404, "a refused service is not added");

    // The CLI: `sockshift service add --k8s`, the service named after the frontend Service.
    lab.double.apply(&service(NS, "api", &["127.1.0.95"], &[("http", 80, "http")]));
    let output = std::process::Command::new(e2e::built_binary("sockshift"))
        .args(["service", "add", "--k8s", "shop/api", "--stable", "web-stable", "--canary", "web-canary"])
        .args(["--percent", "100", "--port", "http", "--api", &lab.agent.api.to_string(), "--output", "json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let added: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((added["name"].as_str(), added["kubernetes"]["canary"].as_str()), (Some("api"), Some("web-canary")));
    lab.wait_for("api", "the CLI-added service", |s| kube_state(s) == "synced");
    let report = tcp_connects(lab.inside(), "127.1.0.95:80", 50);
    assert_eq!((report.errors_total(), tags(&report)), (0, set(&["canary-1"])), "{:?}", report.raw);
}

/// A Kubernetes service added through the API to an agent that started without one (the
/// discovery task asks the API server nothing until then); a frontend written by hand takes the
/// place of a discovered one, the Kubernetes service says who has it, and takes it back once it
/// is released; a second Kubernetes service naming the same frontend Service steers nothing the
/// first one has.
#[test]
fn a_service_added_later_and_a_frontend_written_by_hand() {
    let lab = KubeLab::new(&[Pod::ready("127.0.0.21")], true, "");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lab.double.requests(), Vec::<String>::new(), "no Kubernetes service, no request");

    let web =
        json!({ "kubernetes": { "namespace": NS, "frontend": "web", "stable": "web-stable", "canary": "web-canary" } });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/web", Some(&web));
    assert_eq!(status, 201, "{reply}");
    lab.wait_for("web", "the first sync", |s| {
        kube_state(s) == "synced" && strings(&s["frontends"]) == set(&[FRONTEND, FRONTEND6])
    });

    let by_hand = json!({ "frontends": [FRONTEND], "stable": ["127.0.0.22:8080"] });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/by-hand", Some(&by_hand));
    assert_eq!(status, 201, "a hand-written frontend takes the place of a discovered one: {reply}");
    let state = lab.agent.service("web");
    assert_eq!(strings(&state["frontends"]), set(&[FRONTEND6]), "{state}");
    let message = state["kubernetes"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{FRONTEND} (service \"by-hand\" has it)")), "{state}");
    let report = tcp_connects(lab.inside(), FRONTEND, 50);
    assert_eq!((report.errors_total(), tags(&report)), (0, set(&["canary-2"])), "{:?}", report.raw);

    let (status, reply) = lab.agent.call("PUT", "/v1/services/web2", Some(&web));
    assert_eq!(status, 201, "{reply}");
    let (_, state) = lab.wait_for("web2", "the second service's sync", |s| kube_state(s) == "synced");
    assert!(strings(&state["frontends"]).is_empty(), "the first service keeps its frontends: {state}");
    let message = state["kubernetes"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{FRONTEND6} (service \"web\" has it)")), "{state}");

    let (status, reply) = lab.agent.call("DELETE", "/v1/services/by-hand", None);
    assert_eq!(status, 200, "{reply}");
    let state = lab.agent.service("web");
    assert_eq!(strings(&state["frontends"]), set(&[FRONTEND, FRONTEND6]), "taken back at once: {state}");
    assert!(state["kubernetes"]["message"].is_null(), "{state}");
    let report = tcp_connects(lab.inside(), FRONTEND, 50);
    assert_eq!((report.errors_total(), tags(&report)), (0, set(&["stable-1", "stable-2"])), "{:?}", report.raw);
    assert!(strings(&lab.agent.service("web2")["frontends"]).is_empty());
}

/// A rollback with `terminate_connections` of a Kubernetes service cuts the open connections to
/// its discovered canary endpoints (its config lists no address), and only those.
#[test]
fn a_rollback_cuts_the_connections_to_the_discovered_canary() {
    let lab = KubeLab::new(&[Pod::ready("127.0.0.21")], true, &web_config(0.0, "ports = [\"http\"]"));
    lab.wait_for("web", "the first sync", |s| kube_state(s) == "synced");
    let plan = json!({ "steps": [50, 100], "step_seconds": 600, "gates": "none",
                       "rollback": { "terminate_connections": true } });
    let (status, reply) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{reply}");
    lab.wait_for("web", "the first step", |s| s["canary_percent"] == json!(50.0));

    let mut held = spawn_probe(lab.inside(), &["hold", "--target", FRONTEND, "--count", "40"]);
    let held_line = held.wait_for_line("held");
    let held_tags: Value = serde_json::from_str(held_line.split_once(' ').unwrap().1).unwrap();
    let canary_held = held_tags["canary-1"].as_u64().unwrap_or(0);
    assert!(canary_held > 0 && held_tags["stable-1"].as_u64().unwrap_or(0) > 0, "{held_line}");

    let (status, reply) = lab.agent.call("POST", "/v1/services/web/rollback", None);
    assert_eq!(status, 200, "{reply}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let rollout = loop {
        let (_, rollout) = lab.agent.call("GET", "/v1/services/web/rollout", None);
        if rollout["terminated_connections"].is_u64() {
            break rollout;
        }
        assert!(Instant::now() < deadline, "no termination reported: {rollout}\n{}", lab.agent.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(rollout["terminated_connections"].as_u64(), Some(canary_held), "{rollout}");
    writeln!(held.child.stdin.as_mut().unwrap()).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(held.stdout.as_mut().unwrap(), &mut line).unwrap();
    let outcome: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(outcome["canary-1"]["reset"].as_u64(), Some(canary_held), "{outcome}");
    for stable in ["stable-1", "stable-2"] {
        assert_eq!(outcome[stable].get("reset"), None, "stable connections stay open: {outcome}");
    }
}

#[test]
fn api_server_outage_keeps_steering_and_the_relist_after_410_applies_only_the_difference() {
    let lab = KubeLab::new(&[Pod::ready("127.0.0.21"), Pod::ready("127.0.0.22")], true, &web_config(50.0, ""));
    let (_, before) = lab.wait_for("web", "the first sync", |s| kube_state(s) == "synced");
    let revision_before = before["revision"].as_u64().unwrap();
    let changes_before = before["kubernetes"]["changes_applied"].as_u64().unwrap();

    // Watch the service's state all along: every revision, every backend set it goes through.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (api, stop) = (lab.agent.api, stop.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = agent::client::request(api, None, "GET", "/v1/services/web", None) {
                    samples.push(r.body);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        })
    };

    let down_at = Instant::now();
    lab.double.stop();
    let (_, stale) = lab.wait_for("web", "stale", |s| kube_state(s) == "stale");
    let message = stale["kubernetes"]["message"].as_str().unwrap();
    assert!(message.starts_with("kubernetes: stale since "), "{message}");
    assert!(stale["kubernetes"]["stale_since"].is_string(), "{stale}");
    let metrics = metrics_text(&lab.agent);
    assert!(metrics.contains("sockshift_kubernetes_stale{service=\"web\"} 1"), "{metrics}");

    // Steering goes on with the last state.
    let report = tcp_connects(lab.inside(), FRONTEND, 300);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert_eq!(tags(&report), set(&["stable-1", "stable-2", "canary-1", "canary-2"]), "{:?}", report.raw);

    // While the server is away a canary pod goes; the history that could tell a resuming watch
    // is compacted by the time it is back.
    lab.double.apply(&canary_slice(&[Pod::ready("127.0.0.21")]));
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed()));
    let gone_before = lab.double.gone_sent();
    lab.double.restart(true);
    let back_at = Instant::now();
    let (_, after) = lab.wait_for("web", "the relist", |s| {
        kube_state(s) == "synced" && strings(&s["canary"]) == set(&["127.0.0.21:8080", "[fd00:5eed:1::21]:8080"])
    });
    println!(
        "kubernetes discovery: relisted and synced {:.1} s after the API server came back",
        back_at.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let samples = poller.join().unwrap();

    assert!(lab.double.gone_sent() > gone_before, "the resumed watches got 410 Gone");
    assert!(samples.len() > 500, "{} samples", samples.len());
    let mut revisions = BTreeSet::new();
    for sample in &samples {
        assert_eq!(strings(&sample["stable"]).len(), 3, "stable never loses a backend: {sample}");
        assert!(!strings(&sample["canary"]).is_empty(), "canary never goes empty: {sample}");
        assert_eq!(strings(&sample["frontends"]), set(&[FRONTEND, FRONTEND6]), "{sample}");
        revisions.insert(sample["revision"].as_u64().unwrap());
    }
    let revision_after = after["revision"].as_u64().unwrap();
    assert_eq!(revisions, BTreeSet::from([revision_before, revision_after]), "exactly one backend-set switch");
    assert_eq!(after["kubernetes"]["changes_applied"].as_u64().unwrap(), changes_before + 1, "{after}");
    assert!(after["kubernetes"]["stale_since"].is_null(), "{after}");
    assert!(metrics_text(&lab.agent).contains("sockshift_kubernetes_stale{service=\"web\"} 0"));
    let report = tcp_connects(lab.inside(), FRONTEND, 200);
    assert_eq!(report.errors_total(), 0);
    assert!(tags(&report).is_subset(&set(&["stable-1", "stable-2", "canary-1"])), "{:?}", report.raw);
}

#[test]
fn a_short_outage_resumes_the_watches_without_a_relist() {
    let lab = KubeLab::new(&[Pod::ready("127.0.0.21")], true, &web_config(50.0, ""));
    let (_, before) = lab.wait_for("web", "the first sync", |s| kube_state(s) == "synced");
    lab.double.stop();
    lab.wait_for("web", "stale", |s| kube_state(s) == "stale");
    std::thread::sleep(Duration::from_secs(2));
    let requests_before = lab.double.requests().len();
    lab.double.restart(false);
    // Nothing changed and nothing was compacted: the watches resume from their resourceVersion and
    // deliver nothing. The agent still sees that they work again (their retry came and went
    // without an error, and a probe list answers) and stops reporting stale.
    let (_, after) = lab.wait_for("web", "recovery without an event", |s| kube_state(s) == "synced");
    assert_eq!(after["revision"], before["revision"], "nothing was switched");
    assert_eq!(lab.double.gone_sent(), 0);
    let requests: Vec<String> = lab.double.requests().split_off(requests_before);
    // Any list other than a one-item probe is a relist, whatever its page size.
    let is_probe = |r: &String| r.contains("limit=1&") || r.ends_with("limit=1");
    assert!(
        requests.iter().filter(|r| !r.contains("watch=true")).all(is_probe),
        "no relist, only resumed watches (and limit=1 probes): {requests:#?}"
    );
    assert!(requests.iter().any(|r| r.contains("watch=true") && r.contains("resourceVersion=")), "{requests:#?}");
    // The resumed watches deliver the next change.
    lab.double.apply(&canary_slice(&[Pod::ready("127.0.0.21"), Pod::ready("127.0.0.22")]));
    lab.wait_for("web", "a change after the outage", |s| strings(&s["canary"]).len() == 3);
}

#[test]
fn a_restarted_agent_keeps_steering_while_the_api_server_is_away() {
    let mut lab = KubeLab::new(&[Pod::ready("127.0.0.21")], true, &web_config(50.0, ""));
    lab.wait_for("web", "the first sync", |s| kube_state(s) == "synced");
    lab.double.stop();
    lab.agent.stop_with(libc::SIGTERM);
    lab.agent.spawn();
    // The addresses discovery last listed are cached on the node: the new agent steers with them
    // and says where they come from.
    let (_, state) = lab.wait_for("web", "the restored state", |s| kube_state(s) == "stale");
    let message = state["kubernetes"]["message"].as_str().unwrap();
    assert!(message.contains("from before the agent restarted"), "{message}");
    assert_eq!(strings(&state["frontends"]), set(&[FRONTEND, FRONTEND6]), "{state}");
    let report = tcp_connects(lab.inside(), FRONTEND, 200);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert_eq!(tags(&report), set(&["stable-1", "stable-2", "canary-1"]), "{:?}", report.raw);
    // The API server back: the first list replaces the cached state.
    lab.double.apply(&canary_slice(&[Pod::ready("127.0.0.21"), Pod::ready("127.0.0.22")]));
    lab.double.restart(false);
    lab.wait_for("web", "the first list", |s| kube_state(s) == "synced" && strings(&s["canary"]).len() == 3);
}

#[test]
fn named_target_ports_resolve_like_kube_proxy() {
    // Service port http (80) targets the container port named "http", admin (81) the number
    // 9090; the slices publish admin first. Each frontend port goes to its own target port.
    let lab = KubeLab::new(&[Pod::ready("127.0.0.21")], false, &web_config(50.0, ""));
    lab.double.apply(&web_service("127.1.0.85", &[("http", 80, "http"), ("admin", 81, "9090")]));
    let (_, state) =
        lab.wait_for("web", "both ports", |s| kube_state(s) == "synced" && strings(&s["frontends"]).len() == 2);
    assert_eq!(strings(&state["frontends"]), set(&["127.1.0.85:80", "127.1.0.85:81"]));

    let http = tcp_connects(lab.inside(), "127.1.0.85:80", 300);
    assert_eq!(http.errors_total(), 0, "{:?}", http.raw);
    assert_eq!(tags(&http), set(&["stable-1", "stable-2", "canary-1"]), "port http → endpoint port http (8080)");
    let admin = tcp_connects(lab.inside(), "127.1.0.85:81", 300);
    assert_eq!(admin.errors_total(), 0, "{:?}", admin.raw);
    assert_eq!(
        tags(&admin),
        set(&["stable-1-admin", "stable-2-admin", "canary-1-admin"]),
        "port admin → endpoint port admin (9090)"
    );
}

/// `GET /metrics` as text (the harness's `call` parses JSON). The `Host` is the API's address,
/// as a scraper sends it: the agent refuses other names.
fn metrics_text(agent: &Agent) -> String {
    let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", agent.api).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}
