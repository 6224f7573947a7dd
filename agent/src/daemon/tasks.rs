//! The agent's long-running tasks. Each feeds the control core commands (or carries out what a
//! committed change asks for) and ends when the cancellation token is cancelled.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    control::{Command, ControlHandle, FollowUp},
};

const ROLLOUT_TICK: Duration = Duration::from_millis(100);
const REAP_TICK: Duration = Duration::from_millis(500);
const CONFIG_POLL: Duration = Duration::from_millis(500);
/// A changed config file is applied once its content has held still this long.
const CONFIG_SETTLE: Duration = Duration::from_millis(150);
/// Total time one webhook delivery may take.
const WEBHOOK_DEADLINE: Duration = Duration::from_secs(10);

fn injected_fault(fault: bool, task: &str) {
    if fault {
        panic!("fault injection ({}): task {task} panics", crate::control::Faults::ENV);
    }
}

/// Keeps the rollouts' clock: the core decides, this only ticks.
pub async fn drive_rollouts(control: ControlHandle, cancel: CancellationToken, fault: bool) {
    let mut tick = tokio::time::interval(ROLLOUT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        injected_fault(fault, "rollout-driver");
        tokio::select! {
            () = cancel.cancelled() => return,
            sent = control.tell(Command::TickRollouts) => if sent.is_err() { return },
        }
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

/// Webhooks and connection termination, off the core's thread and the API's workers.
pub async fn carry_out_follow_ups(
    control: ControlHandle,
    mut follow_ups: mpsc::UnboundedReceiver<FollowUp>,
    cgroup: PathBuf,
    cancel: CancellationToken,
    fault: bool,
) {
    let webhooks = ureq::Agent::config_builder().timeout_global(Some(WEBHOOK_DEADLINE)).build().new_agent();
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
                    let (agent, payload, service, event) =
                        (webhooks.clone(), payload.clone(), service.clone(), event.clone());
                    tokio::task::spawn_blocking(move || {
                        if let Err(err) = agent.post(&url).send_json(&payload) {
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
                        let _ = control.tell(Command::NoteTerminated { name: service, count }).await;
                    }
                    Ok(Err(err)) => log::error!("service {service}: closing canary connections: {err}"),
                    Err(err) => log::error!("service {service}: closing canary connections: {err}"),
                }
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
        if config.api != initial.api
            || config.cgroup != initial.cgroup
            || config.bpffs != initial.bpffs
            || config.state_dir != initial.state_dir
        {
            log::warn!("config reload: changes to [agent] take effect at the next restart");
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
