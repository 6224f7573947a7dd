//! The socket table: a steered socket's record lives in its first slot of SOCKET_SLOTS
//! (`socket_slots(cookie)`), or, when another socket holds that one, in its second slot or the
//! spill table SOCKETS; the first slot then counts it in `overflow`. Taking a slot is one
//! compare-and-swap on an array element the verifier inlines: no helper call, no bucket lock, no
//! free list, one cache line; that is what keeps a steered `connect()` cheap.

use agent_common::{socket_slots, SocketEntry, SocketSlot, MAX_STEERED_SOCKETS, SOCKET_SPILLED, SOCKET_TABLE_LEGACY};
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};

use crate::{
    maps::{SOCKETS, SOCKET_SLOTS, SOCKET_TABLE},
    steer::atomic_add,
};

const EEXIST: i32 = 17;

/// SOCKET_SLOTS' size, a power of two, patched by the agent at load (read-only data, so the
/// verifier knows it).
#[unsafe(no_mangle)]
static SOCKET_SLOT_COUNT: u32 = MAX_STEERED_SOCKETS;

#[inline(always)]
fn slot_count() -> u32 {
    unsafe { core::ptr::read_volatile(&SOCKET_SLOT_COUNT) }
}

#[inline(always)]
fn holder(slot: *mut SocketSlot) -> u64 {
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).cookie)) }
}

#[inline(always)]
fn overflow(slot: *mut SocketSlot) -> u64 {
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).overflow)) }
}

#[inline(always)]
fn count_overflow(first: *mut SocketSlot, delta: u64) {
    atomic_add(unsafe { core::ptr::addr_of_mut!((*first).overflow) }, delta);
}

/// Swaps the slot's cookie from `old` to `new`; true if it held `old` (the caller won).
#[inline(always)]
fn swap_cookie(slot: *mut SocketSlot, old: u64, new: u64) -> bool {
    unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(core::ptr::addr_of_mut!((*slot).cookie), old, new)
        .1
    }
}

/// Whether the spill table may hold records of an older agent (counted in no `overflow`).
#[inline(always)]
fn legacy() -> bool {
    match SOCKET_TABLE.get_ptr(SOCKET_TABLE_LEGACY) {
        Some(value) => (unsafe { core::ptr::read_volatile(value) }) != 0,
        None => true,
    }
}

/// Where a socket's record is.
#[derive(Clone, Copy)]
enum Place {
    First(*mut SocketSlot),
    /// In its second slot; the first counts it.
    Second {
        slot: *mut SocketSlot,
        first: *mut SocketSlot,
    },
    /// In the spill table; the first slot counts it if the record says `SOCKET_SPILLED`.
    Spill {
        entry: *mut SocketEntry,
        first: *mut SocketSlot,
    },
}

/// Finds the socket's record: its first slot tells whether to look further.
#[inline(always)]
fn locate(cookie: u64) -> Option<Place> {
    let (first_index, second_index) = socket_slots(cookie, slot_count());
    let first = SOCKET_SLOTS.get_ptr_mut(first_index)?;
    if holder(first) == cookie {
        return Some(Place::First(first));
    }
    let elsewhere = overflow(first) != 0;
    if elsewhere {
        if let Some(slot) = SOCKET_SLOTS.get_ptr_mut(second_index) {
            if holder(slot) == cookie {
                return Some(Place::Second { slot, first });
            }
        }
    }
    if elsewhere || legacy() {
        if let Some(entry) = SOCKETS.get_ptr_mut(cookie) {
            return Some(Place::Spill { entry, first });
        }
    }
    None
}

/// The socket's record, to read and to update its flags in place.
#[inline(always)]
pub fn find(cookie: u64) -> Option<*mut SocketEntry> {
    Some(match locate(cookie)? {
        Place::First(slot) | Place::Second { slot, .. } => unsafe { core::ptr::addr_of_mut!((*slot).entry) },
        Place::Spill { entry, .. } => entry,
    })
}

/// A copy of the socket's record. A slot's copy is checked to still be this socket's after it
/// was taken (a reset may free the slot and another socket take it meanwhile).
#[inline(always)]
pub fn get(cookie: u64) -> Option<SocketEntry> {
    match locate(cookie)? {
        Place::First(slot) | Place::Second { slot, .. } => {
            let entry = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).entry)) };
            (holder(slot) == cookie).then_some(entry)
        }
        Place::Spill { entry, .. } => Some(unsafe { *entry }),
    }
}

/// What `insert` did.
pub enum Inserted {
    /// The socket had no record.
    New,
    /// The socket had a record (it connects again): this was it. The new one took its place.
    Replaced(SocketEntry),
    /// Its slots were taken and the spill table is full: no record.
    Full,
}

#[inline(always)]
fn replace_in_slot(slot: *mut SocketSlot, entry: &SocketEntry) -> Inserted {
    let old = unsafe { (*slot).entry };
    unsafe { (*slot).entry = *entry };
    Inserted::Replaced(old)
}

/// Takes a free slot: of two sockets racing for it, one wins. The entry is written after: no
/// other path reads this socket's record before its connect returns.
#[inline(always)]
fn take(slot: *mut SocketSlot, cookie: u64, entry: &SocketEntry) -> bool {
    if holder(slot) == 0 && swap_cookie(slot, 0, cookie) {
        unsafe { (*slot).entry = *entry };
        true
    } else {
        false
    }
}

/// Records the socket, replacing its record if it has one (it connects again).
#[inline(always)]
pub fn insert(cookie: u64, entry: &SocketEntry) -> Inserted {
    let (first_index, second_index) = socket_slots(cookie, slot_count());
    let Some(first) = SOCKET_SLOTS.get_ptr_mut(first_index) else { return Inserted::Full };
    if holder(first) == cookie {
        return replace_in_slot(first, entry);
    }
    let second = SOCKET_SLOTS.get_ptr_mut(second_index);
    // Only when the first slot counts records elsewhere can this socket have one there.
    if overflow(first) != 0 || legacy() {
        if let Some(slot) = second {
            if holder(slot) == cookie {
                return replace_in_slot(slot, entry);
            }
        }
        if let Some(old) = unsafe { SOCKETS.get(cookie) }.copied() {
            let mut entry = *entry;
            entry.flags |= old.flags & SOCKET_SPILLED; // counted in the first slot as it was
            return if SOCKETS.insert(cookie, &entry, BPF_ANY as u64).is_ok() {
                Inserted::Replaced(old)
            } else {
                Inserted::Full
            };
        }
    }
    // The common case: the first slot is free.
    if take(first, cookie, entry) {
        return Inserted::New;
    }
    // Counted before the record is elsewhere, so that no reader skips looking for it.
    count_overflow(first, 1);
    if let Some(slot) = second {
        if take(slot, cookie, entry) {
            return Inserted::New;
        }
    }
    let mut entry = *entry;
    entry.flags |= SOCKET_SPILLED;
    match SOCKETS.insert(cookie, &entry, BPF_NOEXIST as u64) {
        Ok(()) => Inserted::New,
        Err(err) if err == -EEXIST => {
            // A record no slot counted (an older agent's, or one made between the checks above by
            // a path that cannot run now): replaced, and counted from now on.
            let old = unsafe { SOCKETS.get(cookie) }.copied();
            match (old, SOCKETS.insert(cookie, &entry, BPF_ANY as u64)) {
                (Some(old), Ok(())) => {
                    if old.flags & SOCKET_SPILLED != 0 {
                        count_overflow(first, u64::MAX); // it was counted already
                    }
                    Inserted::Replaced(old)
                }
                (None, Ok(())) => Inserted::New,
                (_, Err(_)) => {
                    count_overflow(first, u64::MAX);
                    Inserted::Full
                }
            }
        }
        Err(_) => {
            count_overflow(first, u64::MAX);
            Inserted::Full
        }
    }
}

/// Forgets the socket's record: true for the one caller that removed it (a TCP socket's record
/// may be forgotten by sock_ops and sock_release at the same time).
#[inline(always)]
pub fn remove(cookie: u64) -> bool {
    match locate(cookie) {
        Some(Place::First(slot)) => swap_cookie(slot, cookie, 0),
        Some(Place::Second { slot, first }) => {
            let removed = swap_cookie(slot, cookie, 0);
            if removed {
                count_overflow(first, u64::MAX);
            }
            removed
        }
        Some(Place::Spill { entry, first }) => {
            let spilled = unsafe { (*entry).flags } & SOCKET_SPILLED != 0;
            let removed = SOCKETS.remove(cookie).is_ok();
            if removed && spilled {
                count_overflow(first, u64::MAX);
            }
            removed
        }
        None => false,
    }
}
