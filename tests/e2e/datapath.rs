//! Issue 3 acceptance: UDP with a real DNS server and client, getpeername, client affinity and
//! monotone cohorts, cohort overrides, atomic updates, bounded socket state, kernel health.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, Write},
    path::Path,
    time::{Duration, Instant},
};

use common::{counter, Lab, FRONTEND4, FRONTEND6, FRONTEND_MAPPED};
use e2e::{
    assert_canary_share, probe, require_root, serve, spawn_in, spawn_probe, tcp_connects, Agent, Cgroup, NetNs,
    Placement,
};
use serde_json::{json, Value};

#[test]
fn getpeername_reports_the_frontend() {
    let lab = Lab::new(50.0);
    for frontend in [FRONTEND4, FRONTEND6, FRONTEND_MAPPED] {
        let report = tcp_connects(lab.inside(), frontend, 300);
        assert_eq!(report.tags_total(), 300, "{frontend}: {:?}", report.raw);
        assert_eq!(report.peer_is_target(), 300, "{frontend}: getpeername() must give the frontend: {:?}", report.raw);
    }
}

/// Two dnsmasq servers answering different records are the two sides of a DNS service; `dig`
/// (which drops replies from any other address than the one it asked) is the client.
#[test]
fn udp_dns_split_with_dnsmasq_and_dig() {
    require_root();
    let netns = NetNs::new();
    let cgroup = Cgroup::new();
    let outside = Placement { netns: Some(&netns), cgroup: None };
    let mut servers = Vec::new();
    // The answers are DNS data only (documentation addresses); nothing ever connects to them.
    for (port, answer) in [(5301, "192.0.2.1"), (5302, "192.0.2.2")] {
        let port = format!("--port={port}");
        let address = format!("--address=/web.test/{answer}");
        servers.push(spawn_in(
            outside,
            Path::new("dnsmasq"),
            &[
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                &port,
                &address,
            ],
        ));
    }
    let agent = Agent::start(
        &cgroup,
        r#"[[service]]
name = "dns"
frontends = ["127.1.0.53:53"]
stable = ["127.0.0.1:5301"]
canary = ["127.0.0.1:5302"]
canary_percent = 20
"#,
    );
    for port in ["5301", "5302"] {
        wait_for_dns(outside, port);
    }

    let batch = std::env::temp_dir().join(e2e::unique_name("dig"));
    std::fs::write(&batch, "web.test A\n".repeat(2000)).unwrap();
    let mut dig = std::process::Command::new("dig");
    dig.args(["@127.1.0.53", "-p", "53", "+short", "+tries=1", "+time=1", "-f"]).arg(&batch);
    e2e::place(&mut dig, Placement { netns: Some(&netns), cgroup: Some(&cgroup) });
    let output = dig.output().expect("run dig");
    let _ = std::fs::remove_file(&batch);
    let text = String::from_utf8_lossy(&output.stdout);
    let mut answers: BTreeMap<&str, u32> = BTreeMap::new();
    for line in text.lines() {
        *answers.entry(line.trim()).or_default() += 1;
    }
    let (stable, canary) =
        (answers.get("192.0.2.1").copied().unwrap_or(0), answers.get("192.0.2.2").copied().unwrap_or(0));
    // dig accepts a reply only from the address it asked: 2000 answers mean every reply came
    // back as from the frontend.
    assert_eq!(stable + canary, 2000, "dig answers {answers:?}\nstderr: {}", String::from_utf8_lossy(&output.stderr));
    assert_canary_share("DNS answers", canary.into(), 2000, 20.0);

    let state = agent.service("dns");
    assert!(counter(&state, "stable", "connections_steered") + counter(&state, "stable", "datagrams_steered") > 0);
    drop(servers);
}

/// Waits until dnsmasq answers on 127.0.0.1:PORT (asked directly, not steered).
fn wait_for_dns(placement: Placement<'_>, port: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut dig = std::process::Command::new("dig");
        dig.args(["@127.0.0.1", "-p", port, "+short", "+tries=1", "+time=1", "web.test"]);
        e2e::place(&mut dig, placement);
        let output = dig.output().expect("run dig");
        if !String::from_utf8_lossy(&output.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq on port {port} does not answer: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn unconnected_udp_socket_keeps_one_backend() {
    require_root();
    let netns = NetNs::new();
    let cgroup = Cgroup::new();
    let _servers = serve(
        Placement { netns: Some(&netns), cgroup: None },
        &[
            "serve-udp",
            "--listen",
            "127.0.0.1:7001=stable",
            "--listen",
            "127.0.0.1:7002=canary",
            "--listen",
            "[::1]:7001=stable6",
            "--listen",
            "[::1]:7002=canary6",
        ],
    );
    let agent = Agent::start(
        &cgroup,
        r#"[[service]]
name = "udp"
frontends = ["127.1.0.7:7000", "[fd00:5eed::7]:7000"]
stable = ["127.0.0.1:7001", "[::1]:7001"]
canary = ["127.0.0.1:7002", "[::1]:7002"]
canary_percent = 50
"#,
    );
    let inside = Placement { netns: Some(&netns), cgroup: Some(&cgroup) };
    for target in ["127.1.0.7:7000", "[fd00:5eed::7]:7000"] {
        for _ in 0..10 {
            let report = probe(inside, &["udp", "--target", target, "--count", "40", "--one-socket"]);
            let tags = report["tags"].as_object().unwrap();
            assert_eq!(tags.len(), 1, "one socket, one backend: {report}");
            assert_eq!(report["from_target"], json!(40), "{report}");
        }
        let report = probe(inside, &["udp", "--target", target, "--count", "1000"]);
        let canary = report["tags"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("canary"))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum::<u64>();
        assert_canary_share(&format!("{target}: {report}"), canary, 1000, 50.0);
    }
    let state = agent.service("udp");
    assert!(counter(&state, "canary", "datagrams_steered") > 0, "{state}");
}

/// 50 clients, each its own network namespace: with client affinity each client's connections
/// all land on one side, and raising the weight only moves clients from stable to canary.
#[test]
fn client_affinity_gives_monotone_cohorts() {
    require_root();
    let cgroup = Cgroup::new();
    let clients: Vec<NetNs> = (0..50).map(|_| NetNs::new()).collect();
    let mut serve_args = vec!["serve-tcp", "--listen", "127.0.0.1:8001=stable", "--listen", "127.0.0.1:8002=canary"];
    let paths: Vec<String> = clients.iter().map(|ns| ns.path().display().to_string()).collect();
    for path in &paths {
        serve_args.extend(["--netns", path.as_str()]);
    }
    let _servers = serve(Placement::default(), &serve_args);
    let agent = Agent::start(
        &cgroup,
        r#"[[service]]
name = "web"
frontends = ["127.1.0.1:80"]
stable = ["127.0.0.1:8001"]
canary = ["127.0.0.1:8002"]
canary_percent = 20
affinity = "client"
"#,
    );
    let sides = |round: &str| -> Vec<&'static str> {
        clients
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let report = tcp_connects(Placement { netns: Some(ns), cgroup: Some(&cgroup) }, FRONTEND4, 20);
                assert_eq!(report.tags_total(), 20, "{round}, client {i}: {:?}", report.raw);
                match (report.tag("stable"), report.tag("canary")) {
                    (20, 0) => "stable",
                    (0, 20) => "canary",
                    _ => panic!("{round}, client {i} was split across sides: {:?}", report.raw),
                }
            })
            .collect()
    };
    let at20 = sides("at 20 %");
    agent.set_percent("web", 40.0);
    let at40 = sides("at 40 %");
    for (i, (before, after)) in at20.iter().zip(&at40).enumerate() {
        assert!(!(*before == "canary" && *after == "stable"), "client {i} moved back from canary to stable");
    }
    let canary20 = at20.iter().filter(|s| **s == "canary").count();
    let canary40 = at40.iter().filter(|s| **s == "canary").count();
    assert!(canary40 > canary20, "raising to 40 % moved no client ({canary20} -> {canary40} of 50)");
    assert!((1..=25).contains(&canary20), "{canary20} of 50 clients canary at 20 %");
}

/// Cohort overrides, set through the API: testers always get the canary, critical callers
/// never, whatever the weight; everyone else follows it.
#[test]
fn cohort_overrides_apply_before_the_hash() {
    let lab = Lab::new(0.0);
    let testers = Cgroup::under(&lab.cgroup.path);
    let critical = Cgroup::under(&lab.cgroup.path);
    let mut service = lab.agent.service("web");
    let body = json!({
        "frontends": service["frontends"].take(),
        "stable": service["stable"].take(),
        "canary": service["canary"].take(),
        "canary_percent": 0,
        "cohort": [
            { "cgroups": [testers.path.display().to_string()], "canary": "always" },
            { "cgroups": [critical.id()], "canary": "never" },
        ],
    });
    let (status, reply) = lab.agent.call("PUT", "/v1/services/web", Some(&body));
    assert_eq!(status, 200, "{reply}");
    let place = |cgroup| Placement { netns: Some(&lab.netns), cgroup: Some(cgroup) };

    assert_eq!(tcp_connects(place(&testers), FRONTEND4, 200).tag("canary"), 200, "testers at 0 %");
    assert_eq!(tcp_connects(place(&lab.cgroup), FRONTEND4, 200).tag("stable"), 200, "others at 0 %");
    lab.agent.set_percent("web", 100.0);
    assert_eq!(tcp_connects(place(&critical), FRONTEND4, 200).tag("stable"), 200, "critical at 100 %");
    assert_eq!(tcp_connects(place(&lab.cgroup), FRONTEND4, 200).tag("canary"), 200, "others at 100 %");
    // A cgroup below a cohort's belongs to the cohort.
    let nested = Cgroup::under(&testers.path);
    lab.agent.set_percent("web", 0.0);
    assert_eq!(tcp_connects(place(&nested), FRONTEND4, 200).tag("canary"), 200, "nested tester at 0 %");
}

/// One thread rewrites the service between two backend sets (and weights) thousands of times
/// while a client connects: every connection lands on a backend of one of the two sets.
#[test]
fn updates_are_atomic_for_connecting_sockets() {
    let lab = Lab::with_service(
        r#"[[service]]
name = "flip"
frontends = ["127.1.0.9:80"]
stable = ["127.0.0.1:8101"]
canary = ["127.0.0.1:8102"]
canary_percent = 50
"#,
    );
    let _more = serve(
        lab.outside(),
        &[
            "serve-tcp",
            "--listen",
            "127.0.0.1:8101=a-stable",
            "--listen",
            "127.0.0.1:8102=a-canary",
            "--listen",
            "127.0.0.1:8201=b-stable",
            "--listen",
            "127.0.0.1:8202=b-canary",
        ],
    );
    let set_a = json!({ "frontends": ["127.1.0.9:80"], "stable": ["127.0.0.1:8101"], "canary": ["127.0.0.1:8102"], "canary_percent": 30, "affinity": "connection" });
    let set_b = json!({ "frontends": ["127.1.0.9:80"], "stable": ["127.0.0.1:8201"], "canary": ["127.0.0.1:8202"], "canary_percent": 70, "affinity": "client" });

    let mut client =
        spawn_probe(lab.inside(), &["tcp", "--target", "127.1.0.9:80", "--count", "4000", "--max-seconds", "60"]);
    let mut flips = 0u32;
    let started = Instant::now();
    while flips < 3000 || client.child.try_wait().unwrap().is_none() {
        let body = if flips.is_multiple_of(2) { &set_b } else { &set_a };
        let (status, reply) = lab.agent.call("PUT", "/v1/services/flip", Some(body));
        assert_eq!(status, 200, "{reply}");
        flips += 1;
        assert!(started.elapsed() < Duration::from_secs(120), "flipping took too long");
    }
    let mut line = String::new();
    client.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
    let report: Value = serde_json::from_str(&line).unwrap();
    let tags = report["tags"].as_object().unwrap();
    let total: u64 = tags.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(report["errors"], json!({}), "connections failed during {flips} updates: {report}");
    assert_eq!(total, 4000, "{report}");
    let allowed: BTreeSet<&str> = ["stable", "canary", "a-stable", "a-canary", "b-stable", "b-canary"].into();
    for tag in tags.keys() {
        assert!(allowed.contains(tag.as_str()), "a connection reached {tag:?}, in neither set");
    }
    let observed_sets: BTreeSet<char> = tags.keys().filter_map(|t| t.chars().next()).collect();
    assert!(observed_sets.contains(&'a') || observed_sets.contains(&'s'), "{report}");
    assert!(observed_sets.contains(&'b'), "connections never saw set B: {report}");
}

/// 200,000 steered UDP sockets opened and closed, 1,000 at a time: the UDP flow table holds only
/// the open ones' reply translations.
#[test]
fn socket_state_is_freed_on_close() {
    let lab = Lab::with_service(
        r#"[[service]]
name = "churn"
frontends = ["127.1.0.8:53"]
stable = ["127.0.0.1:5999"]
"#,
    );
    let open_sockets = || -> u64 {
        let (status, body) = lab.agent.call("GET", "/v1/datapath", None);
        assert_eq!(status, 200);
        body["udp_flows"].as_u64().unwrap()
    };
    let mut churn = spawn_probe(
        lab.inside(),
        &["churn", "--target", "127.1.0.8:53", "--count", "200000", "--batch", "1000", "--pause-every", "50000"],
    );
    let mut pauses = 0;
    loop {
        let mut line = String::new();
        churn.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        if let Some(rest) = line.strip_prefix("paused ") {
            let open: u64 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
            let in_table = open_sockets();
            assert!(in_table >= open && in_table <= open + 10, "{in_table} entries with {open} steered sockets open");
            pauses += 1;
            churn.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
        } else {
            let report: Value = serde_json::from_str(&line).expect("churn report");
            assert_eq!(report["sockets"], json!(200000), "{report}");
            break;
        }
    }
    assert_eq!(pauses, 3);
    let _ = churn.child.wait();
    assert_eq!(open_sockets(), 0, "entries left after every socket closed");
    let state = lab.agent.service("churn");
    assert!(counter(&state, "stable", "datagrams_steered") >= 200000, "{state}");
}

/// Health signals: a canary that refuses connections shows exactly the failures the client saw;
/// one that resets established connections shows the resets; a healthy side shows neither, and
/// both sides report SRTT.
#[test]
fn kernel_health_signals_match_what_clients_saw() {
    let lab = Lab::with_service(
        r#"[[service]]
name = "refusing"
frontends = ["127.1.0.2:80"]
stable = ["127.0.0.1:8001"]
canary = ["127.0.0.1:8009"]
canary_percent = 30

[[service]]
name = "resetting"
frontends = ["127.1.0.3:80"]
stable = ["127.0.0.1:8001"]
canary = ["127.0.0.1:8010"]
canary_percent = 30

[[service]]
name = "healthy"
frontends = ["127.1.0.4:80"]
stable = ["127.0.0.1:8001"]
canary = ["127.0.0.1:8002"]
canary_percent = 30
"#,
    );
    let _resetter = serve(lab.outside(), &["serve-tcp", "--listen", "127.0.0.1:8010=canary!reset"]);

    // Nothing listens on 8009: every canary connection of "refusing" is refused.
    let report = tcp_connects(lab.inside(), "127.1.0.2:80", 500);
    let refused = report.error("ConnectionRefused");
    assert!(refused > 50, "{:?}", report.raw);
    assert_eq!(refused + report.tag("stable"), 500, "{:?}", report.raw);
    let state = lab.agent.service("refusing");
    assert_eq!(counter(&state, "canary", "failed_attempts"), refused, "{state}");
    assert_eq!(counter(&state, "stable", "failed_attempts"), 0, "{state}");
    assert_eq!(counter(&state, "canary", "established"), 0, "{state}");

    let report =
        e2e::TcpReport { raw: probe(lab.inside(), &["tcp", "--target", "127.1.0.3:80", "--count", "500", "--drain"]) };
    // A reset that lands between connect() and the client's getpeername() shows as NotConnected.
    let resets_seen = report.reset_after_tag() + report.error("ConnectionReset") + report.error("NotConnected");
    assert!(resets_seen > 50, "{:?}", report.raw);
    let state = lab.agent.service("resetting");
    assert_eq!(counter(&state, "canary", "resets"), resets_seen, "{state}\n{:?}", report.raw);
    assert_eq!(counter(&state, "stable", "resets"), 0, "{state}");
    assert_eq!(counter(&state, "canary", "failed_attempts"), 0, "{state}");

    let report = tcp_connects(lab.inside(), "127.1.0.4:80", 500);
    assert_eq!(report.tags_total(), 500, "{:?}", report.raw);
    let state = lab.agent.service("healthy");
    for side in ["stable", "canary"] {
        assert_eq!(counter(&state, side, "failed_attempts"), 0, "{state}");
        assert_eq!(counter(&state, side, "resets"), 0, "{state}");
        assert!(counter(&state, side, "srtt_samples") > 0, "no SRTT for {side}: {state}");
        assert!(state["sides"][side]["health"]["srtt_avg_us"].as_u64().is_some(), "{state}");
        assert_eq!(counter(&state, side, "established"), counter(&state, side, "connections_steered"), "{state}");
    }
}

/// A side of 1,024 backends: connections spread over (nearly) all of them, and only them.
#[test]
fn a_side_can_have_1024_backends() {
    let backends: Vec<String> = (0..1024).map(|i| format!("127.0.0.1:{}", 20000 + i)).collect();
    let lab = Lab::with_service(&format!(
        "[[service]]\nname = \"wide\"\nfrontends = [\"127.1.0.20:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = {backends:?}\ncanary_percent = 100\n"
    ));
    let listen: Vec<String> = (0..1024).map(|i| format!("127.0.0.1:{}=b{i}", 20000 + i)).collect();
    let mut args = vec!["serve-tcp"];
    for spec in &listen {
        args.extend(["--listen", spec.as_str()]);
    }
    let _wide = serve(lab.outside(), &args);
    let report = tcp_connects(lab.inside(), "127.1.0.20:80", 3000);
    assert_eq!(report.tags_total(), 3000, "{:?}", report.raw["errors"]);
    let seen = report.raw["tags"].as_object().unwrap().len();
    // 3,000 uniform draws from 1,024 backends reach about 970 distinct ones.
    assert!(seen > 900, "only {seen} of 1024 backends were used");
}

/// 65,536 services, each with its own frontend: all installed, the first and last steered.
#[test]
fn the_datapath_holds_65536_services() {
    let mut services = String::new();
    for i in 0..65536u32 {
        services.push_str(&format!(
            "[[service]]\nname = \"svc-{i}\"\nfrontends = [\"127.2.{}.{}:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = [\"127.0.0.1:8002\"]\ncanary_percent = 50\n",
            i / 256,
            i % 256
        ));
    }
    let lab = Lab::with_service(&services);
    let (status, body) = lab.agent.call("GET", "/v1/datapath", None);
    assert_eq!(status, 200);
    assert_eq!(body["services"], json!(65536), "{body}");
    for frontend in ["127.2.0.0:80", "127.2.128.77:80", "127.2.255.255:80"] {
        let report = tcp_connects(lab.inside(), frontend, 200);
        assert_eq!(report.tag("stable") + report.tag("canary"), 200, "{frontend}: {:?}", report.raw);
    }
    let state = lab.agent.service("svc-65535");
    assert_eq!(
        counter(&state, "stable", "connections_steered") + counter(&state, "canary", "connections_steered"),
        200
    );
}
