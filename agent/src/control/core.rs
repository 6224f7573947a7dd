//! The state the core owns and how each command changes it. Runs only on the core's thread.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
};

use agent_common::{ppm_to_percent, MAX_SERVICES};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::{
    now_ms,
    store::{
        AuditSource, Commit, Current, Expect, Key, NodeCounters, RemoteChange, Revision, Snapshot, Store, StoreError,
        Value, Versioned, Write,
    },
    Command, ControlError, Faults, FollowUp, GateInput, GateWork, KubernetesMetrics, Origin, Progress, RolloutAction,
    ServiceMetrics, Start, WeightChange,
};
use crate::{
    api::types::{DatapathStatus, RolloutView, ServiceBody, ServiceState, Sides},
    audit::AuditEntry,
    config::{validate_percent, validate_service, validate_services, InvalidField, Role, ServiceConfig, ServiceSpec},
    datapath::{Datapath, DatapathError},
    discovery::{Discovered, Discovery, DiscoveryStatus},
    rollout::{Effect, GateDue, Plan, Rollout, RolloutState, Snapshot as Counters},
    state::{merged_with_file, reconcile},
};

/// One change, committed and applied whole or not at all.
#[derive(Debug, Default)]
struct Change {
    /// New value of each changed service; `None` removes it.
    services: BTreeMap<String, Option<ServiceConfig>>,
    rollouts: BTreeMap<String, Option<Rollout>>,
    file_services: Option<BTreeMap<String, ServiceConfig>>,
    audit: Option<AuditEntry>,
    /// Sent once the change is in effect.
    follow_ups: Vec<FollowUp>,
    /// Services whose steered canary connections are terminated once the change (weight 0) is
    /// in effect.
    terminate_canary: Vec<String>,
    /// A rollout's clock: see [`Commit::leader_only`].
    leader_only: bool,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.rollouts.is_empty() && self.file_services.is_none()
    }
}

/// What a change does to one service in the datapath.
enum DatapathOp {
    /// Only the weight changed: one map update per frontend, no new revision.
    Weight(u32),
    Replace(Box<ServiceSpec>),
    Remove,
}

/// How many times a command is tried again after a conflict with a change made elsewhere
/// (cluster mode), each time on the current values the conflict brought back, at once: any pause
/// would only let the other writer's next change in first. Against a writer changing the key
/// flat out a try can lose again (its compare is judged when etcd commits it), so a 409 needs
/// 16 losses in a row.
const CONFLICT_RETRIES: u32 = 16;

pub(super) struct Core<S: Store> {
    datapath: Datapath,
    store: S,
    /// What the datapath holds, with the store revision each key was committed at (0: not in
    /// the store yet). `state.revision`: every change of the store up to it is applied (for a
    /// shared store, this node's own commits above it are applied too, at their keys'
    /// revisions, but changes made elsewhere in between may still be on their way).
    state: Snapshot,
    cgroup_root: Option<PathBuf>,
    follow_ups: mpsc::UnboundedSender<FollowUp>,
    faults: Faults,
    /// The last error of the rollout clock's commits, logged once until it changes.
    tick_error: Option<String>,
    /// Whether other nodes write the store too ([`Store::shared`]).
    shared: bool,
    /// Keys this node deleted (or learned were deleted) at a revision the store's change stream
    /// has not reached yet: an older change to them arriving later must not bring them back.
    tombstones: BTreeMap<Key, Revision>,
    /// Keys whose value in the store this node's datapath refused, with why: the node keeps
    /// their previous state and reports itself unhealthy until they apply.
    refused: BTreeMap<Key, String>,
    /// This node's last commit.
    committed: Revision,
    progress: watch::Sender<Progress>,
    /// Kubernetes services' discovered addresses: facts of this node, overlaid on their services
    /// on the way to the datapath, never in `state` nor in the store (see `discovery`).
    discovery: Discovery,
    /// Cluster mode: the counters last handed to the store for publication, and when.
    published: (u64, BTreeMap<String, Counters>),
    /// Cluster mode: services whose rollout another node rolled back with
    /// `terminate_connections`; their steered canary connections are terminated here once this
    /// node's datapath holds weight 0 for them (the service's change may come after the
    /// rollout's).
    terminate_pending: BTreeSet<String>,
}

/// Cluster mode: every live node's cumulative counters of one service that are known here, by
/// node, and the nodes in the cluster now.
type LiveCounters = (BTreeMap<String, Counters>, BTreeSet<String>);

/// How often a node publishes its counters of the services with an active rollout (cluster
/// mode): the leader's gates see other nodes' counts this much late at most.
const PUBLISH_COUNTERS_MS: u64 = 1000;

/// Runs a change, and after a conflict with a change made elsewhere adopts the current values
/// the store read back and runs it again (the command's intent, judged on the new state: a
/// weight set by another node in between is replaced, a rollout started in between refuses a
/// manual weight). Gives up with the conflict (409) after [`CONFLICT_RETRIES`].
macro_rules! retrying {
    ($core:ident, $change:expr) => {{
        let mut attempt = 0;
        loop {
            match $change {
                Err(ControlError::Store(StoreError::Conflict { current, .. }))
                    if attempt < CONFLICT_RETRIES && !current.is_empty() =>
                {
                    attempt += 1;
                    $core.adopt(current).await;
                }
                result => break result,
            }
        }
    }};
}

/// A rollout read back from the store is checked before it is ticked: the state machine trusts
/// its own invariants (a step index within the plan).
pub fn check_rollout(rollout: &Rollout) -> Result<(), String> {
    rollout.plan.validate().map_err(|err| err.to_string())?;
    if rollout.step >= rollout.plan.steps.len() {
        return Err(format!("step {} of a plan of {} steps", rollout.step, rollout.plan.steps.len()));
    }
    if !rollout.percent.is_finite() || !(0.0..=100.0).contains(&rollout.percent) {
        return Err(format!("weight {} %", rollout.percent));
    }
    // The baselines are kernel counters. No kernel counter gets near 2^53 (285 years at a
    // million connections a second); a larger one was not written by an agent, and the gates'
    // arithmetic on it would overflow.
    let mut baselines: Vec<(String, &Counters)> = vec![
        ("window".into(), &rollout.window_baseline),
        ("rollout".into(), &rollout.rollout_baseline),
        ("step".into(), &rollout.step_baseline),
    ];
    for (node, b) in &rollout.nodes {
        baselines.extend([
            (format!("node {node:?}'s window"), &b.window),
            (format!("node {node:?}'s rollout"), &b.rollout),
            (format!("node {node:?}'s step"), &b.step),
        ]);
    }
    for (name, snapshot) in baselines {
        for side in [&snapshot.stable, &snapshot.canary] {
            let counters = [
                side.connections,
                side.datagrams,
                side.established,
                side.failed_attempts,
                side.abandoned_attempts,
                side.resets,
                side.srtt_sum_us,
                side.srtt_samples,
                side.rto_connections,
            ];
            if counters.iter().any(|c| *c > MAX_PLAUSIBLE_COUNTER) {
                return Err(format!("the {name} baseline holds a counter above 2^53"));
            }
        }
    }
    Ok(())
}

/// Largest counter value a stored rollout may hold (see [`check_rollout`]).
const MAX_PLAUSIBLE_COUNTER: u64 = 1 << 53;

/// What notifications and webhook checks get: the event, where the rollout is, and every gate's
/// reading (the kernel's of the last judgement, the last judgement's one verdict with the metric
/// readings and check results, and the window in progress).
fn rollout_payload(service: &str, event: &str, rollout: &Rollout) -> serde_json::Value {
    json!({
        "event": event,
        "service": service,
        "state": rollout.state,
        "step": rollout.step,
        "steps": rollout.plan.steps,
        "percent": rollout.percent,
        "gates": rollout.last_gates,
        "judgement": rollout.last_judgement,
        "window": rollout.external,
        "detail": rollout.history.back().map(|h| h.detail.as_str()).unwrap_or_default(),
        "at_unix_ms": now_ms(),
    })
}

fn role_name(role: Role) -> String {
    role.to_string()
}

impl<S: Store> Core<S> {
    /// Restores the stored state, reconciles it with the config file's services and makes the
    /// datapath hold the result. A shared store's state is only followed: what does not fit
    /// this node is left out of its datapath (and reported), never written back.
    pub(super) async fn start(start: Start<S>, progress: watch::Sender<Progress>) -> Result<Self, ControlError> {
        let Start { datapath, mut store, file_services, cgroup_root, follow_ups, faults, mut discovery } = start;
        let file_specs = &file_services;
        let loaded = store.load().await?;
        for note in &loaded.recovered {
            log::error!("{note}");
        }
        let stored = loaded.snapshot;
        let shared = store.shared();
        let file: BTreeMap<String, ServiceConfig> =
            file_specs.iter().map(|s| (s.name.clone(), s.source.clone())).collect();
        let current: BTreeMap<String, ServiceConfig> =
            stored.services.iter().map(|(name, v)| (name.clone(), v.value.clone())).collect();
        let merged = if shared { current.clone() } else { merged_with_file(&current, &stored.file_services, &file) };
        let root = cgroup_root.clone();
        let (services, mut specs, dropped) = reconcile(&merged, &file, |s| validate_service(s, "", root.as_deref()));
        let mut refused = BTreeMap::new();
        for dropped in &dropped {
            if shared {
                log::error!(
                    "service {:?} from the cluster's state is not applied on this node: {}",
                    dropped.service,
                    dropped.reason
                );
                refused.insert(Key::Service(dropped.service.clone()), dropped.reason.clone());
            } else {
                log::error!(
                    "stored service {:?} dropped at start, the rest of the stored state is kept: {}",
                    dropped.service,
                    dropped.reason
                );
            }
        }
        let mut change = Change::default();
        for name in stored.services.keys().chain(services.keys()) {
            let wanted = services.get(name);
            if stored.services.get(name).map(|v| &v.value) != wanted {
                change.services.insert(name.clone(), wanted.cloned());
            }
        }
        for (name, rollout) in &stored.rollouts {
            let problem = if !services.contains_key(name) {
                "the service is gone".to_string()
            } else if let Err(problem) = check_rollout(&rollout.value) {
                problem
            } else {
                continue;
            };
            if shared {
                log::error!("the cluster's rollout of {name:?} is not applied on this node: {problem}");
                refused.insert(Key::Rollout(name.clone()), problem);
            } else {
                log::error!("stored rollout of {name:?} dropped at start: {problem}");
            }
            change.rollouts.insert(name.clone(), None);
        }
        if !shared && stored.file_services != file {
            change.file_services = Some(file);
        }

        // Kubernetes services start with the addresses cached by the previous run (fail static
        // while the API server is away); hand-written frontends win over discovered ones.
        discovery.publish_wanted(services.values());
        let mut claimed: HashSet<SocketAddr> =
            specs.iter().filter(|s| s.source.kubernetes.is_none()).flat_map(|s| s.frontends.iter().copied()).collect();
        for spec in specs.iter_mut().filter(|s| s.source.kubernetes.is_some()) {
            discovery.overlay(spec, |f| claimed.contains(f));
            claimed.extend(spec.frontends.iter().copied());
        }
        let mut core = Self {
            datapath,
            store,
            state: stored,
            cgroup_root,
            follow_ups,
            faults,
            tick_error: None,
            shared,
            tombstones: BTreeMap::new(),
            refused,
            committed: 0,
            progress,
            discovery,
            published: (0, BTreeMap::new()),
            terminate_pending: BTreeSet::new(),
        };
        if shared {
            // Left out of this node's state, which is what its datapath holds; the store keeps
            // them for the nodes that can apply them.
            let revision = core.state.revision;
            for (name, value) in change.services {
                if value.is_none() {
                    core.state.services.remove(&name);
                }
            }
            for name in change.rollouts.keys() {
                core.state.rollouts.remove(name);
            }
            core.state.revision = revision;
        } else {
            // Only the store is written here: the datapath is filled whole below.
            match core.commit_to_store(&change).await {
                Ok(revision) => core.take_into_state(change, revision),
                Err(err) => {
                    // Fail static: the datapath still gets the reconciled state; the store keeps
                    // the old one (and its revisions, so later commits compare against what it
                    // holds).
                    log::error!("recording the reconciled state at start: {err}");
                    core.take_into_state(change, 0);
                }
            }
        }
        // The whole set: what an earlier run pinned and no service wants any more goes too.
        core.datapath.sync(&specs)?;
        core.record_applied().await;
        Ok(core)
    }

    pub(super) fn take_changes(&mut self) -> Option<mpsc::Receiver<RemoteChange>> {
        self.store.take_changes()
    }

    pub(super) fn audit_source(&self) -> Arc<dyn AuditSource> {
        self.store.audit_source()
    }

    pub(super) fn service_count(&self) -> usize {
        self.state.services.len()
    }

    /// Applies one command and answers it.
    pub(super) async fn handle(&mut self, command: Command) {
        self.inject_fault(&command);
        match command {
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::Services { reply } => {
                let _ = reply.send(self.state.services.keys().map(|name| self.service_state(name)).collect());
            }
            Command::Service { name, reply } => {
                let _ = reply.send(self.service_state(&name));
            }
            Command::Rollout { name, reply } => {
                let _ = reply.send(self.rollout_view(&name));
            }
            Command::Datapath { reply } => {
                let _ = reply.send(Ok(DatapathStatus::from(self.datapath.status())));
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
            Command::SetWeight { name, change, origin, reply } => {
                let _ = reply.send(retrying!(self, self.set_weight(&name, change, &origin).await));
            }
            Command::PutService { name, body, origin, reply } => {
                let _ = reply.send(retrying!(self, self.put_service(name.clone(), body.clone(), &origin).await));
            }
            Command::DeleteService { name, origin, reply } => {
                let _ = reply.send(retrying!(self, self.delete_service(&name, &origin).await));
            }
            Command::StartRollout { name, plan, origin, reply } => {
                let _ = reply.send(retrying!(self, self.start_rollout(&name, plan.clone(), &origin).await));
            }
            Command::RolloutAction { name, action, origin, reply } => {
                let _ = reply.send(retrying!(self, self.rollout_action(&name, action, &origin).await));
            }
            Command::SetDatapathLog { level, reply } => {
                let _ = reply.send(self.datapath.set_log(level).map_err(ControlError::Datapath));
            }
            Command::ReloadFile { services, reply } => {
                let _ = reply.send(self.reload_file(services).await);
            }
            Command::TickRollouts { reply } => {
                self.tick_rollouts().await;
                let _ = reply.send(Ok(self.gate_work()));
            }
            Command::GateInput { name, window, input } => self.gate_input(&name, window, input).await,
            Command::ReapRetired => self.datapath.reap_retired(),
            Command::NoteTerminated { name, count } => {
                if let Err(err) = retrying!(self, self.note_terminated(&name, count).await) {
                    log::error!("recording terminated connections of {name}: {err}");
                }
            }
            Command::AuditRefusal { entry } => {
                if let Err(err) = self.store.audit_refusal(*entry).await {
                    log::warn!("recording a refused API request in the audit log: {err}");
                }
            }
            Command::SetDiscovered { name, discovered } => self.set_discovered(&name, *discovered),
        }
    }

    /// See [`Faults`]: a test-only way to make the core die.
    fn inject_fault(&self, command: &Command) {
        let Some(target) = &self.faults.core_panic_on_service else { return };
        let named = match command {
            Command::Service { name, .. }
            | Command::Rollout { name, .. }
            | Command::SetWeight { name, .. }
            | Command::PutService { name, .. }
            | Command::DeleteService { name, .. }
            | Command::StartRollout { name, .. }
            | Command::RolloutAction { name, .. } => Some(name),
            _ => None,
        };
        if named == Some(target) {
            panic!("fault injection ({}): the core panics on a command for {target:?}", Faults::ENV);
        }
    }

    // --- reads ---------------------------------------------------------------------------

    fn config(&self, name: &str) -> Result<&ServiceConfig, ControlError> {
        self.state.services.get(name).map(|v| &v.value).ok_or_else(|| ControlError::UnknownService(name.into()))
    }

    fn service_state(&self, name: &str) -> Result<ServiceState, ControlError> {
        let config = self.config(name)?;
        let view = self.datapath.service(name).ok_or_else(|| ControlError::UnknownService(name.into()))?;
        let counters = self.datapath.counters(name)?;
        let text = |addrs: &[SocketAddr]| addrs.iter().map(ToString::to_string).collect();
        Ok(ServiceState {
            name: name.to_string(),
            canary_percent: config.canary_percent,
            canary_ppm: view.spec.canary_ppm,
            affinity: config.affinity,
            max_operator_percent: config.max_operator_percent,
            frontends: text(&view.spec.frontends),
            stable: text(&view.spec.stable),
            canary: text(&view.spec.canary),
            cohorts: config.cohorts.clone(),
            revision: view.revision,
            kubernetes: self.kubernetes_status(config, &view.spec),
            sides: Sides { stable: (&counters.stable).into(), canary: (&counters.canary).into() },
            stale: None,
            as_of_revision: None,
        })
    }

    /// A Kubernetes service's discovery status (`None` for others), saying which discovered
    /// frontends it does not steer and who has them.
    fn kubernetes_status(&self, config: &ServiceConfig, installed: &ServiceSpec) -> Option<DiscoveryStatus> {
        let missing: Vec<String> = self
            .discovery
            .frontends(config)
            .into_iter()
            .filter(|f| !installed.frontends.contains(f))
            .map(|f| match self.datapath.frontend_owner(&f) {
                Some(owner) => format!("{f} (service {owner:?} has it)"),
                None => f.to_string(),
            })
            .collect();
        let note =
            (!missing.is_empty()).then(|| format!("frontend {} not steered by this service", missing.join(", ")));
        self.discovery.status(config, note)
    }

    /// Counters of both sides now.
    fn counters(&self, name: &str) -> Result<Counters, ControlError> {
        let counters = self.datapath.counters(name)?;
        Ok(Counters { stable: (&counters.stable).into(), canary: (&counters.canary).into() })
    }

    /// Cluster mode: the cumulative counters of `name` of every live node that has them (this
    /// node's read now, the others' as they last published them), and the nodes in the cluster.
    /// `None` in single-node mode.
    fn node_counters(&self, name: &str) -> Result<Option<LiveCounters>, ControlError> {
        let Some(NodeCounters { me, others: mut live, present }) = self.store.node_counters(name) else {
            return Ok(None);
        };
        live.insert(me, self.counters(name)?);
        Ok(Some((live, present)))
    }

    /// Runs `step` on `rollout` with the counters its gates judge: this node's, or in cluster
    /// mode the sum of the live nodes' (see [`Rollout::count_nodes`]).
    fn with_counters<R>(
        &self,
        name: &str,
        rollout: &mut Rollout,
        step: impl FnOnce(&mut Rollout, Counters) -> R,
    ) -> Result<R, ControlError> {
        let Some((live, present)) = self.node_counters(name)? else {
            return Ok(step(rollout, self.counters(name)?));
        };
        let total = rollout.count_nodes(now_ms(), &live, |node| present.contains(node));
        let (window, steps) = (rollout.window, rollout.harm.steps.len());
        let result = step(rollout, total);
        rollout.rebase_nodes(window, steps, &live);
        Ok(result)
    }

    /// Cluster mode: hands this node's counters of the services with an active rollout to the
    /// store to publish, about once a second and only when they changed. Reads the per-CPU
    /// counter maps here, on the control thread, never on the datapath.
    fn publish_counters(&mut self, now: u64) {
        if !self.shared || now.saturating_sub(self.published.0) < PUBLISH_COUNTERS_MS {
            return;
        }
        let services: BTreeMap<String, Counters> = self
            .state
            .rollouts
            .iter()
            .filter(|(_, r)| r.value.state.is_active())
            .filter_map(|(name, _)| Some((name.clone(), self.counters(name).ok()?)))
            .collect();
        self.published.0 = now;
        if services != self.published.1 {
            self.published.1 = services.clone();
            self.store.publish_counters(services);
        }
    }

    fn rollout(&self, name: &str) -> Result<&Rollout, ControlError> {
        self.config(name)?;
        self.state.rollouts.get(name).map(|v| &v.value).ok_or_else(|| ControlError::NoRollout(name.into()))
    }

    fn rollout_view(&self, name: &str) -> Result<RolloutView, ControlError> {
        let mut rollout = self.rollout(name)?.clone();
        let counters = self.with_counters(name, &mut rollout, |_, counters| counters).ok();
        let rollout = &rollout;
        let current_window = counters.as_ref().map(|now| rollout.readings(now));
        let harm = counters.as_ref().map_or_else(|| rollout.harm.clone(), |now| rollout.harm(now));
        let window_elapsed_ms = match rollout.paused_at_elapsed_ms {
            Some(ms) => ms,
            None => now_ms().saturating_sub(rollout.window_started_unix_ms),
        };
        Ok(RolloutView {
            service: name.to_string(),
            state: rollout.state,
            step: rollout.step,
            steps: rollout.plan.steps.clone(),
            percent: rollout.percent,
            step_seconds: rollout.plan.step_seconds,
            window_elapsed_ms,
            consecutive_failures: rollout.consecutive_failures,
            awaiting_role: rollout.approval_role(),
            last_gates: rollout.last_gates.clone(),
            current_window,
            last_judgement: rollout.last_judgement.clone(),
            external_window: rollout.external.clone(),
            terminated_connections: rollout.terminated_connections,
            harm,
            started_by: rollout.started_by.clone(),
            plan: rollout.plan.clone(),
            history: rollout.history.iter().cloned().collect(),
            history_dropped: rollout.history_dropped,
            counted_nodes: self.shared.then(|| rollout.nodes.keys().cloned().collect()),
            stale: None,
            as_of_revision: None,
        })
    }

    fn metrics(&self) -> Result<Vec<ServiceMetrics>, ControlError> {
        let mut out = Vec::new();
        for name in self.datapath.service_names() {
            let Some(view) = self.datapath.service(&name) else { continue };
            let counters = self.datapath.counters(&name)?;
            let kubernetes = self
                .discovery
                .is_stale(&name)
                .map(|stale| KubernetesMetrics { stale, changes_applied: self.discovery.changes_applied(&name) });
            out.push(ServiceMetrics {
                name,
                canary_percent: ppm_to_percent(view.spec.canary_ppm),
                counters,
                kubernetes,
            });
        }
        Ok(out)
    }

    // --- changes -------------------------------------------------------------------------

    async fn set_weight(
        &mut self,
        name: &str,
        change: WeightChange,
        origin: &Origin,
    ) -> Result<ServiceState, ControlError> {
        let current = self.config(name)?.clone();
        let percent = match change {
            WeightChange::Set(percent) => percent,
            WeightChange::Promote => 100.0,
            WeightChange::KillSwitch => 0.0,
        };
        let ppm = validate_percent(percent, "percent")?;
        let caller = &origin.caller;
        if caller.role < Role::Release && percent > current.max_operator_percent {
            return Err(ControlError::Forbidden(format!(
                "token {:?} (operator) may set {name} up to {} %, not {percent} %",
                caller.name, current.max_operator_percent
            )));
        }
        let active = self.state.rollouts.get(name).map(|v| &v.value).filter(|r| r.state.is_active()).cloned();
        let mut change_set = Change::default();
        let mut service = ServiceConfig { canary_percent: ppm_to_percent(ppm), ..current.clone() };
        match (change, active) {
            (WeightChange::KillSwitch, Some(mut rollout)) => {
                // The kill switch works even when the counters cannot be read (the step's cost
                // then stops where it was last counted).
                let reason = format!("kill switch by {}", caller.name);
                let effects = match self
                    .with_counters(name, &mut rollout, |r, counters| r.roll_back(now_ms(), counters, reason.clone()))
                {
                    Ok(effects) => effects,
                    Err(_) => {
                        let counters = rollout.step_baseline;
                        rollout.roll_back(now_ms(), counters, reason)
                    }
                };
                self.effects(&mut service, &rollout, effects, &mut change_set)?;
                change_set.rollouts.insert(name.to_string(), Some(rollout));
            }
            (WeightChange::KillSwitch, None) => {}
            (_, Some(_)) => return Err(ControlError::RolloutActive(name.into())),
            (_, None) => {}
        }
        change_set.audit = Some(self.audit(origin, json!(current), json!(service)));
        change_set.services.insert(name.to_string(), Some(service));
        self.commit(change_set).await?;
        log::info!("service {name}: canary weight set to {percent} % by {}", caller.name);
        self.service_state(name)
    }

    async fn put_service(
        &mut self,
        name: String,
        body: ServiceBody,
        origin: &Origin,
    ) -> Result<(bool, ServiceState), ControlError> {
        let before = self.state.services.get(&name).map(|v| v.value.clone());
        let service = body.into_config(name.clone(), before.as_ref().map(|s| s.max_operator_percent));
        let created = before.is_none();
        let mut change =
            Change { audit: Some(self.audit(origin, json!(before), json!(service))), ..Default::default() };
        change.services.insert(name.clone(), Some(service));
        self.commit(change).await?;
        log::info!("service {name}: {} by {}", if created { "added" } else { "replaced" }, origin.caller.name);
        Ok((created, self.service_state(&name)?))
    }

    async fn delete_service(&mut self, name: &str, origin: &Origin) -> Result<ServiceState, ControlError> {
        let last_state = self.service_state(name)?;
        let removed = self.config(name)?.clone();
        let mut change = Change { audit: Some(self.audit(origin, json!(removed), json!(null))), ..Default::default() };
        change.services.insert(name.to_string(), None);
        // A rollout has no meaning without its service: it must not come back to drive a service
        // later created under the same name.
        if self.state.rollouts.contains_key(name) {
            change.rollouts.insert(name.to_string(), None);
        }
        self.commit(change).await?;
        log::info!("service {name}: removed by {}", origin.caller.name);
        Ok(last_state)
    }

    async fn start_rollout(&mut self, name: &str, plan: Plan, origin: &Origin) -> Result<RolloutView, ControlError> {
        let current = self.config(name)?.clone();
        plan.validate()?;
        plan.check_delegation(origin.caller.role, current.max_operator_percent).map_err(ControlError::Delegation)?;
        if self.state.rollouts.get(name).is_some_and(|r| r.value.state.is_active()) {
            return Err(ControlError::RolloutActive(name.into()));
        }
        let live = self.node_counters(name)?.map(|(live, _)| live);
        let counters = match &live {
            Some(live) => live.values().fold(Counters::default(), |sum, node| sum + *node),
            None => self.counters(name)?,
        };
        plan.check_health_signal(name, &counters)?;
        let (mut rollout, effects) = Rollout::start(plan.clone(), now_ms(), counters, &origin.caller.name);
        if let Some(live) = &live {
            rollout.count_from(live);
        }
        let mut change = Change::default();
        let mut service = current.clone();
        self.effects(&mut service, &rollout, effects, &mut change)?;
        if service != current {
            change.services.insert(name.to_string(), Some(service));
        }
        change.rollouts.insert(name.to_string(), Some(rollout));
        change.audit = Some(self.audit(origin, json!(current), json!({ "rollout": plan })));
        self.commit(change).await?;
        log::info!("service {name}: rollout started by {}", origin.caller.name);
        self.rollout_view(name)
    }

    async fn rollout_action(
        &mut self,
        name: &str,
        action: RolloutAction,
        origin: &Origin,
    ) -> Result<RolloutView, ControlError> {
        let mut rollout = self.rollout(name)?.clone();
        let caller = &origin.caller;
        if action == RolloutAction::Approve {
            if let Some(needed) = rollout.approval_role().filter(|needed| caller.role < *needed) {
                return Err(ControlError::Forbidden(format!(
                    "token {:?} has role {}, this needs {}",
                    caller.name,
                    role_name(caller.role),
                    role_name(needed)
                )));
            }
        }
        let before = rollout.state;
        let wrong_state = |needed: &'static str| ControlError::RolloutState {
            service: name.into(),
            state: serde_json::to_value(before).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            action,
            needed,
        };
        let now = now_ms();
        let by = caller.name.clone();
        let effects = match (action, before) {
            (RolloutAction::Pause, RolloutState::Running) => rollout.pause(now, &caller.name),
            (RolloutAction::Pause, _) => return Err(wrong_state("a running rollout")),
            (RolloutAction::Resume, RolloutState::Paused) => rollout.resume(now, &caller.name),
            (RolloutAction::Resume, _) => return Err(wrong_state("a paused rollout")),
            (RolloutAction::Approve, RolloutState::AwaitingApproval) => {
                self.with_counters(name, &mut rollout, |r, counters| r.approve(now, counters, &by))?
            }
            (RolloutAction::Approve, _) => return Err(wrong_state("a rollout awaiting approval")),
            (RolloutAction::Abort, state) if state.is_active() => {
                self.with_counters(name, &mut rollout, |r, counters| r.abort(now, counters, &by))?
            }
            (RolloutAction::Abort, _) => return Err(wrong_state("an active rollout")),
        };
        let current = self.config(name)?.clone();
        let mut change = Change::default();
        let mut service = current.clone();
        self.effects(&mut service, &rollout, effects, &mut change)?;
        if service != current {
            change.services.insert(name.to_string(), Some(service));
        }
        change.audit = Some(self.audit(origin, json!({ "state": before }), json!({ "state": rollout.state })));
        change.rollouts.insert(name.to_string(), Some(rollout));
        self.commit(change).await?;
        log::info!("service {name}: rollout {action} by {}", caller.name);
        self.rollout_view(name)
    }

    /// The config file now says `file`: merge by the rules in `state`, validate, commit, apply.
    async fn reload_file(&mut self, file: Vec<ServiceConfig>) -> Result<usize, ControlError> {
        let count = file.len();
        if self.shared {
            // Cluster mode reads no services from the file (the config refuses them): the
            // cluster's state is never changed by one node's file.
            return Ok(0);
        }
        let file: BTreeMap<String, ServiceConfig> = file.into_iter().map(|s| (s.name.clone(), s)).collect();
        let current: BTreeMap<String, ServiceConfig> =
            self.state.services.iter().map(|(name, v)| (name.clone(), v.value.clone())).collect();
        let merged = merged_with_file(&current, &self.state.file_services, &file);
        // The whole set first, so that the error names the service's place in it.
        validate_services(&merged.values().cloned().collect::<Vec<_>>(), self.cgroup_root.as_deref())?;
        let mut change = Change::default();
        for name in current.keys().chain(merged.keys()) {
            if current.get(name) != merged.get(name) {
                change.services.insert(name.clone(), merged.get(name).cloned());
            }
        }
        for name in self.state.rollouts.keys().filter(|name| !merged.contains_key(*name)) {
            change.rollouts.insert(name.clone(), None);
        }
        if file != self.state.file_services {
            change.file_services = Some(file);
        }
        self.commit(change).await?;
        Ok(count)
    }

    /// Advances every running rollout's clock; all the rollouts that moved are one commit.
    async fn tick_rollouts(&mut self) {
        let now = now_ms();
        self.publish_counters(now);
        // Cluster mode: one node drives the rollouts; the others follow its commits.
        if !self.store.leads() {
            return;
        }
        let mut change = Change { leader_only: true, ..Change::default() };
        let running: Vec<String> = self
            .state
            .rollouts
            .iter()
            .filter(|(_, r)| r.value.state == RolloutState::Running)
            .map(|(name, _)| name.clone())
            .collect();
        for name in running {
            self.advance_rollout(&name, &mut change, |rollout, counters| rollout.tick(now, counters));
        }
        self.commit_rollout_change(change).await;
    }

    /// Runs `step` on a copy of `name`'s rollout with the counters now and adds the result (the
    /// rollout and the weight its effects set) to `change`, if the rollout changed.
    fn advance_rollout(
        &self,
        name: &str,
        change: &mut Change,
        step: impl FnOnce(&mut Rollout, Counters) -> Vec<Effect>,
    ) {
        let Ok(current) = self.config(name).cloned() else { return };
        let Some(before) = self.state.rollouts.get(name).map(|v| &v.value) else { return };
        let mut rollout = before.clone();
        let Ok(effects) = self.with_counters(name, &mut rollout, step) else { return };
        if rollout == *before {
            return;
        }
        let mut service = current.clone();
        if let Err(err) = self.effects(&mut service, &rollout, effects, change) {
            log::error!("rollout of {name}: {err}");
            return;
        }
        if service != current {
            change.services.insert(name.to_string(), Some(service));
        }
        change.rollouts.insert(name.to_string(), Some(rollout));
    }

    /// What the driver must read for the running rollouts' metric gates and webhook checks.
    fn gate_work(&self) -> Vec<GateWork> {
        let mut work = Vec::new();
        // Cluster mode: only the node driving the rollouts reads their gates.
        if !self.store.leads() {
            return work;
        }
        for (name, rollout) in &self.state.rollouts {
            let rollout = &rollout.value;
            let (Some(due), Some(gates)) = (rollout.gate_due(), rollout.plan.gates.judged()) else { continue };
            work.push(GateWork {
                service: name.clone(),
                window: rollout.window,
                due,
                step: rollout.step,
                percent: rollout.percent,
                step_seconds: rollout.plan.step_seconds,
                metrics: gates.metrics.clone(),
                on_missing: gates.on_missing,
                checks: gates.webhooks.clone(),
                state: if due == GateDue::Judge {
                    rollout_payload(name, "check", rollout)
                } else {
                    serde_json::Value::Null
                },
            });
        }
        work
    }

    /// Readings the driver took for `name`'s rollout at `window`: the rollout judges them.
    async fn gate_input(&mut self, name: &str, window: u64, input: GateInput) {
        let now = now_ms();
        let mut change = Change { leader_only: true, ..Change::default() };
        self.advance_rollout(name, &mut change, |rollout, counters| match input {
            GateInput::Poll(readings) => rollout.observe_metrics(now, counters, window, &readings),
            GateInput::Judge { metrics, checks } => rollout.conclude(now, counters, window, &metrics, checks),
        });
        self.commit_rollout_change(change).await;
    }

    /// Commits what the rollout clock or the driver's readings changed. A failed commit is
    /// retried by the next tick or reading; it is logged once, not ten times a second.
    async fn commit_rollout_change(&mut self, change: Change) {
        match self.commit(change).await {
            Ok(()) => self.tick_error = None,
            Err(err) => {
                // Retried at the next tick; said once, not ten times a second.
                let text = err.to_string();
                if self.tick_error.as_ref() != Some(&text) {
                    log::error!("advancing rollouts: {text}");
                    self.tick_error = Some(text);
                }
            }
        }
    }

    /// Adds `count` connections this node terminated to the rollout's count (in cluster mode
    /// every node adds its own).
    async fn note_terminated(&mut self, name: &str, count: usize) -> Result<(), ControlError> {
        let Some(mut rollout) = self.state.rollouts.get(name).map(|v| v.value.clone()) else { return Ok(()) };
        rollout.terminated_connections = Some(rollout.terminated_connections.unwrap_or(0) + count as u64);
        let mut change = Change::default();
        change.rollouts.insert(name.to_string(), Some(rollout));
        self.commit(change).await
    }

    /// Cluster mode: terminates the steered canary connections of the services another node
    /// rolled back (see `terminate_pending`) whose weight 0 this node's datapath holds now.
    fn terminate_remote_rollbacks(&mut self) {
        let pending = std::mem::take(&mut self.terminate_pending);
        for service in pending {
            match self.datapath.service(&service).map(|view| view.spec.canary_ppm) {
                None => {}
                Some(0) => match self.datapath.terminate_canary_sockets(&service) {
                    Ok(termination) => {
                        let _ = self.follow_ups.send(FollowUp::TerminateCanary { service, termination });
                    }
                    Err(err) => log::error!("service {service}: closing canary connections: {err}"),
                },
                Some(_) => {
                    // Still steering to the canary: wait for the service's change.
                    self.terminate_pending.insert(service);
                }
            }
        }
    }

    fn audit(&self, origin: &Origin, before: serde_json::Value, after: serde_json::Value) -> AuditEntry {
        AuditEntry::now(&origin.caller.name, origin.caller.role, &origin.method, &origin.route, before, after)
    }

    /// Applies a rollout's effects to `service` (its weight) and collects what must follow.
    fn effects(
        &self,
        service: &mut ServiceConfig,
        rollout: &Rollout,
        effects: Vec<Effect>,
        change: &mut Change,
    ) -> Result<(), ControlError> {
        for effect in effects {
            match effect {
                Effect::SetPercent(percent) => {
                    service.canary_percent = ppm_to_percent(validate_percent(percent, "percent")?);
                }
                Effect::RollBack { terminate_connections } => {
                    service.canary_percent = 0.0;
                    if terminate_connections {
                        change.terminate_canary.push(service.name.clone());
                    }
                }
                Effect::Notify(event) => {
                    if !rollout.plan.webhooks.is_empty() {
                        change.follow_ups.push(FollowUp::Notify {
                            service: service.name.clone(),
                            event: event.clone(),
                            webhooks: rollout.plan.webhooks.clone(),
                            payload: rollout_payload(&service.name, &event, rollout),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    // --- commit and apply ----------------------------------------------------------------

    /// Validates `change`, commits it to the store, applies it to the datapath (undoing both if
    /// the datapath refuses, see the `store` module docs for a shared store), and sends its
    /// follow-ups. On error nothing has changed (but see [`ControlError::NotAppliedHere`]).
    async fn commit(&mut self, mut change: Change) -> Result<(), ControlError> {
        if change.is_empty() {
            return Ok(());
        }
        let ops = self.plan_datapath(&change.services)?;
        let revision = self.commit_to_store(&change).await?;
        self.committed = revision;
        change.audit = None;
        let frontends_moved = moves_frontends(&ops);
        if let Err(err) = self.apply_datapath(ops) {
            if !self.shared {
                self.revert_store(&change, revision).await;
                return Err(ControlError::Datapath(err));
            }
            // Committed for the whole cluster: other nodes may have applied it already, so it
            // stays; this node keeps what it had for these keys and says so.
            let error = err.to_string();
            let keys: Vec<Key> = change
                .services
                .keys()
                .map(|name| Key::Service(name.clone()))
                .chain(change.rollouts.keys().map(|name| Key::Rollout(name.clone())))
                .collect();
            for key in keys {
                self.note_revision(&key, revision);
                self.refused.insert(key, error.clone());
            }
            log::error!("a committed change (revision {revision}) is not applied on this node: {error}");
            self.record_applied().await;
            return Err(ControlError::NotAppliedHere { revision, error });
        }
        let mut follow_ups = std::mem::take(&mut change.follow_ups);
        // The weight is 0 in the datapath now, so no new connection goes to the canary. The
        // datapath picks exactly the sockets it steered there and hands them to its termination
        // worker (a queue send: the core does not wait for the netlink work); the follow-up task
        // waits for the count.
        for service in std::mem::take(&mut change.terminate_canary) {
            match self.datapath.terminate_canary_sockets(&service) {
                Ok(termination) => follow_ups.push(FollowUp::TerminateCanary { service, termination }),
                Err(err) => log::error!("service {service}: closing canary connections: {err}"),
            }
        }
        for name in change.services.keys() {
            self.refused.remove(&Key::Service(name.clone()));
        }
        for name in change.rollouts.keys() {
            self.refused.remove(&Key::Rollout(name.clone()));
        }
        self.take_into_state(change, revision);
        if frontends_moved {
            self.reclaim_discovered_frontends();
        }
        self.record_applied().await;
        for follow_up in follow_ups {
            let _ = self.follow_ups.send(follow_up);
        }
        Ok(())
    }

    /// Tells the store what the datapath now holds (and what it refused), and publishes the
    /// core's progress.
    async fn record_applied(&mut self) {
        self.tell_store_applied().await;
        let applied = self.state.revision;
        let committed = self.committed.max(if self.shared { 0 } else { applied });
        self.progress.send_replace(Progress { committed, applied });
    }

    /// Tells the store what the datapath now holds, and why it differs from the store (the
    /// changes it refused).
    async fn tell_store_applied(&mut self) {
        let problems: Vec<String> = self.refused.iter().map(|(key, why)| format!("{key} not applied: {why}")).collect();
        if let Err(err) = self.store.applied(&self.state, &problems).await {
            log::warn!("recording the applied state: {err}");
        }
    }

    /// The store holds `key` at `revision` now, whatever this node's datapath holds for it: a
    /// later commit compares on this revision, and older changes to the key are ignored.
    fn note_revision(&mut self, key: &Key, revision: Revision) {
        let found = match key {
            Key::Service(name) => self.state.services.get_mut(name).map(|v| &mut v.revision),
            Key::Rollout(name) => self.state.rollouts.get_mut(name).map(|v| &mut v.revision),
        };
        match found {
            Some(known) => *known = revision,
            None => {
                if self.shared {
                    self.tombstones.insert(key.clone(), revision);
                }
            }
        }
    }

    /// The revision this node knows `key` at: its value's, or the deletion's.
    fn known_revision(&self, key: &Key) -> Revision {
        let present = match key {
            Key::Service(name) => self.state.services.get(name).map(|v| v.revision),
            Key::Rollout(name) => self.state.rollouts.get(name).map(|v| v.revision),
        };
        present.or_else(|| self.tombstones.get(key).copied()).unwrap_or(0)
    }

    /// Writes `change` to the store, compared on the revisions the core holds.
    async fn commit_to_store(&mut self, change: &Change) -> Result<u64, ControlError> {
        if change.is_empty() {
            return Ok(self.state.revision);
        }
        let mut writes = Vec::new();
        for (name, value) in &change.services {
            writes.push(Write {
                key: Key::Service(name.clone()),
                expect: Expect::of(self.state.services.get(name)),
                value: Value::Service(value.clone()),
            });
        }
        for (name, value) in &change.rollouts {
            writes.push(Write {
                key: Key::Rollout(name.clone()),
                expect: Expect::of(self.state.rollouts.get(name)),
                value: Value::Rollout(value.clone().map(Box::new)),
            });
        }
        let commit = Commit {
            writes,
            file_services: change.file_services.clone(),
            audit: change.audit.clone(),
            leader_only: change.leader_only,
        };
        Ok(self.store.commit(commit).await?)
    }

    /// After a datapath refusal: writes the previous values back, compared on `revision` (the
    /// refused commit's). Nothing is audited: the refused change never took effect.
    async fn revert_store(&mut self, change: &Change, revision: u64) {
        let at = |present: bool| if present { Expect::At(revision) } else { Expect::Absent };
        let mut writes = Vec::new();
        for (name, value) in &change.services {
            writes.push(Write {
                key: Key::Service(name.clone()),
                expect: at(value.is_some()),
                value: Value::Service(self.state.services.get(name).map(|v| v.value.clone())),
            });
        }
        for (name, value) in &change.rollouts {
            writes.push(Write {
                key: Key::Rollout(name.clone()),
                expect: at(value.is_some()),
                value: Value::Rollout(self.state.rollouts.get(name).map(|v| Box::new(v.value.clone()))),
            });
        }
        let file_services = change.file_services.as_ref().map(|_| self.state.file_services.clone());
        let revert = Commit { writes, file_services, audit: None, leader_only: false };
        match self.store.commit(revert).await {
            Ok(reverted) => {
                // The store holds the old values again, at a new revision.
                for name in change.services.keys() {
                    if let Some(v) = self.state.services.get_mut(name) {
                        v.revision = reverted;
                    }
                }
                for name in change.rollouts.keys() {
                    if let Some(v) = self.state.rollouts.get_mut(name) {
                        v.revision = reverted;
                    }
                }
                self.state.revision = reverted;
                // The datapath holds the old state, and so does the store now: this makes the
                // revert durable (the file store's directory sync) before the core answers.
                self.tell_store_applied().await;
            }
            Err(err) => log::error!(
                "the datapath refused a committed change and the store could not be put back ({err}): the store                  holds a change this node does not apply; the next start applies it"
            ),
        }
    }

    /// Makes a committed change the core's state. `revision` 0: the store did not take it (the
    /// keys keep their revisions).
    fn take_into_state(&mut self, change: Change, revision: u64) {
        let keep = |old: Option<u64>| if revision == 0 { old.unwrap_or(0) } else { revision };
        let kubernetes_changed = change.services.iter().any(|(name, new)| {
            self.state.services.get(name).and_then(|v| v.value.kubernetes.as_ref())
                != new.as_ref().and_then(|s| s.kubernetes.as_ref())
        });
        for (name, value) in change.services {
            match value {
                Some(value) => {
                    let revision = keep(self.state.services.get(&name).map(|v| v.revision));
                    self.state.services.insert(name, Versioned { revision, value });
                }
                None => {
                    self.state.services.remove(&name);
                    if self.shared {
                        self.tombstones.insert(Key::Service(name), revision);
                    }
                }
            }
        }
        for (name, value) in change.rollouts {
            match value {
                Some(value) => {
                    let revision = keep(self.state.rollouts.get(&name).map(|v| v.revision));
                    self.state.rollouts.insert(name, Versioned { revision, value });
                }
                None => {
                    self.state.rollouts.remove(&name);
                    if self.shared {
                        self.tombstones.insert(Key::Rollout(name), revision);
                    }
                }
            }
        }
        if let Some(file_services) = change.file_services {
            self.state.file_services = file_services;
        }
        // A shared store's revision moves with its change stream: changes made elsewhere below
        // this commit's revision may not have arrived yet.
        if revision > 0 && !self.shared {
            self.state.revision = self.state.revision.max(revision);
        }
        if kubernetes_changed {
            self.discovery.publish_wanted(self.state.services.values().map(|v| &v.value));
        }
    }

    /// Validates the changed services against each other and the rest, and says what the
    /// datapath must do for each. Only changed services are validated: a weight change costs no
    /// more with 65,536 services than with one.
    ///
    /// A Kubernetes service gets the addresses discovery last gave it, after the hand-written
    /// services have claimed their frontends: a discovered frontend another service has is left
    /// out (its status says so), and a hand-written frontend takes the place of a discovered one
    /// (that service is replaced without it first, before the frontend changes hands).
    fn plan_datapath(
        &self,
        services: &BTreeMap<String, Option<ServiceConfig>>,
    ) -> Result<Vec<(String, DatapathOp)>, ControlError> {
        let added = services.iter().filter(|(n, v)| v.is_some() && !self.state.services.contains_key(*n)).count();
        let removed = services.iter().filter(|(n, v)| v.is_none() && self.state.services.contains_key(*n)).count();
        let total = self.state.services.len() + added - removed;
        if total > MAX_SERVICES as usize {
            return Err(InvalidField::new(
                "service",
                format!("{total} services, at most {MAX_SERVICES} are supported"),
            )
            .into());
        }
        let mut ops = Vec::new();
        let mut claimed: HashMap<SocketAddr, &str> = HashMap::new();
        let mut discovered: Vec<(&str, ServiceSpec)> = Vec::new();
        let mut displaced: BTreeSet<&str> = BTreeSet::new();
        for (name, new) in services {
            let old = self.state.services.get(name).map(|v| &v.value);
            match (old, new) {
                (None, None) => {}
                (Some(_), None) => ops.push((name.clone(), DatapathOp::Remove)),
                (Some(old), Some(new))
                    if ServiceConfig { canary_percent: new.canary_percent, ..old.clone() } == *new =>
                {
                    ops.push((
                        name.clone(),
                        DatapathOp::Weight(validate_percent(new.canary_percent, "canary_percent")?),
                    ));
                }
                (_, Some(new)) => {
                    if new.name != *name {
                        return Err(
                            InvalidField::new("name", format!("{:?} is not the service {name:?}", new.name)).into()
                        );
                    }
                    let spec = validate_service(new, "", self.cgroup_root.as_deref())?;
                    if new.kubernetes.is_some() {
                        discovered.push((name, spec));
                        continue;
                    }
                    for frontend in &spec.frontends {
                        let owner = claimed.get(frontend).copied().or_else(|| {
                            self.datapath.frontend_owner(frontend).filter(|owner| !services.contains_key(*owner))
                        });
                        match owner.filter(|owner| *owner != name) {
                            Some(owner) if self.is_kubernetes(owner) => {
                                displaced.insert(owner);
                            }
                            Some(owner) => {
                                return Err(ControlError::FrontendInUse {
                                    frontend: *frontend,
                                    owner: owner.to_string(),
                                })
                            }
                            None => {}
                        }
                        claimed.insert(*frontend, name);
                    }
                    ops.push((name.clone(), DatapathOp::Replace(Box::new(spec))));
                }
            }
        }
        let taken = |claimed: &HashMap<SocketAddr, &str>, name: &str, frontend: &SocketAddr| match claimed.get(frontend)
        {
            Some(owner) => *owner != name,
            None => self
                .datapath
                .frontend_owner(frontend)
                .is_some_and(|owner| owner != name && !services.contains_key(owner)),
        };
        // Kubernetes services that give a frontend up are replaced without it in the same
        // whole-set update (the frontend is overwritten with its new owner's value, never
        // deleted in between).
        let mut releases = Vec::new();
        for name in displaced {
            let Some(config) = self.state.services.get(name).map(|v| &v.value) else { continue };
            let mut spec = validate_service(config, "", self.cgroup_root.as_deref())?;
            self.discovery.overlay(&mut spec, |f| taken(&claimed, name, f));
            releases.push((name.to_string(), DatapathOp::Replace(Box::new(spec))));
        }
        for (name, mut spec) in discovered {
            self.discovery.overlay(&mut spec, |f| taken(&claimed, name, f));
            for frontend in &spec.frontends {
                claimed.insert(*frontend, name);
            }
            ops.push((name.to_string(), DatapathOp::Replace(Box::new(spec))));
        }
        releases.extend(ops);
        Ok(releases)
    }

    /// Whether service `name` has a `kubernetes` table.
    fn is_kubernetes(&self, name: &str) -> bool {
        self.state.services.get(name).is_some_and(|v| v.value.kubernetes.is_some())
    }

    /// Applies `ops`: the services added, replaced or removed as one whole-set update of the
    /// datapath (a frontend moving between two of them is overwritten, never deleted), then the
    /// weight-only changes. On a refusal, what was applied is undone.
    fn apply_datapath(&mut self, ops: Vec<(String, DatapathOp)>) -> Result<(), DatapathError> {
        let mut set: BTreeMap<String, Option<ServiceSpec>> = BTreeMap::new();
        let mut weights = Vec::new();
        for (name, op) in ops {
            match op {
                DatapathOp::Weight(ppm) => weights.push((name, ppm)),
                DatapathOp::Replace(spec) => {
                    set.insert(name, Some(*spec));
                }
                DatapathOp::Remove => {
                    set.insert(name, None);
                }
            }
        }
        let before: BTreeMap<String, Option<ServiceSpec>> =
            set.keys().map(|name| (name.clone(), self.datapath.service(name).map(|v| v.spec))).collect();
        if !set.is_empty() {
            // All or nothing: a refused update has changed nothing.
            self.datapath.update(set)?;
        }
        let mut undo: Vec<(String, u32)> = Vec::new();
        for (name, ppm) in weights {
            let installed = self.datapath.service(&name).map(|v| v.spec.canary_ppm);
            if let Err(err) = self.datapath.set_weight(&name, ppm) {
                log::error!("the datapath refused a change, undoing it: {err}");
                for (name, ppm) in undo.into_iter().rev() {
                    if let Err(err) = self.datapath.set_weight(&name, ppm) {
                        log::error!("undoing a refused datapath change: {err}");
                    }
                }
                if !before.is_empty() {
                    if let Err(err) = self.datapath.update(before) {
                        log::error!("undoing a refused datapath change: {err}");
                    }
                }
                return Err(err);
            }
            if let Some(old) = installed {
                undo.push((name, old));
            }
        }
        Ok(())
    }

    /// Changes made elsewhere (cluster mode), in the store's order: applied to the datapath
    /// without committing them again. A change older than what this node knows of its key (its
    /// own commit, echoed back by the change stream) is ignored. A value this node cannot apply
    /// (it does not validate here, or the datapath refuses it) is skipped with an error naming
    /// its key: the service keeps its last state on this node, which reports itself unhealthy.
    pub(super) async fn apply_remote(&mut self, change: RemoteChange) {
        let (revision, writes) = match change {
            RemoteChange::Changed { revision, writes } => {
                (revision, writes.into_iter().map(|(key, value)| (key, revision, value)).collect())
            }
            RemoteChange::Resync(snapshot) => (snapshot.revision, self.resync_writes(&snapshot)),
        };
        let mut failed = Vec::new();
        for (key, at, value) in writes {
            if self.known_revision(&key) >= at && !self.refused.contains_key(&key) {
                continue;
            }
            if let Err(error) = self.apply_remote_write(&key, at, value.clone()) {
                failed.push((key, at, value, error));
            }
        }
        // Once more for what failed: a frontend moved from one service to another is free only
        // after the other's change.
        for (key, at, value, first_error) in failed {
            if let Err(error) = self.apply_remote_write(&key, at, value) {
                let error = if error == first_error { error } else { format!("{error} (first: {first_error})") };
                log::error!(
                    "skipping {key} at revision {at} from the cluster, this node keeps its last state: {error}"
                );
                self.note_revision(&key, at);
                self.refused.insert(key, error);
            }
        }
        self.state.revision = self.state.revision.max(revision);
        let reached = self.state.revision;
        self.tombstones.retain(|_, deleted_at| *deleted_at > reached);
        self.terminate_remote_rollbacks();
        self.record_applied().await;
    }

    /// What differs between a relisted state and this node's: by value, so that nothing is
    /// removed and added back, and only where the relist is newer than what this node knows.
    fn resync_writes(&self, snapshot: &Snapshot) -> Vec<(Key, Revision, Value)> {
        let mut writes = Vec::new();
        for name in self.state.services.keys().chain(snapshot.services.keys()) {
            let key = Key::Service(name.clone());
            let wanted = snapshot.services.get(name);
            let at = wanted.map_or(snapshot.revision, |v| v.revision);
            let differs = self.state.services.get(name).map(|v| &v.value) != wanted.map(|v| &v.value);
            if differs || self.refused.contains_key(&key) || self.known_revision(&key) < at {
                writes.push((key, at, Value::Service(wanted.map(|v| v.value.clone()))));
            }
        }
        for name in self.state.rollouts.keys().chain(snapshot.rollouts.keys()) {
            let key = Key::Rollout(name.clone());
            let wanted = snapshot.rollouts.get(name);
            let at = wanted.map_or(snapshot.revision, |v| v.revision);
            let differs = self.state.rollouts.get(name).map(|v| &v.value) != wanted.map(|v| &v.value);
            if differs || self.refused.contains_key(&key) || self.known_revision(&key) < at {
                writes.push((key, at, Value::Rollout(wanted.map(|v| Box::new(v.value.clone())))));
            }
        }
        writes.sort_by(|a, b| a.0.cmp(&b.0));
        writes.dedup_by(|a, b| a.0 == b.0);
        writes
    }

    /// Makes this node hold `value` for `key`, as the store holds it at `revision`.
    fn apply_remote_write(&mut self, key: &Key, revision: Revision, value: Value) -> Result<(), String> {
        match (key, value) {
            (Key::Service(name), Value::Service(value)) => {
                let old = self.state.services.get(name).map(|v| &v.value);
                let same = old == value.as_ref();
                let kubernetes_changed =
                    old.and_then(|s| s.kubernetes.as_ref()) != value.as_ref().and_then(|s| s.kubernetes.as_ref());
                let mut frontends_moved = false;
                if !same {
                    let single = BTreeMap::from([(name.clone(), value.clone())]);
                    let ops = self.plan_datapath(&single).map_err(|err| err.to_string())?;
                    frontends_moved = moves_frontends(&ops);
                    self.apply_datapath(ops).map_err(|err| err.to_string())?;
                }
                match value {
                    Some(value) => {
                        self.state.services.insert(name.clone(), Versioned { revision, value });
                    }
                    None => {
                        self.state.services.remove(name);
                        self.tombstones.insert(key.clone(), revision);
                    }
                }
                // Each node resolves a Kubernetes service's addresses itself, like kube-proxy:
                // the reference came through the store, the watch for it starts here.
                if kubernetes_changed {
                    self.discovery.publish_wanted(self.state.services.values().map(|v| &v.value));
                }
                if frontends_moved {
                    self.reclaim_discovered_frontends();
                }
            }
            (Key::Rollout(name), Value::Rollout(value)) => {
                if let Some(problem) = value.as_deref().and_then(|rollout| check_rollout(rollout).err()) {
                    return Err(problem);
                }
                if value.is_some() && !self.state.services.contains_key(name) {
                    return Err(format!("the service {name:?} is not applied on this node"));
                }
                // Rolled back elsewhere while this node knew it active: this node cuts its own
                // clients' canary connections too, once its weight is 0.
                let rolled_back_elsewhere =
                    value.as_deref().is_some_and(|rollout| {
                        rollout.state == RolloutState::RolledBack && rollout.plan.rollback.terminate_connections
                    }) && self.state.rollouts.get(name).is_some_and(|old| old.value.state.is_active());
                if rolled_back_elsewhere {
                    self.terminate_pending.insert(name.clone());
                }
                match value {
                    Some(value) => {
                        self.state.rollouts.insert(name.clone(), Versioned { revision, value: *value });
                    }
                    None => {
                        self.state.rollouts.remove(name);
                        self.tombstones.insert(key.clone(), revision);
                    }
                }
            }
            (key, value) => return Err(format!("{key} cannot hold {value:?}")),
        }
        self.refused.remove(key);
        Ok(())
    }

    /// After a conflict: the store's current values of the conflicting keys become this node's
    /// (an invalid one only moves the revision compared on; the key keeps its last valid value).
    async fn adopt(&mut self, current: Vec<Current>) {
        for Current { key, revision, value } in current {
            if self.known_revision(&key) >= revision && !self.refused.contains_key(&key) {
                continue;
            }
            match value {
                Some(value) => {
                    if let Err(error) = self.apply_remote_write(&key, revision, value) {
                        log::error!("{key} at revision {revision} is not applied on this node: {error}");
                        self.note_revision(&key, revision);
                        self.refused.insert(key, error);
                    }
                }
                None => self.note_revision(&key, revision),
            }
        }
        self.terminate_remote_rollbacks();
        self.record_applied().await;
    }

    // --- Kubernetes discovery ------------------------------------------------------------

    /// What discovery found for `name`: recorded, and applied as one backend-set switch when
    /// the service's addresses now differ from what the datapath holds. Nothing is committed.
    fn set_discovered(&mut self, name: &str, discovered: Discovered) {
        let Some(config) = self.state.services.get(name).map(|v| &v.value) else { return };
        if self.discovery.record(config, discovered) {
            self.install_discovered(name);
        }
    }

    /// Makes the datapath hold Kubernetes service `name` with its discovered addresses, less
    /// the frontends other services have.
    fn install_discovered(&mut self, name: &str) {
        let Some(config) = self.state.services.get(name).map(|v| &v.value) else { return };
        let mut spec = match validate_service(config, "", self.cgroup_root.as_deref()) {
            Ok(spec) => spec,
            Err(err) => return log::error!("service {name}: {err}"),
        };
        let datapath = &self.datapath;
        self.discovery.overlay(&mut spec, |f| datapath.frontend_owner(f).is_some_and(|owner| owner != name));
        if self.datapath.service(name).is_some_and(|installed| installed.spec == spec) {
            return; // a status change only
        }
        match self.datapath.update(BTreeMap::from([(name.to_string(), Some(spec))])) {
            Ok(()) => self.discovery.note_applied(name, now_ms()),
            Err(err) => log::error!("service {name}: applying discovered addresses: {err}"),
        }
    }

    /// After frontends changed hands: Kubernetes services that were left without a discovered
    /// frontend take it if it is free now.
    fn reclaim_discovered_frontends(&mut self) {
        let waiting: Vec<String> = self
            .discovery
            .names()
            .into_iter()
            .filter(|name| {
                let Some(config) = self.state.services.get(name).map(|v| &v.value) else { return false };
                self.discovery.frontends(config).iter().any(|f| self.datapath.frontend_owner(f) != Some(name.as_str()))
            })
            .collect();
        for name in waiting {
            self.install_discovered(&name);
        }
    }
}

/// Whether applying `ops` may free a frontend (anything but weight changes).
fn moves_frontends(ops: &[(String, DatapathOp)]) -> bool {
    ops.iter().any(|(_, op)| !matches!(op, DatapathOp::Weight(_)))
}
