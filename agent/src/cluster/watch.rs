//! A watch of the whole prefix that survives etcd: typed changes in etcd's order, resumed from
//! the last revision seen after a disconnect, and a relist after a compaction.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use etcd_client::{EventType, WatchOptions};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    error::error_chain,
    snapshot::{Change, Snapshot},
    store::ClusterStore,
    values::InvalidValue,
};

/// What the watch reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A key changed (or was deleted, or its lease expired).
    Change(Change),
    /// A key's new value does not decode or validate: skipped (its last valid value stands).
    Invalid(InvalidValue),
    /// etcd compacted past the last revision seen, so the missed changes are gone: this is a
    /// fresh read of everything. Apply `old.diff(&snapshot)` (only what differs) and carry on.
    Resync(Snapshot),
    /// The watch broke (member down, no quorum, all members stopped); it is being retried. Sent
    /// once per outage: the local state is now only as fresh as the last revision seen.
    Disconnected { error: String },
    /// The watch is back, from the revision after `after_revision`; nothing was missed.
    Resumed { after_revision: i64 },
}

/// Owns the background task that keeps the watch up; dropping it stops the task.
pub struct StateWatch {
    events: mpsc::Receiver<WatchEvent>,
    last_revision: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

/// Retry delays while etcd is unreachable: quick at first, then at most every second.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl StateWatch {
    pub(crate) fn start(store: ClusterStore, after_revision: i64) -> Self {
        // Bounded: a consumer that falls behind slows the watch (etcd buffers), never memory.
        let (sender, events) = mpsc::channel(1024);
        let last_revision = Arc::new(AtomicI64::new(after_revision));
        let task = tokio::spawn(run(store, last_revision.clone(), sender));
        Self { events, last_revision, task }
    }

    /// The next event; `None` only once the watch is dropped.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.events.recv().await
    }

    /// The revision up to which every change has been delivered (or queued for delivery).
    pub fn last_revision(&self) -> i64 {
        self.last_revision.load(Ordering::Acquire)
    }
}

impl Drop for StateWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(store: ClusterStore, last_revision: Arc<AtomicI64>, events: mpsc::Sender<WatchEvent>) {
    let root = store.layout().root().to_string();
    let mut delay = RETRY_FIRST;
    // Nothing known yet (0): relist before watching rather than replay the whole history.
    let mut disconnected = last_revision.load(Ordering::Acquire) <= 0;
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        first = false;
        let after = last_revision.load(Ordering::Acquire);
        if disconnected {
            // Before resuming, make sure etcd still has the history from `after`: a watch from
            // a compacted revision is created first and canceled only later, which would
            // announce a resumption that is not one. (etcd 3.4 answers a progress request at
            // once with its current revision, synced or not: no help here.)
            let kept = if after <= 0 { Ok(false) } else { store.history_kept_since(after).await };
            match kept {
                Ok(true) => {}
                Ok(false) => match store.load_all().await {
                    Ok(snapshot) => {
                        store.counter_handles().resyncs.fetch_add(1, Ordering::Relaxed);
                        last_revision.store(snapshot.revision, Ordering::Release);
                        disconnected = false;
                        delay = RETRY_FIRST;
                        if events.send(WatchEvent::Resync(snapshot)).await.is_err() {
                            return;
                        }
                        first = true;
                        continue;
                    }
                    Err(err) => {
                        log::warn!("etcd watch: relisting the state: {err}");
                        continue;
                    }
                },
                Err(err) => {
                    log::debug!("etcd watch: still unreachable: {err}");
                    continue;
                }
            }
        }
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1).with_progress_notify();
        let mut client = store.client().watch_client();
        // Bounded: with every endpoint down, the balanced channel waits for one to come back
        // instead of failing.
        let opened = tokio::time::timeout(store.timeouts().request, client.watch(root.clone(), Some(options))).await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                if !report_disconnect(&events, &mut disconnected, error_chain(&err)).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                let error = format!("no etcd endpoint answered within {:?}", store.timeouts().request);
                if !report_disconnect(&events, &mut disconnected, error).await {
                    return;
                }
                continue;
            }
        };
        let broke_with = loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => break "the watch stream ended".to_string(),
                Err(err) => break error_chain(&err),
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    // The history from `after` is gone: relist, hand over the whole state.
                    match store.load_all().await {
                        Ok(snapshot) => {
                            store.counter_handles().resyncs.fetch_add(1, Ordering::Relaxed);
                            last_revision.store(snapshot.revision, Ordering::Release);
                            if disconnected {
                                disconnected = false;
                                delay = RETRY_FIRST;
                            }
                            if events.send(WatchEvent::Resync(snapshot)).await.is_err() {
                                return;
                            }
                            break String::new();
                        }
                        Err(err) => break format!("relisting after a compaction: {err}"),
                    }
                }
                break format!("etcd canceled the watch: {}", response.cancel_reason());
            }
            if response.created() {
                if disconnected {
                    disconnected = false;
                    delay = RETRY_FIRST;
                    store.counter_handles().watch_restarts.fetch_add(1, Ordering::Relaxed);
                    let after_revision = last_revision.load(Ordering::Acquire);
                    if events.send(WatchEvent::Resumed { after_revision }).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            if response.events().is_empty() {
                // A progress notification: every change up to the header's revision was sent.
                if let Some(header) = response.header() {
                    last_revision.fetch_max(header.revision(), Ordering::AcqRel);
                }
                continue;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                let item = match (event.event_type(), store.decode(kv)) {
                    (EventType::Delete, _) => match store.layout().parse(kv.key()) {
                        Ok(key) => WatchEvent::Change(Change { key, revision, value: None }),
                        // A foreign key went away: nothing to report.
                        Err(_) => {
                            last_revision.fetch_max(revision, Ordering::AcqRel);
                            continue;
                        }
                    },
                    (EventType::Put, Ok((key, value))) => {
                        WatchEvent::Change(Change { key, revision, value: Some(value) })
                    }
                    (EventType::Put, Err(invalid)) => {
                        log::error!("skipping a bad value in etcd: {invalid}");
                        WatchEvent::Invalid(invalid)
                    }
                };
                if events.send(item).await.is_err() {
                    return;
                }
                last_revision.fetch_max(revision, Ordering::AcqRel);
            }
        };
        if broke_with.is_empty() {
            // Resynced: watch again from the snapshot's revision at once.
            first = true;
            continue;
        }
        if !report_disconnect(&events, &mut disconnected, broke_with).await {
            return;
        }
    }
}

/// Reports the first failure of an outage; false when nobody listens any more.
async fn report_disconnect(events: &mpsc::Sender<WatchEvent>, disconnected: &mut bool, error: String) -> bool {
    if *disconnected {
        return !events.is_closed();
    }
    *disconnected = true;
    log::warn!("etcd watch lost, retrying: {error}");
    events.send(WatchEvent::Disconnected { error }).await.is_ok()
}
