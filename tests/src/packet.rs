//! Packets built byte by byte with every checksum computed from scratch (RFC 1071), for
//! the packet tests of the programs and the `prog` benchmark.

/// An IPv4 address as the packet holds it.
pub type Ip = [u8; 4];

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
/// The TCP ACK flag.
pub const ACK: u8 = 0x10;

/// An Ethernet header.
pub fn eth(dst: [u8; 6], src: [u8; 6], proto: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(14);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&proto.to_be_bytes());
    p
}

/// The 16-bit one's complement sum (not yet folded) of `data`, big-endian words, an odd
/// last byte padded with zero.
pub fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum to store over `data` (whose checksum field is zero): IPv4 header, ICMP.
pub fn csum(data: &[u8]) -> u16 {
    !fold(sum16(data))
}

/// The sum of the TCP/UDP pseudo-header (RFC 793 section 3.1, RFC 768).
pub fn pseudo_sum(src: Ip, dst: Ip, proto: u8, len: usize) -> u32 {
    sum16(&src) + sum16(&dst) + u32::from(proto) + len as u32
}

/// The TCP or UDP checksum to store over `seg` (checksum field zero) with its pseudo-header.
/// UDP transmits a computed 0 as 0xffff (RFC 768: 0 means "no checksum").
pub fn l4_csum(src: Ip, dst: Ip, proto: u8, seg: &[u8]) -> u16 {
    let c = !fold(pseudo_sum(src, dst, proto, seg.len()) + sum16(seg));
    if proto == UDP && c == 0 { 0xffff } else { c }
}

/// A checksum field is valid when the sum over the covered data, field included, is
/// 0xffff (one's complement -0).
pub fn valid(sum: u32) -> bool {
    fold(sum) == 0xffff
}

/// An IPv4 header (no options, TTL 64, DF unless `frag` says otherwise) with its checksum.
pub fn ipv4_hdr(src: Ip, dst: Ip, proto: u8, payload_len: usize, frag: u16) -> Vec<u8> {
    let tot = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&0x1c46u16.to_be_bytes()); // id
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

pub const DF: u16 = 0x4000;
pub const MF: u16 = 0x2000;

pub fn frame(dmac: [u8; 6], smac: [u8; 6], src: Ip, dst: Ip, proto: u8, l4: &[u8]) -> Vec<u8> {
    frame_frag(dmac, smac, src, dst, proto, l4, DF)
}

pub fn frame_frag(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: Ip,
    dst: Ip,
    proto: u8,
    l4: &[u8],
    frag: u16,
) -> Vec<u8> {
    let mut p = eth(dmac, smac, 0x0800);
    p.extend_from_slice(&ipv4_hdr(src, dst, proto, l4.len(), frag));
    p.extend_from_slice(l4);
    p
}

/// A TCP segment without payload; sequence and acknowledgment numbers are fixed.
pub fn tcp_seg(src: Ip, sport: u16, dst: Ip, dport: u16, flags: u8) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    let ack = if flags & ACK != 0 { 0x0a0b_0c0du32 } else { 0 };
    s.extend_from_slice(&ack.to_be_bytes());
    s.extend_from_slice(&[0x50, flags]);
    s.extend_from_slice(&64240u16.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let c = l4_csum(src, dst, TCP, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram; `checksum` false sends 0 (none).
pub fn udp_seg(
    src: Ip,
    sport: u16,
    dst: Ip,
    dport: u16,
    payload: &[u8],
    checksum: bool,
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    if checksum {
        let c = l4_csum(src, dst, UDP, &s);
        s[6..8].copy_from_slice(&c.to_be_bytes());
    }
    s
}

#[allow(clippy::too_many_arguments)]
pub fn tcp(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: Ip,
    sport: u16,
    dst: Ip,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    frame(
        dmac,
        smac,
        src,
        dst,
        TCP,
        &tcp_seg(src, sport, dst, dport, flags),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn udp(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: Ip,
    sport: u16,
    dst: Ip,
    dport: u16,
    payload: &[u8],
    checksum: bool,
) -> Vec<u8> {
    let seg = udp_seg(src, sport, dst, dport, payload, checksum);
    frame(dmac, smac, src, dst, UDP, &seg)
}
