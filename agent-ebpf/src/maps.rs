//! Every map the programs use, declared once. All are pinned by name under the agent's bpffs
//! directory so that an agent restart finds the same maps (and the sockets' state in them).
//! The agent checks each pinned map against these definitions before it adopts it.

use agent_common::{
    BackendValue, CohortKey, FrontendKey, FrontendValue, Settings, SideCounters, SocketEntry, SocketSlot, UdpFlow,
    UdpFlowKey, COUNTER_SLOTS, MAX_BACKEND_SLOTS, MAX_COHORT_ENTRIES, MAX_FRONTENDS, MAX_STEERED_SOCKETS,
    NETNS_BUCKETS, SOCKET_TABLE_SLOTS,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};

/// Frontend ip:port -> split and backend revision. Writer: agent. Readers: connect4/6,
/// sendmsg4/6. Sized for MAX_SERVICES services with a few frontends each; not preallocated, so
/// an idle node pays only for what it holds.
#[map(name = "FRONTENDS_V2")]
pub static FRONTENDS: HashMap<FrontendKey, FrontendValue> = HashMap::pinned(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Backend slot (`FrontendValue::backend_slot`) -> backend. Writer: agent (a revision's run of
/// slots is written whole before any frontend points at it, and cleared and handed out again only
/// when no frontend has pointed at it for a grace period). Readers: connect4/6, sendmsg4/6. An
/// array: its lookup is inlined (no helper call, no hashing, no bucket walk) on the connect path.
#[map(name = "BACKENDS_V2")]
pub static BACKENDS: Array<BackendValue> = Array::pinned(MAX_BACKEND_SLOTS, 0);

/// The socket table: `socket_slots(cookie)` -> the record (translation, service, side, flags) of
/// a steered TCP or connected UDP socket. Writers: connect4/6 take a free slot by a
/// compare-and-swap of its cookie; sock_ops frees it when the kernel closes a TCP socket,
/// sock_release the others; so slots are held only by steered sockets that are open. Readers:
/// recvmsg4/6, getpeername4/6, sock_ops, the reset tracepoint, and the agent (rollback
/// termination). An array: its lookup is inlined, it takes no lock and no free list, and cookies
/// handed out one after another land side by side. The agent sets the size (the next power of
/// two of `agent.steered_socket_capacity`, patched into SOCKET_SLOT_COUNT).
#[map(name = "SOCKET_SLOTS_V1")]
pub static SOCKET_SLOTS: Array<SocketSlot> = Array::pinned(MAX_STEERED_SOCKETS, 0);

/// The legacy mark (`SOCKET_TABLE_LEGACY`): whether the spill table may hold records an older
/// agent's programs made, which no slot's `overflow` counts. Writer: the agent, at start. Readers:
/// every program that looks a socket up, when its first slot neither holds it nor counts an
/// overflow.
#[map(name = "SOCKET_TABLE_V1")]
pub static SOCKET_TABLE: Array<u64> = Array::pinned(SOCKET_TABLE_SLOTS, 0);

/// The spill table: socket cookie -> the record of a steered socket whose two slots in
/// SOCKET_SLOTS were both taken (and records an agent before the slot table made). Same writers
/// and readers as SOCKET_SLOTS, only when the slots miss. Preallocated: an insert takes an entry
/// from a per-CPU free list instead of allocating. The agent sets the size
/// (`agent.steered_socket_capacity`); a full table never stops a connection from being steered,
/// it only goes unrecorded (counted).
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
/// services on 96 CPUs; a steered `connect()` makes one); the agent zeroes a slot before it hands
/// its id to a new service. Reader: the agent. An array: its lookup is inlined on the hot path (no
/// helper call, no hashing), at a fixed 136 B a slot (17 MiB for every possible service id).
#[map(name = "COUNTERS_V4")]
pub static COUNTERS: Array<SideCounters> = Array::pinned(COUNTER_SLOTS, 0);

/// (client cgroup id, service) -> COHORT_ALWAYS_CANARY / COHORT_NEVER_CANARY. Writer: agent.
/// Reader: connect4/6 and sendmsg4/6, only for services flagged FLAG_HAS_COHORTS.
#[map(name = "COHORTS_V1")]
pub static COHORTS: HashMap<CohortKey, u32> = HashMap::pinned(MAX_COHORT_ENTRIES, BPF_F_NO_PREALLOC);

/// Node settings, one slot. Writer: agent at start. Readers: every steering program.
#[map(name = "SETTINGS_V2")]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);
