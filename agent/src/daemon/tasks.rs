//! The agent's long-running tasks. Each feeds the control core commands (or carries out what a
//! committed change asks for) and ends when the cancellation token is cancelled.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    control::{Command, ControlError, ControlHandle, FollowUp, GateInput, GateWork},
    datapath::DatapathOptions,
    gates::{
        metric::{self, poll_interval, QueryContext, Reading},
        prometheus::read_gates,
        GateClients, Verdict,
    },
    rollout::GateDue,
};

const ROLLOUT_TICK: Duration = Duration::from_millis(100);
/// How long the driver waits for the core to answer a tick before trying again.
const TICK_BOUND: Duration = Duration::from_secs(5);
const REAP_TICK: Duration = Duration::from_millis(500);
const CONFIG_POLL: Duration = Duration::from_millis(500);
/// A changed config file is applied once its content has held still this long.
const CONFIG_SETTLE: Duration = Duration::from_millis(150);

fn injected_fault(fault: bool, task: &str) {
    if fault {
        panic!("fault injection ({}): task {task} panics", crate::control::Faults::ENV);
    }
}

/// Keeps the rollouts' clock (the core decides, this only ticks) and reads their gates beyond
/// the kernel: each tick's answer says which rollouts need their metric gates read or their
/// end-of-window judgement made, and the reads run here, on tasks of their own, never on the
/// core. Their results go back to the core as commands.
pub async fn drive_rollouts(control: ControlHandle, gates: GateClients, cancel: CancellationToken, fault: bool) {
    let mut tick = tokio::time::interval(ROLLOUT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reads = GateReads::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        injected_fault(fault, "rollout-driver");
        let work = tokio::select! {
            () = cancel.cancelled() => return,
            work = control.request(TICK_BOUND, |reply| Command::TickRollouts { reply }) => work,
        };
        match work {
            Ok(work) => reads.schedule(work, &gates, &control),
            Err(ControlError::CoreDead) => return,
            // A stuck core: /healthz says so; tick again.
            Err(_) => {}
        }
    }
}

/// The driver's reads per rollout: at most one in flight, in-window polls every poll interval,
/// and an end-of-window judgement asked for again every poll interval while a gate holds.
#[derive(Default)]
struct GateReads {
    services: HashMap<String, ReadState>,
}

struct ReadState {
    window: u64,
    due: GateDue,
    /// When the last read started (for a new window: when it was first seen, so that the
    /// first poll comes one interval into the window).
    last_started: Option<Instant>,
    in_flight: Option<JoinHandle<()>>,
}

impl GateReads {
    fn schedule(&mut self, work: Vec<GateWork>, gates: &GateClients, control: &ControlHandle) {
        // Rollouts that no longer need reads (ended, paused, judged): their reads are moot.
        self.services.retain(|service, state| {
            let keep = work.iter().any(|w| &w.service == service);
            if !keep {
                if let Some(task) = state.in_flight.take() {
                    task.abort();
                }
            }
            keep
        });
        // In cluster mode only the rollout leader gets work (the core's gate_work is empty on
        // other nodes): one set of queries and calls per cluster, not per node.
        let now = Instant::now();
        for work in work {
            let state = self.services.entry(work.service.clone()).or_insert(ReadState {
                window: work.window,
                due: work.due,
                last_started: None,
                in_flight: None,
            });
            if state.window != work.window || state.due != work.due || state.last_started.is_none() {
                if let Some(task) = state.in_flight.take() {
                    task.abort();
                }
                state.window = work.window;
                state.due = work.due;
                // A judgement is read at once; polls start one interval into the window.
                state.last_started = match work.due {
                    GateDue::Judge => None,
                    GateDue::Poll => Some(now),
                };
                if work.due == GateDue::Poll {
                    continue;
                }
            }
            if state.in_flight.as_ref().is_some_and(|task| !task.is_finished()) {
                continue;
            }
            let interval = poll_interval(Duration::from_secs_f64(work.step_seconds.max(1.0)));
            if state.last_started.is_some_and(|at| now.duration_since(at) < interval) {
                continue;
            }
            state.last_started = Some(now);
            state.in_flight = Some(tokio::spawn(read_and_report(work, gates.clone(), control.clone())));
        }
    }
}

/// Reads what `work` asks for and sends it to the core.
async fn read_and_report(work: GateWork, gates: GateClients, control: ControlHandle) {
    let context = QueryContext {
        service: &work.service,
        window: Duration::from_secs_f64(work.step_seconds.max(1.0)),
        step: work.step,
        percent: work.percent,
        namespace: None,
    };
    let readings = match gates.prometheus() {
        Some(client) => read_gates(&client, &work.metrics, &context).await,
        None => vec![
            Reading::Error("agent.prometheus is not set in the agent's config (any more)".to_string());
            work.metrics.len()
        ],
    };
    let input = match work.due {
        GateDue::Poll => GateInput::Poll(readings),
        GateDue::Judge => {
            // Acceptance and load tests are called only once the metrics pass: a failing or
            // holding metric decides the check without them.
            let metrics_pass = metric::judge(&work.metrics, &readings, work.on_missing).verdict == Verdict::Pass;
            let checks = if metrics_pass && !work.checks.is_empty() {
                gates.webhooks().check_all(&work.checks, &work.state).await
            } else {
                Vec::new()
            };
            GateInput::Judge { metrics: readings, checks }
        }
    };
    if let Err(err) = control.tell(Command::GateInput { name: work.service.clone(), window: work.window, input }).await
    {
        log::debug!("rollout of {}: gate readings not delivered: {err}", work.service);
    }
}

/// Deletes backend revisions once their grace period is over.
pub async fn reap_revisions(control: ControlHandle, cancel: CancellationToken, fault: bool) {
    let mut tick = tokio::time::interval(REAP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        injected_fault(fault, "revision-reaper");
        tokio::select! {
            () = cancel.cancelled() => return,
            sent = control.tell(Command::ReapRetired) => if sent.is_err() { return },
        }
    }
}

/// Webhook notifications and connection termination, off the core's thread and the API's
/// workers. Notifications go through the hardened sender (allow list checked again at delivery,
/// metadata addresses refused, 8 KiB of an answer read, one deadline each, bounded concurrency).
pub async fn carry_out_follow_ups(
    control: ControlHandle,
    mut follow_ups: mpsc::UnboundedReceiver<FollowUp>,
    gates: GateClients,
    cancel: CancellationToken,
    fault: bool,
) {
    loop {
        let item = tokio::select! {
            () = cancel.cancelled() => return,
            item = follow_ups.recv() => match item {
                Some(item) => item,
                None => return,
            },
        };
        injected_fault(fault, "follow-ups");
        match item {
            FollowUp::Notify { service, event, webhooks: urls, payload } => {
                for url in urls {
                    // Each delivery is bounded by its deadline (slot wait included), so these
                    // tasks cannot pile up for longer than that.
                    let (webhooks, payload, service, event) =
                        (gates.webhooks().clone(), payload.clone(), service.clone(), event.clone());
                    tokio::spawn(async move {
                        if let Err(err) = webhooks.notify(&url, &payload).await {
                            log::warn!("webhook {url:?} ({service} {event}): {err}");
                        }
                    });
                }
            }
            FollowUp::TerminateCanary { service, termination } => {
                // The core has handed the chosen sockets to the datapath's termination worker;
                // this only waits for the count (bounded by the termination's timeout), on a
                // task of its own so that notifications do not queue behind it.
                let control = control.clone();
                tokio::spawn(async move {
                    match tokio::task::spawn_blocking(move || termination.wait()).await {
                        Ok(outcome) => {
                            log::info!(
                                "service {service}: closed {} steered canary connections after rollback{}",
                                outcome.sockets,
                                if outcome.errors.is_empty() {
                                    String::new()
                                } else {
                                    format!(" ({})", outcome.errors.join("; "))
                                }
                            );
                            let count = outcome.sockets;
                            let _ = control.tell(Command::NoteTerminated { name: service, count }).await;
                        }
                        Err(err) => log::error!("service {service}: closing canary connections: {err}"),
                    }
                });
            }
        }
    }
}

/// Re-reads the config file when its content changes (a mounted ConfigMap is swapped in place)
/// and on SIGHUP. A file that does not validate is refused with the reason logged; the running
/// state stays.
pub async fn watch_config(
    control: ControlHandle,
    path: PathBuf,
    initial: Config,
    loaded_bytes: Option<Vec<u8>>,
    gates: GateClients,
    cancel: CancellationToken,
    fault: bool,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(err) => {
            log::error!("cannot listen for SIGHUP ({err}); the config file is still polled");
            None
        }
    };
    let mut last = loaded_bytes;
    let mut datapath_log = initial.datapath_log;
    let mut tick = tokio::time::interval(CONFIG_POLL);
    loop {
        let forced = tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        injected_fault(fault, "config-watcher");
        let mut current = read(&path).await;
        if !forced && current == last {
            continue;
        }
        // An editor or `cp` writing the file in place is seen half-way (even empty, which would
        // parse as "no services"): apply only content that holds still for a moment.
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(CONFIG_SETTLE) => {}
            }
            let again = read(&path).await;
            if again == current {
                break;
            }
            current = again;
        }
        last = current;
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path)).await
        };
        let config = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(err)) => {
                log::error!("config reload refused, keeping the running state: {err}");
                continue;
            }
            Err(err) => {
                log::error!("config reload refused, keeping the running state: {err}");
                continue;
            }
        };
        // agent.datapath_log applies at once (the programs are replaced in place); the rest of
        // [agent] at the next start.
        let restart_only = DatapathOptions { log: initial.datapath_log, ..DatapathOptions::from(&config) };
        if config.api != initial.api
            || config.cgroup != initial.cgroup
            || config.bpffs != initial.bpffs
            || config.state_dir != initial.state_dir
            || restart_only != DatapathOptions::from(&initial)
        {
            log::warn!("config reload: changes to [agent] take effect at the next restart");
        }
        if config.datapath_log != datapath_log {
            let level = config.datapath_log;
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                result = control.ask(|reply| Command::SetDatapathLog { level, reply }) => result,
            };
            match result {
                Ok(()) => {
                    log::info!("config reload: agent.datapath_log = \"{level}\" applied");
                    datapath_log = level;
                }
                Err(err) => log::error!("config reload: agent.datapath_log = \"{level}\" refused: {err}"),
            }
        }
        // These two apply at once, also to running rollouts' next reads and deliveries.
        if gates.reconfigure(config.prometheus.clone(), config.webhook_allow.clone()) {
            log::info!("config reload: agent.prometheus and agent.webhook_allow applied");
        }
        if config.cluster != initial.cluster {
            log::warn!("config reload: changes to [cluster] take effect at the next restart");
        }
        let services: Vec<_> = config.services.iter().map(|s| s.source.clone()).collect();
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = control.ask(|reply| Command::ReloadFile { services, reply }) => result,
        };
        match result {
            Ok(count) => log::info!("config reloaded: {count} services in the file"),
            Err(err) => log::error!("config reload refused, keeping the running state: {err}"),
        }
    }
}

/// The file's bytes, read off the runtime's workers; `None` when it cannot be read.
async fn read(path: &Path) -> Option<Vec<u8>> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || std::fs::read(path).ok()).await.ok().flatten()
}
