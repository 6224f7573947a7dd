//! Desired state: what the agent should be steering, persisted so a restart restores it.
//!
//! Two writers change it: the config file and the API. The rule, per service, is "the last
//! change wins": an API change holds until the config file's own entry for that service changes;
//! a change to a service in the file replaces whatever the API did to it. Concretely, on every
//! (re)load of the file, for each service:
//! - in the new file and different from the previous file (or new): the file's version is used;
//! - in the new file and unchanged since the previous file: the desired state is kept (so API
//!   changes, including an API delete, survive restarts and unrelated file edits);
//! - gone from the file: removed;
//! - never in the file (added through the API): kept.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{config::ServiceConfig, rollout::Rollout};

/// File name of the state under `agent.state_dir`.
pub const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading state {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state {path} is not valid JSON state: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("state {path} has version {found}, this agent reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("writing state {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub version: u32,
    /// What the datapath should hold.
    pub services: BTreeMap<String, ServiceConfig>,
    /// The config file's services at the last reconcile, to tell file changes from API ones.
    pub file_services: BTreeMap<String, ServiceConfig>,
    /// Rollouts by service, active and finished (the last one of each service).
    #[serde(default)]
    pub rollouts: BTreeMap<String, Rollout>,
}

impl DesiredState {
    /// Loads the state from `dir`, or `None` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let state: Self =
            serde_json::from_slice(&text).map_err(|source| StateError::Parse { path: path.clone(), source })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version { path, found: state.version });
        }
        Ok(Some(state))
    }

    /// Writes the state atomically: a temporary file, fsync, rename over the old one, fsync of
    /// the directory. A crash leaves the old state or the new one, never a torn file.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let write_err = |source| StateError::Write { path: path.clone(), source };
        fs::create_dir_all(dir).map_err(write_err)?;
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let state = Self { version: STATE_VERSION, ..self.clone() };
        let bytes = serde_json::to_vec_pretty(&state).expect("state serializes");
        let mut file = File::create(&tmp).map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        fs::rename(&tmp, &path).map_err(write_err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
        Ok(())
    }

    /// The desired services after the config file now says `file` (see the module docs).
    pub fn merged_with_file(&self, file: &BTreeMap<String, ServiceConfig>) -> BTreeMap<String, ServiceConfig> {
        let mut services = self.services.clone();
        for (name, service) in file {
            if self.file_services.get(name) != Some(service) {
                services.insert(name.clone(), service.clone());
            }
        }
        for name in self.file_services.keys() {
            if !file.contains_key(name) {
                services.remove(name);
            }
        }
        services
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Affinity;

    fn service(name: &str, percent: f64) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            frontends: vec!["127.1.0.1:80".into()],
            stable: vec![],
            canary: vec![],
            canary_percent: percent,
            affinity: Affinity::Connection,
            max_operator_percent: 100.0,
            cohorts: vec![],
            kubernetes: None,
        }
    }

    fn map(services: &[ServiceConfig]) -> BTreeMap<String, ServiceConfig> {
        services.iter().map(|s| (s.name.clone(), s.clone())).collect()
    }

    #[test]
    fn first_load_takes_the_file() {
        let file = map(&[service("a", 5.0)]);
        assert_eq!(DesiredState::default().merged_with_file(&file), file);
    }

    #[test]
    fn api_changes_survive_an_unchanged_file_and_unrelated_edits() {
        let file = map(&[service("a", 5.0), service("b", 1.0)]);
        let state = DesiredState {
            version: 1,
            services: map(&[service("a", 37.5), service("c", 2.0)]), // a set by API, b deleted, c added
            file_services: file.clone(),
            rollouts: BTreeMap::new(),
        };
        assert_eq!(state.merged_with_file(&file), state.services);
        let edited = map(&[service("a", 5.0), service("b", 1.0), service("d", 3.0)]);
        let merged = state.merged_with_file(&edited);
        assert_eq!(merged["a"].canary_percent, 37.5);
        assert!(!merged.contains_key("b"), "the API delete holds while b is unchanged in the file");
        assert!(merged.contains_key("c") && merged.contains_key("d"));
    }

    #[test]
    fn a_file_change_to_a_service_wins_over_the_api() {
        let file = map(&[service("a", 5.0)]);
        let state = DesiredState {
            version: 1,
            services: map(&[service("a", 37.5)]),
            file_services: file,
            rollouts: BTreeMap::new(),
        };
        let merged = state.merged_with_file(&map(&[service("a", 10.0)]));
        assert_eq!(merged["a"].canary_percent, 10.0);
        assert!(state.merged_with_file(&BTreeMap::new()).is_empty(), "removed from the file: removed");
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("sockshift-state-test-{}", std::process::id()));
        let state = DesiredState {
            version: 1,
            services: map(&[service("a", 12.3456)]),
            file_services: BTreeMap::new(),
            rollouts: BTreeMap::new(),
        };
        state.save(&dir).unwrap();
        assert_eq!(DesiredState::load(&dir).unwrap(), Some(state));
        fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(DesiredState::load(&dir), Err(StateError::Parse { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
