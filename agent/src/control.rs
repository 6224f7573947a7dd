//! The agent's control core: desired state, the datapath that enforces it, and the persisted
//! copy, changed together. Every change is validated whole before anything is touched; the
//! datapath is changed first and the state file written after, so the file never claims more
//! than the kernel does.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{
    config::{validate_percent, validate_service, validate_services, InvalidField, ServiceConfig, ServiceSpec},
    datapath::{Datapath, DatapathError},
    discovery::{Discovered, Discovery},
    rollout::{Effect, Plan, Rollout, RolloutState, Snapshot},
    state::{DesiredState, StateError},
};

/// Work a rollout asks for that must happen outside the core's lock.
#[derive(Debug, Clone)]
pub enum FollowUp {
    /// POST the rollout's state to its webhooks.
    Notify { service: String, event: String, webhooks: Vec<String>, payload: serde_json::Value },
    /// Close established TCP connections to these canary backends.
    TerminateCanary { service: String, backends: Vec<SocketAddr> },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error("frontend {frontend} already belongs to service {owner:?}")]
    FrontendInUse { frontend: SocketAddr, owner: String },
    #[error(
        "service {0:?} has an active rollout driving its weight: abort it first, or use the kill switch (rollback)"
    )]
    RolloutActive(String),
    #[error("service {0:?} has no rollout")]
    NoRollout(String),
    #[error("the rollout of {service:?} is {state}; {action} needs {needed}")]
    RolloutState { service: String, state: String, action: &'static str, needed: &'static str },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct Core {
    pub datapath: Datapath,
    desired: DesiredState,
    state_dir: PathBuf,
    cgroup_root: Option<PathBuf>,
    /// Kubernetes services' discovered addresses: runtime facts of this node, never desired state
    /// (only a node-local cache a restarted agent starts from, see `Discovery::restore`).
    discovery: Discovery,
}

fn by_name(services: &[ServiceConfig]) -> BTreeMap<String, ServiceConfig> {
    services.iter().map(|s| (s.name.clone(), s.clone())).collect()
}

impl Core {
    /// Restores the persisted state, reconciles it with the config file's services and makes the
    /// datapath hold the result.
    pub fn start(
        datapath: Datapath,
        state_dir: &Path,
        file_services: &[ServiceSpec],
        cgroup_root: Option<PathBuf>,
    ) -> Result<Self, ControlError> {
        let desired = DesiredState::load(state_dir)?.unwrap_or_default();
        let discovery = Discovery::restore(state_dir);
        let mut core = Self { datapath, desired, state_dir: state_dir.to_owned(), cgroup_root, discovery };
        let file: Vec<ServiceConfig> = file_services.iter().map(|s| s.source.clone()).collect();
        if let Err(err) = core.reload_file(&file) {
            // The persisted API changes no longer fit with the file (say, a frontend the file
            // now gives another service): the file alone is known to be valid.
            log::error!("persisted state conflicts with the config file ({err}); using the config file alone");
            core.desired = DesiredState::default();
            core.reload_file(&file)?;
        }
        core.datapath.remove_leftovers();
        Ok(core)
    }

    pub fn services(&self) -> &BTreeMap<String, ServiceConfig> {
        &self.desired.services
    }

    pub fn service(&self, name: &str) -> Result<&ServiceConfig, ControlError> {
        self.desired.services.get(name).ok_or_else(|| ControlError::UnknownService(name.into()))
    }

    /// The config file now says `file`: merge by the rules in `state`, apply, persist.
    pub fn reload_file(&mut self, file: &[ServiceConfig]) -> Result<(), ControlError> {
        let file = by_name(file);
        let merged = self.desired.merged_with_file(&file);
        self.apply(merged)?;
        self.desired.file_services = file;
        self.desired.save(&self.state_dir)?;
        Ok(())
    }

    /// Sets a service's weight by hand; refused while a rollout drives it.
    pub fn set_percent_by_hand(&mut self, name: &str, percent: f64) -> Result<(), ControlError> {
        if self.desired.rollouts.get(name).is_some_and(|r| r.state.is_active()) {
            return Err(ControlError::RolloutActive(name.into()));
        }
        self.set_percent(name, percent)
    }

    /// The kill switch: weight 0 now, whatever else is going on; an active rollout ends
    /// rolled back.
    pub fn kill_switch(&mut self, name: &str, by: &str) -> Result<Vec<FollowUp>, ControlError> {
        self.set_percent(name, 0.0)?;
        let mut follow = Vec::new();
        if let Some(rollout) = self.desired.rollouts.get_mut(name).filter(|r| r.state.is_active()) {
            let effects = rollout.roll_back(now_ms(), format!("kill switch by {by}"));
            follow = self.apply_effects(name, effects)?;
        }
        self.desired.save(&self.state_dir)?;
        Ok(follow)
    }

    /// Sets a service's weight (one map update per frontend).
    pub fn set_percent(&mut self, name: &str, percent: f64) -> Result<(), ControlError> {
        let ppm = validate_percent(percent, "percent")?;
        let service = self.desired.services.get_mut(name).ok_or_else(|| ControlError::UnknownService(name.into()))?;
        self.datapath.set_weight(name, ppm)?;
        service.canary_percent = agent_common::ppm_to_percent(ppm);
        self.desired.save(&self.state_dir)?;
        Ok(())
    }

    /// Adds or replaces a service; `true` when it is new.
    pub fn put_service(&mut self, service: ServiceConfig) -> Result<bool, ControlError> {
        for frontend in &service.frontends {
            let Ok(addr) = frontend.parse::<SocketAddr>() else { continue }; // validation names it
            if let Some(owner) = self.datapath.frontend_owner(&addr).filter(|o| *o != service.name) {
                return Err(ControlError::FrontendInUse { frontend: addr, owner: owner.to_string() });
            }
        }
        let mut services = self.desired.services.clone();
        let created = services.insert(service.name.clone(), service).is_none();
        self.apply(services)?;
        self.desired.save(&self.state_dir)?;
        Ok(created)
    }

    pub fn delete_service(&mut self, name: &str) -> Result<ServiceConfig, ControlError> {
        let mut services = self.desired.services.clone();
        let removed = services.remove(name).ok_or_else(|| ControlError::UnknownService(name.into()))?;
        self.apply(services)?;
        self.desired.save(&self.state_dir)?;
        Ok(removed)
    }

    /// Counters of both sides now.
    pub fn snapshot(&self, name: &str) -> Result<Snapshot, ControlError> {
        let counters = self.datapath.counters(name)?;
        Ok(Snapshot { stable: (&counters.stable).into(), canary: (&counters.canary).into() })
    }

    pub fn rollout(&self, name: &str) -> Result<&Rollout, ControlError> {
        self.service(name)?;
        self.desired.rollouts.get(name).ok_or_else(|| ControlError::NoRollout(name.into()))
    }

    pub fn start_rollout(&mut self, name: &str, plan: Plan, by: &str) -> Result<Vec<FollowUp>, ControlError> {
        self.service(name)?;
        plan.validate()?;
        if self.desired.rollouts.get(name).is_some_and(|r| r.state.is_active()) {
            return Err(ControlError::RolloutActive(name.into()));
        }
        let (rollout, effects) = Rollout::start(plan, now_ms(), self.snapshot(name)?, by);
        self.desired.rollouts.insert(name.to_string(), rollout);
        let follow = self.apply_effects(name, effects)?;
        self.desired.save(&self.state_dir)?;
        Ok(follow)
    }

    /// pause / resume / abort / approve. `approver` is checked by the caller against
    /// `approval_role`.
    pub fn rollout_action(
        &mut self,
        name: &str,
        action: &'static str,
        by: &str,
    ) -> Result<Vec<FollowUp>, ControlError> {
        let snapshot = self.snapshot(name)?;
        let rollout = self.desired.rollouts.get_mut(name).ok_or_else(|| ControlError::NoRollout(name.into()))?;
        let state_err = |state: RolloutState, needed: &'static str| ControlError::RolloutState {
            service: name.into(),
            state: serde_json::to_value(state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            action,
            needed,
        };
        let now = now_ms();
        let effects = match (action, rollout.state) {
            ("pause", RolloutState::Running) => rollout.pause(now, by),
            ("pause", s) => return Err(state_err(s, "a running rollout")),
            ("resume", RolloutState::Paused) => rollout.resume(now, by),
            ("resume", s) => return Err(state_err(s, "a paused rollout")),
            ("approve", RolloutState::AwaitingApproval) => rollout.approve(now, snapshot, by),
            ("approve", s) => return Err(state_err(s, "a rollout awaiting approval")),
            ("abort", s) if s.is_active() => rollout.abort(now, by),
            ("abort", s) => return Err(state_err(s, "an active rollout")),
            (other, _) => unreachable!("unknown rollout action {other}"),
        };
        let follow = self.apply_effects(name, effects)?;
        self.desired.save(&self.state_dir)?;
        Ok(follow)
    }

    /// Advances every running rollout's clock.
    pub fn tick_rollouts(&mut self) -> Vec<FollowUp> {
        let now = now_ms();
        let names: Vec<String> = self
            .desired
            .rollouts
            .iter()
            .filter(|(_, r)| r.state == RolloutState::Running)
            .map(|(n, _)| n.clone())
            .collect();
        let mut follow = Vec::new();
        for name in names {
            let Ok(snapshot) = self.snapshot(&name) else { continue };
            let Some(rollout) = self.desired.rollouts.get_mut(&name) else { continue };
            let before = rollout.clone();
            let effects = rollout.tick(now, snapshot);
            if *rollout == before {
                continue;
            }
            match self.apply_effects(&name, effects) {
                Ok(more) => follow.extend(more),
                Err(err) => log::error!("rollout of {name}: {err}"),
            }
            if let Err(err) = self.desired.save(&self.state_dir) {
                log::error!("saving rollout state: {err}");
            }
        }
        follow
    }

    /// Records what terminating the canary's connections did.
    pub fn note_terminated(&mut self, name: &str, count: usize) {
        if let Some(rollout) = self.desired.rollouts.get_mut(name) {
            rollout.terminated_connections = Some(count as u64);
            let _ = self.desired.save(&self.state_dir);
        }
    }

    /// Applies a rollout's effects to the datapath (weight first) and returns what must happen
    /// outside the lock.
    fn apply_effects(&mut self, name: &str, effects: Vec<Effect>) -> Result<Vec<FollowUp>, ControlError> {
        let mut follow = Vec::new();
        for effect in effects {
            match effect {
                Effect::SetPercent(percent) => self.set_percent(name, percent)?,
                Effect::RollBack { terminate_connections } => {
                    self.set_percent(name, 0.0)?;
                    if terminate_connections {
                        let backends = self.datapath.service(name).map(|v| v.spec.canary).unwrap_or_default();
                        follow.push(FollowUp::TerminateCanary { service: name.into(), backends });
                    }
                }
                Effect::Notify(event) => {
                    let rollout = &self.desired.rollouts[name];
                    if !rollout.plan.webhooks.is_empty() {
                        follow.push(FollowUp::Notify {
                            service: name.into(),
                            event: event.clone(),
                            webhooks: rollout.plan.webhooks.clone(),
                            payload: serde_json::json!({
                                "event": event,
                                "service": name,
                                "state": rollout.state,
                                "step": rollout.step,
                                "percent": rollout.percent,
                                "gates": rollout.last_gates,
                                "at_unix_ms": now_ms(),
                            }),
                        });
                    }
                }
            }
        }
        Ok(follow)
    }

    /// Validates `services` as a whole and makes the datapath hold exactly them (Kubernetes
    /// services with the addresses discovery last gave them).
    fn apply(&mut self, services: BTreeMap<String, ServiceConfig>) -> Result<(), ControlError> {
        let list: Vec<ServiceConfig> = services.values().cloned().collect();
        let mut specs = validate_services(&list, self.cgroup_root.as_deref())?;
        self.discovery.overlay(&mut specs, &HashSet::new());
        self.datapath.sync(&specs)?;
        self.desired.services = services;
        self.discovery.publish_wanted(self.desired.services.values());
        Ok(())
    }

    /// Kubernetes discovery's one way in: `name`'s frontends and backends are now `update`'s.
    /// Applied as one backend-set switch when they differ from what the datapath holds; nothing
    /// goes into the desired state (each node watches for itself, in cluster mode too).
    pub fn set_discovered(&mut self, name: &str, update: Discovered) {
        let Some(config) = self.desired.services.get(name) else { return };
        // Frontends other services have keep their owner.
        let claimed: HashSet<SocketAddr> = update
            .groups
            .iter()
            .flat_map(|g| g.frontends.iter().copied())
            .filter(|f| self.datapath.frontend_owner(f).is_some_and(|owner| owner != name))
            .collect();
        if !self.discovery.record(config, update) {
            return; // for a table the service no longer has
        }
        let mut spec = match validate_service(config, "", self.cgroup_root.as_deref()) {
            Ok(spec) => spec,
            Err(err) => return log::error!("service {name}: {err}"),
        };
        self.discovery.overlay(std::slice::from_mut(&mut spec), &claimed);
        if self.datapath.service(name).is_some_and(|installed| installed.spec == spec) {
            return; // a status change only
        }
        match self.datapath.replace_service(spec) {
            Ok(()) => self.discovery.note_applied(name, now_ms()),
            Err(err) => log::error!("service {name}: applying discovered backends: {err}"),
        }
    }

    /// Discovery's state, for the API and metrics.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }
}
