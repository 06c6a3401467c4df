//! Who an endpoint is (anti-spoofing) and where its packets may go (isolation).

use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use netctl_common::{
    DropReason, EndpointInfo, EndpointKey, IfaceInfo, MAX_ENDPOINTS, MAX_IFACES, MAX_SUBNETS,
    NET_F_INTERNAL, SubnetInfo,
};

/// Host-side veth ifindex -> the endpoint behind it. Written by userspace only.
#[btf_map]
pub static IFACES: HashMap<u32, IfaceInfo, { MAX_IFACES as usize }> = HashMap::new();

/// IPv4 prefix -> the netctl network that owns it.
#[btf_map]
pub static SUBNETS: LpmTrie<[u8; 4], SubnetInfo, { MAX_SUBNETS as usize }> = LpmTrie::new();

/// (network, address) -> where the endpoint lives. Read by the service and overlay paths.
#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { MAX_ENDPOINTS as usize }> =
    HashMap::new();

#[inline(always)]
pub fn iface(ifindex: u32) -> Result<IfaceInfo, DropReason> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { IFACES.get(ifindex) }
        .copied()
        .ok_or(DropReason::UnknownIface)
}

#[inline(always)]
fn subnet_of(addr: [u8; 4]) -> Option<SubnetInfo> {
    SUBNETS.get(&Key::new(32, addr)).copied()
}

/// A packet between `ep` and the address `peer` (its destination when leaving the
/// endpoint, its source when entering it): allowed within the endpoint's network and, unless
/// the network is internal, to or from addresses no netctl network owns (the host, the
/// outside). Never to or from another netctl network.
#[inline(always)]
pub fn check_peer(ep: &IfaceInfo, peer: [u8; 4]) -> Result<(), DropReason> {
    match subnet_of(peer) {
        Some(s) if s.net_id == ep.net_id => Ok(()),
        Some(_) => Err(DropReason::Isolation),
        None if ep.flags & NET_F_INTERNAL != 0 => Err(DropReason::Internal),
        None => Ok(()),
    }
}
