//! Kernel fields the programs' contexts do not expose, read at offsets the agent takes from the
//! kernel's BTF and patches into read-only globals at load (so the verifier knows them).

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Offset of `sk_cookie` in the kernel's `struct sock`. `u32::MAX` (not zero, which would put the
/// global in .bss, where it cannot be patched): unknown, and the programs ask for the cookie as
/// before.
#[unsafe(no_mangle)]
static SK_COOKIE_OFFSET: u32 = u32::MAX;

/// Offset of `sk` in `struct bpf_sock_ops_kern` (a sock_ops program's context). `u32::MAX`:
/// unknown.
#[unsafe(no_mangle)]
static SOCK_OPS_SK_OFFSET: u32 = u32::MAX;

/// The cookie of the socket at kernel address `sk` as it stands, without making one: 0 if it
/// never had one. Every program asks for a socket's cookie before it records anything under it,
/// and a cookie, once made, stays; so a socket without one has no record and no UDP flow, and
/// closing it needs no map lookup at all (asking for its cookie would make one, and a hash
/// lookup that misses). `None` when that cannot be told (offset unknown, read failed): the
/// caller asks for the cookie as before.
#[inline(always)]
pub fn current_cookie(sk: *const u8) -> Option<u64> {
    let offset = unsafe { core::ptr::read_volatile(&SK_COOKIE_OFFSET) };
    if offset == u32::MAX {
        return None;
    }
    unsafe { bpf_probe_read_kernel(sk.wrapping_add(offset as usize) as *const u64) }.ok()
}

/// `current_cookie` of the socket of a sock_ops context (`ops`: the context pointer).
#[inline(always)]
pub fn sock_ops_current_cookie(ops: *const u8) -> Option<u64> {
    let offset = unsafe { core::ptr::read_volatile(&SOCK_OPS_SK_OFFSET) };
    if offset == u32::MAX {
        return None;
    }
    match unsafe { bpf_probe_read_kernel(ops.wrapping_add(offset as usize) as *const u64) } {
        Ok(sk) if sk != 0 => current_cookie(sk as *const u8),
        _ => None,
    }
}
