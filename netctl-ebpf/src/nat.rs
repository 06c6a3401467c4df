//! Packet rewrites with incremental checksum updates (RFC 1624), through the kernel's
//! `bpf_l3_csum_replace` / `bpf_l4_csum_replace`: an address change updates the IPv4
//! header checksum and, through the pseudo-header, the TCP or UDP checksum; a port change
//! updates the L4 checksum. A UDP checksum of 0 (none, RFC 768) stays 0
//! (`BPF_F_MARK_MANGLED_0`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use netctl_common::DropReason;

use crate::parse::{ETH_HLEN, IPPROTO_TCP};

/// Offset of the IPv4 header checksum.
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;

/// Where the L4 checksum of a TCP or UDP header at `l4` sits.
#[inline(always)]
pub fn l4_csum_off(proto: u8, l4: usize) -> usize {
    if proto == IPPROTO_TCP { l4 + 16 } else { l4 + 6 }
}

#[inline(always)]
fn l4_flags(proto: u8) -> u64 {
    if proto == IPPROTO_TCP {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    }
}

#[inline(always)]
fn fail<E>(_: E) -> DropReason {
    DropReason::NatFailed
}

/// Rewrites the source (`src = true`) or destination IPv4 address, fixing the IP checksum
/// and the L4 checksum (pseudo-header) of a TCP or UDP packet whose L4 header is at `l4`.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    src: bool,
    old: [u8; 4],
    new: [u8; 4],
    proto: u8,
    l4: usize,
) -> Result<(), DropReason> {
    let (o, n) = (u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64);
    ctx.l4_csum_replace(
        l4_csum_off(proto, l4),
        o,
        n,
        BPF_F_PSEUDO_HDR as u64 | 4 | l4_flags(proto),
    )
    .map_err(fail)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4).map_err(fail)?;
    let off = if src { IP_SRC_OFF } else { IP_DST_OFF };
    ctx.store(off, &new, 0).map_err(fail)
}

/// Rewrites the source (`src = true`) or destination port (values in host order).
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    src: bool,
    old: u16,
    new: u16,
    proto: u8,
    l4: usize,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let (o, n) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(l4_csum_off(proto, l4), o as u64, n as u64, 2 | l4_flags(proto))
        .map_err(fail)?;
    ctx.store(if src { l4 } else { l4 + 2 }, &n, 0).map_err(fail)
}

/// Sets the Ethernet destination MAC.
#[inline(always)]
pub fn set_dst_mac(ctx: &TcContext, mac: [u8; 6]) -> Result<(), DropReason> {
    ctx.store(0, &mac, 0).map_err(fail)
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit word of the summed data changes from `old`
/// to `new` (all values as read big-endian).
#[inline(always)]
pub fn csum_update(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!csum as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Replaces one 16-bit word inside an ICMP message (at packet offset `off`), fixing the
/// ICMP checksum at `icmp_csum_off` (ICMP has no pseudo-header, RFC 792).
#[inline(always)]
pub fn icmp_set_word(
    ctx: &TcContext,
    icmp_csum_off: usize,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let (o, n) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(icmp_csum_off, o as u64, n as u64, 2)
        .map_err(fail)?;
    ctx.store(off, &n, 0).map_err(fail)
}
