//! The stages every steering program shares: frontend lookup, side and backend pick, the socket
//! record or UDP flow, counters. Each returns `None` to leave the call untouched.

use agent_common::{
    backend_index, counter_slot, family_of, netns_bucket, pick_side, split_bucket, BackendValue, CohortKey,
    FrontendKey, FrontendValue, Settings, SideCounters, SocketEntry, UdpFlow, UdpFlowKey, FLAG_AFFINITY_CLIENT,
    FLAG_HAS_COHORTS, LOG_CALL_CONNECT, LOG_CALL_DATAGRAM, LOG_KEY_CGROUP, LOG_KEY_CONNECTION, LOG_KEY_NETNS,
    LOG_REASON_BACKEND_MISSING, LOG_REASON_FLOW_TABLE_FULL, LOG_REASON_NETNS_FULL, LOG_REASON_NO_BACKEND_FAMILY,
    LOG_REASON_TABLE_FULL, MAX_COHORT_DEPTH, SETTING_HOST_NETNS_ONLY, SOCKET_NETNS_COUNTED, SOCKET_UDP, UDP_FLOW_SLOTS,
};
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::{debug, info};

use crate::{
    maps::{BACKENDS, COHORTS, COUNTERS, FRONTENDS, NETNS_SOCKETS, SETTINGS, UDP_FLOWS},
    socket_table::{self, Inserted},
};

const IPPROTO_UDP: u32 = 17;

/// Which call is being steered: it decides what is recorded and which counter moves. Its value
/// is the log's `call=`.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Call {
    /// connect(): the socket keeps this backend for its life (a socket record).
    Connect = LOG_CALL_CONNECT,
    /// sendmsg on an unconnected UDP socket: decided again for every datagram, so the socket
    /// follows weight and backend changes; the cookie keeps the choice the same while nothing
    /// changes. Each backend it sent to gets a reply translation (a UDP flow).
    Datagram = LOG_CALL_DATAGRAM,
}

#[inline(always)]
pub fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    // Word by word: an array `==` may become a bcmp call, which BPF cannot link.
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
pub fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Adds to a field of the counters `c` points at (shared by every CPU: an atomic add).
macro_rules! count {
    ($c:expr, $field:ident) => {
        count!($c, $field, 1)
    };
    ($c:expr, $field:ident, $delta:expr) => {
        $crate::steer::atomic_add(unsafe { core::ptr::addr_of_mut!((*$c).$field) }, $delta)
    };
}
pub(crate) use count;

/// Moves the counters of one side of a service: `update` gets the slot, to `count!` on.
#[inline(always)]
pub fn bump(service_id: u32, side: u8, update: impl FnOnce(*mut SideCounters)) {
    let Some(slot) = counter_slot(service_id, side) else { return };
    if let Some(counters) = COUNTERS.get_ptr_mut(slot) {
        update(counters);
    }
}

/// Node settings; all zero (no bound, every namespace steered) if the slot cannot be read.
#[inline(always)]
pub fn settings() -> Settings {
    SETTINGS.get(0).copied().unwrap_or_default()
}

/// Adds `delta` (wrapping: `u64::MAX` subtracts one) to a counter that several CPUs share. The
/// result is unused, which keeps it a plain atomic add (BPF_XADD) on every BPF CPU version; the
/// BPF target has no compare-and-swap, so `AtomicU64::fetch_add` does not exist there.
#[inline(always)]
pub fn atomic_add(counter: *mut u64, delta: u64) {
    unsafe {
        let _ =
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(counter, delta);
    }
}

/// Forgets a socket record: deletes it, counts it closed (with `update`, in the same counter
/// lookup), and gives its namespace's share back. `netns` gives the socket's network namespace
/// cookie (asked only when needed).
#[inline(always)]
pub fn forget_socket(
    cookie: u64,
    entry: &SocketEntry,
    netns: impl FnOnce() -> u64,
    update: impl FnOnce(*mut SideCounters),
) {
    if !socket_table::remove(cookie) {
        return; // deleted meanwhile by another path: counted there
    }
    bump(entry.service_id, entry.side, |c| {
        count!(c, socket_records_closed);
        update(c);
    });
    if entry.flags & SOCKET_NETNS_COUNTED != 0 {
        if let Some(count) = NETNS_SOCKETS.get_ptr_mut(netns_bucket(netns())) {
            atomic_add(count, u64::MAX);
        }
    }
}

/// Frontend lookup; the value is copied so that the decision uses one consistent snapshot.
#[inline(always)]
fn svc_lookup(dst_be: &[u32; 4], port_be: u16) -> Option<FrontendValue> {
    let key = FrontendKey { addr_be: *dst_be, port_be, _pad: 0 };
    unsafe { FRONTENDS.get(key).copied() }
}

/// What is hashed to pick the side: the connection, or the client (its network namespace; in the
/// host namespace, where every pod-less process shares one namespace, its cgroup). With the
/// key's kind (`LOG_KEY_*`), for the debug log.
#[inline(always)]
fn split_key(ctx: &SockAddrContext, frontend: &FrontendValue, settings: &Settings, cookie: u64) -> (u64, u8) {
    if frontend.flags & FLAG_AFFINITY_CLIENT == 0 {
        return (cookie, LOG_KEY_CONNECTION);
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == settings.host_netns_cookie {
        (unsafe { bpf_get_current_cgroup_id() }, LOG_KEY_CGROUP)
    } else {
        (netns, LOG_KEY_NETNS)
    }
}

/// An address as its network-order bytes, for the log's `{:i}`.
#[inline(always)]
fn addr_bytes(addr_be: &[u32; 4]) -> [u8; 16] {
    // Sound: same size, and every bit pattern of either is valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*addr_be) }
}

/// Cohort override of the calling process: the deepest of its cgroup and their ancestors that
/// has an entry for this service wins.
#[inline(always)]
fn cohort_lookup(frontend: &FrontendValue) -> u32 {
    if frontend.flags & FLAG_HAS_COHORTS == 0 {
        return 0;
    }
    let mut cohort = 0;
    // Level 0 is the root; the bound keeps the loop finite for the verifier.
    let mut level = 1;
    while level <= MAX_COHORT_DEPTH {
        let cgroup_id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if cgroup_id == 0 {
            break; // deeper than the process's own cgroup
        }
        let key = CohortKey { cgroup_id, service_id: frontend.service_id, _pad: 0 };
        if let Some(value) = unsafe { COHORTS.get(key) } {
            cohort = *value;
        }
        level += 1;
    }
    cohort
}

/// Decides where a call to `dst_be:port_be` goes, records the socket (or the UDP flow) and
/// counts it.
#[inline(always)]
/// `DATAGRAM` picks the call (`Call::Datagram` when true) at compile time: each program gets its
/// own copy with the other call's code gone, whatever LLVM makes of the log statements.
pub fn steer<const DATAGRAM: bool>(ctx: &SockAddrContext, dst_be: &[u32; 4], port_be: u16) -> Option<BackendValue> {
    let call = if DATAGRAM { Call::Datagram } else { Call::Connect };
    let frontend = svc_lookup(dst_be, port_be)?;
    let settings = settings();
    if settings.flags & SETTING_HOST_NETNS_ONLY != 0
        && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != settings.host_netns_cookie
    {
        return None; // a pod namespace, left to its sidecar mesh
    }
    let family = family_of(dst_be);
    let cookie = socket_cookie(ctx);
    let (key, key_kind) = split_key(ctx, &frontend, &settings, cookie);
    let cohort = cohort_lookup(&frontend);
    let Some(side) = pick_side(&frontend, family, key, cohort) else {
        info!(
            ctx,
            "fail_open service_id={} call={} reason={} frontend={:i} port={}",
            frontend.service_id,
            call as u8,
            LOG_REASON_NO_BACKEND_FAMILY,
            addr_bytes(dst_be),
            u16::from_be(port_be)
        );
        return None;
    };
    let count = frontend.backend_count(side, family);
    let index = backend_index(cookie, frontend.seed, count);
    let slot = frontend.backend_slot(side, family, index);
    // A slot no revision holds is zero (port 0): never reached unless a frontend were written
    // before its revision.
    let Some(backend) = BACKENDS.get(slot).copied().filter(|b| b.port_be != 0) else {
        bump(frontend.service_id, side, |c| count!(c, fail_open_backend_missing));
        info!(
            ctx,
            "fail_open service_id={} call={} side={} reason={} revision={} slot={}",
            frontend.service_id,
            call as u8,
            side,
            LOG_REASON_BACKEND_MISSING,
            frontend.revision,
            slot
        );
        return None;
    };
    // Every decision, with what explains it: the bucket against the weight (a cohort override
    // wins over both), and what the bucket was hashed from.
    debug!(
        ctx,
        "steer service_id={} call={} side={} backend={:i} port={} bucket={} weight_ppm={} key={} cohort={}",
        frontend.service_id,
        call as u8,
        side,
        addr_bytes(&backend.addr_be),
        u16::from_be(backend.port_be),
        split_bucket(key, frontend.seed),
        frontend.canary_ppm,
        key_kind,
        cohort
    );

    match call {
        Call::Connect => {
            let mut entry = SocketEntry {
                frontend_addr_be: *dst_be,
                backend_addr_be: backend.addr_be,
                frontend_port_be: port_be,
                backend_port_be: backend.port_be,
                service_id: frontend.service_id,
                side,
                family,
                flags: 0,
            };
            if unsafe { (*ctx.sock_addr).protocol } == IPPROTO_UDP {
                entry.flags |= SOCKET_UDP;
            }
            // The record is for reverse translation and health only: a TCP (or connected UDP)
            // socket reaches its backend without it, so a full table steers anyway.
            let recorded = record_socket(ctx, cookie, &settings, entry);
            match recorded {
                Recorded::Yes => {}
                Recorded::TableFull | Recorded::NetnsFull => info!(
                    ctx,
                    "fail_open service_id={} call={} side={} reason={}",
                    frontend.service_id,
                    call as u8,
                    side,
                    if matches!(recorded, Recorded::TableFull) { LOG_REASON_TABLE_FULL } else { LOG_REASON_NETNS_FULL }
                ),
            }
            // One add for a recorded socket: the records opened are the connections steered
            // less those counted unrecorded (`SideCounters::socket_records_opened`).
            bump(frontend.service_id, side, |c| {
                count!(c, connections_steered);
                match recorded {
                    Recorded::Yes => {}
                    Recorded::TableFull => count!(c, socket_table_full),
                    Recorded::NetnsFull => count!(c, socket_netns_full),
                }
            });
        }
        Call::Datagram => {
            let recorded = record_flow(cookie, dst_be, port_be, &backend);
            if !recorded {
                info!(
                    ctx,
                    "fail_open service_id={} call={} side={} reason={}",
                    frontend.service_id,
                    call as u8,
                    side,
                    LOG_REASON_FLOW_TABLE_FULL
                );
            }
            bump(frontend.service_id, side, |c| {
                count!(c, datagrams_steered);
                if !recorded {
                    count!(c, flow_table_full);
                }
            });
        }
    }
    Some(backend)
}

#[derive(Clone, Copy)]
enum Recorded {
    Yes,
    TableFull,
    NetnsFull,
}

/// Records the socket, within the namespace's share of the table.
#[inline(always)]
fn record_socket(ctx: &SockAddrContext, cookie: u64, settings: &Settings, mut entry: SocketEntry) -> Recorded {
    let mut netns_count: Option<*mut u64> = None;
    if settings.sockets_per_netns != 0 {
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if let Some(count) = NETNS_SOCKETS.get_ptr_mut(netns_bucket(netns)) {
            // Signed: a count raced below zero reads as zero, never as a full namespace.
            if unsafe { core::ptr::read_volatile(count) } as i64 >= settings.sockets_per_netns as i64 {
                // A socket connecting again must not keep its old record (another service's or
                // side's, which would be charged with this connection).
                if let Some(old) = socket_table::get(cookie) {
                    forget_socket(cookie, &old, || netns, |_| {});
                }
                return Recorded::NetnsFull;
            }
            entry.flags |= SOCKET_NETNS_COUNTED;
            netns_count = Some(count);
        }
    }
    match socket_table::insert(cookie, &entry) {
        Inserted::New => {
            if let Some(count) = netns_count {
                atomic_add(count, 1);
            }
            Recorded::Yes
        }
        Inserted::Replaced(old) => {
            // The socket connects again (after a failed attempt, or a UDP socket re-connecting):
            // its old record is counted closed where it was opened, the new one opened (as a
            // connection steered) by the caller.
            // Same socket, same namespace: the share it held stays held.
            bump(old.service_id, old.side, |c| count!(c, socket_records_closed));
            if old.flags & SOCKET_NETNS_COUNTED == 0 {
                if let Some(count) = netns_count {
                    atomic_add(count, 1);
                }
            } else if netns_count.is_none() {
                // No bound any more: the share the old record held is given back.
                if let Some(count) =
                    NETNS_SOCKETS.get_ptr_mut(netns_bucket(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }))
                {
                    atomic_add(count, u64::MAX);
                }
            }
            Recorded::Yes
        }
        Inserted::Full => Recorded::TableFull,
    }
}

/// Makes sure a reply from `backend` to this socket is shown as coming from `dst_be:port_be`.
/// Slots fill from 0; when all are used, the oldest translation is replaced. `false` if the flow
/// could not be recorded.
#[inline(always)]
fn record_flow(cookie: u64, dst_be: &[u32; 4], port_be: u16, backend: &BackendValue) -> bool {
    let mut flow = UdpFlow {
        frontend_addr_be: *dst_be,
        backend_addr_be: backend.addr_be,
        frontend_port_be: port_be,
        backend_port_be: backend.port_be,
        written: 0,
    };
    let head_key = UdpFlowKey { cookie, slot: 0, _pad: 0 };
    let mut slot = 0;
    while slot < UDP_FLOW_SLOTS {
        let key = UdpFlowKey { cookie, slot, _pad: 0 };
        match unsafe { UDP_FLOWS.get(key) } {
            Some(known) => {
                if same_flow(known, &flow) {
                    return true; // the common case: one lookup per datagram
                }
            }
            None => {
                if slot == 0 {
                    flow.written = 1;
                } else if let Some(head) = UDP_FLOWS.get_ptr_mut(head_key) {
                    unsafe { (*head).written = slot + 1 };
                }
                return UDP_FLOWS.insert(key, flow, BPF_ANY as u64).is_ok();
            }
        }
        slot += 1;
    }
    // Every slot holds another translation: replace the oldest.
    let Some(head) = UDP_FLOWS.get_ptr_mut(head_key) else { return false };
    let written = unsafe { (*head).written };
    let victim = written % UDP_FLOW_SLOTS;
    unsafe { (*head).written = written.wrapping_add(1) };
    if victim == 0 {
        flow.written = written.wrapping_add(1);
    }
    UDP_FLOWS.insert(UdpFlowKey { cookie, slot: victim, _pad: 0 }, flow, BPF_ANY as u64).is_ok()
}

#[inline(always)]
fn same_flow(a: &UdpFlow, b: &UdpFlow) -> bool {
    a.frontend_port_be == b.frontend_port_be
        && a.backend_port_be == b.backend_port_be
        && same_addr(&a.frontend_addr_be, &b.frontend_addr_be)
        && same_addr(&a.backend_addr_be, &b.backend_addr_be)
}

/// Reverse translation of a steered TCP or connected UDP socket: if `addr_be:port_be` is its
/// backend, the frontend it was steered from.
#[inline(always)]
pub fn reverse_socket(cookie: u64, addr_be: &[u32; 4], port_be: u16) -> Option<([u32; 4], u16)> {
    let entry = socket_table::get(cookie)?;
    if entry.backend_port_be == port_be && same_addr(&entry.backend_addr_be, addr_be) {
        Some((entry.frontend_addr_be, entry.frontend_port_be))
    } else {
        None
    }
}

/// Reverse translation of an unconnected UDP socket: the frontend of the flow whose backend is
/// `addr_be:port_be`. Stops at the first empty slot, so a socket that was never steered costs
/// one lookup.
#[inline(always)]
pub fn reverse_flow(cookie: u64, addr_be: &[u32; 4], port_be: u16) -> Option<([u32; 4], u16)> {
    let mut slot = 0;
    while slot < UDP_FLOW_SLOTS {
        let flow = unsafe { UDP_FLOWS.get(UdpFlowKey { cookie, slot, _pad: 0 }) }?;
        if flow.backend_port_be == port_be && same_addr(&flow.backend_addr_be, addr_be) {
            return Some((flow.frontend_addr_be, flow.frontend_port_be));
        }
        slot += 1;
    }
    None
}

/// Deletes every UDP flow of a socket.
#[inline(always)]
pub fn forget_flows(cookie: u64) {
    let Some(head) = (unsafe { UDP_FLOWS.get(UdpFlowKey { cookie, slot: 0, _pad: 0 }) }) else {
        return; // never sent an unconnected datagram to a frontend: the common case
    };
    let used = if head.written < UDP_FLOW_SLOTS { head.written } else { UDP_FLOW_SLOTS };
    let mut slot = 0;
    while slot < UDP_FLOW_SLOTS {
        if slot >= used && slot > 0 {
            break;
        }
        let _ = UDP_FLOWS.remove(UdpFlowKey { cookie, slot, _pad: 0 });
        slot += 1;
    }
}
