//! UDP: `sendmsg` steers every datagram of unconnected sockets; `recvmsg` makes replies appear to
//! come from the frontend the client asked.

use agent_common::{v4_mapped, TCP_ESTABLISHED};
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    connect::{sock4_forward, sock6_forward},
    sockaddr::{set_user_ip4, set_user_ip6, set_user_port_be, user_ip4, user_ip6, user_port_be},
    steer::{reverse_flow, reverse_socket, socket_cookie},
};

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    sock4_forward::<true>(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    sock6_forward::<true>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    if let Some((addr, port)) = reply_source(&ctx, &v4_mapped(user_ip4(&ctx)), user_port_be(&ctx)) {
        set_user_ip4(&ctx, addr[3]);
        set_user_port_be(&ctx, port);
    }
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    if let Some((addr, port)) = reply_source(&ctx, &user_ip6(&ctx), user_port_be(&ctx)) {
        set_user_ip6(&ctx, &addr);
        set_user_port_be(&ctx, port);
    }
    1
}

/// The frontend a reply from `addr_be:port_be` should appear to come from: a connected socket
/// has one translation (its record), an unconnected one a flow per backend it sent to.
#[inline(always)]
fn reply_source(ctx: &SockAddrContext, addr_be: &[u32; 4], port_be: u16) -> Option<([u32; 4], u16)> {
    let cookie = socket_cookie(ctx);
    // A connected UDP socket is in TCP_ESTABLISHED; `sk` is never null in a sock_addr program.
    let state = unsafe { core::ptr::addr_of!((*(*ctx.sock_addr).__bindgen_anon_1.sk).state).read_volatile() };
    if state == TCP_ESTABLISHED {
        reverse_socket(cookie, addr_be, port_be)
    } else {
        reverse_flow(cookie, addr_be, port_be)
    }
}
