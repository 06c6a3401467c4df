//! Packet-in, packet-out tests of each eBPF program through `BPF_PROG_TEST_RUN`
//! (aya's `Program::test_run`), with fixture packets and the exact expected verdict, output
//! bytes and drop counter. Each test loads its own, unpinned copy of the object, so tests
//! share no kernel state. Needs root (CAP_BPF, CAP_NET_ADMIN).
//!
//! `BPF_PROG_TEST_RUN` for TC programs runs with `skb->dev` set to the loopback device when
//! no context is passed (net/bpf/test_run.c), so the endpoint under test is ifindex 1.

mod common;

use std::net::Ipv4Addr;

use common::{EP_IP, EP_MAC, Fixture};
use netctl_common::{DropReason, NET_F_INTERNAL};
use netctl_tests::packet::{csum, eth};

const PEER_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 3];
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const OTHER_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// An Ethernet + IPv4 + UDP packet with a valid header checksum and 8 bytes of payload.
fn udp(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = eth(PEER_MAC, src_mac, 0x0800);
    let payload = b"netctl!!";
    let tot = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum(&ip);
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
