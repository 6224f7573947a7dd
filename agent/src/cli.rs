//! Command-line interface: `sockshift agent` runs the daemon; the other verbs talk to its API.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::{
    api::{self, AppState},
    client,
    config::Config,
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
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Set a service's canary weight, in percent (0 to 100, up to 4 decimals).
    Set {
        service: String,
        #[arg(allow_negative_numbers = true)]
        percent: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show services: weight, backends, and what the kernel counted per side.
    Status {
        service: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Address of the agent's API.
    #[arg(long, env = "SOCKSHIFT_API", default_value = paths::DEFAULT_API, global = true)]
    pub api: SocketAddr,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { config, check } => run_agent(&config, check),
        Command::Set { service, percent, api } => {
            let percent: f64 = percent
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && (0.0..=100.0).contains(p))
                .with_context(|| format!("PERCENT must be a number from 0 to 100, got {percent:?}"))?;
            let state = client::call(
                api.api,
                "PUT",
                &format!("/v1/services/{service}/canary"),
                Some(&json!({ "percent": percent })),
            )?;
            print_services(&[state], api.output);
            Ok(())
        }
        Command::Status { service, api } => {
            let services = match service {
                Some(name) => vec![client::call(api.api, "GET", &format!("/v1/services/{name}"), None)?],
                None => client::call(api.api, "GET", "/v1/services", None)?["services"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            };
            print_services(&services, api.output);
            Ok(())
        }
    }
}

fn run_agent(config_path: &std::path::Path, check_only: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    if check_only {
        println!("{}: valid, {} services", config_path.display(), config.services.len());
        return Ok(());
    }
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
        let mut datapath = Datapath::load(&config.cgroup, &config.bpffs).with_context(|| {
            format!("loading the datapath (cgroup {}, bpffs {})", config.cgroup.display(), config.bpffs.display())
        })?;
        datapath.sync(&config.services).context("writing the services into the datapath")?;
        log::info!(
            "attached to {}, {} services, API on http://{}",
            config.cgroup.display(),
            config.services.len(),
            config.api
        );
        let state = Arc::new(AppState {
            datapath: Mutex::new(datapath),
            cgroup_root: paths::cgroup2_root().ok(),
        });

        let reaper_state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                reaper_state.datapath.lock().expect("datapath lock").reap_retired();
            }
        });

        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the API")?;
        log::info!("shutting down");
        Ok(())
    })
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
        bail!("sockshift agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)");
    }
    Ok(())
}
