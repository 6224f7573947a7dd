//! Every map the programs use, declared once. All are pinned by name under the agent's bpffs
//! directory so that an agent restart finds the same maps (and the sockets' state in them).
//! The agent checks each pinned map against these definitions before it adopts it.

use agent_common::{
    BackendKey, BackendValue, CohortKey, FrontendKey, FrontendValue, Settings, SideCounters, SocketEntry, UdpFlow,
    UdpFlowKey, COUNTER_SLOTS, MAX_BACKEND_SLOTS, MAX_COHORT_ENTRIES, MAX_FRONTENDS, MAX_STEERED_SOCKETS,
    NETNS_BUCKETS,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};

/// Frontend ip:port -> split and backend revision. Writer: agent. Readers: connect4/6,
/// sendmsg4/6. Sized for MAX_SERVICES services with a few frontends each; not preallocated, so
/// an idle node pays only for what it holds.
#[map(name = "FRONTENDS_V1")]
pub static FRONTENDS: HashMap<FrontendKey, FrontendValue> = HashMap::pinned(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// (revision, side, family, index) -> backend. Writer: agent (a revision is written whole before
/// any frontend points at it, and deleted only when no frontend has pointed at it for a grace
/// period). Readers: connect4/6, sendmsg4/6.
#[map(name = "BACKENDS_V1")]
pub static BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);

/// Socket cookie -> translation of a steered TCP or connected UDP socket. Writers: connect4/6
/// insert; sock_ops deletes when the kernel closes a TCP socket, sock_release deletes the others;
/// so entries are bounded by the steered sockets that are open. Readers: recvmsg4/6,
/// getpeername4/6, sock_ops, the reset tracepoint, and the agent (rollback termination).
/// Preallocated: an insert on the connect path takes a slot from a per-CPU free list instead of
/// allocating (about 0.4 µs less per steered connect), at the price of its slots of kernel memory
/// up front. The agent sets the size (`agent.steered_socket_capacity`); a full table never stops
/// a connection from being steered, it only goes unrecorded (counted).
#[map(name = "SOCKETS_V1")]
pub static SOCKETS: HashMap<u64, SocketEntry> = HashMap::pinned(MAX_STEERED_SOCKETS, 0);

/// (socket cookie, slot) -> a reply translation of an unconnected UDP socket. Writer: sendmsg4/6
/// (per datagram, only when the flow is new). Reader: recvmsg4/6. Deleted by sock_release. An
/// LRU map, so it is never full: a flood of sockets from one client evicts the least recently
/// used flows, and a live socket whose flow was evicted records it again with its next datagram.
#[map(name = "UDP_FLOWS_V1")]
pub static UDP_FLOWS: LruHashMap<UdpFlowKey, UdpFlow> = LruHashMap::pinned(MAX_STEERED_SOCKETS, 0);

/// `netns_bucket(network namespace cookie)` -> SOCKETS records its sockets hold, so one client
/// cannot take the whole table (the bound is `Settings::sockets_per_netns`). An array: its
/// lookup is inlined (no helper call) on the connect path, and it needs no upkeep as namespaces
/// come and go. Writers: connect4/6 (increment), sock_ops and sock_release (decrement), shared
/// by all CPUs (atomic adds). Reader: connect4/6.
#[map(name = "NETNS_SOCKETS_V1")]
pub static NETNS_SOCKETS: Array<u64> = Array::pinned(NETNS_BUCKETS, 0);

/// `counter_slot(service, side)` -> counters. Writers: every program, by atomic adds (one copy
/// for all CPUs: per-CPU copies would multiply the map by the CPU count, about 250 MiB at 10,000
/// services on 96 CPUs); the agent zeroes a slot before it hands its id to a new service. Reader:
/// the agent. An array: its lookup is inlined on the hot path (no helper call, no hashing), at
/// a fixed 136 B a slot (17 MiB for every possible service id).
#[map(name = "COUNTERS_V3")]
pub static COUNTERS: Array<SideCounters> = Array::pinned(COUNTER_SLOTS, 0);

/// (client cgroup id, service) -> COHORT_ALWAYS_CANARY / COHORT_NEVER_CANARY. Writer: agent.
/// Reader: connect4/6 and sendmsg4/6, only for services flagged FLAG_HAS_COHORTS.
#[map(name = "COHORTS_V1")]
pub static COHORTS: HashMap<CohortKey, u32> = HashMap::pinned(MAX_COHORT_ENTRIES, BPF_F_NO_PREALLOC);

/// Node settings, one slot. Writer: agent at start. Readers: every steering program.
#[map(name = "SETTINGS_V2")]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);
