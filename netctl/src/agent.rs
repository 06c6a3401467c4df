//! The node agent: owns the store, the in-memory desired state, the netlink connection and
//! the data plane, and serialises every change through one lock.
//!
//! Ordering rules that keep a crash from losing or leaking anything:
//! - Creations commit to the store first, then build kernel objects: a crash in between is
//!   repaired by the next agent's reconciliation, which builds what the store says.
//! - Removals tear down kernel objects first, then commit: a crash in between leaves the
//!   object desired (the removal was never acknowledged) and the next agent rebuilds it.
//! - A creation whose kernel side fails is reverted in the store before the error returns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::datapath::{Attachment, Datapath, DatapathError, MapUsage, Stats};
use crate::model::{
    Change, Connect, CreateNetwork, Endpoint, HostNet, ModelError, Network, Sandbox, State,
    parse_mac,
};
use crate::netlink::{self, Netlink, NetlinkError, VethSpec};
use crate::reconcile::{self, Report};
use crate::store::{Store, StoreError};

/// `netctl up` options.
#[derive(Clone, Debug)]
pub struct Options {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub uplink: Option<String>,
    pub resync: Duration,
    /// Entries of the conntrack LRU table.
    pub conntrack_size: u32,
    /// Conntrack timeouts: a TCP flow being opened, established, closing; UDP.
    pub ct_syn: Duration,
    pub ct_established: Duration,
    pub ct_closing: Duration,
    pub ct_udp: Duration,
    /// Where names that no network knows are resolved (default: the host's resolv.conf).
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// Services the tables are sized for (a Maglev row each).
    pub max_services: u32,
    /// How long an address handed to Docker may stay without an endpoint before a
    /// reconciliation reclaims it as leaked.
    pub docker_address_grace: Duration,
}

impl Options {
    /// The timeouts as the `CT_TIMEOUTS` map holds them.
    pub fn ct_timeouts_ns(&self) -> [u64; netctl_common::CT_TIMEOUT_SLOTS as usize] {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut t = [0; netctl_common::CT_TIMEOUT_SLOTS as usize];
        t[netctl_common::CT_TIMEOUT_SYN as usize] = ns(self.ct_syn);
        t[netctl_common::CT_TIMEOUT_ESTABLISHED as usize] = ns(self.ct_established);
        t[netctl_common::CT_TIMEOUT_CLOSING as usize] = ns(self.ct_closing);
        t[netctl_common::CT_TIMEOUT_UDP as usize] = ns(self.ct_udp);
        t
    }
}

/// An API failure: the one line the user sees and the HTTP status it travels with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("kernel: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("data plane: {0}")]
    Datapath(#[from] DatapathError),
}

impl AgentError {
    pub fn status(&self) -> u16 {
        match self {
            AgentError::Model(m) => m.status(),
            _ => 500,
        }
    }
}

type Result<T, E = AgentError> = std::result::Result<T, E>;

/// A network as `network ls` and `network inspect` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkView {
    #[serde(flatten)]
    pub network: Network,
    pub endpoints: Vec<Endpoint>,
    /// Addresses that IPAM can hand out, and how many are in use.
    pub addresses_total: u64,
    pub addresses_used: u64,
    /// The IPAM pool netctl handed Docker for this network's subnet, with the addresses
    /// Docker holds from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_pool: Option<crate::model::Pool>,
}

/// A sandbox as `sandbox ls` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxView {
    #[serde(flatten)]
    pub sandbox: Sandbox,
    /// The namespace file (`ip netns exec NAME` finds it there).
    pub netns: String,
    pub endpoints: Vec<Endpoint>,
}

/// `netctl status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub networks: usize,
    pub sandboxes: usize,
    pub endpoints: usize,
    #[serde(default)]
    pub services: usize,
    pub programs: Vec<Attachment>,
    pub maps: Vec<MapUsage>,
    pub reconcile: ReconcileInfo,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub node: String,
    pub state_dir: String,
    pub store: String,
    pub socket: String,
    pub pin_dir: String,
    pub uplink: Option<String>,
    /// Whether the data plane was found pinned by an earlier agent and adopted.
    pub adopted: bool,
    pub started: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReconcileInfo {
    pub runs: u64,
    /// Objects created, fixed or removed by reconciliation since the agent started.
    pub drift_repaired: u64,
    pub last: Report,
    pub last_error: Option<String>,
}

pub struct Agent {
    opts: Options,
    state: State,
    store: Store,
    nl: Netlink,
    dp: Datapath,
    /// ifindex of each host-side veth, as last seen.
    ifindex: BTreeMap<String, u32>,
    started: SystemTime,
    reconcile: ReconcileInfo,
    /// The embedded DNS server of each network, by network name.
    dns: BTreeMap<String, crate::dns::DnsServer>,
    /// Records changed since the DNS servers were last updated (see `spawn_dns_updater`).
    dns_dirty: bool,
}

pub type Shared = Arc<Mutex<Agent>>;

fn now_rfc3339() -> String {
    // RFC 3339 in UTC without pulling a date crate: seconds since the epoch are enough to
    // order events, but people read this field, so format it.
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm,
/// "chrono-Compatible Low-Level Date Algorithms").
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn gateway_net(n: &Network) -> Ipv4Net {
    Ipv4Net::new(n.gateway, n.subnet.prefix_len()).expect("prefix length of a valid subnet")
}

fn veth_spec(state: &State, ep: &Endpoint) -> Option<VethSpec> {
    let n = state.networks.get(&ep.network)?;
    Some(VethSpec {
        host_ifname: ep.host_ifname.clone(),
        bridge: n.bridge.clone(),
        netns: ep.sandbox.clone(),
        ifname: ep.ifname.clone(),
        address: Ipv4Net::new(ep.ip, n.subnet.prefix_len()).ok()?,
        mac: parse_mac(&ep.mac)?,
        gateway: ep.default_route.then_some(n.gateway),
    })
}

/// Whether `name` is a host-side endpoint veth by netctl's naming (`nc` + 12 hex digits).
fn is_endpoint_veth(name: &str) -> bool {
    name.len() == 14 && name.starts_with("nc") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` is a bridge by netctl's default naming (`netctl` + the network id).
fn is_default_bridge(name: &str) -> bool {
    name.strip_prefix("netctl")
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
}

mod docker;

impl Agent {
    /// Opens the store, adopts or loads the data plane, and reconciles the kernel.
    pub async fn start(opts: Options) -> anyhow::Result<Shared> {
        use anyhow::Context;
        let store = Store::open(&opts.state_dir)
            .with_context(|| format!("open the store in {}", opts.state_dir.display()))?;
        let state = store.load().context("load the desired state")?;
        let pin_dir = opts.pin_dir.clone();
        let uplink = opts.uplink.clone();
        let (ct_size, ct_timeouts) = (opts.conntrack_size, opts.ct_timeouts_ns());
        let max_services = opts.max_services;
        let dp = tokio::task::spawn_blocking(move || -> anyhow::Result<Datapath> {
            let mut dp = Datapath::open(&pin_dir, ct_size, max_services)
                .with_context(|| format!("set up the data plane under {}", pin_dir.display()))?;
            dp.set_ct_timeouts(ct_timeouts)
                .context("write the conntrack timeouts")?;
            if dp.conntrack_size() != ct_size {
                tracing::warn!(
                    pinned = dp.conntrack_size(),
                    asked = ct_size,
                    "the pinned conntrack table keeps its size; `netctl down` then `netctl up` resizes it"
                );
            }
            if let Some(u) = uplink {
                dp.attach_uplink(&u)
                    .with_context(|| format!("attach to the uplink {u}"))?;
            }
            Ok(dp)
        })
        .await??;
        tracing::info!(
            adopted = dp.adopted,
            networks = state.networks.len(),
            sandboxes = state.sandboxes.len(),
            endpoints = state.endpoints.len(),
            "agent starting"
        );
        reconcile::set_max_services(dp.max_services());
        if dp.max_services() != max_services {
            tracing::warn!(
                pinned = dp.max_services(),
                asked = max_services,
                "the pinned tables keep their size; `netctl down` then `netctl up` resizes them"
            );
        }
        let nl = Netlink::new().await.context("open a netlink connection")?;
        let mut agent = Agent {
            opts,
            state,
            store,
            nl,
            dp,
            ifindex: BTreeMap::new(),
            started: SystemTime::now(),
            reconcile: ReconcileInfo::default(),
            dns: BTreeMap::new(),
            dns_dirty: false,
        };
        agent.full_reconcile().await;
        Ok(Arc::new(Mutex::new(agent)))
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Brings every netlink object, map entry and link to the desired state, and prunes
    /// what netctl made that is no longer desired. Errors on one object do not stop the
    /// others; the last one is reported in `status`.
    pub async fn full_reconcile(&mut self) -> Report {
        let mut report = Report::default();
        let mut last_error = None;
        let reclaimed = self.reclaim_docker_addresses();
        let mut note = |e: String| {
            tracing::warn!("reconcile: {e}");
            last_error = Some(e);
        };
        match reclaimed {
            Ok(n) => report.store.removed += n as u64,
            Err(e) => note(e.to_string()),
        }
        for n in self.state.networks.values() {
            match self.nl.ensure_bridge(&n.bridge, gateway_net(n)).await {
                Ok((_, true)) => report.netlink.added += 1,
                Ok(_) => {}
                Err(e) => note(e.to_string()),
            }
        }
        for s in self.state.sandboxes.values() {
            match netlink::ensure_netns(&s.name).await {
                Ok(true) => report.netlink.added += 1,
                Ok(false) => {}
                Err(e) => note(e.to_string()),
            }
        }
        let endpoints: Vec<Endpoint> = self.state.endpoints.values().cloned().collect();
        for ep in &endpoints {
            if ep.docker.is_some() {
                match self.adopt_docker_veth(ep).await {
                    Ok(changed) => report.netlink.updated += u64::from(changed),
                    Err(e) => note(e.to_string()),
                }
                continue;
            }
            let Some(spec) = veth_spec(&self.state, ep) else {
                continue;
            };
            match self.nl.ensure_veth(&spec).await {
                Ok((idx, changed)) => {
                    self.ifindex.insert(ep.host_ifname.clone(), idx);
                    if changed {
                        report.netlink.updated += 1;
                    }
                }
                Err(e) => {
                    self.ifindex.remove(&ep.host_ifname);
                    note(e.to_string());
                }
            }
        }
        // Prune veths and default-named bridges that no desired object accounts for.
        let wanted_veths: std::collections::BTreeSet<&str> =
            endpoints.iter().map(|e| e.host_ifname.as_str()).collect();
        let wanted_bridges: std::collections::BTreeSet<&str> = self
            .state
            .networks
            .values()
            .map(|n| n.bridge.as_str())
            .collect();
        match self.nl.link_names().await {
            Ok(names) => {
                for name in names {
                    let stale_veth = is_endpoint_veth(&name) && !wanted_veths.contains(&*name);
                    let stale_bridge = is_default_bridge(&name) && !wanted_bridges.contains(&*name);
                    if stale_veth || stale_bridge {
                        match self.nl.delete_link(&name).await {
                            Ok(()) => report.netlink.removed += 1,
                            Err(e) => note(e.to_string()),
                        }
                    }
                }
            }
            Err(e) => note(e.to_string()),
        }
        self.ifindex
            .retain(|k, _| wanted_veths.contains(k.as_str()));
        match self.sync_maps() {
            Ok((maps, links)) => {
                report.maps = maps;
                report.links = links;
            }
            Err(e) => note(e.to_string()),
        }
        // Host sides come up only now that their entries and programs are in place.
        for ep in &endpoints {
            if !self.ifindex.contains_key(&ep.host_ifname) {
                continue;
            }
            match self.nl.ensure_up(&ep.host_ifname).await {
                Ok(true) => report.netlink.updated += 1,
                Ok(false) => {}
                Err(e) => note(e.to_string()),
            }
        }
        if let Err(e) = self.sync_dns().await {
            note(e.to_string());
        }
        self.reconcile.runs += 1;
        self.reconcile.drift_repaired += report.total();
        self.reconcile.last = report;
        self.reconcile.last_error = last_error;
        if report.total() > 0 {
            tracing::info!(?report, "reconciled");
        }
        report
    }

    /// Brings maps and links to the desired state (cheap; run after every change).
    fn sync_maps(&mut self) -> Result<(crate::datapath::Drift, crate::datapath::Drift)> {
        let d = reconcile::desired(&self.state, &self.ifindex);
        Ok(reconcile::apply(&mut self.dp, &d)?)
    }

    /// What the DNS server of `network` answers: its sandboxes (names and aliases) and
    /// services; names of other networks are NXDOMAIN there.
    fn dns_records(&self, network: &str) -> crate::dns::Records {
        use crate::model::ServiceMode;
        let mut per_net: BTreeMap<&str, crate::dns::Records> = BTreeMap::new();
        for ep in self.state.endpoints.values() {
            let r = per_net.entry(&ep.network).or_default();
            // A Docker endpoint's sandbox is not a name (Docker's own DNS has its names).
            let own = ep.docker.is_none().then_some(&ep.sandbox);
            for name in own.into_iter().chain(&ep.aliases) {
                r.names.insert(name.to_lowercase(), vec![ep.ip]);
            }
        }
        for sv in self.state.services.values() {
            let r = per_net.entry(&sv.network).or_default();
            let backends: Vec<std::net::Ipv4Addr> = sv.backends.iter().map(|b| b.ip).collect();
            let name = sv.name.to_lowercase();
            let tasks = format!("tasks.{name}");
            // A service answers before a sandbox of the same name.
            match (sv.mode, sv.vip) {
                (ServiceMode::Vip, Some(vip)) => {
                    r.names.insert(name, vec![vip]);
                }
                _ => {
                    r.names.insert(name.clone(), backends.clone());
                    r.rotate.insert(name);
                }
            }
            r.names.insert(tasks.clone(), backends);
            r.rotate.insert(tasks);
        }
        let mut mine = per_net.remove(network).unwrap_or_default();
        for other in per_net.values() {
            for name in other.names.keys() {
                if !mine.names.contains_key(name) {
                    mine.nxdomain.insert(name.clone());
                }
            }
        }
        mine
    }

    /// Starts, updates and stops the per-network DNS servers to match the state, and
    /// writes each sandbox's resolv.conf.
    async fn sync_dns(&mut self) -> Result<(), crate::dns::DnsError> {
        let gone: Vec<String> = self
            .dns
            .keys()
            .filter(|n| !self.state.networks.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(srv) = self.dns.remove(&n) {
                srv.stop().await;
            }
        }
        let nets: Vec<Network> = self.state.networks.values().cloned().collect();
        let mut first_err = None;
        for n in nets {
            let records = self.dns_records(&n.name);
            match self.dns.get(&n.name) {
                Some(srv) if srv.local_addr().ip() == std::net::IpAddr::V4(n.gateway) => {
                    srv.update(records)
                }
                _ => {
                    if let Some(old) = self.dns.remove(&n.name) {
                        old.stop().await;
                    }
                    // An internal network resolves its own names only.
                    let upstreams = if n.internal {
                        Vec::new()
                    } else {
                        self.opts.dns_upstreams.clone()
                    };
                    let bind = std::net::SocketAddr::from((n.gateway, 53));
                    match crate::dns::DnsServer::start(bind, n.subnet, upstreams, records).await {
                        Ok(srv) => {
                            self.dns.insert(n.name.clone(), srv);
                        }
                        Err(e) => {
                            tracing::warn!(network = %n.name, "dns: {e}");
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
        }
        for s in self.state.sandboxes.values() {
            if let Err(e) = write_resolv_conf(&self.state, &s.name) {
                tracing::warn!(sandbox = %s.name, "resolv.conf: {e}");
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn host_net(&self) -> Result<HostNet> {
        let ours: Vec<String> = self
            .state
            .networks
            .values()
            .map(|n| n.bridge.clone())
            .collect();
        let prefixes = self.nl.host_prefixes(&ours).await?;
        let netns = netlink::list_netns()
            .into_iter()
            .filter(|n| !self.state.sandboxes.contains_key(n))
            .collect();
        let links = self.nl.link_names().await?;
        Ok(HostNet {
            prefixes,
            netns,
            links,
        })
    }

    /// Commits `changes` to the store, then to the in-memory state.
    fn commit(&mut self, changes: &[Change]) -> Result<()> {
        self.store.commit(changes)?;
        self.state.apply(changes);
        Ok(())
    }

    /// The changes that undo `changes` against the current (pre-change) state.
    fn inverse(&self, changes: &[Change]) -> Vec<Change> {
        let mut inv = Vec::new();
        for c in changes.iter().rev() {
            inv.push(match c {
                Change::PutNetwork(n) => match self.state.networks.get(&n.name) {
                    Some(old) => Change::PutNetwork(old.clone()),
                    None => Change::DeleteNetwork(n.name.clone()),
                },
                Change::PutSandbox(s) => match self.state.sandboxes.get(&s.name) {
                    Some(old) => Change::PutSandbox(old.clone()),
                    None => Change::DeleteSandbox(s.name.clone()),
                },
                Change::PutEndpoint(e) => match self.state.endpoints.get(&e.id) {
                    Some(old) => Change::PutEndpoint(old.clone()),
                    None => Change::DeleteEndpoint(e.id.clone()),
                },
                Change::DeleteNetwork(n) => match self.state.networks.get(n) {
                    Some(old) => Change::PutNetwork(old.clone()),
                    None => continue,
                },
                Change::DeleteSandbox(n) => match self.state.sandboxes.get(n) {
                    Some(old) => Change::PutSandbox(old.clone()),
                    None => continue,
                },
                Change::DeleteEndpoint(n) => match self.state.endpoints.get(n) {
                    Some(old) => Change::PutEndpoint(old.clone()),
                    None => continue,
                },
                Change::PutService(sv) => match self.state.services.get(&sv.name) {
                    Some(old) => Change::PutService(old.clone()),
                    None => Change::DeleteService(sv.name.clone()),
                },
                Change::DeleteService(n) => match self.state.services.get(n) {
                    Some(old) => Change::PutService(old.clone()),
                    None => continue,
                },
                Change::PutPool(p) => match self.state.pools.get(&p.id) {
                    Some(old) => Change::PutPool(old.clone()),
                    None => Change::DeletePool(p.id.clone()),
                },
                Change::DeletePool(id) => match self.state.pools.get(id) {
                    Some(old) => Change::PutPool(old.clone()),
                    None => continue,
                },
            });
        }
        inv
    }

    /// Commits a creation, runs `build` for its kernel side, and reverts the commit if that
    /// fails.
    async fn create_with<F>(&mut self, changes: Vec<Change>, build: F) -> Result<()>
    where
        F: AsyncFnOnce(&mut Agent) -> Result<()>,
    {
        let undo = self.inverse(&changes);
        self.commit(&changes)?;
        if let Err(e) = build(self).await {
            tracing::warn!("reverting: {e}");
            if let Err(e2) = self.commit(&undo) {
                tracing::error!("revert failed: {e2}");
            }
            let _ = self.sync_maps();
            return Err(e);
        }
        Ok(())
    }

    fn view_network(&self, n: &Network) -> NetworkView {
        let (total, used) = self.state.address_usage(&n.name).unwrap_or((0, 0));
        NetworkView {
            network: n.clone(),
            endpoints: self
                .state
                .endpoints_of_network(&n.name)
                .into_iter()
                .cloned()
                .collect(),
            addresses_total: total,
            addresses_used: used,
            docker_pool: self
                .state
                .pools
                .values()
                .find(|p| p.subnet == n.subnet)
                .cloned(),
        }
    }

    fn view_sandbox(&self, s: &Sandbox) -> SandboxView {
        SandboxView {
            sandbox: s.clone(),
            netns: format!("/run/netns/{}", s.name),
            endpoints: self
                .state
                .endpoints_of_sandbox(&s.name)
                .into_iter()
                .cloned()
                .collect(),
        }
    }

    pub fn list_networks(&self) -> Vec<NetworkView> {
        self.state
            .networks
            .values()
            .map(|n| self.view_network(n))
            .collect()
    }

    pub fn inspect_network(&self, name: &str) -> Result<NetworkView> {
        let n = self.state.networks.get(name).ok_or(ModelError::NotFound {
            kind: "network",
            name: name.to_owned(),
        })?;
        Ok(self.view_network(n))
    }

    pub async fn create_network(&mut self, req: CreateNetwork) -> Result<NetworkView> {
        let host = self.host_net().await?;
        let changes = self
            .state
            .plan_create_network(&req, &host, &now_rfc3339())?;
        self.create_with(changes, async |a: &mut Agent| {
            let n = a.state.networks[&req.name].clone();
            a.nl.ensure_bridge(&n.bridge, gateway_net(&n)).await?;
            a.sync_maps()?;
            Ok(())
        })
        .await?;
        self.sync_dns_logged().await;
        tracing::info!(network = %req.name, "network created");
        self.inspect_network(&req.name)
    }

    pub async fn remove_network(&mut self, name: &str) -> Result<()> {
        let changes = self.state.plan_remove_network(name)?;
        let bridge = self.state.networks[name].bridge.clone();
        if let Some(srv) = self.dns.remove(name) {
            srv.stop().await;
        }
        self.nl.delete_link(&bridge).await?;
        self.commit(&changes)?;
        self.sync_maps()?;
        self.sync_dns_logged().await;
        tracing::info!(network = %name, "network removed");
        Ok(())
    }

    pub fn list_sandboxes(&self) -> Vec<SandboxView> {
        self.state
            .sandboxes
            .values()
            .map(|s| self.view_sandbox(s))
            .collect()
    }

    pub async fn create_sandbox(&mut self, name: &str) -> Result<SandboxView> {
        let host = self.host_net().await?;
        let changes = self
            .state
            .plan_create_sandbox(name, &host, &now_rfc3339())?;
        let owned = name.to_owned();
        self.create_with(changes, async move |_a: &mut Agent| {
            netlink::ensure_netns(&owned).await?;
            Ok(())
        })
        .await?;
        tracing::info!(sandbox = %name, "sandbox created");
        Ok(self.view_sandbox(&self.state.sandboxes[name].clone()))
    }

    pub async fn remove_sandbox(&mut self, name: &str) -> Result<()> {
        let changes = self.state.plan_remove_sandbox(name)?;
        for ep in self.state.endpoints_of_sandbox(name) {
            self.nl.delete_link(&ep.host_ifname).await?;
        }
        netlink::delete_netns(name).await?;
        remove_resolv_conf(name);
        self.commit(&changes)?;
        self.sync_maps()?;
        self.sync_dns_logged().await;
        tracing::info!(sandbox = %name, "sandbox removed");
        Ok(())
    }

    pub async fn connect(&mut self, req: Connect) -> Result<Endpoint> {
        let changes = self.state.plan_connect(&req)?;
        let Some(Change::PutEndpoint(ep)) = changes
            .iter()
            .find(|c| matches!(c, Change::PutEndpoint(_)))
            .cloned()
        else {
            unreachable!("plan_connect always puts an endpoint");
        };
        let ep2 = ep.clone();
        self.create_with(changes, async move |a: &mut Agent| {
            let spec = veth_spec(&a.state, &ep2).expect("planned endpoint has a network");
            let n = a.state.networks[&ep2.network].clone();
            a.nl.ensure_bridge(&n.bridge, gateway_net(&n)).await?;
            match a.nl.ensure_veth(&spec).await {
                Ok((idx, _)) => {
                    a.ifindex.insert(ep2.host_ifname.clone(), idx);
                }
                Err(e) => {
                    let _ = a.nl.delete_link(&ep2.host_ifname).await;
                    return Err(e.into());
                }
            }
            a.bring_up(&ep2.host_ifname).await
        })
        .await?;
        self.sync_dns_logged().await;
        tracing::info!(network = %ep.network, sandbox = %ep.sandbox, ip = %ep.ip, "connected");
        Ok(ep)
    }

    /// The last step of making an endpoint: its map entry and programs first, then its host
    /// veth comes up, so no packet ever crosses the veth unchecked. On failure the veth is
    /// deleted and the maps forget it.
    async fn bring_up(&mut self, host_ifname: &str) -> Result<()> {
        let ready = match self.sync_maps() {
            Ok(_) => self
                .nl
                .ensure_up(host_ifname)
                .await
                .map(|_| ())
                .map_err(AgentError::from),
            Err(e) => Err(e),
        };
        if ready.is_err() {
            self.ifindex.remove(host_ifname);
            let _ = self.nl.delete_link(host_ifname).await;
            let _ = self.sync_maps();
        }
        ready
    }

    pub async fn disconnect(&mut self, network: &str, sandbox: &str) -> Result<()> {
        let changes = self.state.plan_disconnect(network, sandbox)?;
        for c in &changes {
            if let Change::DeleteEndpoint(id) = c
                && let Some(ep) = self.state.endpoints.get(id)
            {
                self.nl.delete_link(&ep.host_ifname).await?;
                self.ifindex.remove(&ep.host_ifname);
            }
        }
        self.commit(&changes)?;
        self.sync_maps()?;
        self.sync_dns_logged().await;
        tracing::info!(network, sandbox, "disconnected");
        Ok(())
    }

    pub fn list_services(&self) -> Vec<crate::model::Service> {
        self.state.services.values().cloned().collect()
    }

    pub fn inspect_service(&self, name: &str) -> Result<crate::model::Service> {
        Ok(self
            .state
            .services
            .get(name)
            .cloned()
            .ok_or(ModelError::NotFound {
                kind: "service",
                name: name.to_owned(),
            })?)
    }

    /// Commits a change of services and programs only their map entries
    /// (`reconcile::apply_delta`, make-before-break), so that its cost is that of the
    /// services changed, not of every service. A failure to program puts store and maps
    /// back as they were. DNS follows within `DNS_DELAY`.
    async fn service_change(&mut self, changes: Vec<Change>) -> Result<()> {
        let names: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::PutService(s) => Some(s.name.clone()),
                Change::DeleteService(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let old = reconcile::desired_services(&self.state, &refs, &self.ifindex);
        let undo = self.inverse(&changes);
        self.commit(&changes)?;
        let new = reconcile::desired_services(&self.state, &refs, &self.ifindex);
        if let Err(e) = reconcile::apply_delta(&mut self.dp, &old, &new) {
            tracing::warn!("reverting: {e}");
            if let Err(e2) = self.commit(&undo) {
                tracing::error!("revert failed: {e2}");
            }
            let _ = reconcile::apply_delta(&mut self.dp, &new, &old);
            return Err(e.into());
        }
        self.dns_dirty = true;
        Ok(())
    }

    /// `POST /v1/services/batch`: removes the named services and adds services with their
    /// backends, all or nothing, in one store transaction and one programming pass.
    pub async fn batch_services(
        &mut self,
        add: Vec<crate::model::BatchService>,
        remove: Vec<String>,
    ) -> Result<(usize, usize)> {
        let mut changes = Vec::with_capacity(add.len() + remove.len());
        for name in &remove {
            changes.extend(self.state.plan_remove_service(name)?);
        }
        let after_removal = if remove.is_empty() {
            None
        } else {
            let mut s = self.state.clone();
            s.apply(&changes);
            Some(s)
        };
        let base = after_removal.as_ref().unwrap_or(&self.state);
        changes.extend(base.plan_add_services(&add, &now_rfc3339())?);
        self.service_change(changes).await?;
        tracing::info!(added = add.len(), removed = remove.len(), "services batch");
        Ok((add.len(), remove.len()))
    }

    /// Updates the DNS servers if records changed since the last update.
    pub async fn refresh_dns(&mut self) {
        if std::mem::take(&mut self.dns_dirty) {
            self.sync_dns_logged().await;
        }
    }

    /// DNS follows every change; a DNS failure is logged and shown in `status`, it does not
    /// fail the change (the data plane is already programmed).
    async fn sync_dns_logged(&mut self) {
        if let Err(e) = self.sync_dns().await {
            self.reconcile.last_error = Some(format!("dns: {e}"));
        }
    }

    pub async fn add_service(
        &mut self,
        req: crate::model::AddService,
    ) -> Result<crate::model::Service> {
        let changes = self.state.plan_add_service(&req, &now_rfc3339())?;
        self.service_change(changes).await?;
        tracing::info!(service = %req.name, "service added");
        self.inspect_service(&req.name)
    }

    pub async fn remove_service(&mut self, name: &str) -> Result<()> {
        let changes = self.state.plan_remove_service(name)?;
        self.service_change(changes).await?;
        tracing::info!(service = %name, "service removed");
        Ok(())
    }

    pub async fn attach(&mut self, service: &str, target: &str) -> Result<crate::model::Service> {
        let changes = self.state.plan_attach(service, target)?;
        self.service_change(changes).await?;
        tracing::info!(service, target, "backend attached");
        self.inspect_service(service)
    }

    pub async fn detach(&mut self, service: &str, target: &str) -> Result<crate::model::Service> {
        let changes = self.state.plan_detach(service, target)?;
        self.service_change(changes).await?;
        tracing::info!(service, target, "backend detached");
        self.inspect_service(service)
    }

    pub fn status(&self) -> Result<Status> {
        Ok(Status {
            agent: AgentInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                node: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                state_dir: self.opts.state_dir.display().to_string(),
                store: self.store.path().display().to_string(),
                socket: self.opts.socket.display().to_string(),
                pin_dir: self.dp.root().display().to_string(),
                uplink: self.opts.uplink.clone(),
                adopted: self.dp.adopted,
                started: self
                    .started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            },
            networks: self.state.networks.len(),
            sandboxes: self.state.sandboxes.len(),
            endpoints: self.state.endpoints.len(),
            services: self.state.services.len(),
            programs: self.dp.attachments()?,
            maps: self.dp.map_usage(),
            reconcile: self.reconcile.clone(),
        })
    }

    pub fn stats(&self) -> Result<Stats> {
        Ok(self.dp.stats()?)
    }

    /// `netctl down`: removes everything netctl put in the kernel (veths, bridges, sandbox
    /// namespaces, links, maps, programs). The store keeps the desired state, so the next
    /// `netctl up` builds it all again.
    pub async fn teardown(&mut self) -> Result<()> {
        let eps: Vec<String> = self
            .state
            .endpoints
            .values()
            .map(|e| e.host_ifname.clone())
            .collect();
        for name in eps {
            self.nl.delete_link(&name).await?;
        }
        let bridges: Vec<String> = self
            .state
            .networks
            .values()
            .map(|n| n.bridge.clone())
            .collect();
        for b in bridges {
            self.nl.delete_link(&b).await?;
        }
        for (_, srv) in std::mem::take(&mut self.dns) {
            srv.stop().await;
        }
        let sandboxes: Vec<String> = self.state.sandboxes.keys().cloned().collect();
        for s in sandboxes {
            netlink::delete_netns(&s).await?;
            remove_resolv_conf(&s);
        }
        Datapath::teardown(&self.opts.pin_dir)?;
        tracing::info!("removed everything netctl put in the kernel");
        Ok(())
    }
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` bind-mounts over
/// /etc/resolv.conf (ip-netns(8)).
fn resolv_conf_path(sandbox: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns")
        .join(sandbox)
        .join("resolv.conf")
}

/// Points the sandbox's resolver at the DNS server of its first network (the one on eth0).
fn write_resolv_conf(state: &State, sandbox: &str) -> std::io::Result<()> {
    let mut eps = state.endpoints_of_sandbox(sandbox);
    eps.sort_by_key(|e| {
        e.ifname
            .trim_start_matches("eth")
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
    let Some(net) = eps.first().and_then(|e| state.networks.get(&e.network)) else {
        remove_resolv_conf(sandbox);
        return Ok(());
    };
    let want = format!(
        "# written by netctl: the embedded DNS server of network {}\nnameserver {}\noptions ndots:0\n",
        net.name, net.gateway
    );
    let path = resolv_conf_path(sandbox);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, want)?;
    std::fs::rename(tmp, path)
}

fn remove_resolv_conf(sandbox: &str) {
    let path = resolv_conf_path(sandbox);
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// How far behind a service change the DNS answers may be.
pub const DNS_DELAY: Duration = Duration::from_millis(200);

/// Brings DNS up to date after service changes, off the request path: at 100k services a
/// record rebuild costs more than the change itself.
pub fn spawn_dns_updater(agent: Shared) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(DNS_DELAY);
        loop {
            t.tick().await;
            agent.lock().await.refresh_dns().await;
        }
    });
}

/// Runs the periodic resync until the process ends.
pub fn spawn_resync(agent: Shared, every: Duration) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.tick().await;
        loop {
            t.tick().await;
            agent.lock().await.full_reconcile().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_794), (2026, 12, 7));
    }

    #[test]
    fn naming_of_owned_links() {
        assert!(is_endpoint_veth("nc0123456789ab"));
        assert!(!is_endpoint_veth("nc0123456789"));
        assert!(!is_endpoint_veth("ncxyz3456789ab"));
        assert!(is_default_bridge("netctl12"));
        assert!(!is_default_bridge("netctl"));
        assert!(!is_default_bridge("netctlx"));
    }
}
