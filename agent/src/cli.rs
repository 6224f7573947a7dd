//! Command-line interface: `sockshift agent` runs the daemon, `sockshift uninstall` removes what
//! it pinned; the other verbs talk to its API.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::{
    api::{self, AppState},
    audit::AuditLog,
    client,
    config::{Affinity, Config},
    control::Core,
    datapath::Datapath,
    paths,
};

#[derive(Debug, Parser)]
#[command(name = "sockshift", version, about = "Socket-layer canary steering for Kubernetes nodes")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: validate the config, load and attach the programs, serve the API.
    Agent {
        /// TOML config file (re-read when it changes and on SIGHUP).
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Show services: weight, backends, and what the kernel counted per side.
    Status {
        service: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set a service's canary weight, in percent (0 to 100, up to 4 decimals).
    Set {
        service: String,
        #[arg(allow_negative_numbers = true)]
        percent: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Kill switch: canary weight to 0 at once.
    Rollback {
        service: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Canary weight to 100.
    Promote {
        service: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Add, replace or remove services at run time.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Show the audit log of accepted changes.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove the programs, links and pinned maps (the datapath stops steering).
    Uninstall {
        /// bpffs directory the agent pinned to (agent.bpffs).
        #[arg(long, default_value = paths::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Add a service, or replace it whole.
    Add {
        name: String,
        /// Frontend `ip:port`, repeatable.
        #[arg(long = "frontend", required = true)]
        frontends: Vec<String>,
        /// Stable backend `ip:port`, repeatable.
        #[arg(long = "stable")]
        stable: Vec<String>,
        /// Canary backend `ip:port`, repeatable.
        #[arg(long = "canary")]
        canary: Vec<String>,
        #[arg(long, default_value_t = 0.0)]
        percent: f64,
        #[arg(long, value_enum, default_value_t = AffinityArg::Connection)]
        affinity: AffinityArg,
        #[arg(long, default_value_t = 100.0)]
        max_operator_percent: f64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a service.
    Rm {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AffinityArg {
    Connection,
    Client,
}

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Address of the agent's API.
    #[arg(long, env = "SOCKSHIFT_API", default_value = paths::DEFAULT_API)]
    pub api: SocketAddr,
    /// Bearer token, when the agent has `[agent.auth]`.
    #[arg(long, env = "SOCKSHIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ApiArgs {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, client::ClientError> {
        client::call(self.api, self.token.as_deref(), method, path, body)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { config, check } => run_agent(&config, check),
        Command::Uninstall { bpffs } => uninstall(&bpffs),
        Command::Status { service, api } => {
            let services = match service {
                Some(name) => vec![api.call("GET", &format!("/v1/services/{name}"), None)?],
                None => api.call("GET", "/v1/services", None)?["services"].as_array().cloned().unwrap_or_default(),
            };
            print_services(&services, api.output);
            Ok(())
        }
        Command::Set { service, percent, api } => {
            let percent: f64 = percent
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && (0.0..=100.0).contains(p))
                .with_context(|| format!("PERCENT must be a number from 0 to 100, got {percent:?}"))?;
            let state = api.call("PUT", &format!("/v1/services/{service}/canary"), Some(&json!({ "percent": percent })))?;
            print_services(&[state], api.output);
            Ok(())
        }
        Command::Rollback { service, api } => {
            let state = api.call("POST", &format!("/v1/services/{service}/rollback"), None)?;
            print_services(&[state], api.output);
            Ok(())
        }
        Command::Promote { service, api } => {
            let state = api.call("POST", &format!("/v1/services/{service}/promote"), None)?;
            print_services(&[state], api.output);
            Ok(())
        }
        Command::Service { action: ServiceAction::Add { name, frontends, stable, canary, percent, affinity, max_operator_percent, api } } => {
            let affinity = match affinity {
                AffinityArg::Connection => Affinity::Connection,
                AffinityArg::Client => Affinity::Client,
            };
            let body = json!({
                "frontends": frontends, "stable": stable, "canary": canary,
                "canary_percent": percent, "affinity": affinity, "max_operator_percent": max_operator_percent,
            });
            let state = api.call("PUT", &format!("/v1/services/{name}"), Some(&body))?;
            print_services(&[state], api.output);
            Ok(())
        }
        Command::Service { action: ServiceAction::Rm { name, api } } => {
            let state = api.call("DELETE", &format!("/v1/services/{name}"), None)?;
            if api.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                println!("removed service {name}");
            }
            Ok(())
        }
        Command::Audit { limit, api } => {
            let log = api.call("GET", &format!("/v1/audit?limit={limit}"), None)?;
            let entries = log["entries"].as_array().cloned().unwrap_or_default();
            if api.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&log)?);
                return Ok(());
            }
            println!("{:<25} {:<14} {:<9} {:<7} ROUTE", "TIME", "TOKEN", "ROLE", "METHOD");
            for e in entries {
                let text = |k: &str| e[k].as_str().unwrap_or("").to_string();
                println!("{:<25} {:<14} {:<9} {:<7} {}", text("time"), text("token"), text("role"), text("method"), text("route"));
            }
            Ok(())
        }
    }
}

fn run_agent(config_path: &Path, check_only: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    if check_only {
        println!("{}: valid, {} services", config_path.display(), config.services.len());
        return Ok(());
    }
    require_root()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        // Bind first: a busy port must fail before anything is attached.
        let listener = tokio::net::TcpListener::bind(config.api)
            .await
            .with_context(|| format!("binding the API to {} (agent.api)", config.api))?;
        let datapath = Datapath::load(&config.cgroup, &config.bpffs).with_context(|| {
            format!("loading the datapath (cgroup {}, bpffs {})", config.cgroup.display(), config.bpffs.display())
        })?;
        let core = Core::start(datapath, &config.state_dir, &config.services, paths::cgroup2_root().ok())
            .context("restoring the desired state into the datapath")?;
        let audit = AuditLog::open(&config.state_dir)
            .with_context(|| format!("opening the audit log in {}", config.state_dir.display()))?;
        log::info!(
            "attached to {}, {} services, API on http://{}{}",
            config.cgroup.display(),
            core.services().len(),
            config.api,
            if config.tokens.is_some() { " (bearer tokens required)" } else { "" }
        );
        let state = Arc::new(AppState {
            core: Mutex::new(core),
            tokens: config.tokens.clone(),
            audit,
            config_path: config_path.to_owned(),
        });

        let reaper = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                reaper.core.lock().expect("core lock").datapath.reap_retired();
            }
        });
        tokio::spawn(watch_config(state.clone(), config));

        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the API")?;
        log::info!("stopped; the pinned datapath keeps steering with the last state");
        Ok(())
    })
}

/// Re-reads the config file when its content changes (a mounted ConfigMap is swapped in place)
/// and on SIGHUP. A file that does not validate is refused with the reason logged; the running
/// state stays.
async fn watch_config(state: Arc<AppState>, initial: Config) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut last = std::fs::read(&state.config_path).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hangup.recv() => true,
        };
        let current = std::fs::read(&state.config_path).ok();
        if !forced && current == last {
            continue;
        }
        last = current;
        match Config::load(&state.config_path) {
            Err(err) => log::error!("config reload refused, keeping the running state: {err}"),
            Ok(config) => {
                if config.api != initial.api || config.cgroup != initial.cgroup || config.bpffs != initial.bpffs || config.state_dir != initial.state_dir {
                    log::warn!("config reload: changes to [agent] take effect at the next restart");
                }
                let services: Vec<_> = config.services.iter().map(|s| s.source.clone()).collect();
                let result = state.core.lock().expect("core lock").reload_file(&services);
                match result {
                    Ok(()) => log::info!("config reloaded: {} services in the file", services.len()),
                    Err(err) => log::error!("config reload refused, keeping the running state: {err}"),
                }
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Unpins the links (which detaches the programs from the cgroup), then the maps.
fn uninstall(bpffs: &Path) -> anyhow::Result<()> {
    require_root()?;
    if !bpffs.exists() {
        println!("nothing to remove: {} does not exist", bpffs.display());
        return Ok(());
    }
    let links = bpffs.join("links");
    if links.exists() {
        for entry in std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))? {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            println!("detached {}", path.file_name().unwrap_or_default().to_string_lossy());
        }
        std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    std::fs::remove_dir_all(bpffs).with_context(|| format!("removing the pinned maps in {}", bpffs.display()))?;
    println!("removed {}", bpffs.display());
    Ok(())
}

fn print_services(services: &[Value], output: Output) {
    if output == Output::Json {
        let value = if services.len() == 1 { services[0].clone() } else { json!({ "services": services }) };
        println!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
        return;
    }
    println!(
        "{:<20} {:>9}  {:>12} {:>12}  {:>8} {:>8}  {:>10} {:>10}",
        "SERVICE", "CANARY %", "STABLE CONN", "CANARY CONN", "S FAIL", "C FAIL", "S SRTT", "C SRTT"
    );
    for s in services {
        let side = |side: &str, key: &str| s["sides"][side][key].as_u64().unwrap_or(0);
        let health = |side: &str, key: &str| s["sides"][side]["health"][key].to_string();
        let srtt = |side: &str| match s["sides"][side]["health"]["srtt_avg_us"].as_u64() {
            Some(us) => format!("{:.2}ms", us as f64 / 1000.0),
            None => "-".to_string(),
        };
        println!(
            "{:<20} {:>9}  {:>12} {:>12}  {:>8} {:>8}  {:>10} {:>10}",
            s["name"].as_str().unwrap_or("?"),
            s["canary_percent"].to_string(),
            side("stable", "connections_steered") + side("stable", "datagrams_steered"),
            side("canary", "connections_steered") + side("canary", "datagrams_steered"),
            health("stable", "failed_attempts"),
            health("canary", "failed_attempts"),
            srtt("stable"),
            srtt("canary"),
        );
    }
}

/// Fails unless the process can load eBPF programs.
pub fn require_root() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON)");
    }
    Ok(())
}
