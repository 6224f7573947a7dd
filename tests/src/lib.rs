//! Harness for the end-to-end tests: RAII guards for the network namespace, cgroup, agent and
//! helper processes a test creates, so that everything is cleaned up even when a test panics.
//!
//! All test traffic stays on loopback inside namespaces the test creates: frontends are
//! 127.1.0.0/16 or fd00:5eed::/64 addresses that nothing listens on, backends listen on
//! 127.0.0.1 / ::1 inside the namespace.

use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod kube_double;
pub mod prometheus;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, for namespaces, cgroups and pin directories.
pub fn unique_name(kind: &str) -> String {
    format!("ss-{kind}-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// These tests load eBPF programs and create namespaces: they need root. Not being root is a
/// failure, not a skip, so that CI can never pass without running them.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (run `cargo xtask test`, which CI runs as root)"
    );
}

/// A binary built next to the test executable (target/<profile>/NAME).
pub fn built_binary(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|dir| dir.join(name)).collect();
    candidates
        .iter()
        .find(|path| path.exists())
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not built next to {}: run `cargo xtask test`", exe.display()))
}

pub fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd).args(args).status().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?} failed: {status}");
}

/// A network namespace with loopback up, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Self {
        let name = unique_name("ns");
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A cgroup v2 directory, removed (after killing what is left in it) on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let root = agent::paths::cgroup2_root().expect("cgroup v2 mount");
        Self::under(&root)
    }

    /// A child cgroup of `parent`.
    pub fn under(parent: &Path) -> Self {
        let path = parent.join(unique_name("cg"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn id(&self) -> u64 {
        agent::paths::cgroup_id(&self.path).expect("cgroup id")
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where a spawned process runs.
#[derive(Default, Clone, Copy)]
pub struct Placement<'a> {
    pub netns: Option<&'a NetNs>,
    pub cgroup: Option<&'a Cgroup>,
}

/// A child process killed on drop.
pub struct Spawned {
    pub child: Child,
    pub stdout: Option<BufReader<ChildStdout>>,
}

impl Spawned {
    /// Reads stdout lines until one starts with `prefix`.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        let stdout = self.stdout.as_mut().expect("stdout piped");
        loop {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).expect("read child stdout");
            assert!(n > 0, "child exited before printing {prefix:?}");
            if line.starts_with(prefix) {
                return line.trim_end().to_string();
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prepares `cmd` to join the cgroup (first, while /sys is still the host's) and then the
/// network namespace, between fork and exec.
pub fn place(cmd: &mut Command, placement: Placement<'_>) {
    let procs = placement
        .cgroup
        .map(|c| CString::new(c.path.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap());
    let netns = placement.netns.map(|ns| std::fs::File::open(ns.path()).expect("open netns"));
    unsafe {
        cmd.pre_exec(move || {
            // Only async-signal-safe calls here: open/write/close/setns.
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            if let Some(file) = &netns {
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(file), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Starts the probe with `args` in `placement`.
pub fn spawn_probe(placement: Placement<'_>, args: &[&str]) -> Spawned {
    spawn_in(placement, &built_binary("sockshift-probe"), args)
}

/// Starts any program in `placement`, with stdin and stdout piped.
pub fn spawn_in(placement: Placement<'_>, program: &Path, args: &[&str]) -> Spawned {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
    place(&mut cmd, placement);
    let mut child = cmd.spawn().expect("spawn probe");
    let stdout = child.stdout.take().map(BufReader::new);
    Spawned { child, stdout }
}

/// Starts probe servers and waits until they listen.
pub fn serve(placement: Placement<'_>, args: &[&str]) -> Spawned {
    let mut server = spawn_probe(placement, args);
    server.wait_for_line("ready");
    server
}

/// Runs a probe client to completion and returns its JSON report.
pub fn probe(placement: Placement<'_>, args: &[&str]) -> Value {
    let mut cmd = Command::new(built_binary("sockshift-probe"));
    cmd.args(args);
    place(&mut cmd, placement);
    let output = cmd.output().expect("run probe");
    assert!(output.status.success(), "probe {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("probe output {:?}: {e}", String::from_utf8_lossy(&output.stdout)))
}

/// What a TCP probe run saw.
#[derive(Debug)]
pub struct TcpReport {
    pub raw: Value,
}

impl TcpReport {
    pub fn tag(&self, tag: &str) -> u64 {
        self.raw["tags"][tag].as_u64().unwrap_or(0)
    }
    pub fn tags_total(&self) -> u64 {
        self.raw["tags"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    }
    pub fn errors_total(&self) -> u64 {
        self.raw["errors"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    }
    pub fn error(&self, kind: &str) -> u64 {
        self.raw["errors"][kind].as_u64().unwrap_or(0)
    }
    pub fn reset_after_tag(&self) -> u64 {
        self.raw["reset_after_tag"].as_u64().unwrap_or(0)
    }
    pub fn peer_is_target(&self) -> u64 {
        self.raw["peer_is_target"].as_u64().unwrap_or(0)
    }
    /// Share of connections whose tag starts with `prefix`, in percent.
    /// Hits of every tag that starts with `prefix` (`canary` counts `canary` and `canary6`).
    pub fn hits(&self, prefix: &str) -> u64 {
        self.raw["tags"]
            .as_object()
            .map_or(0, |m| m.iter().filter(|(k, _)| k.starts_with(prefix)).filter_map(|(_, v)| v.as_u64()).sum())
    }
    pub fn share(&self, prefix: &str) -> f64 {
        let hits: u64 = self.raw["tags"]
            .as_object()
            .map_or(0, |m| m.iter().filter(|(k, _)| k.starts_with(prefix)).filter_map(|(_, v)| v.as_u64()).sum());
        hits as f64 * 100.0 / self.tags_total().max(1) as f64
    }
}

/// Asserts that `canary` of `total` connections is what a canary weight of `percent` gives.
///
/// Each connection's side is an independent hash draw, so the canary count is binomial. The bound
/// is 5 standard deviations plus one connection for rounding: a correct datapath fails it about
/// once in 1.7 million checks (a fixed 3-sigma bound failed a CI run among the suite's ~30 share
/// checks), while a wrong weight still fails it (at 1000 connections and 60 % the bound is 7.8
/// points; the checks compare weights further apart than that).
pub fn assert_canary_share(what: &str, canary: u64, total: u64, percent: f64) {
    assert!(total > 0, "{what}: no connection reached a backend");
    let p = percent / 100.0;
    let n = total as f64;
    let tolerance = 500.0 * (p * (1.0 - p) / n).sqrt() + 100.0 / n;
    let share = canary as f64 * 100.0 / n;
    assert!(
        (share - percent).abs() <= tolerance,
        "{what}: canary share {share:.2} % of {total} connections, wanted {percent} ± {tolerance:.2} (5 sigma)"
    );
}

/// `count` sequential TCP connections to `target`.
pub fn tcp_connects(placement: Placement<'_>, target: &str, count: u32) -> TcpReport {
    TcpReport { raw: probe(placement, &["tcp", "--target", target, "--count", &count.to_string()]) }
}

/// A free TCP port on the host's loopback (for the agent's API, etcd members, ...), never one
/// this process handed out before: the kernel may give a port just released by a probe to the
/// next probe, and two members of one etcd cluster were once handed the same peer port.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A running `sockshift agent` with its own cgroup attachment, API port and pin directory.
pub struct Agent {
    pub api: SocketAddr,
    pub config_path: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    /// Sent as the bearer token with `call`.
    pub token: Option<String>,
    /// Extra environment of the agent process.
    pub env: Vec<(String, String)>,
    process: Option<Child>,
    pub log_path: PathBuf,
}

impl Agent {
    /// Writes a config (the `[agent]` section is generated; `services` is TOML for the
    /// `[[service]]` tables) and starts the agent, waiting until its API answers.
    pub fn start(cgroup: &Cgroup, services: &str) -> Self {
        Self::start_with(cgroup, "", services)
    }

    /// Like `start`, with `agent_extra` added to the `[agent]` section (e.g. auth tables).
    pub fn start_with(cgroup: &Cgroup, agent_extra: &str, services: &str) -> Self {
        let mut agent = Self::configure(cgroup, agent_extra, services);
        agent.spawn();
        agent
    }

    /// Writes the config like `start_with` but does not start the agent (`spawn` does), so a
    /// test can prepare its directories or environment first.
    pub fn configure(cgroup: &Cgroup, agent_extra: &str, services: &str) -> Self {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let name = unique_name("agent");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
        let config_path = dir.join("sockshift.toml");
        let state_dir = dir.join("state");
        let config = format!(
            "[agent]\ncgroup = {:?}\napi = \"{api}\"\nbpffs = {:?}\nstate_dir = {:?}\n{agent_extra}\n\n{services}",
            cgroup.path.display().to_string(),
            bpffs.display().to_string(),
            state_dir.display().to_string(),
        );
        std::fs::write(&config_path, config).unwrap();
        Self {
            api,
            config_path,
            bpffs,
            state_dir,
            token: None,
            env: Vec::new(),
            process: None,
            log_path: dir.join("agent.log"),
        }
    }

    /// Starts the agent process on the existing config and waits for /healthz to answer 200.
    pub fn spawn(&mut self) {
        self.spawn_until(None, |status| status == 200);
    }

    /// Like `spawn`, with the agent process written to `procs` (a `cgroup.procs` file, v1 or
    /// v2) before it runs: to start it under a CPU limit, say.
    pub fn spawn_joining(&mut self, procs: Option<&Path>) {
        self.spawn_until(procs, |status| status == 200);
    }

    /// Starts the agent process and waits until /healthz answers at all (200 or 503): for tests
    /// whose agent is meant to fail its health check from the start.
    pub fn spawn_answering(&mut self) {
        self.spawn_until(None, |status| status == 200 || status == 503);
    }

    fn spawn_until(&mut self, procs: Option<&Path>, up: impl Fn(u16) -> bool) {
        let log = std::fs::File::create(&self.log_path).unwrap();
        let mut command = Command::new(built_binary("sockshift"));
        command
            .args(["agent", "--config"])
            .arg(&self.config_path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(procs) = procs {
            let procs = CString::new(procs.as_os_str().as_encoded_bytes()).unwrap();
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("spawn sockshift agent");
        self.process = Some(child);
        // Generous: 65,536 services take a debug build half a minute to install on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(if procs.is_some() { 120 } else { 60 });
        while Instant::now() < deadline {
            if let Ok(r) = agent::client::request(self.api, None, "GET", "/healthz", None) {
                if up(r.status) {
                    return;
                }
            }
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent API did not come up: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").id()
    }

    /// Sends a signal and waits for the process to end.
    pub fn stop_with(&mut self, signal: libc::c_int) {
        if let Some(mut child) = self.process.take() {
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    /// An API call: (status, JSON body).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.call_as(self.token.as_deref(), method, path, body)
    }

    /// An API call with a given bearer token (or none).
    pub fn call_as(&self, token: Option<&str>, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let r = agent::client::request(self.api, token, method, path, body).expect("API request");
        (r.status, r.body)
    }

    /// An API call with a raw body.
    pub fn call_raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let r = agent::client::ApiClient::new(self.api, self.token.clone())
            .raw(method, path, Some(body))
            .expect("API request");
        (r.status, r.body)
    }

    pub fn set_percent(&self, service: &str, percent: f64) {
        let (status, body) = self.call(
            "PUT",
            &format!("/v1/services/{service}/canary"),
            Some(&serde_json::json!({ "percent": percent })),
        );
        assert_eq!(status, 200, "setting {service} to {percent} %: {body}");
    }

    pub fn service(&self, service: &str) -> Value {
        let (status, body) = self.call("GET", &format!("/v1/services/{service}"), None);
        assert_eq!(status, 200, "GET {service}: {body}");
        body
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        if let Some(dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
pub mod etcd;

/// A config `text` (a manifest's ConfigMap) with every `token_file` moved to a stand-in file holding a distinct token, mode 0400.
pub fn with_stand_in_token_files(text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sockshift-manifest-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        match line.trim().strip_prefix("token_file = ") {
            Some(path) => {
                let name =
                    std::path::Path::new(path.trim_matches('"')).file_name().unwrap().to_string_lossy().into_owned();
                let file = dir.join(&name);
                let _ = std::fs::remove_file(&file);
                std::fs::write(&file, format!("stand-in-token-{i:04}-for-{name}\n")).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
                out.push_str(&format!("token_file = {:?}\n", file.display().to_string()));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
