//! Reading and writing the address fields of `bpf_sock_addr`.
//!
//! The verifier accepts only 4-byte accesses to `user_ip6[i]` and `user_port`; volatile accesses
//! keep LLVM from merging two of them into one 8-byte access.

use aya_ebpf::programs::SockAddrContext;

#[inline(always)]
pub fn user_ip4(ctx: &SockAddrContext) -> u32 {
    unsafe { core::ptr::addr_of!((*ctx.sock_addr).user_ip4).read_volatile() }
}

#[inline(always)]
pub fn set_user_ip4(ctx: &SockAddrContext, ip4_be: u32) {
    unsafe { core::ptr::addr_of_mut!((*ctx.sock_addr).user_ip4).write_volatile(ip4_be) }
}

#[inline(always)]
pub fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    unsafe {
        let base = core::ptr::addr_of!((*ctx.sock_addr).user_ip6).cast::<u32>();
        [base.read_volatile(), base.add(1).read_volatile(), base.add(2).read_volatile(), base.add(3).read_volatile()]
    }
}

#[inline(always)]
pub fn set_user_ip6(ctx: &SockAddrContext, addr_be: &[u32; 4]) {
    unsafe {
        let base = core::ptr::addr_of_mut!((*ctx.sock_addr).user_ip6).cast::<u32>();
        base.write_volatile(addr_be[0]);
        base.add(1).write_volatile(addr_be[1]);
        base.add(2).write_volatile(addr_be[2]);
        base.add(3).write_volatile(addr_be[3]);
    }
}

/// `user_port` holds a network-order u16 in a u32.
#[inline(always)]
pub fn user_port_be(ctx: &SockAddrContext) -> u16 {
    unsafe { core::ptr::addr_of!((*ctx.sock_addr).user_port).read_volatile() as u16 }
}

#[inline(always)]
pub fn set_user_port_be(ctx: &SockAddrContext, port_be: u16) {
    unsafe { core::ptr::addr_of_mut!((*ctx.sock_addr).user_port).write_volatile(port_be as u32) }
}
