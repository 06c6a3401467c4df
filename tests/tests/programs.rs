//! Packet-in, packet-out tests of each eBPF program through `BPF_PROG_TEST_RUN`
//! (aya's `Program::test_run`), with fixture packets and the exact expected verdict, output
//! bytes and drop counter. Each test loads its own, unpinned copy of the object, so tests
//! share no kernel state. Needs root (CAP_BPF, CAP_NET_ADMIN).
//!
//! `BPF_PROG_TEST_RUN` for TC programs runs with `skb->dev` set to the loopback device when
//! no context is passed (net/bpf/test_run.c), so the endpoint under test is ifindex 1.

use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netctl_common::{
    Counter, DropReason, IfaceInfo, NET_F_INTERNAL, SLOT_PASS_FROM_ENDPOINT, SLOT_PASS_TO_ENDPOINT,
    SLOT_PASS_UPLINK, SubnetInfo, names,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const LO: u32 = 1;

const EP_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 2];
const EP_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const PEER_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 3];
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const OTHER_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn object() -> Vec<u8> {
    let path = std::env::var("NETCTL_EBPF_OBJECT").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../netctl-ebpf/target/bpfel-unknown-none/release/netctl"
        )
        .to_owned()
    });
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read eBPF object {path}: {e}; run `cargo xtask build-ebpf`"))
}

/// One loaded copy of the object with the endpoint 10.1.0.2 (net 1, 10.1.0.0/16) behind
/// ifindex 1, and a second network 10.2.0.0/16 (net 2).
struct Fixture {
    ebpf: Ebpf,
}

impl Fixture {
    fn new(flags: u32) -> Self {
        let mut ebpf = Ebpf::load(&object()).expect("load object");
        for name in names::PROGRAMS {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
        }
        let mut f = Fixture { ebpf };
        f.set_iface(Some(IfaceInfo {
            ip: EP_IP.octets(),
            net_id: 1,
            flags,
            mac: EP_MAC,
            _pad: [0; 2],
        }));
        let mut subnets: LpmTrie<_, [u8; 4], SubnetInfo> =
            LpmTrie::try_from(f.ebpf.map_mut(names::MAP_SUBNETS).unwrap()).unwrap();
        for (net, id, fl) in [([10, 1, 0, 0], 1, flags), ([10, 2, 0, 0], 2, 0)] {
            let key = Key::new(16, net);
            subnets
                .insert(
                    &key,
                    SubnetInfo {
                        net_id: id,
                        flags: fl,
                    },
                    0,
                )
                .unwrap();
        }
        f
    }

    fn set_iface(&mut self, info: Option<IfaceInfo>) {
        let mut ifaces: HashMap<_, u32, IfaceInfo> =
            HashMap::try_from(self.ebpf.map_mut(names::MAP_IFACES).unwrap()).unwrap();
        match info {
            Some(i) => ifaces.insert(LO, i, 0).unwrap(),
            None => ifaces.remove(&LO).unwrap(),
        }
    }

    /// Runs `prog` on `pkt`; returns the verdict and the packet as the program left it.
    fn run(&self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test_run {prog}: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counter(&self, slot: u32) -> Counter {
        let c: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf.map(names::MAP_COUNTERS).unwrap()).unwrap();
        c.get(&slot, 0)
            .unwrap()
            .iter()
            .fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            })
    }

    /// Runs and asserts the verdict; a pass must leave the bytes untouched. Checks that
    /// exactly the expected counter slot moved by one packet.
    fn expect(&self, prog: &str, pkt: &[u8], verdict: Result<(), DropReason>) {
        let pass_slot = match prog {
            "from_endpoint" => SLOT_PASS_FROM_ENDPOINT,
            "to_endpoint" => SLOT_PASS_TO_ENDPOINT,
            _ => SLOT_PASS_UPLINK,
        };
        let slot = match verdict {
            Ok(()) => pass_slot,
            Err(r) => r.slot(),
        };
        let before = self.counter(slot);
        let (rc, out) = self.run(prog, pkt);
        let after = self.counter(slot);
        match verdict {
            Ok(()) => {
                assert_eq!(rc, TC_ACT_OK, "{prog}: expected pass");
                assert_eq!(out, pkt, "{prog}: a passed packet must leave unchanged");
            }
            Err(r) => assert_eq!(rc, TC_ACT_SHOT, "{prog}: expected drop ({})", r.name()),
        }
        assert_eq!(
            after.packets,
            before.packets + 1,
            "{prog}: counter slot {slot}"
        );
        assert_eq!(after.bytes, before.bytes + pkt.len() as u64);
    }
}

fn eth(dst: [u8; 6], src: [u8; 6], proto: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&proto.to_be_bytes());
    p
}

/// RFC 1071 checksum of an IPv4 header.
fn ip_csum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP packet with a valid header checksum and 8 bytes of payload.
fn udp(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = eth(PEER_MAC, src_mac, 0x0800);
    let payload = b"netctl!!";
    let tot = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = ip_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn arp(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = eth([0xff; 6], sha, 0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&tpa.octets());
    p
}

#[test]
fn from_endpoint_allows_own_traffic_within_network_and_out() {
    let f = Fixture::new(0);
    f.expect("from_endpoint", &udp(EP_MAC, EP_IP, PEER_IP), Ok(()));
    f.expect("from_endpoint", &udp(EP_MAC, EP_IP, OUTSIDE_IP), Ok(()));
    f.expect("from_endpoint", &arp(EP_MAC, EP_IP, PEER_IP), Ok(()));
    // An ARP probe (RFC 5227) carries sender address 0.0.0.0.
    f.expect(
        "from_endpoint",
        &arp(EP_MAC, Ipv4Addr::UNSPECIFIED, EP_IP),
        Ok(()),
    );
}

#[test]
fn from_endpoint_drops_spoofed_sources() {
    let f = Fixture::new(0);
    f.expect(
        "from_endpoint",
        &udp(EP_MAC, PEER_IP, PEER_IP),
        Err(DropReason::SpoofedIp),
    );
    f.expect(
        "from_endpoint",
        &udp(PEER_MAC, EP_IP, PEER_IP),
        Err(DropReason::SpoofedMac),
    );
    // ARP claiming another address, or sent with the right Ethernet source but another
    // sender hardware address.
    f.expect(
        "from_endpoint",
        &arp(EP_MAC, PEER_IP, EP_IP),
        Err(DropReason::SpoofedIp),
    );
    let mut a = arp(EP_MAC, EP_IP, PEER_IP);
    a[22..28].copy_from_slice(&PEER_MAC);
    f.expect("from_endpoint", &a, Err(DropReason::SpoofedMac));
}

#[test]
fn isolation_between_networks_both_ways() {
    let f = Fixture::new(0);
    f.expect(
        "from_endpoint",
        &udp(EP_MAC, EP_IP, OTHER_NET_IP),
        Err(DropReason::Isolation),
    );
    f.expect(
        "to_endpoint",
        &udp(PEER_MAC, OTHER_NET_IP, EP_IP),
        Err(DropReason::Isolation),
    );
    f.expect("to_endpoint", &udp(PEER_MAC, PEER_IP, EP_IP), Ok(()));
    f.expect("to_endpoint", &udp(PEER_MAC, OUTSIDE_IP, EP_IP), Ok(()));
    f.expect("to_endpoint", &arp(PEER_MAC, PEER_IP, EP_IP), Ok(()));
}

#[test]
fn internal_network_keeps_traffic_inside() {
    let f = Fixture::new(NET_F_INTERNAL);
    f.expect("from_endpoint", &udp(EP_MAC, EP_IP, PEER_IP), Ok(()));
    f.expect(
        "from_endpoint",
        &udp(EP_MAC, EP_IP, OUTSIDE_IP),
        Err(DropReason::Internal),
    );
    f.expect(
        "to_endpoint",
        &udp(PEER_MAC, OUTSIDE_IP, EP_IP),
        Err(DropReason::Internal),
    );
    f.expect("to_endpoint", &udp(PEER_MAC, PEER_IP, EP_IP), Ok(()));
}

#[test]
fn non_ip_and_truncated_headers_are_dropped() {
    let f = Fixture::new(0);
    // IPv6 and a VLAN tag: endpoints speak IPv4 and ARP only.
    let mut v6 = eth(PEER_MAC, EP_MAC, 0x86dd);
    v6.extend_from_slice(&[0x60; 40]);
    f.expect("from_endpoint", &v6, Err(DropReason::UnsupportedL3));
    f.expect("to_endpoint", &v6, Err(DropReason::UnsupportedL3));
    let mut vlan = eth(PEER_MAC, EP_MAC, 0x8100);
    vlan.extend_from_slice(&[0; 46]);
    f.expect("from_endpoint", &vlan, Err(DropReason::UnsupportedL3));

    // IPv4 cut inside its header: BPF_PROG_TEST_RUN itself refuses an EtherType IPv4
    // frame shorter than 14 + 20 bytes (EINVAL), so the shortest cut it lets through is one
    // whose IHL claims more header than the packet holds.
    let full = udp(EP_MAC, EP_IP, PEER_IP);
    let mut long_ihl = full[..14 + 24].to_vec();
    long_ihl[14] = 0x4f;
    f.expect("from_endpoint", &long_ihl, Err(DropReason::Malformed));
    f.expect("to_endpoint", &long_ihl, Err(DropReason::Malformed));
    // IHL below the minimum, and a version that is not 4.
    let mut short_ihl = full.clone();
    short_ihl[14] = 0x44;
    f.expect("from_endpoint", &short_ihl, Err(DropReason::Malformed));
    let mut v5 = full.clone();
    v5[14] = 0x55;
    f.expect("from_endpoint", &v5, Err(DropReason::Malformed));
    // ARP cut short, and ARP for another hardware type.
    let a = arp(EP_MAC, EP_IP, PEER_IP);
    f.expect("from_endpoint", &a[..14 + 20], Err(DropReason::Malformed));
    let mut a6 = a.clone();
    a6[14..16].copy_from_slice(&6u16.to_be_bytes());
    f.expect("from_endpoint", &a6, Err(DropReason::Malformed));
}

#[test]
fn unknown_interface_is_dropped_and_counted() {
    let mut f = Fixture::new(0);
    f.set_iface(None);
    f.expect(
        "from_endpoint",
        &udp(EP_MAC, EP_IP, PEER_IP),
        Err(DropReason::UnknownIface),
    );
    f.expect(
        "to_endpoint",
        &udp(PEER_MAC, PEER_IP, EP_IP),
        Err(DropReason::UnknownIface),
    );
}

#[test]
fn uplink_passes_and_counts() {
    let f = Fixture::new(0);
    f.expect("uplink_ingress", &udp(PEER_MAC, OUTSIDE_IP, EP_IP), Ok(()));
}
