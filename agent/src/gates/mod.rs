//! Gates beyond the kernel's counters: PromQL queries against the operator's Prometheus
//! ([`metric`], [`prometheus`]) and webhook checks ([`checks`]).
//!
//! Each gate reading becomes a [`Verdict`]; a check's verdicts combine with [`Verdict::worst`]
//! (a failure beats a hold, a hold beats a pass), so the rollout driver judges one verdict per
//! check, whatever mix of gates the plan has, and can tell the user which gate decided and why.

pub mod checks;
pub mod metric;
pub mod prometheus;

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use self::{
    metric::QueryContext,
    prometheus::{check_plan_queries, PrometheusClient, PrometheusEndpoint},
};
use crate::{
    config::InvalidField,
    rollout::Plan,
    webhook::{validate_plan_webhooks, AllowList, Webhooks},
};

/// What the gates beyond the kernel reach out to: the Prometheus server of `agent.prometheus`
/// and the webhook sender with `agent.webhook_allow`. Both come from the config file only and
/// follow its reloads. Shared by the API (checks at plan start), the rollout driver (readings)
/// and the follow-up task (notifications); cheap to clone.
#[derive(Debug, Clone)]
pub struct GateClients {
    /// Replaced on reload; cloned out before any query, never held across one.
    prometheus: Arc<RwLock<Option<PrometheusClient>>>,
    webhooks: Webhooks,
}

impl GateClients {
    pub fn new(prometheus: Option<PrometheusEndpoint>, allow: AllowList) -> Self {
        Self {
            prometheus: Arc::new(RwLock::new(prometheus.map(PrometheusClient::new))),
            webhooks: Webhooks::new(allow),
        }
    }

    /// A reloaded config's `agent.prometheus` and `agent.webhook_allow`, for every later query
    /// and delivery (also of running rollouts). Answers whether anything changed.
    pub fn reconfigure(&self, prometheus: Option<PrometheusEndpoint>, allow: AllowList) -> bool {
        let mut changed = false;
        {
            let mut current = self.prometheus.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            if current.as_ref().map(PrometheusClient::endpoint) != prometheus.as_ref() {
                *current = prometheus.map(PrometheusClient::new);
                changed = true;
            }
        }
        if self.webhooks.allow_list() != allow {
            self.webhooks.set_allow_list(allow);
            changed = true;
        }
        changed
    }

    /// The Prometheus client, if `agent.prometheus` is set.
    pub fn prometheus(&self) -> Option<PrometheusClient> {
        self.prometheus.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// What a plan must pass at start beyond [`Plan::validate`], against the agent's config and
    /// Prometheus: every webhook URL (notifications and checks) in `agent.webhook_allow`, and
    /// every metric gate's query, expanded for the first step, accepted by Prometheus' parser.
    /// Network I/O: called by the API handler before the plan goes to the core.
    pub async fn check_plan(&self, service: &str, plan: &Plan) -> Result<(), InvalidField> {
        plan.validate()?;
        let allow = self.webhooks.allow_list();
        let Some(gates) = plan.gates.judged() else {
            return validate_plan_webhooks(&plan.webhooks, &[], Some(&allow));
        };
        validate_plan_webhooks(&plan.webhooks, &gates.webhooks, Some(&allow))?;
        let context = QueryContext {
            service,
            window: Duration::from_secs_f64(plan.step_seconds),
            step: 0,
            percent: plan.steps[0],
            // Services of the config file and the API have none; discovery will fill it in.
            namespace: None,
        };
        check_plan_queries(self.prometheus().as_ref(), &gates.metrics, &context, "gates.metrics").await
    }
}

/// What one gate, or a whole check, says about the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "verdict", rename_all = "snake_case")]
#[schema(as = GateVerdict)]
pub enum Verdict {
    /// Within bounds: the step may be promoted (as far as this gate is concerned).
    Pass,
    /// No judgement possible yet (no data, Prometheus unreachable with `on_missing = "hold"`):
    /// the step waits, neither promoted nor counted as a failure.
    Hold { gate: String, reason: String },
    /// The gate failed: counts toward the plan's `failure_threshold`.
    Fail { gate: String, cause: FailCause },
}

/// Why a gate failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailCause {
    /// A metric read a value outside its bound.
    OutOfBound { value: f64, bound: Bound },
    /// A metric had no value (no data or an error) and the plan says `on_missing = "fail"`.
    Missing { reason: String },
    /// A webhook check answered something other than 2xx, or not in time.
    Check { detail: String },
    /// A kernel gate (a comparison with stable, or a fixed ratio) failed.
    Kernel { detail: String },
}

/// The bound a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Max(f64),
    Min(f64),
}

impl Verdict {
    /// The verdict of a check from its gates' verdicts: the first failure, else the first hold,
    /// else a pass (also when there are no gates).
    pub fn worst(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
        let mut hold = None;
        for verdict in verdicts {
            match verdict {
                Verdict::Fail { .. } => return verdict,
                Verdict::Hold { .. } if hold.is_none() => hold = Some(verdict),
                _ => {}
            }
        }
        hold.unwrap_or(Verdict::Pass)
    }

    pub fn is_fail(&self) -> bool {
        matches!(self, Verdict::Fail { .. })
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Max(max) => write!(f, "above max {max}"),
            Bound::Min(min) => write!(f, "below min {min}"),
        }
    }
}

/// One line for the rollout's history and logs, e.g. `error-rate: 0.2031 above max 0.01`.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Pass => write!(f, "pass"),
            Verdict::Hold { gate, reason } => write!(f, "{gate}: holding, {reason}"),
            Verdict::Fail { gate, cause: FailCause::OutOfBound { value, bound } } => {
                write!(f, "{gate}: {value:.4} {bound}")
            }
            Verdict::Fail { gate, cause: FailCause::Missing { reason } } => {
                write!(f, "{gate}: {reason} (on_missing = \"fail\")")
            }
            Verdict::Fail { gate, cause: FailCause::Check { detail } | FailCause::Kernel { detail } } => {
                write!(f, "{gate}: {detail}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(gate: &str) -> Verdict {
        Verdict::Hold { gate: gate.into(), reason: "no data".into() }
    }

    fn fail(gate: &str) -> Verdict {
        Verdict::Fail { gate: gate.into(), cause: FailCause::OutOfBound { value: 0.2, bound: Bound::Max(0.01) } }
    }

    #[test]
    fn failure_beats_hold_beats_pass() {
        assert_eq!(Verdict::worst([]), Verdict::Pass);
        assert_eq!(Verdict::worst([Verdict::Pass, hold("a"), hold("b")]), hold("a"));
        assert_eq!(Verdict::worst([hold("a"), Verdict::Pass, fail("c"), fail("d")]), fail("c"));
    }

    #[test]
    fn verdicts_read_as_one_line_and_round_trip() {
        assert_eq!(fail("error-rate").to_string(), "error-rate: 0.2000 above max 0.01");
        let missing = Verdict::Fail { gate: "p99".into(), cause: FailCause::Missing { reason: "no data".into() } };
        assert_eq!(missing.to_string(), "p99: no data (on_missing = \"fail\")");
        for verdict in [Verdict::Pass, hold("a"), fail("b"), missing] {
            let json = serde_json::to_string(&verdict).unwrap();
            assert_eq!(serde_json::from_str::<Verdict>(&json).unwrap(), verdict, "{json}");
        }
        assert_eq!(
            serde_json::to_value(fail("e")).unwrap(),
            serde_json::json!({"verdict": "fail", "gate": "e", "cause": {"kind": "out_of_bound", "value": 0.2, "bound": {"max": 0.01}}})
        );
    }
}
