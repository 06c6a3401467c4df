//! netctl's eBPF programs. One entry per hook; the logic lives in the modules beside this one.
//!
//! - `from_endpoint`: TC ingress of an endpoint's host-side veth (packets leaving a sandbox):
//!   anti-spoofing, ARP for VIPs, load balancing to services (DNAT), isolation.
//! - `to_endpoint`: TC egress of the same veth (packets entering the sandbox): isolation,
//!   reverse NAT of service replies and of ICMP errors about them.
//! - `uplink_ingress`: TC ingress of the node's uplink (counts; VXLAN and the routing mesh
//!   come later).
//!
//! Each entry computes `Result<Action, DropReason>`; [`verdict`] turns it into a TC action
//! and counts it, so no path can drop without saying why.
#![no_std]
#![no_main]

mod conntrack;
mod lb;
mod nat;
mod parse;
mod policy;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb::{Action, Flow};
use netctl_common::{DropReason, SLOT_PASS_FROM_ENDPOINT, SLOT_PASS_TO_ENDPOINT, SLOT_PASS_UPLINK};
use parse::{
    ArpEthIpv4, ETH_HLEN, ETH_P_ARP_BE, ETH_P_IP_BE, EthHdr, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, IPV4_MIN_HLEN, Ipv4Hdr, ptr_at,
};

#[inline(always)]
fn verdict(ctx: &TcContext, pass_slot: u32, r: Result<Action, DropReason>) -> i32 {
    match r {
        Ok(Action::Pass) => {
            stats::count(ctx, pass_slot);
            TC_ACT_OK
        }
        Ok(Action::Redirect(ifindex)) => {
            stats::count(ctx, pass_slot);
            lb::redirect(ifindex)
        }
        Err(reason) => {
            stats::count(ctx, reason.slot());
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed in.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn eth(ctx: &TcContext) -> Result<&EthHdr, DropReason> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(DropReason::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    Ok(unsafe { &*eth })
}

/// The IPv4 header, after checking the version and that the whole header (with options) is
/// present. Options are allowed; only the fixed part is read.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Result<&Ipv4Hdr, DropReason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(DropReason::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    let ihl = ip.hlen();
    if ip.ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || ctx.data() + ETH_HLEN + ihl > ctx.data_end()
    {
        return Err(DropReason::Malformed);
    }
    Ok(ip)
}

#[inline(always)]
fn arp(ctx: &TcContext) -> Result<&ArpEthIpv4, DropReason> {
    let a = ptr_at::<ArpEthIpv4>(ctx, ETH_HLEN).ok_or(DropReason::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let a = unsafe { &*a };
    if a.htype_be != 1u16.to_be() || a.ptype_be != ETH_P_IP_BE || a.hlen != 6 || a.plen != 4 {
        return Err(DropReason::Malformed);
    }
    Ok(a)
}

/// The TCP or UDP flow of an unfragmented packet, if it is one.
#[inline(always)]
fn flow(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<Option<Flow>, DropReason> {
    if (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP) || ip.is_fragment() {
        return Ok(None);
    }
    Flow::read(ctx, ip).map(Some).ok_or(DropReason::Malformed)
}

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    let r = try_from_endpoint(&ctx);
    verdict(&ctx, SLOT_PASS_FROM_ENDPOINT, r)
}

fn try_from_endpoint(ctx: &TcContext) -> Result<Action, DropReason> {
    let ifindex = ifindex(ctx);
    let ep = policy::iface(ifindex)?;
    let eth = eth(ctx)?;
    if eth.src != ep.mac {
        return Err(DropReason::SpoofedMac);
    }
    match eth.proto_be {
        ETH_P_IP_BE => {
            let ip = ipv4(ctx)?;
            if ip.src != ep.ip {
                return Err(DropReason::SpoofedIp);
            }
            // Service traffic and hairpin replies are all addressed to a VIP: one lookup
            // keeps every other packet off the load balancer's path.
            if lb::is_vip(ip.dst) {
                return match flow(ctx, ip)? {
                    Some(f) => lb::from_endpoint(ctx, &ep, ifindex, &f)
                        .unwrap_or(Err(DropReason::NoService)),
                    // Ports are only in the first fragment; anything but TCP and UDP has none.
                    None if ip.is_fragment() => Err(DropReason::Fragment),
                    None => Err(DropReason::NoService),
                };
            }
            policy::check_peer(&ep, ip.dst).map(|()| Action::Pass)
        }
        ETH_P_ARP_BE => {
            let a = arp(ctx)?;
            if a.sha != ep.mac {
                return Err(DropReason::SpoofedMac);
            }
            // 0.0.0.0 is an ARP probe (RFC 5227 section 2.1.1), which is not a claim.
            if a.spa != ep.ip && a.spa != [0; 4] {
                return Err(DropReason::SpoofedIp);
            }
            if let Some(r) = lb::arp_reply_for_vip(ctx, &ep, ifindex, a) {
                return r;
            }
            Ok(Action::Pass)
        }
        _ => Err(DropReason::UnsupportedL3),
    }
}

#[classifier]
pub fn to_endpoint(ctx: TcContext) -> i32 {
    let r = try_to_endpoint(&ctx);
    verdict(&ctx, SLOT_PASS_TO_ENDPOINT, r)
}

fn try_to_endpoint(ctx: &TcContext) -> Result<Action, DropReason> {
    let ep = policy::iface(ifindex(ctx))?;
    let eth = eth(ctx)?;
    match eth.proto_be {
        ETH_P_IP_BE => {
            let ip = ipv4(ctx)?;
            policy::check_peer(&ep, ip.src)?;
            if ip.proto == IPPROTO_ICMP {
                let (src, hlen) = (ip.src, ip.hlen());
                lb::icmp_reverse_nat(ctx, src, hlen)?;
            } else if let Some(f) = flow(ctx, ip)? {
                lb::reverse_nat(ctx, &f)?;
            }
            Ok(Action::Pass)
        }
        ETH_P_ARP_BE => arp(ctx).map(|_| Action::Pass),
        _ => Err(DropReason::UnsupportedL3),
    }
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    verdict(&ctx, SLOT_PASS_UPLINK, Ok(Action::Pass))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
