//! `cargo xtask`: set-up, build, image, test and demo commands. Each performs every missing set-up
//! step first, idempotently, so that it works as the first command run on a fresh machine.

mod image;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Xtask {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (bpf-linker, rust-src, test tools) and build the eBPF programs.
    BuildEbpf,
    /// Run every test: unit tests and the end-to-end tests against the real kernel (root).
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check formatting (nightly rustfmt, for the import-grouping options) and clippy with
    /// warnings denied; no root needed.
    Lint,
    /// Fuzz the agent's inputs (config file, request bodies, persisted state, rollout plans)
    /// with proptest on the stable toolchain; a failure prints the shrunk input and the seed.
    Fuzz {
        /// Seconds per target (`cargo xtask test` runs each for 15).
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Only this target: config, bodies, state, plans.
        #[arg(long)]
        target: Option<String>,
        /// Replay a run with this seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run the demo: a namespace, a stable and a canary backend, the agent, a live split.
    Demo,
    /// Build the runtime image with podman, pulling nothing: a debootstrap Debian base from this
    /// machine's mirror (cached in target/image), the Dockerfile's runtime packages and layout,
    /// and the release binary (root).
    Image,
    /// Benchmark sockshift against direct, iptables and haproxy (root); results in target/bench.
    Bench {
        /// Only check that every section works (seconds, not minutes).
        #[arg(long)]
        smoke: bool,
        /// Output directory.
        #[arg(long, default_value = "target/bench")]
        out: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Xtask::parse().command {
        Task::BuildEbpf => {
            setup::ensure_toolchain()?;
            cargo(&["build", "--package", "agent"]).context("building the agent and its eBPF programs")?;
            println!("eBPF programs built and embedded in target/debug/sockshift");
        }
        Task::Test { args } => {
            prepare_root_run("cargo xtask test", Profile::Debug)?;
            if runs_daemonset_test(&args) {
                // tests/e2e/daemonset.rs runs this image in podman, with this configuration.
                setup::ensure_container_tools()?;
                setup::ensure_podman_config(&target_dir())?;
                let image = image::build(&workspace_root(), &target_dir())?;
                // Single-threaded, before the tests start: nothing reads the environment concurrently.
                std::env::set_var("SOCKSHIFT_IMAGE", image);
            }
            let mut test_args = vec!["test", "--no-fail-fast"];
            test_args.extend(args.iter().map(String::as_str));
            cargo(&test_args).context("tests failed")?;
            if args.is_empty() {
                // Every fuzz target for a bounded time (four targets, one minute in all).
                fuzz(FUZZ_SECONDS_IN_TEST, None, None).context("fuzzing")?;
                // The benchmark is not a timed test: this only checks that it runs.
                setup::ensure_bench_tools()?;
                println!("benchmark smoke run (checks that `cargo xtask bench` works, not how fast)");
                run_binary("target/debug/sockshift-bench", &["--smoke", "--out", "target/bench-smoke"])?;
            }
        }
        Task::Bench { smoke, out } => {
            setup::ensure_bench_tools()?;
            setup::ensure_python_package("matplotlib", "matplotlib")?;
            prepare_root_run("cargo xtask bench", Profile::Release)?;
            let mut args = vec!["--out", out.as_str()];
            if smoke {
                args.push("--smoke");
            }
            run_binary("target/release/sockshift-bench", &args)?;
        }
        Task::Image => {
            require_root("cargo xtask image")?;
            setup::ensure_toolchain()?;
            setup::ensure_container_tools()?;
            setup::ensure_podman_config(&target_dir())?;
            let name = image::build(&workspace_root(), &target_dir())?;
            println!(
                "built {name}, tagged {}; run it with podman using CONTAINERS_CONF={}",
                image::IMAGE,
                target_dir().join("podman/containers.conf").display()
            );
        }
        Task::Lint => lint()?,
        Task::Fuzz { seconds, target, seed } => fuzz(seconds, target, seed)?,
        Task::Demo => {
            prepare_root_run("cargo xtask demo", Profile::Debug)?;
            cargo(&["run", "--quiet", "--package", "e2e", "--bin", "sockshift-demo"])?;
        }
    }
    Ok(())
}

/// `cargo fmt --check` with the nightly rustfmt (rustfmt.toml's `group_imports` and
/// `imports_granularity` are unstable options) and clippy on every host crate, warnings denied.
fn lint() -> anyhow::Result<()> {
    // Clippy builds the agent, whose build script builds the eBPF programs.
    setup::ensure_toolchain()?;
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fmt", "--all", "--check"])
        .status()
        .context("running rustup run nightly cargo fmt")?;
    if !status.success() {
        bail!("formatting differs from rustfmt.toml: run `cargo +nightly fmt --all`");
    }
    cargo(&["clippy", "--workspace", "--exclude", "agent-ebpf", "--all-targets", "--", "-D", "warnings"])
        .context("clippy found warnings")
}

/// Seconds per fuzz target in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 15;

/// Runs the fuzz targets (crate `sockshift-fuzz`, proptest on stable: nothing to install).
fn fuzz(seconds: u64, target: Option<String>, seed: Option<u64>) -> anyhow::Result<()> {
    let seconds = seconds.to_string();
    let mut args = vec!["run", "--quiet", "--package", "sockshift-fuzz", "--", "--seconds", &seconds];
    if let Some(target) = &target {
        args.extend(["--target", target.as_str()]);
    }
    let seed = seed.map(|s| s.to_string());
    if let Some(seed) = &seed {
        args.extend(["--seed", seed.as_str()]);
    }
    cargo(&args).context("a fuzz target failed (the input and seed are printed above)")
}

/// Whether `cargo xtask test ARGS` runs tests/e2e/daemonset.rs (it needs the image): every run
/// without `--test`, and `--test daemonset`.
fn runs_daemonset_test(args: &[String]) -> bool {
    let selected: Vec<&str> = args
        .iter()
        .enumerate()
        .filter_map(|(i, arg)| match arg.strip_prefix("--test=") {
            Some(name) => Some(name),
            None if arg == "--test" => args.get(i + 1).map(String::as_str),
            None => None,
        })
        .collect();
    selected.is_empty() || selected.contains(&"daemonset")
}

/// The workspace root (xtask's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent").to_owned()
}

/// Cargo's target directory: CARGO_TARGET_DIR, or target/ at the workspace root.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

#[derive(Clone, Copy, PartialEq)]
enum Profile {
    Debug,
    Release,
}

/// What every root command needs first: root, the eBPF toolchain, the tools the tests and demo
/// drive, bpffs, and the agent and test binaries built.
fn prepare_root_run(what: &str, profile: Profile) -> anyhow::Result<()> {
    require_root(what)?;
    setup::ensure_toolchain()?;
    setup::ensure_test_tools()?;
    setup::ensure_bpffs()?;
    let mut args = vec!["build", "--package", "agent", "--package", "e2e", "--bins"];
    if profile == Profile::Release {
        args.push("--release");
    }
    cargo(&args).context("building sockshift, the probe, the demo and the benchmark")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    let uid = Command::new("id").arg("-u").output().context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("{what} loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

fn run_binary(path: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(path).args(args).status().with_context(|| format!("running {path}"))?;
    if !status.success() {
        bail!("{path} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs cargo with the stable toolchain of this workspace, inheriting output.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
