//! The one owner of the eBPF programs and map handles. HTTP handlers (and anything else) change
//! the datapath only through the intent-level methods here.
//!
//! Update order is what makes changes atomic for a connecting socket: a new backend revision (a
//! run of BACKENDS slots, named by its first) is written whole before any frontend points at it;
//! each frontend value (weight, flags, revision, counts) is replaced in one map update; a
//! revision's slots are cleared and handed out again only when no frontend has pointed at it for
//! `REVISION_GRACE`.
//!
//! A change is computed as a whole: `sync` works out the complete frontend table (and cohort
//! table) every service wants, writes what differs, then deletes only the keys absent from it. A
//! frontend that moves from one service to another (or a renamed service) is therefore
//! overwritten, never deleted by the service that no longer has it. At start the tables mirror
//! what an earlier run pinned, so the first `sync` also removes that run's leftovers, and a
//! service whose pinned revision holds exactly its backends keeps it: a restart rewrites nothing.
//!
//! A service is one or more backend groups: frontends that share backends. A hand-written service
//! is one group; a Kubernetes service has one per Service port (port 80 to the pods' 8080, port
//! 443 to their 8443). Each group has a revision of its own; its frontends carry that revision
//! and the group's counts, and share the service's id, weight, flags and seed, so one service is
//! still one split, one set of counters and one cohort table.
//!
//! Module layout: `loader` checks pinned maps and links and attaches the programs, `registry`
//! hands out service ids and backend slots, `sockets` finds and destroys chosen steered sockets.

mod kernel_btf;
mod loader;
pub mod program_log;
mod registry;
mod sockets;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::{
    counter_slot, service_seed, v4_mapped, BackendKeyV1, BackendValue, CohortKey, CounterKey, FrontendKey,
    FrontendValue, Settings, SideCounters, SideCountersV1, SideCountersV3, COHORT_ALWAYS_CANARY, COHORT_NEVER_CANARY,
    COUNTER_SLOTS, FAMILY_V4, FAMILY_V6, FLAG_AFFINITY_CLIENT, FLAG_HAS_COHORTS, MAP_BACKENDS, MAP_BACKENDS_V1,
    MAP_COHORTS, MAP_COUNTERS, MAP_COUNTERS_V1, MAP_COUNTERS_V2, MAP_COUNTERS_V3, MAP_FRONTENDS, MAP_FRONTENDS_V1,
    MAP_SETTINGS, MAP_SETTINGS_V1, MAP_SOCKETS, MAP_SOCKET_SLOTS, MAP_SOCKET_TABLE, MAP_UDP_FLOWS, MAX_BACKEND_SLOTS,
    MAX_FRONTENDS, MAX_SERVICES, MAX_STEERED_SOCKETS, SETTING_HOST_NETNS_ONLY, SIDE_CANARY, SIDE_STABLE,
    SOCKET_SPILLED, SOCKET_TABLE_LEGACY,
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap},
    programs::ProgramError,
    BtfError, Ebpf, EbpfError,
};
pub use loader::{detach_link_pin, ForeignProgram, LinkOutcome, MapMemory};
pub use program_log::RecordFeed;
use registry::{BackendSlots, ServiceIds};
pub use sockets::{Selection, Termination};

pub use crate::config::DatapathLog;
use crate::config::{Affinity, CohortCanary, ServiceSpec};

/// The eBPF object built by build.rs from `agent-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockshift-ebpf"));

/// How long a replaced backend revision stays readable: far longer than any program run, so a
/// socket that read the old frontend value still finds the old backends. Also how long a removed
/// service's id drains at least.
pub const REVISION_GRACE: Duration = Duration::from_secs(2);

/// How long destroying chosen sockets may take before the rest is given up.
pub const TERMINATION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs directory {path}: {source}")]
    Bpffs { path: PathBuf, source: std::io::Error },
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("reading the embedded eBPF object: {0}")]
    Object(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("attaching {name}: {source}")]
    Attach { name: &'static str, source: std::io::Error },
    #[error("pinned link of {name}: {source}")]
    Link { name: &'static str, source: std::io::Error },
    #[error("pinned link {path} {problem}")]
    PinnedLink { path: PathBuf, problem: String },
    #[error("pinned map {path}: {source}")]
    PinnedMap { path: PathBuf, source: MapError },
    #[error(
        "pinned map {path} does not match this agent's definition: its {field} is {pinned}, this agent needs {wanted}; \
         nothing was attached or changed. {hint}"
    )]
    MapMismatch { path: PathBuf, field: &'static str, pinned: u64, wanted: u64, hint: String },
    #[error("reading kernel BTF from /sys/kernel/btf/vmlinux: {0}")]
    Btf(#[from] BtfError),
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("service {0:?} not found")]
    UnknownService(String),
    #[error(
        "no free service id: at most {MAX_SERVICES} services, and {draining} ids still belong to removed services \
         whose sockets are open"
    )]
    TooManyServices { draining: usize },
    #[error("{count} frontends in all, at most {MAX_FRONTENDS} are supported")]
    TooManyFrontends { count: usize },
    #[error(
        "the change needs {needed} backend slots but {free} of {} are free (a service without backends takes one; \
         replaced revisions free theirs {REVISION_GRACE:?} after the change that replaced them)",
        MAX_BACKEND_SLOTS - 1
    )]
    TooManyBackendSlots { needed: usize, free: usize },
    #[error(
        "a backend set of {needed} needs as many neighbouring backend slots, and the longest free run is {longest} \
         ({free} free in all; replaced revisions free theirs {REVISION_GRACE:?} after the change that replaced them)"
    )]
    BackendSlotsFragmented { needed: u32, longest: u32, free: u32 },
    #[error(
        "agent.steered_sockets_per_netns = {per_netns} is more than the socket table holds ({capacity}, the size \
         already pinned or the default, as agent.steered_socket_capacity is not set)"
    )]
    PerNetnsAboveCapacity { per_netns: u32, capacity: u32 },
    #[error("reading the host network namespace cookie: {0}")]
    NetnsCookie(std::io::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// How the datapath is set up: where it attaches and pins, and the socket table's size and
/// bounds. From `[agent]` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathOptions {
    /// cgroup v2 directory whose processes are steered.
    pub cgroup: PathBuf,
    /// bpffs directory of the pinned maps and links.
    pub bpffs: PathBuf,
    /// Size of the socket table (and of the UDP flow table); `None`: the size of the tables
    /// already pinned, else `MAX_STEERED_SOCKETS`.
    pub steered_socket_capacity: Option<u32>,
    /// Most socket records one network namespace may hold; 0: no bound; `None`: a quarter of
    /// the socket table.
    pub steered_sockets_per_netns: Option<u32>,
    /// Steer only the host network namespace's sockets.
    pub host_netns_only: bool,
    /// What the programs log (fixed at load; `Datapath::set_log` reloads them).
    pub log: DatapathLog,
}

impl DatapathOptions {
    /// The defaults for everything but where to attach and pin.
    pub fn new(cgroup: &Path, bpffs: &Path) -> Self {
        Self {
            cgroup: cgroup.to_owned(),
            bpffs: bpffs.to_owned(),
            steered_socket_capacity: None,
            steered_sockets_per_netns: None,
            host_netns_only: false,
            log: DatapathLog::Off,
        }
    }
}

impl From<&crate::config::Config> for DatapathOptions {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            cgroup: config.cgroup.clone(),
            bpffs: config.bpffs.clone(),
            steered_socket_capacity: config.steered_socket_capacity,
            steered_sockets_per_netns: config.steered_sockets_per_netns,
            host_netns_only: config.host_netns_only,
            log: config.datapath_log,
        }
    }
}

/// A quarter of the table: one client namespace cannot take more, and it takes four to fill it.
pub const fn default_sockets_per_netns(capacity: u32) -> u32 {
    capacity / 4
}

/// The socket table's and UDP flow table's sizes, and the per-namespace bound, as they will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    pub sockets: u32,
    pub udp_flows: u32,
    pub sockets_per_netns: u32,
}

impl DatapathOptions {
    /// The configured sizes; where none is configured, the size of the table already pinned (an
    /// upgrade or restart adopts the tables it finds, whatever the default was when they were
    /// made), else the default.
    pub fn table_sizes(&self) -> Result<TableSizes, DatapathError> {
        let pinned = |name: &str| aya::maps::MapInfo::from_pin(self.bpffs.join(name)).ok().map(|i| i.max_entries());
        let (sockets, udp_flows) = match self.steered_socket_capacity {
            Some(capacity) => (capacity, capacity),
            None => (
                pinned(MAP_SOCKETS).unwrap_or(MAX_STEERED_SOCKETS),
                pinned(MAP_UDP_FLOWS).unwrap_or(MAX_STEERED_SOCKETS),
            ),
        };
        let sockets_per_netns = self.steered_sockets_per_netns.unwrap_or(default_sockets_per_netns(sockets));
        if sockets_per_netns > sockets {
            return Err(DatapathError::PerNetnsAboveCapacity { per_netns: sockets_per_netns, capacity: sockets });
        }
        Ok(TableSizes { sockets, udp_flows, sockets_per_netns })
    }
}

/// A service as installed in the maps.
#[derive(Debug, Clone)]
struct Installed {
    id: u32,
    spec: ServiceSpec,
    /// Its backend groups, in the order `backend_groups` gives them.
    groups: Vec<InstalledGroup>,
}

impl Installed {
    /// The revisions its frontends point at.
    fn revisions(&self) -> impl Iterator<Item = u32> + '_ {
        self.groups.iter().map(|g| g.value.revision)
    }
}

/// One backend group as installed: every one of its frontends carries `value`.
#[derive(Debug, Clone)]
struct InstalledGroup {
    frontends: Vec<FrontendKey>,
    /// The group's backends in slot order, to find the revision again when an update keeps them.
    layout: Vec<(BackendPlace, BackendValue)>,
    value: FrontendValue,
}

/// Where a backend sits in its revision: `FrontendValue::backend_slot`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BackendPlace {
    side: u8,
    family: u8,
    index: u16,
}

/// Frontends that share backends: the whole of a hand-written service, or one port of a
/// Kubernetes service.
struct BackendGroup<'a> {
    frontends: &'a [SocketAddr],
    stable: &'a [SocketAddr],
    canary: &'a [SocketAddr],
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
    /// The revision of its first backend group (a Kubernetes service has one per port).
    pub revision: u32,
    pub spec: ServiceSpec,
}

/// Datapath-wide figures, for `GET /v1/datapath`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatapathStatus {
    pub services: usize,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    /// Socket records open now (steered TCP and connected UDP sockets).
    pub open_steered_sockets: u64,
    /// The socket table's real size (the pinned map's), not a constant.
    pub steered_socket_capacity: u32,
    /// The per-namespace bound; 0: none.
    pub steered_sockets_per_netns: u32,
    /// Reply translations of unconnected UDP sockets held now, and the table's size.
    pub udp_flows: usize,
    pub udp_flow_capacity: u32,
    /// Ids of removed services still waiting for their open sockets to close.
    pub draining_service_ids: usize,
    pub host_netns_only: bool,
    /// What the programs log now.
    pub datapath_log: DatapathLog,
    /// What happened to each program's pinned link at start.
    pub links: BTreeMap<&'static str, LinkOutcome>,
    /// Other programs on sockshift's hooks for this cgroup.
    pub foreign_programs: Vec<ForeignProgram>,
    /// Kernel memory of the pinned maps, by map, as the kernel charges it.
    pub maps: Vec<MapMemory>,
}

/// What an earlier run pinned, kept until the first `sync` has adopted what it can.
struct PinnedStart {
    /// Each revision pinned frontends point at, with its backends in slot order.
    revisions: StdHashMap<u32, Vec<(BackendPlace, BackendValue)>>,
}

pub struct Datapath {
    // Holds the programs; the links are pinned, so dropping it detaches nothing.
    ebpf_object: Ebpf,
    /// Reads the programs' log (when `options.log` is not off).
    log_reader: program_log::LogReader,
    options: DatapathOptions,
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    backends: Array<MapData, BackendValue>,
    udp_flows: HashMap<MapData, agent_common::UdpFlowKey, agent_common::UdpFlow>,
    counters: Array<MapData, SideCounters>,
    cohorts: HashMap<MapData, CohortKey, u32>,
    services: BTreeMap<String, Installed>,
    /// What FRONTENDS holds (this process writes it alone).
    frontend_table: StdHashMap<FrontendKey, FrontendValue>,
    /// What COHORTS holds.
    cohort_table: StdHashMap<CohortKey, u32>,
    /// Each revision BACKENDS holds (its first slot) and the slots it takes.
    revisions: StdHashMap<u32, u32>,
    /// Revisions no service refers to any more, since when.
    retired: BTreeMap<u32, Instant>,
    pinned_start: Option<PinnedStart>,
    ids: ServiceIds,
    backend_slots: BackendSlots,
    socket_capacity: u32,
    udp_flow_capacity: u32,
    /// The table sizes this run loaded with (reloads use the same).
    sizes: TableSizes,
    links: BTreeMap<&'static str, LinkOutcome>,
    foreign: Vec<ForeignProgram>,
    terminator: sockets::Terminator,
}

impl Datapath {
    /// Loads the programs, pins (or adopts) the maps under the bpffs directory, and makes the
    /// configured cgroup run every program. Maps already pinned there are checked against the
    /// programs' definitions first and adopted only if they match; nothing is attached otherwise.
    pub fn load(options: &DatapathOptions) -> Result<Self, DatapathError> {
        std::fs::metadata(&options.cgroup)
            .map_err(|source| DatapathError::Cgroup { path: options.cgroup.clone(), source })?;
        crate::paths::ensure_bpffs_mounted()
            .map_err(|source| DatapathError::Bpffs { path: options.bpffs.clone(), source })?;
        std::fs::create_dir_all(&options.bpffs)
            .map_err(|source| DatapathError::Bpffs { path: options.bpffs.clone(), source })?;

        let sizes = options.table_sizes()?;
        loader::check_pinned_maps(options, &sizes)?;
        // An agent before the socket slot table left SOCKETS_V1 and no SOCKET_TABLE_V1: the
        // records its programs made (and make until the links are updated) are in SOCKETS_V1.
        let legacy_records_possible =
            options.bpffs.join(MAP_SOCKETS).exists() && !options.bpffs.join(MAP_SOCKET_TABLE).exists();
        let mut ebpf = loader::load_object(options, &sizes)?;
        let mut frontends: HashMap<MapData, FrontendKey, FrontendValue> = take_map(&mut ebpf, MAP_FRONTENDS)?;
        let mut backends: Array<MapData, BackendValue> = take_map(&mut ebpf, MAP_BACKENDS)?;
        let sockets: HashMap<MapData, u64, agent_common::SocketEntry> = take_map(&mut ebpf, MAP_SOCKETS)?;
        let socket_slots: Array<MapData, agent_common::SocketSlot> = take_map(&mut ebpf, MAP_SOCKET_SLOTS)?;
        let mut socket_table: Array<MapData, u64> = take_map(&mut ebpf, MAP_SOCKET_TABLE)?;
        let udp_flows: HashMap<MapData, agent_common::UdpFlowKey, agent_common::UdpFlow> =
            take_map(&mut ebpf, MAP_UDP_FLOWS)?;
        let mut counters: Array<MapData, SideCounters> = take_map(&mut ebpf, MAP_COUNTERS)?;
        let cohorts: HashMap<MapData, CohortKey, u32> = take_map(&mut ebpf, MAP_COHORTS)?;
        let mut settings: Array<MapData, Settings> = take_map(&mut ebpf, MAP_SETTINGS)?;
        // Settings first: the new programs read them from their first run.
        let value = Settings {
            host_netns_cookie: host_netns_cookie()?,
            sockets_per_netns: sizes.sockets_per_netns,
            flags: if options.host_netns_only { SETTING_HOST_NETNS_ONLY } else { 0 },
        };
        settings.set(0, value, 0).map_err(map_err(MAP_SETTINGS))?;
        // Before the new programs run: they look in the spill table for records an older agent
        // made only while this mark is set.
        mark_legacy_socket_records(&mut socket_table, &sockets, legacy_records_possible)?;

        // An agent before the backend array left FRONTENDS_V1 and BACKENDS_V1: its services are
        // copied over before the new programs run, unless an earlier start already did (the V1
        // pins go only once the new programs run, so a start that failed in between copies again).
        let upgrade_frontends = options.bpffs.join(MAP_FRONTENDS_V1).exists() && frontends.keys().next().is_none();
        let upgraded = if upgrade_frontends {
            upgrade_backends(&options.bpffs, &mut frontends, &mut backends)?
        } else {
            Upgraded::default()
        };

        // What an earlier run left, read before anything changes: the revisions pinned frontends
        // point at (a revision no frontend points at is free: nothing reads it).
        let frontend_table: StdHashMap<FrontendKey, FrontendValue> = frontends.iter().filter_map(Result::ok).collect();
        let cohort_table: StdHashMap<CohortKey, u32> = cohorts.iter().filter_map(Result::ok).collect();
        let mut revisions: StdHashMap<u32, u32> = StdHashMap::new();
        let mut pinned_revisions: StdHashMap<u32, Vec<(BackendPlace, BackendValue)>> = StdHashMap::new();
        for value in frontend_table.values() {
            if value.revision == 0 {
                continue;
            }
            let len = revisions.entry(value.revision).or_insert(0);
            // The longest any frontend gives it (they agree unless the map was tampered with).
            *len = (*len).max(BackendSlots::run_len(value.backend_slots() as usize));
            pinned_revisions.entry(value.revision).or_insert_with(|| pinned_backends(&backends, value));
        }
        let backend_slots = BackendSlots::new(MAX_BACKEND_SLOTS, revisions.iter().map(|(r, len)| (*r, *len)));
        let migrated = migrate_counters(&options.bpffs, &mut counters)?;
        // Ids with counts are ids of services an earlier run held (or still draining).
        let counted_ids = (0..COUNTER_SLOTS)
            .filter(|slot| counters.get(slot, 0).is_ok_and(|c| c != SideCounters::default()))
            .map(|slot| slot / 2);
        let pinned_ids: HashSet<u32> = frontend_table
            .values()
            .map(|v| v.service_id)
            .chain(counted_ids)
            .chain(cohort_table.keys().map(|k| k.service_id))
            .collect();

        let log_reader = program_log::LogReader::start();
        log_reader.follow((options.log != DatapathLog::Off).then_some(&mut ebpf));
        let loader::Attached { links, foreign } = loader::attach_programs(&mut ebpf, options)?;
        // The new programs run now: maps only older programs used can go.
        for name in
            [MAP_COUNTERS_V1, MAP_COUNTERS_V2, MAP_COUNTERS_V3, MAP_SETTINGS_V1, MAP_FRONTENDS_V1, MAP_BACKENDS_V1]
        {
            let pin = options.bpffs.join(name);
            if pin.exists() {
                if let Err(err) = std::fs::remove_file(&pin) {
                    log::warn!("removing the obsolete pin {}: {err}", pin.display());
                }
            }
        }
        if migrated > 0 {
            log::info!("carried the counters of {migrated} service sides over from an older counters map");
        }
        if upgrade_frontends {
            log::info!(
                "carried {} frontends over from {MAP_FRONTENDS_V1} and {MAP_BACKENDS_V1} into {MAP_FRONTENDS} and \
                 {MAP_BACKENDS}",
                upgraded.carried
            );
            if upgraded.left_out > 0 {
                log::warn!(
                    "{} frontends of {MAP_FRONTENDS_V1} were not carried over (their backends were incomplete or did \
                     not fit {MAP_BACKENDS}): unsteered until the first sync writes them",
                    upgraded.left_out
                );
            }
        }
        let updated = links.iter().filter(|(_, o)| *o == LinkOutcome::Updated).count();
        if updated > 0 {
            log::info!(
                "adopted {updated} pinned links from {}: programs replaced in place",
                options.bpffs.join("links").display()
            );
        }
        for program in &foreign {
            log::warn!(
                "another program is on the {} hook of {}: {:?} (id {}), {} and running {} sockshift's; which one \
                 steers a connection depends on that order (see \"Other socket load balancers\" in the README)",
                program.hook,
                options.cgroup.display(),
                program.name,
                program.program_id,
                if program.attached_to_cgroup {
                    "attached to this cgroup"
                } else {
                    "inherited from an ancestor cgroup"
                },
                if program.runs_before_sockshift { "before" } else { "after" },
            );
        }

        let socket_capacity = sockets_capacity(&options.bpffs.join(MAP_SOCKETS));
        let udp_flow_capacity = sockets_capacity(&options.bpffs.join(MAP_UDP_FLOWS));
        Ok(Self {
            ebpf_object: ebpf,
            log_reader,
            options: options.clone(),
            frontends,
            backends,
            udp_flows,
            counters,
            cohorts,
            services: BTreeMap::new(),
            frontend_table,
            cohort_table,
            revisions,
            retired: BTreeMap::new(),
            pinned_start: Some(PinnedStart { revisions: pinned_revisions }),
            ids: ServiceIds::new(MAX_SERVICES, pinned_ids),
            backend_slots,
            socket_capacity,
            udp_flow_capacity,
            sizes,
            links: links.into_iter().collect(),
            foreign,
            terminator: sockets::Terminator::start(
                options.cgroup.clone(),
                sockets::SocketRecords {
                    slots: socket_slots,
                    spill: sockets,
                    counters: counters_handle(&options.bpffs),
                },
            ),
        })
    }

    /// The programs' log records as they are read (whatever the level; none at `off`).
    pub fn record_feed(&self) -> RecordFeed {
        self.log_reader.feed()
    }

    /// Replaces the programs with ones that log at `level` (`agent.datapath_log`): the object is
    /// loaded again with the new level, on the same pinned maps, and every pinned link is switched
    /// to the new program in place, so every hook runs the old or the new program at every moment
    /// and steering never stops. On error the running programs stay.
    pub fn set_log(&mut self, level: DatapathLog) -> Result<(), DatapathError> {
        if level == self.options.log {
            return Ok(());
        }
        let options = DatapathOptions { log: level, ..self.options.clone() };
        let mut ebpf = loader::load_object(&options, &self.sizes)?;
        // The new object's buffer is read from before its programs run.
        if level != DatapathLog::Off {
            self.publish_names();
        }
        self.log_reader.follow((level != DatapathLog::Off).then_some(&mut ebpf));
        let attached = loader::attach_programs(&mut ebpf, &options);
        let loader::Attached { links, foreign } = match attached {
            Ok(attached) => attached,
            Err(err) => {
                // Links switched before the error run the new programs; put the old level's
                // programs back on every hook (loaded again: the object's fds were taken).
                log::error!("replacing the programs for datapath_log = \"{level}\" failed: {err}");
                let mut again = loader::load_object(&self.options, &self.sizes)?;
                self.log_reader.follow((self.options.log != DatapathLog::Off).then_some(&mut again));
                loader::attach_programs(&mut again, &self.options)?;
                self.ebpf_object = again;
                return Err(err);
            }
        };
        self.ebpf_object = ebpf; // the old programs go with their last reference
        self.links = links.into_iter().collect();
        self.foreign = foreign;
        log::info!("datapath_log = \"{level}\": programs replaced in place");
        self.options.log = level;
        Ok(())
    }

    /// What the datapath logs now.
    pub fn log_level(&self) -> DatapathLog {
        self.options.log
    }

    /// Gives the log reader the names of the installed services.
    fn publish_names(&self) {
        self.log_reader.set_names(self.services.iter().map(|(name, s)| (s.id, name.clone())).collect());
    }

    /// Makes the datapath hold exactly `specs` (at start: whatever an earlier run pinned and no
    /// service wants any more goes too). See [`Datapath::update`] for how a change is applied.
    pub fn sync(&mut self, specs: &[ServiceSpec]) -> Result<(), DatapathError> {
        let mut changes: BTreeMap<String, Option<ServiceSpec>> =
            self.services.keys().map(|name| (name.clone(), None)).collect();
        for spec in specs {
            changes.insert(spec.name.clone(), Some(spec.clone()));
        }
        self.apply(changes, true)
    }

    /// Adds, replaces (`Some`) or removes (`None`) the named services, computed as a whole:
    /// every changed service's new backends and cohort entries are written first, then each
    /// frontend whose value differs from the target, then the keys the changed services had and
    /// no longer have are deleted. A frontend that moves between two services of one change (a
    /// renamed service, say) is therefore overwritten, never deleted by the service that gave it
    /// up. If a step before the frontends fails, what it wrote is undone and nothing has changed.
    /// The cost is that of the changed services, whatever the number of others; a frontend the
    /// change gives a service must not belong to a service outside the change (the control core
    /// checks that).
    pub fn update(&mut self, changes: BTreeMap<String, Option<ServiceSpec>>) -> Result<(), DatapathError> {
        self.apply(changes, false)
    }

    /// `update`, or with `whole`, the change of every service: then keys that no service had
    /// (an earlier run's leftovers) go as well.
    fn apply(&mut self, changes: BTreeMap<String, Option<ServiceSpec>>, whole: bool) -> Result<(), DatapathError> {
        let now = Instant::now();
        let specs: Vec<ServiceSpec> = changes.values().flatten().cloned().collect();
        let incoming: usize = specs.iter().map(|s| s.frontends.len()).sum();
        let count = if whole {
            incoming
        } else {
            let outgoing: usize =
                changes.keys().filter_map(|name| self.services.get(name)).map(|s| s.spec.frontends.len()).sum();
            self.frontend_table.len().saturating_sub(outgoing) + incoming
        };
        if count > MAX_FRONTENDS as usize {
            return Err(DatapathError::TooManyFrontends { count });
        }
        let mut undo = Undo::default();
        let planned = self.plan(&specs, &mut undo);
        let plans = match planned {
            Ok(plans) => plans,
            Err(err) => {
                self.undo(undo);
                return Err(err);
            }
        };

        // The switch: every frontend to its target value, then what no service has any more.
        let mut target: StdHashMap<FrontendKey, FrontendValue> = StdHashMap::new();
        for plan in &plans {
            for group in &plan.groups {
                for key in &group.frontends {
                    target.insert(*key, group.value);
                }
            }
        }
        let mut written: Vec<(FrontendKey, Option<FrontendValue>)> = Vec::new();
        for (key, value) in &target {
            let previous = self.frontend_table.get(key).copied();
            if previous == Some(*value) {
                continue;
            }
            if let Err(err) = self.frontends.insert(key, value, 0) {
                // Put the frontends switched so far back, then undo the rest: nothing changed. A
                // frontend that cannot be put back (the memory pressure that failed the switch)
                // keeps its new value, and the table says so: its revision counts as referenced
                // (`referenced_revisions`), so its slots are never handed to another service. The
                // new revisions are retired, not freed: freed after the grace unless referenced.
                for (key, previous) in written.into_iter().rev() {
                    let restored = match previous {
                        Some(value) => self.frontends.insert(key, value, 0),
                        None => self.frontends.remove(&key),
                    };
                    if let Err(restore) = restored {
                        log::error!("putting frontend {key:?} back after a failed change: {restore}");
                        self.frontend_table.insert(key, target[&key]);
                    }
                }
                for revision in std::mem::take(&mut undo.revisions) {
                    self.retired.insert(revision, now);
                }
                self.undo(undo);
                return Err(map_err(MAP_FRONTENDS)(err));
            }
            written.push((*key, previous));
        }
        for (key, _) in &written {
            self.frontend_table.insert(*key, target[key]);
        }
        let wanted_cohorts: HashSet<CohortKey> = plans.iter().flat_map(|p| p.cohorts.iter().map(|(k, _)| *k)).collect();
        let (stale_frontends, stale_cohorts): (Vec<FrontendKey>, Vec<CohortKey>) = if whole {
            (
                self.frontend_table.keys().filter(|k| !target.contains_key(k)).copied().collect(),
                self.cohort_table.keys().filter(|k| !wanted_cohorts.contains(k)).copied().collect(),
            )
        } else {
            // Only the changed services' keys: every other key belongs to a service the change
            // leaves alone.
            let before: Vec<&Installed> = changes.keys().filter_map(|name| self.services.get(name)).collect();
            (
                before.iter().flat_map(|s| frontend_keys(&s.spec)).filter(|k| !target.contains_key(k)).collect(),
                before
                    .iter()
                    .flat_map(|s| cohort_keys(&s.spec, s.id))
                    .filter(|(k, _)| !wanted_cohorts.contains(k))
                    .map(|(k, _)| k)
                    .collect(),
            )
        };
        for key in stale_frontends {
            let _ = self.frontends.remove(&key);
            self.frontend_table.remove(&key);
        }
        for key in stale_cohorts {
            let _ = self.cohorts.remove(&key);
            self.cohort_table.remove(&key);
        }

        // Bookkeeping, and the sockets the change leaves on backends that are gone.
        let mut before: BTreeMap<String, Installed> =
            changes.keys().filter_map(|name| self.services.remove(name).map(|s| (name.clone(), s))).collect();
        for plan in plans {
            let previous = before.remove(&plan.spec.name);
            if let Some(old) = &previous {
                let removed_backends = removed(&old.spec, &plan.spec);
                if !removed_backends.is_empty() {
                    self.terminator.destroy_connected_udp(Selection::backends(old.id, removed_backends));
                }
                // Backends back undo what a job above may still be waiting to do.
                let added_backends = removed(&plan.spec, &old.spec);
                if !added_backends.is_empty() {
                    self.terminator.keep_connected_udp(Selection::backends(old.id, added_backends));
                }
                self.terminator.canary_weight_changed(old.id, old.spec.canary_ppm, plan.spec.canary_ppm);
                let kept: HashSet<u32> = plan.groups.iter().map(|g| g.value.revision).collect();
                for revision in old.revisions().filter(|r| !kept.contains(r)) {
                    self.retired.entry(revision).or_insert(now);
                }
            }
            let groups = plan
                .groups
                .into_iter()
                .map(|g| InstalledGroup { frontends: g.frontends, layout: g.layout, value: g.value })
                .collect();
            self.services.insert(plan.spec.name.clone(), Installed { id: plan.id, spec: plan.spec, groups });
        }
        for (_, gone) in before {
            self.ids.release(gone.id, now);
            for revision in gone.revisions() {
                self.retired.entry(revision).or_insert(now);
            }
            let backends: Vec<SocketAddr> = gone.spec.stable.iter().chain(&gone.spec.canary).copied().collect();
            if !backends.is_empty() {
                self.terminator.destroy_connected_udp(Selection::backends(gone.id, backends));
            }
        }
        if whole {
            if self.pinned_start.take().is_some() {
                self.ids.drain_unclaimed(now);
            }
            let referenced = self.referenced_revisions();
            for revision in self.revisions.keys() {
                if !referenced.contains(revision) {
                    self.retired.entry(*revision).or_insert(now);
                }
            }
        }
        if self.options.log != DatapathLog::Off {
            self.publish_names();
        }
        Ok(())
    }

    /// Works out each service's id and each of its groups' revision and frontend value, writing
    /// the new revisions, the counters of new ids and the cohort entries (all recorded in `undo`).
    fn plan(&mut self, specs: &[ServiceSpec], undo: &mut Undo) -> Result<Vec<Plan>, DatapathError> {
        let mut plans = Vec::with_capacity(specs.len());
        // Pinned revisions adopted so far, with the service id that adopted each.
        let mut adopted: StdHashMap<u32, u32> = StdHashMap::new();
        let mut new_slots = 0usize;
        for spec in specs {
            let id = match self.services.get(&spec.name) {
                Some(installed) => installed.id,
                None => {
                    let (id, claimed) = self.id_for_new(spec)?;
                    if claimed {
                        undo.claimed.push(id);
                    } else {
                        undo.ids.push(id);
                    }
                    id
                }
            };
            let installed = self.services.get(&spec.name);
            let seed = service_seed(spec.name.as_bytes());
            let mut groups = Vec::new();
            for group in backend_groups(spec) {
                let frontends: Vec<FrontendKey> = group.frontends.iter().map(frontend_key).collect();
                let layout = backend_layout(group.stable, group.canary);
                // A group whose backends are unchanged keeps its revision (compared group by
                // group: two ports may swap backends with the unions unchanged).
                let kept =
                    installed.and_then(|i| i.groups.iter().find(|g| g.layout == layout)).map(|g| g.value.revision);
                let revision = match kept {
                    Some(revision) => revision,
                    None => match self.adoptable_revision(&frontends, id, seed, &layout) {
                        Some(r) if *adopted.entry(r).or_insert(id) == id => r,
                        _ => {
                            new_slots += BackendSlots::run_len(layout.len()) as usize;
                            0 // written below, once the total is known to fit
                        }
                    },
                };
                groups.push(PlannedGroup {
                    frontends,
                    layout,
                    value: FrontendValue { revision, ..Default::default() },
                });
            }
            plans.push(Plan { spec: spec.clone(), id, groups, cohorts: Vec::new() });
        }
        let free = self.backend_slots.free_slots() as usize;
        if new_slots > free {
            return Err(DatapathError::TooManyBackendSlots { needed: new_slots, free });
        }

        for plan in &mut plans {
            let spec = &plan.spec;
            if !self.services.contains_key(&spec.name) {
                // Keep counts a previous run left for a claimed id: it is this service's (same
                // frontends, same name). A newly handed-out id starts from zero.
                if undo.ids.contains(&plan.id) {
                    self.zero_counters(plan.id)?;
                }
            }
            // Cohort entries before the flag that makes the programs look for them.
            plan.cohorts = cohort_keys(spec, plan.id);
            for (key, mode) in &plan.cohorts {
                let previous = self.cohort_table.get(key).copied();
                if previous == Some(*mode) {
                    continue;
                }
                self.cohorts.insert(key, mode, 0).map_err(map_err(MAP_COHORTS))?;
                self.cohort_table.insert(*key, *mode);
                undo.cohorts.push((*key, previous));
            }
            let mut flags = 0;
            if spec.affinity == Affinity::Client {
                flags |= FLAG_AFFINITY_CLIENT;
            }
            if !plan.cohorts.is_empty() {
                flags |= FLAG_HAS_COHORTS;
            }
            let (id, canary_ppm, seed) = (plan.id, spec.canary_ppm, service_seed(spec.name.as_bytes()));
            for group in &mut plan.groups {
                let mut revision = group.value.revision;
                if revision == 0 {
                    revision = self.write_revision(&group.layout, undo)?;
                }
                let mut value =
                    FrontendValue { service_id: id, revision, canary_ppm, flags, seed, ..Default::default() };
                for (place, _) in &group.layout {
                    match (place.side, place.family) {
                        (SIDE_STABLE, FAMILY_V4) => value.stable_v4 += 1,
                        (SIDE_STABLE, _) => value.stable_v6 += 1,
                        (_, FAMILY_V4) => value.canary_v4 += 1,
                        _ => value.canary_v6 += 1,
                    }
                }
                group.value = value;
            }
        }
        Ok(plans)
    }

    /// An id for a service this run has not installed yet: the one an earlier run gave it (its
    /// frontends carried it, with the seed of its name) if that is still unclaimed, else a free
    /// one. Never an id that pinned state or open sockets of another service still use.
    /// `true` with an id claimed from pinned state.
    fn id_for_new(&mut self, spec: &ServiceSpec) -> Result<(u32, bool), DatapathError> {
        let seed = service_seed(spec.name.as_bytes());
        for key in frontend_keys(spec) {
            if let Some(value) = self.frontend_table.get(&key) {
                if value.seed == seed && self.ids.claim(value.service_id) {
                    return Ok((value.service_id, true));
                }
            }
        }
        let id = self.ids.allocate().ok_or(DatapathError::TooManyServices { draining: self.ids.draining() })?;
        Ok((id, false))
    }

    /// At the first sync of a run: the pinned revision a backend group's frontends all point at,
    /// if it was written for this service (same id, seed of the same name) and holds exactly the
    /// group's backends. Adopting it makes a restart rewrite nothing and need no room for a
    /// second copy.
    fn adoptable_revision(
        &self,
        frontends: &[FrontendKey],
        id: u32,
        seed: u32,
        layout: &[(BackendPlace, BackendValue)],
    ) -> Option<u32> {
        let start = self.pinned_start.as_ref()?;
        let mut revision = None;
        for key in frontends {
            let value = self.frontend_table.get(key)?;
            if value.service_id != id || value.seed != seed || revision.is_some_and(|r| r != value.revision) {
                return None;
            }
            revision = Some(value.revision);
        }
        let revision = revision?;
        let pinned = start.revisions.get(&revision)?;
        (pinned.as_slice() == layout).then_some(revision)
    }

    /// Writes a new revision's backends into a free run of slots (in layout order, which is
    /// `FrontendValue::backend_slot` order); returns the revision (its first slot).
    fn write_revision(
        &mut self,
        layout: &[(BackendPlace, BackendValue)],
        undo: &mut Undo,
    ) -> Result<u32, DatapathError> {
        let len = BackendSlots::run_len(layout.len());
        let revision = self.backend_slots.allocate(len).ok_or_else(|| DatapathError::BackendSlotsFragmented {
            needed: len,
            longest: self.backend_slots.longest_run(),
            free: self.backend_slots.free_slots(),
        })?;
        self.revisions.insert(revision, len);
        undo.revisions.push(revision);
        for (slot, (_, value)) in (revision..).zip(layout) {
            self.backends.set(slot, value, 0).map_err(map_err(MAP_BACKENDS))?;
        }
        Ok(revision)
    }

    /// Clears a revision's slots and hands them out again (nothing points at it any more).
    fn free_revision(&mut self, revision: u32) {
        let Some(len) = self.revisions.remove(&revision) else { return };
        for slot in revision..revision.saturating_add(len) {
            let _ = self.backends.set(slot, BackendValue::default(), 0);
        }
        self.backend_slots.release(revision, len);
    }

    /// Reverts what `plan` wrote.
    fn undo(&mut self, undo: Undo) {
        for (key, previous) in undo.cohorts.into_iter().rev() {
            match previous {
                Some(mode) => {
                    let _ = self.cohorts.insert(key, mode, 0);
                    self.cohort_table.insert(key, mode);
                }
                None => {
                    let _ = self.cohorts.remove(&key);
                    self.cohort_table.remove(&key);
                }
            }
        }
        for revision in undo.revisions {
            self.free_revision(revision);
        }
        for id in undo.ids {
            self.ids.unallocate(id);
        }
        for id in undo.claimed {
            self.ids.unclaim(id);
        }
    }

    /// Sets a service's canary weight: one map update per frontend, nothing else changes. At 0
    /// (a rollback), connected UDP sockets steered to the canary are destroyed so their
    /// applications connect again, to stable.
    pub fn set_weight(&mut self, name: &str, canary_ppm: u32) -> Result<(), DatapathError> {
        let installed = self.services.get_mut(name).ok_or_else(|| DatapathError::UnknownService(name.into()))?;
        let mut written: Vec<(FrontendKey, FrontendValue)> = Vec::new();
        for group in &installed.groups {
            let value = FrontendValue { canary_ppm, ..group.value };
            for key in &group.frontends {
                if let Err(err) = self.frontends.insert(key, value, 0) {
                    // Put back the frontends set so far: the weight is one or the other.
                    for (key, previous) in written {
                        if self.frontends.insert(key, previous, 0).is_ok() {
                            self.frontend_table.insert(key, previous);
                        }
                    }
                    return Err(map_err(MAP_FRONTENDS)(err));
                }
                written.push((*key, group.value));
                self.frontend_table.insert(*key, value);
            }
        }
        for group in &mut installed.groups {
            group.value.canary_ppm = canary_ppm;
        }
        let was = installed.spec.canary_ppm;
        installed.spec.canary_ppm = canary_ppm;
        installed.spec.source.canary_percent = agent_common::ppm_to_percent(canary_ppm);
        self.terminator.canary_weight_changed(installed.id, was, canary_ppm);
        Ok(())
    }

    /// Destroys, off the caller's thread, exactly the sockets the datapath steered to `service`'s
    /// canary that are still open: TCP connections (reset) and connected UDP sockets. Direct
    /// connections to a canary pod, never steered, are not touched. The returned handle tells how
    /// many were destroyed, within `TERMINATION_TIMEOUT`.
    pub fn terminate_canary_sockets(&self, service: &str) -> Result<Termination, DatapathError> {
        let installed = self.services.get(service).ok_or_else(|| DatapathError::UnknownService(service.into()))?;
        Ok(self.terminator.destroy(Selection::side(installed.id, SIDE_CANARY).with_tcp()))
    }

    pub fn service(&self, name: &str) -> Option<ServiceView> {
        self.services.get(name).map(|s| ServiceView {
            id: s.id,
            revision: s.groups.first().map_or(0, |g| g.value.revision),
            spec: s.spec.clone(),
        })
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
        Ok(ServiceCounters {
            stable: self.side_counters(installed.id, SIDE_STABLE)?,
            canary: self.side_counters(installed.id, SIDE_CANARY)?,
        })
    }

    fn side_counters(&self, id: u32, side: u8) -> Result<SideCounters, DatapathError> {
        let slot =
            counter_slot(id, side).ok_or(DatapathError::Map { name: MAP_COUNTERS, source: MapError::KeyNotFound })?;
        self.counters.get(&slot, 0).map_err(map_err(MAP_COUNTERS))
    }

    /// Socket records still open that carry `id`, on both sides (0 if it has no counters).
    fn open_records(&self, id: u32) -> u64 {
        [SIDE_STABLE, SIDE_CANARY]
            .into_iter()
            .filter_map(|side| self.side_counters(id, side).ok())
            .map(|c| c.open_socket_records())
            .sum()
    }

    /// Steered sockets currently open: socket records of every service, removed ones included
    /// (only installed and draining ids can have open records).
    pub fn open_steered_sockets(&self) -> u64 {
        self.services.values().map(|s| s.id).chain(self.ids.draining_ids()).map(|id| self.open_records(id)).sum()
    }

    /// Datapath-wide figures.
    pub fn status(&self) -> DatapathStatus {
        DatapathStatus {
            services: self.services.len(),
            cgroup: self.options.cgroup.clone(),
            open_steered_sockets: self.open_steered_sockets(),
            steered_socket_capacity: self.socket_capacity,
            steered_sockets_per_netns: self.sizes.sockets_per_netns,
            udp_flows: self.udp_flows.keys().count(),
            udp_flow_capacity: self.udp_flow_capacity,
            draining_service_ids: self.ids.draining(),
            host_netns_only: self.options.host_netns_only,
            datapath_log: self.options.log,
            links: self.links.clone(),
            foreign_programs: self.foreign.clone(),
            maps: loader::map_memory(&self.options.bpffs),
        }
    }

    /// Periodic upkeep (the agent calls it every half second): deletes the backends of
    /// revisions unreferenced for `REVISION_GRACE`, and frees the ids of removed services once no
    /// socket record of theirs is open (deleting their counters).
    pub fn reap_retired(&mut self) {
        let now = Instant::now();
        let referenced = self.referenced_revisions();
        let due: Vec<u32> = self
            .retired
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= REVISION_GRACE)
            .map(|(revision, _)| *revision)
            .collect();
        for revision in due {
            self.retired.remove(&revision);
            if referenced.contains(&revision) {
                continue; // adopted again at start
            }
            self.free_revision(revision);
        }
        if let Some(drained_before) = now.checked_sub(REVISION_GRACE) {
            for id in self.ids.draining_since(drained_before) {
                if self.open_records(id) == 0 && self.zero_counters(id).is_ok() {
                    self.ids.free(id);
                }
            }
        }
    }

    /// Revisions a frontend points at, in the kernel (`frontend_table` mirrors it) or in what the
    /// services hold: their slots must not be handed out.
    fn referenced_revisions(&self) -> HashSet<u32> {
        self.frontend_table
            .values()
            .map(|v| v.revision)
            .chain(self.services.values().flat_map(Installed::revisions))
            .collect()
    }

    /// Zeroes both sides' counters of `id` (an id handed to a new service, or freed).
    fn zero_counters(&mut self, id: u32) -> Result<(), DatapathError> {
        for side in [SIDE_STABLE, SIDE_CANARY] {
            if let Some(slot) = counter_slot(id, side) {
                self.counters.set(slot, SideCounters::default(), 0).map_err(map_err(MAP_COUNTERS))?;
            }
        }
        Ok(())
    }
}

/// One service's part of a `sync`.
struct Plan {
    spec: ServiceSpec,
    id: u32,
    groups: Vec<PlannedGroup>,
    cohorts: Vec<(CohortKey, u32)>,
}

/// One backend group's part of a `Plan`.
struct PlannedGroup {
    frontends: Vec<FrontendKey>,
    layout: Vec<(BackendPlace, BackendValue)>,
    /// Revision 0 until the group's new revision is written.
    value: FrontendValue,
}

/// What a `sync` wrote before its switch, to revert it if a later step fails.
#[derive(Default)]
struct Undo {
    ids: Vec<u32>,
    /// Ids claimed from pinned state: they go back to being pinned.
    claimed: Vec<u32>,
    revisions: Vec<u32>,
    cohorts: Vec<(CohortKey, Option<u32>)>,
}

/// Carries the counters an older agent kept (COUNTERS_V3, shared, in the layout before the
/// derived record count; COUNTERS_V2, per-CPU; or COUNTERS_V1, per-CPU in an older layout) over
/// into COUNTERS, summed over CPUs, for sides that have no counts there yet, before the new
/// programs run, so rollout windows, totals and open socket records carry on across the upgrade.
/// Events counted between this copy and the program switch (milliseconds) are lost.
fn migrate_counters(bpffs: &Path, counters: &mut Array<MapData, SideCounters>) -> Result<usize, DatapathError> {
    let mut migrated = 0;
    let mut carry = |key: CounterKey, total: SideCounters| -> Result<(), DatapathError> {
        let Some(slot) = u8::try_from(key.side).ok().and_then(|side| counter_slot(key.service_id, side)) else {
            return Ok(());
        };
        if counters.get(&slot, 0).is_ok_and(|c| c != SideCounters::default()) {
            return Ok(());
        }
        counters.set(slot, total, 0).map_err(map_err(MAP_COUNTERS))?;
        migrated += 1;
        Ok(())
    };
    let pin = bpffs.join(MAP_COUNTERS_V3);
    if pin.exists() {
        let data = MapData::from_pin(&pin).map_err(|source| DatapathError::PinnedMap { path: pin.clone(), source })?;
        let old: Array<MapData, SideCountersV3> =
            Array::try_from(Map::Array(data)).map_err(|source| DatapathError::PinnedMap { path: pin, source })?;
        for slot in 0..old.len().min(COUNTER_SLOTS) {
            let Ok(value) = old.get(&slot, 0) else { continue };
            if value != SideCountersV3::default() {
                carry(CounterKey { service_id: slot / 2, side: slot % 2 }, SideCounters::from(value))?;
            }
        }
    }
    let pin = bpffs.join(MAP_COUNTERS_V2);
    if pin.exists() {
        let data = MapData::from_pin(&pin).map_err(|source| DatapathError::PinnedMap { path: pin.clone(), source })?;
        let old: PerCpuHashMap<MapData, CounterKey, SideCountersV3> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
            .map_err(|source| DatapathError::PinnedMap { path: pin, source })?;
        for (key, values) in old.iter().filter_map(Result::ok) {
            let mut total = SideCountersV3::default();
            values.iter().for_each(|cpu| total.add(cpu));
            carry(key, SideCounters::from(total))?;
        }
    }
    let pin = bpffs.join(MAP_COUNTERS_V1);
    if pin.exists() {
        let data = MapData::from_pin(&pin).map_err(|source| DatapathError::PinnedMap { path: pin.clone(), source })?;
        let old: PerCpuHashMap<MapData, CounterKey, SideCountersV1> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
            .map_err(|source| DatapathError::PinnedMap { path: pin, source })?;
        for (key, values) in old.iter().filter_map(Result::ok) {
            let mut total = SideCountersV1::default();
            values.iter().for_each(|cpu| total.add(cpu));
            carry(key, SideCounters::from(total))?;
        }
    }
    Ok(migrated)
}

/// A second handle to the pinned counters, for the termination worker (`None` if it cannot be
/// opened: the worker then reads the socket table for every job).
fn counters_handle(bpffs: &Path) -> Option<Array<MapData, SideCounters>> {
    let data = MapData::from_pin(bpffs.join(MAP_COUNTERS)).ok()?;
    Array::try_from(Map::Array(data)).ok()
}

/// The real size of a pinned map (0 if it cannot be read).
fn sockets_capacity(pin: &Path) -> u32 {
    aya::maps::MapInfo::from_pin(pin).map(|info| info.max_entries()).unwrap_or(0)
}

/// Sets the socket table's legacy mark when the spill table may hold records an older agent's
/// programs made (they lack `SOCKET_SPILLED` and no slot's `overflow` counts them, so without the
/// mark the new programs would not look for them), and clears it once it holds none: those records
/// are never made again.
fn mark_legacy_socket_records(
    table: &mut Array<MapData, u64>,
    spill: &HashMap<MapData, u64, agent_common::SocketEntry>,
    legacy_records_possible: bool,
) -> Result<(), DatapathError> {
    let marked = table.get(&SOCKET_TABLE_LEGACY, 0).map_err(map_err(MAP_SOCKET_TABLE))? != 0;
    let mark = if legacy_records_possible {
        true
    } else if marked {
        spill.iter().filter_map(Result::ok).any(|(_, entry)| entry.flags & SOCKET_SPILLED == 0)
    } else {
        false
    };
    if mark != marked {
        table.set(SOCKET_TABLE_LEGACY, u64::from(mark), 0).map_err(map_err(MAP_SOCKET_TABLE))?;
        if mark {
            log::info!("socket records of an older agent are in {MAP_SOCKETS}: looked up there until they are gone");
        }
    }
    Ok(())
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

/// A service's backend groups. A Kubernetes service's ports are its groups, less those left
/// without a frontend (other services have them all): those steer nothing.
fn backend_groups(spec: &ServiceSpec) -> Vec<BackendGroup<'_>> {
    if spec.port_groups.is_empty() {
        return vec![BackendGroup { frontends: &spec.frontends, stable: &spec.stable, canary: &spec.canary }];
    }
    spec.port_groups
        .iter()
        .filter(|g| !g.frontends.is_empty())
        .map(|g| BackendGroup { frontends: &g.frontends, stable: &g.stable, canary: &g.canary })
        .collect()
}

/// A backend group's backends in the order of their slots (`FrontendValue::backend_slot`): per
/// side and family, in the order the spec lists them.
fn backend_layout(stable: &[SocketAddr], canary: &[SocketAddr]) -> Vec<(BackendPlace, BackendValue)> {
    let mut layout = Vec::new();
    for (side, addrs) in [(SIDE_STABLE, stable), (SIDE_CANARY, canary)] {
        for family in [FAMILY_V4, FAMILY_V6] {
            for (index, addr) in addrs.iter().filter(|a| family_of(a) == family).enumerate() {
                layout.push((BackendPlace { side, family, index: index as u16 }, backend_value(addr)));
            }
        }
    }
    layout
}

/// The places of a revision's slots, in slot order, from the counts in a frontend value.
fn places_of(value: &FrontendValue) -> Vec<BackendPlace> {
    let mut places = Vec::new();
    for (side, family, count) in [
        (SIDE_STABLE, FAMILY_V4, value.stable_v4),
        (SIDE_STABLE, FAMILY_V6, value.stable_v6),
        (SIDE_CANARY, FAMILY_V4, value.canary_v4),
        (SIDE_CANARY, FAMILY_V6, value.canary_v6),
    ] {
        places.extend((0..count).map(|index| BackendPlace { side, family, index }));
    }
    places
}

/// The backends of the revision a pinned frontend value points at, as `backend_layout` lists
/// them (empty if a slot cannot be read: such a revision is never adopted).
fn pinned_backends(
    backends: &Array<MapData, BackendValue>,
    value: &FrontendValue,
) -> Vec<(BackendPlace, BackendValue)> {
    let read: Option<Vec<(BackendPlace, BackendValue)>> = places_of(value)
        .into_iter()
        .map(|place| {
            let slot = value.backend_slot(place.side, place.family, place.index);
            backends.get(&slot, 0).ok().map(|backend| (place, backend))
        })
        .collect();
    read.unwrap_or_default()
}

/// What `upgrade_backends` carried over.
#[derive(Debug, Default)]
struct Upgraded {
    carried: usize,
    left_out: usize,
}

/// Copies the services of an agent before the backend array (FRONTENDS_V1, and BACKENDS_V1: a
/// hash keyed by revision number and place) into FRONTENDS and BACKENDS (FRONTENDS empty) before
/// the new programs run: each revision gets a run of slots from 1 on, and each frontend its value
/// with the revision's first slot. A frontend whose revision is incomplete is left out (counted;
/// the first sync writes it). On error the frontends copied so far are removed again, so that the
/// next start copies them whole.
fn upgrade_backends(
    bpffs: &Path,
    frontends: &mut HashMap<MapData, FrontendKey, FrontendValue>,
    backends: &mut Array<MapData, BackendValue>,
) -> Result<Upgraded, DatapathError> {
    let mut copied: Vec<FrontendKey> = Vec::new();
    let result = copy_v1_services(bpffs, frontends, backends, &mut copied);
    if result.is_err() {
        for key in copied {
            let _ = frontends.remove(&key);
        }
    }
    result
}

fn copy_v1_services(
    bpffs: &Path,
    frontends: &mut HashMap<MapData, FrontendKey, FrontendValue>,
    backends: &mut Array<MapData, BackendValue>,
    copied: &mut Vec<FrontendKey>,
) -> Result<Upgraded, DatapathError> {
    let open = |name: &str| {
        let pin = bpffs.join(name);
        MapData::from_pin(&pin).map_err(|source| DatapathError::PinnedMap { path: pin, source })
    };
    let pinned = |name: &str, source: MapError| DatapathError::PinnedMap { path: bpffs.join(name), source };
    let old_frontends: HashMap<MapData, FrontendKey, FrontendValue> =
        HashMap::try_from(Map::HashMap(open(MAP_FRONTENDS_V1)?)).map_err(|e| pinned(MAP_FRONTENDS_V1, e))?;
    // Without BACKENDS_V1 no revision has backends: only empty ones carry over.
    let mut old_revisions: StdHashMap<u32, StdHashMap<(u8, u8, u16), BackendValue>> = StdHashMap::new();
    if bpffs.join(MAP_BACKENDS_V1).exists() {
        let old_backends: HashMap<MapData, BackendKeyV1, BackendValue> =
            HashMap::try_from(Map::HashMap(open(MAP_BACKENDS_V1)?)).map_err(|e| pinned(MAP_BACKENDS_V1, e))?;
        for (key, value) in old_backends.iter().filter_map(Result::ok) {
            old_revisions.entry(key.revision).or_default().insert((key.side, key.family, key.index), value);
        }
    }
    let no_backends = StdHashMap::new();
    let mut slots = BackendSlots::new(MAX_BACKEND_SLOTS, []);
    // Old revision number -> its first slot now.
    let mut moved: StdHashMap<u32, u32> = StdHashMap::new();
    let mut upgraded = Upgraded::default();
    for (key, value) in old_frontends.iter().filter_map(Result::ok) {
        let first = match moved.get(&value.revision) {
            Some(first) => Some(*first),
            None => {
                let old = old_revisions.get(&value.revision).unwrap_or(&no_backends);
                let places = places_of(&value);
                let in_order: Option<Vec<BackendValue>> =
                    places.iter().map(|p| old.get(&(p.side, p.family, p.index)).copied()).collect();
                // Slots only for a revision that is whole.
                let run = in_order.and_then(|in_order| {
                    slots.allocate(BackendSlots::run_len(places.len())).map(|first| (in_order, first))
                });
                match run {
                    Some((in_order, first)) => {
                        for (slot, backend) in (first..).zip(&in_order) {
                            backends.set(slot, backend, 0).map_err(map_err(MAP_BACKENDS))?;
                        }
                        moved.insert(value.revision, first);
                        Some(first)
                    }
                    None => None,
                }
            }
        };
        let Some(first) = first else {
            upgraded.left_out += 1;
            continue;
        };
        frontends.insert(key, FrontendValue { revision: first, ..value }, 0).map_err(map_err(MAP_FRONTENDS))?;
        copied.push(key);
        upgraded.carried += 1;
    }
    Ok(upgraded)
}

/// Backends `old` had that `new` does not, on either side.
fn removed(old: &ServiceSpec, new: &ServiceSpec) -> Vec<SocketAddr> {
    let kept: HashSet<&SocketAddr> = new.stable.iter().chain(&new.canary).collect();
    old.stable.iter().chain(&old.canary).filter(|a| !kept.contains(a)).copied().collect()
}

/// A service's cohort entries under id `id`, with their modes.
fn cohort_keys(spec: &ServiceSpec, id: u32) -> Vec<(CohortKey, u32)> {
    let mut keys = Vec::new();
    for cohort in &spec.cohorts {
        let mode = match cohort.canary {
            CohortCanary::Always => COHORT_ALWAYS_CANARY,
            CohortCanary::Never => COHORT_NEVER_CANARY,
        };
        for &cgroup_id in &cohort.cgroup_ids {
            keys.push((CohortKey { cgroup_id, service_id: id, _pad: 0 }, mode));
        }
    }
    keys
}

/// Every frontend of a service (with port groups: the union of theirs).
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
