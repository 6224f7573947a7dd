//! Input generators: random JSON and TOML made of the agent's own field names and edge values,
//! valid seeds with random mutations, and raw bytes.

use agent::{
    config::{Affinity, ServiceConfig},
    rollout::{Plan, Rollout, Snapshot},
};
use proptest::{collection::vec, prelude::*};
use serde_json::{json, Map, Value};

use crate::{Input, PLANTED_SECRET};

/// Field names of request bodies, plans and persisted state.
const KEYS: &[&str] = &[
    "name",
    "frontends",
    "stable",
    "canary",
    "canary_percent",
    "affinity",
    "max_operator_percent",
    "cohort",
    "cgroups",
    "percent",
    "steps",
    "step_seconds",
    "gates",
    "confidence",
    "failed_attempts_tolerance",
    "resets_tolerance",
    "max_failed_attempt_ratio",
    "max_reset_ratio",
    "max_srtt_ratio",
    "min_connections",
    "failure_threshold",
    "approval",
    "at_percent",
    "role",
    "webhooks",
    "rollback",
    "terminate_connections",
    "version",
    "revision",
    "services",
    "rollouts",
    "file_services",
    "value",
    "plan",
    "state",
    "step",
    "window_started_unix_ms",
    "paused_at_elapsed_ms",
    "window_baseline",
    "rollout_baseline",
    "step_baseline",
    "consecutive_failures",
    "last_gates",
    "started_by",
    "history",
    "history_dropped",
    "connections",
    "established",
    "failed_attempts",
    "srtt_samples",
    "x",
];

/// Strings the validation has opinions about.
const STRINGS: &[&str] = &[
    "",
    "web",
    "127.1.0.1:80",
    "[::1]:8080",
    "10.0.0.1:0",
    "0.0.0.0:80",
    "[::ffff:1.2.3.4]:80",
    "1.2.3.4",
    "http://127.0.0.1:9/x",
    "http://127.0.0.1:9/x?key=1",
    "http://a b/",
    "http://x/\r\nHost: y",
    "http://user@x/",
    "https://x/",
    "release",
    "operator",
    "viewer",
    "none",
    "client",
    "connection",
    "always",
    "never",
    "running",
    "paused",
    "awaiting_approval",
    "promoted",
    "rolled_back",
    "aborted",
    "/sys/fs/cgroup",
    "/nonexistent",
    "-1",
    "NaN",
    "ü",
    "\u{0}",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.0001,
            0.5,
            1.0,
            25.0,
            99.9999,
            100.0,
            100.00001,
            101.0,
            -1.0,
            1e-9,
            0.999,
            0.8,
            0.9999,
            1e308,
            -1e308,
            86_400.0,
            86_400.1,
            1.8446744073709552e19,
        ])
        .prop_map(|f| json!(f)),
        prop::sample::select(vec![
            0i64,
            1,
            2,
            7,
            99,
            100,
            101,
            255,
            256,
            1024,
            1025,
            65_535,
            65_536,
            i64::from(u32::MAX),
            -1,
            i64::MIN,
            i64::MAX
        ])
        .prop_map(|i| json!(i)),
        Just(json!(u64::MAX)),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(|f| json!(f)),
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(STRINGS).prop_map(String::from),
        1 => "[a-z0-9:./\\[\\]_-]{0,24}",
        1 => any::<String>(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![9 => prop::sample::select(KEYS).prop_map(String::from), 1 => string()]
}

/// Any JSON value, mostly made of the agent's field names and edge values.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), number(), string().prop_map(Value::String)];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            vec((key(), inner), 0..8).prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Number of nodes of a JSON value.
fn count(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(map) => map.values().map(count).sum(),
        _ => 0,
    }
}

/// Applies `f` to the `target`-th node (pre-order).
fn visit(value: &mut Value, target: usize, counter: &mut usize, f: &mut dyn FnMut(&mut Value)) -> bool {
    if *counter == target {
        f(value);
        return true;
    }
    *counter += 1;
    match value {
        Value::Array(items) => items.iter_mut().any(|item| visit(item, target, counter, f)),
        Value::Object(map) => map.values_mut().any(|item| visit(item, target, counter, f)),
        _ => false,
    }
}

/// One mutation of a JSON document: at node `at` (modulo the node count), `kind` says what.
#[derive(Debug, Clone)]
pub struct Mutation {
    at: usize,
    kind: u8,
    key: String,
    value: Value,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (any::<usize>(), any::<u8>(), key(), json_value()).prop_map(|(at, kind, key, value)| Mutation {
        at,
        kind,
        key,
        value,
    })
}

/// `seed` with `mutations` applied: a node replaced, a key removed or added, an array item
/// removed or added.
pub fn mutate(seed: &Value, mutations: &[Mutation]) -> Value {
    let mut doc = seed.clone();
    for m in mutations {
        let target = m.at % count(&doc);
        let mut counter = 0;
        visit(&mut doc, target, &mut counter, &mut |node| match (m.kind % 5, node) {
            (0, node) => *node = m.value.clone(),
            (1, Value::Object(map)) if !map.is_empty() => {
                let victim = map.keys().nth(m.at % map.len()).cloned().unwrap_or_default();
                map.remove(&victim);
            }
            (2, Value::Object(map)) => {
                map.insert(m.key.clone(), m.value.clone());
            }
            (3, Value::Array(items)) if !items.is_empty() => {
                items.remove(m.at % items.len());
            }
            (4, Value::Array(items)) => items.push(m.value.clone()),
            (_, node) => *node = m.value.clone(),
        });
    }
    doc
}

/// Seeds for request bodies: one valid body of each route, several plans.
pub fn body_seeds() -> Vec<Value> {
    vec![
        json!({"percent": 12.5}),
        json!({}),
        json!({"frontends": ["127.1.0.1:80", "[fd00::1]:80"], "stable": ["127.0.0.1:8001", "[::1]:8001"],
               "canary": ["127.0.0.1:8002"], "canary_percent": 5, "affinity": "client", "max_operator_percent": 25,
               "cohort": [{"cgroups": [42, "/sys/fs/cgroup"], "canary": "always"}]}),
        json!({"canary_percent": 5, "kubernetes": {"namespace": "shop", "frontend": "web", "stable": "web-stable",
               "canary": "web-canary", "ports": ["http", 443]}}),
        json!({"steps": [1, 5, 25, 50, 100], "step_seconds": 60}),
        json!({"steps": [10, 50, 100], "step_seconds": 1, "gates": "none", "failure_threshold": 3,
               "approval": {"at_percent": 50, "role": "release"}, "webhooks": ["http://127.0.0.1:9/hook"],
               "rollback": {"terminate_connections": true}}),
        json!({"steps": [20, 40], "step_seconds": 30, "gates": {"confidence": 0.99, "failed_attempts_tolerance": 0.05,
               "resets_tolerance": 0.01, "max_failed_attempt_ratio": 2, "max_reset_ratio": 3, "max_srtt_ratio": 1.5,
               "min_connections": 100}}),
    ]
}

fn service(name: &str) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        frontends: vec!["127.1.0.1:80".into()],
        stable: vec!["127.0.0.1:8001".into()],
        canary: vec!["127.0.0.1:8002".into()],
        canary_percent: 5.0,
        affinity: Affinity::Client,
        max_operator_percent: 25.0,
        cohorts: vec![],
        kubernetes: None,
    }
}

/// Seeds for `state.json`: version 2 with services and rollouts in several states, version 1.
pub fn state_seeds() -> Vec<Value> {
    let plan = |v: Value| -> Plan { serde_json::from_value(v).expect("seed plan") };
    let mut rollouts = Vec::new();
    for seed in body_seeds().into_iter().filter(|seed| seed.get("steps").is_some()) {
        let (rollout, _) = Rollout::start(plan(seed), 1_000, Snapshot::default(), "seed");
        rollouts.push(rollout);
    }
    let (mut waiting, _) = Rollout::start(
        plan(
            json!({"steps": [10, 50], "step_seconds": 1, "gates": "none", "approval": {"at_percent": 50, "role": "operator"}}),
        ),
        1_000,
        Snapshot::default(),
        "seed",
    );
    let _ = waiting.tick(3_000, Snapshot::default());
    let _ = waiting.tick(5_000, Snapshot::default());
    rollouts.push(waiting);
    let rollout_json = |r: &Rollout| serde_json::to_value(r).expect("rollout serializes");
    let mut seeds: Vec<Value> = rollouts
        .iter()
        .map(|r| {
            json!({"version": 2, "revision": 3,
                   "services": {"web": {"revision": 1, "value": service("web")}, "db": {"revision": 2, "value": service("db")}},
                   "rollouts": {"web": {"revision": 3, "value": rollout_json(r)}},
                   "file_services": {"db": service("db")}})
        })
        .collect();
    seeds.push(
        json!({"version": 1, "services": {"web": service("web")}, "rollouts": {"web": rollout_json(&rollouts[0])}}),
    );
    seeds
}

/// JSON inputs: random documents, mutated seeds, and mutated seeds' bytes with flips and cuts.
pub fn json_input(seeds: Vec<Value>) -> impl Strategy<Value = Input> {
    let seeds_for_bytes = seeds.clone();
    prop_oneof![
        2 => json_value().prop_map(|v| Input::Text(v.to_string())),
        6 => (prop::sample::select(seeds), vec(mutation(), 0..4))
            .prop_map(|(seed, mutations)| Input::Text(mutate(&seed, &mutations).to_string())),
        2 => (prop::sample::select(seeds_for_bytes), vec((any::<usize>(), any::<u8>()), 0..6), any::<Option<usize>>())
            .prop_map(|(seed, flips, cut)| {
                let mut bytes = seed.to_string().into_bytes();
                for (at, byte) in flips {
                    let len = bytes.len();
                    bytes[at % len] = byte;
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut % (bytes.len() + 1));
                }
                Input::Bytes(bytes)
            }),
        1 => vec(any::<u8>(), 0..512).prop_map(Input::Bytes),
    ]
}

/// TOML lines the config validation has opinions about.
fn toml_lines() -> Vec<String> {
    let secret = PLANTED_SECRET;
    [
        "[agent]",
        "[agent.auth]",
        "[[agent.auth.tokens]]",
        "[[service]]",
        "[[service.cohort]]",
        "[service.kubernetes]",
        "namespace = \"shop\"",
        "namespace = \"Not_A_Name\"",
        "frontend = \"web\"",
        "stable = \"web-stable\"",
        "canary = \"web-canary\"",
        "ports = [\"http\", 443, 0]",
        "cgroup = \"/tmp\"",
        "api = \"0.0.0.0:9477\"",
        "api = \"[::]:1\"",
        "api = \"127.0.0.1:9477\"",
        "insecure_allow_unauthenticated_api = true",
        "api_hosts = [\"agent.example\", \"bad host\"]",
        "audit_max_bytes = 0",
        "audit_max_bytes = 18446744073709551615",
        "audit_keep = 0",
        "audit_keep = 101",
        "name = \"ci\"",
        "name = \"ci2\"",
        "role = \"release\"",
        "role = \"viewer\"",
        &format!("token = \"{secret}\""),
        &format!("token = \"{secret}-other\""),
        "token = 123456789012345678",
        &format!("token = [\"{secret}\"]"),
        &format!("token = {{ a = \"{secret}\" }}"),
        &format!("token = \"{secret}"),
        &format!("token = '''{secret}'''"),
        "token_file = \"/etc/hostname\"",
        "token_file = \"/nonexistent\"",
        &format!("tokens = [{{ name = \"x\", token = \"{secret}\", role = \"admn\" }}]"),
        "frontends = [\"127.1.0.1:80\"]",
        "frontends = []",
        "stable = [\"127.0.0.1:8001\", \"127.0.0.1:8001\"]",
        "canary = [\"[::ffff:1.2.3.4]:80\"]",
        "canary_percent = nan",
        "canary_percent = inf",
        "canary_percent = -0.0",
        "canary_percent = 100.00001",
        "max_operator_percent = 1e400",
        "cgroups = [0]",
        "cgroups = [\"/nonexistent\"]",
        "canary = \"always\"",
        "affinity = \"sticky\"",
        "webhook_allow = [\"169.254.169.254:80\"]",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn toml_seeds() -> Vec<String> {
    let secret = PLANTED_SECRET;
    vec![
        crate::example_config().to_string(),
        format!(
            "[agent]\ncgroup = \"/tmp\"\napi = \"0.0.0.0:9477\"\napi_hosts = [\"agent.example\"]\naudit_max_bytes = 2000000\n\
             audit_keep = 3\n[[agent.auth.tokens]]\nname = \"ci\"\ntoken = \"{secret}\"\nrole = \"operator\"\n\
             [[agent.auth.tokens]]\nname = \"admin\"\ntoken = \"{secret}-admin\"\nrole = \"release\"\n\
             [[service]]\nname = \"web\"\nfrontends = [\"127.1.0.1:80\"]\nstable = [\"127.0.0.1:8001\"]\ncanary_percent = 5\n\
             [[service.cohort]]\ncgroups = [42]\ncanary = \"never\"\n"
        ),
        "[[service]]\nname = \"web\"\ncanary_percent = 5.0\n[service.kubernetes]\nnamespace = \"shop\"\n\
         frontend = \"web\"\nstable = \"web-stable\"\ncanary = \"web-canary\"\nports = [\"http\", 443]\n"
            .to_string(),
    ]
}

/// One line-level change to a TOML text.
#[derive(Debug, Clone)]
pub struct LineEdit {
    at: usize,
    kind: u8,
    line: String,
}

/// TOML inputs: mutated seeds (lines replaced, inserted, removed, values replaced) and random
/// text.
pub fn toml_input() -> impl Strategy<Value = Input> {
    let lines = toml_lines();
    let edit = (any::<usize>(), any::<u8>(), prop_oneof![4 => prop::sample::select(lines), 1 => any::<String>()])
        .prop_map(|(at, kind, line)| LineEdit { at, kind, line });
    prop_oneof![
        8 => (prop::sample::select(toml_seeds()), vec(edit, 0..6)).prop_map(|(seed, edits)| {
            let mut lines: Vec<String> = seed.lines().map(String::from).collect();
            for edit in edits {
                let at = edit.at % (lines.len() + 1);
                match edit.kind % 4 {
                    0 if at < lines.len() => lines[at] = edit.line,
                    1 if at < lines.len() => {
                        lines.remove(at);
                    }
                    2 if at < lines.len() => {
                        let key = lines[at].split('=').next().unwrap_or_default().to_string();
                        let value = edit.line.split_once('=').map_or(edit.line.as_str(), |(_, v)| v).to_string();
                        lines[at] = format!("{key}={value}");
                    }
                    _ => lines.insert(at, edit.line),
                }
            }
            Input::Text(lines.join("\n"))
        }),
        1 => any::<String>().prop_map(Input::Text),
    ]
}
