//! The DaemonSet for real: the pod template and ConfigMap of config/daemonset.yaml, parsed from
//! the manifest, run by `podman kube play` with the image `cargo xtask image` built, against the
//! real kernel. Needs root, podman (runc, catatonit) and the image: `cargo xtask test` installs and
//! builds them, writes the podman configuration (CONTAINERS_CONF) and names the image
//! (SOCKSHIFT_IMAGE); without them these tests fail, they never skip.
//!
//! What the test changes, all of it node-specific:
//! - the image: the one just built, by its per-build name;
//! - `agent.cgroup` in the ConfigMap's TOML: a test cgroup, instead of the node's whole cgroup tree;
//! - the host paths behind the agent's pin directory and state directory: a bpffs mounted in a
//!   test directory and a directory beside it, instead of the node's /sys/fs/bpf and
//!   /var/lib/sockshift (the container paths and the config's paths stay as written);
//! - the Secret sockshift-tokens (never shipped in the manifest): a directory of token files the
//!   test writes, mode 0400 as the Secret volume's defaultMode makes them, mounted where the
//!   Secret volume would be; `sockshift` commands in the pod use the release token's file;
//! - how this node's runtime applies `seccompProfile: RuntimeDefault`. podman and CRI-O take
//!   theirs from containers-common, which lets bpf() through only with CAP_SYS_ADMIN; containerd
//!   (since 1.7) and Docker (since 23.0) also let it through with CAP_BPF, and perf_event_open() with
//!   CAP_PERFMON. The manifest asks for CAP_BPF, not CAP_SYS_ADMIN, so the test gives the pod the
//!   containers-common profile with those two rules added (a pod annotation: `podman kube play`
//!   ignores containers.conf's seccomp_profile). `seccomp_that_refuses_bpf_is_named_at_start`
//!   runs the pod under podman's own RuntimeDefault and shows what a CRI-O node would do.
//!
//! - the Kubernetes API server: the ConfigMap's service is named by Kubernetes Services, so the
//!   test serves them (a ClusterIP routed nowhere, ready endpoints on the test's probe servers)
//!   from the API-server double of tests/src/kube_double.rs, which speaks the real wire protocol
//!   but is NOT a live cluster. podman mounts no ServiceAccount token, so the pod reaches the
//!   double through `KUBECONFIG` (a kubeconfig added to the ConfigMap) instead of in-cluster
//!   credentials.
//!
//! The kubelet's part is played by the test: podman turns probes into healthchecks that need
//! curl in the image and systemd timers on the node, so the test sends the probes' own HTTP GET
//! (host, port, path, scheme, timeout from the manifest) from the node's network namespace, which
//! with hostNetwork is the pod's. The API port is the manifest's own (9477, on the node's
//! loopback): every test here holds a machine-wide lock while its pod runs, and fails naming the
//! holder if something else listens there.
//!
//! Each check is a function taking the manifest's path, so a second manifest (cluster mode) runs
//! the same way. Test traffic stays inside a network namespace the test creates.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use agent::config::Config;
use e2e::{
    assert_canary_share,
    kube_double::{self, KubeDouble},
    probe, require_root, run, serve, unique_name, Cgroup, NetNs, Placement, TcpReport,
};
use serde::Deserialize;
use serde_norway::{Mapping, Value};

/// The ConfigMap key the agent's command reads.
const CONFIG_KEY: &str = "sockshift.toml";
/// The ConfigMap keys the test adds: the kubeconfig of the API-server double (see the module
/// docs), and the CA it names.
const KUBECONFIG_KEY: &str = "kubeconfig";
const KUBECONFIG_CA_KEY: &str = "kubeconfig-ca.crt";
/// Every pod these tests play is named with this prefix (leftovers of a killed run are removed).
const POD_PREFIX: &str = "sockshift-e2e-";
/// Serializes the pods of every run on this machine: they all serve the manifest's API port.
const LOCK_FILE: &str = "/run/sockshift-e2e-daemonset.lock";
/// Seccomp profile file (under the test's profile root) standing in for RuntimeDefault.
const RUNTIME_DEFAULT_PROFILE: &str = "runtime-default.json";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").join(relative)
}

fn daemonset_manifest() -> PathBuf {
    repo_path("config/daemonset.yaml")
}

fn cluster_manifest() -> PathBuf {
    repo_path("config/daemonset-cluster.yaml")
}

// ---- the manifest ------------------------------------------------------------------------------

/// What the test takes from a manifest: the DaemonSet's pod template and the ConfigMap its pod
/// mounts.
struct Manifest {
    path: PathBuf,
    template: Value,
    config_map: Value,
    config_text: String,
    config: Config,
    /// Container path of the `release` token's file (`[agent.auth]`), for `sockshift` commands.
    release_token_file: Option<String>,
}

/// The token files `[agent.auth]` names, by file name, with a distinct token each.
fn token_files(config_text: &str) -> Vec<(String, String)> {
    config_text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("token_file = "))
        .enumerate()
        .map(|(i, path)| {
            (path.trim_matches('"').to_owned(), format!("daemonset-test-token-{i:02}-{}", std::process::id()))
        })
        .collect()
}

impl Manifest {
    /// The `release` token the test gives the Secret (see `token_files`), for API calls from
    /// the host; `None` when the ConfigMap has no `[agent.auth]`.
    fn release_token(&self) -> Option<String> {
        let file = self.release_token_file.as_ref()?;
        token_files(&self.config_text).into_iter().find(|(path, _)| path == file).map(|(_, token)| token)
    }

    fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).unwrap_or_else(|err| panic!("{}: {err}", path.display())))
            .filter(|doc| !doc.is_null())
            .collect();
        let daemonsets: Vec<&Value> = docs.iter().filter(|d| d["kind"].as_str() == Some("DaemonSet")).collect();
        assert_eq!(daemonsets.len(), 1, "{} must hold exactly one DaemonSet", path.display());
        let template = daemonsets[0]["spec"]["template"].clone();
        let config_name = seq(&template["spec"]["volumes"])
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap_or_else(|| panic!("{}: the pod template mounts no ConfigMap", path.display()))
            .to_owned();
        let config_map = docs
            .iter()
            .find(|d| d["kind"].as_str() == Some("ConfigMap") && d["metadata"]["name"].as_str() == Some(&config_name))
            .unwrap_or_else(|| panic!("{}: no ConfigMap {config_name:?} for the pod's volume", path.display()))
            .clone();
        let config_text = config_map["data"][CONFIG_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {config_name} has no data.{CONFIG_KEY}"))
            .to_owned();
        // The token files are the Secret's: parse with stand-ins (see `Node::tokens`).
        let stand_ins = std::env::temp_dir().join(unique_name("ds-config-tokens"));
        std::fs::create_dir_all(&stand_ins).unwrap();
        let mut parsed_text = config_text.clone();
        for (file, token) in token_files(&config_text) {
            let stand_in = stand_ins.join(Path::new(&file).file_name().unwrap());
            write_token(&stand_in, &token);
            parsed_text = parsed_text.replace(&format!("{file:?}"), &format!("{:?}", stand_in.display().to_string()));
        }
        let config = Config::parse(&parsed_text).unwrap_or_else(|err| panic!("the ConfigMap's {CONFIG_KEY}: {err}"));
        let _ = std::fs::remove_dir_all(&stand_ins);
        let table: toml::Table = toml::from_str(&config_text).expect("the ConfigMap's TOML");
        let release_token_file = table["agent"].get("auth").and_then(|auth| {
            auth["tokens"].as_array()?.iter().find(|t| t["role"].as_str() == Some("release"))?["token_file"]
                .as_str()
                .map(String::from)
        });
        let manifest = Self { path: path.to_owned(), template, config_map, config_text, config, release_token_file };
        assert_eq!(seq(&manifest.template["spec"]["containers"]).len(), 1, "the pod runs one container");
        manifest
    }

    fn container(&self) -> &Value {
        &self.template["spec"]["containers"][0]
    }

    fn container_name(&self) -> &str {
        self.container()["name"].as_str().expect("the container has a name")
    }

    /// `securityContext.capabilities.add`, as `CAP_`-prefixed names.
    fn capabilities(&self) -> BTreeSet<String> {
        let security = &self.container()["securityContext"]["capabilities"];
        let dropped: Vec<&str> = seq(&security["drop"]).iter().filter_map(Value::as_str).collect();
        assert_eq!(dropped, ["ALL"], "{}: capabilities.drop must be [ALL]", self.path.display());
        seq(&security["add"]).iter().map(|c| format!("CAP_{}", c.as_str().expect("capability names"))).collect()
    }

    fn probe(&self, which: &str) -> HttpProbe {
        HttpProbe::from_manifest(&self.container()[which], which)
    }

    /// Where the container mounts the ConfigMap.
    fn config_mount_path(&self) -> PathBuf {
        let volume = seq(&self.template["spec"]["volumes"])
            .iter()
            .find(|v| v["configMap"]["name"].as_str() == self.config_map["metadata"]["name"].as_str())
            .and_then(|v| v["name"].as_str())
            .expect("the ConfigMap's volume");
        let mount = seq(&self.container()["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("volume {volume} (the ConfigMap) is not mounted"));
        PathBuf::from(mount)
    }

    /// The name of the hostPath volume mounted above `container_path` (the innermost one).
    fn host_volume_above(&self, container_path: &Path) -> String {
        let mount = seq(&self.container()["volumeMounts"])
            .iter()
            .filter(|m| container_path.starts_with(m["mountPath"].as_str().unwrap_or("\0")))
            .max_by_key(|m| m["mountPath"].as_str().unwrap_or("").len())
            .unwrap_or_else(|| panic!("no volume is mounted above {}", container_path.display()));
        let name = mount["name"].as_str().expect("volumeMount name").to_owned();
        let volume = seq(&self.template["spec"]["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(&name))
            .unwrap_or_else(|| panic!("volume {name} is mounted but not declared"));
        assert!(
            volume["hostPath"]["path"].is_string(),
            "volume {name} (above {}) is not a hostPath",
            container_path.display()
        );
        name
    }
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn mapping(value: &mut Value) -> &mut Mapping {
    if !value.is_mapping() {
        *value = Value::Mapping(Mapping::new());
    }
    value.as_mapping_mut().unwrap()
}

// ---- the node ----------------------------------------------------------------------------------

/// What stands for a node: the image, a test cgroup, a test directory with a bpffs for the pins,
/// a state directory and the seccomp profile root, and the cluster's API server (the double).
/// Dropping it removes the pods and the bpffs (which detaches what the agent pinned there) and
/// the directory.
struct Node {
    image: String,
    /// The API server the pod's Kubernetes discovery talks to.
    cluster: KubeDouble,
    /// A CA certificate (PEM) for the pod's kubeconfig. kube-rs builds its TLS configuration
    /// even for a plain-HTTP server like the double's: from the kubeconfig's CA, else from the
    /// system's roots, and the image has none (in a cluster the ServiceAccount's ca.crt is the
    /// CA). It is never used to verify anything.
    kubeconfig_ca: String,
    cgroup: Cgroup,
    dir: PathBuf,
    bpffs: PathBuf,
    /// A directory on no bpffs (see `Variant::no_bpffs`).
    plain_dir: PathBuf,
    state: PathBuf,
    /// Stands in for the Secret sockshift-tokens: the token files, mode 0400.
    tokens: PathBuf,
    seccomp_root: PathBuf,
    pods: Mutex<Vec<String>>,
    _lock: MachineLock,
}

impl Node {
    fn new() -> Self {
        require_root();
        let lock = MachineLock::take();
        let image = std::env::var("SOCKSHIFT_IMAGE").unwrap_or_else(|_| {
            panic!("SOCKSHIFT_IMAGE is not set: run `cargo xtask test`, which builds the image (cargo xtask image)")
        });
        let dir = std::env::temp_dir().join(unique_name("ds"));
        let bpffs = dir.join("bpffs");
        let state = dir.join("state");
        let seccomp_root = dir.join("seccomp");
        let plain_dir = dir.join("not-bpffs");
        let tokens = dir.join("tokens");
        for path in [&bpffs, &state, &seccomp_root, &plain_dir, &tokens] {
            std::fs::create_dir_all(path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        }
        run("mount", &["-t", "bpf", "bpf", &bpffs.to_string_lossy()]);
        let stock = std::fs::read_to_string("/usr/share/containers/seccomp.json")
            .expect("containers-common's /usr/share/containers/seccomp.json (installed with podman)");
        let profile = runtime_default_like_containerd(&serde_json::from_str(&stock).expect("seccomp.json is JSON"));
        std::fs::write(seccomp_root.join(RUNTIME_DEFAULT_PROFILE), serde_json::to_string_pretty(&profile).unwrap())
            .expect("writing the seccomp profile");
        let cluster = KubeDouble::start();
        let ca = rcgen::generate_simple_self_signed(vec!["kube-double".to_string()]).expect("a CA certificate");
        Self {
            image,
            cluster,
            kubeconfig_ca: ca.cert.pem(),
            cgroup: Cgroup::new(),
            dir,
            bpffs,
            plain_dir,
            state,
            tokens,
            seccomp_root,
            pods: Mutex::new(Vec::new()),
            _lock: lock,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for pod in self.pods.lock().unwrap().drain(..) {
            let _ = remove_pod(&pod);
        }
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a token file as the Secret volume would: root's, mode 0400.
fn write_token(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::write(path, token).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
}

/// containers-common's seccomp profile (podman's and CRI-O's RuntimeDefault) with bpf() also
/// allowed to CAP_BPF and perf_event_open() to CAP_PERFMON, as containerd's and Docker's default
/// profiles allow them. Panics if the stock profile no longer has the rules this rewrites.
fn runtime_default_like_containerd(stock: &serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let mut profile = stock.clone();
    let rules = profile["syscalls"].as_array_mut().expect("seccomp.json has syscalls");
    let mut rewritten = Vec::new();
    let mut found = (false, false);
    for rule in rules.drain(..) {
        let names: Vec<&str> = rule["names"].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect();
        let gated = |key: &str| rule[key]["caps"] == json!(["CAP_SYS_ADMIN"]);
        if !names.contains(&"bpf") || !(gated("includes") || gated("excludes")) {
            rewritten.push(rule);
            continue;
        }
        let mut rest = rule.clone();
        rest["names"] = json!(names.iter().filter(|n| **n != "bpf" && **n != "perf_event_open").collect::<Vec<_>>());
        rewritten.push(rest);
        for (syscall, capability) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
            let mut one = rule.clone();
            one["names"] = json!([syscall]);
            if gated("includes") {
                // Allowed with CAP_SYS_ADMIN, as before, or with the narrower capability.
                found.0 = true;
                rewritten.push(one.clone());
                one["includes"]["caps"] = json!([capability]);
            } else {
                // Refused only to a process holding neither.
                found.1 = true;
                one["excludes"]["caps"] = json!(["CAP_SYS_ADMIN", capability]);
            }
            rewritten.push(one);
        }
    }
    *rules = rewritten;
    assert!(found.0 && found.1, "containers-common's seccomp.json no longer gates bpf() on CAP_SYS_ADMIN as expected");
    profile
}

/// A machine-wide lock held while a test's pods run (`flock`, released when the process ends).
struct MachineLock {
    _held: std::fs::File,
}

impl MachineLock {
    fn take() -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|err| panic!("opening {LOCK_FILE}: {err}"));
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {LOCK_FILE}: {}", std::io::Error::last_os_error());
        // With the lock held no other run's pod is alive: whatever carries the prefix is left
        // over from a run that was killed.
        let pods = podman_ok(&["pod", "ls", "--format", "{{.Name}}"]);
        for pod in pods.lines().filter(|p| p.starts_with(POD_PREFIX)) {
            let _ = remove_pod(pod);
        }
        Self { _held: file }
    }
}

// ---- podman ------------------------------------------------------------------------------------

fn podman(args: &[&str]) -> Output {
    assert!(
        std::env::var_os("CONTAINERS_CONF").is_some(),
        "CONTAINERS_CONF is not set: run `cargo xtask test`, which writes the project's podman configuration"
    );
    Command::new("podman").args(args).output().unwrap_or_else(|err| panic!("running podman: {err}"))
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(out.status.success(), "podman {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes a pod at once (SIGKILL, no grace). A container that podman is restarting
/// (restartPolicy: Always after a failed start) can make the removal fail ("container state
/// improper"): this tries again until the pod is gone.
fn remove_pod(name: &str) -> Result<(), String> {
    let mut last_error = String::new();
    for _ in 0..50 {
        let out = podman(&["pod", "rm", "--force", "--time", "0", name]);
        if !podman(&["pod", "exists", name]).status.success() {
            return Ok(());
        }
        last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("pod {name} could not be removed: {last_error}"))
}

/// What a pod differs in from the manifest's, beyond the node-specific changes.
#[derive(Default, Clone)]
struct Variant {
    /// Capabilities (`BPF`, ...) taken out of `capabilities.add`.
    without_capability: Option<String>,
    /// Environment added to the container.
    env: Vec<(String, String)>,
    /// Run under podman's own RuntimeDefault (containers-common) instead of the profile above.
    stock_seccomp: bool,
    /// The pin volume's host path is a plain directory: a node that has not mounted bpffs.
    no_bpffs: bool,
    /// Cluster mode: what a real cluster would provide (see [`ClusterPatch`]).
    cluster: Option<ClusterPatch>,
}

/// What the kubelet and the operator provide a cluster-mode pod, for this test's node:
/// - `[cluster] etcd` and `prefix` point at the test's etcd (the manifest's endpoints name an
///   etcd Service that exists only in a real cluster);
/// - NODE_NAME gets the node's name as a plain value: podman 4.3 does not support the downward
///   API's `spec.nodeName` ("fieldPath spec.nodeName is either not valid or not supported");
/// - the Secret volume is a directory holding the Secret's keys (ca.crt, tls.crt, tls.key), as
///   the kubelet materialises it: podman 4.3's own Secret volumes mount the data still base64
///   encoded, ignore `defaultMode`, and crash without `optional`.
#[derive(Clone)]
struct ClusterPatch {
    endpoints: Vec<String>,
    prefix: String,
    node_name: String,
    secret_dir: PathBuf,
}

/// A pod played from the manifest, removed on drop.
struct Pod<'a> {
    node: &'a Node,
    name: String,
    container: String,
    yaml: PathBuf,
    config_volume: String,
    api: SocketAddr,
    release_token_file: Option<String>,
    /// When `podman kube play` was last started for it.
    played_at: std::cell::Cell<Instant>,
}

impl<'a> Pod<'a> {
    /// Renders the manifest's pod for `node` and plays it.
    fn play(manifest: &Manifest, node: &'a Node, variant: &Variant) -> Self {
        let name = format!("{POD_PREFIX}{}", unique_name("pod").trim_start_matches("ss-"));
        let yaml = node.dir.join(format!("{name}.yaml"));
        std::fs::write(&yaml, render(manifest, node, &name, variant)).expect("writing the pod YAML");
        let pod = Self {
            node,
            container: format!("{name}-{}", manifest.container_name()),
            config_volume: manifest.config_map["metadata"]["name"].as_str().unwrap().to_owned(),
            name,
            yaml,
            api: manifest.config.api,
            release_token_file: manifest.release_token_file.clone(),
            played_at: std::cell::Cell::new(Instant::now()),
        };
        pod.replay();
        pod
    }

    /// `podman kube play` of the rendered YAML (again, after `kill`).
    fn replay(&self) {
        assert_api_port_free(self.api);
        // The ConfigMap becomes a podman volume of its name; a stale one would keep old data.
        let _ = podman(&["volume", "rm", "--force", &self.config_volume]);
        let root = self.node.seccomp_root.to_string_lossy();
        self.played_at.set(Instant::now());
        let out = podman(&["kube", "play", "--seccomp-profile-root", &root, &self.yaml.to_string_lossy()]);
        assert!(
            out.status.success(),
            "podman kube play {} failed: {}",
            self.yaml.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.node.pods.lock().unwrap().push(self.name.clone());
    }

    /// Kills every process of the pod at once (SIGKILL, no grace) and removes it, as a node
    /// losing the pod would.
    fn kill(&self) {
        remove_pod(&self.name).unwrap_or_else(|err| panic!("{err}"));
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.container]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    fn agent_pid(&self) -> u32 {
        let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.container]);
        pid.trim().parse().unwrap_or_else(|_| panic!("container {} has no pid: {pid:?}", self.container))
    }

    /// `podman exec` in the agent's container.
    fn exec(&self, args: &[&str]) -> Output {
        let token_env = self.release_token_file.as_ref().map(|file| format!("SOCKSHIFT_TOKEN_FILE={file}"));
        let mut full = vec!["exec"];
        if let Some(env) = &token_env {
            full.extend(["--env", env.as_str()]);
        }
        full.push(self.container.as_str());
        full.extend_from_slice(args);
        podman(&full)
    }

    /// Waits until the readiness probe passes, at most `limit` after `podman kube play` started
    /// (panics with the logs then); returns the time since that start.
    fn wait_ready(&self, readiness: &HttpProbe, limit: Duration) -> Duration {
        let started = self.played_at.get();
        while started.elapsed() < limit {
            if readiness.passes() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent did not pass its readiness probe within {limit:?}; logs:\n{}", self.logs());
    }

    /// Waits until the container's log holds `needle`; panics with the log if not within `limit`.
    fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let started = Instant::now();
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(started.elapsed() < limit, "the agent's log never showed {needle:?} within {limit:?}:\n{logs}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        let _ = remove_pod(&self.name);
        let _ = podman(&["volume", "rm", "--force", &self.config_volume]);
    }
}

/// The ConfigMap and the Pod for `node`, as one YAML stream for `podman kube play`.
fn render(manifest: &Manifest, node: &Node, name: &str, variant: &Variant) -> String {
    // ConfigMap: only agent.cgroup changes.
    let mut config: toml::Table = toml::from_str(&manifest.config_text).expect("the ConfigMap's TOML");
    let agent = config.get_mut("agent").and_then(toml::Value::as_table_mut).expect("an [agent] table");
    agent.insert("cgroup".into(), toml::Value::String(node.cgroup.path.to_string_lossy().into_owned()));
    if let Some(patch) = &variant.cluster {
        let cluster = config.get_mut("cluster").and_then(toml::Value::as_table_mut).expect("a [cluster] table");
        let endpoints = patch.endpoints.iter().map(|e| toml::Value::String(e.clone())).collect();
        cluster.insert("etcd".into(), toml::Value::Array(endpoints));
        cluster.insert("prefix".into(), toml::Value::String(patch.prefix.clone()));
    }
    let mut config_map = manifest.config_map.clone();
    mapping(&mut config_map["data"]).insert(CONFIG_KEY.into(), toml::to_string(&config).unwrap().into());
    // The cluster's credentials: the double's kubeconfig, beside the TOML (see the module docs).
    let mount = manifest.config_mount_path();
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\n    \
         certificate-authority: {}\nusers:\n- name: sockshift\n  user:\n    token: {}\ncontexts:\n- name: double\n  \
         context:\n    cluster: double\n    user: sockshift\ncurrent-context: double\n",
        node.cluster.addr,
        mount.join(KUBECONFIG_CA_KEY).display(),
        kube_double::TOKEN
    );
    let data = mapping(&mut config_map["data"]);
    data.insert(KUBECONFIG_KEY.into(), kubeconfig.into());
    data.insert(KUBECONFIG_CA_KEY.into(), node.kubeconfig_ca.clone().into());
    let mut env = variant.env.clone();
    env.push(("KUBECONFIG".into(), mount.join(KUBECONFIG_KEY).to_string_lossy().into_owned()));

    // The Secret's files, written by the test (see `Node::tokens`).
    for (file, token) in token_files(&manifest.config_text) {
        write_token(&node.tokens.join(Path::new(&file).file_name().unwrap()), &token);
    }

    // Pod: the template's metadata and spec; the image and two host paths change, and the token
    // Secret becomes the test's directory.
    let mut spec = manifest.template["spec"].clone();
    let bpffs_volume = manifest.host_volume_above(&manifest.config.bpffs);
    let state_volume = manifest.host_volume_above(&manifest.config.state_dir);
    for volume in spec["volumes"].as_sequence_mut().expect("volumes") {
        let tokens_secret = volume["secret"]["secretName"].as_str() == Some("sockshift-tokens");
        if let Some(volume) = volume.as_mapping_mut().filter(|_| tokens_secret) {
            volume.remove("secret");
            let mut host_path = Mapping::new();
            host_path.insert("path".into(), node.tokens.to_string_lossy().into_owned().into());
            host_path.insert("type".into(), "Directory".into());
            volume.insert("hostPath".into(), Value::Mapping(host_path));
            continue;
        }
        let host = if volume["name"].as_str() == Some(&bpffs_volume) {
            if variant.no_bpffs {
                &node.plain_dir
            } else {
                &node.bpffs
            }
        } else if volume["name"].as_str() == Some(&state_volume) {
            &node.state
        } else if let (Some(patch), true) = (&variant.cluster, volume["secret"].is_mapping()) {
            let name = volume["name"].clone();
            let mut host = Mapping::new();
            host.insert("path".into(), patch.secret_dir.to_string_lossy().into_owned().into());
            host.insert("type".into(), "Directory".into());
            let mut replaced = Mapping::new();
            replaced.insert("name".into(), name);
            replaced.insert("hostPath".into(), Value::Mapping(host));
            *volume = Value::Mapping(replaced);
            continue;
        } else {
            continue;
        };
        volume["hostPath"]["path"] = host.to_string_lossy().into_owned().into();
    }
    let container = &mut spec["containers"][0];
    container["image"] = node.image.clone().into();
    if let Some(patch) = &variant.cluster {
        let env = container["env"].as_sequence_mut().expect("the cluster pod's env");
        let node_name = env.iter_mut().find(|e| e["name"].as_str() == Some("NODE_NAME")).expect("NODE_NAME");
        assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
        let mut plain = Mapping::new();
        plain.insert("name".into(), "NODE_NAME".into());
        plain.insert("value".into(), patch.node_name.clone().into());
        *node_name = Value::Mapping(plain);
    }
    if let Some(capability) = &variant.without_capability {
        let add = container["securityContext"]["capabilities"]["add"].as_sequence_mut().expect("capabilities.add");
        let before = add.len();
        add.retain(|c| c.as_str() != Some(capability));
        assert_eq!(add.len() + 1, before, "capability {capability} is not in the manifest's list");
    }
    if !container["env"].is_sequence() {
        container["env"] = Value::Sequence(Vec::new());
    }
    for (key, value) in &env {
        let mut entry = Mapping::new();
        entry.insert("name".into(), key.clone().into());
        entry.insert("value".into(), value.clone().into());
        container["env"].as_sequence_mut().unwrap().push(Value::Mapping(entry));
    }
    assert_eq!(
        container["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault"),
        "the test stands in this node's RuntimeDefault only: the manifest must ask for it"
    );

    let mut metadata = Mapping::new();
    metadata.insert("name".into(), name.into());
    metadata.insert("labels".into(), manifest.template["metadata"]["labels"].clone());
    let mut annotations = manifest.template["metadata"]["annotations"].as_mapping().cloned().unwrap_or_default();
    if !variant.stock_seccomp {
        annotations.insert(
            "seccomp.security.alpha.kubernetes.io/pod".into(),
            format!("localhost/{RUNTIME_DEFAULT_PROFILE}").into(),
        );
    }
    metadata.insert("annotations".into(), Value::Mapping(annotations));
    let mut pod = Mapping::new();
    pod.insert("apiVersion".into(), "v1".into());
    pod.insert("kind".into(), "Pod".into());
    pod.insert("metadata".into(), Value::Mapping(metadata));
    pod.insert("spec".into(), spec);

    format!(
        "{}---\n{}",
        serde_norway::to_string(&config_map).unwrap(),
        serde_norway::to_string(&Value::Mapping(pod)).unwrap()
    )
}

/// With hostNetwork the agent serves on the node's loopback: nothing else may hold its port.
fn assert_api_port_free(api: SocketAddr) {
    if TcpListener::bind(api).is_ok() {
        return;
    }
    let holder = Command::new("ss").args(["-ltnp", &format!("sport = :{}", api.port())]).output();
    let holder = holder.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    panic!("{api} (the manifest's agent.api, on the node's loopback) is taken:\n{holder}");
}

// ---- the kubelet's probes ----------------------------------------------------------------------

/// An httpGet probe of the manifest, sent as the kubelet sends it.
#[derive(Debug)]
struct HttpProbe {
    which: String,
    target: SocketAddr,
    path: String,
    timeout: Duration,
    initial_delay: Duration,
    period: Duration,
    failure_threshold: u32,
}

impl HttpProbe {
    fn from_manifest(probe: &Value, which: &str) -> Self {
        let get = &probe["httpGet"];
        assert!(get.is_mapping(), "{which} must be an httpGet probe");
        let scheme = get["scheme"].as_str().unwrap_or("HTTP");
        assert_eq!(scheme, "HTTP", "{which}.httpGet.scheme");
        // Without `host` the kubelet probes the pod IP, which with hostNetwork is the node's.
        let host = get["host"].as_str().expect("httpGet.host: the API listens on the node's loopback only");
        let port = get["port"].as_u64().unwrap_or_else(|| panic!("{which}.httpGet.port must be a number"));
        let seconds = |key: &str, default: u64| Duration::from_secs(probe[key].as_u64().unwrap_or(default));
        Self {
            which: which.to_owned(),
            target: SocketAddr::new(host.parse().expect("httpGet.host is an address"), port as u16),
            path: get["path"].as_str().unwrap_or("/").to_owned(),
            // The kubelet's defaults.
            timeout: seconds("timeoutSeconds", 1),
            initial_delay: seconds("initialDelaySeconds", 0),
            period: seconds("periodSeconds", 10),
            failure_threshold: probe["failureThreshold"].as_u64().unwrap_or(3) as u32,
        }
    }

    /// One probe: the HTTP status, or why there is none, within the probe's timeout.
    fn send(&self) -> Result<u16, String> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = TcpStream::connect_timeout(&self.target, self.timeout).map_err(|e| format!("connect: {e}"))?;
        let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        stream.set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path, self.target
        );
        stream.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !response.windows(2).any(|w| w == b"\r\n") {
            stream.set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        let text = String::from_utf8_lossy(&response);
        text.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("no status line: {text:?}"))
    }

    /// The kubelet counts 200 to 399 as success.
    fn passes(&self) -> bool {
        matches!(self.send(), Ok(200..=399))
    }
}

// ---- steering ----------------------------------------------------------------------------------

/// A network namespace holding the ConfigMap's first service: its stable and canary addresses on
/// loopback with a probe server each (tagged `stable-ADDR` / `canary-ADDR`). Its frontends are
/// routed nowhere in the namespace, so a connection that is not steered fails. A service named by
/// Kubernetes Services gets them from the node's API server (the double): the frontend Service
/// with ClusterIP `CLUSTER_IP`, ready endpoints `STABLE_PODS` and `CANARY_PODS` on port `http`.
struct Backends {
    _servers: e2e::Spawned,
    netns: NetNs,
    service: String,
    frontend: SocketAddr,
    canary_percent: f64,
    kubernetes: bool,
}

/// The Kubernetes objects the test serves for a service named by them.
const CLUSTER_IP: &str = "10.96.0.10";
const STABLE_PODS: [&str; 2] = ["10.0.1.5", "10.0.1.6"];
const CANARY_PODS: [&str; 1] = ["10.0.2.7"];
const POD_PORT: u16 = 8080;

impl Backends {
    fn new(manifest: &Manifest, node: &Node) -> Self {
        Self::for_service(manifest.config.services.first().expect("the ConfigMap shows a [[service]]"), node)
    }

    fn for_service(service: &agent::config::ServiceSpec, node: &Node) -> Self {
        let (frontend, stable, canary) = match &service.source.kubernetes {
            None => (service.frontends[0], service.stable.clone(), service.canary.clone()),
            Some(names) => {
                let pods = |ips: &[&str]| -> Vec<SocketAddr> {
                    ips.iter().map(|ip| SocketAddr::new(ip.parse().unwrap(), POD_PORT)).collect()
                };
                let cluster = &node.cluster;
                cluster.apply(&kube_double::service(
                    &names.namespace,
                    &names.frontend,
                    &[CLUSTER_IP],
                    &[("http", 80, "http")],
                ));
                let slice_ports = [("http", i32::from(POD_PORT))];
                let sides = [(&names.stable, &STABLE_PODS[..])]
                    .into_iter()
                    .chain(names.canary.as_ref().map(|canary| (canary, &CANARY_PODS[..])));
                for (backend_service, ips) in sides {
                    let ready: Vec<kube_double::Pod<'_>> = ips.iter().map(|ip| kube_double::Pod::ready(ip)).collect();
                    let slice = format!("{backend_service}-v4");
                    cluster.apply(&kube_double::endpoint_slice(
                        &names.namespace,
                        &slice,
                        backend_service,
                        "IPv4",
                        &slice_ports,
                        &ready,
                    ));
                }
                let canary = if names.canary.is_some() { pods(&CANARY_PODS) } else { Vec::new() };
                (SocketAddr::new(CLUSTER_IP.parse().unwrap(), 80), pods(&STABLE_PODS), canary)
            }
        };
        let netns = NetNs::new();
        let mut listen = Vec::new();
        let mut addresses = BTreeSet::new();
        for (side, backends) in [("stable", &stable), ("canary", &canary)] {
            for backend in backends {
                addresses.insert(backend.ip());
                listen.push("--listen".to_owned());
                listen.push(format!("{backend}={side}-{backend}"));
            }
        }
        for address in addresses {
            let prefix = if address.is_ipv4() { 32 } else { 128 };
            run("ip", &["-n", &netns.name, "addr", "add", &format!("{address}/{prefix}"), "dev", "lo"]);
        }
        let mut args = vec!["serve-tcp"];
        args.extend(listen.iter().map(String::as_str));
        let servers = serve(Placement { netns: Some(&netns), cgroup: None }, &args);
        Self {
            _servers: servers,
            netns,
            service: service.name.clone(),
            frontend,
            canary_percent: f64::from(service.canary_ppm) / 10_000.0,
            kubernetes: service.source.kubernetes.is_some(),
        }
    }

    /// For a service named by Kubernetes Services: waits until the agent (its API at `api`) has
    /// listed them and steers the frontend (asking with `token`, the ConfigMap has `[agent.auth]`).
    fn wait_discovered(&self, api: SocketAddr, token: Option<&str>) {
        if !self.kubernetes {
            return;
        }
        let path = format!("/v1/services/{}", self.service);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = agent::client::request(api, token, "GET", &path, None).map(|r| r.body);
            if let Ok(state) = &state {
                let frontend = serde_json::json!(self.frontend.to_string());
                if state["kubernetes"]["state"] == "synced"
                    && state["frontends"].as_array().is_some_and(|f| f.contains(&frontend))
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the agent did not discover {path} within 30 s: {state:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `count` connections to the frontend from a host process in `cgroup` (and this namespace).
    fn connect(&self, cgroup: &Cgroup, count: u32) -> TcpReport {
        let placement = Placement { netns: Some(&self.netns), cgroup: Some(cgroup) };
        TcpReport {
            raw: probe(
                placement,
                &["tcp", "--target", &self.frontend.to_string(), "--count", &count.to_string(), "--max-seconds", "60"],
            ),
        }
    }
}

/// Asserts every connection reached a backend and the canary's share is what `percent` gives
/// (a 5-sigma binomial bound, see `assert_canary_share`).
fn assert_share(report: &TcpReport, count: u64, percent: f64, what: &str) {
    assert_eq!(report.errors_total(), 0, "{what}: connections failed (not steered?): {:?}", report.raw);
    assert_eq!(report.tags_total(), count, "{what}: {:?}", report.raw);
    assert_canary_share(what, report.hits("canary"), count, percent);
}

// ---- the checks, each for a manifest -----------------------------------------------------------

/// The image has the Dockerfile runtime stage's layout: entrypoint, command, binary, packages.
fn image_has_the_dockerfiles_runtime_layout() {
    let node_image = std::env::var("SOCKSHIFT_IMAGE").expect("SOCKSHIFT_IMAGE: run `cargo xtask test`");
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile")).expect("reading the Dockerfile");
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").expect("a FROM")..];
    let instruction = |keyword: &str| -> serde_json::Value {
        let line = runtime
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{keyword} ")))
            .unwrap_or_else(|| panic!("no {keyword}"));
        serde_json::from_str(line).unwrap_or_else(|err| panic!("{keyword} {line}: {err}"))
    };
    let config: serde_json::Value =
        serde_json::from_str(&podman_ok(&["image", "inspect", "--format", "{{json .Config}}", &node_image])).unwrap();
    assert_eq!(config["Entrypoint"], instruction("ENTRYPOINT"), "image entrypoint");
    assert_eq!(config["Cmd"], instruction("CMD"), "image command");
    let copy = runtime.lines().find(|l| l.starts_with("COPY --from=builder")).expect("the binary's COPY");
    let binary = copy.split_whitespace().last().unwrap();
    let packages = runtime
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUNTIME_PACKAGES="))
        .expect("ARG RUNTIME_PACKAGES")
        .trim_matches('"');
    let script = format!("test -x {binary} && dpkg-query -W -f='${{Package}} ${{Status}}\\n' {packages}");
    let out = podman(&["run", "--rm", "--network=none", "--entrypoint", "/bin/sh", &node_image, "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script}: {text}{}", String::from_utf8_lossy(&out.stderr));
    for package in packages.split_whitespace() {
        assert!(text.contains(&format!("{package} install ok installed")), "{package} is not installed: {text}");
    }
}

fn probes_are_answered(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    let (liveness, readiness) = (manifest.probe("livenessProbe"), manifest.probe("readinessProbe"));
    for probe in [&liveness, &readiness] {
        assert_eq!(probe.target, manifest.config.api, "{} must ask the API the ConfigMap configures", probe.which);
    }
    let pod = Pod::play(&manifest, &node, &Variant::default());
    // The kubelet restarts the container after failureThreshold failed liveness probes, the
    // first sent initialDelaySeconds after the start: the agent must answer before that.
    let liveness_limit = liveness.initial_delay + liveness.period * (liveness.failure_threshold - 1);
    let ready_after = pod.wait_ready(&readiness, liveness_limit);
    eprintln!("agent ready {ready_after:.1?} after `podman kube play` started (liveness allows {liveness_limit:?})");
    for probe in [&liveness, &readiness] {
        for _ in 0..5 {
            let started = Instant::now();
            let answer = probe.send();
            assert!(
                matches!(answer, Ok(200..=399)),
                "{}: GET {} on {} gave {answer:?}",
                probe.which,
                probe.path,
                probe.target
            );
            assert!(started.elapsed() < probe.timeout, "{} took {:?}", probe.which, started.elapsed());
        }
    }
    // It is the agent in the container that answers: nothing listens once the pod is gone.
    pod.kill();
    assert!(!readiness.passes(), "the probe still passes with the pod removed");
}

fn host_process_is_steered(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    let backends = Backends::new(&manifest, &node);
    let pod = Pod::play(&manifest, &node, &Variant::default());
    pod.wait_ready(&manifest.probe("readinessProbe"), Duration::from_secs(60));
    backends.wait_discovered(manifest.config.api, manifest.release_token().as_deref());
    let report = backends.connect(&node.cgroup, 2000);
    eprintln!(
        "canary share {:.2} % of 2000 connections (ConfigMap: {} %)",
        report.share("canary"),
        backends.canary_percent
    );
    assert_share(&report, 2000, backends.canary_percent, "at the ConfigMap's weight");
    // A process outside the attached cgroup is not steered: its connections go nowhere.
    let outside = Cgroup::new();
    let report = backends.connect(&outside, 20);
    assert_eq!(report.tags_total(), 0, "a process outside agent.cgroup was steered: {:?}", report.raw);
}

fn cli_works_in_the_pod(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    let backends = Backends::new(&manifest, &node);
    let pod = Pod::play(&manifest, &node, &Variant::default());
    pod.wait_ready(&manifest.probe("readinessProbe"), Duration::from_secs(60));
    backends.wait_discovered(manifest.config.api, manifest.release_token().as_deref());

    let status = pod.exec(&["sockshift", "status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "sockshift status: {table}{}", String::from_utf8_lossy(&status.stderr));
    let row = table.lines().find(|l| l.split_whitespace().next() == Some(backends.service.as_str()));
    let row = row.unwrap_or_else(|| panic!("sockshift status shows no {}:\n{table}", backends.service));
    let shown: Option<f64> = row.split_whitespace().nth(1).and_then(|percent| percent.parse().ok());
    assert_eq!(shown, Some(backends.canary_percent), "{table}");

    let set = pod.exec(&["sockshift", "set", &backends.service, "50", "--output", "json"]);
    assert!(set.status.success(), "sockshift set: {}", String::from_utf8_lossy(&set.stderr));
    let state: serde_json::Value = serde_json::from_slice(&set.stdout).expect("sockshift set --output json");
    assert_eq!(state["canary_percent"], serde_json::json!(50.0), "{state}");
    assert_share(&backends.connect(&node.cgroup, 1000), 1000, 50.0, "after `sockshift set` in the pod");

    // The root filesystem is read-only; the change went to the state directory's host path.
    let touch = pod.exec(&["touch", "/sockshift-write-test"]);
    assert!(!touch.status.success(), "the container's root filesystem is writable");
    assert!(String::from_utf8_lossy(&touch.stderr).contains("Read-only file system"), "{touch:?}");
    let saved = std::fs::read_dir(&node.state).expect("state dir").count();
    assert!(saved > 0, "nothing was written to the state directory's host path {}", node.state.display());
}

/// Capability names by number (include/uapi/linux/capability.h), for readable failures.
const CAPABILITY_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capability sets of a process, by name.
fn capability_sets(pid: u32) -> Vec<(String, BTreeSet<String>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the agent's status");
    ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"]
        .iter()
        .map(|set| {
            let hex = status.lines().find_map(|l| l.strip_prefix(&format!("{set}:"))).expect("a capability set");
            let bits = u64::from_str_radix(hex.trim(), 16).expect("hex");
            let names = (0..64)
                .filter(|bit| bits & (1u64 << bit) != 0)
                .map(|bit| CAPABILITY_NAMES.get(bit).map_or_else(|| format!("capability {bit}"), |n| (*n).to_owned()))
                .collect();
            ((*set).to_owned(), names)
        })
        .collect()
}

fn capabilities_are_exactly_the_manifests_and_each_is_needed(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    let readiness = manifest.probe("readinessProbe");
    let wanted = manifest.capabilities();

    let pod = Pod::play(&manifest, &node, &Variant::default());
    pod.wait_ready(&readiness, Duration::from_secs(60));
    for (set, held) in capability_sets(pod.agent_pid()) {
        let expected = if set == "CapAmb" || set == "CapInh" { BTreeSet::new() } else { wanted.clone() };
        assert_eq!(held, expected, "{set} of the agent in the pod");
    }
    pod.kill();

    for capability in &wanted {
        let short = capability.trim_start_matches("CAP_").to_owned();
        // The agent's own check names the missing capability and refuses to start...
        let variant = Variant { without_capability: Some(short.clone()), ..Variant::default() };
        let pod = Pod::play(&manifest, &node, &variant);
        let logs = pod.wait_log("error: ", Duration::from_secs(60));
        assert!(logs.contains(&format!("missing capability: {capability} (")), "without {capability}:\n{logs}");
        assert!(!readiness.passes(), "the agent serves without {capability}");
        pod.kill();
        // ...and that check only anticipates the kernel: with it turned into a warning, loading the
        // datapath fails, so the capability is needed, not only asked for.
        let variant = Variant {
            without_capability: Some(short),
            env: vec![(agent::caps::CHECK_ENV.to_owned(), "warn".to_owned())],
            ..Variant::default()
        };
        let pod = Pod::play(&manifest, &node, &variant);
        let logs = pod.wait_log("error: ", Duration::from_secs(60));
        assert!(logs.contains("starting anyway"), "the check was not relaxed:\n{logs}");
        // EPERM from bpf(2) itself, or EACCES from the verifier refusing what only CAP_PERFMON
        // allows (the programs' pointer arithmetic on the socket context).
        assert!(
            logs.contains("error: loading the datapath")
                && (logs.contains("Operation not permitted") || logs.contains("Permission denied")),
            "without {capability} the kernel should refuse the datapath:\n{logs}"
        );
        assert!(!readiness.passes(), "the agent serves without {capability}");
        pod.kill();
    }
}

fn seccomp_that_refuses_bpf_is_named(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    assert!(!manifest.capabilities().contains("CAP_SYS_ADMIN"), "with CAP_SYS_ADMIN containers-common allows bpf()");
    let pod = Pod::play(&manifest, &node, &Variant { stock_seccomp: true, ..Variant::default() });
    let logs = pod.wait_log("error: ", Duration::from_secs(60));
    assert!(
        logs.contains("bpf() fails with") && logs.contains("seccomp filter") && logs.contains("CAP_BPF"),
        "under containers-common's RuntimeDefault the agent should name the seccomp filter:\n{logs}"
    );
}

fn node_without_bpffs_is_refused(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    let pod = Pod::play(&manifest, &node, &Variant { no_bpffs: true, ..Variant::default() });
    let logs = pod.wait_log("error: ", Duration::from_secs(60));
    let pins = manifest.config.bpffs.display().to_string();
    assert!(
        logs.contains(&format!("bpffs directory {pins}: Operation not permitted")),
        "without the node's bpffs the agent must refuse to start, naming its pin directory:\n{logs}"
    );
    assert!(std::fs::read_dir(&node.plain_dir).unwrap().next().is_none(), "the agent pinned into a plain directory");
}

fn restart_keeps_steering_without_a_gap(manifest_path: &Path) {
    let manifest = Manifest::load(manifest_path);
    let node = Node::new();
    let backends = Backends::new(&manifest, &node);
    let readiness = manifest.probe("readinessProbe");
    let pod = Pod::play(&manifest, &node, &Variant::default());
    pod.wait_ready(&readiness, Duration::from_secs(60));
    backends.wait_discovered(manifest.config.api, manifest.release_token().as_deref());
    let set = pod.exec(&["sockshift", "set", &backends.service, "50"]);
    assert!(set.status.success(), "sockshift set: {}", String::from_utf8_lossy(&set.stderr));
    kill_and_replay_under_traffic(&pod, &readiness, &backends, &node, 50.0);

    // The new agent adopted the pins and restored the weight from the state directory.
    let logs = pod.logs();
    assert!(logs.contains("adopted"), "the replayed agent did not adopt the pinned links:\n{logs}");
    let status = pod.exec(&["sockshift", "status", &backends.service, "--output", "json"]);
    let state: serde_json::Value = serde_json::from_slice(&status.stdout).expect("sockshift status --output json");
    assert_eq!(state["canary_percent"], serde_json::json!(50.0), "{state}");
}

/// Kills the pod and plays it again while a host process in the cgroup connects in timestamped
/// batches (at most two minutes): no connection fails before, while no agent runs, or after,
/// and the canary's share is `percent` while the agent is gone and after it is back.
fn kill_and_replay_under_traffic(pod: &Pod, readiness: &HttpProbe, backends: &Backends, node: &Node, percent: f64) {
    const BATCH: u32 = 40;
    let stop = AtomicBool::new(false);
    let (killed_at, ready_at, batches) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut batches = Vec::new();
            let until = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                batches.push((Instant::now(), backends.connect(&node.cgroup, BATCH)));
            }
            batches
        });
        std::thread::sleep(Duration::from_secs(2));
        let killed_at = Instant::now();
        pod.kill();
        let api_down = !readiness.passes();
        std::thread::sleep(Duration::from_secs(3));
        pod.replay();
        let ready_at = pod.played_at.get() + pod.wait_ready(readiness, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let batches = traffic.join().expect("traffic thread");
        assert!(api_down, "the API still answered with the pod removed");
        (killed_at, ready_at, batches)
    });

    let down: Vec<&TcpReport> =
        batches.iter().filter(|(t, _)| *t >= killed_at && *t < ready_at).map(|(_, r)| r).collect();
    assert!(down.len() >= 3, "only {} batches ran while no agent was up ({:?})", down.len(), ready_at - killed_at);
    for (at, report) in &batches {
        let when = if *at < killed_at {
            "before the kill"
        } else if *at < ready_at {
            "with no agent"
        } else {
            "after the replay"
        };
        assert_eq!(report.errors_total(), 0, "{when}: connections failed: {:?}", report.raw);
        assert_eq!(report.tags_total(), u64::from(BATCH), "{when}: {:?}", report.raw);
    }
    let merged = |reports: Vec<&TcpReport>| {
        let mut tags = serde_json::Map::new();
        for report in &reports {
            for (tag, count) in report.raw["tags"].as_object().into_iter().flatten() {
                let sum = tags.get(tag).and_then(|v| v.as_u64()).unwrap_or(0) + count.as_u64().unwrap_or(0);
                tags.insert(tag.clone(), sum.into());
            }
        }
        (TcpReport { raw: serde_json::json!({ "tags": tags, "errors": {} }) }, reports.len() as u64 * u64::from(BATCH))
    };
    let (report, count) = merged(down);
    eprintln!(
        "{} batches of {BATCH} connections, {count} of them in the {:.1?} with no agent: canary share {:.1} %, no failure",
        batches.len(),
        ready_at - killed_at,
        report.share("canary")
    );
    assert_share(&report, count, percent, "with no agent running");
    let (report, count) = merged(batches.iter().filter(|(t, _)| *t >= ready_at).map(|(_, r)| r).collect());
    assert_share(&report, count, percent, "after the replay");
}

/// The cluster manifest's pod on this node, joined to a real etcd (3 members, TLS with client
/// certificates): it starts, registers, answers the probes, and a service named by Kubernetes
/// Services and a weight set through its API (stored in etcd; the pod resolves the names from
/// the API-server double) steer a host process in the attached cgroup.
fn cluster_pod_joins_and_steers(manifest_path: &Path) {
    const NODE_NAME: &str = "podman-node";
    // The ConfigMap's `node_env = "NODE_NAME"`, for parsing it here as the pod will.
    std::env::set_var("NODE_NAME", NODE_NAME);
    let manifest = Manifest::load(manifest_path);
    let settings = manifest.config.cluster.clone().expect("the cluster manifest's ConfigMap has [cluster]");
    let node = Node::new();
    let etcd = e2e::etcd::EtcdCluster::start_tls();
    let tls = etcd.tls().expect("TLS").clone();
    let secret_dir = node.dir.join("etcd-client");
    std::fs::create_dir_all(&secret_dir).unwrap();
    let (cert, key) = settings.tls.as_ref().and_then(|t| t.identity.clone()).expect("a client certificate");
    for (source, wanted) in
        [(&tls.ca, &settings.tls.as_ref().unwrap().ca_file), (&tls.client_cert, &cert), (&tls.client_key, &key)]
    {
        let name = wanted.file_name().expect("a file name");
        std::fs::copy(source, secret_dir.join(name)).expect("copying a TLS file");
    }
    let prefix = format!("/{}", unique_name("podman"));
    let patch =
        ClusterPatch { endpoints: etcd.endpoints(), prefix: prefix.clone(), node_name: NODE_NAME.into(), secret_dir };
    let (liveness, readiness) = (manifest.probe("livenessProbe"), manifest.probe("readinessProbe"));
    let pod = Pod::play(&manifest, &node, &Variant { cluster: Some(patch), ..Variant::default() });
    let liveness_limit = liveness.initial_delay + liveness.period * (liveness.failure_threshold - 1);
    let ready_after = pod.wait_ready(&readiness, liveness_limit);
    eprintln!("cluster-mode agent ready {ready_after:.1?} after `podman kube play` started");
    for probe in [&liveness, &readiness] {
        assert!(
            matches!(probe.send(), Ok(200..=399)),
            "{} fails:
{}",
            probe.which,
            pod.logs()
        );
    }

    // Joined: the node's key is in etcd, and the API shows it.
    let api = manifest.config.api;
    // The ConfigMap has `[agent.auth]`: ask with the release token the test gave the Secret.
    let token = manifest.release_token();
    let call = |method: &str, path: &str, body: Option<&serde_json::Value>| {
        let r = agent::client::request(api, token.as_deref(), method, path, body).expect("the pod's API");
        (r.status, r.body)
    };
    let node_key = etcd.etcdctl_ok(&["get", &format!("{prefix}/v1/nodes/{NODE_NAME}"), "--print-value-only"]);
    assert!(
        node_key.contains(NODE_NAME),
        "the node is not registered in etcd: {node_key:?}
{}",
        pod.logs()
    );
    let (status, view) = call("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{view}");
    assert_eq!((view["node"].as_str(), view["connected"].as_bool()), (Some(NODE_NAME), Some(true)), "{view}");

    // A service named by Kubernetes Services and a weight set through the API, kept in etcd,
    // steer a host process: the pod resolves the names itself (from the API-server double).
    let service: agent::config::ServiceConfig = toml::from_str(
        "name = \"web\"\n[kubernetes]\nnamespace = \"shop\"\nfrontend = \"web\"\nstable = \"web-stable\"\n\
         canary = \"web-canary\"",
    )
    .unwrap();
    let spec = agent::config::validate_service(&service, "", None).unwrap();
    let backends = Backends::for_service(&spec, &node);
    let body = serde_json::to_value(agent::api::types::ServiceBody::from(&service)).unwrap();
    let (status, answer) = call("PUT", "/v1/services/web?wait=cluster", Some(&body));
    assert_eq!(status, 201, "{answer}");
    let (status, answer) =
        call("PUT", "/v1/services/web/canary?wait=cluster", Some(&serde_json::json!({ "percent": 30.0 })));
    assert_eq!(status, 200, "{answer}");
    let stored = etcd.etcdctl_ok(&["get", &format!("{prefix}/v1/services/web"), "--print-value-only"]);
    assert!(stored.contains("\"canary_percent\":30.0") && stored.contains("\"web-canary\""), "etcd holds {stored:?}");
    backends.wait_discovered(api, token.as_deref());
    assert_share(&backends.connect(&node.cgroup, 1000), 1000, 30.0, "at the weight set through the pod's API");
    let status = pod.exec(&["sockshift", "status", "--cluster"]);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success() && table.contains(NODE_NAME), "sockshift status --cluster in the pod:\n{table}");

    // Killed and played again: no connection fails while no agent runs, and the new agent, on
    // the same pins, state directory and etcd, adopts the links and keeps the weight.
    kill_and_replay_under_traffic(&pod, &readiness, &backends, &node, 30.0);
    let logs = pod.logs();
    assert!(logs.contains("adopted"), "the replayed agent did not adopt the pinned links:\n{logs}");
    let (status, state) = call("GET", "/v1/services/web", None);
    assert_eq!((status, state["canary_percent"].as_f64()), (200, Some(30.0)), "{state}");
    let (status, view) = call("GET", "/v1/cluster", None);
    assert_eq!((status, view["connected"].as_bool()), (200, Some(true)), "rejoined etcd: {view}");
}

// ---- config/daemonset.yaml ---------------------------------------------------------------------

#[test]
fn image_has_the_dockerfiles_runtime_layout_and_starts() {
    require_root();
    image_has_the_dockerfiles_runtime_layout();
}

#[test]
fn agent_starts_in_the_pod_and_answers_the_manifests_probes() {
    probes_are_answered(&daemonset_manifest());
}

#[test]
fn host_process_in_the_attached_cgroup_is_steered_at_the_configured_weight() {
    host_process_is_steered(&daemonset_manifest());
}

#[test]
fn cli_works_inside_the_pod() {
    cli_works_in_the_pod(&daemonset_manifest());
}

#[test]
fn capabilities_are_exactly_the_manifests_and_each_one_is_needed() {
    capabilities_are_exactly_the_manifests_and_each_is_needed(&daemonset_manifest());
}

#[test]
fn seccomp_that_refuses_bpf_is_named_at_start() {
    seccomp_that_refuses_bpf_is_named(&daemonset_manifest());
}

#[test]
fn killing_the_pod_and_playing_it_again_keeps_steering_without_a_gap() {
    restart_keeps_steering_without_a_gap(&daemonset_manifest());
}

#[test]
fn a_node_without_bpffs_is_refused_at_start() {
    node_without_bpffs_is_refused(&daemonset_manifest());
}

// ---- config/daemonset-cluster.yaml ------------------------------------------------------------

#[test]
fn cluster_pod_joins_etcd_answers_its_probes_and_steers_at_the_weight_set_through_the_api() {
    cluster_pod_joins_and_steers(&cluster_manifest());
}
