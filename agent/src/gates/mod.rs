//! Gates beyond the kernel's counters: PromQL queries against the operator's Prometheus
//! ([`metric`], [`prometheus`]) and webhook checks ([`checks`]).
//!
//! Each gate reading becomes a [`Verdict`]; a check's verdicts combine with [`Verdict::worst`]
//! (a failure beats a hold, a hold beats a pass), so the rollout driver judges one verdict per
//! check, whatever mix of gates the plan has, and can tell the user which gate decided and why.

pub mod checks;
pub mod metric;
pub mod prometheus;

use std::fmt;

use serde::{Deserialize, Serialize};

/// What one gate, or a whole check, says about the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailCause {
    /// A metric read a value outside its bound.
    OutOfBound { value: f64, bound: Bound },
    /// A metric had no value (no data or an error) and the plan says `on_missing = "fail"`.
    Missing { reason: String },
    /// A webhook check answered something other than 2xx, or not in time.
    Check { detail: String },
}

/// The bound a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
            Verdict::Fail { gate, cause: FailCause::Check { detail } } => write!(f, "{gate}: {detail}"),
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
