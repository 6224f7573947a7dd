//! Command-line interface: parses the command line and dispatches. `sockshift agent` runs the
//! daemon (`crate::daemon`), `sockshift uninstall` removes what it pinned; the other verbs call
//! the agent's API and print what it answers (`output`).

mod apply;
mod output;

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    api::types::{
        AuditLog, CanaryUpdate, ClusterStatus, DatapathStatus, RolloutView, ServiceBody, ServiceList, ServiceState,
    },
    client::ApiClient,
    config::{Affinity, KubernetesConfig, PortSelector, Role},
    paths,
    rollout::{
        Approval, GatePolicy, Gates, Plan, RollbackPolicy, DEFAULT_CONFIDENCE, DEFAULT_FAILED_ATTEMPTS_TOLERANCE,
        DEFAULT_RESETS_TOLERANCE,
    },
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
        #[arg(conflicts_with = "cluster")]
        service: Option<String>,
        /// Cluster mode: show the nodes and how far each has applied the desired state.
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Load the `[[service]]` tables of a TOML file (the config file's format): adds what is
    /// missing, replaces what differs, leaves the rest. Idempotent; the way to load services in
    /// cluster mode, through any node.
    Apply {
        /// The file of `[[service]]` tables.
        #[arg(long = "filename", short = 'f')]
        file: PathBuf,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove the services the file does not name.
        #[arg(long)]
        prune: bool,
        /// Answer once every live node of the cluster applied each change (`?wait=cluster`).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set a service's canary weight, in percent (0 to 100, up to 4 decimals).
    Set {
        service: String,
        #[arg(allow_negative_numbers = true, value_parser = parse_percent)]
        percent: f64,
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
    /// Follow the datapath's log records as the agent reads them (`agent.datapath_log`; the
    /// agent's own log holds them too, target `datapath`). Runs until interrupted or the agent
    /// stops.
    Logs {
        /// The datapath's records (the only log this verb follows; the agent's own log is its
        /// standard error: `kubectl logs` or the journal).
        #[arg(long, required = true)]
        datapath: bool,
        /// Only records of this service.
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the API's OpenAPI document (the one the agent serves at /v1/openapi.json).
    Openapi,
    /// Remove the programs, links and pinned maps (the datapath stops steering). Only
    /// sockshift's own pins are removed, from a directory below a bpffs mount.
    Uninstall {
        /// bpffs directory the agent pinned to (agent.bpffs).
        #[arg(long, default_value = paths::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// Also when an agent still uses the directory (it keeps answering but steers nothing,
        /// and pins again at its next start).
        #[arg(long)]
        force: bool,
        /// Also remove the persisted state and audit log in the state directory (otherwise a
        /// reinstalled agent restores the old API changes and rollouts).
        #[arg(long)]
        purge_state: bool,
        /// The agent's state directory (agent.state_dir), for --purge-state.
        #[arg(long, default_value = paths::DEFAULT_STATE_DIR, requires = "purge_state")]
        state_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Add a service, or replace it whole: by addresses (`--frontend`), or by Kubernetes
    /// Services (`--k8s NAMESPACE/SERVICE --stable SERVICE --canary SERVICE`).
    Add {
        /// The service's name; with --k8s it defaults to the frontend Service's name.
        #[arg(required_unless_present = "k8s")]
        name: Option<String>,
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

// Parsed once per run: the size of `Start` costs nothing worth boxing it for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Start a rollout.
    Start {
        service: String,
        /// The whole plan as JSON (as for `POST /v1/services/{name}/rollout`; `-` reads stdin),
        /// e.g. with metric gates and webhook checks; instead of the flags below.
        #[arg(long, conflicts_with_all = ["steps", "every", "confidence", "failed_attempts_tolerance",
            "resets_tolerance", "max_failed_attempt_ratio", "max_reset_ratio", "max_srtt_ratio",
            "max_rto_connection_ratio", "min_connections",
            "no_gates", "failure_threshold", "approval", "webhooks", "terminate_connections"])]
        plan: Option<PathBuf>,
        /// Canary weights in percent, increasing: 1,5,25,50,100.
        #[arg(long, value_delimiter = ',', required_unless_present = "plan")]
        steps: Vec<f64>,
        /// How long each step is held: 60s, 2m, 500ms, or seconds.
        #[arg(long, value_parser = parse_duration_seconds, required_unless_present = "plan")]
        every: Option<f64>,
        /// Confidence of the comparisons with stable (default 0.95).
        #[arg(long)]
        confidence: Option<f64>,
        /// How much higher than stable's the canary's failed-attempt proportion may be (default
        /// 0.02: 2 points).
        #[arg(long)]
        failed_attempts_tolerance: Option<f64>,
        /// How much higher than stable's the canary's reset proportion may be (default 0.02).
        #[arg(long)]
        resets_tolerance: Option<f64>,
        #[arg(long)]
        max_failed_attempt_ratio: Option<f64>,
        #[arg(long)]
        max_reset_ratio: Option<f64>,
        #[arg(long)]
        max_srtt_ratio: Option<f64>,
        /// Most canary connections with a retransmission timeout, per connection established.
        #[arg(long)]
        max_rto_connection_ratio: Option<f64>,
        /// Canary connection attempts a step needs before it is judged.
        #[arg(long, default_value_t = 0)]
        min_connections: u64,
        /// A timed rollout: judge nothing, promote whatever the canary does (`"gates": "none"`).
        #[arg(long, conflicts_with_all = ["confidence", "failed_attempts_tolerance", "resets_tolerance",
            "max_failed_attempt_ratio", "max_reset_ratio", "max_srtt_ratio", "max_rto_connection_ratio"])]
        no_gates: bool,
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

/// "60s", "2m", "500ms", "1h30m" (jiff's friendly durations) or "1.5" (seconds) to seconds.
fn parse_duration_seconds(text: &str) -> Result<f64, String> {
    let seconds = match text.parse::<f64>() {
        Ok(seconds) => seconds,
        Err(_) => text.parse::<jiff::SignedDuration>().map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
    };
    if seconds.is_finite() && seconds > 0.0 {
        Ok(seconds)
    } else {
        Err(format!("{text:?} is not a duration like 60s, 2m or 500ms"))
    }
}

/// A canary weight on the command line: 0 to 100.
fn parse_percent(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|p| p.is_finite() && (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("PERCENT must be a number from 0 to 100, got {text:?}"))
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
    /// Bearer token, when the agent has `[agent.auth]`. Prefer the SOCKSHIFT_TOKEN variable or
    /// --token-file: a value given here is visible to every user in the process list.
    #[arg(long, env = "SOCKSHIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored).
    #[arg(long, env = "SOCKSHIFT_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => self.token.clone(),
        };
        Ok(ApiClient::new(self.api, token))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// No request body.
const NONE: Option<&()> = None;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { config, check } => crate::daemon::run(&config, check),
        Command::Uninstall { bpffs, force, purge_state, state_dir } => {
            uninstall(&bpffs, force)?;
            if purge_state {
                purge_state_dir(&state_dir)?;
            }
            Ok(())
        }
        Command::Openapi => {
            println!("{}", crate::api::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Logs { datapath: _, service, api } => {
            let client = api.client()?;
            let status: DatapathStatus = client.call("GET", "/v1/datapath", NONE)?;
            if status.datapath_log == crate::config::DatapathLog::Off {
                eprintln!(
                    "agent.datapath_log is \"off\": the programs log nothing until it is set to \"info\" (fail-open \
                     events) or \"debug\" (every steering decision) in the agent's config; following anyway"
                );
            }
            let wanted = service.map(|name| format!(" service={name} "));
            let mut stdout = std::io::stdout().lock();
            client.follow_events("/v1/datapath/log", |event, data| {
                if event == "missed" {
                    eprintln!("sockshift: {data} datapath records missed here (this client read too slowly)");
                    return true;
                }
                // A record is `steer service=NAME ...`: match the whole field.
                let shown = wanted.as_ref().is_none_or(|w| format!(" {data} ").contains(w.as_str()));
                // Stop when stdout is gone (a closed pipe).
                !shown || (writeln!(stdout, "{data}").is_ok() && stdout.flush().is_ok())
            })?;
            eprintln!("the agent ended the stream (it stopped or restarted)");
            Ok(())
        }
        Command::Status { cluster: true, api, .. } => {
            let cluster: ClusterStatus = api.client()?.call("GET", "/v1/cluster", NONE)?;
            output::cluster(&cluster, api.output)
        }
        Command::Status { service, api, .. } => {
            let (services, stale, as_of) = match service {
                Some(name) => {
                    let state = api.client()?.call::<ServiceState>("GET", &format!("/v1/services/{name}"), NONE)?;
                    let (stale, as_of) = (state.stale, state.as_of_revision);
                    (vec![state], stale, as_of)
                }
                None => {
                    let list = api.client()?.call::<ServiceList>("GET", "/v1/services", NONE)?;
                    (list.services, list.stale, list.as_of_revision)
                }
            };
            if stale == Some(true) && api.output == Output::Table {
                eprintln!(
                    "stale: etcd cannot be reached; this is the state the node last applied (revision {})",
                    as_of.unwrap_or(0)
                );
            }
            output::services(&services, api.output)
        }
        Command::Apply { file, dry_run, prune, wait, api } => {
            apply::run(&api.client()?, &file, apply::Options { dry_run, prune, wait }, api.output)
        }
        Command::Set { service, percent, api } => {
            let body = CanaryUpdate { percent };
            let state: ServiceState =
                api.client()?.call("PUT", &format!("/v1/services/{service}/canary"), Some(&body))?;
            output::services(&[state], api.output)
        }
        Command::Rollback { service, api } => {
            let state: ServiceState = api.client()?.call("POST", &format!("/v1/services/{service}/rollback"), NONE)?;
            output::services(&[state], api.output)
        }
        Command::Promote { service, api } => {
            let state: ServiceState = api.client()?.call("POST", &format!("/v1/services/{service}/promote"), NONE)?;
            output::services(&[state], api.output)
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
            let (stable, canary, kubernetes) = match &k8s {
                None => (stable, canary, None),
                Some(frontend) => (Vec::new(), Vec::new(), Some(kubernetes_table(frontend, &stable, &canary, &ports)?)),
            };
            // `--k8s shop/web` names the service `web` unless a name is given.
            let name = match (name, &kubernetes) {
                (Some(name), _) => name,
                (None, Some(table)) => table.frontend.clone(),
                (None, None) => bail!("a service name is required (or --k8s NAMESPACE/SERVICE)"),
            };
            let body = ServiceBody {
                name: None,
                frontends,
                stable,
                canary,
                canary_percent: percent,
                affinity: match affinity {
                    AffinityArg::Connection => Affinity::Connection,
                    AffinityArg::Client => Affinity::Client,
                },
                max_operator_percent: Some(max_operator_percent),
                cohorts: Vec::new(),
                kubernetes,
            };
            let state: ServiceState = api.client()?.call("PUT", &format!("/v1/services/{name}"), Some(&body))?;
            output::services(&[state], api.output)
        }
        Command::Service { action: ServiceAction::Rm { name, api } } => {
            let state: ServiceState = api.client()?.call("DELETE", &format!("/v1/services/{name}"), NONE)?;
            if api.output == Output::Json {
                output::json(&state)
            } else {
                println!("removed service {name}");
                Ok(())
            }
        }
        Command::Rollout { action } => run_rollout(action),
        Command::Audit { limit, api } => {
            let log: AuditLog = api.client()?.call("GET", &format!("/v1/audit?limit={limit}"), NONE)?;
            match api.output {
                Output::Json => output::json(&log),
                Output::Table => {
                    output::audit(&log);
                    Ok(())
                }
            }
        }
    }
}

/// The `kubernetes` object of `service add --k8s`: names are checked by the agent, which names
/// the field it refuses.
fn kubernetes_table(
    frontend: &str,
    stable: &[String],
    canary: &[String],
    ports: &[String],
) -> anyhow::Result<KubernetesConfig> {
    let (namespace, service) =
        frontend.split_once('/').with_context(|| format!("--k8s takes NAMESPACE/SERVICE, got {frontend:?}"))?;
    let [stable] = stable else { bail!("with --k8s, give exactly one --stable SERVICE (a Service name)") };
    if canary.len() > 1 {
        bail!("with --k8s, give at most one --canary SERVICE (a Service name)");
    }
    let ports = ports
        .iter()
        .map(|p| p.parse::<i64>().map_or_else(|_| PortSelector::Name(p.clone()), PortSelector::Number))
        .collect();
    Ok(KubernetesConfig {
        namespace: namespace.to_string(),
        frontend: service.to_string(),
        stable: stable.clone(),
        canary: canary.first().cloned(),
        ports,
    })
}

fn run_rollout(action: RolloutAction) -> anyhow::Result<()> {
    let (service, api, path_action) = match &action {
        RolloutAction::Approve { service, api } => (service, api, "approve"),
        RolloutAction::Pause { service, api } => (service, api, "pause"),
        RolloutAction::Resume { service, api } => (service, api, "resume"),
        RolloutAction::Abort { service, api } => (service, api, "abort"),
        RolloutAction::Status { service, watch, api } => loop {
            let rollout: RolloutView = api.client()?.call("GET", &format!("/v1/services/{service}/rollout"), NONE)?;
            if api.output == Output::Json {
                output::json(&rollout)?;
            } else {
                if *watch {
                    print!("\x1b[H\x1b[2J");
                }
                output::rollout(&rollout);
            }
            if !*watch || !rollout.is_active() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        },
        RolloutAction::Start { service, plan: Some(path), api, .. } => {
            let text = if path == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("reading the plan from stdin")?
            } else {
                std::fs::read_to_string(path).with_context(|| format!("reading the plan {}", path.display()))?
            };
            // Sent as written: the agent validates it and names any bad field by its path.
            let plan: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("the plan {} is not JSON", path.display()))?;
            let rollout: RolloutView =
                api.client()?.call("POST", &format!("/v1/services/{service}/rollout"), Some(&plan))?;
            return show_rollout(&rollout, api.output);
        }
        RolloutAction::Start {
            service,
            plan: None,
            steps,
            every,
            confidence,
            failed_attempts_tolerance,
            resets_tolerance,
            max_failed_attempt_ratio,
            max_reset_ratio,
            max_srtt_ratio,
            max_rto_connection_ratio,
            min_connections,
            no_gates,
            failure_threshold,
            approval,
            webhooks,
            terminate_connections,
            api,
        } => {
            let approval = match approval {
                None => None,
                Some(spec) => {
                    let (percent, role) =
                        spec.split_once(':').context("--approval takes PERCENT:ROLE, e.g. 50:release")?;
                    let at_percent: f64 = percent.parse().context("--approval PERCENT must be a number")?;
                    let role: Role =
                        serde_json::from_value(serde_json::Value::String(role.to_string())).with_context(|| {
                            format!("--approval ROLE must be viewer, operator or release, got {role:?}")
                        })?;
                    Some(Approval { at_percent, role })
                }
            };
            let plan = Plan {
                steps: steps.clone(),
                step_seconds: every.context("--every is required without --plan")?,
                gates: if *no_gates {
                    GatePolicy::None
                } else {
                    GatePolicy::Judged(Gates {
                        confidence: confidence.unwrap_or(DEFAULT_CONFIDENCE),
                        failed_attempts_tolerance: failed_attempts_tolerance
                            .unwrap_or(DEFAULT_FAILED_ATTEMPTS_TOLERANCE),
                        resets_tolerance: resets_tolerance.unwrap_or(DEFAULT_RESETS_TOLERANCE),
                        max_failed_attempt_ratio: *max_failed_attempt_ratio,
                        max_reset_ratio: *max_reset_ratio,
                        max_srtt_ratio: *max_srtt_ratio,
                        max_rto_connection_ratio: *max_rto_connection_ratio,
                        min_connections: *min_connections,
                        ..Gates::default()
                    })
                },
                failure_threshold: *failure_threshold,
                approval,
                webhooks: webhooks.clone(),
                rollback: RollbackPolicy { terminate_connections: *terminate_connections },
            };
            let rollout: RolloutView =
                api.client()?.call("POST", &format!("/v1/services/{service}/rollout"), Some(&plan))?;
            return show_rollout(&rollout, api.output);
        }
    };
    let rollout: RolloutView =
        api.client()?.call("POST", &format!("/v1/services/{service}/rollout/{path_action}"), NONE)?;
    show_rollout(&rollout, api.output)
}

/// A rollout as the API answered it: JSON, or the table.
fn show_rollout(rollout: &RolloutView, format: Output) -> anyhow::Result<()> {
    match format {
        Output::Json => output::json(rollout),
        Output::Table => {
            output::rollout(rollout);
            Ok(())
        }
    }
}

/// Detaches and unpins the links (the hooks are empty when this returns), then the maps: only the
/// names sockshift pins (`links/<program>`, `<MAP>_V<n>`), in a directory below a bpffs mount.
/// Anything else found there is left in place and named, and the directory stays.
fn uninstall(bpffs: &Path, force: bool) -> anyhow::Result<()> {
    require_root()?;
    if !bpffs.exists() {
        println!("nothing to remove: {} does not exist", bpffs.display());
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(bpffs).with_context(|| format!("reading {}", bpffs.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory: refusing to touch it", bpffs.display());
    }
    if !paths::is_bpffs(bpffs).with_context(|| format!("statfs {}", bpffs.display()))? {
        bail!("{} is not on a bpffs: refusing to remove anything there (--bpffs names agent.bpffs)", bpffs.display());
    }
    if paths::is_mount_root(bpffs)? {
        bail!(
            "{} is the bpffs mount itself, which holds other tools' pins: refusing (--bpffs names the agent's own \
             directory below it, default {})",
            bpffs.display(),
            paths::DEFAULT_BPFFS_DIR
        );
    }
    let _lock = exclusive_lock(bpffs, force)?;
    let mut left = Vec::new();
    let links = bpffs.join("links");
    if links.is_dir() {
        for entry in std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_file() && paths::is_sockshift_link_pin(&name) {
                crate::datapath::detach_link_pin(&entry.path());
                std::fs::remove_file(entry.path()).with_context(|| format!("unpinning {}", entry.path().display()))?;
                println!("detached {name}");
            } else {
                left.push(entry.path());
            }
        }
        if left.is_empty() {
            std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
        }
    }
    for entry in std::fs::read_dir(bpffs).with_context(|| format!("reading {}", bpffs.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "links" && entry.file_type()?.is_dir() {
            continue;
        }
        if entry.file_type()?.is_file() && paths::is_sockshift_map_pin(&name) {
            std::fs::remove_file(entry.path()).with_context(|| format!("unpinning {}", entry.path().display()))?;
            println!("unpinned {name}");
        } else {
            left.push(entry.path());
        }
    }
    if left.is_empty() && !links.exists() {
        std::fs::remove_dir(bpffs).with_context(|| format!("removing {}", bpffs.display()))?;
        println!("removed {}", bpffs.display());
    } else {
        let shown: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        println!("left in place (not sockshift's): {}", shown.join(", "));
    }
    Ok(())
}

/// Takes the pin directory's lock exclusively: it fails while an agent holds it (shared).
fn exclusive_lock(bpffs: &Path, force: bool) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let dir = std::fs::File::open(bpffs).with_context(|| format!("opening {}", bpffs.display()))?;
    match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) if force => {
            eprintln!("warning: an agent is using {} (--force: removing its pins anyway)", bpffs.display());
            Ok(None)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "a running sockshift agent uses {}: stop it first (it would keep answering while nothing steers), or \
             pass --force",
            bpffs.display()
        ),
        Err((_, errno)) => Err(anyhow::Error::from(errno).context(format!("locking {}", bpffs.display()))),
    }
}

/// Removes the files sockshift keeps in the state directory (state, its backup and set-aside
/// copies, temporary files, the audit log and its rotations), then the directory if empty.
fn purge_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    use crate::{audit::AUDIT_FILE, control::store::file::STATE_FILE};
    if !state_dir.exists() {
        println!("nothing to purge: {} does not exist", state_dir.display());
        return Ok(());
    }
    let ours = |name: &str| {
        name == STATE_FILE
            || name.starts_with(&format!("{STATE_FILE}."))
            || (name.starts_with(&format!(".{STATE_FILE}.")) && name.ends_with(".tmp"))
            || name == AUDIT_FILE
            || name
                .strip_prefix(&format!("{AUDIT_FILE}."))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut left = Vec::new();
    for entry in std::fs::read_dir(state_dir).with_context(|| format!("reading {}", state_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && ours(&name) {
            std::fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
            println!("removed {}", entry.path().display());
        } else {
            left.push(name);
        }
    }
    if left.is_empty() {
        std::fs::remove_dir(state_dir).with_context(|| format!("removing {}", state_dir.display()))?;
        println!("removed {}", state_dir.display());
    } else {
        println!("left in {} (not sockshift's): {}", state_dir.display(), left.join(", "));
    }
    Ok(())
}

/// Fails unless the process can load eBPF programs.
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON)");
    }
    Ok(())
}
