//! Issue 15 (metric gates and webhook checks) and issue 13 item 3 (webhooks that cannot be
//! turned against the node), the parts below the rollout engine:
//!
//! - the agent's Prometheus client against a real Prometheus (Debian's `prometheus`) scraping
//!   real HTTP applications (`sockshift-httpapp`), one of them serving inside a test network
//!   namespace: error rates read, no data, a query Prometheus' parser refuses, an outage;
//! - webhook checks and notifications against real receivers on loopback: 2xx passes, 500 and a
//!   late answer fail, a 1 GiB answer is cut at 8 KiB, refused URLs never open a connection,
//!   deliveries in flight are bounded.
//!
//! The rollouts that use them, end to end, are in `metric_rollouts.rs`.
//!
//! The one double is `the_bearer_token_is_sent_to_prometheus`: Prometheus itself takes no
//! tokens, so a loopback server that answers the Prometheus wire format checks the header.

mod gates_common;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use agent::{
    gates::{
        checks::WebhookCheck,
        metric::{expand, judge, MetricGate, OnMissing, QueryContext, Reading},
        prometheus::{check_plan_queries, read_gates, PrometheusClient, PrometheusEndpoint, QueryCheckError},
        FailCause, Verdict,
    },
    webhook::{AllowList, WebhookError, Webhooks, MAX_CONCURRENT_DELIVERIES, MAX_RESPONSE_BYTES},
};
use e2e::{
    built_binary,
    prometheus::{Prometheus, ScrapeTarget},
    require_root, NetNs, Placement, Spawned,
};
use gates_common::{start_app, start_load, Behaviour, HttpApp, Receiver, ERROR_RATE};
use serde_json::{json, Value};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn client(prometheus: &Prometheus, timeout_seconds: f64) -> PrometheusClient {
    PrometheusClient::new(PrometheusEndpoint::from_config(&prometheus.url(), None, Some(timeout_seconds)).unwrap())
}

fn context(window_seconds: u64) -> QueryContext<'static> {
    QueryContext {
        service: "web",
        window: Duration::from_secs(window_seconds),
        step: 0,
        percent: 10.0,
        namespace: None,
    }
}

/// Reads `query` every 500 ms until `accept` takes the reading; panics with the last one.
fn read_until(
    rt: &tokio::runtime::Runtime,
    client: &PrometheusClient,
    query: &str,
    what: &str,
    accept: impl Fn(&Reading) -> bool,
) -> Reading {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let reading = rt.block_on(client.read(query));
        if accept(&reading) {
            return reading;
        }
        assert!(Instant::now() < deadline, "{what}: last reading {reading:?} for {query}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A canary and a stable application of "web", both scraped, both under load.
struct Scraped {
    _loads: Vec<Spawned>,
    prometheus: Prometheus,
    _apps: Vec<HttpApp>,
    _netns: NetNs,
}

fn scraped_web(canary_error_percent: f64) -> Scraped {
    require_root();
    let netns = NetNs::new();
    let canary = start_app(Some(&netns), canary_error_percent);
    let stable = start_app(None, 0.0);
    let prometheus = Prometheus::start(&[
        ScrapeTarget::new(canary.metrics, &[("app", "web"), ("track", "canary")]),
        ScrapeTarget::new(stable.metrics, &[("app", "web"), ("track", "stable")]),
    ]);
    let loads = vec![
        start_load(Placement { netns: Some(&netns), cgroup: None }, canary.listen),
        start_load(Placement::default(), stable.listen),
    ];
    Scraped { _loads: loads, prometheus, _apps: vec![canary, stable], _netns: netns }
}

#[test]
fn the_error_rate_of_a_canary_answering_20_percent_500s_reads_0_2_and_a_healthy_one_0() {
    let lab = scraped_web(20.0);
    let rt = runtime();
    let client = client(&lab.prometheus, 5.0);
    let query = expand(ERROR_RATE, &context(5)).unwrap();
    let reading = read_until(
        &rt,
        &client,
        &query,
        "canary error rate",
        |r| matches!(r, Reading::Value(v) if (v - 0.2).abs() <= 0.05),
    );
    let gate = MetricGate { name: "error-rate".into(), query: ERROR_RATE.into(), max: Some(0.01), min: None };
    let judgement = judge(std::slice::from_ref(&gate), std::slice::from_ref(&reading), OnMissing::Hold);
    let Verdict::Fail { gate: failed, cause: FailCause::OutOfBound { value, .. } } = &judgement.verdict else {
        panic!("a 20 % error rate must fail a 1 % gate: {judgement:?}")
    };
    assert_eq!(failed, "error-rate");
    assert!((value - 0.2).abs() <= 0.05, "the verdict carries the value read: {value}");

    let healthy = ERROR_RATE.replace("track=\"canary\"", "track=\"stable\"");
    let healthy = expand(&healthy, &context(5)).unwrap();
    let reading = read_until(&rt, &client, &healthy, "stable error rate", |r| matches!(r, Reading::Value(_)));
    assert_eq!(reading, Reading::Value(0.0), "a healthy application reads exactly 0");
    assert_eq!(judge(&[gate], &[reading], OnMissing::Hold).verdict, Verdict::Pass);
}

#[test]
fn no_data_several_series_and_bad_queries_are_told_apart() {
    let lab = scraped_web(0.0);
    let rt = runtime();
    let client = client(&lab.prometheus, 5.0);
    // Series that do not exist, and 0/0 (a canary without traffic): nothing to judge.
    assert_eq!(rt.block_on(client.read(r#"sum(rate(http_requests_total{app="nothing"}[5s]))"#)), Reading::NoData);
    assert_eq!(rt.block_on(client.read("0/0")), Reading::NoData);
    assert_eq!(rt.block_on(client.read("vector(0.5)")), Reading::Value(0.5));
    // Four series (two codes, two tracks): a gate needs one number.
    let several = rt.block_on(client.read(r#"http_requests_total{app="web"}"#));
    let Reading::Error(message) = several else { panic!("{several:?}") };
    assert!(message.contains("4 series") && message.contains("sum("), "{message}");

    // Refused at plan start with Prometheus' own parser error.
    let broken = "sum(rate(http_requests_total{app=\"web\"}[30s])";
    match rt.block_on(client.check_query(broken)) {
        Err(QueryCheckError::Invalid(message)) => {
            assert!(message.contains("parse error"), "Prometheus' parser message: {message}")
        }
        other => panic!("{broken}: {other:?}"),
    }
    match rt.block_on(client.check_query(r#"http_requests_total{app="web"}[30s]"#)) {
        Err(QueryCheckError::Invalid(message)) => assert!(message.contains("range vector"), "{message}"),
        other => panic!("a range vector: {other:?}"),
    }
    rt.block_on(client.check_query(&expand(ERROR_RATE, &context(30)).unwrap())).expect("a good query passes");
    // What the rollout driver calls at plan start: the refusal names the gate's query.
    let gates = [
        MetricGate { name: "error-rate".into(), query: ERROR_RATE.into(), max: Some(0.01), min: None },
        MetricGate { name: "typo".into(), query: broken.into(), max: Some(1.0), min: None },
    ];
    let refused = rt.block_on(check_plan_queries(Some(&client), &gates, &context(30), "gates.metrics")).unwrap_err();
    assert_eq!(refused.field, "gates.metrics[1].query");
    assert!(refused.message.contains("Prometheus refuses it") && refused.message.contains("parse error"), "{refused}");
    rt.block_on(check_plan_queries(Some(&client), &gates[..1], &context(30), "gates.metrics")).unwrap();
    let unconfigured = rt.block_on(check_plan_queries(None, &gates[..1], &context(30), "gates.metrics")).unwrap_err();
    assert!(
        unconfigured.field == "gates.metrics" && unconfigured.message.contains("agent.prometheus"),
        "{unconfigured}"
    );
    let readings = rt.block_on(read_gates(&client, &gates, &context(5)));
    assert!(matches!(readings[0], Reading::Value(_) | Reading::NoData), "{readings:?}");
    assert!(matches!(&readings[1], Reading::Error(m) if m.contains("parse error")), "{readings:?}");

    // A bad query read during a rollout is an error reading, with the same text.
    let Reading::Error(message) = rt.block_on(client.read(broken)) else { panic!("broken query read") };
    assert!(message.contains("bad_data") && message.contains("parse error"), "{message}");
}

#[test]
fn readings_are_errors_while_prometheus_is_down_or_stuck_and_values_when_it_is_back() {
    let mut lab = scraped_web(20.0);
    let rt = runtime();
    let client = client(&lab.prometheus, 1.0);
    let query = expand(ERROR_RATE, &context(5)).unwrap();
    let gates = [MetricGate { name: "error-rate".into(), query: ERROR_RATE.into(), max: Some(0.01), min: None }];
    read_until(&rt, &client, &query, "before the outage", |r| matches!(r, Reading::Value(_)));

    // Stuck: the port accepts, nothing answers; the query's timeout ends the wait.
    lab.prometheus.freeze();
    let started = Instant::now();
    let stuck = rt.block_on(client.read(&query));
    lab.prometheus.thaw();
    assert!(matches!(&stuck, Reading::Error(m) if m.contains("did not answer within")), "{stuck:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by the 1 s timeout: {:?}", started.elapsed());

    lab.prometheus.stop();
    let down = rt.block_on(client.read(&query));
    let Reading::Error(message) = &down else { panic!("Prometheus stopped: {down:?}") };
    assert!(message.contains("unreachable") && message.contains(&lab.prometheus.addr.to_string()), "{message}");
    let held = judge(&gates, std::slice::from_ref(&down), OnMissing::Hold).verdict;
    assert_eq!(held, Verdict::Hold { gate: "error-rate".into(), reason: message.clone() }, "hold says why");
    let failed = judge(&gates, &[down], OnMissing::Fail).verdict;
    assert!(matches!(failed, Verdict::Fail { cause: FailCause::Missing { .. }, .. }), "{failed:?}");

    lab.prometheus.restart();
    let back = read_until(&rt, &client, &query, "after the restart", |r| matches!(r, Reading::Value(_)));
    assert!(matches!(back, Reading::Value(v) if (v - 0.2).abs() <= 0.05), "{back:?}");
}

fn webhooks(allowed: &[String]) -> Webhooks {
    Webhooks::new(AllowList::from_config(allowed).unwrap())
}

fn check(name: &str, url: String, timeout_seconds: f64) -> WebhookCheck {
    WebhookCheck { name: name.into(), url, timeout_seconds }
}

#[test]
fn webhook_checks_pass_on_2xx_and_fail_on_500_or_a_late_answer() {
    require_root();
    let rt = runtime();
    let ok = Receiver::start(Behaviour::Answer(200));
    let failing = Receiver::start(Behaviour::Answer(500));
    let slow = Receiver::start(Behaviour::Slow(Duration::from_secs(5)));
    let hooks = webhooks(&[ok.allow(), failing.allow(), slow.allow(), format!("localhost:{}", ok.addr.port())]);
    let state = json!({"service": "web", "step": 1, "percent": 10.0, "state": "running"});

    let passed = rt.block_on(hooks.check(&check("acceptance", ok.url("/check?run=1"), 5.0), &state));
    assert!(passed.passed && passed.status == Some(200), "{passed:?}");
    assert_eq!(passed.verdict(), Verdict::Pass);
    let (head, body) = ok.requests.lock().unwrap()[0].clone();
    assert!(head.starts_with("POST /check?run=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("host: {}\r\n", ok.addr)), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), state, "the check gets the rollout's state");

    // A host name is sent as written in `Host` (and resolved for the connection).
    let named = rt.block_on(hooks.check(&check("named", format!("http://localhost:{}/", ok.addr.port()), 5.0), &state));
    assert!(named.passed, "{named:?}");
    let head = ok.requests.lock().unwrap()[1].0.to_ascii_lowercase();
    assert!(head.contains(&format!("host: localhost:{}\r\n", ok.addr.port())), "{head}");

    let failed = rt.block_on(hooks.check(&check("load-test", failing.url("/"), 5.0), &state));
    assert!(!failed.passed && failed.status == Some(500), "{failed:?}");
    assert!(failed.detail.contains("HTTP 500") && !failed.detail.contains('\n'), "{}", failed.detail);
    let Verdict::Fail { gate, cause: FailCause::Check { .. } } = failed.verdict() else { panic!("{failed:?}") };
    assert_eq!(gate, "load-test");

    let both = rt.block_on(
        hooks.check_all(&[check("load-test", failing.url("/"), 5.0), check("acceptance", ok.url("/"), 5.0)], &state),
    );
    assert_eq!(
        both.iter().map(|r| (r.name.as_str(), r.passed)).collect::<Vec<_>>(),
        [("load-test", false), ("acceptance", true)],
        "results in plan order"
    );
    assert!(Verdict::worst(both.iter().map(|r| r.verdict())).is_fail());

    let late = rt.block_on(hooks.check(&check("slow", slow.url("/"), 1.0), &state));
    assert!(!late.passed && late.status.is_none(), "{late:?}");
    assert!(late.detail.contains("no answer within 1s"), "{}", late.detail);
    assert!(late.elapsed_ms < 2500, "the timeout ends the call: {} ms", late.elapsed_ms);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_receiver_streaming_1_gib_costs_8_kib_and_a_trickle_ends_at_the_deadline() {
    require_root();
    let rt = runtime();
    let stream = Receiver::start(Behaviour::Stream);
    let trickle = Receiver::start(Behaviour::Trickle);
    let hooks = webhooks(&[stream.allow(), trickle.allow()]);
    let before = rss_kib();
    let started = Instant::now();
    let delivered =
        rt.block_on(hooks.post(&stream.url("/"), &json!({"event": "step"}), Duration::from_secs(10))).unwrap();
    assert_eq!((delivered.status, delivered.body.len(), delivered.truncated), (200, MAX_RESPONSE_BYTES, true));
    rt.block_on(hooks.notify(&stream.url("/"), &json!({"event": "step"}))).expect("a 2xx notification succeeds");
    assert!(started.elapsed() < Duration::from_secs(5), "the cap ends the read: {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    let streamed = stream.streamed.load(Ordering::SeqCst);
    assert!(streamed < 64 << 20, "the receiver got {streamed} bytes out of 1 GiB into the sockets, not the whole");
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 32 * 1024, "memory stays flat: RSS grew {grown} KiB");

    let started = Instant::now();
    let err = rt.block_on(hooks.post(&trickle.url("/"), &json!({}), Duration::from_secs(2))).unwrap_err();
    assert!(matches!(err, WebhookError::Timeout(_)), "{err:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(4),
        "one total deadline: {elapsed:?}"
    );
}

#[test]
fn refused_urls_never_open_a_connection() {
    require_root();
    let rt = runtime();
    let listed = Receiver::start(Behaviour::Answer(200));
    let unlisted = Receiver::start(Behaviour::Answer(200));
    let hooks = webhooks(&[listed.allow()]);
    let payload = json!({"event": "step"});

    let metadata = rt.block_on(hooks.notify("http://169.254.169.254/latest/meta-data/", &payload)).unwrap_err();
    assert!(matches!(metadata, WebhookError::RefusedAddress { .. }), "{metadata:?}");
    assert!(metadata.to_string().contains("link-local"), "{metadata}");

    for injected in [
        format!("http://{}/x\r\nX-Injected: 1", listed.addr),
        format!("http://{}/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nPUT /admin HTTP/1.1\r\nX: ", listed.addr),
        format!("http://{}/x\ny", listed.addr),
    ] {
        let err = rt.block_on(hooks.notify(&injected, &payload)).unwrap_err();
        assert!(matches!(err, WebhookError::Url { .. }), "{injected:?}: {err:?}");
        assert!(!err.to_string().contains('\n') && !err.to_string().contains('\r'), "{err}");
    }

    let not_listed = rt.block_on(hooks.notify(&unlisted.url("/"), &payload)).unwrap_err();
    assert!(matches!(not_listed, WebhookError::NotAllowed { .. }), "{not_listed:?}");
    assert!(not_listed.to_string().contains("agent.webhook_allow"), "{not_listed}");
    let credentials = rt.block_on(hooks.notify(&format!("http://user:pw@{}/", listed.addr), &payload)).unwrap_err();
    assert!(matches!(credentials, WebhookError::Url { .. }), "{credentials:?}");

    // A listed name that resolves to the metadata address (the resolver reads an /etc/hosts of
    // a private mount namespace) is refused after resolution, before any connection.
    let hosts = std::env::temp_dir().join(e2e::unique_name("hosts"));
    std::fs::write(&hosts, "127.0.0.1 localhost\n169.254.169.254 hooks.internal.test\n").unwrap();
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$1" notify --url http://hooks.internal.test/ --allow hooks.internal.test:80"#)
        .arg(&hosts)
        .arg(built_binary("sockshift-httpapp"))
        .output()
        .expect("run unshare");
    let _ = std::fs::remove_file(&hosts);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("resolves to 169.254.169.254") && error.contains("link-local"), "{error}");

    assert_eq!(listed.connections.load(Ordering::SeqCst), 0, "no refused URL reached the listed receiver");
    assert_eq!(unlisted.connections.load(Ordering::SeqCst), 0, "nor the unlisted one");
    rt.block_on(hooks.notify(&listed.url("/hook"), &payload)).expect("the listed receiver itself works");
    assert_eq!(listed.connections.load(Ordering::SeqCst), 1);
    assert!(Path::new("/etc/hosts").exists());
}

#[test]
fn deliveries_in_flight_are_bounded() {
    require_root();
    let rt = runtime();
    let slow = Receiver::start(Behaviour::Slow(Duration::from_millis(300)));
    let hooks = webhooks(&[slow.allow()]);
    let url = slow.url("/");
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (hooks, url) = (hooks.clone(), url.clone());
                tokio::spawn(async move { hooks.notify(&url, &json!({ "n": i })).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(slow.connections.load(Ordering::SeqCst), 40);
    let max_open = slow.max_open.load(Ordering::SeqCst) as usize;
    assert!(max_open <= MAX_CONCURRENT_DELIVERIES, "{max_open} deliveries at once");
    assert!(max_open >= 2, "deliveries do run concurrently: {max_open}");
}

#[test]
fn the_bearer_token_is_sent_to_prometheus() {
    require_root();
    let rt = runtime();
    let double = Receiver::start(Behaviour::Prometheus {
        authorization: "Bearer t0ken-from-file",
        body: r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"0.125"]}]}}"#,
    });
    let dir = std::env::temp_dir().join(e2e::unique_name("prom-token"));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "t0ken-from-file\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!("http://{}/prefix", double.addr);
    let with_token = PrometheusClient::new(PrometheusEndpoint::from_config(&url, Some(&token), None).unwrap());
    assert_eq!(rt.block_on(with_token.read("up")), Reading::Value(0.125));
    let (head, body) = double.requests.lock().unwrap()[0].clone();
    assert!(head.starts_with("POST /prefix/api/v1/query HTTP/1.1\r\n"), "{head}");
    let form = String::from_utf8(body).unwrap();
    assert!(form.starts_with("query=up&timeout="), "{form}");
    let without = PrometheusClient::new(PrometheusEndpoint::from_config(&url, None, None).unwrap());
    let Reading::Error(message) = rt.block_on(without.read("up")) else { panic!("401 must be an error") };
    assert!(message.contains("HTTP 401"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}
