//! Kernel health signals per service and side, from TCP's own state machine.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
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
    let Some(entry) = (unsafe { SOCKETS.get(cookie) }) else {
        return 1; // not a steered socket
    };
    let (service_id, side) = (entry.service_id, entry.side);
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state and RTO callbacks on steered sockets only. If the kernel refuses,
            // the connection is unaffected; the side just reports fewer signals.
            let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let srtt_us = srtt_us(&ctx);
            bump(service_id, side, |c| {
                c.established += 1;
                c.srtt_sum_us += srtt_us as u64;
                c.srtt_samples += 1;
            });
        }
        BPF_SOCK_OPS_STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            if old == BPF_TCP_SYN_SENT && new == BPF_TCP_CLOSE {
                bump(service_id, side, |c| c.failed_attempts += 1);
            } else if old == BPF_TCP_ESTABLISHED && new == BPF_TCP_CLOSE {
                // Straight from ESTABLISHED to CLOSE is a reset: an orderly close passes
                // through FIN_WAIT or CLOSE_WAIT, and a local abort happens after sock_release
                // has already forgotten the socket.
                bump(service_id, side, |c| c.resets += 1);
            }
        }
        BPF_SOCK_OPS_RTO_CB => bump(service_id, side, |c| c.rto += 1),
        _ => {}
    }
    1
}

/// The kernel keeps srtt scaled by 8.
#[inline(always)]
fn srtt_us(ctx: &SockOpsContext) -> u32 {
    unsafe { (*ctx.ops).srtt_us >> 3 }
}
