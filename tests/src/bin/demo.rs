//! `cargo xtask demo`: the whole product on one machine. In a private network namespace and a
//! cgroup it makes, it starts a stable and a canary backend, runs the agent, drives a client,
//! and moves the canary 0 → 10 → 50 → 100 → 0 through the HTTP API, showing live the target and
//! the share of connections the client saw land on the canary. Cleans up on exit and on Ctrl-C.

use std::{
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
};

use e2e::{serve, tcp_connects, Agent, Cgroup, NetNs, Placement};

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
    let _servers = serve(
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
    println!("done: agent stopped, namespace and cgroup removed");
}
