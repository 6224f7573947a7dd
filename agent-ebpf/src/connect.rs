//! `connect()`: rewrite a frontend destination to the chosen backend (TCP, and UDP sockets that
//! connect, which then keep that backend for their life).

use agent_common::v4_mapped;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    sockaddr::{set_user_ip4, set_user_ip6, set_user_port_be, user_ip4, user_ip6, user_port_be},
    steer::steer,
};

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    sock4_forward::<false>(&ctx);
    1 // always let the call proceed: fail open, never EPERM
}

#[cgroup_sock_addr(connect6)]
pub fn sock6_connect(ctx: SockAddrContext) -> i32 {
    sock6_forward::<false>(&ctx);
    1
}

/// Rewrites an AF_INET destination. IPv4 frontends only have IPv4 backends to go to.
#[inline(always)]
pub fn sock4_forward<const DATAGRAM: bool>(ctx: &SockAddrContext) {
    let dst = v4_mapped(user_ip4(ctx));
    if let Some(backend) = steer::<DATAGRAM>(ctx, &dst, user_port_be(ctx)) {
        set_user_ip4(ctx, backend.addr_be[3]);
        set_user_port_be(ctx, backend.port_be);
    }
}

/// Rewrites an AF_INET6 destination. A v4-mapped destination finds the IPv4 frontend and gets a
/// v4-mapped IPv4 backend; a native IPv6 destination gets an IPv6 backend.
#[inline(always)]
pub fn sock6_forward<const DATAGRAM: bool>(ctx: &SockAddrContext) {
    let dst = user_ip6(ctx);
    if let Some(backend) = steer::<DATAGRAM>(ctx, &dst, user_port_be(ctx)) {
        set_user_ip6(ctx, &backend.addr_be);
        set_user_port_be(ctx, backend.port_be);
    }
}
