//! UDP: `sendmsg` steers datagrams of unconnected sockets; `recvmsg` makes replies appear to
//! come from the frontend the client asked.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    connect::{sock4_forward, sock6_forward},
    peer::{sock4_reverse, sock6_reverse},
    steer::Call,
};

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    sock4_forward(&ctx, Call::Datagram);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    sock6_forward(&ctx, Call::Datagram);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    sock4_reverse(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    sock6_reverse(&ctx);
    1
}
