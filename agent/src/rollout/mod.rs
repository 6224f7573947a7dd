//! Progressive rollouts: a plan of canary weights, each held for a step while the canary's
//! health (as the kernel measured it, canary against stable) passes the plan's gates; promoted at
//! the end, rolled back by itself as soon as the evidence says the canary is worse.
//!
//! This module is the state machine; the agent's engine ticks it (every 100 ms) with the
//! service's counters, applies the weights it asks for and persists it with the rest of the
//! desired state. The state changes only on events (a step, a judgement, the first canary failure
//! of a window), not on every tick, so an unchanged rollout is not rewritten.
//!
//! Metric gates and webhook checks need network I/O, which never runs on the core: the rollout
//! driver reads them and feeds the readings back as inputs ([`Rollout::observe_metrics`] during
//! a window, [`Rollout::conclude`] once the window's time is served and the kernel gates pass),
//! and [`Rollout::gate_due`] tells it what to read. Every check ends in one verdict over all of
//! them ([`Judgement`]).
//!
//! - `plan`: the plan, its bounds, delegation.
//! - `gates`: what the gates read from counter deltas, and their verdict.
//! - `stats`: the anytime-valid comparison of two failure proportions.
//! - `external`: the metric gates' and webhook checks' part of the state.

mod external;
mod gates;
mod plan;
pub mod stats;

use std::collections::{BTreeMap, VecDeque};

pub use external::{ExternalWindow, GateDue, Judgement};
pub use gates::{
    judge, Comparisons, GatePolicy, GateReadings, Gates, SideSnapshot, Snapshot, Verdict, WindowCounts,
    DEFAULT_CONFIDENCE, DEFAULT_FAILED_ATTEMPTS_TOLERANCE, DEFAULT_RESETS_TOLERANCE,
};
pub use plan::{Approval, Plan, RollbackPolicy, MAX_FAILURE_THRESHOLD, MAX_STEPS, MIN_STEP_SECONDS};
use serde::{Deserialize, Serialize};

use crate::{
    config::Role,
    gates::{
        checks::CheckResult,
        metric,
        metric::{GateReading, Reading},
        Verdict as GateVerdict,
    },
};

/// History entries kept per rollout; older ones are dropped (and counted).
pub const MAX_HISTORY: usize = 256;

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub at_unix_ms: u64,
    pub event: String,
    pub step: usize,
    pub percent: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What the clients of one step's canary went through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The kernel gates' readings of the last judgement (a pass, or a failed check).
    pub last_gates: Option<GateReadings>,
    /// The last judgement's one verdict, with every metric reading and webhook check result.
    #[serde(default)]
    pub last_judgement: Option<Judgement>,
    /// Counts windows: each new window (a new step, a restart after a failed check) gets the
    /// next number, so that readings taken for an earlier window are never applied to this one.
    #[serde(default)]
    pub window: u64,
    /// The metric gates and webhook checks of the window in progress.
    #[serde(default)]
    pub external: ExternalWindow,
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
    /// Cluster mode: the nodes whose counters the gates sum, each with its own cumulative
    /// counters at the rollout's three baselines (the baselines above are their sums). Empty in
    /// single-node mode. See [`Rollout::count_nodes`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodeBaselines>,
}

/// One node's cumulative counters of the service when the rollout, the current step and the
/// current window began (or when the node was first counted, if later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeBaselines {
    pub rollout: Snapshot,
    pub step: Snapshot,
    pub window: Snapshot,
}

impl NodeBaselines {
    fn at(counters: Snapshot) -> Self {
        Self { rollout: counters, step: counters, window: counters }
    }
}

/// Whether any counter of `now` is below `earlier`'s (the node's datapath, or the service on
/// it, was re-created and its counters started again).
fn went_back(now: &Snapshot, earlier: &Snapshot) -> bool {
    let back = |n: &SideSnapshot, e: &SideSnapshot| {
        n.connections < e.connections
            || n.datagrams < e.datagrams
            || n.established < e.established
            || n.failed_attempts < e.failed_attempts
            || n.abandoned_attempts < e.abandoned_attempts
            || n.resets < e.resets
            || n.srtt_sum_us < e.srtt_sum_us
            || n.srtt_samples < e.srtt_samples
            || n.rto_connections < e.rto_connections
    };
    back(&now.stable, &earlier.stable) || back(&now.canary, &earlier.canary)
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
            last_judgement: None,
            window: 0,
            external: ExternalWindow::default(),
            started_by: by.to_string(),
            history: VecDeque::new(),
            history_dropped: 0,
            terminated_connections: None,
            harm: Harm::default(),
            nodes: BTreeMap::new(),
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

    /// Cluster mode, at the start: the gates sum these nodes' counters (`live`, whose sum the
    /// rollout was started with).
    pub fn count_from(&mut self, live: &BTreeMap<String, Snapshot>) {
        self.nodes = live.iter().map(|(node, counters)| (node.clone(), NodeBaselines::at(*counters))).collect();
    }

    /// Cluster mode: the counters the gates judge now, the sum of the counted nodes' cumulative
    /// counters `live` (this node's, and those the others published). Before that, the counted
    /// set follows the cluster:
    /// - a node that is no longer `present` in the cluster (its lease expired: it died or lost
    ///   etcd) is dropped from the sum: its counts since each baseline are taken out of the
    ///   baselines, as if it had never been counted, and the history says so;
    /// - a node whose counters went back (its datapath was reloaded) is counted again from now;
    /// - a node in `live` not counted yet (it published its first counters, or joined the
    ///   cluster) is counted from now;
    /// - a counted node that is present but has no counters in `live` (not published yet) adds
    ///   nothing new: it stands at its window baseline.
    ///
    /// After the state machine ran on the sum, [`Rollout::rebase_nodes`] moves the nodes'
    /// baselines to where the sum's moved.
    pub fn count_nodes(
        &mut self,
        now_ms: u64,
        live: &BTreeMap<String, Snapshot>,
        present: impl Fn(&str) -> bool,
    ) -> Snapshot {
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(node, baselines)| match live.get(*node) {
                Some(now) => went_back(now, &baselines.window),
                None => !present(node),
            })
            .map(|(node, _)| node.clone())
            .collect();
        for node in gone {
            let Some(baselines) = self.nodes.remove(&node) else { continue };
            self.rollout_baseline = self.rollout_baseline.since(&baselines.rollout);
            self.step_baseline = self.step_baseline.since(&baselines.step);
            self.window_baseline = self.window_baseline.since(&baselines.window);
            let detail = match live.get(&node) {
                None => format!(
                    "node {node} left the cluster (its lease expired): its counters are dropped from the gates' sum, this \
                     window's counts from it included"
                ),
                Some(_) => format!(
                    "node {node}'s counters went back (its datapath was reloaded): its earlier counts are dropped \
                     from the gates' sum, it is counted again from now"
                ),
            };
            if self.state.is_active() {
                self.record(now_ms, "node_left", detail);
            }
        }
        for (node, now) in live {
            if !self.nodes.contains_key(node) {
                self.nodes.insert(node.clone(), NodeBaselines::at(*now));
                self.rollout_baseline = self.rollout_baseline + *now;
                self.step_baseline = self.step_baseline + *now;
                self.window_baseline = self.window_baseline + *now;
            }
        }
        self.nodes
            .iter()
            .map(|(node, baselines)| live.get(node).copied().unwrap_or(baselines.window))
            .fold(Snapshot::default(), |sum, now| sum + now)
    }

    /// Cluster mode, after the state machine ran on the sum of `live` (see
    /// [`Rollout::count_nodes`]): a window or step that began since `window` and `steps` (the
    /// window number and the number of steps entered before) began at every node's counters now.
    pub fn rebase_nodes(&mut self, window: u64, steps: usize, live: &BTreeMap<String, Snapshot>) {
        let new_window = self.window != window;
        let new_step = self.harm.steps.len() != steps;
        for (node, baselines) in &mut self.nodes {
            // A node without counters now was summed at its window baseline.
            let now = live.get(node).copied().unwrap_or(baselines.window);
            if new_window {
                baselines.window = now;
            }
            if new_step {
                baselines.step = now;
            }
        }
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
        self.window += 1;
        self.external = ExternalWindow::default();
    }

    /// What the driver should read for this rollout now, if anything: the metric gates during
    /// the window, and the end-of-window judgement once the kernel gates have passed.
    pub fn gate_due(&self) -> Option<GateDue> {
        if self.state != RolloutState::Running || !self.plan.has_external_gates() {
            return None;
        }
        if self.external.judging_since_unix_ms.is_some() {
            Some(GateDue::Judge)
        } else if !self.plan.metric_gates().is_empty() {
            Some(GateDue::Poll)
        } else {
            None
        }
    }

    /// Takes one round of in-window metric readings (`readings[i]` is gate `i`'s) for `window`:
    /// a gate out of bounds several readings in a row fails the step now, like a kernel gate
    /// that shows the canary worse. Readings of another window, or of a rollout that is not
    /// running, are ignored.
    pub fn observe_metrics(
        &mut self,
        now_ms: u64,
        counters: Snapshot,
        window: u64,
        readings: &[Reading],
    ) -> Vec<Effect> {
        if self.state != RolloutState::Running || window != self.window {
            return Vec::new();
        }
        let Some(gates) = self.plan.gates.judged() else { return Vec::new() };
        let judgement = metric::judge(&gates.metrics, readings, gates.on_missing);
        let early = self.external.early_watch.observe(&gates.metrics, readings);
        self.external.metrics = Some(judgement);
        self.external.metrics_read_unix_ms = Some(now_ms);
        match early {
            Some(failed) => {
                let kernel = judge(&self.plan.gates, &self.window_counts(&counters), false);
                let metrics = self.external.metrics.take().map(|m| m.readings).unwrap_or_default();
                self.fail_check(now_ms, counters, kernel, vec![failed], metrics, Vec::new())
            }
            None => Vec::new(),
        }
    }

    /// The end-of-window judgement for `window`: the metric gates' readings and the webhook
    /// checks' results (empty when they were not called), combined with the kernel gates now
    /// into one verdict. A failure counts toward `failure_threshold`; a hold keeps the step
    /// waiting and says why (the driver asks again); a pass moves on.
    pub fn conclude(
        &mut self,
        now_ms: u64,
        counters: Snapshot,
        window: u64,
        readings: &[Reading],
        webhooks: Vec<CheckResult>,
    ) -> Vec<Effect> {
        if self.state != RolloutState::Running || window != self.window || self.external.judging_since_unix_ms.is_none()
        {
            return Vec::new();
        }
        let Some(gates) = self.plan.gates.judged() else { return Vec::new() };
        let kernel = judge(&self.plan.gates, &self.window_counts(&counters), false);
        if kernel.verdict == Verdict::Wait {
            // The kernel's evidence no longer suffices: the clock judges it again first.
            self.external.judging_since_unix_ms = None;
            return Vec::new();
        }
        let judgement = metric::judge(&gates.metrics, readings, gates.on_missing);
        let verdicts: Vec<GateVerdict> = kernel
            .gate_verdicts()
            .into_iter()
            .chain(judgement.readings.iter().map(|r| r.verdict.clone()))
            .chain(webhooks.iter().map(CheckResult::verdict))
            .collect();
        self.external.metrics = Some(judgement.clone());
        self.external.metrics_read_unix_ms = Some(now_ms);
        match GateVerdict::worst(verdicts.iter().cloned()) {
            GateVerdict::Fail { .. } => {
                let failed = verdicts.into_iter().filter(GateVerdict::is_fail).collect();
                self.fail_check(now_ms, counters, kernel, failed, judgement.readings, webhooks)
            }
            hold @ GateVerdict::Hold { .. } => {
                let reason = hold.to_string();
                if self.external.holding.as_ref() == Some(&reason) {
                    return Vec::new();
                }
                let first = self.external.holding.is_none();
                self.record(now_ms, "check_held", reason.clone());
                self.external.holding = Some(reason);
                if first {
                    vec![Effect::Notify("held".into())]
                } else {
                    Vec::new()
                }
            }
            GateVerdict::Pass => self.pass_check(now_ms, counters, kernel, judgement.readings, webhooks),
        }
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
            let failed = readings.gate_verdicts();
            let metrics = self.external.metrics.take().map(|m| m.readings).unwrap_or_default();
            return self.fail_check(now_ms, counters, readings, failed, metrics, Vec::new());
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
        if self.plan.has_external_gates() {
            // The metric gates and webhook checks have the last word; the driver reads them.
            if self.external.judging_since_unix_ms.is_none() {
                self.external.judging_since_unix_ms = Some(now_ms);
            }
            return Vec::new();
        }
        self.pass_check(now_ms, counters, readings, Vec::new(), Vec::new())
    }

    /// Every gate passed: the next step, an approval wait, or promotion.
    fn pass_check(
        &mut self,
        now_ms: u64,
        counters: Snapshot,
        kernel: GateReadings,
        metrics: Vec<GateReading>,
        webhooks: Vec<CheckResult>,
    ) -> Vec<Effect> {
        let detail = external::summary(&metrics, &webhooks);
        self.last_gates = Some(kernel);
        self.last_judgement = Some(Judgement {
            at_unix_ms: now_ms,
            step: self.step,
            verdict: GateVerdict::Pass,
            failures: Vec::new(),
            metrics,
            webhooks,
        });
        self.external = ExternalWindow::default();
        self.record(now_ms, "check_passed", detail);
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

    /// A failed check: `failed` are the failing gates' verdicts (kernel, metric or webhook).
    fn fail_check(
        &mut self,
        now_ms: u64,
        counters: Snapshot,
        kernel: GateReadings,
        failed: Vec<GateVerdict>,
        metrics: Vec<GateReading>,
        webhooks: Vec<CheckResult>,
    ) -> Vec<Effect> {
        let lines: Vec<String> = failed.iter().map(ToString::to_string).collect();
        let failures = lines.join("; ");
        self.last_gates = Some(kernel);
        self.last_judgement = Some(Judgement {
            at_unix_ms: now_ms,
            step: self.step,
            verdict: GateVerdict::worst(failed),
            failures: lines,
            metrics,
            webhooks,
        });
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
    use crate::gates::metric::OnMissing;

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

    fn metric_plan(steps: &[f64], on_missing: crate::gates::metric::OnMissing, checks: bool) -> Plan {
        use crate::gates::{checks::WebhookCheck, metric::MetricGate};
        let gates = Gates {
            metrics: vec![MetricGate {
                name: "error-rate".into(),
                query: "sum(rate(errors[{{window}}]))".into(),
                max: Some(0.01),
                min: None,
            }],
            on_missing,
            webhooks: if checks {
                vec![WebhookCheck {
                    name: "acceptance".into(),
                    url: "http://127.0.0.1:9/".into(),
                    timeout_seconds: 5.0,
                }]
            } else {
                vec![]
            },
            ..Gates::default()
        };
        Plan { gates: GatePolicy::Judged(gates), ..plan(steps) }
    }

    fn check_result(status: u16) -> CheckResult {
        CheckResult {
            name: "acceptance".into(),
            passed: (200..300).contains(&status),
            status: Some(status),
            detail: format!("answered HTTP {status}"),
            elapsed_ms: 2,
        }
    }

    /// Ticks a healthy canary until the window's time is served and the kernel gates pass.
    fn serve_the_window(r: &mut Rollout, from_ms: u64, counters: &mut Snapshot) -> u64 {
        let mut now = from_ms;
        for _ in 0..20 {
            now += 100;
            *counters = traffic(*counters, 40, 0, 160);
            assert!(r.tick(now, *counters).is_empty(), "nothing moves before the judgement: {:?}", r.history);
        }
        now
    }

    #[test]
    fn metric_gates_fail_a_step_early_when_out_of_bounds_in_a_row() {
        let (mut r, _) =
            Rollout::start(metric_plan(&[10.0, 50.0], OnMissing::Hold, false), 0, Snapshot::default(), "t");
        assert_eq!(r.gate_due(), Some(GateDue::Poll));
        let counters = traffic(Snapshot::default(), 10, 0, 90);
        let window = r.window;
        assert!(r.observe_metrics(1000, counters, window, &[Reading::Value(0.2)]).is_empty());
        assert!(r.observe_metrics(2000, counters, window + 1, &[Reading::Value(0.2)]).is_empty(), "stale window");
        assert!(r.observe_metrics(2000, counters, window, &[Reading::Value(0.2)]).is_empty());
        assert_eq!(r.external.early_watch.streak(0), 2);
        let effects = r.observe_metrics(3000, counters, window, &[Reading::Value(0.2)]);
        assert_eq!(effects[0], Effect::RollBack { terminate_connections: false });
        assert_eq!(r.state, RolloutState::RolledBack);
        let detail = &r.history.back().unwrap().detail;
        assert_eq!(detail, "gates failed: error-rate: 0.2000 above max 0.01");
        let judgement = r.last_judgement.as_ref().unwrap();
        assert_eq!(judgement.failures, vec!["error-rate: 0.2000 above max 0.01".to_string()]);
        assert_eq!(judgement.metrics[0].reading, Reading::Value(0.2));
        assert_eq!(r.gate_due(), None);
    }

    #[test]
    fn a_served_window_waits_for_the_metrics_holds_while_they_are_missing_then_passes() {
        let (mut r, _) =
            Rollout::start(metric_plan(&[10.0, 50.0], OnMissing::Hold, false), 0, Snapshot::default(), "t");
        let mut counters = Snapshot::default();
        let now = serve_the_window(&mut r, 0, &mut counters);
        assert_eq!((r.gate_due(), r.step, r.state), (Some(GateDue::Judge), 0, RolloutState::Running));
        let down = Reading::Error("Prometheus at 127.0.0.1:9090 unreachable: connection refused".into());
        let effects = r.conclude(now, counters, r.window, std::slice::from_ref(&down), vec![]);
        assert_eq!(effects, vec![Effect::Notify("held".into())]);
        let held = r.history.back().unwrap();
        assert_eq!(held.event, "check_held");
        assert_eq!(held.detail, "error-rate: holding, Prometheus at 127.0.0.1:9090 unreachable: connection refused");
        assert_eq!(r.external.holding.as_deref(), Some(held.detail.as_str()));
        let events = r.history.len();
        assert!(r.conclude(now + 1000, counters, r.window, &[down], vec![]).is_empty());
        assert_eq!(r.history.len(), events, "the same reason is recorded once");
        assert_eq!((r.step, r.state, r.consecutive_failures), (0, RolloutState::Running, 0));
        let effects = r.conclude(now + 2000, counters, r.window, &[Reading::Value(0.0)], vec![]);
        assert_eq!(effects[0], Effect::SetPercent(50.0));
        let passed = r.history.iter().rev().find(|h| h.event == "check_passed").unwrap();
        assert_eq!(passed.detail, "error-rate = 0.0000");
        assert_eq!(r.last_judgement.as_ref().unwrap().verdict, GateVerdict::Pass);
        assert_eq!((r.external.holding.as_ref(), r.gate_due()), (None, Some(GateDue::Poll)), "a new window");
    }

    #[test]
    fn missing_metrics_fail_the_check_with_on_missing_fail() {
        let (mut r, _) =
            Rollout::start(metric_plan(&[10.0, 50.0], OnMissing::Fail, false), 0, Snapshot::default(), "t");
        let mut counters = Snapshot::default();
        let now = serve_the_window(&mut r, 0, &mut counters);
        r.conclude(now, counters, r.window, &[Reading::NoData], vec![]);
        assert_eq!(r.state, RolloutState::RolledBack);
        assert_eq!(r.history.back().unwrap().detail, "gates failed: error-rate: no data (on_missing = \"fail\")");
    }

    #[test]
    fn a_failing_webhook_check_counts_toward_the_threshold_and_a_passing_one_promotes() {
        let plan = Plan { failure_threshold: 2, ..metric_plan(&[10.0, 50.0], OnMissing::Hold, true) };
        let (mut r, _) = Rollout::start(plan.clone(), 0, Snapshot::default(), "t");
        let mut counters = Snapshot::default();
        let now = serve_the_window(&mut r, 0, &mut counters);
        let first_window = r.window;
        assert!(r.conclude(now, counters, first_window, &[Reading::Value(0.0)], vec![check_result(500)]).is_empty());
        assert_eq!((r.consecutive_failures, r.step, r.state), (1, 0, RolloutState::Running));
        assert_eq!(r.history.back().unwrap().detail, "acceptance: answered HTTP 500");
        assert_eq!(r.window, first_window + 1, "a failed check restarts the window");
        assert!(r.conclude(now, counters, first_window, &[Reading::Value(0.0)], vec![check_result(200)]).is_empty());
        assert_eq!(r.step, 0, "a judgement of an earlier window changes nothing");
        let now = serve_the_window(&mut r, now, &mut counters);
        r.conclude(now, counters, r.window, &[Reading::Value(0.0)], vec![check_result(500)]);
        assert_eq!(r.state, RolloutState::RolledBack);
        assert_eq!(r.percent, 0.0);

        let (mut r, _) = Rollout::start(plan, 0, Snapshot::default(), "t");
        let mut counters = Snapshot::default();
        let now = serve_the_window(&mut r, 0, &mut counters);
        let effects = r.conclude(now, counters, r.window, &[Reading::Value(0.0)], vec![check_result(200)]);
        assert_eq!(effects[0], Effect::SetPercent(50.0));
        assert_eq!(
            r.history.iter().rev().find(|h| h.event == "check_passed").unwrap().detail,
            "error-rate = 0.0000, acceptance: HTTP 200"
        );
        // A kernel failure still fails the check while the step waits for its judgement.
        let now = serve_the_window(&mut r, now, &mut counters);
        assert_eq!(r.gate_due(), Some(GateDue::Judge));
        let refusing = traffic(counters, 0, 200, 200);
        r.tick(now + 100, refusing);
        assert_eq!((r.consecutive_failures, r.gate_due()), (1, Some(GateDue::Poll)), "{:?}", r.history);
        let judgement = r.last_judgement.as_ref().unwrap();
        assert!(judgement.failures[0].starts_with("failed_attempts: canary 20.00 %"), "{judgement:?}");
        assert!(
            matches!(&judgement.verdict, GateVerdict::Fail { gate, cause: crate::gates::FailCause::Kernel { .. } } if gate == "failed_attempts"),
            "{judgement:?}"
        );
    }

    /// Cluster mode: the gates judge the sum of the counted nodes' counts since the window
    /// began; a node that leaves is dropped from the sum (history says so); a node whose
    /// counters went back is counted again from then; a new node from its first counters.
    #[test]
    fn cluster_counters_are_summed_and_a_node_that_leaves_is_dropped() {
        let node =
            |canary_ok, canary_failed, stable_ok| traffic(Snapshot::default(), canary_ok, canary_failed, stable_ok);
        let mut live = BTreeMap::from([("a".to_string(), node(100, 0, 400)), ("c".to_string(), node(50, 0, 200))]);
        let start: Snapshot = live.values().fold(Snapshot::default(), |sum, n| sum + *n);
        let (mut r, _) = Rollout::start(Plan { step_seconds: 60.0, ..plan(&[10.0, 50.0]) }, 0, start, "t");
        r.count_from(&live);
        // node-c's clients see the canary fail; node-a's do not; b publishes later.
        live.insert("a".into(), node(110, 0, 490));
        live.insert("c".into(), node(50, 4, 236));
        live.insert("b".into(), node(7, 0, 30));
        let total = r.count_nodes(100, &live, |_| false);
        let window = r.window_counts(&total).window;
        assert_eq!((window.canary.established, window.canary.failed_attempts), (10, 4), "b counts from now");
        assert_eq!(window.stable.established, 90 + 36);
        assert_eq!(r.nodes.len(), 3);
        // node-c leaves: its 4 failures leave the window with it.
        live.remove("c");
        live.insert("a".into(), node(120, 0, 580));
        live.insert("b".into(), node(9, 0, 40));
        let total = r.count_nodes(200, &live, |_| false);
        let window = r.window_counts(&total).window;
        assert_eq!((window.canary.established, window.canary.failed_attempts), (22, 0));
        assert_eq!(window.stable.established, 180 + 10);
        let left = r.history.back().unwrap();
        assert_eq!(left.event, "node_left");
        assert!(left.detail.starts_with("node c left the cluster"), "{left:?}");
        // node-d is counted but has not published yet; it is in the cluster: it stays, at its
        // baseline, until its counters come.
        r.nodes.insert("d".into(), NodeBaselines::at(node(5, 0, 5)));
        r.window_baseline = r.window_baseline + node(5, 0, 5);
        let total = r.count_nodes(250, &live, |n| n == "d");
        assert_eq!(r.window_counts(&total).window.canary.established, 22);
        assert!(r.nodes.contains_key("d") && r.history.back().unwrap().detail.starts_with("node c"));
        r.nodes.remove("d");
        r.window_baseline = r.window_baseline.since(&node(5, 0, 5));
        // node-b's datapath reloaded: its counters start again, it is counted from then.
        live.insert("b".into(), node(1, 0, 2));
        let total = r.count_nodes(300, &live, |_| false);
        assert_eq!(r.window_counts(&total).window.canary.established, 20);
        assert!(r.history.back().unwrap().detail.contains("went back"), "{:?}", r.history.back());
        // A new window (a step) starts at every node's counters now.
        let (window_before, steps_before) = (r.window, r.harm.steps.len());
        let effects = r.approve(400, total, "t");
        r.rebase_nodes(window_before, steps_before, &live);
        assert_eq!(effects[0], Effect::SetPercent(10.0));
        assert!(r.nodes.iter().all(|(n, b)| b.window == live[n] && b.step == live[n]));
        let sum = r.nodes.values().fold(Snapshot::default(), |sum, b| sum + b.window);
        assert_eq!(sum, r.window_baseline, "the window baseline is the nodes' sum");
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
