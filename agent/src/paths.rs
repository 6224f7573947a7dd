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

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there yet.
pub fn ensure_bpffs_mounted() -> io::Result<()> {
    let mount_point = Path::new(BPFFS_MOUNT);
    if is_bpffs(mount_point).unwrap_or(false) {
        return Ok(());
    }
    fs::create_dir_all(mount_point)?;
    nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(io::Error::from)
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
}
