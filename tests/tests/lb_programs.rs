//! Packet-in, packet-out tests of the load balancer in `from_endpoint` and `to_endpoint`
//! (service DNAT by Maglev + conntrack, reverse NAT, ICMP error translation, VIP ARP,
//! hairpin) through `BPF_PROG_TEST_RUN`. Needs root.
//!
//! Every output packet is compared byte for byte with a packet built from scratch by this
//! file (its checksums computed by RFC 1071 over the whole header or message, never
//! incrementally), and every checksum of every output packet is verified again by
//! [`verify_checksums`]. Each run also asserts which counter slots moved (pass, event or
//! drop), and that no other slot did.
//!
//! The client under test is the endpoint 10.1.0.2 behind ifindex 1 (where test-run puts
//! `skb->dev`); the backends' veths are ifindex 0 (not on this node: the bridge forwards,
//! `TC_ACT_OK`) or 7 (`bpf_redirect`, `TC_ACT_REDIRECT`; test-run does not send).

mod common;

use aya::maps::{Array, HashMap, MapData};
use common::{EP_MAC, Fixture, LO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use netctl_common::{
    BackendInfo, CT_CLOSING, CT_DIR_FWD, CT_DIR_REPLY, CT_ESTABLISHED, CT_F_HAIRPIN, CT_SYN_SENT,
    CT_TIMEOUT_ESTABLISHED, CT_TIMEOUT_SYN, CT_TIMEOUT_UDP, CT_UDP, CtEntry, CtKey, DropReason,
    MAGLEV_M, SLOT_ARP_VIP, SLOT_HAIRPIN, SLOT_ICMP_REV_NAT, SLOT_LB_CT_HIT, SLOT_LB_NEW,
    SLOT_REV_NAT, SvcInfo, SvcKey, VIP_MAC, VipInfo, flow_hash, maglev_slot, names,
};
use netctl_tests::packet::*;

const CLIENT: Ip = [10, 1, 0, 2];
const VIP: Ip = [10, 1, 0, 100];
/// A VIP of the other network (10.2.0.0/16, net 2).
const OTHER_VIP: Ip = [10, 2, 0, 100];
const ROUTER: Ip = [10, 1, 0, 1];
const ROUTER_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 1];
const SVC_ID: u32 = 1;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// Backends of service 1: (id, address, MAC, ifindex of the host-side veth).
const BACKENDS: [(u32, Ip, [u8; 6], u32); 3] = [
    (1, [10, 1, 0, 11], [0x02, 0x42, 10, 1, 0, 11], 0),
    (2, [10, 1, 0, 12], [0x02, 0x42, 10, 1, 0, 12], 7),
    (3, [10, 1, 0, 13], [0x02, 0x42, 10, 1, 0, 13], 0),
];
/// The client itself as a backend (hairpin), on its own veth.
const HAIRPIN_BACKEND: u32 = 4;

const UDP_PAYLOAD: &[u8] = b"netctl query"; // 12 bytes
const UDP_ODD_PAYLOAD: &[u8] = b"odd-length!!!"; // 13 bytes: checks the padding of sums

// ---------------------------------------------------------------------------------------
// RFC 1071 checksums, from scratch.

/// Verifies, from scratch, every checksum of an Ethernet frame: the IPv4 header; TCP, UDP
/// (unless 0) with the pseudo-header; ICMP over the whole message and, in an ICMP error, the
/// quoted IPv4 header and, when the quote holds the whole quoted datagram, its TCP or UDP
/// checksum. Returns the number of checksums verified; panics on a bad one.
fn verify_checksums(pkt: &[u8]) -> usize {
    checksums(pkt).unwrap_or_else(|e| panic!("{e}: {pkt:02x?}"))
}

fn bytes(b: &[u8], from: usize, to: usize) -> Result<&[u8], String> {
    b.get(from..to)
        .ok_or_else(|| format!("truncated: {from}..{to} of {}", b.len()))
}

fn checksums(pkt: &[u8]) -> Result<usize, String> {
    if bytes(pkt, 12, 14)? != [8, 0] {
        return Ok(0);
    }
    let ip = &pkt[14..];
    let ihl = usize::from(bytes(ip, 0, 1)?[0] & 0x0f) * 4;
    if ihl < 20 || !valid(sum16(bytes(ip, 0, ihl)?)) {
        return Err("IPv4 header checksum".into());
    }
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if tot != ip.len() {
        return Err(format!("IPv4 total length {tot}, packet {}", ip.len()));
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    let (src, dst) = (ip_at(ip, 12), ip_at(ip, 16));
    let l4 = &ip[ihl..];
    let mut n = 1;
    if frag != 0 {
        return Ok(n);
    }
    match ip[9] {
        TCP | UDP => n += check_l4(src, dst, ip[9], l4)?,
        ICMP => {
            if !valid(sum16(l4)) {
                return Err("ICMP checksum".into());
            }
            n += 1;
            if matches!(bytes(l4, 0, 1)?[0], 3 | 11 | 12) {
                let q = bytes(l4, 8, l4.len())?;
                let qihl = usize::from(bytes(q, 0, 1)?[0] & 0x0f) * 4;
                if qihl < 20 || !valid(sum16(bytes(q, 0, qihl)?)) {
                    return Err("quoted IPv4 header checksum".into());
                }
                n += 1;
                let qtot = usize::from(u16::from_be_bytes([q[2], q[3]]));
                if qtot == q.len() {
                    n += check_l4(ip_at(q, 12), ip_at(q, 16), q[9], &q[qihl..])?;
                }
            }
        }
        _ => {}
    }
    Ok(n)
}

fn check_l4(src: Ip, dst: Ip, proto: u8, seg: &[u8]) -> Result<usize, String> {
    let off = if proto == TCP { 16 } else { 6 };
    let field = bytes(seg, off, off + 2)?;
    if proto == UDP && field == [0, 0] {
        return Ok(0); // no checksum (RFC 768)
    }
    if proto == UDP && usize::from(u16::from_be_bytes([seg[4], seg[5]])) != seg.len() {
        return Err("UDP length".into());
    }
    let sum = pseudo_sum(src, dst, proto, seg.len()) + sum16(seg);
    if !valid(sum) {
        return Err(format!(
            "proto {proto} checksum {field:02x?} over {src:?} -> {dst:?}"
        ));
    }
    Ok(1)
}

fn ip_at(b: &[u8], off: usize) -> Ip {
    b[off..off + 4].try_into().unwrap()
}

// ---------------------------------------------------------------------------------------
// Packets, built from scratch with every checksum computed over the final bytes.

/// An ICMP error (`ty`/`code`, unused word 0) quoting `quote` (an IPv4 packet, maybe cut).
fn icmp_error(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: Ip,
    dst: Ip,
    ty: u8,
    code: u8,
    quote: &[u8],
) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(quote);
    let c = csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    frame(dmac, smac, src, dst, ICMP, &m)
}

fn arp(op: u16, dmac: [u8; 6], sha: [u8; 6], spa: Ip, tha: [u8; 6], tpa: Ip) -> Vec<u8> {
    let mut p = eth(dmac, sha, 0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa);
    p
}

// ---------------------------------------------------------------------------------------
// The fixture.

#[derive(Clone, Copy, Debug)]
struct Backend {
    id: u32,
    ip: Ip,
    mac: [u8; 6],
    ifindex: u32,
}

fn backend(id: u32) -> Backend {
    let (id, ip, mac, ifindex) = *BACKENDS.iter().find(|b| b.0 == id).unwrap();
    Backend {
        id,
        ip,
        mac,
        ifindex,
    }
}

fn hairpin_backend() -> Backend {
    Backend {
        id: HAIRPIN_BACKEND,
        ip: CLIENT,
        mac: EP_MAC,
        ifindex: LO,
    }
}

/// The verdict of a packet sent to `b`.
fn verdict_to(b: &Backend) -> u32 {
    if b.ifindex != 0 {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_OK
    }
}

fn svc_info(target_port: u16, backend_count: u16, net_id: u32) -> SvcInfo {
    SvcInfo {
        svc_id: SVC_ID,
        target_port,
        backend_count,
        net_id,
        flags: 0,
    }
}

fn fwd_key(sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src: CLIENT,
        dst: VIP,
        sport,
        dport,
        proto,
        dir: CT_DIR_FWD,
        _pad: [0; 2],
    }
}

fn reply_key(b: Ip, bport: u16, dst: Ip, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src: b,
        dst,
        sport: bport,
        dport,
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// The base fixture plus service 1 on VIP 10.1.0.100 (80/tcp -> 8080, 53/udp -> 5353) with
/// backends 1, 2 and 3 and its Maglev row filled with the repeating pattern 1, 2, 3.
struct Lb {
    f: Fixture,
}

impl Lb {
    fn new() -> Self {
        let mut lb = Lb { f: Fixture::new(0) };
        lb.set_service(80, TCP, Some(svc_info(8080, 3, 1)));
        lb.set_service(53, UDP, Some(svc_info(5353, 3, 1)));
        {
            let mut vips: HashMap<_, Ip, VipInfo> =
                HashMap::try_from(lb.f.ebpf.map_mut(names::MAP_VIPS).unwrap()).unwrap();
            let v = |net_id| VipInfo { net_id, flags: 0 };
            vips.insert(VIP, v(1), 0).unwrap();
            vips.insert(OTHER_VIP, v(2), 0).unwrap();
        }
        for (id, ..) in BACKENDS {
            lb.add_backend(backend(id));
        }
        lb.fill_row(&[1, 2, 3]);
        lb
    }

    fn set_service(&mut self, port: u16, proto: u8, info: Option<SvcInfo>) {
        let mut m: HashMap<_, SvcKey, SvcInfo> =
            HashMap::try_from(self.f.ebpf.map_mut(names::MAP_SERVICES).unwrap()).unwrap();
        let key = SvcKey {
            vip: VIP,
            port,
            proto,
            _pad: 0,
        };
        match info {
            Some(i) => m.insert(key, i, 0).unwrap(),
            None => m.remove(&key).unwrap(),
        }
    }

    fn backends(&mut self) -> HashMap<&mut MapData, u32, BackendInfo> {
        HashMap::try_from(self.f.ebpf.map_mut(names::MAP_BACKENDS).unwrap()).unwrap()
    }

    fn add_backend(&mut self, b: Backend) {
        let info = BackendInfo {
            ip: b.ip,
            svc_id: SVC_ID,
            ifindex: b.ifindex,
            mac: b.mac,
            _pad: [0; 2],
        };
        self.backends().insert(b.id, info, 0).unwrap();
    }

    fn remove_backend(&mut self, id: u32) {
        self.backends().remove(&id).unwrap();
    }

    /// Fills row SVC_ID of MAGLEV: slot s holds `ids[s % ids.len()]` (userspace writes
    /// MAGLEV_M backend ids per row; only which id sits in which slot matters here).
    fn fill_row(&mut self, ids: &[u32]) {
        let mut m: Array<_, u32> =
            Array::try_from(self.f.ebpf.map_mut(names::MAP_MAGLEV).unwrap()).unwrap();
        for s in 0..MAGLEV_M {
            m.set(SVC_ID * MAGLEV_M + s, ids[s as usize % ids.len()], 0)
                .unwrap();
        }
    }

    fn row_slot(&self, slot: u32) -> u32 {
        let m: Array<_, u32> =
            Array::try_from(self.f.ebpf.map(names::MAP_MAGLEV).unwrap()).unwrap();
        m.get(&(SVC_ID * MAGLEV_M + slot), 0).unwrap()
    }

    /// The backend id Maglev gives the client flow `sport` -> VIP:`dport`, read from the row
    /// in the map at the slot netctl_common computes.
    fn predict(&self, sport: u16, dport: u16, proto: u8) -> u32 {
        self.row_slot(maglev_slot(flow_hash(CLIENT, sport, VIP, dport, proto)))
    }

    /// A client port, from `from` on, whose flow to VIP:`dport` lands on a backend for which
    /// `pred` holds.
    fn sport_where(&self, from: u16, dport: u16, proto: u8, pred: impl Fn(u32) -> bool) -> u16 {
        (from..from + 1000)
            .find(|&p| pred(self.predict(p, dport, proto)))
            .expect("a client port with the wanted backend")
    }

    fn ct(&self, key: &CtKey) -> Option<CtEntry> {
        let m: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.f.ebpf.map(names::MAP_CONNTRACK).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn ct_len(&self) -> usize {
        let m: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.f.ebpf.map(names::MAP_CONNTRACK).unwrap()).unwrap();
        m.keys().count()
    }

    fn set_ct_timeout(&mut self, slot: u32, ns: u64) {
        let mut m: Array<_, u64> =
            Array::try_from(self.f.ebpf.map_mut(names::MAP_CT_TIMEOUTS).unwrap()).unwrap();
        m.set(slot, ns, 0).unwrap();
    }

    /// Runs `prog` on `pkt`, expects verdict `rc` and that exactly the program's pass slot
    /// and the `events` moved by one packet; verifies every checksum of the output and
    /// returns it.
    fn pass(&self, prog: &str, pkt: &[u8], rc: u32, events: &[u32]) -> Vec<u8> {
        let mut moved = vec![common::pass_slot(prog)];
        moved.extend_from_slice(events);
        let (got, out) = self.f.run_counted(prog, pkt, &moved);
        assert_eq!(got, rc, "{prog}: verdict");
        assert_eq!(out.len(), pkt.len(), "{prog}: length");
        verify_checksums(&out);
        out
    }

    /// Like `pass`, and the output must be exactly `want`.
    fn pass_as(&self, prog: &str, pkt: &[u8], rc: u32, events: &[u32], want: &[u8]) -> Vec<u8> {
        let out = self.pass(prog, pkt, rc, events);
        assert_eq!(
            out, want,
            "{prog}: output bytes (left: got, right: expected)"
        );
        out
    }

    /// Expects a drop for `reason`, counted in its slot only.
    fn drop(&self, prog: &str, pkt: &[u8], reason: DropReason) {
        let (rc, _) = self.f.run_counted(prog, pkt, &[reason.slot()]);
        assert_eq!(rc, TC_ACT_SHOT, "{prog}: expected drop {}", reason.name());
    }
}

/// The client's TCP segment to VIP:80.
fn client_tcp(sport: u16, flags: u8) -> Vec<u8> {
    tcp(VIP_MAC, EP_MAC, CLIENT, sport, VIP, 80, flags)
}

/// That segment after DNAT to `b`.
fn dnat_tcp(b: &Backend, sport: u16, flags: u8) -> Vec<u8> {
    tcp(b.mac, EP_MAC, CLIENT, sport, b.ip, 8080, flags)
}

/// `b`'s TCP segment back to the client, and the same after reverse NAT.
fn backend_tcp(b: &Backend, sport: u16, flags: u8) -> Vec<u8> {
    tcp(EP_MAC, b.mac, b.ip, 8080, CLIENT, sport, flags)
}
fn rnat_tcp(b: &Backend, sport: u16, flags: u8) -> Vec<u8> {
    tcp(EP_MAC, b.mac, VIP, 80, CLIENT, sport, flags)
}

fn client_udp(sport: u16, checksum: bool) -> Vec<u8> {
    udp(
        VIP_MAC,
        EP_MAC,
        CLIENT,
        sport,
        VIP,
        53,
        UDP_ODD_PAYLOAD,
        checksum,
    )
}
fn dnat_udp(b: &Backend, sport: u16, checksum: bool) -> Vec<u8> {
    udp(
        b.mac,
        EP_MAC,
        CLIENT,
        sport,
        b.ip,
        5353,
        UDP_ODD_PAYLOAD,
        checksum,
    )
}
fn backend_udp(b: &Backend, sport: u16, checksum: bool) -> Vec<u8> {
    udp(
        EP_MAC,
        b.mac,
        b.ip,
        5353,
        CLIENT,
        sport,
        UDP_PAYLOAD,
        checksum,
    )
}
fn rnat_udp(b: &Backend, sport: u16, checksum: bool) -> Vec<u8> {
    udp(EP_MAC, b.mac, VIP, 53, CLIENT, sport, UDP_PAYLOAD, checksum)
}

/// Sends a SYN from `sport` and returns the backend it went to, after checking the DNAT.
fn open_tcp(lb: &Lb, sport: u16) -> Backend {
    let b = backend(lb.predict(sport, 80, TCP));
    lb.pass_as(
        "from_endpoint",
        &client_tcp(sport, SYN),
        verdict_to(&b),
        &[SLOT_LB_NEW],
        &dnat_tcp(&b, sport, SYN),
    );
    b
}

/// The verifier itself: known values, and every single-byte corruption after the Ethernet
/// header of a checksummed packet is caught.
#[test]
fn checksum_verifier_catches_every_corrupted_byte() {
    // The IPv4 header of the worked example in Wikipedia's "Internet checksum" article.
    let hdr = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(csum(&hdr), 0xb861);
    let b = backend(1);
    let sent = client_udp(40000, true);
    let packets = [
        client_tcp(40000, SYN | ACK),
        sent.clone(),
        backend_udp(&b, 40000, true),
        icmp_error(EP_MAC, b.mac, b.ip, CLIENT, 3, 3, l3(&sent)),
    ];
    for (p, n) in packets.iter().zip([2, 2, 2, 4]) {
        assert_eq!(verify_checksums(p), n);
        for i in 14..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 0x5a;
            assert!(
                checksums(&bad).is_err(),
                "byte {i} of {p:02x?} changed unseen"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. A new TCP flow: DNAT to the Maglev backend, both conntrack entries.

#[test]
fn new_tcp_flow_is_dnated_to_the_maglev_backend_and_tracked() {
    let lb = Lb::new();
    let b = backend(lb.predict(40000, 80, TCP));
    let out = lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, SYN),
        verdict_to(&b),
        &[SLOT_LB_NEW],
        &dnat_tcp(&b, 40000, SYN),
    );
    // Spelled out: destination backend:8080 and backend MAC, source unchanged.
    assert_eq!(&out[0..6], &b.mac);
    assert_eq!(&out[6..12], &EP_MAC);
    assert_eq!(ip_at(&out, 26), CLIENT);
    assert_eq!(ip_at(&out, 30), b.ip);
    assert_eq!(&out[34..38], &[0x9c, 0x40, 0x1f, 0x90]); // 40000 -> 8080

    let fwd = lb.ct(&fwd_key(40000, 80, TCP)).expect("forward entry");
    assert_ne!(fwd.last_seen_ns, 0);
    assert_eq!(
        (
            fwd.backend_id,
            fwd.nat_ip,
            fwd.nat_port,
            fwd.state,
            fwd.flags,
            fwd.orig
        ),
        (b.id, b.ip, 8080, CT_SYN_SENT, 0, CLIENT)
    );
    let rep = lb
        .ct(&reply_key(b.ip, 8080, CLIENT, 40000, TCP))
        .expect("reply entry");
    assert_eq!(
        (
            rep.backend_id,
            rep.nat_ip,
            rep.nat_port,
            rep.flags,
            rep.orig
        ),
        (b.id, VIP, 80, 0, CLIENT)
    );
    assert_eq!(lb.ct_len(), 2);

    // The other verdict: a flow to a backend with the other kind of ifindex.
    let other = lb.sport_where(40001, 80, TCP, |id| {
        (backend(id).ifindex != 0) != (b.ifindex != 0)
    });
    let b2 = open_tcp(&lb, other);
    assert_ne!(verdict_to(&b2), verdict_to(&b));
    assert_eq!(lb.ct_len(), 4);
}

// ---------------------------------------------------------------------------------------
// 2. Conntrack keeps a flow's backend when the Maglev row changes.

#[test]
fn tracked_flow_keeps_its_backend_when_the_row_changes() {
    let mut lb = Lb::new();
    let b = open_tcp(&lb, 40000);
    let x = backend(if b.id == 1 { 2 } else { 1 });
    lb.fill_row(&[x.id]);
    assert_eq!(lb.predict(40000, 80, TCP), x.id);

    // Same flow: same backend, a conntrack hit, no new flow.
    lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, ACK),
        verdict_to(&b),
        &[SLOT_LB_CT_HIT],
        &dnat_tcp(&b, 40000, ACK),
    );
    let fwd = lb.ct(&fwd_key(40000, 80, TCP)).unwrap();
    assert_eq!((fwd.backend_id, fwd.state), (b.id, CT_ESTABLISHED));

    // A new flow follows the new row.
    lb.pass_as(
        "from_endpoint",
        &client_tcp(40001, SYN),
        verdict_to(&x),
        &[SLOT_LB_NEW],
        &dnat_tcp(&x, 40001, SYN),
    );
    assert_eq!(lb.ct(&fwd_key(40001, 80, TCP)).unwrap().backend_id, x.id);

    // An expired entry is a miss: with a 1 ns timeout for established flows the next
    // segment of the first flow is balanced again, by the new row, and tracked as
    // established (no SYN: a flow whose entry went away).
    lb.set_ct_timeout(CT_TIMEOUT_ESTABLISHED, 1);
    std::thread::sleep(std::time::Duration::from_millis(1));
    lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, ACK),
        verdict_to(&x),
        &[SLOT_LB_NEW],
        &dnat_tcp(&x, 40000, ACK),
    );
    let fwd = lb.ct(&fwd_key(40000, 80, TCP)).unwrap();
    assert_eq!((fwd.backend_id, fwd.state), (x.id, CT_ESTABLISHED));
}

// ---------------------------------------------------------------------------------------
// 3. A removed backend: tracked flows are balanced again; no backend at all: drop.

#[test]
fn removed_backend_rebalances_and_no_backend_drops() {
    let mut lb = Lb::new();
    let b = open_tcp(&lb, 40000);
    // A second tracked flow on a backend that stays.
    let keep_port = lb.sport_where(40001, 80, TCP, |id| id != b.id);
    let kept = open_tcp(&lb, keep_port);

    // What userspace does when a backend goes: out of BACKENDS, out of the row.
    lb.remove_backend(b.id);
    let rest: Vec<u32> = [1, 2, 3].into_iter().filter(|&i| i != b.id).collect();
    lb.fill_row(&rest);
    lb.set_service(80, TCP, Some(svc_info(8080, 2, 1)));
    let n = backend(lb.predict(40000, 80, TCP));
    assert_ne!(n.id, b.id);
    let out = lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, ACK),
        verdict_to(&n),
        &[SLOT_LB_NEW],
        &dnat_tcp(&n, 40000, ACK),
    );
    assert_ne!(ip_at(&out, 30), b.ip, "never to the removed backend");
    let fwd = lb.ct(&fwd_key(40000, 80, TCP)).unwrap();
    assert_eq!((fwd.backend_id, fwd.nat_ip), (n.id, n.ip));
    assert!(lb.ct(&reply_key(n.ip, 8080, CLIENT, 40000, TCP)).is_some());
    // The flow on a backend that stays is untouched.
    lb.pass_as(
        "from_endpoint",
        &client_tcp(keep_port, ACK),
        verdict_to(&kept),
        &[SLOT_LB_CT_HIT],
        &dnat_tcp(&kept, keep_port, ACK),
    );

    // A slot naming a backend that is not in BACKENDS (a row not yet rewritten): no backend.
    lb.fill_row(&[b.id]);
    lb.drop(
        "from_endpoint",
        &client_tcp(41000, SYN),
        DropReason::NoBackend,
    );
    lb.fill_row(&rest);

    // No backends: new flows are dropped (and not tracked); tracked flows keep going.
    lb.set_service(80, TCP, Some(svc_info(8080, 0, 1)));
    let before = lb.ct_len();
    lb.drop(
        "from_endpoint",
        &client_tcp(41001, SYN),
        DropReason::NoBackend,
    );
    assert_eq!(lb.ct_len(), before);
    assert!(lb.ct(&fwd_key(41001, 80, TCP)).is_none());
    lb.pass_as(
        "from_endpoint",
        &client_tcp(keep_port, ACK),
        verdict_to(&kept),
        &[SLOT_LB_CT_HIT],
        &dnat_tcp(&kept, keep_port, ACK),
    );
}

// ---------------------------------------------------------------------------------------
// 4. Reverse NAT of replies and the TCP state.

#[test]
fn replies_are_reverse_nated_and_tcp_state_follows() {
    let lb = Lb::new();
    let b = open_tcp(&lb, 40000);
    let state = || lb.ct(&fwd_key(40000, 80, TCP)).unwrap().state;
    assert_eq!(state(), CT_SYN_SENT);

    let out = lb.pass_as(
        "to_endpoint",
        &backend_tcp(&b, 40000, SYN | ACK),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
        &rnat_tcp(&b, 40000, SYN | ACK),
    );
    assert_eq!(ip_at(&out, 26), VIP);
    assert_eq!(&out[34..36], &80u16.to_be_bytes());
    assert_eq!(ip_at(&out, 30), CLIENT);
    // The handshake is not complete until the client's ACK.
    assert_eq!(state(), CT_SYN_SENT, "after SYN-ACK");

    lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, ACK),
        verdict_to(&b),
        &[SLOT_LB_CT_HIT],
        &dnat_tcp(&b, 40000, ACK),
    );
    assert_eq!(state(), CT_ESTABLISHED, "after ACK");
    lb.pass_as(
        "to_endpoint",
        &backend_tcp(&b, 40000, ACK),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
        &rnat_tcp(&b, 40000, ACK),
    );
    assert_eq!(state(), CT_ESTABLISHED);

    // The client's FIN closes.
    lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, FIN | ACK),
        verdict_to(&b),
        &[SLOT_LB_CT_HIT],
        &dnat_tcp(&b, 40000, FIN | ACK),
    );
    assert_eq!(state(), CT_CLOSING, "after FIN");
    // The last ACK keeps it closing.
    lb.pass_as(
        "to_endpoint",
        &backend_tcp(&b, 40000, FIN | ACK),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
        &rnat_tcp(&b, 40000, FIN | ACK),
    );
    assert_eq!(state(), CT_CLOSING);

    // A backend's RST closes another flow.
    let b2 = open_tcp(&lb, 40001);
    lb.pass(
        "from_endpoint",
        &client_tcp(40001, ACK),
        verdict_to(&b2),
        &[SLOT_LB_CT_HIT],
    );
    assert_eq!(
        lb.ct(&fwd_key(40001, 80, TCP)).unwrap().state,
        CT_ESTABLISHED
    );
    lb.pass_as(
        "to_endpoint",
        &backend_tcp(&b2, 40001, RST),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
        &rnat_tcp(&b2, 40001, RST),
    );
    assert_eq!(lb.ct(&fwd_key(40001, 80, TCP)).unwrap().state, CT_CLOSING);

    // Not a tracked reply (another client port): passes untouched, no event.
    let stray = backend_tcp(&b, 49999, ACK);
    lb.pass_as("to_endpoint", &stray, TC_ACT_OK, &[], &stray);
}

// ---------------------------------------------------------------------------------------
// 5. UDP, with and without a checksum.

#[test]
fn udp_is_dnated_and_reverse_nated_and_a_zero_checksum_stays_zero() {
    let lb = Lb::new();
    for (sport, checksum) in [(40001, true), (40002, false)] {
        let b = backend(lb.predict(sport, 53, UDP));
        let out = lb.pass_as(
            "from_endpoint",
            &client_udp(sport, checksum),
            verdict_to(&b),
            &[SLOT_LB_NEW],
            &dnat_udp(&b, sport, checksum),
        );
        assert_eq!(&out[36..38], &5353u16.to_be_bytes());
        if !checksum {
            // RFC 768: 0 is "no checksum"; an update must not turn it into a wrong one
            // (gVisor PR #13526 fixed exactly that in its NAT).
            assert_eq!(&out[40..42], &[0, 0], "UDP checksum 0 after DNAT");
        }
        let fwd = lb.ct(&fwd_key(sport, 53, UDP)).unwrap();
        assert_eq!(
            (fwd.backend_id, fwd.nat_ip, fwd.nat_port, fwd.state),
            (b.id, b.ip, 5353, CT_UDP)
        );
        let rep = lb.ct(&reply_key(b.ip, 5353, CLIENT, sport, UDP)).unwrap();
        assert_eq!((rep.nat_ip, rep.nat_port), (VIP, 53));

        let out = lb.pass_as(
            "to_endpoint",
            &backend_udp(&b, sport, checksum),
            TC_ACT_OK,
            &[SLOT_REV_NAT],
            &rnat_udp(&b, sport, checksum),
        );
        if !checksum {
            assert_eq!(&out[40..42], &[0, 0], "UDP checksum 0 after reverse NAT");
        }
        // A second datagram of the flow is a conntrack hit.
        lb.pass_as(
            "from_endpoint",
            &client_udp(sport, checksum),
            verdict_to(&b),
            &[SLOT_LB_CT_HIT],
            &dnat_udp(&b, sport, checksum),
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. ICMP errors about service flows.

/// The IPv4 packet (no Ethernet) of a frame.
fn l3(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

#[test]
fn icmp_errors_quoting_a_dnated_packet_are_reverse_nated() {
    let lb = Lb::new();
    // The checksums of quotes are verified by verify_checksums when the quote holds the
    // whole quoted datagram (inner IP header, inner UDP/TCP over quote + pseudo-header).
    // For the partial quote (IP header + 8 bytes) the inner UDP checksum is compared with
    // the checksum computed from scratch over the whole original datagram, which this test
    // knows (the client's packet to VIP:53).

    // A: the backend itself says port unreachable, quoting all of the DNATed datagram. The
    // output quotes exactly what the client sent, and comes from the VIP.
    let sport = 40003;
    let sent = client_udp(sport, true);
    let b = backend(lb.predict(sport, 53, UDP));
    let dnat = lb.pass("from_endpoint", &sent, verdict_to(&b), &[SLOT_LB_NEW]);
    let err = icmp_error(EP_MAC, b.mac, b.ip, CLIENT, 3, 3, l3(&dnat));
    assert_eq!(verify_checksums(&err), 4);
    let want = icmp_error(EP_MAC, b.mac, VIP, CLIENT, 3, 3, l3(&sent));
    let out = lb.pass_as("to_endpoint", &err, TC_ACT_OK, &[SLOT_ICMP_REV_NAT], &want);
    assert_eq!(
        verify_checksums(&out),
        4,
        "outer IP, ICMP, inner IP, inner UDP"
    );
    let inner = &out[14 + 20 + 8..];
    assert_eq!(ip_at(inner, 16), VIP);
    assert_eq!(&inner[22..24], &53u16.to_be_bytes());
    assert_eq!(ip_at(&out, 26), VIP, "outer source: the VIP");

    // B: the same with the minimal quote (RFC 792: IP header + 64 bits).
    let err = icmp_error(EP_MAC, b.mac, b.ip, CLIENT, 3, 3, &l3(&dnat)[..28]);
    let want = icmp_error(EP_MAC, b.mac, VIP, CLIENT, 3, 3, &l3(&sent)[..28]);
    let out = lb.pass_as("to_endpoint", &err, TC_ACT_OK, &[SLOT_ICMP_REV_NAT], &want);
    let inner_udp = &out[14 + 20 + 8 + 20..];
    let from_scratch = l4_csum(
        CLIENT,
        VIP,
        UDP,
        &udp_seg(CLIENT, sport, VIP, 53, UDP_ODD_PAYLOAD, false),
    );
    assert_eq!(&inner_udp[6..8], &from_scratch.to_be_bytes());

    // C: a router on the path (time exceeded): the outer source stays, the quote changes.
    let err = icmp_error(EP_MAC, ROUTER_MAC, ROUTER, CLIENT, 11, 0, l3(&dnat));
    let want = icmp_error(EP_MAC, ROUTER_MAC, ROUTER, CLIENT, 11, 0, l3(&sent));
    let out = lb.pass_as("to_endpoint", &err, TC_ACT_OK, &[SLOT_ICMP_REV_NAT], &want);
    assert_eq!(ip_at(&out, 26), ROUTER);

    // D: a quote with UDP checksum 0 keeps 0.
    let sport0 = 40004;
    let sent0 = client_udp(sport0, false);
    let b0 = backend(lb.predict(sport0, 53, UDP));
    let dnat0 = lb.pass("from_endpoint", &sent0, verdict_to(&b0), &[SLOT_LB_NEW]);
    let err = icmp_error(EP_MAC, b0.mac, b0.ip, CLIENT, 3, 3, l3(&dnat0));
    let want = icmp_error(EP_MAC, b0.mac, VIP, CLIENT, 3, 3, l3(&sent0));
    let out = lb.pass_as("to_endpoint", &err, TC_ACT_OK, &[SLOT_ICMP_REV_NAT], &want);
    assert_eq!(&out[14 + 20 + 8 + 20 + 6..][..2], &[0, 0]);

    // E: TCP (fragmentation needed from the backend, quoting the whole SYN).
    let tb = open_tcp(&lb, 40005);
    let syn = client_tcp(40005, SYN);
    let err = icmp_error(
        EP_MAC,
        tb.mac,
        tb.ip,
        CLIENT,
        3,
        4,
        l3(&dnat_tcp(&tb, 40005, SYN)),
    );
    let want = icmp_error(EP_MAC, tb.mac, VIP, CLIENT, 3, 4, l3(&syn));
    let out = lb.pass_as("to_endpoint", &err, TC_ACT_OK, &[SLOT_ICMP_REV_NAT], &want);
    assert_eq!(
        verify_checksums(&out),
        4,
        "outer IP, ICMP, inner IP, inner TCP"
    );

    // Not about a tracked flow, or not an error: untouched, no event.
    let stray = icmp_error(EP_MAC, ROUTER_MAC, ROUTER, CLIENT, 3, 1, l3(&sent));
    lb.pass_as("to_endpoint", &stray, TC_ACT_OK, &[], &stray);
    let mut echo = vec![0u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(b"ping");
    let c = csum(&echo);
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    let echo = frame(EP_MAC, b.mac, b.ip, CLIENT, ICMP, &echo);
    lb.pass_as("to_endpoint", &echo, TC_ACT_OK, &[], &echo);
}

// ---------------------------------------------------------------------------------------
// 7. ARP for VIPs.

#[test]
fn arp_for_a_vip_is_answered_with_the_vip_mac() {
    let lb = Lb::new();
    let ask = arp(1, [0xff; 6], EP_MAC, CLIENT, [0; 6], VIP);
    let want = arp(2, EP_MAC, VIP_MAC, VIP, EP_MAC, CLIENT);
    // `arp` builds the Ethernet source from the sender address: VIP_MAC here.
    assert_eq!(&want[6..12], &VIP_MAC);
    lb.pass_as(
        "from_endpoint",
        &ask,
        TC_ACT_REDIRECT,
        &[SLOT_ARP_VIP],
        &want,
    );

    // Not a VIP; a VIP of another network; a reply (not a request) about the VIP: all
    // pass unchanged.
    for a in [
        arp(1, [0xff; 6], EP_MAC, CLIENT, [0; 6], [10, 1, 0, 11]),
        arp(1, [0xff; 6], EP_MAC, CLIENT, [0; 6], OTHER_VIP),
        arp(2, [0xff; 6], EP_MAC, CLIENT, [0; 6], VIP),
    ] {
        lb.pass_as("from_endpoint", &a, TC_ACT_OK, &[], &a);
    }
}

// ---------------------------------------------------------------------------------------
// 8. Hairpin: the client is its own backend.

#[test]
fn hairpin_flow_comes_from_the_vip_and_its_reply_goes_back() {
    let mut lb = Lb::new();
    let h = hairpin_backend();
    lb.add_backend(h);
    lb.fill_row(&[h.id]);

    let syn = client_tcp(40000, SYN);
    let want = tcp(EP_MAC, EP_MAC, VIP, 40000, CLIENT, 8080, SYN);
    let out = lb.pass_as(
        "from_endpoint",
        &syn,
        TC_ACT_REDIRECT,
        &[SLOT_LB_NEW, SLOT_HAIRPIN],
        &want,
    );
    let fwd = lb.ct(&fwd_key(40000, 80, TCP)).unwrap();
    assert_eq!(
        (fwd.backend_id, fwd.nat_ip, fwd.nat_port, fwd.flags),
        (h.id, CLIENT, 8080, CT_F_HAIRPIN)
    );
    let rep = lb.ct(&reply_key(CLIENT, 8080, VIP, 40000, TCP)).unwrap();
    assert_eq!(
        (rep.nat_ip, rep.nat_port, rep.orig, rep.flags),
        (VIP, 80, CLIENT, CT_F_HAIRPIN)
    );
    // Redirected to the client's veth, it meets to_endpoint there, which lets it in as is.
    lb.pass_as("to_endpoint", &out, TC_ACT_OK, &[], &out);

    // The reply, sent to VIP:40000, becomes VIP:80 -> client:40000.
    let reply = tcp(VIP_MAC, EP_MAC, CLIENT, 8080, VIP, 40000, SYN | ACK);
    let want = tcp(EP_MAC, EP_MAC, VIP, 80, CLIENT, 40000, SYN | ACK);
    let out = lb.pass_as(
        "from_endpoint",
        &reply,
        TC_ACT_REDIRECT,
        &[SLOT_HAIRPIN],
        &want,
    );
    lb.pass_as("to_endpoint", &out, TC_ACT_OK, &[], &out);

    // The client's ACK: a conntrack hit, hairpinned again; the flow is established.
    lb.pass_as(
        "from_endpoint",
        &client_tcp(40000, ACK),
        TC_ACT_REDIRECT,
        &[SLOT_LB_CT_HIT, SLOT_HAIRPIN],
        &tcp(EP_MAC, EP_MAC, VIP, 40000, CLIENT, 8080, ACK),
    );
    assert_eq!(
        lb.ct(&fwd_key(40000, 80, TCP)).unwrap().state,
        CT_ESTABLISHED
    );
}

// ---------------------------------------------------------------------------------------
// 9. Drops at the VIP.

#[test]
fn vip_drops_unknown_ports_fragments_and_other_networks() {
    let mut lb = Lb::new();
    lb.drop(
        "from_endpoint",
        &tcp(VIP_MAC, EP_MAC, CLIENT, 40000, VIP, 81, SYN),
        DropReason::NoService,
    );
    // Port 80 is TCP only.
    lb.drop(
        "from_endpoint",
        &udp(VIP_MAC, EP_MAC, CLIENT, 40000, VIP, 80, UDP_PAYLOAD, true),
        DropReason::NoService,
    );
    // First fragment (MF, with the ports) and a later one (offset 185 * 8, no ports).
    let seg = udp_seg(CLIENT, 40000, VIP, 53, UDP_PAYLOAD, true);
    let first = frame_frag(VIP_MAC, EP_MAC, CLIENT, VIP, UDP, &seg, MF);
    lb.drop("from_endpoint", &first, DropReason::Fragment);
    let later = frame_frag(VIP_MAC, EP_MAC, CLIENT, VIP, UDP, b"rest of it", 185);
    lb.drop("from_endpoint", &later, DropReason::Fragment);
    assert_eq!(lb.ct_len(), 0);

    // The service belongs to another network than the client's.
    lb.set_service(80, TCP, Some(svc_info(8080, 3, 2)));
    lb.drop(
        "from_endpoint",
        &client_tcp(40000, SYN),
        DropReason::Isolation,
    );
    assert_eq!(lb.ct_len(), 0);
}

// ---------------------------------------------------------------------------------------
// Timeouts: a flow lives as long as its forward entry, whichever side keeps it busy.

#[test]
fn reply_translation_lives_as_long_as_the_flow() {
    let mut lb = Lb::new();
    // Margins, not durations, are what this test relies on: packets of a live flow come
    // every quarter of the timeout (a stall of 3/4 of it is tolerated), expiry is awaited
    // for twice the timeout.
    let short = std::time::Duration::from_millis(1200);
    lb.set_ct_timeout(CT_TIMEOUT_SYN, short.as_nanos() as u64);
    lb.set_ct_timeout(CT_TIMEOUT_UDP, short.as_nanos() as u64);

    // TCP: the handshake, then a backend quiet for longer than the SYN timeout (an idle
    // keep-alive connection) while the flow is established (6 h).
    let b = open_tcp(&lb, 40000);
    lb.pass(
        "to_endpoint",
        &backend_tcp(&b, 40000, SYN | ACK),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
    );
    lb.pass(
        "from_endpoint",
        &client_tcp(40000, ACK),
        verdict_to(&b),
        &[SLOT_LB_CT_HIT],
    );
    std::thread::sleep(short * 2);
    lb.pass_as(
        "to_endpoint",
        &backend_tcp(&b, 40000, ACK),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
        &rnat_tcp(&b, 40000, ACK),
    );

    // UDP: the client keeps sending, the backend answers only after more than the UDP
    // timeout since the flow began.
    let sport = 40001;
    let u = backend(lb.predict(sport, 53, UDP));
    lb.pass(
        "from_endpoint",
        &client_udp(sport, true),
        verdict_to(&u),
        &[SLOT_LB_NEW],
    );
    for _ in 0..5 {
        std::thread::sleep(short / 4);
        lb.pass(
            "from_endpoint",
            &client_udp(sport, true),
            verdict_to(&u),
            &[SLOT_LB_CT_HIT],
        );
    }
    lb.pass_as(
        "to_endpoint",
        &backend_udp(&u, sport, true),
        TC_ACT_OK,
        &[SLOT_REV_NAT],
        &rnat_udp(&u, sport, true),
    );

    // And once the flow itself expired, replies are no longer translated.
    std::thread::sleep(short * 2);
    let late = backend_udp(&u, sport, true);
    lb.pass_as("to_endpoint", &late, TC_ACT_OK, &[], &late);
}

// ---------------------------------------------------------------------------------------
// A UDP checksum that computes to 0 is sent as 0xffff (RFC 768), not as 0 ("none").

/// A 12-byte payload whose last word makes the UDP checksum of `src:sport -> dst:dport`
/// compute to 0 (transmitted as 0xffff).
fn payload_for_zero_csum(src: Ip, sport: u16, dst: Ip, dport: u16) -> Vec<u8> {
    let mut payload = b"zero-csum\0\0\0".to_vec();
    payload[10..12].copy_from_slice(&[0, 0]);
    let seg = udp_seg(src, sport, dst, dport, &payload, false);
    let base = fold(pseudo_sum(src, dst, UDP, seg.len()) + sum16(&seg));
    payload[10..12].copy_from_slice(&(0xffff - base).to_be_bytes());
    let seg = udp_seg(src, sport, dst, dport, &payload, true);
    assert_eq!(&seg[6..8], &[0xff, 0xff]);
    payload
}

#[test]
fn udp_checksum_computing_to_zero_is_sent_as_ffff() {
    let lb = Lb::new();
    let sport = 40001;
    let b = backend(lb.predict(sport, 53, UDP));
    // After DNAT.
    let p = payload_for_zero_csum(CLIENT, sport, b.ip, 5353);
    let sent = udp(VIP_MAC, EP_MAC, CLIENT, sport, VIP, 53, &p, true);
    assert_ne!(&sent[40..42], &[0xff, 0xff]);
    let want = udp(b.mac, EP_MAC, CLIENT, sport, b.ip, 5353, &p, true);
    let out = lb.pass_as(
        "from_endpoint",
        &sent,
        verdict_to(&b),
        &[SLOT_LB_NEW],
        &want,
    );
    assert_eq!(&out[40..42], &[0xff, 0xff]);
    // After reverse NAT.
    let p = payload_for_zero_csum(VIP, 53, CLIENT, sport);
    let reply = udp(EP_MAC, b.mac, b.ip, 5353, CLIENT, sport, &p, true);
    let want = udp(EP_MAC, b.mac, VIP, 53, CLIENT, sport, &p, true);
    let out = lb.pass_as("to_endpoint", &reply, TC_ACT_OK, &[SLOT_REV_NAT], &want);
    assert_eq!(&out[40..42], &[0xff, 0xff]);
}
