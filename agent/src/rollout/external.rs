//! The gates beyond the kernel's counters (metric gates, webhook checks) as the state machine
//! sees them. Their readings need network I/O, which the rollout driver does outside the control
//! core; here they are plain inputs ([`super::Rollout::observe_metrics`],
//! [`super::Rollout::conclude`]), so the state machine stays pure and a judgement can be replayed
//! from its inputs.

use serde::{Deserialize, Serialize};

use crate::gates::{
    checks::CheckResult,
    metric::{EarlyWatch, GateReading, MetricJudgement, Reading},
    Verdict as GateVerdict,
};

/// What the rollout driver should read for a running rollout now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateDue {
    /// Read the metric gates, once every poll interval during the window.
    Poll,
    /// The window's time is served and the kernel gates pass: read the metric gates and, if
    /// they pass, call the webhook checks. The step waits for that judgement.
    Judge,
}

/// The metric gates and webhook checks of the window in progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct ExternalWindow {
    /// The latest metric readings of this window, each with its gate's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricJudgement>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_read_unix_ms: Option<u64>,
    /// Out-of-bound readings in a row per metric gate (plan order): at 3 the step fails early.
    pub early_watch: EarlyWatch,
    /// Since when the step has waited for the end-of-window judgement of the metric gates and
    /// webhook checks (its time was served and the kernel gates passed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judging_since_unix_ms: Option<u64>,
    /// What holds the step while something does, e.g. `error-rate: holding, Prometheus at
    /// 127.0.0.1:9090 unreachable: ...` (a metric without a value under `on_missing = "hold"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holding: Option<String>,
}

/// The one verdict of a check: kernel gates, metric gates and webhook checks together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Judgement {
    pub at_unix_ms: u64,
    /// The step judged.
    pub step: usize,
    /// The first failing gate, else pass (a holding check is not a judgement: the step waits).
    pub verdict: GateVerdict,
    /// Every failing gate, one line each, as the history shows them (`error-rate: 0.2031 above
    /// max 0.01`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
    /// Every metric gate's reading and verdict, in plan order (the kernel's are in `last_gates`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<GateReading>,
    /// Every webhook check's result, in plan order; empty when they were not called (a metric
    /// gate failed first, or the plan has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<CheckResult>,
}

/// `error-rate = 0.0012, acceptance: HTTP 200`: the readings of a passing check, for history.
pub(super) fn summary(metrics: &[GateReading], webhooks: &[CheckResult]) -> String {
    let metrics = metrics.iter().map(|r| match &r.reading {
        Reading::Value(value) => format!("{} = {value:.4}", r.gate),
        Reading::NoData => format!("{}: no data", r.gate),
        Reading::Error(message) => format!("{}: {message}", r.gate),
    });
    let webhooks = webhooks.iter().map(|c| match c.status {
        Some(status) => format!("{}: HTTP {status}", c.name),
        None => format!("{}: {}", c.name, c.detail),
    });
    metrics.chain(webhooks).collect::<Vec<_>>().join(", ")
}
