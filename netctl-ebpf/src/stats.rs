//! Per-CPU counters: packets and bytes per slot (passes by hook, drops by reason).

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::TcContext};
use netctl_common::{COUNTER_SLOTS, Counter};

#[btf_map]
pub static COUNTERS: PerCpuArray<Counter, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Adds one packet of `ctx`'s length to `slot`. Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(ctx: &TcContext, slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
}
