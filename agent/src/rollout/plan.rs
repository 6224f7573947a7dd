//! A rollout plan, its bounds, and the rules on who may start which plan.

use serde::{Deserialize, Serialize};

use super::gates::{GatePolicy, Gates, Snapshot};
use crate::{
    config::{InvalidField, Role},
    gates::metric::validate_metric_gates,
    webhook::validate_plan_webhooks,
};

/// Most steps a plan may have.
pub const MAX_STEPS: usize = 100;
/// Shortest step: a step is judged at most every tick, and a shorter one judges noise.
pub const MIN_STEP_SECONDS: f64 = 1.0;
/// Longest step (a day).
pub const MAX_STEP_SECONDS: f64 = 86_400.0;
/// Most failed checks in a row a plan may ask for before rolling back.
pub const MAX_FAILURE_THRESHOLD: u32 = 100;
/// Range of `gates.confidence`.
pub const MIN_CONFIDENCE: f64 = 0.8;
pub const MAX_CONFIDENCE: f64 = 0.9999;
/// Largest `gates.min_connections`.
pub const MAX_MIN_CONNECTIONS: u64 = 1_000_000_000;

/// A rollout plan as posted to `POST /v1/services/{name}/rollout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Canary weights in percent, strictly increasing, each in (0, 100].
    pub steps: Vec<f64>,
    /// How long each step is held at least before it can pass.
    pub step_seconds: f64,
    /// The gates, or `"none"` for a timed rollout.
    #[serde(default)]
    pub gates: GatePolicy,
    /// Failed checks in a row before the rollout rolls back.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Steps at or above `at_percent` wait for an approver with `role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// `http://` URLs that get a JSON POST on each step, pause, approval wait, hold, promotion,
    /// rollback and abort; `host:port` must be in the agent's `webhook_allow`.
    #[serde(default)]
    pub webhooks: Vec<String>,
    #[serde(default)]
    pub rollback: RollbackPolicy,
}

fn default_failure_threshold() -> u32 {
    1
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

fn in_range(value: f64, low: f64, high: f64) -> bool {
    value.is_finite() && (low..=high).contains(&value)
}

impl Plan {
    /// Refuses plans that cannot mean what their author wanted, or that would cost the agent
    /// more than a rollout should (a step judged every tick, an unbounded history).
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.steps.is_empty() {
            return Err(InvalidField::new("steps", "at least one step is required"));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(InvalidField::new("steps", format!("at most {MAX_STEPS} steps, got {}", self.steps.len())));
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
        if !in_range(self.step_seconds, MIN_STEP_SECONDS, MAX_STEP_SECONDS) {
            return Err(InvalidField::new(
                "step_seconds",
                format!("must be from {MIN_STEP_SECONDS} to {MAX_STEP_SECONDS}, got {}", self.step_seconds),
            ));
        }
        if !(1..=MAX_FAILURE_THRESHOLD).contains(&self.failure_threshold) {
            return Err(InvalidField::new(
                "failure_threshold",
                format!("must be from 1 to {MAX_FAILURE_THRESHOLD}, got {}", self.failure_threshold),
            ));
        }
        if let Some(gates) = self.gates.judged() {
            if !in_range(gates.confidence, MIN_CONFIDENCE, MAX_CONFIDENCE) {
                return Err(InvalidField::new(
                    "gates.confidence",
                    format!("must be from {MIN_CONFIDENCE} to {MAX_CONFIDENCE}, got {}", gates.confidence),
                ));
            }
            for (name, tolerance) in [
                ("gates.failed_attempts_tolerance", gates.failed_attempts_tolerance),
                ("gates.resets_tolerance", gates.resets_tolerance),
            ] {
                if !tolerance.is_finite() || tolerance <= 0.0 || tolerance > 1.0 {
                    return Err(InvalidField::new(
                        name,
                        format!("must be above 0 and at most 1 (a proportion: 0.02 is 2 points), got {tolerance}"),
                    ));
                }
            }
            for (name, value) in [
                ("gates.max_failed_attempt_ratio", gates.max_failed_attempt_ratio),
                ("gates.max_reset_ratio", gates.max_reset_ratio),
                ("gates.max_srtt_ratio", gates.max_srtt_ratio),
                ("gates.max_rto_connection_ratio", gates.max_rto_connection_ratio),
            ] {
                if let Some(v) = value {
                    if !v.is_finite() || v < 0.0 {
                        return Err(InvalidField::new(name, format!("must be a non-negative number, got {v}")));
                    }
                }
            }
            if gates.min_connections > MAX_MIN_CONNECTIONS {
                return Err(InvalidField::new(
                    "gates.min_connections",
                    format!("must be at most {MAX_MIN_CONNECTIONS}, got {}", gates.min_connections),
                ));
            }
        }
        if let Some(approval) = &self.approval {
            if !in_range(approval.at_percent, 0.0, 100.0) {
                return Err(InvalidField::new(
                    "approval.at_percent",
                    format!("must be from 0 to 100, got {}", approval.at_percent),
                ));
            }
            if approval.role == Role::Viewer {
                return Err(InvalidField::new(
                    "approval.role",
                    "a viewer cannot approve anything: use \"operator\" or \"release\"",
                ));
            }
        }
        let (metrics, checks) = match self.gates.judged() {
            Some(gates) => (gates.metrics.as_slice(), gates.webhooks.as_slice()),
            None => (&[][..], &[][..]),
        };
        validate_metric_gates(metrics, "gates.metrics")?;
        // The allow list is the start's business (it may change while a rollout runs; every
        // delivery checks it again): here, what no allow list could make valid.
        validate_plan_webhooks(&self.webhooks, checks, None)?;
        Ok(())
    }

    /// Whether checks need the driver's reads outside the core (metric gates, webhook checks).
    pub fn has_external_gates(&self) -> bool {
        self.gates.judged().is_some_and(Gates::has_external)
    }

    /// The metric gates (none for a timed rollout).
    pub fn metric_gates(&self) -> &[crate::gates::metric::MetricGate] {
        self.gates.judged().map_or(&[], |gates| gates.metrics.as_slice())
    }

    pub(super) fn step_ms(&self) -> u64 {
        (self.step_seconds * 1000.0) as u64
    }

    pub(super) fn needs_approval(&self, step: usize) -> Option<Role> {
        self.approval.as_ref().filter(|a| self.steps[step] >= a.at_percent).map(|a| a.role)
    }

    /// Delegation: a caller below `release` may not take the weight past the service's
    /// `max_operator_percent` on their own. Every step above the cap must wait for a `release`
    /// approver, so the plan needs `approval.role = "release"` at or below the first such step.
    /// The error names that step (the API answers 403).
    pub fn check_delegation(&self, role: Role, max_operator_percent: f64) -> Result<(), InvalidField> {
        if role >= Role::Release {
            return Ok(());
        }
        let Some((i, step)) = self.steps.iter().enumerate().find(|(_, step)| **step > max_operator_percent) else {
            return Ok(());
        };
        let gated = self.approval.as_ref().is_some_and(|a| a.role == Role::Release && a.at_percent <= *step);
        if gated {
            return Ok(());
        }
        Err(InvalidField::new(
            format!("steps[{i}]"),
            format!(
                "step {i} ({step} %) is above this service's max_operator_percent ({max_operator_percent} %): \
                 an operator's plan must have every such step wait for a release approver, e.g. \
                 \"approval\": {{\"at_percent\": {step}, \"role\": \"release\"}}"
            ),
        ))
    }

    /// Judged gates need a TCP health signal. A service that has carried only UDP (datagrams,
    /// and no TCP attempt with an outcome on either side) could never be judged: its rollout
    /// would wait at the first step forever, so it is refused up front. `lifetime` is the
    /// service's cumulative counters.
    pub fn check_health_signal(&self, service: &str, lifetime: &Snapshot) -> Result<(), InvalidField> {
        if self.gates.judged().is_none() {
            return Ok(());
        }
        let datagrams = lifetime.canary.datagrams + lifetime.stable.datagrams;
        let tcp = lifetime.canary.attempts() + lifetime.stable.attempts();
        if tcp == 0 && datagrams > 0 {
            return Err(InvalidField::new(
                "gates",
                format!(
                    "service {service:?} has carried only UDP ({datagrams} datagrams, no TCP connection): the kernel \
                     measures connection health for TCP only, so gates could never judge this rollout; start a \
                     timed rollout with \"gates\": \"none\" (and watch the service yourself)"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Gates, SideSnapshot};

    pub(crate) fn plan(steps: &[f64]) -> Plan {
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

    fn judged(gates: Gates) -> GatePolicy {
        GatePolicy::Judged(gates)
    }

    #[test]
    fn bad_plans_are_refused_naming_the_field() {
        let cases = [
            (plan(&[]), "steps"),
            (plan(&(1..=101).map(|i| i as f64 * 0.5).collect::<Vec<_>>()), "steps"),
            (plan(&[10.0, 5.0]), "steps[1]"),
            (plan(&[10.0, 10.0]), "steps[1]"),
            (plan(&[50.0, 101.0]), "steps[1]"),
            (plan(&[0.0, 10.0]), "steps[0]"),
            (Plan { step_seconds: -1.0, ..plan(&[10.0]) }, "step_seconds"),
            (Plan { step_seconds: 0.5, ..plan(&[10.0]) }, "step_seconds"),
            (Plan { step_seconds: 86_401.0, ..plan(&[10.0]) }, "step_seconds"),
            (Plan { failure_threshold: 0, ..plan(&[10.0]) }, "failure_threshold"),
            (Plan { failure_threshold: 101, ..plan(&[10.0]) }, "failure_threshold"),
            (Plan { webhooks: vec!["ftp://x".into()], ..plan(&[10.0]) }, "webhooks[0]"),
            (Plan { webhooks: vec!["http://169.254.169.254/".into()], ..plan(&[10.0]) }, "webhooks[0]"),
            (Plan { webhooks: vec!["http://127.0.0.1:9/x\r\nX: y".into()], ..plan(&[10.0]) }, "webhooks[0]"),
            (Plan { webhooks: vec!["http://x".into(); 9], ..plan(&[10.0]) }, "webhooks"),
            (
                Plan { gates: judged(Gates { confidence: 1.0, ..Gates::default() }), ..plan(&[10.0]) },
                "gates.confidence",
            ),
            (
                Plan { gates: judged(Gates { confidence: 0.5, ..Gates::default() }), ..plan(&[10.0]) },
                "gates.confidence",
            ),
            (
                Plan { gates: judged(Gates { failed_attempts_tolerance: 0.0, ..Gates::default() }), ..plan(&[10.0]) },
                "gates.failed_attempts_tolerance",
            ),
            (
                Plan { gates: judged(Gates { resets_tolerance: 2.0, ..Gates::default() }), ..plan(&[10.0]) },
                "gates.resets_tolerance",
            ),
            (
                Plan { gates: judged(Gates { max_srtt_ratio: Some(-1.0), ..Gates::default() }), ..plan(&[10.0]) },
                "gates.max_srtt_ratio",
            ),
            (
                Plan { approval: Some(Approval { at_percent: 50.0, role: Role::Viewer }), ..plan(&[10.0]) },
                "approval.role",
            ),
            (
                Plan { approval: Some(Approval { at_percent: 150.0, role: Role::Release }), ..plan(&[10.0]) },
                "approval.at_percent",
            ),
        ];
        for (plan, field) in cases {
            assert_eq!(plan.validate().unwrap_err().field, field, "{plan:?}");
        }
        assert!(plan(&[1.0, 5.0, 25.0, 50.0, 100.0]).validate().is_ok());
        assert!(Plan { webhooks: vec!["http://x".into(); 8], gates: GatePolicy::None, ..plan(&[10.0]) }
            .validate()
            .is_ok());
    }

    #[test]
    fn operators_stay_under_the_cap_unless_release_approves_every_step_above_it() {
        let release = |at_percent| Some(Approval { at_percent, role: Role::Release });
        let operator_gate = Some(Approval { at_percent: 10.0, role: Role::Operator });
        let steps = [10.0, 25.0, 50.0, 100.0];
        let cases = [
            // (approval, caller, cap, refused field)
            (None, Role::Operator, 25.0, Some("steps[2]")),
            (None, Role::Operator, 100.0, None),
            (None, Role::Release, 25.0, None),
            (release(50.0), Role::Operator, 25.0, None),
            (release(30.0), Role::Operator, 25.0, None),
            (release(10.0), Role::Operator, 25.0, None),
            (release(75.0), Role::Operator, 25.0, Some("steps[2]")),
            (operator_gate, Role::Operator, 25.0, Some("steps[2]")),
            (None, Role::Operator, 5.0, Some("steps[0]")),
        ];
        for (approval, role, cap, refused) in cases {
            let plan = Plan { approval: approval.clone(), ..plan(&steps) };
            let result = plan.check_delegation(role, cap);
            assert_eq!(
                result.as_ref().err().map(|e| e.field.as_str()),
                refused,
                "{approval:?} {role:?} cap {cap}: {result:?}"
            );
        }
        let err = plan(&steps).check_delegation(Role::Operator, 25.0).unwrap_err();
        assert!(err.message.contains("step 2 (50 %)") && err.message.contains("\"role\": \"release\""), "{err}");
    }

    #[test]
    fn udp_only_services_cannot_start_judged_rollouts() {
        let udp = SideSnapshot { datagrams: 12, ..Default::default() };
        let lifetime = Snapshot { stable: udp, canary: SideSnapshot::default() };
        let err = plan(&[10.0]).check_health_signal("dns", &lifetime).unwrap_err();
        assert_eq!(err.field, "gates");
        assert!(err.message.contains("only UDP (12 datagrams") && err.message.contains("\"gates\": \"none\""), "{err}");
        assert!(Plan { gates: GatePolicy::None, ..plan(&[10.0]) }.check_health_signal("dns", &lifetime).is_ok());
        let mixed = Snapshot { stable: SideSnapshot { established: 1, ..udp }, canary: SideSnapshot::default() };
        assert!(plan(&[10.0]).check_health_signal("dns", &mixed).is_ok());
        assert!(plan(&[10.0]).check_health_signal("new", &Snapshot::default()).is_ok(), "no traffic yet: cannot tell");
    }

    #[test]
    fn metric_gates_and_webhook_checks_are_validated_with_the_plan() {
        use crate::gates::{checks::WebhookCheck, metric::MetricGate};
        let metric =
            |name: &str, query: &str| MetricGate { name: name.into(), query: query.into(), max: Some(0.01), min: None };
        let check = |url: &str| WebhookCheck {
            name: url
                .rsplit('/')
                .next()
                .filter(|s| s.chars().all(char::is_alphanumeric) && !s.is_empty())
                .unwrap_or("smoke")
                .into(),
            url: url.into(),
            timeout_seconds: 5.0,
        };
        let with = |metrics: Vec<MetricGate>, webhooks: Vec<WebhookCheck>| Plan {
            gates: judged(Gates { metrics, webhooks, ..Gates::default() }),
            ..plan(&[10.0])
        };
        let cases = [
            (with(vec![metric("a", "up{{sevice}}")], vec![]), "gates.metrics[0].query"),
            (with(vec![metric("a", "up"), metric("a", "up")], vec![]), "gates.metrics[1].name"),
            (with(vec![], vec![check("http://169.254.169.254/")]), "gates.webhooks[0].url"),
            (with(vec![], vec![check("http://127.0.0.1:9/x\ty")]), "gates.webhooks[0].url"),
            (
                Plan {
                    webhooks: vec!["http://127.0.0.1:9/".into(); 5],
                    ..with(
                        vec![],
                        ["/a", "/b", "/cc", "/ddd"].map(|p| check(&format!("http://127.0.0.1:9{p}"))).to_vec(),
                    )
                },
                "gates.webhooks",
            ),
        ];
        for (plan, field) in cases {
            assert_eq!(plan.validate().unwrap_err().field, field, "{plan:?}");
        }
        let good = with(vec![metric("error-rate", "sum(rate(x[{{window}}]))")], vec![check("http://127.0.0.1:9/")]);
        good.validate().unwrap();
        assert!(good.has_external_gates());
        assert!(!plan(&[10.0]).has_external_gates());
        // Metric gates live in the gates object: "none" cannot carry any.
        let err = serde_json::from_str::<Plan>(r#"{"steps": [10], "step_seconds": 1, "gates": {"metrics": [{"name": "a", "query": "up", "max": 1}], "on_missing": "fail"}}"#)
            .unwrap();
        assert!(err.has_external_gates());
    }
}
