//! Issue 5 acceptance: progressive rollouts gated by kernel health, with steps of one or two
//! seconds: promotion of a healthy canary, rollback of a failing one (with webhooks and
//! connection termination), approvals, restart mid-rollout, bad plans.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{assert_share, web_service, Lab, FRONTEND4, TOKENS};
use e2e::{spawn_probe, tcp_connects};
use serde_json::{json, Value};

fn rollout(lab: &Lab) -> Value {
    let (status, body) = lab.agent.call("GET", "/v1/services/web/rollout", None);
    assert_eq!(status, 200, "{body}");
    body
}

fn wait_rollout(lab: &Lab, what: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let r = rollout(lab);
        if check(&r) {
            return r;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}; rollout: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Records the JSON bodies POSTed to it.
struct WebhookReceiver {
    url: String,
    events: Arc<Mutex<Vec<Value>>>,
}

impl WebhookReceiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                if let Ok(value) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push(value);
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            }
        });
        Self { url, events }
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|e| e["event"].as_str().unwrap_or("").to_string()).collect()
    }
}

#[test]
fn healthy_canary_is_promoted_and_the_split_follows_each_step() {
    let lab = Lab::new(0.0);
    let plan = json!({
        "steps": [10, 50, 100],
        "step_seconds": 2,
        "gates": { "max_failed_attempt_ratio": 0.05, "max_reset_ratio": 0.05, "max_srtt_ratio": 10, "min_connections": 20 },
    });
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{body}");
    for (step, percent) in [(0, 10.0), (1, 50.0), (2, 100.0)] {
        let r = wait_rollout(&lab, &format!("step {step}"), Duration::from_secs(10), |r| {
            r["step"] == json!(step) && r["state"] == json!("running")
        });
        assert_eq!(r["percent"], json!(percent), "{r}");
        // Well inside the 2 s step: this batch sees only this step's weight.
        let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
        assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
        assert_share(&format!("step {step}"), report.share("canary"), percent, 5.0);
    }
    let r = wait_rollout(&lab, "promoted", Duration::from_secs(10), |r| r["state"] == json!("promoted"));
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(100.0), "{r}");
    let events: Vec<&str> = r["history"].as_array().unwrap().iter().map(|h| h["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["started", "step", "check_passed", "step", "check_passed", "step", "check_passed", "promoted"]);
}

/// The canary starts refusing at the second step: rolled back within one step, weight 0,
/// webhooks told, and with terminate_connections the client's open canary connections are
/// reset while its stable ones stay open.
#[test]
fn failing_canary_is_rolled_back_and_its_connections_cut() {
    let mut lab = Lab::new(0.0);
    let webhooks = WebhookReceiver::start();
    // Canary connections that stay open across the rollback come from a second canary server
    // that keeps them after the canary stops accepting.
    let plan = json!({
        "steps": [10, 50, 100],
        "step_seconds": 2,
        "gates": { "max_failed_attempt_ratio": 0.1, "min_connections": 20 },
        "webhooks": [webhooks.url],
        "rollback": { "terminate_connections": true },
    });
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{body}");
    let _ = tcp_connects(lab.inside(), FRONTEND4, 500); // traffic for step 1's window
    wait_rollout(&lab, "second step", Duration::from_secs(8), |r| r["step"] == json!(1));

    // Long-lived connections at 50 %: some canary, some stable.
    let mut held = spawn_probe(lab.inside(), &["hold", "--target", FRONTEND4, "--count", "40"]);
    let held_line = held.wait_for_line("held");
    assert!(held_line.contains("canary") && held_line.contains("stable"), "{held_line}");
    // The canary fails from now on: it stops accepting (its open connections stay up).
    writeln!(lab.servers.child.stdin.as_mut().unwrap(), "close canary").unwrap();
    lab.servers.wait_for_line("closed canary");
    let failed_at = Instant::now();
    let report = tcp_connects(lab.inside(), FRONTEND4, 300);
    assert!(report.error("ConnectionRefused") > 50, "{:?}", report.raw);

    let r = wait_rollout(&lab, "rolled back", Duration::from_secs(4), |r| r["state"] == json!("rolled_back"));
    assert!(failed_at.elapsed() <= Duration::from_secs(3), "rollback took {:?}", failed_at.elapsed());
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(0.0));
    assert!(r["last_gates"]["failures"][0].as_str().unwrap().starts_with("max_failed_attempt_ratio"), "{r}");
    let report = tcp_connects(lab.inside(), FRONTEND4, 300);
    assert_eq!(report.tag("stable"), 300, "after rollback everything is stable: {:?}", report.raw);

    let r =
        wait_rollout(&lab, "connections terminated", Duration::from_secs(5), |r| r["terminated_connections"].is_u64());
    writeln!(held.child.stdin.as_mut().unwrap()).unwrap();
    let mut line = String::new();
    held.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
    let outcome: Value = serde_json::from_str(&line).unwrap();
    let canary_held = held_line
        .split_once(' ')
        .map(|(_, j)| serde_json::from_str::<Value>(j).unwrap()["canary"].as_u64().unwrap())
        .unwrap();
    assert_eq!(
        outcome["canary"]["reset"].as_u64(),
        Some(canary_held),
        "every open canary connection is reset: {outcome}"
    );
    assert_eq!(outcome["stable"].get("reset"), None, "stable connections stay open: {outcome}");
    assert!(outcome["stable"]["open"].as_u64().unwrap() > 0, "{outcome}");
    assert_eq!(r["terminated_connections"].as_u64(), Some(canary_held), "{r}");

    let deadline = Instant::now() + Duration::from_secs(3);
    while !webhooks.events().contains(&"rolled_back".to_string()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = webhooks.events();
    assert!(events.starts_with(&["step".into(), "step".into()]), "{events:?}");
    assert!(events.contains(&"rolled_back".to_string()), "webhooks got {events:?}");
    lab.agent.token = None;
}

#[test]
fn gated_step_waits_for_an_approver_with_the_named_role() {
    let mut lab = Lab::with_agent(TOKENS, &web_service(""));
    let operator = Some("operator-token-01");
    let release = Some("release-token-001");
    let plan =
        json!({ "steps": [10, 50, 100], "step_seconds": 1, "approval": { "at_percent": 50, "role": "release" } });
    let (status, body) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "an operator may start a rollout: {body}");
    let _ = tcp_connects(lab.inside(), FRONTEND4, 200);
    lab.agent.token = Some("operator-token-01".into());
    let r =
        wait_rollout(&lab, "awaiting approval", Duration::from_secs(5), |r| r["state"] == json!("awaiting_approval"));
    assert_eq!(r["percent"], json!(10.0), "the weight waits below the gated step: {r}");
    assert_eq!(r["awaiting_role"], json!("release"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rollout(&lab)["state"], json!("awaiting_approval"), "it keeps waiting");

    let (status, body) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout/approve", None);
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert_eq!(rollout(&lab)["state"], json!("awaiting_approval"));
    let (status, body) = lab.agent.call_as(release, "POST", "/v1/services/web/rollout/approve", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], json!("running"));
    assert_eq!(body["percent"], json!(50.0));
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(50.0));

    // Pause and resume, and a manual weight change refused while the rollout drives it.
    let (status, body) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout/pause", None);
    assert_eq!((status, body["state"].as_str()), (200, Some("paused")), "{body}");
    let (status, body) = lab.agent.call_as(release, "PUT", "/v1/services/web/canary", Some(&json!({"percent": 5})));
    assert_eq!((status, body["code"].as_str()), (409, Some("rollout_active")), "{body}");
    let (status, _) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout/resume", None);
    assert_eq!(status, 200);
    let (status, body) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout/abort", None);
    assert_eq!((status, body["state"].as_str()), (200, Some("aborted")), "{body}");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(0.0));

    let (_, log) = lab.agent.call_as(release, "GET", "/v1/audit", None);
    let routes: Vec<&str> = log["entries"].as_array().unwrap().iter().map(|e| e["route"].as_str().unwrap()).collect();
    assert_eq!(
        routes,
        [
            "/v1/services/web/rollout",
            "/v1/services/web/rollout/approve",
            "/v1/services/web/rollout/pause",
            "/v1/services/web/rollout/resume",
            "/v1/services/web/rollout/abort",
        ]
    );
    lab.agent.token = None;
}

#[test]
fn a_restarted_agent_resumes_the_rollout_at_the_same_step() {
    let mut lab = Lab::new(0.0);
    let plan = json!({ "steps": [10, 50, 100], "step_seconds": 3, "gates": { "min_connections": 5 } });
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{body}");
    let _ = tcp_connects(lab.inside(), FRONTEND4, 300);
    let r = wait_rollout(&lab, "second step", Duration::from_secs(6), |r| {
        r["step"] == json!(1) && r["window_elapsed_ms"].as_u64().unwrap() >= 1000
    });
    let elapsed_before = r["window_elapsed_ms"].as_u64().unwrap();
    lab.agent.stop_with(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    lab.agent.spawn();
    let r = rollout(&lab);
    assert_eq!(r["step"], json!(1), "{r}");
    assert_eq!(r["state"], json!("running"), "{r}");
    assert!(r["window_elapsed_ms"].as_u64().unwrap() >= elapsed_before + 300, "the step clock restarted: {r}");
    let _ = tcp_connects(lab.inside(), FRONTEND4, 300);
    wait_rollout(&lab, "third step", Duration::from_secs(5), |r| r["step"] == json!(2));
    let _ = tcp_connects(lab.inside(), FRONTEND4, 300);
    wait_rollout(&lab, "promoted", Duration::from_secs(6), |r| r["state"] == json!("promoted"));
}

#[test]
fn bad_plans_are_refused_and_nothing_starts() {
    let lab = Lab::new(0.0);
    let cases = [
        (json!({ "steps": [], "step_seconds": 1 }), "steps"),
        (json!({ "steps": [10, 5], "step_seconds": 1 }), "steps[1]"),
        (json!({ "steps": [50, 150], "step_seconds": 1 }), "steps[1]"),
        (json!({ "steps": [10, 50], "step_seconds": -2 }), "step_seconds"),
        (json!({ "steps": [10, 50], "step_seconds": 1, "gates": { "max_error_budget": 0.1 } }), "gates"),
        (json!({ "steps": [10, 50], "step_seconds": "1" }), "step_seconds"),
        (json!({ "steps": [10, 50] }), ""),
        (
            json!({ "steps": [10, 50], "step_seconds": 1, "approval": { "at_percent": 50, "role": "boss" } }),
            "approval.role",
        ),
    ];
    for (plan, field) in cases {
        let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
        assert_eq!(status, 400, "{plan}: {body}");
        assert!(body["field"].as_str().unwrap_or("").starts_with(field), "{plan}: {body}");
    }
    let (status, body) = lab.agent.call("GET", "/v1/services/web/rollout", None);
    assert_eq!((status, body["code"].as_str()), (404, Some("rollout_not_found")), "{body}");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(0.0));
    let (status, _) =
        lab.agent.call("POST", "/v1/services/nope/rollout", Some(&json!({ "steps": [10], "step_seconds": 1 })));
    assert_eq!(status, 404);
}
