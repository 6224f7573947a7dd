//! Closing the canary's established TCP connections on rollback, so long-lived connections do
//! not stay on a bad canary.
//!
//! Steered clients live in the cgroup the agent attaches to, each in its own network namespace
//! (a pod's). For every namespace that a process of that cgroup tree is in, the kernel's
//! SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY, through `ss -K`) resets the established TCP
//! sockets whose peer is a canary backend. The agent needs to see those processes (hostPID in
//! a DaemonSet).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

/// One process per network namespace found in `cgroup` and below it.
fn namespaces_of_cgroup(cgroup: &Path) -> BTreeMap<u64, PathBuf> {
    let mut namespaces = BTreeMap::new();
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(meta) = std::fs::metadata(&ns) {
                    namespaces.entry(meta.ino()).or_insert(ns);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    namespaces
}

/// Resets established TCP connections to `backends` from clients in `cgroup`; returns how many.
pub fn terminate_connections(cgroup: &Path, backends: &[SocketAddr]) -> std::io::Result<usize> {
    let mut killed = 0;
    for ns in namespaces_of_cgroup(cgroup).values() {
        for backend in backends {
            let output = Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .args(["ss", "-K", "-t", "-n", "-H", "state", "established", "dst"])
                .arg(backend.to_string())
                .output()?;
            if output.status.success() {
                killed += String::from_utf8_lossy(&output.stdout).lines().filter(|l| !l.trim().is_empty()).count();
            } else {
                log::warn!(
                    "closing canary connections in {}: {}",
                    ns.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
    }
    Ok(killed)
}
