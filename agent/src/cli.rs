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
    /// Progressive rollouts: weight steps gated by the canary's kernel-measured health.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
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
    /// Add a service, or replace it whole: by addresses (`--frontend`), or by Kubernetes
    /// Services (`--k8s NAMESPACE/SERVICE --stable SERVICE --canary SERVICE`).
    Add {
        name: String,
        /// Frontend `ip:port`, repeatable.
        #[arg(long = "frontend", required_unless_present = "k8s")]
        frontends: Vec<String>,
        /// Stable backend `ip:port`, repeatable; with --k8s: the stable Service's name.
        #[arg(long = "stable")]
        stable: Vec<String>,
        /// Canary backend `ip:port`, repeatable; with --k8s: the canary Service's name.
        #[arg(long = "canary")]
        canary: Vec<String>,
        /// Frontend Service NAMESPACE/NAME: its ClusterIPs and ports are the frontends, and the
        /// ready endpoints of --stable and --canary (Service names) the backends.
        #[arg(long, conflicts_with = "frontends")]
        k8s: Option<String>,
        /// With --k8s: a Service port to steer, by name or number; repeatable; default all.
        #[arg(long = "port", requires = "k8s")]
        ports: Vec<String>,
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

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Start a rollout.
    Start {
        service: String,
        /// Canary weights in percent, increasing: 1,5,25,50,100.
        #[arg(long, value_delimiter = ',', required = true)]
        steps: Vec<f64>,
        /// How long each step is held: 60s, 2m, 500ms, or seconds.
        #[arg(long, value_parser = parse_duration_seconds)]
        every: f64,
        #[arg(long)]
        max_failed_attempt_ratio: Option<f64>,
        #[arg(long)]
        max_reset_ratio: Option<f64>,
        #[arg(long)]
        max_srtt_ratio: Option<f64>,
        /// Canary connection attempts a step needs before it is judged.
        #[arg(long, default_value_t = 0)]
        min_connections: u64,
        /// Failed checks in a row before rolling back.
        #[arg(long, default_value_t = 1)]
        failure_threshold: u32,
        /// PERCENT:ROLE: steps at or above PERCENT wait for an approver with ROLE.
        #[arg(long)]
        approval: Option<String>,
        /// http:// URL notified on each step, pause, promotion and rollback; repeatable.
        #[arg(long = "webhook")]
        webhooks: Vec<String>,
        /// Close the canary's established TCP connections on rollback.
        #[arg(long)]
        terminate_connections: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a rollout: steps, gate readings, observed split.
    Status {
        service: String,
        /// Redraw every second until the rollout ends.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve the step a rollout waits at.
    Approve {
        service: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pause: the weight stays, the step clock stops.
    Pause {
        service: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resume a paused rollout where its clock stopped.
    Resume {
        service: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop the rollout and return all traffic to stable.
    Abort {
        service: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// "60s", "2m", "500ms", "1.5" (seconds) to seconds.
fn parse_duration_seconds(text: &str) -> Result<f64, String> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, 1.0)
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0)
        .map(|n| n * scale)
        .ok_or_else(|| format!("{text:?} is not a duration like 60s, 2m or 500ms"))
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
            let state =
                api.call("PUT", &format!("/v1/services/{service}/canary"), Some(&json!({ "percent": percent })))?;
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
        Command::Service {
            action:
                ServiceAction::Add {
                    name,
                    frontends,
                    stable,
                    canary,
                    k8s,
                    ports,
                    percent,
                    affinity,
                    max_operator_percent,
                    api,
                },
        } => {
            let affinity = match affinity {
                AffinityArg::Connection => Affinity::Connection,
                AffinityArg::Client => Affinity::Client,
            };
            let mut body = json!({
                "canary_percent": percent, "affinity": affinity, "max_operator_percent": max_operator_percent,
            });
            match k8s {
                None => {
                    body["frontends"] = json!(frontends);
                    body["stable"] = json!(stable);
                    body["canary"] = json!(canary);
                }
                Some(frontend) => body["kubernetes"] = kubernetes_body(&frontend, &stable, &canary, &ports)?,
            }
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
        Command::Rollout { action } => run_rollout(action),
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
                println!(
                    "{:<25} {:<14} {:<9} {:<7} {}",
                    text("time"),
                    text("token"),
                    text("role"),
                    text("method"),
                    text("route")
                );
            }
            Ok(())
        }
    }
}

/// The `kubernetes` object of `service add --k8s`: names are checked by the agent, which names
/// the field it refuses.
fn kubernetes_body(frontend: &str, stable: &[String], canary: &[String], ports: &[String]) -> anyhow::Result<Value> {
    let (namespace, service) =
        frontend.split_once('/').with_context(|| format!("--k8s takes NAMESPACE/SERVICE, got {frontend:?}"))?;
    let [stable] = stable else { bail!("with --k8s, give exactly one --stable SERVICE (a Service name)") };
    if canary.len() > 1 {
        bail!("with --k8s, give at most one --canary SERVICE (a Service name)");
    }
    let ports: Vec<Value> =
        ports.iter().map(|p| p.parse::<i64>().map_or_else(|_| json!(p), |number| json!(number))).collect();
    let mut body = json!({ "namespace": namespace, "frontend": service, "stable": stable, "ports": ports });
    if let Some(canary) = canary.first() {
        body["canary"] = json!(canary);
    }
    Ok(body)
}

fn run_rollout(action: RolloutAction) -> anyhow::Result<()> {
    let (service, api, path_action) = match &action {
        RolloutAction::Approve { service, api } => (service, api, "approve"),
        RolloutAction::Pause { service, api } => (service, api, "pause"),
        RolloutAction::Resume { service, api } => (service, api, "resume"),
        RolloutAction::Abort { service, api } => (service, api, "abort"),
        RolloutAction::Status { service, watch, api } => loop {
            let rollout = api.call("GET", &format!("/v1/services/{service}/rollout"), None)?;
            if api.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&rollout)?);
            } else {
                if *watch {
                    print!("\x1b[H\x1b[2J");
                }
                print_rollout(&rollout);
            }
            let active = matches!(rollout["state"].as_str(), Some("running" | "paused" | "awaiting_approval"));
            if !*watch || !active {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        },
        RolloutAction::Start {
            service,
            steps,
            every,
            max_failed_attempt_ratio,
            max_reset_ratio,
            max_srtt_ratio,
            min_connections,
            failure_threshold,
            approval,
            webhooks,
            terminate_connections,
            api,
        } => {
            let approval = match approval {
                None => Value::Null,
                Some(spec) => {
                    let (percent, role) =
                        spec.split_once(':').context("--approval takes PERCENT:ROLE, e.g. 50:release")?;
                    let percent: f64 = percent.parse().context("--approval PERCENT must be a number")?;
                    json!({ "at_percent": percent, "role": role })
                }
            };
            let mut plan = json!({
                "steps": steps,
                "step_seconds": every,
                "gates": {
                    "max_failed_attempt_ratio": max_failed_attempt_ratio,
                    "max_reset_ratio": max_reset_ratio,
                    "max_srtt_ratio": max_srtt_ratio,
                    "min_connections": min_connections,
                },
                "failure_threshold": failure_threshold,
                "webhooks": webhooks,
                "rollback": { "terminate_connections": terminate_connections },
            });
            if !approval.is_null() {
                plan["approval"] = approval;
            }
            let rollout = api.call("POST", &format!("/v1/services/{service}/rollout"), Some(&plan))?;
            if api.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&rollout)?);
            } else {
                print_rollout(&rollout);
            }
            return Ok(());
        }
    };
    let rollout = api.call("POST", &format!("/v1/services/{service}/rollout/{path_action}"), None)?;
    if api.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rollout)?);
    } else {
        print_rollout(&rollout);
    }
    Ok(())
}

/// A rollout for people: a bar of the steps, the gate readings and the observed split.
fn print_rollout(r: &Value) {
    let steps: Vec<f64> =
        r["steps"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
    let step = r["step"].as_u64().unwrap_or(0) as usize;
    let state = r["state"].as_str().unwrap_or("?");
    let done = |i: usize| i < step || state == "promoted";
    let bar: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mark = if done(i) {
                "✓"
            } else if i == step && state != "rolled_back" && state != "aborted" {
                "▶"
            } else {
                " "
            };
            format!("{mark}{p}%")
        })
        .collect();
    let filled = steps.iter().enumerate().filter(|(i, _)| done(*i)).count();
    println!(
        "{}  rollout {state}  step {}/{}  weight {} %  window {:.1}s/{}s",
        r["service"].as_str().unwrap_or("?"),
        (step + 1).min(steps.len()),
        steps.len(),
        r["percent"],
        r["window_elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        r["step_seconds"],
    );
    println!("  [{}{}]  {}", "■".repeat(filled), "□".repeat(steps.len() - filled), bar.join("  "));
    if let Some(role) = r["awaiting_role"].as_str() {
        println!(
            "  waiting for approval by a {role} token: sockshift rollout approve {}",
            r["service"].as_str().unwrap_or("")
        );
    }
    let gates = &r["plan"]["gates"];
    let show = |label: &str, key: &str, window: &Value| {
        let reading = window[key].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
        let limit = gates[format!("max_{key}")].as_f64().map_or("none".to_string(), |v| v.to_string());
        format!("{label} {reading} (max {limit})")
    };
    for (title, window) in [("this window", &r["current_window"]), ("last judged", &r["last_gates"])] {
        if window.is_null() {
            continue;
        }
        println!(
            "  {title:<12} {}  {}  {}  canary attempts {} (min {})  observed canary {}",
            show("failed-attempt ratio", "failed_attempt_ratio", window),
            show("reset ratio", "reset_ratio", window),
            show("srtt ratio", "srtt_ratio", window),
            window["canary_attempts"],
            gates["min_connections"],
            window["observed_canary_percent"].as_f64().map_or("-".to_string(), |v| format!("{v:.1} %")),
        );
    }
    if let Some(n) = r["terminated_connections"].as_u64() {
        println!("  closed {n} canary connections on rollback");
    }
    if let Some(last) = r["history"].as_array().and_then(|h| h.last()) {
        println!("  last event: {} {}", last["event"].as_str().unwrap_or(""), last["detail"].as_str().unwrap_or(""));
    }
}

fn run_agent(config_path: &Path, check_only: bool) -> anyhow::Result<()> {
    // Read before loading: a change made after this point is always seen as a change.
    let loaded_bytes = std::fs::read(config_path).ok();
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
        let discovery_wanted = core.discovery().subscribe();
        let audit = AuditLog::open(&config.state_dir)
            .with_context(|| format!("opening the audit log in {}", config.state_dir.display()))?;
        log::info!(
            "attached to {}, {} services, API on http://{}{}",
            config.cgroup.display(),
            core.services().len(),
            config.api,
            if config.tokens.is_some() { " (bearer tokens required)" } else { "" }
        );
        let (follow_tx, follow_rx) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(AppState {
            core: Mutex::new(core),
            follow_ups: follow_tx,
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
        tokio::spawn(drive_rollouts(state.clone()));
        tokio::spawn(carry_out_follow_ups(state.clone(), follow_rx, config.cgroup.clone()));
        let discovery_state = state.clone();
        tokio::spawn(crate::discovery::run(discovery_wanted, config.kubeconfig.clone(), move |name, update| {
            discovery_state.core.lock().expect("core lock").set_discovered(name, update)
        }));
        tokio::spawn(watch_config(state.clone(), config, loaded_bytes));

        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the API")?;
        log::info!("stopped; the pinned datapath keeps steering with the last state");
        Ok(())
    })
}

/// Ticks every rollout's clock; the core decides, this only keeps time.
async fn drive_rollouts(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let follow = state.core.lock().expect("core lock").tick_rollouts();
        for item in follow {
            let _ = state.follow_ups.send(item);
        }
    }
}

/// Webhooks and connection termination, away from the core's lock and the API's threads.
async fn carry_out_follow_ups(
    state: Arc<AppState>,
    mut follow_ups: tokio::sync::mpsc::UnboundedReceiver<crate::control::FollowUp>,
    cgroup: PathBuf,
) {
    use crate::control::FollowUp;
    while let Some(item) = follow_ups.recv().await {
        match item {
            FollowUp::Notify { service, event, webhooks, payload } => {
                for url in webhooks {
                    let payload = payload.clone();
                    let service = service.clone();
                    let event = event.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(err) = post_webhook(&url, &payload) {
                            log::warn!("webhook {url} ({service} {event}): {err}");
                        }
                    });
                }
            }
            FollowUp::TerminateCanary { service, backends } => {
                let cgroup = cgroup.clone();
                let result =
                    tokio::task::spawn_blocking(move || crate::terminate::terminate_connections(&cgroup, &backends))
                        .await;
                match result {
                    Ok(Ok(count)) => {
                        log::info!("service {service}: closed {count} canary connections after rollback");
                        state.core.lock().expect("core lock").note_terminated(&service, count);
                    }
                    Ok(Err(err)) => log::error!("service {service}: closing canary connections: {err}"),
                    Err(err) => log::error!("service {service}: closing canary connections: {err}"),
                }
            }
        }
    }
}

fn post_webhook(url: &str, payload: &Value) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let (authority, path) = crate::rollout::parse_http_url(url).map_err(anyhow::Error::msg)?;
    let addr = authority.to_socket_addrs()?.next().context("webhook host did not resolve")?;
    let response = client::request(addr, None, "POST", &path, Some(payload))?;
    if !(200..300).contains(&response.status) {
        bail!("answered HTTP {}", response.status);
    }
    Ok(())
}

/// Re-reads the config file when its content changes (a mounted ConfigMap is swapped in place)
/// and on SIGHUP. A file that does not validate is refused with the reason logged; the running
/// state stays.
async fn watch_config(state: Arc<AppState>, initial: Config, loaded_bytes: Option<Vec<u8>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut last = loaded_bytes;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hangup.recv() => true,
        };
        let mut current = std::fs::read(&state.config_path).ok();
        if !forced && current == last {
            continue;
        }
        // An editor or `cp` writing the file in place is seen half-way (even empty, which would
        // parse as "no services"): apply only content that holds still for a moment.
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let again = std::fs::read(&state.config_path).ok();
            if again == current {
                break;
            }
            current = again;
        }
        last = current;
        match Config::load(&state.config_path) {
            Err(err) => log::error!("config reload refused, keeping the running state: {err}"),
            Ok(config) => {
                if config.api != initial.api
                    || config.cgroup != initial.cgroup
                    || config.bpffs != initial.bpffs
                    || config.state_dir != initial.state_dir
                {
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
        if let Some(kubernetes) = s["kubernetes"].as_object() {
            let text = |key: &str| kubernetes.get(key).and_then(Value::as_str).unwrap_or("");
            println!(
                "  kubernetes {}/{}: {}{}",
                text("namespace"),
                text("frontend"),
                text("state"),
                kubernetes.get("message").and_then(Value::as_str).map(|m| format!(" ({m})")).unwrap_or_default()
            );
        }
    }
}

/// Fails unless the process can load eBPF programs.
pub fn require_root() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON)");
    }
    Ok(())
}
