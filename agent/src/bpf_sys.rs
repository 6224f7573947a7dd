//! The bpf(2) commands aya 0.14 does not expose: opening a pin as a raw fd, atomically replacing
//! the program behind a link, reading a link's attachment (its cgroup), asking a cgroup which
//! programs run on one of its hooks, and reading an array map in batches.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `BPF_PROG_QUERY` flag: the programs that run for the cgroup (its own and those inherited from
/// its ancestors), in the order they run.
const BPF_F_QUERY_EFFECTIVE: u32 = 1 << 0;

/// `bpf_link_info::type` of a cgroup link.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `union bpf_attr` is larger than any command's part of it; the kernel wants the rest zeroed.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }

    fn put_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }

    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BpfAttr, std::mem::size_of::<BpfAttr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Reads every element of the array map `map` (values of type `V`, which must be the map's value
/// type) with `BPF_MAP_LOOKUP_BATCH`, `per_call` elements a call, handing each batch to `batch` in
/// index order: one syscall per batch instead of one per element, and no more memory than one
/// batch. The elements are copied one by one while the programs may change them.
pub fn array_lookup_batches<V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    len: u32,
    per_call: usize,
    mut batch: impl FnMut(&[V]),
) -> io::Result<()> {
    let per_call = per_call.clamp(1, len.max(1) as usize);
    let mut keys = vec![0u32; per_call];
    let mut values = vec![V::zeroed(); per_call];
    // The kernel's cursor: the last index of the previous batch (none before the first).
    let mut cursor: Option<u32> = None;
    let mut next: u32 = 0;
    let mut read = 0usize;
    loop {
        let mut attr = BpfAttr::new();
        // struct { __aligned_u64 in_batch; __aligned_u64 out_batch; __aligned_u64 keys;
        //          __aligned_u64 values; __u32 count; __u32 map_fd; __u64 elem_flags; __u64 flags; }
        attr.put_u64(0, cursor.as_ref().map_or(0, |c| c as *const u32 as u64));
        attr.put_u64(8, &mut next as *mut u32 as u64);
        attr.put_u64(16, keys.as_mut_ptr() as u64);
        attr.put_u64(24, values.as_mut_ptr() as u64);
        attr.put_u32(32, per_call as u32);
        attr.put_u32(36, map.as_raw_fd() as u32);
        // ENOENT: there is nothing after this batch (whose count may still be above 0).
        let last = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => false,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
            Err(err) => return Err(err),
        };
        // The kernel writes back how many it copied.
        let count = (attr.u32_at(32) as usize).min(per_call);
        batch(&values[..count]);
        read += count;
        if last || count < per_call || read >= len as usize {
            return Ok(());
        }
        cursor = Some(next);
    }
}

/// Opens a pinned bpf object (here: a link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = BpfAttr::new();
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    attr.put_u64(0, c_path.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `program` from now on, in one step: no call on the hook sees neither.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, program.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detaches a link from its hook now. Dropping the last reference to a link detaches it too, but
/// the kernel does that from a work queue, a few milliseconds later; this is synchronous.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    // struct { __u32 link_fd; }
    attr.put_u32(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// What a link is attached to, from `struct bpf_link_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAttachment {
    /// BPF_LINK_TYPE_*.
    pub link_type: u32,
    pub program_id: u32,
    /// For a cgroup link: the cgroup's id, 0 once the cgroup was removed (the link is severed).
    pub cgroup_id: u64,
    /// For a cgroup link: the hook (BPF_CGROUP_*).
    pub attach_type: u32,
}

/// Reads a link's attachment.
pub fn link_attachment(link: BorrowedFd<'_>) -> io::Result<LinkAttachment> {
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; union { ...
    //   struct { __u64 cgroup_id; __u32 attach_type; } cgroup; ... } } (the union at 16: aligned 8)
    #[repr(C, align(8))]
    struct LinkInfo([u8; 128]);
    let mut info = LinkInfo([0; 128]);
    let mut attr = BpfAttr::new();
    // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, std::mem::size_of::<LinkInfo>() as u32);
    attr.put_u64(8, &mut info as *mut LinkInfo as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |offset: usize| u32::from_ne_bytes(info.0[offset..offset + 4].try_into().expect("4 bytes"));
    Ok(LinkAttachment {
        link_type: u32_at(0),
        program_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(info.0[16..24].try_into().expect("8 bytes")),
        attach_type: u32_at(24),
    })
}

/// Ids of the programs that run on hook `attach_type` for the cgroup `cgroup`, in the order they
/// run: the cgroup's own first, then those inherited from its ancestors.
pub fn effective_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    query_programs(cgroup, attach_type, BPF_F_QUERY_EFFECTIVE)
}

fn query_programs(cgroup: BorrowedFd<'_>, attach_type: u32, query_flags: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = BpfAttr::new();
        // struct { __u32 target_fd; __u32 attach_type; __u32 query_flags; __u32 attach_flags;
        //          __aligned_u64 prog_ids; __u32 prog_cnt; ... }
        attr.put_u32(0, cgroup.as_raw_fd() as u32);
        attr.put_u32(4, attach_type);
        attr.put_u32(8, query_flags);
        attr.put_u64(16, ids.as_mut_ptr() as u64);
        attr.put_u32(24, ids.len() as u32);
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.u32_at(24) as usize);
                return Ok(ids);
            }
            // More programs than room: prog_cnt says how many; ask again with enough.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                ids = vec![0; attr.u32_at(24) as usize + 16];
            }
            Err(err) => return Err(err),
        }
    }
}

/// Ids of the programs attached to the cgroup itself on hook `attach_type` (not inherited).
pub fn attached_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    query_programs(cgroup, attach_type, 0)
}
