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
    // iptables: the datapath tests drop SYNs inside their own network namespaces.
    ensure_packages(&["iproute2", "dnsmasq-base", "bind9-dnsutils", "iptables"])?;
    // kubernetes-validate checks config/daemonset.yaml against the Kubernetes schemas it
    // bundles, offline (tests/e2e/manifests.rs); prometheus-client's parser reads /metrics
    // (tests/e2e/agent.rs); openapi-spec-validator checks agent/openapi.json (tests/e2e/openapi.rs).
    ensure_python_package("kubernetes_validate", "kubernetes-validate")?;
    ensure_python_package("prometheus_client", "prometheus-client")?;
    ensure_python_package("openapi_spec_validator", "openapi-spec-validator")?;
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
