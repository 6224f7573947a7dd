//! Loading the programs and making the configured cgroup run them: check every pinned map
//! against the object's definition before adopting it, load, switch each pinned link to the new
//! program in place (or re-attach it where it belongs), carry over what older agents pinned, and
//! find other programs on the same hooks.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use agent_common::{
    socket_slot_count, LOG_LEVEL_GLOBAL, MAP_SOCKETS, MAP_SOCKET_SLOTS, MAP_UDP_FLOWS, SK_COOKIE_OFFSET_GLOBAL,
    SOCKET_SLOT_COUNT_GLOBAL, SOCK_OPS_SK_OFFSET_GLOBAL,
};
use aya::{
    maps::MapInfo,
    programs::{
        links::FdLink, BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, ProgramFd, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use aya_obj::generated::bpf_attach_type as hook;

use super::{DatapathError, DatapathOptions, TableSizes, EBPF_OBJECT};
use crate::bpf_sys;

/// The sock_addr programs, each with its hook.
pub const SOCK_ADDR_PROGRAMS: [(&str, u32); 8] = [
    ("sock4_connect", hook::BPF_CGROUP_INET4_CONNECT as u32),
    ("sock6_connect", hook::BPF_CGROUP_INET6_CONNECT as u32),
    ("sock4_sendmsg", hook::BPF_CGROUP_UDP4_SENDMSG as u32),
    ("sock6_sendmsg", hook::BPF_CGROUP_UDP6_SENDMSG as u32),
    ("sock4_recvmsg", hook::BPF_CGROUP_UDP4_RECVMSG as u32),
    ("sock6_recvmsg", hook::BPF_CGROUP_UDP6_RECVMSG as u32),
    ("sock4_getpeername", hook::BPF_CGROUP_INET4_GETPEERNAME as u32),
    ("sock6_getpeername", hook::BPF_CGROUP_INET6_GETPEERNAME as u32),
];
pub const SOCK_RELEASE_PROGRAM: (&str, u32) = ("sock_release", hook::BPF_CGROUP_INET_SOCK_RELEASE as u32);
pub const SOCK_OPS_PROGRAM: (&str, u32) = ("sock_health", hook::BPF_CGROUP_SOCK_OPS as u32);
pub const RESET_TRACEPOINT_PROGRAM: &str = "tcp_receive_reset";

/// The hook's name as users know it (`connect4`), from the program that sits on it.
pub fn hook_name(program: &str) -> &'static str {
    match program {
        "sock4_connect" => "connect4",
        "sock6_connect" => "connect6",
        "sock4_sendmsg" => "sendmsg4",
        "sock6_sendmsg" => "sendmsg6",
        "sock4_recvmsg" => "recvmsg4",
        "sock6_recvmsg" => "recvmsg6",
        "sock4_getpeername" => "getpeername4",
        "sock6_getpeername" => "getpeername6",
        "sock_release" => "sock_release",
        "sock_health" => "sock_ops",
        _ => "tcp_receive_reset",
    }
}

/// What happened to a program's link at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkOutcome {
    /// No link was pinned: attached and pinned now.
    Attached,
    /// A pinned link on the configured cgroup now runs the new program (atomic).
    Updated,
    /// A pinned link was on another cgroup (agent.cgroup changed) or on a removed one: a new link
    /// on the configured cgroup replaced it (attached before the old one went).
    Reattached,
    /// A pinned link that cannot be updated in place (the tracepoint) was replaced by a new one.
    Replaced,
}

/// Another program on one of sockshift's hooks for the configured cgroup: another socket load
/// balancer (Cilium's or Calico's), a second sockshift, anything. Which one steers a connection
/// depends on the order they run in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ForeignProgram {
    /// The hook (`connect4`, `sendmsg6`, ...).
    pub hook: String,
    pub program_id: u32,
    /// The program's name as the kernel has it (16 bytes at most), empty if it has none.
    pub name: String,
    /// Attached to the configured cgroup itself (else inherited from an ancestor).
    pub attached_to_cgroup: bool,
    /// Runs before sockshift's program: on connect and sendmsg it then sees (and may rewrite) the
    /// frontend address first, and sockshift may never see it.
    pub runs_before_sockshift: bool,
}

/// Checks that every map already pinned under the bpffs directory is the map this agent's
/// programs define (type, key and value size, size, flags), before anything is loaded: a map
/// adopted as it is must never be misread, and nothing is attached if one does not match.
pub fn check_pinned_maps(options: &DatapathOptions, sizes: &TableSizes) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|err| DatapathError::Object(err.to_string()))?;
    let mut names: Vec<&String> = object.maps.keys().collect();
    names.sort();
    for name in names {
        let definition = &object.maps[name];
        if definition.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let path = options.bpffs.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).map_err(|source| DatapathError::PinnedMap { path: path.clone(), source })?;
        let wanted_entries = configured_max_entries(sizes, name).unwrap_or(definition.max_entries());
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let fields = [
            ("type", u64::from(pinned_type), u64::from(definition.map_type())),
            ("key size", u64::from(info.key_size()), u64::from(definition.key_size())),
            ("value size", u64::from(info.value_size()), u64::from(definition.value_size())),
            ("max entries", u64::from(info.max_entries()), u64::from(wanted_entries)),
            ("flags", u64::from(info.map_flags()), u64::from(definition.map_flags())),
        ];
        for (field, pinned, wanted) in fields {
            if pinned != wanted {
                return Err(DatapathError::MapMismatch {
                    path,
                    field,
                    pinned,
                    wanted,
                    hint: mismatch_hint(name, field, pinned, &options.bpffs),
                });
            }
        }
    }
    Ok(())
}

/// One pinned map and the kernel memory it holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct MapMemory {
    /// The map's pinned name (`SOCKETS_V1`).
    pub name: String,
    /// The kernel's map type number (`BPF_MAP_TYPE_*`: 1 hash, 2 array, 9 LRU hash).
    pub map_type: u32,
    pub max_entries: u32,
    /// What the kernel charges for it (`memlock` in the map's fdinfo): a preallocated map its
    /// whole size, a map that allocates per entry its buckets plus the entries it holds now.
    pub bytes: u64,
}

/// The kernel memory of every map pinned under the bpffs directory that this agent's programs
/// use, as the kernel accounts it, by name. Maps that cannot be read are left out.
pub fn map_memory(bpffs: &Path) -> Vec<MapMemory> {
    let Ok(object) = aya_obj::Object::parse(EBPF_OBJECT) else { return Vec::new() };
    let mut names: Vec<&String> = object.maps.keys().filter(|n| !n.starts_with('.')).collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let fd = bpf_sys::obj_get(&bpffs.join(name)).ok()?;
            let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
            let field = |key: &str| -> Option<u64> {
                fdinfo.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse().ok())
            };
            Some(MapMemory {
                name: name.clone(),
                map_type: u32::try_from(field("map_type")?).ok()?,
                max_entries: u32::try_from(field("max_entries")?).ok()?,
                bytes: field("memlock")?,
            })
        })
        .collect()
}

/// What the user can do about a pinned map that does not match.
fn mismatch_hint(name: &str, field: &str, pinned: u64, bpffs: &Path) -> String {
    let uninstall = format!(
        "`sockshift uninstall --bpffs {}` removes the pinned datapath (steering stops until the agent starts again, \
         and open steered sockets lose their translation)",
        bpffs.display()
    );
    if field == "max entries" && (name == MAP_SOCKETS || name == MAP_SOCKET_SLOTS) {
        format!(
            "the socket table was created with agent.steered_socket_capacity = {pinned} and a map cannot be resized \
             in place: set agent.steered_socket_capacity = {pinned} again (or leave it unset: the pinned size is then \
             kept), or {uninstall} and start with the new size"
        )
    } else {
        format!("it was created by an incompatible sockshift version with the same map name: {uninstall}")
    }
}

fn configured_max_entries(sizes: &TableSizes, name: &str) -> Option<u32> {
    match name {
        MAP_SOCKETS => Some(sizes.sockets),
        MAP_SOCKET_SLOTS => Some(socket_slot_count(sizes.sockets)),
        MAP_UDP_FLOWS => Some(sizes.udp_flows),
        _ => None,
    }
}

/// Loads the object with its maps pinned (adopting matching pins), its log statements at
/// `options.log` (aya-log's level global, in read-only data: the verifier removes what is off).
pub fn load_object(options: &DatapathOptions, sizes: &TableSizes) -> Result<Ebpf, DatapathError> {
    let level = options.log.level();
    // Unknown offsets keep the globals' defaults: the programs then ask for each cookie.
    let offsets = super::kernel_btf::socket_offsets();
    let sk_cookie = offsets.sk_cookie.unwrap_or(u32::MAX);
    let sock_ops_sk = offsets.sock_ops_sk.unwrap_or(u32::MAX);
    if sk_cookie == u32::MAX || sock_ops_sk == u32::MAX {
        log::warn!(
            "the kernel's BTF does not say where a socket's cookie is: closing an unsteered socket takes a map lookup"
        );
    }
    let slots = socket_slot_count(sizes.sockets);
    let mut loader = EbpfLoader::new();
    loader
        .override_global(LOG_LEVEL_GLOBAL, &level, true)
        .override_global(SOCKET_SLOT_COUNT_GLOBAL, &slots, true)
        .override_global(SK_COOKIE_OFFSET_GLOBAL, &sk_cookie, true)
        .override_global(SOCK_OPS_SK_OFFSET_GLOBAL, &sock_ops_sk, true)
        .default_map_pin_directory(&options.bpffs)
        .map_max_entries(MAP_SOCKETS, sizes.sockets)
        .map_max_entries(MAP_SOCKET_SLOTS, slots)
        .map_max_entries(MAP_UDP_FLOWS, sizes.udp_flows);
    Ok(loader.load(EBPF_OBJECT)?)
}

/// What attaching found and did.
pub struct Attached {
    /// Each program's link outcome.
    pub links: Vec<(&'static str, LinkOutcome)>,
    pub foreign: Vec<ForeignProgram>,
}

/// Loads every program and makes the configured cgroup run it through a pinned link.
pub fn attach_programs(ebpf: &mut Ebpf, options: &DatapathOptions) -> Result<Attached, DatapathError> {
    let cgroup_file =
        File::open(&options.cgroup).map_err(|source| DatapathError::Cgroup { path: options.cgroup.clone(), source })?;
    let cgroup_id = crate::paths::cgroup_id(&options.cgroup)
        .map_err(|source| DatapathError::Cgroup { path: options.cgroup.clone(), source })?;
    let links_dir = options.bpffs.join("links");
    std::fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Bpffs { path: links_dir.clone(), source })?;

    let mut outcomes = Vec::new();
    let mut ours: BTreeMap<&'static str, (u32, u32)> = BTreeMap::new(); // program -> (hook, id)
    let cgroup_link = |name: &'static str,
                       hook_type: u32,
                       program: OwnedFd,
                       attach_new: &mut dyn FnMut() -> std::io::Result<FdLink>| {
        install_cgroup_link(&links_dir, name, hook_type, cgroup_id, program, attach_new)
    };
    for (name, hook_type) in SOCK_ADDR_PROGRAMS {
        let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
        program.load().map_err(|source| DatapathError::Program { name, source })?;
        ours.insert(name, (hook_type, program_id(program.info(), name)?));
        let fd = program_fd(program.fd(), name)?;
        let outcome = cgroup_link(name, hook_type, fd, &mut || {
            let id = program.attach(&cgroup_file, CgroupAttachMode::Single).map_err(std::io::Error::other)?;
            FdLink::try_from(program.take_link(id).map_err(std::io::Error::other)?).map_err(std::io::Error::other)
        })?;
        outcomes.push((name, outcome));
    }
    let (name, hook_type) = SOCK_RELEASE_PROGRAM;
    let release: &mut CgroupSock = program_mut(ebpf, name)?;
    release.load().map_err(|source| DatapathError::Program { name, source })?;
    ours.insert(name, (hook_type, program_id(release.info(), name)?));
    let fd = program_fd(release.fd(), name)?;
    let outcome = cgroup_link(name, hook_type, fd, &mut || {
        let id = release.attach(&cgroup_file, CgroupAttachMode::Single).map_err(std::io::Error::other)?;
        FdLink::try_from(release.take_link(id).map_err(std::io::Error::other)?).map_err(std::io::Error::other)
    })?;
    outcomes.push((name, outcome));
    let (name, hook_type) = SOCK_OPS_PROGRAM;
    let sock_ops: &mut SockOps = program_mut(ebpf, name)?;
    sock_ops.load().map_err(|source| DatapathError::Program { name, source })?;
    ours.insert(name, (hook_type, program_id(sock_ops.info(), name)?));
    let fd = program_fd(sock_ops.fd(), name)?;
    let outcome = cgroup_link(name, hook_type, fd, &mut || {
        let id = sock_ops.attach(&cgroup_file, CgroupAttachMode::Single).map_err(std::io::Error::other)?;
        FdLink::try_from(sock_ops.take_link(id).map_err(std::io::Error::other)?).map_err(std::io::Error::other)
    })?;
    outcomes.push((name, outcome));

    let btf = Btf::from_sys_fs()?;
    let name = RESET_TRACEPOINT_PROGRAM;
    let resets: &mut BtfTracePoint = program_mut(ebpf, name)?;
    resets.load("tcp_receive_reset", &btf).map_err(|source| DatapathError::Program { name, source })?;
    // Tracing links cannot be updated in place: the new one is attached before the old one
    // goes, so a reset may at worst be counted twice during an upgrade, never missed.
    let pin = links_dir.join(name);
    let link = resets.attach().map_err(|source| DatapathError::Program { name, source })?;
    let link = FdLink::from(resets.take_link(link).map_err(|source| DatapathError::Program { name, source })?);
    let outcome = if pin.exists() {
        std::fs::remove_file(&pin).map_err(|source| DatapathError::Link { name, source })?;
        LinkOutcome::Replaced
    } else {
        LinkOutcome::Attached
    };
    link.pin(&pin).map_err(|err| DatapathError::Link { name, source: std::io::Error::other(err.to_string()) })?;
    outcomes.push((name, outcome));

    let foreign = foreign_programs(cgroup_file.as_fd(), &ours);
    Ok(Attached { links: outcomes, foreign })
}

/// Makes the link pinned at `<links_dir>/<name>` run `program` on `hook` of the cgroup
/// `cgroup_id`: by updating it in place when it is attached there, else by attaching a new link
/// (with `attach_new`) and replacing the pin, which detaches the old link.
fn install_cgroup_link(
    links_dir: &Path,
    name: &'static str,
    hook_type: u32,
    cgroup_id: u64,
    program: OwnedFd,
    attach_new: &mut dyn FnMut() -> std::io::Result<FdLink>,
) -> Result<LinkOutcome, DatapathError> {
    let pin = links_dir.join(name);
    let link_err = |source| DatapathError::Link { name, source };
    if !pin.exists() {
        let link = attach_new().map_err(|source| DatapathError::Attach { name, source })?;
        link.pin(&pin).map_err(|err| link_err(std::io::Error::other(err.to_string())))?;
        return Ok(LinkOutcome::Attached);
    }
    let pinned = bpf_sys::obj_get(&pin).map_err(|source| DatapathError::PinnedLink {
        path: pin.clone(),
        problem: format!("cannot be opened as a bpf link ({source})"),
    })?;
    let attachment = bpf_sys::link_attachment(pinned.as_fd()).map_err(|source| DatapathError::PinnedLink {
        path: pin.clone(),
        problem: format!("its attachment cannot be read ({source})"),
    })?;
    if attachment.link_type != bpf_sys::BPF_LINK_TYPE_CGROUP || attachment.attach_type != hook_type {
        return Err(DatapathError::PinnedLink {
            path: pin,
            problem: format!(
                "is not a cgroup link on the {} hook (link type {}, hook {}): remove it, or run `sockshift uninstall`",
                hook_name(name),
                attachment.link_type,
                attachment.attach_type
            ),
        });
    }
    if attachment.cgroup_id == cgroup_id {
        bpf_sys::link_update(pinned.as_fd(), program.as_fd()).map_err(link_err)?;
        return Ok(LinkOutcome::Updated);
    }
    // Attached to another cgroup (agent.cgroup changed), or severed (cgroup id 0: its cgroup was
    // removed). The configured cgroup gets its link first, so it is never left unsteered; then
    // the pin moves to the new link and the old one, unreferenced, detaches.
    let link = attach_new().map_err(|source| DatapathError::Attach { name, source })?;
    std::fs::remove_file(&pin).map_err(link_err)?;
    drop(pinned);
    link.pin(&pin).map_err(|err| link_err(std::io::Error::other(err.to_string())))?;
    if attachment.cgroup_id == 0 {
        log::warn!("{name}: the pinned link's cgroup was removed; attached to the configured cgroup");
    } else {
        log::warn!(
            "{name}: the pinned link was on cgroup id {} (agent.cgroup changed); moved to the configured cgroup \
             (id {cgroup_id}), which was attached before the old one was detached",
            attachment.cgroup_id
        );
    }
    Ok(LinkOutcome::Reattached)
}

/// Programs that are not sockshift's on the hooks sockshift uses, for the configured cgroup.
fn foreign_programs(
    cgroup: std::os::fd::BorrowedFd<'_>,
    ours: &BTreeMap<&'static str, (u32, u32)>,
) -> Vec<ForeignProgram> {
    let our_ids: HashSet<u32> = ours.values().map(|(_, id)| *id).collect();
    let mut found = Vec::new();
    for (name, (hook_type, our_id)) in ours {
        let effective = match bpf_sys::effective_programs(cgroup, *hook_type) {
            Ok(ids) => ids,
            Err(err) => {
                log::warn!("cannot list the programs on the {} hook: {err}", hook_name(name));
                continue;
            }
        };
        let our_position = effective.iter().position(|id| id == our_id);
        for (position, id) in effective.iter().enumerate() {
            if our_ids.contains(id) {
                continue;
            }
            found.push(ForeignProgram {
                hook: hook_name(name).to_string(),
                program_id: *id,
                name: String::new(),
                attached_to_cgroup: false,
                runs_before_sockshift: our_position.is_none_or(|ours| position < ours),
            });
        }
    }
    if found.is_empty() {
        return found;
    }
    let wanted: HashSet<u32> = found.iter().map(|f| f.program_id).collect();
    let names: HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| wanted.contains(&p.id()))
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_string()))
        .collect();
    // Attached to the cgroup itself: its direct attachments, without the inherited ones.
    let direct: HashSet<(u32, &'static str)> = ours
        .iter()
        .flat_map(|(name, (hook_type, _))| {
            bpf_sys::attached_programs(cgroup, *hook_type)
                .unwrap_or_default()
                .into_iter()
                .map(move |id| (id, hook_name(name)))
        })
        .collect();
    for program in &mut found {
        program.name = names.get(&program.program_id).cloned().unwrap_or_default();
        program.attached_to_cgroup = direct.contains(&(program.program_id, program.hook.as_str()));
    }
    found
}

/// Detaches the link pinned at `path` at once (BPF_LINK_DETACH): dropping a link's last
/// reference detaches it from a work queue a few ms later, which let connections be steered after
/// `sockshift uninstall` returned. The caller removes the pin afterwards.
pub fn detach_link_pin(path: &Path) {
    match bpf_sys::obj_get(path) {
        // A link type that cannot be detached by hand still goes with its pin.
        Ok(link) => {
            let _ = bpf_sys::link_detach(link.as_fd());
        }
        Err(err) => log::warn!("{}: {err}", path.display()),
    }
}

fn program_id(
    info: Result<aya::programs::ProgramInfo, ProgramError>,
    name: &'static str,
) -> Result<u32, DatapathError> {
    info.map(|i| i.id()).map_err(|source| DatapathError::Program { name, source })
}

fn program_fd(fd: Result<&ProgramFd, ProgramError>, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let fd = fd.map_err(|source| DatapathError::Program { name, source })?;
    fd.as_fd().try_clone_to_owned().map_err(|source| DatapathError::Link { name, source })
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program =
        ebpf.program_mut(name).ok_or(DatapathError::Program { name, source: ProgramError::UnexpectedProgramType })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}
