//! Destroying exactly the sockets the datapath chose, by socket cookie, with the kernel's
//! SOCK_DESTROY (sock_diag netlink, CONFIG_INET_DIAG_DESTROY): a TCP connection is reset (the
//! application sees ECONNABORTED), a connected UDP socket is disconnected with ECONNABORTED, so
//! the application connects again and is steered afresh.
//!
//! sock_diag sees the sockets of the network namespace it is asked in. The steered clients live
//! in the cgroup the agent attaches to, each in its own namespace (a pod's), so a worker thread
//! enters (setns) each namespace that a process of that cgroup tree is in, lists its TCP and UDP
//! sockets, and destroys those whose cookie was chosen and that are still connected to the
//! backend they were steered to; a cookie is unique on the host, so a socket is never mistaken
//! for another. The agent needs to see those processes (hostPID in a
//! DaemonSet).

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr as InetAddr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// What one termination did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Sockets destroyed.
    pub sockets: usize,
    /// Chosen sockets not found in any namespace the agent could enter (closed meanwhile, or in a
    /// namespace whose processes the agent cannot see).
    pub not_found: usize,
    /// Namespaces searched.
    pub namespaces: usize,
    /// Namespaces that could not be searched, with why.
    pub errors: Vec<String>,
}

/// The agent's own network namespace (the host's, with hostNetwork). Worker threads start in
/// it: only the thread that called setns changes namespace.
const OWN_NAMESPACE: &str = "/proc/self/ns/net";

/// One path to each network namespace that a process of `cgroup` (or a cgroup below it) is in,
/// plus the agent's own.
fn namespaces_of_cgroup(cgroup: &Path) -> BTreeMap<u64, PathBuf> {
    let mut namespaces = BTreeMap::new();
    if let Ok(meta) = std::fs::metadata(OWN_NAMESPACE) {
        namespaces.insert(meta.ino(), PathBuf::from(OWN_NAMESPACE));
    }
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

/// Destroys the sockets whose cookies are keys of `chosen` and whose peer is still the address
/// given there, searching the namespaces of `cgroup`'s processes, until all are found or
/// `timeout` has passed.
pub fn destroy_sockets(cgroup: &Path, chosen: &HashMap<u64, InetAddr>, timeout: Duration) -> Destroyed {
    let mut outcome = Destroyed::default();
    if chosen.is_empty() {
        return outcome;
    }
    let deadline = Instant::now() + timeout;
    let mut left = chosen.clone();
    for (_, ns) in namespaces_of_cgroup(cgroup) {
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            outcome.errors.push(format!("timed out after {timeout:?}"));
            break;
        }
        let wanted = left.clone();
        let path = ns.clone();
        // setns changes the calling thread's namespace only, so each namespace gets a thread.
        let worker = std::thread::spawn(move || destroy_in_namespace(&path, &wanted, deadline));
        match worker.join() {
            Ok(Ok(found)) => {
                outcome.namespaces += 1;
                for cookie in found {
                    left.remove(&cookie);
                    outcome.sockets += 1;
                }
            }
            Ok(Err(err)) => outcome.errors.push(format!("{}: {err}", ns.display())),
            Err(_) => outcome.errors.push(format!("{}: the worker thread panicked", ns.display())),
        }
    }
    outcome.not_found = left.len();
    outcome
}

/// In namespace `ns`: destroys the TCP and UDP sockets chosen in `wanted` (by cookie, with their
/// peer); returns their cookies.
fn destroy_in_namespace(ns: &Path, wanted: &HashMap<u64, InetAddr>, deadline: Instant) -> io::Result<Vec<u64>> {
    // The agent's own namespace needs no setns (which takes CAP_SYS_ADMIN): a DaemonSet without
    // it still reaches the host namespace's sockets (node processes, hostNetwork pods).
    if ns != Path::new(OWN_NAMESPACE) {
        let file = std::fs::File::open(ns)?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    }
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    set_receive_timeout(&socket, deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))?;
    let mut destroyed = Vec::new();
    for family in [AF_INET, AF_INET6] {
        // A connected UDP socket is in "ESTABLISHED"; TCP sockets in any state but LISTEN.
        for (protocol, states) in [
            (IPPROTO_TCP, StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT),
            (IPPROTO_UDP, StateFlags::ESTABLISHED),
        ] {
            let matching: Vec<InetResponse> = dump(&socket, family, protocol, states)?
                .into_iter()
                .filter(|r| {
                    let id = &r.header.socket_id;
                    wanted.get(&cookie_of(id)).is_some_and(|peer| same_peer(id, peer))
                })
                .collect();
            for response in matching {
                let cookie = cookie_of(&response.header.socket_id);
                match destroy(&socket, family, protocol, response.header.socket_id) {
                    Ok(()) => destroyed.push(cookie),
                    // Closed between the listing and now: nothing left to destroy.
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok(destroyed)
}

/// Whether a listed socket's peer is `peer` (an IPv6 socket lists a v4-mapped peer).
fn same_peer(id: &SocketId, peer: &InetAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    id.destination_port == peer.port() && canonical(id.destination_address) == canonical(peer.ip())
}

/// The cookie the kernel reports, as two native-endian 32-bit halves (low first), as a u64.
fn cookie_of(id: &SocketId) -> u64 {
    let low = u32::from_ne_bytes(id.cookie[0..4].try_into().expect("4 bytes"));
    let high = u32::from_ne_bytes(id.cookie[4..8].try_into().expect("4 bytes"));
    (u64::from(high) << 32) | u64::from(low)
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn request(family: u8, protocol: u8, states: StateFlags, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    })
}

fn send<T: netlink_packet_core::NetlinkSerializable>(
    socket: &Socket,
    mut message: NetlinkMessage<T>,
) -> io::Result<()> {
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    Ok(())
}

/// Lists the sockets of one family and protocol in the given states.
fn dump(socket: &Socket, family: u8, protocol: u8, states: StateFlags) -> io::Result<Vec<InetResponse>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    send(socket, NetlinkMessage::new(header, request(family, protocol, states, socket_id).into()))?;
    let mut responses = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buffer[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {err}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => responses.push(*response),
                NetlinkPayload::Done(_) => return Ok(responses),
                NetlinkPayload::Error(err) if err.code.is_some() => return Err(err.to_io()),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Destroys one socket, named as the listing reported it (its cookie included, so the kernel
/// refuses if the address now belongs to another socket).
fn destroy(socket: &Socket, family: u8, protocol: u8, socket_id: SocketId) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let message = SockDiagDestroy::new(request(family, protocol, StateFlags::all(), socket_id));
    send(socket, NetlinkMessage::new(header, message.into()))?;
    let mut buffer = vec![0u8; 4096];
    let size = socket.recv(&mut &mut buffer[..], 0)?;
    let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[..size])
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {err}")))?;
    match reply.payload {
        NetlinkPayload::Error(err) if err.code.is_some() => Err(err.to_io()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v4_mapped_peer_is_the_ipv4_backend() {
        let mut id = SocketId::new_v6();
        id.destination_address = "::ffff:10.0.0.7".parse().unwrap();
        id.destination_port = 53;
        assert!(same_peer(&id, &"10.0.0.7:53".parse().unwrap()));
        assert!(!same_peer(&id, &"10.0.0.7:54".parse().unwrap()));
        assert!(!same_peer(&id, &"10.0.0.8:53".parse().unwrap()));
    }

    #[test]
    fn cookie_halves_are_low_then_high() {
        let mut id = SocketId::new_v4();
        let cookie: u64 = 0x0000_0012_3456_789a;
        id.cookie[0..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id.cookie[4..8].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        assert_eq!(cookie_of(&id), cookie);
    }
}
