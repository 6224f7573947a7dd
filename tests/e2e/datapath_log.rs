//! Issue 14 acceptance, the datapath's own log: `agent.datapath_log` turned on and off through
//! the config (a reload replaces the programs in place), with connections to the frontend running
//! the whole time. Nothing listens on the frontend, so any connection the programs failed to
//! steer during a switch would fail.

mod common;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use common::{Lab, FRONTEND4};
use e2e::tcp_connects;

/// Rewrites the config's `agent.datapath_log` and tells the agent to reload (SIGHUP).
fn set_datapath_log(lab: &Lab, level: &str) {
    let config = std::fs::read_to_string(&lab.agent.config_path).unwrap();
    let kept: Vec<&str> = config.lines().filter(|line| !line.starts_with("datapath_log")).collect();
    let rewritten = kept.join("\n").replacen("[agent]\n", &format!("[agent]\ndatapath_log = \"{level}\"\n"), 1);
    std::fs::write(&lab.agent.config_path, rewritten).unwrap();
    unsafe { libc::kill(lab.agent.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = lab.agent.call("GET", "/v1/datapath", None);
        assert_eq!(status, 200, "{body}");
        if body["datapath_log"] == level {
            return;
        }
        assert!(Instant::now() < deadline, "datapath_log never became {level}: {body}\n{}", lab.agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent log's datapath decision records (`steer ...`).
fn steer_lines(log: &str) -> Vec<String> {
    log.lines().filter(|line| line.contains(" datapath] steer ")).map(str::to_string).collect()
}

#[test]
fn debug_log_names_service_side_and_backend_and_switches_without_a_failed_connection() {
    let lab = Lab::new(50.0);
    // Connections run through both switches; each batch must be steered whole.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let placement = e2e::Placement { netns: Some(&lab.netns), cgroup: Some(&lab.cgroup) };
        let stop = &stop;
        let load = scope.spawn(move || {
            let (mut batches, mut connections) = (0u32, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let report = tcp_connects(placement, FRONTEND4, 50);
                assert_eq!(report.errors_total(), 0, "a connection failed during a switch: {:?}", report.raw);
                assert_eq!(report.tags_total(), 50, "{:?}", report.raw);
                batches += 1;
                connections += 50;
            }
            (batches, connections)
        });
        switch_on_and_off(&lab);
        stop.store(true, Ordering::Relaxed);
        let (batches, connections) = load.join().expect("no connection failed during the switches");
        assert!(batches >= 2, "the load ran through the switches ({batches} batches, {connections} connections)");
    });
}

fn switch_on_and_off(lab: &Lab) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(steer_lines(&lab.agent.log()).is_empty(), "logging is off by default");

    set_datapath_log(lab, "debug");
    let report = tcp_connects(lab.inside(), FRONTEND4, 20);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = steer_lines(&lab.agent.log());
        if !lines.is_empty() || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!lines.is_empty(), "no decision logged at debug:\n{}", lab.agent.log());
    for line in &lines {
        assert!(line.contains("service=web call=connect "), "{line}");
        assert!(
            line.contains("side=stable backend=127.0.0.1:8001 ")
                || line.contains("side=canary backend=127.0.0.1:8002 "),
            "side and backend agree: {line}"
        );
        assert!(line.contains(" bucket=") && line.contains(" weight_ppm=500000 "), "{line}");
        assert!(line.contains(" key=connection cohort=none"), "{line}");
    }

    set_datapath_log(lab, "off");
    // Records the replaced programs wrote before the switch are drained by then.
    std::thread::sleep(Duration::from_millis(500));
    let before = steer_lines(&lab.agent.log()).len();
    let report = tcp_connects(lab.inside(), FRONTEND4, 50);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    std::thread::sleep(Duration::from_millis(500));
    let after = steer_lines(&lab.agent.log()).len();
    assert_eq!(after, before, "decisions logged with datapath_log = \"off\"");
}

/// `GET /v1/datapath/log` on a raw connection: the answer's status, and the connection (the
/// stream stays open while it is held).
fn open_log_stream(lab: &Lab) -> (u16, std::net::TcpStream) {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(lab.agent.api).expect("connect to the API");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = lab.agent.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET /v1/datapath/log HTTP/1.1\r\nHost: {}\r\n{auth}\r\n", lab.agent.api).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line).expect("the status line");
    (line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), stream)
}

/// A `sockshift logs --datapath` process; its stdout lines and stderr arrive on channels.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    errors: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start(lab: &Lab, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut command = std::process::Command::new(e2e::built_binary("sockshift"));
        command.args(["logs", "--datapath", "--api", &lab.agent.api.to_string()]).args(extra);
        if let Some(token) = &lab.agent.token {
            command.env("SOCKSHIFT_TOKEN", token);
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sockshift logs");
        let pipe = |reader: Box<dyn std::io::Read + Send>| {
            let (send, receive) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(reader).lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        return;
                    }
                }
            });
            receive
        };
        let lines = pipe(Box::new(child.stdout.take().unwrap()));
        let errors = pipe(Box::new(child.stderr.take().unwrap()));
        Self { child, lines, errors }
    }

    /// Every line that arrived within `wait`.
    fn collect(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sockshift logs --datapath` follows the records through the API: a follower started while
/// logging is off is told so, keeps following across the reload that turns it on and sees the
/// decisions; `--service` filters by the record's service; the verb needs `--datapath`.
#[test]
fn sockshift_logs_datapath_follows_the_records_across_a_level_change() {
    let lab = Lab::new(50.0);
    let web = Follower::start(&lab, &["--service", "web"]);
    let other = Follower::start(&lab, &["--service", "no-such-service"]);
    let warning = web.errors.recv_timeout(Duration::from_secs(30)).expect("a note that logging is off");
    assert!(warning.contains("datapath_log is \"off\""), "{warning}");

    set_datapath_log(&lab, "debug");
    // The followers subscribed before the reload; give the API a moment to have both streams open.
    std::thread::sleep(Duration::from_millis(300));
    let report = tcp_connects(lab.inside(), FRONTEND4, 20);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    let lines = web.collect(Duration::from_secs(3));
    let steered: Vec<&String> = lines.iter().filter(|line| line.starts_with("steer ")).collect();
    assert!(steered.len() >= 20, "each of the 20 connections logged (got {}): {lines:?}", steered.len());
    for line in &lines {
        assert!(line.contains("service=web "), "only web's records: {line}");
    }
    assert!(
        steered.iter().all(|line| line.contains("side=stable backend=127.0.0.1:8001 ")
            || line.contains("side=canary backend=127.0.0.1:8002 ")),
        "{steered:?}"
    );
    assert_eq!(other.collect(Duration::from_millis(200)), Vec::<String>::new(), "--service filters");

    // At most 8 followers: with the two above and six more streams open, the ninth is refused;
    // once one goes (noticed at the next record written to it), a new one is let in.
    let mut streams: Vec<(u16, std::net::TcpStream)> = (0..6).map(|_| open_log_stream(&lab)).collect();
    assert!(streams.iter().all(|(status, _)| *status == 200), "{:?}", streams.iter().map(|s| s.0).collect::<Vec<_>>());
    let (status, refused) = open_log_stream(&lab);
    assert_eq!(status, 429, "a ninth follower");
    drop(refused);
    drop(streams.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = tcp_connects(lab.inside(), FRONTEND4, 5);
        assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
        std::thread::sleep(Duration::from_millis(200));
        let (status, stream) = open_log_stream(&lab);
        if status == 200 {
            streams.push((status, stream));
            break;
        }
        assert!(Instant::now() < deadline, "the place of a follower that went was never freed");
    }

    let output = std::process::Command::new(e2e::built_binary("sockshift"))
        .args(["logs", "--api", &lab.agent.api.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("--datapath"), "{stderr}");
}
