//! Key names under `<prefix>/v1/` (the layout is documented in `cluster/mod.rs`).

use std::fmt;

/// Version segment of every key: a layout change that an older agent would misread gets a new
/// one (`v2`), and the older agent, which watches only `v1`, never sees it.
pub const LAYOUT_VERSION: &str = "v1";

const SERVICES: &str = "services/";
const ROLLOUTS: &str = "rollouts/";
const NODES: &str = "nodes/";
const HEALTH: &str = "health/";
const AUDIT: &str = "audit/";
/// The election's name is `<root>leader`; etcd's election service keys each candidate as
/// `<name>/<lease id in hex>`.
const LEADER: &str = "leader";

/// What a key under the root is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `services/<name>`: the service's spec, weight and cohorts.
    Service(String),
    /// `rollouts/<service>`: the service's rollout (active or the last finished one).
    Rollout(String),
    /// `nodes/<node>`: the node's status, under its lease.
    Node(String),
    /// `health/<node>`: the node's cumulative per-service kernel counters, under its lease.
    Health(String),
    /// `audit/<id>`: one accepted change; ids sort by time.
    Audit(String),
    /// `leader/<lease hex>`: one candidate of the leader election, under its lease.
    Leader(String),
}

impl Key {
    /// The name of the thing the key is about (service, node, audit id or lease).
    pub fn name(&self) -> &str {
        match self {
            Key::Service(n) | Key::Rollout(n) | Key::Node(n) | Key::Health(n) | Key::Audit(n) | Key::Leader(n) => n,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Key::Service(_) => "service",
            Key::Rollout(_) => "rollout",
            Key::Node(_) => "node",
            Key::Health(_) => "health",
            Key::Audit(_) => "audit",
            Key::Leader(_) => "leader",
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind(), self.name())
    }
}

/// The key names of one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// `<prefix>/v1/`.
    root: String,
}

impl KeyLayout {
    /// `prefix` as validated by `ClusterConfig` (leading `/`, no trailing one).
    pub fn new(prefix: &str) -> Self {
        Self { root: format!("{prefix}/{LAYOUT_VERSION}/") }
    }

    /// `<prefix>/v1/`: everything an agent watches.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn services(&self) -> String {
        format!("{}{SERVICES}", self.root)
    }
    pub fn rollouts(&self) -> String {
        format!("{}{ROLLOUTS}", self.root)
    }
    pub fn nodes(&self) -> String {
        format!("{}{NODES}", self.root)
    }
    pub fn health(&self) -> String {
        format!("{}{HEALTH}", self.root)
    }
    pub fn audit(&self) -> String {
        format!("{}{AUDIT}", self.root)
    }
    /// The election name given to etcd's election service.
    pub fn election(&self) -> String {
        format!("{}{LEADER}", self.root)
    }

    /// The full key.
    pub fn key(&self, key: &Key) -> String {
        let (dir, name) = match key {
            Key::Service(n) => (SERVICES, n),
            Key::Rollout(n) => (ROLLOUTS, n),
            Key::Node(n) => (NODES, n),
            Key::Health(n) => (HEALTH, n),
            Key::Audit(n) => (AUDIT, n),
            Key::Leader(n) => return format!("{}{LEADER}/{n}", self.root),
        };
        format!("{}{dir}{name}", self.root)
    }

    /// Which key this is, or why it is not one of ours.
    pub fn parse(&self, raw: &[u8]) -> Result<Key, String> {
        let text = std::str::from_utf8(raw).map_err(|_| "the key is not UTF-8".to_string())?;
        let rest = text.strip_prefix(&self.root).ok_or_else(|| format!("the key is outside {}", self.root))?;
        let (dir, name) = match rest.split_once('/') {
            Some((dir, name)) => (dir, name),
            None => return Err(format!("unknown key (expected {}<kind>/<name>)", self.root)),
        };
        if name.is_empty() || name.contains('/') {
            return Err(format!("{dir}/{name:?} is not <kind>/<name>"));
        }
        let name = name.to_string();
        Ok(match dir {
            "services" => Key::Service(name),
            "rollouts" => Key::Rollout(name),
            "nodes" => Key::Node(name),
            "health" => Key::Health(name),
            "audit" => Key::Audit(name),
            LEADER => Key::Leader(name),
            other => return Err(format!("unknown kind {other:?} (written by a newer agent?)")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let layout = KeyLayout::new("/sockshift");
        for key in [
            Key::Service("web".into()),
            Key::Rollout("web".into()),
            Key::Node("worker-7".into()),
            Key::Health("worker-7".into()),
            Key::Audit("0001700000000000-worker-7-00000001".into()),
            Key::Leader("694d7b0c1a2b3c4d".into()),
        ] {
            let raw = layout.key(&key);
            assert!(raw.starts_with("/sockshift/v1/"), "{raw}");
            assert_eq!(layout.parse(raw.as_bytes()), Ok(key));
        }
        assert_eq!(layout.key(&Key::Service("web".into())), "/sockshift/v1/services/web");
        assert_eq!(layout.key(&Key::Leader("1f".into())), "/sockshift/v1/leader/1f");
        assert_eq!(layout.election(), "/sockshift/v1/leader");
    }

    #[test]
    fn foreign_keys_are_refused() {
        let layout = KeyLayout::new("/sockshift");
        for raw in
            ["/sockshift/v1/services", "/sockshift/v1/services/", "/sockshift/v1/widgets/a", "/other/v1/services/a"]
        {
            assert!(layout.parse(raw.as_bytes()).is_err(), "{raw}");
        }
        assert!(layout.parse(b"/sockshift/v1/services/a/b").is_err());
        assert!(layout.parse(b"/sockshift/v1/services/\xff").is_err());
    }
}
