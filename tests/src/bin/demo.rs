//! `cargo xtask demo`: the whole product on one machine. In a private network namespace and a
//! cgroup it makes, it starts a stable and a canary backend, runs the agent, drives a client,
//! and moves the canary 0 → 10 → 50 → 100 → 0 through the HTTP API, showing live the target and
//! the share of connections the client saw land on the canary. Then two rollouts: a healthy
//! canary promoted step by step, and a canary that starts failing, rolled back by itself.
//! Cleans up on exit and on Ctrl-C.

use std::{
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
};

use e2e::{serve, tcp_connects, Agent, Cgroup, NetNs, Placement, Spawned};
use serde_json::{json, Value};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

const FRONTEND: &str = "127.1.0.1:80";
const ROUNDS: u32 = 8;
const PER_ROUND: u32 = 150;

fn main() {
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    e2e::require_root();

    println!("sockshift demo: steering connect() at the socket layer");
    let netns = NetNs::new();
    let cgroup = Cgroup::new();
    println!("  network namespace  {}", netns.name);
    println!("  client cgroup      {}", cgroup.path.display());
    let mut servers = serve(
        Placement { netns: Some(&netns), cgroup: None },
        &["serve-tcp", "--listen", "127.0.0.1:8001=stable", "--listen", "127.0.0.1:8002=canary"],
    );
    println!("  stable backend     127.0.0.1:8001   canary backend 127.0.0.1:8002");
    let agent = Agent::start(
        &cgroup,
        &format!(
            "[[service]]\nname = \"web\"\nfrontends = [\"{FRONTEND}\"]\n\
             stable = [\"127.0.0.1:8001\"]\ncanary = [\"127.0.0.1:8002\"]\ncanary_percent = 0\n"
        ),
    );
    println!("  agent API          http://{}   (try: sockshift status --api {})", agent.api, agent.api);
    println!("  client             connects to {FRONTEND}; nothing listens there: the kernel rewrites connect()\n");

    let client = Placement { netns: Some(&netns), cgroup: Some(&cgroup) };
    for target in [0.0, 10.0, 50.0, 100.0, 0.0] {
        agent.set_percent("web", target);
        println!("PUT /v1/services/web/canary {{\"percent\": {target}}}");
        let (mut canary, mut total) = (0u64, 0u64);
        for _ in 0..ROUNDS {
            if INTERRUPTED.load(Ordering::SeqCst) {
                println!("\ninterrupted: cleaning up");
                return;
            }
            let report = tcp_connects(client, FRONTEND, PER_ROUND);
            canary += report.tag("canary");
            total += report.tags_total();
            let observed = canary as f64 * 100.0 / total.max(1) as f64;
            let filled = (observed / 2.5).round() as usize;
            print!(
                "\r  target {target:>5.1} %   observed {observed:>5.1} %   [{}{}]   {total} connections",
                "#".repeat(filled),
                ".".repeat(40 - filled.min(40))
            );
            let _ = std::io::stdout().flush();
        }
        println!();
    }
    let state = agent.service("web");
    println!(
        "\nthe kernel counted: stable {} connections (SRTT {} µs), canary {} connections (SRTT {} µs)",
        state["sides"]["stable"]["connections_steered"],
        state["sides"]["stable"]["health"]["srtt_avg_us"],
        state["sides"]["canary"]["connections_steered"],
        state["sides"]["canary"]["health"]["srtt_avg_us"],
    );

    println!(
        "\nrollout 1: a healthy canary, steps 10 → 50 → 100 %, at least 2 s each; default gates (canary against \
         stable, 95 % confidence, 2-point tolerance) and failed-attempt ratio ≤ 5 %"
    );
    if !rollout(&agent, client, &mut servers, false) {
        return;
    }
    agent.call("PUT", "/v1/services/web/canary", Some(&json!({ "percent": 0 })));
    println!("\nrollout 2: the same plan; at the second step the canary starts refusing connections");
    if !rollout(&agent, client, &mut servers, true) {
        return;
    }
    println!("\ndone: agent stopped, namespace and cgroup removed");
}

/// Runs one rollout with client traffic, showing it live; `fail` makes the canary refuse
/// connections from the second step on. Returns false when interrupted.
fn rollout(agent: &Agent, client: Placement<'_>, servers: &mut Spawned, fail: bool) -> bool {
    let plan = json!({
        "steps": [10, 50, 100],
        "step_seconds": 2,
        "gates": { "max_failed_attempt_ratio": 0.05, "min_connections": 20 },
    });
    let (status, body) = agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "starting the rollout: {body}");
    let mut failing = false;
    let mut last_step = usize::MAX;
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!("\ninterrupted: cleaning up");
            return false;
        }
        let report = tcp_connects(client, FRONTEND, 100);
        let (_, r): (u16, Value) = agent.call("GET", "/v1/services/web/rollout", None);
        let step = r["step"].as_u64().unwrap_or(0) as usize;
        if step != last_step {
            if last_step != usize::MAX {
                println!();
            }
            last_step = step;
        }
        if fail && step == 1 && !failing {
            writeln!(servers.child.stdin.as_mut().expect("server stdin"), "close canary").expect("close canary");
            failing = true;
        }
        let steps = r["steps"].as_array().map_or(0, Vec::len);
        let ratio = r["current_window"]["failed_attempt_ratio"].as_f64().map_or("-".into(), |v| format!("{:.2}", v));
        print!(
            "\r  {:<17} step {}/{}  weight {:>5} %   client saw canary {:>5.1} %, refused {:>3}   canary failed-attempt ratio {ratio:<5}",
            r["state"].as_str().unwrap_or("?"),
            (step + 1).min(steps),
            steps,
            r["percent"],
            report.share("canary"),
            report.error("ConnectionRefused"),
        );
        let _ = std::io::stdout().flush();
        match r["state"].as_str() {
            Some("promoted") => {
                println!("\n  promoted: every step held; the canary takes all traffic");
                return true;
            }
            Some("rolled_back") => {
                let why = r["last_gates"]["failures"][0].as_str().unwrap_or("");
                println!("\n  rolled back by itself ({why}); weight {} %", agent.service("web")["canary_percent"]);
                return true;
            }
            _ => {}
        }
    }
}
