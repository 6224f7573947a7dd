//! The control core: the one owner of the desired state and of the datapath that enforces it.
//!
//! It runs on a thread of its own ([`spawn`]) and applies [`Command`]s one at a time, in the
//! order they arrive, from every source: the API handlers, the config-file watcher, the rollout
//! driver, the revision reaper, Kubernetes discovery and, in cluster mode, the store's change
//! stream. Each command
//! carries a reply channel; a handler awaits the reply and never blocks a runtime worker on the
//! datapath's syscalls or the store's fsyncs. A change is validated whole, committed to the
//! [`store::Store`] with its audit entry, then applied to the datapath (see `store` for the
//! order and what happens on failure), and only then answered.
//!
//! Kubernetes discovery is the one source that is not desired state: the addresses it finds are
//! facts of this node (each node watches for itself, like kube-proxy). The core keeps them in
//! its [`Discovery`], overlays them on the services that have a `kubernetes` table whenever
//! those reach the datapath, and never commits them to the store.

mod core;
pub mod store;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use self::core::check_rollout;
use self::{
    core::Core,
    store::{AuditSource, RemoteChange, Revision, Store, StoreError},
};
use crate::{
    api::types::{DatapathStatus, RolloutView, ServiceBody, ServiceState},
    config::{InvalidField, Role, ServiceConfig, ServiceSpec},
    datapath::{Datapath, DatapathError, ServiceCounters, Termination},
    discovery::{Discovered, Discovery},
    gates::{
        checks::{CheckResult, WebhookCheck},
        metric::{MetricGate, OnMissing, Reading},
    },
    rollout::{GateDue, Plan},
};

/// How many commands may wait for the core. A full queue answers 503 at once rather than pile up.
const QUEUE: usize = 1024;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0)
}

/// Who asks for a change, as the API established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (`anonymous` without authentication).
    pub name: String,
    pub role: Role,
}

/// Where a change came from, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub caller: Caller,
    /// The request's HTTP method.
    pub method: String,
    /// The request's path.
    pub route: String,
}

/// The three ways a caller changes a weight by hand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightChange {
    /// `PUT .../canary`: refused while a rollout drives the weight.
    Set(f64),
    /// `POST .../promote`: 100 %, likewise refused during a rollout.
    Promote,
    /// `POST .../rollback`: 0 % whatever else is going on; ends an active rollout.
    KillSwitch,
}

/// What a caller does to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    Pause,
    Resume,
    Approve,
    Abort,
}

impl std::fmt::Display for RolloutAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Approve => "approve",
            Self::Abort => "abort",
        })
    }
}

/// Per-service figures for `/metrics`, rendered outside the core.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub name: String,
    pub canary_percent: f64,
    pub counters: ServiceCounters,
    /// Set for a Kubernetes service once discovery has reported on it.
    pub kubernetes: Option<KubernetesMetrics>,
}

/// A Kubernetes service's discovery figures.
#[derive(Debug, Clone, Copy)]
pub struct KubernetesMetrics {
    /// The API server does not answer: the service steers with the last state it gave.
    pub stale: bool,
    /// Backend-set switches discovery made since the agent started.
    pub changes_applied: u64,
}

pub type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// Everything the core does, each with its reply.
#[derive(Debug)]
pub enum Command {
    /// Answers at once: the core is alive and not stuck.
    Ping {
        reply: oneshot::Sender<()>,
    },
    Services {
        reply: Reply<Vec<ServiceState>>,
    },
    Service {
        name: String,
        reply: Reply<ServiceState>,
    },
    Rollout {
        name: String,
        reply: Reply<RolloutView>,
    },
    Datapath {
        reply: Reply<DatapathStatus>,
    },
    Metrics {
        reply: Reply<Vec<ServiceMetrics>>,
    },
    SetWeight {
        name: String,
        change: WeightChange,
        origin: Origin,
        reply: Reply<ServiceState>,
    },
    /// Adds or replaces service `name` (`true`: added). A body that leaves `max_operator_percent`
    /// out keeps the replaced service's.
    PutService {
        name: String,
        body: ServiceBody,
        origin: Origin,
        reply: Reply<(bool, ServiceState)>,
    },
    /// Removes a service (and its rollout); answers its last state.
    DeleteService {
        name: String,
        origin: Origin,
        reply: Reply<ServiceState>,
    },
    StartRollout {
        name: String,
        plan: Plan,
        origin: Origin,
        reply: Reply<RolloutView>,
    },
    RolloutAction {
        name: String,
        action: RolloutAction,
        origin: Origin,
        reply: Reply<RolloutView>,
    },
    /// A reloaded config's `agent.datapath_log`: the programs are replaced in place.
    SetDatapathLog {
        level: crate::config::DatapathLog,
        reply: Reply<()>,
    },
    /// The config file now holds these services (validated); answers how many.
    ReloadFile {
        services: Vec<ServiceConfig>,
        reply: Reply<usize>,
    },
    /// The rollout driver's clock; answers what the driver must read for the running rollouts'
    /// metric gates and webhook checks (network I/O, done outside the core).
    TickRollouts {
        reply: Reply<Vec<GateWork>>,
    },
    /// What the driver read for a rollout's window: the core judges it.
    GateInput {
        name: String,
        /// [`GateWork::window`] of the work the readings answer.
        window: u64,
        input: GateInput,
    },
    /// Deletes backend revisions past their grace period.
    ReapRetired,
    /// What terminating a rolled-back canary's connections did.
    NoteTerminated {
        name: String,
        count: usize,
    },
    /// A request the API refused, for the audit log (see `api::guard`).
    AuditRefusal {
        entry: Box<crate::audit::AuditEntry>,
    },
    /// Kubernetes discovery's one way in: what it found for service `name` (sent only when it
    /// changed). Applied as one backend-set switch when the service's addresses differ from
    /// what the datapath holds; never committed to the store.
    SetDiscovered {
        name: String,
        discovered: Box<Discovered>,
    },
}

/// What the rollout driver must read for one running rollout: the plan's metric gates and
/// webhook checks and the values their queries and calls need.
#[derive(Debug, Clone)]
pub struct GateWork {
    pub service: String,
    /// The rollout's window (see [`crate::rollout::Rollout::window`]); readings are sent back
    /// with it and ignored if the rollout has moved on.
    pub window: u64,
    pub due: GateDue,
    pub step: usize,
    pub percent: f64,
    pub step_seconds: f64,
    pub metrics: Vec<MetricGate>,
    pub on_missing: OnMissing,
    pub checks: Vec<WebhookCheck>,
    /// The rollout's state as the webhook checks get it (for [`GateDue::Judge`]; `null` else).
    pub state: serde_json::Value,
}

/// Readings the rollout driver took.
#[derive(Debug, Clone)]
pub enum GateInput {
    /// In-window metric readings, in plan order.
    Poll(Vec<Reading>),
    /// The end-of-window judgement: metric readings, and the webhook checks' results (empty when
    /// a metric gate did not pass, so they were not called).
    Judge { metrics: Vec<Reading>, checks: Vec<CheckResult> },
}

/// Work a change asks for that happens outside the core, after the change is committed.
#[derive(Debug)]
pub enum FollowUp {
    /// POST the rollout's state to its webhooks.
    Notify { service: String, event: String, webhooks: Vec<String>, payload: serde_json::Value },
    /// Wait for the termination of the connections the datapath steered to a rolled-back
    /// canary (TCP and connected UDP, destroyed on the datapath's termination worker, bounded by
    /// `datapath::TERMINATION_TIMEOUT`) and record how many there were.
    TerminateCanary { service: String, termination: Termination },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error("frontend {frontend} already belongs to service {owner:?}")]
    FrontendInUse { frontend: SocketAddr, owner: String },
    #[error(
        "service {0:?} has an active rollout driving its weight: abort it first, or use the kill switch (rollback)"
    )]
    RolloutActive(String),
    #[error("service {0:?} has no rollout")]
    NoRollout(String),
    #[error("the rollout of {service:?} is {state}; {action} needs {needed}")]
    RolloutState { service: String, state: String, action: RolloutAction, needed: &'static str },
    /// The caller's role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// A plan that would take the weight past what the caller's role may set on its own.
    #[error("{}", .0.message)]
    Delegation(InvalidField),
    /// The store refused or failed the commit; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The datapath refused the change; it and the store were put back as they were.
    #[error("the datapath refused the change (nothing changed): {0}")]
    Datapath(#[from] DatapathError),
    /// Cluster mode: the change is committed for the whole cluster (other nodes apply it), but
    /// this node's datapath refused it. This node keeps its previous state for it and reports
    /// itself unhealthy until a later change applies.
    #[error(
        "the change is committed to the cluster (revision {revision}) but this node's datapath refused it, so this \
         node keeps its previous state for it and reports itself unhealthy: {error}"
    )]
    NotAppliedHere { revision: Revision, error: String },
    /// The core did not answer within the bound: it may be stuck in I/O.
    #[error("the control core did not answer within {0:?}; a change sent now may still be applied later")]
    CoreStuck(Duration),
    /// The core has stopped (it panicked, or the agent is shutting down).
    #[error("the control core has stopped")]
    CoreDead,
}

/// Faults an end-to-end test can inject to prove `/healthz` sees a dead core or task. Off unless
/// `SOCKSHIFT_FAULT_INJECTION` is set (the agent then says so loudly at start); never set it in
/// production. Syntax: comma-separated `core-panic-on=<service>` (the core panics on a command
/// naming that service), `task-panic=<task>` (that background task panics at its next round).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub core_panic_on_service: Option<String>,
    pub task_panic: Option<String>,
}

impl Faults {
    pub const ENV: &'static str = "SOCKSHIFT_FAULT_INJECTION";

    pub fn from_env() -> Self {
        let Ok(spec) = std::env::var(Self::ENV) else { return Self::default() };
        let mut faults = Self::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("core-panic-on", service)) => faults.core_panic_on_service = Some(service.to_string()),
                Some(("task-panic", task)) => faults.task_panic = Some(task.to_string()),
                _ => log::error!("{}: ignoring unknown fault {item:?}", Self::ENV),
            }
        }
        log::warn!("FAULT INJECTION ENABLED ({}={spec:?}): for tests only", Self::ENV);
        faults
    }
}

/// The way to the core: cheap to clone, one per command source.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    commands: mpsc::Sender<Command>,
}

/// How long a request waits for the core before it is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl ControlHandle {
    /// Sends a command built around a reply channel and awaits the answer, at most `timeout`.
    pub async fn request<T>(
        &self,
        timeout: Duration,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.commands.send(command(reply)).await.map_err(|_| ControlError::CoreDead)?;
            answer.await.map_err(|_| ControlError::CoreDead)?
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| ControlError::CoreStuck(timeout))?
    }

    /// `request` with the API's bound.
    pub async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, ControlError> {
        self.request(REQUEST_TIMEOUT, command).await
    }

    /// Sends a command that has no reply (the driver's and reaper's); waits while the queue is
    /// full, so a stuck core makes its senders wait rather than queue without bound.
    pub async fn tell(&self, command: Command) -> Result<(), ControlError> {
        self.commands.send(command).await.map_err(|_| ControlError::CoreDead)
    }

    /// Whether the core answers within `bound`.
    pub async fn ping(&self, bound: Duration) -> Result<(), ControlError> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            // A full queue is a stuck core too: try_send does not wait behind the backlog.
            self.commands.try_send(Command::Ping { reply }).map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => ControlError::CoreStuck(bound),
                mpsc::error::TrySendError::Closed(_) => ControlError::CoreDead,
            })?;
            answer.await.map_err(|_| ControlError::CoreDead)
        };
        tokio::time::timeout(bound, exchange).await.map_err(|_| ControlError::CoreStuck(bound))?
    }

    /// Hands a refused request's audit entry to the core without waiting: dropped (it is
    /// still counted in `/metrics`) when the core's queue is full, so refusals never hold up
    /// changes or the kill switch.
    pub fn audit_refusal(&self, entry: crate::audit::AuditEntry) {
        if self.commands.try_send(Command::AuditRefusal { entry: Box::new(entry) }).is_err() {
            log::debug!("audit entry of a refused request dropped: the core's queue is full");
        }
    }

    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }
}

/// How far the core got, published after every change (a `watch` channel: readers see the
/// latest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The revision of this node's last commit.
    pub committed: Revision,
    /// Every change of the store up to this revision is applied (cluster mode: what the node
    /// publishes as its `applied_revision`; a read's `as_of_revision`).
    pub applied: Revision,
}

/// What the core starts from.
pub struct Start<S> {
    pub datapath: Datapath,
    pub store: S,
    /// The config file's services, validated.
    pub file_services: Vec<ServiceSpec>,
    pub cgroup_root: Option<PathBuf>,
    pub follow_ups: mpsc::UnboundedSender<FollowUp>,
    pub faults: Faults,
    /// Kubernetes discovery's state, restored from the node-local cache
    /// ([`Discovery::restore`]); the daemon keeps a subscription to the references it publishes.
    pub discovery: Discovery,
}

/// A started core.
pub struct Started {
    pub handle: ControlHandle,
    pub audit: Arc<dyn AuditSource>,
    /// Services the core holds after start.
    pub services: usize,
    pub progress: watch::Receiver<Progress>,
    pub thread: std::thread::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the control core's thread: {0}")]
    Thread(std::io::Error),
    #[error("restoring the desired state: {0}")]
    Restore(ControlError),
    #[error("the control core stopped while starting")]
    Died,
}

/// Starts the core on a thread of its own: restores the stored state, reconciles it with the
/// config file, makes the datapath hold the result, then serves commands until every
/// [`ControlHandle`] is dropped.
pub async fn spawn<S: Store>(start: Start<S>) -> Result<Started, StartError> {
    let (commands, mut queue) = mpsc::channel(QUEUE);
    let (started, ready) = oneshot::channel();
    let (progress_tx, progress) = watch::channel(Progress::default());
    let thread = std::thread::Builder::new()
        .name("sockshift-core".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = started.send(Err(StartError::Thread(err)));
                    return;
                }
            };
            runtime.block_on(async move {
                let begun = Core::start(start, progress_tx);
                let mut core = match begun.await {
                    Ok(core) => core,
                    Err(err) => {
                        let _ = started.send(Err(StartError::Restore(err)));
                        return;
                    }
                };
                let mut remote = core.take_changes();
                if started.send(Ok((core.audit_source(), core.service_count()))).is_err() {
                    return;
                }
                loop {
                    tokio::select! {
                        command = queue.recv() => match command {
                            Some(command) => core.handle(command).await,
                            None => break,
                        },
                        Some(change) = recv_remote(&mut remote) => core.apply_remote(change).await,
                    }
                }
                log::info!("control core stopped");
            });
        })
        .map_err(StartError::Thread)?;
    let (audit, services) = ready.await.map_err(|_| StartError::Died)??;
    Ok(Started { handle: ControlHandle { commands }, audit, services, progress, thread })
}

/// The next remote change, or never when there is no stream (or it ended).
async fn recv_remote(remote: &mut Option<mpsc::Receiver<RemoteChange>>) -> Option<RemoteChange> {
    match remote {
        Some(receiver) => match receiver.recv().await {
            Some(change) => Some(change),
            None => {
                log::error!("the store's change stream ended; changes made elsewhere are no longer applied");
                *remote = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
