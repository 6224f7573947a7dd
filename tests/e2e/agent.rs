//! Issue 4 acceptance: restarts without disruption, persisted state, config reload, roles and
//! audit, metrics, bad input on every route, uninstall.

mod common;

use std::{
    io::BufRead,
    time::{Duration, Instant},
};

use common::{assert_share, counter, web_service, Lab, FRONTEND4, TOKENS};
use e2e::{assert_canary_share, spawn_probe, tcp_connects};
use serde_json::{json, Value};

/// SIGKILL and restart the agent while a client connects as fast as it can: no connection
/// fails and every 1,000 connections keep the 20 % split.
#[test]
fn restart_under_load_is_invisible() {
    let mut lab = Lab::new(20.0);
    // Enough connections to outlast the restart on a fast idle machine (a few seconds) and on a
    // loaded CI machine (an 8,000-connection client once finished before the agent was back).
    const CONNECTIONS: u64 = 100_000;
    let count = CONNECTIONS.to_string();
    let mut client = spawn_probe(
        lab.inside(),
        &["tcp", "--target", FRONTEND4, "--count", &count, "--segment", "1000", "--max-seconds", "120"],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(client.child.try_wait().unwrap().is_none(), "the client finished before the restart");
    lab.agent.stop_with(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300)); // steering with no agent at all
    lab.agent.spawn();
    assert!(client.child.try_wait().unwrap().is_none(), "the client finished before the agent was back");
    let mut line = String::new();
    client.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["errors"], json!({}), "connections failed across the restart: {report}");
    let total: u64 = report["tags"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, CONNECTIONS, "{report}");
    for (i, segment) in report["segments"].as_array().unwrap().iter().enumerate() {
        let canary = segment["canary"].as_u64().unwrap_or(0);
        let all: u64 = segment.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
        assert_canary_share(&format!("connections {}..{}", i * 1000, i * 1000 + 1000), canary, all, 20.0);
    }
    assert!(
        lab.agent.log().contains("adopted"),
        "the restarted agent should adopt the pinned links:\n{}",
        lab.agent.log()
    );
}

/// A weight set through the API survives a restart, and the datapath keeps it while the agent
/// is down (SIGTERM leaves the datapath steering).
#[test]
fn state_survives_restart() {
    let mut lab = Lab::new(0.0);
    lab.agent.set_percent("web", 37.5);
    lab.agent.stop_with(libc::SIGTERM);
    let report = tcp_connects(lab.inside(), FRONTEND4, 2000);
    assert_eq!(report.tags_total(), 2000, "steering stopped with the agent: {:?}", report.raw);
    assert_share("agent stopped", &report, 37.5);

    lab.agent.spawn();
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(37.5));
    let report = tcp_connects(lab.inside(), FRONTEND4, 2000);
    assert_share("after restart", &report, 37.5);
    // Counters keep counting across the restart: same service id, same per-CPU entries.
    let state = lab.agent.service("web");
    assert_eq!(
        counter(&state, "stable", "connections_steered") + counter(&state, "canary", "connections_steered"),
        4000
    );
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn config_file_changes_apply_and_bad_ones_are_refused() {
    let lab = Lab::new(20.0);
    let original = std::fs::read_to_string(&lab.agent.config_path).unwrap();
    std::fs::write(&lab.agent.config_path, original.replace("canary_percent = 20", "canary_percent = 60")).unwrap();
    let took = wait_for("valid change applied", Duration::from_secs(2), || {
        lab.agent.service("web")["canary_percent"] == json!(60.0)
    });
    eprintln!("config change applied after {took:?}");
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_share("after reload", &report, 60.0);

    std::fs::write(&lab.agent.config_path, original.replace("canary_percent = 20", "canary_percent = 200")).unwrap();
    wait_for("refusal logged", Duration::from_secs(3), || lab.agent.log().contains("config reload refused"));
    assert!(lab.agent.log().contains("canary_percent"), "the refusal names the field:\n{}", lab.agent.log());
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(60.0));
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_share("after a refused reload", &report, 60.0);

    // SIGHUP re-reads too.
    std::fs::write(&lab.agent.config_path, original.replace("canary_percent = 20", "canary_percent = 5")).unwrap();
    unsafe { libc::kill(lab.agent.pid() as i32, libc::SIGHUP) };
    wait_for("SIGHUP reload", Duration::from_secs(2), || lab.agent.service("web")["canary_percent"] == json!(5.0));
}

/// Each role against each mutating route: refused calls get 401/403 and change nothing; the
/// audit log holds exactly the accepted changes.
#[test]
fn roles_gate_changes_and_the_audit_log_records_them() {
    let mut lab = Lab::with_agent(TOKENS, &web_service("canary_percent = 10\nmax_operator_percent = 50"));
    let none = None;
    let bad = Some("not-a-valid-token");
    let viewer = Some("viewer-token-0001");
    let operator = Some("operator-token-01");
    let release = Some("release-token-001");
    let svc = json!({ "frontends": ["127.1.0.77:80"], "stable": ["127.0.0.1:8001"] });
    /// Token, method, path, body, expected status.
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, Option<Value>, u16);
    let cases: Vec<Case> = vec![
        (none, "PUT", "/v1/services/web/canary", Some(json!({"percent": 20})), 401),
        (bad, "PUT", "/v1/services/web/canary", Some(json!({"percent": 20})), 401),
        (viewer, "PUT", "/v1/services/web/canary", Some(json!({"percent": 20})), 403),
        (operator, "PUT", "/v1/services/web/canary", Some(json!({"percent": 20})), 200),
        (operator, "PUT", "/v1/services/web/canary", Some(json!({"percent": 80})), 403),
        (release, "PUT", "/v1/services/web/canary", Some(json!({"percent": 80})), 200),
        (viewer, "POST", "/v1/services/web/rollback", None, 403),
        (operator, "POST", "/v1/services/web/rollback", None, 200),
        (operator, "POST", "/v1/services/web/promote", None, 403),
        (viewer, "POST", "/v1/services/web/promote", None, 403),
        (release, "POST", "/v1/services/web/promote", None, 200),
        (release, "POST", "/v1/services/web/rollback", None, 200),
        (viewer, "PUT", "/v1/services/extra", Some(svc.clone()), 403),
        (operator, "PUT", "/v1/services/extra", Some(svc.clone()), 403),
        (release, "PUT", "/v1/services/extra", Some(svc.clone()), 201),
        (operator, "DELETE", "/v1/services/extra", None, 403),
        (none, "DELETE", "/v1/services/extra", None, 401),
        (release, "DELETE", "/v1/services/extra", None, 200),
    ];
    let mut accepted = Vec::new();
    for (token, method, path, body, expected) in &cases {
        let before = lab.agent.call_as(release, "GET", "/v1/services", None).1;
        let (status, reply) = lab.agent.call_as(*token, method, path, body.as_ref());
        assert_eq!(status, *expected, "{token:?} {method} {path}: {reply}");
        if status >= 400 {
            let after = lab.agent.call_as(release, "GET", "/v1/services", None).1;
            assert_eq!(strip_counters(&before), strip_counters(&after), "{method} {path} refused but changed state");
            assert!(reply["code"] == json!("unauthorized") || reply["code"] == json!("forbidden"), "{reply}");
        } else {
            accepted.push((*token, *path));
        }
    }
    // Reads: viewer may, nobody without a token.
    assert_eq!(lab.agent.call_as(viewer, "GET", "/v1/services/web", None).0, 200);
    assert_eq!(lab.agent.call_as(none, "GET", "/v1/services/web", None).0, 401);
    assert_eq!(lab.agent.call_as(none, "GET", "/metrics", None).0, 401);
    assert_eq!(lab.agent.call_as(none, "GET", "/healthz", None).0, 200, "probes need no token");

    let (status, log) = lab.agent.call_as(viewer, "GET", "/v1/audit", None);
    assert_eq!(status, 200, "{log}");
    // Refused requests are audited too (`refused` set); the accepted changes are the rest.
    let entries: Vec<&Value> =
        log["entries"].as_array().unwrap().iter().filter(|e| e.get("refused").is_none()).collect();
    assert_eq!(entries.len(), accepted.len(), "audit log: {log}");
    let names = |t: Option<&str>| match t {
        Some("operator-token-01") => "otto",
        Some("release-token-001") => "rita",
        other => panic!("unexpected accepted token {other:?}"),
    };
    for (entry, (token, path)) in entries.iter().zip(&accepted) {
        assert_eq!(entry["token"], json!(names(*token)), "{entry}");
        assert_eq!(entry["route"], json!(path), "{entry}");
        assert!(entry["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{entry}");
        assert!(entry.get("before").is_some() && entry.get("after").is_some(), "{entry}");
    }
    assert_eq!(entries[0]["before"]["canary_percent"], json!(10.0));
    assert_eq!(entries[0]["after"]["canary_percent"], json!(20.0));
    lab.agent.token = None;
}

fn strip_counters(services: &Value) -> Value {
    let mut services = services.clone();
    if let Some(list) = services["services"].as_array_mut() {
        for s in list {
            s.as_object_mut().unwrap().remove("sides");
        }
    }
    services
}

/// /metrics parses with Prometheus' own Python parser, and its counters are what clients saw.
#[test]
fn metrics_parse_and_match_what_clients_saw() {
    let lab = Lab::new(30.0);
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_eq!(report.tags_total(), 1000);
    let (status, _) = lab.agent.call("GET", "/healthz", None);
    assert_eq!(status, 200);
    let text = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(lab.agent.api).unwrap();
        // The Host a scraper sends: the target's address (any other is refused, see hardening.rs).
        let head = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", lab.agent.api);
        stream.write_all(head.as_bytes()).unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        raw.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    let parser = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        key = s.name + "|" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[key] = s.value
print(json.dumps(out))
"#;
    let mut python = std::process::Command::new("python3")
        .args(["-c", parser])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(python.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Value = serde_json::from_slice(&output.stdout).unwrap();
    let sample = |name: &str, side: &str| {
        samples[format!("{name}|service=web,side={side}")]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name} for {side} in {samples}"))
    };
    assert_eq!(sample("sockshift_connections_steered_total", "canary") as u64, report.tag("canary"));
    assert_eq!(sample("sockshift_connections_steered_total", "stable") as u64, report.tag("stable"));
    assert_eq!(sample("sockshift_tcp_established_total", "canary") as u64, report.tag("canary"));
    assert_eq!(sample("sockshift_tcp_failed_attempts_total", "stable"), 0.0);
    assert_eq!(samples["sockshift_canary_weight_percent|service=web"], json!(30.0), "{samples}");
    assert!(samples.as_object().unwrap().keys().any(|k| k.starts_with("sockshift_build_info|version=")), "{samples}");
}

/// Every mutating route, given malformed JSON, wrong types, out-of-range values and an
/// oversized body, answers 4xx and changes nothing.
#[test]
fn bad_input_on_every_route_changes_nothing() {
    let lab = Lab::new(20.0);
    let before = strip_counters(&lab.agent.call("GET", "/v1/services", None).1);
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000));
    let routes: [(&str, &str, Vec<&[u8]>); 4] = [
        (
            "PUT",
            "/v1/services/web/canary",
            vec![
                b"{",
                b"[]",
                br#"{"percent": "5"}"#,
                br#"{"percent": true}"#,
                br#"{"percent": 101}"#,
                br#"{"percent": -0.5}"#,
            ],
        ),
        (
            "PUT",
            "/v1/services/web",
            vec![
                b"{\"frontends\": [",
                b"42",
                br#"{"frontends": "127.1.0.1:80"}"#,
                br#"{"frontends": ["127.1.0.1:80"], "canary_percent": 150}"#,
                br#"{"frontends": ["nonsense"]}"#,
                br#"{"frontends": ["127.1.0.1:80"], "affinity": "sticky"}"#,
                br#"{"frontends": ["127.1.0.1:80"], "bogus": 1}"#,
                br#"{"name": "other", "frontends": ["127.1.0.1:80"]}"#,
                br#"{"frontends": ["127.1.0.1:80"], "stable": ["127.0.0.1:0"]}"#,
            ],
        ),
        ("POST", "/v1/services/web/rollback", vec![b"{", br#"{"percent": 0}"#, b"[1]"]),
        ("POST", "/v1/services/web/promote", vec![b"{", br#"{"now": true}"#, b"\"yes\""]),
    ];
    for (method, path, bodies) in &routes {
        for body in bodies.iter().copied().chain([big.as_bytes()]) {
            let (status, reply) = lab.agent.call_raw(method, path, body);
            let shown = String::from_utf8_lossy(&body[..body.len().min(80)]);
            assert!((400..500).contains(&status), "{method} {path} {shown}: {status} {reply}");
            assert!(reply["code"].as_str().is_some(), "{method} {path} {shown}: {reply}");
        }
    }
    let after = strip_counters(&lab.agent.call("GET", "/v1/services", None).1);
    assert_eq!(before, after, "state changed after refused input");
    let report = tcp_connects(lab.inside(), FRONTEND4, 2000);
    assert_share("after refused input", &report, 20.0);
}

/// `sockshift uninstall` detaches everything and removes the pins.
#[test]
fn uninstall_removes_programs_links_and_pins() {
    let mut lab = Lab::new(50.0);
    lab.agent.stop_with(libc::SIGTERM);
    assert_eq!(tcp_connects(lab.inside(), FRONTEND4, 100).tags_total(), 100, "steering continues after SIGTERM");
    let status = std::process::Command::new(e2e::built_binary("sockshift"))
        .args(["uninstall", "--bpffs"])
        .arg(&lab.agent.bpffs)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!lab.agent.bpffs.exists(), "pins left behind");
    let report = tcp_connects(lab.inside(), FRONTEND4, 100);
    assert_eq!(report.tags_total(), 0, "still steered after uninstall: {:?}", report.raw);
    assert_eq!(report.error("ConnectionRefused"), 100);
}

/// The CLI verbs drive the API: tables by default, JSON with `--output json`, errors with the
/// API's message and a non-zero exit.
#[test]
fn cli_verbs_drive_the_api() {
    let lab = Lab::new(10.0);
    let api = lab.agent.api.to_string();
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(e2e::built_binary("sockshift"))
            .args(args)
            .args(["--api", &api])
            .output()
            .expect("run sockshift");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, _) = cli(&["set", "web", "12.5", "--output", "json"]);
    assert!(ok, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["canary_percent"], json!(12.5));
    let (ok, out, _) = cli(&["status"]);
    assert!(ok && out.contains("SERVICE") && out.contains("web") && out.contains("12.5"), "{out}");
    let (ok, out, _) = cli(&["promote", "web", "-o", "json"]);
    assert!(ok && serde_json::from_str::<Value>(&out).unwrap()["canary_percent"] == json!(100.0), "{out}");
    let (ok, out, _) = cli(&["rollback", "web", "-o", "json"]);
    assert!(ok && serde_json::from_str::<Value>(&out).unwrap()["canary_percent"] == json!(0.0), "{out}");
    let (ok, out, _) = cli(&[
        "service",
        "add",
        "api",
        "--frontend",
        "127.1.0.88:80",
        "--stable",
        "127.0.0.1:8001",
        "--canary",
        "127.0.0.1:8002",
        "--percent",
        "100",
        "-o",
        "json",
    ]);
    assert!(ok, "{out}");
    assert_eq!(tcp_connects(lab.inside(), "127.1.0.88:80", 50).tag("canary"), 50, "the added service steers");
    let (ok, out, _) = cli(&["service", "rm", "api"]);
    assert!(ok && out.contains("removed"), "{out}");
    let (ok, _, err) = cli(&["set", "web", "150"]);
    assert!(!ok && err.contains("PERCENT"), "{err}");
    let (ok, _, err) = cli(&["set", "nope", "5"]);
    assert!(!ok && err.contains("service_not_found"), "{err}");
    let (ok, out, _) = cli(&["audit"]);
    assert!(ok && out.contains("/v1/services/web/promote") && out.contains("anonymous"), "{out}");
}
