//! The lab most tests use: a network namespace with stable and canary TCP backends, a cgroup
//! whose processes are steered, and an agent attached to that cgroup.

#![allow(dead_code)]

use e2e::{assert_canary_share, require_root, serve, Agent, Cgroup, NetNs, Placement, Spawned, TcpReport};

pub const FRONTEND4: &str = "127.1.0.1:80";
pub const FRONTEND6: &str = "[fd00:5eed::1]:80";
pub const FRONTEND_MAPPED: &str = "[::ffff:127.1.0.1]:80";

/// Fields drop in order: the agent detaches first, the namespace goes last.
pub struct Lab {
    pub agent: Agent,
    pub servers: Spawned,
    pub cgroup: Cgroup,
    pub netns: NetNs,
}

impl Lab {
    /// One service "web": IPv4 and IPv6 frontends, a stable and a canary backend per family.
    pub fn new(canary_percent: f64) -> Self {
        Self::new_with_agent(canary_percent, "")
    }

    /// Like `new`, with `agent_extra` added to the config's `[agent]` section.
    pub fn new_with_agent(canary_percent: f64, agent_extra: &str) -> Self {
        Self::with_agent(
            agent_extra,
            &format!(
                r#"[[service]]
name = "web"
frontends = ["{FRONTEND4}", "{FRONTEND6}"]
stable = ["127.0.0.1:8001", "[::1]:8001"]
canary = ["127.0.0.1:8002", "[::1]:8002"]
canary_percent = {canary_percent}
"#
            ),
        )
    }

    /// Backends tagged `stable`/`canary` (IPv4) and `stable6`/`canary6` (IPv6) on ports 8001 and
    /// 8002, plus `services` as the config's service tables.
    pub fn with_service(services: &str) -> Self {
        Self::with_agent("", services)
    }

    /// Like `with_service`, with `agent_extra` added to the config's `[agent]` section.
    pub fn with_agent(agent_extra: &str, services: &str) -> Self {
        require_root();
        let netns = NetNs::new();
        let cgroup = Cgroup::new();
        let servers = serve(
            Placement { netns: Some(&netns), cgroup: None },
            &[
                "serve-tcp",
                "--listen",
                "127.0.0.1:8001=stable",
                "--listen",
                "127.0.0.1:8002=canary",
                "--listen",
                "[::1]:8001=stable6",
                "--listen",
                "[::1]:8002=canary6",
            ],
        );
        let agent = Agent::start_with(&cgroup, agent_extra, services);
        Self { agent, servers, cgroup, netns }
    }

    /// Processes in the namespace and in the steered cgroup.
    pub fn inside(&self) -> Placement<'_> {
        Placement { netns: Some(&self.netns), cgroup: Some(&self.cgroup) }
    }

    /// Processes in the namespace but not in the steered cgroup.
    pub fn outside(&self) -> Placement<'_> {
        Placement { netns: Some(&self.netns), cgroup: None }
    }
}

/// Asserts the canary's share of `report`'s connections is what a weight of `percent` gives
/// (a 5-sigma binomial bound, see `assert_canary_share`).
pub fn assert_share(what: &str, report: &TcpReport, percent: f64) {
    assert_canary_share(what, report.hits("canary"), report.tags_total(), percent);
}

/// A counter of one side from a service state: `key` in `sides.SIDE` or `sides.SIDE.health`.
pub fn counter(state: &serde_json::Value, side: &str, key: &str) -> u64 {
    let side = &state["sides"][side];
    side[key].as_u64().or_else(|| side["health"][key].as_u64()).unwrap_or_else(|| panic!("no {key} in {side}"))
}

/// Bearer tokens of each role, as `[agent]` config tables.
pub const TOKENS: &str = r#"
[[agent.auth.tokens]]
name = "vera"
token = "viewer-token-0001"
role = "viewer"
[[agent.auth.tokens]]
name = "otto"
token = "operator-token-01"
role = "operator"
[[agent.auth.tokens]]
name = "rita"
token = "release-token-001"
role = "release"
"#;

/// The lab's IPv4 "web" service with extra `key = value` lines.
pub fn web_service(extra: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nfrontends = [\"{FRONTEND4}\"]\nstable = [\"127.0.0.1:8001\"]\ncanary = [\"127.0.0.1:8002\"]\n{extra}\n"
    )
}
