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
    error::{diagnose, error_chain, ClusterError, Conflict},
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
    /// HTTP/2 ping interval and timeout: a member that stops answering (without closing the
    /// connection) is left after about twice this, and the watch resumes on another.
    pub keep_alive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), request: Duration::from_secs(5), keep_alive: Duration::from_secs(2) }
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
        let client = Client::connect(&settings.endpoints, Some(options)).await.map_err(|source| {
            ClusterError::Setup { endpoints: endpoints.clone(), detail: error_chain(&source), source }
        })?;
        let store = Self {
            client,
            layout: KeyLayout::new(&settings.prefix),
            settings: Arc::new(settings.clone()),
            timeouts,
            counters: Arc::default(),
            audit: Arc::new(AuditIds { nonce: random_u32(), seq: AtomicU64::new(0) }),
        };
        let root = store.layout.root().to_string();
        let deadline = Instant::now() + timeouts.connect;
        loop {
            let mut kv = store.client.kv_client();
            let attempt = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
                kv.get(root.clone(), Some(GetOptions::new().with_prefix().with_count_only())),
            )
            .await;
            let source = match attempt {
                Ok(Ok(_)) => return Ok(store),
                Ok(Err(err)) => err,
                Err(_) => etcd_client::Error::Internal("no answer within the connect timeout".into()),
            };
            if Instant::now() >= deadline {
                let detail = error_chain(&source);
                return Err(ClusterError::Unreachable {
                    endpoints,
                    after: timeouts.connect,
                    problem: diagnose(&detail),
                    detail,
                    source,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

    /// Runs one request under the request timeout, retrying on another endpoint while the
    /// failure is one where the request cannot have been applied (or, for reads, at all).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        idempotent: bool,
        mut request: F,
    ) -> Result<T, ClusterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeouts.request;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = tokio::time::timeout(left, request(self.client.clone())).await;
            let err = match result {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => err,
                Err(_) => {
                    return Err(ClusterError::Etcd {
                        what,
                        detail: format!("no answer within {:?} (the outcome is unknown)", self.timeouts.request),
                        source: None,
                    })
                }
            };
            let chain = error_chain(&err);
            let retry = if idempotent { is_transient(&chain) } else { is_unsent(&chain) };
            if !retry || Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(ClusterError::Etcd { what, detail: chain, source: Some(err) });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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
            .call("read of the whole state", true, |client| {
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
    pub async fn commit(&self, batch: &WriteBatch) -> Result<i64, ClusterError> {
        let mut compares = Vec::new();
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        let mut checked: Vec<(Key, Expect)> = Vec::new();
        for op in &batch.ops {
            let (key, expect) = match op {
                Op::Put { key, value, expect } => {
                    if let Value::Service(service) = value {
                        validate_service_value(key.name(), service)
                            .map_err(|error| ClusterError::InvalidWrite { key: key.clone(), error })?;
                    }
                    writes.push(TxnOp::put(self.layout.key(key), value.encode(), None));
                    (key, *expect)
                }
                Op::Delete { key, expect } => {
                    writes.push(TxnOp::delete(self.layout.key(key), None));
                    (key, *expect)
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
                    writes.push(TxnOp::put(self.layout.key(&Key::Audit(id)), Value::Audit(record).encode(), None));
                    continue;
                }
            };
            let raw = self.layout.key(key);
            match expect {
                Expect::Any => continue,
                Expect::Absent => compares.push(Compare::create_revision(raw.clone(), CompareOp::Equal, 0)),
                Expect::ModRevision(r) => compares.push(Compare::mod_revision(raw.clone(), CompareOp::Equal, r)),
            }
            reads.push(TxnOp::get(raw, None));
            checked.push((key.clone(), expect));
        }
        if let Some(fence) = &batch.fence {
            compares.push(Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.revision));
            reads.push(TxnOp::get(fence.key.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let response = self
            .call("compare-and-swap write", false, |mut client| {
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
        if let Some(fence) = &batch.fence {
            let leader = current.last().cloned().flatten();
            if leader.map(|kv| kv.create_revision()) != Some(fence.revision) {
                return Err(ClusterError::NotLeader { key: fence.key.clone() });
            }
        }
        let mut conflicts = Vec::new();
        for ((key, expected), kv) in checked.into_iter().zip(current) {
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
                conflicts.push(Conflict { key, expected, current });
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
            .call("read", true, |mut client| {
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
            .call("read of the audit log", true, |mut client| {
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

    /// Typed changes under the prefix with a revision above `after_revision` (a snapshot's
    /// revision): see [`StateWatch`].
    pub fn watch(&self, after_revision: i64) -> StateWatch {
        StateWatch::start(self.clone(), after_revision)
    }
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

/// Failures a read may retry on another endpoint: the member is down, has no leader, or the
/// leader changed under the request.
fn is_transient(chain: &str) -> bool {
    is_unsent(chain)
        || ["leader changed", "Unavailable", "transport error", "broken pipe", "connection reset", "timed out"]
            .iter()
            .any(|n| chain.contains(n))
}

/// Failures where a write was certainly not applied, so retrying it cannot apply it twice: no
/// connection was made, or the member refused it before proposing it (no leader).
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
