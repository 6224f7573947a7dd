//! Values stored under the layout: JSON envelopes `{"schema": 1, "<kind>": {...}}`, decoded and
//! validated per key so that one bad value (written by hand, or by a newer agent) is reported by
//! its key and never stops the others from being read.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::keys::Key;
use crate::{
    config::{validate_service, ServiceConfig},
    rollout::{Rollout, Snapshot as SideCounters},
};

/// Version of the value schema. A value with another one is reported, not guessed at.
pub const SCHEMA_VERSION: u32 = 1;

/// A node's status at `<prefix>/v1/nodes/<node>`, under the node's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    pub node: String,
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// The etcd revision whose desired state this node's datapath holds.
    pub applied_revision: i64,
    /// When the node last changed this status (ms since the Unix epoch, the node's clock).
    pub at_unix_ms: u64,
    /// Whether the node's datapath is loaded, attached and matches the applied state.
    pub healthy: bool,
    /// Why not healthy, or other detail for operators.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A node's cumulative kernel counters per service at `<prefix>/v1/health/<node>`, under the
/// node's lease, republished about once a second: cluster-wide gates sum the deltas of the
/// live nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeHealth {
    pub node: String,
    pub at_unix_ms: u64,
    /// Counters since the node's datapath was loaded, per service name.
    pub services: BTreeMap<String, SideCounters>,
}

/// One audit entry at `<prefix>/v1/audit/<id>`: the agent's own entry (who, route, before,
/// after) wrapped with the node that accepted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub node: String,
    pub at_unix_ms: u64,
    pub entry: serde_json::Value,
}

/// A leader candidate's value at `<prefix>/v1/leader/<lease hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub node: String,
}

/// A decoded, validated value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Service(ServiceConfig),
    Rollout(Box<Rollout>),
    Node(NodeStatus),
    Health(NodeHealth),
    Audit(AuditRecord),
    Leader(Candidate),
}

/// Only the schema field, to refuse a newer schema with that reason rather than with whatever
/// field it happens to trip over first.
#[derive(Deserialize)]
struct SchemaProbe {
    schema: Option<serde_json::Value>,
}

/// The envelopes: `{"schema": 1, "<field>": body}`, unknown fields refused.
macro_rules! envelopes {
    ($($name:ident { $field:ident: $ty:ty }),* $(,)?) => {
        $(
            #[derive(Serialize, Deserialize)]
            #[serde(deny_unknown_fields)]
            struct $name { schema: u32, $field: $ty }
        )*
    };
}

envelopes! {
    ServiceEnvelope { service: ServiceConfig },
    RolloutEnvelope { rollout: Rollout },
    NodeEnvelope { node: NodeStatus },
    HealthEnvelope { health: NodeHealth },
    AuditEnvelope { audit: AuditRecord },
    LeaderEnvelope { leader: Candidate },
}

fn to_json<T: Serialize>(envelope: &T) -> Vec<u8> {
    serde_json::to_vec(envelope).expect("values serialize: plain structs with string keys")
}

impl Value {
    /// The JSON stored in etcd.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Value::Service(service) => to_json(&ServiceEnvelope { schema: SCHEMA_VERSION, service: service.clone() }),
            Value::Rollout(rollout) => {
                to_json(&RolloutEnvelope { schema: SCHEMA_VERSION, rollout: (**rollout).clone() })
            }
            Value::Node(node) => to_json(&NodeEnvelope { schema: SCHEMA_VERSION, node: node.clone() }),
            Value::Health(health) => to_json(&HealthEnvelope { schema: SCHEMA_VERSION, health: health.clone() }),
            Value::Audit(audit) => to_json(&AuditEnvelope { schema: SCHEMA_VERSION, audit: audit.clone() }),
            Value::Leader(leader) => to_json(&LeaderEnvelope { schema: SCHEMA_VERSION, leader: leader.clone() }),
        }
    }

    /// Decodes and validates the value of `key`. The error names the field (`service.canary_percent:
    /// must be ...`) or the reason (`not JSON: ...`, `schema 2, this agent reads schema 1`).
    pub fn decode(key: &Key, bytes: &[u8]) -> Result<Value, String> {
        let probe: SchemaProbe = serde_json::from_slice(bytes).map_err(|err| format!("not a JSON object: {err}"))?;
        match probe.schema {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {}
            Some(other) => return Err(format!("schema {other}, this agent reads schema {SCHEMA_VERSION}")),
            None => return Err(format!("no \"schema\" field (expected {SCHEMA_VERSION})")),
        }
        match key {
            Key::Service(name) => {
                let service = decode::<ServiceEnvelope>(bytes)?.service;
                validate_service_value(name, &service)?;
                Ok(Value::Service(service))
            }
            Key::Rollout(_) => {
                let rollout = decode::<RolloutEnvelope>(bytes)?.rollout;
                rollout.plan.validate().map_err(|err| format!("rollout.plan.{err}"))?;
                if rollout.step >= rollout.plan.steps.len() {
                    return Err(format!(
                        "rollout.step: {} is past the plan's {} steps",
                        rollout.step,
                        rollout.plan.steps.len()
                    ));
                }
                Ok(Value::Rollout(Box::new(rollout)))
            }
            Key::Node(name) => {
                let node = decode::<NodeEnvelope>(bytes)?.node;
                same_name("node.node", name, &node.node)?;
                Ok(Value::Node(node))
            }
            Key::Health(name) => {
                let health = decode::<HealthEnvelope>(bytes)?.health;
                same_name("health.node", name, &health.node)?;
                check_counters(&health)?;
                Ok(Value::Health(health))
            }
            Key::Audit(_) => Ok(Value::Audit(decode::<AuditEnvelope>(bytes)?.audit)),
            Key::Leader(_) => Ok(Value::Leader(decode::<LeaderEnvelope>(bytes)?.leader)),
        }
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        if path == "." {
            err.inner().to_string()
        } else {
            format!("{path}: {}", err.inner())
        }
    })
}

/// Largest counter a node may publish: no kernel counter gets near 2^53 (285 years at a million
/// connections a second). A larger one was not written by an agent, and sums of them could
/// overflow.
const MAX_COUNTER: u64 = 1 << 53;

/// Every counter of a node's published health is one a kernel could have counted.
fn check_counters(health: &NodeHealth) -> Result<(), String> {
    for (service, counters) in &health.services {
        for (side, c) in [("stable", &counters.stable), ("canary", &counters.canary)] {
            let fields = [
                ("connections", c.connections),
                ("datagrams", c.datagrams),
                ("established", c.established),
                ("failed_attempts", c.failed_attempts),
                ("abandoned_attempts", c.abandoned_attempts),
                ("resets", c.resets),
                ("srtt_sum_us", c.srtt_sum_us),
                ("srtt_samples", c.srtt_samples),
                ("rto_connections", c.rto_connections),
            ];
            if let Some((field, value)) = fields.iter().find(|(_, v)| *v > MAX_COUNTER) {
                return Err(format!(
                    "health.services.{service}.{side}.{field}: {value} is above 2^53, not a kernel counter"
                ));
            }
        }
    }
    Ok(())
}

fn same_name(field: &str, key_name: &str, value_name: &str) -> Result<(), String> {
    if key_name != value_name {
        return Err(format!("{field}: {value_name:?} does not match the key's name {key_name:?}"));
    }
    Ok(())
}

/// What every node can check about a service without its own cgroup tree: the name matches the
/// key, and the spec passes the agent's validation. Cohort cgroups name paths on each node, so
/// they are resolved (and may be refused) by the node applying the service, not here.
pub fn validate_service_value(key_name: &str, service: &ServiceConfig) -> Result<(), String> {
    same_name("service.name", key_name, &service.name)?;
    let mut portable = service.clone();
    portable.cohorts.clear();
    validate_service(&portable, "", None).map_err(|err| format!("service.{}: {}", err.field, err.message))?;
    Ok(())
}

/// A value with the etcd revisions it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    /// Revision of the last write of the key: what a compare-and-swap compares.
    pub mod_revision: i64,
    /// Revision that created the key (a leader candidate's place in the queue).
    pub create_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// A value that did not decode or validate, by key: skipped, never applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    /// The full etcd key (lossy UTF-8).
    pub key: String,
    /// The key, when it is one of the layout's (a bad value under a good key).
    pub typed_key: Option<Key>,
    pub mod_revision: i64,
    pub error: String,
}

impl std::fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (revision {}): {}", self.key, self.mod_revision, self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, percent: f64) -> ServiceConfig {
        toml::from_str(&format!(
            "name = \"{name}\"\nfrontends = [\"127.1.0.1:80\"]\nstable = [\"127.0.0.1:8080\"]\n\
             canary = [\"127.0.0.1:8081\"]\ncanary_percent = {percent}"
        ))
        .unwrap()
    }

    #[test]
    fn services_round_trip() {
        let value = Value::Service(service("web", 12.5));
        let bytes = value.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"schema\":1,\"service\":{"), "{text}");
        assert_eq!(Value::decode(&Key::Service("web".into()), &bytes), Ok(value));
    }

    #[test]
    fn node_values_round_trip() {
        let node = NodeStatus {
            node: "n1".into(),
            agent_version: "0.1.0".into(),
            applied_revision: 42,
            at_unix_ms: 1,
            healthy: true,
            detail: String::new(),
        };
        let value = Value::Node(node);
        assert_eq!(Value::decode(&Key::Node("n1".into()), &value.encode()), Ok(value.clone()));
        let err = Value::decode(&Key::Node("n2".into()), &value.encode()).unwrap_err();
        assert!(err.contains("node.node"), "{err}");
    }

    #[test]
    fn health_values_round_trip_and_implausible_counters_are_named() {
        let mut counters = SideCounters::default();
        counters.canary.failed_attempts = 3;
        let health =
            NodeHealth { node: "n1".into(), at_unix_ms: 1, services: BTreeMap::from([("web".into(), counters)]) };
        let value = Value::Health(health.clone());
        let key = Key::Health("n1".into());
        assert_eq!(Value::decode(&key, &value.encode()), Ok(value));
        let mut bad = health.clone();
        bad.services.get_mut("web").unwrap().canary.resets = u64::MAX;
        let err = Value::decode(&key, &Value::Health(bad).encode()).unwrap_err();
        assert!(err.starts_with("health.services.web.canary.resets:"), "{err}");
        let err = Value::decode(&Key::Health("n2".into()), &Value::Health(health).encode()).unwrap_err();
        assert!(err.contains("health.node"), "{err}");
        let err = Value::decode(
            &key,
            br#"{"schema":1,"health":{"node":"n1","at_unix_ms":1,"services":{"web":{"canary":{"resets":-1}}}}}"#,
        )
        .unwrap_err();
        assert!(err.contains("health.services.web.canary.resets"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let web = Key::Service("web".into());
        let good = String::from_utf8(Value::Service(service("web", 10.0)).encode()).unwrap();
        let cases = [
            ("{not json".to_string(), "not a JSON object"),
            ("[1, 2]".to_string(), "not a JSON object"),
            (good.replace("\"schema\":1", "\"schema\":2"), "schema 2, this agent reads schema 1"),
            (good.replace("\"schema\":1,", ""), "no \"schema\" field"),
            (good.replace("\"canary_percent\":10.0", "\"canary_percent\":150.0"), "service.canary_percent"),
            (good.replace("\"canary_percent\":10.0", "\"canary_percent\":\"x\""), "service.canary_percent"),
            (good.replace("\"canary_percent\"", "\"canary_precent\""), "canary_precent"),
            (good.replace("\"name\":\"web\"", "\"name\":\"api\""), "service.name"),
            (good.replace("127.1.0.1:80", "nowhere"), "service.frontends[0]"),
            (good.replace("{\"schema\":1,", "{\"schema\":1,\"extra\":true,"), "extra"),
        ];
        for (text, expected) in cases {
            let err = Value::decode(&web, text.as_bytes()).expect_err(&text);
            assert!(err.contains(expected), "{text}: error {err:?} should mention {expected:?}");
        }
    }
}
