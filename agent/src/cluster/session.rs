//! The node's presence in the cluster: a lease kept alive in the background, and the node's
//! status and health keys attached to it, so that a node that dies disappears within the TTL.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use etcd_client::PutOptions;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{
    error::{error_chain, ClusterError},
    keys::Key,
    store::ClusterStore,
    values::{NodeHealth, NodeStatus, Value},
};

/// The lease's fate, as the node's other parts need to know it (a leader must stop leading when
/// its lease is lost; its fenced writes fail from then on anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A new lease is held and the node's keys are on it again.
    Acquired { lease: i64 },
    /// The lease expired (etcd said so, or no keep-alive got through for a whole TTL): the
    /// node's keys, and any leadership on the lease, are gone or about to be.
    Lost { lease: i64, error: String },
}

/// The node's lease and keys. Dropping it without [`NodeSession::close`] stops the keep-alive,
/// as a crash would: the keys disappear when the TTL runs out.
pub struct NodeSession {
    status: watch::Sender<NodeStatus>,
    health: watch::Sender<Option<NodeHealth>>,
    lease: watch::Receiver<Option<i64>>,
    events: mpsc::UnboundedReceiver<LeaseEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl NodeSession {
    /// Grants a lease of the configured TTL, puts the node's status on it and starts the
    /// keep-alive. Fails if etcd cannot be reached now.
    pub async fn start(store: &ClusterStore, status: NodeStatus) -> Result<Self, ClusterError> {
        Self::start_with_ttl(store, status, store.settings().lease_ttl).await
    }

    pub async fn start_with_ttl(store: &ClusterStore, status: NodeStatus, ttl: Duration) -> Result<Self, ClusterError> {
        let ttl = ttl.max(Duration::from_secs(1));
        let lease = grant(store, ttl).await?;
        put(store, lease, &Key::Node(store.node().to_string()), Value::Node(status.clone())).await?;
        let (status_tx, status_rx) = watch::channel(status);
        let (health_tx, health_rx) = watch::channel(None);
        let (lease_tx, lease_rx) = watch::channel(Some(lease));
        let (events_tx, events) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let keeper = Keeper {
            store: store.clone(),
            ttl,
            lease,
            status: status_rx,
            health: health_rx,
            lease_tx,
            events: events_tx,
            status_dirty: false,
            health_dirty: false,
        };
        let task = tokio::spawn(keeper.run(stop_rx));
        Ok(Self { status: status_tx, health: health_tx, lease: lease_rx, events, stop: Some(stop), task })
    }

    /// Replaces the node's status (written in the background, rewritten after a lease loss).
    pub fn publish_status(&self, status: NodeStatus) {
        self.status.send_replace(status);
    }

    /// Replaces the node's health counters (same as the status).
    pub fn publish_health(&self, health: NodeHealth) {
        self.health.send_replace(Some(health));
    }

    /// The lease held now; `None` between a loss and the next grant.
    pub fn lease(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    /// Follows the lease held (for campaigning on it again after a loss).
    pub fn lease_changes(&self) -> watch::Receiver<Option<i64>> {
        self.lease.clone()
    }

    /// The next lease event; `None` once the session ended.
    pub async fn next_event(&mut self) -> Option<LeaseEvent> {
        self.events.recv().await
    }

    /// Revokes the lease: the node's keys (and a leadership on the lease) go at once.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for NodeSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Pause between two keep-alive attempts of one renewal.
const KEEP_ALIVE_RETRY: Duration = Duration::from_millis(50);

struct Keeper {
    store: ClusterStore,
    ttl: Duration,
    lease: i64,
    status: watch::Receiver<NodeStatus>,
    health: watch::Receiver<Option<NodeHealth>>,
    lease_tx: watch::Sender<Option<i64>>,
    events: mpsc::UnboundedSender<LeaseEvent>,
    status_dirty: bool,
    health_dirty: bool,
}

impl Keeper {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // etcd's own clients renew at a third of the TTL: two renewals may fail before expiry.
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => {
                    let mut lease = self.store.client().lease_client();
                    let _ = tokio::time::timeout(self.store.timeouts().request, lease.revoke(self.lease)).await;
                    return;
                }
                _ = tick.tick() => {
                    match self.renew().await {
                        Ok(true) => last_renewal = Instant::now(),
                        Ok(false) => {
                            self.lost("etcd says the lease has expired".into()).await;
                            last_renewal = Instant::now();
                        }
                        Err(error) if last_renewal.elapsed() >= self.ttl => {
                            self.lost(format!("no keep-alive got through for {:?}: {error}", self.ttl)).await;
                            last_renewal = Instant::now();
                        }
                        Err(error) => log::warn!("etcd lease keep-alive failed, retrying: {error}"),
                    }
                    self.flush().await;
                }
                Ok(()) = self.status.changed() => {
                    self.status_dirty = true;
                    self.flush().await;
                }
                Ok(()) = self.health.changed() => {
                    self.health_dirty = true;
                    self.flush().await;
                }
            }
        }
    }

    /// One keep-alive round trip, tried again until a third of the TTL has passed: Ok(false)
    /// when etcd no longer knows the lease.
    async fn renew(&self) -> Result<bool, String> {
        let budget = self.ttl / 3;
        let deadline = Instant::now() + budget;
        loop {
            let mut lease = self.store.client().lease_client();
            let round_trip = async {
                let (mut keeper, mut responses) = lease.keep_alive(self.lease).await?;
                keeper.keep_alive().await?;
                responses.message().await
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match tokio::time::timeout(left, round_trip).await {
                Ok(Ok(Some(response))) => return Ok(response.ttl() > 0),
                Ok(Ok(None)) => "the keep-alive stream ended".to_string(),
                // etcd-client turns etcd's answer for a revoked or expired lease into an error.
                Ok(Err(err)) if error_chain(&err).contains("lease not found") => return Ok(false),
                Ok(Err(err)) => error_chain(&err),
                Err(_) => return Err(format!("no keep-alive answer within {budget:?}")),
            };
            // A keep-alive is safe to repeat. The balanced channel sends some requests to a
            // member that is down (a connect error at once) until it is back: tried again at
            // once, the next one most likely goes to a live member, instead of the lease running
            // out after a few unlucky ticks (seen with a 3 s TTL and one of three members killed).
            if Instant::now() + KEEP_ALIVE_RETRY >= deadline {
                return Err(error);
            }
            tokio::time::sleep(KEEP_ALIVE_RETRY).await;
        }
    }

    /// Reports the loss and gets a new lease, retrying until etcd grants one, then puts the
    /// node's keys back on it.
    async fn lost(&mut self, error: String) {
        log::error!("etcd lease {:x} lost: {error}", self.lease);
        self.store.counter_handles().lease_losses.fetch_add(1, Ordering::Relaxed);
        self.lease_tx.send_replace(None);
        let _ = self.events.send(LeaseEvent::Lost { lease: self.lease, error });
        // The old lease may still live (etcd extends leases across a leader change): revoke it
        // so that nothing is left on it, best effort.
        let mut client = self.store.client().lease_client();
        let _ = tokio::time::timeout(self.store.timeouts().request, client.revoke(self.lease)).await;
        let mut delay = Duration::from_millis(100);
        self.lease = loop {
            match grant(&self.store, self.ttl).await {
                Ok(lease) => break lease,
                Err(err) => {
                    log::warn!("granting a new etcd lease: {err}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        self.status_dirty = true;
        self.health_dirty = self.health.borrow().is_some();
        self.flush().await;
        self.lease_tx.send_replace(Some(self.lease));
        let _ = self.events.send(LeaseEvent::Acquired { lease: self.lease });
    }

    /// Writes what changed since the last successful write; kept dirty on failure, retried on
    /// the next tick.
    async fn flush(&mut self) {
        let node = self.store.node().to_string();
        if self.status_dirty {
            let status = self.status.borrow_and_update().clone();
            match put(&self.store, self.lease, &Key::Node(node.clone()), Value::Node(status)).await {
                Ok(()) => self.status_dirty = false,
                Err(err) => log::warn!("publishing the node status to etcd: {err}"),
            }
        }
        if self.health_dirty {
            let health = self.health.borrow_and_update().clone();
            if let Some(health) = health {
                match put(&self.store, self.lease, &Key::Health(node), Value::Health(health)).await {
                    Ok(()) => self.health_dirty = false,
                    Err(err) => log::warn!("publishing the node health to etcd: {err}"),
                }
            } else {
                self.health_dirty = false;
            }
        }
    }
}

async fn grant(store: &ClusterStore, ttl: Duration) -> Result<i64, ClusterError> {
    let seconds = ttl.as_secs().max(1) as i64;
    let response =
        store.call("lease grant", |mut client| async move { client.lease_grant(seconds, None).await }).await?;
    Ok(response.id())
}

async fn put(store: &ClusterStore, lease: i64, key: &Key, value: Value) -> Result<(), ClusterError> {
    let raw = store.layout().key(key);
    let bytes = value.encode();
    store
        .call("put under the node's lease", |mut client| {
            let (raw, bytes) = (raw.clone(), bytes.clone());
            async move { client.put(raw, bytes, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
    Ok(())
}
