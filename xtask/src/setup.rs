//! Idempotent machine set-up: each step checks first and only acts when something is missing,
//! saying what it does, since some steps take a minute.

use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// bpf-linker release that reads this machine's LLVM (22). Newer nightlies carry LLVM 23, which
/// it cannot read: never update the nightly toolchain for this project.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn step(message: &str) {
    println!("[setup] {message}");
}

fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Installs Debian packages that are missing (`apt-get update` once, only if needed).
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !output("dpkg-query", &["-W", "-f=${Status}", p]).contains("install ok installed"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// rust-src for the nightly toolchain (build-std) and bpf-linker.
pub fn ensure_toolchain() -> anyhow::Result<()> {
    // The agent's etcd client (etcd-client) compiles etcd's .proto files at build time: protoc,
    // and the well-known types it imports (google/protobuf/descriptor.proto), which Debian ships
    // in libprotobuf-dev, a recommendation of protobuf-compiler that --no-install-recommends skips.
    ensure_packages(&["protobuf-compiler", "libprotobuf-dev"])?;
    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        bail!("the `nightly` toolchain is missing; it must be the machine's nightly 1.97 (LLVM 22): do not install a newer one, bpf-linker {BPF_LINKER_VERSION} cannot read LLVM 23");
    }
    if !output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"]).contains("rust-src") {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker_version = output("bpf-linker", &["--version"]);
    if !linker_version.contains(BPF_LINKER_VERSION) {
        ensure_packages(&["llvm-22-dev"])?;
        step(&format!("installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"));
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    Ok(())
}

/// Tools the end-to-end tests and the demo drive.
pub fn ensure_test_tools() -> anyhow::Result<()> {
    // e2fsprogs and util-linux: an ext4 image to freeze under the agent's state (mkfs.ext4,
    // fsfreeze; tests/e2e/core.rs). iptables drops a canary's SYNs inside a test's namespace
    // (tests/e2e/rollout.rs).
    ensure_packages(&["iproute2", "dnsmasq-base", "bind9-dnsutils", "iptables", "e2fsprogs", "util-linux"])?;
    // A real 3-member etcd cluster for the cluster-mode tests (tests/src/etcd.rs): the server and
    // etcdctl, 3.4 on Debian 12.
    ensure_packages(&["etcd-server", "etcd-client"])?;
    // kubernetes-validate checks config/daemonset.yaml against the Kubernetes schemas it
    // bundles, offline (tests/e2e/manifests.rs); prometheus-client's parser reads /metrics
    // (tests/e2e/agent.rs); openapi-spec-validator checks the generated OpenAPI document
    // (tests/e2e/openapi.rs).
    ensure_python_package("kubernetes_validate", "kubernetes-validate")?;
    ensure_python_package("prometheus_client", "prometheus-client")?;
    ensure_python_package("openapi_spec_validator", "openapi-spec-validator")?;
    ensure_prometheus()?;
    Ok(())
}

/// Debian's Prometheus server for the metric-gate tests (tests/src/prometheus.rs runs it with its
/// own config, data directory and port). The package's postinst would start a system service on
/// :9090 through invoke-rc.d: the install runs behind a policy-rc.d that forbids it (the one in
/// place, or a temporary one), and a service that started anyway is stopped.
pub fn ensure_prometheus() -> anyhow::Result<()> {
    if succeeds("prometheus", &["--version"]) {
        return Ok(());
    }
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(policy, "#!/bin/sh\n# sockshift xtask: no service starts during this install\nexit 101\n")
            .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = ensure_packages(&["prometheus"]);
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed?;
    if std::path::Path::new("/run/prometheus/prometheus.pid").exists() {
        step("stopping the prometheus system service the package started (the tests run their own)");
        let _ = Command::new("/etc/init.d/prometheus").arg("stop").status();
    }
    Ok(())
}

/// bpffs at /sys/fs/bpf (the agent mounts it too; the tests pin there).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Installs a PyPI package with pip unless `module` already imports.
pub fn ensure_python_package(module: &str, package: &str) -> anyhow::Result<()> {
    if succeeds("python3", &["-c", &format!("import {module}")]) {
        return Ok(());
    }
    if !succeeds("python3", &["-m", "pip", "--version"]) {
        ensure_packages(&["python3", "python3-pip"])?;
    }
    step(&format!("installing the Python package {package} (pip)"));
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", package])
        // Debian's own python3 refuses pip installs outside a venv (PEP 668); older pips ignore
        // this variable.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1"))
}

/// What the benchmark drives: nginx backends, haproxy and iptables as peers, wrk as the client,
/// bpftool for the kernel's program statistics.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    ensure_packages(&["nginx", "haproxy", "wrk", "iptables", "bpftool"])
}

/// What `cargo xtask image` and the DaemonSet test drive: podman with runc (crun refuses this
/// machine's hybrid cgroup layout), catatonit (podman builds its pod infra image from it,
/// offline; without it every `podman kube play` fails) and debootstrap for the image's base.
pub fn ensure_container_tools() -> anyhow::Result<()> {
    ensure_packages(&["podman", "runc", "catatonit", "debootstrap"])
}

/// Writes the project's own podman configuration, `<target>/podman/containers.conf` (rewritten
/// only when its content changes), and points `CONTAINERS_CONF` at it for every podman that
/// xtask and the tests it runs start. Nothing under /etc changes: with `CONTAINERS_CONF` set,
/// podman reads this file instead of the machine's.
pub fn ensure_podman_config(target_dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .context("reading /proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .context("parsing /proc/sys/kernel/pid_max")?;
    // podman's defaults (1048576 for both) exceed this machine's hard limits, and a container
    // whose limit cannot be set fails to start ("error setting rlimit"). podman and conmon were
    // seen running with RLIMIT_NPROC lowered to pid_max (32768, below the shell's 96551), so
    // pid_max bounds nproc too.
    let nofile = hard_limit(&limits, "Max open files").unwrap_or(1024).min(1_048_576);
    let nproc = hard_limit(&limits, "Max processes").unwrap_or(4096).min(pid_max);
    let text = format!(
        "# Written by `cargo xtask` (xtask/src/setup.rs) for the podman it runs, through CONTAINERS_CONF.\n\
         [containers]\n\
         # Within this machine's hard limits: a limit podman cannot set fails every container start.\n\
         default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         \n\
         [engine]\n\
         # crun refuses the hybrid cgroup layout (cgroup v1 controllers, v2 at /sys/fs/cgroup/unified).\n\
         runtime = \"runc\"\n\
         # No systemd to ask for cgroups or to keep the event journal.\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n"
    );
    let dir = target_dir.join("podman");
    let path = dir.join("containers.conf");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        step(&format!("wrote the podman configuration {} (nofile {nofile}, nproc {nproc})", path.display()));
    }
    // Single-threaded here, before any child is started: nothing reads the environment concurrently.
    std::env::set_var("CONTAINERS_CONF", &path);
    Ok(path)
}

/// The hard limit of one row of /proc/self/limits (`Max open files  1024  20000  files`).
fn hard_limit(limits: &str, name: &str) -> Option<u64> {
    let row = limits.lines().find(|line| line.starts_with(name))?;
    let fields: Vec<&str> = row[name.len()..].split_whitespace().collect();
    match fields.get(1)? {
        &"unlimited" => Some(u64::MAX),
        hard => hard.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hard_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             96551                96551                processes \n\
                      Max open files            1024                 20000                files     \n\
                      Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(hard_limit(limits, "Max open files"), Some(20000));
        assert_eq!(hard_limit(limits, "Max processes"), Some(96551));
        assert_eq!(hard_limit(limits, "Max locked memory"), Some(u64::MAX));
        assert_eq!(hard_limit(limits, "Max pending signals"), None);
    }
}
