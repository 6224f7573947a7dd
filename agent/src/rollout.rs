//! Progressive rollouts: a plan of canary weights, each held for a step while the canary's
//! health (as the kernel measured it, canary against stable over the step's window) passes the
//! plan's gates; promoted at the end, rolled back by itself when a gate keeps failing.
//!
//! This module is the state machine; the agent's engine ticks it, applies the weights it asks
//! for and persists it with the rest of the desired state.

use agent_common::SideCounters;
use serde::{Deserialize, Serialize};

use crate::config::{InvalidField, Role};

/// A rollout plan as posted to `POST /v1/services/{name}/rollout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Canary weights in percent, strictly increasing, each in (0, 100].
    pub steps: Vec<f64>,
    /// How long each step is held before it is judged.
    pub step_seconds: f64,
    #[serde(default)]
    pub gates: Gates,
    /// Failed checks in a row before the rollout rolls back.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Steps at or above `at_percent` wait for an approver with `role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// `http://` URLs that get a JSON POST on each step, pause, approval wait, promotion,
    /// rollback and abort.
    #[serde(default)]
    pub webhooks: Vec<String>,
    #[serde(default)]
    pub rollback: RollbackPolicy,
}

fn default_failure_threshold() -> u32 {
    1
}

/// Gates, all optional; unknown names are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Canary failed attempts / canary attempts, over the step's window.
    pub max_failed_attempt_ratio: Option<f64>,
    /// Canary resets of established connections / canary connections established.
    pub max_reset_ratio: Option<f64>,
    /// Canary average SRTT / stable average SRTT.
    pub max_srtt_ratio: Option<f64>,
    /// Canary connection attempts a window needs before it is judged (a quieter window is
    /// extended until it has them).
    #[serde(default)]
    pub min_connections: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub at_percent: f64,
    pub role: Role,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackPolicy {
    /// Close the canary's established TCP connections on rollback.
    #[serde(default)]
    pub terminate_connections: bool,
}

impl Plan {
    /// Refuses plans that cannot mean what their author wanted.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.steps.is_empty() {
            return Err(InvalidField::new("steps", "at least one step is required"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            if !step.is_finite() || *step <= 0.0 || *step > 100.0 {
                return Err(InvalidField::new(
                    format!("steps[{i}]"),
                    format!("must be above 0 and at most 100, got {step}"),
                ));
            }
            if i > 0 && *step <= self.steps[i - 1] {
                return Err(InvalidField::new(
                    format!("steps[{i}]"),
                    format!("steps must increase: {step} follows {}", self.steps[i - 1]),
                ));
            }
        }
        if !self.step_seconds.is_finite() || self.step_seconds <= 0.0 || self.step_seconds > 86_400.0 {
            return Err(InvalidField::new(
                "step_seconds",
                format!("must be above 0 and at most 86400, got {}", self.step_seconds),
            ));
        }
        if self.failure_threshold == 0 {
            return Err(InvalidField::new("failure_threshold", "must be at least 1"));
        }
        for (name, value) in [
            ("gates.max_failed_attempt_ratio", self.gates.max_failed_attempt_ratio),
            ("gates.max_reset_ratio", self.gates.max_reset_ratio),
            ("gates.max_srtt_ratio", self.gates.max_srtt_ratio),
        ] {
            if let Some(v) = value {
                if !v.is_finite() || v < 0.0 {
                    return Err(InvalidField::new(name, format!("must be a non-negative number, got {v}")));
                }
            }
        }
        if let Some(approval) = &self.approval {
            if !approval.at_percent.is_finite() || !(0.0..=100.0).contains(&approval.at_percent) {
                return Err(InvalidField::new(
                    "approval.at_percent",
                    format!("must be from 0 to 100, got {}", approval.at_percent),
                ));
            }
        }
        for (i, url) in self.webhooks.iter().enumerate() {
            parse_http_url(url).map_err(|msg| InvalidField::new(format!("webhooks[{i}]"), msg))?;
        }
        Ok(())
    }

    fn step_ms(&self) -> u64 {
        (self.step_seconds * 1000.0) as u64
    }

    fn needs_approval(&self, step: usize) -> Option<Role> {
        self.approval.as_ref().filter(|a| self.steps[step] >= a.at_percent).map(|a| a.role)
    }
}

/// `http://host:port/path` to (host:port, path). Only plain HTTP: webhooks go to a local relay
/// or an in-cluster receiver.
pub fn parse_http_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no usable host"));
    }
    let authority =
        if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
    Ok((authority, path.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    AwaitingApproval,
    Promoted,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::AwaitingApproval)
    }
}

/// Counters of one side at a moment, to take differences over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SideSnapshot {
    pub connections: u64,
    pub established: u64,
    pub failed_attempts: u64,
    pub resets: u64,
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
}

impl From<&SideCounters> for SideSnapshot {
    fn from(c: &SideCounters) -> Self {
        Self {
            connections: c.connections_steered,
            established: c.established,
            failed_attempts: c.failed_attempts,
            resets: c.resets,
            srtt_sum_us: c.srtt_sum_us,
            srtt_samples: c.srtt_samples,
        }
    }
}

impl SideSnapshot {
    fn since(&self, earlier: &SideSnapshot) -> SideSnapshot {
        SideSnapshot {
            connections: self.connections.saturating_sub(earlier.connections),
            established: self.established.saturating_sub(earlier.established),
            failed_attempts: self.failed_attempts.saturating_sub(earlier.failed_attempts),
            resets: self.resets.saturating_sub(earlier.resets),
            srtt_sum_us: self.srtt_sum_us.saturating_sub(earlier.srtt_sum_us),
            srtt_samples: self.srtt_samples.saturating_sub(earlier.srtt_samples),
        }
    }
}

/// Both sides at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stable: SideSnapshot,
    pub canary: SideSnapshot,
}

/// What the gates read over a window, and the verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateReadings {
    pub canary_attempts: u64,
    pub stable_attempts: u64,
    pub failed_attempt_ratio: Option<f64>,
    pub reset_ratio: Option<f64>,
    pub srtt_ratio: Option<f64>,
    /// Observed canary share of connections in the window, percent.
    pub observed_canary_percent: Option<f64>,
    pub passed: bool,
    /// Gates that failed, e.g. `max_failed_attempt_ratio: 0.52 > 0.05`.
    pub failures: Vec<String>,
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// Reads the gates over the window from `from` to `to`.
pub fn read_gates(gates: &Gates, from: &Snapshot, to: &Snapshot) -> GateReadings {
    let canary = to.canary.since(&from.canary);
    let stable = to.stable.since(&from.stable);
    let canary_attempts = canary.established + canary.failed_attempts;
    let stable_attempts = stable.established + stable.failed_attempts;
    let failed_attempt_ratio = ratio(canary.failed_attempts, canary_attempts);
    let reset_ratio = ratio(canary.resets, canary.established);
    let srtt = |s: &SideSnapshot| ratio(s.srtt_sum_us, s.srtt_samples);
    let srtt_ratio = match (srtt(&canary), srtt(&stable)) {
        (Some(c), Some(s)) if s > 0.0 => Some(c / s),
        _ => None,
    };
    let mut failures = Vec::new();
    let mut check = |name: &str, reading: Option<f64>, limit: Option<f64>| {
        if let (Some(reading), Some(limit)) = (reading, limit) {
            if reading > limit {
                failures.push(format!("{name}: {reading:.4} > {limit}"));
            }
        }
    };
    check("max_failed_attempt_ratio", failed_attempt_ratio, gates.max_failed_attempt_ratio);
    check("max_reset_ratio", reset_ratio, gates.max_reset_ratio);
    check("max_srtt_ratio", srtt_ratio, gates.max_srtt_ratio);
    GateReadings {
        canary_attempts,
        stable_attempts,
        failed_attempt_ratio,
        reset_ratio,
        srtt_ratio,
        observed_canary_percent: ratio(canary.connections * 100, canary.connections + stable.connections),
        passed: failures.is_empty(),
        failures,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub at_unix_ms: u64,
    pub event: String,
    pub step: usize,
    pub percent: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One service's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub plan: Plan,
    pub state: RolloutState,
    /// Index of the current step in `plan.steps`.
    pub step: usize,
    /// Weight the rollout has set, percent.
    pub percent: f64,
    /// When the current step's window began; survives restarts so the clock does not restart.
    pub window_started_unix_ms: u64,
    /// While paused: how far into the window the pause came.
    #[serde(default)]
    pub paused_at_elapsed_ms: Option<u64>,
    /// Counters when the window began.
    pub window_baseline: Snapshot,
    pub consecutive_failures: u32,
    pub last_gates: Option<GateReadings>,
    pub started_by: String,
    pub history: Vec<HistoryEntry>,
    /// Canary connections closed on rollback, when the plan asked for it.
    #[serde(default)]
    pub terminated_connections: Option<u64>,
}

/// What the engine must do after a tick or an operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Set the canary weight.
    SetPercent(f64),
    /// Roll back: weight 0 first, then (if the plan says so) terminate canary connections.
    RollBack { terminate_connections: bool },
    /// Tell the webhooks.
    Notify(String),
}

impl Rollout {
    /// A new rollout: the first step's weight, unless that step needs approval.
    pub fn start(plan: Plan, now_ms: u64, counters: Snapshot, by: &str) -> (Self, Vec<Effect>) {
        let mut rollout = Self {
            plan,
            state: RolloutState::Running,
            step: 0,
            percent: 0.0,
            window_started_unix_ms: now_ms,
            paused_at_elapsed_ms: None,
            window_baseline: counters,
            consecutive_failures: 0,
            last_gates: None,
            started_by: by.to_string(),
            history: Vec::new(),
            terminated_connections: None,
        };
        rollout.record(now_ms, "started", format!("by {by}"));
        let effects = if rollout.plan.needs_approval(0).is_some() {
            rollout.state = RolloutState::AwaitingApproval;
            rollout.record(now_ms, "awaiting_approval", String::new());
            vec![Effect::Notify("awaiting_approval".into())]
        } else {
            rollout.enter_step(0, now_ms, counters)
        };
        (rollout, effects)
    }

    fn record(&mut self, now_ms: u64, event: &str, detail: String) {
        self.history.push(HistoryEntry {
            at_unix_ms: now_ms,
            event: event.into(),
            step: self.step,
            percent: self.percent,
            detail,
        });
    }

    fn enter_step(&mut self, step: usize, now_ms: u64, counters: Snapshot) -> Vec<Effect> {
        self.step = step;
        self.percent = self.plan.steps[step];
        self.state = RolloutState::Running;
        self.window_started_unix_ms = now_ms;
        self.window_baseline = counters;
        self.consecutive_failures = 0;
        self.record(now_ms, "step", String::new());
        vec![Effect::SetPercent(self.percent), Effect::Notify("step".into())]
    }

    /// Advances the clock: judges a window that is over.
    pub fn tick(&mut self, now_ms: u64, counters: Snapshot) -> Vec<Effect> {
        if self.state != RolloutState::Running {
            return Vec::new();
        }
        if now_ms.saturating_sub(self.window_started_unix_ms) < self.plan.step_ms() {
            return Vec::new();
        }
        let readings = read_gates(&self.plan.gates, &self.window_baseline, &counters);
        if readings.canary_attempts < self.plan.gates.min_connections.max(1) {
            // Not enough canary traffic to judge yet: the window goes on.
            self.last_gates = Some(readings);
            return Vec::new();
        }
        let passed = readings.passed;
        let failures = readings.failures.join(", ");
        self.last_gates = Some(readings);
        if !passed {
            self.consecutive_failures += 1;
            self.record(now_ms, "check_failed", failures.clone());
            if self.consecutive_failures >= self.plan.failure_threshold {
                return self.roll_back(now_ms, format!("gates failed: {failures}"));
            }
            self.window_started_unix_ms = now_ms;
            self.window_baseline = counters;
            return Vec::new();
        }
        self.record(now_ms, "check_passed", String::new());
        let next = self.step + 1;
        if next >= self.plan.steps.len() {
            self.state = RolloutState::Promoted;
            self.record(now_ms, "promoted", String::new());
            // A plan whose last step is below 100 ends there; promotion means "the plan is done".
            return vec![Effect::Notify("promoted".into())];
        }
        if self.plan.needs_approval(next).is_some() {
            self.step = next;
            self.state = RolloutState::AwaitingApproval;
            self.record(now_ms, "awaiting_approval", format!("step {} ({} %)", next, self.plan.steps[next]));
            return vec![Effect::Notify("awaiting_approval".into())];
        }
        self.enter_step(next, now_ms, counters)
    }

    /// The role an approver of the waiting step needs, if a step is waiting.
    pub fn approval_role(&self) -> Option<Role> {
        (self.state == RolloutState::AwaitingApproval).then(|| self.plan.needs_approval(self.step)).flatten()
    }

    pub fn approve(&mut self, now_ms: u64, counters: Snapshot, by: &str) -> Vec<Effect> {
        self.record(now_ms, "approved", format!("by {by}"));
        self.enter_step(self.step, now_ms, counters)
    }

    pub fn pause(&mut self, now_ms: u64, by: &str) -> Vec<Effect> {
        self.paused_at_elapsed_ms = Some(now_ms.saturating_sub(self.window_started_unix_ms));
        self.state = RolloutState::Paused;
        self.record(now_ms, "paused", format!("by {by}"));
        vec![Effect::Notify("paused".into())]
    }

    pub fn resume(&mut self, now_ms: u64, by: &str) -> Vec<Effect> {
        let elapsed = self.paused_at_elapsed_ms.take().unwrap_or(0);
        self.window_started_unix_ms = now_ms.saturating_sub(elapsed);
        self.state = RolloutState::Running;
        self.record(now_ms, "resumed", format!("by {by}"));
        vec![Effect::Notify("resumed".into())]
    }

    /// A human stops the rollout: all traffic back to stable.
    pub fn abort(&mut self, now_ms: u64, by: &str) -> Vec<Effect> {
        self.state = RolloutState::Aborted;
        self.percent = 0.0;
        self.record(now_ms, "aborted", format!("by {by}"));
        vec![Effect::RollBack { terminate_connections: false }, Effect::Notify("aborted".into())]
    }

    /// Rolls back: weight 0, then the plan's connection policy.
    pub fn roll_back(&mut self, now_ms: u64, reason: String) -> Vec<Effect> {
        self.state = RolloutState::RolledBack;
        self.percent = 0.0;
        self.record(now_ms, "rolled_back", reason);
        vec![
            Effect::RollBack { terminate_connections: self.plan.rollback.terminate_connections },
            Effect::Notify("rolled_back".into()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(steps: &[f64]) -> Plan {
        Plan {
            steps: steps.to_vec(),
            step_seconds: 1.0,
            gates: Gates { max_failed_attempt_ratio: Some(0.05), min_connections: 10, ..Default::default() },
            failure_threshold: 1,
            approval: None,
            webhooks: vec![],
            rollback: RollbackPolicy::default(),
        }
    }

    fn traffic(prev: Snapshot, canary_ok: u64, canary_failed: u64, stable_ok: u64) -> Snapshot {
        let mut next = prev;
        next.canary.established += canary_ok;
        next.canary.failed_attempts += canary_failed;
        next.canary.connections += canary_ok + canary_failed;
        next.stable.established += stable_ok;
        next.stable.connections += stable_ok;
        next
    }

    #[test]
    fn bad_plans_are_refused_naming_the_field() {
        let cases = [
            (plan(&[]), "steps"),
            (plan(&[10.0, 5.0]), "steps[1]"),
            (plan(&[10.0, 10.0]), "steps[1]"),
            (plan(&[50.0, 101.0]), "steps[1]"),
            (plan(&[0.0, 10.0]), "steps[0]"),
            (Plan { step_seconds: -1.0, ..plan(&[10.0]) }, "step_seconds"),
            (Plan { failure_threshold: 0, ..plan(&[10.0]) }, "failure_threshold"),
            (Plan { webhooks: vec!["ftp://x".into()], ..plan(&[10.0]) }, "webhooks[0]"),
        ];
        for (plan, field) in cases {
            assert_eq!(plan.validate().unwrap_err().field, field, "{plan:?}");
        }
        assert!(plan(&[1.0, 5.0, 25.0, 50.0, 100.0]).validate().is_ok());
    }

    #[test]
    fn healthy_canary_is_promoted_step_by_step() {
        let (mut r, effects) = Rollout::start(plan(&[10.0, 50.0, 100.0]), 0, Snapshot::default(), "t");
        assert_eq!(effects[0], Effect::SetPercent(10.0));
        let mut counters = Snapshot::default();
        let mut percents = vec![];
        for second in 1..=3 {
            counters = traffic(counters, 20, 0, 80);
            for e in r.tick(second * 1000, counters) {
                if let Effect::SetPercent(p) = e {
                    percents.push(p);
                }
            }
        }
        assert_eq!(percents, vec![50.0, 100.0]);
        assert_eq!(r.state, RolloutState::Promoted);
    }

    #[test]
    fn failing_canary_rolls_back_and_quiet_windows_wait() {
        let (mut r, _) = Rollout::start(plan(&[10.0, 50.0]), 0, Snapshot::default(), "t");
        let quiet = traffic(Snapshot::default(), 3, 0, 10);
        assert!(r.tick(1000, quiet).is_empty(), "3 canary attempts < min_connections: keep waiting");
        assert_eq!(r.state, RolloutState::Running);
        let failing = traffic(quiet, 10, 10, 50);
        let effects = r.tick(1100, failing);
        assert_eq!(r.state, RolloutState::RolledBack);
        assert_eq!(effects[0], Effect::RollBack { terminate_connections: false });
        assert!(r.last_gates.as_ref().unwrap().failures[0].starts_with("max_failed_attempt_ratio"));
    }

    #[test]
    fn approval_holds_the_step_and_pause_keeps_the_clock() {
        let mut p = plan(&[10.0, 50.0]);
        p.approval = Some(Approval { at_percent: 50.0, role: Role::Release });
        let (mut r, _) = Rollout::start(p, 0, Snapshot::default(), "t");
        r.pause(400, "t");
        r.resume(10_400, "t");
        assert_eq!(r.window_started_unix_ms, 10_000, "resuming keeps the 400 ms already served");
        let counters = traffic(Snapshot::default(), 20, 0, 80);
        assert!(r.tick(10_900, counters).is_empty());
        r.tick(11_000, counters);
        assert_eq!(r.state, RolloutState::AwaitingApproval);
        assert_eq!(r.approval_role(), Some(Role::Release));
        assert_eq!(r.percent, 10.0, "the weight waits at the approved step");
        assert_eq!(r.approve(12_000, counters, "rita")[0], Effect::SetPercent(50.0));
    }

    #[test]
    fn urls_parse() {
        assert_eq!(parse_http_url("http://127.0.0.1:9000/hook").unwrap(), ("127.0.0.1:9000".into(), "/hook".into()));
        assert_eq!(parse_http_url("http://example.test").unwrap(), ("example.test:80".into(), "/".into()));
        assert!(parse_http_url("https://x").is_err());
    }
}
