//! Gates: what a step's window must show before the rollout moves on, judged from counter deltas
//! of both sides. The judgement takes counts, never a datapath, so that counts summed over
//! several nodes judge the same way as one node's.

use std::ops::Add;

use agent_common::SideCounters;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::stats::{self, Comparison, Counts, Decision};
use crate::gates::{
    checks::WebhookCheck,
    metric::{MetricGate, OnMissing},
};

/// Confidence of the statistical gates unless the plan says otherwise.
pub const DEFAULT_CONFIDENCE: f64 = 0.95;
/// How much higher than stable's the canary's failed-attempt proportion may be (2 points).
pub const DEFAULT_FAILED_ATTEMPTS_TOLERANCE: f64 = 0.02;
/// How much higher than stable's the canary's reset proportion may be (2 points).
pub const DEFAULT_RESETS_TOLERANCE: f64 = 0.02;

/// A plan's `gates`: judged (the default, with the statistical comparisons always on), or
/// `"none"` for a purely timed rollout that promotes whatever the canary does.
#[derive(Debug, Clone, PartialEq)]
pub enum GatePolicy {
    Judged(Gates),
    /// `"gates": "none"`.
    None,
}

impl Default for GatePolicy {
    fn default() -> Self {
        Self::Judged(Gates::default())
    }
}

impl GatePolicy {
    pub fn judged(&self) -> Option<&Gates> {
        match self {
            Self::Judged(gates) => Some(gates),
            Self::None => None,
        }
    }
}

/// In the OpenAPI document: a `Gates` object, or the string `"none"`.
impl utoipa::PartialSchema for GatePolicy {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Ref, Type};
        OneOfBuilder::new()
            .item(Ref::from_schema_name("Gates"))
            .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["none"])))
            .description(Some(r#"The gates (defaults filled in), or "none" for a timed rollout that judges nothing."#))
            .into()
    }
}

impl utoipa::ToSchema for GatePolicy {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push(("Gates".to_string(), <Gates as utoipa::PartialSchema>::schema()));
        <Gates as utoipa::ToSchema>::schemas(schemas);
    }
}

impl Serialize for GatePolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Judged(gates) => gates.serialize(serializer),
            Self::None => serializer.serialize_str("none"),
        }
    }
}

impl<'de> Deserialize<'de> for GatePolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;

        impl<'de> de::Visitor<'de> for PolicyVisitor {
            type Value = GatePolicy;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object of gates, or "none" for a timed rollout that judges nothing"#)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<GatePolicy, E> {
                match value {
                    "none" => Ok(GatePolicy::None),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<GatePolicy, A::Error> {
                // Forwarding the map keeps the caller's path tracking: errors name `gates.x`.
                Gates::deserialize(de::value::MapAccessDeserializer::new(map)).map(GatePolicy::Judged)
            }
        }

        deserializer.deserialize_any(PolicyVisitor)
    }
}

/// The gates of a judged plan. The two comparisons with stable are always on (a tolerance of 1
/// turns one off); the fixed ratios are optional extras judged at the end of the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Confidence of the comparisons: `1 − confidence` bounds the chance that a step is ever
    /// judged wrongly (rolled back while within tolerance, or passed while worse).
    pub confidence: f64,
    /// Canary failed-attempt proportion (refused, timed out, reset in SYN_SENT or abandoned) may
    /// exceed stable's by this much (absolute: 0.02 is 2 points).
    pub failed_attempts_tolerance: f64,
    /// Canary reset proportion (resets per established connection) may exceed stable's by this
    /// much.
    pub resets_tolerance: f64,
    /// Canary failed attempts / canary attempts, over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_failed_attempt_ratio: Option<f64>,
    /// Canary resets of established connections / canary connections established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_reset_ratio: Option<f64>,
    /// Canary average SRTT / stable average SRTT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_srtt_ratio: Option<f64>,
    /// Canary connections that had at least one retransmission timeout / canary connections
    /// established (a lossy or overloaded canary that still answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rto_connection_ratio: Option<f64>,
    /// Canary connection attempts a window needs before it is judged at its end (a quieter
    /// window is extended until it has them).
    pub min_connections: u64,
    /// PromQL queries and their bounds, read during each window and at its end (at most 8).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricGate>,
    /// What a metric gate without a value (no data, Prometheus unreachable) means.
    pub on_missing: OnMissing,
    /// URLs called with the rollout's state before a step is promoted; 2xx passes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookCheck>,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            confidence: DEFAULT_CONFIDENCE,
            failed_attempts_tolerance: DEFAULT_FAILED_ATTEMPTS_TOLERANCE,
            resets_tolerance: DEFAULT_RESETS_TOLERANCE,
            max_failed_attempt_ratio: None,
            max_reset_ratio: None,
            max_srtt_ratio: None,
            max_rto_connection_ratio: None,
            min_connections: 0,
            metrics: Vec::new(),
            on_missing: OnMissing::default(),
            webhooks: Vec::new(),
        }
    }
}

impl Gates {
    /// Whether a check needs more than the kernel's counters: metric gates or webhook checks,
    /// which the rollout driver reads outside the control core.
    pub fn has_external(&self) -> bool {
        !self.metrics.is_empty() || !self.webhooks.is_empty()
    }

    fn has_fixed_ratios(&self) -> bool {
        self.max_failed_attempt_ratio.is_some()
            || self.max_reset_ratio.is_some()
            || self.max_srtt_ratio.is_some()
            || self.max_rto_connection_ratio.is_some()
    }
}

/// Counters of one side, cumulative at a moment or a difference over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SideSnapshot {
    /// `connect()` calls steered (TCP and connected UDP).
    pub connections: u64,
    /// Datagrams of unconnected UDP sockets steered.
    pub datagrams: u64,
    pub established: u64,
    pub failed_attempts: u64,
    pub abandoned_attempts: u64,
    pub resets: u64,
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
    /// Connections that had at least one retransmission timeout.
    pub rto_connections: u64,
}

impl From<&SideCounters> for SideSnapshot {
    fn from(c: &SideCounters) -> Self {
        Self {
            connections: c.connections_steered,
            datagrams: c.datagrams_steered,
            established: c.established,
            failed_attempts: c.failed_attempts,
            abandoned_attempts: c.abandoned_attempts,
            resets: c.resets,
            srtt_sum_us: c.srtt_sum_us,
            srtt_samples: c.srtt_samples,
            rto_connections: c.rto_connections,
        }
    }
}

impl SideSnapshot {
    /// The change since `earlier` (0 for a counter that went back, e.g. after a service was
    /// re-created).
    pub fn since(&self, earlier: &SideSnapshot) -> SideSnapshot {
        SideSnapshot {
            connections: self.connections.saturating_sub(earlier.connections),
            datagrams: self.datagrams.saturating_sub(earlier.datagrams),
            established: self.established.saturating_sub(earlier.established),
            failed_attempts: self.failed_attempts.saturating_sub(earlier.failed_attempts),
            abandoned_attempts: self.abandoned_attempts.saturating_sub(earlier.abandoned_attempts),
            resets: self.resets.saturating_sub(earlier.resets),
            srtt_sum_us: self.srtt_sum_us.saturating_sub(earlier.srtt_sum_us),
            srtt_samples: self.srtt_samples.saturating_sub(earlier.srtt_samples),
            rto_connections: self.rto_connections.saturating_sub(earlier.rto_connections),
        }
    }

    /// TCP attempts with an outcome: established, failed or abandoned. Attempts still in flight
    /// are not counted (they are neither a success nor a failure yet).
    pub fn attempts(&self) -> u64 {
        self.established + self.failures()
    }

    /// Attempts that never established, whoever gave up on them.
    pub fn failures(&self) -> u64 {
        self.failed_attempts + self.abandoned_attempts
    }

    fn failed_attempt_counts(&self) -> Counts {
        Counts { events: self.failures(), trials: self.attempts() }
    }

    /// Resets per established connection. A window can see resets of connections established
    /// before it; they are capped at the window's establishments.
    fn reset_counts(&self) -> Counts {
        Counts { events: self.resets.min(self.established), trials: self.established }
    }
}

impl Add for SideSnapshot {
    type Output = SideSnapshot;

    /// Saturating: the counts come from other nodes (cluster mode), never trusted not to
    /// overflow.
    fn add(self, other: SideSnapshot) -> SideSnapshot {
        SideSnapshot {
            connections: self.connections.saturating_add(other.connections),
            datagrams: self.datagrams.saturating_add(other.datagrams),
            established: self.established.saturating_add(other.established),
            failed_attempts: self.failed_attempts.saturating_add(other.failed_attempts),
            abandoned_attempts: self.abandoned_attempts.saturating_add(other.abandoned_attempts),
            resets: self.resets.saturating_add(other.resets),
            srtt_sum_us: self.srtt_sum_us.saturating_add(other.srtt_sum_us),
            srtt_samples: self.srtt_samples.saturating_add(other.srtt_samples),
            rto_connections: self.rto_connections.saturating_add(other.rto_connections),
        }
    }
}

/// Both sides at a moment (or their changes over a window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stable: SideSnapshot,
    pub canary: SideSnapshot,
}

impl Snapshot {
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot { stable: self.stable.since(&earlier.stable), canary: self.canary.since(&earlier.canary) }
    }
}

impl Add for Snapshot {
    type Output = Snapshot;

    /// Counters of several nodes add up to the service's.
    fn add(self, other: Snapshot) -> Snapshot {
        Snapshot { stable: self.stable + other.stable, canary: self.canary + other.canary }
    }
}

/// What the gates judge: counter changes over the step's window, and stable's changes over the
/// whole rollout, which the comparisons use as stable's reference (more evidence than the window
/// alone, and still there at a 100 % step where stable gets no traffic).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowCounts {
    pub window: Snapshot,
    pub stable_reference: SideSnapshot,
}

/// What the gates conclude, as if the window were over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every gate passes: the step may move on once its time is served.
    Pass,
    /// A gate fails.
    Fail,
    /// Not enough evidence yet: the window goes on.
    Wait,
}

/// The statistical comparisons with stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Comparisons {
    pub failed_attempts: Comparison,
    pub resets: Comparison,
}

/// What the gates read over a window, and the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateReadings {
    /// `connect()` calls steered to the canary (TCP and connected UDP). More than
    /// `canary_attempts` while attempts have no outcome yet, as when a canary black-holes SYNs.
    #[serde(default)]
    pub canary_connections: u64,
    /// Canary attempts with an outcome (established, failed or abandoned).
    pub canary_attempts: u64,
    pub stable_attempts: u64,
    /// Canary attempts that failed (refused, timed out, reset in SYN_SENT) or were abandoned.
    #[serde(default)]
    pub canary_failed_attempts: u64,
    /// Of those, attempts the client gave up in SYN_SENT.
    #[serde(default)]
    pub canary_abandoned_attempts: u64,
    #[serde(default)]
    pub canary_resets: u64,
    pub failed_attempt_ratio: Option<f64>,
    pub reset_ratio: Option<f64>,
    pub srtt_ratio: Option<f64>,
    /// Canary connections with a retransmission timeout / canary connections established.
    #[serde(default)]
    pub rto_connection_ratio: Option<f64>,
    /// Observed canary share of connections in the window, percent.
    pub observed_canary_percent: Option<f64>,
    /// Canary against stable (absent for `"gates": "none"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparisons: Option<Comparisons>,
    #[serde(default = "default_verdict")]
    pub verdict: Verdict,
    /// `verdict == pass`.
    pub passed: bool,
    /// Gates that failed, e.g. `failed_attempts: canary 52.0 % (at least 31.2 %) against stable
    /// 0.0 % (at most 1.1 %) + 2 %`.
    pub failures: Vec<String>,
    /// What the window still waits for, when the verdict is `wait`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// The window saw UDP datagrams but no TCP attempt on either side: the kernel measures no
    /// health for UDP, so judged gates cannot decide.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub udp_only: bool,
}

fn default_verdict() -> Verdict {
    Verdict::Wait
}

impl GateReadings {
    /// A comparison already shows the canary worse than stable beyond its tolerance: the step
    /// fails now, whatever time is left in the window.
    pub fn canary_worse(&self) -> bool {
        self.comparisons
            .as_ref()
            .is_some_and(|c| c.failed_attempts.decision == Decision::Worse || c.resets.decision == Decision::Worse)
    }

    /// The kernel gates' part of a check, as gate verdicts to combine with the metric gates' and
    /// webhook checks': one failure per failing gate, else a hold while evidence is missing,
    /// else a pass.
    pub fn gate_verdicts(&self) -> Vec<crate::gates::Verdict> {
        use crate::gates::{FailCause, Verdict as GateVerdict};
        match self.verdict {
            Verdict::Pass => vec![GateVerdict::Pass],
            Verdict::Fail => {
                let fail = |gate: &str, detail: &str| GateVerdict::Fail {
                    gate: gate.to_string(),
                    cause: FailCause::Kernel { detail: detail.to_string() },
                };
                let mut failed: Vec<_> = self
                    .failures
                    .iter()
                    .map(|line| {
                        let (gate, detail) = line.split_once(": ").unwrap_or(("kernel", line));
                        fail(gate, detail)
                    })
                    .collect();
                if failed.is_empty() {
                    failed.push(fail("kernel", "a gate failed"));
                }
                failed
            }
            Verdict::Wait => vec![GateVerdict::Hold {
                gate: "kernel".to_string(),
                reason: self.waiting_for.first().cloned().unwrap_or_else(|| "waiting for evidence".to_string()),
            }],
        }
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

fn percent(p: f64) -> String {
    format!("{:.2} %", p * 100.0)
}

/// Judges `counts` by `policy`. `estimates` adds how many canary attempts a comparison still
/// needs (for people; the engine's ticks leave it out).
pub fn judge(policy: &GatePolicy, counts: &WindowCounts, estimates: bool) -> GateReadings {
    let canary = &counts.window.canary;
    let stable = &counts.window.stable;
    let srtt = |s: &SideSnapshot| ratio(s.srtt_sum_us, s.srtt_samples);
    let mut readings = GateReadings {
        canary_connections: canary.connections,
        canary_attempts: canary.attempts(),
        stable_attempts: stable.attempts(),
        canary_failed_attempts: canary.failures(),
        canary_abandoned_attempts: canary.abandoned_attempts,
        canary_resets: canary.resets,
        failed_attempt_ratio: ratio(canary.failures(), canary.attempts()),
        reset_ratio: ratio(canary.resets, canary.established),
        rto_connection_ratio: ratio(canary.rto_connections.min(canary.established), canary.established),
        srtt_ratio: match (srtt(canary), srtt(stable)) {
            (Some(c), Some(s)) if s > 0.0 => Some(c / s),
            _ => None,
        },
        observed_canary_percent: ratio(canary.connections * 100, canary.connections + stable.connections),
        comparisons: None,
        verdict: Verdict::Pass,
        passed: true,
        failures: Vec::new(),
        waiting_for: Vec::new(),
        udp_only: canary.attempts() + stable.attempts() == 0 && canary.datagrams + stable.datagrams > 0,
    };
    let Some(gates) = policy.judged() else { return readings };

    let compare = |name: &str,
                   canary: Counts,
                   stable: Counts,
                   tolerance: f64,
                   failures: &mut Vec<String>,
                   waiting: &mut Vec<String>| {
        let mut comparison = stats::compare(canary, stable, tolerance, gates.confidence);
        if estimates {
            comparison = comparison.with_estimate(tolerance, gates.confidence);
        }
        let (c, s) = (&comparison.canary_interval, &comparison.stable_interval);
        let observed = |n: Counts| ratio(n.events, n.trials).map_or("-".to_string(), percent);
        match comparison.decision {
            Decision::Worse => failures.push(format!(
                "{name}: canary {} (at least {}) against stable {} (at most {}) + {} tolerance, at {} confidence",
                observed(canary),
                percent(c.lower),
                observed(stable),
                percent(s.upper),
                percent(tolerance),
                gates.confidence
            )),
            Decision::Undecided => waiting.push(format!(
                "{name}: canary at most {} is not yet below stable at least {} + {} tolerance{}",
                percent(c.upper),
                percent(s.lower),
                percent(tolerance),
                match comparison.canary_trials_needed {
                    Some(n) if estimates =>
                        format!(" (about {} more canary trials at the present rate)", n.saturating_sub(canary.trials)),
                    None if estimates => " (not at the present rate)".to_string(),
                    _ => String::new(),
                }
            )),
            Decision::NotWorse => {}
        }
        comparison
    };
    let mut failures = Vec::new();
    let mut waiting = Vec::new();
    let reference = &counts.stable_reference;
    let failed_attempts = compare(
        "failed_attempts",
        canary.failed_attempt_counts(),
        reference.failed_attempt_counts(),
        gates.failed_attempts_tolerance,
        &mut failures,
        &mut waiting,
    );
    let resets = compare(
        "resets",
        canary.reset_counts(),
        reference.reset_counts(),
        gates.resets_tolerance,
        &mut failures,
        &mut waiting,
    );
    readings.comparisons = Some(Comparisons { failed_attempts, resets });

    if canary.attempts() == 0 && canary.connections > 0 {
        waiting.push(format!(
            "outcomes: {} canary connections steered, none established or failed yet (a canary that black-holes \
             SYNs looks like this until clients or the kernel give up)",
            canary.connections
        ));
    }
    let needed = gates.min_connections.max(u64::from(gates.has_fixed_ratios()));
    if readings.canary_attempts < needed {
        waiting.push(format!("min_connections: {} of {needed} canary attempts", readings.canary_attempts));
    } else {
        let mut check = |name: &str, reading: Option<f64>, limit: Option<f64>| {
            if let (Some(reading), Some(limit)) = (reading, limit) {
                if reading > limit {
                    failures.push(format!("{name}: {reading:.4} > {limit}"));
                }
            }
        };
        check("max_failed_attempt_ratio", readings.failed_attempt_ratio, gates.max_failed_attempt_ratio);
        check("max_reset_ratio", readings.reset_ratio, gates.max_reset_ratio);
        check("max_srtt_ratio", readings.srtt_ratio, gates.max_srtt_ratio);
        check("max_rto_connection_ratio", readings.rto_connection_ratio, gates.max_rto_connection_ratio);
    }
    readings.verdict = if !failures.is_empty() {
        Verdict::Fail
    } else if !waiting.is_empty() {
        Verdict::Wait
    } else {
        Verdict::Pass
    };
    readings.passed = readings.verdict == Verdict::Pass;
    readings.failures = failures;
    readings.waiting_for = waiting;
    readings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(established: u64, failed: u64, abandoned: u64, resets: u64) -> SideSnapshot {
        SideSnapshot {
            connections: established + failed + abandoned,
            established,
            failed_attempts: failed,
            abandoned_attempts: abandoned,
            resets,
            ..Default::default()
        }
    }

    fn counts(canary: SideSnapshot, stable: SideSnapshot) -> WindowCounts {
        WindowCounts { window: Snapshot { canary, stable }, stable_reference: stable }
    }

    #[test]
    fn gates_parse_as_an_object_or_none() {
        let parse = |json: &str| serde_json::from_str::<GatePolicy>(json);
        assert_eq!(parse(r#""none""#).unwrap(), GatePolicy::None);
        assert_eq!(parse("{}").unwrap(), GatePolicy::Judged(Gates::default()));
        let gates = parse(r#"{"confidence": 0.99, "max_srtt_ratio": 2}"#).unwrap();
        assert_eq!(
            gates,
            GatePolicy::Judged(Gates { confidence: 0.99, max_srtt_ratio: Some(2.0), ..Gates::default() })
        );
        assert!(parse(r#""all""#).unwrap_err().to_string().contains("\"none\""));
        // Errors inside the object name the field through serde_path_to_error.
        let mut de = serde_json::Deserializer::from_str(r#"{"gates": {"confidence": "high"}}"#);
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Wrapper {
            gates: GatePolicy,
        }
        let err = serde_path_to_error::deserialize::<_, Wrapper>(&mut de).unwrap_err();
        assert_eq!(err.path().to_string(), "gates.confidence");
        assert_eq!(serde_json::to_string(&GatePolicy::None).unwrap(), r#""none""#);
    }

    #[test]
    fn abandoned_attempts_count_as_failures() {
        // A canary that drops SYNs: clients give up, the kernel never reports a failure.
        let readings = judge(&GatePolicy::default(), &counts(side(0, 0, 8, 0), side(80, 0, 0, 0)), false);
        assert_eq!(readings.canary_failed_attempts, 8);
        assert!(readings.canary_worse(), "{readings:?}");
        assert!(readings.failures[0].starts_with("failed_attempts: canary 100.00 %"), "{:?}", readings.failures);
    }

    #[test]
    fn resets_are_compared_per_established_connection() {
        let readings = judge(&GatePolicy::default(), &counts(side(40, 0, 0, 30), side(400, 0, 0, 0)), false);
        assert!(readings.canary_worse());
        assert!(readings.failures[0].starts_with("resets:"), "{:?}", readings.failures);
    }

    #[test]
    fn a_timed_rollout_judges_nothing() {
        let readings = judge(&GatePolicy::None, &counts(side(0, 50, 0, 0), side(50, 0, 0, 0)), false);
        assert_eq!((readings.verdict, readings.comparisons.is_none()), (Verdict::Pass, true));
    }

    #[test]
    fn healthy_canary_waits_for_evidence_then_passes() {
        let few = judge(&GatePolicy::default(), &counts(side(50, 0, 0, 0), side(950, 0, 0, 0)), true);
        assert_eq!(few.verdict, Verdict::Wait);
        assert!(few.waiting_for[0].contains("more canary trials"), "{:?}", few.waiting_for);
        let enough = judge(&GatePolicy::default(), &counts(side(400, 0, 0, 0), side(7600, 0, 0, 0)), false);
        assert_eq!(enough.verdict, Verdict::Pass, "{enough:?}");
    }

    #[test]
    fn fixed_ratios_wait_for_min_connections() {
        let gates =
            GatePolicy::Judged(Gates { max_failed_attempt_ratio: Some(0.05), min_connections: 10, ..Gates::default() });
        let quiet = judge(&gates, &counts(side(3, 0, 0, 0), side(30, 0, 0, 0)), false);
        assert_eq!(quiet.verdict, Verdict::Wait);
        let failing = judge(&gates, &counts(side(9, 1, 0, 0), side(90, 0, 0, 0)), false);
        assert_eq!(failing.verdict, Verdict::Fail);
        assert!(!failing.canary_worse(), "one failure in ten is no statistical evidence");
        assert!(failing.failures[0].starts_with("max_failed_attempt_ratio"));
    }

    #[test]
    fn the_rto_ratio_gate_fails_a_canary_whose_connections_time_out_and_retransmit() {
        let gates = GatePolicy::Judged(Gates { max_rto_connection_ratio: Some(0.2), ..Gates::default() });
        let lossy = SideSnapshot { rto_connections: 200, ..side(400, 0, 0, 0) };
        let failing = judge(&gates, &counts(lossy, side(7600, 0, 0, 0)), false);
        assert_eq!(failing.rto_connection_ratio, Some(0.5));
        assert_eq!(failing.verdict, Verdict::Fail);
        assert!(failing.failures[0].starts_with("max_rto_connection_ratio: 0.5000 > 0.2"), "{:?}", failing.failures);
        // Enough attempts for the comparisons with stable to pass too.
        let fine = SideSnapshot { rto_connections: 40, ..side(400, 0, 0, 0) };
        let passing = judge(&gates, &counts(fine, side(7600, 0, 0, 0)), false);
        assert_eq!(passing.verdict, Verdict::Pass, "{:?}", passing.failures);
    }

    #[test]
    fn udp_only_windows_are_flagged() {
        let udp = SideSnapshot { datagrams: 40, ..Default::default() };
        let readings = judge(&GatePolicy::default(), &counts(udp, udp), false);
        assert!(readings.udp_only);
        assert_eq!(readings.verdict, Verdict::Wait);
    }

    #[test]
    fn snapshots_of_several_nodes_add_up() {
        let a = Snapshot { canary: side(10, 1, 0, 0), stable: side(90, 0, 0, 0) };
        let b = Snapshot { canary: side(5, 0, 2, 1), stable: side(45, 0, 0, 0) };
        let sum = a + b;
        assert_eq!(sum.canary.attempts(), 18);
        assert_eq!(sum.canary.failures(), 3);
        assert_eq!(sum.since(&a), b);
    }
}
