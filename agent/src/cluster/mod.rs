//! Cluster mode's etcd side: the desired state of every node (services, rollouts, the audit log)
//! kept in etcd, each node's liveness and health under its lease, and the rollout leader's
//! election with fenced writes.
//!
//! This module speaks to etcd and nothing else: the control core adopts it as the etcd
//! implementation of its store, feeds the watch's changes to its owner task, and applies them to
//! the datapath. Nothing here touches the datapath, so losing etcd never stops steering.
//!
//! # Key layout (`<prefix>` is `[cluster] prefix`, `/sockshift` by default)
//!
//! | key | value (`{"schema": 1, ...}`) | lease | written by |
//! |---|---|---|---|
//! | `<prefix>/v1/services/<name>` | `{"schema":1,"service":{ServiceConfig}}`: spec, weight, cohorts | none | any node, compare-and-swap on the key's `mod_revision` |
//! | `<prefix>/v1/rollouts/<service>` | `{"schema":1,"rollout":{Rollout}}`: plan, state, step, window, history | none | the leader (fenced), or any node for start/pause/abort |
//! | `<prefix>/v1/audit/<ms:013>-<node>-<nonce>-<seq>` | `{"schema":1,"audit":{"node","at_unix_ms","entry":{...}}}` | none | the node that accepted the change, in the change's own transaction |
//! | `<prefix>/v1/nodes/<node>` | `{"schema":1,"node":{"node","agent_version","applied_revision","at_unix_ms","healthy","detail"}}` | the node's | the node |
//! | `<prefix>/v1/health/<node>` | `{"schema":1,"health":{"node","at_unix_ms","services":{"<name>":{"stable":{..},"canary":{..}}}}}` | the node's | the node, at most once a second when they changed, for the services with an active rollout (the leader's gates sum them) |
//! | `<prefix>/v1/leader/<lease hex>` | `{"schema":1,"leader":{"node"}}` | the candidate's | etcd's election service (`Campaign`); the oldest key is the leader |
//!
//! - Everything is under `<prefix>/v1/`. A layout an older agent would misread gets `v2/`; an
//!   agent only watches its own version. A value with another `schema` is reported as invalid.
//! - One key per service and per rollout keeps a compare-and-swap to one key and a watch event to
//!   one object; the revision of a key is the version a writer compares on.
//! - Audit keys sort by time; the order of record is the keys' `create_revision` (etcd's commit
//!   order). They are append-only: nothing here deletes them (an operator trims with
//!   `etcdctl del --prefix <prefix>/v1/audit/<older ms>` or a range).
//! - A value that does not decode or validate is reported by key and counted, never applied: a
//!   service keeps its last valid state.
//!
//! # Parts
//! - [`ClusterStore`]: connect (TLS, timeouts, a first request that proves etcd answers),
//!   [`ClusterStore::load_all`], compare-and-swap writes ([`WriteBatch`], fenced by a
//!   [`Leadership`]), the audit log.
//! - [`StateWatch`]: typed changes from a revision, in order, resumed after a disconnect, and
//!   relisted (a [`WatchEvent::Resync`]) after etcd compacted past it.
//! - [`NodeSession`]: the node's lease with keep-alive, its status and health keys on it, and the
//!   lease lost and reacquired as events.
//! - [`Election`]: campaign, read and resign the leadership on a lease.

pub mod config;
mod election;
mod error;
pub mod keys;
mod session;
mod snapshot;
mod store;
pub mod values;
mod watch;

pub use config::{ClusterConfig, ClusterSettings};
pub use election::{Election, Leadership};
pub use error::{ClusterError, Conflict, Problem};
pub use keys::{Key, KeyLayout};
pub use session::{LeaseEvent, NodeSession};
pub use snapshot::{Change, Snapshot};
pub use store::{AuditPage, ClusterCounters, ClusterStore, CounterValues, Expect, Timeouts, WriteBatch};
pub use values::{AuditRecord, Candidate, InvalidValue, NodeHealth, NodeStatus, Value, Versioned};
pub use watch::{StateWatch, WatchEvent};

/// Milliseconds since the Unix epoch, for the timestamps in values.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
