//! `getpeername()` reports the frontend for a steered socket; `sock_release` forgets the socket.

use agent_common::{kept_past_release, v4_mapped, SOCKET_RELEASED};
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};

use crate::{
    kernel::current_cookie,
    sockaddr::{set_user_ip4, set_user_ip6, set_user_port_be, user_ip4, user_ip6, user_port_be},
    socket_table,
    steer::{forget_flows, forget_socket, reverse_socket, socket_cookie},
};

const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    if let Some((addr, port)) = reverse_socket(socket_cookie(&ctx), &v4_mapped(user_ip4(&ctx)), user_port_be(&ctx)) {
        set_user_ip4(&ctx, addr[3]);
        set_user_port_be(&ctx, port);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    if let Some((addr, port)) = reverse_socket(socket_cookie(&ctx), &user_ip6(&ctx), user_port_be(&ctx)) {
        set_user_ip6(&ctx, &addr);
        set_user_port_be(&ctx, port);
    }
    1
}

/// The application closes a socket: its UDP flows go, and so does its record, unless the
/// kernel still has to close the TCP connection: then sock_ops deletes the record when it does,
/// which is when an attempt the client gave up ends and a connection's last RTT is known.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // Most sockets were never steered, and most of those never had a cookie: done without one.
    let cookie = match current_cookie(ctx.sock as *const u8) {
        Some(0) => return 1,
        Some(cookie) => cookie,
        None => unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
    };
    let (protocol, state) = unsafe { ((*ctx.sock).protocol, (*ctx.sock).state) };
    if protocol == IPPROTO_UDP {
        forget_flows(cookie);
    }
    // Its slots, then the spill table only if it holds anything: no lock either way.
    let Some(entry) = socket_table::find(cookie) else { return 1 };
    let record = unsafe { *entry };
    if kept_past_release(record.flags, state) {
        unsafe { (*entry).flags |= SOCKET_RELEASED };
    } else {
        forget_socket(cookie, &record, || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }, |_| {});
    }
    1
}
