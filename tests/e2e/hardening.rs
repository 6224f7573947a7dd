//! Issue 13 acceptance, from the outside against real agents: the refused start of an open API
//! off loopback, 401/403/415/421 answers (counted and audited), token revocation by reload,
//! delegation on every path that sets a weight, 1,000 slow clients while the kill switch
//! answers, audit rotation and reads from the end, webhook URLs redacted for viewers, and an
//! uninstall that refuses foreign paths and a running agent.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{web_service, Lab, FRONTEND4, TOKENS};
use e2e::{built_binary, require_root, tcp_connects, Agent, Cgroup};
use serde_json::{json, Value};

const VIEWER: Option<&str> = Some("viewer-token-0001");
const OPERATOR: Option<&str> = Some("operator-token-01");
const RELEASE: Option<&str> = Some("release-token-001");

/// One HTTP/1.1 exchange written by hand (headers exactly as given), read until the server
/// closes: (status, head and body as text, time to the first byte of the answer).
fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String, Duration) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the API");
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(request).expect("send the request");
    let started = Instant::now();
    let mut first = [0u8; 1];
    let n = stream.read(&mut first).expect("read the answer");
    let waited = started.elapsed();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let mut text = String::from_utf8_lossy(&first[..n]).into_owned();
    text.push_str(&String::from_utf8_lossy(&rest));
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text, waited)
}

/// A request with `Connection: close` and the given extra header lines.
fn request(method: &str, path: &str, host: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    if !body.is_empty() || method != "GET" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// `sockshift_api_denied_total{reason="..."}` from `/metrics`.
fn denied_total(lab: &Lab, reason: &str) -> u64 {
    let (status, text) = lab.agent.call_as(VIEWER, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let text = text.as_str().unwrap_or_default().to_string();
    let prefix = format!("sockshift_api_denied_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}"))
}

/// Runs `sockshift ARGS` to completion: (success, stdout + stderr).
fn sockshift(args: &[&str]) -> (bool, String) {
    let output = Command::new(built_binary("sockshift")).args(args).output().expect("run sockshift");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Runs `sockshift agent --config PATH` and waits (at most 20 s) for it to exit: (success,
/// output). An agent that does not exit is killed and the test fails.
fn agent_exit(config: &Path) -> (bool, String) {
    let mut child = Command::new(built_binary("sockshift"))
        .arg("agent")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sockshift agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent started although it should have refused to");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// An API reachable off loopback without `[agent.auth]` is refused by `--check` and at start,
/// naming the key and the fix; the loudly named opt-out lets it through; on loopback the agent
/// starts and warns.
#[test]
fn an_open_api_off_loopback_is_refused() {
    require_root();
    let cgroup = Cgroup::new();
    let agent = Agent::configure(&cgroup, "", &web_service(""));
    let text = std::fs::read_to_string(&agent.config_path).unwrap();
    let port = agent.api.port();
    let open = text.replace(&format!("api = \"{}\"", agent.api), &format!("api = \"0.0.0.0:{port}\""));
    assert_ne!(open, text);
    std::fs::write(&agent.config_path, &open).unwrap();
    let config = agent.config_path.to_str().unwrap();
    let (ok, out) = sockshift(&["agent", "--config", config, "--check"]);
    assert!(!ok && out.contains("agent.api") && out.contains("[agent.auth]"), "--check should refuse: {out}");
    let (ok, out) = agent_exit(&agent.config_path);
    assert!(!ok && out.contains("agent.api") && out.contains("[agent.auth]"), "start should refuse: {out}");
    assert!(agent_exit_left_nothing(&agent.bpffs), "a refused start must not pin anything");

    let opted_out = open.replace("[agent]\n", "[agent]\ninsecure_allow_unauthenticated_api = true\n");
    std::fs::write(&agent.config_path, opted_out).unwrap();
    let (ok, out) = sockshift(&["agent", "--config", config, "--check"]);
    assert!(ok, "the opt-out should pass --check: {out}");

    // On loopback: starts, and says the API is open.
    std::fs::write(&agent.config_path, &text).unwrap();
    let mut agent = agent;
    agent.spawn();
    assert!(agent.log().contains("no [agent.auth]"), "no warning about the open API:\n{}", agent.log());
}

fn agent_exit_left_nothing(bpffs: &Path) -> bool {
    !bpffs.exists() || std::fs::read_dir(bpffs).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// Host, content type, token and role, each refused with its own status and code, before any
/// body byte is read; every refusal is counted by reason in /metrics and written to the audit
/// log; `Bearer` is accepted in any case; a browser's "simple" POST cannot trigger a change.
#[test]
fn refused_requests_are_answered_counted_and_audited() {
    let lab = Lab::with_agent(TOKENS, &web_service("canary_percent = 10\nmax_operator_percent = 50"));
    let api = lab.agent.api;
    let host = api.to_string();
    let json = "Content-Type: application/json";
    let operator = "Authorization: Bearer operator-token-01";
    let viewer = "Authorization: Bearer viewer-token-0001";
    let canary = "/v1/services/web/canary";
    let body = r#"{"percent": 20}"#;
    // (request, status, code)
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        // DNS rebinding: the browser sends the attacker's name.
        (
            request("PUT", canary, &format!("evil.example:{}", api.port()), &[json, operator], body),
            421,
            "host_not_allowed",
        ),
        (request("GET", "/v1/services", "evil.example", &[viewer], ""), 421, "host_not_allowed"),
        // Cross-site "simple" requests: no JSON content type.
        (request("PUT", canary, &host, &[operator], body), 415, "unsupported_media_type"),
        (
            request("POST", "/v1/services/web/promote", &host, &["Content-Type: text/plain", operator], ""),
            415,
            "unsupported_media_type",
        ),
        (
            request(
                "POST",
                "/v1/services/web/rollback",
                &host,
                &["Content-Type: application/x-www-form-urlencoded", operator],
                "a=b",
            ),
            415,
            "unsupported_media_type",
        ),
        (
            request("DELETE", "/v1/services/web", &host, &["Authorization: Bearer release-token-001"], ""),
            415,
            "unsupported_media_type",
        ),
        // Tokens.
        (request("PUT", canary, &host, &[json], body), 401, "unauthorized"),
        (request("PUT", canary, &host, &[json, "Authorization: Bearer operator-token-0"], body), 401, "unauthorized"),
        (request("PUT", canary, &host, &[json, "Authorization: Basic b3BlcmF0b3I="], body), 401, "unauthorized"),
        (request("PUT", canary, &host, &[json, viewer], body), 403, "forbidden"),
    ];
    let before = lab.agent.call_as(RELEASE, "GET", "/v1/services/web", None).1;
    for (raw, status, code) in &cases {
        let (got, text, _) = raw_http(api, raw);
        let shown = String::from_utf8_lossy(raw);
        assert_eq!(got, *status, "{shown}\n->\n{text}");
        assert!(text.contains(&format!("\"code\":\"{code}\"")), "{shown}\n->\n{text}");
        // Stay under the audit's rate limit (10 refusals a second) so every one is written.
        std::thread::sleep(Duration::from_millis(150));
    }
    let after = lab.agent.call_as(RELEASE, "GET", "/v1/services/web", None).1;
    assert_eq!(before["canary_percent"], after["canary_percent"], "a refused request changed the weight");

    // Authentication comes before the body: a 100 kB body that never arrives is not waited for.
    let head = format!(
        "PUT {canary} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{json}\r\nContent-Length: 100000\r\n\r\n{{\"percent\":"
    );
    let (status, text, waited) = raw_http(api, head.as_bytes());
    assert_eq!(status, 401, "{text}");
    assert!(waited < Duration::from_secs(1), "the agent waited {waited:?} for a body before refusing");
    std::thread::sleep(Duration::from_millis(150));

    // An authorized request whose body stalls gets 408 `body_timeout` once the body's time
    // (BODY_TIMEOUT, 10 s) is up, and changes nothing.
    let head = format!(
        "PUT {canary} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{json}\r\nAuthorization: Bearer \
         operator-token-01\r\nContent-Length: 100\r\n\r\n{{\"percent\":"
    );
    let (status, text, waited) = raw_http(api, head.as_bytes());
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("\"code\":\"body_timeout\""), "{text}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(13),
        "answered after {waited:?}, not when the body's 10 s were up"
    );
    let after = lab.agent.call_as(RELEASE, "GET", "/v1/services/web", None).1;
    assert_eq!(before["canary_percent"], after["canary_percent"], "a stalled body changed the weight");

    // Allowed: lower-case `bearer`, localhost and [::1]-style hosts, a charset parameter.
    for (host, scheme) in [(format!("localhost:{}", api.port()), "bearer"), (host.clone(), "BEARER")] {
        let raw = request(
            "PUT",
            canary,
            &host,
            &["Content-Type: application/json; charset=utf-8", &format!("Authorization: {scheme} operator-token-01")],
            body,
        );
        let (status, text, _) = raw_http(api, &raw);
        assert_eq!(status, 200, "{text}");
    }
    // Reads need no content type; probes need no token and any Host.
    assert_eq!(raw_http(api, &request("GET", "/v1/services", &host, &[viewer], "")).0, 200);
    assert_eq!(raw_http(api, &request("GET", "/healthz", "10.9.9.9:1", &[], "")).0, 200);

    for (reason, at_least) in [
        ("host_not_allowed", 2),
        ("unsupported_media_type", 4),
        ("no_token", 3),
        ("unknown_token", 1),
        ("forbidden", 1),
    ] {
        let total = denied_total(&lab, reason);
        assert!(total >= at_least, "sockshift_api_denied_total{{reason={reason:?}}} = {total}, wanted {at_least}");
    }
    let (status, log) = lab.agent.call_as(VIEWER, "GET", "/v1/audit", None);
    assert_eq!(status, 200, "{log}");
    let entries = log["entries"].as_array().unwrap();
    let refused: Vec<&Value> = entries.iter().filter(|e| e.get("refused").is_some()).collect();
    assert_eq!(refused.len(), cases.len() + 1, "every refusal is audited: {log}");
    for reason in ["host_not_allowed", "unsupported_media_type", "no_token", "unknown_token", "forbidden"] {
        assert!(refused.iter().any(|e| e["refused"] == json!(reason)), "no audited {reason}: {log}");
    }
    let forbidden = refused.iter().find(|e| e["refused"] == json!("forbidden")).unwrap();
    assert_eq!((forbidden["token"].clone(), forbidden["role"].clone()), (json!("vera"), json!("viewer")));
    assert!(forbidden["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{forbidden}");
    let no_token = refused.iter().find(|e| e["refused"] == json!("no_token")).unwrap();
    assert_eq!(no_token["role"], Value::Null, "{no_token}");
    assert!(!log.to_string().contains("operator-token-0"), "a presented secret reached the audit log");
    assert!(!lab.agent.log().contains("operator-token-0"), "a presented secret reached the agent's log");
}

/// Tokens come from files (mode 0400, as a Kubernetes Secret volume mounts them) and inline;
/// revoking one in the config file, or rotating a token file, takes effect within seconds,
/// without a restart; a token file other users can read is refused, naming the file and mode.
#[test]
fn token_changes_apply_without_a_restart() {
    require_root();
    let cgroup = Cgroup::new();
    let secrets = std::env::temp_dir().join(e2e::unique_name("tokens"));
    std::fs::create_dir_all(&secrets).unwrap();
    let file = secrets.join("ci");
    std::fs::write(&file, "ci-token-from-a-file-01\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
    let file_token = format!(
        "[[agent.auth.tokens]]\nname = \"ci\"\ntoken_file = {:?}\nrole = \"operator\"\n",
        file.display().to_string()
    );
    let mut agent = Agent::configure(&cgroup, &format!("{TOKENS}{file_token}"), &web_service(""));
    agent.spawn();
    let call = |agent: &Agent, token: &str| {
        agent.call_as(Some(token), "PUT", "/v1/services/web/canary", Some(&json!({"percent": 5}))).0
    };
    assert_eq!(call(&agent, "operator-token-01"), 200);
    assert_eq!(call(&agent, "ci-token-from-a-file-01"), 200);

    // Revoked in the config file.
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    let revoked = config.replace("token = \"operator-token-01\"", "token = \"operator-token-02\"");
    assert_ne!(config, revoked);
    std::fs::write(&agent.config_path, &revoked).unwrap();
    let started = Instant::now();
    while call(&agent, "operator-token-01") != 401 {
        assert!(started.elapsed() < Duration::from_secs(5), "the revoked token still works after 5 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("revocation by config edit took effect after {:?}", started.elapsed());
    assert_eq!(call(&agent, "operator-token-02"), 200);

    // Rotated in its file (the config file does not change).
    std::fs::write(&file, "ci-token-from-a-file-02\n").unwrap();
    let started = Instant::now();
    while call(&agent, "ci-token-from-a-file-01") != 401 {
        assert!(started.elapsed() < Duration::from_secs(5), "the rotated file's old token still works after 5 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(call(&agent, "ci-token-from-a-file-02"), 200);
    assert!(agent.log().contains("[agent.auth] changed"), "{}", agent.log());
    assert!(!agent.log().contains("ci-token-from-a-file"), "a secret reached the log:\n{}", agent.log());

    // A token file others can read: the reload is refused (the tokens in force stay) and a
    // start is refused, naming the file and its mode.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = sockshift(&["agent", "--config", agent.config_path.to_str().unwrap(), "--check"]);
    assert!(!ok && out.contains(&file.display().to_string()) && out.contains("0644"), "{out}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(call(&agent, "ci-token-from-a-file-02"), 200, "a refused reload must keep the tokens in force");
    drop(agent);
    let _ = std::fs::remove_dir_all(&secrets);
}

/// An operator cannot take a service past its `max_operator_percent` by any path that sets a
/// weight, and a release `PUT` that leaves the cap out keeps the stored one.
#[test]
fn delegation_holds_on_every_path_that_sets_a_weight() {
    let mut lab = Lab::with_agent(TOKENS, &web_service("canary_percent = 10\nmax_operator_percent = 25"));
    lab.agent.token = RELEASE.map(String::from);
    let service = json!({ "frontends": [FRONTEND4], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8002"], "canary_percent": 90 });
    let refused: [(&str, &str, Option<Value>); 5] = [
        ("PUT", "/v1/services/web/canary", Some(json!({"percent": 26}))),
        ("POST", "/v1/services/web/promote", None),
        ("PUT", "/v1/services/web", Some(service.clone())),
        ("POST", "/v1/services/web/rollout", Some(json!({"steps": [20, 100], "step_seconds": 1, "gates": "none"}))),
        (
            "POST",
            "/v1/services/web/rollout",
            Some(
                json!({"steps": [20, 30], "step_seconds": 1, "gates": "none", "approval": {"at_percent": 30, "role": "operator"}}),
            ),
        ),
    ];
    for (method, path, body) in &refused {
        let (status, reply) = lab.agent.call_as(OPERATOR, method, path, body.as_ref());
        assert_eq!(status, 403, "operator {method} {path}: {reply}");
        assert_eq!(lab.agent.service("web")["canary_percent"], json!(10.0), "{method} {path} changed the weight");
    }
    assert_eq!(lab.agent.call_as(OPERATOR, "PUT", "/v1/services/web/canary", Some(&json!({"percent": 25}))).0, 200);

    // A release PUT without the cap keeps it.
    let (status, reply) = lab.agent.call_as(
        RELEASE,
        "PUT",
        "/v1/services/web",
        Some(&json!({ "frontends": [FRONTEND4], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8002"] })),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["max_operator_percent"], json!(25.0), "{reply}");
    assert_eq!(lab.agent.call_as(OPERATOR, "PUT", "/v1/services/web/canary", Some(&json!({"percent": 26}))).0, 403);
    // Given explicitly, it changes.
    let (status, reply) = lab.agent.call_as(RELEASE, "PUT", "/v1/services/web", Some(&json!({ "frontends": [FRONTEND4], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8002"], "max_operator_percent": 60 })));
    assert_eq!((status, reply["max_operator_percent"].clone()), (200, json!(60.0)), "{reply}");
    assert_eq!(lab.agent.call_as(OPERATOR, "PUT", "/v1/services/web/canary", Some(&json!({"percent": 60}))).0, 200);
}

/// Raises this process's open-file limit (the agent, spawned by it, inherits it and raises its
/// own too): the slow clients need well over the default 1,024.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_cur >= 4096, "open-file hard limit {} is too low for this test", limit.rlim_cur);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one attacking connection does.
#[derive(Clone, Copy, PartialEq)]
enum Attack {
    /// Sends a request head one byte at a time, never finishing it (slowloris).
    Trickle,
    /// Connects and sends nothing.
    Idle,
    /// Sends 15 KiB of headers, then stalls.
    BigHead,
    /// Sends one whole request with a valid (viewer) token, then keeps the connection idle.
    AuthIdle,
}

struct Attacker {
    kind: Attack,
    stream: Option<TcpStream>,
}

impl Attacker {
    fn connect(api: SocketAddr, kind: Attack) -> Option<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&api, Duration::from_secs(2)).ok()?;
        stream.set_nonblocking(true).ok()?;
        let head = match kind {
            Attack::Trickle => format!("GET /v1/services HTTP/1.1\r\nHost: {api}\r\nX-Slow: "),
            Attack::Idle => String::new(),
            Attack::BigHead => format!("GET /v1/services HTTP/1.1\r\nHost: {api}\r\nX-Big: {}", "b".repeat(15 * 1024)),
            Attack::AuthIdle => {
                format!("GET /v1/datapath HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer viewer-token-0001\r\n\r\n")
            }
        };
        let _ = stream.write_all(head.as_bytes());
        Some(stream)
    }
}

/// 1,000 slow clients (plus 200 more, past the connection limit) against the API: clients
/// trickling a request head a byte at a time, idle connections, stalled 15 KiB heads and
/// clients that send one authenticated request and then idle, each reconnecting as soon as the
/// agent closes it, for 25 s. Meanwhile an operator uses the kill
/// switch (and sets the weight again) every 400 ms: every call answers within 2 s, the agent's
/// memory stays bounded, and the kill switch works on the datapath.
#[test]
fn a_thousand_slow_clients_do_not_stall_the_kill_switch() {
    raise_fd_limit();
    let lab = Lab::with_agent(TOKENS, &web_service("canary_percent = 0"));
    let api = lab.agent.api;
    let rss_before = rss_kib(lab.agent.pid());
    let mut attackers: Vec<Attacker> = (0..1200)
        .map(|i| {
            let kind = match i % 12 {
                0..=6 => Attack::Trickle,
                7..=9 => Attack::Idle,
                10 => Attack::BigHead,
                _ => Attack::AuthIdle,
            };
            Attacker { kind, stream: Attacker::connect(api, kind) }
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reconnects = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let trickler = {
        let stop = stop.clone();
        let reconnects = reconnects.clone();
        std::thread::spawn(move || {
            // Bounded: the main thread stops it after 25 s; it also stops by itself after 60 s.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                for attacker in &mut attackers {
                    let alive = match attacker.stream.as_mut() {
                        None => false,
                        Some(stream) => {
                            let mut answer = [0u8; 512];
                            // EOF, or (but for the authenticated client's answer) an error answer
                            // (408, 431) before the close.
                            let closed = match stream.read(&mut answer) {
                                Ok(0) => true,
                                Ok(_) => attacker.kind != Attack::AuthIdle,
                                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                            };
                            let write_failed = attacker.kind == Attack::Trickle
                                && matches!(stream.write(b"x"), Err(ref e) if e.kind() != std::io::ErrorKind::WouldBlock);
                            !closed && !write_failed
                        }
                    };
                    if !alive {
                        reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        attacker.stream = Attacker::connect(api, attacker.kind);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut latencies = Vec::new();
    let mut peak_rss = 0;
    let attack = Instant::now();
    let mut round = 0;
    while attack.elapsed() < Duration::from_secs(25) {
        let (method, path, body) = if round % 2 == 0 {
            ("PUT", "/v1/services/web/canary", Some(json!({"percent": 20})))
        } else {
            ("POST", "/v1/services/web/rollback", None)
        };
        let started = Instant::now();
        let (status, reply) = lab.agent.call_as(OPERATOR, method, path, body.as_ref());
        let took = started.elapsed();
        assert_eq!(status, 200, "{method} {path} during the attack: {reply}");
        assert!(took < Duration::from_secs(2), "{method} {path} took {took:?} during the attack");
        if method == "POST" {
            latencies.push(took);
        }
        peak_rss = peak_rss.max(rss_kib(lab.agent.pid()));
        round += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    // The last call was the kill switch (or is now): the datapath sends nothing to the canary.
    let (status, _) = lab.agent.call_as(OPERATOR, "POST", "/v1/services/web/rollback", None);
    assert_eq!(status, 200);
    let report = tcp_connects(lab.inside(), FRONTEND4, 200);
    assert_eq!(report.tag("canary"), 0, "the kill switch did not reach the datapath: {:?}", report.raw);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    let mean = latencies.iter().sum::<Duration>() / latencies.len().max(1) as u32;
    println!(
        "kill switch under 1,200 slow clients: {} calls, mean {mean:?}, worst {worst:?}; agent RSS {} MiB before, {} MiB \
         peak; attackers reconnected {} times (closed by the header timeout or the connection limit)",
        latencies.len(),
        rss_before / 1024,
        peak_rss / 1024,
        reconnects.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(latencies.len() >= 20, "too few kill-switch calls: {}", latencies.len());
    assert!(peak_rss < rss_before + 96 * 1024, "agent memory grew from {rss_before} KiB to {peak_rss} KiB");
    assert!(reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 200, "the agent never closed a slow client");
    println!("connections refused at the limit: {}", denied_total(&lab, "connection_limit"));
    let (status, health) = lab.agent.call_as(None, "GET", "/healthz", None);
    assert_eq!(status, 200, "{health}");
}

/// The audit log rotates by size (`agent.audit_max_bytes`, `agent.audit_keep`), its files are
/// readable by root only, and `GET /v1/audit` reads from the end across the rotated files,
/// skipping a bad line without hiding the entries after it.
#[test]
fn the_audit_log_rotates_and_is_read_from_the_end() {
    let lab = Lab::with_agent("audit_max_bytes = 1048576\naudit_keep = 2\n", &web_service(""));
    // Each PUT of this service writes an entry of about 2 x 25 kB.
    let stable: Vec<String> = (0..1000).map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250 + 1)).collect();
    let state_dir = lab.agent.state_dir.clone();
    let audit = state_dir.join("audit.log");
    const ROUNDS: u32 = 110;
    for round in 0..ROUNDS {
        let body = json!({ "frontends": ["127.1.0.99:80"], "stable": stable, "canary_percent": round % 50 });
        let (status, reply) = lab.agent.call("PUT", "/v1/services/big", Some(&body));
        assert!(status == 200 || status == 201, "{reply}");
        if round == ROUNDS - 10 {
            let mut file = std::fs::OpenOptions::new().append(true).open(&audit).unwrap();
            file.write_all(b"{\"this is\": \"not an entry\"\n\xff\xfe garbage\n").unwrap();
        }
    }
    lab.agent.set_percent("web", 7.0);
    for name in ["audit.log", "audit.log.1", "audit.log.2"] {
        let meta = std::fs::metadata(state_dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(meta.len() <= 1_048_576, "{name} has {} bytes", meta.len());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
    }
    assert!(!state_dir.join("audit.log.3").exists(), "audit_keep = 2 keeps two rotated files");
    for name in ["state.json", "state.json.prev"] {
        assert_eq!(std::fs::metadata(state_dir.join(name)).unwrap().permissions().mode() & 0o777, 0o600, "{name}");
    }
    let (status, log) = lab.agent.call("GET", "/v1/audit?limit=30", None);
    assert_eq!(status, 200);
    let entries = log["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 30, "30 entries, across the current and rotated files");
    assert_eq!(entries.last().unwrap()["route"], json!("/v1/services/web/canary"), "the newest entry last");
    let percents: Vec<f64> = entries[..29].iter().map(|e| e["after"]["canary_percent"].as_f64().unwrap()).collect();
    let expected: Vec<f64> = (ROUNDS - 29..ROUNDS).map(|r| f64::from(r % 50)).collect();
    assert_eq!(percents, expected, "the entries around the bad lines are all there, in order");
}

/// One read of the audit log returns at most 1000 entries, the newest ones, however long the
/// log: the default is 1000 and a larger `limit` is refused, naming the field.
#[test]
fn audit_reads_return_at_most_the_newest_1000_entries() {
    let mut lab = Lab::with_agent(TOKENS, &web_service(""));
    lab.agent.token = RELEASE.map(String::from);
    lab.agent.stop_with(libc::SIGTERM);
    // 1,100 entries older than anything the agent writes, then the agent's own.
    let path = lab.agent.state_dir.join("audit.log");
    let mut log = std::fs::read_to_string(&path).unwrap_or_default();
    let old: String = (0..1100)
        .map(|i| {
            let entry = json!({ "time": format!("2020-01-01T00:{:02}:{:02}.000Z", i / 60, i % 60), "token": "old",
                "role": "operator", "method": "PUT", "route": format!("/v1/services/old-{i}/canary"),
                "before": null, "after": null });
            format!("{entry}\n")
        })
        .collect();
    log.insert_str(0, &old);
    std::fs::write(&path, log).unwrap();
    lab.agent.spawn();
    lab.agent.set_percent("web", 7.0);

    let (status, reply) = lab.agent.call("GET", "/v1/audit", None);
    assert_eq!(status, 200, "{reply}");
    let entries = reply["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1000, "the default is the most: 1000");
    assert_eq!(entries.last().unwrap()["after"]["canary_percent"], json!(7.0), "the newest entry last");
    let oldest = entries.iter().find(|e| e["token"] == "old").unwrap();
    let kept_old = entries.iter().filter(|e| e["token"] == "old").count();
    assert_eq!(oldest["route"], json!(format!("/v1/services/old-{}/canary", 1100 - kept_old)), "the newest old ones");
    let (status, reply) = lab.agent.call("GET", "/v1/audit?limit=1001", None);
    assert_eq!((status, reply["code"].as_str(), reply["field"].as_str()), (400, Some("out_of_range"), Some("limit")));
    assert!(reply["message"].as_str().unwrap().contains("1000"), "{reply}");
}

/// A viewer sees webhook URLs without their query strings (in the rollout and the audit log);
/// an operator sees them whole.
#[test]
fn webhook_urls_are_redacted_for_viewers() {
    let lab = Lab::with_agent(&format!("webhook_allow = [\"127.0.0.1:9\"]\n{TOKENS}"), &web_service(""));
    let hook = "http://127.0.0.1:9/hook?key=hunter2-secret";
    let plan = json!({ "steps": [5, 10], "step_seconds": 60, "gates": "none", "webhooks": [hook] });
    let (status, reply) = lab.agent.call_as(OPERATOR, "POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{reply}");
    let (_, seen_by_viewer) = lab.agent.call_as(VIEWER, "GET", "/v1/services/web/rollout", None);
    assert_eq!(seen_by_viewer["plan"]["webhooks"], json!(["http://127.0.0.1:9/hook?<redacted>"]));
    let (_, seen_by_operator) = lab.agent.call_as(OPERATOR, "GET", "/v1/services/web/rollout", None);
    assert_eq!(seen_by_operator["plan"]["webhooks"], json!([hook]));
    let (_, audit) = lab.agent.call_as(VIEWER, "GET", "/v1/audit", None);
    assert!(!audit.to_string().contains("hunter2"), "{audit}");
    assert!(audit.to_string().contains("?<redacted>"), "{audit}");
    let (_, audit) = lab.agent.call_as(OPERATOR, "GET", "/v1/audit", None);
    assert!(audit.to_string().contains("hunter2"), "operators see the audit log whole");
}

/// `sockshift uninstall` refuses the bpffs mount root, a path not on bpffs and a directory a
/// running agent uses (unless --force); it removes only sockshift's own pins, leaving anything
/// else in place, and `--purge-state` removes the state directory's files.
#[test]
fn uninstall_refuses_foreign_paths_and_a_running_agent() {
    let mut lab = Lab::new(50.0);
    let bpffs = lab.agent.bpffs.clone();
    let (ok, out) = sockshift(&["uninstall", "--bpffs", "/sys/fs/bpf"]);
    assert!(!ok && out.contains("bpffs mount itself"), "{out}");
    let elsewhere = std::env::temp_dir().join(e2e::unique_name("not-bpffs"));
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("FRONTENDS_V1"), "precious").unwrap();
    let (ok, out) = sockshift(&["uninstall", "--bpffs", elsewhere.to_str().unwrap()]);
    assert!(!ok && out.contains("not on a bpffs"), "{out}");
    assert!(elsewhere.join("FRONTENDS_V1").exists(), "a file outside bpffs was removed");
    std::fs::remove_dir_all(&elsewhere).unwrap();

    let (ok, out) = sockshift(&["uninstall", "--bpffs", bpffs.to_str().unwrap()]);
    assert!(!ok && out.contains("running sockshift agent"), "{out}");
    assert!(bpffs.join("links").exists());
    assert_eq!(tcp_connects(lab.inside(), FRONTEND4, 100).tags_total(), 100, "a refused uninstall changed steering");

    // Another tool's directory inside ours stays.
    let foreign = bpffs.join("other-tool");
    std::fs::create_dir(&foreign).unwrap();
    lab.agent.stop_with(libc::SIGTERM);
    let state_dir = lab.agent.state_dir.clone();
    assert!(state_dir.join("audit.log").exists());
    std::fs::write(state_dir.join("notes.txt"), "not sockshift's").unwrap();
    let (ok, out) = sockshift(&[
        "uninstall",
        "--bpffs",
        bpffs.to_str().unwrap(),
        "--purge-state",
        "--state-dir",
        state_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("left in place") && out.contains("other-tool"), "{out}");
    assert!(foreign.exists(), "a foreign entry was removed");
    let left: Vec<String> =
        std::fs::read_dir(&bpffs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["other-tool"], "sockshift's pins should be gone");
    let report = tcp_connects(lab.inside(), FRONTEND4, 100);
    assert_eq!(report.tags_total(), 0, "still steered after uninstall: {:?}", report.raw);
    let state_left: Vec<String> =
        std::fs::read_dir(&state_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(state_left, ["notes.txt"], "--purge-state removes sockshift's files only");
    std::fs::remove_dir(&foreign).unwrap();
}

/// `--force` removes the pins of a running agent.
#[test]
fn uninstall_force_removes_a_running_agents_pins() {
    let lab = Lab::new(50.0);
    let bpffs = lab.agent.bpffs.clone();
    let (ok, out) = sockshift(&["uninstall", "--bpffs", bpffs.to_str().unwrap(), "--force"]);
    assert!(ok, "{out}");
    assert!(!bpffs.exists(), "{out}");
    assert_eq!(tcp_connects(lab.inside(), FRONTEND4, 50).tags_total(), 0);
}

/// The agent refuses a pin directory another user owns, or that group or others may write,
/// saying what to do; it creates its own directory 0700.
#[test]
fn the_agent_refuses_an_untrusted_pin_directory() {
    require_root();
    let cgroup = Cgroup::new();
    let agent = Agent::configure(&cgroup, "", &web_service(""));
    std::fs::create_dir(&agent.bpffs).unwrap();
    std::os::unix::fs::chown(&agent.bpffs, Some(65534), None).unwrap();
    let (ok, out) = agent_exit(&agent.config_path);
    assert!(!ok && out.contains("owned by uid 65534") && out.contains("chown root"), "{out}");
    std::os::unix::fs::chown(&agent.bpffs, Some(0), None).unwrap();
    std::fs::set_permissions(&agent.bpffs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, out) = agent_exit(&agent.config_path);
    assert!(!ok && out.contains("mode 0777"), "{out}");
    assert!(std::fs::read_dir(&agent.bpffs).unwrap().next().is_none(), "nothing may be pinned there");
    std::fs::remove_dir(&agent.bpffs).unwrap();
    let mut agent = agent;
    agent.spawn();
    let mode = std::fs::metadata(&agent.bpffs).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the agent's own pin directory");
}

/// Where bpffs is not mounted, the agent mounts it with mode 0700 (the kernel's default is 1777).
/// Run in a private mount namespace whose /sys/fs/bpf is unmounted.
#[test]
fn the_agent_mounts_bpffs_0700() {
    require_root();
    let cgroup = Cgroup::new();
    let agent = Agent::configure(&cgroup, "", &web_service(""));
    let script = format!(
        "while grep -q ' /sys/fs/bpf ' /proc/self/mounts; do umount -l /sys/fs/bpf || exit 3; done; {} agent --config {} & pid=$!; \
         for i in $(seq 100); do grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && stat -c %a {} >/dev/null 2>&1 && break; sleep 0.1; done; \
         stat -c 'mode=%a' /sys/fs/bpf; kill $pid; wait $pid",
        built_binary("sockshift").display(),
        agent.config_path.display(),
        agent.bpffs.display(),
    );
    let output =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    // The kernel always adds the sticky bit: 1700.
    assert!(
        text.contains("mode=1700") || text.contains("mode=700"),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
