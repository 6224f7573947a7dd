//! Kernel health signals per service and side, from TCP's own state machine and its reset
//! tracepoint. sock_ops also ends the life of a TCP socket's record: when the kernel closes it.

use agent_common::{
    attempt_outcome, srtt_sample_us, AttemptOutcome, SOCKET_ARMED, SOCKET_ESTABLISHED, SOCKET_HAD_RTO, SOCKET_UDP,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{btf_tracepoint, sock_ops},
    programs::{BtfTracePointContext, SockOpsContext},
    EbpfContext,
};

use crate::{
    kernel::{current_cookie, sock_ops_current_cookie},
    socket_table,
    steer::{bump, count, forget_socket},
};

#[sock_ops]
pub fn sock_health(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // Only a few callbacks matter; most sock_ops calls end here without a lookup.
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_RTO_CB
    {
        return 1;
    }
    // Of the state changes (steered sockets only), only the close matters: the others (a
    // connection's ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT...) end here, before
    // the record's line is read.
    if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) != BPF_TCP_CLOSE {
        return 1;
    }
    // An unsteered socket has no cookie yet (connect4 asks for one only when it steers): asking
    // for it here would make one for every TCP connection and take a lookup that misses.
    // State and RTO callbacks come only for steered sockets (their connect callback asked for
    // them), so only the two that come for every connection look first.
    let every_connection = op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    let cookie = match if every_connection { sock_ops_current_cookie(ctx.ops as *const u8) } else { None } {
        Some(0) => return 1,
        Some(cookie) => cookie,
        None => unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
    };
    let Some(entry) = socket_table::find(cookie) else {
        return 1; // not a steered socket
    };
    let record = unsafe { *entry };
    let (service_id, side) = (record.service_id, record.side);
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state and RTO callbacks on steered sockets only. If the kernel refuses,
            // the connection is unaffected: its record then goes at sock_release, and the side
            // just reports fewer signals.
            let flags = (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32;
            if record.flags & SOCKET_UDP == 0 && ctx.set_cb_flags(flags).is_ok() {
                unsafe { (*entry).flags |= SOCKET_ARMED };
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            unsafe { (*entry).flags |= SOCKET_ESTABLISHED };
            let srtt = srtt_sample_us(unsafe { (*ctx.ops).srtt_us });
            bump(service_id, side, |c| {
                count!(c, established);
                if let Some(us) = srtt {
                    count!(c, srtt_sum_us, us);
                    count!(c, srtt_samples);
                }
            });
        }
        BPF_SOCK_OPS_STATE_CB => {
            // The kernel closes the socket (the only state change that gets here): count how the attempt ended (refused or timed out
            // while the client waited, or given up by the client), take the connection's
            // last RTT, and forget the record.
            let outcome = attempt_outcome(record.flags, ctx.arg(0));
            let srtt = if record.flags & SOCKET_ESTABLISHED != 0 {
                srtt_sample_us(unsafe { (*ctx.ops).srtt_us })
            } else {
                None
            };
            let netns = || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            forget_socket(cookie, &record, netns, |c| {
                match outcome {
                    AttemptOutcome::Failed => count!(c, failed_attempts),
                    AttemptOutcome::Abandoned => count!(c, abandoned_attempts),
                    AttemptOutcome::NotAnAttempt => {}
                }
                if let Some(us) = srtt {
                    count!(c, srtt_sum_us, us);
                    count!(c, srtt_samples);
                    count!(c, srtt_close_sum_us, us);
                    count!(c, srtt_close_samples);
                }
            });
        }
        BPF_SOCK_OPS_RTO_CB => {
            let first = record.flags & SOCKET_HAD_RTO == 0;
            if first {
                unsafe { (*entry).flags |= SOCKET_HAD_RTO };
            }
            bump(service_id, side, |c| {
                count!(c, rto);
                if first {
                    count!(c, rto_connections);
                }
            });
        }
        _ => {}
    }
    1
}

/// A reset received by any socket (`tcp_reset()`): counted for steered sockets that had
/// reached ESTABLISHED. The tracepoint is the only place that tells a reset from an orderly
/// close in every TCP state; a reset in SYN_SENT is a failed attempt, counted above.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    let cookie = match current_cookie(sk as *const u8) {
        Some(0) => return 0, // never steered (asking would make it a cookie)
        Some(cookie) => cookie,
        None => unsafe { bpf_get_socket_cookie(sk) },
    };
    if let Some(entry) = socket_table::get(cookie) {
        if entry.flags & SOCKET_ESTABLISHED != 0 {
            bump(entry.service_id, entry.side, |c| count!(c, resets));
        }
    }
    0
}
