//! The typed state under the prefix at one revision, and the changes that move it forward.

use std::collections::BTreeMap;

use super::{
    keys::Key,
    values::{Candidate, InvalidValue, NodeHealth, NodeStatus, Value, Versioned},
};
use crate::{config::ServiceConfig, rollout::Rollout};

/// Everything under `<prefix>/v1/` but the audit log, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// etcd's revision when this was read (or of the last change applied to it).
    pub revision: i64,
    pub services: BTreeMap<String, Versioned<ServiceConfig>>,
    /// By service name.
    pub rollouts: BTreeMap<String, Versioned<Rollout>>,
    /// Live nodes (their keys are under their leases), by node name.
    pub nodes: BTreeMap<String, Versioned<NodeStatus>>,
    pub health: BTreeMap<String, Versioned<NodeHealth>>,
    /// Leader candidates by lease (hex); the leader is the oldest.
    pub candidates: BTreeMap<String, Versioned<Candidate>>,
    /// Keys whose value did not decode or validate. The valid value a key had before (if this
    /// snapshot was moved forward by changes) stays in its map: a bad write never removes a
    /// service.
    pub invalid: Vec<InvalidValue>,
}

/// One key's change, in etcd's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: Key,
    /// Revision of the change (for a delete, the delete's revision).
    pub revision: i64,
    /// The new value; `None`: the key was deleted (or its lease expired).
    pub value: Option<Versioned<Value>>,
}

impl Snapshot {
    /// The elected leader: the candidate whose key is oldest.
    pub fn leader(&self) -> Option<&Versioned<Candidate>> {
        self.candidates.values().min_by_key(|c| c.create_revision)
    }

    /// Whether the latest value of `key` was invalid (and so skipped).
    pub fn is_invalid(&self, key: &Key) -> bool {
        self.invalid.iter().any(|i| i.typed_key.as_ref() == Some(key))
    }

    /// Moves the snapshot forward by one change (audit entries are not kept).
    pub fn apply(&mut self, change: &Change) {
        self.revision = self.revision.max(change.revision);
        self.invalid.retain(|i| i.typed_key.as_ref() != Some(&change.key));
        let name = change.key.name().to_string();
        let value = change.value.as_ref().map(|v| (v.value.clone(), v.mod_revision, v.create_revision, v.lease));
        macro_rules! update {
            ($map:expr, $variant:ident, $convert:expr) => {
                match value {
                    Some((Value::$variant(inner), mod_revision, create_revision, lease)) => {
                        $map.insert(name, Versioned { value: $convert(inner), mod_revision, create_revision, lease });
                    }
                    _ => {
                        $map.remove(&name);
                    }
                }
            };
        }
        match change.key {
            Key::Service(_) => update!(self.services, Service, |v| v),
            Key::Rollout(_) => update!(self.rollouts, Rollout, |v: Box<Rollout>| *v),
            Key::Node(_) => update!(self.nodes, Node, |v| v),
            Key::Health(_) => update!(self.health, Health, |v| v),
            Key::Leader(_) => update!(self.candidates, Leader, |v| v),
            Key::Audit(_) => {}
        }
    }

    /// Records a bad value: the key's last valid value (if any) is kept.
    pub fn record_invalid(&mut self, invalid: InvalidValue) {
        self.revision = self.revision.max(invalid.mod_revision);
        self.invalid.retain(|i| i.key != invalid.key);
        self.invalid.push(invalid);
    }

    /// The changes that turn `self` into `newer` (a relist after the watch fell behind a
    /// compaction): keys whose revision moved, keys that appeared, and keys that are gone. A key
    /// whose newer value is invalid yields no change, so the caller keeps its last valid value;
    /// keys that did not change yield nothing, so nothing is removed and re-added.
    pub fn diff(&self, newer: &Snapshot) -> Vec<Change> {
        let mut changes = Vec::new();
        diff_map(&self.services, &newer.services, newer, Key::Service, Value::Service, &mut changes);
        diff_map(&self.rollouts, &newer.rollouts, newer, Key::Rollout, |r| Value::Rollout(Box::new(r)), &mut changes);
        diff_map(&self.nodes, &newer.nodes, newer, Key::Node, Value::Node, &mut changes);
        diff_map(&self.health, &newer.health, newer, Key::Health, Value::Health, &mut changes);
        diff_map(&self.candidates, &newer.candidates, newer, Key::Leader, Value::Leader, &mut changes);
        changes.sort_by_key(|c| c.revision);
        changes
    }
}

fn diff_map<T: Clone>(
    older: &BTreeMap<String, Versioned<T>>,
    newer_map: &BTreeMap<String, Versioned<T>>,
    newer: &Snapshot,
    key: impl Fn(String) -> Key,
    value: impl Fn(T) -> Value,
    changes: &mut Vec<Change>,
) {
    for (name, new) in newer_map {
        if older.get(name).map(|old| old.mod_revision) != Some(new.mod_revision) {
            changes.push(Change {
                key: key(name.clone()),
                revision: new.mod_revision,
                value: Some(Versioned {
                    value: value(new.value.clone()),
                    mod_revision: new.mod_revision,
                    create_revision: new.create_revision,
                    lease: new.lease,
                }),
            });
        }
    }
    for name in older.keys() {
        let key = key(name.clone());
        if !newer_map.contains_key(name) && !newer.is_invalid(&key) {
            changes.push(Change { key, revision: newer.revision, value: None });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, percent: f64) -> ServiceConfig {
        toml::from_str(&format!(
            "name = \"{name}\"\nfrontends = [\"127.1.0.1:80\"]\nstable = [\"127.0.0.1:8080\"]\ncanary_percent = {percent}"
        ))
        .unwrap()
    }

    fn put(name: &str, percent: f64, revision: i64) -> Change {
        Change {
            key: Key::Service(name.into()),
            revision,
            value: Some(Versioned {
                value: Value::Service(service(name, percent)),
                mod_revision: revision,
                create_revision: revision,
                lease: 0,
            }),
        }
    }

    #[test]
    fn diff_yields_only_what_changed() {
        let mut old = Snapshot::default();
        for change in [put("a", 1.0, 2), put("b", 2.0, 3), put("c", 3.0, 4), put("d", 4.0, 5)] {
            old.apply(&change);
        }
        assert_eq!(old.revision, 5);
        // Newer: a unchanged, b changed, c deleted, d now invalid, e added.
        let mut newer = old.clone();
        newer.apply(&put("b", 20.0, 7));
        newer.apply(&Change { key: Key::Service("c".into()), revision: 8, value: None });
        newer.services.remove("d");
        newer.record_invalid(InvalidValue {
            key: "/sockshift/v1/services/d".into(),
            typed_key: Some(Key::Service("d".into())),
            mod_revision: 9,
            error: "bad".into(),
        });
        newer.apply(&put("e", 5.0, 10));
        let changes = old.diff(&newer);
        let summary: Vec<(String, bool)> =
            changes.iter().map(|c| (c.key.name().to_string(), c.value.is_some())).collect();
        assert_eq!(summary, [("b".to_string(), true), ("e".to_string(), true), ("c".to_string(), false)]);
        let mut caught_up = old.clone();
        for change in &changes {
            caught_up.apply(change);
        }
        assert_eq!(caught_up.services.keys().collect::<Vec<_>>(), ["a", "b", "d", "e"]);
        assert_eq!(caught_up.services["d"].value.canary_percent, 4.0, "d keeps its last valid value");
    }

    #[test]
    fn invalid_values_keep_the_last_valid_one() {
        let mut state = Snapshot::default();
        state.apply(&put("a", 1.0, 2));
        state.record_invalid(InvalidValue {
            key: "/p/v1/services/a".into(),
            typed_key: Some(Key::Service("a".into())),
            mod_revision: 3,
            error: "bad".into(),
        });
        assert_eq!(state.services["a"].mod_revision, 2);
        assert!(state.is_invalid(&Key::Service("a".into())));
        state.apply(&put("a", 2.0, 4));
        assert!(!state.is_invalid(&Key::Service("a".into())));
        assert_eq!(state.services["a"].mod_revision, 4);
    }
}
