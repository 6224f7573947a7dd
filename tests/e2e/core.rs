//! The control core against what breaks in production: a core stuck in I/O or dead, a background
//! task that dies, a corrupt or truncated `state.json`, persisted state that conflicts with the
//! config file, a disk that cannot take the change. Real agent, real kernel, real filesystems
//! (a frozen ext4 image on a loop device, a full tmpfs).
//!
//! The dead core and the dead task use the agent's test-only fault injection
//! (`SOCKSHIFT_FAULT_INJECTION`, see `agent::control::Faults`): nothing else makes a correct
//! core panic. The stuck core is real: `fsfreeze` makes its fsync wait.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{assert_share, web_service, Lab, FRONTEND4};
use e2e::{require_root, run, serve, tcp_connects, unique_name, Agent, Cgroup, NetNs, Placement, Spawned};
use serde_json::{json, Value};

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lab whose agent is configured but not started, so a test can prepare its state directory
/// (and environment) first.
struct Pending {
    agent: Agent,
    servers: Spawned,
    cgroup: Cgroup,
    netns: NetNs,
}

impl Pending {
    fn new(services: &str) -> Self {
        require_root();
        let netns = NetNs::new();
        let cgroup = Cgroup::new();
        let servers = serve(
            Placement { netns: Some(&netns), cgroup: None },
            &["serve-tcp", "--listen", "127.0.0.1:8001=stable", "--listen", "127.0.0.1:8002=canary"],
        );
        let agent = Agent::configure(&cgroup, "", services);
        std::fs::create_dir_all(&agent.state_dir).unwrap();
        Self { agent, servers, cgroup, netns }
    }

    fn start(self) -> Lab {
        let Pending { mut agent, servers, cgroup, netns } = self;
        agent.spawn();
        Lab { agent, servers, cgroup, netns }
    }

    /// Like `start`, for an agent whose /healthz may fail from its first answer on.
    fn start_failing(self) -> Lab {
        let Pending { mut agent, servers, cgroup, netns } = self;
        agent.spawn_answering();
        Lab { agent, servers, cgroup, netns }
    }
}

/// A filesystem mounted at a directory for one test: lazily unmounted on drop (the agent may
/// still hold files in it), after thawing it if it was frozen.
struct Mount {
    dir: PathBuf,
    image: Option<PathBuf>,
}

impl Mount {
    /// A tmpfs of `size` (e.g. "1m").
    fn tmpfs(dir: &Path, size: &str) -> Self {
        run("mount", &["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs", dir.to_str().unwrap()]);
        Self { dir: dir.to_owned(), image: None }
    }

    /// A fresh ext4 image on a loop device (ext4 can be frozen; tmpfs cannot).
    fn ext4(dir: &Path) -> Self {
        let image = std::env::temp_dir().join(format!("{}.img", unique_name("ext4")));
        run("truncate", &["-s", "32M", image.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), dir.to_str().unwrap()]);
        Self { dir: dir.to_owned(), image: Some(image) }
    }

    fn freeze(&self) {
        run("fsfreeze", &["--freeze", self.dir.to_str().unwrap()]);
    }

    fn thaw(&self) {
        let _ = Command::new("fsfreeze").args(["--unfreeze"]).arg(&self.dir).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

fn health(agent: &Agent) -> (u16, Value) {
    agent.call("GET", "/healthz", None)
}

/// The core stuck in an fsync that never returns (its filesystem frozen): `/healthz` fails within
/// its bound instead of hanging or answering `ok`, while the datapath keeps steering; thawed, the
/// held change completes and `/healthz` is green again.
#[test]
fn a_stuck_core_fails_healthz_and_recovers() {
    let pending = Pending::new(&web_service("canary_percent = 20"));
    let mount = Mount::ext4(&pending.agent.state_dir);
    let lab = pending.start();
    assert_eq!(health(&lab.agent).0, 200);

    mount.freeze();
    let api = lab.agent.api;
    let held = std::thread::spawn(move || {
        agent::client::request(api, None, "PUT", "/v1/services/web/canary", Some(&json!({ "percent": 60 })))
            .map(|r| (r.status, r.body))
    });
    std::thread::sleep(Duration::from_millis(300)); // the change is now inside the frozen fsync
    let asked = Instant::now();
    let (status, body) = health(&lab.agent);
    assert!(asked.elapsed() < Duration::from_secs(2), "/healthz took {:?}", asked.elapsed());
    assert_eq!((status, body["core"].as_str()), (503, Some("stuck")), "{body}");
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_share("while the core is stuck", &report, 20.0);

    mount.thaw();
    let (status, body) = held.join().unwrap().expect("the held request completes");
    assert_eq!(status, 200, "{body}");
    wait_for("healthz green again", Duration::from_secs(3), || health(&lab.agent).0 == 200);
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(60.0));
}

/// The core dies (test-only fault injection): `/healthz` says so, every API call answers 503
/// `core_unavailable`, and the pinned datapath keeps steering with the last state.
#[test]
fn a_dead_core_fails_healthz() {
    let mut pending = Pending::new(&web_service("canary_percent = 20"));
    pending.agent.env.push(("SOCKSHIFT_FAULT_INJECTION".into(), "core-panic-on=doomed".into()));
    let lab = pending.start();
    assert_eq!(health(&lab.agent).0, 200);
    let (status, body) = lab.agent.call("GET", "/v1/services/doomed", None);
    assert_eq!((status, body["code"].as_str()), (503, Some("core_unavailable")), "{body}");
    let (status, body) = health(&lab.agent);
    assert_eq!(
        (status, body["status"].as_str(), body["core"].as_str()),
        (503, Some("failing"), Some("dead")),
        "{body}"
    );
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollback", None);
    assert_eq!((status, body["code"].as_str()), (503, Some("core_unavailable")), "{body}");
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_share("with the core dead", &report, 20.0);
    assert!(lab.agent.log().contains("fault injection"), "{}", lab.agent.log());
}

/// A background task that dies (test-only fault injection) makes `/healthz` fail, naming it.
#[test]
fn a_dead_background_task_fails_healthz() {
    let mut pending = Pending::new(&web_service(""));
    pending.agent.env.push(("SOCKSHIFT_FAULT_INJECTION".into(), "task-panic=config-watcher".into()));
    // The task dies at its first round, which may come before the first answer of /healthz.
    let lab = pending.start_failing();
    wait_for("the dead task reported", Duration::from_secs(5), || health(&lab.agent).0 == 503);
    let (_, body) = health(&lab.agent);
    assert_eq!(body["core"], json!("ok"), "{body}");
    assert_eq!(body["failed_tasks"]["config-watcher"], json!("panicked"), "{body}");
}

fn moved_aside(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("state.json.corrupt-"))
        .collect()
}

/// A truncated `state.json` is moved aside, logged, and the agent starts from its config file
/// with the kill switch working; the previous good state stays in `state.json.prev`. A state
/// whose rollout is nonsense (a step past its plan) is read without a panic: the rollout is
/// dropped and the rest kept.
#[test]
fn a_corrupt_state_is_moved_aside_and_the_kill_switch_works() {
    let mut lab = Lab::new(20.0);
    lab.agent.set_percent("web", 50.0);
    lab.agent.set_percent("web", 40.0);
    lab.agent.stop_with(libc::SIGTERM);
    let state = lab.agent.state_dir.join("state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();

    lab.agent.spawn();
    let log = lab.agent.log();
    assert!(log.contains("moved it to") && log.contains("state.json.corrupt-"), "{log}");
    assert_eq!(moved_aside(&lab.agent.state_dir).len(), 1);
    let backup: Value = serde_json::from_slice(&std::fs::read(lab.agent.state_dir.join("state.json.prev")).unwrap())
        .expect("the backup is whole");
    assert_eq!(backup["services"]["web"]["value"]["canary_percent"], json!(50.0), "the state before the last change");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(20.0), "started from the config file");
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollback", None);
    assert_eq!(status, 200, "the kill switch works: {body}");
    assert_eq!(tcp_connects(lab.inside(), FRONTEND4, 300).tag("stable"), 300);

    // Valid JSON, impossible content: a rollout at step 7 of a 2-step plan.
    let plan = json!({ "steps": [10, 50], "step_seconds": 60 });
    let (status, body) = lab.agent.call("POST", "/v1/services/web/rollout", Some(&plan));
    assert_eq!(status, 201, "{body}");
    lab.agent.stop_with(libc::SIGTERM);
    let mut state_json: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    state_json["rollouts"]["web"]["value"]["step"] = json!(7);
    std::fs::write(&state, serde_json::to_vec(&state_json).unwrap()).unwrap();
    lab.agent.spawn();
    assert!(lab.agent.log().contains("rollout of \"web\" dropped at start"), "{}", lab.agent.log());
    assert_eq!(health(&lab.agent).0, 200);
    assert_eq!(lab.agent.call("GET", "/v1/services/web/rollout", None).0, 404);
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(10.0), "the rest of the state is kept");
}

/// The config file gives a frontend that an API-made service held: only that service is dropped
/// at start; every other API change (a weight, another added service) is kept.
#[test]
fn a_conflict_with_the_config_file_drops_only_the_conflicting_service() {
    let mut lab = Lab::new(20.0);
    lab.agent.set_percent("web", 40.0);
    for (name, frontend) in [("taken", "127.1.0.77:80"), ("other", "127.1.0.78:80")] {
        let body = json!({ "frontends": [frontend], "stable": ["127.0.0.1:8001"], "canary": ["127.0.0.1:8002"], "canary_percent": 100 });
        let (status, reply) = lab.agent.call("PUT", &format!("/v1/services/{name}"), Some(&body));
        assert_eq!(status, 201, "{reply}");
    }
    lab.agent.stop_with(libc::SIGTERM);
    let mut config = std::fs::read_to_string(&lab.agent.config_path).unwrap();
    config.push_str(
        "\n[[service]]\nname = \"newcomer\"\nfrontends = [\"127.1.0.77:80\"]\nstable = [\"127.0.0.1:8001\"]\n",
    );
    std::fs::write(&lab.agent.config_path, config).unwrap();
    lab.agent.spawn();

    let log = lab.agent.log();
    assert!(log.contains("stored service \"taken\" dropped at start"), "{log}");
    let (_, list) = lab.agent.call("GET", "/v1/services", None);
    let names: Vec<&str> = list["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["newcomer", "other", "web"], "{list}");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(40.0), "the API weight is kept");
    assert_eq!(tcp_connects(lab.inside(), "127.1.0.77:80", 100).tag("stable"), 100, "the file's service steers");
    assert_eq!(tcp_connects(lab.inside(), "127.1.0.78:80", 100).tag("canary"), 100, "the other API service steers");
}

/// The state directory is full: a change is answered 500 `state_not_saved`, nothing changes (not
/// the weight the API shows, not the split clients see, not the audit log); with space again the
/// same change goes through.
#[test]
fn a_change_that_cannot_be_persisted_changes_nothing() {
    let pending = Pending::new(&web_service("canary_percent = 20"));
    let _mount = Mount::tmpfs(&pending.agent.state_dir, "512k");
    let lab = pending.start();
    let filler = lab.agent.state_dir.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0u8; 4096]).and_then(|()| file.sync_data()).is_ok() {}
    }
    let (status, body) = lab.agent.call("PUT", "/v1/services/web/canary", Some(&json!({ "percent": 60 })));
    assert_eq!((status, body["code"].as_str()), (500, Some("state_not_saved")), "{body}");
    assert_eq!(lab.agent.service("web")["canary_percent"], json!(20.0));
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_share("after the refused change", &report, 20.0);
    let (_, audit) = lab.agent.call("GET", "/v1/audit", None);
    assert_eq!(audit["entries"], json!([]), "a change that did not happen is not audited");

    std::fs::remove_file(&filler).unwrap();
    lab.agent.set_percent("web", 60.0);
    let report = tcp_connects(lab.inside(), FRONTEND4, 1000);
    assert_share("after the accepted change", &report, 60.0);
    let (_, audit) = lab.agent.call("GET", "/v1/audit", None);
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{audit}");
}
