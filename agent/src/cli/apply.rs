//! `sockshift apply -f services.toml`: a declarative, idempotent load of `[[service]]` tables
//! through the API. Each service is compared with what the agent holds; only what differs is
//! written (`PUT /v1/services/{name}`), and what was done is shown, service by service.

use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::{output, Output};
use crate::{
    api::types::{ServiceBody, ServiceList, ServiceState},
    client::ApiClient,
    config::{validate_services, ServiceConfig},
};

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub dry_run: bool,
    pub prune: bool,
    pub wait: bool,
}

/// The file: `[[service]]` tables and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesFile {
    #[serde(default, rename = "service")]
    services: Vec<ServiceConfig>,
}

/// What apply did (or, with `--dry-run`, would do) to one service.
#[derive(Debug, Clone, Serialize)]
struct Outcome {
    service: String,
    /// `created`, `configured`, `unchanged` or `pruned`.
    action: &'static str,
    /// The fields that differ, `field: before -> after`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    changes: Vec<String>,
    dry_run: bool,
}

pub fn run(client: &ApiClient, path: &Path, options: Options, output: Output) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ServicesFile = toml::from_str(&text)
        .with_context(|| format!("{} must hold only [[service]] tables (the config file's format)", path.display()))?;
    // What every node can check; cohort cgroups are resolved by each node, which may refuse them.
    let portable: Vec<ServiceConfig> =
        file.services.iter().map(|s| ServiceConfig { cohorts: Vec::new(), ..s.clone() }).collect();
    validate_services(&portable, None).with_context(|| format!("{} is not valid", path.display()))?;

    let current = client.call::<ServiceList>("GET", "/v1/services", None::<&()>)?;
    let query = if options.wait { "?wait=cluster" } else { "" };
    let mut outcomes = Vec::new();
    for desired in &file.services {
        let existing = current.services.iter().find(|s| s.name == desired.name);
        let changes = match existing {
            Some(existing) => differences(existing, desired),
            None => Vec::new(),
        };
        let action = match existing {
            None => "created",
            Some(_) if changes.is_empty() => "unchanged",
            Some(_) => "configured",
        };
        if action != "unchanged" && !options.dry_run {
            let body = ServiceBody::from(desired);
            let put = client.call::<ServiceState>("PUT", &format!("/v1/services/{}{query}", desired.name), Some(&body));
            if let Err(err) = put {
                report(&outcomes, output)?;
                bail!("service {}: {err} (the services above were applied; nothing after it)", desired.name);
            }
        }
        outcomes.push(Outcome { service: desired.name.clone(), action, changes, dry_run: options.dry_run });
    }
    if options.prune {
        for extra in current.services.iter().filter(|s| !file.services.iter().any(|d| d.name == s.name)) {
            if !options.dry_run {
                let delete =
                    client.call::<ServiceState>("DELETE", &format!("/v1/services/{}{query}", extra.name), None::<&()>);
                if let Err(err) = delete {
                    report(&outcomes, output)?;
                    bail!("removing service {}: {err}", extra.name);
                }
            }
            outcomes.push(Outcome {
                service: extra.name.clone(),
                action: "pruned",
                changes: Vec::new(),
                dry_run: options.dry_run,
            });
        }
    }
    report(&outcomes, output)
}

fn report(outcomes: &[Outcome], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return output::json(&outcomes);
    }
    for outcome in outcomes {
        let dry = if outcome.dry_run && outcome.action != "unchanged" { " (dry run)" } else { "" };
        if outcome.changes.is_empty() {
            println!("service/{} {}{dry}", outcome.service, outcome.action);
        } else {
            println!("service/{} {}{dry}: {}", outcome.service, outcome.action, outcome.changes.join("; "));
        }
    }
    Ok(())
}

/// Addresses as the agent shows them (`[fd00::1]:80`, not `[fd00:0::1]:80`).
fn normalized(addrs: &[String]) -> Vec<String> {
    addrs.iter().map(|a| a.parse::<SocketAddr>().map_or_else(|_| a.clone(), |a| a.to_string())).collect()
}

/// The fields in which the agent's service differs from the file's.
fn differences(existing: &ServiceState, desired: &ServiceConfig) -> Vec<String> {
    let mut changes = Vec::new();
    let mut compare = |field: &str, before: String, after: String| {
        if before != after {
            changes.push(format!("{field}: {before} -> {after}"));
        }
    };
    let list = |addrs: &[String]| format!("[{}]", addrs.join(", "));
    compare("frontends", list(&existing.frontends), list(&normalized(&desired.frontends)));
    compare("stable", list(&existing.stable), list(&normalized(&desired.stable)));
    compare("canary", list(&existing.canary), list(&normalized(&desired.canary)));
    compare("canary_percent", existing.canary_percent.to_string(), desired.canary_percent.to_string());
    compare("affinity", format!("{:?}", existing.affinity), format!("{:?}", desired.affinity));
    compare(
        "max_operator_percent",
        existing.max_operator_percent.to_string(),
        desired.max_operator_percent.to_string(),
    );
    let cohorts = |c: &[crate::config::CohortConfig]| serde_json::to_string(c).unwrap_or_default();
    compare("cohort", cohorts(&existing.cohorts), cohorts(&desired.cohorts));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_fields() {
        let desired: ServiceConfig = toml::from_str(
            "name = \"web\"\nfrontends = [\"[fd00:0::10]:80\"]\nstable = [\"[fd00::1]:8080\"]\ncanary_percent = 10.0",
        )
        .unwrap();
        let existing: ServiceState = serde_json::from_value(serde_json::json!({
            "name": "web", "canary_percent": 5.0, "canary_ppm": 50000, "affinity": "connection",
            "max_operator_percent": 100.0, "frontends": ["[fd00::10]:80"], "stable": ["[fd00::1]:8080"],
            "canary": [], "cohorts": [], "revision": 1,
            "sides": {"stable": side(), "canary": side()},
        }))
        .unwrap();
        assert_eq!(differences(&existing, &desired), ["canary_percent: 5 -> 10"]);
        let same = ServiceConfig { canary_percent: 5.0, ..desired };
        assert!(differences(&existing, &same).is_empty(), "addresses compare as the agent writes them");
    }

    fn side() -> serde_json::Value {
        serde_json::json!({
            "connections_steered": 0, "datagrams_steered": 0, "open_socket_records": 0,
            "health": {"established": 0, "failed_attempts": 0, "abandoned_attempts": 0, "resets": 0,
                       "retransmission_timeouts": 0, "connections_with_rto": 0, "srtt_avg_us": null,
                       "srtt_sum_us": 0, "srtt_samples": 0, "srtt_close_sum_us": 0, "srtt_close_samples": 0},
            "unrecorded": {"socket_table_full": 0, "socket_netns_full": 0},
            "fail_open": {"backend_missing": 0},
        })
    }
}
