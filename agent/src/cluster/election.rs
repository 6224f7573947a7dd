//! Who drives the rollouts: etcd's election service on a lease. The leader is the candidate with
//! the oldest key under `<prefix>/v1/leader/`; its key's create revision is the fencing token
//! that every one of its state writes is conditioned on (see [`super::WriteBatch::fenced_by`]).

use etcd_client::{EventType, LeaderKey, ResignOptions, WatchOptions};

use super::{
    error::{error_chain, ClusterError},
    store::ClusterStore,
    values::{Candidate, Value},
};

/// A held leadership, or the current leader as read by anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub node: String,
    /// The leader's key, `<prefix>/v1/leader/<lease hex>`.
    pub key: String,
    /// The key's create revision: the fencing token.
    pub revision: i64,
    pub lease: i64,
}

/// The election of one prefix.
#[derive(Clone)]
pub struct Election {
    store: ClusterStore,
}

impl Election {
    pub fn new(store: &ClusterStore) -> Self {
        Self { store: store.clone() }
    }

    /// Waits, without a deadline, until this node leads on `lease` (a lease the caller keeps
    /// alive, e.g. the [`super::NodeSession`]'s). Drop the future to stop campaigning: etcd then
    /// withdraws the candidate. Fails when the connection to etcd breaks; campaign again.
    pub async fn campaign(&self, lease: i64) -> Result<Leadership, ClusterError> {
        let value = Value::Leader(Candidate { node: self.store.node().to_string() }).encode();
        let mut client = self.store.client().election_client();
        let response = client.campaign(self.store.layout().election(), value, lease).await.map_err(|err| {
            ClusterError::Etcd { what: "leader campaign", detail: error_chain(&err), source: Some(err) }
        })?;
        let leader = response.leader().ok_or_else(|| ClusterError::Etcd {
            what: "leader campaign",
            detail: "etcd answered without a leader key".into(),
            source: None,
        })?;
        Ok(Leadership {
            node: self.store.node().to_string(),
            key: String::from_utf8_lossy(leader.key()).into_owned(),
            revision: leader.rev(),
            lease: leader.lease(),
        })
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leadership>, ClusterError> {
        let name = self.store.layout().election();
        let result = self
            .store
            .call("leader read", |mut client| {
                let name = name.clone();
                async move {
                    match client.leader(name).await {
                        Ok(response) => Ok(response.kv().cloned()),
                        // etcd answers "no leader" as an error status.
                        Err(err) if error_chain(&err).contains("election: no leader") => Ok(None),
                        Err(err) => Err(err),
                    }
                }
            })
            .await?;
        Ok(result.map(|kv| {
            let node = match Value::decode(&super::keys::Key::Leader(String::new()), kv.value()) {
                Ok(Value::Leader(candidate)) => candidate.node,
                _ => String::from_utf8_lossy(kv.value()).into_owned(),
            };
            Leadership {
                node,
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                revision: kv.create_revision(),
                lease: kv.lease(),
            }
        }))
    }

    /// Whether `leadership` still stands (its key exists with the same create revision).
    pub async fn holds(&self, leadership: &Leadership) -> Result<bool, ClusterError> {
        let key = leadership.key.clone();
        let response = self
            .store
            .call("leader key read", |mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        Ok(response.kvs().first().is_some_and(|kv| kv.create_revision() == leadership.revision))
    }

    /// Resolves once `leadership` has ended (resigned, lease expired or revoked). Retries
    /// through etcd outages; while etcd cannot be reached the leadership may already be gone:
    /// the fencing on every write, not this, is what keeps a deposed leader from writing.
    pub async fn lost(&self, leadership: &Leadership) {
        loop {
            if let Ok(false) = self.holds(leadership).await {
                return;
            }
            let options = WatchOptions::new().with_start_revision(leadership.revision);
            let mut client = self.store.client().watch_client();
            let opened = tokio::time::timeout(
                self.store.timeouts().request,
                client.watch(leadership.key.clone(), Some(options)),
            )
            .await;
            if let Ok(Ok(mut stream)) = opened {
                while let Ok(Some(response)) = stream.message().await {
                    if response.canceled() {
                        break;
                    }
                    for event in response.events() {
                        let replaced = event.kv().is_some_and(|kv| kv.create_revision() != leadership.revision);
                        if event.event_type() == EventType::Delete || replaced {
                            return;
                        }
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Gives the leadership up (the next candidate takes over at once).
    pub async fn resign(&self, leadership: &Leadership) -> Result<(), ClusterError> {
        let leader = LeaderKey::new()
            .with_name(self.store.layout().election())
            .with_key(leadership.key.clone())
            .with_rev(leadership.revision)
            .with_lease(leadership.lease);
        self.store
            .call("leader resign", |mut client| {
                let leader = leader.clone();
                async move { client.resign(Some(ResignOptions::new().with_leader(leader))).await }
            })
            .await?;
        Ok(())
    }
}
