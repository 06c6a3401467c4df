//! Connection tracking for load-balanced flows: an LRU hash of forward entries (client ->
//! VIP, holding the backend) and reply entries (backend -> client, holding the VIP), with
//! timeouts by TCP state that userspace configures. Entries expire lazily: an expired
//! entry is a miss, and the LRU reclaims it when the map fills.

use aya_ebpf::{
    btf_maps::{Array, LruHashMap},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use netctl_common::{
    CT_CLOSING, CT_DEFAULT_SIZE, CT_ESTABLISHED, CT_SYN_SENT, CT_TIMEOUT_CLOSING,
    CT_TIMEOUT_ESTABLISHED, CT_TIMEOUT_SLOTS, CT_TIMEOUT_SYN, CT_TIMEOUT_UDP, CtEntry, CtKey,
};

#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, { CT_DEFAULT_SIZE as usize }> =
    LruHashMap::new();

/// Timeouts in nanoseconds by `CT_TIMEOUT_*` index; 0 means the built-in default.
#[btf_map]
pub static CT_TIMEOUTS: Array<u64, { CT_TIMEOUT_SLOTS as usize }> = Array::new();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn timeout(state: u8) -> u64 {
    let (slot, default) = match state {
        CT_SYN_SENT => (CT_TIMEOUT_SYN, 60 * SEC),
        CT_ESTABLISHED => (CT_TIMEOUT_ESTABLISHED, 6 * 3600 * SEC),
        CT_CLOSING => (CT_TIMEOUT_CLOSING, 10 * SEC),
        _ => (CT_TIMEOUT_UDP, 300 * SEC),
    };
    match CT_TIMEOUTS.get(slot) {
        Some(&t) if t != 0 => t,
        _ => default,
    }
}

/// A live entry for `key`, or None (absent or expired).
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from the map lookup.
    let (seen, state) = unsafe { ((*e).last_seen_ns, (*e).state) };
    if now.saturating_sub(seen) > timeout(state) {
        return None;
    }
    Some(e)
}

/// The entry for `key`, live or not.
#[inline(always)]
pub fn get(key: &CtKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

#[inline(always)]
pub fn insert(key: &CtKey, entry: &CtEntry) -> Result<(), i32> {
    CONNTRACK.insert(key, entry, 0).map_err(|e| e as i32)
}

/// The state after a TCP segment with `flags` (either direction). SYN-only opens; any later
/// segment without SYN establishes (an ACK: the SYN-ACK does not, so a handshake the client
/// never completes keeps the short SYN timeout); FIN or RST closes (short timeout).
#[inline(always)]
pub fn next_tcp_state(state: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        CT_CLOSING
    } else if state == CT_SYN_SENT && flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        CT_ESTABLISHED
    } else {
        state
    }
}
