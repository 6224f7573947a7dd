//! Map names and the layouts of their keys and values.
//!
//! Only fixed-width integers and arrays; `bytemuck::Pod` on every type is a compile-time proof
//! that there is no padding, and a size assert pins each layout. A layout change must change the
//! map name's suffix so that a map pinned by an older agent is never misread.

use bytemuck::{Pod, Zeroable};

/// Frontend `ip:port` -> the service's current split and backend revision.
pub const MAP_FRONTENDS: &str = "FRONTENDS_V1";
/// (revision, side, family, index) -> backend address.
pub const MAP_BACKENDS: &str = "BACKENDS_V1";
/// Socket cookie -> what a steered socket was translated from and to.
pub const MAP_SOCKETS: &str = "SOCKETS_V1";
/// (service id, side) -> per-CPU counters.
pub const MAP_COUNTERS: &str = "COUNTERS_V2";
/// (client cgroup id, service id) -> cohort override.
pub const MAP_COHORTS: &str = "COHORTS_V1";
/// Single slot of node-wide settings the agent writes at start.
pub const MAP_SETTINGS: &str = "SETTINGS_V1";

/// Most services the datapath holds (frontends may be several per service).
pub const MAX_SERVICES: u32 = 65_536;
/// Most frontends across all services.
pub const MAX_FRONTENDS: u32 = 4 * MAX_SERVICES;
/// Most backends per side of one service (per address family).
pub const MAX_BACKENDS_PER_SIDE: u32 = 1_024;
/// Backend slots in the kernel: every backend of every live and retiring revision.
pub const MAX_BACKEND_SLOTS: u32 = 1 << 20;
/// Steered sockets open at the same time (TCP and UDP).
pub const MAX_STEERED_SOCKETS: u32 = 1 << 18;
/// Cohort override entries across all services.
pub const MAX_COHORT_ENTRIES: u32 = 65_536;
/// Deepest cgroup level at which a cohort override is looked for.
pub const MAX_COHORT_DEPTH: i32 = 16;

/// `FrontendValue::flags`: hash on the client (network namespace, else cgroup), not the socket.
pub const FLAG_AFFINITY_CLIENT: u32 = 1 << 0;
/// `FrontendValue::flags`: the service has cohort overrides; look them up before hashing.
pub const FLAG_HAS_COHORTS: u32 = 1 << 1;

/// Address family of a backend slot.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Sides of a service.
pub const SIDE_STABLE: u8 = 0;
pub const SIDE_CANARY: u8 = 1;

/// `CohortKey` value: this client always gets the canary.
pub const COHORT_ALWAYS_CANARY: u32 = 1;
/// `CohortKey` value: this client never gets the canary.
pub const COHORT_NEVER_CANARY: u32 = 2;

/// Key of FRONTENDS: the address a client connects or sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FrontendKey {
    /// IPv6 or v4-mapped IPv4 address, network byte order.
    pub addr_be: [u32; 4],
    /// Port, network byte order.
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 20);

/// Value of FRONTENDS: everything a connecting socket needs to decide, in one value so that a
/// change of weight, backends or affinity is one map update that a reader sees whole.
/// Written by the agent, read by connect4/6 and sendmsg4/6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendValue {
    pub service_id: u32,
    /// Backend revision: the BACKENDS entries of this revision are never changed once published.
    pub revision: u32,
    /// Canary weight in parts per million, 0..=1_000_000.
    pub canary_ppm: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// Per-service hash seed, so that two services' cohorts are independent.
    pub seed: u32,
    /// Backends per side and family in `revision`.
    pub stable_v4: u16,
    pub stable_v6: u16,
    pub canary_v4: u16,
    pub canary_v6: u16,
}
const _: () = assert!(core::mem::size_of::<FrontendValue>() == 28);

impl FrontendValue {
    /// Number of backends on `side` for `family`.
    #[inline(always)]
    pub fn backend_count(&self, side: u8, family: u8) -> u16 {
        match (side, family) {
            (SIDE_STABLE, FAMILY_V4) => self.stable_v4,
            (SIDE_STABLE, _) => self.stable_v6,
            (_, FAMILY_V4) => self.canary_v4,
            _ => self.canary_v6,
        }
    }
}

/// Key of BACKENDS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendKey {
    pub revision: u32,
    pub side: u8,
    pub family: u8,
    pub index: u16,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// Value of BACKENDS: one pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendValue {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 20);

/// Value of SOCKETS (key: socket cookie). Written by connect/sendmsg when they steer, read by
/// recvmsg/getpeername (reverse translation) and sock_ops (health attribution), deleted by
/// sock_release so that the map holds only open sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketEntry {
    pub frontend_addr_be: [u32; 4],
    pub backend_addr_be: [u32; 4],
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub service_id: u32,
    pub side: u8,
    pub family: u8,
    /// SOCKET_* bits, set by sock_ops as the connection progresses.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<SocketEntry>() == 44);

/// `SocketEntry::flags`: the TCP connection reached ESTABLISHED, so a reset from now on is a
/// reset of an established connection (not a refused attempt).
pub const SOCKET_ESTABLISHED: u16 = 1 << 0;

/// Key of COUNTERS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CounterKey {
    pub service_id: u32,
    pub side: u32,
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 8);

/// Value of COUNTERS, one per CPU: what the kernel saw for one side of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SideCounters {
    /// `connect()` calls steered (TCP, and UDP sockets that connect).
    pub connections_steered: u64,
    /// Datagrams steered on unconnected UDP sockets.
    pub datagrams_steered: u64,
    /// TCP connections that reached ESTABLISHED.
    pub established: u64,
    /// TCP connection attempts that never established (refused, timed out, reset in SYN_SENT).
    pub failed_attempts: u64,
    /// Established TCP connections closed by a reset.
    pub resets: u64,
    /// Retransmission timeouts.
    pub rto: u64,
    /// Sum and count of smoothed RTT samples, microseconds.
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
    /// Fail-open: the chosen backend slot was missing (a revision being retired).
    pub fail_open_backend_missing: u64,
    /// Fail-open: the socket table was full, so the connection was left untouched.
    pub fail_open_socket_table_full: u64,
    /// TCP connection attempts the client closed while still in SYN_SENT (its connect timeout
    /// fired before the kernel's): failures that never reach `failed_attempts`.
    pub abandoned_attempts: u64,
}
const _: () = assert!(core::mem::size_of::<SideCounters>() == 88);

impl SideCounters {
    /// Adds another CPU's counters.
    pub fn add(&mut self, other: &SideCounters) {
        self.connections_steered += other.connections_steered;
        self.datagrams_steered += other.datagrams_steered;
        self.established += other.established;
        self.failed_attempts += other.failed_attempts;
        self.resets += other.resets;
        self.rto += other.rto;
        self.srtt_sum_us += other.srtt_sum_us;
        self.srtt_samples += other.srtt_samples;
        self.fail_open_backend_missing += other.fail_open_backend_missing;
        self.fail_open_socket_table_full += other.fail_open_socket_table_full;
        self.abandoned_attempts += other.abandoned_attempts;
    }
}

/// Key of COHORTS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CohortKey {
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CohortKey>() == 16);

/// Value of SETTINGS slot 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Settings {
    /// Cookie of the host network namespace: clients in it are told apart by cgroup instead.
    pub host_netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 8);

#[cfg(feature = "user")]
mod user {
    // Sound: bytemuck::Pod on each type proves it has no padding and any bit pattern is valid.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::SocketEntry {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::SideCounters {}
    unsafe impl aya::Pod for super::CohortKey {}
    unsafe impl aya::Pod for super::Settings {}
}
