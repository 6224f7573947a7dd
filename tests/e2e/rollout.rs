//! Progressive rollouts gated by kernel health (issues 5 and 11): promotion of a healthy canary,
//! early rollback of a failing one with default gates and what it cost the clients, every
//! failure mode (refused, timed out in SYN_SENT, abandoned by the client), no false rollback on
//! noise, delegation, approvals, restart mid-rollout, bad plans.
//!
//! Client traffic comes from `sockshift-probe load`: new TCP connections at a given rate with
//! random (Poisson) arrivals, each on its own thread, as independent users would make them.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{assert_share, web_service, Lab, FRONTEND4, TOKENS};
use e2e::{probe, run, serve, spawn_probe, tcp_connects, Placement, Spawned};
use serde_json::{json, Value};

fn rollout_of(lab: &Lab, service: &str) -> Value {
    let (status, body) = lab.agent.call("GET", &format!("/v1/services/{service}/rollout"), None);
    assert_eq!(status, 200, "{body}");
    body
}

fn rollout(lab: &Lab) -> Value {
    rollout_of(lab, "web")
}

fn wait_rollout_of(lab: &Lab, service: &str, what: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let r = rollout_of(lab, service);
        if check(&r) {
            return r;
        }
        assert!(started.elapsed() < limit, "{service}: {what}: not within {limit:?}; rollout: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_rollout(lab: &Lab, what: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
    wait_rollout_of(lab, "web", what, limit, check)
}

fn start(lab: &Lab, service: &str, plan: &Value) -> Value {
    let (status, body) = lab.agent.call("POST", &format!("/v1/services/{service}/rollout"), Some(plan));
    assert_eq!(status, 201, "{plan}: {body}");
    body
}

/// When the rollout entered its first step, from its history.
fn first_step_at(r: &Value) -> u64 {
    r["history"].as_array().unwrap().iter().find(|h| h["event"] == "step").unwrap()["at_unix_ms"].as_u64().unwrap()
}

/// `sockshift-probe load` running in the background.
struct Load {
    process: Spawned,
    started_unix_ms: u64,
}

impl Load {
    fn start(placement: Placement<'_>, target: &str, rate: u32, seconds: f64, connect_timeout_ms: u32) -> Self {
        let mut process = spawn_probe(
            placement,
            &[
                "load",
                "--target",
                target,
                "--rate",
                &rate.to_string(),
                "--seconds",
                &seconds.to_string(),
                "--connect-timeout-ms",
                &connect_timeout_ms.to_string(),
            ],
        );
        let line = process.wait_for_line("started");
        let started_unix_ms = line.split_whitespace().nth(1).and_then(|ms| ms.parse().ok()).expect("started UNIX_MS");
        Self { process, started_unix_ms }
    }

    /// Waits for the load to finish and returns its report.
    fn report(mut self) -> Value {
        let mut line = String::new();
        self.process.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("load report {line:?}: {e}"))
    }
}

fn errors_total(report: &Value) -> u64 {
    report["errors"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

/// Client failures from `from_unix_ms` on, from the report's 100 ms buckets.
fn failures_since(report: &Value, load: u64, from_unix_ms: u64) -> u64 {
    let first = (from_unix_ms.saturating_sub(load) / 100) as usize;
    report["failures_by_100ms"].as_array().unwrap().iter().skip(first).filter_map(Value::as_u64).sum()
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

    /// Its `host:port`, for `agent.webhook_allow`.
    fn allow(&self) -> String {
        self.url.trim_start_matches("http://").trim_end_matches("/hook").to_string()
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|e| e["event"].as_str().unwrap_or("").to_string()).collect()
    }
}

/// The canary nothing listens on: every connection steered to it is refused.
const REFUSING_CANARY: &str = "127.0.0.1:8009";
const BROKEN_FRONTEND: &str = "127.1.0.2:80";

/// "web" (healthy canary) and "broken" (a canary that refuses every connection).
fn healthy_and_broken() -> Lab {
    Lab::with_service(&format!(
        "{}[[service]]\nname = \"broken\"\nfrontends = [\"{BROKEN_FRONTEND}\"]\nstable = [\"127.0.0.1:8001\"]\n\
         canary = [\"{REFUSING_CANARY}\"]\n",
        web_service("")
    ))
}

/// Issue 11's new user: `{"steps":[10,50,100],"step_seconds":2}` names no gates. The default
/// gates roll back a canary that refuses connections and promote a healthy one; a timed rollout
/// needs `"gates": "none"`, which the rollout's state and the audit log show.
#[test]
fn without_gates_a_refusing_canary_is_rolled_back_and_a_healthy_one_promoted() {
    let lab = healthy_and_broken();
    let healthy_load = Load::start(lab.inside(), FRONTEND4, 400, 25.0, 3000);
    let broken_load = Load::start(lab.inside(), BROKEN_FRONTEND, 50, 8.0, 3000);
    let plan = json!({ "steps": [10, 50, 100], "step_seconds": 2 });
    let web = start(&lab, "web", &plan);
    assert_eq!(web["plan"]["gates"]["confidence"], json!(0.95), "the defaults are shown: {web}");
    assert_eq!(web["plan"]["gates"]["failed_attempts_tolerance"], json!(0.02), "{web}");
    start(&lab, "broken", &plan);

    let broken =
        wait_rollout_of(&lab, "broken", "rolled back", Duration::from_secs(6), |r| r["state"] == "rolled_back");
    assert_eq!(lab.agent.service("broken")["canary_percent"], json!(0.0));
    let failure = broken["last_gates"]["failures"][0].as_str().unwrap();
    assert!(failure.starts_with("failed_attempts: canary 100.00 %"), "{broken}");
    let web = wait_rollout_of(&lab, "web", "promoted", Duration::from_secs(24), |r| {
        assert_ne!(r["state"], "rolled_back", "a healthy canary was rolled back: {r}");
        r["state"] == "promoted"
    });
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(100.0));
    assert_eq!(web["harm"]["canary_failed_connections"], json!(0), "{web}");
    let load = healthy_load.report();
    assert_eq!(errors_total(&load), 0, "{load}");
    let load = broken_load.report();
    println!(
        "no gates named: refusing canary rolled back after {} ms; web promoted after {} s",
        broken["harm"]["rolled_back_unix_ms"].as_u64().unwrap() - first_step_at(&broken),
        (web["history"].as_array().unwrap().last().unwrap()["at_unix_ms"].as_u64().unwrap() - first_step_at(&web))
            / 1000
    );
    assert!(errors_total(&load) > 0, "{load}");

    // The opt-out: a timed rollout promotes even the refusing canary, and says so.
    let timed = start(&lab, "broken", &json!({ "steps": [10, 100], "step_seconds": 1, "gates": "none" }));
    assert_eq!(timed["plan"]["gates"], json!("none"), "{timed}");
    assert!(timed["history"][0]["detail"].as_str().unwrap().contains("gates: none"), "{timed}");
    let _ = tcp_connects(lab.inside(), BROKEN_FRONTEND, 50);
    wait_rollout_of(&lab, "broken", "promoted", Duration::from_secs(5), |r| r["state"] == "promoted");
    let (_, audit) = lab.agent.call("GET", "/v1/audit", None);
    let last = audit["entries"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["route"], json!("/v1/services/broken/rollout"), "{last}");
    assert_eq!(last["after"]["rollout"]["gates"], json!("none"), "the audit log shows the opt-out: {last}");
}

/// Issue 11: a canary that refuses every connection, under a 60 s step with the default gates and
/// 50 new connections a second, is rolled back within 3 s of the step starting, having cost
/// fewer than 200 failed client connections. The rollout reports the cost.
#[test]
fn refusing_canary_is_rolled_back_within_3s_of_a_60s_step() {
    let lab = healthy_and_broken();
    let load = Load::start(lab.inside(), BROKEN_FRONTEND, 50, 8.0, 3000);
    std::thread::sleep(Duration::from_millis(1000));
    let posted = Instant::now();
    start(&lab, "broken", &json!({ "steps": [10, 50, 100], "step_seconds": 60 }));
    let r = wait_rollout_of(&lab, "broken", "rolled back", Duration::from_secs(3), |r| r["state"] == "rolled_back");
    let seen = posted.elapsed();
    let step_started = first_step_at(&r);
    let rolled_back = r["harm"]["rolled_back_unix_ms"].as_u64().unwrap();
    assert!(rolled_back - step_started <= 3000, "{r}");
    let load_started = load.started_unix_ms;
    let report = load.report();
    let failed = errors_total(&report);
    assert_eq!(failed, report["errors"]["ConnectionRefused"].as_u64().unwrap(), "{report}");
    assert!(failed < 200, "{failed} failed client connections: {report}");
    // What the rollout says it cost matches what the clients saw (all failures happened while
    // the canary had weight: none after the rollback).
    let harm = &r["harm"];
    assert_eq!(failures_since(&report, load_started, rolled_back + 100), 0, "{report}");
    assert_eq!(harm["canary_failed_connections"].as_u64(), Some(failed), "{r}\n{report}");
    assert_eq!(harm["steps"][0]["canary_failed_connections"].as_u64(), Some(failed), "{r}");
    let detection = harm["time_to_rollback_ms"].as_u64().unwrap();
    assert!(detection <= rolled_back - step_started, "{harm}");
    println!(
        "refusing canary at 10 % of 50 connections/s: rolled back {} ms after the step started ({} ms after the \
         first failed connection, {seen:?} after the POST); {failed} failed client connections",
        rolled_back - step_started,
        detection
    );
}

/// Drops SYNs to the lab's canary backend inside the lab's namespace; `only` narrows the rule
/// with more iptables matches (e.g. every other SYN).
fn drop_syns_to_canary(lab: &Lab, only: &[&str]) {
    let netns = lab.netns.name.as_str();
    let mut args = vec!["netns", "exec", netns, "iptables", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1"];
    args.extend(["--dport", "8002", "--syn"]);
    args.extend_from_slice(only);
    args.extend(["-j", "DROP"]);
    run("ip", &args);
}

/// Issue 9 item 12: a canary that loses every other SYN still establishes (nearly) every
/// connection (clients wait 5 s), so the failure comparisons see nothing wrong; the plan's
/// `max_rto_connection_ratio` sees that every canary connection needed a retransmission timeout
/// and rolls it back.
#[test]
fn a_canary_whose_connections_need_retransmission_timeouts_is_rolled_back_by_the_rto_gate() {
    let lab = Lab::with_service(&web_service(""));
    drop_syns_to_canary(&lab, &["-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0"]);
    let load = Load::start(lab.inside(), FRONTEND4, 40, 12.0, 5000);
    let plan = json!({ "steps": [50, 100], "step_seconds": 4, "gates": { "max_rto_connection_ratio": 0.2 } });
    start(&lab, "web", &plan);
    let r = wait_rollout(&lab, "rolled back", Duration::from_secs(30), |r| {
        assert_ne!(r["state"], "promoted", "a canary whose every connection retransmitted its SYN was promoted: {r}");
        r["state"] == "rolled_back"
    });
    let gates = &r["last_gates"];
    let failures: Vec<&str> = gates["failures"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(failures.iter().any(|f| f.starts_with("max_rto_connection_ratio: ")), "{r}");
    assert!(!failures.iter().any(|f| f.starts_with("failed_attempts")), "no connection failed: {r}");
    assert!(gates["rto_connection_ratio"].as_f64().unwrap() > 0.2, "{r}");
    // The DROP rule counts SYNs of all connections together, so now and then two concurrent
    // attempts line up and one loses its retransmission too; nearly all establish.
    let report = load.report();
    let failed: u64 = report["errors"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
    assert!(failed * 20 <= report["attempts"].as_u64().unwrap(), "at most 5 % failed: {report}");
}

/// Issue 11 item 5: a canary that black-holes SYNs, with clients that give up after 1 s (as Go,
/// Envoy and Java clients do, long before the kernel's own SYN timeout), is rolled back. The
/// kernel never reports these attempts as failed: the gates see them as abandoned attempts (the
/// datapath counts them, issue 9 item 5).
#[test]
fn canary_that_drops_syns_is_rolled_back_when_clients_give_up() {
    let lab = Lab::with_service(&web_service(""));
    drop_syns_to_canary(&lab, &[]);
    let load = Load::start(lab.inside(), FRONTEND4, 50, 10.0, 1000);
    start(&lab, "web", &json!({ "steps": [10, 50, 100], "step_seconds": 60 }));
    let r = wait_rollout(&lab, "rolled back", Duration::from_secs(8), |r| r["state"] == "rolled_back");
    let harm = &r["harm"];
    assert!(harm["steps"][0]["canary_abandoned_attempts"].as_u64().unwrap() > 0, "{r}");
    assert!(r["last_gates"]["failures"][0].as_str().unwrap().starts_with("failed_attempts"), "{r}");
    let report = load.report();
    assert!(report["errors"]["TimedOut"].as_u64().unwrap() > 0, "{report}");
    println!(
        "SYN-dropping canary, clients with a 1 s timeout: rolled back {} ms after the step started, {} abandoned",
        harm["rolled_back_unix_ms"].as_u64().unwrap() - first_step_at(&r),
        harm["canary_failed_connections"]
    );
}

/// Issue 11 item 5: with patient clients the kernel gives up on its own (here after 3 s:
/// `tcp_syn_retries = 1` in the lab's namespace) and reports the attempt as failed.
#[test]
fn canary_that_drops_syns_is_rolled_back_when_the_kernel_times_out() {
    let lab = Lab::with_service(&web_service(""));
    drop_syns_to_canary(&lab, &[]);
    run("ip", &["netns", "exec", &lab.netns.name, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_syn_retries"]);
    let load = Load::start(lab.inside(), FRONTEND4, 50, 10.0, 30_000);
    start(&lab, "web", &json!({ "steps": [10, 50, 100], "step_seconds": 60 }));
    let r = wait_rollout(&lab, "rolled back", Duration::from_secs(10), |r| r["state"] == "rolled_back");
    assert!(r["harm"]["steps"][0]["canary_failed_connections"].as_u64().unwrap() > 0, "{r}");
    let report = load.report();
    assert!(report["errors"]["TimedOut"].as_u64().unwrap() > 0, "{report}");
    println!(
        "SYN-dropping canary, kernel timeout after 3 s: rolled back {} ms after the step started",
        r["harm"]["rolled_back_unix_ms"].as_u64().unwrap() - first_step_at(&r)
    );
}

/// Issue 11: a canary 1 % worse than stable at 5 % weight is not rolled back on noise. Twenty
/// services roll out at once with the default gates (confidence 0.95, tolerance 2 points), each
/// under its own Poisson client traffic; each canary has 100 backends of which one refuses
/// connections, so 1 % of canary connections fail and none of stable's do. None may roll back.
#[test]
fn canary_1_percent_worse_is_not_rolled_back_on_noise() {
    const SERVICES: usize = 20;
    const RATE: u32 = 80;
    const SECONDS: f64 = 40.0;
    let mut services = String::new();
    for i in 0..SERVICES {
        let mut canary: Vec<String> = (1..=99).map(|j| format!("\"127.0.{i}.{j}:8102\"")).collect();
        canary.push(format!("\"127.0.{i}.100:8109\"")); // nothing listens: refused
        services.push_str(&format!(
            "[[service]]\nname = \"svc{i}\"\nfrontends = [\"127.1.1.{}:80\"]\nstable = [\"127.0.0.1:8101\"]\ncanary = [{}]\n",
            i + 1,
            canary.join(", ")
        ));
    }
    let lab = Lab::with_service(&services);
    let _servers =
        serve(lab.outside(), &["serve-tcp", "--listen", "0.0.0.0:8102=canary", "--listen", "127.0.0.1:8101=stable"]);
    let loads: Vec<Load> = (0..SERVICES)
        .map(|i| Load::start(lab.inside(), &format!("127.1.1.{}:80", i + 1), RATE, SECONDS, 3000))
        .collect();
    for i in 0..SERVICES {
        start(&lab, &format!("svc{i}"), &json!({ "steps": [5], "step_seconds": 10 }));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(SECONDS - 2.0);
    while Instant::now() < deadline {
        for i in 0..SERVICES {
            let r = rollout_of(&lab, &format!("svc{i}"));
            assert_ne!(r["state"], "rolled_back", "svc{i}: false rollback: {r}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (mut canary_attempts, mut canary_failed, mut promoted) = (0, 0, 0);
    for i in 0..SERVICES {
        let r = rollout_of(&lab, &format!("svc{i}"));
        assert!(r["state"] == "running" || r["state"] == "promoted", "svc{i}: {r}");
        promoted += u32::from(r["state"] == "promoted");
        canary_attempts += r["harm"]["steps"][0]["canary_attempts"].as_u64().unwrap();
        canary_failed += r["harm"]["steps"][0]["canary_failed_connections"].as_u64().unwrap();
    }
    let mut refused = 0;
    for load in loads {
        let report = load.report();
        assert_eq!(errors_total(&report), report["errors"]["ConnectionRefused"].as_u64().unwrap_or(0), "{report}");
        refused += errors_total(&report);
    }
    println!(
        "{SERVICES} rollouts at 5 %, {RATE} connections/s each for {SECONDS} s: {canary_attempts} canary attempts, \
         {canary_failed} failed ({refused} refused as the clients saw it), none rolled back, {promoted} promoted \
         (the rest still gathering evidence)"
    );
    // The degradation was real: about 1 % of canary attempts failed.
    let observed = canary_failed as f64 / canary_attempts as f64;
    assert!(canary_attempts > 1000 && (0.002..0.03).contains(&observed), "{canary_failed} of {canary_attempts}");
}

#[test]
fn healthy_canary_is_promoted_and_the_split_follows_each_step() {
    let lab = Lab::new(0.0);
    // This test is about the split; a 10-point tolerance lets each step's 1,000 connections be
    // enough evidence (the default 2 points needs a few hundred canary attempts per step).
    let plan = json!({
        "steps": [10, 50, 100],
        "step_seconds": 2,
        "gates": { "failed_attempts_tolerance": 0.1, "resets_tolerance": 0.1, "max_failed_attempt_ratio": 0.05,
                   "max_reset_ratio": 0.05, "max_srtt_ratio": 10, "min_connections": 20 },
    });
    start(&lab, "web", &plan);
    for (step, percent) in [(0, 10.0), (1, 50.0), (2, 100.0)] {
        let r = wait_rollout(&lab, &format!("step {step}"), Duration::from_secs(10), |r| {
            r["step"] == json!(step) && r["state"] == json!("running")
        });
        assert_eq!(r["percent"], json!(percent), "{r}");
        // Well inside the 2 s step: this batch sees only this step's weight.
        let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
        assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
        assert_share(&format!("step {step}"), &report, percent);
    }
    let r = wait_rollout(&lab, "promoted", Duration::from_secs(10), |r| r["state"] == json!("promoted"));
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(100.0), "{r}");
    let events: Vec<&str> = r["history"].as_array().unwrap().iter().map(|h| h["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["started", "step", "check_passed", "step", "check_passed", "step", "check_passed", "promoted"]);
    let steps = r["harm"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{r}");
    assert!(steps.iter().all(|s| s["canary_failed_connections"] == 0 && s["canary_attempts"].as_u64().unwrap() > 0));
}

/// The canary starts refusing at the second step: rolled back within one step, weight 0,
/// webhooks told, and with terminate_connections the client's open canary connections are
/// reset while its stable ones stay open.
#[test]
fn failing_canary_is_rolled_back_and_its_connections_cut() {
    let webhooks = WebhookReceiver::start();
    let mut lab = Lab::new_with_agent(0.0, &format!("webhook_allow = [{:?}]", webhooks.allow()));
    // Canary connections that stay open across the rollback come from a second canary server
    // that keeps them after the canary stops accepting.
    let plan = json!({
        "steps": [10, 50, 100],
        "step_seconds": 2,
        "gates": { "failed_attempts_tolerance": 0.1, "resets_tolerance": 0.1, "max_failed_attempt_ratio": 0.1,
                   "min_connections": 20 },
        "webhooks": [webhooks.url],
        "rollback": { "terminate_connections": true },
    });
    start(&lab, "web", &plan);
    let _ = tcp_connects(lab.inside(), FRONTEND4, 1000); // traffic for step 1's window
    wait_rollout(&lab, "second step", Duration::from_secs(8), |r| r["step"] == json!(1));

    // Long-lived connections at 50 %: some canary, some stable.
    let mut held = spawn_probe(lab.inside(), &["hold", "--target", FRONTEND4, "--count", "40"]);
    let held_line = held.wait_for_line("held");
    assert!(held_line.contains("canary") && held_line.contains("stable"), "{held_line}");
    // The canary fails from now on: it stops accepting (its open connections stay up).
    writeln!(lab.servers.child.stdin.as_mut().unwrap(), "close canary").unwrap();
    lab.servers.wait_for_line("closed canary");
    let failed_at = Instant::now();
    // The rollback comes early, while this batch runs: only part of its canary half is refused.
    let report = tcp_connects(lab.inside(), FRONTEND4, 300);
    assert!(report.error("ConnectionRefused") > 0, "{:?}", report.raw);

    let r = wait_rollout(&lab, "rolled back", Duration::from_secs(4), |r| r["state"] == json!("rolled_back"));
    assert!(failed_at.elapsed() <= Duration::from_secs(3), "rollback took {:?}", failed_at.elapsed());
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(0.0));
    assert!(r["last_gates"]["failures"][0].as_str().unwrap().starts_with("failed_attempts"), "{r}");
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
    let plan = json!({ "steps": [10, 50, 100], "step_seconds": 1, "gates": "none",
                       "approval": { "at_percent": 50, "role": "release" } });
    let (status, body) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "an operator may start a rollout: {body}");
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

/// Issue 11 item 6 (security review F2): an operator cannot take a service past its
/// `max_operator_percent` by starting a rollout: every step above the cap must wait for a
/// release approver, or the start is refused with 403 naming the step. With that gate the
/// rollout waits at each step above the cap and goes on after a release approval.
#[test]
fn operator_rollouts_above_the_cap_need_a_release_approval() {
    let mut lab = Lab::with_agent(TOKENS, &web_service("max_operator_percent = 25"));
    lab.agent.token = Some("viewer-token-0001".into());
    let operator = Some("operator-token-01");
    let release = Some("release-token-001");
    let post =
        |lab: &Lab, token, plan: Value| lab.agent.call_as(token, "POST", "/v1/services/web/rollout", Some(&plan));
    let refused = [
        (json!({ "steps": [10, 50, 100], "step_seconds": 1 }), 403, "steps[1]"),
        (json!({ "steps": [30], "step_seconds": 1, "gates": "none" }), 403, "steps[0]"),
        (
            json!({ "steps": [10, 50, 100], "step_seconds": 1, "approval": { "at_percent": 50, "role": "operator" } }),
            403,
            "steps[1]",
        ),
        (
            json!({ "steps": [10, 50, 100], "step_seconds": 1, "approval": { "at_percent": 75, "role": "release" } }),
            403,
            "steps[1]",
        ),
        (
            json!({ "steps": [10, 50, 100], "step_seconds": 1, "approval": { "at_percent": 50, "role": "viewer" } }),
            400,
            "approval.role",
        ),
    ];
    for (plan, status, field) in refused {
        let (got, body) = post(&lab, operator, plan.clone());
        assert_eq!((got, body["field"].as_str()), (status, Some(field)), "{plan}: {body}");
        if status == 403 {
            assert_eq!(body["code"], json!("forbidden"), "{body}");
            assert!(body["message"].as_str().unwrap().contains("max_operator_percent (25 %)"), "{body}");
        }
    }
    let (status, body) = lab.agent.call_as(operator, "GET", "/v1/services/web/rollout", None);
    assert_eq!((status, body["code"].as_str()), (404, Some("rollout_not_found")), "nothing started: {body}");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(0.0));

    // Up to the cap an operator needs nobody.
    let (status, body) = post(&lab, operator, json!({ "steps": [10, 25], "step_seconds": 1, "gates": "none" }));
    assert_eq!(status, 201, "{body}");
    wait_rollout(&lab, "promoted", Duration::from_secs(5), |r| r["state"] == "promoted");

    // Above it, each step waits for release.
    let plan = json!({ "steps": [10, 50, 100], "step_seconds": 1, "gates": "none",
                       "approval": { "at_percent": 50, "role": "release" } });
    let (status, body) = post(&lab, operator, plan);
    assert_eq!(status, 201, "{body}");
    for percent in [50.0, 100.0] {
        let r = wait_rollout(&lab, "awaiting approval", Duration::from_secs(5), |r| r["state"] == "awaiting_approval");
        assert!(r["percent"].as_f64().unwrap() < percent, "{r}");
        let (status, body) = lab.agent.call_as(operator, "POST", "/v1/services/web/rollout/approve", None);
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
        let (status, body) = lab.agent.call_as(release, "POST", "/v1/services/web/rollout/approve", None);
        assert_eq!((status, body["percent"].as_f64()), (200, Some(percent)), "{body}");
        assert_eq!(lab.agent.service("web")["canary_percent"], json!(percent));
    }
    wait_rollout(&lab, "promoted", Duration::from_secs(5), |r| r["state"] == "promoted");

    // A release token needs no approval.
    let (status, body) = lab.agent.call_as(release, "POST", "/v1/services/web/rollback", None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&lab, release, json!({ "steps": [10, 50, 100], "step_seconds": 1, "gates": "none" }));
    assert_eq!(status, 201, "{body}");
    lab.agent.token = None;
}

/// Issue 11 item 5 (datapath review F10): the kernel measures no health for UDP, so a service
/// that has carried only UDP cannot start a rollout with gates; the error says what to do.
#[test]
fn udp_only_service_cannot_start_a_judged_rollout() {
    let lab = Lab::with_service(
        "[[service]]\nname = \"dns\"\nfrontends = [\"127.1.0.53:53\"]\nstable = [\"127.0.0.1:5301\"]\n\
         canary = [\"127.0.0.1:5302\"]\ncanary_percent = 10\n",
    );
    let _servers =
        serve(lab.outside(), &["serve-udp", "--listen", "127.0.0.1:5301=stable", "--listen", "127.0.0.1:5302=canary"]);
    let report = probe(lab.inside(), &["udp", "--target", "127.1.0.53:53", "--count", "50"]);
    assert_eq!(report["errors"], json!({}), "{report}");
    lab.agent.set_percent("dns", 0.0);
    let (status, body) =
        lab.agent.call("POST", "/v1/services/dns/rollout", Some(&json!({ "steps": [10, 100], "step_seconds": 1 })));
    assert_eq!((status, body["field"].as_str()), (400, Some("gates")), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("only UDP") && message.contains("\"gates\": \"none\""), "{message}");
    let (status, _) = lab.agent.call("GET", "/v1/services/dns/rollout", None);
    assert_eq!(status, 404, "nothing started");
    let timed = json!({ "steps": [10, 100], "step_seconds": 1, "gates": "none" });
    start(&lab, "dns", &timed);
}

#[test]
fn a_restarted_agent_resumes_the_rollout_at_the_same_step() {
    let mut lab = Lab::new(0.0);
    let plan = json!({ "steps": [10, 50, 100], "step_seconds": 3,
                       "gates": { "failed_attempts_tolerance": 0.1, "resets_tolerance": 0.1, "min_connections": 5 } });
    start(&lab, "web", &plan);
    let _ = tcp_connects(lab.inside(), FRONTEND4, 1000);
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
    let lab = Lab::new_with_agent(0.0, "webhook_allow = [\"127.0.0.1:9\"]");
    let many_steps: Vec<f64> = (1..=101).map(|i| f64::from(i) * 0.5).collect();
    let cases = [
        (json!({ "steps": [], "step_seconds": 1 }), "steps"),
        (json!({ "steps": many_steps, "step_seconds": 1 }), "steps"),
        (json!({ "steps": [10, 5], "step_seconds": 1 }), "steps[1]"),
        (json!({ "steps": [50, 150], "step_seconds": 1 }), "steps[1]"),
        (json!({ "steps": [10, 50], "step_seconds": -2 }), "step_seconds"),
        (json!({ "steps": [10, 50], "step_seconds": 0.5 }), "step_seconds"),
        (json!({ "steps": [10, 50], "step_seconds": 1, "failure_threshold": 1000 }), "failure_threshold"),
        (json!({ "steps": [10, 50], "step_seconds": 1, "gates": { "max_error_budget": 0.1 } }), "gates"),
        (json!({ "steps": [10, 50], "step_seconds": 1, "gates": { "confidence": 1.5 } }), "gates.confidence"),
        (
            json!({ "steps": [10, 50], "step_seconds": 1, "gates": { "failed_attempts_tolerance": 0 } }),
            "gates.failed_attempts_tolerance",
        ),
        (json!({ "steps": [10, 50], "step_seconds": 1, "gates": "all" }), "gates"),
        (json!({ "steps": [10, 50], "step_seconds": "1" }), "step_seconds"),
        (json!({ "steps": [10, 50] }), ""),
        (
            json!({ "steps": [10, 50], "step_seconds": 1, "approval": { "at_percent": 50, "role": "boss" } }),
            "approval.role",
        ),
        (
            json!({ "steps": [10, 50], "step_seconds": 1, "approval": { "at_percent": 50, "role": "viewer" } }),
            "approval.role",
        ),
    ];
    for (plan, field) in cases {
        let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
        assert_eq!(status, 400, "{plan}: {body}");
        assert!(body["field"].as_str().unwrap_or("").starts_with(field), "{plan}: {body}");
    }
    // Nine allowed webhooks: refused for their number, not for one of them.
    let plan = json!({ "steps": [10, 50], "step_seconds": 1, "webhooks": vec!["http://127.0.0.1:9/"; 9] });
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!((status, body["field"].as_str()), (400, Some("webhooks")), "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("at most 8"), "{body}");
    let (status, body) = lab.agent.call("GET", "/v1/services/web/rollout", None);
    assert_eq!((status, body["code"].as_str()), (404, Some("rollout_not_found")), "{body}");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(0.0));
    let (status, _) =
        lab.agent.call("POST", "/v1/services/nope/rollout", Some(&json!({ "steps": [10], "step_seconds": 1 })));
    assert_eq!(status, 404);
}
