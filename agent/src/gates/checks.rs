//! Webhook checks (`gates.webhooks`): URLs called with the rollout's state before a step is
//! promoted; a 2xx answer passes, anything else (or no answer in time) fails. This is how users
//! plug acceptance and load tests into a rollout. Delivery (allow list, limits) is in
//! [`crate::webhook`]; this module has the plan type and the verdict.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{FailCause, Verdict};
use crate::config::InvalidField;

/// Seconds a check may take unless its `timeout_seconds` says otherwise.
pub const DEFAULT_CHECK_TIMEOUT_SECONDS: f64 = 10.0;
/// Longest `timeout_seconds`: a longer test should run on its own and be checked by a short call.
pub const MAX_CHECK_TIMEOUT_SECONDS: f64 = 60.0;

/// One entry of `gates.webhooks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookCheck {
    /// Names the check in the rollout's state, history and notifications.
    pub name: String,
    /// `http://host:port/path`; `host:port` must be in the agent's `webhook_allow`.
    pub url: String,
    /// Total time for the call (connect, send, answer), from 1 to 60 seconds.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: f64,
}

fn default_timeout_seconds() -> f64 {
    DEFAULT_CHECK_TIMEOUT_SECONDS
}

/// Validates names and timeouts; `field` names the list (`gates.webhooks`). URLs, the allow list
/// and the per-plan webhook cap are checked by [`crate::webhook::validate_plan_webhooks`].
pub fn validate_webhook_checks(checks: &[WebhookCheck], field: &str) -> Result<(), InvalidField> {
    let mut names = HashSet::new();
    for (i, check) in checks.iter().enumerate() {
        let at = |rest: &str| format!("{field}[{i}].{rest}");
        let valid = (1..=63).contains(&check.name.len())
            && check.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !valid {
            return Err(InvalidField::new(
                at("name"),
                format!("{:?} is not a valid name: use 1 to 63 of a-z, 0-9, '-', '_', '.'", check.name),
            ));
        }
        if !names.insert(check.name.as_str()) {
            return Err(InvalidField::new(at("name"), format!("{:?} names two checks", check.name)));
        }
        if !check.timeout_seconds.is_finite() || !(1.0..=MAX_CHECK_TIMEOUT_SECONDS).contains(&check.timeout_seconds) {
            return Err(InvalidField::new(
                at("timeout_seconds"),
                format!("must be from 1 to {MAX_CHECK_TIMEOUT_SECONDS}, got {}", check.timeout_seconds),
            ));
        }
    }
    Ok(())
}

/// What one call of a check gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// The HTTP status, when the receiver answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed (`answered HTTP 500: <start of the body>`, `no answer within 10s`, a refused
    /// address), or the start of a passing answer's body.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    pub elapsed_ms: u64,
}

impl CheckResult {
    pub fn verdict(&self) -> Verdict {
        if self.passed {
            Verdict::Pass
        } else {
            Verdict::Fail { gate: self.name.clone(), cause: FailCause::Check { detail: self.detail.clone() } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, timeout_seconds: f64) -> WebhookCheck {
        WebhookCheck { name: name.into(), url: "http://127.0.0.1:9000/".into(), timeout_seconds }
    }

    #[test]
    fn plan_json_defaults_and_strictness() {
        let parsed: WebhookCheck =
            serde_json::from_str(r#"{"name": "smoke", "url": "http://127.0.0.1:9000/"}"#).unwrap();
        assert_eq!(parsed.timeout_seconds, DEFAULT_CHECK_TIMEOUT_SECONDS);
        assert!(serde_json::from_str::<WebhookCheck>(r#"{"name": "a", "url": "http://x/", "method": "GET"}"#).is_err());
    }

    #[test]
    fn bad_checks_are_refused_naming_the_field() {
        let cases = [
            (vec![check("Smoke Test", 5.0)], "gates.webhooks[0].name"),
            (vec![check("a", 5.0), check("a", 5.0)], "gates.webhooks[1].name"),
            (vec![check("a", 0.5)], "gates.webhooks[0].timeout_seconds"),
            (vec![check("a", 61.0)], "gates.webhooks[0].timeout_seconds"),
            (vec![check("a", f64::NAN)], "gates.webhooks[0].timeout_seconds"),
        ];
        for (checks, field) in cases {
            assert_eq!(validate_webhook_checks(&checks, "gates.webhooks").unwrap_err().field, field);
        }
        validate_webhook_checks(&[check("smoke", 1.0), check("load", 60.0)], "gates.webhooks").unwrap();
    }

    #[test]
    fn a_failed_call_is_a_failing_gate() {
        let failed = CheckResult {
            name: "smoke".into(),
            passed: false,
            status: Some(500),
            detail: "answered HTTP 500".into(),
            elapsed_ms: 3,
        };
        assert_eq!(failed.verdict().to_string(), "smoke: answered HTTP 500");
        assert_eq!(CheckResult { passed: true, ..failed }.verdict(), Verdict::Pass);
    }
}
