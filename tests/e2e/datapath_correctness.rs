//! Issue 9 acceptance: no connection misrouted, no stale UDP flow, no silent misattachment. One
//! test per item of the issue, each against the real kernel, asserting what the clients saw
//! (which backend answered, the address replies came from, connections reset or not) and what
//! the counters say.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, Write},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{counter, Lab, FRONTEND4, FRONTEND6};
use e2e::{
    built_binary, probe, require_root, run, serve, spawn_probe, tcp_connects, unique_name, Agent, Cgroup, NetNs,
    Placement, Spawned, TcpReport,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A counter at a path below `sides.SIDE` (`health.abandoned_attempts`, `unrecorded.socket_table_full`).
fn side(state: &Value, side: &str, path: &str) -> u64 {
    let mut value = &state["sides"][side];
    for part in path.split('.') {
        value = &value[part];
    }
    value.as_u64().unwrap_or_else(|| panic!("no sides.{side}.{path} in {state}"))
}

/// Both sides of a counter, added.
fn both(state: &Value, path: &str) -> u64 {
    side(state, "stable", path) + side(state, "canary", path)
}

fn datapath(agent: &Agent) -> Value {
    let (status, body) = agent.call("GET", "/v1/datapath", None);
    assert_eq!(status, 200, "{body}");
    body
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces the `[[service]]` tables of the agent's config file (the `[agent]` part stays) and
/// waits until the agent has `expect` and not `gone`.
fn rewrite_services(agent: &Agent, services: &str, expect: &[&str], gone: &[&str]) {
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    let head = config.split("[[service]]").next().unwrap();
    std::fs::write(&agent.config_path, format!("{head}{services}")).unwrap();
    wait_for("the config file change applied", Duration::from_secs(5), || {
        let (_, list) = agent.call("GET", "/v1/services", None);
        let names: BTreeSet<String> =
            list["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
        expect.iter().all(|n| names.contains(*n)) && gone.iter().all(|n| !names.contains(*n))
    });
}

/// Sets one `[agent]` key in the agent's config file (adding it if absent).
fn set_agent_key(agent: &Agent, key: &str, value: &str) {
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    let mut lines: Vec<String> = config.lines().map(String::from).collect();
    match lines.iter().position(|l| l.starts_with(&format!("{key} ="))) {
        Some(i) => lines[i] = format!("{key} = {value}"),
        None => lines.insert(1, format!("{key} = {value}")),
    }
    std::fs::write(&agent.config_path, lines.join("\n") + "\n").unwrap();
}

/// `sockshift agent` on the agent's config, expected to refuse to start: its exit status and
/// output.
fn agent_refuses(agent: &Agent) -> String {
    let output = Command::new(built_binary("sockshift"))
        .args(["agent", "--config"])
        .arg(&agent.config_path)
        .output()
        .expect("run sockshift agent");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "the agent should have refused to start:\n{text}");
    text
}

/// A line-driven probe (udp-session): sends `command` and parses the JSON line it answers.
fn session(probe: &mut Spawned, command: &str) -> Value {
    writeln!(probe.child.stdin.as_mut().unwrap(), "{command}").unwrap();
    let mut line = String::new();
    probe.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe answered {line:?}: {e}"))
}

/// The per-socket tags of a `send` round of udp-session (`None` for a socket that got an error).
fn tags(round: &Value) -> Vec<Option<String>> {
    round.as_array().unwrap().iter().map(|r| r["tag"].as_str().map(String::from)).collect()
}

/// The sockets of a `send` round (by index) that got `tag`.
fn on(tags: &[Option<String>], tag: &str) -> BTreeSet<usize> {
    tags.iter().enumerate().filter(|(_, t)| t.as_deref() == Some(tag)).map(|(i, _)| i).collect()
}

/// udp-session's `reconnect`: each socket's pending errno, if any.
fn reconnect(probe: &mut Spawned) -> Vec<Option<i32>> {
    writeln!(probe.child.stdin.as_mut().unwrap(), "reconnect").unwrap();
    let line = probe.wait_for_line("reconnected");
    serde_json::from_str(line.split_once(' ').unwrap().1).unwrap()
}

/// Ends a `hold` probe and returns, per tag, how many of its connections are open/reset.
fn release_hold(mut held: Spawned) -> Value {
    writeln!(held.child.stdin.as_mut().unwrap()).unwrap();
    let mut line = String::new();
    held.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// The `held {tags}` line of a hold probe, parsed.
fn held_tags(held: &mut Spawned) -> Value {
    let line = held.wait_for_line("held");
    serde_json::from_str(line.split_once(' ').unwrap().1).unwrap()
}

/// A CPU limit for a process: a cgroup with the cpu controller (cgroup v2 if its root delegates
/// `cpu`, else the cgroup v1 cpu hierarchy of a hybrid host). Removed on drop.
struct CpuLimit {
    dir: PathBuf,
}

impl CpuLimit {
    fn new(percent_of_a_cpu: u32) -> Self {
        let quota = percent_of_a_cpu * 1000;
        let v2 = agent::paths::cgroup2_root().expect("cgroup v2 mount");
        let delegated = std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
        if delegated.split_whitespace().any(|c| c == "cpu") {
            let dir = v2.join(unique_name("cpu"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cpu.max"), format!("{quota} 100000")).unwrap();
            return Self { dir };
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let v1 = mountinfo
            .lines()
            .find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut right = right.split_whitespace();
                let is_cpu = right.next()? == "cgroup" && right.nth(1)?.split(',').any(|o| o == "cpu");
                is_cpu.then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
            })
            .expect("no cpu controller: neither delegated in cgroup v2 nor mounted as cgroup v1");
        let dir = v1.join(unique_name("cpu"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
        Self { dir }
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a command inside a network namespace (`ip netns exec`, which is fine for tools that do
/// not need the cgroup tree).
fn in_netns(netns: &NetNs, args: &[&str]) {
    let mut all = vec!["netns", "exec", netns.name.as_str()];
    all.extend(args);
    run("ip", &all);
}

// ---------------------------------------------------------------------------------------------
// 1. Config edits that move frontends

/// Renaming a service in the config file, and moving a frontend to another service that sorts
/// first, in one edit: every frontend stays steered (the old code deleted both from the kernel).
#[test]
fn config_edits_that_move_frontends_keep_them_steered() {
    let service = |name: &str, frontends: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nfrontends = [{frontends}]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
             [\"127.0.0.1:8002\"]\ncanary_percent = 50\n"
        )
    };
    let lab = Lab::with_service(
        &(service("web", "\"127.1.0.1:80\"") + &service("shop", "\"127.1.0.2:80\", \"127.1.0.3:80\"")),
    );
    let steered = |what: &str, frontend: &str| {
        let report = tcp_connects(lab.inside(), frontend, 200);
        assert_eq!(report.tags_total(), 200, "{what}: {frontend} is not steered: {:?}", report.raw);
        assert!(report.tag("stable") > 0 && report.tag("canary") > 0, "{what}: {frontend}: {:?}", report.raw);
        assert_eq!(report.peer_is_target(), 200, "{what}: {:?}", report.raw);
    };
    for frontend in ["127.1.0.1:80", "127.1.0.2:80", "127.1.0.3:80"] {
        steered("before the edit", frontend);
    }

    // web -> www (same frontend); 127.1.0.2:80 moves from shop to aaa, which sorts first.
    rewrite_services(
        &lab.agent,
        &(service("www", "\"127.1.0.1:80\"")
            + &service("aaa", "\"127.1.0.2:80\"")
            + &service("shop", "\"127.1.0.3:80\"")),
        &["www", "aaa", "shop"],
        &["web"],
    );
    for frontend in ["127.1.0.1:80", "127.1.0.2:80", "127.1.0.3:80"] {
        steered("after the edit", frontend);
    }
    // The new owners count their connections (a renamed service is a new service).
    assert_eq!(both(&lab.agent.service("www"), "connections_steered"), 200);
    assert_eq!(both(&lab.agent.service("aaa"), "connections_steered"), 200);
    assert_eq!(both(&lab.agent.service("shop"), "connections_steered"), 600, "shop keeps its id and counters");
}

// ---------------------------------------------------------------------------------------------
// 2. Restart with many services

/// 3,000 services, and the agent restarted under a CPU limit of 5 % of one CPU (a CPU-limited
/// pod on a busy node), so its start takes far longer than the revision grace: a client
/// connecting flat out to the service that sorts last sees no failure at all, and every service
/// keeps the revision it had (a restart adopts what is pinned and rewrites nothing).
#[test]
fn a_slow_restart_with_many_services_keeps_every_frontend_steered() {
    let limit = CpuLimit::new(5);
    let services: String = (0..3000u32)
        .map(|i| {
            format!(
                "[[service]]\nname = \"svc-{i:04}\"\nfrontends = [\"127.3.{}.{}:80\"]\nstable = \
                 [\"127.0.0.1:8001\"]\ncanary = [\"127.0.0.1:8002\"]\ncanary_percent = 50\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let mut lab = Lab::with_service(&services);
    let names = ["svc-0000", "svc-1500", "svc-2999"];
    let revisions =
        |lab: &Lab| -> Vec<Value> { names.iter().map(|n| lab.agent.service(n)["revision"].clone()).collect() };
    let before = revisions(&lab);
    let last = "127.3.11.183:80"; // svc-2999
    let mut client =
        spawn_probe(lab.inside(), &["tcp", "--target", last, "--count", "10000000", "--max-seconds", "70"]);
    std::thread::sleep(Duration::from_millis(500));
    lab.agent.stop_with(libc::SIGKILL);
    let started = Instant::now();
    lab.agent.spawn_joining(Some(&limit.procs()));
    let took = started.elapsed();
    eprintln!("the throttled restart took {took:?}");
    assert!(took > Duration::from_secs(4), "the restart was not slow ({took:?}): the test would prove nothing");
    assert!(client.child.try_wait().unwrap().is_none(), "the client stopped before the restart was over");
    let mut line = String::new();
    client.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["errors"], json!({}), "connections failed during the slow restart: {report}");
    let tags = report["tags"].as_object().unwrap();
    assert!(tags.keys().all(|t| t == "stable" || t == "canary"), "{report}");
    assert!(tags.values().map(|v| v.as_u64().unwrap()).sum::<u64>() > 1000, "{report}");
    assert_eq!(revisions(&lab), before, "a restart must adopt the pinned revisions, not rewrite them");
    assert!(lab.agent.log().contains("adopted"), "{}", lab.agent.log());
}

// ---------------------------------------------------------------------------------------------
// 3. UDP follows the weight

struct UdpLab {
    agent: Agent,
    _servers: Spawned,
    cgroup: Cgroup,
    netns: NetNs,
}

impl UdpLab {
    /// UDP servers tagged stable (7101), canary (7102) and canary2 (7103); service "udp" on
    /// 127.1.0.71:7100 with stable 7101 and canary 7102.
    fn new(canary_percent: f64) -> Self {
        require_root();
        let netns = NetNs::new();
        let cgroup = Cgroup::new();
        let servers = serve(
            Placement { netns: Some(&netns), cgroup: None },
            &[
                "serve-udp",
                "--listen",
                "127.0.0.1:7101=stable",
                "--listen",
                "127.0.0.1:7102=canary",
                "--listen",
                "127.0.0.1:7103=canary2",
            ],
        );
        let agent = Agent::start(
            &cgroup,
            &format!(
                "[[service]]\nname = \"udp\"\nfrontends = [\"127.1.0.71:7100\"]\nstable = [\"127.0.0.1:7101\"]\ncanary = \
                 [\"127.0.0.1:7102\"]\ncanary_percent = {canary_percent}\n"
            ),
        );
        Self { agent, _servers: servers, cgroup, netns }
    }

    fn inside(&self) -> Placement<'_> {
        Placement { netns: Some(&self.netns), cgroup: Some(&self.cgroup) }
    }

    /// 40 connected UDP sockets to the service (udp-session), and the tag each got first.
    fn connected_sockets(&self) -> (Spawned, Vec<Option<String>>) {
        let mut sockets = spawn_probe(
            self.inside(),
            &["udp-session", "--target", "127.1.0.71:7100", "--sockets", "40", "--connected"],
        );
        sockets.wait_for_line("ready");
        let first = tags(&session(&mut sockets, "send"));
        (sockets, first)
    }

    fn put_canary(&self, canary: &str, percent: f64) {
        let body = json!({ "frontends": ["127.1.0.71:7100"], "stable": ["127.0.0.1:7101"], "canary": [canary], "canary_percent": percent });
        let (status, reply) = self.agent.call("PUT", "/v1/services/udp", Some(&body));
        assert_eq!(status, 200, "{reply}");
    }
}

/// Long-lived unconnected UDP sockets follow every change at their next datagram: the kill
/// switch moves the canary ones to stable, raising the weight again brings back exactly the
/// same sockets (the choice is sticky while nothing changes), and a canary backend replaced in
/// the service is left at once. Replies always come from the frontend.
#[test]
fn unconnected_udp_sockets_follow_the_weight_and_backend_changes() {
    let lab = UdpLab::new(50.0);
    let mut sockets = spawn_probe(lab.inside(), &["udp-session", "--target", "127.1.0.71:7100", "--sockets", "40"]);
    sockets.wait_for_line("ready");
    let round = |sockets: &mut Spawned| {
        let round = session(sockets, "send");
        for result in round.as_array().unwrap() {
            assert_eq!(result["from_target"], json!(true), "a reply not from the frontend: {round}");
        }
        tags(&round)
            .into_iter()
            .map(|t| t.unwrap_or_else(|| panic!("a datagram got no reply: {round}")))
            .collect::<Vec<_>>()
    };
    let first = round(&mut sockets);
    let canary_sockets: BTreeSet<usize> =
        first.iter().enumerate().filter(|(_, t)| *t == "canary").map(|(i, _)| i).collect();
    assert!(!canary_sockets.is_empty() && canary_sockets.len() < 40, "{first:?}");
    assert_eq!(round(&mut sockets), first, "nothing changed: every socket keeps its backend");

    assert_eq!(lab.agent.call("POST", "/v1/services/udp/rollback", None).0, 200);
    assert!(round(&mut sockets).iter().all(|t| t == "stable"), "after the kill switch every datagram goes to stable");

    lab.agent.set_percent("udp", 50.0);
    assert_eq!(round(&mut sockets), first, "back at 50 %, the same sockets are canary again");

    lab.put_canary("127.0.0.1:7103", 50.0);
    let replaced = round(&mut sockets);
    for (i, tag) in replaced.iter().enumerate() {
        let expected = if canary_sockets.contains(&i) { "canary2" } else { "stable" };
        assert_eq!(tag, expected, "socket {i} after the canary backend was replaced: {replaced:?}");
    }
    let state = lab.agent.service("udp");
    assert!(side(&state, "canary", "datagrams_steered") > 0 && side(&state, "stable", "datagrams_steered") > 0);
}

/// Connected UDP sockets keep their backend like TCP, so a rollback (the kill switch) and the
/// removal of their backend destroy them: the application gets an error, connects again and is
/// steered afresh. Sockets on stable, and on backends that stay, are not touched.
#[test]
fn connected_udp_sockets_on_a_rolled_back_or_removed_backend_are_destroyed() {
    let lab = UdpLab::new(50.0);
    let (mut sockets, first) = lab.connected_sockets();
    let canary = on(&first, "canary");
    let stable = on(&first, "stable");
    assert!(!canary.is_empty() && canary.len() + stable.len() == 40, "{first:?}");

    // Each socket's ECONNABORTED is reported once: by the receive of an exchange the
    // destruction interrupted (the termination is asynchronous), else as the pending error.
    let aborted_in = |round: &Value, told: &mut BTreeSet<usize>| {
        for (i, result) in round.as_array().unwrap().iter().enumerate() {
            if result["errno"].as_i64() == Some(libc::ECONNABORTED as i64) {
                told.insert(i);
            }
        }
    };

    // Kill switch: the canary's connected sockets are destroyed (asynchronously, off the API).
    let (status, _) = lab.agent.call("POST", "/v1/services/udp/rollback", None);
    assert_eq!(status, 200);
    let mut round = Value::Null;
    let mut told = BTreeSet::new();
    wait_for("the canary's connected sockets destroyed", Duration::from_secs(5), || {
        round = session(&mut sockets, "send");
        aborted_in(&round, &mut told);
        canary.iter().all(|i| round[i]["error"].is_string())
    });
    for i in &stable {
        assert_eq!(round[i]["tag"], json!("stable"), "stable socket {i} must be untouched: {round}");
    }
    for i in &canary {
        // The socket was disconnected: send() without an address is refused, or the pending
        // ECONNABORTED is reported.
        assert!(
            matches!(round[i]["errno"].as_i64().map(|e| e as i32), Some(libc::EDESTADDRREQ | libc::ECONNABORTED)),
            "socket {i}: {round}"
        );
    }
    let pending = reconnect(&mut sockets);
    for (i, error) in pending.iter().enumerate() {
        let expected = if canary.contains(&i) && !told.contains(&i) { Some(libc::ECONNABORTED) } else { None };
        assert_eq!(*error, expected, "socket {i}: the application is told its socket was aborted: {pending:?}");
    }
    let after = session(&mut sockets, "send");
    assert!(tags(&after).iter().all(|t| t.as_deref() == Some("stable")), "reconnected at 0 %: {after}");

    // Back to 50 %, connected again: then the canary backend is replaced.
    lab.agent.set_percent("udp", 50.0);
    reconnect(&mut sockets);
    let again = tags(&session(&mut sockets, "send"));
    let canary = on(&again, "canary");
    let stable = on(&again, "stable");
    assert!(!canary.is_empty(), "{again:?}");
    lab.put_canary("127.0.0.1:7103", 50.0);
    let mut told = BTreeSet::new();
    wait_for("connected sockets of the removed backend destroyed", Duration::from_secs(5), || {
        round = session(&mut sockets, "send");
        aborted_in(&round, &mut told);
        canary.iter().all(|i| round[i]["error"].is_string())
    });
    for i in &stable {
        assert_eq!(round[i]["tag"], json!("stable"), "socket {i} on a backend that stays: {round}");
    }
    let pending = reconnect(&mut sockets);
    for (i, error) in pending.iter().enumerate() {
        let expected = if canary.contains(&i) && !told.contains(&i) { Some(libc::ECONNABORTED) } else { None };
        assert_eq!(*error, expected, "socket {i} of the removed backend: {pending:?}");
    }
    let after = tags(&session(&mut sockets, "send"));
    assert!(after.iter().all(|t| matches!(t.as_deref(), Some("stable" | "canary2"))), "{after:?}");
    assert!(after.iter().any(|t| t.as_deref() == Some("canary2")), "{after:?}");
}

/// A weight change undone at once (0, then back) leaves connected UDP sockets alone: the agent
/// destroys a dropped side's sockets a moment after the drop (it collects a run of changes into
/// one read of the socket table), and a change that puts the weight back before then takes them
/// out of that work. Without it, sockets steered to the canary while it was back at 50 % would
/// be destroyed for a weight that no longer holds.
#[test]
fn connected_udp_sockets_survive_a_weight_drop_undone_at_once() {
    let lab = UdpLab::new(50.0);
    let (mut sockets, first) = lab.connected_sockets();
    assert!(first.iter().any(|t| t.as_deref() == Some("canary")), "{first:?}");
    assert!(first.iter().all(|t| t.is_some()), "{first:?}");

    lab.agent.set_percent("udp", 0.0);
    lab.agent.set_percent("udp", 50.0);
    // Well past the moment the drop's work would have run.
    std::thread::sleep(Duration::from_secs(2));
    let after = tags(&session(&mut sockets, "send"));
    // A destroyed socket would fail its send (no tag).
    assert_eq!(after, first, "every socket keeps its backend and none was destroyed");

    // A drop that stays is still carried out.
    lab.agent.set_percent("udp", 0.0);
    let canary = on(&first, "canary");
    let mut round = Value::Null;
    wait_for("the canary's connected sockets destroyed", Duration::from_secs(5), || {
        round = session(&mut sockets, "send");
        canary.iter().all(|i| round[i]["error"].is_string())
    });
}

// ---------------------------------------------------------------------------------------------
// 4. One UDP socket, several frontends

/// One unconnected socket asks three nameservers at once (musl's resolver does): each reply
/// comes back as from the frontend it was sent to, also on a dual-stack socket sending to
/// v4-mapped frontends (the old code kept one translation per socket and left the others'
/// replies untranslated).
#[test]
fn one_udp_socket_talking_to_several_frontends_gets_every_reply_translated() {
    require_root();
    let netns = NetNs::new();
    let cgroup = Cgroup::new();
    let _servers = serve(
        Placement { netns: Some(&netns), cgroup: None },
        &["serve-udp", "--listen", "127.0.0.1:7201=a", "--listen", "127.0.0.1:7202=b", "--listen", "127.0.0.1:7203=c"],
    );
    let services: String = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "[[service]]\nname = \"ns-{name}\"\nfrontends = [\"127.1.0.8{}:53\"]\nstable = [\"127.0.0.1:720{}\"]\n",
                i + 1,
                i + 1
            )
        })
        .collect();
    let agent = Agent::start(&cgroup, &services);
    let udp_flows = || {
        let (status, body) = agent.call("GET", "/v1/datapath", None);
        assert_eq!(status, 200, "{body}");
        body["udp_flows"].as_u64().unwrap()
    };
    let flows_before = udp_flows();
    let inside = Placement { netns: Some(&netns), cgroup: Some(&cgroup) };
    for (targets, prefix) in [
        ("127.1.0.81:53,127.1.0.82:53,127.1.0.83:53", ""),
        ("[::ffff:127.1.0.81]:53,[::ffff:127.1.0.82]:53,[::ffff:127.1.0.83]:53", "::ffff:"),
    ] {
        for _ in 0..10 {
            let report = probe(inside, &["udp-multi", "--targets", targets]);
            assert_eq!(report["errors"], json!({}), "{report}");
            let replies = report["replies"].as_array().unwrap();
            assert_eq!(replies.len(), 3, "{report}");
            for reply in replies {
                let tag = reply["tag"].as_str().unwrap();
                let expected = match tag {
                    "a" => "127.1.0.81:53",
                    "b" => "127.1.0.82:53",
                    _ => "127.1.0.83:53",
                };
                let expected = if prefix.is_empty() {
                    expected.to_string()
                } else {
                    format!("[{prefix}{}", expected.replace(":53", "]:53"))
                };
                assert_eq!(reply["from"], json!(expected), "the reply of {tag} must come from its frontend: {report}");
            }
        }
    }
    for name in ["ns-a", "ns-b", "ns-c"] {
        assert_eq!(side(&agent.service(name), "stable", "datagrams_steered"), 20, "{name}");
    }
    // The probes have exited: every socket's three translations went with it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while udp_flows() != flows_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(udp_flows(), flows_before, "translations of closed sockets left in the UDP flow table");
}

// ---------------------------------------------------------------------------------------------
// 5. Abandoned connection attempts

/// A canary that drops SYNs (an iptables DROP in the test's own namespace), and clients that
/// give up after one second: every attempt the client abandoned is counted on the canary side,
/// none on stable, and none as a kernel-detected failure.
#[test]
fn a_canary_that_drops_syns_shows_the_attempts_clients_abandoned() {
    let lab = Lab::with_service(
        "[[service]]\nname = \"blackhole\"\nfrontends = [\"127.1.0.5:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
         [\"127.0.0.1:8002\"]\ncanary_percent = 50\n",
    );
    in_netns(&lab.netns, &["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8002", "--syn", "-j", "DROP"]);
    let report = TcpReport {
        raw: probe(lab.inside(), &["tcp", "--target", "127.1.0.5:80", "--count", "24", "--connect-timeout-ms", "1000"]),
    };
    let timed_out = report.error("TimedOut");
    assert!(timed_out > 0 && report.tag("stable") > 0, "{:?}", report.raw);
    assert_eq!(timed_out + report.tag("stable"), 24, "{:?}", report.raw);
    let state = lab.agent.service("blackhole");
    assert_eq!(side(&state, "canary", "health.abandoned_attempts"), timed_out, "{state}");
    assert_eq!(side(&state, "canary", "health.failed_attempts"), 0, "{state}");
    assert_eq!(side(&state, "canary", "health.established"), 0, "{state}");
    assert_eq!(side(&state, "stable", "health.abandoned_attempts"), 0, "{state}");
    assert_eq!(side(&state, "stable", "health.established"), report.tag("stable"), "{state}");
    assert_eq!(side(&state, "canary", "connections_steered"), timed_out, "{state}");
}

// ---------------------------------------------------------------------------------------------
// 6. Weight 0 means 0

/// A service whose canary serves a family stable does not is refused, through the API and in the
/// config file, naming the field; a dual-stack service at weight 0 (after the kill switch) sends
/// no connection of either family to the canary.
#[test]
fn weight_zero_means_no_canary_in_any_family() {
    let lab = Lab::new(50.0);
    let before = lab.agent.call("GET", "/v1/services", None).1;
    let body = json!({
        "frontends": ["127.1.0.40:80", "[fd00:5eed::40]:80"],
        "stable": ["127.0.0.1:8001"],
        "canary": ["127.0.0.1:8002", "[::1]:8002"],
    });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/mixed", Some(&body));
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["field"], json!("stable"), "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("IPv6"), "{reply}");
    assert_eq!(lab.agent.call("GET", "/v1/services", None).1["services"], before["services"], "nothing changed");

    // The same in a config file: refused before anything is attached.
    let dir = std::env::temp_dir().join(unique_name("weight0"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sockshift.toml");
    std::fs::write(
        &config,
        "[[service]]\nname = \"mixed\"\nfrontends = [\"10.96.0.10:80\", \"[fd00::10]:80\"]\nstable = \
         [\"10.0.1.5:8080\"]\ncanary = [\"10.0.2.7:8080\", \"[fd00::2:7]:8080\"]\n",
    )
    .unwrap();
    let output =
        Command::new(built_binary("sockshift")).args(["agent", "--check", "--config"]).arg(&config).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("service[0] \"mixed\".stable"), "{text}");

    assert_eq!(lab.agent.call("POST", "/v1/services/web/rollback", None).0, 200);
    assert_eq!(tcp_connects(lab.inside(), FRONTEND4, 300).tag("stable"), 300);
    assert_eq!(tcp_connects(lab.inside(), FRONTEND6, 300).tag("stable6"), 300);
    assert_eq!(side(&lab.agent.service("web"), "canary", "connections_steered"), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. A full socket table

/// A socket table of capacity 128 (128 slots and 128 spill places) with a bound of 100 per client
/// namespace. A client holding 300
/// connections gets all 300 steered but only 100 recorded, and another client's connections are
/// all recorded (getpeername gives the frontend, health counted). When several clients fill the
/// table, TCP is still steered (counted as unrecorded), and unconnected UDP keeps working:
/// its flow table evicts the least recently used flows instead of failing.
#[test]
fn a_full_socket_table_steers_anyway_and_one_namespace_cannot_starve_the_others() {
    require_root();
    let cgroup = Cgroup::new();
    let namespaces: Vec<NetNs> = (0..4).map(|_| NetNs::new()).collect();
    let paths: Vec<String> = namespaces.iter().map(|ns| ns.path().display().to_string()).collect();
    let mut args = vec!["serve-tcp", "--listen", "127.0.0.1:8001=stable", "--listen", "127.0.0.1:8002=canary"];
    for path in &paths {
        args.extend(["--netns", path.as_str()]);
    }
    let _servers = serve(Placement::default(), &args);
    let _udp_servers: Vec<Spawned> = namespaces
        .iter()
        .map(|ns| serve(Placement { netns: Some(ns), cgroup: None }, &["serve-udp", "--listen", "127.0.0.1:7301=udp"]))
        .collect();
    let agent = Agent::start_with(
        &cgroup,
        "steered_socket_capacity = 128\nsteered_sockets_per_netns = 100",
        "[[service]]\nname = \"hog\"\nfrontends = [\"127.1.0.91:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
         [\"127.0.0.1:8002\"]\ncanary_percent = 50\n\n[[service]]\nname = \"web\"\nfrontends = [\"127.1.0.1:80\"]\nstable \
         = [\"127.0.0.1:8001\"]\ncanary = [\"127.0.0.1:8002\"]\ncanary_percent = 50\n\n[[service]]\nname = \
         \"dns\"\nfrontends = [\"127.1.0.92:53\"]\nstable = [\"127.0.0.1:7301\"]\n",
    );
    let status = datapath(&agent);
    assert_eq!(status["steered_socket_capacity"], json!(128), "the real size of the table: {status}");
    assert_eq!(status["steered_sockets_per_netns"], json!(100), "{status}");
    let place = |i: usize| Placement { netns: Some(&namespaces[i]), cgroup: Some(&cgroup) };
    let (victim, hogs) = (3, [0, 1, 2]);
    let hold = |i: usize| {
        let mut held = spawn_probe(place(i), &["hold", "--target", "127.1.0.91:80", "--count", "300"]);
        let tags = held_tags(&mut held);
        assert_eq!(tags["stable"].as_u64().unwrap_or(0) + tags["canary"].as_u64().unwrap_or(0), 300, "{tags}");
        held
    };

    // One client holds 300: all steered, 100 recorded.
    let first = hold(hogs[0]);
    let hog = agent.service("hog");
    assert_eq!(both(&hog, "connections_steered"), 300, "{hog}");
    assert_eq!(both(&hog, "open_socket_records"), 100, "{hog}");
    assert_eq!(both(&hog, "unrecorded.socket_netns_full"), 200, "{hog}");
    let report = tcp_connects(place(victim), FRONTEND4, 50);
    assert_eq!((report.tags_total(), report.peer_is_target()), (50, 50), "{:?}", report.raw);
    let web = agent.service("web");
    assert_eq!(both(&web, "health.established"), 50, "{web}");
    assert_eq!(both(&web, "unrecorded.socket_netns_full") + both(&web, "unrecorded.socket_table_full"), 0, "{web}");

    // Three clients fill the table: still steered, counted as unrecorded. The table holds at
    // least its capacity (128) and at most its 128 slots and 128 spill places: which of those
    // fill depends on where the sockets' cookies fall, so the counts are checked for what they
    // must add up to.
    let second = hold(hogs[1]);
    let third = hold(hogs[2]);
    let hog = agent.service("hog");
    let (recorded, full) = (both(&hog, "open_socket_records"), both(&hog, "unrecorded.socket_table_full"));
    // The first two clients get their 100 records each and 200 refused by the bound; the third
    // finds the table full before it reaches its bound.
    assert_eq!(both(&hog, "unrecorded.socket_netns_full"), 400, "{hog}");
    assert_eq!(recorded + full, 900 - 400, "every connection recorded or counted as unrecorded: {hog}");
    assert!((200..=256).contains(&recorded) && full >= 244, "{hog}");
    let web_before = agent.service("web");
    let report = tcp_connects(place(victim), FRONTEND4, 50);
    assert_eq!(report.tags_total(), 50, "TCP is steered with a full table: {:?}", report.raw);
    let web = agent.service("web");
    let web_full = both(&web, "unrecorded.socket_table_full") - both(&web_before, "unrecorded.socket_table_full");
    assert_eq!(
        report.peer_is_target() + web_full,
        50,
        "a socket without a record shows the backend to getpeername, one with a record the frontend: {:?} {web}",
        report.raw
    );

    // Unconnected UDP: 600 open sockets of one client overflow the flow table; another client's
    // exchanges still get translated replies.
    let mut churn = spawn_probe(
        place(hogs[0]),
        &["churn", "--target", "127.1.0.92:53", "--count", "1200", "--batch", "600", "--pause-every", "600"],
    );
    churn.wait_for_line("paused");
    let report = probe(place(victim), &["udp", "--target", "127.1.0.92:53", "--count", "20"]);
    assert_eq!(report["from_target"], json!(20), "{report}");
    assert!(datapath(&agent)["udp_flows"].as_u64().unwrap() <= 256 + 8);
    writeln!(churn.child.stdin.as_mut().unwrap()).unwrap();

    drop((release_hold(first), release_hold(second), release_hold(third)));
    wait_for("records of the closed connections deleted", Duration::from_secs(5), || {
        datapath(&agent)["open_steered_sockets"] == json!(0)
    });
    let report = tcp_connects(place(victim), FRONTEND4, 50);
    assert_eq!(report.peer_is_target(), 50, "recorded again: {:?}", report.raw);
}

// ---------------------------------------------------------------------------------------------
// 8. Service ids

/// A removed service's id is not handed to the next service while its sockets are open: resets
/// of the old service's connections are not charged to the new one, and the id is freed once
/// they have closed. A restarted agent gives a service new in the file a fresh id, not the one
/// a pinned service holds (whose counters it would inherit).
#[test]
fn service_ids_are_not_reused_while_old_sockets_are_open() {
    let mut lab = Lab::with_service(
        "[[service]]\nname = \"old\"\nfrontends = [\"127.1.0.30:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
         [\"127.0.0.1:8002\"]\ncanary_percent = 100\n",
    );
    let mut held = spawn_probe(lab.inside(), &["hold", "--target", "127.1.0.30:80", "--count", "10"]);
    assert_eq!(held_tags(&mut held)["canary"], json!(10));
    let (status, _) = lab.agent.call("DELETE", "/v1/services/old", None);
    assert_eq!(status, 200);
    let body = json!({ "frontends": ["127.1.0.31:80"], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8002"], "canary_percent": 100 });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/new", Some(&body));
    assert_eq!(status, 201, "{reply}");
    assert_eq!(datapath(&lab.agent)["draining_service_ids"], json!(1), "old's id waits for its sockets");
    writeln!(lab.servers.child.stdin.as_mut().unwrap(), "reset canary").unwrap();
    let line = lab.servers.wait_for_line("reset canary");
    assert_eq!(line, "reset canary 10");
    let outcome = release_hold(held);
    assert_eq!(outcome["canary"]["reset"], json!(10), "{outcome}");
    let state = lab.agent.service("new");
    assert_eq!(both(&state, "health.resets"), 0, "old's resets charged to new: {state}");
    wait_for("old's id freed once its sockets closed", Duration::from_secs(5), || {
        datapath(&lab.agent)["draining_service_ids"] == json!(0)
    });

    // Restart: "b" is pinned with counts; "a" (sorting first) is new in the file.
    let report = tcp_connects(lab.inside(), "127.1.0.31:80", 100);
    assert_eq!(report.tags_total(), 100);
    lab.agent.stop_with(libc::SIGTERM);
    let config = std::fs::read_to_string(&lab.agent.config_path).unwrap();
    let head = config.split("[[service]]").next().unwrap();
    std::fs::write(
        &lab.agent.config_path,
        format!(
            "{head}[[service]]\nname = \"a\"\nfrontends = [\"127.1.0.32:80\"]\nstable = [\"127.0.0.1:8001\"]\n\n\
             [[service]]\nname = \"new\"\nfrontends = [\"127.1.0.31:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
             [\"127.0.0.1:8002\"]\ncanary_percent = 100\n"
        ),
    )
    .unwrap();
    lab.agent.spawn();
    let a = lab.agent.service("a");
    assert_eq!(both(&a, "connections_steered"), 0, "a new service inherited pinned counters: {a}");
    assert_eq!(both(&lab.agent.service("new"), "connections_steered"), 100, "new keeps its own");
}

// ---------------------------------------------------------------------------------------------
// 9. Adopt only what matches

/// Changing `agent.cgroup` between runs moves the programs: the new cgroup is steered, the old
/// one no longer; a removed old cgroup does not stop the agent; a pinned map that does not match
/// (a different socket table size) is refused with a message saying what to do, and the running
/// datapath is left as it was.
#[test]
fn pinned_links_and_maps_are_adopted_only_where_they_match() {
    let mut lab = Lab::new(50.0);
    fn place<'a>(lab: &'a Lab, cgroup: &'a Cgroup) -> Placement<'a> {
        Placement { netns: Some(&lab.netns), cgroup: Some(cgroup) }
    }
    assert_eq!(tcp_connects(lab.inside(), FRONTEND4, 100).tags_total(), 100);

    // A new cgroup.
    let moved = Cgroup::new();
    lab.agent.stop_with(libc::SIGTERM);
    set_agent_key(&lab.agent, "cgroup", &format!("{:?}", moved.path.display().to_string()));
    lab.agent.spawn();
    let report = tcp_connects(place(&lab, &moved), FRONTEND4, 200);
    assert_eq!((report.tags_total(), report.peer_is_target()), (200, 200), "the new cgroup: {:?}", report.raw);
    let report = tcp_connects(place(&lab, &lab.cgroup), FRONTEND4, 50);
    assert_eq!(report.error("ConnectionRefused"), 50, "the old cgroup is not steered any more: {:?}", report.raw);
    let status = datapath(&lab.agent);
    assert_eq!(status["cgroup"], json!(moved.path.display().to_string()));
    assert_eq!(status["links"]["sock4_connect"], json!("reattached"), "{status}");
    assert!(lab.agent.log().contains("agent.cgroup changed"), "{}", lab.agent.log());

    // The old cgroup (now the configured one) is removed while the agent is down.
    lab.agent.stop_with(libc::SIGTERM);
    drop(moved);
    let third = Cgroup::new();
    set_agent_key(&lab.agent, "cgroup", &format!("{:?}", third.path.display().to_string()));
    lab.agent.spawn();
    assert_eq!(tcp_connects(place(&lab, &third), FRONTEND4, 100).tags_total(), 100);
    assert!(lab.agent.log().contains("cgroup was removed"), "{}", lab.agent.log());

    // A socket table of another size: refused, nothing detached.
    lab.agent.stop_with(libc::SIGTERM);
    set_agent_key(&lab.agent, "steered_socket_capacity", "1024");
    let refusal = agent_refuses(&lab.agent);
    for expected in
        ["SOCKETS_V1", "max entries is 65536", "needs 1024", "agent.steered_socket_capacity = 65536", "uninstall"]
    {
        assert!(refusal.contains(expected), "the refusal should say {expected:?}:\n{refusal}");
    }
    let report = tcp_connects(place(&lab, &third), FRONTEND4, 100);
    assert_eq!((report.tags_total(), report.peer_is_target()), (100, 100), "still steering: {:?}", report.raw);

    // Tables made with another size (an older release's default, say) are adopted as they are
    // when the size is not configured: the key removed, the agent starts on the 1024-slot
    // tables instead of refusing them.
    let status = Command::new(built_binary("sockshift")).args(["uninstall", "--bpffs"]).arg(&lab.agent.bpffs).status();
    assert!(status.unwrap().success());
    lab.agent.spawn();
    lab.agent.stop_with(libc::SIGTERM);
    let config = std::fs::read_to_string(&lab.agent.config_path).unwrap();
    let unset: Vec<&str> = config.lines().filter(|l| !l.starts_with("steered_socket_capacity =")).collect();
    std::fs::write(&lab.agent.config_path, unset.join("\n") + "\n").unwrap();
    lab.agent.spawn();
    let status = datapath(&lab.agent);
    assert_eq!(
        (&status["steered_socket_capacity"], &status["udp_flow_capacity"], &status["steered_sockets_per_netns"]),
        (&json!(1024), &json!(1024), &json!(256)),
        "the pinned size, and a quarter of it per namespace: {status}"
    );
    let report = tcp_connects(place(&lab, &third), FRONTEND4, 100);
    assert_eq!((report.tags_total(), report.peer_is_target()), (100, 100), "{:?}", report.raw);
}

/// A pinned map's entries as (key, value) bytes, read with bpftool.
fn map_entries(pin: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(pin).output().unwrap();
    assert!(out.status.success(), "bpftool map dump {}: {}", pin.display(), String::from_utf8_lossy(&out.stderr));
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect()
    };
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    dump.as_array().unwrap().iter().map(|e| (bytes(&e["key"]), bytes(&e["value"]))).collect()
}

fn hex_args(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An upgrade from an agent before the socket slot table, which kept every socket record in the
/// hash map SOCKETS_V1: the records of connections it steered are still found (their closes
/// delete them and are counted) because the new agent marks the spill table as holding records
/// no slot counts; a later start clears the mark once they are gone. (The older agent's state is
/// stood in for: the held connections' records are moved from their slots into SOCKETS_V1, in
/// that agent's layout, and the slot table's state map is unpinned, as that agent had none.)
#[test]
fn socket_records_of_an_agent_before_the_slot_table_are_still_found() {
    let mut lab = Lab::new_with_agent(0.0, "steered_socket_capacity = 256");
    let mut held = spawn_probe(lab.inside(), &["hold", "--target", FRONTEND4, "--count", "10"]);
    assert_eq!(held_tags(&mut held)["stable"], json!(10));
    lab.agent.stop_with(libc::SIGTERM);

    let slots_pin = lab.agent.bpffs.join("SOCKET_SLOTS_V1");
    let spill_pin = lab.agent.bpffs.join("SOCKETS_V1");
    let (slots_arg, spill_arg) = (slots_pin.display().to_string(), spill_pin.display().to_string());
    let mut moved = 0;
    for (key, value) in map_entries(&slots_pin) {
        let cookie = &value[0..8];
        if cookie.iter().all(|b| *b == 0) {
            continue;
        }
        // SocketSlot: cookie, overflow, then the 44-byte SocketEntry the older agent stored.
        let mut args =
            vec!["map".to_string(), "update".into(), "pinned".into(), spill_arg.clone(), "key".into(), "hex".into()];
        args.extend(hex_args(cookie));
        args.extend(["value".into(), "hex".into()]);
        args.extend(hex_args(&value[16..60]));
        run("bpftool", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let mut args =
            vec!["map".to_string(), "update".into(), "pinned".into(), slots_arg.clone(), "key".into(), "hex".into()];
        args.extend(hex_args(&key));
        args.extend(["value".into(), "hex".into()]);
        args.extend(hex_args(&[0u8; 64]));
        run("bpftool", &args.iter().map(String::as_str).collect::<Vec<_>>());
        moved += 1;
    }
    assert_eq!(moved, 10, "the held connections' records");
    std::fs::remove_file(lab.agent.bpffs.join("SOCKET_TABLE_V1")).unwrap();

    lab.agent.spawn();
    assert!(lab.agent.log().contains("socket records of an older agent are in SOCKETS_V1"), "{}", lab.agent.log());
    let mark = map_entries(&lab.agent.bpffs.join("SOCKET_TABLE_V1"));
    assert_eq!(mark[0].1[0], 1, "the legacy mark is set before the new programs run");
    assert_eq!(datapath(&lab.agent)["open_steered_sockets"], json!(10), "the older records count as open");
    // New connections take slots and translate as before.
    let report = tcp_connects(lab.inside(), FRONTEND4, 50);
    assert_eq!((report.tags_total(), report.peer_is_target()), (50, 50), "{:?}", report.raw);

    // The old connections close: their records are found in SOCKETS_V1, deleted and counted.
    drop(release_hold(held));
    wait_for("the older records deleted as their sockets closed", Duration::from_secs(5), || {
        datapath(&lab.agent)["open_steered_sockets"] == json!(0)
    });
    assert!(map_entries(&spill_pin).is_empty(), "nothing left in the spill table");

    // A later start finds none left and clears the mark.
    lab.agent.stop_with(libc::SIGTERM);
    lab.agent.spawn();
    let mark = map_entries(&lab.agent.bpffs.join("SOCKET_TABLE_V1"));
    assert_eq!(mark[0].1[0], 0, "the legacy mark is cleared once no older record is left");
    let report = tcp_connects(lab.inside(), FRONTEND4, 50);
    assert_eq!((report.tags_total(), report.peer_is_target()), (50, 50), "{:?}", report.raw);
}

/// One value of a pinned map, read with bpftool.
fn map_lookup(pin: &std::path::Path, key: &[u8]) -> Vec<u8> {
    let mut args = vec!["-j".to_string(), "map".into(), "lookup".into(), "pinned".into(), pin.display().to_string()];
    args.extend(["key".into(), "hex".into()]);
    args.extend(hex_args(key));
    let out = Command::new("bpftool").args(&args).output().unwrap();
    assert!(out.status.success(), "bpftool map lookup {}: {}", pin.display(), String::from_utf8_lossy(&out.stderr));
    let entry: Value = serde_json::from_slice(&out.stdout).unwrap();
    entry["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect()
}

/// Writes one entry of a pinned map with bpftool.
fn map_update(pin: &std::path::Path, key: &[u8], value: &[u8]) {
    let mut args = vec!["map".to_string(), "update".into(), "pinned".into(), pin.display().to_string()];
    args.extend(["key".into(), "hex".into()]);
    args.extend(hex_args(key));
    args.extend(["value".into(), "hex".into()]);
    args.extend(hex_args(value));
    run("bpftool", &args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// An upgrade from an agent that kept backends in a hash (BACKENDS_V1, keyed by revision number,
/// side, family and index, which FRONTENDS_V1 values named): its services are carried into the
/// backend array before the new programs run, so every connection made during the upgrade is
/// steered, IPv4 and IPv6, to both sides, each to a backend of its own family, and the old maps
/// are unpinned. Later changes use the array. (The older agent is stood in for by its maps, made
/// with bpftool in its layout from what this agent pinned, under revision numbers the array
/// never uses; this agent's FRONTENDS_V2 and BACKENDS_V2 are unpinned, as that agent had none, and
/// the programs left running read them until the new ones replace them, as that agent's programs
/// read its maps.)
#[test]
fn services_of_an_agent_before_the_backend_array_carry_over() {
    let mut lab = Lab::new(50.0);
    lab.agent.stop_with(libc::SIGTERM);
    let bpffs = lab.agent.bpffs.clone();
    let (frontends_v1, backends_v1) = (bpffs.join("FRONTENDS_V1"), bpffs.join("BACKENDS_V1"));
    for (pin, key, value, entries) in [(&frontends_v1, "20", "28", "262144"), (&backends_v1, "8", "20", "1048576")] {
        let name = pin.file_name().unwrap().to_str().unwrap();
        let pin = pin.display().to_string();
        let args = ["map", "create", &pin, "type", "hash", "key", key, "value", value, "entries", entries];
        run("bpftool", &[&args[..], &["name", name, "flags", "1"]].concat());
    }
    let frontends = map_entries(&bpffs.join("FRONTENDS_V2"));
    assert_eq!(frontends.len(), 2, "web's IPv4 and IPv6 frontends");
    let mut carried_backends = 0;
    for (key, value) in &frontends {
        let revision = u32::from_ne_bytes(value[4..8].try_into().unwrap());
        let old_revision = 7_000_000 + revision;
        let count = |at: usize| u16::from_ne_bytes(value[at..at + 2].try_into().unwrap());
        // The array's order: stable IPv4, stable IPv6, canary IPv4, canary IPv6, from `revision` on.
        let mut slot = revision;
        for (side, family, count) in [(0u8, 4u8, count(20)), (0, 6, count(22)), (1, 4, count(24)), (1, 6, count(26))] {
            for index in 0..count {
                let backend = map_lookup(&bpffs.join("BACKENDS_V2"), &slot.to_ne_bytes());
                let mut old_key = old_revision.to_ne_bytes().to_vec();
                old_key.extend([side, family]);
                old_key.extend(index.to_ne_bytes());
                map_update(&backends_v1, &old_key, &backend);
                carried_backends += 1;
                slot += 1;
            }
        }
        let mut old_value = value.clone();
        old_value[4..8].copy_from_slice(&old_revision.to_ne_bytes());
        map_update(&frontends_v1, key, &old_value);
    }
    assert_eq!(carried_backends, 8, "one backend per side and family, once for each of the two frontends");
    std::fs::remove_file(bpffs.join("FRONTENDS_V2")).unwrap();
    std::fs::remove_file(bpffs.join("BACKENDS_V2")).unwrap();

    // Clients connecting flat out across the upgrade.
    let clients: Vec<Spawned> = [FRONTEND4, FRONTEND6]
        .iter()
        .map(|target| {
            spawn_probe(lab.inside(), &["tcp", "--target", target, "--count", "100000000", "--max-seconds", "5"])
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    lab.agent.spawn();
    let log = lab.agent.log();
    assert!(log.contains("carried 2 frontends over from FRONTENDS_V1 and BACKENDS_V1"), "{log}");
    assert!(!frontends_v1.exists() && !backends_v1.exists(), "the old maps are unpinned once the new programs run");
    for (mut client, tags) in clients.into_iter().zip([["stable", "canary"], ["stable6", "canary6"]]) {
        let mut line = String::new();
        client.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        let report: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(report["errors"], json!({}), "connections failed during the upgrade: {report}");
        let seen = report["tags"].as_object().unwrap();
        assert!(seen.keys().all(|t| tags.contains(&t.as_str())), "a connection reached another family: {report}");
        assert!(tags.iter().all(|t| seen.get(*t).and_then(Value::as_u64).unwrap_or(0) > 100), "{report}");
        let total: u64 = seen.values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(report["peer_is_target"].as_u64(), Some(total), "{report}");
    }

    // The array serves later changes: the kill switch, and a new backend set (a new revision).
    let (status, body) = lab.agent.call("PUT", "/v1/services/web/canary", Some(&json!({ "percent": 0 })));
    assert_eq!(status, 200, "{body}");
    let report = tcp_connects(lab.inside(), FRONTEND4, 100);
    assert_eq!((report.tag("stable"), report.peer_is_target()), (100, 100), "{:?}", report.raw);
    let revision = lab.agent.service("web")["revision"].as_u64().unwrap();
    let body = json!({
        "frontends": [FRONTEND4, FRONTEND6],
        "stable": ["127.0.0.1:8002", "[::1]:8002"],
        "canary": ["127.0.0.1:8001"],
        "canary_percent": 0,
    });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/web", Some(&body));
    assert_eq!(status, 200, "{reply}");
    assert_ne!(lab.agent.service("web")["revision"].as_u64().unwrap(), revision, "a new backend set, a new revision");
    let report = tcp_connects(lab.inside(), FRONTEND4, 100);
    assert_eq!((report.tag("canary"), report.peer_is_target()), (100, 100), "stable is now :8002: {:?}", report.raw);
    let report = tcp_connects(lab.inside(), FRONTEND6, 100);
    assert_eq!(report.tag("canary6"), 100, "{:?}", report.raw);
}

/// An upgrade from an agent that kept per-CPU counters (COUNTERS_V2): each service's counts
/// carry over into the shared COUNTERS_V4, summed over CPUs, before the new programs run, and
/// the old map is unpinned. (The older agent is stood in for by its map, made with bpftool in
/// the layout it had: a per-CPU hash of (service id, side) to 136-byte counters.)
#[test]
fn per_cpu_counters_of_an_older_agent_carry_over() {
    require_root();
    let cgroup = Cgroup::new();
    let mut agent = Agent::start(
        &cgroup,
        "[[service]]\nname = \"web\"\nfrontends = [\"127.1.0.1:80\"]\nstable = [\"127.0.0.1:8001\"]\n",
    );
    agent.stop_with(libc::SIGTERM);
    let pin = agent.bpffs.join("COUNTERS_V2");
    let pin_arg = pin.display().to_string();
    run(
        "bpftool",
        &[
            "map",
            "create",
            &pin_arg,
            "type",
            "percpu_hash",
            "key",
            "8",
            "value",
            "136",
            "entries",
            "131072",
            "name",
            "COUNTERS_V2",
            "flags",
            "1",
        ],
    );
    // Service id 0 (the only service), stable side: 5 connections steered, 3 established, on
    // every CPU (bpftool writes the value to each).
    let mut value = vec!["00"; 136];
    value[0] = "05";
    value[16] = "03";
    let mut args =
        vec!["map", "update", "pinned", &pin_arg, "key", "hex", "00", "00", "00", "00", "00", "00", "00", "00"];
    args.push("value");
    args.push("hex");
    args.extend(value.iter().copied());
    run("bpftool", &args);
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let cpus: u64 = possible
        .trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum();

    agent.spawn();
    let web = agent.service("web");
    assert_eq!(side(&web, "stable", "connections_steered"), 5 * cpus, "{web}");
    assert_eq!(side(&web, "stable", "health.established"), 3 * cpus, "{web}");
    assert!(!pin.exists(), "the old counters map is unpinned once the new programs run");
    assert!(agent.log().contains("carried the counters of 1 service sides over"), "{}", agent.log());
    let memory = datapath(&agent);
    let names: Vec<&str> = memory["maps"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"COUNTERS_V4") && !names.contains(&"COUNTERS_V2"), "{memory}");
    let total: u64 = memory["maps"].as_array().unwrap().iter().map(|m| m["bytes"].as_u64().unwrap()).sum();
    assert_eq!(memory["map_memory_bytes"], json!(total), "{memory}");
    assert!(total > 17 << 20, "the counters array alone is 17 MiB: {memory}");
}

/// An upgrade from an agent whose programs made two counter adds per steered `connect()`
/// (COUNTERS_V3: `connections_steered` and `socket_records_opened`, where one now derives the
/// other): every count carries over exactly, the records of connections still open under the old
/// programs stay open and are counted closed by the new ones when those connections close, a
/// table-full count that mixed connects and datagrams keeps its total, and the old map is
/// unpinned. (The older agent is stood in for by its map, made with bpftool in its layout from
/// what this agent counted; this agent's COUNTERS_V4 is unpinned, as that agent had none.)
#[test]
fn shared_counters_of_an_agent_before_the_derived_record_count_carry_over() {
    let mut lab = Lab::new(0.0);
    let report = tcp_connects(lab.inside(), FRONTEND4, 20);
    assert_eq!(report.tag("stable"), 20, "{:?}", report.raw);
    let mut held = spawn_probe(lab.inside(), &["hold", "--target", FRONTEND4, "--count", "5"]);
    assert_eq!(held_tags(&mut held)["stable"], json!(5));
    wait_for("the 20 closed connections' records counted closed", Duration::from_secs(5), || {
        side(&lab.agent.service("web"), "stable", "open_socket_records") == 5
    });
    let before = lab.agent.service("web");
    assert_eq!(side(&before, "stable", "connections_steered"), 25, "{before}");
    assert_eq!(side(&before, "stable", "open_socket_records"), 5, "{before}");
    let established = side(&before, "stable", "health.established");
    lab.agent.stop_with(libc::SIGTERM);

    let bpffs = lab.agent.bpffs.clone();
    let frontends = map_entries(&bpffs.join("FRONTENDS_V2"));
    let service_id = u32::from_ne_bytes(frontends[0].1[0..4].try_into().unwrap());
    let slot = (service_id * 2).to_ne_bytes(); // the stable side
    let v4 = map_lookup(&bpffs.join("COUNTERS_V4"), &slot);
    let field = |at: usize| u64::from_ne_bytes(v4[at * 8..at * 8 + 8].try_into().unwrap());
    let (steered, closed) = (field(0), field(7));
    assert_eq!((steered, closed), (25, 20), "COUNTERS_V4: connections_steered, socket_records_closed");
    // The same counts in the V3 layout, as the older programs kept them, plus what they counted
    // that this test cannot provoke: 3 connects with the socket table full and 4 datagrams with
    // the flow table full, both in V3's one socket_table_full.
    let mut v3 = [0u64; 17];
    v3[0] = steered + 3; // connections_steered
    v3[2] = established;
    v3[12] = steered; // socket_records_opened
    v3[13] = closed; // socket_records_closed
    v3[14] = 3 + 4; // socket_table_full
    let v3_pin = bpffs.join("COUNTERS_V3");
    let v3_arg = v3_pin.display().to_string();
    let args = ["map", "create", &v3_arg, "type", "array", "key", "4", "value", "136", "entries", "131072"];
    run("bpftool", &[&args[..], &["name", "COUNTERS_V3"]].concat());
    map_update(&v3_pin, &slot, &v3.iter().flat_map(|f| f.to_ne_bytes()).collect::<Vec<u8>>());
    std::fs::remove_file(bpffs.join("COUNTERS_V4")).unwrap();

    lab.agent.spawn();
    assert!(lab.agent.log().contains("carried the counters of 1 service sides over"), "{}", lab.agent.log());
    assert!(!v3_pin.exists(), "the old counters map is unpinned once the new programs run");
    let web = lab.agent.service("web");
    assert_eq!(side(&web, "stable", "connections_steered"), 28, "{web}");
    assert_eq!(side(&web, "stable", "open_socket_records"), 5, "the held connections' records: {web}");
    assert_eq!(side(&web, "stable", "unrecorded.socket_table_full"), 7, "{web}");
    assert_eq!(side(&web, "stable", "unrecorded.socket_netns_full"), 0, "{web}");
    assert_eq!(side(&web, "stable", "health.established"), established, "{web}");

    // The new programs count on: the old connections' closes, and new connections with one add.
    let released = release_hold(held);
    assert_eq!(released["stable"]["open"], json!(5), "{released}");
    wait_for("the held connections counted closed", Duration::from_secs(5), || {
        side(&lab.agent.service("web"), "stable", "open_socket_records") == 0
    });
    let report = tcp_connects(lab.inside(), FRONTEND4, 10);
    assert_eq!((report.tag("stable"), report.peer_is_target()), (10, 10), "{:?}", report.raw);
    let web = lab.agent.service("web");
    assert_eq!(side(&web, "stable", "connections_steered"), 38, "{web}");
    assert_eq!(side(&web, "stable", "health.established"), established + 10, "{web}");
    wait_for("the new connections' records closed", Duration::from_secs(5), || {
        side(&lab.agent.service("web"), "stable", "open_socket_records") == 0
    });
}

// ---------------------------------------------------------------------------------------------
// 10. Precise rollback termination

/// A rollout rolled back with `terminate_connections`: exactly the connections the datapath
/// steered to the canary are reset and counted; steered stable connections and direct
/// connections to the canary pod (never steered) stay open.
#[test]
fn rollback_termination_resets_only_steered_canary_connections() {
    let mut lab = Lab::new(0.0);
    let plan = json!({
        "steps": [50, 100],
        "step_seconds": 3,
        "gates": { "max_failed_attempt_ratio": 0.1, "min_connections": 100 },
        "rollback": { "terminate_connections": true },
    });
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{body}");
    let mut steered = spawn_probe(lab.inside(), &["hold", "--target", FRONTEND4, "--count", "40"]);
    let steered_tags = held_tags(&mut steered);
    let steered_canary = steered_tags["canary"].as_u64().unwrap_or(0);
    assert!(steered_canary > 0 && steered_tags["stable"].as_u64().unwrap_or(0) > 0, "{steered_tags}");
    // Direct connections to the canary pod, from the same steered cgroup and namespace.
    let mut direct = spawn_probe(lab.inside(), &["hold", "--target", "127.0.0.1:8002", "--count", "10"]);
    assert_eq!(held_tags(&mut direct)["canary"], json!(10));

    writeln!(lab.servers.child.stdin.as_mut().unwrap(), "close canary").unwrap();
    lab.servers.wait_for_line("closed canary");
    let _ = tcp_connects(lab.inside(), FRONTEND4, 400);
    let deadline = Instant::now() + Duration::from_secs(10);
    let rollout = loop {
        let (_, rollout) = lab.agent.call("GET", "/v1/services/web/rollout", None);
        if rollout["terminated_connections"].is_u64() {
            break rollout;
        }
        assert!(Instant::now() < deadline, "no termination: {rollout}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(rollout["state"], json!("rolled_back"), "{rollout}");
    assert_eq!(rollout["terminated_connections"].as_u64(), Some(steered_canary), "{rollout}");
    let steered = release_hold(steered);
    assert_eq!(steered["canary"]["reset"].as_u64(), Some(steered_canary), "{steered}");
    assert_eq!(steered["stable"].get("reset"), None, "steered stable connections stay: {steered}");
    let direct = release_hold(direct);
    assert_eq!(direct["canary"]["open"], json!(10), "direct connections to the canary pod stay: {direct}");
}

// ---------------------------------------------------------------------------------------------
// 11. Other socket load balancers

/// Another program on the same hook is found at start, by name, with where it is attached and
/// whether it runs first (a warning and a field of /v1/datapath). Attached at a descendant
/// cgroup, sockshift runs before a socket load balancer of the ancestor that rewrites the same
/// frontend, and steers; processes outside that descendant get the other balancer's choice.
#[test]
fn other_socket_load_balancers_are_reported_and_a_descendant_cgroup_runs_first() {
    require_root();
    let netns = NetNs::new();
    let parent = Cgroup::new();
    let _servers = serve(
        Placement { netns: Some(&netns), cgroup: None },
        &["serve-tcp", "--listen", "127.0.0.1:8001=stable", "--listen", "127.0.0.1:8002=canary"],
    );
    // The parent's balancer sends the frontend to stable, always.
    let parent_path = parent.path.display().to_string();
    let mut balancer = spawn_probe(
        Placement::default(),
        &["attach-foreign", "--cgroup", &parent_path, "--name", "other_lb", "--rewrite", "127.1.0.1:80=127.0.0.1:8001"],
    );
    balancer.wait_for_line("attached");
    let child = Cgroup::under(&parent.path);
    // And one more on the child itself, attached before the agent.
    let child_path = child.path.display().to_string();
    let mut neighbour =
        spawn_probe(Placement::default(), &["attach-foreign", "--cgroup", &child_path, "--name", "neighbour"]);
    neighbour.wait_for_line("attached");
    let agent = Agent::start(
        &child,
        "[[service]]\nname = \"web\"\nfrontends = [\"127.1.0.1:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
         [\"127.0.0.1:8002\"]\ncanary_percent = 50\n",
    );
    let foreign = datapath(&agent)["foreign_programs"].clone();
    let find = |name: &str| {
        foreign
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == json!(name) && p["hook"] == json!("connect4"))
            .cloned()
            .unwrap_or_else(|| panic!("{name} not reported: {foreign}"))
    };
    let other = find("other_lb");
    assert_eq!(
        (other["attached_to_cgroup"].clone(), other["runs_before_sockshift"].clone()),
        (json!(false), json!(false))
    );
    let neighbour_entry = find("neighbour");
    assert_eq!(neighbour_entry["attached_to_cgroup"], json!(true), "{neighbour_entry}");
    assert_eq!(neighbour_entry["runs_before_sockshift"], json!(true), "attached before sockshift: {neighbour_entry}");
    assert!(agent.log().contains("other_lb") && agent.log().contains("neighbour"), "{}", agent.log());

    let report = tcp_connects(Placement { netns: Some(&netns), cgroup: Some(&child) }, FRONTEND4, 400);
    assert_eq!(report.tags_total(), 400, "{:?}", report.raw);
    assert!(report.tag("canary") > 120, "sockshift steers first in the descendant: {:?}", report.raw);
    let report = tcp_connects(Placement { netns: Some(&netns), cgroup: Some(&parent) }, FRONTEND4, 100);
    assert_eq!(report.tag("stable"), 100, "outside it, only the other balancer runs: {:?}", report.raw);
    drop(agent);
    drop((balancer, neighbour));
}

/// With `agent.host_netns_only`, sockets of the host network namespace are steered and those of
/// pod namespaces are left alone (to a sidecar mesh).
#[test]
fn host_netns_only_leaves_pod_namespaces_alone() {
    require_root();
    let pod = NetNs::new();
    let cgroup = Cgroup::new();
    let (stable_port, canary_port) = (e2e::free_port(), e2e::free_port());
    let stable = format!("127.0.0.1:{stable_port}");
    let canary = format!("127.0.0.1:{canary_port}");
    let _host_servers = serve(
        Placement::default(),
        &["serve-tcp", "--listen", &format!("{stable}=stable"), "--listen", &format!("{canary}=canary")],
    );
    let _pod_servers = serve(
        Placement { netns: Some(&pod), cgroup: None },
        &["serve-tcp", "--listen", &format!("{stable}=pod-stable"), "--listen", &format!("{canary}=pod-canary")],
    );
    let agent = Agent::start_with(
        &cgroup,
        "host_netns_only = true",
        &format!(
            "[[service]]\nname = \"web\"\nfrontends = [\"127.1.0.95:80\"]\nstable = [\"{stable}\"]\ncanary = \
             [\"{canary}\"]\ncanary_percent = 50\n"
        ),
    );
    assert_eq!(datapath(&agent)["host_netns_only"], json!(true));
    let host = tcp_connects(Placement { netns: None, cgroup: Some(&cgroup) }, "127.1.0.95:80", 200);
    assert_eq!(host.tags_total(), 200, "the host namespace is steered: {:?}", host.raw);
    assert!(host.tag("canary") > 0, "{:?}", host.raw);
    let in_pod = tcp_connects(Placement { netns: Some(&pod), cgroup: Some(&cgroup) }, "127.1.0.95:80", 50);
    assert_eq!(in_pod.error("ConnectionRefused"), 50, "a pod namespace is left alone: {:?}", in_pod.raw);
}

// ---------------------------------------------------------------------------------------------
// 12. Health signal quality

/// Without TCP timestamps, a connection whose first SYN was lost has no RTT sample at
/// establishment (the kernel reports 0): that is not counted as a 0 µs sample; the RTT taken
/// when the connection closes is. Each connection's retransmission timeout is counted, and so is
/// the connection that had it.
#[test]
fn srtt_skips_zero_samples_and_rtos_are_counted_per_connection() {
    let lab = Lab::with_service(
        "[[service]]\nname = \"lossy\"\nfrontends = [\"127.1.0.6:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = \
         [\"127.0.0.1:8002\"]\ncanary_percent = 100\n",
    );
    in_netns(&lab.netns, &["sysctl", "-qw", "net.ipv4.tcp_timestamps=0", "net.ipv4.tcp_no_metrics_save=1"]);
    let five_requests = || TcpReport {
        raw: probe(
            lab.inside(),
            &["tcp", "--target", "127.1.0.6:80", "--count", "5", "--request", "--connect-timeout-ms", "5000"],
        ),
    };
    // First to stable, with no SYN lost: each connection is sampled when it is established and
    // again when it closes.
    lab.agent.set_percent("lossy", 0.0);
    let report = five_requests();
    assert_eq!(report.tag("stable"), 5, "{:?}", report.raw);
    let state = lab.agent.service("lossy");
    assert_eq!(side(&state, "stable", "health.established"), 5, "{state}");
    assert_eq!(side(&state, "stable", "health.srtt_close_samples"), 5, "{state}");
    assert_eq!(side(&state, "stable", "health.srtt_samples"), 10, "one sample at establishment, one at close: {state}");
    lab.agent.set_percent("lossy", 100.0);
    // Every other SYN to the canary is dropped: each connection's first, so its retransmission
    // (one second later) gets through.
    in_netns(
        &lab.netns,
        &[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "8002",
            "--syn",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "2",
            "--packet",
            "0",
            "-j",
            "DROP",
        ],
    );
    let report = five_requests();
    assert_eq!(report.tag("canary"), 5, "{:?}", report.raw);
    let state = lab.agent.service("lossy");
    assert_eq!(side(&state, "canary", "health.established"), 5, "{state}");
    assert_eq!(side(&state, "canary", "health.srtt_close_samples"), 5, "{state}");
    assert_eq!(side(&state, "canary", "health.srtt_samples"), 5, "only the at-close samples: {state}");
    assert!(side(&state, "canary", "health.srtt_avg_us") > 0, "{state}");
    assert!(side(&state, "canary", "health.retransmission_timeouts") >= 5, "{state}");
    assert_eq!(side(&state, "canary", "health.connections_with_rto"), 5, "{state}");
    assert_eq!(counter(&state, "stable", "connections_with_rto"), 0, "{state}");
}
