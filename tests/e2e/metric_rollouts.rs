//! Issue 15 end to end: rollouts judged on the application's own metrics and on webhook checks
//! as well as on the kernel's counters, and issue 13 item 3's webhook fences as a plan meets them.
//!
//! Everything is real: the agent steers the connections of a test cgroup inside a test network
//! namespace; the stable and canary are `sockshift-httpapp` servers there, counting requests by
//! status code; Debian's `prometheus` scrapes them every second (their metrics listeners stay on
//! the host's loopback); a load generator in the steered cgroup makes new connections all the
//! time; webhook receivers are plain HTTP servers on loopback, allowed by `agent.webhook_allow`.
//! Steps are short (2 to 4 s) so the whole file runs in about a minute.

mod gates_common;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use e2e::{
    built_binary,
    prometheus::{Prometheus, ScrapeTarget},
    require_root, unique_name, Agent, Cgroup, NetNs, Placement, Spawned,
};
use gates_common::{start_app, start_load, Behaviour, HttpApp, Receiver, ERROR_RATE};
use serde_json::{json, Value};

const FRONTEND: &str = "127.1.0.1:80";

/// Fields drop in order: the agent detaches first, the load stops before its cgroup goes, the
/// namespace goes last.
struct MetricLab {
    agent: Agent,
    _loads: Vec<Spawned>,
    prometheus: Prometheus,
    _apps: Vec<HttpApp>,
    _cgroup: Cgroup,
    _netns: NetNs,
}

impl MetricLab {
    /// Service "web": a stable answering every request with 200 and a canary answering
    /// `canary_error_percent` % of them with 500, both scraped by Prometheus, under load from
    /// the steered cgroup; the agent knows Prometheus and allows `webhook_allow`.
    fn new(canary_error_percent: f64, webhook_allow: &[String]) -> Self {
        require_root();
        let netns = NetNs::new();
        let cgroup = Cgroup::new();
        let canary = start_app(Some(&netns), canary_error_percent);
        let stable = start_app(Some(&netns), 0.0);
        let prometheus = Prometheus::start(&[
            ScrapeTarget::new(canary.metrics, &[("app", "web"), ("track", "canary")]),
            ScrapeTarget::new(stable.metrics, &[("app", "web"), ("track", "stable")]),
        ]);
        let agent_extra = format!("prometheus = {:?}\nwebhook_allow = {webhook_allow:?}", prometheus.url());
        let service = format!(
            "[[service]]\nname = \"web\"\nfrontends = [\"{FRONTEND}\"]\nstable = [\"{}\"]\ncanary = [\"{}\"]\n",
            stable.listen, canary.listen
        );
        let agent = Agent::start_with(&cgroup, &agent_extra, &service);
        let placement = Placement { netns: Some(&netns), cgroup: Some(&cgroup) };
        // Two clients making new connections back to back: a few hundred a second, enough
        // evidence for the kernel gates' defaults within a 2 to 4 s step at 50 %.
        let loads = (0..2).map(|_| start_load(placement, FRONTEND.parse().unwrap())).collect();
        Self { agent, _loads: loads, prometheus, _apps: vec![canary, stable], _cgroup: cgroup, _netns: netns }
    }

    fn start(&self, plan: &Value) -> Value {
        let (status, body) = self.agent.call("POST", "/v1/services/web/rollout", Some(plan));
        assert_eq!(status, 201, "{plan}: {body}");
        body
    }

    fn refused(&self, plan: &Value) -> Value {
        let (status, body) = self.agent.call("POST", "/v1/services/web/rollout", Some(plan));
        assert_eq!(status, 400, "{plan} must be refused: {body}");
        body
    }

    fn rollout(&self) -> Value {
        let (status, body) = self.agent.call("GET", "/v1/services/web/rollout", None);
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls the rollout until `check` holds; panics with the last state after `limit`.
    fn wait(&self, what: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let rollout = self.rollout();
            if check(&rollout) {
                return rollout;
            }
            assert!(
                started.elapsed() < limit,
                "{what}: not within {limit:?}; rollout: {rollout:#}\nagent log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `sockshift ARGS --api ADDR`: its standard output; panics if it fails.
    fn cli(&self, args: &[&str]) -> String {
        let api = self.agent.api.to_string();
        let output = std::process::Command::new(built_binary("sockshift"))
            .args(args)
            .args(["--api", &api])
            .output()
            .expect("run the sockshift CLI");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "sockshift {args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
        stdout
    }

    fn canary_percent(&self) -> f64 {
        self.agent.service("web")["canary_percent"].as_f64().unwrap()
    }
}

fn error_rate_gate() -> Value {
    json!({ "name": "error-rate", "query": ERROR_RATE, "max": 0.01 })
}

/// History events of a rollout, with their details.
fn history(rollout: &Value) -> Vec<(String, String)> {
    rollout["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["event"].as_str().unwrap().to_string(), h["detail"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn event<'a>(history: &'a [(String, String)], name: &str) -> Option<&'a str> {
    history.iter().find(|(event, _)| event == name).map(|(_, detail)| detail.as_str())
}

/// The number after `prefix` in `detail`: 0.2031 in `error-rate: 0.2031 above max 0.01`.
fn number_after(detail: &str, prefix: &str) -> f64 {
    let start = detail.find(prefix).unwrap_or_else(|| panic!("{prefix:?} in {detail:?}")) + prefix.len();
    let word = detail[start..].split(|c: char| c.is_whitespace() || c == ',').next().unwrap();
    word.parse().unwrap_or_else(|_| panic!("a number after {prefix:?} in {detail:?}"))
}

fn elapsed_s(rollout: &Value) -> f64 {
    let history = rollout["history"].as_array().unwrap();
    let first = history.first().unwrap()["at_unix_ms"].as_u64().unwrap();
    let last = history.last().unwrap()["at_unix_ms"].as_u64().unwrap();
    (last - first) as f64 / 1000.0
}

/// A canary that accepts every connection but answers 500 to 20 % of requests: the kernel sees
/// nothing wrong, the error-rate gate does, and rolls it back during its first step's window,
/// long before the window ends. A plan of the same gate promotes a healthy canary.
#[test]
fn an_error_rate_gate_rolls_back_a_canary_answering_500s_that_every_kernel_gate_passes() {
    let plan = |step_seconds: u64| {
        json!({
            "steps": [50, 100],
            "step_seconds": step_seconds,
            "gates": { "metrics": [error_rate_gate()] },
        })
    };

    let lab = MetricLab::new(20.0, &[]);
    // A 60 s window: judged only at its end, the rollback would come after 60 s. Read every 5 s
    // (the poll interval), three failing readings in a row fail the step: about 15 s after the
    // first scrapes show the errors; 40 s leaves room for a loaded machine and still proves it.
    let started = lab.start(&plan(60));
    let started_at = Instant::now();
    assert_eq!(started["plan"]["gates"]["metrics"][0]["name"], "error-rate", "{started}");
    assert_eq!(started["plan"]["gates"]["on_missing"], "hold", "the default is shown: {started}");
    let rolled_back = lab.wait("rolled back early, inside the 60 s window", Duration::from_secs(40), |r| {
        assert_ne!(r["state"], "promoted", "a canary answering 20 % 500s was promoted: {r:#}");
        r["state"] == "rolled_back"
    });
    assert!(started_at.elapsed() < Duration::from_secs(45), "rolled back after {:?}", started_at.elapsed());
    assert_eq!(rolled_back["step"], 0, "in the first step: {rolled_back}");
    assert_eq!(lab.canary_percent(), 0.0);
    let events = history(&rolled_back);
    let reason = event(&events, "rolled_back").unwrap();
    let value = number_after(reason, "error-rate: ");
    assert!(
        reason.contains("above max 0.01") && (value - 0.2).abs() <= 0.06,
        "the history names the gate and its value: {reason}"
    );
    assert_eq!(event(&events, "check_failed"), Some(&reason["gates failed: ".len()..]), "{events:?}");
    let judgement = &rolled_back["last_judgement"];
    assert_eq!(judgement["verdict"]["gate"], "error-rate", "{judgement}");
    assert_eq!(judgement["failures"].as_array().unwrap().len(), 1, "no other gate failed: {judgement}");
    assert!((judgement["metrics"][0]["reading"]["value"].as_f64().unwrap() - 0.2).abs() <= 0.06, "{judgement}");
    // The kernel saw a healthy canary: every connection established, no reset, no failed gate.
    let kernel = &rolled_back["last_gates"];
    assert_eq!(kernel["failures"], json!([]), "{kernel}");
    assert_ne!(kernel["verdict"], "fail", "{kernel}");
    assert!(kernel["canary_attempts"].as_u64().unwrap() > 0, "{kernel}");
    assert_eq!((kernel["canary_failed_attempts"].as_u64(), kernel["canary_resets"].as_u64()), (Some(0), Some(0)));
    assert_eq!(rolled_back["harm"]["canary_failed_connections"], 0, "{rolled_back}");
    // The CLI shows the gate's value, bound and verdict.
    let status = lab.cli(&["rollout", "status", "web"]);
    let line = status.lines().find(|l| l.contains("metric error-rate")).unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("last judged") && line.contains("(max 0.01)") && line.contains("fail"), "{status}");
    assert!(status.contains("last judgement (step 0): error-rate: 0."), "{status}");
    println!("20 % 500s: rolled back {:.1} s after the start: {reason}\n{status}", elapsed_s(&rolled_back));
    drop(lab);

    // The same plan, started from a file by the CLI, promotes a healthy canary.
    let lab = MetricLab::new(0.0, &[]);
    let path = std::env::temp_dir().join(unique_name("plan.json"));
    std::fs::write(&path, plan(4).to_string()).unwrap();
    let started = lab.cli(&["rollout", "start", "web", "--plan", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(started.contains("metric error-rate"), "{started}");
    let promoted = lab.wait("promoted", Duration::from_secs(40), |r| {
        assert_ne!(r["state"], "rolled_back", "a healthy canary was rolled back: {r:#}");
        r["state"] == "promoted"
    });
    assert_eq!(lab.canary_percent(), 100.0);
    let events = history(&promoted);
    let passes: Vec<&str> =
        events.iter().filter(|(e, _)| e == "check_passed").map(|(_, detail)| detail.as_str()).collect();
    assert_eq!(passes.len(), 2, "{events:?}");
    for pass in &passes {
        assert_eq!(number_after(pass, "error-rate = "), 0.0, "each check read the healthy canary's rate: {pass}");
    }
    assert_eq!(promoted["last_judgement"]["verdict"]["verdict"], "pass", "{promoted}");
    println!("healthy canary: promoted in {:.1} s", elapsed_s(&promoted));
}

/// Prometheus stops mid-rollout. With `on_missing = "hold"` the step waits and says why, and the
/// rollout carries on once Prometheus is back; with `"fail"` it rolls back.
#[test]
fn prometheus_down_mid_rollout_holds_the_step_or_fails_it_as_the_plan_says() {
    let plan = |on_missing: &str| {
        json!({
            "steps": [25, 50, 100],
            "step_seconds": 4,
            "gates": { "metrics": [error_rate_gate()], "on_missing": on_missing },
        })
    };

    let mut lab = MetricLab::new(0.0, &[]);
    lab.start(&plan("hold"));
    lab.wait("step 1", Duration::from_secs(30), |r| r["step"] == 1);
    lab.prometheus.stop();
    let stopped = Instant::now();
    let held = lab.wait("held", Duration::from_secs(20), |r| r["external_window"]["holding"].is_string());
    let holding = held["external_window"]["holding"].as_str().unwrap();
    assert!(
        holding.starts_with("error-rate: holding, Prometheus at") && holding.contains("unreachable"),
        "the state says which gate holds and why: {holding}"
    );
    assert_eq!(event(&history(&held), "check_held"), Some(holding), "and so does the history");
    let status = lab.cli(&["rollout", "status", "web"]);
    assert!(status.contains("holding: error-rate: holding, Prometheus at"), "and the CLI: {status}");
    // It keeps waiting at the step, neither promoted nor failed.
    std::thread::sleep(Duration::from_secs(5));
    let still = lab.rollout();
    assert_eq!(
        (&still["state"], &still["step"], &still["consecutive_failures"]),
        (&json!("running"), &json!(1), &json!(0))
    );
    assert_eq!(lab.canary_percent(), 50.0);
    lab.prometheus.restart();
    let promoted = lab.wait("promoted after Prometheus is back", Duration::from_secs(40), |r| {
        assert_ne!(r["state"], "rolled_back", "{r:#}");
        r["state"] == "promoted"
    });
    println!(
        "on_missing = hold: held while Prometheus was down, promoted {:.1} s after it stopped",
        stopped.elapsed().as_secs_f64()
    );
    assert_eq!(promoted["step"], 2);
    assert_eq!(lab.canary_percent(), 100.0);
    drop(lab);

    let mut lab = MetricLab::new(0.0, &[]);
    lab.start(&plan("fail"));
    lab.wait("step 1", Duration::from_secs(30), |r| r["step"] == 1);
    lab.prometheus.stop();
    let rolled_back = lab.wait("rolled back", Duration::from_secs(20), |r| r["state"] == "rolled_back");
    let reason = event(&history(&rolled_back), "rolled_back").unwrap().to_string();
    assert!(
        reason.starts_with("gates failed: error-rate: Prometheus at") && reason.ends_with("(on_missing = \"fail\")"),
        "{reason}"
    );
    assert_eq!(lab.canary_percent(), 0.0);
}

/// A webhook check answering 500 keeps the step from being promoted and rolls the rollout back
/// after `failure_threshold` failed checks; one answering 200 lets every step through. Each call
/// carries the rollout's state.
#[test]
fn a_webhook_check_answering_500_holds_the_step_and_rolls_back_after_the_threshold() {
    let failing = Receiver::start(Behaviour::Answer(500));
    let passing = Receiver::start(Behaviour::Answer(200));
    let notified = Receiver::start(Behaviour::Answer(200));
    let allow = [failing.allow(), passing.allow(), notified.allow()];
    let plan = |url: String| {
        json!({
            "steps": [50, 100],
            "step_seconds": 2,
            "failure_threshold": 2,
            "gates": { "webhooks": [{ "name": "acceptance", "url": url, "timeout_seconds": 5 }] },
            "webhooks": [notified.url("/events")],
        })
    };

    let lab = MetricLab::new(0.0, &allow);
    lab.start(&plan(failing.url("/check")));
    let rolled_back = lab.wait("rolled back", Duration::from_secs(30), |r| {
        assert!(r["step"] == 0 && r["percent"].as_f64().unwrap() <= 50.0, "a failing check let a step through: {r:#}");
        r["state"] == "rolled_back"
    });
    let events = history(&rolled_back);
    let failed: Vec<&str> = events.iter().filter(|(e, _)| e == "check_failed").map(|(_, d)| d.as_str()).collect();
    assert_eq!(failed.len(), 2, "failure_threshold 2: two failed checks, then the rollback: {events:?}");
    for detail in failed {
        assert!(detail.starts_with("acceptance: answered HTTP 500"), "{detail}");
    }
    assert!(event(&events, "check_passed").is_none(), "{events:?}");
    let calls = failing.requests.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one call per check");
    for (head, body) in &calls {
        assert!(head.starts_with("POST /check HTTP/1.1\r\n"), "{head}");
        let state: Value = serde_json::from_slice(body).unwrap();
        assert_eq!((&state["event"], &state["service"], &state["step"]), (&json!("check"), &json!("web"), &json!(0)));
        assert_eq!((&state["state"], &state["steps"]), (&json!("running"), &json!([50.0, 100.0])), "{state}");
        assert!(state["window"]["judging_since_unix_ms"].is_u64(), "the kernel gates had passed: {state}");
    }
    assert_eq!(rolled_back["last_judgement"]["webhooks"][0]["status"], 500, "{rolled_back}");
    assert_eq!(lab.canary_percent(), 0.0);
    // The rollback's notification carries the judgement: the check's status and detail.
    let deadline = Instant::now() + Duration::from_secs(10);
    let notification = loop {
        let events: Vec<Value> = notified
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| serde_json::from_slice::<Value>(body).unwrap())
            .collect();
        if let Some(rolled) = events.into_iter().find(|e| e["event"] == "rolled_back") {
            break rolled;
        }
        assert!(Instant::now() < deadline, "no rolled_back notification");
        std::thread::sleep(Duration::from_millis(100));
    };
    let check = &notification["judgement"]["webhooks"][0];
    assert_eq!((&check["name"], &check["status"]), (&json!("acceptance"), &json!(500)), "{notification}");
    assert!(check["detail"].as_str().is_some_and(|d| d.contains("HTTP 500")), "{notification}");
    assert!(notification["detail"].as_str().is_some_and(|d| d.contains("acceptance")), "{notification}");
    // `rollout status --watch` on a finished rollout prints its table once and ends.
    let watched = lab.cli(&["rollout", "status", "web", "--watch"]);
    assert!(watched.contains("rolled_back"), "{watched}");
    drop(lab);

    let lab = MetricLab::new(0.0, &allow);
    lab.start(&plan(passing.url("/check")));
    let promoted = lab.wait("promoted", Duration::from_secs(30), |r| {
        assert_ne!(r["state"], "rolled_back", "{r:#}");
        r["state"] == "promoted"
    });
    let calls = passing.requests.lock().unwrap().clone();
    let steps: Vec<Value> =
        calls.iter().map(|(_, body)| serde_json::from_slice::<Value>(body).unwrap()["step"].clone()).collect();
    assert_eq!(steps, [json!(0), json!(1)], "one call before each step was passed");
    let passes: Vec<String> =
        history(&promoted).into_iter().filter(|(e, _)| e == "check_passed").map(|(_, d)| d).collect();
    assert_eq!(passes, ["acceptance: HTTP 200", "acceptance: HTTP 200"]);
    assert_eq!(lab.canary_percent(), 100.0);
}

/// A query with a syntax error is refused at start with Prometheus' own parser message, naming
/// the gate's field; nothing starts.
#[test]
fn a_query_prometheus_cannot_parse_is_refused_at_start() {
    let lab = MetricLab::new(0.0, &[]);
    let broken = r#"sum(rate(http_requests_total{app="{{service}}"}[{{window}}])"#;
    let body = lab.refused(&json!({
        "steps": [50, 100],
        "step_seconds": 2,
        "gates": { "metrics": [error_rate_gate(), { "name": "typo", "query": broken, "max": 1 }] },
    }));
    assert_eq!(body["field"], "gates.metrics[1].query", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("Prometheus refuses it") && message.contains("parse error"), "{message}");
    let (status, _) = lab.agent.call("GET", "/v1/services/web/rollout", None);
    assert_eq!(status, 404, "nothing started");
    assert_eq!(lab.canary_percent(), 0.0);

    let body = lab.refused(&json!({
        "steps": [50], "step_seconds": 2,
        "gates": { "metrics": [{ "name": "range", "query": "http_requests_total[{{window}}]", "max": 1 }] },
    }));
    assert!(body["message"].as_str().unwrap().contains("range vector"), "{body}");
    let body = lab.refused(&json!({
        "steps": [50], "step_seconds": 2,
        "gates": { "metrics": [{ "name": "typo", "query": "up{{sevice}}", "max": 1 }] },
    }));
    assert!(
        body["field"] == "gates.metrics[0].query" && body["message"].as_str().unwrap().contains("{{sevice}}"),
        "{body}"
    );
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue 13 item 3 at a plan's start: a notification to the metadata address, a URL carrying
/// CR/LF and a URL not in `agent.webhook_allow` are refused, naming the field; and a receiver
/// streaming 1 GiB to every notification and check leaves the agent's memory flat.
#[test]
fn webhooks_are_fenced_at_start_and_a_receiver_streaming_1_gib_leaves_the_agent_flat() {
    let stream = Receiver::start(Behaviour::Stream);
    let unlisted = Receiver::start(Behaviour::Answer(200));
    let lab = MetricLab::new(0.0, &[stream.allow()]);
    let timed = |webhooks: Value| json!({ "steps": [50], "step_seconds": 1, "gates": "none", "webhooks": webhooks });

    let body = lab.refused(&timed(json!(["http://169.254.169.254/latest/meta-data/"])));
    assert_eq!(body["field"], "webhooks[0]", "{body}");
    assert!(body["message"].as_str().unwrap().contains("link-local"), "{body}");
    let body = lab.refused(&timed(json!([format!("{}\r\nX-Injected: 1", stream.url("/hook"))])));
    assert_eq!(body["field"], "webhooks[0]", "{body}");
    assert!(body["message"].as_str().unwrap().contains("0x0d"), "{body}");
    let body = lab.refused(&timed(json!([unlisted.url("/hook")])));
    assert!(body["field"] == "webhooks[0]" && body["message"].as_str().unwrap().contains("webhook_allow"), "{body}");
    let body = lab.refused(&json!({
        "steps": [50], "step_seconds": 1,
        "gates": { "webhooks": [{ "name": "meta", "url": "http://[::ffff:169.254.169.254]/" }] },
    }));
    assert_eq!(body["field"], "gates.webhooks[0].url", "{body}");
    assert_eq!(unlisted.connections.load(Ordering::SeqCst), 0, "nothing was called");
    assert_eq!(stream.connections.load(Ordering::SeqCst), 0, "nothing was called");

    let pid = lab.agent.pid();
    let (rss_before, peak_before) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));
    let started = Instant::now();
    lab.start(&json!({
        "steps": [50, 100],
        "step_seconds": 2,
        "webhooks": [stream.url("/notify")],
        "gates": { "webhooks": [{ "name": "stream", "url": stream.url("/check"), "timeout_seconds": 10 }] },
    }));
    let promoted = lab.wait("promoted", Duration::from_secs(40), |r| {
        assert_ne!(r["state"], "rolled_back", "{r:#}");
        r["state"] == "promoted"
    });
    // The last notification (promoted) is sent after the state changes: let it finish.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.connections.load(Ordering::SeqCst) < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let connections = stream.connections.load(Ordering::SeqCst);
    assert!(connections >= 5, "2 steps and the promotion notified, 2 checks called: {connections}");
    let streamed = stream.streamed.load(Ordering::SeqCst);
    assert!(
        streamed < connections * (64 << 20),
        "the agent stopped reading each answer early: {streamed} bytes of {connections} GiB offered"
    );
    let check = &promoted["last_judgement"]["webhooks"][0];
    assert_eq!((check["status"].as_u64(), check["passed"].as_bool()), (Some(200), Some(true)), "{check}");
    let (rss_after, peak_after) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));
    println!(
        "{connections} deliveries to a receiver offering 1 GiB each, {streamed} bytes sent, in {:.1} s: agent RSS \
         {rss_before} -> {rss_after} KiB, peak {peak_before} -> {peak_after} KiB",
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak_after.saturating_sub(peak_before) < 16 * 1024,
        "the agent's peak RSS grew {} KiB",
        peak_after - peak_before
    );
    assert!(rss_after.saturating_sub(rss_before) < 16 * 1024, "the agent's RSS grew {} KiB", rss_after - rss_before);
}
