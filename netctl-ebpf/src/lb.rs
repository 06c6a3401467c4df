//! Services: VIP:port -> backend by Maglev consistent hashing of the client side of the
//! flow, conntrack so an established flow keeps its backend, DNAT on the way in and
//! reverse NAT on the way back (also inside ICMP errors), ARP answers for VIPs, hairpin.

use aya_ebpf::{
    btf_maps::{Array, HashMap},
    helpers::bpf_redirect,
    macros::btf_map,
    programs::TcContext,
};
use netctl_common::{
    BackendInfo, CT_DIR_FWD, CT_DIR_REPLY, CT_ESTABLISHED, CT_F_HAIRPIN, CT_SYN_SENT, CT_UDP,
    CtEntry, CtKey, DropReason, IfaceInfo, MAGLEV_M, MAX_BACKENDS, MAX_SERVICE_PORTS,
    MAX_SERVICES, MAX_VIPS, SLOT_ARP_VIP, SLOT_HAIRPIN, SLOT_ICMP_REV_NAT, SLOT_LB_CT_HIT,
    SLOT_LB_NEW, SLOT_REV_NAT, SvcInfo, SvcKey, VIP_MAC, VipInfo, flow_hash, maglev_slot,
};

use crate::conntrack::{self, TCP_SYN};
use crate::nat;
use crate::parse::{
    ARPOP_REPLY_BE, ARPOP_REQUEST_BE, ArpEthIpv4, ETH_HLEN, ICMP_HLEN, IPPROTO_TCP, IcmpHdr,
    Ipv4Hdr, L4Ports, ptr_at,
};
use crate::stats::count;

#[btf_map]
pub static SERVICES: HashMap<SvcKey, SvcInfo, { MAX_SERVICE_PORTS as usize }> = HashMap::new();

#[btf_map]
pub static VIPS: HashMap<[u8; 4], VipInfo, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<u32, BackendInfo, { MAX_BACKENDS as usize }> = HashMap::new();

/// Row `svc_id` holds the service's MAGLEV_M slots, each a backend id (0: none).
#[btf_map]
pub static MAGLEV: Array<u32, { (MAX_SERVICES * MAGLEV_M) as usize }> = Array::new();

/// What to do with a packet that passes.
#[derive(Clone, Copy)]
pub enum Action {
    /// Let the kernel carry on (the bridge forwards it).
    Pass,
    /// Send it out of this interface (`bpf_redirect`, egress).
    Redirect(u32),
}

/// The parts of an IPv4 TCP/UDP packet the load balancer needs, copied out of the packet
/// (helpers that write the packet invalidate pointers into it).
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header.
    pub l4: usize,
}

impl Flow {
    #[inline(always)]
    pub fn read(ctx: &TcContext, ip: &Ipv4Hdr) -> Option<Flow> {
        let l4 = ETH_HLEN + ip.hlen();
        let ports = ptr_at::<L4Ports>(ctx, l4)?;
        // SAFETY: ptr_at checked the bounds.
        let ports = unsafe { &*ports };
        let tcp_flags = if ip.proto == IPPROTO_TCP {
            let f = ptr_at::<[u8; 14]>(ctx, l4)?;
            // SAFETY: ptr_at checked the bounds; byte 13 of TCP holds the flags.
            unsafe { (*f)[13] }
        } else {
            0
        };
        Some(Flow {
            src: ip.src,
            dst: ip.dst,
            sport: u16::from_be(ports.sport_be),
            dport: u16::from_be(ports.dport_be),
            proto: ip.proto,
            tcp_flags,
            l4,
        })
    }

    fn key(&self, dir: u8) -> CtKey {
        CtKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: [0; 2],
        }
    }
}

#[inline(always)]
pub fn is_vip(addr: [u8; 4]) -> bool {
    // SAFETY: only presence is read.
    unsafe { VIPS.get(addr) }.is_some()
}

/// Answers an ARP request for a VIP of the endpoint's network, in place, back out of the
/// interface it came in on. Returns None when the ARP is not for a VIP.
#[inline(always)]
pub fn arp_reply_for_vip(
    ctx: &TcContext,
    ep: &IfaceInfo,
    ifindex: u32,
    arp: &ArpEthIpv4,
) -> Option<Result<Action, DropReason>> {
    if arp.op_be != ARPOP_REQUEST_BE {
        return None;
    }
    // SAFETY: the value is copied out.
    let vip = unsafe { VIPS.get(arp.tpa) }.copied()?;
    if vip.net_id != ep.net_id {
        return None;
    }
    let (sha, spa, tpa) = (arp.sha, arp.spa, arp.tpa);
    let r = (|| -> Result<(), i64> {
        ctx.store(0, &sha, 0)?; // Ethernet destination: the asker
        ctx.store(6, &VIP_MAC, 0)?; // Ethernet source
        ctx.store(ETH_HLEN + 6, &ARPOP_REPLY_BE, 0)?;
        ctx.store(ETH_HLEN + 8, &VIP_MAC, 0)?; // sender: the VIP
        ctx.store(ETH_HLEN + 14, &tpa, 0)?;
        ctx.store(ETH_HLEN + 18, &sha, 0)?; // target: the asker
        ctx.store(ETH_HLEN + 24, &spa, 0)?;
        Ok(())
    })();
    if r.is_err() {
        return Some(Err(DropReason::NatFailed));
    }
    count(ctx, SLOT_ARP_VIP);
    Some(Ok(Action::Redirect(ifindex)))
}

/// A packet leaving an endpoint: the reply of a hairpin flow, or a new or tracked flow to a
/// service. None when the packet is no business of the load balancer.
#[inline(always)]
pub fn from_endpoint(
    ctx: &TcContext,
    ep: &IfaceInfo,
    ifindex: u32,
    f: &Flow,
) -> Option<Result<Action, DropReason>> {
    let now = conntrack::now();
    // A hairpin reply: the backend answering itself through the VIP.
    if let Some(rep) = lookup_reply(&f.key(CT_DIR_REPLY), now) {
        // SAFETY: pointer from the map lookup.
        let rep = unsafe { &mut *rep };
        if rep.flags & CT_F_HAIRPIN != 0 {
            rep.last_seen_ns = now;
            return Some(hairpin_reply(ctx, ep, ifindex, f, rep, now));
        }
    }
    let key = SvcKey {
        vip: f.dst,
        port: f.dport,
        proto: f.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out.
    let svc = unsafe { SERVICES.get(key) }.copied()?;
    Some(to_service(ctx, ep, f, &svc, now))
}

#[inline(always)]
fn update_state(e: &mut CtEntry, proto: u8, tcp_flags: u8, now: u64) {
    e.last_seen_ns = now;
    if proto == IPPROTO_TCP {
        e.state = conntrack::next_tcp_state(e.state, tcp_flags);
    }
}

#[inline(always)]
fn to_service(
    ctx: &TcContext,
    ep: &IfaceInfo,
    f: &Flow,
    svc: &SvcInfo,
    now: u64,
) -> Result<Action, DropReason> {
    if svc.net_id != ep.net_id {
        return Err(DropReason::Isolation);
    }
    let fwd_key = f.key(CT_DIR_FWD);
    // A tracked flow keeps its backend while the backend exists.
    let mut tracked: Option<(u32, BackendInfo)> = None;
    if let Some(e) = conntrack::lookup(&fwd_key, now) {
        // SAFETY: pointer from the map lookup.
        let e = unsafe { &mut *e };
        // SAFETY: the value is copied out.
        if let Some(b) = unsafe { BACKENDS.get(e.backend_id) }.copied() {
            update_state(e, f.proto, f.tcp_flags, now);
            tracked = Some((e.backend_id, b));
        }
    }
    let (backend_id, b) = match tracked {
        Some(t) => {
            count(ctx, SLOT_LB_CT_HIT);
            t
        }
        None => {
            let t = pick_backend(f, svc)?;
            track_new(f, svc, t.0, &t.1, now)?;
            count(ctx, SLOT_LB_NEW);
            t
        }
    };
    let _ = backend_id;
    let hairpin = b.ip == f.src;
    if hairpin {
        // The backend is the client: its own address as source would be a martian to it
        // (RFC 1812 5.3.7), so the flow comes from the VIP instead.
        nat::set_addr(ctx, true, f.src, f.dst, f.proto, f.l4)?;
        count(ctx, SLOT_HAIRPIN);
    }
    nat::set_addr(ctx, false, f.dst, b.ip, f.proto, f.l4)?;
    nat::set_port(ctx, false, f.dport, svc.target_port, f.proto, f.l4)?;
    nat::set_dst_mac(ctx, b.mac)?;
    Ok(if b.ifindex != 0 {
        Action::Redirect(b.ifindex)
    } else {
        Action::Pass
    })
}

/// Maglev: the flow's slot in the service's row names the backend.
#[inline(always)]
fn pick_backend(f: &Flow, svc: &SvcInfo) -> Result<(u32, BackendInfo), DropReason> {
    if svc.backend_count == 0 {
        return Err(DropReason::NoBackend);
    }
    let slot = maglev_slot(flow_hash(f.src, f.sport, f.dst, f.dport, f.proto));
    let idx = svc
        .svc_id
        .checked_mul(MAGLEV_M)
        .and_then(|r| r.checked_add(slot))
        .ok_or(DropReason::NoBackend)?;
    let id = *MAGLEV.get(idx).ok_or(DropReason::NoBackend)?;
    // SAFETY: the value is copied out.
    let b = unsafe { BACKENDS.get(id) }
        .copied()
        .ok_or(DropReason::NoBackend)?;
    if b.svc_id != svc.svc_id {
        return Err(DropReason::NoBackend);
    }
    Ok((id, b))
}

/// Records a new flow: the forward entry (client -> VIP) and the reply entry the backend's
/// answers will match.
#[inline(always)]
fn track_new(
    f: &Flow,
    svc: &SvcInfo,
    backend_id: u32,
    b: &BackendInfo,
    now: u64,
) -> Result<(), DropReason> {
    let hairpin = b.ip == f.src;
    let state = if f.proto != IPPROTO_TCP {
        CT_UDP
    } else if f.tcp_flags & TCP_SYN != 0 {
        CT_SYN_SENT
    } else {
        // A segment of a flow whose entry was evicted: Maglev gives it the backend it had
        // if the backend set did not change.
        CT_ESTABLISHED
    };
    let flags = if hairpin { CT_F_HAIRPIN } else { 0 };
    let fwd = CtEntry {
        last_seen_ns: now,
        backend_id,
        nat_ip: b.ip,
        nat_port: svc.target_port,
        state,
        flags,
        orig: f.src,
    };
    let reply_key = CtKey {
        src: b.ip,
        // In hairpin the backend sees the flow coming from the VIP.
        dst: if hairpin { f.dst } else { f.src },
        sport: svc.target_port,
        dport: f.sport,
        proto: f.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let reply = CtEntry {
        last_seen_ns: now,
        backend_id,
        nat_ip: f.dst,
        nat_port: f.dport,
        state,
        flags,
        orig: f.src,
    };
    // Reply entry first: once the forward entry exists, replies must find theirs.
    conntrack::insert(&reply_key, &reply).map_err(|_| DropReason::NatFailed)?;
    conntrack::insert(&f.key(CT_DIR_FWD), &fwd).map_err(|_| DropReason::NatFailed)
}

/// The forward entry of the flow a reply entry belongs to, for its TCP state.
#[inline(always)]
fn fwd_of_reply(rep: &CtEntry, f: &Flow) -> CtKey {
    CtKey {
        src: rep.orig,
        dst: rep.nat_ip,
        sport: f.dport,
        dport: rep.nat_port,
        proto: f.proto,
        dir: CT_DIR_FWD,
        _pad: [0; 2],
    }
}

/// A live reply entry for `key`. The flow's state and timeout are in its forward entry
/// (every packet of the flow, either way, refreshes it); a reply entry keeps the state it
/// was created with, so it is live while its forward entry is, whatever its own state and
/// age say (else an established flow whose backend was quiet for the SYN timeout would lose
/// its reverse NAT).
#[inline(always)]
fn lookup_reply(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let rep = conntrack::get(key)?;
    // SAFETY: pointer from the map lookup.
    let (orig, nat_ip, nat_port) = unsafe { ((*rep).orig, (*rep).nat_ip, (*rep).nat_port) };
    let fwd = CtKey {
        src: orig,
        dst: nat_ip,
        sport: key.dport,
        dport: nat_port,
        proto: key.proto,
        dir: CT_DIR_FWD,
        _pad: [0; 2],
    };
    conntrack::lookup(&fwd, now)?;
    Some(rep)
}

#[inline(always)]
fn hairpin_reply(
    ctx: &TcContext,
    ep: &IfaceInfo,
    ifindex: u32,
    f: &Flow,
    rep: &CtEntry,
    now: u64,
) -> Result<Action, DropReason> {
    if let Some(e) = conntrack::lookup(&fwd_of_reply(rep, f), now) {
        // SAFETY: pointer from the map lookup.
        update_state(unsafe { &mut *e }, f.proto, f.tcp_flags, now);
    }
    // backend:target -> VIP:cport becomes VIP:port -> client:cport.
    nat::set_addr(ctx, true, f.src, rep.nat_ip, f.proto, f.l4)?;
    nat::set_port(ctx, true, f.sport, rep.nat_port, f.proto, f.l4)?;
    nat::set_addr(ctx, false, f.dst, rep.orig, f.proto, f.l4)?;
    nat::set_dst_mac(ctx, ep.mac)?;
    count(ctx, SLOT_HAIRPIN);
    Ok(Action::Redirect(ifindex))
}

/// A packet entering an endpoint: a backend's reply gets the VIP:port back as its source.
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext, f: &Flow) -> Result<(), DropReason> {
    let now = conntrack::now();
    let Some(rep) = lookup_reply(&f.key(CT_DIR_REPLY), now) else {
        return Ok(());
    };
    // SAFETY: pointer from the map lookup.
    let rep = unsafe { &mut *rep };
    if rep.flags & CT_F_HAIRPIN != 0 {
        return Ok(());
    }
    rep.last_seen_ns = now;
    let rep = *rep;
    if let Some(e) = conntrack::lookup(&fwd_of_reply(&rep, f), now) {
        // SAFETY: pointer from the map lookup.
        update_state(unsafe { &mut *e }, f.proto, f.tcp_flags, now);
    }
    nat::set_addr(ctx, true, f.src, rep.nat_ip, f.proto, f.l4)?;
    nat::set_port(ctx, true, f.sport, rep.nat_port, f.proto, f.l4)?;
    count(ctx, SLOT_REV_NAT);
    Ok(())
}

/// An ICMP error entering an endpoint about a flow to a VIP: the packet it quotes went to
/// backend:target, so the quote (and, when the backend itself sent the error, the outer
/// source) becomes VIP:port again, with the inner IP, inner L4 and ICMP checksums fixed.
#[inline(always)]
pub fn icmp_reverse_nat(
    ctx: &TcContext,
    outer_src: [u8; 4],
    outer_hlen: usize,
) -> Result<(), DropReason> {
    let icmp_off = ETH_HLEN + outer_hlen;
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, icmp_off) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: ptr_at checked the bounds.
    let ty = unsafe { (*icmp).ty };
    if !matches!(
        ty,
        crate::parse::ICMP_DEST_UNREACH
            | crate::parse::ICMP_TIME_EXCEEDED
            | crate::parse::ICMP_PARAMETER_PROB
    ) {
        return Ok(());
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
        return Ok(());
    };
    // SAFETY: ptr_at checked the bounds.
    let inner = unsafe { &*inner };
    let ihl = inner.hlen();
    if ihl < 20 || ihl > 60 {
        return Ok(());
    }
    let inner_l4 = inner_off + ihl;
    let Some(ports) = ptr_at::<L4Ports>(ctx, inner_l4) else {
        return Ok(());
    };
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { &*ports };
    // The quoted packet went client -> backend; its reply entry is backend -> client.
    let (isrc, idst, iproto) = (inner.src, inner.dst, inner.proto);
    let (isport, idport) = (u16::from_be(ports.sport_be), u16::from_be(ports.dport_be));
    let inner_csum = u16::from_be(inner.check);
    let key = CtKey {
        src: idst,
        dst: isrc,
        sport: idport,
        dport: isport,
        proto: iproto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(rep) = lookup_reply(&key, conntrack::now()) else {
        return Ok(());
    };
    // SAFETY: the value is copied out.
    let rep = unsafe { *rep };
    if rep.flags & CT_F_HAIRPIN != 0 {
        return Ok(());
    }
    let (vip, vport) = (rep.nat_ip, rep.nat_port);
    let icmp_csum = icmp_off + 2;
    let word = |a: [u8; 4], i: usize| u16::from_be_bytes([a[i], a[i + 1]]);

    // Inner transport checksum, when the quote holds it: the destination address (pseudo
    // header) and port change. A UDP checksum of 0 stays 0.
    let l4_csum_off = nat::l4_csum_off(iproto, inner_l4);
    if let Some(c) = ptr_at::<u16>(ctx, l4_csum_off) {
        // SAFETY: ptr_at checked the bounds.
        let old = u16::from_be(unsafe { *c });
        if !(old == 0 && iproto != IPPROTO_TCP) {
            let mut new = nat::csum_update(old, word(idst, 0), word(vip, 0));
            new = nat::csum_update(new, word(idst, 2), word(vip, 2));
            new = nat::csum_update(new, idport, vport);
            if new == 0 && iproto != IPPROTO_TCP {
                new = 0xffff;
            }
            nat::icmp_set_word(ctx, icmp_csum, l4_csum_off, old, new)?;
        }
    }
    // Inner destination port.
    nat::icmp_set_word(ctx, icmp_csum, inner_l4 + 2, idport, vport)?;
    // Inner destination address, and the inner IP checksum that covers it.
    let mut new_inner_csum = nat::csum_update(inner_csum, word(idst, 0), word(vip, 0));
    new_inner_csum = nat::csum_update(new_inner_csum, word(idst, 2), word(vip, 2));
    nat::icmp_set_word(ctx, icmp_csum, inner_off + 16, word(idst, 0), word(vip, 0))?;
    nat::icmp_set_word(ctx, icmp_csum, inner_off + 18, word(idst, 2), word(vip, 2))?;
    nat::icmp_set_word(ctx, icmp_csum, inner_off + 10, inner_csum, new_inner_csum)?;
    // The backend itself sent the error: it must seem to come from the VIP.
    if outer_src == idst {
        let (o, n) = (u32::from_ne_bytes(idst) as u64, u32::from_ne_bytes(vip) as u64);
        ctx.l3_csum_replace(ETH_HLEN + 10, o, n, 4)
            .map_err(|_| DropReason::NatFailed)?;
        ctx.store(ETH_HLEN + 12, &vip, 0)
            .map_err(|_| DropReason::NatFailed)?;
    }
    count(ctx, SLOT_ICMP_REV_NAT);
    Ok(())
}

/// Sends the packet out of `ifindex` (egress).
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    // SAFETY: a helper taking plain values.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
