//! Types and decision logic shared by the eBPF programs and the agent.
//!
//! Everything the kernel side and the user side must agree on lives here: map names, the
//! `#[repr(C)]` key/value layouts, flag bits, and the pure functions that decide where a
//! connection goes. The eBPF programs call these functions; host unit tests prove them.
//!
//! Addresses are stored the way the kernel hands them to `cgroup/connect*` programs: as the
//! network-order bytes of an IPv6 address read as four native-endian `u32` words (`addr_be`).
//! IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`), so one key format serves both families
//! and a v4-mapped `connect()` on an IPv6 socket finds the IPv4 frontend.
#![no_std]

pub mod decision;
pub mod lifecycle;
pub mod maps;

pub use decision::*;
pub use lifecycle::*;
pub use maps::*;
