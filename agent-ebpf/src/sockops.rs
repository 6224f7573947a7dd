//! Kernel health signals per service and side, from TCP's own state machine and its reset
//! tracepoint.

use agent_common::SOCKET_ESTABLISHED;
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::bpf_get_socket_cookie,
    macros::{btf_tracepoint, sock_ops},
    programs::{BtfTracePointContext, SockOpsContext},
    EbpfContext,
};

use crate::{maps::SOCKETS, steer::bump};

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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = SOCKETS.get_ptr_mut(cookie) else {
        return 1; // not a steered socket
    };
    let (service_id, side) = unsafe { ((*entry).service_id, (*entry).side) };
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state and RTO callbacks on steered sockets only. If the kernel refuses,
            // the connection is unaffected; the side just reports fewer signals.
            let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            unsafe { (*entry).flags |= SOCKET_ESTABLISHED };
            let srtt_us = srtt_us(&ctx);
            bump(service_id, side, |c| {
                c.established += 1;
                c.srtt_sum_us += srtt_us as u64;
                c.srtt_samples += 1;
            });
        }
        BPF_SOCK_OPS_STATE_CB => {
            // Refused, timed out or reset before ESTABLISHED.
            if ctx.arg(0) == BPF_TCP_SYN_SENT && ctx.arg(1) == BPF_TCP_CLOSE {
                bump(service_id, side, |c| c.failed_attempts += 1);
            }
        }
        BPF_SOCK_OPS_RTO_CB => bump(service_id, side, |c| c.rto += 1),
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
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if let Some(entry) = unsafe { SOCKETS.get(cookie) } {
        if entry.flags & SOCKET_ESTABLISHED != 0 {
            bump(entry.service_id, entry.side, |c| c.resets += 1);
        }
    }
    0
}

/// The kernel keeps srtt scaled by 8.
#[inline(always)]
fn srtt_us(ctx: &SockOpsContext) -> u32 {
    unsafe { (*ctx.ops).srtt_us >> 3 }
}
