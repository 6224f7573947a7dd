//! The socket table: a steered socket's record lives in one of its two slots of SOCKET_SLOTS
//! (`socket_slots(cookie)`), or, when both are taken by other sockets, in the spill table
//! SOCKETS. Taking a slot is one compare-and-swap on an array element the verifier inlines: no
//! helper call, no bucket lock, no free list; that is what keeps a steered `connect()` cheap.

use agent_common::{
    socket_slots, SocketEntry, SocketSlot, MAX_STEERED_SOCKETS, SOCKET_SPILLED, SOCKET_TABLE_LEGACY, SOCKET_TABLE_SPILLED,
};
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
fn slot_cookie(slot: *mut SocketSlot) -> u64 {
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).cookie)) }
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

/// The socket's two slots (either may be missing if the table is smaller than the agent said).
#[inline(always)]
fn slots_of(cookie: u64) -> (Option<*mut SocketSlot>, Option<*mut SocketSlot>) {
    let (first, second) = socket_slots(cookie, slot_count());
    (SOCKET_SLOTS.get_ptr_mut(first), SOCKET_SLOTS.get_ptr_mut(second))
}

/// The slot that holds the socket's record, if one does.
#[inline(always)]
fn held_slot(cookie: u64) -> Option<*mut SocketSlot> {
    let (first, second) = slots_of(cookie);
    if let Some(slot) = first {
        if slot_cookie(slot) == cookie {
            return Some(slot);
        }
    }
    if let Some(slot) = second {
        if slot_cookie(slot) == cookie {
            return Some(slot);
        }
    }
    None
}

/// Whether the spill table may hold records: when it holds none, a socket its slots miss has no
/// record, and no hash lookup is needed to tell.
#[inline(always)]
fn spill_in_use() -> bool {
    let nonzero = |slot| match SOCKET_TABLE.get_ptr(slot) {
        Some(value) => (unsafe { core::ptr::read_volatile(value) }) != 0,
        None => true,
    };
    nonzero(SOCKET_TABLE_SPILLED) || nonzero(SOCKET_TABLE_LEGACY)
}

#[inline(always)]
fn count_spilled(delta: u64) {
    if let Some(spilled) = SOCKET_TABLE.get_ptr_mut(SOCKET_TABLE_SPILLED) {
        atomic_add(spilled, delta);
    }
}

/// The socket's record, to read and to update its flags in place.
#[inline(always)]
pub fn find(cookie: u64) -> Option<*mut SocketEntry> {
    if let Some(slot) = held_slot(cookie) {
        return Some(unsafe { core::ptr::addr_of_mut!((*slot).entry) });
    }
    if spill_in_use() {
        return SOCKETS.get_ptr_mut(cookie);
    }
    None
}

/// A copy of the socket's record. A slot's copy is checked to still be this socket's after it
/// was taken (a reset may free the slot and another socket take it meanwhile).
#[inline(always)]
pub fn get(cookie: u64) -> Option<SocketEntry> {
    if let Some(slot) = held_slot(cookie) {
        let entry = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).entry)) };
        return if slot_cookie(slot) == cookie { Some(entry) } else { None };
    }
    if spill_in_use() {
        return unsafe { SOCKETS.get(cookie) }.copied();
    }
    None
}

/// What `insert` did.
pub enum Inserted {
    /// The socket had no record.
    New,
    /// The socket had a record (it connects again): this was it.
    Replaced(SocketEntry),
    /// Its slots were taken and the spill table is full: no record.
    Full,
}

/// Records the socket (replacing its record if it has one in its slots or, when those are
/// taken, in the spill table).
#[inline(always)]
pub fn insert(cookie: u64, entry: &SocketEntry) -> Inserted {
    let (first, second) = slots_of(cookie);
    // Connecting again: the record is replaced where it is.
    if let Some(slot) = first {
        if slot_cookie(slot) == cookie {
            let old = unsafe { (*slot).entry };
            unsafe { (*slot).entry = *entry };
            return Inserted::Replaced(old);
        }
    }
    if let Some(slot) = second {
        if slot_cookie(slot) == cookie {
            let old = unsafe { (*slot).entry };
            unsafe { (*slot).entry = *entry };
            return Inserted::Replaced(old);
        }
    }
    // A free slot is taken by swapping its cookie from 0: of two sockets racing for it, one wins.
    // The entry is written after: no other path reads this socket's record before its connect
    // returns. (A record this socket left in the spill table before stays until it closes.)
    if let Some(slot) = first {
        if slot_cookie(slot) == 0 && swap_cookie(slot, 0, cookie) {
            unsafe { (*slot).entry = *entry };
            return Inserted::New;
        }
    }
    if let Some(slot) = second {
        if slot_cookie(slot) == 0 && swap_cookie(slot, 0, cookie) {
            unsafe { (*slot).entry = *entry };
            return Inserted::New;
        }
    }
    spill(cookie, entry)
}

/// Both slots are taken: the record goes to the spill table.
#[inline(always)]
fn spill(cookie: u64, entry: &SocketEntry) -> Inserted {
    let mut entry = *entry;
    entry.flags |= SOCKET_SPILLED;
    // Counted before it is there, so that no reader skips the table while it holds it.
    count_spilled(1);
    match SOCKETS.insert(cookie, &entry, BPF_NOEXIST as u64) {
        Ok(()) => Inserted::New,
        Err(err) if err == -EEXIST => {
            let old = unsafe { SOCKETS.get(cookie) }.copied();
            let old_counted = old.is_some_and(|old| old.flags & SOCKET_SPILLED != 0);
            if old_counted {
                count_spilled(u64::MAX); // one record either way, counted already
            }
            if SOCKETS.insert(cookie, &entry, BPF_ANY as u64).is_err() {
                if !old_counted {
                    count_spilled(u64::MAX);
                }
                return Inserted::Full;
            }
            match old {
                Some(old) => Inserted::Replaced(old),
                None => Inserted::New,
            }
        }
        Err(_) => {
            count_spilled(u64::MAX);
            Inserted::Full
        }
    }
}

/// Removes the socket's record from its slot: true for the one caller that removed it (a TCP
/// socket's record may be forgotten by sock_ops and sock_release at the same time).
#[inline(always)]
pub fn remove_from_slot(cookie: u64) -> bool {
    match held_slot(cookie) {
        Some(slot) => swap_cookie(slot, cookie, 0),
        None => false,
    }
}

/// Removes the socket's record from the spill table, if it is there: its copy, for the one
/// caller that removed it.
#[inline(always)]
pub fn remove_from_spill(cookie: u64) -> Option<SocketEntry> {
    if !spill_in_use() {
        return None;
    }
    let old = unsafe { SOCKETS.get(cookie) }.copied()?;
    if SOCKETS.remove(cookie).is_err() {
        return None; // removed meanwhile by another path
    }
    if old.flags & SOCKET_SPILLED != 0 {
        count_spilled(u64::MAX);
    }
    Some(old)
}
