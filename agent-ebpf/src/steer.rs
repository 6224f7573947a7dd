//! The stages every steering program shares: frontend lookup, side and backend pick, socket
//! record, counters. Each returns `None` to leave the call untouched.

use agent_common::{
    backend_index, family_of, pick_side, BackendKey, BackendValue, CohortKey, CounterKey, FrontendKey, FrontendValue,
    SideCounters, SocketEntry, FLAG_AFFINITY_CLIENT, FLAG_HAS_COHORTS, MAX_COHORT_DEPTH,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    programs::SockAddrContext,
    EbpfContext,
};

use crate::maps::{BACKENDS, COHORTS, COUNTERS, FRONTENDS, SETTINGS, SOCKETS};

/// Which call is being steered: it decides which counter moves and whether an earlier pick of the
/// same socket is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Connect,
    /// sendmsg on an unconnected UDP socket: the socket keeps the backend of its first datagram.
    Datagram,
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

#[inline(always)]
pub fn bump(service_id: u32, side: u8, update: impl FnOnce(&mut SideCounters)) {
    let key = CounterKey { service_id, side: side as u32 };
    if let Some(counters) = COUNTERS.get_ptr_mut(key) {
        // Per-CPU value: no other CPU writes it, so a plain increment is race-free.
        update(unsafe { &mut *counters });
    }
}

/// Frontend lookup; the value is copied so that the decision uses one consistent snapshot.
#[inline(always)]
fn svc_lookup(dst_be: &[u32; 4], port_be: u16) -> Option<FrontendValue> {
    let key = FrontendKey { addr_be: *dst_be, port_be, _pad: 0 };
    unsafe { FRONTENDS.get(key).copied() }
}

/// What is hashed to pick the side: the connection, or the client (its network namespace; in the
/// host namespace, where every pod-less process shares one namespace, its cgroup).
#[inline(always)]
fn split_key(ctx: &SockAddrContext, frontend: &FrontendValue, cookie: u64) -> u64 {
    if frontend.flags & FLAG_AFFINITY_CLIENT == 0 {
        return cookie;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host_netns = SETTINGS.get(0).map(|s| s.host_netns_cookie).unwrap_or(0);
    if netns == host_netns {
        unsafe { bpf_get_current_cgroup_id() }
    } else {
        netns
    }
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

/// Decides where a call to `dst_be:port_be` goes, records the socket and counts it.
#[inline(always)]
pub fn steer(ctx: &SockAddrContext, dst_be: &[u32; 4], port_be: u16, call: Call) -> Option<BackendValue> {
    let frontend = svc_lookup(dst_be, port_be)?;
    let family = family_of(dst_be);
    let cookie = socket_cookie(ctx);

    if call == Call::Datagram {
        if let Some(known) = unsafe { SOCKETS.get(cookie) } {
            if known.frontend_port_be == port_be && same_addr(&known.frontend_addr_be, dst_be) {
                let (side, backend) = (
                    known.side,
                    BackendValue { addr_be: known.backend_addr_be, port_be: known.backend_port_be, _pad: 0 },
                );
                bump(frontend.service_id, side, |c| c.datagrams_steered += 1);
                return Some(backend);
            }
        }
    }

    let key = split_key(ctx, &frontend, cookie);
    let side = pick_side(&frontend, family, key, cohort_lookup(&frontend))?;
    let count = frontend.backend_count(side, family);
    let index = backend_index(cookie, frontend.seed, count);
    let slot = BackendKey { revision: frontend.revision, side, family, index };
    let Some(backend) = (unsafe { BACKENDS.get(slot).copied() }) else {
        bump(frontend.service_id, side, |c| c.fail_open_backend_missing += 1);
        return None;
    };

    let entry = SocketEntry {
        frontend_addr_be: *dst_be,
        backend_addr_be: backend.addr_be,
        frontend_port_be: port_be,
        backend_port_be: backend.port_be,
        service_id: frontend.service_id,
        side,
        family,
        flags: 0,
    };
    // Record before rewriting: a socket we cannot translate back must not be steered.
    if SOCKETS.insert(cookie, entry, 0).is_err() {
        bump(frontend.service_id, side, |c| c.fail_open_socket_table_full += 1);
        return None;
    }
    match call {
        Call::Connect => bump(frontend.service_id, side, |c| c.connections_steered += 1),
        Call::Datagram => bump(frontend.service_id, side, |c| c.datagrams_steered += 1),
    }
    Some(backend)
}

/// Reverse translation: if this socket was steered and `addr_be:port_be` is its backend, the
/// frontend it was steered from.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, addr_be: &[u32; 4], port_be: u16) -> Option<SocketEntry> {
    let entry = unsafe { SOCKETS.get(socket_cookie(ctx)) }?;
    if entry.backend_port_be == port_be && same_addr(&entry.backend_addr_be, addr_be) {
        Some(*entry)
    } else {
        None
    }
}
