//! sockshift's eBPF programs. Each program is thin: look up, decide (with `agent_common`),
//! rewrite. Every entry point lets the call proceed: on any error the connection goes on
//! untouched (fail open), and the reason is counted, never logged.
#![no_std]
#![no_main]
// atomic_xadd and atomic_cxchg (see steer::atomic_add and socket_table).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod kernel;
mod maps;
mod peer;
mod sockaddr;
mod socket_table;
mod sockops;
mod steer;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects code that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
