//! `getpeername()` reports the frontend for a steered socket; `sock_release` forgets the socket.

use agent_common::v4_mapped;
use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};

use crate::{
    maps::SOCKETS,
    sockaddr::{set_user_ip4, set_user_ip6, set_user_port_be, user_ip4, user_ip6, user_port_be},
    steer::reverse,
};

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    sock4_reverse(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    sock6_reverse(&ctx);
    1
}

/// Sockets are released before the kernel closes them, so the entry goes with the last user
/// reference and SOCKETS stays bounded by the steered sockets that are open.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCKETS.remove(cookie); // most sockets were never steered: nothing to remove
    1
}

#[inline(always)]
pub fn sock4_reverse(ctx: &SockAddrContext) {
    if let Some(entry) = reverse(ctx, &v4_mapped(user_ip4(ctx)), user_port_be(ctx)) {
        set_user_ip4(ctx, entry.frontend_addr_be[3]);
        set_user_port_be(ctx, entry.frontend_port_be);
    }
}

#[inline(always)]
pub fn sock6_reverse(ctx: &SockAddrContext) {
    if let Some(entry) = reverse(ctx, &user_ip6(ctx), user_port_be(ctx)) {
        set_user_ip6(ctx, &entry.frontend_addr_be);
        set_user_port_be(ctx, entry.frontend_port_be);
    }
}
