//! Builds the eBPF programs (crate `agent-ebpf`, on the nightly toolchain with bpf-linker) and
//! leaves the object in OUT_DIR for `include_bytes_aligned!`.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    println!("cargo:rerun-if-changed={}/../agent-common/src", env!("CARGO_MANIFEST_DIR"));
    aya_build::build_ebpf([Package { name: "agent-ebpf", root_dir, ..Default::default() }], Toolchain::default())
}
