//! Field offsets of kernel structures, read from the kernel's BTF (/sys/kernel/btf/vmlinux), for
//! the few places where a program reads a kernel field its context does not expose (the socket's
//! cookie, without creating one). aya 0.14 parses BTF but keeps member offsets private, and no
//! maintained crate in the tree reads them, so this walks the BTF type section itself: only the
//! header, each type's fixed part and the bytes that follow it by kind.

use std::path::Path;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Byte offset of `member` in `struct name`, or `None` if the BTF has no such struct or member
/// (or is not BTF). Bit-field members are not looked for.
pub fn member_offset(btf: &[u8], name: &str, member: &str) -> Option<u32> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(btf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?));
    if u16_at(0)? != BTF_MAGIC {
        return None;
    }
    let header_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let strings = header_len + str_off;
    let string_is = |offset: u32, wanted: &str| -> bool {
        let start = strings + offset as usize;
        btf.get(start..start + wanted.len() + 1)
            .is_some_and(|s| &s[..wanted.len()] == wanted.as_bytes() && s[wanted.len()] == 0)
    };
    let mut at = header_len + type_off;
    let end = at + type_len;
    while at + 12 <= end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
        let body = at + 12;
        if kind == KIND_STRUCT && string_is(name_off, name) {
            for i in 0..vlen {
                let m = body + 12 * i;
                if string_is(u32_at(m)?, member) {
                    let offset = u32_at(m + 8)?;
                    let bits = if kind_flag { offset & 0x00ff_ffff } else { offset };
                    return (bits % 8 == 0).then_some(bits / 8);
                }
            }
        }
        at = body
            + match kind {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func_proto
                _ => 0,                       // ptr, fwd, typedef, qualifiers, func, float, type_tag
            };
    }
    None
}

/// Offsets the programs need, from the running kernel's BTF; `None` where it does not tell.
pub struct SocketOffsets {
    /// The socket cookie in `struct sock` (`sk_cookie`, which is `__sk_common.skc_cookie`).
    pub sk_cookie: Option<u32>,
    /// The socket pointer in `struct bpf_sock_ops_kern` (a sock_ops program's context).
    pub sock_ops_sk: Option<u32>,
}

pub fn socket_offsets() -> SocketOffsets {
    let Ok(btf) = std::fs::read(Path::new("/sys/kernel/btf/vmlinux")) else {
        return SocketOffsets { sk_cookie: None, sock_ops_sk: None };
    };
    socket_offsets_in(&btf)
}

fn socket_offsets_in(btf: &[u8]) -> SocketOffsets {
    let sk_cookie = member_offset(btf, "sock", "sk_cookie").or_else(|| {
        Some(member_offset(btf, "sock", "__sk_common")? + member_offset(btf, "sock_common", "skc_cookie")?)
    });
    SocketOffsets { sk_cookie, sock_ops_sk: member_offset(btf, "bpf_sock_ops_kern", "sk") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` and `struct sock { int a; int sk_cookie; }` (plus a struct using
    /// the kind_flag offset encoding).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0sock\0a\0sk_cookie\0bits\0";
        let (int, sock, a, cookie, bits) = (1u32, 5u32, 10u32, 12u32, 22u32);
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        push(&[int, 1 << 24, 4, 32]); // int, 4 bytes, 32 bits
        push(&[sock, (4 << 24) | 2, 8, a, 1, 0, cookie, 1, 32]); // offsets in bits
        push(&[bits, (1 << 31) | (4 << 24) | 1, 8, cookie, 1, (3 << 24) | 40]); // kind_flag: size 3, bit 40
        let mut btf = Vec::new();
        btf.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        btf.extend_from_slice(&[1, 0]);
        for word in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            btf.extend_from_slice(&word.to_le_bytes());
        }
        btf.extend_from_slice(&types);
        btf.extend_from_slice(strings);
        btf
    }

    #[test]
    fn finds_member_offsets_by_struct_and_name() {
        let btf = blob();
        assert_eq!(member_offset(&btf, "sock", "sk_cookie"), Some(4));
        assert_eq!(member_offset(&btf, "sock", "a"), Some(0));
        assert_eq!(member_offset(&btf, "bits", "sk_cookie"), Some(5), "kind_flag offsets keep their low 24 bits");
        assert_eq!(member_offset(&btf, "sock", "missing"), None);
        assert_eq!(member_offset(&btf, "int", "a"), None, "only structs");
        assert_eq!(member_offset(&btf[..20], "sock", "a"), None, "truncated");
        assert_eq!(member_offset(b"not btf at all, clearly", "sock", "a"), None);
        let offsets = socket_offsets_in(&btf);
        assert_eq!((offsets.sk_cookie, offsets.sock_ops_sk), (Some(4), None));
    }

    /// The running kernel's (6.18 keeps the cookie in `struct sock_common`, as `skc_cookie`).
    #[test]
    fn finds_the_socket_cookie_in_the_running_kernel() {
        let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("the kernel's BTF (CONFIG_DEBUG_INFO_BTF)");
        let offsets = socket_offsets_in(&btf);
        assert!(offsets.sk_cookie.is_some_and(|o| o > 0 && o % 8 == 0), "sk_cookie");
        assert_eq!(offsets.sock_ops_sk, Some(0), "sk is the first field of bpf_sock_ops_kern");
    }
}
