//! The two bpf(2) commands aya 0.14 does not expose for pinned links: opening a pin and
//! atomically replacing the program behind a link.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` is larger than any command's part of it; the kernel wants the rest zeroed.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BpfAttr, std::mem::size_of::<BpfAttr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned bpf object (here: a link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = BpfAttr([0; 128]);
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    attr.0[..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `program` from now on, in one step: no call on the hook sees neither.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr([0; 128]);
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr.0[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
