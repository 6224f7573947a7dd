//! Where desired state is kept: the interface between the control core and its storage.
//!
//! The core (`control::core`) is the only user. It owns the node's datapath and applies every
//! change in the same order, whatever the store:
//!
//! 1. validate the whole resulting state (nothing is touched on error);
//! 2. [`Store::commit`] the changed keys, compared on the revisions the core last saw
//!    (compare-and-swap), together with the change's audit entry;
//! 3. apply the committed state to this node's datapath;
//! 4. [`Store::applied`]: tell the store what the datapath now holds.
//!
//! A commit that fails (disk full, conflict, store unreachable) leaves the datapath and the
//! core's view untouched: the caller gets an error and the old state stays. A datapath apply that
//! fails after a commit depends on the store:
//! - a node-local store ([`Store::shared`] false) is put back: a second commit writes the
//!   previous values back, compared on the revisions the first one produced; nothing changed;
//! - a shared store keeps the commit: other nodes may already have applied it, and writing the
//!   old values back would flap their datapaths. This node keeps its previous state for those
//!   keys, reports itself unhealthy with the reason ([`Store::applied`]'s `problems`), and the
//!   caller is told that the change is committed but not applied here.
//!
//! Two implementations exist with this one interface:
//! - [`file::FileStore`] (single node, the default): `state.json` and `audit.log` under
//!   `agent.state_dir`. Revisions are a local counter. Nothing changes it but this agent, so
//!   [`Store::take_changes`] gives `None`; the config file watcher is a separate command source.
//! - [`etcd::EtcdStore`] (cluster mode): keys under `<prefix>/v1/`, revisions are etcd
//!   `mod_revision`s, a commit is one etcd transaction (`compare mod_revision` on every key it
//!   writes, the audit entry written in the same transaction), [`Store::take_changes`] is the
//!   prefix watch, and [`Store::applied`] writes the node's local copy of the last applied state
//!   (so an agent restarted while etcd is unreachable restores it) and publishes how far the node
//!   got.
//!
//! Implementations run on the core's own thread (a current-thread Tokio runtime), never on the
//! API's workers: they may do blocking file I/O, but must bound every network wait (a store that
//! never answers makes the core stop answering, which `/healthz` reports).

use std::{collections::BTreeMap, future::Future, pin::Pin};

use serde::{Deserialize, Serialize};

use crate::{
    audit::AuditEntry,
    config::ServiceConfig,
    rollout::{Rollout, Snapshot as Counters},
};

/// Revision of a key, or of the whole store. The file store counts commits; etcd gives its
/// `mod_revision`. 0 means "never written".
pub type Revision = u64;

/// Cluster mode: the other nodes' counters of one service, for the leader's gates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeCounters {
    /// This node's name.
    pub me: String,
    /// The cumulative counters the other live nodes last published, by node.
    pub others: BTreeMap<String, Counters>,
    /// Every node in the cluster now (its keys are under a live lease), this one included.
    pub present: std::collections::BTreeSet<String>,
}

/// What a key names: one service's spec (with its weight and cohorts), or one service's rollout
/// (the last one, active or finished). An etcd store maps them to `<prefix>/v1/services/<name>`
/// and `<prefix>/v1/rollouts/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Service(String),
    Rollout(String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Service(name) => write!(f, "services/{name}"),
            Key::Rollout(name) => write!(f, "rollouts/{name}"),
        }
    }
}

/// A stored value and the revision it was last written at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub revision: Revision,
    pub value: T,
}

/// Everything a store holds, as read at start (or, for a shared store, relisted after its change
/// stream was lost).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<String, Versioned<ServiceConfig>>,
    pub rollouts: BTreeMap<String, Versioned<Rollout>>,
    /// The config file's services when this node last reconciled with its file: node-local
    /// bookkeeping for the file-merge rule (see `state`), not shared state. A shared store keeps
    /// it in its local copy only.
    pub file_services: BTreeMap<String, ServiceConfig>,
    /// Revision of the whole store at this snapshot; a change stream resumes after it.
    pub revision: Revision,
}

/// What the store had when it was opened.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// Problems met while loading that the store recovered from (a corrupt file moved aside, an
    /// entry that did not parse skipped): logged by the core, reported nowhere else.
    pub recovered: Vec<String>,
}

/// What a write expects to find, compared before anything in the commit is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists at exactly this revision.
    At(Revision),
}

impl Expect {
    /// `At` the revision of a known value, `Absent` when there is none (or it was never
    /// committed: revision 0).
    pub fn of<T>(current: Option<&Versioned<T>>) -> Self {
        current.filter(|v| v.revision > 0).map_or(Expect::Absent, |v| Expect::At(v.revision))
    }
}

/// The new value of a key, or `None` to delete it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Service(Option<ServiceConfig>),
    Rollout(Option<Box<Rollout>>),
}

/// One key written by a commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub key: Key,
    pub expect: Expect,
    pub value: Value,
}

/// One atomic change: every write happens, with the audit entry, or none does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Commit {
    pub writes: Vec<Write>,
    /// New node-local file bookkeeping (see [`Snapshot::file_services`]), when it changes.
    pub file_services: Option<BTreeMap<String, ServiceConfig>>,
    /// The accepted change as the audit log records it; `None` for changes no caller made (a
    /// rollout's clock, a config file reload).
    pub audit: Option<AuditEntry>,
    /// Written only while this node drives the rollouts (a rollout's clock): a shared store
    /// fences the commit on the node's leadership, so a deposed leader writes nothing. The
    /// file store, whose node always leads, ignores it.
    pub leader_only: bool,
}

/// A change made by someone else (another node), delivered by [`Store::take_changes`]. The core
/// applies it to the datapath without committing it again.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteChange {
    /// Keys written elsewhere, with the revision of that commit.
    Changed { revision: Revision, writes: Vec<(Key, Value)> },
    /// The stream lost its place (an etcd compaction): this is the whole state now. The core
    /// applies only the difference to what it holds, so nothing flaps.
    Resync(Snapshot),
}

/// A key's value in the store when a commit found it at another revision than expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub key: Key,
    /// The key's `mod_revision`; for an absent key, the store's revision when it was read.
    pub revision: Revision,
    /// The value now (`Value::Service(None)`: absent); `None` when the stored value is invalid
    /// (the core keeps the key's last valid value, but compares on this revision from now on).
    pub value: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compared key was not at the expected revision: someone else changed it first.
    #[error("{key} was changed concurrently (expected {expected:?}, found revision {found})")]
    Conflict {
        key: Key,
        expected: Expect,
        found: Revision,
        /// The current values of the keys that did not match, when the store read them (a
        /// shared store does): the core adopts them and tries the command again.
        current: Vec<Current>,
    },
    /// A leader-only commit (see [`Commit::leader_only`]) from a node that does not lead.
    #[error("not the rollout leader: {0}")]
    NotLeader(String),
    /// The store refused to write a value (a shared store's own check): nothing was written.
    #[error("the state store refused the change: {0}")]
    Rejected(String),
    /// The store cannot be reached (a shared store's backend is down). Nothing was written.
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    /// The change could not be made durable (disk full, read-only filesystem, ...). Nothing was
    /// written.
    #[error("persisting the state in {path}: {source}")]
    Persist { path: std::path::PathBuf, source: std::io::Error },
    /// Reading the audit log failed.
    #[error("reading the audit log {path}: {source}")]
    AuditRead { path: std::path::PathBuf, source: std::io::Error },
}

/// A boxed future, for [`AuditSource`] (used as a trait object by the API).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads the audit log. Separate from [`Store`] because the API reads it directly, without a
/// round trip through the core (reading a long log must not delay changes); cheap to clone.
pub trait AuditSource: Send + Sync + 'static {
    /// The last `limit` entries, oldest first.
    fn tail(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>>;
}

/// Durable, revisioned desired state. See the module docs for the order the core calls it in.
pub trait Store: Send + 'static {
    /// Whether other nodes share this store (their changes arrive through
    /// [`Store::take_changes`]). A shared store is the source of truth: the core never writes to
    /// it on its own behalf (at start, after a datapath refusal), it only follows it.
    fn shared(&self) -> bool {
        false
    }

    /// Whether this node may make [`Commit::leader_only`] commits now (it drives the rollouts).
    fn leads(&self) -> bool {
        true
    }

    /// Cluster mode: what the other nodes published of `service` (see
    /// [`Store::publish_counters`]). `None` for a store of one node: the gates judge this
    /// node's counters alone.
    fn node_counters(&self, _service: &str) -> Option<NodeCounters> {
        None
    }

    /// Cluster mode: publishes this node's cumulative counters of the services with an active
    /// rollout (under the node's lease), for the leader's gates. Nothing for a store of one node.
    fn publish_counters(&mut self, _services: BTreeMap<String, Counters>) {}

    /// Reads the whole state at start. Recovers from what it can (and says so in
    /// [`Loaded::recovered`]) rather than refusing to start: an agent that cannot start has no
    /// kill switch. A shared store that cannot reach its backend returns its local copy of the
    /// last applied state.
    fn load(&mut self) -> impl Future<Output = Result<Loaded, StoreError>> + Send;

    /// Writes `commit` atomically: every [`Write::expect`] is compared first, and on any
    /// mismatch nothing is written ([`StoreError::Conflict`]). On success every written key has
    /// the returned revision. The audit entry is durable when this returns; so is the state,
    /// except for the file store's directory sync, which waits for [`Store::applied`] (or the
    /// next commit) so that it does not delay the datapath. The core calls `applied` after every
    /// commit (also after putting a refused one back), before it answers.
    fn commit(&mut self, commit: Commit) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// The datapath now holds `snapshot`: every change of the store up to `snapshot.revision`,
    /// and this node's own commits (at their keys' revisions). `problems` says why the datapath
    /// differs from the store (changes it refused), empty when it does not. A shared store
    /// persists the snapshot locally and publishes the node's progress and health; the file
    /// store syncs the directory its commit renamed the state in.
    fn applied(
        &mut self,
        snapshot: &Snapshot,
        problems: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The stream of changes made elsewhere, taken once by the core at start. `None` when
    /// nothing but this agent writes the store (the file store).
    fn take_changes(&mut self) -> Option<tokio::sync::mpsc::Receiver<RemoteChange>>;

    /// A reader of the audit log for the API.
    fn audit_source(&self) -> std::sync::Arc<dyn AuditSource>;

    /// Records a refused request in the audit log (no state changes). The default commits an
    /// empty change carrying the entry; a store that can append to its log alone does that.
    fn audit_refusal(&mut self, entry: AuditEntry) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move { self.commit(Commit { audit: Some(entry), ..Default::default() }).await.map(|_| ()) }
    }
}

pub mod etcd;
pub mod file;
