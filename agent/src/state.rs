//! The rules that decide which services the agent runs, when two writers (the config file and
//! the API) and a restart meet. Where the state is kept is `control::store`.
//!
//! Per service, "the last change wins": an API change holds until the config file's own entry
//! for that service changes; a change to a service in the file replaces whatever the API did to
//! it. Concretely, on every (re)load of the file, for each service:
//! - in the new file and different from the previous file (or new): the file's version is used;
//! - in the new file and unchanged since the previous file: the desired state is kept (so API
//!   changes, including an API delete, survive restarts and unrelated file edits);
//! - gone from the file: removed;
//! - never in the file (added through the API): kept.
//!
//! At start, a persisted service that no longer fits (its frontend now belongs to a service of
//! the file, or it no longer validates) is dropped on its own, with the reason logged: the file's
//! version of a service it changed comes back, and every other persisted change stays.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use crate::config::{InvalidField, ServiceConfig, ServiceSpec};

/// The desired services after the config file now says `file`, given the `current` services and
/// the file's services at the last reconcile (`previous_file`). See the module docs.
pub fn merged_with_file(
    current: &BTreeMap<String, ServiceConfig>,
    previous_file: &BTreeMap<String, ServiceConfig>,
    file: &BTreeMap<String, ServiceConfig>,
) -> BTreeMap<String, ServiceConfig> {
    let mut services = current.clone();
    for (name, service) in file {
        if previous_file.get(name) != Some(service) {
            services.insert(name.clone(), service.clone());
        }
    }
    for name in previous_file.keys() {
        if !file.contains_key(name) {
            services.remove(name);
        }
    }
    services
}

/// Why a persisted service was dropped at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub service: String,
    pub reason: String,
}

/// The services to run at start (and their validated specs): `merged` (see
/// [`merged_with_file`]) without the services that do not fit. The file's own versions go in first (the file validated as a whole); then every
/// service the API made or changed, one at a time, each dropped if it does not validate
/// (`validate`) or takes a frontend already taken. A dropped API change to a file service leaves
/// the file's version in place.
pub fn reconcile(
    merged: &BTreeMap<String, ServiceConfig>,
    file: &BTreeMap<String, ServiceConfig>,
    validate: impl Fn(&ServiceConfig) -> Result<ServiceSpec, InvalidField>,
) -> (BTreeMap<String, ServiceConfig>, Vec<ServiceSpec>, Vec<Dropped>) {
    let mut kept = BTreeMap::new();
    let mut specs: HashMap<String, ServiceSpec> = HashMap::new();
    let mut owners: HashMap<SocketAddr, String> = HashMap::new();
    let mut frontends_of: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut dropped = Vec::new();
    let mut admit = |service: &ServiceConfig, kept: &mut BTreeMap<String, ServiceConfig>| -> Result<(), String> {
        let spec = validate(service).map_err(|err| err.to_string())?;
        if let Some((frontend, owner)) =
            spec.frontends.iter().find_map(|f| owners.get(f).filter(|o| **o != service.name).map(|o| (f, o.clone())))
        {
            return Err(format!("frontend {frontend} belongs to service {owner:?}"));
        }
        for old in frontends_of.remove(&service.name).unwrap_or_default() {
            owners.remove(&old);
        }
        owners.extend(spec.frontends.iter().map(|f| (*f, service.name.clone())));
        frontends_of.insert(service.name.clone(), spec.frontends.clone());
        specs.insert(service.name.clone(), spec);
        kept.insert(service.name.clone(), service.clone());
        Ok(())
    };
    for name in merged.keys() {
        if let Some(from_file) = file.get(name) {
            if let Err(reason) = admit(from_file, &mut kept) {
                // The file was validated as a whole; only a vanished cohort cgroup gets here.
                dropped.push(Dropped { service: name.clone(), reason });
            }
        }
    }
    for (name, service) in merged {
        if file.get(name) == Some(service) {
            continue;
        }
        if let Err(reason) = admit(service, &mut kept) {
            dropped.push(Dropped { service: name.clone(), reason });
        }
    }
    let specs = kept.keys().filter_map(|name| specs.remove(name)).collect();
    (kept, specs, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{validate_service, Affinity};

    fn service(name: &str, frontend: &str, percent: f64) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            frontends: vec![frontend.into()],
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

    fn validate(service: &ServiceConfig) -> Result<ServiceSpec, InvalidField> {
        validate_service(service, "", None)
    }

    #[test]
    fn first_load_takes_the_file() {
        let file = map(&[service("a", "127.1.0.1:80", 5.0)]);
        assert_eq!(merged_with_file(&BTreeMap::new(), &BTreeMap::new(), &file), file);
    }

    #[test]
    fn api_changes_survive_an_unchanged_file_and_unrelated_edits() {
        let file = map(&[service("a", "127.1.0.1:80", 5.0), service("b", "127.1.0.2:80", 1.0)]);
        // a set by API, b deleted, c added
        let current = map(&[service("a", "127.1.0.1:80", 37.5), service("c", "127.1.0.3:80", 2.0)]);
        assert_eq!(merged_with_file(&current, &file, &file), current);
        let edited = map(&[
            service("a", "127.1.0.1:80", 5.0),
            service("b", "127.1.0.2:80", 1.0),
            service("d", "127.1.0.4:80", 3.0),
        ]);
        let merged = merged_with_file(&current, &file, &edited);
        assert_eq!(merged["a"].canary_percent, 37.5);
        assert!(!merged.contains_key("b"), "the API delete holds while b is unchanged in the file");
        assert!(merged.contains_key("c") && merged.contains_key("d"));
    }

    #[test]
    fn a_file_change_to_a_service_wins_over_the_api() {
        let file = map(&[service("a", "127.1.0.1:80", 5.0)]);
        let current = map(&[service("a", "127.1.0.1:80", 37.5)]);
        let merged = merged_with_file(&current, &file, &map(&[service("a", "127.1.0.1:80", 10.0)]));
        assert_eq!(merged["a"].canary_percent, 10.0);
        assert!(merged_with_file(&current, &file, &BTreeMap::new()).is_empty(), "removed from the file: removed");
    }

    #[test]
    fn a_conflict_drops_only_the_conflicting_services() {
        // The file now gives 127.1.0.9:80 to "new"; the API had given it to "api-made".
        let file = map(&[service("web", "127.1.0.1:80", 5.0), service("new", "127.1.0.9:80", 0.0)]);
        let merged = map(&[
            service("web", "127.1.0.1:80", 40.0),     // an API weight change: kept
            service("new", "127.1.0.9:80", 0.0),      // from the file
            service("api-made", "127.1.0.9:80", 1.0), // conflicts: dropped
            service("other", "127.1.0.5:80", 2.0),    // unrelated API service: kept
            service("broken", "not-an-address", 2.0), // no longer validates: dropped
        ]);
        let (kept, _, dropped) = reconcile(&merged, &file, validate);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["new", "other", "web"]);
        assert_eq!(kept["web"].canary_percent, 40.0);
        let names: Vec<&str> = dropped.iter().map(|d| d.service.as_str()).collect();
        assert_eq!(names, ["api-made", "broken"]);
        assert!(dropped[0].reason.contains("\"new\""), "{:?}", dropped[0]);
    }

    #[test]
    fn a_dropped_api_change_to_a_file_service_leaves_the_files_version() {
        let file = map(&[service("web", "127.1.0.1:80", 5.0), service("db", "127.1.0.2:80", 0.0)]);
        // The API moved web to db's frontend (db was API-deleted then re-added by the file).
        let merged = map(&[service("web", "127.1.0.2:80", 5.0), service("db", "127.1.0.2:80", 0.0)]);
        let (kept, _, dropped) = reconcile(&merged, &file, validate);
        assert_eq!(kept, file);
        assert_eq!(dropped.len(), 1);
    }
}
