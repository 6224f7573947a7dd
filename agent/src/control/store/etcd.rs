//! The cluster store (cluster mode): the desired state of every node kept in etcd through
//! [`crate::cluster`], behind the same [`Store`] interface as the file store.
//!
//! - **Write path.** The core validates a change, then [`Store::commit`] makes it one etcd
//!   transaction: compare each key's `mod_revision` with the one the core holds, write the keys
//!   and the audit entry (naming this node and the token). A key changed elsewhere first comes
//!   back as a conflict with its current value; the core adopts it and runs the command again.
//!   The core then applies the change to its own datapath and answers.
//! - **Watch path.** [`Follow`] runs the prefix watch and hands every service and rollout change
//!   to the core in etcd's order ([`Store::take_changes`]); the core applies it to its datapath
//!   unless it already holds that revision (its own commits come back this way too). After a
//!   compaction the watch relists: only the keys whose value differs are applied. Node keys and
//!   leader candidates feed the cluster view (`GET /v1/cluster`, `?wait=cluster`).
//! - **Fail static.** Nothing here touches the datapath. When etcd is unreachable the watch
//!   retries in the background and the datapath keeps the last applied state; once the watch has
//!   been down for [`FAIL_FAST_AFTER`], a commit gets one short try ([`QUICK_TIMEOUTS`]) and then
//!   fails ([`StoreError::Unavailable`], 503), rather than hold the core for the client's full
//!   timeouts on every request. (It still tries: a watch can be down while a write would pass.)
//! - **Local copy.** [`Store::applied`] hands the applied state to a thread that writes it to
//!   `<state_dir>/cluster-state.json` (atomically, latest wins), and publishes the node's status
//!   (`applied_revision`, health) under its lease ([`Presence`]). An agent that starts while
//!   etcd is unreachable restores the local copy, steers with it, and relists when etcd answers.
//!   One that starts while etcd answers reads the state from etcd, so a node that was down while
//!   etcd compacted catches up from the current state directly (no flap through older ones).
//! - **Leadership.** [`Presence`] campaigns for the rollout leadership on the node's lease; only
//!   the leader ticks rollouts, and its rollout commits are fenced on the leadership
//!   ([`Commit::leader_only`]) and get one attempt each (the next tick decides again).
//! - **Cluster-wide health.** The core hands this node's counters of the services with an active
//!   rollout to [`Store::publish_counters`]; [`Presence`] writes them to `health/<node>` under
//!   the node's lease. [`Follow`] keeps every live node's from the watch, which the leader's
//!   gates sum ([`Store::node_counters`], `Rollout::count_nodes`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    future::Future,
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    AuditSource, BoxFuture, Commit, Current, Expect, Key, Loaded, NodeCounters, RemoteChange, Revision, Snapshot,
    Store, StoreError, Value, Versioned,
};
use crate::{
    audit::AuditEntry,
    cluster::{
        self, ClusterError, ClusterSettings, ClusterStore, CounterValues, Election, Leadership, LeaseEvent, NodeHealth,
        NodeSession, NodeStatus, StateWatch, Timeouts, WatchEvent, WriteBatch,
    },
    config::ServiceConfig,
    rollout::{Rollout, Snapshot as Counters},
};

/// File name of the local copy of the last applied cluster state, under `agent.state_dir`.
pub const LOCAL_COPY_FILE: &str = "cluster-state.json";
const LOCAL_COPY_VERSION: u32 = 1;

/// How long the watch may be down before commits get only a short try (a member restart or a
/// leader election is shorter than this).
pub const FAIL_FAST_AFTER: Duration = Duration::from_secs(2);

/// The timeouts of that short try.
pub const QUICK_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(1),
    request: Duration::from_secs(1),
    attempt: Duration::from_millis(500),
    keep_alive: Duration::from_secs(2),
};

/// How the agent sees the cluster right now, kept by [`Follow`] from the watch.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// Whether the watch follows etcd now. When not, this node's state may be behind ("stale").
    pub connected: bool,
    /// When `connected` last changed.
    pub changed_at: Instant,
    /// Why the watch broke, while it is broken.
    pub error: Option<String>,
    /// The etcd revision the watch has reached.
    pub revision: i64,
    /// Live nodes (their keys are under their leases), by name.
    pub nodes: BTreeMap<String, NodeStatus>,
    /// The node that drives the rollouts.
    pub leader: Option<String>,
}

/// What the API and `/metrics` use of the cluster: cheap to clone.
#[derive(Clone)]
pub struct ClusterHandle {
    node: String,
    store: ClusterStore,
    view: watch::Receiver<ClusterView>,
    leadership: watch::Receiver<Option<Leadership>>,
}

impl ClusterHandle {
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// Follows the view (to wait for the nodes to apply a change).
    pub fn views(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    pub fn counters(&self) -> CounterValues {
        self.store.counters()
    }

    /// Whether this node drives the rollouts now.
    pub fn leads(&self) -> bool {
        self.leadership.borrow().is_some()
    }
}

/// Why cluster mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The node's own setup is wrong (a TLS file, a certificate etcd refuses): waiting will not
    /// fix it, so the agent refuses to start and says what to fix.
    #[error(transparent)]
    Misconfigured(ClusterError),
    #[error("starting the local copy's writer thread: {0}")]
    Thread(std::io::Error),
    #[error("opening the node's audit log of refused requests in {}: {source}", path.display())]
    LocalAudit { path: std::path::PathBuf, source: std::io::Error },
}

/// Cluster mode, set up: the store for the core, a handle for the API, and the two background
/// tasks the daemon runs.
pub struct Started {
    pub store: EtcdStore,
    pub handle: ClusterHandle,
    pub follow: Follow,
    pub presence: Presence,
}

/// Sets cluster mode up: reads the local copy, connects to etcd and, if it answers, reads the
/// state from it (otherwise starts from the local copy and catches up later).
pub async fn start(settings: &ClusterSettings, state_dir: &Path) -> Result<Started, StartError> {
    let local_path = state_dir.join(LOCAL_COPY_FILE);
    let refusals = crate::audit::AuditFile::open(state_dir)
        .map_err(|source| StartError::LocalAudit { path: state_dir.to_owned(), source })?;
    let mut recovered = Vec::new();
    let local = read_local_copy(&local_path, &settings.prefix, &mut recovered);
    let store = ClusterStore::open(settings, Timeouts::default()).await.map_err(StartError::Misconfigured)?;
    let fresh = match store.verify().await {
        Ok(()) => match store.load_all().await {
            Ok(snapshot) => Some(snapshot),
            Err(err) => {
                log::warn!("etcd answered but reading the state failed: {err}");
                None
            }
        },
        Err(err) if err.is_misconfiguration() => return Err(StartError::Misconfigured(err)),
        Err(err) => {
            log::warn!("{err}");
            None
        }
    };
    let (initial, mirror, watch_after) = match fresh {
        Some(snapshot) => {
            for invalid in &snapshot.invalid {
                recovered.push(format!("skipping a bad value in etcd: {invalid}"));
            }
            log::info!(
                "cluster state read from etcd at revision {} ({} services, {} nodes)",
                snapshot.revision,
                snapshot.services.len(),
                snapshot.nodes.len()
            );
            let revision = snapshot.revision;
            (desired_state(&snapshot), snapshot, revision)
        }
        None => {
            let initial = local.unwrap_or_default();
            log::warn!(
                "etcd is unreachable: steering with the local copy of the last applied state ({} services, revision \
                 {}) until it answers",
                initial.services.len(),
                initial.revision
            );
            // Relist (not resume) once etcd answers: this process never saw the changes after
            // the copy was written, nor deletions this node made that etcd has not echoed.
            (initial.clone(), mirror_of(&initial), 0)
        }
    };
    let connected = watch_after > 0;
    let now = Instant::now();
    let (view_tx, view) = watch::channel(ClusterView {
        connected,
        changed_at: now,
        error: None,
        revision: mirror.revision,
        nodes: mirror.nodes.iter().map(|(name, v)| (name.clone(), v.value.clone())).collect(),
        leader: mirror.leader().map(|c| c.value.node.clone()),
    });
    let (leadership_tx, leadership) = watch::channel(None);
    let status = NodeStatus {
        node: settings.node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        applied_revision: initial.revision as i64,
        at_unix_ms: cluster::unix_ms(),
        healthy: true,
        detail: String::new(),
    };
    let (status_tx, status_rx) = watch::channel(status);
    let (health_tx, health) = watch::channel(live_health(&mirror));
    let (published_tx, published_rx) = watch::channel(None);
    let (to_core, changes) = mpsc::channel(1024);
    let (persist, persisted) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("sockshift-local-copy".into())
        .spawn(move || write_local_copies(&local_path, persisted))
        .map_err(StartError::Thread)?;
    let watch = store.watch(watch_after);
    Ok(Started {
        store: EtcdStore {
            quick: store.with_timeouts(QUICK_TIMEOUTS),
            clock: store.with_timeouts(QUICK_TIMEOUTS).single_try(),
            store: store.clone(),
            prefix: settings.prefix.clone(),
            initial: Some(Loaded { snapshot: initial, recovered }),
            changes: Some(changes),
            view: view.clone(),
            status: status_tx,
            leadership: leadership.clone(),
            persist,
            refusals,
            node: settings.node.clone(),
            health,
            published: published_tx,
        },
        handle: ClusterHandle {
            node: settings.node.clone(),
            store: store.clone(),
            view,
            leadership: leadership.clone(),
        },
        follow: Follow {
            watch,
            mirror,
            to_core,
            view: view_tx,
            health: health_tx,
            layout: cluster::KeyLayout::new(&settings.prefix),
        },
        presence: Presence { store, status: status_rx, leadership: leadership_tx, health: published_rx },
    })
}

/// The store the core uses in cluster mode. See the module docs.
pub struct EtcdStore {
    store: ClusterStore,
    /// The same client with [`QUICK_TIMEOUTS`].
    quick: ClusterStore,
    /// The same client with [`QUICK_TIMEOUTS`] and one attempt per commit, for the rollout
    /// clock's commits ([`Commit::leader_only`]): the next tick tries again with the time and the
    /// counters then, so a rollout's history never holds a decision etcd committed long after it
    /// was dated (a retry would commit it once etcd's quorum returns), and an etcd without quorum
    /// holds the core for one attempt per tick, not for the full request timeout.
    clock: ClusterStore,
    prefix: String,
    initial: Option<Loaded>,
    changes: Option<mpsc::Receiver<RemoteChange>>,
    view: watch::Receiver<ClusterView>,
    status: watch::Sender<NodeStatus>,
    leadership: watch::Receiver<Option<Leadership>>,
    persist: std::sync::mpsc::Sender<LocalCopy>,
    /// Refused requests: in the node's own rotated `audit.log`, never in etcd. Anyone who can
    /// reach the API can make refusals without a token; written to etcd they would cost a
    /// commit each, fan out to every node's watch and fill etcd's quota, which stops every
    /// change (the kill switch included) on every node.
    refusals: crate::audit::AuditFile,
    node: String,
    /// The live nodes' published counters (their `health` keys), kept by [`Follow`].
    health: watch::Receiver<BTreeMap<String, NodeHealth>>,
    /// This node's counters, for [`Presence`] to publish under the node's lease.
    published: watch::Sender<Option<NodeHealth>>,
}

impl EtcdStore {
    /// Rotates the node's audit log of refused requests by size (`agent.audit_max_bytes`,
    /// `agent.audit_keep`).
    pub fn with_audit_rotation(mut self, rotation: crate::config::AuditRotation) -> Self {
        self.refusals.set_rotation(rotation);
        self
    }

    /// How long the watch has been down, once that is longer than [`FAIL_FAST_AFTER`], with why.
    fn outage(&self) -> Option<(Duration, String)> {
        let view = self.view.borrow();
        let down_for = view.changed_at.elapsed();
        if view.connected || down_for < FAIL_FAST_AFTER {
            return None;
        }
        Some((down_for, view.error.clone().unwrap_or_else(|| "the watch is down".into())))
    }
}

impl Store for EtcdStore {
    fn shared(&self) -> bool {
        true
    }

    fn leads(&self) -> bool {
        self.leadership.borrow().is_some()
    }

    fn node_counters(&self, service: &str) -> Option<NodeCounters> {
        let health = self.health.borrow();
        let others = health
            .iter()
            .filter(|(node, _)| **node != self.node)
            .filter_map(|(node, h)| Some((node.clone(), *h.services.get(service)?)))
            .collect();
        let mut present: BTreeSet<String> = self.view.borrow().nodes.keys().cloned().collect();
        present.extend(health.keys().cloned());
        present.insert(self.node.clone());
        Some(NodeCounters { me: self.node.clone(), others, present })
    }

    fn publish_counters(&mut self, services: BTreeMap<String, Counters>) {
        self.published.send_replace(Some(NodeHealth {
            node: self.node.clone(),
            at_unix_ms: cluster::unix_ms(),
            services,
        }));
    }

    async fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(self.initial.take().unwrap_or_default())
    }

    async fn commit(&mut self, commit: Commit) -> Result<Revision, StoreError> {
        let outage = self.outage();
        let mut batch = WriteBatch::new();
        for write in &commit.writes {
            let expect = match write.expect {
                Expect::Absent => cluster::Expect::Absent,
                Expect::At(revision) => cluster::Expect::ModRevision(revision as i64),
            };
            match (&write.key, &write.value) {
                (Key::Service(_), Value::Service(Some(service))) => batch.put_service(service, expect),
                (Key::Service(name), Value::Service(None)) => batch.delete_service(name, expect),
                (Key::Rollout(name), Value::Rollout(Some(rollout))) => batch.put_rollout(name, rollout, expect),
                (Key::Rollout(name), Value::Rollout(None)) => batch.delete_rollout(name, expect),
                (key, value) => return Err(StoreError::Rejected(format!("{key} cannot hold {value:?}"))),
            };
        }
        if batch.is_empty() {
            // Only node-local bookkeeping (the config file's services), which etcd does not keep.
            return Ok(0);
        }
        if let Some(entry) = &commit.audit {
            let entry = serde_json::to_value(entry).map_err(|err| StoreError::Rejected(err.to_string()))?;
            batch.audit(entry);
        }
        if commit.leader_only {
            let leadership = self.leadership.borrow().clone();
            match leadership {
                Some(leadership) => batch.fenced_by(&leadership),
                None => return Err(StoreError::NotLeader("this node does not lead the rollouts".into())),
            };
        }
        let store = if commit.leader_only {
            &self.clock
        } else if outage.is_some() {
            &self.quick
        } else {
            &self.store
        };
        match store.commit(&batch).await {
            Ok(revision) => Ok(revision as Revision),
            Err(ClusterError::Conflict(conflicts)) => Err(conflict(conflicts)),
            Err(ClusterError::NotLeader { key }) => Err(StoreError::NotLeader(format!("the leader key {key} is gone"))),
            Err(err @ ClusterError::InvalidWrite { .. }) => Err(StoreError::Rejected(err.to_string())),
            Err(err) => {
                let applied = self.status.borrow().applied_revision;
                let outage = match outage {
                    Some((down_for, why)) => format!("etcd has been unreachable for {}s ({why}); ", down_for.as_secs()),
                    None => String::new(),
                };
                Err(StoreError::Unavailable(format!(
                    "{outage}{err}. Nothing changed unless the outcome is unknown (then every node applies it \
                     if etcd committed it). This node keeps steering with the state it last applied (revision \
                     {applied}); reads answer from it, marked \"stale\""
                )))
            }
        }
    }

    async fn applied(&mut self, snapshot: &Snapshot, problems: &[String]) -> Result<(), StoreError> {
        let copy = LocalCopy {
            version: LOCAL_COPY_VERSION,
            prefix: self.prefix.clone(),
            revision: snapshot.revision,
            services: snapshot.services.clone(),
            rollouts: snapshot.rollouts.clone(),
        };
        // The writer thread only ends with the process.
        let _ = self.persist.send(copy);
        let applied_revision = snapshot.revision as i64;
        let healthy = problems.is_empty();
        let mut detail = problems.join("; ");
        if detail.len() > 1000 {
            let cut = (0..=1000).rev().find(|i| detail.is_char_boundary(*i)).unwrap_or(0);
            detail.truncate(cut);
            detail.push_str(" ...");
        }
        self.status.send_if_modified(|status| {
            if status.applied_revision == applied_revision && status.healthy == healthy && status.detail == detail {
                return false;
            }
            status.applied_revision = applied_revision;
            status.healthy = healthy;
            status.detail = detail;
            status.at_unix_ms = cluster::unix_ms();
            true
        });
        Ok(())
    }

    fn take_changes(&mut self) -> Option<mpsc::Receiver<RemoteChange>> {
        self.changes.take()
    }

    fn audit_source(&self) -> Arc<dyn AuditSource> {
        Arc::new(EtcdAudit {
            store: self.store.clone(),
            refusals: self.refusals.path().to_owned(),
            node: self.node.clone(),
        })
    }

    async fn audit_refusal(&mut self, entry: AuditEntry) -> Result<(), StoreError> {
        self.refusals
            .append(&entry)
            .map(|_| ())
            .map_err(|source| StoreError::Persist { path: self.refusals.path().to_owned(), source })
    }
}

/// A conflict as the core reads it: the first key for the message, every key's current value.
fn conflict(conflicts: Vec<cluster::Conflict>) -> StoreError {
    let key_of = |key: &cluster::Key| match key {
        cluster::Key::Service(name) => Some(Key::Service(name.clone())),
        cluster::Key::Rollout(name) => Some(Key::Rollout(name.clone())),
        _ => None,
    };
    let current: Vec<Current> = conflicts
        .iter()
        .filter_map(|c| {
            let key = key_of(&c.key)?;
            Some(match &c.current {
                None => Current {
                    value: Some(match key {
                        Key::Service(_) => Value::Service(None),
                        Key::Rollout(_) => Value::Rollout(None),
                    }),
                    key,
                    revision: c.read_at.max(0) as Revision,
                },
                Some(versioned) => Current {
                    key,
                    revision: versioned.mod_revision as Revision,
                    value: match &versioned.value {
                        Ok(cluster::Value::Service(service)) => Some(Value::Service(Some(service.clone()))),
                        Ok(cluster::Value::Rollout(rollout)) => Some(Value::Rollout(Some(rollout.clone()))),
                        _ => None,
                    },
                },
            })
        })
        .collect();
    let first = conflicts.first();
    StoreError::Conflict {
        key: first.and_then(|c| key_of(&c.key)).unwrap_or(Key::Service(String::new())),
        expected: match first.map(|c| c.expected) {
            Some(cluster::Expect::ModRevision(revision)) => Expect::At(revision as Revision),
            _ => Expect::Absent,
        },
        found: first.and_then(|c| c.current.as_ref()).map_or(0, |v| v.mod_revision as Revision),
        current,
    }
}

/// The audit log: accepted changes in etcd, readable from every node, merged by time with the
/// requests this node refused (its own `audit.log`).
struct EtcdAudit {
    store: ClusterStore,
    refusals: std::path::PathBuf,
    node: String,
}

impl AuditSource for EtcdAudit {
    fn tail(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        Box::pin(async move {
            let page = self.store.audit(limit).await.map_err(|err| {
                StoreError::Unavailable(format!("{err}; the audit log is kept in etcd and cannot be read now"))
            })?;
            for invalid in &page.invalid {
                log::error!("skipping a bad audit entry in etcd: {invalid}");
            }
            let path = self.refusals.clone();
            let refused = tokio::task::spawn_blocking({
                let path = path.clone();
                move || crate::audit::tail(&path, limit)
            })
            .await
            .map_err(|join| std::io::Error::other(join.to_string()))
            .and_then(|r| r)
            .map_err(|source| StoreError::AuditRead { path, source })?;
            let accepted = page.entries.into_iter().filter_map(|record| {
                let mut entry: AuditEntry = match serde_json::from_value(record.value.entry) {
                    Ok(entry) => entry,
                    Err(err) => {
                        log::error!("skipping an audit entry in etcd that is not one: {err}");
                        return None;
                    }
                };
                entry.node = Some(record.value.node);
                Some(entry)
            });
            let refused = refused.into_iter().map(|mut entry| {
                entry.node = Some(self.node.clone());
                entry
            });
            // Times are RFC 3339 UTC with milliseconds: they sort as text. Stable, so entries of
            // one millisecond keep their order within each log.
            let mut entries: Vec<AuditEntry> = accepted.chain(refused).collect();
            entries.sort_by(|a, b| a.time.cmp(&b.time));
            let skip = entries.len().saturating_sub(limit);
            Ok(entries.split_off(skip))
        })
    }
}

/// The services and rollouts of a cluster snapshot, as the core holds them.
fn desired_state(snapshot: &cluster::Snapshot) -> Snapshot {
    Snapshot {
        services: snapshot
            .services
            .iter()
            .map(|(name, v)| (name.clone(), Versioned { revision: v.mod_revision as Revision, value: v.value.clone() }))
            .collect(),
        rollouts: snapshot
            .rollouts
            .iter()
            .map(|(name, v)| (name.clone(), Versioned { revision: v.mod_revision as Revision, value: v.value.clone() }))
            .collect(),
        file_services: BTreeMap::new(),
        revision: snapshot.revision.max(0) as Revision,
    }
}

/// A cluster snapshot holding what the core holds (for the watch's relist diff, before etcd
/// answered for the first time).
fn mirror_of(state: &Snapshot) -> cluster::Snapshot {
    let versioned = |revision: Revision| (revision as i64, 0, 0);
    cluster::Snapshot {
        revision: state.revision as i64,
        services: state
            .services
            .iter()
            .map(|(name, v)| {
                let (mod_revision, create_revision, lease) = versioned(v.revision);
                (name.clone(), cluster::Versioned { value: v.value.clone(), mod_revision, create_revision, lease })
            })
            .collect(),
        rollouts: state
            .rollouts
            .iter()
            .map(|(name, v)| {
                let (mod_revision, create_revision, lease) = versioned(v.revision);
                (name.clone(), cluster::Versioned { value: v.value.clone(), mod_revision, create_revision, lease })
            })
            .collect(),
        ..cluster::Snapshot::default()
    }
}

// ---- the watch ----------------------------------------------------------------------------------

/// The prefix watch, feeding the core and the cluster view. Runs until cancelled.
pub struct Follow {
    watch: StateWatch,
    /// Everything the watch delivered (the last valid value of a key that turned invalid).
    mirror: cluster::Snapshot,
    to_core: mpsc::Sender<RemoteChange>,
    view: watch::Sender<ClusterView>,
    /// The live nodes' counters, for the leader's gates ([`Store::node_counters`]).
    health: watch::Sender<BTreeMap<String, NodeHealth>>,
    layout: cluster::KeyLayout,
}

/// The published counters of the nodes whose keys are in `snapshot` (the live ones: the keys
/// are under the nodes' leases). A value under no lease was not published by an agent (written
/// by hand, say): it is left out.
fn live_health(snapshot: &cluster::Snapshot) -> BTreeMap<String, NodeHealth> {
    snapshot.health.iter().filter(|(_, v)| v.lease != 0).map(|(node, v)| (node.clone(), v.value.clone())).collect()
}

impl Follow {
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return,
                event = self.watch.next() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            let to_core = match event {
                WatchEvent::Change(change) => {
                    self.mirror.apply(&change);
                    self.connected(true, None);
                    match &change.key {
                        cluster::Key::Service(name) => Some(RemoteChange::Changed {
                            revision: change.revision.max(0) as Revision,
                            writes: vec![(
                                Key::Service(name.clone()),
                                Value::Service(match change.value.map(|v| v.value) {
                                    Some(cluster::Value::Service(service)) => Some(service),
                                    _ => None,
                                }),
                            )],
                        }),
                        cluster::Key::Rollout(name) => Some(RemoteChange::Changed {
                            revision: change.revision.max(0) as Revision,
                            writes: vec![(
                                Key::Rollout(name.clone()),
                                Value::Rollout(match change.value.map(|v| v.value) {
                                    Some(cluster::Value::Rollout(rollout)) => Some(rollout),
                                    _ => None,
                                }),
                            )],
                        }),
                        cluster::Key::Node(_) | cluster::Key::Leader(_) => {
                            self.publish_members();
                            None
                        }
                        cluster::Key::Health(node) => {
                            if self.mirror.health.get(node).is_some_and(|v| v.lease == 0) {
                                log::warn!(
                                    "ignoring the counters at {}: not under a lease, so not published by an agent",
                                    self.layout.key(&change.key)
                                );
                            }
                            self.health.send_replace(live_health(&self.mirror));
                            None
                        }
                        cluster::Key::Audit(_) => None,
                    }
                }
                WatchEvent::Invalid(invalid) => {
                    // Logged and counted by the watch; the key keeps its last valid value.
                    self.mirror.record_invalid(invalid);
                    None
                }
                WatchEvent::Resync(newer) => {
                    log::warn!(
                        "etcd compacted past revision {}: relisted at revision {}, applying only what differs",
                        self.mirror.revision,
                        newer.revision
                    );
                    for change in self.mirror.diff(&newer) {
                        self.mirror.apply(&change);
                    }
                    self.mirror.invalid = newer.invalid;
                    self.mirror.revision = newer.revision;
                    self.connected(true, None);
                    self.publish_members();
                    self.health.send_replace(live_health(&self.mirror));
                    Some(RemoteChange::Resync(desired_state(&self.mirror)))
                }
                WatchEvent::Disconnected { error } => {
                    self.connected(false, Some(error));
                    None
                }
                WatchEvent::Resumed { .. } => {
                    self.connected(true, None);
                    None
                }
            };
            // Not worth waking anyone: readers of the view want nodes and connectivity.
            self.view.send_if_modified(|view| {
                view.revision = self.mirror.revision;
                false
            });
            if let Some(change) = to_core {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    sent = self.to_core.send(change) => if sent.is_err() { return },
                }
            }
        }
    }

    fn connected(&self, connected: bool, error: Option<String>) {
        self.view.send_if_modified(|view| {
            if view.connected == connected {
                return false;
            }
            if connected {
                log::info!("etcd watch follows again from revision {}", self.mirror.revision);
            }
            view.connected = connected;
            view.changed_at = Instant::now();
            view.error = error;
            true
        });
    }

    fn publish_members(&self) {
        let nodes: BTreeMap<String, NodeStatus> =
            self.mirror.nodes.iter().map(|(name, v)| (name.clone(), v.value.clone())).collect();
        let leader = self.mirror.leader().map(|c| c.value.node.clone());
        self.view.send_if_modified(|view| {
            if view.nodes == nodes && view.leader == leader {
                return false;
            }
            view.nodes = nodes;
            view.leader = leader;
            true
        });
    }
}

// ---- the node's presence --------------------------------------------------------------------------

/// The node's lease, its status key, and its campaign for the rollout leadership. Runs until
/// cancelled; then revokes the lease, so the node leaves the cluster view at once.
pub struct Presence {
    store: ClusterStore,
    status: watch::Receiver<NodeStatus>,
    leadership: watch::Sender<Option<Leadership>>,
    /// This node's counters to publish ([`Store::publish_counters`]).
    health: watch::Receiver<Option<NodeHealth>>,
}

type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

impl Presence {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        let mut session = loop {
            let status = self.status.borrow_and_update().clone();
            tokio::select! {
                () = cancel.cancelled() => return,
                started = NodeSession::start(&self.store, status) => match started {
                    Ok(session) => break session,
                    Err(err) => {
                        if delay >= Duration::from_secs(1) {
                            log::debug!("registering the node in etcd: {err}");
                        } else {
                            log::warn!("registering the node in etcd, retrying: {err}");
                        }
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                },
            }
        };
        log::info!("node {} registered in etcd", self.store.node());
        // The status may have changed while registering.
        session.publish_status(self.status.borrow_and_update().clone());
        if let Some(health) = self.health.borrow_and_update().clone() {
            session.publish_health(health);
        }
        let election = Election::new(&self.store);
        let mut campaign: Pending<Result<Leadership, ClusterError>> = None;
        let mut lost: Pending<()> = None;
        loop {
            if campaign.is_none() && lost.is_none() {
                if let Some(lease) = session.lease() {
                    let election = election.clone();
                    campaign = Some(Box::pin(async move { election.campaign(lease).await }));
                }
            }
            tokio::select! {
                () = cancel.cancelled() => {
                    self.leadership.send_replace(None);
                    session.close().await;
                    return;
                }
                changed = self.status.changed() => {
                    if changed.is_err() {
                        // The store is gone: the core has stopped.
                        self.leadership.send_replace(None);
                        session.close().await;
                        return;
                    }
                    session.publish_status(self.status.borrow_and_update().clone());
                }
                Ok(()) = self.health.changed() => {
                    if let Some(health) = self.health.borrow_and_update().clone() {
                        session.publish_health(health);
                    }
                }
                event = session.next_event() => match event {
                    Some(LeaseEvent::Lost { .. }) => {
                        // The leadership was on that lease: it is gone with it.
                        campaign = None;
                        lost = None;
                        if self.leadership.send_replace(None).is_some() {
                            log::warn!("no longer leading the rollouts (the node's lease was lost)");
                        }
                    }
                    Some(LeaseEvent::Acquired { .. }) => {}
                    None => return,
                },
                result = async { campaign.as_mut().expect("guarded").await }, if campaign.is_some() => {
                    campaign = None;
                    match result {
                        Ok(leadership) => {
                            log::info!("leading the rollouts (leader key {})", leadership.key);
                            self.leadership.send_replace(Some(leadership.clone()));
                            let election = election.clone();
                            lost = Some(Box::pin(async move { election.lost(&leadership).await }));
                        }
                        Err(err) => {
                            log::debug!("campaigning for the rollout leadership, retrying: {err}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                () = async { lost.as_mut().expect("guarded").await }, if lost.is_some() => {
                    lost = None;
                    self.leadership.send_replace(None);
                    log::warn!("no longer leading the rollouts");
                }
            }
        }
    }
}

// ---- the local copy -------------------------------------------------------------------------------

/// `cluster-state.json`: the last state this node applied from the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalCopy {
    version: u32,
    /// The `[cluster] prefix` it was applied from: a copy of another prefix is not used.
    prefix: String,
    /// Every change up to this etcd revision is in it.
    revision: Revision,
    services: BTreeMap<String, Versioned<ServiceConfig>>,
    rollouts: BTreeMap<String, Versioned<Rollout>>,
}

/// The local copy, if there is a usable one; why not goes to `notes`.
fn read_local_copy(path: &Path, prefix: &str, notes: &mut Vec<String>) -> Option<Snapshot> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => {
            notes.push(format!("cannot read the local copy of the cluster state {}: {err}", path.display()));
            return None;
        }
    };
    let copy: LocalCopy = match serde_json::from_slice(&bytes) {
        Ok(copy) => copy,
        Err(err) => {
            notes.push(format!(
                "the local copy of the cluster state {} is not usable ({err}); it is replaced at the next change",
                path.display()
            ));
            return None;
        }
    };
    if copy.version != LOCAL_COPY_VERSION || copy.prefix != prefix {
        notes.push(format!(
            "the local copy of the cluster state {} is of version {} and prefix {:?}, not {LOCAL_COPY_VERSION} and \
             {prefix:?}: not used",
            path.display(),
            copy.version,
            copy.prefix
        ));
        return None;
    }
    Some(Snapshot {
        services: copy.services,
        rollouts: copy.rollouts,
        file_services: BTreeMap::new(),
        revision: copy.revision,
    })
}

/// The writer thread: the latest copy handed over is written, older ones waiting are skipped.
/// Off the core's thread, so that an fsync never delays the next change.
fn write_local_copies(path: &Path, copies: std::sync::mpsc::Receiver<LocalCopy>) {
    let mut last_error: Option<String> = None;
    while let Ok(mut copy) = copies.recv() {
        while let Ok(newer) = copies.try_recv() {
            copy = newer;
        }
        match write_atomically(path, &copy) {
            Ok(()) => last_error = None,
            Err(err) => {
                let text = err.to_string();
                if last_error.as_ref() != Some(&text) {
                    log::error!(
                        "writing the local copy of the cluster state {}: {text} (a restart while etcd is unreachable \
                         would start from an older copy)",
                        path.display()
                    );
                    last_error = Some(text);
                }
            }
        }
    }
}

/// A new file beside `path`, synced, renamed over it, the directory synced: a crash leaves the
/// old copy or the new one.
fn write_atomically(path: &Path, copy: &LocalCopy) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(copy).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp: PathBuf = dir.join(format!(".{LOCAL_COPY_FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file: File =
            OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, percent: f64) -> ServiceConfig {
        serde_json::from_value(serde_json::json!({
            "name": name, "frontends": ["127.1.0.1:80"], "stable": ["127.0.0.1:1"], "canary_percent": percent,
        }))
        .unwrap()
    }

    #[test]
    fn the_local_copy_round_trips_and_refuses_another_prefix() {
        let dir = std::env::temp_dir().join(format!("sockshift-local-copy-{}", std::process::id()));
        let path = dir.join(LOCAL_COPY_FILE);
        let copy = LocalCopy {
            version: LOCAL_COPY_VERSION,
            prefix: "/p".into(),
            revision: 42,
            services: BTreeMap::from([("a".to_string(), Versioned { revision: 40, value: service("a", 12.5) })]),
            rollouts: BTreeMap::new(),
        };
        write_atomically(&path, &copy).unwrap();
        let mut notes = Vec::new();
        let read = read_local_copy(&path, "/p", &mut notes).expect("the copy");
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!((read.revision, read.services["a"].revision), (42, 40));
        assert_eq!(read.services["a"].value.canary_percent, 12.5);
        assert!(read_local_copy(&path, "/other", &mut notes).is_none());
        assert!(notes[0].contains("prefix"), "{notes:?}");
        fs::write(&path, b"{not json").unwrap();
        assert!(read_local_copy(&path, "/p", &mut notes).is_none());
        assert!(notes[1].contains("not usable"), "{notes:?}");
        assert!(read_local_copy(&dir.join("missing"), "/p", &mut notes).is_none() && notes.len() == 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_conflict_carries_the_current_values() {
        let conflicts = vec![
            cluster::Conflict {
                key: cluster::Key::Service("a".into()),
                expected: cluster::Expect::ModRevision(5),
                current: Some(cluster::Versioned {
                    value: Ok(cluster::Value::Service(service("a", 30.0))),
                    mod_revision: 9,
                    create_revision: 2,
                    lease: 0,
                }),
                read_at: 11,
            },
            cluster::Conflict {
                key: cluster::Key::Service("b".into()),
                expected: cluster::Expect::ModRevision(3),
                current: None,
                read_at: 11,
            },
            cluster::Conflict {
                key: cluster::Key::Rollout("c".into()),
                expected: cluster::Expect::Absent,
                current: Some(cluster::Versioned {
                    value: Err("bad".into()),
                    mod_revision: 10,
                    create_revision: 10,
                    lease: 0,
                }),
                read_at: 11,
            },
        ];
        let StoreError::Conflict { key, expected, found, current } = conflict(conflicts) else { panic!() };
        assert_eq!((key, expected, found), (Key::Service("a".into()), Expect::At(5), 9));
        assert_eq!(current.len(), 3);
        assert_eq!(current[0].value, Some(Value::Service(Some(service("a", 30.0)))));
        assert_eq!((current[1].revision, &current[1].value), (11, &Some(Value::Service(None))));
        assert_eq!((current[2].revision, &current[2].value), (10, &None), "an invalid value only moves the revision");
    }
}
