//! Progressive rollouts: a plan of canary weights, each held for a step while the canary's
//! health (as the kernel measured it, canary against stable) passes the plan's gates; promoted at
//! the end, rolled back by itself as soon as the evidence says the canary is worse.
//!
//! This module is the state machine; the agent's engine ticks it (every 100 ms) with the
//! service's counters, applies the weights it asks for and persists it with the rest of the
//! desired state. The state changes only on events (a step, a judgement, the first canary failure
//! of a window), not on every tick, so an unchanged rollout is not rewritten.
//!
//! - `plan`: the plan, its bounds, delegation.
//! - `gates`: what the gates read from counter deltas, and their verdict.
//! - `stats`: the anytime-valid comparison of two failure proportions.

mod gates;
mod plan;
pub mod stats;

use std::collections::VecDeque;

pub use gates::{
    judge, Comparisons, GatePolicy, GateReadings, Gates, SideSnapshot, Snapshot, Verdict, WindowCounts,
    DEFAULT_CONFIDENCE, DEFAULT_FAILED_ATTEMPTS_TOLERANCE, DEFAULT_RESETS_TOLERANCE,
};
pub use plan::{
    parse_http_url, Approval, Plan, RollbackPolicy, MAX_FAILURE_THRESHOLD, MAX_STEPS, MAX_WEBHOOKS, MIN_STEP_SECONDS,
};
use serde::{Deserialize, Serialize};

use crate::config::Role;

/// History entries kept per rollout; older ones are dropped (and counted).
pub const MAX_HISTORY: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_unix_ms: u64,
    pub event: String,
    pub step: usize,
    pub percent: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What the clients of one step's canary went through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepHarm {
    pub step: usize,
    pub percent: f64,
    pub started_unix_ms: u64,
    /// `None` while the step is the current one.
    pub ended_unix_ms: Option<u64>,
    /// Canary attempts with an outcome.
    pub canary_attempts: u64,
    /// Canary connections that failed: refused, timed out, reset in SYN_SENT, or abandoned by
    /// the client.
    pub canary_failed_connections: u64,
    /// Of those, attempts the client abandoned in SYN_SENT.
    pub canary_abandoned_attempts: u64,
    /// Established canary connections reset.
    pub canary_resets: u64,
}

/// What the rollout cost the canary's clients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Harm {
    /// One entry per step entered, in order.
    pub steps: Vec<StepHarm>,
    /// Totals over the steps.
    pub canary_failed_connections: u64,
    pub canary_resets: u64,
    /// When the window that was rolled back saw its first canary failure (a failed or abandoned
    /// attempt, or a reset), to the engine's tick (100 ms).
    pub first_failure_unix_ms: Option<u64>,
    pub rolled_back_unix_ms: Option<u64>,
    /// From that first failure to the rollback.
    pub time_to_rollback_ms: Option<u64>,
}

impl Harm {
    fn add_totals(&mut self) {
        self.canary_failed_connections = self.steps.iter().map(|s| s.canary_failed_connections).sum();
        self.canary_resets = self.steps.iter().map(|s| s.canary_resets).sum();
    }
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
    /// Counters when the rollout started: stable's side is judged over the whole rollout.
    #[serde(default)]
    pub rollout_baseline: Snapshot,
    /// Counters when the current step began, for what the step cost.
    #[serde(default)]
    pub step_baseline: Snapshot,
    /// First canary failure in the current window.
    #[serde(default)]
    pub window_first_failure_unix_ms: Option<u64>,
    pub consecutive_failures: u32,
    /// The readings of the last judgement (a pass, or a failed check).
    pub last_gates: Option<GateReadings>,
    pub started_by: String,
    /// The last `MAX_HISTORY` events.
    pub history: VecDeque<HistoryEntry>,
    /// Events dropped from the front of `history`.
    #[serde(default)]
    pub history_dropped: u64,
    /// Canary connections closed on rollback, when the plan asked for it.
    #[serde(default)]
    pub terminated_connections: Option<u64>,
    #[serde(default)]
    pub harm: Harm,
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
            rollout_baseline: counters,
            step_baseline: counters,
            window_first_failure_unix_ms: None,
            consecutive_failures: 0,
            last_gates: None,
            started_by: by.to_string(),
            history: VecDeque::new(),
            history_dropped: 0,
            terminated_connections: None,
            harm: Harm::default(),
        };
        let detail = match &rollout.plan.gates {
            GatePolicy::None => format!("by {by}; gates: none (timed rollout: the canary's health is not judged)"),
            GatePolicy::Judged(_) => format!("by {by}"),
        };
        rollout.record(now_ms, "started", detail);
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
        if self.history.len() >= MAX_HISTORY {
            self.history.pop_front();
            self.history_dropped += 1;
        }
        self.history.push_back(HistoryEntry {
            at_unix_ms: now_ms,
            event: event.into(),
            step: self.step,
            percent: self.percent,
            detail,
        });
    }

    /// What the gates read from the window's start to `counters` (with estimates of the evidence
    /// still needed, for people).
    pub fn readings(&self, counters: &Snapshot) -> GateReadings {
        judge(&self.plan.gates, &self.window_counts(counters), true)
    }

    fn window_counts(&self, counters: &Snapshot) -> WindowCounts {
        WindowCounts {
            window: counters.since(&self.window_baseline),
            stable_reference: counters.stable.since(&self.rollout_baseline.stable),
        }
    }

    /// What the rollout has cost so far, the current step counted up to `counters`.
    pub fn harm(&self, counters: &Snapshot) -> Harm {
        let mut harm = self.harm.clone();
        if let Some(open) = harm.steps.last_mut().filter(|s| s.ended_unix_ms.is_none()) {
            fill_step_harm(open, &counters.since(&self.step_baseline));
        }
        harm.add_totals();
        harm
    }

    /// Freezes the current step's harm at `counters`.
    fn close_step(&mut self, now_ms: u64, counters: &Snapshot) {
        let delta = counters.since(&self.step_baseline);
        if let Some(open) = self.harm.steps.last_mut().filter(|s| s.ended_unix_ms.is_none()) {
            fill_step_harm(open, &delta);
            open.ended_unix_ms = Some(now_ms);
        }
        self.harm.add_totals();
    }

    fn enter_step(&mut self, step: usize, now_ms: u64, counters: Snapshot) -> Vec<Effect> {
        self.close_step(now_ms, &counters);
        self.step = step;
        self.percent = self.plan.steps[step];
        self.state = RolloutState::Running;
        self.step_baseline = counters;
        self.harm.steps.push(StepHarm { step, percent: self.percent, started_unix_ms: now_ms, ..StepHarm::default() });
        self.restart_window(now_ms, counters);
        self.consecutive_failures = 0;
        self.record(now_ms, "step", String::new());
        vec![Effect::SetPercent(self.percent), Effect::Notify("step".into())]
    }

    fn restart_window(&mut self, now_ms: u64, counters: Snapshot) {
        self.window_started_unix_ms = now_ms;
        self.window_baseline = counters;
        self.window_first_failure_unix_ms = None;
    }

    /// Advances the clock: judges the window. A comparison that shows the canary worse fails the
    /// step at once; otherwise the step passes once its time is served and the gates pass, and
    /// waits (the window extends) while the evidence is not there yet.
    pub fn tick(&mut self, now_ms: u64, counters: Snapshot) -> Vec<Effect> {
        if self.state != RolloutState::Running {
            return Vec::new();
        }
        let window = self.window_counts(&counters);
        let canary = &window.window.canary;
        if self.window_first_failure_unix_ms.is_none() && canary.failures() + canary.resets > 0 {
            self.window_first_failure_unix_ms = Some(now_ms);
        }
        let readings = judge(&self.plan.gates, &window, false);
        let served = now_ms.saturating_sub(self.window_started_unix_ms) >= self.plan.step_ms();
        if readings.canary_worse() || (served && readings.verdict == Verdict::Fail) {
            return self.fail_check(now_ms, counters, readings);
        }
        if !served {
            return Vec::new();
        }
        if readings.udp_only && readings.verdict == Verdict::Wait {
            let reason = "no TCP health signal: the window saw UDP datagrams and no TCP connection, which the gates \
                          cannot judge; a UDP service needs \"gates\": \"none\""
                .to_string();
            self.last_gates = Some(readings);
            return self.roll_back(now_ms, counters, reason);
        }
        if readings.verdict == Verdict::Wait {
            return Vec::new();
        }
        self.last_gates = Some(readings);
        self.record(now_ms, "check_passed", String::new());
        let next = self.step + 1;
        if next >= self.plan.steps.len() {
            self.close_step(now_ms, &counters);
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

    fn fail_check(&mut self, now_ms: u64, counters: Snapshot, readings: GateReadings) -> Vec<Effect> {
        let failures = readings.failures.join("; ");
        self.last_gates = Some(readings);
        self.consecutive_failures += 1;
        self.record(now_ms, "check_failed", failures.clone());
        if self.consecutive_failures >= self.plan.failure_threshold {
            return self.roll_back(now_ms, counters, format!("gates failed: {failures}"));
        }
        self.restart_window(now_ms, counters);
        Vec::new()
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

    /// Resumes where the clock stopped. The window's evidence carries on: the comparisons hold
    /// at any number of looks, so a pause changes nothing about them.
    pub fn resume(&mut self, now_ms: u64, by: &str) -> Vec<Effect> {
        let elapsed = self.paused_at_elapsed_ms.take().unwrap_or(0);
        self.window_started_unix_ms = now_ms.saturating_sub(elapsed);
        self.state = RolloutState::Running;
        self.record(now_ms, "resumed", format!("by {by}"));
        vec![Effect::Notify("resumed".into())]
    }

    /// A human stops the rollout: all traffic back to stable.
    pub fn abort(&mut self, now_ms: u64, counters: Snapshot, by: &str) -> Vec<Effect> {
        self.close_step(now_ms, &counters);
        self.state = RolloutState::Aborted;
        self.percent = 0.0;
        self.record(now_ms, "aborted", format!("by {by}"));
        vec![Effect::RollBack { terminate_connections: false }, Effect::Notify("aborted".into())]
    }

    /// Rolls back: weight 0, then the plan's connection policy.
    pub fn roll_back(&mut self, now_ms: u64, counters: Snapshot, reason: String) -> Vec<Effect> {
        self.close_step(now_ms, &counters);
        self.harm.rolled_back_unix_ms = Some(now_ms);
        self.harm.first_failure_unix_ms = self.window_first_failure_unix_ms;
        self.harm.time_to_rollback_ms = self.window_first_failure_unix_ms.map(|first| now_ms.saturating_sub(first));
        self.state = RolloutState::RolledBack;
        self.percent = 0.0;
        self.record(now_ms, "rolled_back", reason);
        vec![
            Effect::RollBack { terminate_connections: self.plan.rollback.terminate_connections },
            Effect::Notify("rolled_back".into()),
        ]
    }
}

fn fill_step_harm(harm: &mut StepHarm, delta: &Snapshot) {
    harm.canary_attempts = delta.canary.attempts();
    harm.canary_failed_connections = delta.canary.failures();
    harm.canary_abandoned_attempts = delta.canary.abandoned_attempts;
    harm.canary_resets = delta.canary.resets;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(steps: &[f64]) -> Plan {
        Plan {
            steps: steps.to_vec(),
            step_seconds: 1.0,
            gates: GatePolicy::default(),
            failure_threshold: 1,
            approval: None,
            webhooks: vec![],
            rollback: RollbackPolicy::default(),
        }
    }

    /// Counters after `canary_ok` + `canary_failed` canary attempts and `stable_ok` stable ones.
    fn traffic(prev: Snapshot, canary_ok: u64, canary_failed: u64, stable_ok: u64) -> Snapshot {
        let mut next = prev;
        next.canary.established += canary_ok;
        next.canary.failed_attempts += canary_failed;
        next.canary.connections += canary_ok + canary_failed;
        next.stable.established += stable_ok;
        next.stable.connections += stable_ok;
        next
    }

    fn set_percents(effects: &[Effect]) -> Vec<f64> {
        effects.iter().filter_map(|e| if let Effect::SetPercent(p) = e { Some(*p) } else { None }).collect()
    }

    #[test]
    fn healthy_canary_is_promoted_once_each_step_has_the_evidence() {
        let (mut r, effects) = Rollout::start(plan(&[10.0, 50.0, 100.0]), 0, Snapshot::default(), "t");
        assert_eq!(effects[0], Effect::SetPercent(10.0));
        let mut counters = Snapshot::default();
        let mut percents = vec![];
        // 100 canary attempts a second at every step: a step needs its second served and a few
        // hundred canary attempts (the defaults' evidence for "not worse").
        for tenth in 1..=150 {
            counters = traffic(counters, 10, 0, 40);
            percents.extend(set_percents(&r.tick(tenth * 100, counters)));
        }
        assert_eq!(percents, vec![50.0, 100.0]);
        assert_eq!(r.state, RolloutState::Promoted, "{:?}", r.history);
        let passes: Vec<u64> = r.history.iter().filter(|h| h.event == "check_passed").map(|h| h.at_unix_ms).collect();
        assert_eq!(passes.len(), 3);
        assert!(passes[0] > 1000, "the first step waited past its second for evidence: {passes:?}");
        let harm = r.harm(&counters);
        assert_eq!(harm.steps.len(), 3);
        assert!(harm.steps.iter().all(|s| s.canary_failed_connections == 0 && s.ended_unix_ms.is_some()));
        assert_eq!(harm.time_to_rollback_ms, None);
    }

    #[test]
    fn a_refusing_canary_is_rolled_back_early_and_the_cost_is_reported() {
        let plan = Plan { step_seconds: 60.0, ..plan(&[10.0, 50.0]) };
        let (mut r, _) = Rollout::start(plan, 0, Snapshot::default(), "t");
        let mut counters = Snapshot::default();
        let mut rolled_back_at = None;
        for tenth in 1..=600 {
            // 50 connections a second, 10 % of them to a canary that refuses them all.
            counters = traffic(counters, 0, u64::from(tenth % 2 == 0), 4 + u64::from(tenth % 2 == 1));
            let effects = r.tick(tenth * 100, counters);
            if effects.contains(&Effect::RollBack { terminate_connections: false }) {
                rolled_back_at = Some(tenth * 100);
                break;
            }
        }
        let at = rolled_back_at.expect("rolled back");
        assert!(at <= 1500, "rolled back {at} ms into a 60 s step");
        assert_eq!(r.state, RolloutState::RolledBack);
        let harm = &r.harm;
        assert_eq!(harm.rolled_back_unix_ms, Some(at));
        assert_eq!(harm.first_failure_unix_ms, Some(200));
        assert_eq!(harm.time_to_rollback_ms, Some(at - 200));
        assert_eq!(harm.steps[0].canary_failed_connections, at / 200);
        assert_eq!(harm.canary_failed_connections, at / 200);
        let failure = &r.last_gates.as_ref().unwrap().failures[0];
        assert!(failure.starts_with("failed_attempts: canary 100.00 %"), "{failure}");
    }

    #[test]
    fn a_timed_rollout_promotes_whatever_the_canary_does() {
        let plan = Plan { gates: GatePolicy::None, ..plan(&[50.0, 100.0]) };
        let (mut r, _) = Rollout::start(plan, 0, Snapshot::default(), "t");
        assert!(r.history[0].detail.contains("gates: none"), "{:?}", r.history[0]);
        let refusing = traffic(Snapshot::default(), 0, 100, 100);
        r.tick(1000, refusing);
        r.tick(2000, traffic(refusing, 0, 100, 0));
        assert_eq!(r.state, RolloutState::Promoted);
    }

    #[test]
    fn quiet_windows_wait_and_fixed_ratio_gates_judge_at_the_end() {
        let gates =
            GatePolicy::Judged(Gates { max_failed_attempt_ratio: Some(0.05), min_connections: 10, ..Gates::default() });
        let (mut r, _) = Rollout::start(Plan { gates, ..plan(&[10.0, 50.0]) }, 0, Snapshot::default(), "t");
        let quiet = traffic(Snapshot::default(), 3, 0, 10);
        assert!(r.tick(1000, quiet).is_empty(), "3 canary attempts < min_connections: keep waiting");
        assert_eq!(r.state, RolloutState::Running);
        let failing = traffic(quiet, 9, 1, 50);
        let effects = r.tick(1100, failing);
        assert_eq!(r.state, RolloutState::RolledBack);
        assert_eq!(effects[0], Effect::RollBack { terminate_connections: false });
        assert!(r.last_gates.as_ref().unwrap().failures[0].starts_with("max_failed_attempt_ratio"));
    }

    #[test]
    fn a_udp_only_window_rolls_back_instead_of_waiting_forever() {
        let (mut r, _) = Rollout::start(plan(&[10.0]), 0, Snapshot::default(), "t");
        let mut udp = Snapshot::default();
        udp.stable.datagrams = 90;
        udp.canary.datagrams = 10;
        assert!(r.tick(500, udp).is_empty());
        r.tick(1000, udp);
        assert_eq!(r.state, RolloutState::RolledBack);
        assert!(r.history.back().unwrap().detail.contains("no TCP health signal"));
    }

    #[test]
    fn failed_checks_below_the_threshold_restart_the_window() {
        let (mut r, _) = Rollout::start(Plan { failure_threshold: 2, ..plan(&[10.0]) }, 0, Snapshot::default(), "t");
        let first = traffic(Snapshot::default(), 0, 10, 90);
        assert!(r.tick(100, first).is_empty());
        assert_eq!((r.state, r.consecutive_failures, r.window_started_unix_ms), (RolloutState::Running, 1, 100));
        r.tick(200, traffic(first, 0, 10, 90));
        assert_eq!(r.state, RolloutState::RolledBack);
    }

    #[test]
    fn approval_holds_the_step_and_pause_keeps_the_clock() {
        let mut p = plan(&[10.0, 50.0]);
        p.gates = GatePolicy::None;
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
    fn history_is_a_ring() {
        let (mut r, _) = Rollout::start(Plan { gates: GatePolicy::None, ..plan(&[10.0]) }, 0, Snapshot::default(), "t");
        for i in 0..1000 {
            r.pause(i, "t");
        }
        assert_eq!(r.history.len(), MAX_HISTORY);
        assert_eq!(r.history_dropped, 1000 + 2 - MAX_HISTORY as u64);
        assert_eq!(r.history.back().unwrap().at_unix_ms, 999);
    }
}
