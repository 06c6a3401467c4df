//! Planning for Docker's plugin calls: IPAM pools and their addresses, renaming a network to
//! its Docker name, and endpoints whose container side Docker owns.

use super::*;

/// Pool ids are this prefix and the subnet, so an id names its pool for a person too.
pub const POOL_ID_PREFIX: &str = "netctl/";

/// What an address was requested for, as the pool records it.
pub const USE_GATEWAY: &str = "gateway";
pub const USE_REQUESTED: &str = "requested";

impl State {
    /// Plans IPAM `RequestPool`: the given subnet (`--subnet`) if it is free, else the next
    /// free one of the default pools; `sub_pool` is `--ip-range`.
    pub fn plan_request_pool(
        &self,
        pool: Option<&str>,
        sub_pool: Option<&str>,
        host: &HostNet,
        now: &str,
    ) -> Result<(Pool, Vec<Change>), ModelError> {
        let subnet = match pool {
            Some(s) => self.check_free_subnet("Pool", s, host, None)?,
            None => ipam::choose_subnet(&self.taken_subnets(host)).ok_or_else(|| {
                ModelError::Conflict(
                    "no free subnet left in the default pools; pass --subnet".to_string(),
                )
            })?,
        };
        let ip_range = match sub_pool {
            Some(s) => {
                let r = parse_prefix("SubPool", s)?;
                if !subnet.contains(&r) {
                    return Err(invalid("SubPool", s, format!("not inside pool {subnet}")));
                }
                Some(r)
            }
            None => None,
        };
        let p = Pool {
            id: format!("{POOL_ID_PREFIX}{subnet}"),
            subnet,
            ip_range,
            addresses: BTreeMap::new(),
            handed_out: BTreeMap::new(),
            created: now.to_string(),
        };
        Ok((p.clone(), vec![Change::PutPool(p)]))
    }

    /// Plans IPAM `ReleasePool`.
    pub fn plan_release_pool(&self, id: &str) -> Result<Vec<Change>, ModelError> {
        if !self.pools.contains_key(id) {
            return Err(not_found("pool", id));
        }
        Ok(vec![Change::DeletePool(id.to_string())])
    }

    /// The network on a pool's subnet, if Docker created it yet.
    fn network_of_pool(&self, p: &Pool) -> Option<&Network> {
        self.networks.values().find(|n| n.subnet == p.subnet)
    }

    /// Plans IPAM `RequestAddress`: `addr` if it is a free host address of the pool, else
    /// (none asked) the gateway's default (the first host address) for a gateway request, or
    /// the lowest free address of the range. Free means: not handed out from the pool, and
    /// not used on the pool's network by an endpoint, a VIP, the gateway or an aux address.
    pub fn plan_request_address(
        &self,
        pool_id: &str,
        addr: Option<&str>,
        gateway: bool,
        now_secs: u64,
    ) -> Result<(Ipv4Net, Vec<Change>), ModelError> {
        let p = self
            .pools
            .get(pool_id)
            .ok_or_else(|| not_found("pool", pool_id))?;
        let idx = Index::new(self);
        let net = self.network_of_pool(p);
        let taken = |ip: Ipv4Addr| {
            p.addresses.contains_key(&ip) || net.is_some_and(|n| idx.use_of(&n.name, ip).is_some())
        };
        let ip = match addr {
            Some(s) => {
                let ip = parse_addr("Address", s)?;
                check_host_addr("Address", s, ip, p.subnet)?;
                if taken(ip) {
                    return Err(invalid(
                        "Address",
                        s,
                        format!("already in use in pool {}", p.id),
                    ));
                }
                ip
            }
            None => {
                let first = ipam::first_host(p.subnet).filter(|a| !taken(*a));
                let lowest = || {
                    let (lo, hi) = ipam::alloc_bounds(p.subnet, p.ip_range)?;
                    (u32::from(lo)..=u32::from(hi))
                        .map(Ipv4Addr::from)
                        .find(|a| !taken(*a))
                };
                let found = if gateway {
                    first.or_else(lowest)
                } else {
                    lowest()
                };
                found.ok_or_else(|| {
                    ModelError::Conflict(format!("pool {}: no free address left", p.id))
                })?
            }
        };
        let mut p = p.clone();
        let what = if gateway { USE_GATEWAY } else { USE_REQUESTED };
        p.addresses.insert(ip, what.to_string());
        p.handed_out.insert(ip, now_secs);
        let net = Ipv4Net::new(ip, p.subnet.prefix_len()).expect("prefix of a valid subnet");
        Ok((net, vec![Change::PutPool(p)]))
    }

    /// Plans IPAM `ReleaseAddress`; releasing an address that was not handed out changes
    /// nothing (Docker releases on every rollback path).
    pub fn plan_release_address(
        &self,
        pool_id: &str,
        addr: &str,
    ) -> Result<Vec<Change>, ModelError> {
        let p = self
            .pools
            .get(pool_id)
            .ok_or_else(|| not_found("pool", pool_id))?;
        let ip = parse_addr("Address", addr)?;
        if !p.addresses.contains_key(&ip) {
            return Ok(vec![]);
        }
        let mut p = p.clone();
        p.addresses.remove(&ip);
        p.handed_out.remove(&ip);
        Ok(vec![Change::PutPool(p)])
    }

    /// Addresses Docker asked for and never used, which a crash leaves behind: Docker
    /// requests an address, then creates the endpoint with it within moments; if the agent
    /// died after committing the address but before Docker got the answer, Docker never
    /// releases it (moby#27404). On a Docker network of netctl's (where every container
    /// address is a netctl endpoint), an endpoint address handed out more than `grace_secs`
    /// ago that no endpoint has, is reclaimed. Gateways and aux addresses stay, and so do
    /// the pools of networks netctl is not the driver of.
    pub fn plan_reclaim_addresses(&self, now_secs: u64, grace_secs: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for p in self.pools.values() {
            let Some(net) = self.network_of_pool(p).filter(|n| n.docker.is_some()) else {
                continue;
            };
            let used: BTreeSet<Ipv4Addr> = self
                .endpoints
                .values()
                .filter(|e| e.network == net.name)
                .map(|e| e.ip)
                .chain(net.aux_addresses.values().copied())
                .chain([net.gateway])
                .collect();
            let stale: Vec<Ipv4Addr> = p
                .addresses
                .iter()
                .filter(|(ip, what)| {
                    what.as_str() == USE_REQUESTED
                        && !used.contains(ip)
                        && p.handed_out.get(ip).copied().unwrap_or(0) + grace_secs < now_secs
                })
                .map(|(ip, _)| *ip)
                .collect();
            if stale.is_empty() {
                continue;
            }
            let mut p = p.clone();
            for ip in stale {
                p.addresses.remove(&ip);
                p.handed_out.remove(&ip);
            }
            changes.push(Change::PutPool(p));
        }
        changes
    }

    /// The network Docker knows by `docker_id`.
    pub fn docker_network(&self, docker_id: &str) -> Option<&Network> {
        self.networks
            .values()
            .find(|n| n.docker.as_ref().is_some_and(|d| d.id == docker_id))
    }

    /// Plans renaming a network (to its Docker name): the network, and every endpoint and
    /// service that names it. Nothing in the kernel is named after a network.
    pub fn plan_rename_network(&self, old: &str, new: &str) -> Result<Vec<Change>, ModelError> {
        let n = self
            .networks
            .get(old)
            .ok_or_else(|| not_found("network", old))?;
        validate_name("name", new)?;
        if self.networks.contains_key(new) {
            return Err(ModelError::Exists {
                kind: "network",
                name: new.to_string(),
            });
        }
        let mut n = n.clone();
        n.name = new.to_string();
        let mut changes = vec![
            Change::DeleteNetwork(old.to_string()),
            Change::PutNetwork(n),
        ];
        for e in self.endpoints.values().filter(|e| e.network == old) {
            let mut e = e.clone();
            e.network = new.to_string();
            changes.push(Change::PutEndpoint(e));
        }
        for sv in self.services.values().filter(|sv| sv.network == old) {
            let mut sv = sv.clone();
            sv.network = new.to_string();
            changes.push(Change::PutService(sv));
        }
        Ok(changes)
    }

    /// Plans Docker's `CreateEndpoint`: an endpoint with Docker's id, the address Docker's
    /// IPAM gave (`ADDR/LEN`) and Docker's MAC if the user set one (else `02:42:` + the
    /// address). The same call again is a no-op (Docker retries).
    pub fn plan_docker_endpoint(
        &self,
        docker_network: &str,
        id: &str,
        address: &str,
        mac: Option<&str>,
        host: &HostNet,
    ) -> Result<(Endpoint, Vec<Change>), ModelError> {
        let net = self
            .docker_network(docker_network)
            .ok_or_else(|| not_found("network", docker_network))?;
        if id.len() < 12 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("EndpointID", id, "expected 12 to 64 hex digits"));
        }
        let id = id.to_ascii_lowercase();
        if let Some(e) = self.endpoints.get(&id) {
            if e.network == net.name && address.split('/').next() == Some(&e.ip.to_string()) {
                return Ok((e.clone(), vec![]));
            }
            return Err(ModelError::Exists {
                kind: "endpoint",
                name: id,
            });
        }
        let (ip_s, len) = address
            .split_once('/')
            .ok_or_else(|| invalid("Interface.Address", address, "expected ADDRESS/LENGTH"))?;
        let ip = self.check_host_part("Interface.Address", ip_s, net)?;
        if len.parse::<u8>().ok() != Some(net.subnet.prefix_len()) {
            return Err(invalid(
                "Interface.Address",
                address,
                format!("the prefix length differs from subnet {}", net.subnet),
            ));
        }
        self.check_addr_free_in("Interface.Address", address, ip, net, &Index::new(self))?;
        let mac = match mac.filter(|m| !m.is_empty()) {
            Some(m) => {
                parse_mac(m).ok_or_else(|| invalid("Interface.MacAddress", m, "not a MAC"))?;
                m.to_ascii_lowercase()
            }
            None => format_mac(mac_for(ip)),
        };
        let host_ifname = format!("nc{}", &id[..12]);
        if self
            .endpoints
            .values()
            .any(|e| e.host_ifname == host_ifname)
            || host.links.contains(&host_ifname)
        {
            return Err(ModelError::Conflict(format!(
                "endpoint {id}: the interface name {host_ifname} is already in use"
            )));
        }
        let ep = Endpoint {
            id: id.clone(),
            network: net.name.clone(),
            sandbox: format!("docker:{}", &id[..12]),
            ip,
            mac,
            ifname: String::new(),
            host_ifname,
            aliases: vec![],
            default_route: false,
            docker: Some(DockerEndpoint {
                peer: format!("ncd{}", &id[..12]),
                sandbox_key: None,
            }),
        };
        Ok((ep.clone(), vec![Change::PutEndpoint(ep)]))
    }

    /// Plans removing one endpoint by id (Docker's `DeleteEndpoint`): it leaves the services
    /// it backs first.
    pub fn plan_remove_endpoint(&self, id: &str) -> Result<Vec<Change>, ModelError> {
        if !self.endpoints.contains_key(id) {
            return Err(not_found("endpoint", id));
        }
        let mut changes = self.drop_backends(&BTreeSet::from([id]));
        changes.push(Change::DeleteEndpoint(id.to_string()));
        Ok(changes)
    }

    /// How an error names `target`: `sandbox "NAME"` for a sandbox, else quoted.
    pub(super) fn target_label(&self, target: &str) -> String {
        if self.sandboxes.contains_key(target) {
            format!("sandbox {target:?}")
        } else {
            format!("{target:?}")
        }
    }

    /// The endpoint on `network` that `target` names: a sandbox name, an endpoint id or a
    /// unique prefix of one, or the endpoint's address.
    pub fn resolve_target(
        &self,
        network: &str,
        target: &str,
        service: &str,
    ) -> Result<&Endpoint, ModelError> {
        let on_net = || self.endpoints.values().filter(|e| e.network == network);
        if self.sandboxes.contains_key(target) {
            return on_net()
                .find(|e| e.sandbox == target)
                .ok_or_else(|| not_on_network(target, network, service));
        }
        if let Ok(ip) = target.parse::<Ipv4Addr>() {
            return on_net().find(|e| e.ip == ip).ok_or_else(|| {
                ModelError::Conflict(format!(
                    "no endpoint on network {network:?} (of service {service:?}) has address {ip}"
                ))
            });
        }
        let lower = target.to_ascii_lowercase();
        if !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found: Vec<&Endpoint> = self
                .endpoints
                .values()
                .filter(|e| e.id.starts_with(&lower))
                .collect();
            match found.as_slice() {
                [e] if e.network == network => return Ok(e),
                [e] => {
                    return Err(ModelError::Conflict(format!(
                        "endpoint {} is on network {:?}, not on network {network:?} of service {service:?}",
                        e.id, e.network
                    )));
                }
                [] => {}
                many => {
                    return Err(ModelError::Conflict(format!(
                        "endpoint id prefix {target:?} is ambiguous: {} endpoints start with it; give more digits",
                        many.len()
                    )));
                }
            }
        }
        Err(ModelError::NotFound {
            kind: "sandbox, endpoint id or endpoint address",
            name: target.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2024-01-01T00:00:00Z";
    const NET: &str = "48e996a4be6909b97e0b30ca8da8cf0a2e64c5d481e8a0b963c585115fa73017";

    fn pool(st: &mut State, subnet: Option<&str>, range: Option<&str>) -> Pool {
        let (p, c) = st
            .plan_request_pool(subnet, range, &HostNet::default(), NOW)
            .unwrap();
        st.apply(&c);
        p
    }

    fn addr(st: &mut State, pool: &str, a: Option<&str>, gw: bool) -> String {
        let (n, c) = st.plan_request_address(pool, a, gw, 1000).unwrap();
        st.apply(&c);
        n.to_string()
    }

    fn docker_net(st: &mut State, subnet: &str) -> Network {
        let req = CreateNetwork {
            name: Network::provisional_name(NET),
            subnet: Some(subnet.into()),
            ..Default::default()
        };
        let c = st
            .plan_network(&req, &HostNet::default(), NOW, Some(NET))
            .unwrap();
        st.apply(&c);
        st.docker_network(NET).unwrap().clone()
    }

    fn err(r: Result<impl std::fmt::Debug, ModelError>) -> String {
        r.expect_err("should fail").to_string()
    }

    #[test]
    fn pools_choose_free_subnets_and_refuse_overlaps() {
        let mut st = State::default();
        let a = pool(&mut st, None, None);
        let b = pool(&mut st, None, None);
        assert_eq!(a.id, "netctl/172.17.0.0/16");
        assert_eq!(b.subnet.to_string(), "172.18.0.0/16");
        let e = err(st.plan_request_pool(Some("172.17.5.0/24"), None, &HostNet::default(), NOW));
        assert!(
            e.starts_with(
                "Pool: invalid value \"172.17.5.0/24\": overlaps pool netctl/172.17.0.0/16, handed to Docker"
            ),
            "{e}"
        );
        let host = HostNet {
            prefixes: vec!["10.5.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let e = err(st.plan_request_pool(Some("10.5.1.0/24"), None, &host, NOW));
        assert!(
            e.contains("overlaps host route or address 10.5.0.0/16"),
            "{e}"
        );
        // A native network may not take a pool's subnet; Docker's network on it may.
        let native = CreateNetwork {
            name: "n".into(),
            subnet: Some("172.18.0.0/16".into()),
            ..Default::default()
        };
        let e = err(st.plan_create_network(&native, &HostNet::default(), NOW));
        assert!(
            e.contains("overlaps pool netctl/172.18.0.0/16, handed to Docker"),
            "{e}"
        );
        docker_net(&mut st, "172.18.0.0/16");
        // Released pools are free again.
        let c = st.plan_release_pool(&a.id).unwrap();
        st.apply(&c);
        assert_eq!(pool(&mut st, None, None).id, a.id);
    }

    #[test]
    fn addresses_gateway_range_and_collisions() {
        let mut st = State::default();
        let p = pool(&mut st, Some("10.1.0.0/24"), Some("10.1.0.128/25"));
        assert_eq!(addr(&mut st, &p.id, None, true), "10.1.0.1/24");
        assert_eq!(addr(&mut st, &p.id, None, false), "10.1.0.128/24");
        assert_eq!(addr(&mut st, &p.id, Some("10.1.0.5"), false), "10.1.0.5/24");
        let e = err(st.plan_request_address(&p.id, Some("10.1.0.5"), false, 1000));
        assert!(
            e.contains("Address: invalid value \"10.1.0.5\": already in use"),
            "{e}"
        );
        let e = err(st.plan_request_address(&p.id, Some("10.2.0.5"), false, 1000));
        assert!(e.starts_with("Address: invalid value \"10.2.0.5\""), "{e}");
        let e = err(st.plan_request_address(&p.id, Some("10.1.0.255"), false, 1000));
        assert!(
            e.starts_with("Address: invalid value \"10.1.0.255\""),
            "{e}"
        );
        // The network's VIPs and netctl endpoints are taken for the pool, and the pool's
        // addresses for netctl's IPAM.
        let n = docker_net(&mut st, "10.1.0.0/24");
        let mut sv = crate::model::AddService {
            name: "web".into(),
            network: n.name.clone(),
            ports: vec!["80".into()],
            ..Default::default()
        };
        sv.vip = None;
        let c = st.plan_add_service(&sv, NOW).unwrap();
        st.apply(&c);
        let vip = st.services["web"].vip.unwrap();
        assert_eq!(vip.to_string(), "10.1.0.2", "skips the pool's 10.1.0.1");
        let c = st.plan_release_address(&p.id, "10.1.0.128").unwrap();
        st.apply(&c);
        assert_eq!(addr(&mut st, &p.id, None, false), "10.1.0.128/24");
        assert_eq!(addr(&mut st, &p.id, None, false), "10.1.0.129/24");
        // Releasing an address never handed out is a no-op.
        assert_eq!(
            st.plan_release_address(&p.id, "10.1.0.200").unwrap(),
            vec![]
        );
    }

    #[test]
    fn addresses_a_crash_left_unused_are_reclaimed_after_the_grace() {
        let mut st = State::default();
        let p = pool(&mut st, Some("10.4.0.0/24"), None);
        let other = pool(&mut st, Some("10.5.0.0/24"), None);
        addr(&mut st, &p.id, None, true); // 10.4.0.1, gateway, at 1000
        addr(&mut st, &p.id, None, false); // 10.4.0.2: its answer "lost"
        addr(&mut st, &p.id, None, false); // 10.4.0.3: gets an endpoint
        addr(&mut st, &other.id, None, false); // a pool with no netctl network: kept
        // No Docker network on the pool yet: nothing is reclaimed.
        assert!(st.plan_reclaim_addresses(5000, 60).is_empty());
        docker_net(&mut st, "10.4.0.0/24");
        let id = "573f0be318cc087adfbcb4eaaea7c189f9b41384a936eb1b36eb88f7f612bbc4";
        let (_, c) = st
            .plan_docker_endpoint(NET, id, "10.4.0.3/24", None, &HostNet::default())
            .unwrap();
        st.apply(&c);
        // Within the grace: kept.
        assert!(st.plan_reclaim_addresses(1060, 60).is_empty());
        let c = st.plan_reclaim_addresses(1061, 60);
        st.apply(&c);
        let left: Vec<String> = st.pools[&p.id]
            .addresses
            .keys()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(left, ["10.4.0.1", "10.4.0.3"]);
        assert_eq!(st.pools[&p.id].handed_out.len(), 2);
        assert_eq!(st.pools[&other.id].addresses.len(), 1);
        assert!(st.plan_reclaim_addresses(9999, 60).is_empty(), "idempotent");
    }

    #[test]
    fn endpoints_rename_and_targets() {
        let mut st = State::default();
        let n = docker_net(&mut st, "10.3.0.0/24");
        let id = "573f0be318cc087adfbcb4eaaea7c189f9b41384a936eb1b36eb88f7f612bbc4";
        let host = HostNet::default();
        let (ep, c) = st
            .plan_docker_endpoint(NET, id, "10.3.0.9/24", None, &host)
            .unwrap();
        st.apply(&c);
        assert_eq!(ep.mac, "02:42:0a:03:00:09");
        assert_eq!(ep.host_ifname, "nc573f0be318cc");
        assert_eq!(ep.docker.as_ref().unwrap().peer, "ncd573f0be318cc");
        // Same call again: nothing to do; the address taken: refused.
        let (_, again) = st
            .plan_docker_endpoint(NET, id, "10.3.0.9/24", None, &host)
            .unwrap();
        assert!(again.is_empty());
        let other = "673f0be318cc087adfbcb4eaaea7c189f9b41384a936eb1b36eb88f7f612bbc4";
        let e = err(st.plan_docker_endpoint(NET, other, "10.3.0.9/24", None, &host));
        assert!(
            e.contains("Interface.Address: invalid value \"10.3.0.9/24\": already in use"),
            "{e}"
        );
        let e = err(st.plan_docker_endpoint(NET, other, "10.3.0.1/24", None, &host));
        assert!(e.contains("is the gateway"), "{e}");
        let e = err(st.plan_docker_endpoint(NET, "xyz", "10.3.0.7/24", None, &host));
        assert!(e.starts_with("EndpointID: invalid value \"xyz\""), "{e}");
        let e = err(st.plan_docker_endpoint(NET, other, "10.3.0.7/16", None, &host));
        assert!(e.contains("prefix length"), "{e}");
        let e = err(st.plan_docker_endpoint(NET, other, "10.3.0.7/24", Some("zz"), &host));
        assert!(
            e.starts_with("Interface.MacAddress: invalid value \"zz\""),
            "{e}"
        );
        let (ep2, c) = st
            .plan_docker_endpoint(NET, other, "10.3.0.7/24", Some("02:AA:00:00:00:01"), &host)
            .unwrap();
        st.apply(&c);
        assert_eq!(ep2.mac, "02:aa:00:00:00:01");

        let sv = crate::model::AddService {
            name: "web".into(),
            network: n.name.clone(),
            ports: vec!["80".into()],
            ..Default::default()
        };
        let c = st.plan_add_service(&sv, NOW).unwrap();
        st.apply(&c);
        // Rename: the network, its endpoints and its services follow.
        let c = st.plan_rename_network(&n.name, "net1").unwrap();
        st.apply(&c);
        assert!(st.networks.contains_key("net1") && !st.networks.contains_key(&n.name));
        assert!(st.endpoints.values().all(|e| e.network == "net1"));
        assert_eq!(st.services["web"].network, "net1");
        assert_eq!(st.docker_network(NET).unwrap().name, "net1");

        // Targets: a unique prefix, an address; an ambiguous prefix is refused.
        assert_eq!(st.resolve_target("net1", "573f", "web").unwrap().id, id);
        assert_eq!(
            st.resolve_target("net1", "10.3.0.7", "web").unwrap().id,
            other
        );
        let e = err(st
            .resolve_target("net1", "73f0be", "web")
            .map(|e| e.id.clone()));
        assert!(e.contains("not found"), "{e}");
        let e = err(st
            .resolve_target("net1", "10.3.0.200", "web")
            .map(|e| e.id.clone()));
        assert!(e.contains("has address 10.3.0.200"), "{e}");
        let third = "57aaaaaaaaaa";
        let (_, c) = st
            .plan_docker_endpoint(NET, third, "10.3.0.8/24", None, &host)
            .unwrap();
        st.apply(&c);
        let e = err(st.resolve_target("net1", "57", "web").map(|e| e.id.clone()));
        assert!(e.contains("ambiguous"), "{e}");
        let c = st.plan_attach("web", "573f0b").unwrap();
        st.apply(&c);
        assert_eq!(st.services["web"].backends[0].endpoint, id);
        // Deleting the endpoint takes it out of the service first.
        let c = st.plan_remove_endpoint(id).unwrap();
        assert!(matches!(&c[0], Change::PutService(sv) if sv.backends.is_empty()));
        assert!(matches!(&c[1], Change::DeleteEndpoint(e) if e == id));
    }
}
