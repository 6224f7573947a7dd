use which::which;

/// Rebuild the eBPF object when bpf-linker changes, since the linker is part of the compiler here.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found: run `cargo xtask build-ebpf`, which installs it");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
    // BPF ISA v3 (kernel 5.1+; atomics from 5.12): the socket table takes a slot with a
    // compare-and-swap, which v1/v2 do not have.
    println!("cargo:rustc-link-arg-bins=--cpu-features=+alu32");
}
