use which::which;

/// Rebuild the eBPF object when bpf-linker changes, since the linker is part of the compiler here.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found: run `cargo xtask build-ebpf`, which installs it");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
