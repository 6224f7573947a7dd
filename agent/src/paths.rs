//! Every filesystem path and default address the agent uses, in one place.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Control API listen address when the config does not set one.
pub const DEFAULT_API: &str = "127.0.0.1:9477";
/// bpffs directory where the maps are pinned.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/sockshift";
/// Persisted desired state and audit log.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sockshift";
/// Under `agent.state_dir`: the addresses Kubernetes discovery last found, a node-local cache
/// (not desired state) that lets a restarted agent steer before the API server answers.
pub const DISCOVERED_CACHE_FILE: &str = "kubernetes-discovered.json";
/// Where bpffs is mounted when the machine has not mounted it.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

pub fn default_api() -> SocketAddr {
    DEFAULT_API.parse().expect("DEFAULT_API is a valid address")
}

/// The machine's cgroup v2 mount point, read from /proc/self/mountinfo: `/sys/fs/cgroup` on a
/// unified layout, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    find_mount(&mountinfo, "cgroup2")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem in /proc/self/mountinfo"))
}

/// First mount point of a filesystem type in mountinfo text.
pub fn find_mount(mountinfo: &str, fs_type: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == fs_type).then(|| PathBuf::from(mount_point))
    })
}

/// Whether `path` is on a bpffs (a pin directory's parent must be).
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let stat = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there yet, with mode 0700: the kernel's
/// default for a new bpffs is 1777, which would let any user create directories (and, with
/// unprivileged BPF, pins) where the agent looks for its own.
pub fn ensure_bpffs_mounted() -> io::Result<()> {
    let mount_point = Path::new(BPFFS_MOUNT);
    if is_bpffs(mount_point).unwrap_or(false) {
        return Ok(());
    }
    fs::create_dir_all(mount_point)?;
    nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
        .map_err(io::Error::from)
}

/// Why a pin directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error("bpffs directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("agent.bpffs {path} is not on a bpffs (mount bpffs at {BPFFS_MOUNT}, or point agent.bpffs below it)")]
    NotBpffs { path: PathBuf },
    #[error(
        "agent.bpffs {path} is the bpffs mount itself, shared with every other BPF tool: use a directory of its own \
         below it (default {DEFAULT_BPFFS_DIR})"
    )]
    MountRoot { path: PathBuf },
    #[error(
        "agent.bpffs {path} is owned by uid {uid} with mode {mode:04o}: another user could replace the pinned maps \
         and links there; remove it (`sockshift uninstall --bpffs {path}` removes only sockshift's pins) or \
         `chown root {path} && chmod 0700 {path}`"
    )]
    Untrusted { path: PathBuf, uid: u32, mode: u32 },
    #[error("agent.bpffs {path} is locked by another process: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// A lock on the pin directory, held while the agent runs (shared: an agent being replaced and
/// its successor may overlap). `sockshift uninstall` takes it exclusively to know no agent uses
/// the directory.
#[derive(Debug)]
pub struct PinDirLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Prepares the agent's pin directory before the datapath loads: bpffs mounted (0700 when the
/// agent mounts it), the directory created 0700, and refused when it is the bpffs mount root,
/// not on bpffs, or not owned by root (the agent's uid) or writable by group or others; the same
/// for its `links` directory. Returns the lock the agent holds while it runs.
pub fn prepare_pin_dir(dir: &Path) -> Result<PinDirLock, PinDirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let io_err = |source| PinDirError::Io { path: dir.to_owned(), source };
    ensure_bpffs_mounted().map_err(io_err)?;
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err)?;
    }
    if !is_bpffs(dir).map_err(io_err)? {
        return Err(PinDirError::NotBpffs { path: dir.to_owned() });
    }
    if is_mount_root(dir).map_err(io_err)? {
        return Err(PinDirError::MountRoot { path: dir.to_owned() });
    }
    let euid = nix::unistd::geteuid().as_raw();
    for checked in [dir.to_owned(), dir.join("links")] {
        let meta = match fs::symlink_metadata(&checked) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(PinDirError::Io { path: checked, source }),
        };
        let mode = meta.mode() & 0o7777;
        if !meta.is_dir() || meta.uid() != euid || mode & 0o022 != 0 {
            return Err(PinDirError::Untrusted { path: checked, uid: meta.uid(), mode });
        }
    }
    let file = fs::File::open(dir).map_err(io_err)?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock)
        .map_err(|(_, errno)| PinDirError::Lock { path: dir.to_owned(), source: io::Error::from(errno) })?;
    Ok(PinDirLock { _lock: lock })
}

/// Whether `path` is the root of a mount (its parent is on another device, or it is `/`).
pub fn is_mount_root(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let path = fs::canonicalize(path)?;
    let Some(parent) = path.parent() else { return Ok(true) };
    Ok(fs::metadata(&path)?.dev() != fs::metadata(parent)?.dev())
}

/// Whether a name in a pin directory is one of sockshift's map pins: upper-case words with a
/// layout version (`FRONTENDS_V1`, `COUNTERS_V2`), the naming rule of `agent_common::maps`.
pub fn is_sockshift_map_pin(name: &str) -> bool {
    let Some((base, version)) = name.rsplit_once("_V") else { return false };
    !base.is_empty()
        && base.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && base.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a name in `<pin dir>/links` is one of sockshift's link pins: a program name
/// (lower-case identifier, e.g. `sock4_connect`, `tcp_receive_reset`).
pub fn is_sockshift_link_pin(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// cgroup v2 id of a cgroup directory: its inode number.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a directory"));
    }
    Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(hybrid, "cgroup2"), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_mount(unified, "cgroup2"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_mount("", "cgroup2"), None);
    }

    #[test]
    fn sockshift_pin_names() {
        for name in ["FRONTENDS_V1", "COUNTERS_V2", "UDP_FLOWS_V1", "NETNS_SOCKETS_V12"] {
            assert!(is_sockshift_map_pin(name), "{name}");
        }
        for name in ["cilium_lb4_services_v2", "FRONTENDS", "FRONTENDS_V", "_V1", "frontends_V1", "X_V1a", "links"] {
            assert!(!is_sockshift_map_pin(name), "{name}");
        }
        assert!(is_sockshift_link_pin("sock4_connect") && is_sockshift_link_pin("tcp_receive_reset"));
        assert!(!is_sockshift_link_pin("Cilium") && !is_sockshift_link_pin("a-b") && !is_sockshift_link_pin(""));
    }
}
