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
