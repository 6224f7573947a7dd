//! `cargo xtask bench`: sockshift side by side with what users would pick instead, in one run,
//! as ratios from interleaved rounds. Every run gets a fresh network namespace (no TIME_WAIT or
//! conntrack left over from the previous peer); all traffic stays inside it. Writes
//! `results.json`, `results.md` and `plot.png` to the output directory and prints a summary.
//! `--smoke` runs every section for about a second, to check that it works, not how fast.
//! `--only SECTION` runs one section; `--rounds N` sets the throughput section's interleaved
//! rounds (3 by default, 1 with `--smoke`).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use e2e::{place, probe, serve, spawn_in, spawn_probe, Agent, Cgroup, NetNs, Placement, Spawned};
use serde_json::{json, Value};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        // Unwinding drops every guard: processes, agents, namespaces, cgroups.
        panic!("interrupted: cleaning up");
    }
}

const FRONTEND: &str = "127.1.0.1:80";
const STABLE: &str = "127.0.0.1:8081";
const CANARY: &str = "127.0.0.1:8082";
const TARGET_PERCENT: f64 = 20.0;

struct Settings {
    smoke: bool,
    rounds: usize,
    seconds: u32,
    out: PathBuf,
}

fn main() {
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    e2e::require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out).expect("output directory");
    let rounds = match args.iter().position(|a| a == "--rounds").map(|i| args.get(i + 1).map(|n| n.parse::<usize>())) {
        None => None,
        Some(Some(Ok(n))) if n > 0 => Some(n),
        Some(_) => panic!("--rounds takes a number of rounds, at least 1"),
    };
    let settings = Settings {
        smoke,
        rounds: rounds.unwrap_or(if smoke { 1 } else { 3 }),
        seconds: if smoke { 1 } else { 5 },
        out,
    };
    // Program statistics cost two clock reads per program run (on this VM a paravirtual clock):
    // on only while the connect_cost section reads them, off (the kernel's default, and every
    // production node's) for the throughput and scale sections.
    let _ = std::fs::write(BPF_STATS, "0");

    let mut results = BTreeMap::new();
    results.insert("machine", machine());
    results.insert("mode", json!(if smoke { "smoke" } else { "full" }));
    type Section = (&'static str, fn(&Settings) -> Value);
    let sections: [Section; 7] = [
        ("throughput", throughput),
        ("connect_cost", connect_cost),
        ("scale", scale),
        ("control_plane", control_plane),
        ("cluster", cluster),
        ("split_accuracy", split_accuracy),
        ("footprint", footprint),
    ];
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    for (i, (name, section)) in sections.iter().enumerate() {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        println!("[{}/{}] {name}", i + 1, sections.len());
        results.insert(name, section(&settings));
    }
    let results = json!(results);
    std::fs::write(settings.out.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
    let (markdown, summary) = render(&results);
    std::fs::write(settings.out.join("results.md"), &markdown).unwrap();
    plot(&settings.out);
    println!("\n{summary}");
    println!("written: {0}/results.json, {0}/results.md, {0}/plot.png", settings.out.display());
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem.lines().next().unwrap_or("").replace("MemTotal:", "").trim(),
        "kernel": kernel.trim(),
    })
}

/// A fresh namespace with two nginx backends (stable, canary) and their request counters.
struct Backends {
    netns: NetNs,
    _nginx: Vec<Spawned>,
    dir: PathBuf,
}

/// One nginx's counters. Each stub_status read is itself one connection and one request, counted
/// by the nginx it reads.
#[derive(Clone, Copy, Default)]
struct Served {
    connections: u64,
    requests: u64,
}

impl Served {
    /// What was served from `before` to `self` (a read taken after `before`), less the read that
    /// took `self`.
    fn since(self, before: Served) -> Served {
        Served {
            connections: self.connections.saturating_sub(before.connections + 1),
            requests: self.requests.saturating_sub(before.requests + 1),
        }
    }
}

impl Backends {
    fn start() -> Self {
        let netns = NetNs::new();
        let dir = std::env::temp_dir().join(e2e::unique_name("bench-nginx"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nginx = Vec::new();
        for (name, listen, status) in [("stable", STABLE, "127.0.0.1:9081"), ("canary", CANARY, "127.0.0.1:9082")] {
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}.err;\n\
                     events {{ worker_connections 8192; }}\n\
                     http {{ access_log off; keepalive_requests 1000000;\n\
                       client_body_temp_path {dir}/{name}-body; proxy_temp_path {dir}/{name}-proxy;\n\
                       fastcgi_temp_path {dir}/{name}-fcgi; uwsgi_temp_path {dir}/{name}-uwsgi; scgi_temp_path {dir}/{name}-scgi;\n\
                       server {{ listen {listen} reuseport backlog=4096; location / {{ return 200 \"{name}\\n\"; }} }}\n\
                       server {{ listen {status}; location / {{ stub_status; }} }} }}\n",
                    dir = dir.display()
                ),
            )
            .unwrap();
            let conf = conf.display().to_string();
            let err = dir.join(format!("{name}.err")).display().to_string();
            nginx.push(spawn_in(
                Placement { netns: Some(&netns), cgroup: None },
                Path::new("nginx"),
                &["-c", &conf, "-e", &err],
            ));
        }
        let backends = Self { netns, _nginx: nginx, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while backends.served().is_none() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(backends.dir.join("stable.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        backends
    }

    /// Requests and connections served so far by (stable, canary), from nginx's stub_status.
    fn served(&self) -> Option<(Served, Served)> {
        let read = |addr: &str| -> Option<Served> {
            let text = in_netns(&self.netns, {
                let addr = addr.to_string();
                move || {
                    let mut stream = TcpStream::connect(&addr).ok()?;
                    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                    let mut text = String::new();
                    stream.read_to_string(&mut text).ok()?;
                    Some(text)
                }
            })?;
            // "server accepts handled requests\n 1 1 1"
            let counts: Vec<u64> = text
                .lines()
                .find(|l| l.split_whitespace().count() == 3 && l.trim().starts_with(char::is_numeric))?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some(Served { connections: counts[0], requests: counts[2] })
        };
        Some((read("127.0.0.1:9081")?, read("127.0.0.1:9082")?))
    }

    fn placement(&self) -> Placement<'_> {
        Placement { netns: Some(&self.netns), cgroup: None }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread that has entered `netns`.
fn in_netns<T: Send + 'static>(netns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        f()
    })
    .join()
    .expect("netns thread")
}

fn iptables_restore(netns: &NetNs, rules: &str) {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.name, "iptables-restore"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    child.stdin.as_mut().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "iptables-restore failed");
}

/// kube-proxy's way: a linear KUBE-SERVICES chain of `services` entries (the measured service
/// last) and a `statistic` DNAT split.
fn iptables_rules(services: usize) -> String {
    let mut rules = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-TARGET - [0:0]\n");
    for i in 1..services {
        rules.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
    }
    rules.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 1..services {
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d 127.2.{}.{}/32 -p tcp --dport 80 -j KUBE-SVC-{i}\n-A KUBE-SVC-{i} -p tcp -j DNAT --to-destination {STABLE}\n",
            i / 256,
            i % 256
        ));
    }
    rules.push_str(&format!(
        "-A KUBE-SERVICES -d 127.1.0.1/32 -p tcp --dport 80 -j KUBE-SVC-TARGET\n\
         -A KUBE-SVC-TARGET -p tcp -m statistic --mode random --probability {:.5} -j DNAT --to-destination {CANARY}\n\
         -A KUBE-SVC-TARGET -p tcp -j DNAT --to-destination {STABLE}\nCOMMIT\n",
        TARGET_PERCENT / 100.0
    ));
    rules
}

fn sockshift_services(services: usize) -> String {
    let mut config = format!(
        "[[service]]\nname = \"target\"\nfrontends = [\"{FRONTEND}\"]\nstable = [\"{STABLE}\"]\ncanary = [\"{CANARY}\"]\ncanary_percent = {TARGET_PERCENT}\n"
    );
    for i in 1..services {
        config.push_str(&format!(
            "[[service]]\nname = \"svc-{i}\"\nfrontends = [\"127.2.{}.{}:80\"]\nstable = [\"{STABLE}\"]\n",
            i / 256,
            i % 256
        ));
    }
    config
}

/// The client every peer gets in the throughput and scale sections: one wrk process with one
/// connection per thread. wrk points all of a thread's connections at one address (`thread.addr`,
/// set in the script's `setup`), so one connection per thread is what lets `direct_split` choose
/// a backend per connection, as the steering peers do, rather than per group of connections that
/// one thread's event loop serves together (with 5 threads of 8 connections, one thread serving
/// only the canary, the floor ran 1.3–1.6 × direct with keep-alive, and sockshift and iptables
/// 0.6–1.0 of it; BENCHMARKS.md).
const CLIENT_THREADS: u32 = 40;
const CLIENT_CONNECTIONS: u32 = CLIENT_THREADS;
/// Threads, and so connections, that `direct_split` points at the canary: the weight's share,
/// exactly.
const CANARY_THREADS: u32 = 8;
const _: () = assert!(CANARY_THREADS as f64 * 100.0 / CLIENT_THREADS as f64 == TARGET_PERCENT);

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Direct,
    /// The fair floor for keep-alive: no translation either, but the client itself points the
    /// weight's share of its connections at the canary, as the steering peers do.
    DirectSplit,
    Iptables,
    Haproxy,
    Sockshift,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::DirectSplit => "direct_split",
            Peer::Iptables => "iptables",
            Peer::Haproxy => "haproxy",
            Peer::Sockshift => "sockshift",
        }
    }
}

/// The wrk script every peer runs, which gives thread `i` (in wrk's creation order) the address
/// `addresses[i]`, and sends that address as the `Host` header.
fn wrk_script(addresses: &[&str]) -> String {
    let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"local addresses = {{ {} }}
local threads = 0

-- wrk's own resolve opens and closes a connection to check the address before the run, which
-- the backends would count as one of the client's connections; look the address up only.
function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup(host, service)
end

function setup(thread)
   threads = threads + 1
   local address = addresses[threads]
   local host, port = address:match("^(.+):(%d+)$")
   thread.addr = wrk.lookup(host, port)[1]
   thread:set("address", address)
end

function init(args)
   wrk.headers["Host"] = address
end
"#,
        list.join(", ")
    )
}

/// One wrk run against a peer in a fresh namespace: req/s, p50, p99 (µs), canary share of
/// requests and of connections (%).
fn run_peer(peer: Peer, services: usize, keepalive: bool, seconds: u32) -> Value {
    check_interrupted();
    let backends = Backends::start();
    let cgroup = Cgroup::new();
    let mut _keep: Vec<Spawned> = Vec::new();
    let mut _agent = None;
    let mut client = backends.placement();
    let target = match peer {
        Peer::Direct | Peer::DirectSplit => STABLE,
        Peer::Iptables => {
            iptables_restore(&backends.netns, &iptables_rules(services));
            FRONTEND
        }
        Peer::Haproxy => {
            let cfg = backends.dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                     frontend fe\n  bind {FRONTEND}\n  default_backend be\nbackend be\n  balance roundrobin\n\
                     server stable {STABLE} weight {}\n  server canary {CANARY} weight {}\n",
                    100.0 - TARGET_PERCENT,
                    TARGET_PERCENT
                ),
            )
            .unwrap();
            let cfg = cfg.display().to_string();
            _keep.push(spawn_in(backends.placement(), Path::new("haproxy"), &["-f", &cfg, "-db"]));
            std::thread::sleep(Duration::from_millis(300));
            FRONTEND
        }
        Peer::Sockshift => {
            _agent = Some(Agent::start(&cgroup, &sockshift_services(services)));
            client = Placement { netns: Some(&backends.netns), cgroup: Some(&cgroup) };
            FRONTEND
        }
    };
    // Every peer runs the same client. Direct is the floor: every connection straight to one
    // backend, no translation at all. The split floor points the first CANARY_THREADS threads'
    // connections (the weight's share) straight at the canary.
    let addresses: Vec<&str> = (0..CLIENT_THREADS)
        .map(|thread| if peer == Peer::DirectSplit && thread < CANARY_THREADS { CANARY } else { target })
        .collect();
    let script = backends.dir.join("client.lua");
    std::fs::write(&script, wrk_script(&addresses)).unwrap();
    let (threads, connections, duration) =
        (CLIENT_THREADS.to_string(), CLIENT_CONNECTIONS.to_string(), format!("{seconds}s"));
    let script = script.display().to_string();
    let mut args = vec!["-t", &threads, "-c", &connections, "-d", &duration, "--latency", "-s", &script];
    if !keepalive {
        args.extend(["-H", "Connection: close"]);
    }
    let url = format!("http://{target}/");
    args.push(&url);
    let before = backends.served().unwrap_or_default();
    let mut wrk = std::process::Command::new("wrk");
    wrk.args(&args).stdout(std::process::Stdio::piped());
    place(&mut wrk, client);
    let output = wrk.spawn().expect("run wrk").wait_with_output().expect("wrk");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let after = backends.served().unwrap_or(before);
    let (stable, canary) = (after.0.since(before.0), after.1.since(before.1));
    let share = |canary: u64, stable: u64| {
        if stable + canary > 0 {
            canary as f64 * 100.0 / (stable + canary) as f64
        } else {
            0.0
        }
    };
    let rps = parse_after(&text, "Requests/sec:").and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let errors =
        text.lines().find(|l| l.contains("Socket errors") || l.contains("Non-2xx")).unwrap_or("").trim().to_string();
    json!({
        "peer": peer.name(),
        "services": services,
        "keepalive": keepalive,
        "requests_per_second": rps,
        "p50_us": latency(&text, "50%"),
        "p99_us": latency(&text, "99%"),
        "canary_percent": share(canary.requests, stable.requests),
        "canary_connection_percent": share(canary.connections, stable.connections),
        "requests": stable.requests + canary.requests,
        "connections": stable.connections + canary.connections,
        "errors": errors,
    })
}

fn parse_after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim().strip_prefix(label)).map(str::trim)
}

/// wrk's "50%  123.45us" to microseconds.
fn latency(text: &str, percentile: &str) -> Option<f64> {
    let value = text.lines().map(str::trim).find_map(|l| l.strip_prefix(percentile))?.trim();
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        (value, 1.0)
    };
    number.trim().parse::<f64>().ok().map(|n| n * scale)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if values.is_empty() {
        0.0
    } else {
        values[values.len() / 2]
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Peers side by side, new connection per request and keep-alive, interleaved rounds.
fn throughput(settings: &Settings) -> Value {
    let peers = [Peer::Direct, Peer::DirectSplit, Peer::Iptables, Peer::Haproxy, Peer::Sockshift];
    let mut runs = Vec::new();
    for round in 0..settings.rounds {
        for keepalive in [false, true] {
            // Rotate the order each round so no peer always runs first or last.
            for i in 0..peers.len() {
                let peer = peers[(i + round) % peers.len()];
                let mode = if keepalive { "keep-alive" } else { "new connection per request" };
                println!("  round {}/{} {mode:<27} {}", round + 1, settings.rounds, peer.name());
                let mut run = run_peer(peer, 1, keepalive, settings.seconds);
                run["round"] = json!(round);
                runs.push(run);
            }
        }
    }
    let mut summary = Vec::new();
    for keepalive in [false, true] {
        for peer in peers {
            let of = |p: Peer, round: usize| {
                runs.iter()
                    .find(|r| {
                        r["peer"] == json!(p.name()) && r["keepalive"] == json!(keepalive) && r["round"] == json!(round)
                    })
                    .cloned()
                    .unwrap()
            };
            let mut ratios: Vec<f64> = (0..settings.rounds)
                .map(|r| {
                    of(peer, r)["requests_per_second"].as_f64().unwrap()
                        / of(Peer::Direct, r)["requests_per_second"].as_f64().unwrap().max(1.0)
                })
                .collect();
            let mut vs_haproxy: Vec<f64> = (0..settings.rounds)
                .filter(|r| of(Peer::Haproxy, *r)["requests_per_second"].as_f64().unwrap() > 0.0)
                .map(|r| {
                    of(peer, r)["requests_per_second"].as_f64().unwrap()
                        / of(Peer::Haproxy, r)["requests_per_second"].as_f64().unwrap()
                })
                .collect();
            let mut rps: Vec<f64> =
                (0..settings.rounds).map(|r| of(peer, r)["requests_per_second"].as_f64().unwrap()).collect();
            let mut p50: Vec<f64> = (0..settings.rounds).filter_map(|r| of(peer, r)["p50_us"].as_f64()).collect();
            let mut p99: Vec<f64> = (0..settings.rounds).filter_map(|r| of(peer, r)["p99_us"].as_f64()).collect();
            let mut share: Vec<f64> =
                (0..settings.rounds).map(|r| of(peer, r)["canary_percent"].as_f64().unwrap()).collect();
            let mut connection_share: Vec<f64> =
                (0..settings.rounds).map(|r| of(peer, r)["canary_connection_percent"].as_f64().unwrap()).collect();
            let (share_lo, share_hi) = spread(&share);
            let (connection_share_lo, connection_share_hi) = spread(&connection_share);
            // Against the fair floor (the same split, sent directly by the client).
            let mut vs_split: Vec<f64> = (0..settings.rounds)
                .map(|r| {
                    of(peer, r)["requests_per_second"].as_f64().unwrap()
                        / of(Peer::DirectSplit, r)["requests_per_second"].as_f64().unwrap().max(1.0)
                })
                .collect();
            let (lo, hi) = spread(&ratios);
            let (split_lo, split_hi) = spread(&vs_split);
            summary.push(json!({
                "ratio_to_direct_split": median(&mut vs_split),
                "ratio_to_direct_split_min": split_lo,
                "ratio_to_direct_split_max": split_hi,
                "peer": peer.name(),
                "keepalive": keepalive,
                "requests_per_second": median(&mut rps),
                "p50_us": median(&mut p50),
                "p99_us": median(&mut p99),
                "canary_percent": median(&mut share),
                "canary_percent_min": share_lo,
                "canary_percent_max": share_hi,
                "canary_connection_percent": median(&mut connection_share),
                "canary_connection_percent_min": connection_share_lo,
                "canary_connection_percent_max": connection_share_hi,
                "ratio_to_direct": median(&mut ratios),
                "ratio_to_direct_min": lo,
                "ratio_to_direct_max": hi,
                "ratio_to_haproxy": if vs_haproxy.is_empty() { Value::Null } else { json!(median(&mut vs_haproxy)) },
            }));
        }
    }
    json!({ "runs": runs, "summary": summary, "rounds": settings.rounds, "seconds": settings.seconds,
        "threads": CLIENT_THREADS,
        "connections": CLIENT_CONNECTIONS,
    })
}

/// Nanoseconds per connect(): no program, program attached but not matching, program steering;
/// plus the kernel's own run time of the connect4 program.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` on while it lives; off again when dropped (also when a section
/// panics), so that no other section's peers pay for the statistics.
struct BpfStats;

impl BpfStats {
    fn enable() -> Self {
        std::fs::write(BPF_STATS, "1").expect("enabling kernel.bpf_stats_enabled");
        BpfStats
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, "0");
    }
}

fn connect_cost(settings: &Settings) -> Value {
    let _stats = BpfStats::enable();
    let rounds = if settings.smoke { 2 } else { 15 };
    let count = if settings.smoke { "300" } else { "2000" };
    let backends = Backends::start();
    let cgroup = Cgroup::new();
    // SOCKSHIFT_BENCH_AGENT: extra `[agent]` keys for experiments (a smaller socket table, say).
    let agent_extra = std::env::var("SOCKSHIFT_BENCH_AGENT").unwrap_or_default();
    let _agent = Agent::start_with(
        &cgroup,
        &agent_extra,
        &format!("[[service]]\nname = \"target\"\nfrontends = [\"{FRONTEND}\"]\nstable = [\"{STABLE}\"]\n"),
    );
    // The floor: connect4 and sock_release programs that return at once, on a cgroup of their
    // own, run by the same client. What the statistics read for them is their own clock reads and
    // the hook's entry, on this machine: under every program figure below.
    let empty_cgroup = Cgroup::new();
    let empty_path = empty_cgroup.path.display().to_string();
    let empty_program = |hook: &str| {
        let mut attached = spawn_probe(
            Placement::default(),
            &["attach-foreign", "--cgroup", &empty_path, "--name", &format!("empty_{hook}"), "--hook", hook],
        );
        let id: u64 = attached.wait_for_line("attached").split(' ').nth(1).and_then(|id| id.parse().ok()).unwrap();
        (attached, id)
    };
    let (empty_connect4, empty_connect4_id) = empty_program("connect4");
    let (empty_release, empty_release_id) = empty_program("sock_release");
    let outside = backends.placement();
    let inside = Placement { netns: Some(&backends.netns), cgroup: Some(&cgroup) };
    let empty = Placement { netns: Some(&backends.netns), cgroup: Some(&empty_cgroup) };
    let configs: [(&str, Placement<'_>, &str); 4] = [
        ("no_program", outside, STABLE),
        ("empty_program", empty, STABLE),
        ("attached_not_matching", inside, STABLE),
        ("steering", inside, FRONTEND),
    ];
    let mut medians: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut kernel: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    // sock_release runs once per socket closed: for the connections that were not steered, it is
    // what closing a socket costs every process in the cgroup.
    let mut release: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    // sock_ops runs several times per TCP connection, steered or not.
    let mut sock_ops: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for round in 0..rounds {
        check_interrupted();
        for i in 0..configs.len() {
            let (name, placement, target) = configs[(i + round) % configs.len()];
            let stats = || match name {
                "empty_program" => (prog_run_stats(empty_connect4_id), prog_run_stats(empty_release_id), (0, 0)),
                _ => (
                    prog_stats(&cgroup, "sock4_connect"),
                    prog_stats(&cgroup, "sock_release"),
                    prog_stats(&cgroup, "sock_health"),
                ),
            };
            let before = stats();
            let report = probe(placement, &["connect-cost", "--target", target, "--count", count]);
            let after = stats();
            let entry = kernel.entry(name).or_default();
            entry.0 += after.0 .0 - before.0 .0;
            entry.1 += after.0 .1 - before.0 .1;
            let entry = release.entry(name).or_default();
            entry.0 += after.1 .0 - before.1 .0;
            entry.1 += after.1 .1 - before.1 .1;
            let entry = sock_ops.entry(name).or_default();
            entry.0 += after.2 .0 - before.2 .0;
            entry.1 += after.2 .1 - before.2 .1;
            medians.entry(name).or_default().push(report["median_ns"].as_f64().unwrap());
        }
    }
    let per_run = |(time, runs): (u64, u64)| if runs > 0 { Some(time as f64 / runs as f64) } else { None };
    let mut out = serde_json::Map::new();
    for (name, mut values) in medians {
        out.insert(
            name.into(),
            json!({
                "connect_ns_median": median(&mut values),
                "kernel_program_ns_per_run": per_run(kernel[name]),
                "kernel_program_runs": kernel[name].1,
                "kernel_release_ns_per_run": per_run(release[name]),
                "kernel_release_runs": release[name].1,
                "kernel_sock_ops_ns_per_run": per_run(sock_ops[name]),
                "kernel_sock_ops_runs": sock_ops[name].1,
            }),
        );
    }
    drop((empty_connect4, empty_release));
    let per_run = |name: &str| out[name]["kernel_program_ns_per_run"].as_f64().unwrap_or(0.0);
    let steering_extra = per_run("steering") - per_run("attached_not_matching");
    let empty_program = per_run("empty_program");
    let empty_release = out["empty_program"]["kernel_release_ns_per_run"].clone();
    out.insert("kernel_steering_extra_ns".into(), json!(steering_extra));
    out.insert("kernel_empty_program_ns".into(), json!(empty_program));
    out.insert("kernel_empty_release_ns".into(), empty_release);
    out.insert("rounds".into(), json!(rounds));
    Value::Object(out)
}

/// (run_time_ns, run_cnt) of the program named `name` attached to `cgroup` (bpf_stats_enabled
/// on): only this agent's, not those of other agents running on the machine.
fn prog_stats(cgroup: &Cgroup, name: &str) -> (u64, u64) {
    let path = cgroup.path.display().to_string();
    let attached = bpftool_json(&["cgroup", "show", &path]);
    let ids: Vec<u64> = attached
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == json!(name))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ids.iter().fold((0, 0), |acc, id| {
        let (time, runs) = prog_run_stats(*id);
        (acc.0 + time, acc.1 + runs)
    })
}

/// (run_time_ns, run_cnt) of the program with this id (bpf_stats_enabled on).
fn prog_run_stats(id: u64) -> (u64, u64) {
    let p = bpftool_json(&["prog", "show", "id", &id.to_string()]);
    (p["run_time_ns"].as_u64().unwrap_or(0), p["run_cnt"].as_u64().unwrap_or(0))
}

/// bpftool's JSON answer to `args` (null if it fails).
fn bpftool_json(args: &[&str]) -> Value {
    std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null)
}

/// Connection rate to one service with 10, 1,000 and 10,000 services installed.
fn scale(settings: &Settings) -> Value {
    let sizes: &[usize] = if settings.smoke { &[10, 100] } else { &[10, 1000, 10000] };
    let mut rows = Vec::new();
    let rounds = if settings.smoke { 1 } else { 2 };
    for round in 0..rounds {
        for (i, &services) in sizes.iter().enumerate() {
            for peer in [Peer::Iptables, Peer::Sockshift] {
                let services = if round % 2 == 1 { sizes[sizes.len() - 1 - i] } else { services };
                println!("  round {}/{rounds} {services:>5} services  {}", round + 1, peer.name());
                let mut run = run_peer(peer, services, false, settings.seconds);
                run["round"] = json!(round);
                rows.push(run);
            }
        }
    }
    // Median over rounds per (peer, size).
    let rate = |peer: &str, n: usize| {
        let mut values: Vec<f64> = rows
            .iter()
            .filter(|r| r["peer"] == json!(peer) && r["services"] == json!(n))
            .filter_map(|r| r["requests_per_second"].as_f64())
            .collect();
        median(&mut values)
    };
    let medians: Vec<Value> = sizes
        .iter()
        .flat_map(|&n| {
            ["iptables", "sockshift"].map(|p| json!({ "peer": p, "services": n, "requests_per_second": rate(p, n) }))
        })
        .collect();
    let (small, large) = (sizes[0], *sizes.last().unwrap());
    json!({
        "runs": rows,
        "medians": medians,
        "rounds": rounds,
        "sockshift_large_vs_small": rate("sockshift", large) / rate("sockshift", small).max(1.0),
        "sockshift_vs_iptables_at_largest": rate("sockshift", large) / rate("iptables", large).max(1.0),
        "largest": large,
    })
}

/// Probe backends that tag each connection `stable` or `canary`, and an agent steering the
/// target service between them. Fields drop in order: agent, servers, cgroup, namespace.
struct TaggedLab {
    agent: Agent,
    _servers: Spawned,
    cgroup: Cgroup,
    netns: NetNs,
}

impl TaggedLab {
    fn start() -> Self {
        let netns = NetNs::new();
        let cgroup = Cgroup::new();
        let servers = serve(
            Placement { netns: Some(&netns), cgroup: None },
            &["serve-tcp", "--listen", &format!("{STABLE}=stable"), "--listen", &format!("{CANARY}=canary")],
        );
        let agent = Agent::start(&cgroup, &format!(
            "[[service]]\nname = \"target\"\nfrontends = [\"{FRONTEND}\"]\nstable = [\"{STABLE}\"]\ncanary = [\"{CANARY}\"]\n"
        ));
        Self { agent, _servers: servers, cgroup, netns }
    }
}

/// Latency from `PUT .../canary` to the datapath obeying, and API requests per second.
fn control_plane(settings: &Settings) -> Value {
    let updates = if settings.smoke { 40 } else { 1000 };
    let lab = TaggedLab::start();
    let (netns, cgroup, agent) = (&lab.netns, &lab.cgroup, &lab.agent);
    // This process joins the steered cgroup for the measurement (its API calls go to a
    // non-frontend address and are untouched), and goes back afterwards.
    let own = own_cgroup();
    std::fs::write(cgroup.path.join("cgroup.procs"), std::process::id().to_string()).expect("join cgroup");
    let netns_path = netns.path();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Instant>();
    let connector = std::thread::spawn(move || {
        let file = std::fs::File::open(&netns_path).unwrap();
        assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }, 0);
        for expected in rx {
            loop {
                let mut stream = TcpStream::connect(FRONTEND).expect("connect");
                let mut tag = [0u8; 6];
                stream.read_exact(&mut tag).expect("tag");
                if tag == expected.as_bytes() {
                    break;
                }
            }
            done_tx.send(Instant::now()).unwrap();
        }
    });
    // The connector starts probing as the request is sent: the latency is from sending the
    // request to the first connection the datapath steers the new way (the agent persists the
    // change, updates the map, then answers).
    let mut latencies = Vec::with_capacity(updates);
    for i in 0..updates {
        check_interrupted();
        let (percent, expected) = if i % 2 == 0 { (100.0, "canary") } else { (0.0, "stable") };
        let started = Instant::now();
        tx.send(expected).unwrap();
        let (status, _) = agent.call("PUT", "/v1/services/target/canary", Some(&json!({ "percent": percent })));
        assert_eq!(status, 200);
        let observed = done_rx.recv().unwrap();
        latencies.push(observed.duration_since(started).as_secs_f64() * 1e6);
    }
    drop(tx);
    connector.join().unwrap();
    if let Some(own) = own {
        let _ = std::fs::write(own.join("cgroup.procs"), std::process::id().to_string());
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];

    let duration = Duration::from_millis(if settings.smoke { 500 } else { 3000 });
    let api = agent.api;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < duration {
                    let r = agent::client::request(api, None, "GET", "/v1/services/target", None).expect("GET");
                    assert_eq!(r.status, 200);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    json!({
        "updates": updates,
        "update_to_effect_p50_us": pct(0.50),
        "update_to_effect_p99_us": pct(0.99),
        "api_requests_per_second": total as f64 / duration.as_secs_f64(),
        "api_clients": 4,
    })
}

/// Cluster mode: from a weight change through one node's API to the last of N nodes applying
/// it, N simulated nodes (an agent process each, with its own cgroup, bpffs directory, state
/// directory and API port) on a 3-member etcd cluster on this machine.
fn cluster(settings: &Settings) -> Value {
    let sizes: &[usize] = if settings.smoke { &[3] } else { &[3, 10] };
    let changes = if settings.smoke { 20 } else { 300 };
    let runs: Vec<Value> = sizes.iter().map(|&nodes| cluster_run(nodes, changes)).collect();
    json!({
        "changes": changes,
        "runs": runs,
        // Documented figures of what users would compare with (not measured here).
        "anchors": {
            "kube_proxy_min_sync_period_ms": 1000,
            "istio_push_debounce_ms": 100,
        },
    })
}

fn cluster_run(nodes: usize, changes: usize) -> Value {
    // Dropped last: the agents leave the cluster while etcd is up.
    let etcd = e2e::etcd::EtcdCluster::start();
    let prefix = format!("/{}", e2e::unique_name("bench"));
    let endpoints = etcd.endpoints().iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    let cgroups: Vec<Cgroup> = (0..nodes).map(|_| Cgroup::new()).collect();
    let agents: Vec<Agent> = cgroups
        .iter()
        .enumerate()
        .map(|(i, cgroup)| {
            check_interrupted();
            Agent::start(
                cgroup,
                &format!("[cluster]\netcd = [{endpoints}]\nnode = \"node-{i}\"\nprefix = \"{prefix}\"\n"),
            )
        })
        .collect();
    let writer = &agents[0];
    let body = json!({ "frontends": [FRONTEND], "stable": [STABLE], "canary": [CANARY], "canary_percent": 0.0 });
    let (status, answer) = writer.call("PUT", "/v1/services/target?wait=cluster", Some(&body));
    assert_eq!(status, 201, "{answer}");
    let set = |percent: f64, wait: bool| {
        let path = if wait { "/v1/services/target/canary?wait=cluster" } else { "/v1/services/target/canary" };
        let started = Instant::now();
        let (status, answer) = writer.call("PUT", path, Some(&json!({ "percent": percent })));
        assert_eq!(status, 200, "{answer}");
        started.elapsed().as_secs_f64() * 1000.0
    };
    for i in 0..10 {
        set(f64::from(i), true);
    }
    // ?wait=cluster answers once the writer has seen every node publish that it applied the
    // change: the figure includes that publication's own round trip through etcd.
    let mut converged: Vec<f64> = (0..changes)
        .map(|i| {
            check_interrupted();
            set((i % 100) as f64 + 0.5, true)
        })
        .collect();
    // The writer's own answer: validated, committed to etcd, applied to its datapath.
    let mut committed: Vec<f64> = (0..changes / 2).map(|i| set((i % 100) as f64 + 0.25, false)).collect();
    for values in [&mut converged, &mut committed] {
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let pct = |values: &[f64], p: f64| values[((values.len() as f64 * p) as usize).min(values.len() - 1)];
    let (status, view) = writer.call("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["nodes"].as_array().map(Vec::len), Some(nodes), "every node is in the cluster view: {view}");
    let run = json!({
        "nodes": nodes,
        "changes": changes,
        "converged_p50_ms": pct(&converged, 0.5),
        "converged_p99_ms": pct(&converged, 0.99),
        "converged_max_ms": converged.last().copied(),
        "committed_p50_ms": pct(&committed, 0.5),
        "committed_p99_ms": pct(&committed, 0.99),
    });
    println!(
        "  {nodes} nodes: last node applied p50 {:.1} ms, p99 {:.1} ms",
        pct(&converged, 0.5),
        pct(&converged, 0.99)
    );
    drop(agents);
    drop(cgroups);
    drop(etcd);
    run
}

/// This process's cgroup v2 directory.
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(agent::paths::cgroup2_root().ok()?.join(rel.trim_start_matches('/')))
}

/// Observed canary share against the target, with a 95 % Wilson interval.
fn split_accuracy(settings: &Settings) -> Value {
    let count: u32 = if settings.smoke { 1000 } else { 20000 };
    let lab = TaggedLab::start();
    let (netns, cgroup, agent) = (&lab.netns, &lab.cgroup, &lab.agent);
    let inside = Placement { netns: Some(netns), cgroup: Some(cgroup) };
    let mut rows = Vec::new();
    for target in [1.0, 5.0, 20.0, 50.0] {
        check_interrupted();
        agent.set_percent("target", target);
        let report = e2e::tcp_connects(inside, FRONTEND, count);
        let n = report.tags_total() as f64;
        let p = report.tag("canary") as f64 / n.max(1.0);
        let z = 1.96;
        let center = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
        rows.push(json!({
            "target_percent": target,
            "connections": n,
            "observed_percent": p * 100.0,
            "ci95_low": (center - half) * 100.0,
            "ci95_high": (center + half) * 100.0,
        }));
    }
    json!(rows)
}

/// Agent RSS and the kernel memory of its maps, at 10 and 10,000 services.
fn footprint(settings: &Settings) -> Value {
    let sizes: &[usize] = if settings.smoke { &[10, 100] } else { &[10, 10000] };
    let mut rows = Vec::new();
    for &services in sizes {
        check_interrupted();
        let cgroup = Cgroup::new();
        let agent = Agent::start(&cgroup, &sockshift_services(services));
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let mut map_bytes = 0u64;
        // The same maps on a 96-CPU node: a per-CPU map holds each entry's value once per
        // possible CPU (bucket arrays and elements are not per CPU), so 96 CPUs add
        // entries × value size × (96 - this machine's CPUs).
        let mut map_bytes_96 = 0f64;
        let cpus = possible_cpus() as f64;
        if let Ok(entries) = std::fs::read_dir(&agent.bpffs) {
            for entry in entries.filter_map(Result::ok).filter(|e| e.path().is_file()) {
                let path = entry.path().display().to_string();
                let info = bpftool_json(&["map", "show", "pinned", &path]);
                let bytes = info["bytes_memlock"].as_u64().unwrap_or(0);
                map_bytes += bytes;
                map_bytes_96 += bytes as f64;
                if info["type"].as_str().is_some_and(|t| t.starts_with("percpu")) {
                    let entries = bpftool_json(&["map", "dump", "pinned", &path]).as_array().map(Vec::len).unwrap_or(0);
                    let value = info["bytes_value"].as_u64().unwrap_or(0).next_multiple_of(8);
                    map_bytes_96 += (entries as u64 * value) as f64 * (96.0 - cpus).max(0.0);
                }
            }
        }
        // The agent's own report (GET /v1/datapath), map by map, which users see.
        let (_, status) = agent.call("GET", "/v1/datapath", None);
        rows.push(json!({
            "services": services,
            "agent_rss_kib": rss_kib,
            "map_memory_bytes": map_bytes,
            "map_memory_bytes_96_cpus": map_bytes_96,
            "api_map_memory_bytes": status["map_memory_bytes"],
            "maps": status["maps"],
        }));
    }
    json!(rows)
}

/// The kernel's possible CPUs (what per-CPU maps are sized by), from
/// /sys/devices/system/cpu/possible ("0-1").
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    text.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => usize::from(!range.is_empty()),
        })
        .sum::<usize>()
        .max(1)
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// The Markdown report and the one-screen summary with the targets.
fn render(r: &Value) -> (String, String) {
    let mut md = String::new();
    let m = &r["machine"];
    md.push_str(&format!(
        "Machine: {}, {} cores, {} memory, kernel {}. Mode: {}.\n\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        r["mode"].as_str().unwrap_or("?")
    ));
    let t = &r["throughput"];
    md.push_str(&format!(
        "## Throughput and latency\n\nThe same client for every peer: one wrk, {} threads with {} connection each ({} in all), {} s per run, {} interleaved rounds, each run in a fresh network namespace; nginx backends. Medians over rounds; ranges are min–max over rounds. Canary share target: {TARGET_PERCENT} %, counted by the two nginx (requests served, connections accepted).\n\n",
        t["threads"],
        t["connections"].as_u64().unwrap_or(0) / t["threads"].as_u64().unwrap_or(1).max(1),
        t["connections"],
        t["seconds"],
        t["rounds"]
    ));
    md.push_str(&format!(
        "`direct` is the floor for a new connection per request: every thread straight to the stable backend, no translation. `direct_split` is the fair floor for keep-alive: the same client with {CANARY_THREADS} of its {CLIENT_THREADS} connections (the weight's share; wrk gives each thread one address, so one connection per thread makes the choice per connection) pointed straight at the canary, no translation, so it drives both backends as the steering peers do; the steering peers' share of connections varies around the weight (a hash per connection). With keep-alive a connection to the less loaded backend completes more requests, so for every peer that splits the canary's share of requests is above its share of connections. With a new connection per request `direct_split`'s threads reconnect each at the pace of their own backend, so its share of connections is not the weight there; the steering peers choose per connection.\n\n"
    ));
    md.push_str("| mode | peer | req/s | ratio to direct (range) | ratio to direct_split (range) | ratio to haproxy | p50 µs | p99 µs | canary % of requests (range) | canary % of connections (range) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for s in t["summary"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} ({}–{}) | {} ({}–{}) | {} | {} | {} | {} ({}–{}) | {} ({}–{}) |\n",
            if s["keepalive"] == json!(true) { "keep-alive" } else { "new conn/request" },
            s["peer"].as_str().unwrap(),
            f(&s["requests_per_second"], 0),
            f(&s["ratio_to_direct"], 3),
            f(&s["ratio_to_direct_min"], 3),
            f(&s["ratio_to_direct_max"], 3),
            f(&s["ratio_to_direct_split"], 3),
            f(&s["ratio_to_direct_split_min"], 3),
            f(&s["ratio_to_direct_split_max"], 3),
            f(&s["ratio_to_haproxy"], 2),
            f(&s["p50_us"], 0),
            f(&s["p99_us"], 0),
            f(&s["canary_percent"], 1),
            f(&s["canary_percent_min"], 1),
            f(&s["canary_percent_max"], 1),
            f(&s["canary_connection_percent"], 1),
            f(&s["canary_connection_percent_min"], 1),
            f(&s["canary_connection_percent_max"], 1),
        ));
    }
    let c = &r["connect_cost"];
    md.push_str(&format!("\n## connect() cost\n\nMedian of per-round medians over {} interleaved rounds; kernel run time from `kernel.bpf_stats_enabled` for `sock4_connect`, for `sock_release` when the socket is closed, and for `sock_health` (sock_ops, several calls per TCP connection). `empty_program` is the floor: connect4 and sock_release programs that return at once, on a cgroup of their own, run by the same client; these statistics read {} and {} ns per run for them on this machine (their own clock reads and the hook's entry), and that is part of every program figure in the table.\n\n| case | connect() ns | connect4 program ns per run | sock_release ns per run | sock_ops ns per run |\n|---|---|---|---|---|\n", c["rounds"], f(&c["kernel_empty_program_ns"], 0), f(&c["kernel_empty_release_ns"], 0)));
    for name in ["no_program", "empty_program", "attached_not_matching", "steering"] {
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            f(&c[name]["connect_ns_median"], 0),
            f(&c[name]["kernel_program_ns_per_run"], 0),
            f(&c[name]["kernel_release_ns_per_run"], 0),
            f(&c[name]["kernel_sock_ops_ns_per_run"], 0)
        ));
    }
    md.push_str(&format!(
        "\nSteering costs {} ns more per connect() than not matching, by the kernel's statistics.\n",
        f(&c["kernel_steering_extra_ns"], 0)
    ));
    let sc = &r["scale"];
    md.push_str(&format!("\n## Scale: new connections per second to one service\n\nThe throughput section's client ({CLIENT_THREADS} threads, {CLIENT_CONNECTIONS} connections), new connection per request, median of {} rounds (sizes run in alternating order). iptables holds the services as kube-proxy does (one KUBE-SERVICES rule each, walked in order; the measured service last).\n\n| services | iptables req/s | sockshift req/s | sockshift / iptables |\n|---|---|---|---|\n", sc["rounds"]));
    let mut sizes: Vec<u64> =
        sc["medians"].as_array().into_iter().flatten().filter_map(|r| r["services"].as_u64()).collect();
    sizes.dedup();
    for n in &sizes {
        let rate = |p: &str| {
            sc["medians"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["peer"] == json!(p) && r["services"] == json!(n))
                .and_then(|r| r["requests_per_second"].as_f64())
                .unwrap_or(0.0)
        };
        md.push_str(&format!(
            "| {n} | {:.0} | {:.0} | {:.2} |\n",
            rate("iptables"),
            rate("sockshift"),
            rate("sockshift") / rate("iptables").max(1.0)
        ));
    }
    let cp = &r["control_plane"];
    md.push_str(&format!(
        "\n## Control plane\n\n{} updates alternating 0 and 100 %: from sending `PUT .../canary` to the first connection that lands on the new side: p50 {} µs, p99 {} µs. API: {} requests/s (`GET /v1/services/NAME`, {} clients).\n",
        cp["updates"], f(&cp["update_to_effect_p50_us"], 0), f(&cp["update_to_effect_p99_us"], 0), f(&cp["api_requests_per_second"], 0), cp["api_clients"]
    ));
    let cl = &r["cluster"];
    md.push_str(&format!(
        "\n## Cluster mode\n\nN agents (one per simulated node: own cgroup, bpffs, state directory, API port) on a 3-member etcd cluster on this machine; {} weight changes through node 0's API. Converged: from sending `PUT .../canary?wait=cluster` to its answer, which comes once every node has published that it applied the change (an upper bound: it includes that publication's round trip through etcd). Committed: the writer's own answer without `wait` (validated, committed to etcd, applied to its datapath). Anchors, documented, not measured here: kube-proxy syncs at most every `minSyncPeriod` (1 s by default); Istio debounces pushes for 100 ms (`PILOT_DEBOUNCE_AFTER`).\n\n| nodes | converged p50 ms | converged p99 ms | max ms | committed p50 ms | committed p99 ms |\n|---|---|---|---|---|---|\n",
        cl["changes"]
    ));
    for run in cl["runs"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            run["nodes"],
            f(&run["converged_p50_ms"], 1),
            f(&run["converged_p99_ms"], 1),
            f(&run["converged_max_ms"], 1),
            f(&run["committed_p50_ms"], 1),
            f(&run["committed_p99_ms"], 1),
        ));
    }
    md.push_str("\n## Split accuracy\n\n| target % | connections | observed % | 95 % interval |\n|---|---|---|---|\n");
    for row in r["split_accuracy"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {}–{} |\n",
            row["target_percent"],
            row["connections"],
            f(&row["observed_percent"], 2),
            f(&row["ci95_low"], 2),
            f(&row["ci95_high"], 2)
        ));
    }
    md.push_str("\n## Footprint\n\nMap memory as the kernel charges it (`bytes_memlock`) on this machine, and computed for a 96-CPU node (a per-CPU map's entries hold their value once per CPU: entries × value size × the extra CPUs added).\n\n| services | agent RSS MiB | map memory MiB | map memory MiB at 96 CPUs |\n|---|---|---|---|\n");
    for row in r["footprint"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} |\n",
            row["services"],
            row["agent_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            row["map_memory_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            row["map_memory_bytes_96_cpus"].as_f64().unwrap_or(0.0) / 1048576.0
        ));
    }
    if let Some(largest) = r["footprint"].as_array().and_then(|rows| rows.last()) {
        md.push_str(&format!(
            "\nBy map at {} services, as the agent reports it (`GET /v1/datapath`, `maps`):\n\n| map | type | max entries | MiB |\n|---|---|---|---|\n",
            largest["services"]
        ));
        for map in largest["maps"].as_array().into_iter().flatten() {
            md.push_str(&format!(
                "| {} | {} | {} | {:.2} |\n",
                map["name"].as_str().unwrap_or("?"),
                map["map_type"],
                map["max_entries"],
                map["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
            ));
        }
    }

    // Targets.
    let summary_of = |peer: &str, keepalive: bool| {
        t["summary"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["peer"] == json!(peer) && s["keepalive"] == json!(keepalive))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let largest_footprint = r["footprint"].as_array().and_then(|rows| rows.last()).cloned().unwrap_or(Value::Null);
    let new_conn = summary_of("sockshift", false);
    let keep = summary_of("sockshift", true);
    let check = |ok: bool| if ok { "met   " } else { "MISSED" };
    let targets = [
        (
            format!("new connection/request: sockshift {} of direct (≥ 0.97)", f(&new_conn["ratio_to_direct"], 3)),
            new_conn["ratio_to_direct"].as_f64().unwrap_or(0.0) >= 0.97,
        ),
        (
            format!("new connection/request: sockshift {} × haproxy (≥ 1.8)", f(&new_conn["ratio_to_haproxy"], 2)),
            new_conn["ratio_to_haproxy"].as_f64().unwrap_or(0.0) >= 1.8,
        ),
        (
            format!(
                "keep-alive: sockshift {} of the fair floor, direct_split (≥ 0.99)",
                f(&keep["ratio_to_direct_split"], 3)
            ),
            keep["ratio_to_direct_split"].as_f64().unwrap_or(0.0) >= 0.99,
        ),
        (
            format!(
                "{} services: sockshift at {} of its rate at {} (≥ 0.90)",
                sc["largest"],
                f(&sc["sockshift_large_vs_small"], 3),
                sizes.first().unwrap_or(&0)
            ),
            sc["sockshift_large_vs_small"].as_f64().unwrap_or(0.0) >= 0.9,
        ),
        (
            format!(
                "{} services: sockshift {} × iptables (≥ 4)",
                sc["largest"],
                f(&sc["sockshift_vs_iptables_at_largest"], 2)
            ),
            sc["sockshift_vs_iptables_at_largest"].as_f64().unwrap_or(0.0) >= 4.0,
        ),
        (
            format!("steered connect() costs {} ns more than unsteered (≤ 150)", f(&c["kernel_steering_extra_ns"], 0)),
            c["kernel_steering_extra_ns"].as_f64().unwrap_or(f64::MAX) <= 150.0,
        ),
        (
            format!(
                "closing an unsteered socket costs {} ns in sock_release (≤ 60; an empty program there reads {} ns \
                 here)",
                f(&c["attached_not_matching"]["kernel_release_ns_per_run"], 0),
                f(&c["kernel_empty_release_ns"], 0)
            ),
            c["attached_not_matching"]["kernel_release_ns_per_run"].as_f64().unwrap_or(f64::MAX) <= 60.0,
        ),
        (
            format!(
                "map memory at {} services on 96 CPUs {} MiB (≤ 64)",
                largest_footprint["services"],
                f(&json!(largest_footprint["map_memory_bytes_96_cpus"].as_f64().unwrap_or(0.0) / 1048576.0), 1)
            ),
            largest_footprint["map_memory_bytes_96_cpus"].as_f64().unwrap_or(f64::MAX) <= 64.0 * 1048576.0,
        ),
        (
            format!("API request to effect p99 {} µs (< 2000)", f(&cp["update_to_effect_p99_us"], 0)),
            cp["update_to_effect_p99_us"].as_f64().unwrap_or(f64::MAX) < 2000.0,
        ),
    ];
    let mut targets = targets.to_vec();
    let largest_cluster =
        cl["runs"].as_array().into_iter().flatten().max_by_key(|run| run["nodes"].as_u64().unwrap_or(0)).cloned();
    if let Some(run) = largest_cluster {
        targets.push((
            format!(
                "cluster: weight change to the last of {} nodes p99 {} ms (< 50 at 10 nodes)",
                run["nodes"],
                f(&run["converged_p99_ms"], 1)
            ),
            run["converged_p99_ms"].as_f64().unwrap_or(f64::MAX) < 50.0,
        ));
    }
    let mut summary = String::from("sockshift benchmark summary (ratios from interleaved rounds of this run)\n");
    md.push_str("\n## Targets\n\n| target | result |\n|---|---|\n");
    for (text, ok) in &targets {
        summary.push_str(&format!("  [{}] {text}\n", check(*ok).trim()));
        md.push_str(&format!("| {text} | {} |\n", if *ok { "met" } else { "**missed**" }));
    }
    (md, summary)
}

/// plot.png from results.json with matplotlib (installed by `cargo xtask bench`).
fn plot(out: &Path) {
    let script = r#"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
r = json.load(open(sys.argv[1] + "/results.json"))
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
peers = ["direct", "direct_split", "iptables", "haproxy", "sockshift"]
for i, keepalive in enumerate([False, True]):
    vals = [next(s["ratio_to_direct"] for s in r["throughput"]["summary"] if s["peer"] == p and s["keepalive"] == keepalive) for p in peers]
    axes[0].bar([x + i * 0.4 for x in range(len(peers))], vals, width=0.4, label="keep-alive" if keepalive else "new connection per request")
axes[0].set_xticks([x + 0.2 for x in range(len(peers))]); axes[0].set_xticklabels(peers)
axes[0].axhline(1.0, color="grey", linewidth=0.8); axes[0].set_ylabel("requests/s relative to direct"); axes[0].legend(); axes[0].set_title("Throughput (median of rounds)")
runs = r["scale"]["medians"]
for peer in ["iptables", "sockshift"]:
    pts = sorted((x["services"], x["requests_per_second"]) for x in runs if x["peer"] == peer)
    axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer)
axes[1].set_xscale("log"); axes[1].set_xlabel("services installed"); axes[1].set_ylabel("new connections/s to one service"); axes[1].legend(); axes[1].set_title("Scale")
fig.tight_layout(); fig.savefig(sys.argv[1] + "/plot.png", dpi=110)
"#;
    let status = std::process::Command::new("python3").args(["-c", script]).arg(out).status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("plot.png not written (python3 with matplotlib is needed)");
    }
}
