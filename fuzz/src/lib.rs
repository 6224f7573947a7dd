//! Fuzz targets for everything the agent reads from outside: the config file, every request
//! body, the persisted state and rollout plans (with the rollout state machine they drive).
//!
//! Each target takes an input and checks two things: nothing panics (debug builds also trap
//! integer overflow), and whatever is accepted satisfies the invariants the rest of the agent
//! relies on, checked independently of the validation code (a percent within 0..=100, steps
//! that increase, a step index within its plan, ...). A failure panics with what was wrong.
//!
//! Inputs come from proptest strategies (see [`strategies`]): raw bytes, random JSON or TOML
//! built from the field names and edge values the agent knows, and valid seeds with random
//! mutations (a node replaced, a key dropped or added, a line of TOML replaced). proptest
//! shrinks a failing input to a small one before it is reported.

pub mod strategies;

use std::path::PathBuf;

use agent::{
    api::{
        extract::parse_body,
        types::{CanaryUpdate, NoFields, ServiceBody},
    },
    config::{validate_percent, validate_service, validate_services, Config, ConfigFile, Role, ServiceSpec},
    control::{
        check_rollout,
        store::{file::FileStore, Store},
    },
    rollout::{Plan, Rollout, RolloutState, SideSnapshot, Snapshot, MAX_FAILURE_THRESHOLD, MAX_STEPS},
    webhook::MAX_WEBHOOKS_PER_PLAN as MAX_WEBHOOKS,
};
use agent_common::MAX_BACKENDS_PER_SIDE;

/// A secret planted in generated configs: no error message may contain it.
pub const PLANTED_SECRET: &str = "planted-SECRET-7f3a9c";

/// What a fuzz target is given.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Bytes(Vec<u8>),
}

impl Input {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Input::Text(text) => text.as_bytes(),
            Input::Bytes(bytes) => bytes,
        }
    }
}

/// Asserts the invariants of a validated service.
fn check_spec(spec: &ServiceSpec) {
    let name = &spec.name;
    assert!((1..=63).contains(&name.len()), "accepted service name {name:?}");
    assert!(
        name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)),
        "accepted service name {name:?}"
    );
    match &spec.source.kubernetes {
        // Named by Kubernetes objects: the addresses come from discovery, never from the file.
        Some(kubernetes) => {
            assert!(
                spec.source.frontends.is_empty() && spec.source.stable.is_empty() && spec.source.canary.is_empty(),
                "{name}: accepted with both addresses and a kubernetes table"
            );
            assert!(
                !kubernetes.namespace.is_empty() && !kubernetes.frontend.is_empty() && !kubernetes.stable.is_empty()
            );
        }
        None => assert!(!spec.frontends.is_empty(), "{name}: accepted without frontends"),
    }
    assert!(spec.canary_ppm <= 1_000_000, "{name}: canary_ppm {}", spec.canary_ppm);
    let percent = spec.source.canary_percent;
    assert!(percent.is_finite() && (0.0..=100.0).contains(&percent), "{name}: canary_percent {percent}");
    let cap = spec.source.max_operator_percent;
    assert!(cap.is_finite() && (0.0..=100.0).contains(&cap), "{name}: max_operator_percent {cap}");
    for addr in spec.frontends.iter().chain(&spec.stable).chain(&spec.canary) {
        assert!(addr.port() != 0 && !addr.ip().is_unspecified(), "{name}: accepted address {addr}");
    }
    for side in [&spec.stable, &spec.canary] {
        for v4 in [true, false] {
            let count = side.iter().filter(|a| a.is_ipv4() == v4).count();
            assert!(count <= MAX_BACKENDS_PER_SIDE as usize, "{name}: {count} backends on one side");
        }
    }
    for cohort in &spec.cohorts {
        assert!(!cohort.cgroup_ids.is_empty() && !cohort.cgroup_ids.contains(&0), "{name}: cohort {cohort:?}");
    }
}

/// The config parser: no panic; an accepted config holds valid services, tokens with distinct
/// secrets, an API that is not open off loopback unless the opt-out says so, sane audit
/// bounds; no error shows a planted secret.
pub fn config(input: &Input) {
    let Input::Text(text) = input else { return };
    // Mutations may move the planted secret into another field (a service or token name, say),
    // where showing it is right: only a secret given as a token must never show.
    let only_as_token = text
        .lines()
        .filter_map(|line| line.find(PLANTED_SECRET).map(|at| &line[..at]))
        .all(|before| before.rsplit([',', '{']).next().is_some_and(|key| key.contains("token")));
    match Config::parse(text) {
        Ok(config) => {
            for spec in &config.services {
                check_spec(spec);
            }
            let sources: Vec<_> = config.services.iter().map(|s| s.source.clone()).collect();
            let again = validate_services(&sources, agent::paths::cgroup2_root().ok().as_deref())
                .unwrap_or_else(|err| panic!("accepted services do not validate again: {err}"));
            assert_eq!(again.len(), config.services.len());
            if let Some(tokens) = &config.tokens {
                assert!(!tokens.is_empty(), "[agent.auth] accepted without tokens");
                for (i, token) in tokens.iter().enumerate() {
                    assert!(!token.name.is_empty(), "token without a name");
                    assert!(
                        tokens[..i].iter().all(|t| t.digest != token.digest && t.name != token.name),
                        "duplicate token"
                    );
                }
            } else if !config.api.ip().is_loopback() {
                let file: ConfigFile = toml::from_str(text).expect("an accepted config parses as TOML");
                assert!(file.agent.insecure_allow_unauthenticated_api, "open API on {} accepted", config.api);
            }
            assert!(config.audit.max_bytes >= agent::config::MIN_AUDIT_MAX_BYTES);
            assert!((1..=agent::config::MAX_AUDIT_KEEP).contains(&config.audit.keep));
            assert!(!only_as_token || !format!("{config:?}").contains(PLANTED_SECRET), "Debug shows a secret");
        }
        Err(err) => {
            let message = err.to_string();
            assert!(!only_as_token || !message.contains(PLANTED_SECRET), "an error shows the secret: {message}");
        }
    }
}

/// Every request body type: no panic; a refusal is a 4xx with a code; an accepted body passes
/// (or is refused by) the validation its route applies, and what that accepts holds the
/// invariants.
pub fn bodies(input: &Input) {
    let bytes = input.bytes();
    let refused = |err: agent::api::error::ApiError| {
        let status = err.0.code.status().as_u16();
        assert!((400..500).contains(&status), "a body was refused with {status}: {:?}", err.0);
    };
    match parse_body::<CanaryUpdate>(bytes) {
        Ok(update) => {
            if validate_percent(update.percent, "percent").is_ok() {
                assert!(update.percent.is_finite() && (0.0..=100.0).contains(&update.percent));
            }
        }
        Err(err) => refused(err),
    }
    match parse_body::<ServiceBody>(bytes) {
        Ok(body) => {
            for current_cap in [None, Some(25.0)] {
                let config = body.clone().into_config("fuzz".into(), current_cap);
                if body.max_operator_percent.is_none() {
                    assert_eq!(config.max_operator_percent, current_cap.unwrap_or(100.0), "PUT lost the stored cap");
                }
                if let Ok(spec) = validate_service(&config, "", None) {
                    check_spec(&spec);
                }
            }
        }
        Err(err) => refused(err),
    }
    if let Err(err) = parse_body::<NoFields>(bytes) {
        refused(err);
    }
    match parse_body::<Plan>(bytes) {
        Ok(plan) => plan_accepted(plan, bytes),
        Err(err) => refused(err),
    }
}

/// A plan that parsed: if it validates, its invariants hold, it survives a round trip, the
/// delegation rule holds for it, and the state machine runs on it without breaking its own.
fn plan_accepted(plan: Plan, script: &[u8]) {
    if plan.validate().is_err() {
        return;
    }
    check_plan(&plan);
    let text = serde_json::to_vec(&plan).expect("a plan serializes");
    let again: Plan = parse_body(&text).unwrap_or_else(|err| panic!("a valid plan does not parse back: {:?}", err.0));
    assert!(again.validate().is_ok(), "a valid plan does not validate after a round trip");
    for cap in [0.0, 25.0, 100.0] {
        if plan.check_delegation(Role::Operator, cap).is_ok() {
            for step in plan.steps.iter().filter(|step| **step > cap) {
                let gated = plan.approval.as_ref().is_some_and(|a| a.role == Role::Release && a.at_percent <= *step);
                assert!(gated, "an operator's plan reaches {step} % over a cap of {cap} % without a release approval");
            }
        }
    }
    let (rollout, _) = Rollout::start(plan, 1_000, Snapshot::default(), "fuzz");
    run_rollout(rollout, script);
}

/// Independent checks of a validated plan.
fn check_plan(plan: &Plan) {
    assert!((1..=MAX_STEPS).contains(&plan.steps.len()), "{} steps", plan.steps.len());
    for (i, step) in plan.steps.iter().enumerate() {
        assert!(step.is_finite() && *step > 0.0 && *step <= 100.0, "step {step}");
        assert!(i == 0 || *step > plan.steps[i - 1], "steps do not increase: {:?}", plan.steps);
    }
    assert!(
        plan.step_seconds.is_finite() && (1.0..=86_400.0).contains(&plan.step_seconds),
        "step_seconds {}",
        plan.step_seconds
    );
    assert!(
        (1..=MAX_FAILURE_THRESHOLD).contains(&plan.failure_threshold),
        "failure_threshold {}",
        plan.failure_threshold
    );
    assert!(plan.webhooks.len() <= MAX_WEBHOOKS, "{} webhooks", plan.webhooks.len());
    for url in &plan.webhooks {
        assert!(url.starts_with("http://"), "webhook {url:?}");
        assert!(!url.bytes().any(|b| b.is_ascii_control() || b == b' '), "webhook with a control character: {url:?}");
    }
    if let Some(approval) = &plan.approval {
        assert!(approval.role != Role::Viewer, "viewer approval accepted");
        assert!(approval.at_percent.is_finite() && (0.0..=100.0).contains(&approval.at_percent));
    }
}

/// Drives a rollout with operations read from `script` (ticks with growing clocks and
/// counters, approvals, pauses, resumes, aborts, rollbacks) and checks its invariants after
/// each.
pub fn run_rollout(mut rollout: Rollout, script: &[u8]) {
    // A stored rollout's clock may be ahead of this one (a clock set back): start before it
    // sometimes.
    let mut now = match script.first() {
        Some(b) if b % 3 == 0 => rollout.window_started_unix_ms.saturating_sub(u64::from(*b) * 1000),
        _ => rollout.window_started_unix_ms,
    };
    // Live counters come from the kernel, which only counts up from what a stored rollout saw;
    // but after an agent restart with a new map they may also start below it.
    let mut counters = match script.get(1) {
        Some(b) if b % 4 == 0 => Snapshot::default(),
        _ => rollout.window_baseline,
    };
    for (i, op) in script.iter().take(200).enumerate() {
        now = now.saturating_add(u64::from(*op) * 250);
        let grow = |side: &mut SideSnapshot, by: u64| {
            side.connections = side.connections.saturating_add(by * 3);
            side.established = side.established.saturating_add(by * 2);
            side.failed_attempts = side.failed_attempts.saturating_add(by % 3);
            side.resets = side.resets.saturating_add(by % 2);
            side.srtt_sum_us = side.srtt_sum_us.saturating_add(by * 100);
            side.srtt_samples = side.srtt_samples.saturating_add(by);
        };
        grow(&mut counters.stable, u64::from(*op));
        grow(&mut counters.canary, u64::from(op.rotate_left(3)));
        let _ = match op % 8 {
            0..=3 => rollout.tick(now, counters),
            4 if rollout.state == RolloutState::AwaitingApproval => rollout.approve(now, counters, "fuzz"),
            5 if rollout.state == RolloutState::Running => rollout.pause(now, "fuzz"),
            6 if rollout.state == RolloutState::Paused => rollout.resume(now, "fuzz"),
            7 if rollout.state.is_active() && i % 5 == 0 => rollout.abort(now, counters, "fuzz"),
            7 if rollout.state.is_active() && i % 7 == 0 => rollout.roll_back(now, counters, "fuzz".into()),
            _ => rollout.tick(now, counters),
        };
        assert!(rollout.step < rollout.plan.steps.len(), "step {} of {}", rollout.step, rollout.plan.steps.len());
        assert!(rollout.percent.is_finite() && (0.0..=100.0).contains(&rollout.percent), "percent {}", rollout.percent);
        assert!(rollout.history.len() <= agent::rollout::MAX_HISTORY, "history of {}", rollout.history.len());
        let _ = rollout.readings(&counters);
        let _ = rollout.harm(&counters);
    }
}

/// A scratch state directory for the persisted-state target.
pub struct StateDir {
    pub path: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl StateDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("sockshift-fuzz-state-{}", std::process::id()));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Self { path, runtime }
    }
}

impl Default for StateDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Persisted state: whatever `state.json` holds, opening the store never fails or panics (an
/// unreadable file is moved aside); what it loads either fails the core's start checks (and is
/// dropped) or holds their invariants, and the rollout state machine runs on it.
pub fn state(dir: &StateDir, input: &Input) {
    let _ = std::fs::remove_dir_all(&dir.path);
    std::fs::create_dir_all(&dir.path).expect("scratch dir");
    let state_file = dir.path.join("state.json");
    std::fs::write(&state_file, input.bytes()).expect("write state.json");
    let mut store = FileStore::open(&dir.path).expect("open the store");
    let loaded = dir.runtime.block_on(store.load()).unwrap_or_else(|err| panic!("loading state failed: {err}"));
    if !loaded.recovered.is_empty() {
        assert!(!state_file.exists(), "an unreadable state.json was not moved aside");
        assert_eq!(loaded.snapshot, Default::default(), "recovered, yet state was kept");
        return;
    }
    for service in loaded.snapshot.services.values() {
        if let Ok(spec) = validate_service(&service.value, "", None) {
            check_spec(&spec);
        }
    }
    for rollout in loaded.snapshot.rollouts.values() {
        if check_rollout(&rollout.value).is_ok() {
            check_plan(&rollout.value.plan);
            run_rollout(rollout.value.clone(), input.bytes());
        }
    }
}

/// Plans through the rollout route's parser, validation and state machine (also part of
/// [`bodies`]; a target of its own so it gets plan-shaped inputs).
pub fn plans(input: &Input) {
    match parse_body::<Plan>(input.bytes()) {
        Ok(plan) => plan_accepted(plan, input.bytes()),
        Err(err) => assert!((400..500).contains(&err.0.code.status().as_u16())),
    }
}

/// The config file path of the example, for seeds.
pub fn example_config() -> &'static str {
    include_str!("../../config/sockshift.toml")
}
