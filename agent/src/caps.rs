//! The capabilities the agent needs, checked once at start. A container started without one of
//! them would otherwise fail deep inside the eBPF load with a bare `EPERM` that names a map or a
//! program, not the capability; this check names what is missing and why it is needed.
//!
//! The rules are the kernel's (kernel/bpf/syscall.c): creating the maps and loading any program
//! needs CAP_BPF, the cgroup socket programs are networking programs and also need
//! CAP_NET_ADMIN, the BTF tracepoint is a tracing program and also needs CAP_PERFMON, and
//! CAP_SYS_ADMIN stands in for each of the three. Nothing else is needed: the agent runs as root
//! and every file it touches (bpffs, the cgroup directory, BTF, its state) is root's, so no
//! CAP_DAC_OVERRIDE; it does not mount bpffs when the node has (the DaemonSet mounts the
//! node's), so no CAP_SYS_ADMIN. tests/e2e/daemonset.rs proves each one necessary in a real pod.

use std::{
    fmt, io,
    os::fd::{FromRawFd, OwnedFd},
};

/// A Linux capability by its number (include/uapi/linux/capability.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub number: u32,
    pub name: &'static str,
}

pub const CAP_NET_ADMIN: Capability = Capability { number: 12, name: "CAP_NET_ADMIN" };
pub const CAP_SYS_ADMIN: Capability = Capability { number: 21, name: "CAP_SYS_ADMIN" };
pub const CAP_PERFMON: Capability = Capability { number: 38, name: "CAP_PERFMON" };
pub const CAP_BPF: Capability = Capability { number: 39, name: "CAP_BPF" };

/// What the agent needs, each with what it is needed for.
pub const REQUIRED: [(Capability, &str); 3] = [
    (CAP_BPF, "creating and pinning the maps and loading the programs (bpf())"),
    (CAP_NET_ADMIN, "loading the cgroup socket programs, which are networking programs"),
    (CAP_PERFMON, "loading the tcp_receive_reset BTF tracepoint, a tracing program"),
];

/// `warn` makes a failed check a warning and the agent starts anyway, leaving the verdict to the
/// kernel (a kernel whose rules differ, a BPF token); `enforce` (the default) refuses to start.
pub const CHECK_ENV: &str = "SOCKSHIFT_CAPABILITY_CHECK";

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading /proc/self/status: {0}")]
    Status(#[source] io::Error),
    #[error("/proc/self/status has no CapEff line the agent can read")]
    NoCapEff,
    #[error("{0}")]
    Missing(Missing),
    #[error("bpf() fails with {source} although the process holds CAP_BPF: {hint}")]
    BpfRefused { source: io::Error, hint: &'static str },
    #[error("{CHECK_ENV}={0:?}: must be \"enforce\" or \"warn\"")]
    BadMode(String),
}

/// The required capabilities a process lacks, each with what it is needed for.
#[derive(Debug, PartialEq, Eq)]
pub struct Missing(pub Vec<(Capability, &'static str)>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "missing capabilit{}: ", if self.0.len() == 1 { "y" } else { "ies" })?;
        for (i, (capability, why)) in self.0.iter().enumerate() {
            let separator = if i == 0 { "" } else { "; " };
            write!(f, "{separator}{} ({why})", capability.name)?;
        }
        let all: Vec<&str> = REQUIRED.iter().map(|(c, _)| c.name).collect();
        write!(
            f,
            ". The agent needs {} (or {}, which implies all of them); in Kubernetes, add them to the \
             container's securityContext.capabilities.add",
            all.join(", "),
            CAP_SYS_ADMIN.name
        )
    }
}

/// The effective set (`CapEff`) from /proc/self/status text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The required capabilities missing from an effective set.
pub fn missing(effective: u64) -> Missing {
    let holds = |capability: Capability| effective & (1u64 << capability.number) != 0;
    if holds(CAP_SYS_ADMIN) {
        return Missing(Vec::new());
    }
    Missing(REQUIRED.iter().copied().filter(|(capability, _)| !holds(*capability)).collect())
}

/// Runs the check at agent start, before anything touches the kernel; honours [`CHECK_ENV`].
pub fn check_agent_start() -> Result<(), CapsError> {
    let warn_only = match std::env::var(CHECK_ENV) {
        Err(_) => false,
        Ok(mode) if mode == "enforce" => false,
        Ok(mode) if mode == "warn" => true,
        Ok(mode) => return Err(CapsError::BadMode(mode)),
    };
    match check() {
        Err(err) if warn_only => {
            log::warn!("{err} ({CHECK_ENV}=warn: starting anyway)");
            Ok(())
        }
        result => result,
    }
}

fn check() -> Result<(), CapsError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(CapsError::Status)?;
    let missing = missing(parse_cap_eff(&status).ok_or(CapsError::NoCapEff)?);
    if !missing.0.is_empty() {
        return Err(CapsError::Missing(missing));
    }
    // The capabilities are there; a seccomp filter can still refuse the syscall itself.
    probe_bpf().map_err(|source| CapsError::BpfRefused { hint: refusal_hint(&status), source })
}

fn refusal_hint(status: &str) -> &'static str {
    let seccomp_filter = status.lines().any(|line| line.strip_prefix("Seccomp:").is_some_and(|m| m.trim() == "2"));
    if seccomp_filter {
        "the process runs under a seccomp filter (Seccomp: 2 in /proc/self/status) that refuses bpf(). \
         Container runtimes whose default profile allows bpf() only with CAP_SYS_ADMIN (CRI-O and podman, \
         containers-common's seccomp.json) need a seccomp profile that allows it with CAP_BPF, as \
         containerd's (since 1.7) and Docker's (since 23.0) default profiles do; see the README's Kubernetes section"
    } else {
        "no seccomp filter is in the way, so the kernel or a security module refuses it"
    }
}

/// Creates and closes a one-element array map: the cheapest bpf() call that needs what loading
/// the datapath needs. Hand-written because aya 0.14 offers no map creation outside an object.
fn probe_bpf() -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // `union bpf_attr` is larger than any command's part of it; the kernel wants the rest zeroed.
    #[repr(C, align(8))]
    struct BpfAttr([u8; 128]);
    let mut attr = BpfAttr([0; 128]);
    // struct { __u32 map_type; __u32 key_size; __u32 value_size; __u32 max_entries; ... }
    for (i, field) in [BPF_MAP_TYPE_ARRAY, 4, 4, 1].into_iter().enumerate() {
        attr.0[i * 4..i * 4 + 4].copy_from_slice(&field.to_ne_bytes());
    }
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &mut attr as *mut BpfAttr, std::mem::size_of::<BpfAttr>())
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_THREE: u64 = (1 << 12) | (1 << 38) | (1 << 39);

    #[test]
    fn reads_cap_eff_from_proc_status() {
        let status = "Name:\tsockshift\nCapInh:\t0000000000000000\nCapPrm:\t000000c000001000\n\
                      CapEff:\t000000c000001000\nCapBnd:\t000000c000001000\n";
        assert_eq!(parse_cap_eff(status), Some(ALL_THREE));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tnot-hex\n"), None);
    }

    #[test]
    fn each_missing_capability_is_named_with_its_reason() {
        assert_eq!(missing(ALL_THREE), Missing(Vec::new()));
        for (capability, why) in REQUIRED {
            let found = missing(ALL_THREE & !(1 << capability.number));
            assert_eq!(found, Missing(vec![(capability, why)]));
            let text = found.to_string();
            assert!(text.starts_with(&format!("missing capability: {} ({why})", capability.name)), "{text}");
        }
        let none = missing(0).to_string();
        assert!(none.starts_with("missing capabilities: CAP_BPF ("), "{none}");
        assert!(none.contains("; CAP_NET_ADMIN (") && none.contains("; CAP_PERFMON ("), "{none}");
    }

    #[test]
    fn sys_admin_implies_the_three_as_the_kernel_rules_say() {
        assert_eq!(missing(1 << 21), Missing(Vec::new()));
    }
}
