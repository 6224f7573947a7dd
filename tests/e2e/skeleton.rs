//! Issue 2 acceptance: the split on real sockets, changed through the API, only inside the
//! attached cgroup, for IPv4 and IPv6, and refused bad input that changes nothing.

mod common;

use common::{assert_share, Lab, FRONTEND4, FRONTEND6, FRONTEND_MAPPED};
use e2e::tcp_connects;
use serde_json::json;

#[test]
fn split_follows_the_api() {
    let lab = Lab::new(20.0);

    let report = tcp_connects(lab.inside(), FRONTEND4, 2000);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert_eq!(report.tags_total(), 2000);
    assert_share("2000 connections at 20 %", &report, 20.0);

    lab.agent.set_percent("web", 100.0);
    let report = tcp_connects(lab.inside(), FRONTEND4, 500);
    assert_eq!(report.tag("canary"), 500, "at 100 % every connection is canary: {:?}", report.raw);

    lab.agent.set_percent("web", 0.0);
    let report = tcp_connects(lab.inside(), FRONTEND4, 500);
    assert_eq!(report.tag("stable"), 500, "at 0 % every connection is stable: {:?}", report.raw);

    // The agent reports what the kernel counted: 2000 + 500 + 500 steered connections.
    let state = lab.agent.service("web");
    let steered = |side: &str| state["sides"][side]["connections_steered"].as_u64().unwrap();
    assert_eq!(steered("stable") + steered("canary"), 3000, "{state}");
    assert_eq!(state["canary_percent"], json!(0.0));
}

#[test]
fn outside_the_cgroup_is_not_steered() {
    let lab = Lab::new(50.0);
    // Nothing listens on the frontend itself, so an untouched connection is refused.
    let report = tcp_connects(lab.outside(), FRONTEND4, 200);
    assert_eq!(report.tags_total(), 0, "a process outside the cgroup was steered: {:?}", report.raw);
    assert_eq!(report.error("ConnectionRefused"), 200, "{:?}", report.raw);

    let report = tcp_connects(lab.inside(), FRONTEND4, 200);
    assert_eq!(report.tags_total(), 200, "{:?}", report.raw);
}

#[test]
fn ipv6_and_v4_mapped_frontends_are_steered() {
    let lab = Lab::new(20.0);
    let report = tcp_connects(lab.inside(), FRONTEND6, 2000);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert_eq!(report.tag("stable6") + report.tag("canary6"), 2000, "IPv6 goes to IPv6 backends");
    assert_share("IPv6 frontend at 20 %", &report, 20.0);

    let report = tcp_connects(lab.inside(), FRONTEND_MAPPED, 1000);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert_eq!(report.tag("stable") + report.tag("canary"), 1000, "v4-mapped goes to IPv4 backends");
    assert_share("v4-mapped frontend at 20 %", &report, 20.0);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let lab = Lab::new(20.0);
    let path = "/v1/services/web/canary";
    let cases: &[(&[u8], u16, &str)] = &[
        (br#"{"percent": -1}"#, 400, "out_of_range"),
        (br#"{"percent": 100.5}"#, 400, "out_of_range"),
        (br#"{"percent": NaN}"#, 400, "malformed_json"),
        (br#"{"percent": 1e400}"#, 400, "malformed_json"),
        (br#"{"percent": "12"}"#, 400, "invalid_type"),
        (br#"{"percent": null}"#, 400, "invalid_type"),
        (br#"{}"#, 400, "missing_field"),
        (br#"{"percent": 5, "extra": 1}"#, 400, "unknown_field"),
        (br#"{"percent": 5"#, 400, "malformed_json"),
        (br#"[5]"#, 400, "invalid_type"),
        (b"", 400, "malformed_json"),
    ];
    for (body, status, code) in cases {
        let (got, reply) = lab.agent.call_raw("PUT", path, body);
        let shown = String::from_utf8_lossy(body);
        assert_eq!(got, *status, "PUT {shown}: {reply}");
        assert_eq!(reply["code"], json!(code), "PUT {shown}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "PUT {shown}: {reply}");
    }
    let (got, reply) = lab.agent.call_raw("PUT", "/v1/services/nope/canary", br#"{"percent": 5}"#);
    assert_eq!((got, reply["code"].as_str()), (404, Some("service_not_found")), "{reply}");
    let oversized = format!(r#"{{"percent": 5, "pad": "{}"}}"#, "x".repeat(100_000));
    let (got, _) = lab.agent.call_raw("PUT", path, oversized.as_bytes());
    assert_eq!(got, 413, "oversized body");

    assert_eq!(lab.agent.service("web")["canary_percent"], json!(20.0));
    let report = tcp_connects(lab.inside(), FRONTEND4, 2000);
    assert_eq!(report.errors_total(), 0, "{:?}", report.raw);
    assert_share("split after refused input", &report, 20.0);
}
