//! The one owner of the eBPF programs and map handles. HTTP handlers (and anything else) change
//! the datapath only through the intent-level methods here.
//!
//! Update order is what makes changes atomic for a connecting socket: a new backend revision is
//! written whole before any frontend points at it; each frontend value (weight, flags, revision,
//! counts) is replaced in one map update; a revision's backends are deleted only after no
//! frontend has pointed at it for `REVISION_GRACE`.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::{
    service_seed, v4_mapped, BackendKey, BackendValue, CohortKey, CounterKey, FrontendKey, FrontendValue, Settings,
    SideCounters, SocketEntry, COHORT_ALWAYS_CANARY, COHORT_NEVER_CANARY, FAMILY_V4, FAMILY_V6, FLAG_AFFINITY_CLIENT,
    FLAG_HAS_COHORTS, MAP_BACKENDS, MAP_COHORTS, MAP_COUNTERS, MAP_FRONTENDS, MAP_SETTINGS, MAP_SOCKETS, MAX_SERVICES,
    SIDE_CANARY, SIDE_STABLE,
};
use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues},
    programs::{
        links::FdLink, BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, ProgramFd, SockOps,
    },
    Btf, BtfError, Ebpf, EbpfError, EbpfLoader,
};

use crate::config::{Affinity, CohortCanary, ServiceSpec};

/// The eBPF object built by build.rs from `agent-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockshift-ebpf"));

/// How long a replaced backend revision stays readable: far longer than any program run, so a
/// socket that read the old frontend value still finds the old backends.
pub const REVISION_GRACE: Duration = Duration::from_secs(2);

/// The programs and the hook each attaches to.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "sock4_connect",
    "sock6_connect",
    "sock4_sendmsg",
    "sock6_sendmsg",
    "sock4_recvmsg",
    "sock6_recvmsg",
    "sock4_getpeername",
    "sock6_getpeername",
];
const SOCK_RELEASE_PROGRAM: &str = "sock_release";
const SOCK_OPS_PROGRAM: &str = "sock_health";
const RESET_TRACEPOINT_PROGRAM: &str = "tcp_receive_reset";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs directory {path}: {source}")]
    Bpffs { path: PathBuf, source: std::io::Error },
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("attaching {name}: {source}")]
    Attach { name: &'static str, source: std::io::Error },
    #[error("pinned link of {name}: {source}")]
    Link { name: &'static str, source: std::io::Error },
    #[error("reading kernel BTF from /sys/kernel/btf/vmlinux: {0}")]
    Btf(#[from] BtfError),
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("service {0:?} not found")]
    UnknownService(String),
    #[error("no free service id: at most {MAX_SERVICES} services")]
    TooManyServices,
    #[error("reading the host network namespace cookie: {0}")]
    NetnsCookie(std::io::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// A service as installed in the maps.
#[derive(Debug, Clone)]
struct Installed {
    id: u32,
    spec: ServiceSpec,
    /// The frontend value of the service's first backend group (its revision is the service's).
    value: FrontendValue,
    /// Every frontend's value: they differ in revision and counts when the service has port
    /// groups (a Kubernetes Service's ports), and share everything else.
    frontend_values: Vec<(FrontendKey, FrontendValue)>,
    backend_slots: Vec<BackendKey>,
    cohort_keys: Vec<CohortKey>,
}

/// Counters of both sides of a service, summed over CPUs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceCounters {
    pub stable: SideCounters,
    pub canary: SideCounters,
}

/// Read-only view of one installed service.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub id: u32,
    pub revision: u32,
    pub spec: ServiceSpec,
}

pub struct Datapath {
    // Holds the programs and their cgroup links: dropping it detaches them.
    _ebpf: Ebpf,
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    sockets: HashMap<MapData, u64, SocketEntry>,
    counters: PerCpuHashMap<MapData, CounterKey, SideCounters>,
    cohorts: HashMap<MapData, CohortKey, u32>,
    services: BTreeMap<String, Installed>,
    next_revision: u32,
    /// Service ids: never used yet from `next_service_id` on, and released ones.
    next_service_id: u32,
    released_service_ids: Vec<u32>,
    used_service_ids: HashSet<u32>,
    /// Service ids an earlier run gave each frontend (read from the pinned map at load): a
    /// service keeps its id, and so its counters, across restarts.
    previous_ids: std::collections::HashMap<FrontendKey, u32>,
    /// Backend slots of replaced revisions, with when they stopped being referenced.
    retired: Vec<(Instant, Vec<BackendKey>)>,
    nr_cpus: usize,
}

impl Datapath {
    /// Loads the programs, pins the maps under `bpffs_dir`, and attaches every program to
    /// `cgroup`. Maps already pinned there (by an earlier run) are reused.
    pub fn load(cgroup: &Path, bpffs_dir: &Path) -> Result<Self, DatapathError> {
        let cgroup_file =
            File::open(cgroup).map_err(|source| DatapathError::Cgroup { path: cgroup.to_owned(), source })?;
        crate::paths::ensure_bpffs_mounted()
            .map_err(|source| DatapathError::Bpffs { path: bpffs_dir.to_owned(), source })?;
        std::fs::create_dir_all(bpffs_dir)
            .map_err(|source| DatapathError::Bpffs { path: bpffs_dir.to_owned(), source })?;

        let mut ebpf = EbpfLoader::new().default_map_pin_directory(bpffs_dir).load(EBPF_OBJECT)?;

        // Every program is reached through a bpf link pinned under <bpffs>/links, so the
        // datapath outlives the agent. A link pinned by an earlier run is kept and switched to
        // the new program in one step (BPF_LINK_UPDATE): the hook is never left empty, which is
        // what makes restarts and upgrades invisible to connecting sockets.
        let links_dir = bpffs_dir.join("links");
        std::fs::create_dir_all(&links_dir)
            .map_err(|source| DatapathError::Bpffs { path: links_dir.clone(), source })?;
        let mut link_outcomes = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program.load().map_err(|source| DatapathError::Program { name, source })?;
            let outcome = install_link(&links_dir, name, program_fd(program.fd(), name)?, true, || {
                let id = program.attach(&cgroup_file, CgroupAttachMode::Single).map_err(std::io::Error::other)?;
                FdLink::try_from(program.take_link(id).map_err(std::io::Error::other)?).map_err(std::io::Error::other)
            })?;
            link_outcomes.push((name, outcome));
        }
        let name = SOCK_RELEASE_PROGRAM;
        let release: &mut CgroupSock = program_mut(&mut ebpf, name)?;
        release.load().map_err(|source| DatapathError::Program { name, source })?;
        let outcome = install_link(&links_dir, name, program_fd(release.fd(), name)?, true, || {
            let id = release.attach(&cgroup_file, CgroupAttachMode::Single).map_err(std::io::Error::other)?;
            FdLink::try_from(release.take_link(id).map_err(std::io::Error::other)?).map_err(std::io::Error::other)
        })?;
        link_outcomes.push((name, outcome));
        let name = SOCK_OPS_PROGRAM;
        let sock_ops: &mut SockOps = program_mut(&mut ebpf, name)?;
        sock_ops.load().map_err(|source| DatapathError::Program { name, source })?;
        let outcome = install_link(&links_dir, name, program_fd(sock_ops.fd(), name)?, true, || {
            let id = sock_ops.attach(&cgroup_file, CgroupAttachMode::Single).map_err(std::io::Error::other)?;
            FdLink::try_from(sock_ops.take_link(id).map_err(std::io::Error::other)?).map_err(std::io::Error::other)
        })?;
        link_outcomes.push((name, outcome));
        let btf = Btf::from_sys_fs()?;
        let name = RESET_TRACEPOINT_PROGRAM;
        let resets: &mut BtfTracePoint = program_mut(&mut ebpf, name)?;
        resets.load("tcp_receive_reset", &btf).map_err(|source| DatapathError::Program { name, source })?;
        // Tracing links cannot be updated in place: the new one is attached before the old one
        // goes, so a reset may at worst be counted twice during an upgrade, never missed.
        let outcome = install_link(&links_dir, name, program_fd(resets.fd(), name)?, false, || {
            let id = resets.attach().map_err(std::io::Error::other)?;
            Ok(FdLink::from(resets.take_link(id).map_err(std::io::Error::other)?))
        })?;
        link_outcomes.push((name, outcome));
        let adopted = link_outcomes.iter().filter(|(_, o)| *o == LinkOutcome::Updated).count();
        if adopted > 0 {
            log::info!("adopted {adopted} pinned links from {}: programs replaced in place", links_dir.display());
        }

        let frontends: HashMap<MapData, FrontendKey, FrontendValue> = take_map(&mut ebpf, MAP_FRONTENDS)?;
        let backends: HashMap<MapData, BackendKey, BackendValue> = take_map(&mut ebpf, MAP_BACKENDS)?;
        let sockets = take_map(&mut ebpf, MAP_SOCKETS)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        let cohorts = take_map(&mut ebpf, MAP_COHORTS)?;
        let mut settings: Array<MapData, Settings> = take_map(&mut ebpf, MAP_SETTINGS)?;
        settings.set(0, Settings { host_netns_cookie: host_netns_cookie()? }, 0).map_err(map_err(MAP_SETTINGS))?;

        let previous_ids = frontends
            .iter()
            .filter_map(Result::ok)
            .map(|(key, value): (FrontendKey, FrontendValue)| (key, value.service_id))
            .collect();
        // Revisions left by an earlier run stay readable until this run has replaced them.
        let leftover: Vec<BackendKey> = backends.keys().filter_map(Result::ok).collect();
        let next_revision = leftover.iter().map(|k| k.revision).max().map_or(1, |r| r.wrapping_add(1).max(1));
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, err)| DatapathError::NetnsCookie(err))?;
        Ok(Self {
            _ebpf: ebpf,
            frontends,
            backends,
            sockets,
            counters,
            cohorts,
            services: BTreeMap::new(),
            next_service_id: 0,
            released_service_ids: Vec::new(),
            used_service_ids: HashSet::new(),
            previous_ids,
            next_revision,
            retired: vec![(Instant::now(), leftover)],
            nr_cpus,
        })
    }

    /// Makes the datapath hold exactly `services`: installs or replaces each changed one and
    /// removes the installed ones not listed.
    pub fn sync(&mut self, services: &[ServiceSpec]) -> Result<(), DatapathError> {
        for spec in services {
            if self.services.get(&spec.name).is_some_and(|installed| installed.spec == *spec) {
                continue; // unchanged: no new revision
            }
            self.replace_service(spec.clone())?;
        }
        let wanted: HashSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let stale: Vec<String> = self.services.keys().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
        for name in stale {
            self.remove_service(&name)?;
        }
        Ok(())
    }

    /// Deletes pinned entries no installed service owns: left by an earlier run. Needed once,
    /// after the first `sync` at start; every later change cleans up after itself.
    pub fn remove_leftovers(&mut self) {
        let owned: HashSet<FrontendKey> = self.services.values().flat_map(|s| frontend_keys(&s.spec)).collect();
        let orphans: Vec<FrontendKey> =
            self.frontends.keys().filter_map(Result::ok).filter(|k| !owned.contains(k)).collect();
        for key in orphans {
            let _ = self.frontends.remove(&key);
        }
        let ids: HashSet<u32> = self.services.values().map(|s| s.id).collect();
        let orphan_counters: Vec<CounterKey> =
            self.counters.keys().filter_map(Result::ok).filter(|k| !ids.contains(&k.service_id)).collect();
        for key in orphan_counters {
            let _ = self.counters.remove(&key);
        }
        let owned_cohorts: HashSet<CohortKey> =
            self.services.values().flat_map(|s| s.cohort_keys.iter().copied()).collect();
        let orphan_cohorts: Vec<CohortKey> =
            self.cohorts.keys().filter_map(Result::ok).filter(|k| !owned_cohorts.contains(k)).collect();
        for key in orphan_cohorts {
            let _ = self.cohorts.remove(&key);
        }
    }

    /// Installs a service or replaces it whole (backends, weight, affinity, cohorts).
    pub fn replace_service(&mut self, spec: ServiceSpec) -> Result<(), DatapathError> {
        self.reap_retired();
        let previous = self.services.get(&spec.name).cloned();
        let id = match &previous {
            Some(installed) => installed.id,
            None => self.free_service_id(&spec)?,
        };
        if previous.is_none() {
            for side in [SIDE_STABLE, SIDE_CANARY] {
                let key = CounterKey { service_id: id, side: side as u32 };
                // Keep counts a previous run left for this id: they are still this side's.
                if self.counters.get(&key, 0).is_err() {
                    self.insert_zero_counters(key)?;
                }
            }
        }

        // 1. The new revision's backends, complete before anything points at them: one revision
        // per backend group (a hand-written service is one group; a Kubernetes service has one
        // per Service port, each frontend port with its own target port).
        let groups: Vec<(&[SocketAddr], &[SocketAddr], &[SocketAddr])> = if spec.port_groups.is_empty() {
            vec![(&spec.frontends, &spec.stable, &spec.canary)]
        } else {
            spec.port_groups.iter().map(|g| (&g.frontends[..], &g.stable[..], &g.canary[..])).collect()
        };
        let mut flags = 0;
        if spec.affinity == Affinity::Client {
            flags |= FLAG_AFFINITY_CLIENT;
        }
        let mut backend_slots = Vec::new();
        let mut group_values = Vec::with_capacity(groups.len());
        for (frontends, stable, canary) in groups {
            let revision = self.allocate_revision();
            let mut value = FrontendValue {
                service_id: id,
                revision,
                canary_ppm: spec.canary_ppm,
                flags,
                seed: service_seed(spec.name.as_bytes()),
                ..Default::default()
            };
            for (side, addrs) in [(SIDE_STABLE, stable), (SIDE_CANARY, canary)] {
                for family in [FAMILY_V4, FAMILY_V6] {
                    let family_addrs = addrs.iter().filter(|a| family_of(a) == family);
                    let mut count: u16 = 0;
                    for addr in family_addrs {
                        let key = BackendKey { revision, side, family, index: count };
                        if let Err(err) = self.backends.insert(key, backend_value(addr), 0) {
                            self.delete_backends(&backend_slots);
                            return Err(DatapathError::Map { name: MAP_BACKENDS, source: err });
                        }
                        backend_slots.push(key);
                        count += 1;
                    }
                    match (side, family) {
                        (SIDE_STABLE, FAMILY_V4) => value.stable_v4 = count,
                        (SIDE_STABLE, _) => value.stable_v6 = count,
                        (_, FAMILY_V4) => value.canary_v4 = count,
                        _ => value.canary_v6 = count,
                    }
                }
            }
            group_values.push((frontends, value));
        }

        // 2. Cohort entries, before the flag that makes the programs look for them.
        let mut cohort_keys = Vec::new();
        for cohort in &spec.cohorts {
            let mode = match cohort.canary {
                CohortCanary::Always => COHORT_ALWAYS_CANARY,
                CohortCanary::Never => COHORT_NEVER_CANARY,
            };
            for &cgroup_id in &cohort.cgroup_ids {
                let key = CohortKey { cgroup_id, service_id: id, _pad: 0 };
                if let Err(err) = self.cohorts.insert(key, mode, 0) {
                    self.delete_backends(&backend_slots);
                    return Err(DatapathError::Map { name: MAP_COHORTS, source: err });
                }
                cohort_keys.push(key);
            }
        }
        if !cohort_keys.is_empty() {
            for (_, value) in &mut group_values {
                value.flags |= FLAG_HAS_COHORTS;
            }
        }
        let frontend_values: Vec<(FrontendKey, FrontendValue)> = group_values
            .iter()
            .flat_map(|(frontends, value)| frontends.iter().map(|addr| (frontend_key(addr), *value)))
            .collect();
        let value = group_values.first().map(|(_, value)| *value).unwrap_or_default();

        // 3. The switch: one update per frontend.
        for (key, value) in &frontend_values {
            self.frontends.insert(key, *value, 0).map_err(map_err(MAP_FRONTENDS))?;
        }
        let new_frontends: Vec<FrontendKey> = frontend_values.iter().map(|(key, _)| *key).collect();

        // 4. What the old revision had and the new one does not.
        if let Some(old) = previous {
            for key in frontend_keys(&old.spec) {
                if !new_frontends.contains(&key) {
                    let _ = self.frontends.remove(&key);
                }
            }
            for key in &old.cohort_keys {
                if !cohort_keys.contains(key) {
                    let _ = self.cohorts.remove(key);
                }
            }
            self.retired.push((Instant::now(), old.backend_slots));
        }
        self.services
            .insert(spec.name.clone(), Installed { id, spec, value, frontend_values, backend_slots, cohort_keys });
        Ok(())
    }

    /// Sets a service's canary weight: one map update per frontend, nothing else changes.
    pub fn set_weight(&mut self, name: &str, canary_ppm: u32) -> Result<(), DatapathError> {
        let installed = self.services.get_mut(name).ok_or_else(|| DatapathError::UnknownService(name.into()))?;
        for (key, value) in &mut installed.frontend_values {
            let new_value = FrontendValue { canary_ppm, ..*value };
            self.frontends.insert(*key, new_value, 0).map_err(map_err(MAP_FRONTENDS))?;
            *value = new_value;
        }
        installed.value.canary_ppm = canary_ppm;
        installed.spec.canary_ppm = canary_ppm;
        installed.spec.source.canary_percent = agent_common::ppm_to_percent(canary_ppm);
        Ok(())
    }

    /// Removes a service: its frontends first, so no new socket is steered, then the rest.
    pub fn remove_service(&mut self, name: &str) -> Result<(), DatapathError> {
        let installed = self.services.remove(name).ok_or_else(|| DatapathError::UnknownService(name.into()))?;
        for key in frontend_keys(&installed.spec) {
            let _ = self.frontends.remove(&key);
        }
        for key in &installed.cohort_keys {
            let _ = self.cohorts.remove(key);
        }
        for side in [SIDE_STABLE, SIDE_CANARY] {
            let _ = self.counters.remove(&CounterKey { service_id: installed.id, side: side as u32 });
        }
        self.retired.push((Instant::now(), installed.backend_slots));
        self.released_service_ids.push(installed.id);
        self.used_service_ids.remove(&installed.id);
        Ok(())
    }

    pub fn service(&self, name: &str) -> Option<ServiceView> {
        self.services.get(name).map(|s| ServiceView { id: s.id, revision: s.value.revision, spec: s.spec.clone() })
    }

    /// The service that has `frontend`, if any.
    pub fn frontend_owner(&self, frontend: &SocketAddr) -> Option<&str> {
        self.services.values().find(|s| s.spec.frontends.contains(frontend)).map(|s| s.spec.name.as_str())
    }

    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Counters of a service, summed over CPUs.
    pub fn counters(&self, name: &str) -> Result<ServiceCounters, DatapathError> {
        let installed = self.services.get(name).ok_or_else(|| DatapathError::UnknownService(name.into()))?;
        let read = |side: u8| -> Result<SideCounters, DatapathError> {
            let key = CounterKey { service_id: installed.id, side: side as u32 };
            let per_cpu = self.counters.get(&key, 0).map_err(map_err(MAP_COUNTERS))?;
            let mut total = SideCounters::default();
            for cpu in per_cpu.iter() {
                total.add(cpu);
            }
            Ok(total)
        };
        Ok(ServiceCounters { stable: read(SIDE_STABLE)?, canary: read(SIDE_CANARY)? })
    }

    /// Steered sockets currently open (entries in the socket table).
    pub fn open_steered_sockets(&self) -> usize {
        self.sockets.keys().count()
    }

    /// Deletes the backends of revisions that have been unreferenced for `REVISION_GRACE`.
    pub fn reap_retired(&mut self) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(since, _)| now.duration_since(*since) >= REVISION_GRACE);
        self.retired = keep;
        for (_, slots) in due {
            self.delete_backends(&slots);
        }
    }

    /// Creates a side's counters. Per-CPU entries come from the kernel's per-CPU allocator,
    /// which fails with ENOMEM while it grows its pool in the background (it may not sleep in
    /// this path), so a short retry rides that out.
    fn insert_zero_counters(&mut self, key: CounterKey) -> Result<(), DatapathError> {
        let mut attempt = 0;
        loop {
            let zero = PerCpuValues::try_from(vec![SideCounters::default(); self.nr_cpus])
                .map_err(|err| map_err(MAP_COUNTERS)(MapError::from(err)))?;
            match self.counters.insert(key, zero, 0) {
                Ok(()) => return Ok(()),
                Err(MapError::SyscallError(err))
                    if err.io_error.raw_os_error() == Some(libc::ENOMEM) && attempt < 200 =>
                {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(err) => return Err(map_err(MAP_COUNTERS)(err)),
            }
        }
    }

    fn delete_backends(&mut self, slots: &[BackendKey]) {
        for key in slots {
            let _ = self.backends.remove(key);
        }
    }

    fn allocate_revision(&mut self) -> u32 {
        let revision = self.next_revision;
        // Revision 0 is never used, so a zeroed value cannot match a real revision.
        self.next_revision = self.next_revision.wrapping_add(1).max(1);
        revision
    }

    /// An id for a new service: the one an earlier run gave its frontend if that is free, else
    /// a released one, else the next never used.
    fn free_service_id(&mut self, spec: &ServiceSpec) -> Result<u32, DatapathError> {
        let earlier = frontend_keys(spec)
            .iter()
            .filter_map(|key| self.previous_ids.get(key).copied())
            .find(|id| !self.used_service_ids.contains(id));
        let id = match earlier {
            Some(id) => id,
            None => loop {
                let candidate = match self.released_service_ids.pop() {
                    Some(id) => id,
                    None if self.next_service_id < MAX_SERVICES => {
                        self.next_service_id += 1;
                        self.next_service_id - 1
                    }
                    None => return Err(DatapathError::TooManyServices),
                };
                if !self.used_service_ids.contains(&candidate) {
                    break candidate;
                }
            },
        };
        self.used_service_ids.insert(id);
        Ok(id)
    }
}

/// What happened to a program's link at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// No link was pinned: attached and pinned now.
    Attached,
    /// A pinned link now runs the new program (atomic).
    Updated,
    /// A pinned link that cannot be updated was replaced by a new one.
    Replaced,
}

fn program_fd(fd: Result<&ProgramFd, ProgramError>, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let fd = fd.map_err(|source| DatapathError::Program { name, source })?;
    fd.as_fd().try_clone_to_owned().map_err(|source| DatapathError::Link { name, source })
}

/// Makes the link pinned at `<links_dir>/<name>` run `program`: by updating a pinned link in
/// place, or by attaching (with `attach`) and pinning a new one.
fn install_link(
    links_dir: &Path,
    name: &'static str,
    program: OwnedFd,
    updatable: bool,
    attach: impl FnOnce() -> Result<FdLink, std::io::Error>,
) -> Result<LinkOutcome, DatapathError> {
    let pin = links_dir.join(name);
    let link_err = |source| DatapathError::Link { name, source };
    if pin.exists() && updatable {
        let link = crate::bpf_sys::obj_get(&pin).map_err(link_err)?;
        crate::bpf_sys::link_update(link.as_fd(), program.as_fd()).map_err(link_err)?;
        return Ok(LinkOutcome::Updated);
    }
    let link = attach().map_err(|source| DatapathError::Attach { name, source })?;
    let outcome = if pin.exists() {
        // Unpinning the old link detaches it; the new one is already attached.
        std::fs::remove_file(&pin).map_err(link_err)?;
        LinkOutcome::Replaced
    } else {
        LinkOutcome::Attached
    };
    link.pin(&pin).map_err(|err| link_err(std::io::Error::other(err.to_string())))?;
    Ok(outcome)
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program =
        ebpf.program_mut(name).ok_or(DatapathError::Program { name, source: ProgramError::UnexpectedProgramType })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(map_err(name))
}

fn family_of(addr: &SocketAddr) -> u8 {
    if addr.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

/// The map form of an address: IPv6 bytes (IPv4 v4-mapped) as native-endian words.
pub fn addr_words(addr: &SocketAddr) -> [u32; 4] {
    match addr {
        SocketAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.ip().octets())),
        SocketAddr::V6(v6) => {
            let o = v6.ip().octets();
            std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
        }
    }
}

fn backend_value(addr: &SocketAddr) -> BackendValue {
    BackendValue { addr_be: addr_words(addr), port_be: addr.port().to_be(), _pad: 0 }
}

fn frontend_keys(spec: &ServiceSpec) -> Vec<FrontendKey> {
    spec.frontends.iter().map(frontend_key).collect()
}

fn frontend_key(addr: &SocketAddr) -> FrontendKey {
    FrontendKey { addr_be: addr_words(addr), port_be: addr.port().to_be(), _pad: 0 }
}

/// Cookie of the agent's own network namespace, which is the host's for a DaemonSet with
/// hostNetwork.
fn host_netns_cookie() -> Result<u64, DatapathError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(DatapathError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(DatapathError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}
