//! The kernel/user ABI of netctl.
//!
//! This crate is the only place where the eBPF programs and the agent share types. Every
//! type here is `#[repr(C)]`, has explicit padding, a size assertion and no `bool`, enum or
//! `Option` fields: the kernel hashes and copies these as raw bytes (a padding byte inside a
//! hash key would make two equal keys differ).
//!
//! Byte order: IPv4 addresses are `[u8; 4]` in network byte order, exactly as the bytes sit in
//! a packet (and as bpftool prints them: `[10,77,0,3]`); every integer is in host byte order.
#![no_std]

use core::mem::size_of;

/// Version of the layout of the pinned maps. Pins live under `<pin-dir>/v<LAYOUT_VERSION>/`,
/// so that a new layout never reuses a map pinned with an old one (cilium#28830).
pub const LAYOUT_VERSION: u32 = 1;

/// Capacity of the `IFACES` map (host-side endpoint veths on one node).
pub const MAX_IFACES: u32 = 16_384;
/// Capacity of the `ENDPOINTS` map (all endpoints the node knows, local or remote).
pub const MAX_ENDPOINTS: u32 = 65_536;
/// Capacity of the `SUBNETS` LPM trie (one entry per netctl network).
pub const MAX_SUBNETS: u32 = 4_096;
/// Number of slots in the `COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = 32;

/// `IfaceInfo::flags`: the endpoint's network is `--internal` (no traffic leaves it).
pub const NET_F_INTERNAL: u32 = 1;

/// What the programs know of an endpoint, found by the ifindex of its host-side veth
/// (map `IFACES`, key: `u32` ifindex in host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    /// The endpoint's IPv4 address.
    pub ip: [u8; 4],
    /// The netctl network id (host order, never 0).
    pub net_id: u32,
    /// `NET_F_*` flags of the network.
    pub flags: u32,
    /// The endpoint's MAC address (the sandbox side of the veth).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<IfaceInfo>() == 20);

/// Value of the `SUBNETS` LPM trie, whose key is an IPv4 prefix
/// (`Key<[u8; 4]>`: prefix length in bits, then the address bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetInfo {
    /// The netctl network id (host order, never 0).
    pub net_id: u32,
    /// `NET_F_*` flags of the network.
    pub flags: u32,
}
const _: () = assert!(size_of::<SubnetInfo>() == 8);

/// Key of the `ENDPOINTS` map: an endpoint address within a network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// The netctl network id (host order).
    pub net_id: u32,
    /// The endpoint's IPv4 address.
    pub ip: [u8; 4],
}
const _: () = assert!(size_of::<EndpointKey>() == 8);

/// Value of the `ENDPOINTS` map: where an endpoint lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth on this node (host order); 0 when remote.
    pub ifindex: u32,
    /// Node id of the node that holds the endpoint (host order); 0 is this node.
    pub node_id: u32,
    /// The endpoint's MAC address.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<EndpointInfo>() == 16);

/// Capacity of the `SERVICES` map: (VIP, port, protocol) entries.
pub const MAX_SERVICE_PORTS: u32 = 16_384;
/// Capacity of the `VIPS` map.
pub const MAX_VIPS: u32 = 8_192;
/// Capacity of the `BACKENDS` map.
pub const MAX_BACKENDS: u32 = 65_536;
/// Rows of the consistent-hash table: service ids are 1..MAX_SERVICES (row 0 unused).
pub const MAX_SERVICES: u32 = 4_096;
/// Slots per service in the Maglev table: a prime well above any backend count
/// (Maglev, NSDI'16, section 3.4: M should be much larger than N).
pub const MAGLEV_M: u32 = 1_021;
/// Default capacity of the `CONNTRACK` LRU map (an agent option changes it).
pub const CT_DEFAULT_SIZE: u32 = 262_144;

/// `SvcInfo::flags`, `VipInfo::flags`: none yet.
/// The MAC address netctl answers ARP with for every VIP (`02:42:00:00:00:01`): locally
/// administered, and never an endpoint's (those are `02:42:` + the endpoint's address).
pub const VIP_MAC: [u8; 6] = [0x02, 0x42, 0, 0, 0, 1];

/// Key of the `SERVICES` map: one published port of a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub vip: [u8; 4],
    /// The service port (host order).
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SvcKey>() == 8);

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcInfo {
    /// Row of the service in the `MAGLEV` table (1..MAX_SERVICES).
    pub svc_id: u32,
    /// The backends' port (host order).
    pub target_port: u16,
    /// Backends in the service's table; 0 means none (new flows are dropped).
    pub backend_count: u16,
    /// The service's network.
    pub net_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<SvcInfo>() == 16);

/// Value of the `VIPS` map (key: the VIP): which network answers ARP for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipInfo {
    pub net_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 8);

/// Value of the `BACKENDS` map (key: backend id, host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    pub ip: [u8; 4],
    /// The service the backend belongs to.
    pub svc_id: u32,
    /// Host-side veth of the backend's endpoint (0: not on this node).
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<BackendInfo>() == 20);

/// `CtKey::dir`: a client's packet towards a VIP (before DNAT).
pub const CT_DIR_FWD: u8 = 0;
/// `CtKey::dir`: a backend's reply towards the client (before reverse NAT).
pub const CT_DIR_REPLY: u8 = 1;

/// Key of the `CONNTRACK` LRU map: a flow as the packets carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Host order.
    pub sport: u16,
    /// Host order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 16);

/// `CtEntry::state`.
pub const CT_SYN_SENT: u8 = 0;
pub const CT_ESTABLISHED: u8 = 1;
/// FIN or RST seen.
pub const CT_CLOSING: u8 = 2;
/// UDP (and anything without states).
pub const CT_UDP: u8 = 3;

/// `CtEntry::flags`: the client is its own backend; its source was rewritten to the VIP.
pub const CT_F_HAIRPIN: u8 = 1;

/// Value of the `CONNTRACK` map.
///
/// Forward entries (`dir` = FWD, key = client -> VIP:port) hold the backend: `nat_ip` and
/// `nat_port` are the new destination. Reply entries (key = backend -> client, or backend
/// -> VIP for hairpin) hold what the reply's source becomes: `nat_ip`/`nat_port` = VIP and
/// service port; for hairpin `orig` is the client's address to restore as destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub nat_ip: [u8; 4],
    /// Host order.
    pub nat_port: u16,
    /// `CT_*` state (kept in the forward entry).
    pub state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    pub orig: [u8; 4],
}
const _: () = assert!(size_of::<CtEntry>() == 24);

/// Indexes of the `CT_TIMEOUTS` array (nanoseconds, written by the agent).
pub const CT_TIMEOUT_SYN: u32 = 0;
pub const CT_TIMEOUT_ESTABLISHED: u32 = 1;
pub const CT_TIMEOUT_CLOSING: u32 = 2;
pub const CT_TIMEOUT_UDP: u32 = 3;
pub const CT_TIMEOUT_SLOTS: u32 = 4;

/// One slot of the `COUNTERS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// Counter slots of packets passed, by hook.
pub const SLOT_PASS_FROM_ENDPOINT: u32 = 0;
pub const SLOT_PASS_TO_ENDPOINT: u32 = 1;
pub const SLOT_PASS_UPLINK: u32 = 2;
/// Load-balancing events (packets that took the path, also counted as passed).
pub const SLOT_LB_NEW: u32 = 3;
pub const SLOT_LB_CT_HIT: u32 = 4;
pub const SLOT_REV_NAT: u32 = 5;
pub const SLOT_ARP_VIP: u32 = 6;
pub const SLOT_HAIRPIN: u32 = 7;
pub const SLOT_ICMP_REV_NAT: u32 = 8;
/// Names of the event slots for `netctl stats`.
pub const EVENTS: [(u32, &str); 6] = [
    (SLOT_LB_NEW, "lb_new_flow"),
    (SLOT_LB_CT_HIT, "lb_conntrack_hit"),
    (SLOT_REV_NAT, "reverse_nat"),
    (SLOT_ARP_VIP, "arp_reply_vip"),
    (SLOT_HAIRPIN, "hairpin"),
    (SLOT_ICMP_REV_NAT, "icmp_reverse_nat"),
];
/// Drops are counted in slot `SLOT_DROP_BASE + reason`.
pub const SLOT_DROP_BASE: u32 = 16;

/// Why a program dropped a packet. Stored as `u32` in maps; this enum is for code only.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header was shorter than its protocol requires, or its length fields lie.
    Malformed = 1,
    /// An L3 protocol endpoints may not send or receive (anything but IPv4 and ARP).
    UnsupportedL3 = 2,
    /// The source MAC (Ethernet or ARP sender) is not the endpoint's own.
    SpoofedMac = 3,
    /// The source IPv4 address (IP or ARP sender) is not the endpoint's own.
    SpoofedIp = 4,
    /// The packet crosses from one netctl network to another.
    Isolation = 5,
    /// The packet would leave (or enter) an `--internal` network.
    Internal = 6,
    /// The program runs on an interface it has no endpoint entry for.
    UnknownIface = 7,
    /// A VIP port whose service has no backend.
    NoBackend = 8,
    /// A VIP, but no service on that port and protocol.
    NoService = 9,
    /// A fragment towards a VIP (ports are only in the first fragment).
    Fragment = 10,
    /// A packet rewrite (store or checksum helper) failed.
    NatFailed = 11,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::UnsupportedL3,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::Isolation,
        DropReason::Internal,
        DropReason::UnknownIface,
        DropReason::NoBackend,
        DropReason::NoService,
        DropReason::Fragment,
        DropReason::NatFailed,
    ];

    /// The counter slot of this reason.
    pub const fn slot(self) -> u32 {
        SLOT_DROP_BASE + self as u32
    }

    /// The name users see in `netctl stats`.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedL3 => "unsupported_l3",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::Isolation => "isolation",
            DropReason::Internal => "internal",
            DropReason::UnknownIface => "unknown_iface",
            DropReason::NoBackend => "no_backend",
            DropReason::NoService => "no_service",
            DropReason::Fragment => "fragment",
            DropReason::NatFailed => "nat_failed",
        }
    }
}
const _: () = assert!(SLOT_DROP_BASE + (DropReason::NatFailed as u32) < COUNTER_SLOTS);

/// Names of the maps and programs in the object file; userspace finds them by these names
/// and pins them under the same names.
pub mod names {
    pub const MAP_IFACES: &str = "IFACES";
    pub const MAP_SUBNETS: &str = "SUBNETS";
    pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const MAP_SERVICES: &str = "SERVICES";
    pub const MAP_VIPS: &str = "VIPS";
    pub const MAP_BACKENDS: &str = "BACKENDS";
    pub const MAP_MAGLEV: &str = "MAGLEV";
    pub const MAP_CONNTRACK: &str = "CONNTRACK";
    pub const MAP_CT_TIMEOUTS: &str = "CT_TIMEOUTS";
    pub const PROG_FROM_ENDPOINT: &str = "from_endpoint";
    pub const PROG_TO_ENDPOINT: &str = "to_endpoint";
    pub const PROG_UPLINK_INGRESS: &str = "uplink_ingress";
    pub const MAPS: [&str; 10] = [
        MAP_IFACES,
        MAP_SUBNETS,
        MAP_ENDPOINTS,
        MAP_COUNTERS,
        MAP_SERVICES,
        MAP_VIPS,
        MAP_BACKENDS,
        MAP_MAGLEV,
        MAP_CONNTRACK,
        MAP_CT_TIMEOUTS,
    ];
    pub const PROGRAMS: [&str; 3] = [PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT, PROG_UPLINK_INGRESS];
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]` plain data with explicit padding and no
    // invalid bit patterns.
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::SubnetInfo {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcInfo {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::BackendInfo {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
}

/// Bob Jenkins' lookup3 `jhash_3words` (as in Linux's include/linux/jhash.h and Katran's
/// balancer), the flow hash of the load balancer. Shared so that userspace (tests, other
/// nodes) computes exactly what the programs compute.
#[inline(always)]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    const JHASH_INITVAL: u32 = 0xdead_beef;
    let iv = JHASH_INITVAL.wrapping_add(initval).wrapping_add(3 << 2);
    let mut a = a.wrapping_add(iv);
    let mut b = b.wrapping_add(iv);
    let mut c = c.wrapping_add(iv);
    // __jhash_final(a, b, c)
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The client side of a flow, hashed: any node computes the same slot for the same client
/// flow, whatever it knows about other flows.
#[inline(always)]
pub const fn flow_hash(src: [u8; 4], sport: u16, vip: [u8; 4], port: u16, proto: u8) -> u32 {
    jhash_3words(
        u32::from_be_bytes(src),
        ((sport as u32) << 16) | port as u32,
        u32::from_be_bytes(vip) ^ proto as u32,
        0,
    )
}

/// The Maglev slot of a flow.
#[inline(always)]
pub const fn maglev_slot(hash: u32) -> u32 {
    hash % MAGLEV_M
}
