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
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::UnsupportedL3,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::Isolation,
        DropReason::Internal,
        DropReason::UnknownIface,
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
        }
    }
}
const _: () = assert!(SLOT_DROP_BASE + (DropReason::UnknownIface as u32) < COUNTER_SLOTS);

/// Names of the maps and programs in the object file; userspace finds them by these names
/// and pins them under the same names.
pub mod names {
    pub const MAP_IFACES: &str = "IFACES";
    pub const MAP_SUBNETS: &str = "SUBNETS";
    pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const PROG_FROM_ENDPOINT: &str = "from_endpoint";
    pub const PROG_TO_ENDPOINT: &str = "to_endpoint";
    pub const PROG_UPLINK_INGRESS: &str = "uplink_ingress";
    pub const MAPS: [&str; 4] = [MAP_IFACES, MAP_SUBNETS, MAP_ENDPOINTS, MAP_COUNTERS];
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
}
