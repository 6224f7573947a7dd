//! Metric gates: a PromQL query per gate and a bound on its value, judged by pure functions so
//! that the rollout driver only has to feed them readings.
//!
//! The driver queries every gate every [`poll_interval`] during a step's window and once at its
//! end. In-window readings go to an [`EarlyWatch`], which fails the step as soon as a gate has
//! been out of bounds [`EARLY_FAIL_READINGS`] times in a row (a clearly failing canary rolls back
//! without waiting for the window to end); the end-of-window readings go to [`judge`].

use std::{collections::HashSet, time::Duration};

use serde::{Deserialize, Serialize};

use super::{Bound, FailCause, Verdict};
use crate::config::InvalidField;

/// Metric gates a plan may have: each is one Prometheus query per poll.
pub const MAX_METRIC_GATES: usize = 8;
/// Longest query accepted, in bytes (before placeholder expansion).
pub const MAX_QUERY_BYTES: usize = 4096;
/// Out-of-bound readings in a row, during a window, that fail the step before the window ends.
pub const EARLY_FAIL_READINGS: u32 = 3;

/// Placeholders a query may use; see [`QueryContext`].
pub const PLACEHOLDERS: [&str; 5] = ["service", "window", "step", "percent", "namespace"];

/// One entry of `gates.metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricGate {
    /// Names the gate in the rollout's state, history and notifications.
    pub name: String,
    /// PromQL returning one number (a scalar or a one-series vector), with placeholders.
    pub query: String,
    /// The step fails when the value is above `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The step fails when the value is below `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
}

/// `gates.on_missing`: what a query that returns no data or fails means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// The step waits (neither promoted nor failed) and says why, until the metric reads again.
    #[default]
    Hold,
    /// A missing value fails the check like an out-of-bound one.
    Fail,
}

/// What one query gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reading {
    /// A finite number (`±Inf` is read as `±f64::MAX`, which compares the same against a
    /// finite bound and survives JSON).
    Value(f64),
    /// An empty vector or NaN: nothing to judge (a canary without traffic reads 0/0 = NaN).
    NoData,
    /// The query failed: Prometheus unreachable, a timeout, an error answer, several series.
    Error(String),
}

/// The values a query's placeholders take for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryContext<'a> {
    /// `{{service}}`: the sockshift service name.
    pub service: &'a str,
    /// `{{window}}`: the step's window as a Prometheus duration (`30s`, `1500ms`).
    pub window: Duration,
    /// `{{step}}`: index of the step in the plan, from 0 (as `step` in the rollout's state).
    pub step: usize,
    /// `{{percent}}`: the step's canary weight in percent (`10`, `12.5`).
    pub percent: f64,
    /// `{{namespace}}`: the Kubernetes namespace discovery names for the service, if any.
    pub namespace: Option<&'a str>,
}

/// A query that cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unknown placeholder {{{{{0}}}}}: use one of {{{{service}}}}, {{{{window}}}}, {{{{step}}}}, {{{{percent}}}}, {{{{namespace}}}}")]
    Unknown(String),
    #[error("a {{{{ is never closed with }}}}")]
    Unclosed,
    #[error("uses {{{{namespace}}}} but the service has no Kubernetes namespace (it is not from discovery)")]
    NoNamespace,
}

/// `d` as a Prometheus duration: whole seconds as `30s`, anything else in milliseconds.
pub fn prometheus_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Replaces each `{{name}}` (spaces inside the braces allowed) by its value for this step.
pub fn expand(query: &str, context: &QueryContext<'_>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(query.len() + 32);
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(ExpandError::Unclosed)?;
        let name = after[..end].trim();
        match name {
            "service" => out.push_str(context.service),
            "window" => out.push_str(&prometheus_duration(context.window)),
            "step" => out.push_str(&context.step.to_string()),
            "percent" => out.push_str(&context.percent.to_string()),
            "namespace" => out.push_str(context.namespace.ok_or(ExpandError::NoNamespace)?),
            other => return Err(ExpandError::Unknown(other.to_string())),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Placeholder names a query uses, in order; an unknown or unclosed one is an error.
fn placeholders(query: &str) -> Result<Vec<&str>, ExpandError> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(ExpandError::Unclosed)?;
        let name = after[..end].trim();
        if !PLACEHOLDERS.contains(&name) {
            return Err(ExpandError::Unknown(name.to_string()));
        }
        names.push(name);
        rest = &after[end + 2..];
    }
    Ok(names)
}

/// Whether any gate uses `{{namespace}}` (the plan then needs a service from discovery).
pub fn uses_namespace(gates: &[MetricGate]) -> bool {
    gates.iter().any(|gate| placeholders(&gate.query).is_ok_and(|names| names.contains(&"namespace")))
}

/// Refuses gates that cannot mean what their author wanted. `field` names the list in errors
/// (`gates.metrics`); the query's PromQL itself is checked by Prometheus at plan start
/// ([`super::prometheus::PrometheusClient::check_query`]).
pub fn validate_metric_gates(gates: &[MetricGate], field: &str) -> Result<(), InvalidField> {
    if gates.len() > MAX_METRIC_GATES {
        return Err(InvalidField::new(field, format!("{} metric gates, at most {MAX_METRIC_GATES}", gates.len())));
    }
    let mut names = HashSet::new();
    for (i, gate) in gates.iter().enumerate() {
        let at = |rest: &str| format!("{field}[{i}].{rest}");
        if !valid_gate_name(&gate.name) {
            return Err(InvalidField::new(
                at("name"),
                format!("{:?} is not a valid name: use 1 to 63 of a-z, 0-9, '-', '_', '.'", gate.name),
            ));
        }
        if !names.insert(gate.name.as_str()) {
            return Err(InvalidField::new(at("name"), format!("{:?} names two gates", gate.name)));
        }
        if gate.query.trim().is_empty() {
            return Err(InvalidField::new(at("query"), "must not be empty"));
        }
        if gate.query.len() > MAX_QUERY_BYTES {
            return Err(InvalidField::new(
                at("query"),
                format!("{} bytes, at most {MAX_QUERY_BYTES}", gate.query.len()),
            ));
        }
        if let Some(c) = gate.query.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return Err(InvalidField::new(at("query"), format!("contains the control character {c:?}")));
        }
        placeholders(&gate.query).map_err(|err| InvalidField::new(at("query"), err.to_string()))?;
        if gate.max.is_none() && gate.min.is_none() {
            return Err(InvalidField::new(
                at("max"),
                "set `max`, `min` or both: a gate without a bound judges nothing",
            ));
        }
        for (name, bound) in [("max", gate.max), ("min", gate.min)] {
            if let Some(value) = bound {
                if !value.is_finite() {
                    return Err(InvalidField::new(at(name), format!("must be a finite number, got {value}")));
                }
            }
        }
        if let (Some(min), Some(max)) = (gate.min, gate.max) {
            if min > max {
                return Err(InvalidField::new(at("min"), format!("{min} is above max {max}: no value could pass")));
            }
        }
    }
    Ok(())
}

fn valid_gate_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

impl MetricGate {
    /// The bound `value` breaks, if any (a value equal to a bound passes).
    pub fn broken_bound(&self, value: f64) -> Option<Bound> {
        match (self.max, self.min) {
            (Some(max), _) if value > max => Some(Bound::Max(max)),
            (_, Some(min)) if value < min => Some(Bound::Min(min)),
            _ => None,
        }
    }

    /// This gate's verdict on one reading.
    pub fn verdict(&self, reading: &Reading, on_missing: OnMissing) -> Verdict {
        let missing = |reason: String| match on_missing {
            OnMissing::Hold => Verdict::Hold { gate: self.name.clone(), reason },
            OnMissing::Fail => Verdict::Fail { gate: self.name.clone(), cause: FailCause::Missing { reason } },
        };
        match reading {
            Reading::Value(value) => match self.broken_bound(*value) {
                Some(bound) => {
                    Verdict::Fail { gate: self.name.clone(), cause: FailCause::OutOfBound { value: *value, bound } }
                }
                None => Verdict::Pass,
            },
            Reading::NoData => missing("no data".to_string()),
            Reading::Error(message) => missing(message.clone()),
        }
    }
}

/// One gate's reading and verdict, as the rollout's state and notifications show them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateReading {
    pub gate: String,
    pub reading: Reading,
    pub verdict: Verdict,
}

/// The metric gates' part of a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricJudgement {
    /// [`Verdict::worst`] of the gates' verdicts.
    pub verdict: Verdict,
    /// Every gate's reading, in plan order, failing or not.
    pub readings: Vec<GateReading>,
}

/// Judges the end-of-window readings: `readings[i]` is what `gates[i]`'s query gave (a missing
/// entry counts as an error).
pub fn judge(gates: &[MetricGate], readings: &[Reading], on_missing: OnMissing) -> MetricJudgement {
    let readings: Vec<GateReading> = gates
        .iter()
        .enumerate()
        .map(|(i, gate)| {
            let reading = readings.get(i).cloned().unwrap_or_else(|| Reading::Error("not queried".to_string()));
            let verdict = gate.verdict(&reading, on_missing);
            GateReading { gate: gate.name.clone(), reading, verdict }
        })
        .collect();
    MetricJudgement { verdict: Verdict::worst(readings.iter().map(|r| r.verdict.clone())), readings }
}

/// How often the driver queries during a window: every 5 s, or 4 times a window for a shorter
/// one, but never more than once a second (Prometheus scrapes every few seconds at best).
pub fn poll_interval(window: Duration) -> Duration {
    (window / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// In-window readings of one step: fails the step early when a gate has read out of bounds
/// [`EARLY_FAIL_READINGS`] times in a row. Missing data never fails early (`on_missing` is
/// applied at the window's end), and one bad reading (a spike, a scrape of the previous step's
/// traffic in a query's look-back) does not either. A fresh watch starts with each window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EarlyWatch {
    /// Per gate (plan order): out-of-bound readings in a row so far.
    #[serde(default)]
    streaks: Vec<u32>,
}

impl EarlyWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Out-of-bound readings in a row of gate `i` so far.
    pub fn streak(&self, i: usize) -> u32 {
        self.streaks.get(i).copied().unwrap_or(0)
    }

    /// Takes one round of in-window readings; `Some(Fail)` when the step should fail now.
    pub fn observe(&mut self, gates: &[MetricGate], readings: &[Reading]) -> Option<Verdict> {
        self.streaks.resize(gates.len(), 0);
        let mut failed = None;
        for (i, gate) in gates.iter().enumerate() {
            let broken = match readings.get(i) {
                Some(Reading::Value(value)) => gate.broken_bound(*value).map(|bound| (*value, bound)),
                _ => None,
            };
            match broken {
                Some((value, bound)) => {
                    self.streaks[i] += 1;
                    if self.streaks[i] >= EARLY_FAIL_READINGS && failed.is_none() {
                        failed = Some(Verdict::Fail {
                            gate: gate.name.clone(),
                            cause: FailCause::OutOfBound { value, bound },
                        });
                    }
                }
                None => self.streaks[i] = 0,
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(name: &str, max: Option<f64>, min: Option<f64>) -> MetricGate {
        MetricGate { name: name.into(), query: "sum(rate(x[{{window}}]))".into(), max, min }
    }

    fn context() -> QueryContext<'static> {
        QueryContext {
            service: "web",
            window: Duration::from_secs(30),
            step: 2,
            percent: 12.5,
            namespace: Some("shop"),
        }
    }

    #[test]
    fn placeholders_expand_for_the_step() {
        let query = r#"sum(rate(http_requests_total{app="{{service}}",namespace="{{ namespace }}",code=~"5.."}[{{window}}])) > {{step}} * {{percent}}"#;
        assert_eq!(
            expand(query, &context()).unwrap(),
            r#"sum(rate(http_requests_total{app="web",namespace="shop",code=~"5.."}[30s])) > 2 * 12.5"#
        );
        assert_eq!(expand("up{x=\"a\"}", &context()).unwrap(), "up{x=\"a\"}", "single braces are PromQL's");
        assert_eq!(expand("{{nope}}", &context()), Err(ExpandError::Unknown("nope".into())));
        assert_eq!(expand("x[{{window]", &context()), Err(ExpandError::Unclosed));
        let no_namespace = QueryContext { namespace: None, ..context() };
        assert_eq!(expand("{{namespace}}", &no_namespace), Err(ExpandError::NoNamespace));
        assert_eq!(expand("{{percent}}", &QueryContext { percent: 10.0, ..context() }).unwrap(), "10");
    }

    #[test]
    fn windows_are_prometheus_durations() {
        assert_eq!(prometheus_duration(Duration::from_secs(30)), "30s");
        assert_eq!(prometheus_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(prometheus_duration(Duration::from_secs(600)), "600s");
        assert_eq!(prometheus_duration(Duration::ZERO), "1ms");
    }

    #[test]
    fn bad_gates_are_refused_naming_the_field() {
        let long = MetricGate { query: "x".repeat(MAX_QUERY_BYTES + 1), ..gate("a", Some(1.0), None) };
        let cases: Vec<(Vec<MetricGate>, &str)> = vec![
            (vec![gate("a", None, None)], "gates.metrics[0].max"),
            (vec![gate("a", Some(1.0), None), gate("a", Some(2.0), None)], "gates.metrics[1].name"),
            (vec![gate("Error Rate", Some(1.0), None)], "gates.metrics[0].name"),
            (vec![gate("", Some(1.0), None)], "gates.metrics[0].name"),
            (vec![gate("a", Some(f64::NAN), None)], "gates.metrics[0].max"),
            (vec![gate("a", None, Some(f64::INFINITY))], "gates.metrics[0].min"),
            (vec![gate("a", Some(1.0), Some(2.0))], "gates.metrics[0].min"),
            (vec![MetricGate { query: "  ".into(), ..gate("a", Some(1.0), None) }], "gates.metrics[0].query"),
            (vec![MetricGate { query: "up{{sevice}}".into(), ..gate("a", Some(1.0), None) }], "gates.metrics[0].query"),
            (vec![MetricGate { query: "up\u{0}".into(), ..gate("a", Some(1.0), None) }], "gates.metrics[0].query"),
            (vec![long], "gates.metrics[0].query"),
            ((0..=MAX_METRIC_GATES).map(|i| gate(&format!("g{i}"), Some(1.0), None)).collect(), "gates.metrics"),
        ];
        for (gates, field) in cases {
            let err = validate_metric_gates(&gates, "gates.metrics").expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let good = vec![
            gate("error-rate", Some(0.01), None),
            gate("success", None, Some(0.99)),
            MetricGate {
                query: "histogram_quantile(0.99,\n  sum(rate(x[{{window}}])) by (le))".into(),
                ..gate("p99", Some(0.5), Some(0.0))
            },
        ];
        validate_metric_gates(&good, "gates.metrics").unwrap();
        assert!(!uses_namespace(&good));
        assert!(uses_namespace(&[MetricGate {
            query: "up{ns=\"{{namespace}}\"}".into(),
            ..gate("a", Some(1.0), None)
        }]));
    }

    #[test]
    fn plan_json_is_strict() {
        let gate: MetricGate = serde_json::from_str(r#"{"name": "error-rate", "query": "x", "max": 0.01}"#).unwrap();
        assert_eq!((gate.max, gate.min), (Some(0.01), None));
        assert!(serde_json::from_str::<MetricGate>(r#"{"name": "a", "query": "x", "maximum": 1}"#).is_err());
        assert_eq!(serde_json::from_str::<OnMissing>("\"fail\"").unwrap(), OnMissing::Fail);
        assert!(serde_json::from_str::<OnMissing>("\"wait\"").is_err());
        assert_eq!(OnMissing::default(), OnMissing::Hold);
    }

    #[test]
    fn readings_become_verdicts() {
        let gates =
            [gate("error-rate", Some(0.01), None), gate("success", None, Some(0.9)), gate("p99", Some(0.5), None)];
        let all_good =
            judge(&gates, &[Reading::Value(0.01), Reading::Value(0.95), Reading::Value(0.2)], OnMissing::Hold);
        assert_eq!(all_good.verdict, Verdict::Pass, "a value equal to its bound passes");
        assert_eq!(all_good.readings.len(), 3);

        let failing = judge(&gates, &[Reading::Value(0.2), Reading::Value(0.5), Reading::NoData], OnMissing::Hold);
        assert_eq!(
            failing.verdict,
            Verdict::Fail {
                gate: "error-rate".into(),
                cause: FailCause::OutOfBound { value: 0.2, bound: Bound::Max(0.01) }
            }
        );
        assert_eq!(
            failing.readings[1].verdict,
            Verdict::Fail {
                gate: "success".into(),
                cause: FailCause::OutOfBound { value: 0.5, bound: Bound::Min(0.9) }
            }
        );
        assert_eq!(failing.readings[2].verdict, Verdict::Hold { gate: "p99".into(), reason: "no data".into() });

        let down = [Reading::Value(0.0), Reading::Error("connection refused".into())];
        assert_eq!(
            judge(&gates[..2], &down, OnMissing::Hold).verdict,
            Verdict::Hold { gate: "success".into(), reason: "connection refused".into() }
        );
        assert_eq!(
            judge(&gates[..2], &down, OnMissing::Fail).verdict,
            Verdict::Fail { gate: "success".into(), cause: FailCause::Missing { reason: "connection refused".into() } }
        );
        assert_eq!(
            judge(&gates[..1], &[], OnMissing::Fail).verdict,
            Verdict::Fail { gate: "error-rate".into(), cause: FailCause::Missing { reason: "not queried".into() } }
        );
        assert_eq!(judge(&[], &[], OnMissing::Fail).verdict, Verdict::Pass);
    }

    #[test]
    fn clearly_failing_gates_fail_early_and_spikes_do_not() {
        let gates = [gate("error-rate", Some(0.01), None), gate("success", None, Some(0.9))];
        let mut watch = EarlyWatch::new();
        let bad = [Reading::Value(0.2), Reading::Value(1.0)];
        let good = [Reading::Value(0.0), Reading::Value(1.0)];
        assert_eq!(watch.observe(&gates, &bad), None);
        assert_eq!(watch.observe(&gates, &bad), None);
        assert_eq!(watch.observe(&gates, &good), None, "a good reading ends the streak");
        assert_eq!(watch.observe(&gates, &bad), None);
        assert_eq!(watch.observe(&gates, &[Reading::NoData, Reading::Value(1.0)]), None, "missing data ends it too");
        assert_eq!(watch.observe(&gates, &bad), None);
        assert_eq!(watch.observe(&gates, &bad), None);
        assert_eq!(
            watch.observe(&gates, &[Reading::Value(0.3), Reading::Value(1.0)]),
            Some(Verdict::Fail {
                gate: "error-rate".into(),
                cause: FailCause::OutOfBound { value: 0.3, bound: Bound::Max(0.01) }
            })
        );
        let mut quiet = EarlyWatch::new();
        for _ in 0..10 {
            assert_eq!(quiet.observe(&gates, &[Reading::Error("down".into()), Reading::NoData]), None);
        }
    }

    #[test]
    fn polls_are_between_one_and_five_seconds() {
        assert_eq!(poll_interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(poll_interval(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(poll_interval(Duration::from_secs(600)), Duration::from_secs(5));
    }

    #[test]
    fn readings_serialize_plainly() {
        assert_eq!(serde_json::to_value(Reading::Value(0.2)).unwrap(), serde_json::json!({"value": 0.2}));
        assert_eq!(serde_json::to_value(Reading::NoData).unwrap(), serde_json::json!("no_data"));
        assert_eq!(serde_json::to_value(Reading::Error("x".into())).unwrap(), serde_json::json!({"error": "x"}));
    }
}
