//! The agent's side of Docker's plugin calls. Each runs under the agent's lock like any API
//! call, plans against the model, commits, then brings the kernel along (creations commit
//! first, removals tear down the kernel first, as everywhere in the agent).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{Agent, Result, gateway_net, now_rfc3339};
use crate::model::{Change, CreateNetwork, Endpoint, ModelError, Network, Pool, parse_mac};
use crate::netlink::{self, Netlink, VethSpec};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What Docker's Join answer needs.
pub struct Joined {
    /// The interface Docker moves into the container.
    pub peer: String,
    /// The default gateway (none on an internal network).
    pub gateway: Option<Ipv4Addr>,
}

impl Agent {
    pub async fn ipam_request_pool(
        &mut self,
        pool: Option<&str>,
        sub_pool: Option<&str>,
    ) -> Result<Pool> {
        let host = self.host_net().await?;
        let (p, changes) = self
            .state
            .plan_request_pool(pool, sub_pool, &host, &now_rfc3339())?;
        self.commit(&changes)?;
        tracing::info!(pool = %p.id, "docker: pool requested");
        Ok(p)
    }

    pub fn ipam_release_pool(&mut self, id: &str) -> Result<()> {
        let changes = self.state.plan_release_pool(id)?;
        self.commit(&changes)?;
        tracing::info!(pool = %id, "docker: pool released");
        Ok(())
    }

    pub fn ipam_request_address(
        &mut self,
        pool: &str,
        addr: Option<&str>,
        gateway: bool,
    ) -> Result<Ipv4Net> {
        let (a, changes) = self
            .state
            .plan_request_address(pool, addr, gateway, now_secs())?;
        self.commit(&changes)?;
        Ok(a)
    }

    /// Reclaims the pool addresses a crash left handed out but unused (see
    /// [`crate::model::State::plan_reclaim_addresses`]); part of every full reconciliation.
    pub(super) fn reclaim_docker_addresses(&mut self) -> Result<usize> {
        let grace = self.opts.docker_address_grace.as_secs();
        let changes = self.state.plan_reclaim_addresses(now_secs(), grace);
        if changes.is_empty() {
            return Ok(0);
        }
        let before: usize = self.state.pools.values().map(|p| p.addresses.len()).sum();
        self.commit(&changes)?;
        let after: usize = self.state.pools.values().map(|p| p.addresses.len()).sum();
        tracing::warn!(
            reclaimed = before - after,
            "docker: reclaimed pool addresses handed out but never used (a crash cut Docker's call)"
        );
        Ok(before - after)
    }

    pub fn ipam_release_address(&mut self, pool: &str, addr: &str) -> Result<()> {
        let changes = self.state.plan_release_address(pool, addr)?;
        self.commit(&changes)?;
        Ok(())
    }

    /// Docker's CreateNetwork. The network is named `docker-<id>` until the agent learns its
    /// Docker name ([`Agent::docker_rename`]); the same call again is a no-op.
    pub async fn docker_create_network(&mut self, id: &str, mut req: CreateNetwork) -> Result<()> {
        if self.state.docker_network(id).is_some() {
            return Ok(());
        }
        req.name = Network::provisional_name(id);
        // Docker does not pass --ip-range to the driver; the pool netctl gave it knows it.
        if let Some(p) = req.subnet.as_deref().and_then(|s| {
            self.state
                .pools
                .values()
                .find(|p| p.subnet.to_string() == s)
        }) {
            req.ip_range = p.ip_range.map(|r| r.to_string());
        }
        let host = self.host_net().await?;
        let changes = self
            .state
            .plan_network(&req, &host, &now_rfc3339(), Some(id))?;
        let name = req.name.clone();
        self.create_with(changes, async |a: &mut Agent| {
            let n = a.state.networks[&name].clone();
            a.nl.ensure_bridge(&n.bridge, gateway_net(&n)).await?;
            a.sync_maps()?;
            Ok(())
        })
        .await?;
        self.sync_dns_logged().await;
        tracing::info!(network = %name, docker = %id, "docker: network created");
        Ok(())
    }

    /// Docker's DeleteNetwork; an unknown id is not an error (Docker retries removals).
    /// Docker has decided by the time it calls (it forgets the network even if the driver
    /// fails), so what netctl added to the network goes with it: its services, and the
    /// endpoints of netctl sandboxes connected to it.
    pub async fn docker_delete_network(&mut self, id: &str) -> Result<()> {
        let Some(name) = self.state.docker_network(id).map(|n| n.name.clone()) else {
            return Ok(());
        };
        let services: Vec<String> = self
            .state
            .services_of_network(&name)
            .iter()
            .map(|sv| sv.name.clone())
            .collect();
        for sv in services {
            tracing::warn!(network = %name, service = %sv, "docker: network removed; removing its service");
            self.remove_service(&sv).await?;
        }
        let endpoints: Vec<Endpoint> = self
            .state
            .endpoints_of_network(&name)
            .into_iter()
            .cloned()
            .collect();
        for ep in endpoints {
            tracing::warn!(network = %name, endpoint = %ep.id, sandbox = %ep.sandbox,
                "docker: network removed; removing its endpoint");
            if ep.docker.is_some() {
                self.docker_delete_endpoint(id, &ep.id).await?;
            } else {
                self.disconnect(&name, &ep.sandbox).await?;
            }
        }
        self.remove_network(&name).await
    }

    /// Gives a Docker network its Docker name, unless it has it already, the name is taken
    /// by another netctl network, or it is not a valid netctl name (then it keeps
    /// `docker-<id>`, and the log says why).
    pub async fn docker_rename(&mut self, id: &str, docker_name: &str) -> Result<()> {
        let Some(old) = self.state.docker_network(id).map(|n| n.name.clone()) else {
            return Ok(());
        };
        if old == docker_name {
            return Ok(());
        }
        let changes = match self.state.plan_rename_network(&old, docker_name) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(network = %old, docker_name, "docker: keeping the name: {e}");
                return Ok(());
            }
        };
        self.commit(&changes)?;
        self.sync_dns_logged().await;
        tracing::info!(network = %docker_name, was = %old, "docker: network named");
        Ok(())
    }

    /// Docker ids of the networks still waiting for their Docker name.
    pub fn docker_unnamed(&self) -> Vec<String> {
        self.state
            .networks
            .values()
            .filter_map(|n| {
                let d = n.docker.as_ref()?;
                (n.name == Network::provisional_name(&d.id)).then(|| d.id.clone())
            })
            .collect()
    }

    /// Docker's CreateEndpoint. Returns the endpoint; its MAC is the one to tell Docker when
    /// Docker gave none.
    pub async fn docker_create_endpoint(
        &mut self,
        network: &str,
        id: &str,
        address: &str,
        mac: Option<&str>,
    ) -> Result<Endpoint> {
        let host = self.host_net().await?;
        let (ep, changes) = self
            .state
            .plan_docker_endpoint(network, id, address, mac, &host)?;
        self.commit(&changes)?;
        self.sync_maps()?;
        if !changes.is_empty() {
            tracing::info!(endpoint = %ep.id, network = %ep.network, ip = %ep.ip, "docker: endpoint created");
        }
        Ok(ep)
    }

    /// The Docker endpoint `id` of Docker network `network` (EndpointOperInfo shows it).
    pub fn docker_endpoint(&self, network: &str, id: &str) -> Result<Endpoint> {
        let net = self
            .state
            .docker_network(network)
            .ok_or(ModelError::NotFound {
                kind: "network",
                name: network.to_string(),
            })?;
        self.state
            .endpoints
            .get(&id.to_ascii_lowercase())
            .filter(|e| e.network == net.name && e.docker.is_some())
            .cloned()
            .ok_or_else(|| {
                ModelError::NotFound {
                    kind: "endpoint",
                    name: id.to_string(),
                }
                .into()
            })
    }

    /// Docker's Join: records the container's namespace, makes the veth pair (the host side
    /// on the bridge, the peer left for Docker to move), programs the data plane, and only
    /// then brings the host side up.
    pub async fn docker_join(
        &mut self,
        network: &str,
        id: &str,
        sandbox_key: &str,
    ) -> Result<Joined> {
        let mut ep = self.docker_endpoint(network, id)?;
        let d = ep.docker.as_mut().expect("docker endpoint");
        d.sandbox_key = Some(sandbox_key.to_string());
        let peer = d.peer.clone();
        let changes = vec![Change::PutEndpoint(ep.clone())];
        let ep2 = ep.clone();
        self.create_with(changes, async move |a: &mut Agent| {
            let n = a.state.networks[&ep2.network].clone();
            a.nl.ensure_bridge(&n.bridge, gateway_net(&n)).await?;
            if let Err(e) = a.ensure_docker_veth(&ep2, true).await {
                let _ = a.nl.delete_link(&ep2.host_ifname).await;
                return Err(e);
            }
            a.bring_up(&ep2.host_ifname).await
        })
        .await?;
        let n = &self.state.networks[&ep.network];
        tracing::info!(endpoint = %ep.id, sandbox_key, "docker: joined");
        Ok(Joined {
            peer,
            gateway: (!n.internal).then_some(n.gateway),
        })
    }

    /// Docker's Leave: Docker takes the interface out of the container; the veth goes with
    /// DeleteEndpoint.
    pub fn docker_leave(&mut self, network: &str, id: &str) -> Result<()> {
        let mut ep = self.docker_endpoint(network, id)?;
        if let Some(d) = ep.docker.as_mut() {
            d.sandbox_key = None;
        }
        self.commit(&[Change::PutEndpoint(ep)])?;
        Ok(())
    }

    /// Docker's DeleteEndpoint: the endpoint leaves its services, its veth and map entries
    /// go, then the store forgets it. An unknown endpoint is not an error.
    pub async fn docker_delete_endpoint(&mut self, network: &str, id: &str) -> Result<()> {
        let ep = match self.docker_endpoint(network, id) {
            Ok(ep) => ep,
            Err(super::AgentError::Model(ModelError::NotFound { .. })) => return Ok(()),
            Err(e) => return Err(e),
        };
        let changes = self.state.plan_remove_endpoint(&ep.id)?;
        self.nl.delete_link(&ep.host_ifname).await?;
        self.ifindex.remove(&ep.host_ifname);
        self.commit(&changes)?;
        self.sync_maps()?;
        self.sync_dns_logged().await;
        tracing::info!(endpoint = %ep.id, "docker: endpoint deleted");
        Ok(())
    }

    /// Makes (if `create`) or checks the veth of a Docker endpoint and records its ifindex.
    async fn ensure_docker_veth(&mut self, ep: &Endpoint, create: bool) -> Result<bool> {
        let d = ep.docker.as_ref().expect("docker endpoint");
        let n = self
            .state
            .networks
            .get(&ep.network)
            .ok_or(ModelError::NotFound {
                kind: "network",
                name: ep.network.clone(),
            })?;
        let mac = parse_mac(&ep.mac).unwrap_or(crate::model::mac_for(ep.ip));
        match self
            .nl
            .ensure_docker_veth(&ep.host_ifname, &d.peer, &n.bridge.clone(), mac, create)
            .await
        {
            Ok(Some((idx, changed))) => {
                self.ifindex.insert(ep.host_ifname.clone(), idx);
                Ok(changed)
            }
            Ok(None) => {
                self.ifindex.remove(&ep.host_ifname);
                Ok(false)
            }
            Err(e) => {
                self.ifindex.remove(&ep.host_ifname);
                Err(e.into())
            }
        }
    }

    /// Reconciliation of a Docker endpoint: its host side is adopted and repaired. If the
    /// veth of a joined endpoint is gone (deleted by hand, or `netctl down`) while the
    /// container's namespace lives, the pair is made again with its peer in the container,
    /// as Docker had it: the address, the MAC, the lowest free `ethN`, and the default route
    /// via this network if the container has none (and the network is not internal).
    pub(super) async fn adopt_docker_veth(&mut self, ep: &Endpoint) -> Result<bool> {
        let changed = self.ensure_docker_veth(ep, false).await?;
        let key = ep.docker.as_ref().and_then(|d| d.sandbox_key.clone());
        let Some(key) = key.filter(|_| !self.ifindex.contains_key(&ep.host_ifname)) else {
            return Ok(changed);
        };
        if !netlink::netns_exists(&key) {
            return Err(ModelError::Conflict(format!(
                "docker endpoint {}: its veth {} and its container's namespace {key} are                  gone; Docker removes the endpoint when it sees the container stop",
                ep.id, ep.host_ifname
            ))
            .into());
        }
        let n = self
            .state
            .networks
            .get(&ep.network)
            .cloned()
            .ok_or(ModelError::NotFound {
                kind: "network",
                name: ep.network.clone(),
            })?;
        let (ifname, has_default) = netlink::in_netns(&key, || async {
            Netlink::new().await?.free_ifname_and_default().await
        })
        .await??;
        let spec = VethSpec {
            host_ifname: ep.host_ifname.clone(),
            bridge: n.bridge.clone(),
            netns: key.clone(),
            ifname,
            address: Ipv4Net::new(ep.ip, n.subnet.prefix_len()).expect("prefix of a subnet"),
            mac: parse_mac(&ep.mac).unwrap_or(crate::model::mac_for(ep.ip)),
            gateway: (!n.internal && !has_default).then_some(n.gateway),
        };
        tracing::warn!(endpoint = %ep.id, veth = %ep.host_ifname, netns = %key,
            ifname = %spec.ifname, "docker: veth gone; making it again into the container");
        let (idx, _) = self.nl.ensure_veth(&spec).await?;
        self.ifindex.insert(ep.host_ifname.clone(), idx);
        Ok(true)
    }
}
