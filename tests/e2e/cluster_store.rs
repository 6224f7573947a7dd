//! The cluster store (agent/src/cluster) against a real 3-member etcd cluster (Debian's etcd
//! 3.4, started by tests/src/etcd.rs on loopback ports): compare-and-swap without lost updates,
//! a watch that survives member kills, a full outage and compaction, bad values skipped by key,
//! node leases, the leader election with fencing, and TLS with client certificates.
//!
//! The tests run one at a time (each starts and kills its own etcd members; the fan-out
//! latency it prints must not share two cores with another test's cluster).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use agent::{
    cluster::{
        ClusterConfig, ClusterError, ClusterStore, Election, Expect, Key, LeaseEvent, NodeHealth, NodeSession,
        NodeStatus, Snapshot, StateWatch, Timeouts, Value, WatchEvent, WriteBatch,
    },
    config::ServiceConfig,
    rollout::{Plan, Rollout},
};
use e2e::{
    built_binary,
    etcd::{EtcdCluster, TcpProxy},
    free_port, spawn_in, unique_name, Placement, Spawned,
};

/// One test at a time; a tokio mutex, since the guard is held across awaits (and a failed test
/// must not poison it for the others).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn service(name: &str, percent: f64) -> ServiceConfig {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "frontends": ["127.1.0.1:80"],
        "stable": ["127.0.0.1:8001"],
        "canary": ["127.0.0.1:8002"],
        "canary_percent": percent,
    }))
    .unwrap()
}

fn prefix() -> String {
    format!("/{}", unique_name("test"))
}

async fn connect(config: &ClusterConfig) -> ClusterStore {
    let settings = config.validate().expect("valid [cluster]");
    ClusterStore::connect(&settings).await.unwrap_or_else(|e| panic!("connect: {e}"))
}

/// The next event within `timeout`, or a panic saying what was awaited.
async fn next_event(watch: &mut StateWatch, timeout: Duration, waiting_for: &str) -> WatchEvent {
    match tokio::time::timeout(timeout, watch.next()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("watch ended while waiting for {waiting_for}"),
        Err(_) => panic!("no watch event within {timeout:?} while waiting for {waiting_for}"),
    }
}

/// The next change, skipping connection events; a bad value panics.
async fn next_change(watch: &mut StateWatch, timeout: Duration, waiting_for: &str) -> agent::cluster::Change {
    let deadline = Instant::now() + timeout;
    loop {
        match next_event(watch, deadline.saturating_duration_since(Instant::now()), waiting_for).await {
            WatchEvent::Change(change) => return change,
            WatchEvent::Disconnected { .. } | WatchEvent::Resumed { .. } => {}
            other => panic!("unexpected {other:?} while waiting for {waiting_for}"),
        }
    }
}

fn percent_of(change: &agent::cluster::Change) -> f64 {
    match &change.value {
        Some(versioned) => match &versioned.value {
            Value::Service(service) => service.canary_percent,
            other => panic!("not a service: {other:?}"),
        },
        None => panic!("{} was deleted", change.key),
    }
}

fn rollout(percent: f64) -> Rollout {
    let plan: Plan = serde_json::from_str(r#"{"steps":[10,50,100],"step_seconds":60}"#).unwrap();
    let (mut rollout, _) = Rollout::start(plan, agent::cluster::unix_ms(), Default::default(), "test");
    rollout.percent = percent;
    rollout
}

fn node_status(node: &str, applied_revision: i64) -> NodeStatus {
    NodeStatus {
        node: node.into(),
        agent_version: "test".into(),
        applied_revision,
        at_unix_ms: agent::cluster::unix_ms(),
        healthy: true,
        detail: String::new(),
    }
}

fn spawn_node(cluster: &EtcdCluster, prefix: &str, node: &str, ttl: u64, role: &str) -> Spawned {
    let endpoints = cluster.endpoints().join(",");
    let ttl = ttl.to_string();
    spawn_in(
        Placement::default(),
        &built_binary("sockshift-cluster-node"),
        &["--endpoints", &endpoints, "--prefix", prefix, "--node", node, "--ttl", &ttl, role],
    )
}

/// Reads lines of a spawned node on a thread, so that a test can wait with a deadline.
fn lines_of(node: &mut Spawned) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = node.stdout.take().expect("stdout piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

fn wait_line(lines: &std::sync::mpsc::Receiver<String>, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return line,
            Ok(_) => {}
            Err(err) => panic!("no line {prefix:?} within {timeout:?}: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_etcd_is_named_at_connect() {
    let _serial = SERIAL.lock().await;
    let config = ClusterConfig::new([format!("http://127.0.0.1:{}", free_port())]);
    let settings = config.validate().unwrap();
    let timeouts = Timeouts { connect: Duration::from_secs(1), ..Timeouts::default() };
    let started = Instant::now();
    let err = ClusterStore::connect_with(&settings, timeouts).await.err().expect("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(5), "connect gave up after {:?}", started.elapsed());
    let message = err.to_string();
    assert!(matches!(err, ClusterError::Unreachable { .. }), "{message}");
    assert!(message.contains("nothing listens at the endpoints") && message.contains("127.0.0.1"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_all_is_typed_and_bad_values_are_reported_by_key() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    let prefix = prefix();
    let store = connect(&cluster.cluster_config("n1", &prefix)).await;
    store.put_service(&service("web", 10.0), Expect::Absent).await.unwrap();
    store.put_rollout("web", &rollout(10.0), Expect::Absent).await.unwrap();
    let mut watch = store.watch(store.load_all().await.unwrap().revision);

    // Garbage written by hand, as an operator with etcdctl would.
    let good = String::from_utf8(Value::Service(service("heavy", 10.0)).encode()).unwrap();
    let heavy = good.replace("\"canary_percent\":10.0", "\"canary_percent\":150.0");
    cluster.etcdctl_ok(&["put", &format!("{prefix}/v1/services/broken"), "{\"schema\":1,\"service\":{"]);
    cluster.etcdctl_ok(&["put", &format!("{prefix}/v1/services/heavy"), &heavy]);
    cluster.etcdctl_ok(&["put", &format!("{prefix}/v1/widgets/x"), "{}"]);
    // A bad write over a good service: the service keeps its last valid state.
    let web_heavy = String::from_utf8(Value::Service(service("web", 10.0)).encode())
        .unwrap()
        .replace("\"canary_percent\":10.0", "\"canary_percent\":-5");
    cluster.etcdctl_ok(&["put", &format!("{prefix}/v1/services/web"), &web_heavy]);

    let mut invalid = BTreeMap::new();
    while invalid.len() < 4 {
        match next_event(&mut watch, Duration::from_secs(5), "four bad values").await {
            WatchEvent::Invalid(bad) => {
                invalid.insert(bad.key.clone(), bad.error.clone());
            }
            other => panic!("expected bad values, got {other:?}"),
        }
    }
    assert!(invalid[&format!("{prefix}/v1/services/broken")].contains("not a JSON object"), "{invalid:?}");
    assert!(invalid[&format!("{prefix}/v1/services/heavy")].contains("service.canary_percent"), "{invalid:?}");
    assert!(invalid[&format!("{prefix}/v1/services/web")].contains("service.canary_percent"), "{invalid:?}");
    assert!(invalid[&format!("{prefix}/v1/widgets/x")].contains("unknown kind"), "{invalid:?}");

    // The watch goes on: a valid change after the garbage arrives.
    store.put_service(&service("api", 5.0), Expect::Absent).await.unwrap();
    let change = next_change(&mut watch, Duration::from_secs(5), "api").await;
    assert_eq!(change.key, Key::Service("api".into()));

    let snapshot = store.load_all().await.unwrap();
    assert_eq!(snapshot.services.keys().collect::<Vec<_>>(), ["api"], "only valid services are typed");
    assert_eq!(snapshot.rollouts["web"].value.percent, 10.0);
    let bad_keys: Vec<&str> = snapshot.invalid.iter().map(|i| i.key.as_str()).collect();
    for name in ["broken", "heavy", "web"] {
        assert!(bad_keys.contains(&format!("{prefix}/v1/services/{name}").as_str()), "{bad_keys:?}");
    }
    assert!(snapshot.is_invalid(&Key::Service("web".into())));
    // Seen by the watch (4) and by this relist (the 3 under services/; the relist reads only the
    // layout's directories): every sighting is counted.
    assert_eq!(store.counters().invalid_values, 7);
    // A relist after the bad write leaves "web" as the caller had it: no delete in the diff.
    let mut before = Snapshot::default();
    before.services.insert(
        "web".into(),
        agent::cluster::Versioned { value: service("web", 10.0), mod_revision: 1, create_revision: 1, lease: 0 },
    );
    let diff = before.diff(&snapshot);
    assert!(diff.iter().all(|c| c.key != Key::Service("web".into())), "{diff:?}");
}

/// Two writers race read-modify-write increments on one service (100 accepted each): the final
/// count is 200 (no lost update), a watcher sees every accepted write once, in commit order,
/// with the value that writer wrote, and the audit log holds every change with its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_swap_loses_no_update() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    let prefix = prefix();
    let watcher = connect(&cluster.cluster_config("watcher", &prefix)).await;
    let first = connect(&cluster.cluster_config("writer-a", &prefix)).await;
    first.put_service(&service("web", 0.0), Expect::Absent).await.unwrap();
    let mut watch = watcher.watch(watcher.load_all().await.unwrap().revision);

    let mut writers = Vec::new();
    for node in ["writer-a", "writer-b"] {
        let store = connect(&cluster.cluster_config(node, &prefix)).await;
        writers.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut conflicts = 0;
            let mut current = store.get(&Key::Service("web".into())).await.unwrap().expect("web exists");
            while accepted.len() < 100 {
                let Ok(Value::Service(mut web)) = current.value.clone() else { panic!("web is not a service") };
                let count = (web.canary_percent * 100.0).round() as u64 + 1;
                web.canary_percent = count as f64 / 100.0;
                let mut batch = WriteBatch::new();
                batch.put_service(&web, Expect::ModRevision(current.mod_revision));
                batch.audit(serde_json::json!({ "count": count }));
                match store.commit(&batch).await {
                    Ok(revision) => {
                        accepted.push((revision, count));
                        current.value = Ok(Value::Service(web));
                        current.mod_revision = revision;
                    }
                    Err(ClusterError::Conflict(mut conflicts_now)) => {
                        conflicts += 1;
                        current = conflicts_now.remove(0).current.expect("web still exists");
                    }
                    Err(err) => panic!("write failed: {err}"),
                }
            }
            (accepted, conflicts)
        }));
    }
    let mut accepted = BTreeMap::new();
    let mut total_conflicts = 0;
    for writer in writers {
        let (writes, conflicts) = writer.await.unwrap();
        total_conflicts += conflicts;
        accepted.extend(writes);
    }
    assert_eq!(accepted.len(), 200);
    let counts: Vec<u64> = accepted.values().copied().collect();
    assert_eq!(counts, (1..=200).collect::<Vec<_>>(), "in commit order, every increment built on the last");
    println!("two writers: 200 accepted writes, {total_conflicts} conflicts answered with the current value");

    let mut seen = Vec::new();
    while seen.len() < 200 {
        let change = next_change(&mut watch, Duration::from_secs(10), "every accepted write").await;
        if change.key == Key::Service("web".into()) {
            seen.push((change.revision, (percent_of(&change) * 100.0).round() as u64));
        }
    }
    assert_eq!(seen, accepted.iter().map(|(r, c)| (*r, *c)).collect::<Vec<_>>());
    let last = watcher.load_all().await.unwrap();
    assert_eq!(last.services["web"].value.canary_percent, 2.0);
    assert_eq!(last.services["web"].mod_revision, *accepted.keys().last().unwrap());

    let audit = watcher.audit(1000).await.unwrap();
    assert!(audit.invalid.is_empty());
    let logged: Vec<(i64, u64)> =
        audit.entries.iter().map(|e| (e.create_revision, e.value.entry["count"].as_u64().unwrap())).collect();
    assert_eq!(logged, seen, "one audit entry per accepted write, committed with it");
    let by_node = |node: &str| audit.entries.iter().filter(|e| e.value.node == node).count();
    assert_eq!((by_node("writer-a"), by_node("writer-b")), (100, 100));
}

/// The watch resumes, without missing a change, after the member it was connected to is
/// killed (each member is killed in turn, so one of them is it), and after every member is
/// stopped and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watch_survives_member_kills_and_a_full_outage() {
    let _serial = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start();
    let prefix = prefix();
    let watcher = connect(&cluster.cluster_config("watcher", &prefix)).await;
    let writer = connect(&cluster.cluster_config("writer", &prefix)).await;
    let mut watch = watcher.watch(watcher.load_all().await.unwrap().revision);
    let mut percent = 0.0;
    let mut revision = 0;
    for member in 0..3 {
        cluster.kill_member(member);
        // Compare-and-swap writes go on with one member down: retried on another endpoint, and
        // one whose outcome the leader's death left unknown is retried without applying twice
        // (a conflict here would be a retry that did not recognise its own write).
        for _ in 0..5 {
            percent += 1.0;
            let expect = if revision == 0 { Expect::Absent } else { Expect::ModRevision(revision) };
            revision = writer.put_service(&service("web", percent), expect).await.unwrap_or_else(|e| {
                panic!("write with member {member} down: {e}\n{}", cluster.logs());
            });
        }
        let mut got = Vec::new();
        while got.len() < 5 {
            got.push(percent_of(&next_change(&mut watch, Duration::from_secs(10), "writes after a kill").await));
        }
        assert_eq!(got, ((percent as u64 - 4)..=percent as u64).map(|p| p as f64).collect::<Vec<_>>());
        cluster.start_member(member);
        cluster.wait_healthy(&[0, 1, 2], Duration::from_secs(30));
    }

    // One of the three was the member the watch's connection went to.
    assert!(watcher.counters().watch_restarts >= 1, "the watch never had to resume");

    cluster.stop_all();
    match next_event(&mut watch, Duration::from_secs(10), "the outage").await {
        WatchEvent::Disconnected { error } => println!("watch lost as expected: {error}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let started = Instant::now();
    let err = writer.put_service(&service("web", 50.0), Expect::Any).await.expect_err("etcd is down");
    assert!(err.is_unavailable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(7), "a write during an outage took {:?}", started.elapsed());
    let before_restart = watch.last_revision();

    cluster.restart_all();
    let revision = writer.put_service(&service("web", 60.0), Expect::Any).await.unwrap();
    match next_event(&mut watch, Duration::from_secs(15), "the resumption").await {
        WatchEvent::Resumed { after_revision } => assert_eq!(after_revision, before_restart),
        other => panic!("expected Resumed, got {other:?}"),
    }
    let change = next_change(&mut watch, Duration::from_secs(10), "the write after the restart").await;
    assert_eq!((change.revision, percent_of(&change)), (revision, 60.0));
    assert!(watcher.counters().watch_restarts >= 2);
}

/// etcd compacts past a watcher's revision while the watcher is cut off: on reconnect it gets a
/// Resync whose difference with what it had is exactly what changed (nothing removed and
/// re-added); a watch started from a compacted revision (an agent restarted after the
/// compaction) gets the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_past_the_watch_resyncs_with_the_difference() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    let prefix = prefix();
    let writer = connect(&cluster.cluster_config("writer", &prefix)).await;
    for (name, percent) in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)] {
        writer.put_service(&service(name, percent), Expect::Absent).await.unwrap();
    }
    // The watcher reaches etcd through a proxy the test cuts: a partition of that client while
    // etcd goes on writing and compacting.
    let proxy = TcpProxy::start(cluster.client_port(0));
    let mut config = cluster.cluster_config("watcher", &prefix);
    config.etcd = vec![proxy.endpoint("http")];
    let watcher = connect(&config).await;
    let before = watcher.load_all().await.unwrap();
    let mut watch = watcher.watch(before.revision);

    proxy.cut();
    match next_event(&mut watch, Duration::from_secs(10), "the partition").await {
        WatchEvent::Disconnected { .. } => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    writer.put_service(&service("b", 20.0), Expect::Any).await.unwrap();
    writer.delete_service("c", Expect::Any).await.unwrap();
    writer.put_service(&service("e", 5.0), Expect::Absent).await.unwrap();
    writer.put_service(&service("b", 25.0), Expect::Any).await.unwrap();
    let compacted_to = cluster.compact();
    proxy.restore();

    let check = |snapshot: &Snapshot| {
        assert!(snapshot.revision >= compacted_to);
        let diff = before.diff(snapshot);
        let summary: Vec<(String, Option<f64>)> = diff
            .iter()
            .map(|c| {
                let percent = c.value.as_ref().map(|v| match &v.value {
                    Value::Service(s) => s.canary_percent,
                    other => panic!("{other:?}"),
                });
                (c.key.name().to_string(), percent)
            })
            .collect();
        let mut sorted = summary.clone();
        sorted.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            sorted,
            [("b".to_string(), Some(25.0)), ("c".to_string(), None), ("e".to_string(), Some(5.0))],
            "only b, c and e changed (a and d are untouched)"
        );
    };
    loop {
        match next_event(&mut watch, Duration::from_secs(20), "the resync").await {
            WatchEvent::Resync(snapshot) => {
                check(&snapshot);
                break;
            }
            WatchEvent::Disconnected { .. } => {}
            other => panic!("expected a Resync, got {other:?}"),
        }
    }
    assert_eq!(watcher.counters().resyncs, 1);
    // Changes flow on after the resync.
    writer.put_service(&service("f", 6.0), Expect::Absent).await.unwrap();
    let change = next_change(&mut watch, Duration::from_secs(10), "a change after the resync").await;
    assert_eq!(change.key, Key::Service("f".into()));

    // A watch started from before the compaction resyncs at once.
    let mut late = watcher.watch(before.revision);
    match next_event(&mut late, Duration::from_secs(10), "the resync of a late watch").await {
        WatchEvent::Resync(snapshot) => assert!(snapshot.services.contains_key("f")),
        other => panic!("expected a Resync, got {other:?}"),
    }
}

/// A node's key lives under its lease: SIGKILL the node and the key is gone within the TTL; a
/// lease revoked under a live node is reported lost, then reacquired with the keys back on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_keys_live_and_die_with_the_lease() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    let prefix = prefix();
    let ttl = 2;
    let store = connect(&cluster.cluster_config("observer", &prefix)).await;

    let mut node = spawn_node(&cluster, &prefix, "worker-1", ttl, "register");
    let lines = lines_of(&mut node);
    wait_line(&lines, "registered", Duration::from_secs(10));
    let snapshot = store.load_all().await.unwrap();
    assert!(snapshot.nodes.contains_key("worker-1"), "{:?}", snapshot.nodes.keys());
    let mut watch = store.watch(snapshot.revision);
    unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let change = next_change(&mut watch, Duration::from_secs(ttl + 5), "the node key's expiry").await;
    let gone_after = killed.elapsed();
    assert_eq!((change.key, change.value), (Key::Node("worker-1".into()), None));
    println!("node key gone {gone_after:?} after SIGKILL (TTL {ttl} s)");
    // etcd's lessor checks expiry every 500 ms.
    assert!(gone_after <= Duration::from_millis(ttl * 1000 + 1000), "gone after {gone_after:?}");

    // In-process: status updates, a revoked lease reported and replaced.
    let local = connect(&cluster.cluster_config("worker-2", &prefix)).await;
    let mut session =
        NodeSession::start_with_ttl(&local, node_status("worker-2", 1), Duration::from_secs(ttl)).await.unwrap();
    let first_lease = session.lease().unwrap();
    session.publish_status(node_status("worker-2", 7));
    loop {
        let change = next_change(&mut watch, Duration::from_secs(5), "worker-2's new status").await;
        assert_eq!(change.key, Key::Node("worker-2".into()));
        match change.value.map(|v| v.value) {
            Some(Value::Node(status)) if status.applied_revision == 1 => {} // the first status
            Some(Value::Node(status)) => break assert_eq!(status.applied_revision, 7),
            other => panic!("{other:?}"),
        }
    }
    // Health counters go under the same lease.
    let mut counters = agent::rollout::Snapshot::default();
    counters.canary.connections = 42;
    session.publish_health(NodeHealth {
        node: "worker-2".into(),
        at_unix_ms: agent::cluster::unix_ms(),
        services: [("web".to_string(), counters)].into(),
    });
    let change = next_change(&mut watch, Duration::from_secs(5), "worker-2's health").await;
    assert_eq!(change.key, Key::Health("worker-2".into()));
    assert_eq!(change.value.as_ref().map(|v| v.lease), Some(first_lease));
    match change.value.map(|v| v.value) {
        Some(Value::Health(health)) => assert_eq!(health.services["web"].canary.connections, 42),
        other => panic!("{other:?}"),
    }

    cluster.etcdctl_ok(&["lease", "revoke", &format!("{first_lease:x}")]);
    let revoked = Instant::now();
    match tokio::time::timeout(Duration::from_secs(ttl + 3), session.next_event()).await {
        Ok(Some(LeaseEvent::Lost { lease, error })) => {
            assert_eq!(lease, first_lease);
            println!("lease loss reported {:?} after the revoke: {error}", revoked.elapsed());
        }
        other => panic!("expected the lease loss, got {other:?}"),
    }
    let second_lease = match tokio::time::timeout(Duration::from_secs(5), session.next_event()).await {
        Ok(Some(LeaseEvent::Acquired { lease })) => lease,
        other => panic!("expected a new lease, got {other:?}"),
    };
    assert_ne!(second_lease, first_lease);
    let back = store.get(&Key::Node("worker-2".into())).await.unwrap().expect("worker-2's key is back");
    assert_eq!(back.lease, second_lease);
    assert!(matches!(back.value, Ok(Value::Node(ref s)) if s.applied_revision == 7));
    let health = store.get(&Key::Health("worker-2".into())).await.unwrap().expect("worker-2's health is back");
    assert_eq!(health.lease, second_lease);
    assert_eq!(local.counters().lease_losses, 1);

    session.close().await;
    assert!(store.get(&Key::Node("worker-2".into())).await.unwrap().is_none(), "close revokes at once");
    assert!(store.get(&Key::Health("worker-2".into())).await.unwrap().is_none());
}

/// The leader (a separate process) is SIGKILLed: the other candidate takes over within the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_within_the_ttl() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    let prefix = prefix();
    let ttl = 3;
    let store = connect(&cluster.cluster_config("observer", &prefix)).await;
    let election = Election::new(&store);
    assert_eq!(election.leader().await.unwrap(), None);

    let mut first = spawn_node(&cluster, &prefix, "node-a", ttl, "campaign");
    let first_lines = lines_of(&mut first);
    wait_line(&first_lines, "leader node-a", Duration::from_secs(10));
    let mut second = spawn_node(&cluster, &prefix, "node-b", ttl, "campaign");
    let second_lines = lines_of(&mut second);
    wait_line(&second_lines, "registered", Duration::from_secs(10));
    let leader = election.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.node, "node-a");
    // node-b's campaign puts its candidate key right after it registered.
    let deadline = Instant::now() + Duration::from_secs(5);
    let snapshot = loop {
        let snapshot = store.load_all().await.unwrap();
        if snapshot.candidates.len() == 2 || Instant::now() > deadline {
            break snapshot;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(snapshot.candidates.len(), 2, "both candidates are visible: {:?}", snapshot.candidates);
    assert_eq!(snapshot.leader().unwrap().value.node, "node-a");

    unsafe { libc::kill(first.child.id() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    wait_line(&second_lines, "leader node-b", Duration::from_secs(ttl + 5));
    let took = killed.elapsed();
    println!("node-b took over {took:?} after node-a was SIGKILLed (TTL {ttl} s)");
    assert!(took <= Duration::from_millis(ttl * 1000 + 1000), "took over after {took:?}");
    assert_eq!(election.leader().await.unwrap().unwrap().node, "node-b");
}

/// A leader whose lease is gone can never write, even with the leadership it once held; the new
/// leader can. Fenced batches write all or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_leader_cannot_write() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    let prefix = prefix();
    let ttl = Duration::from_secs(2);
    let a = connect(&cluster.cluster_config("node-a", &prefix)).await;
    let b = connect(&cluster.cluster_config("node-b", &prefix)).await;
    let session_a = NodeSession::start_with_ttl(&a, node_status("node-a", 0), ttl).await.unwrap();
    let session_b = NodeSession::start_with_ttl(&b, node_status("node-b", 0), ttl).await.unwrap();
    let election_a = Election::new(&a);
    let election_b = Election::new(&b);
    let leading_a = election_a.campaign(session_a.lease().unwrap()).await.unwrap();
    assert_eq!(leading_a.node, "node-a");
    let revision = a
        .commit(WriteBatch::new().put_rollout("web", &rollout(10.0), Expect::Absent).fenced_by(&leading_a))
        .await
        .expect("the leader writes");

    // node-b campaigns; node-a stalls (its keep-alive stops, as in a long GC pause or a
    // partition) and its lease expires.
    let campaign_b = tokio::spawn({
        let lease = session_b.lease().unwrap();
        let election_b = election_b.clone();
        async move { election_b.campaign(lease).await }
    });
    drop(session_a);
    let leading_b = tokio::time::timeout(ttl + Duration::from_secs(3), campaign_b)
        .await
        .expect("node-b elected within the TTL")
        .unwrap()
        .unwrap();
    assert_eq!(leading_b.node, "node-b");
    assert!(!election_a.holds(&leading_a).await.unwrap());
    tokio::time::timeout(Duration::from_secs(5), election_a.lost(&leading_a))
        .await
        .expect("node-a learns that its leadership is gone");

    let mut stale = WriteBatch::new();
    stale.put_rollout("web", &rollout(50.0), Expect::ModRevision(revision)).fenced_by(&leading_a);
    stale.put_service(&service("web", 50.0), Expect::Any);
    match a.commit(&stale).await {
        Err(err @ ClusterError::NotLeader { .. }) => println!("deposed leader refused: {err}"),
        other => panic!("a deposed leader's write must fail, got {other:?}"),
    }
    let now = b.get(&Key::Rollout("web".into())).await.unwrap().unwrap();
    assert_eq!(now.mod_revision, revision, "nothing of the fenced batch was written");
    assert!(b.get(&Key::Service("web".into())).await.unwrap().is_none());

    b.commit(WriteBatch::new().put_rollout("web", &rollout(50.0), Expect::ModRevision(revision)).fenced_by(&leading_b))
        .await
        .expect("the new leader writes");
    election_b.resign(&leading_b).await.unwrap();
    assert_eq!(election_b.leader().await.unwrap(), None);
}

/// etcd with `--client-cert-auth`: the right client certificate works; none, or one from
/// another CA, or a missing file, is refused with a message naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_requires_the_right_client_certificate() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start_tls();
    let tls = cluster.tls().unwrap().clone();
    let prefix = prefix();
    let good = cluster.cluster_config("node-a", &prefix);
    let store = connect(&good).await;
    store.put_service(&service("web", 10.0), Expect::Absent).await.unwrap();
    assert_eq!(store.load_all().await.unwrap().services["web"].value.canary_percent, 10.0);

    let timeouts = Timeouts { connect: Duration::from_secs(2), ..Timeouts::default() };
    let refused = |config: ClusterConfig| async move {
        let settings = config.validate().expect("valid [cluster]");
        match ClusterStore::connect_with(&settings, timeouts).await {
            Ok(_) => panic!("connect should be refused"),
            Err(err) => err.to_string(),
        }
    };
    let mut no_cert = good.clone();
    no_cert.cert_file = None;
    no_cert.key_file = None;
    let message = refused(no_cert).await;
    println!("without a client certificate: {message}");
    assert!(message.contains("etcd requires a client certificate: set cluster.cert_file"), "{message}");

    let mut rogue = good.clone();
    rogue.cert_file = Some(tls.rogue_client_cert.clone());
    rogue.key_file = Some(tls.rogue_client_key.clone());
    let message = refused(rogue).await;
    println!("with a certificate from another CA: {message}");
    assert!(message.contains("etcd refused the client certificate (cluster.cert_file)"), "{message}");

    let mut wrong_ca = good.clone();
    wrong_ca.ca_file = Some(tls.rogue_ca.clone());
    let message = refused(wrong_ca).await;
    println!("trusting another CA: {message}");
    assert!(message.contains("not signed by cluster.ca_file"), "{message}");

    let mut missing = good.clone();
    missing.key_file = Some(cluster.dir().join("nowhere.pem"));
    let message = refused(missing).await;
    assert!(message.contains("cluster.key_file") && message.contains("nowhere.pem"), "{message}");

    let mut plain = good.clone();
    plain.etcd = cluster.endpoints().iter().map(|e| e.replace("https://", "http://")).collect();
    plain.ca_file = None;
    plain.cert_file = None;
    plain.key_file = None;
    let message = refused(plain).await;
    println!("plain HTTP against TLS: {message}");
    assert!(message.contains("use https:// endpoints"), "{message}");
}

/// Time from a compare-and-swap write on one client to N watchers (separate connections)
/// receiving it: p50 and p99 over 200 changes for N = 3 and 10. Printed for BENCHMARKS.md, not
/// asserted (speed is the benchmark's business); asserted: every watcher saw every change, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_fan_out_latency() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start();
    for watchers in [3, 10] {
        let prefix = prefix();
        let writer = connect(&cluster.cluster_config("writer", &prefix)).await;
        let revision = writer.put_service(&service("web", 0.0), Expect::Absent).await.unwrap();
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<(usize, i64, Instant)>();
        let mut tasks = Vec::new();
        for i in 0..watchers {
            let store = connect(&cluster.cluster_config(&format!("watcher-{i}"), &prefix)).await;
            let sender = sender.clone();
            let mut watch = store.watch(revision);
            tasks.push(tokio::spawn(async move {
                let _store = store;
                while let Some(event) = watch.next().await {
                    if let WatchEvent::Change(change) = event {
                        if sender.send((i, change.revision, Instant::now())).is_err() {
                            return;
                        }
                    }
                }
            }));
        }
        let mut last_seen = vec![revision; watchers];
        let mut to_last = Vec::new();
        let mut current = revision;
        for change in 1..=200 {
            let started = Instant::now();
            current = writer
                .put_service(&service("web", f64::from(change) / 10.0), Expect::ModRevision(current))
                .await
                .unwrap();
            let mut pending = watchers;
            let mut slowest = Duration::ZERO;
            while pending > 0 {
                let (i, revision, at) = tokio::time::timeout(Duration::from_secs(10), received.recv())
                    .await
                    .expect("every watcher gets the change")
                    .unwrap();
                assert!(revision > last_seen[i], "watcher {i} saw {revision} after {}", last_seen[i]);
                last_seen[i] = revision;
                if revision == current {
                    pending -= 1;
                    slowest = slowest.max(at.duration_since(started));
                }
            }
            to_last.push(slowest);
        }
        to_last.sort();
        let p = |q: f64| to_last[((to_last.len() as f64 * q).ceil() as usize).clamp(1, to_last.len()) - 1];
        println!(
            "fan-out latency, CAS write to the last of {watchers} watchers, {} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            to_last.len(),
            p(0.50).as_secs_f64() * 1000.0,
            p(0.99).as_secs_f64() * 1000.0,
            to_last.last().unwrap().as_secs_f64() * 1000.0,
        );
        for task in tasks {
            task.abort();
        }
    }
}
