//! `sockshift agent`: start-up, signals and the long-running tasks around the control core.
//!
//! Start-up binds the API (a busy port fails before anything is attached), opens the store (in
//! cluster mode: connects to etcd, or starts from the local copy of the last applied state when
//! etcd is unreachable), loads the datapath, starts the control core on its own thread with the
//! store, and serves the API. Every
//! long-running task selects on one cancellation token, cancelled by SIGINT or SIGTERM; a task
//! that stops while the agent is not shutting down (it panicked, or its loop ended) is recorded
//! and `/healthz` fails, so Kubernetes restarts the pod instead of keeping a zombie.

mod tasks;

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{
        self,
        guard::{HostRule, Tokens},
        AppState, ClusterApi, TaskHealth,
    },
    config::Config,
    control::{
        self,
        store::{etcd, file::FileStore, Store},
        ControlHandle, Faults, Start,
    },
    datapath::{Datapath, DatapathOptions},
    discovery::{self, Discovery},
    gates::GateClients,
    paths,
};

/// How long shutdown waits for the core to finish the command it is on.
const CORE_STOP_BOUND: Duration = Duration::from_secs(5);

/// Validates the config and, unless `check_only`, runs the agent until SIGINT or SIGTERM.
pub fn run(config_path: &Path, check_only: bool) -> anyhow::Result<()> {
    // Read before loading: a change made after this point is always seen as a change.
    let loaded_bytes = std::fs::read(config_path).ok();
    let config = Config::load(config_path)?;
    if check_only {
        match &config.cluster {
            Some(cluster) => println!(
                "{}: valid, cluster mode (node {:?}, etcd {}, prefix {}/v1/)",
                config_path.display(),
                cluster.node,
                cluster.endpoints.join(", "),
                cluster.prefix
            ),
            None => println!("{}: valid, {} services", config_path.display(), config.services.len()),
        }
        return Ok(());
    }
    crate::cli::require_root()?;
    crate::caps::check_agent_start()?;
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config_path, config, loaded_bytes))
}

/// How long shutdown waits for the node to leave the cluster (its lease revoked).
const LEAVE_BOUND: Duration = Duration::from_secs(2);

async fn serve(config_path: &Path, config: Config, loaded_bytes: Option<Vec<u8>>) -> anyhow::Result<()> {
    // Bind first: a busy port must fail before anything is attached.
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the API to {} (agent.api)", config.api))?;
    if config.tokens.is_none() {
        if config.api.ip().is_loopback() {
            log::warn!(
                "the API on {} has no [agent.auth]: every local user and host-network pod has the release role; \
                 add [[agent.auth.tokens]]",
                config.api
            );
        } else {
            log::error!(
                "INSECURE: the API on {} is open to the network without authentication \
                 (agent.insecure_allow_unauthenticated_api = true): anyone who reaches it can steer this node's traffic",
                config.api
            );
        }
    }
    match &config.cluster {
        Some(settings) => {
            let cluster = etcd::start(settings, &config.state_dir).await.with_context(|| {
                format!("starting cluster mode (node {:?}, etcd {})", settings.node, settings.endpoints.join(", "))
            })?;
            log::info!("cluster mode: node {:?}, prefix {}/v1/", settings.node, settings.prefix);
            let parts = ClusterParts { handle: cluster.handle, follow: cluster.follow, presence: cluster.presence };
            let store = cluster.store.with_audit_rotation(config.audit);
            serve_with(config_path, config, loaded_bytes, listener, store, Some(parts)).await
        }
        None => {
            let store = FileStore::open(&config.state_dir)
                .with_context(|| {
                    format!("opening the state directory {} (agent.state_dir)", config.state_dir.display())
                })?
                .with_audit_rotation(config.audit);
            serve_with(config_path, config, loaded_bytes, listener, store, None).await
        }
    }
}

/// Cluster mode's pieces besides the store.
struct ClusterParts {
    handle: etcd::ClusterHandle,
    follow: etcd::Follow,
    presence: etcd::Presence,
}

async fn serve_with<S: Store>(
    config_path: &Path,
    config: Config,
    loaded_bytes: Option<Vec<u8>>,
    listener: tokio::net::TcpListener,
    store: S,
    cluster: Option<ClusterParts>,
) -> anyhow::Result<()> {
    let faults = Faults::from_env();
    // Held while the agent runs: `sockshift uninstall` refuses to remove pins it sees locked.
    // Taken after cluster mode's start, so that an agent etcd refuses leaves nothing behind.
    let _pin_lock = paths::prepare_pin_dir(&config.bpffs)?;
    let datapath = Datapath::load(&DatapathOptions::from(&config)).with_context(|| {
        format!("loading the datapath (cgroup {}, bpffs {})", config.cgroup.display(), config.bpffs.display())
    })?;
    let datapath_log = datapath.record_feed();
    let (follow_tx, follow_rx) = mpsc::unbounded_channel();
    let discovery = Discovery::restore(&config.state_dir);
    let wanted_references = discovery.subscribe();
    let started = control::spawn(Start {
        datapath,
        store,
        file_services: config.services.clone(),
        cgroup_root: paths::cgroup2_root().ok(),
        follow_ups: follow_tx,
        faults: faults.clone(),
        discovery,
    })
    .await
    .context("starting the control core")?;
    log::info!(
        "attached to {}, {} services, API on http://{}{}",
        config.cgroup.display(),
        started.services,
        config.api,
        if config.tokens.is_some() { " (bearer tokens required)" } else { "" }
    );

    let shutdown = CancellationToken::new();
    let tasks = TaskHealth::default();
    let gates = GateClients::new(config.prometheus.clone(), config.webhook_allow.clone());
    let tokens = Tokens::new(config.tokens.clone());
    let state = Arc::new(AppState {
        control: started.handle.clone(),
        tokens: tokens.clone(),
        hosts: HostRule::new(config.api, config.api_hosts.clone()),
        denied: Default::default(),
        refusal_audit: Default::default(),
        audit: started.audit,
        tasks: tasks.clone(),
        gates: gates.clone(),
        openapi: Default::default(),
        cluster: cluster
            .as_ref()
            .map(|parts| ClusterApi { handle: parts.handle.clone(), progress: started.progress.clone() }),
        datapath_log,
        datapath_followers: Arc::new(tokio::sync::Semaphore::new(api::handlers::DATAPATH_LOG_FOLLOWERS)),
        shutdown: shutdown.clone(),
    });
    let supervisor = Supervisor { shutdown: shutdown.clone(), health: tasks, faults };
    let control = started.handle;
    let mut left_cluster = None;
    if let Some(ClusterParts { follow, presence, .. }) = cluster {
        supervisor.spawn("cluster-watch", move |cancel, _| follow.run(cancel));
        let (left, leaving) = tokio::sync::oneshot::channel();
        left_cluster = Some(leaving);
        supervisor.spawn("cluster-presence", move |cancel, _| async move {
            presence.run(cancel).await;
            let _ = left.send(());
        });
    }
    supervisor.spawn("rollout-driver", {
        let gates = gates.clone();
        |cancel, fault| tasks::drive_rollouts(control.clone(), gates, cancel, fault)
    });
    supervisor.spawn("revision-reaper", |cancel, fault| tasks::reap_revisions(control.clone(), cancel, fault));
    supervisor.spawn("follow-ups", {
        let control = control.clone();
        let gates = gates.clone();
        move |cancel, fault| tasks::carry_out_follow_ups(control, follow_rx, gates, cancel, fault)
    });
    supervisor.spawn("token-watcher", {
        let path = config_path.to_owned();
        move |cancel, _| watch_tokens(tokens, path, cancel)
    });
    // Idle (no client, no connection) until a service has a `kubernetes` table, from the file
    // or added later through the API: the core publishes the references to watch.
    supervisor.spawn("kubernetes-discovery", {
        let control = control.clone();
        let kubeconfig = config.kubeconfig.clone();
        move |cancel, fault| discovery::run(wanted_references, kubeconfig, control, cancel, fault)
    });
    supervisor.spawn("config-watcher", {
        let control = control.clone();
        let path = config_path.to_owned();
        move |cancel, fault| tasks::watch_config(control, path, config, loaded_bytes, gates, cancel, fault)
    });
    supervisor.spawn("signals", {
        let shutdown = shutdown.clone();
        move |_, _| async move { wait_for_signal(shutdown).await }
    });

    api::server::serve(listener, api::router(state.clone()), state.clone(), shutdown.clone()).await;
    shutdown.cancel();
    if let Some(leaving) = left_cluster {
        // Revoking the lease takes the node out of every other node's view at once, instead of
        // after the lease's TTL.
        if tokio::time::timeout(LEAVE_BOUND, leaving).await.is_err() {
            log::warn!(
                "leaving the cluster did not finish within {LEAVE_BOUND:?}; the node's keys expire with its lease"
            );
        }
    }
    drop(state);
    stop_core(control, started.thread).await;
    log::info!("stopped; the pinned datapath keeps steering with the last state");
    Ok(())
}

/// How often the token watcher looks at the config file and the token files.
const TOKEN_POLL: Duration = Duration::from_secs(1);

/// Applies token changes without a restart: the config file's `[agent.auth]` and the token
/// files it names are re-read every [`TOKEN_POLL`] and on SIGHUP, and a changed set replaces
/// the one in force (a revoked token is refused from then on). A config that does not validate
/// changes nothing here (the config watcher logs why).
async fn watch_tokens(tokens: Tokens, path: std::path::PathBuf, cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(TOKEN_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {}
        }
        let path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let Ok(Ok(config)) = loaded else { continue };
        let count = config.tokens.as_ref().map(Vec::len);
        if tokens.replace(config.tokens) {
            match count {
                Some(count) => log::warn!("[agent.auth] changed: {count} tokens in force from now on"),
                None => log::warn!("[agent.auth] removed: the API no longer asks for tokens"),
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every API connection is a file, and
/// the connection limit (1024) plus the agent's own files must fit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("raising the open-file limit from {soft} to {hard}: {err}");
            }
        }
        Ok(_) => {}
        Err(err) => log::warn!("reading the open-file limit: {err}"),
    }
}

/// Waits (bounded) for the core's thread to end once every handle is gone.
async fn stop_core(control: ControlHandle, thread: std::thread::JoinHandle<()>) {
    drop(control);
    let joined = tokio::task::spawn_blocking(move || thread.join());
    match tokio::time::timeout(CORE_STOP_BOUND, joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(_))) => log::error!("the control core had panicked"),
        Ok(Err(err)) => log::error!("waiting for the control core: {err}"),
        Err(_) => log::error!("the control core did not stop within {CORE_STOP_BOUND:?}; exiting without it"),
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            log::error!("cannot listen for SIGTERM ({err}); only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT: stopping"),
        _ = term.recv() => log::info!("SIGTERM: stopping"),
        () = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}

/// Spawns the long-running tasks and records the ones that stop on their own.
struct Supervisor {
    shutdown: CancellationToken,
    health: TaskHealth,
    faults: Faults,
}

impl Supervisor {
    /// Runs the task `make(cancel, fault)`; `fault` is true when fault injection asks this task
    /// to panic (see [`Faults`]).
    fn spawn<F, Fut>(&self, name: &'static str, make: F)
    where
        F: FnOnce(CancellationToken, bool) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let fault = self.faults.task_panic.as_deref() == Some(name);
        let task = tokio::spawn(make(self.shutdown.clone(), fault));
        let shutdown = self.shutdown.clone();
        let health = self.health.clone();
        tokio::spawn(async move {
            let why = match task.await {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => "stopped".to_string(),
                Err(err) if err.is_panic() => "panicked".to_string(),
                Err(err) => err.to_string(),
            };
            log::error!("background task {name} {why}; /healthz now fails");
            health.record_failure(name, why);
        });
    }
}
