//! Desired state to kernel state.
//!
//! [`desired`] computes, from the model and the ifindex of each host-side veth, exactly what
//! the maps and links must hold; [`apply`] makes the data plane match it through the
//! [`Dataplane`] trait (idempotent: a second run finds no drift). Netlink objects (bridges,
//! namespaces, veths) are ensured by the agent before the maps, because the maps are keyed
//! by the ifindex those objects get.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use netctl_common::{
    BackendInfo, EndpointInfo, EndpointKey, IfaceInfo, MAGLEV_M, MAX_SERVICES, NET_F_INTERNAL,
    SubnetInfo, SvcInfo, SvcKey, VipInfo,
};
use serde::{Deserialize, Serialize};

use crate::datapath::{DatapathError, Dataplane, Drift};
use crate::model::{Network, ServiceMode, State, parse_mac};

/// What the maps and links must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub subnets: BTreeMap<Ipv4Net, SubnetInfo>,
    pub ifaces: BTreeMap<u32, IfaceInfo>,
    pub endpoints: BTreeMap<EndpointKey, EndpointInfo>,
    /// Host-side veths that must carry the endpoint programs.
    pub links: BTreeSet<String>,
    pub vips: BTreeMap<[u8; 4], VipInfo>,
    pub services: BTreeMap<SvcKey, SvcInfo>,
    pub backends: BTreeMap<u32, BackendInfo>,
    /// Maglev rows by service id.
    pub maglev: BTreeMap<u32, Vec<u32>>,
}

/// Drift repaired by one reconciliation, by kind of object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub netlink: Drift,
    pub maps: Drift,
    pub links: Drift,
    /// Records repaired in the store: pool addresses a crash left handed out but unused.
    #[serde(default)]
    pub store: Drift,
}

impl Report {
    pub fn total(&self) -> u64 {
        self.netlink.total() + self.maps.total() + self.links.total() + self.store.total()
    }
}

pub fn net_flags(n: &Network) -> u32 {
    if n.internal { NET_F_INTERNAL } else { 0 }
}

/// The maps and links `state` asks for. Endpoints whose veth has no known ifindex (it could
/// not be created) get no `IFACES` entry and no link, so nothing half-made carries traffic.
pub fn desired(state: &State, ifindex: &BTreeMap<String, u32>) -> Desired {
    let mut d = Desired::default();
    for n in state.networks.values() {
        d.subnets.insert(
            n.subnet,
            SubnetInfo {
                net_id: n.id,
                flags: net_flags(n),
            },
        );
    }
    for ep in state.endpoints.values() {
        let Some(net) = state.networks.get(&ep.network) else {
            continue;
        };
        let Some(mac) = parse_mac(&ep.mac) else {
            continue;
        };
        let idx = ifindex.get(&ep.host_ifname).copied();
        d.endpoints.insert(
            EndpointKey {
                net_id: net.id,
                ip: ep.ip.octets(),
            },
            EndpointInfo {
                ifindex: idx.unwrap_or(0),
                node_id: 0,
                mac,
                _pad: [0; 2],
            },
        );
        if let Some(idx) = idx {
            d.ifaces.insert(
                idx,
                IfaceInfo {
                    ip: ep.ip.octets(),
                    net_id: net.id,
                    flags: net_flags(net),
                    mac,
                    _pad: [0; 2],
                },
            );
            d.links.insert(ep.host_ifname.clone());
        }
    }
    for sv in state.services.values() {
        add_service(&mut d, state, sv, ifindex);
    }
    d
}

/// Service ids below this have a Maglev row (`netctl up --max-services`); the agent sets it
/// once at start from the table it has, before any reconciliation.
static MAX_SERVICE_ID: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(MAX_SERVICES);

pub fn set_max_services(n: u32) {
    MAX_SERVICE_ID.store(n, std::sync::atomic::Ordering::Relaxed);
}

fn max_services() -> u32 {
    MAX_SERVICE_ID.load(std::sync::atomic::Ordering::Relaxed)
}

/// Only the entries of the named services (a removed one contributes nothing), for an
/// incremental change with [`apply_delta`].
pub fn desired_services(state: &State, names: &[&str], ifindex: &BTreeMap<String, u32>) -> Desired {
    let mut d = Desired::default();
    for sv in names.iter().filter_map(|n| state.services.get(*n)) {
        add_service(&mut d, state, sv, ifindex);
    }
    d
}

/// The map entries of one service: its VIP, one `SERVICES` entry per port, its backends and
/// its Maglev row.
fn add_service(
    d: &mut Desired,
    state: &State,
    sv: &crate::model::Service,
    ifindex: &BTreeMap<String, u32>,
) {
    let (ServiceMode::Vip, Some(vip), Some(net)) =
        (sv.mode, sv.vip, state.networks.get(&sv.network))
    else {
        return;
    };
    if sv.id == 0 || sv.id >= max_services() {
        tracing::warn!(service = %sv.name, id = sv.id, "service id beyond the table; not programmed");
        return;
    }
    let vip = vip.octets();
    d.vips.insert(
        vip,
        VipInfo {
            net_id: net.id,
            flags: 0,
        },
    );
    for b in &sv.backends {
        let ep = state.endpoints.get(&b.endpoint);
        let ifindex = ep
            .and_then(|e| ifindex.get(&e.host_ifname))
            .copied()
            .unwrap_or(0);
        let mac = ep
            .and_then(|e| parse_mac(&e.mac))
            .unwrap_or(crate::model::mac_for(b.ip));
        d.backends.insert(
            b.id,
            BackendInfo {
                ip: b.ip.octets(),
                svc_id: sv.id,
                ifindex,
                mac,
                _pad: [0; 2],
            },
        );
    }
    let by_ip: BTreeMap<[u8; 4], u32> = sv.backends.iter().map(|b| (b.ip.octets(), b.id)).collect();
    let ips: Vec<[u8; 4]> = by_ip.keys().copied().collect();
    let row: Vec<u32> = crate::maglev::table(&ips, MAGLEV_M)
        .iter()
        .map(|ip| by_ip[ip])
        .collect();
    if !row.is_empty() {
        d.maglev.insert(sv.id, row);
    }
    for p in &sv.ports {
        d.services.insert(
            SvcKey {
                vip,
                port: p.port,
                proto: p.proto.number(),
                _pad: 0,
            },
            SvcInfo {
                svc_id: sv.id,
                target_port: p.target,
                backend_count: u16::try_from(sv.backends.len()).unwrap_or(u16::MAX),
                net_id: net.id,
                flags: 0,
            },
        );
    }
}

/// Changes the service entries from `old` to `new` (both partial, from
/// [`desired_services`]), touching only what differs, in the same make-before-break order
/// as [`apply`]. The cost is that of the services changed, not of all services.
pub fn apply_delta(
    dp: &mut dyn Dataplane,
    old: &Desired,
    new: &Desired,
) -> Result<Drift, DatapathError> {
    use crate::datapath::{Phase, write_diff};
    let mut d = Drift::default();
    d.add(write_diff(
        dp.config_maps().backends,
        &old.backends,
        &new.backends,
        Phase::Put,
        "BACKENDS",
    )?);
    let rows: BTreeMap<u32, Vec<u32>> = new
        .maglev
        .iter()
        .filter(|(k, v)| old.maglev.get(k) != Some(v))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let fresh: Vec<u32> = rows
        .keys()
        .filter(|k| !old.maglev.contains_key(k))
        .copied()
        .collect();
    dp.assume_empty_rows(&fresh);
    d.add(dp.sync_maglev(&rows, false)?);
    d.add(write_diff(
        dp.config_maps().vips,
        &old.vips,
        &new.vips,
        Phase::Put,
        "VIPS",
    )?);
    d.add(write_diff(
        dp.config_maps().services,
        &old.services,
        &new.services,
        Phase::Put,
        "SERVICES",
    )?);
    d.add(write_diff(
        dp.config_maps().services,
        &old.services,
        &new.services,
        Phase::Delete,
        "SERVICES",
    )?);
    let cleared: BTreeMap<u32, Vec<u32>> = old
        .maglev
        .keys()
        .filter(|k| !new.maglev.contains_key(k))
        .map(|k| (*k, vec![0; MAGLEV_M as usize]))
        .collect();
    d.add(dp.sync_maglev(&cleared, false)?);
    d.add(write_diff(
        dp.config_maps().vips,
        &old.vips,
        &new.vips,
        Phase::Delete,
        "VIPS",
    )?);
    let removed = write_diff(
        dp.config_maps().backends,
        &old.backends,
        &new.backends,
        Phase::Delete,
        "BACKENDS",
    )?;
    if removed.removed > 0 {
        let gone: BTreeSet<u32> = old
            .backends
            .keys()
            .filter(|k| !new.backends.contains_key(k))
            .copied()
            .collect();
        d.removed += dp.purge_conntrack(&gone)?;
    }
    d.add(removed);
    Ok(d)
}

/// Makes the data plane hold `d`. Order is make-before-break: subnets and endpoint entries
/// first, then the per-interface entries, and only then the links that make the programs
/// see traffic (a program must never run on a veth whose `IFACES` entry is missing: it would
/// drop everything as `unknown_iface`).
///
/// Services likewise: a new backend exists before a table slot names it, a row is filled
/// before a service entry points at it and cleared only after none does, a VIP answers ARP
/// before its service entries exist, and a removed backend leaves the table before it
/// leaves `BACKENDS`; then no conntrack entry may still name it.
pub fn apply(dp: &mut dyn Dataplane, d: &Desired) -> Result<(Drift, Drift), DatapathError> {
    let mut maps = dp.sync_subnets(&d.subnets)?;
    maps.add(dp.sync_endpoints(&d.endpoints)?);
    maps.add(dp.sync_ifaces(&d.ifaces)?);
    maps.add(dp.sync_backends(&d.backends, false)?);
    maps.add(dp.sync_maglev(&d.maglev, false)?);
    maps.add(dp.sync_vips(&d.vips, false)?);
    maps.add(dp.sync_services(&d.services)?);
    maps.add(dp.sync_maglev(&d.maglev, true)?);
    maps.add(dp.sync_vips(&d.vips, true)?);
    let gone: BTreeSet<u32> = dp
        .config_maps()
        .backends
        .entries()
        .into_keys()
        .filter(|k| !d.backends.contains_key(k))
        .collect();
    maps.add(dp.sync_backends(&d.backends, true)?);
    if !gone.is_empty() {
        maps.removed += dp.purge_conntrack(&gone)?;
    }
    let links = dp.sync_endpoint_links(&d.links)?;
    Ok((maps, links))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::MemDataplane;
    use crate::model::{Endpoint, Network, Sandbox, format_mac, mac_for};
    use netctl_common::{BackendInfo, SvcInfo, SvcKey};
    use std::net::Ipv4Addr;

    fn net(name: &str, id: u32, subnet: &str, internal: bool) -> Network {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        Network {
            id,
            name: name.into(),
            driver: "bridge".into(),
            subnet,
            ip_range: None,
            gateway: subnet.hosts().next().unwrap(),
            aux_addresses: Default::default(),
            options: Default::default(),
            internal,
            bridge: format!("netctl{id}"),
            created: String::new(),
            docker: None,
        }
    }

    fn ep(id: &str, network: &str, sandbox: &str, ip: Ipv4Addr) -> Endpoint {
        Endpoint {
            id: id.into(),
            network: network.into(),
            sandbox: sandbox.into(),
            ip,
            mac: format_mac(mac_for(ip)),
            ifname: "eth0".into(),
            host_ifname: format!("nc{id}"),
            aliases: vec![],
            default_route: true,
            docker: None,
        }
    }

    fn state() -> State {
        let mut s = State::default();
        s.networks
            .insert("a".into(), net("a", 1, "10.1.0.0/24", false));
        s.networks
            .insert("b".into(), net("b", 2, "10.2.0.0/24", true));
        for sb in ["x", "y", "z"] {
            s.sandboxes.insert(
                sb.into(),
                Sandbox {
                    name: sb.into(),
                    created: String::new(),
                },
            );
        }
        s.endpoints
            .insert("e1".into(), ep("e1", "a", "x", Ipv4Addr::new(10, 1, 0, 2)));
        s.endpoints
            .insert("e2".into(), ep("e2", "a", "y", Ipv4Addr::new(10, 1, 0, 3)));
        s.endpoints
            .insert("e3".into(), ep("e3", "b", "z", Ipv4Addr::new(10, 2, 0, 2)));
        s
    }

    fn ifindex() -> BTreeMap<String, u32> {
        [("nce1", 11), ("nce2", 12), ("nce3", 13)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    #[test]
    fn desired_holds_every_network_and_endpoint() {
        let d = desired(&state(), &ifindex());
        assert_eq!(d.subnets.len(), 2);
        assert_eq!(
            d.subnets[&"10.2.0.0/24".parse().unwrap()],
            SubnetInfo {
                net_id: 2,
                flags: NET_F_INTERNAL
            }
        );
        assert_eq!(d.ifaces.len(), 3);
        let i = d.ifaces[&13];
        assert_eq!(i.net_id, 2);
        assert_eq!(i.ip, [10, 2, 0, 2]);
        assert_eq!(i.mac, [0x02, 0x42, 10, 2, 0, 2]);
        assert_eq!(d.links.len(), 3);
    }

    #[test]
    fn endpoint_without_ifindex_gets_no_iface_entry_or_link() {
        let mut idx = ifindex();
        idx.remove("nce2");
        let d = desired(&state(), &idx);
        assert!(!d.ifaces.contains_key(&12));
        assert!(!d.links.contains("nce2"));
        assert_eq!(d.ifaces.len(), 2);
    }

    /// The in-memory data plane, checking after every step of `apply` what the programs
    /// could see at that moment: every backend a table slot names exists, and every
    /// service entry with backends points at a filled row.
    #[derive(Default)]
    struct Checked {
        inner: MemDataplane,
        violations: Vec<String>,
    }

    impl Checked {
        fn check(&mut self, step: &str) {
            let d = &self.inner;
            for (svc, row) in &d.maglev {
                for id in row.iter().filter(|id| **id != 0) {
                    if !d.backends.contains_key(id) {
                        self.violations.push(format!(
                            "after {step}: row {svc} names missing backend {id}"
                        ));
                    }
                }
            }
            for (k, v) in &d.services {
                if v.backend_count > 0 && !d.maglev.contains_key(&v.svc_id) {
                    self.violations
                        .push(format!("after {step}: {k:?} points at an empty row"));
                }
                if !d.vips.contains_key(&k.vip) {
                    self.violations
                        .push(format!("after {step}: {k:?} has no VIPS entry"));
                }
            }
        }
    }

    impl Dataplane for Checked {
        fn config_maps(&mut self) -> crate::datapath::ConfigMaps<'_> {
            self.inner.config_maps()
        }
        fn sync_maglev(
            &mut self,
            d: &BTreeMap<u32, Vec<u32>>,
            prune: bool,
        ) -> Result<Drift, DatapathError> {
            let r = self.inner.sync_maglev(d, prune);
            self.check(if prune { "maglev (prune)" } else { "maglev" });
            r
        }
        fn purge_conntrack(&mut self, live: &BTreeSet<u32>) -> Result<u64, DatapathError> {
            self.inner.purge_conntrack(live)
        }
        fn sync_endpoint_links(&mut self, d: &BTreeSet<String>) -> Result<Drift, DatapathError> {
            self.inner.sync_endpoint_links(d)
        }
        fn sync_backends(
            &mut self,
            d: &BTreeMap<u32, BackendInfo>,
            prune: bool,
        ) -> Result<Drift, DatapathError> {
            let r = self.inner.sync_backends(d, prune);
            self.check(if prune {
                "backends (prune)"
            } else {
                "backends"
            });
            r
        }
        fn sync_services(&mut self, d: &BTreeMap<SvcKey, SvcInfo>) -> Result<Drift, DatapathError> {
            let r = self.inner.sync_services(d);
            self.check("services");
            r
        }
        fn sync_vips(
            &mut self,
            d: &BTreeMap<[u8; 4], netctl_common::VipInfo>,
            prune: bool,
        ) -> Result<Drift, DatapathError> {
            let r = self.inner.sync_vips(d, prune);
            self.check(if prune { "vips (prune)" } else { "vips" });
            r
        }
    }

    fn with_service(mut s: State, backends: &[(u32, &str)]) -> State {
        use crate::model::{Backend, PortSpec, Proto, Service};
        let svc = Service {
            id: 1,
            name: "web".into(),
            network: "a".into(),
            mode: ServiceMode::Vip,
            vip: Some(Ipv4Addr::new(10, 1, 0, 100)),
            ports: vec![PortSpec {
                port: 80,
                target: 8080,
                proto: Proto::Tcp,
            }],
            backends: backends
                .iter()
                .map(|(id, ep)| Backend {
                    id: *id,
                    endpoint: ep.to_string(),
                    sandbox: s.endpoints[*ep].sandbox.clone(),
                    ip: s.endpoints[*ep].ip,
                })
                .collect(),
            created: String::new(),
        };
        s.services.insert("web".into(), svc);
        s
    }

    #[test]
    fn backend_changes_are_make_before_break() {
        let mut dp = Checked::default();
        let mut s = state();
        s.endpoints
            .insert("e4".into(), ep("e4", "a", "z", Ipv4Addr::new(10, 1, 0, 4)));
        let idx = {
            let mut i = ifindex();
            i.insert("nce4".into(), 14);
            i
        };
        let steps: Vec<Vec<(u32, &str)>> = vec![
            vec![(1, "e1"), (2, "e2")],
            vec![(1, "e1"), (2, "e2"), (3, "e4")], // attach
            vec![(1, "e1"), (3, "e4")],            // detach
            vec![],                                // detach the rest
            vec![(4, "e2")],                       // and back
        ];
        let mut before: BTreeSet<u32> = BTreeSet::new();
        for backends in steps {
            let st = with_service(s.clone(), &backends);
            // A flow on every backend live before the step.
            dp.inner.conntrack.clear();
            for &id in &before {
                let key = netctl_common::CtKey {
                    src: [10, 1, 0, 9],
                    dst: [10, 1, 0, 100],
                    sport: id as u16,
                    dport: 80,
                    proto: 6,
                    dir: 0,
                    _pad: [0; 2],
                };
                dp.inner.conntrack.insert(key, id);
            }
            apply(&mut dp, &desired(&st, &idx)).unwrap();
            let live: BTreeSet<u32> = backends.iter().map(|(id, _)| *id).collect();
            assert_eq!(
                dp.inner.backends.keys().copied().collect::<BTreeSet<_>>(),
                live
            );
            // Flows of removed backends are gone; flows of staying ones are untouched.
            let flows: BTreeSet<u32> = dp.inner.conntrack.values().copied().collect();
            assert_eq!(flows, &before & &live, "conntrack after the step");
            before = live;
            let svc = dp.inner.services.values().next().unwrap();
            assert_eq!(usize::from(svc.backend_count), backends.len());
            s = st;
        }
        // Remove the service: its entries, then its row and VIP, then its backends.
        s.services.clear();
        apply(&mut dp, &desired(&s, &idx)).unwrap();
        assert!(dp.inner.services.is_empty() && dp.inner.vips.is_empty());
        assert!(dp.inner.maglev.is_empty() && dp.inner.backends.is_empty());
        assert!(dp.violations.is_empty(), "{:#?}", dp.violations);
    }

    #[test]
    fn apply_is_idempotent_and_prunes() {
        let mut dp = MemDataplane::default();
        let mut s = state();
        let d = desired(&s, &ifindex());
        let (maps, links) = apply(&mut dp, &d).unwrap();
        assert_eq!(maps.added, 2 + 3 + 3);
        assert_eq!(links.added, 3);
        // Nothing to do the second time.
        let (maps, links) = apply(&mut dp, &d).unwrap();
        assert_eq!(maps.total() + links.total(), 0);
        // Disconnect e2: its endpoint, iface entry and link go, nothing else moves.
        s.endpoints.remove("e2");
        let (maps, links) = apply(&mut dp, &desired(&s, &ifindex())).unwrap();
        assert_eq!((maps.removed, maps.added, maps.updated), (2, 0, 0));
        assert_eq!(links.removed, 1);
        assert!(!dp.ifaces.contains_key(&12));
        assert!(!dp.links.contains("nce2"));
        // Drift (an entry changed behind our back) is repaired.
        dp.ifaces.get_mut(&11).unwrap().net_id = 9;
        let (maps, _) = apply(&mut dp, &desired(&s, &ifindex())).unwrap();
        assert_eq!(maps.updated, 1);
        assert_eq!(dp.ifaces[&11].net_id, 1);
    }
}
