//! Header layouts and bounds-checked access to packet bytes.
//!
//! One way in: [`ptr_at`], which proves to the verifier that `offset + size_of::<T>()` lies
//! inside the linear packet data. Pointers are re-derived after any helper that may move the
//! data (none is called by the programs of this issue).

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
/// EtherTypes, as read from the wire (network byte order) into a `u16`.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_ARP_BE: u16 = 0x0806u16.to_be();
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// ICMP types that carry the header of the packet they are about (RFC 792).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;
pub const ARPOP_REQUEST_BE: u16 = 1u16.to_be();
pub const ARPOP_REPLY_BE: u16 = 2u16.to_be();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto_be: u16,
}

/// IPv4 header without options (RFC 791 section 3.1).
#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}
pub const IPV4_MIN_HLEN: usize = 20;

impl Ipv4Hdr {
    /// More-fragments set or a fragment offset: ports are only in the first fragment.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be(self.frag_off_be) & 0x3fff != 0
    }
    #[inline(always)]
    pub fn hlen(&self) -> usize {
        usize::from(self.ver_ihl & 0x0f) * 4
    }
}

/// The first four bytes of TCP and UDP: the ports.
#[repr(C)]
pub struct L4Ports {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// The ICMP header (RFC 792).
#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}
pub const ICMP_HLEN: usize = 8;

/// ARP for Ethernet and IPv4 (RFC 826), the only kind endpoints may send.
#[repr(C)]
pub struct ArpEthIpv4 {
    pub htype_be: u16,
    pub ptype_be: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op_be: u16,
    pub sha: [u8; 6],
    /// Sender protocol address; unaligned in the packet, so kept as bytes.
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// A pointer to a `T` at `offset` in the packet, or `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}
