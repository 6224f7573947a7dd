//! Map names and the layouts of their keys and values.
//!
//! Only fixed-width integers and arrays; `bytemuck::Pod` on every type is a compile-time proof
//! that there is no padding, and a size assert pins each layout. A layout change must change the
//! map name's suffix so that a map pinned by an older agent is never misread.

use bytemuck::{Pod, Zeroable};

/// Frontend `ip:port` -> the service's current split and backend revision (`FrontendValue`).
pub const MAP_FRONTENDS: &str = "FRONTENDS_V2";
/// Backend slot -> backend address: an array, each revision a run of slots starting at the
/// revision's number (`FrontendValue::backend_slot`).
pub const MAP_BACKENDS: &str = "BACKENDS_V2";
/// Socket cookie -> what a steered socket (TCP, or UDP that connected) was translated from and to:
/// the spill table, for records whose slots in SOCKET_SLOTS are taken (and records an agent
/// before the slot table made).
pub const MAP_SOCKETS: &str = "SOCKETS_V1";
/// `socket_slots(cookie)` -> the record of a steered socket (`SocketSlot`): the socket table.
pub const MAP_SOCKET_SLOTS: &str = "SOCKET_SLOTS_V1";
/// `SOCKET_TABLE_LEGACY` -> whether the spill table may hold records of an older agent.
pub const MAP_SOCKET_TABLE: &str = "SOCKET_TABLE_V1";
/// (socket cookie, slot) -> one reply translation of an unconnected UDP socket.
pub const MAP_UDP_FLOWS: &str = "UDP_FLOWS_V1";
/// Network namespace bucket -> SOCKETS records its sockets hold (the per-namespace bound).
pub const MAP_NETNS_SOCKETS: &str = "NETNS_SOCKETS_V1";
/// `counter_slot(service id, side)` -> the side's counters, one copy shared by every CPU.
pub const MAP_COUNTERS: &str = "COUNTERS_V4";
/// (client cgroup id, service id) -> cohort override.
pub const MAP_COHORTS: &str = "COHORTS_V1";
/// Single slot of node-wide settings the agent writes at start.
pub const MAP_SETTINGS: &str = "SETTINGS_V2";

/// Maps an earlier agent pinned under names this one no longer uses. The agent reads what it
/// still needs from them (COUNTERS_V1, COUNTERS_V2 and COUNTERS_V3: the counts of every service)
/// and unpins them once its own programs run.
pub const MAP_COUNTERS_V1: &str = "COUNTERS_V1";
/// Per-CPU hash keyed by `CounterKey`: its memory grew with services × CPUs (about 250 MiB at
/// 10,000 services on a 96-CPU node).
pub const MAP_COUNTERS_V2: &str = "COUNTERS_V2";
/// The shared counters array before COUNTERS_V4 (`SideCountersV3`): every steered `connect()`
/// made two atomic adds in it (`connections_steered` and `socket_records_opened`), where one
/// now derives the other.
pub const MAP_COUNTERS_V3: &str = "COUNTERS_V3";
pub const MAP_SETTINGS_V1: &str = "SETTINGS_V1";
/// FRONTENDS and BACKENDS of an agent before the backend array: the same frontend value, whose
/// revision was a number keying a hash of backends (`BackendKeyV1`). The agent copies both into
/// the current maps before its programs run and unpins them once they do.
pub const MAP_FRONTENDS_V1: &str = "FRONTENDS_V1";
pub const MAP_BACKENDS_V1: &str = "BACKENDS_V1";

/// Most services the datapath holds (frontends may be several per service).
pub const MAX_SERVICES: u32 = 65_536;
/// Slots of COUNTERS: one per side of every possible service id.
pub const COUNTER_SLOTS: u32 = 2 * MAX_SERVICES;
/// Most frontends across all services.
pub const MAX_FRONTENDS: u32 = 4 * MAX_SERVICES;
/// Most backends per side of one service (per address family).
pub const MAX_BACKENDS_PER_SIDE: u32 = 1_024;
/// Slots of BACKENDS: every backend of every live and retiring revision (slot 0 is never used,
/// so a zeroed frontend value points at no backend). Preallocated at 24 B a slot: 12 MiB.
pub const MAX_BACKEND_SLOTS: u32 = 1 << 19;
/// Default size of the socket table: steered TCP and connected UDP sockets open at the same
/// time (`agent.steered_socket_capacity`). Also the default size of the UDP flow table. Both are
/// preallocated at about 120 B a slot, so 65,536 is 7.5 MiB each; a node with more steered
/// sockets open at once sets it higher.
pub const MAX_STEERED_SOCKETS: u32 = 1 << 16;
/// Buckets of the per-namespace socket count: a namespace counts in bucket
/// `netns_bucket(cookie)`. Two namespaces share a bound only if they share a bucket (one pair in
/// 65,536), and an array needs no upkeep as namespaces come and go.
pub const NETNS_BUCKETS: u32 = 65_536;
/// Reply translations kept per unconnected UDP socket: one per backend it sent to (musl's
/// resolver sends every query to up to 3 nameservers from one socket), the oldest replaced
/// first when a socket has talked to more.
pub const UDP_FLOW_SLOTS: u32 = 4;
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
    /// Backend revision: the BACKENDS slot of its first backend (never 0). Its backends follow
    /// in `backend_slot` order and are never changed once published.
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

    /// The BACKENDS slot of backend `index` of `side` and `family`: a revision's backends lie
    /// side by side from `revision` on, stable before canary, IPv4 before IPv6 within a side.
    #[inline(always)]
    pub fn backend_slot(&self, side: u8, family: u8, index: u16) -> u32 {
        let stable = self.stable_v4 as u32 + self.stable_v6 as u32;
        let before = match (side, family) {
            (SIDE_STABLE, FAMILY_V4) => 0,
            (SIDE_STABLE, _) => self.stable_v4 as u32,
            (_, FAMILY_V4) => stable,
            _ => stable + self.canary_v4 as u32,
        };
        // Saturating: a garbage revision near the end never wraps into live slots (the lookup
        // of u32::MAX misses and the connection goes on untouched).
        self.revision.saturating_add(before).saturating_add(index as u32)
    }

    /// Slots the revision takes.
    #[inline(always)]
    pub fn backend_slots(&self) -> u32 {
        self.stable_v4 as u32 + self.stable_v6 as u32 + self.canary_v4 as u32 + self.canary_v6 as u32
    }
}

/// Key of BACKENDS_V1 (an agent before the backend array): a hash keyed by revision number and
/// place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendKeyV1 {
    pub revision: u32,
    pub side: u8,
    pub family: u8,
    pub index: u16,
}
const _: () = assert!(core::mem::size_of::<BackendKeyV1>() == 8);

/// Value of BACKENDS: one pod address. A slot no revision holds is all zero (port 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendValue {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 20);

/// Value of SOCKETS (key: socket cookie). Written by connect4/6 when they steer (TCP, and UDP
/// sockets that connect), read by recvmsg/getpeername (reverse translation) and sock_ops (health
/// attribution). Deleted when the kernel closes a TCP socket (sock_ops sees it reach CLOSE, which
/// for a socket the application closed happens after sock_release), else by sock_release, so the
/// map holds only open sockets.
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

/// One slot of SOCKET_SLOTS: the record of the socket whose cookie it holds; cookie 0: free.
/// A program takes a free slot with a compare-and-swap of the cookie (0 -> its cookie) and frees
/// it with the reverse swap, so two sockets never share a slot and a record is forgotten once.
/// 64 B: one cache line a slot, so taking a slot touches one line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketSlot {
    pub cookie: u64,
    /// Records of sockets whose first slot this is but which are elsewhere (their second slot or
    /// the spill table), because this one was taken when they connected. While it is 0, a socket
    /// this slot does not hold has no record at all: one line read tells.
    pub overflow: u64,
    pub entry: SocketEntry,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SocketSlot>() == 64);

/// The two slots a socket's record may take, in the order they are tried: the cookie's low bits,
/// then the slot half the table away. `slots` is a power of two (at least 2). Cookies are handed
/// out in ascending runs per CPU, so the records of sockets opened one after another sit side by
/// side in memory (the few pages a connect touches stay in the TLB); a long-lived socket blocks
/// only the cookies that fall on its slot, and those take their second slot.
#[inline(always)]
pub fn socket_slots(cookie: u64, slots: u32) -> (u32, u32) {
    let first = (cookie as u32) & (slots - 1);
    (first, first ^ (slots >> 1))
}

/// Slots of SOCKET_SLOTS for a socket table of `capacity` records: the next power of two.
pub fn socket_slot_count(capacity: u32) -> u32 {
    capacity.max(2).checked_next_power_of_two().unwrap_or(1 << 31)
}

/// SOCKET_TABLE slot 0: non-zero while the spill table may still hold records an older agent's
/// programs made (they are counted in no slot's `overflow`, so without it they would not be looked
/// for). Written by the agent only.
pub const SOCKET_TABLE_LEGACY: u32 = 0;
pub const SOCKET_TABLE_SLOTS: u32 = 1;

/// `SocketEntry::flags`: the TCP connection reached ESTABLISHED, so a reset from now on is a
/// reset of an established connection (not a refused attempt).
pub const SOCKET_ESTABLISHED: u16 = 1 << 0;
/// `SocketEntry::flags`: sock_ops will be told when the kernel closes this TCP socket (state
/// callbacks are on), so the record outlives sock_release until then and is deleted there.
pub const SOCKET_ARMED: u16 = 1 << 1;
/// `SocketEntry::flags`: the application released (closed) the socket; a connection attempt
/// that ends after this was given up by the client, not failed by the network.
pub const SOCKET_RELEASED: u16 = 1 << 2;
/// `SocketEntry::flags`: a UDP socket that connected (it keeps its backend, like TCP).
pub const SOCKET_UDP: u16 = 1 << 3;
/// `SocketEntry::flags`: the connection had a retransmission timeout (counted once per
/// connection in `rto_connections`).
pub const SOCKET_HAD_RTO: u16 = 1 << 4;
/// `SocketEntry::flags`: the record is counted in NETNS_SOCKETS for the socket's namespace.
pub const SOCKET_NETNS_COUNTED: u16 = 1 << 5;
/// `SocketEntry::flags`: the record is in the spill table and counted in its first slot's
/// `overflow` (records an older agent made there lack it).
pub const SOCKET_SPILLED: u16 = 1 << 6;

/// Key of UDP_FLOWS: slot 0..UDP_FLOW_SLOTS of one unconnected UDP socket. Slots fill from 0 up,
/// so a lookup stops at the first empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct UdpFlowKey {
    pub cookie: u64,
    pub slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 16);

/// Value of UDP_FLOWS: a datagram to `frontend` was sent to `backend`, so a reply from `backend`
/// is shown as coming from `frontend`. Written by sendmsg4/6, read by recvmsg4/6, deleted by
/// sock_release; an LRU map, so a flood of sockets evicts the least recently used flows instead
/// of failing (a live socket records its flow again with its next datagram).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpFlow {
    pub frontend_addr_be: [u32; 4],
    pub backend_addr_be: [u32; 4],
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    /// Slot 0 only: slots written so far; the next new flow goes to `written % UDP_FLOW_SLOTS`.
    pub written: u32,
}
const _: () = assert!(core::mem::size_of::<UdpFlow>() == 40);

/// Slot of COUNTERS for one side of a service: `service_id * 2 + side`. `None` for an id out of
/// range (the agent never hands one out; the bound also proves the index to the verifier).
#[inline(always)]
pub const fn counter_slot(service_id: u32, side: u8) -> Option<u32> {
    if service_id >= MAX_SERVICES || side > SIDE_CANARY {
        return None;
    }
    Some(service_id * 2 + side as u32)
}

/// Key of COUNTERS_V1 and COUNTERS_V2 (read once at an upgrade).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CounterKey {
    pub service_id: u32,
    pub side: u32,
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 8);

/// Value of COUNTERS: what the kernel saw for one side of one service. One copy for all CPUs,
/// every field moved by atomic adds: a per-CPU copy would multiply the map by the CPU count
/// (136 B × 2 sides × CPUs a service). A steered `connect()` makes one add (to
/// `connections_steered`, plus one only when its socket goes unrecorded): the records it opened
/// are derived (`socket_records_opened`). The fields the connecting process moves come first, those
/// the TCP stack moves (often on another CPU) after them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SideCounters {
    /// `connect()` calls steered (TCP, and UDP sockets that connect). Each opened a socket record
    /// unless it is counted in `socket_table_full` or `socket_netns_full`.
    pub connections_steered: u64,
    /// Datagrams steered on unconnected UDP sockets.
    pub datagrams_steered: u64,
    /// `connect()` calls steered without a socket record because the socket table was full: the
    /// connection goes to its backend, but `getpeername()` shows the backend and its health is not
    /// counted.
    pub socket_table_full: u64,
    /// Steered without a socket record because the client's network namespace holds its share of
    /// the table (`agent.steered_sockets_per_netns`); otherwise as `socket_table_full`.
    pub socket_netns_full: u64,
    /// Datagrams steered without a reply translation (the UDP flow could not be recorded).
    pub flow_table_full: u64,
    /// Fail-open: the chosen backend slot was outside BACKENDS or empty (never, unless the agent
    /// wrote a frontend before its revision).
    pub fail_open_backend_missing: u64,
    /// TCP connection attempts the client gave up (closed the socket in SYN_SENT: a connect
    /// timeout, a cancelled request). A canary that drops SYNs shows up here.
    pub abandoned_attempts: u64,
    /// Socket records deleted (TCP and connected UDP).
    pub socket_records_closed: u64,
    /// TCP connections that reached ESTABLISHED.
    pub established: u64,
    /// TCP connection attempts the kernel ended before ESTABLISHED (refused, reset in SYN_SENT,
    /// unreachable, or timed out by the kernel) while the application still held the socket.
    pub failed_attempts: u64,
    /// Established TCP connections closed by a reset.
    pub resets: u64,
    /// Retransmission timeouts.
    pub rto: u64,
    /// TCP connections that had at least one retransmission timeout.
    pub rto_connections: u64,
    /// Sum and count of non-zero smoothed RTT samples, microseconds: one at establishment (the
    /// handshake) and one when the connection closes (its whole life).
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
    /// The at-close part of the above.
    pub srtt_close_sum_us: u64,
    pub srtt_close_samples: u64,
}
const _: () = assert!(core::mem::size_of::<SideCounters>() == 136);

impl SideCounters {
    /// Socket records created: every steered `connect()` but those that went unrecorded.
    pub fn socket_records_opened(&self) -> u64 {
        self.connections_steered.saturating_sub(self.socket_table_full).saturating_sub(self.socket_netns_full)
    }

    /// Steered sockets whose records are still open (a record is often created on one CPU and
    /// deleted on another; the counts are shared, so the difference holds).
    pub fn open_socket_records(&self) -> u64 {
        self.socket_records_opened().saturating_sub(self.socket_records_closed)
    }

    /// Steered sockets or datagrams that went without a record because a table was full: the
    /// socket table, or the UDP flow table.
    pub fn table_full(&self) -> u64 {
        self.socket_table_full.saturating_add(self.flow_table_full)
    }
}

impl From<SideCountersV3> for SideCounters {
    /// Exact for counts the V3 programs made: each steered `connect()` added to
    /// `connections_steered` and to exactly one of `socket_records_opened`, `socket_table_full`
    /// and `socket_netns_full`; datagrams whose flow went unrecorded also went to
    /// `socket_table_full`. The records open at the upgrade stay open.
    fn from(v3: SideCountersV3) -> Self {
        let socket_table_full = v3
            .connections_steered
            .saturating_sub(v3.socket_records_opened)
            .saturating_sub(v3.socket_netns_full)
            .min(v3.socket_table_full);
        let mut v4 = SideCounters {
            connections_steered: v3.connections_steered,
            datagrams_steered: v3.datagrams_steered,
            socket_table_full,
            socket_netns_full: v3.socket_netns_full,
            flow_table_full: v3.socket_table_full - socket_table_full,
            fail_open_backend_missing: v3.fail_open_backend_missing,
            abandoned_attempts: v3.abandoned_attempts,
            socket_records_closed: 0,
            established: v3.established,
            failed_attempts: v3.failed_attempts,
            resets: v3.resets,
            rto: v3.rto,
            rto_connections: v3.rto_connections,
            srtt_sum_us: v3.srtt_sum_us,
            srtt_samples: v3.srtt_samples,
            srtt_close_sum_us: v3.srtt_close_sum_us,
            srtt_close_samples: v3.srtt_close_samples,
        };
        let open = v3.socket_records_opened.saturating_sub(v3.socket_records_closed);
        v4.socket_records_closed = v4.socket_records_opened().saturating_sub(open);
        v4
    }
}

/// Value of COUNTERS_V3 and COUNTERS_V2 (per-CPU there), the layout agents before COUNTERS_V4
/// wrote; read once at an upgrade so that every service's counts carry on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SideCountersV3 {
    pub connections_steered: u64,
    pub datagrams_steered: u64,
    pub established: u64,
    pub failed_attempts: u64,
    pub abandoned_attempts: u64,
    pub resets: u64,
    pub rto: u64,
    pub rto_connections: u64,
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
    pub srtt_close_sum_us: u64,
    pub srtt_close_samples: u64,
    pub socket_records_opened: u64,
    pub socket_records_closed: u64,
    /// Connects without a record and datagrams without a flow, both.
    pub socket_table_full: u64,
    pub socket_netns_full: u64,
    pub fail_open_backend_missing: u64,
}
const _: () = assert!(core::mem::size_of::<SideCountersV3>() == 136);

impl SideCountersV3 {
    /// Adds another CPU's counters.
    pub fn add(&mut self, other: &SideCountersV3) {
        self.connections_steered += other.connections_steered;
        self.datagrams_steered += other.datagrams_steered;
        self.established += other.established;
        self.failed_attempts += other.failed_attempts;
        self.abandoned_attempts += other.abandoned_attempts;
        self.resets += other.resets;
        self.rto += other.rto;
        self.rto_connections += other.rto_connections;
        self.srtt_sum_us += other.srtt_sum_us;
        self.srtt_samples += other.srtt_samples;
        self.srtt_close_sum_us += other.srtt_close_sum_us;
        self.srtt_close_samples += other.srtt_close_samples;
        self.socket_records_opened += other.socket_records_opened;
        self.socket_records_closed += other.socket_records_closed;
        self.socket_table_full += other.socket_table_full;
        self.socket_netns_full += other.socket_netns_full;
        self.fail_open_backend_missing += other.fail_open_backend_missing;
    }
}

/// Value of COUNTERS_V1, the layout agents before COUNTERS_V2 wrote; read once at an upgrade so
/// that every service's counts carry on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SideCountersV1 {
    pub connections_steered: u64,
    pub datagrams_steered: u64,
    pub established: u64,
    pub failed_attempts: u64,
    pub resets: u64,
    pub rto: u64,
    pub srtt_sum_us: u64,
    pub srtt_samples: u64,
    pub fail_open_backend_missing: u64,
    pub fail_open_socket_table_full: u64,
}
const _: () = assert!(core::mem::size_of::<SideCountersV1>() == 80);

impl SideCountersV1 {
    /// Adds another CPU's counters.
    pub fn add(&mut self, other: &SideCountersV1) {
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
    }
}

impl From<SideCountersV1> for SideCounters {
    /// V1 kept no socket records' counts: none is open after the upgrade.
    fn from(v1: SideCountersV1) -> Self {
        let mut v4 = SideCounters {
            connections_steered: v1.connections_steered,
            datagrams_steered: v1.datagrams_steered,
            established: v1.established,
            failed_attempts: v1.failed_attempts,
            resets: v1.resets,
            rto: v1.rto,
            srtt_sum_us: v1.srtt_sum_us,
            srtt_samples: v1.srtt_samples,
            fail_open_backend_missing: v1.fail_open_backend_missing,
            socket_table_full: v1.fail_open_socket_table_full.min(v1.connections_steered),
            ..Default::default()
        };
        v4.socket_records_closed = v4.socket_records_opened();
        v4
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
    /// Most SOCKETS records one network namespace may hold; further sockets of that namespace
    /// are steered without a record (`socket_netns_full`). 0: no bound.
    pub sockets_per_netns: u32,
    /// SETTING_* bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// `Settings::flags`: steer only sockets of the host network namespace (hostNetwork pods and
/// node processes), leaving pod namespaces alone, for nodes whose pods run a sidecar mesh.
pub const SETTING_HOST_NETNS_ONLY: u32 = 1 << 0;

#[cfg(feature = "user")]
mod user {
    // Sound: bytemuck::Pod on each type proves it has no padding and any bit pattern is valid.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::BackendKeyV1 {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::SocketEntry {}
    unsafe impl aya::Pod for super::SocketSlot {}
    unsafe impl aya::Pod for super::UdpFlowKey {}
    unsafe impl aya::Pod for super::UdpFlow {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::SideCounters {}
    unsafe impl aya::Pod for super::SideCountersV3 {}
    unsafe impl aya::Pod for super::SideCountersV1 {}
    unsafe impl aya::Pod for super::CohortKey {}
    unsafe impl aya::Pod for super::Settings {}
}

/// Read-only globals the agent patches at load with offsets from the kernel's BTF: `sk_cookie`
/// in `struct sock`, and `sk` in `struct bpf_sock_ops_kern`. Left at `u32::MAX` (unknown), the
/// programs ask for every socket's cookie, as they did before.
pub const SK_COOKIE_OFFSET_GLOBAL: &str = "SK_COOKIE_OFFSET";
pub const SOCK_OPS_SK_OFFSET_GLOBAL: &str = "SOCK_OPS_SK_OFFSET";
/// Read-only global: SOCKET_SLOTS' size (a power of two), patched at load to the table's size.
pub const SOCKET_SLOT_COUNT_GLOBAL: &str = "SOCKET_SLOT_COUNT";

/// aya-log's level global in the object: the agent patches it at load (`agent.datapath_log`). It
/// lives in read-only data, so the verifier knows its value and removes every log statement above
/// it as dead code: a datapath loaded with logging off runs no log instruction at all.
pub const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";
/// `LOG_LEVEL_GLOBAL` values (aya-log's: error 1, warn 2, info 3, debug 4, trace 5). Off: none.
pub const LOG_LEVEL_OFF: u8 = 0;
/// Fail-open events: a connection to a frontend left untouched, or steered without its record.
pub const LOG_LEVEL_INFO: u8 = 3;
/// Also every steering decision, with what explains it.
pub const LOG_LEVEL_DEBUG: u8 = 4;

// Log records carry numbers only (copying strings in the kernel costs instructions); the agent
// names them when it reads a record. Shared so that both sides agree.
/// `key=` of a decision record: what the side was hashed on (the affinity key kind).
pub const LOG_KEY_CONNECTION: u8 = 0;
pub const LOG_KEY_NETNS: u8 = 1;
pub const LOG_KEY_CGROUP: u8 = 2;
/// `reason=` of a fail-open record: the frontend has no backend of the destination's family on
/// the side it would take, so the connection goes on untouched.
pub const LOG_REASON_NO_BACKEND_FAMILY: u8 = 0;
/// The revision's backend slot is outside BACKENDS or empty (the connection goes on untouched).
pub const LOG_REASON_BACKEND_MISSING: u8 = 1;
/// Steered, but the socket table was full: no record (getpeername shows the backend, no health).
pub const LOG_REASON_TABLE_FULL: u8 = 2;
/// Steered, but the socket's namespace holds its share of the table: no record.
pub const LOG_REASON_NETNS_FULL: u8 = 3;
/// Steered datagram whose reply translation could not be recorded.
pub const LOG_REASON_FLOW_TABLE_FULL: u8 = 4;
/// `call=` of a record.
pub const LOG_CALL_CONNECT: u8 = 0;
pub const LOG_CALL_DATAGRAM: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_slots_are_in_the_table_and_apart() {
        assert_eq!(socket_slot_count(65_536), 65_536);
        assert_eq!(socket_slot_count(1000), 1024);
        assert_eq!(socket_slot_count(1), 2);
        assert_eq!(socket_slots(5, 1024), (5, 517));
        assert_eq!(socket_slots(1024 + 600, 1024), (600, 88));
        for cookie in [1u64, 4095, 4096, u64::MAX, 1 << 40] {
            let (a, b) = socket_slots(cookie, 256);
            assert!(a < 256 && b < 256 && a != b, "{cookie}: {a} {b}");
        }
        // Sockets opened one after another take neighbouring slots.
        assert_eq!(socket_slots(70_001, 65_536).0 + 1, socket_slots(70_002, 65_536).0);
    }

    #[test]
    fn a_revisions_backends_lie_side_by_side_in_layout_order() {
        let value = FrontendValue {
            revision: 100,
            stable_v4: 3,
            stable_v6: 2,
            canary_v4: 1,
            canary_v6: 4,
            ..Default::default()
        };
        assert_eq!(value.backend_slots(), 10);
        let slots: [u32; 10] = [
            value.backend_slot(SIDE_STABLE, FAMILY_V4, 0),
            value.backend_slot(SIDE_STABLE, FAMILY_V4, 1),
            value.backend_slot(SIDE_STABLE, FAMILY_V4, 2),
            value.backend_slot(SIDE_STABLE, FAMILY_V6, 0),
            value.backend_slot(SIDE_STABLE, FAMILY_V6, 1),
            value.backend_slot(SIDE_CANARY, FAMILY_V4, 0),
            value.backend_slot(SIDE_CANARY, FAMILY_V6, 0),
            value.backend_slot(SIDE_CANARY, FAMILY_V6, 1),
            value.backend_slot(SIDE_CANARY, FAMILY_V6, 2),
            value.backend_slot(SIDE_CANARY, FAMILY_V6, 3),
        ];
        assert_eq!(slots, core::array::from_fn(|i| 100 + i as u32));
    }

    #[test]
    fn counter_slots_are_dense_and_bounded() {
        assert_eq!(counter_slot(0, SIDE_STABLE), Some(0));
        assert_eq!(counter_slot(0, SIDE_CANARY), Some(1));
        assert_eq!(counter_slot(7, SIDE_CANARY), Some(15));
        assert_eq!(counter_slot(MAX_SERVICES - 1, SIDE_CANARY), Some(COUNTER_SLOTS - 1));
        assert_eq!(counter_slot(MAX_SERVICES, SIDE_STABLE), None);
        assert_eq!(counter_slot(3, 2), None);
    }

    #[test]
    fn v3_counters_carry_over_exactly() {
        // 10 connects: 6 recorded (2 still open), 3 with the table full, 1 with the namespace
        // full; and 4 datagrams whose flow went unrecorded, in the same V3 field.
        let v3 = SideCountersV3 {
            connections_steered: 10,
            datagrams_steered: 50,
            socket_records_opened: 6,
            socket_records_closed: 4,
            socket_table_full: 3 + 4,
            socket_netns_full: 1,
            established: 5,
            srtt_close_samples: 2,
            ..Default::default()
        };
        let v4 = SideCounters::from(v3);
        assert_eq!(v4.connections_steered, 10);
        assert_eq!(v4.socket_records_opened(), 6);
        assert_eq!(v4.open_socket_records(), 2);
        assert_eq!((v4.socket_table_full, v4.flow_table_full, v4.table_full()), (3, 4, 7));
        assert_eq!((v4.socket_netns_full, v4.datagrams_steered, v4.established), (1, 50, 5));
        assert_eq!(v4.srtt_close_samples, 2);
        // Counts no V3 program could make (tampered): nothing underflows, nothing is invented.
        let odd = SideCounters::from(SideCountersV3 { socket_records_opened: 9, socket_table_full: 2, ..v3 });
        assert_eq!((odd.socket_table_full, odd.flow_table_full), (0, 2));
        assert!(odd.open_socket_records() <= 5);
    }

    #[test]
    fn v1_counters_carry_over_with_no_record_open() {
        let v1 = SideCountersV1 {
            connections_steered: 8,
            fail_open_socket_table_full: 3,
            established: 4,
            ..Default::default()
        };
        let v4 = SideCounters::from(v1);
        assert_eq!((v4.connections_steered, v4.socket_table_full, v4.established), (8, 3, 4));
        assert_eq!(v4.open_socket_records(), 0);
    }

    #[test]
    fn a_connect_opens_a_record_unless_it_is_counted_unrecorded() {
        let mut c =
            SideCounters { connections_steered: 5, socket_table_full: 1, socket_netns_full: 1, ..Default::default() };
        assert_eq!(c.socket_records_opened(), 3);
        c.socket_records_closed = 2;
        assert_eq!(c.open_socket_records(), 1);
        c.flow_table_full = 4;
        assert_eq!((c.table_full(), c.socket_records_opened()), (5, 3), "datagrams open no socket record");
    }
}
