//! The connection to etcd and the typed reads and writes on the key layout.

use std::{
    fmt,
    future::Future,
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{
    config::{ClusterSettings, TlsFiles},
    election::Leadership,
    error::{chain_of, diagnose, error_chain, ClusterError, Conflict},
    keys::{Key, KeyLayout},
    snapshot::Snapshot,
    unix_ms,
    values::{validate_service_value, AuditRecord, InvalidValue, Value, Versioned},
    watch::StateWatch,
};
use crate::{config::ServiceConfig, rollout::Rollout};

/// How long the client waits. Defaults suit a cluster on a LAN; every request has a deadline so
/// that a handler never hangs on an unavailable etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For the first request at connect, retried across the endpoints until this passes.
    pub connect: Duration,
    /// For one read or write, including retries on another endpoint.
    pub request: Duration,
    /// For one attempt of a request. A write in flight when the etcd leader dies is neither
    /// answered nor failed until etcd's own timeout (about 7 s): it is retried after this, and a
    /// retried compare-and-swap can never apply twice (see [`ClusterStore::commit`]).
    pub attempt: Duration,
    /// HTTP/2 ping interval and timeout: a member that stops answering (without closing the
    /// connection) is left after about twice this, and the watch resumes on another.
    pub keep_alive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(5),
            attempt: Duration::from_millis(1500),
            keep_alive: Duration::from_secs(2),
        }
    }
}

/// What a compare-and-swap expects of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there (no compare).
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key's last write must be at this revision (the `mod_revision` read with it).
    ModRevision(i64),
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Any => write!(f, "any revision"),
            Expect::Absent => write!(f, "absent"),
            Expect::ModRevision(r) => write!(f, "revision {r}"),
        }
    }
}

/// Counters for `/metrics`, shared by every clone of the store and its watches and sessions.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub invalid_values: AtomicU64,
    pub watch_restarts: AtomicU64,
    pub resyncs: AtomicU64,
    pub lease_losses: AtomicU64,
}

/// A reading of [`ClusterCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    /// Values under the prefix that did not decode or validate (each time one was read).
    pub invalid_values: u64,
    /// Times the watch was re-established after a disconnect.
    pub watch_restarts: u64,
    /// Relists after etcd compacted past the watch.
    pub resyncs: u64,
    /// Times the node's lease expired before a keep-alive reached etcd.
    pub lease_losses: u64,
}

/// The audit log's newest entries, oldest first, and the entries that did not decode.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    pub entries: Vec<Versioned<AuditRecord>>,
    pub invalid: Vec<InvalidValue>,
}

enum Op {
    Put { key: Key, value: Value, expect: Expect },
    Delete { key: Key, expect: Expect },
    Audit { entry: serde_json::Value },
}

/// Writes committed together or not at all, each with what it expects of its key; optionally
/// fenced by a leadership (nothing is written unless its leader key still stands).
#[derive(Default)]
pub struct WriteBatch {
    ops: Vec<Op>,
    fence: Option<Leadership>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put_service(&mut self, service: &ServiceConfig, expect: Expect) -> &mut Self {
        let key = Key::Service(service.name.clone());
        self.ops.push(Op::Put { key, value: Value::Service(service.clone()), expect });
        self
    }

    pub fn delete_service(&mut self, name: &str, expect: Expect) -> &mut Self {
        self.ops.push(Op::Delete { key: Key::Service(name.to_string()), expect });
        self
    }

    pub fn put_rollout(&mut self, service: &str, rollout: &Rollout, expect: Expect) -> &mut Self {
        let key = Key::Rollout(service.to_string());
        self.ops.push(Op::Put { key, value: Value::Rollout(Box::new(rollout.clone())), expect });
        self
    }

    pub fn delete_rollout(&mut self, service: &str, expect: Expect) -> &mut Self {
        self.ops.push(Op::Delete { key: Key::Rollout(service.to_string()), expect });
        self
    }

    /// An audit entry, committed with the change it records; the node and time are added.
    pub fn audit(&mut self, entry: serde_json::Value) -> &mut Self {
        self.ops.push(Op::Audit { entry });
        self
    }

    /// Commit only if `leadership` still holds: a deposed leader's batch writes nothing.
    pub fn fenced_by(&mut self, leadership: &Leadership) -> &mut Self {
        self.fence = Some(leadership.clone());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A connected etcd client bound to one prefix and node name. Cheap to clone.
#[derive(Clone)]
pub struct ClusterStore {
    client: Client,
    layout: KeyLayout,
    settings: Arc<ClusterSettings>,
    timeouts: Timeouts,
    counters: Arc<ClusterCounters>,
    audit: Arc<AuditIds>,
    /// Whether a failed attempt is tried again within `timeouts.request` (see
    /// [`Self::single_try`]).
    retries: bool,
}

/// Audit ids unique across this node's restarts: time, node, a per-process nonce, a sequence.
struct AuditIds {
    nonce: u32,
    seq: AtomicU64,
}

impl ClusterStore {
    /// Connects with the default timeouts and proves etcd answers (see [`Self::connect_with`]).
    pub async fn connect(settings: &ClusterSettings) -> Result<Self, ClusterError> {
        Self::connect_with(settings, Timeouts::default()).await
    }

    /// Reads the TLS files, sets up the client and makes a first linearizable read, retried over
    /// the endpoints until `timeouts.connect`: an error names the problem (a missing or refused
    /// client certificate, an unknown CA, nothing listening, no quorum).
    pub async fn connect_with(settings: &ClusterSettings, timeouts: Timeouts) -> Result<Self, ClusterError> {
        let store = Self::open(settings, timeouts).await?;
        store.verify().await?;
        Ok(store)
    }

    /// Reads the TLS files and sets up the client without proving that etcd answers: the client
    /// connects when it is first used, and again after every outage. An agent that starts while
    /// etcd is down keeps this client and catches up when etcd comes back; [`Self::verify`] says
    /// whether it answers now.
    pub async fn open(settings: &ClusterSettings, timeouts: Timeouts) -> Result<Self, ClusterError> {
        let endpoints = settings.endpoints.join(", ");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeouts.connect)
            .with_keep_alive(timeouts.keep_alive, timeouts.keep_alive)
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader refuses requests and ends watches at once
            // instead of serving stale data: the watch then resumes on a member with quorum.
            .with_require_leader(true);
        if let Some(tls) = &settings.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|source| ClusterError::Setup { endpoints, detail: error_chain(&source), source })?;
        Ok(Self {
            client,
            layout: KeyLayout::new(&settings.prefix),
            settings: Arc::new(settings.clone()),
            timeouts,
            counters: Arc::default(),
            audit: Arc::new(AuditIds { nonce: random_u32(), seq: AtomicU64::new(0) }),
            retries: true,
        })
    }

    /// A first linearizable read, retried over the endpoints until the connect timeout; an error
    /// names the problem (see [`ClusterError::is_misconfiguration`]).
    pub async fn verify(&self) -> Result<(), ClusterError> {
        let settings = &self.settings;
        let timeouts = self.timeouts;
        let root = self.layout.root().to_string();
        let deadline = Instant::now() + timeouts.connect;
        loop {
            let mut kv = self.client.kv_client();
            let attempt = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
                kv.get(root.clone(), Some(GetOptions::new().with_prefix().with_count_only())),
            )
            .await;
            let source = match attempt {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(err)) => err,
                Err(_) => etcd_client::Error::Internal("no answer within the connect timeout".into()),
            };
            if Instant::now() >= deadline {
                // The balanced channel retries a failing endpoint quietly, so its error is often
                // only a timeout: ask each endpoint directly why.
                let mut detail = error_chain(&source);
                for endpoint in &settings.endpoints {
                    let why = probe_directly(endpoint, settings.tls.as_ref(), &root, timeouts).await;
                    detail.push_str(&format!("; {endpoint}: {why}"));
                }
                return Err(ClusterError::Unreachable {
                    endpoints: settings.endpoints.join(", "),
                    after: timeouts.connect,
                    problem: diagnose(&detail, settings.tls.as_ref().map(|tls| tls.identity.is_some())),
                    detail,
                    source,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The same client with other timeouts (its counters and audit ids shared).
    pub fn with_timeouts(&self, timeouts: Timeouts) -> Self {
        Self { timeouts, ..self.clone() }
    }

    /// The same client making one attempt per request, never a retry: for a writer that tries
    /// again by itself with a fresh value (the rollout clock, whose every write carries the time
    /// it was decided; a retry could commit that value long after, once etcd answers again).
    pub fn single_try(&self) -> Self {
        Self { retries: false, ..self.clone() }
    }

    pub fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The underlying client, for what this module does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn counters(&self) -> CounterValues {
        let c = &self.counters;
        CounterValues {
            invalid_values: c.invalid_values.load(Ordering::Relaxed),
            watch_restarts: c.watch_restarts.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
            lease_losses: c.lease_losses.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn counter_handles(&self) -> &ClusterCounters {
        &self.counters
    }

    /// Runs one request under the request timeout, each attempt under the attempt timeout,
    /// retrying on another endpoint while the failure is transient (see [`Self::call_tracked`]).
    pub(crate) async fn call<T, F, Fut>(&self, what: &'static str, request: F) -> Result<T, ClusterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        Ok(self.call_tracked(what, request).await?.0)
    }

    /// Like [`Self::call`], and also says whether an earlier attempt may have been applied (it
    /// timed out, or failed after it was sent): only requests that are safe to repeat may be
    /// run this way, reads, puts of a fixed value, and compare-and-swap transactions.
    pub(crate) async fn call_tracked<T, F, Fut>(
        &self,
        what: &'static str,
        mut request: F,
    ) -> Result<(T, bool), ClusterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeouts.request;
        let mut maybe_applied = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = tokio::time::timeout(left.min(self.timeouts.attempt), request(self.client.clone())).await;
            let (detail, source) = match result {
                Ok(Ok(value)) => return Ok((value, maybe_applied)),
                Ok(Err(err)) => {
                    let chain = error_chain(&err);
                    if !is_transient(&chain) {
                        return Err(ClusterError::Etcd { what, detail: chain, source: Some(err) });
                    }
                    maybe_applied |= !is_unsent(&chain);
                    (chain, Some(err))
                }
                Err(_) => {
                    maybe_applied = true;
                    (format!("no answer within {:?}", left.min(self.timeouts.attempt)), None)
                }
            };
            if !self.retries || Instant::now() + RETRY_DELAY >= deadline {
                let detail = if maybe_applied { format!("{detail} (the outcome is unknown)") } else { detail };
                return Err(ClusterError::Etcd { what, detail, source });
            }
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }

    /// Decodes one key-value; a value that does not decode or validate is counted.
    pub(crate) fn decode(&self, kv: &KeyValue) -> Result<(Key, Versioned<Value>), InvalidValue> {
        let raw_key = String::from_utf8_lossy(kv.key()).into_owned();
        let invalid = |typed_key, error| {
            self.counters.invalid_values.fetch_add(1, Ordering::Relaxed);
            InvalidValue { key: raw_key.clone(), typed_key, mod_revision: kv.mod_revision(), error }
        };
        let key = self.layout.parse(kv.key()).map_err(|error| invalid(None, error))?;
        let value = Value::decode(&key, kv.value()).map_err(|error| invalid(Some(key.clone()), error))?;
        Ok((
            key,
            Versioned {
                value,
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
                lease: kv.lease(),
            },
        ))
    }

    /// Everything under the prefix but the audit log, read at one revision (one transaction of
    /// range reads). Bad values are listed in `invalid`, not returned as an error.
    pub async fn load_all(&self) -> Result<Snapshot, ClusterError> {
        let ranges = [
            self.layout.services(),
            self.layout.rollouts(),
            self.layout.nodes(),
            self.layout.health(),
            format!("{}/", self.layout.election()),
        ];
        let response = self
            .call("read of the whole state", |client| {
                let ranges = ranges.clone();
                async move {
                    let reads: Vec<TxnOp> =
                        ranges.into_iter().map(|p| TxnOp::get(p, Some(GetOptions::new().with_prefix()))).collect();
                    // Large clusters: many services times many nodes' health.
                    let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
                    kv.txn(Txn::new().and_then(reads)).await
                }
            })
            .await?;
        let mut snapshot = Snapshot { revision: response.header().map_or(0, |h| h.revision()), ..Snapshot::default() };
        for op in response.op_responses() {
            let TxnOpResponse::Get(get) = op else { continue };
            for kv in get.kvs() {
                match self.decode(kv) {
                    Ok((key, value)) => snapshot.apply(&super::snapshot::Change {
                        revision: value.mod_revision,
                        key,
                        value: Some(value),
                    }),
                    Err(invalid) => snapshot.invalid.push(invalid),
                }
            }
        }
        // apply() moved the revision to the newest key's; the read's revision is the truth.
        snapshot.revision = response.header().map_or(snapshot.revision, |h| h.revision());
        Ok(snapshot)
    }

    /// Commits a batch: all of it if every key is at the expected revision (and the fence holds),
    /// none of it otherwise. Returns the revision of the commit.
    ///
    /// An attempt whose outcome is unknown (the etcd leader died under it) is retried. The retry
    /// cannot apply a compare-and-swap twice: the first one, if it was applied, moved the
    /// revisions. Such a retry that finds the batch's own writes in place (its audit key, or
    /// every put with exactly its value at one revision) reports that commit as the result.
    pub async fn commit(&self, batch: &WriteBatch) -> Result<i64, ClusterError> {
        let mut compares = Vec::new();
        let mut writes = Vec::new();
        // Read back in the else branch: every key the batch touches, then the fence's.
        let mut touched: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        let mut checked: Vec<(usize, Key, Expect)> = Vec::new();
        for op in &batch.ops {
            let (key, expect, raw, bytes) = match op {
                Op::Put { key, value, expect } => {
                    if let Value::Service(service) = value {
                        validate_service_value(key.name(), service)
                            .map_err(|error| ClusterError::InvalidWrite { key: key.clone(), error })?;
                    }
                    let (raw, bytes) = (self.layout.key(key), value.encode());
                    writes.push(TxnOp::put(raw.clone(), bytes.clone(), None));
                    (key.clone(), *expect, raw, Some(bytes))
                }
                Op::Delete { key, expect } => {
                    let raw = self.layout.key(key);
                    writes.push(TxnOp::delete(raw.clone(), None));
                    (key.clone(), *expect, raw, None)
                }
                Op::Audit { entry } => {
                    let at_unix_ms = unix_ms();
                    let id = format!(
                        "{at_unix_ms:013}-{}-{:08x}-{:06}",
                        self.node(),
                        self.audit.nonce,
                        self.audit.seq.fetch_add(1, Ordering::Relaxed)
                    );
                    let record = AuditRecord { node: self.node().to_string(), at_unix_ms, entry: entry.clone() };
                    let key = Key::Audit(id);
                    let (raw, bytes) = (self.layout.key(&key), Value::Audit(record).encode());
                    writes.push(TxnOp::put(raw.clone(), bytes.clone(), None));
                    (key, Expect::Absent, raw, Some(bytes))
                }
            };
            match expect {
                Expect::Any => {}
                Expect::Absent => compares.push(Compare::create_revision(raw.clone(), CompareOp::Equal, 0)),
                Expect::ModRevision(r) => compares.push(Compare::mod_revision(raw.clone(), CompareOp::Equal, r)),
            }
            if expect != Expect::Any {
                checked.push((touched.len(), key, expect));
            }
            touched.push((raw, bytes));
        }
        if let Some(fence) = &batch.fence {
            compares.push(Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.revision));
        }
        let mut reads: Vec<TxnOp> = touched.iter().map(|(raw, _)| TxnOp::get(raw.clone(), None)).collect();
        if let Some(fence) = &batch.fence {
            reads.push(TxnOp::get(fence.key.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let (response, maybe_applied) = self
            .call_tracked("compare-and-swap write", |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        if response.succeeded() {
            return Ok(response.header().map_or(0, |h| h.revision()));
        }
        let current: Vec<Option<KeyValue>> = response
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            })
            .collect();
        if maybe_applied {
            let now: Vec<Option<(&[u8], i64)>> =
                current.iter().map(|kv| kv.as_ref().map(|kv| (kv.value(), kv.mod_revision()))).collect();
            if let Some(revision) = applied_at(&touched, &now) {
                return Ok(revision);
            }
        }
        if let Some(fence) = &batch.fence {
            let leader = current.get(touched.len()).cloned().flatten();
            if leader.map(|kv| kv.create_revision()) != Some(fence.revision) {
                return Err(ClusterError::NotLeader { key: fence.key.clone() });
            }
        }
        let mut conflicts = Vec::new();
        for (index, key, expected) in checked {
            let kv = current.get(index).cloned().flatten();
            let matches = match (expected, &kv) {
                (Expect::Absent, None) => true,
                (Expect::ModRevision(r), Some(kv)) => kv.mod_revision() == r,
                _ => false,
            };
            if !matches {
                let current = kv.map(|kv| Versioned {
                    value: Value::decode(&key, kv.value()),
                    mod_revision: kv.mod_revision(),
                    create_revision: kv.create_revision(),
                    lease: kv.lease(),
                });
                let read_at = response.header().map_or(0, |h| h.revision());
                conflicts.push(Conflict { key, expected, current, read_at });
            }
        }
        Err(ClusterError::Conflict(conflicts))
    }

    /// Puts one service if its key is at `expect`; returns the commit's revision.
    pub async fn put_service(&self, service: &ServiceConfig, expect: Expect) -> Result<i64, ClusterError> {
        self.commit(WriteBatch::new().put_service(service, expect)).await
    }

    pub async fn delete_service(&self, name: &str, expect: Expect) -> Result<i64, ClusterError> {
        self.commit(WriteBatch::new().delete_service(name, expect)).await
    }

    pub async fn put_rollout(&self, service: &str, rollout: &Rollout, expect: Expect) -> Result<i64, ClusterError> {
        self.commit(WriteBatch::new().put_rollout(service, rollout, expect)).await
    }

    pub async fn delete_rollout(&self, service: &str, expect: Expect) -> Result<i64, ClusterError> {
        self.commit(WriteBatch::new().delete_rollout(service, expect)).await
    }

    /// One key's current value (`None`: absent); `Err` in the value says why it is invalid.
    pub async fn get(&self, key: &Key) -> Result<Option<Versioned<Result<Value, String>>>, ClusterError> {
        let raw = self.layout.key(key);
        let response = self
            .call("read", |mut client| {
                let raw = raw.clone();
                async move { client.get(raw, None).await }
            })
            .await?;
        Ok(response.kvs().first().map(|kv| Versioned {
            value: Value::decode(key, kv.value()),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
        }))
    }

    /// The newest `limit` audit entries, oldest first (in etcd's commit order).
    pub async fn audit(&self, limit: usize) -> Result<AuditPage, ClusterError> {
        let prefix = self.layout.audit();
        let response = self
            .call("read of the audit log", |mut client| {
                let prefix = prefix.clone();
                async move {
                    let options = GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(limit as i64);
                    client.get(prefix, Some(options)).await
                }
            })
            .await?;
        let mut page = AuditPage::default();
        for kv in response.kvs().iter().rev() {
            match self.decode(kv) {
                Ok((_, Versioned { value: Value::Audit(record), mod_revision, create_revision, lease })) => {
                    page.entries.push(Versioned { value: record, mod_revision, create_revision, lease })
                }
                Ok(_) => {}
                Err(invalid) => page.invalid.push(invalid),
            }
        }
        Ok(page)
    }

    /// Whether etcd still holds the history after `revision` (it was not compacted away), so a
    /// watch from `revision + 1` will miss nothing.
    pub(crate) async fn history_kept_since(&self, revision: i64) -> Result<bool, ClusterError> {
        let root = self.layout.root().to_string();
        let result = self
            .call("compaction check", |mut client| {
                let root = root.clone();
                async move {
                    let options = GetOptions::new().with_prefix().with_count_only().with_revision(revision.max(1));
                    match client.get(root, Some(options)).await {
                        Ok(_) => Ok(true),
                        Err(err) if error_chain(&err).contains("required revision has been compacted") => Ok(false),
                        Err(err) => Err(err),
                    }
                }
            })
            .await?;
        Ok(result)
    }

    /// Typed changes under the prefix with a revision above `after_revision` (a snapshot's
    /// revision): see [`StateWatch`]. With `after_revision` 0 the watch first relists (a
    /// [`super::WatchEvent::Resync`]) once etcd answers, then follows from there.
    pub fn watch(&self, after_revision: i64) -> StateWatch {
        StateWatch::start(self.clone(), after_revision)
    }
}

/// Why one endpoint does not answer, over a direct (unbalanced) connection: the connect error
/// or the first request's, with their causes.
async fn probe_directly(endpoint: &str, tls: Option<&TlsFiles>, root: &str, timeouts: Timeouts) -> String {
    let attempt = async {
        let mut target = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|err| err.to_string())?
            .connect_timeout(timeouts.connect);
        if let Some(tls) = tls {
            let options = tls_options(tls).map_err(|err| err.to_string())?;
            target = target.tls_config(options).map_err(|err| chain_of(&err))?;
        }
        if let Some(tls) = tls {
            if let Some(refusal) = tls_refusal(endpoint, tls, timeouts).await {
                return Err(refusal);
            }
        }
        let channel = target.connect().await.map_err(|err| chain_of(&err))?;
        let client =
            Client::from_channel(etcd_client::Channel::Tonic(channel), None).await.map_err(|err| error_chain(&err))?;
        client
            .kv_client()
            .get(root, Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .map_err(|err| error_chain(&err))?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(timeouts.connect, attempt).await {
        Ok(Ok(())) => "answers now".into(),
        Ok(Err(why)) => why,
        Err(_) => format!("no answer within {:?}", timeouts.connect),
    }
}

/// A TLS handshake with the endpoint, then a read: what etcd says when it refuses this client
/// (an alert: certificate required, unknown CA) or why this client refuses etcd (its
/// certificate is not signed by `ca_file`, does not name the host). `None`: TLS is fine.
async fn tls_refusal(endpoint: &str, tls: &TlsFiles, timeouts: Timeouts) -> Option<String> {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    };
    let authority = endpoint.strip_prefix("https://")?.trim_end_matches('/');
    let host = authority.rsplit_once(':')?.0.trim_start_matches('[').trim_end_matches(']');
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&tls.ca_file).ok()? {
        if let Err(err) = cert.map_err(|e| e.to_string()).and_then(|c| roots.add(c).map_err(|e| e.to_string())) {
            return Some(format!("cluster.ca_file {}: {err}", tls.ca_file.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert).ok()?.collect::<Result<Vec<_>, _>>().ok()?;
            let key = PrivateKeyDer::from_pem_file(key).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.to_string()).ok()?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
        let mut stream = match connector.connect(name, tcp).await {
            Ok(stream) => stream,
            Err(err) => return Some(format!("TLS handshake: {}", chain_of(&err))),
        };
        // A server that accepted us sends its HTTP/2 settings; one that refused us, an alert.
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Err(err) => Some(format!("TLS: {}", chain_of(&err))),
            Ok(0) => Some("etcd closed the connection right after the TLS handshake".into()),
            Ok(_) => None,
        }
    };
    tokio::time::timeout(timeouts.connect, attempt).await.ok().flatten()
}

fn tls_options(tls: &TlsFiles) -> Result<TlsOptions, ClusterError> {
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ClusterError::TlsFile { field, path: path.to_owned(), source })
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read("cluster.ca_file", &tls.ca_file)?));
    if let Some((cert, key)) = &tls.identity {
        options =
            options.identity(Identity::from_pem(read("cluster.cert_file", cert)?, read("cluster.key_file", key)?));
    }
    Ok(options)
}

/// Pause between two attempts of a request.
const RETRY_DELAY: Duration = Duration::from_millis(50);

/// The revision at which an earlier attempt of a batch was applied, if the keys it touched hold
/// exactly what it wrote: every put's value (all at one revision, as one transaction writes
/// them) and every delete's absence. `None` when they do not, or when it only deletes (no
/// revision to tell it by).
fn applied_at(touched: &[(String, Option<Vec<u8>>)], current: &[Option<(&[u8], i64)>]) -> Option<i64> {
    let mut revision = None;
    for ((_, written), now) in touched.iter().zip(current) {
        match (written, now) {
            (Some(bytes), Some((value, mod_revision))) if *value == bytes.as_slice() => {
                if *revision.get_or_insert(*mod_revision) != *mod_revision {
                    return None;
                }
            }
            (None, None) => {}
            _ => return None,
        }
    }
    revision
}

/// Failures a read may retry on another endpoint: the member is down, has no leader, or the
/// leader changed under the request.
fn is_transient(chain: &str) -> bool {
    is_unsent(chain)
        || [
            "leader changed",
            "request timed out",
            "Unavailable",
            "transport error",
            "broken pipe",
            "connection reset",
            "timed out",
            "stream closed",
            "connection closed",
        ]
        .iter()
        .any(|n| chain.contains(n))
}

/// Failures where a request was certainly not applied: no connection was made, or the member
/// refused it before proposing it (no leader).
fn is_unsent(chain: &str) -> bool {
    ["tcp connect error", "Connection refused", "error trying to connect", "etcdserver: no leader"]
        .iter()
        .any(|n| chain.contains(n))
}

/// A nonce for audit ids, from the std hasher's random keys (no extra dependency for this).
fn random_u32() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(unix_ms().into());
    hasher.write_u32(std::process::id());
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::applied_at;

    fn kv(value: &'static [u8], mod_revision: i64) -> Option<(&'static [u8], i64)> {
        Some((value, mod_revision))
    }

    #[test]
    fn a_retry_recognises_its_own_commit() {
        let touched = [("a".to_string(), Some(b"A".to_vec())), ("b".to_string(), Some(b"B".to_vec()))];
        assert_eq!(applied_at(&touched, &[kv(b"A", 7), kv(b"B", 7)]), Some(7));
        assert_eq!(applied_at(&touched, &[kv(b"A", 7), kv(b"B", 8)]), None, "two commits");
        assert_eq!(applied_at(&touched, &[kv(b"A", 7), kv(b"X", 7)]), None, "another value");
        assert_eq!(applied_at(&touched, &[kv(b"A", 7), None]), None, "not written");
        let with_delete = [("a".to_string(), Some(b"A".to_vec())), ("c".to_string(), None)];
        assert_eq!(applied_at(&with_delete, &[kv(b"A", 9), None]), Some(9));
        assert_eq!(applied_at(&with_delete, &[kv(b"A", 9), kv(b"C", 3)]), None, "not deleted");
        assert_eq!(applied_at(&[("c".to_string(), None)], &[None]), None, "deletes alone prove nothing");
    }
}
