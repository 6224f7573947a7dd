//! What the CLI prints: tables for people (comfy-table), JSON for scripts.

use comfy_table::{presets::NOTHING, CellAlignment, Table};
use serde::Serialize;

use super::Output;
use crate::{
    api::types::{AuditLog, ClusterStatus, ServiceList, ServiceState, SideState},
    gates::{metric::Reading, Verdict as GateVerdict},
    rollout::{GateReadings, Gates, RolloutState},
};

pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn table(header: &[&str], right_aligned_from: usize) -> Table {
    let mut table = Table::new();
    table.load_style(NOTHING).set_header(header.iter().copied());
    for index in right_aligned_from..header.len() {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Services as a table, or as JSON (one service as itself, several as `{"services": [...]}`).
pub fn services(services: &[ServiceState], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return match services {
            [one] => json(one),
            many => json(&ServiceList { services: many.to_vec(), stale: None, as_of_revision: None }),
        };
    }
    let mut out =
        table(&["SERVICE", "CANARY %", "STABLE CONN", "CANARY CONN", "S FAIL", "C FAIL", "S SRTT", "C SRTT"], 1);
    // Failed as the rollout gates count it: attempts that never established, refused or timed
    // out by the kernel or given up by the client.
    let failed = |side: &SideState| (side.health.failed_attempts + side.health.abandoned_attempts).to_string();
    let srtt = |side: &SideState| match side.health.srtt_avg_us {
        Some(us) => format!("{:.2}ms", us as f64 / 1000.0),
        None => "-".to_string(),
    };
    for s in services {
        let (stable, canary) = (&s.sides.stable, &s.sides.canary);
        out.add_row(vec![
            s.name.clone(),
            s.canary_percent.to_string(),
            (stable.connections_steered + stable.datagrams_steered).to_string(),
            (canary.connections_steered + canary.datagrams_steered).to_string(),
            failed(stable),
            failed(canary),
            srtt(stable),
            srtt(canary),
        ]);
    }
    println!("{out}");
    for s in services {
        if let Some(k) = &s.kubernetes {
            let message = k.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
            println!("{}: kubernetes {}/{}: {}{message}", s.name, k.namespace, k.frontend, name_of(k.state));
        }
    }
    Ok(())
}

pub fn audit(log: &AuditLog) {
    let clustered = log.entries.iter().any(|e| e.node.is_some());
    let mut header = vec!["TIME", "TOKEN", "ROLE", "METHOD", "ROUTE"];
    if clustered {
        header.insert(1, "NODE");
    }
    let mut out = table(&header, usize::MAX);
    for e in &log.entries {
        let role = e.role.map_or_else(|| "-".to_string(), |r| r.to_string());
        let route = match &e.refused {
            Some(reason) => format!("{} (refused: {reason})", e.route),
            None => e.route.clone(),
        };
        let mut row = vec![e.time.clone(), e.token.clone(), role, e.method.clone(), route];
        if clustered {
            row.insert(1, e.node.clone().unwrap_or_default());
        }
        out.add_row(row);
    }
    println!("{out}");
}

/// `GET /v1/cluster` as a table: one row per live node.
pub fn cluster(status: &ClusterStatus, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return json(status);
    }
    println!(
        "node {}  leader {}  revision {}  {}",
        status.node,
        status.leader.as_deref().unwrap_or("none"),
        status.revision,
        if status.connected {
            "connected".to_string()
        } else {
            format!("STALE: etcd unreachable, as of revision {}", status.as_of_revision)
        }
    );
    let mut out = table(&["NODE", "APPLIED", "AGE", "HEALTHY", "VERSION", "DETAIL"], usize::MAX);
    for index in [1, 2] {
        if let Some(column) = out.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    for node in &status.nodes {
        let mut name = node.node.clone();
        if status.leader.as_deref() == Some(node.node.as_str()) {
            name.push_str(" *");
        }
        let applied = if node.lagging {
            format!("{} (lagging)", node.applied_revision)
        } else {
            node.applied_revision.to_string()
        };
        out.add_row(vec![
            name,
            applied,
            format!("{:.1}s", node.age_ms as f64 / 1000.0),
            if node.healthy { "yes" } else { "NO" }.to_string(),
            node.agent_version.clone(),
            node.detail.clone(),
        ]);
    }
    println!("{out}");
    Ok(())
}

/// A serde enum's name as the API writes it (`rolled_back`, `not_worse`).
fn name_of(value: impl Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// A rollout for people: a bar of the steps, the gate readings and the observed split.
pub fn rollout(r: &crate::api::types::RolloutView) {
    let steps = &r.steps;
    let state = r.state;
    let done = |i: usize| i < r.step || state == RolloutState::Promoted;
    let bar: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mark = if done(i) {
                "✓"
            } else if i == r.step && !matches!(state, RolloutState::RolledBack | RolloutState::Aborted) {
                "▶"
            } else {
                " "
            };
            format!("{mark}{p}%")
        })
        .collect();
    let filled = (0..steps.len()).filter(|i| done(*i)).count();
    println!(
        "{}  rollout {}  step {}/{}  weight {} %  window {:.1}s/{}s",
        r.service,
        name_of(state),
        (r.step + 1).min(steps.len()),
        steps.len(),
        r.percent,
        r.window_elapsed_ms as f64 / 1000.0,
        r.step_seconds,
    );
    println!("  [{}{}]  {}", "■".repeat(filled), "□".repeat(steps.len() - filled), bar.join("  "));
    if let Some(role) = r.awaiting_role {
        println!("  waiting for approval by a {role} token: sockshift rollout approve {}", r.service);
    }
    let gates = r.plan.gates.judged();
    if gates.is_none() {
        println!("  gates: none (timed rollout: the canary's health is not judged)");
    }
    let show = |label: &str, reading: Option<f64>, limit: Option<f64>| {
        let reading = reading.map_or("-".to_string(), |v| format!("{v:.3}"));
        let limit = limit.map_or("none".to_string(), |v| v.to_string());
        format!("{label} {reading} (max {limit})")
    };
    let percent = |v: f64| format!("{:.2} %", v * 100.0);
    let observed = |w: &GateReadings| w.observed_canary_percent.map_or("-".to_string(), |v| format!("{v:.1} %"));
    for (title, window) in [("this window", &r.current_window), ("last judged", &r.last_gates)] {
        let Some(window) = window else { continue };
        // A finished rollout's window in progress is only what came after it.
        if title == "this window" && !state.is_active() {
            continue;
        }
        let Some(gates) = gates else {
            println!(
                "  {title:<12} canary attempts {}, failed {}, resets {}  observed canary {}",
                window.canary_attempts,
                window.canary_failed_attempts,
                window.canary_resets,
                observed(window),
            );
            continue;
        };
        println!(
            "  {title:<12} {}  {}  {}  {}  canary attempts {} (min {})  observed canary {}  verdict {}",
            show("failed-attempt ratio", window.failed_attempt_ratio, gates.max_failed_attempt_ratio),
            show("reset ratio", window.reset_ratio, gates.max_reset_ratio),
            show("srtt ratio", window.srtt_ratio, gates.max_srtt_ratio),
            show("rto ratio", window.rto_connection_ratio, gates.max_rto_connection_ratio),
            window.canary_attempts,
            gates.min_connections,
            observed(window),
            name_of(window.verdict),
        );
        if let Some(comparisons) = &window.comparisons {
            for (name, c, tolerance) in [
                ("failed_attempts", &comparisons.failed_attempts, gates.failed_attempts_tolerance),
                ("resets", &comparisons.resets, gates.resets_tolerance),
            ] {
                println!(
                    "    {name:<16} canary {}/{} in [{}, {}]  stable {}/{} in [{}, {}]  tolerance {}  {}",
                    c.canary.events,
                    c.canary.trials,
                    percent(c.canary_interval.lower),
                    percent(c.canary_interval.upper),
                    c.stable.events,
                    c.stable.trials,
                    percent(c.stable_interval.lower),
                    percent(c.stable_interval.upper),
                    percent(tolerance),
                    name_of(c.decision),
                );
            }
        }
        if title == "this window" {
            for line in &window.waiting_for {
                println!("    waiting for {line}");
            }
        }
    }
    if let Some(gates) = gates.filter(|g| g.has_external()) {
        external_gates(r, gates);
    }
    println!(
        "  cost to canary clients: {} failed connections, {} resets{}",
        r.harm.canary_failed_connections,
        r.harm.canary_resets,
        r.harm.time_to_rollback_ms.map_or(String::new(), |ms| format!("; rolled back {ms} ms after the first failure")),
    );
    if let Some(n) = r.terminated_connections {
        println!("  closed {n} canary connections on rollback");
    }
    if let Some(last) = r.history.last() {
        println!("  last event: {} {}", last.event, last.detail);
    }
}

/// The metric gates (value, bound, verdict, out-of-bound streak) of the window in progress, or of
/// the last judgement once the rollout has ended, what holds the step, and the last judgement's
/// verdict with its webhook checks.
fn external_gates(r: &crate::api::types::RolloutView, gates: &Gates) {
    let window = &r.external_window;
    let (title, readings) = match (&window.metrics, &r.last_judgement) {
        (Some(metrics), _) if r.state.is_active() => ("this window", Some(&metrics.readings)),
        (_, Some(judgement)) => ("last judged", Some(&judgement.metrics)),
        _ => ("this window", None),
    };
    for (i, gate) in gates.metrics.iter().enumerate() {
        let reading = readings.and_then(|readings| readings.iter().find(|g| g.gate == gate.name));
        let value = match reading.map(|g| &g.reading) {
            Some(Reading::Value(v)) => format!("{v:.4}"),
            Some(Reading::NoData) => "no data".to_string(),
            Some(Reading::Error(message)) => format!("error: {message}"),
            None => "-".to_string(),
        };
        let bound = match (gate.min, gate.max) {
            (Some(min), Some(max)) => format!("{min} ≤ x ≤ {max}"),
            (None, Some(max)) => format!("max {max}"),
            (Some(min), None) => format!("min {min}"),
            (None, None) => "no bound".to_string(),
        };
        let verdict = reading.map_or("-".to_string(), |g| match &g.verdict {
            GateVerdict::Pass => "pass".to_string(),
            GateVerdict::Hold { .. } => "hold".to_string(),
            GateVerdict::Fail { .. } => "fail".to_string(),
        });
        let streak = if title == "this window" {
            format!("  out of bounds {}× in a row", window.early_watch.streak(i))
        } else {
            String::new()
        };
        println!("  metric {:<16} {title:<12} {value}  ({bound})  {verdict}{streak}", gate.name);
    }
    for check in &gates.webhooks {
        let result =
            r.last_judgement.as_ref().and_then(|j| j.webhooks.iter().find(|c| c.name == check.name)).map_or_else(
                || "not called yet".to_string(),
                |c| {
                    let outcome = if c.passed { "pass" } else { "fail" };
                    match c.status {
                        Some(status) => format!("last HTTP {status}, {outcome} ({} ms)", c.elapsed_ms),
                        None => format!("{outcome}: {}", c.detail),
                    }
                },
            );
        println!("  check  {:<16} {result}", check.name);
    }
    if let Some(holding) = &window.holding {
        println!("  holding: {holding}");
    } else if window.judging_since_unix_ms.is_some() {
        println!("  judging: kernel gates passed, reading the metric gates and calling the checks");
    }
    if let Some(judgement) = &r.last_judgement {
        let verdict = match &judgement.verdict {
            GateVerdict::Pass => "pass".to_string(),
            other => other.to_string(),
        };
        println!("  last judgement (step {}): {verdict}", judgement.step);
    }
}
