//! The agent's control core: desired state, the datapath that enforces it, and the persisted
//! copy, changed together. Every change is validated whole before anything is touched; the
//! datapath is changed first and the state file written after, so the file never claims more
//! than the kernel does.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{
    config::{validate_percent, validate_services, InvalidField, ServiceConfig, ServiceSpec},
    datapath::{Datapath, DatapathError},
    state::{DesiredState, StateError},
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error("frontend {frontend} already belongs to service {owner:?}")]
    FrontendInUse { frontend: SocketAddr, owner: String },
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
        let mut core = Self { datapath, desired, state_dir: state_dir.to_owned(), cgroup_root };
        let file: Vec<ServiceConfig> = file_services.iter().map(|s| s.source.clone()).collect();
        if let Err(err) = core.reload_file(&file) {
            // The persisted API changes no longer fit with the file (say, a frontend the file
            // now gives another service): the file alone is known to be valid.
            log::error!("persisted state conflicts with the config file ({err}); using the config file alone");
            core.desired = DesiredState::default();
            core.reload_file(&file)?;
        }
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

    /// Validates `services` as a whole and makes the datapath hold exactly them.
    fn apply(&mut self, services: BTreeMap<String, ServiceConfig>) -> Result<(), ControlError> {
        let list: Vec<ServiceConfig> = services.values().cloned().collect();
        let specs = validate_services(&list, self.cgroup_root.as_deref())?;
        self.datapath.sync(&specs)?;
        self.desired.services = services;
        Ok(())
    }
}
