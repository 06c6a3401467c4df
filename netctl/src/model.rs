//! Desired state: networks, sandboxes and endpoints, and the validation of every change.
//!
//! Every API change is planned here against the current [`State`] (pure functions, no I/O),
//! which either yields a list of [`Change`]s or a [`ModelError`] naming the field and value.
//! The agent commits the changes to the store in one transaction, applies them to its
//! in-memory `State` with [`State::apply`], then reconciles the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ipam;

pub mod docker;

/// The bridge name option Docker users pass (`-o com.docker.network.bridge.name=NAME`).
pub const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";

/// A netctl network: an IPv4 subnet on a Linux bridge, with its own IPAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Numeric id used in the kernel maps (never 0, never reused while the network exists).
    pub id: u32,
    pub name: String,
    /// Only "bridge" for now.
    pub driver: String,
    pub subnet: Ipv4Net,
    /// Endpoint addresses are allocated from here (defaults to the subnet).
    pub ip_range: Option<Ipv4Net>,
    pub gateway: Ipv4Addr,
    /// Reserved addresses (`--aux-address KEY=IP`), never allocated.
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    /// Driver options (`-o KEY=VALUE`), kept as given.
    pub options: BTreeMap<String, String>,
    pub internal: bool,
    /// The Linux bridge that holds the gateway address.
    pub bridge: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// Set when Docker created this network through the plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerNetwork>,
}

/// What netctl keeps of a network Docker created (`docker network create -d netctl`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetwork {
    /// Docker's network id (64 hex digits).
    pub id: String,
}

impl Network {
    /// The name a Docker network has until the agent learns its Docker name.
    pub fn provisional_name(docker_id: &str) -> String {
        format!("docker-{}", &docker_id[..docker_id.len().min(12)])
    }
}

/// What netctl keeps of an endpoint Docker created. Docker owns the container side: it moves
/// the peer (`peer`) into the container's namespace at Join and configures it there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEndpoint {
    /// The peer's name in the agent's namespace until Docker moves it.
    pub peer: String,
    /// The container's namespace (Docker's SandboxKey) while joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_key: Option<String>,
}

/// An address pool the IPAM plugin gave Docker (`RequestPool`), with the addresses it handed
/// out of it (`RequestAddress`). A network Docker then creates on the pool's subnet is a
/// netctl network; the pool's addresses and the network's endpoints and VIPs never collide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// `netctl/<subnet>`.
    pub id: String,
    pub subnet: Ipv4Net,
    /// Docker's `--ip-range`: addresses without a request come from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<Ipv4Net>,
    /// Addresses handed out (gateway, aux addresses, endpoints), by what asked for them.
    pub addresses: BTreeMap<Ipv4Addr, String>,
    /// When each address was handed out (seconds since the epoch), so that one whose
    /// answer a crash lost can be reclaimed ([`State::plan_reclaim_addresses`]).
    #[serde(default)]
    pub handed_out: BTreeMap<Ipv4Addr, u64>,
    pub created: String,
}

/// A sandbox: a named network namespace (`/run/netns/NAME`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub name: String,
    pub created: String,
}

/// An endpoint: a veth pair joining a sandbox to a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// 16 hex digits, random.
    pub id: String,
    pub network: String,
    pub sandbox: String,
    pub ip: Ipv4Addr,
    /// `02:42:` followed by the four bytes of the address, as Docker does.
    pub mac: String,
    /// The interface name in the sandbox: eth0, eth1, ... (lowest free index).
    pub ifname: String,
    /// The host-side veth: `nc` + the first 12 hex digits of the id.
    pub host_ifname: String,
    pub aliases: Vec<String>,
    /// Whether this endpoint gave the sandbox its default route (first network connected).
    pub default_route: bool,
    /// Set when Docker created this endpoint through the plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerEndpoint>,
}

/// How a service is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// A virtual IP, balanced in the data plane; DNS answers the VIP.
    Vip,
    /// No VIP; DNS answers the backends' addresses in rotating order.
    Dnsrr,
}

/// A transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// One published port of a service: `VIP:port` goes to `backend:target` over `proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    pub target: u16,
    pub proto: Proto,
}

/// A backend: an endpoint of the service's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Numeric id used in the kernel maps (unique over all services, never 0).
    pub id: u32,
    /// The endpoint id.
    pub endpoint: String,
    pub sandbox: String,
    pub ip: Ipv4Addr,
}

/// A service on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Numeric id used in the kernel maps (its row of the consistent-hash table; never 0,
    /// never shared by two services that exist at once).
    pub id: u32,
    pub name: String,
    pub network: String,
    pub mode: ServiceMode,
    /// Some in mode vip (from the network's IPAM unless given), None in dnsrr.
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<PortSpec>,
    /// In the order they were attached.
    pub backends: Vec<Backend>,
    pub created: String,
}

/// The whole desired state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub networks: BTreeMap<String, Network>,
    pub sandboxes: BTreeMap<String, Sandbox>,
    /// Keyed by endpoint id.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Keyed by service name.
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    /// IPAM pools handed to Docker, keyed by pool id.
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
}

/// One change to the desired state; a planned operation is a list of these, committed to the
/// store in one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    PutNetwork(Network),
    DeleteNetwork(String),
    PutSandbox(Sandbox),
    DeleteSandbox(String),
    PutEndpoint(Endpoint),
    DeleteEndpoint(String),
    PutService(Service),
    DeleteService(String),
    PutPool(Pool),
    DeletePool(String),
}

/// `netctl service add` as the API receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddService {
    pub name: String,
    pub network: String,
    /// `PORT[:TARGET][/tcp|/udp]` strings as typed.
    #[serde(default)]
    pub ports: Vec<String>,
    /// "vip" (default) or "dnsrr".
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub vip: Option<String>,
}

/// One service of a batch (`POST /v1/services/batch`): `service add` plus the sandboxes to
/// attach as backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchService {
    #[serde(flatten)]
    pub service: AddService,
    #[serde(default)]
    pub backends: Vec<String>,
}

/// Who holds an address of a network.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AddrUse {
    /// The gateway or an aux address.
    Reserved,
    /// An endpoint of this sandbox.
    Endpoint(String),
    /// The VIP of this service.
    Vip(String),
}

/// Lookups planning needs, built once per operation (or once per batch) so that a check or
/// an allocation is a set lookup, not a scan of every endpoint and service.
#[derive(Clone, Debug, Default)]
pub struct Index {
    used: BTreeMap<String, BTreeMap<Ipv4Addr, AddrUse>>,
    service_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
    /// Where the next search for a free id or address may start (everything below is
    /// taken); only moves up as long as nothing is freed, which holds within one batch.
    next_service_id: u32,
    next_backend_id: u32,
    next_addr: BTreeMap<String, Ipv4Addr>,
}

impl Index {
    pub fn new(state: &State) -> Index {
        let mut idx = Index {
            next_service_id: 1,
            next_backend_id: 1,
            ..Default::default()
        };
        for n in state.networks.values() {
            let used = idx.used.entry(n.name.clone()).or_default();
            used.insert(n.gateway, AddrUse::Reserved);
            for a in n.aux_addresses.values() {
                used.insert(*a, AddrUse::Reserved);
            }
        }
        for e in state.endpoints.values() {
            idx.used
                .entry(e.network.clone())
                .or_default()
                .insert(e.ip, AddrUse::Endpoint(e.sandbox.clone()));
        }
        for sv in state.services.values() {
            idx.add_service(sv);
        }
        for p in state.pools.values() {
            if let Some(n) = state.networks.values().find(|n| n.subnet == p.subnet) {
                let used = idx.used.entry(n.name.clone()).or_default();
                for a in p.addresses.keys() {
                    used.entry(*a).or_insert(AddrUse::Reserved);
                }
            }
        }
        idx
    }

    fn add_service(&mut self, sv: &Service) {
        self.service_ids.insert(sv.id);
        if let Some(vip) = sv.vip {
            self.used
                .entry(sv.network.clone())
                .or_default()
                .insert(vip, AddrUse::Vip(sv.name.clone()));
        }
        self.backend_ids.extend(sv.backends.iter().map(|b| b.id));
    }

    /// The lowest id >= 1 not in `set`, starting the search at `*hint`.
    fn take_id(set: &mut BTreeSet<u32>, hint: &mut u32) -> u32 {
        let mut cand = (*hint).max(1);
        for &u in set.range(cand..) {
            if u > cand {
                break;
            }
            cand += 1;
        }
        set.insert(cand);
        *hint = cand + 1;
        cand
    }

    fn take_service_id(&mut self) -> u32 {
        Self::take_id(&mut self.service_ids, &mut self.next_service_id)
    }

    fn take_backend_id(&mut self) -> u32 {
        Self::take_id(&mut self.backend_ids, &mut self.next_backend_id)
    }

    fn use_of(&self, network: &str, ip: Ipv4Addr) -> Option<&AddrUse> {
        self.used.get(network)?.get(&ip)
    }
}

/// `netctl network create` as the API receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateNetwork {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub ip_range: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    /// `KEY=IP` strings as typed.
    #[serde(default)]
    pub aux_addresses: Vec<String>,
    /// `KEY=VALUE` strings as typed.
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub internal: bool,
}

/// `netctl network connect` as the API receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    pub network: String,
    pub sandbox: String,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// What the host already uses, which a new subnet must not overlap.
#[derive(Clone, Debug, Default)]
pub struct HostNet {
    /// Destinations of every route in the agent's network namespace, and the prefixes of
    /// every address on its interfaces, except those on netctl's own bridges.
    pub prefixes: Vec<Ipv4Net>,
    /// Names of network namespaces that exist already (in /run/netns).
    pub netns: Vec<String>,
    /// Interface names that exist already in the agent's namespace.
    pub links: Vec<String>,
}

/// A rejected change. `Display` is the one line the user sees; it names the field and the
/// value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("{field}: invalid value {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{0}")]
    Conflict(String),
}

impl ModelError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            ModelError::Invalid { .. } => 400,
            ModelError::Exists { .. } | ModelError::Conflict(_) => 409,
            ModelError::NotFound { .. } => 404,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Planning.
// ---------------------------------------------------------------------------------------------

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn not_found(kind: &'static str, name: &str) -> ModelError {
    ModelError::NotFound {
        kind,
        name: name.to_string(),
    }
}

/// Checks a network, sandbox, alias or service name: 1..=64 characters, the first an ASCII
/// letter or digit, the rest ASCII letters, digits, `_`, `.` or `-`. Such names are safe in
/// paths (`/run/netns/NAME`): no `/`, no NUL, no spaces, never `.` or `..`.
pub fn validate_name(field: &'static str, value: &str) -> Result<(), ModelError> {
    let mut chars = value.chars();
    let Some(first) = chars.next() else {
        return Err(invalid(field, value, "must not be empty"));
    };
    if !first.is_ascii_alphanumeric() {
        return Err(invalid(
            field,
            value,
            "must start with an ASCII letter or digit",
        ));
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(invalid(
            field,
            value,
            format!("character {c:?} is not allowed (use A-Z a-z 0-9 _ . -)"),
        ));
    }
    if value.len() > 64 {
        return Err(invalid(field, value, "must be at most 64 characters"));
    }
    Ok(())
}

/// Docker's MAC for an address: `02:42` followed by the four address bytes.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// `02:42:0a:00:00:02` (lower case).
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses six colon-separated pairs of hex digits (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses an IPv4 CIDR whose host bits are clear (Docker rejects `10.0.0.1/24`).
fn parse_prefix(field: &'static str, s: &str) -> Result<Ipv4Net, ModelError> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| invalid(field, s, "not an IPv4 CIDR (e.g. 10.1.0.0/24)"))?;
    if net.trunc() != net {
        return Err(invalid(
            field,
            s,
            format!("host bits are set; it should be {}", net.trunc()),
        ));
    }
    Ok(net)
}

fn parse_addr(field: &'static str, s: &str) -> Result<Ipv4Addr, ModelError> {
    s.parse()
        .map_err(|_| invalid(field, s, "not an IPv4 address (e.g. 10.1.0.2)"))
}

/// Checks that `ip` is a host address of `subnet` (inside it, neither network nor broadcast).
fn check_host_addr(
    field: &'static str,
    value: &str,
    ip: Ipv4Addr,
    subnet: Ipv4Net,
) -> Result<(), ModelError> {
    if !subnet.contains(&ip) {
        return Err(invalid(field, value, format!("not inside subnet {subnet}")));
    }
    if ip == subnet.network() {
        return Err(invalid(
            field,
            value,
            format!("is the network address of subnet {subnet}"),
        ));
    }
    if ip == subnet.broadcast() {
        return Err(invalid(
            field,
            value,
            format!("is the broadcast address of subnet {subnet}"),
        ));
    }
    Ok(())
}

/// Linux interface names: 1..=15 characters of `[A-Za-z0-9_.-]`.
fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `netctl<digits>` is reserved for default bridge names, so that a name given with
/// `-o com.docker.network.bridge.name` can never collide with a later network's default.
fn is_default_bridge_name(s: &str) -> bool {
    s.strip_prefix("netctl")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
}

fn ifname_index(ifname: &str) -> Option<u32> {
    ifname.strip_prefix("eth")?.parse().ok()
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn not_on_network(target: &str, network: &str, service: &str) -> ModelError {
    ModelError::Conflict(format!(
        "sandbox {target:?} is not connected to network {network:?} (the network of \
         service {service:?}); connect it first (netctl network connect {network} {target})"
    ))
}

fn already_backend(target: &str, service: &str) -> ModelError {
    ModelError::Conflict(format!(
        "{target} is already a backend of service {service:?}"
    ))
}

/// Parses `PORT[:TARGET][/tcp|/udp]` (field "port"): both ports 1..=65535, TARGET defaults
/// to PORT, the protocol to tcp (either case).
pub fn parse_port(s: &str) -> Result<PortSpec, ModelError> {
    const FORM: &str = "expected PORT[:TARGET][/tcp|/udp], e.g. 80, 80:8080 or 53/udp";
    if s.is_empty() {
        return Err(invalid("port", s, FORM));
    }
    let (ports, proto) = match s.split_once('/') {
        Some((ports, proto)) => {
            let proto = match proto.to_ascii_lowercase().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                "" => return Err(invalid("port", s, "the protocol after '/' is empty")),
                p if p.contains('/') => {
                    return Err(invalid(
                        "port",
                        s,
                        format!("more than one protocol; {FORM}"),
                    ));
                }
                _ => {
                    return Err(invalid(
                        "port",
                        s,
                        format!("protocol {proto:?} is not supported (use tcp or udp)"),
                    ));
                }
            };
            (ports, proto)
        }
        None => (s, Proto::Tcp),
    };
    let number = |what: &str, n: &str| -> Result<u16, ModelError> {
        if n.is_empty() {
            return Err(invalid("port", s, format!("the {what} is empty; {FORM}")));
        }
        if !n.bytes().all(|c| c.is_ascii_digit()) {
            return Err(invalid(
                "port",
                s,
                format!("the {what} {n:?} is not a number; {FORM}"),
            ));
        }
        match n.parse::<u64>() {
            Ok(v @ 1..=65535) => Ok(v as u16),
            _ => Err(invalid(
                "port",
                s,
                format!("the {what} {n} is out of range 1-65535"),
            )),
        }
    };
    let (port, target) = match ports.split_once(':') {
        Some((p, t)) => (number("port", p)?, number("target port", t)?),
        None => {
            let p = number("port", ports)?;
            (p, p)
        }
    };
    Ok(PortSpec {
        port,
        target,
        proto,
    })
}

impl State {
    /// Applies `changes` in order (puts replace, deletes of unknown keys are no-ops).
    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::PutNetwork(n) => {
                    self.networks.insert(n.name.clone(), n.clone());
                }
                Change::DeleteNetwork(name) => {
                    self.networks.remove(name);
                }
                Change::PutSandbox(s) => {
                    self.sandboxes.insert(s.name.clone(), s.clone());
                }
                Change::DeleteSandbox(name) => {
                    self.sandboxes.remove(name);
                }
                Change::PutEndpoint(e) => {
                    self.endpoints.insert(e.id.clone(), e.clone());
                }
                Change::DeleteEndpoint(id) => {
                    self.endpoints.remove(id);
                }
                Change::PutService(sv) => {
                    self.services.insert(sv.name.clone(), sv.clone());
                }
                Change::DeleteService(name) => {
                    self.services.remove(name);
                }
                Change::PutPool(p) => {
                    self.pools.insert(p.id.clone(), p.clone());
                }
                Change::DeletePool(id) => {
                    self.pools.remove(id);
                }
            }
        }
    }

    /// Plans `netctl network create`.
    pub fn plan_create_network(
        &self,
        req: &CreateNetwork,
        host: &HostNet,
        now: &str,
    ) -> Result<Vec<Change>, ModelError> {
        self.plan_network(req, host, now, None)
    }

    /// `netctl network create`, or Docker's CreateNetwork when `docker` (Docker's network id)
    /// is given: then the subnet may be the subnet of an IPAM pool netctl handed Docker.
    pub(crate) fn plan_network(
        &self,
        req: &CreateNetwork,
        host: &HostNet,
        now: &str,
        docker: Option<&str>,
    ) -> Result<Vec<Change>, ModelError> {
        validate_name("name", &req.name)?;
        if self.networks.contains_key(&req.name) {
            return Err(ModelError::Exists {
                kind: "network",
                name: req.name.clone(),
            });
        }
        let driver = req.driver.as_deref().unwrap_or("bridge");
        if driver != "bridge" {
            return Err(invalid(
                "driver",
                driver,
                "only the \"bridge\" driver is supported",
            ));
        }

        let subnet = match req.subnet.as_deref() {
            Some(s) => {
                let own_pool = docker.and_then(|_| s.parse::<Ipv4Net>().ok());
                self.check_free_subnet("subnet", s, host, own_pool)?
            }
            None => {
                let taken = self.taken_subnets(host);
                ipam::choose_subnet(&taken).ok_or_else(|| {
                    ModelError::Conflict(
                        "no free subnet left in the default pools (172.17.0.0/16 to \
                         172.31.0.0/16, 192.168.0.0/16 as /20s); pass --subnet"
                            .to_string(),
                    )
                })?
            }
        };

        let ip_range = match req.ip_range.as_deref() {
            Some(s) => {
                let r = parse_prefix("ip-range", s)?;
                if !subnet.contains(&r) {
                    return Err(invalid(
                        "ip-range",
                        s,
                        format!("not inside subnet {subnet}"),
                    ));
                }
                Some(r)
            }
            None => None,
        };

        let gateway = match req.gateway.as_deref() {
            Some(s) => {
                let gw = parse_addr("gateway", s)?;
                check_host_addr("gateway", s, gw, subnet)?;
                gw
            }
            // prefix_len <= 30 was checked (or holds for the pools).
            None => ipam::first_host(subnet).expect("subnet has host addresses"),
        };

        let mut aux_addresses: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
        for s in &req.aux_addresses {
            let (key, val) = s
                .split_once('=')
                .ok_or_else(|| invalid("aux-address", s, "expected KEY=IP"))?;
            if key.is_empty() {
                return Err(invalid("aux-address", s, "the key is empty"));
            }
            let ip: Ipv4Addr = val
                .parse()
                .map_err(|_| invalid("aux-address", s, "not an IPv4 address after '='"))?;
            check_host_addr("aux-address", s, ip, subnet)?;
            if ip == gateway {
                return Err(invalid("aux-address", s, format!("{ip} is the gateway")));
            }
            if aux_addresses.contains_key(key) {
                return Err(invalid("aux-address", s, format!("duplicate key {key:?}")));
            }
            if let Some((k, _)) = aux_addresses.iter().find(|(_, a)| **a == ip) {
                return Err(invalid(
                    "aux-address",
                    s,
                    format!("{ip} is already reserved as {k:?}"),
                ));
            }
            aux_addresses.insert(key.to_string(), ip);
        }

        // Options: `KEY=VALUE`; a repeated key keeps the last value, as Docker does.
        let mut options: BTreeMap<String, String> = BTreeMap::new();
        for s in &req.options {
            let (key, val) = s
                .split_once('=')
                .ok_or_else(|| invalid("opt", s, "expected KEY=VALUE"))?;
            if key.is_empty() {
                return Err(invalid("opt", s, "the key is empty"));
            }
            options.insert(key.to_string(), val.to_string());
        }

        let id = (1u32..)
            .find(|i| !self.networks.values().any(|n| n.id == *i))
            .expect("fewer than 2^32 networks");

        let bridge = match options.get(OPT_BRIDGE_NAME) {
            Some(b) => {
                let value = format!("{OPT_BRIDGE_NAME}={b}");
                if !valid_ifname(b) {
                    return Err(invalid(
                        "opt",
                        &value,
                        "bridge name must be 1 to 15 characters of A-Z a-z 0-9 _ . -",
                    ));
                }
                if is_default_bridge_name(b) {
                    return Err(invalid(
                        "opt",
                        &value,
                        "names netctl<N> are reserved for netctl's default bridge names",
                    ));
                }
                if let Some(n) = self.networks.values().find(|n| n.bridge == *b) {
                    return Err(invalid(
                        "opt",
                        &value,
                        format!("bridge {b:?} is already used by network {:?}", n.name),
                    ));
                }
                if host.links.iter().any(|l| l == b) {
                    return Err(invalid(
                        "opt",
                        &value,
                        format!("an interface named {b:?} already exists on the host"),
                    ));
                }
                b.clone()
            }
            None => {
                let b = format!("netctl{id}");
                if let Some(n) = self.networks.values().find(|n| n.bridge == b) {
                    return Err(ModelError::Conflict(format!(
                        "default bridge name {b:?} is already used by network {:?}; pass -o {OPT_BRIDGE_NAME}=NAME",
                        n.name
                    )));
                }
                if host.links.contains(&b) {
                    return Err(ModelError::Conflict(format!(
                        "an interface named {b:?} (the default bridge name for this network) \
                         already exists on the host and netctl does not own it; delete it \
                         (ip link del {b}) or pass -o {OPT_BRIDGE_NAME}=NAME"
                    )));
                }
                b
            }
        };

        Ok(vec![Change::PutNetwork(Network {
            id,
            name: req.name.clone(),
            driver: driver.to_string(),
            subnet,
            ip_range,
            gateway,
            aux_addresses,
            options,
            internal: req.internal,
            bridge,
            created: now.to_string(),
            docker: docker.map(|id| DockerNetwork { id: id.to_string() }),
        })])
    }

    /// Subnets a new network or pool may not overlap: the host's routes and addresses (not
    /// its default route, as in Docker), netctl's networks and the pools handed to Docker.
    fn taken_subnets(&self, host: &HostNet) -> Vec<Ipv4Net> {
        let mut taken: Vec<Ipv4Net> = host
            .prefixes
            .iter()
            .copied()
            .filter(|p| p.prefix_len() > 0)
            .collect();
        taken.extend(self.networks.values().map(|n| n.subnet));
        taken.extend(self.pools.values().map(|p| p.subnet));
        taken
    }

    /// A subnet given as `field` = `s` for a new network or pool: short enough for a gateway
    /// and endpoints, and overlapping nothing in [`State::taken_subnets`] except `own_pool`
    /// (the pool a Docker network is created on).
    fn check_free_subnet(
        &self,
        field: &'static str,
        s: &str,
        host: &HostNet,
        own_pool: Option<Ipv4Net>,
    ) -> Result<Ipv4Net, ModelError> {
        let subnet = parse_prefix(field, s)?;
        if subnet.prefix_len() > 30 {
            return Err(invalid(
                field,
                s,
                "prefix is too long; use /30 or shorter to leave room for a gateway and endpoints",
            ));
        }
        if let Some(n) = self
            .networks
            .values()
            .find(|n| ipam::overlaps(n.subnet, subnet))
        {
            return Err(invalid(
                field,
                s,
                format!("overlaps subnet {} of network {:?}", n.subnet, n.name),
            ));
        }
        if let Some(p) = host
            .prefixes
            .iter()
            .find(|p| p.prefix_len() > 0 && ipam::overlaps(**p, subnet))
        {
            return Err(invalid(
                field,
                s,
                format!("overlaps host route or address {p}; choose another subnet"),
            ));
        }
        if let Some(p) = self
            .pools
            .values()
            .find(|p| ipam::overlaps(p.subnet, subnet) && Some(p.subnet) != own_pool)
        {
            return Err(invalid(
                field,
                s,
                format!("overlaps pool {}, handed to Docker", p.id),
            ));
        }
        Ok(subnet)
    }

    /// Plans `netctl network rm`: refused while endpoints remain, then while services remain
    /// (endpoints are checked first).
    pub fn plan_remove_network(&self, name: &str) -> Result<Vec<Change>, ModelError> {
        if !self.networks.contains_key(name) {
            return Err(not_found("network", name));
        }
        let eps = self.endpoints_of_network(name);
        if !eps.is_empty() {
            return Err(ModelError::Conflict(format!(
                "network {name:?} has {} endpoints; disconnect them first \
                 (netctl network disconnect {name} SANDBOX)",
                eps.len()
            )));
        }
        let svcs = self.services_of_network(name);
        if !svcs.is_empty() {
            let names: Vec<&str> = svcs.iter().map(|sv| sv.name.as_str()).collect();
            return Err(ModelError::Conflict(format!(
                "network {name:?} has {} services ({}); remove them first \
                 (netctl service rm NAME)",
                svcs.len(),
                names.join(", ")
            )));
        }
        Ok(vec![Change::DeleteNetwork(name.to_string())])
    }

    /// Plans `netctl sandbox create`.
    pub fn plan_create_sandbox(
        &self,
        name: &str,
        host: &HostNet,
        now: &str,
    ) -> Result<Vec<Change>, ModelError> {
        validate_name("name", name)?;
        if self.sandboxes.contains_key(name) {
            return Err(ModelError::Exists {
                kind: "sandbox",
                name: name.to_string(),
            });
        }
        if host.netns.iter().any(|n| n == name) {
            return Err(ModelError::Exists {
                kind: "network namespace not owned by netctl (/run/netns)",
                name: name.to_string(),
            });
        }
        Ok(vec![Change::PutSandbox(Sandbox {
            name: name.to_string(),
            created: now.to_string(),
        })])
    }

    /// Removing a sandbox also removes its endpoints: first a PutService for every service
    /// that loses a backend, then DeleteEndpoint for each endpoint, then DeleteSandbox.
    pub fn plan_remove_sandbox(&self, name: &str) -> Result<Vec<Change>, ModelError> {
        if !self.sandboxes.contains_key(name) {
            return Err(not_found("sandbox", name));
        }
        let eps = self.endpoints_of_sandbox(name);
        let ids: BTreeSet<&str> = eps.iter().map(|e| e.id.as_str()).collect();
        let mut changes = self.drop_backends(&ids);
        changes.extend(eps.iter().map(|e| Change::DeleteEndpoint(e.id.clone())));
        changes.push(Change::DeleteSandbox(name.to_string()));
        Ok(changes)
    }

    /// A PutService for every service with a backend on one of the endpoints `ids`, with
    /// those backends removed (Docker removes a task's backend when the task leaves).
    fn drop_backends(&self, ids: &BTreeSet<&str>) -> Vec<Change> {
        self.services
            .values()
            .filter(|sv| {
                sv.backends
                    .iter()
                    .any(|b| ids.contains(b.endpoint.as_str()))
            })
            .map(|sv| {
                let mut sv = sv.clone();
                sv.backends.retain(|b| !ids.contains(b.endpoint.as_str()));
                Change::PutService(sv)
            })
            .collect()
    }

    /// (service, VIP) of the services on `network` that have a VIP.
    fn vips_of_network<'a>(
        &'a self,
        network: &'a str,
    ) -> impl Iterator<Item = (&'a Service, Ipv4Addr)> + 'a {
        self.services
            .values()
            .filter(move |sv| sv.network == network)
            .filter_map(|sv| sv.vip.map(|vip| (sv, vip)))
    }

    /// The lowest free address of `net`'s allocation range (ip-range or subnet), as for an
    /// endpoint or a VIP.
    fn allocate_address(&self, net: &Network) -> Result<Ipv4Addr, ModelError> {
        self.allocate_address_in(net, &mut Index::new(self), None)
    }

    /// Allocates from `idx` (and records the use), so that a batch allocates without
    /// rescanning.
    fn allocate_address_in(
        &self,
        net: &Network,
        idx: &mut Index,
        owner: Option<AddrUse>,
    ) -> Result<Ipv4Addr, ModelError> {
        let empty = BTreeMap::new();
        let used = idx.used.get(&net.name).unwrap_or(&empty);
        let hint = idx.next_addr.get(&net.name).copied();
        let found = ipam::alloc_bounds(net.subnet, net.ip_range).and_then(|(lo, hi)| {
            let mut cand = u32::from(hint.map_or(lo, |h| h.max(lo)));
            for u in used
                .range(Ipv4Addr::from(cand)..=hi)
                .map(|(a, _)| u32::from(*a))
            {
                if u > cand {
                    break;
                }
                cand += 1;
            }
            (cand <= u32::from(hi)).then(|| Ipv4Addr::from(cand))
        });
        if let (Some(ip), Some(owner)) = (found, owner) {
            idx.used
                .entry(net.name.clone())
                .or_default()
                .insert(ip, owner);
            idx.next_addr
                .insert(net.name.clone(), Ipv4Addr::from(u32::from(ip) + 1));
        }
        found.ok_or_else(|| {
            let pool = match net.ip_range {
                Some(r) => format!("{r} (ip-range of {})", net.subnet),
                None => net.subnet.to_string(),
            };
            ModelError::Conflict(format!(
                "network {:?}: no free address left in {pool}",
                net.name
            ))
        })
    }

    /// Checks a static address (`--ip` of connect, `--vip` of service add) for `net`: a host
    /// address of the subnet that is neither the gateway, nor an aux address, nor used by an
    /// endpoint or a service VIP. Errors are `Invalid` for `field`.
    fn check_static_addr(
        &self,
        field: &'static str,
        s: &str,
        net: &Network,
    ) -> Result<Ipv4Addr, ModelError> {
        let ip = self.check_host_part(field, s, net)?;
        self.check_addr_free_in(field, s, ip, net, &Index::new(self))
    }

    /// A static address that parses, is a host address of the subnet, and is neither the
    /// gateway nor an aux address.
    fn check_host_part(
        &self,
        field: &'static str,
        s: &str,
        net: &Network,
    ) -> Result<Ipv4Addr, ModelError> {
        let ip = parse_addr(field, s)?;
        check_host_addr(field, s, ip, net.subnet)?;
        if ip == net.gateway {
            return Err(invalid(
                field,
                s,
                format!("is the gateway of network {:?}", net.name),
            ));
        }
        if let Some((k, _)) = net.aux_addresses.iter().find(|(_, a)| **a == ip) {
            return Err(invalid(
                field,
                s,
                format!("is reserved as aux address {k:?} of network {:?}", net.name),
            ));
        }
        Ok(ip)
    }

    /// The part of `check_static_addr` that asks who else holds the address.
    fn check_addr_free_in(
        &self,
        field: &'static str,
        s: &str,
        ip: Ipv4Addr,
        net: &Network,
        idx: &Index,
    ) -> Result<Ipv4Addr, ModelError> {
        match idx.use_of(&net.name, ip) {
            Some(AddrUse::Endpoint(sandbox)) => Err(invalid(
                field,
                s,
                format!(
                    "already in use on network {:?} by sandbox {:?}",
                    net.name, sandbox
                ),
            )),
            Some(AddrUse::Vip(service)) => Err(invalid(
                field,
                s,
                format!(
                    "already in use on network {:?} as the VIP of service {:?}",
                    net.name, service
                ),
            )),
            _ => Ok(ip),
        }
    }

    /// Plans `netctl network connect`.
    ///
    /// An alias may not be the name of a service on the network. The sandbox's own name may:
    /// sandbox and service names are separate namespaces of the CLI, but they share the
    /// network's DNS, where the service's name answers the service (its VIP, or its backends
    /// in dnsrr mode), not the sandbox.
    ///
    /// The endpoint gets the sandbox's default route iff no other endpoint of the sandbox has
    /// it and the network is not internal (Docker never routes via an internal network).
    pub fn plan_connect(&self, req: &Connect) -> Result<Vec<Change>, ModelError> {
        let net = self
            .networks
            .get(&req.network)
            .ok_or_else(|| not_found("network", &req.network))?;
        if !self.sandboxes.contains_key(&req.sandbox) {
            return Err(not_found("sandbox", &req.sandbox));
        }
        let others = self.endpoints_of_sandbox(&req.sandbox);
        if others.iter().any(|e| e.network == net.name) {
            return Err(ModelError::Conflict(format!(
                "sandbox {:?} is already connected to network {:?}",
                req.sandbox, net.name
            )));
        }

        let mut aliases: Vec<String> = Vec::new();
        for a in &req.aliases {
            validate_name("alias", a)?;
            if self
                .services
                .get(a)
                .is_some_and(|sv| sv.network == net.name)
            {
                return Err(ModelError::Conflict(format!(
                    "alias {a:?} is the name of service {a:?} on network {:?}; \
                     choose another alias",
                    net.name
                )));
            }
            if !aliases.contains(a) {
                aliases.push(a.clone());
            }
        }

        let ip = match req.ip.as_deref() {
            Some(s) => self.check_static_addr("ip", s, net)?,
            None => self.allocate_address(net)?,
        };

        let mut rng = rand::rng();
        let id = loop {
            let id = format!("{:016x}", rand::Rng::random::<u64>(&mut rng));
            let host_ifname = format!("nc{}", &id[..12]);
            if !self.endpoints.contains_key(&id)
                && !self
                    .endpoints
                    .values()
                    .any(|e| e.host_ifname == host_ifname)
            {
                break id;
            }
        };
        let taken: BTreeSet<u32> = others
            .iter()
            .filter_map(|e| ifname_index(&e.ifname))
            .collect();
        let index = (0u32..).find(|i| !taken.contains(i)).expect("free index");

        Ok(vec![Change::PutEndpoint(Endpoint {
            host_ifname: format!("nc{}", &id[..12]),
            id,
            network: net.name.clone(),
            sandbox: req.sandbox.clone(),
            ip,
            mac: format_mac(mac_for(ip)),
            ifname: format!("eth{index}"),
            aliases,
            default_route: !net.internal && !others.iter().any(|e| e.default_route),
            docker: None,
        })])
    }

    /// Plans `netctl network disconnect`.
    ///
    /// If the removed endpoint carried the sandbox's default route, the route is NOT moved to
    /// another endpoint: the sandbox keeps no default route until it is reconnected.
    ///
    /// If the endpoint is a backend of services, a PutService without that backend comes
    /// first for each of them, then the DeleteEndpoint.
    pub fn plan_disconnect(&self, network: &str, sandbox: &str) -> Result<Vec<Change>, ModelError> {
        if !self.networks.contains_key(network) {
            return Err(not_found("network", network));
        }
        if !self.sandboxes.contains_key(sandbox) {
            return Err(not_found("sandbox", sandbox));
        }
        let ep = self
            .endpoints
            .values()
            .find(|e| e.network == network && e.sandbox == sandbox)
            .ok_or_else(|| {
                ModelError::Conflict(format!(
                    "sandbox {sandbox:?} is not connected to network {network:?}"
                ))
            })?;
        let mut changes = self.drop_backends(&BTreeSet::from([ep.id.as_str()]));
        changes.push(Change::DeleteEndpoint(ep.id.clone()));
        Ok(changes)
    }

    /// The endpoints on `network`, by address.
    pub fn endpoints_of_network(&self, network: &str) -> Vec<&Endpoint> {
        let mut v: Vec<&Endpoint> = self
            .endpoints
            .values()
            .filter(|e| e.network == network)
            .collect();
        v.sort_by_key(|e| e.ip);
        v
    }

    /// The endpoints of `sandbox`, by interface (eth0, eth1, ...).
    pub fn endpoints_of_sandbox(&self, sandbox: &str) -> Vec<&Endpoint> {
        let mut v: Vec<&Endpoint> = self
            .endpoints
            .values()
            .filter(|e| e.sandbox == sandbox)
            .collect();
        v.sort_by_key(|e| (ifname_index(&e.ifname), e.ifname.clone()));
        v
    }

    /// (allocatable addresses in total, in use) for `netctl network inspect`.
    ///
    /// Total: the addresses of the allocation range (ip-range or subnet, without network and
    /// broadcast) that are neither the gateway nor aux addresses, plus the static addresses of
    /// endpoints and service VIPs outside the range. In use: the number of endpoints plus the
    /// number of service VIPs.
    pub fn address_usage(&self, network: &str) -> Option<(u64, u64)> {
        let net = self.networks.get(network)?;
        let mut addrs: Vec<Ipv4Addr> = self
            .endpoints_of_network(network)
            .iter()
            .map(|e| e.ip)
            .collect();
        addrs.extend(self.vips_of_network(network).map(|(_, vip)| vip));
        let (range_total, outside) = match ipam::alloc_bounds(net.subnet, net.ip_range) {
            Some((lo, hi)) => {
                let inside = |ip: &Ipv4Addr| (lo..=hi).contains(ip);
                let mut reserved: BTreeSet<Ipv4Addr> =
                    net.aux_addresses.values().copied().collect();
                reserved.insert(net.gateway);
                let reserved = reserved.iter().filter(|a| inside(a)).count() as u64;
                let outside = addrs.iter().filter(|a| !inside(a)).count() as u64;
                (ipam::count(lo, hi) - reserved, outside)
            }
            None => (0, addrs.len() as u64),
        };
        Some((range_total + outside, addrs.len() as u64))
    }

    /// The services on `network`, by name.
    pub fn services_of_network(&self, network: &str) -> Vec<&Service> {
        self.services
            .values()
            .filter(|sv| sv.network == network)
            .collect()
    }

    /// Plans `netctl service add`.
    ///
    /// The name shares the network's DNS namespace with the names of the sandboxes connected
    /// to it and their aliases, so it may not be one of them. In mode vip the VIP is taken
    /// from the network's IPAM like an endpoint address unless `--vip` gives it.
    pub fn plan_add_service(&self, req: &AddService, now: &str) -> Result<Vec<Change>, ModelError> {
        let sv = self.plan_add_service_in(req, now, &mut Index::new(self))?;
        Ok(vec![Change::PutService(sv)])
    }

    /// Plans a batch: each service as `service add` would, then its backends as `service
    /// attach` would, all or nothing. The index is built once, so a batch of N services costs
    /// O(N log N), not O(N^2).
    pub fn plan_add_services(
        &self,
        reqs: &[BatchService],
        now: &str,
    ) -> Result<Vec<Change>, ModelError> {
        let mut idx = Index::new(self);
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let by_net_sandbox: BTreeMap<(&str, &str), &Endpoint> = self
            .endpoints
            .values()
            .map(|e| ((e.network.as_str(), e.sandbox.as_str()), e))
            .collect();
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            if !seen.insert(r.service.name.as_str()) {
                return Err(ModelError::Exists {
                    kind: "service",
                    name: r.service.name.clone(),
                });
            }
            let mut sv = self.plan_add_service_in(&r.service, now, &mut idx)?;
            for target in &r.backends {
                if !self.sandboxes.contains_key(target) {
                    return Err(not_found("sandbox", target));
                }
                let ep = by_net_sandbox
                    .get(&(sv.network.as_str(), target.as_str()))
                    .ok_or_else(|| not_on_network(target, &sv.network, &sv.name))?;
                if sv.backends.iter().any(|b| b.endpoint == ep.id) {
                    return Err(already_backend(target, &sv.name));
                }
                sv.backends.push(Backend {
                    id: idx.take_backend_id(),
                    endpoint: ep.id.clone(),
                    sandbox: target.clone(),
                    ip: ep.ip,
                });
            }
            out.push(Change::PutService(sv));
        }
        Ok(out)
    }

    /// `plan_add_service` against an index, which records what it allocates.
    fn plan_add_service_in(
        &self,
        req: &AddService,
        now: &str,
        idx: &mut Index,
    ) -> Result<Service, ModelError> {
        validate_name("name", &req.name)?;
        if self.services.contains_key(&req.name) {
            return Err(ModelError::Exists {
                kind: "service",
                name: req.name.clone(),
            });
        }
        let net = self
            .networks
            .get(&req.network)
            .ok_or_else(|| not_found("network", &req.network))?;
        for e in self.endpoints_of_network(&net.name) {
            if e.sandbox == req.name {
                return Err(ModelError::Conflict(format!(
                    "service name {:?} is the name of sandbox {:?} on network {:?} \
                     (they share its DNS); choose another name",
                    req.name, e.sandbox, net.name
                )));
            }
            if e.aliases.contains(&req.name) {
                return Err(ModelError::Conflict(format!(
                    "service name {:?} is an alias of sandbox {:?} on network {:?} \
                     (they share its DNS); choose another name",
                    req.name, e.sandbox, net.name
                )));
            }
        }

        let mode = match req.mode.as_deref() {
            None | Some("vip") => ServiceMode::Vip,
            Some("dnsrr") => ServiceMode::Dnsrr,
            Some(m) => return Err(invalid("mode", m, "expected \"vip\" or \"dnsrr\"")),
        };

        let mut ports: Vec<PortSpec> = Vec::new();
        for s in &req.ports {
            let p = parse_port(s)?;
            if ports.iter().any(|q| (q.port, q.proto) == (p.port, p.proto)) {
                return Err(invalid(
                    "port",
                    s,
                    format!(
                        "repeated: port {}/{} is already given",
                        p.port,
                        proto_name(p.proto)
                    ),
                ));
            }
            ports.push(p);
        }
        if mode == ServiceMode::Vip && ports.is_empty() {
            return Err(invalid(
                "port",
                "",
                "a vip service needs at least one --port",
            ));
        }

        let vip = match (mode, req.vip.as_deref()) {
            (ServiceMode::Dnsrr, Some(s)) => {
                return Err(invalid(
                    "vip",
                    s,
                    "a dnsrr service has no VIP; drop --vip or use --mode vip",
                ));
            }
            (ServiceMode::Dnsrr, None) => None,
            (ServiceMode::Vip, Some(s)) => {
                let ip = self.check_host_part("vip", s, net)?;
                let ip = self.check_addr_free_in("vip", s, ip, net, idx)?;
                idx.used
                    .entry(net.name.clone())
                    .or_default()
                    .insert(ip, AddrUse::Vip(req.name.clone()));
                Some(ip)
            }
            (ServiceMode::Vip, None) => {
                Some(self.allocate_address_in(net, idx, Some(AddrUse::Vip(req.name.clone())))?)
            }
        };

        Ok(Service {
            id: idx.take_service_id(),
            name: req.name.clone(),
            network: net.name.clone(),
            mode,
            vip,
            ports,
            backends: Vec::new(),
            created: now.to_string(),
        })
    }

    /// Plans `netctl service rm`.
    pub fn plan_remove_service(&self, name: &str) -> Result<Vec<Change>, ModelError> {
        if !self.services.contains_key(name) {
            return Err(not_found("service", name));
        }
        Ok(vec![Change::DeleteService(name.to_string())])
    }

    /// Plans `netctl service attach SERVICE TARGET`: the endpoint TARGET names on the
    /// service's network (a sandbox name, an endpoint id or unique prefix, or an endpoint
    /// address; see [`State::resolve_target`]) becomes a backend (appended; id = the lowest id no backend of any service
    /// uses).
    pub fn plan_attach(&self, service: &str, target: &str) -> Result<Vec<Change>, ModelError> {
        let sv = self
            .services
            .get(service)
            .ok_or_else(|| not_found("service", service))?;
        let ep = self.resolve_target(&sv.network, target, service)?;
        if sv.backends.iter().any(|b| b.endpoint == ep.id) {
            return Err(already_backend(&self.target_label(target), service));
        }
        let mut idx = Index {
            backend_ids: self
                .services
                .values()
                .flat_map(|s| s.backends.iter().map(|b| b.id))
                .collect(),
            next_backend_id: 1,
            ..Default::default()
        };
        let id = idx.take_backend_id();
        let mut sv = sv.clone();
        sv.backends.push(Backend {
            id,
            endpoint: ep.id.clone(),
            sandbox: ep.sandbox.clone(),
            ip: ep.ip,
        });
        Ok(vec![Change::PutService(sv)])
    }

    /// Plans `netctl service detach SERVICE TARGET` (TARGET as for attach).
    pub fn plan_detach(&self, service: &str, target: &str) -> Result<Vec<Change>, ModelError> {
        let sv = self
            .services
            .get(service)
            .ok_or_else(|| not_found("service", service))?;
        let ep = self.resolve_target(&sv.network, target, service)?;
        if !sv.backends.iter().any(|b| b.endpoint == ep.id) {
            return Err(ModelError::Conflict(format!(
                "{} is not a backend of service {service:?}",
                self.target_label(target)
            )));
        }
        let mut sv = sv.clone();
        sv.backends.retain(|b| b.endpoint != ep.id);
        Ok(vec![Change::PutService(sv)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2024-01-01T00:00:00Z";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn host() -> HostNet {
        HostNet::default()
    }
    fn req(name: &str, subnet: Option<&str>) -> CreateNetwork {
        CreateNetwork {
            name: name.into(),
            subnet: subnet.map(Into::into),
            ..Default::default()
        }
    }

    /// Plans and applies; panics on error.
    fn create_net(st: &mut State, r: &CreateNetwork) -> Network {
        let c = st.plan_create_network(r, &host(), NOW).unwrap();
        st.apply(&c);
        st.networks[&r.name].clone()
    }
    fn create_sb(st: &mut State, name: &str) {
        let c = st.plan_create_sandbox(name, &host(), NOW).unwrap();
        st.apply(&c);
    }
    fn conn(network: &str, sandbox: &str, ip: Option<&str>) -> Connect {
        Connect {
            network: network.into(),
            sandbox: sandbox.into(),
            ip: ip.map(Into::into),
            aliases: vec![],
        }
    }
    fn connect(st: &mut State, network: &str, sandbox: &str, ip: Option<&str>) -> Endpoint {
        let c = st.plan_connect(&conn(network, sandbox, ip)).unwrap();
        st.apply(&c);
        match &c[..] {
            [Change::PutEndpoint(e)] => e.clone(),
            other => panic!("unexpected plan {other:?}"),
        }
    }

    /// Asserts an `Invalid` error for `field` whose message names `value`.
    #[track_caller]
    fn assert_invalid(r: Result<Vec<Change>, ModelError>, field: &str, value: &str) -> String {
        match r {
            Err(e @ ModelError::Invalid { .. }) => {
                let msg = e.to_string();
                let ModelError::Invalid {
                    field: f, value: v, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*f, field, "{msg}");
                assert_eq!(v, value, "{msg}");
                assert!(
                    msg.starts_with(&format!("{field}: invalid value {value:?}")),
                    "{msg}"
                );
                assert_eq!(e.status(), 400);
                msg
            }
            other => panic!("expected Invalid {field} {value:?}, got {other:?}"),
        }
    }

    /// A state with network "n" on 10.0.0.0/24 and sandbox "s".
    fn base() -> State {
        let mut st = State::default();
        create_net(&mut st, &req("n", Some("10.0.0.0/24")));
        create_sb(&mut st, "s");
        st
    }

    // ---- names ----

    #[test]
    fn names() {
        for ok in ["a", "A1", "web-1.prod_x", "0abc", &"x".repeat(64)] {
            validate_name("name", ok).unwrap();
        }
        for bad in [
            "", "a/b", ".", "..", "-a", "_a", ".hidden", "a b", "a\0b", "é", "a:b",
        ] {
            let e = validate_name("name", bad).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("name: invalid value {bad:?}")),
                "{e}"
            );
        }
        let long = "x".repeat(65);
        assert!(
            validate_name("alias", &long)
                .unwrap_err()
                .to_string()
                .contains("64")
        );
    }

    #[test]
    fn mac() {
        let m = mac_for(ip("10.0.0.2"));
        assert_eq!(m, [0x02, 0x42, 10, 0, 0, 2]);
        assert_eq!(format_mac(m), "02:42:0a:00:00:02");
        assert_eq!(parse_mac("02:42:0A:00:00:02"), Some(m));
        for bad in [
            "",
            "02:42:0a:00:00",
            "02:42:0a:00:00:02:03",
            "02:42:0a:00:00:g2",
            "2:42:a:0:0:2",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    // ---- create network ----

    #[test]
    fn create_network_defaults() {
        let st = State::default();
        let c = st
            .plan_create_network(&req("n", None), &host(), NOW)
            .unwrap();
        assert_eq!(st, State::default(), "planning is pure");
        let [Change::PutNetwork(n)] = &c[..] else {
            panic!("{c:?}")
        };
        assert_eq!(n.id, 1);
        assert_eq!(n.driver, "bridge");
        assert_eq!(n.subnet, net("172.17.0.0/16"));
        assert_eq!(n.gateway, ip("172.17.0.1"));
        assert_eq!(n.bridge, "netctl1");
        assert_eq!(n.created, NOW);
        assert_eq!(n.ip_range, None);
    }

    #[test]
    fn create_network_full() {
        let mut st = State::default();
        let r = CreateNetwork {
            name: "n".into(),
            driver: Some("bridge".into()),
            subnet: Some("10.5.0.0/16".into()),
            ip_range: Some("10.5.1.0/24".into()),
            gateway: Some("10.5.0.254".into()),
            aux_addresses: vec!["router=10.5.0.2".into(), "dns=10.5.1.1".into()],
            options: vec![format!("{OPT_BRIDGE_NAME}=br-test"), "mtu=1400".into()],
            internal: true,
        };
        let n = create_net(&mut st, &r);
        assert_eq!(n.ip_range, Some(net("10.5.1.0/24")));
        assert_eq!(n.gateway, ip("10.5.0.254"));
        assert_eq!(n.aux_addresses["dns"], ip("10.5.1.1"));
        assert_eq!(n.options["mtu"], "1400");
        assert_eq!(n.bridge, "br-test");
        assert!(n.internal);
    }

    #[test]
    fn create_network_exists() {
        let st = base();
        let e = st
            .plan_create_network(&req("n", Some("10.9.0.0/24")), &host(), NOW)
            .unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::Exists {
                    kind: "network",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("\"n\""));
    }

    #[test]
    fn create_network_bad_name() {
        let st = State::default();
        assert_invalid(
            st.plan_create_network(&req("a/b", None), &host(), NOW),
            "name",
            "a/b",
        );
    }

    #[test]
    fn create_network_bad_driver() {
        let st = State::default();
        let r = CreateNetwork {
            driver: Some("overlay".into()),
            ..req("n", None)
        };
        assert_invalid(
            st.plan_create_network(&r, &host(), NOW),
            "driver",
            "overlay",
        );
    }

    #[test]
    fn subnet_errors() {
        let st = base();
        let p = |s: &str| st.plan_create_network(&req("m", Some(s)), &host(), NOW);
        assert!(assert_invalid(p("10.1.0.1/24"), "subnet", "10.1.0.1/24").contains("10.1.0.0/24"));
        assert_invalid(p("10.1.0.0"), "subnet", "10.1.0.0");
        assert_invalid(p("nonsense"), "subnet", "nonsense");
        assert_invalid(p("fd00::/64"), "subnet", "fd00::/64");
        assert!(assert_invalid(p("10.1.0.0/31"), "subnet", "10.1.0.0/31").contains("/30"));
        // /30 is the smallest accepted.
        p("10.1.0.0/30").unwrap();
        // Overlap with another netctl network names both.
        let m = assert_invalid(p("10.0.0.0/16"), "subnet", "10.0.0.0/16");
        assert!(m.contains("\"n\"") && m.contains("10.0.0.0/24"), "{m}");
        let m = assert_invalid(p("10.0.0.128/25"), "subnet", "10.0.0.128/25");
        assert!(m.contains("\"n\""), "{m}");
        // Overlap with a host route names the route; the default route does not count.
        let h = HostNet {
            prefixes: vec![net("0.0.0.0/0"), net("192.168.1.0/24")],
            ..Default::default()
        };
        let r = st.plan_create_network(&req("m", Some("192.168.0.0/16")), &h, NOW);
        let m = assert_invalid(r, "subnet", "192.168.0.0/16");
        assert!(m.contains("192.168.1.0/24"), "{m}");
        st.plan_create_network(&req("m", Some("10.7.0.0/16")), &h, NOW)
            .unwrap();
    }

    #[test]
    fn default_pool_skips_networks_and_host_prefixes() {
        let mut st = State::default();
        create_net(&mut st, &req("a", Some("172.17.0.0/16")));
        let h = HostNet {
            prefixes: vec![net("0.0.0.0/0"), net("172.18.3.0/24")],
            ..Default::default()
        };
        let c = st.plan_create_network(&req("b", None), &h, NOW).unwrap();
        let [Change::PutNetwork(n)] = &c[..] else {
            panic!()
        };
        assert_eq!(n.subnet, net("172.19.0.0/16"));
        assert_eq!(n.gateway, ip("172.19.0.1"));
        assert_eq!(n.id, 2);

        // All 172.16/12 taken by the host: first /20 of 192.168/16 not in use.
        let h = HostNet {
            prefixes: vec![net("172.16.0.0/12"), net("192.168.0.0/24")],
            ..Default::default()
        };
        let c = st.plan_create_network(&req("b", None), &h, NOW).unwrap();
        let [Change::PutNetwork(n)] = &c[..] else {
            panic!()
        };
        assert_eq!(n.subnet, net("192.168.16.0/20"));

        // Nothing left.
        let h = HostNet {
            prefixes: vec![net("172.16.0.0/12"), net("192.168.0.0/16")],
            ..Default::default()
        };
        let e = st
            .plan_create_network(&req("b", None), &h, NOW)
            .unwrap_err();
        assert!(
            matches!(e, ModelError::Conflict(_)) && e.to_string().contains("--subnet"),
            "{e}"
        );
    }

    #[test]
    fn ip_range_errors() {
        let st = State::default();
        let p = |r: &str| {
            let r = CreateNetwork {
                ip_range: Some(r.into()),
                ..req("n", Some("10.0.0.0/24"))
            };
            st.plan_create_network(&r, &host(), NOW)
        };
        assert!(
            assert_invalid(p("10.0.1.0/25"), "ip-range", "10.0.1.0/25").contains("10.0.0.0/24")
        );
        assert_invalid(p("10.0.0.0/23"), "ip-range", "10.0.0.0/23");
        assert_invalid(p("10.0.0.129/25"), "ip-range", "10.0.0.129/25");
        assert_invalid(p("x"), "ip-range", "x");
        p("10.0.0.128/25").unwrap();
    }

    #[test]
    fn gateway_errors() {
        let st = State::default();
        let p = |g: &str| {
            let r = CreateNetwork {
                gateway: Some(g.into()),
                ..req("n", Some("10.0.0.0/24"))
            };
            st.plan_create_network(&r, &host(), NOW)
        };
        assert!(assert_invalid(p("10.0.1.1"), "gateway", "10.0.1.1").contains("not inside"));
        assert!(assert_invalid(p("10.0.0.0"), "gateway", "10.0.0.0").contains("network address"));
        assert!(assert_invalid(p("10.0.0.255"), "gateway", "10.0.0.255").contains("broadcast"));
        assert_invalid(p("10.0.0.300"), "gateway", "10.0.0.300");
        p("10.0.0.200").unwrap();
    }

    #[test]
    fn aux_address_errors() {
        let st = State::default();
        let p = |aux: &[&str]| {
            let r = CreateNetwork {
                aux_addresses: aux.iter().map(|s| s.to_string()).collect(),
                ..req("n", Some("10.0.0.0/24"))
            };
            st.plan_create_network(&r, &host(), NOW)
        };
        assert!(assert_invalid(p(&["router"]), "aux-address", "router").contains("KEY=IP"));
        assert!(assert_invalid(p(&["=10.0.0.5"]), "aux-address", "=10.0.0.5").contains("key"));
        assert_invalid(p(&["r=10.0.0"]), "aux-address", "r=10.0.0");
        assert!(
            assert_invalid(p(&["r=10.1.0.5"]), "aux-address", "r=10.1.0.5").contains("not inside")
        );
        assert_invalid(p(&["r=10.0.0.255"]), "aux-address", "r=10.0.0.255");
        assert!(
            assert_invalid(p(&["r=10.0.0.1"]), "aux-address", "r=10.0.0.1").contains("gateway")
        );
        let m = assert_invalid(
            p(&["r=10.0.0.5", "r=10.0.0.6"]),
            "aux-address",
            "r=10.0.0.6",
        );
        assert!(m.contains("duplicate key"), "{m}");
        let m = assert_invalid(
            p(&["r=10.0.0.5", "s=10.0.0.5"]),
            "aux-address",
            "s=10.0.0.5",
        );
        assert!(m.contains("\"r\""), "{m}");
        p(&["r=10.0.0.5", "s=10.0.0.6"]).unwrap();
    }

    #[test]
    fn option_and_bridge_name_errors() {
        let mut st = State::default();
        let r = CreateNetwork {
            options: vec![format!("{OPT_BRIDGE_NAME}=br0")],
            ..req("a", None)
        };
        create_net(&mut st, &r);
        let h = HostNet {
            links: vec!["eth0".into(), "docker0".into()],
            ..Default::default()
        };
        let p = |opts: &[&str]| {
            let r = CreateNetwork {
                options: opts.iter().map(|s| s.to_string()).collect(),
                ..req("n", None)
            };
            st.plan_create_network(&r, &h, NOW)
        };
        assert!(assert_invalid(p(&["mtu"]), "opt", "mtu").contains("KEY=VALUE"));
        assert_invalid(p(&["=1"]), "opt", "=1");
        let b = |name: &str| format!("{OPT_BRIDGE_NAME}={name}");
        for bad in ["", "a/b", "a b", "sixteen-chars-xx"] {
            assert_invalid(p(&[&b(bad)]), "opt", &b(bad));
        }
        assert!(assert_invalid(p(&[&b("br0")]), "opt", &b("br0")).contains("\"a\""));
        assert!(assert_invalid(p(&[&b("docker0")]), "opt", &b("docker0")).contains("exists"));
        assert!(assert_invalid(p(&[&b("netctl7")]), "opt", &b("netctl7")).contains("reserved"));
        let c = p(&[&b("fifteen-chars-x")]).unwrap();
        let [Change::PutNetwork(n)] = &c[..] else {
            panic!()
        };
        assert_eq!(n.bridge, "fifteen-chars-x");
        assert_eq!(n.id, 2);

        // A foreign link holding the default bridge name.
        let h = HostNet {
            links: vec!["netctl2".into()],
            ..Default::default()
        };
        let e = st
            .plan_create_network(&req("n", None), &h, NOW)
            .unwrap_err();
        assert!(
            matches!(e, ModelError::Conflict(_)) && e.to_string().contains("netctl2"),
            "{e}"
        );
    }

    #[test]
    fn network_ids_reuse_lowest_free() {
        let mut st = State::default();
        for n in ["a", "b", "c"] {
            create_net(&mut st, &req(n, None));
        }
        st.apply(&st.plan_remove_network("b").unwrap());
        let n = create_net(&mut st, &req("d", None));
        assert_eq!(n.id, 2);
        assert_eq!(n.bridge, "netctl2");
        // b's subnet (172.18/16) is free again.
        assert_eq!(n.subnet, net("172.18.0.0/16"));
    }

    // ---- remove network ----

    #[test]
    fn remove_network() {
        let mut st = base();
        let e = st.plan_remove_network("x").unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::NotFound {
                    kind: "network",
                    ..
                }
            ),
            "{e}"
        );
        connect(&mut st, "n", "s", None);
        let e = st.plan_remove_network("n").unwrap_err();
        assert!(matches!(e, ModelError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("1 endpoints") && e.to_string().contains("disconnect"));
        st.apply(&st.plan_disconnect("n", "s").unwrap());
        assert_eq!(
            st.plan_remove_network("n").unwrap(),
            vec![Change::DeleteNetwork("n".into())]
        );
    }

    // ---- sandboxes ----

    #[test]
    fn create_sandbox_errors() {
        let st = base();
        assert_invalid(st.plan_create_sandbox("a/b", &host(), NOW), "name", "a/b");
        assert_invalid(st.plan_create_sandbox("..", &host(), NOW), "name", "..");
        let e = st.plan_create_sandbox("s", &host(), NOW).unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::Exists {
                    kind: "sandbox",
                    ..
                }
            ),
            "{e}"
        );
        let h = HostNet {
            netns: vec!["foreign".into()],
            ..Default::default()
        };
        let e = st.plan_create_sandbox("foreign", &h, NOW).unwrap_err();
        assert!(matches!(e, ModelError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("not owned by netctl") && e.to_string().contains("foreign"));
        let c = st.plan_create_sandbox("t", &h, NOW).unwrap();
        assert_eq!(
            c,
            vec![Change::PutSandbox(Sandbox {
                name: "t".into(),
                created: NOW.into()
            })]
        );
    }

    #[test]
    fn remove_sandbox_removes_endpoints_first() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        let e1 = connect(&mut st, "n", "s", None);
        let e2 = connect(&mut st, "m", "s", None);
        let e = st.plan_remove_sandbox("x").unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::NotFound {
                    kind: "sandbox",
                    ..
                }
            ),
            "{e}"
        );
        let c = st.plan_remove_sandbox("s").unwrap();
        assert_eq!(c.len(), 3);
        assert!(c[..2].contains(&Change::DeleteEndpoint(e1.id)));
        assert!(c[..2].contains(&Change::DeleteEndpoint(e2.id)));
        assert_eq!(c[2], Change::DeleteSandbox("s".into()));
        st.apply(&c);
        assert!(st.endpoints.is_empty() && st.sandboxes.is_empty());
    }

    // ---- connect ----

    #[test]
    fn connect_defaults() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        let e = connect(&mut st, "n", "s", None);
        assert_eq!(e.ip, ip("10.0.0.2"), "gateway .1 skipped");
        assert_eq!(e.mac, "02:42:0a:00:00:02");
        assert_eq!(e.ifname, "eth0");
        assert!(e.default_route);
        assert_eq!(e.id.len(), 16);
        assert!(e.id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(e.host_ifname, format!("nc{}", &e.id[..12]));
        let e2 = connect(&mut st, "m", "s", None);
        assert_eq!(e2.ifname, "eth1");
        assert!(!e2.default_route);
        assert_eq!(st.endpoints_of_sandbox("s"), vec![&e, &e2]);
        assert_eq!(st.endpoints_of_network("m"), vec![&e2]);
    }

    #[test]
    fn connect_not_found_and_already_connected() {
        let mut st = base();
        let e = st.plan_connect(&conn("x", "s", None)).unwrap_err();
        assert_eq!(
            e,
            ModelError::NotFound {
                kind: "network",
                name: "x".into()
            }
        );
        let e = st.plan_connect(&conn("n", "x", None)).unwrap_err();
        assert_eq!(
            e,
            ModelError::NotFound {
                kind: "sandbox",
                name: "x".into()
            }
        );
        connect(&mut st, "n", "s", None);
        let e = st.plan_connect(&conn("n", "s", None)).unwrap_err();
        assert!(
            matches!(e, ModelError::Conflict(_)) && e.to_string().contains("already connected")
        );
    }

    #[test]
    fn connect_static_ip_errors() {
        let mut st = State::default();
        let r = CreateNetwork {
            aux_addresses: vec!["router=10.0.0.5".into()],
            ..req("n", Some("10.0.0.0/24"))
        };
        create_net(&mut st, &r);
        create_sb(&mut st, "s");
        create_sb(&mut st, "t");
        connect(&mut st, "n", "t", Some("10.0.0.9"));
        let p = |ip: &str| st.plan_connect(&conn("n", "s", Some(ip)));
        assert!(assert_invalid(p("10.0.0"), "ip", "10.0.0").contains("not an IPv4"));
        assert!(assert_invalid(p("10.0.1.2"), "ip", "10.0.1.2").contains("not inside"));
        assert!(assert_invalid(p("10.0.0.0"), "ip", "10.0.0.0").contains("network address"));
        assert!(assert_invalid(p("10.0.0.255"), "ip", "10.0.0.255").contains("broadcast"));
        assert!(assert_invalid(p("10.0.0.1"), "ip", "10.0.0.1").contains("gateway"));
        assert!(assert_invalid(p("10.0.0.5"), "ip", "10.0.0.5").contains("\"router\""));
        assert!(assert_invalid(p("10.0.0.9"), "ip", "10.0.0.9").contains("\"t\""));
        let c = p("10.0.0.10").unwrap();
        let [Change::PutEndpoint(e)] = &c[..] else {
            panic!()
        };
        assert_eq!(e.ip, ip("10.0.0.10"));
    }

    #[test]
    fn connect_aliases() {
        let mut st = base();
        let mut r = conn("n", "s", None);
        r.aliases = vec!["web".into(), "bad alias".into()];
        assert_invalid(st.plan_connect(&r), "alias", "bad alias");
        r.aliases = vec!["web".into(), "db".into(), "web".into()];
        let c = st.plan_connect(&r).unwrap();
        st.apply(&c);
        let [Change::PutEndpoint(e)] = &c[..] else {
            panic!()
        };
        assert_eq!(e.aliases, vec!["web".to_string(), "db".to_string()]);
    }

    #[test]
    fn allocation_respects_range_aux_and_gateway() {
        let mut st = State::default();
        let r = CreateNetwork {
            ip_range: Some("10.0.0.0/29".into()), // .0-.7; hosts .1-.7
            gateway: Some("10.0.0.2".into()),
            aux_addresses: vec!["a=10.0.0.1".into(), "b=10.0.0.4".into()],
            ..req("n", Some("10.0.0.0/24"))
        };
        create_net(&mut st, &r);
        let mut got = Vec::new();
        for i in 0..4 {
            let sb = format!("s{i}");
            create_sb(&mut st, &sb);
            got.push(connect(&mut st, "n", &sb, None).ip);
        }
        assert_eq!(
            got,
            ["10.0.0.3", "10.0.0.5", "10.0.0.6", "10.0.0.7"].map(ip)
        );
        assert_eq!(st.address_usage("n"), Some((4, 4)));
        // The range is exhausted; a static address outside it still works.
        create_sb(&mut st, "x");
        let e = st.plan_connect(&conn("n", "x", None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network \"n\": no free address left in 10.0.0.0/29 (ip-range of 10.0.0.0/24)"
        );
        connect(&mut st, "n", "x", Some("10.0.0.100"));
        assert_eq!(st.address_usage("n"), Some((5, 5)));
        assert_eq!(st.address_usage("nope"), None);
    }

    #[test]
    fn exhaustion_of_small_subnets() {
        // /30: hosts .1 (gateway) and .2: one endpoint.
        let mut st = State::default();
        create_net(&mut st, &req("n", Some("10.0.0.0/30")));
        assert_eq!(st.address_usage("n"), Some((1, 0)));
        create_sb(&mut st, "a");
        create_sb(&mut st, "b");
        assert_eq!(connect(&mut st, "n", "a", None).ip, ip("10.0.0.2"));
        let e = st.plan_connect(&conn("n", "b", None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network \"n\": no free address left in 10.0.0.0/30"
        );
        assert_eq!(e.status(), 409);

        // /29: hosts .1-.6, gateway .1: five endpoints.
        create_net(&mut st, &req("m", Some("10.0.1.0/29")));
        let mut ips = Vec::new();
        for i in 0..5 {
            let sb = format!("m{i}");
            create_sb(&mut st, &sb);
            ips.push(connect(&mut st, "m", &sb, None).ip);
        }
        assert_eq!(*ips.last().unwrap(), ip("10.0.1.6"));
        assert_eq!(st.address_usage("m"), Some((5, 5)));
        assert!(st.plan_connect(&conn("m", "a", None)).is_err());
        // Freeing one makes exactly that one available again.
        st.apply(&st.plan_disconnect("m", "m2").unwrap());
        assert_eq!(connect(&mut st, "m", "a", None).ip, ips[2]);
    }

    #[test]
    fn fifty_connects_no_leak() {
        let mut st = State::default();
        create_net(&mut st, &req("n", Some("10.0.0.0/16")));
        let used = |st: &State| -> BTreeSet<Ipv4Addr> {
            st.endpoints_of_network("n").iter().map(|e| e.ip).collect()
        };
        for i in 0..50 {
            let sb = format!("s{i}");
            create_sb(&mut st, &sb);
            connect(&mut st, "n", &sb, None);
        }
        let first = used(&st);
        assert_eq!(first.len(), 50);
        assert_eq!(st.address_usage("n"), Some((65533, 50)));
        for i in 0..50 {
            st.apply(&st.plan_disconnect("n", &format!("s{i}")).unwrap());
        }
        assert!(st.endpoints.is_empty());
        assert_eq!(st.address_usage("n"), Some((65533, 0)));
        for i in 0..50 {
            connect(&mut st, "n", &format!("s{i}"), None);
        }
        let second = used(&st);
        assert_eq!(second.len(), 50);
        assert_eq!(first, second, "the same lowest 50 addresses are reused");
    }

    // ---- disconnect ----

    #[test]
    fn disconnect() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        create_sb(&mut st, "t");
        let e = st.plan_disconnect("x", "s").unwrap_err();
        assert_eq!(
            e,
            ModelError::NotFound {
                kind: "network",
                name: "x".into()
            }
        );
        let e = st.plan_disconnect("n", "x").unwrap_err();
        assert_eq!(
            e,
            ModelError::NotFound {
                kind: "sandbox",
                name: "x".into()
            }
        );
        let e = st.plan_disconnect("n", "s").unwrap_err();
        assert!(matches!(e, ModelError::Conflict(_)) && e.to_string().contains("not connected"));

        let e0 = connect(&mut st, "n", "s", None);
        let e1 = connect(&mut st, "m", "s", None);
        connect(&mut st, "n", "t", None);
        let c = st.plan_disconnect("n", "s").unwrap();
        assert_eq!(c, vec![Change::DeleteEndpoint(e0.id.clone())]);
        st.apply(&c);
        // The default route is not moved to the remaining endpoint.
        assert!(!st.endpoints[&e1.id].default_route);
        // Reconnecting takes the lowest free ifname (eth0) and the default route again.
        let again = connect(&mut st, "n", "s", None);
        assert_eq!(again.ifname, "eth0");
        assert!(again.default_route);
        assert_eq!(st.endpoints_of_network("n").len(), 2);
    }

    #[test]
    fn internal_network_gives_no_default_route() {
        let mut st = base();
        let r = CreateNetwork {
            internal: true,
            ..req("i", Some("10.2.0.0/24"))
        };
        create_net(&mut st, &r);
        create_sb(&mut st, "t");
        assert!(!connect(&mut st, "i", "t", None).default_route);
        assert!(connect(&mut st, "n", "t", None).default_route);
    }

    #[test]
    fn planning_is_pure() {
        let mut st = base();
        connect(&mut st, "n", "s", None);
        let before = st.clone();
        let _ = st
            .plan_create_network(&req("m", None), &host(), NOW)
            .unwrap();
        let _ = st.plan_create_sandbox("t", &host(), NOW).unwrap();
        let _ = st.plan_connect(&conn("n", "s", None)).unwrap_err();
        let _ = st.plan_disconnect("n", "s").unwrap();
        let _ = st.plan_remove_sandbox("s").unwrap();
        let _ = st.plan_remove_network("n").unwrap_err();
        assert_eq!(st, before);
    }

    // ---- services in a batch ----

    #[test]
    fn a_batch_is_planned_like_single_adds_all_or_nothing() {
        let mut st = State::default();
        create_net(&mut st, &req("n", Some("10.8.0.0/16")));
        for sb in ["b1", "b2", "b3"] {
            create_sb(&mut st, sb);
            let c = st
                .plan_connect(&Connect {
                    network: "n".into(),
                    sandbox: sb.into(),
                    ..Default::default()
                })
                .unwrap();
            st.apply(&c);
        }
        // A service that exists already shifts ids and VIPs: the batch must skip both.
        add_svc(&mut st, &svc("old", "n", &["80"]));
        let batch: Vec<BatchService> = (0..2000)
            .map(|i| BatchService {
                service: svc(&format!("s{i}"), "n", &["80", "53/udp"]),
                backends: vec!["b1".into(), "b2".into(), "b3".into()],
            })
            .collect();
        let changes = st.plan_add_services(&batch, NOW).unwrap();
        assert_eq!(changes.len(), 2000);
        let mut after = st.clone();
        after.apply(&changes);
        let vips: BTreeSet<Ipv4Addr> = after.services.values().filter_map(|s| s.vip).collect();
        let ids: BTreeSet<u32> = after.services.values().map(|s| s.id).collect();
        let bids: BTreeSet<u32> = after
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        assert_eq!((vips.len(), ids.len(), bids.len()), (2001, 2001, 6000));
        let endpoint_ips: BTreeSet<Ipv4Addr> = after.endpoints.values().map(|e| e.ip).collect();
        assert!(vips.is_disjoint(&endpoint_ips));
        // The same as one by one: the next single add gets the next free VIP and id.
        let next = add_svc(&mut after, &svc("next", "n", &["80"]));
        assert_eq!(next.id, 2002);
        assert!(!vips.contains(&next.vip.unwrap()));

        // One bad service anywhere rejects the batch whole, naming it.
        let mut bad = batch.clone();
        bad[1500].backends.push("nosuch".into());
        assert!(matches!(
            st.plan_add_services(&bad, NOW),
            Err(ModelError::NotFound {
                kind: "sandbox",
                ..
            })
        ));
        let mut dup = batch[..3].to_vec();
        dup.push(batch[1].clone());
        assert!(matches!(
            st.plan_add_services(&dup, NOW),
            Err(ModelError::Exists {
                kind: "service",
                ..
            })
        ));
        let mut clash = batch[..3].to_vec();
        clash[2].service.vip = Some(after.services["s0"].vip.unwrap().to_string());
        // A VIP taken earlier in the same batch is a conflict too.
        let e = st.plan_add_services(&clash, NOW).unwrap_err();
        assert!(e.to_string().contains("\"s0\""), "{e}");
        clash[2].service.vip = Some(st.services["old"].vip.unwrap().to_string());
        assert!(matches!(
            st.plan_add_services(&clash, NOW),
            Err(ModelError::Invalid { field: "vip", .. })
        ));
    }

    // ---- services ----

    fn svc(name: &str, network: &str, ports: &[&str]) -> AddService {
        AddService {
            name: name.into(),
            network: network.into(),
            ports: ports.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
    /// Plans and applies; panics on error.
    fn add_svc(st: &mut State, r: &AddService) -> Service {
        let c = st.plan_add_service(r, NOW).unwrap();
        st.apply(&c);
        match &c[..] {
            [Change::PutService(sv)] => sv.clone(),
            other => panic!("unexpected plan {other:?}"),
        }
    }
    fn attach(st: &mut State, service: &str, sandbox: &str) -> Backend {
        let c = st.plan_attach(service, sandbox).unwrap();
        st.apply(&c);
        let [Change::PutService(sv)] = &c[..] else {
            panic!("unexpected plan {c:?}")
        };
        sv.backends.last().unwrap().clone()
    }
    fn backend_sandboxes(st: &State, service: &str) -> Vec<String> {
        st.services[service]
            .backends
            .iter()
            .map(|b| b.sandbox.clone())
            .collect()
    }
    /// Asserts a `Conflict` whose message contains every one of `parts`.
    #[track_caller]
    fn assert_conflict(r: Result<Vec<Change>, ModelError>, parts: &[&str]) -> String {
        match r {
            Err(e @ ModelError::Conflict(_)) => {
                let msg = e.to_string();
                for p in parts {
                    assert!(msg.contains(p), "{msg:?} lacks {p:?}");
                }
                assert_eq!(e.status(), 409);
                msg
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
    #[track_caller]
    fn assert_not_found(r: Result<Vec<Change>, ModelError>, kind: &str, name: &str) {
        match r {
            Err(ModelError::NotFound { kind: k, name: n }) => {
                assert_eq!((k, n.as_str()), (kind, name));
            }
            other => panic!("expected NotFound {kind} {name:?}, got {other:?}"),
        }
    }

    #[test]
    fn parse_port_table() {
        use Proto::{Tcp, Udp};
        for (s, port, target, proto) in [
            ("80", 80, 80, Tcp),
            ("80:8080", 80, 8080, Tcp),
            ("53/udp", 53, 53, Udp),
            ("53/UDP", 53, 53, Udp),
            ("80:8080/tcp", 80, 8080, Tcp),
            ("80/Tcp", 80, 80, Tcp),
            ("1:65535/udp", 1, 65535, Udp),
            ("65535", 65535, 65535, Tcp),
        ] {
            assert_eq!(
                parse_port(s),
                Ok(PortSpec {
                    port,
                    target,
                    proto
                }),
                "{s}"
            );
        }
        for (bad, reason) in [
            ("", "expected PORT"),
            ("0", "out of range"),
            ("65536", "out of range"),
            ("99999999999999999999999", "out of range"),
            ("80:0", "out of range"),
            ("80:65536", "out of range"),
            ("abc", "not a number"),
            ("+80", "not a number"),
            ("-1", "not a number"),
            (" 80", "not a number"),
            ("80:", "target port is empty"),
            (":80", "port is empty"),
            ("80:8080:90", "not a number"),
            ("80/", "protocol after '/' is empty"),
            ("/tcp", "port is empty"),
            ("80/sctp", "\"sctp\" is not supported"),
            ("80/tcp/udp", "more than one protocol"),
        ] {
            let e = parse_port(bad).unwrap_err();
            let msg = assert_invalid(Err(e), "port", bad);
            assert!(msg.contains(reason), "{bad:?}: {msg}");
        }
    }

    #[test]
    fn add_service_defaults() {
        let mut st = base();
        connect(&mut st, "n", "s", None); // 10.0.0.2
        let before = st.clone();
        let c = st
            .plan_add_service(&svc("web", "n", &["80", "53/udp"]), NOW)
            .unwrap();
        assert_eq!(st, before, "planning is pure");
        st.apply(&c);
        let sv = &st.services["web"];
        assert_eq!(
            *sv,
            Service {
                id: 1,
                name: "web".into(),
                network: "n".into(),
                mode: ServiceMode::Vip,
                vip: Some(ip("10.0.0.3")),
                ports: vec![
                    PortSpec {
                        port: 80,
                        target: 80,
                        proto: Proto::Tcp
                    },
                    PortSpec {
                        port: 53,
                        target: 53,
                        proto: Proto::Udp
                    },
                ],
                backends: vec![],
                created: NOW.into(),
            }
        );
        let r = AddService {
            mode: Some("vip".into()),
            ..svc("api", "n", &["80"])
        };
        assert_eq!(add_svc(&mut st, &r).mode, ServiceMode::Vip);
        assert_eq!(
            st.services_of_network("n")
                .iter()
                .map(|sv| sv.name.as_str())
                .collect::<Vec<_>>(),
            ["api", "web"]
        );
        assert!(st.services_of_network("m").is_empty());
    }

    #[test]
    fn add_service_name_errors() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        create_sb(&mut st, "t");
        let mut r = conn("n", "s", None);
        r.aliases = vec!["db".into()];
        st.apply(&st.plan_connect(&r).unwrap());
        connect(&mut st, "m", "t", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));

        assert_invalid(
            st.plan_add_service(&svc("a/b", "n", &["80"]), NOW),
            "name",
            "a/b",
        );
        assert_invalid(st.plan_add_service(&svc("", "n", &["80"]), NOW), "name", "");
        let e = st
            .plan_add_service(&svc("web", "m", &["80"]), NOW)
            .unwrap_err();
        assert_eq!(
            e,
            ModelError::Exists {
                kind: "service",
                name: "web".into()
            }
        );
        assert_eq!(e.status(), 409);
        assert_not_found(
            st.plan_add_service(&svc("api", "x", &["80"]), NOW),
            "network",
            "x",
        );
        // The DNS namespace of the network: sandbox names and aliases.
        let m = assert_conflict(
            st.plan_add_service(&svc("s", "n", &["80"]), NOW),
            &["service name \"s\"", "sandbox \"s\"", "network \"n\""],
        );
        assert!(!m.contains("alias"), "{m}");
        assert_conflict(
            st.plan_add_service(&svc("db", "n", &["80"]), NOW),
            &[
                "service name \"db\"",
                "alias",
                "sandbox \"s\"",
                "network \"n\"",
            ],
        );
        // Names of sandboxes (and aliases) on other networks are free.
        add_svc(&mut st, &svc("t", "n", &["80"]));
        add_svc(&mut st, &svc("db", "m", &["80"]));
    }

    #[test]
    fn add_service_mode_and_port_errors() {
        let st = base();
        let with = |mode: Option<&str>, ports: &[&str], vip: Option<&str>| {
            let r = AddService {
                mode: mode.map(Into::into),
                vip: vip.map(Into::into),
                ..svc("web", "n", ports)
            };
            st.plan_add_service(&r, NOW)
        };
        let m = assert_invalid(with(Some("rr"), &["80"], None), "mode", "rr");
        assert!(m.contains("vip") && m.contains("dnsrr"), "{m}");
        assert_invalid(with(Some("VIP"), &["80"], None), "mode", "VIP");
        assert_invalid(with(Some(""), &["80"], None), "mode", "");
        let m = assert_invalid(with(None, &[], None), "port", "");
        assert!(m.contains("a vip service needs at least one --port"), "{m}");
        assert_invalid(with(Some("vip"), &[], None), "port", "");
        assert!(
            assert_invalid(with(None, &["80", "0"], None), "port", "0").contains("out of range")
        );
        assert_invalid(with(None, &["80/sctp"], None), "port", "80/sctp");
        assert!(
            assert_invalid(
                with(None, &["80", "80:8080/TCP"], None),
                "port",
                "80:8080/TCP"
            )
            .contains("repeated")
        );
        assert!(
            assert_invalid(
                with(Some("dnsrr"), &["53/udp", "53/UDP"], None),
                "port",
                "53/UDP"
            )
            .contains("repeated")
        );
        // The same port over both protocols is not a repetition.
        let c = with(None, &["53", "53/udp"], None).unwrap();
        let [Change::PutService(sv)] = &c[..] else {
            panic!()
        };
        assert_eq!(sv.ports.len(), 2);
        // dnsrr: no VIP, no --vip, ports optional.
        let m = assert_invalid(
            with(Some("dnsrr"), &[], Some("10.0.0.9")),
            "vip",
            "10.0.0.9",
        );
        assert!(m.contains("dnsrr"), "{m}");
    }

    #[test]
    fn dnsrr_service_has_no_vip() {
        let mut st = base();
        let r = AddService {
            mode: Some("dnsrr".into()),
            ..svc("db", "n", &[])
        };
        let sv = add_svc(&mut st, &r);
        assert_eq!(sv.mode, ServiceMode::Dnsrr);
        assert_eq!(sv.vip, None);
        assert!(sv.ports.is_empty());
        assert_eq!(st.address_usage("n"), Some((253, 0)));
        // It takes no address: the next endpoint gets .2.
        assert_eq!(connect(&mut st, "n", "s", None).ip, ip("10.0.0.2"));
        // Ports are allowed (kept as given) in dnsrr too.
        let r = AddService {
            mode: Some("dnsrr".into()),
            ..svc("db2", "n", &["5432"])
        };
        assert_eq!(add_svc(&mut st, &r).ports.len(), 1);
        // Backends are the same as in vip mode.
        assert_eq!(attach(&mut st, "db", "s").ip, ip("10.0.0.2"));
    }

    #[test]
    fn explicit_vip() {
        let mut st = State::default();
        let r = CreateNetwork {
            ip_range: Some("10.0.0.0/25".into()),
            aux_addresses: vec!["router=10.0.0.5".into()],
            ..req("n", Some("10.0.0.0/24"))
        };
        create_net(&mut st, &r);
        create_sb(&mut st, "t");
        connect(&mut st, "n", "t", Some("10.0.0.9"));
        let vip = |st: &State, name: &str, v: &str| {
            let r = AddService {
                vip: Some(v.into()),
                ..svc(name, "n", &["80"])
            };
            st.plan_add_service(&r, NOW)
        };
        // Outside the ip-range but inside the subnet is fine, as for --ip.
        let c = vip(&st, "web", "10.0.0.200").unwrap();
        st.apply(&c);
        assert_eq!(st.services["web"].vip, Some(ip("10.0.0.200")));
        let p = |v: &str| vip(&st, "api", v);
        assert!(assert_invalid(p("10.0.0"), "vip", "10.0.0").contains("not an IPv4"));
        assert!(assert_invalid(p("web"), "vip", "web").contains("not an IPv4"));
        assert!(assert_invalid(p("10.0.1.2"), "vip", "10.0.1.2").contains("not inside"));
        assert!(assert_invalid(p("10.0.0.0"), "vip", "10.0.0.0").contains("network address"));
        assert!(assert_invalid(p("10.0.0.255"), "vip", "10.0.0.255").contains("broadcast"));
        assert!(assert_invalid(p("10.0.0.1"), "vip", "10.0.0.1").contains("gateway"));
        assert!(
            assert_invalid(p("10.0.0.5"), "vip", "10.0.0.5").contains("aux address \"router\"")
        );
        assert!(assert_invalid(p("10.0.0.9"), "vip", "10.0.0.9").contains("sandbox \"t\""));
        let m = assert_invalid(p("10.0.0.200"), "vip", "10.0.0.200");
        assert!(m.contains("VIP of service \"web\""), "{m}");
        p("10.0.0.2").unwrap();
    }

    #[test]
    fn vip_allocation_skips_gateway_aux_and_endpoints() {
        let mut st = State::default();
        let r = CreateNetwork {
            ip_range: Some("10.0.0.0/29".into()), // hosts .1-.7
            gateway: Some("10.0.0.2".into()),
            aux_addresses: vec!["a=10.0.0.1".into(), "b=10.0.0.4".into()],
            ..req("n", Some("10.0.0.0/24"))
        };
        create_net(&mut st, &r);
        create_sb(&mut st, "s");
        assert_eq!(connect(&mut st, "n", "s", None).ip, ip("10.0.0.3"));
        assert_eq!(
            add_svc(&mut st, &svc("web", "n", &["80"])).vip,
            Some(ip("10.0.0.5"))
        );
        // The endpoint allocation skips the VIP ...
        create_sb(&mut st, "t");
        assert_eq!(connect(&mut st, "n", "t", None).ip, ip("10.0.0.6"));
        // ... and the next VIP skips both.
        assert_eq!(
            add_svc(&mut st, &svc("api", "n", &["80"])).vip,
            Some(ip("10.0.0.7"))
        );
        // The range is exhausted for VIPs as for endpoints; dnsrr needs no address.
        assert_conflict(
            st.plan_add_service(&svc("db", "n", &["80"]), NOW),
            &["network \"n\": no free address left in 10.0.0.0/29 (ip-range of 10.0.0.0/24)"],
        );
        create_sb(&mut st, "u");
        let a = st.plan_connect(&conn("n", "u", None)).unwrap_err();
        let b = st
            .plan_add_service(&svc("db", "n", &["80"]), NOW)
            .unwrap_err();
        assert_eq!(a, b, "the same error as connect's");
        let r = AddService {
            mode: Some("dnsrr".into()),
            ..svc("db", "n", &[])
        };
        add_svc(&mut st, &r);
        // Removing a service frees its VIP for endpoints.
        st.apply(&st.plan_remove_service("web").unwrap());
        assert_eq!(connect(&mut st, "n", "u", None).ip, ip("10.0.0.5"));
    }

    #[test]
    fn endpoint_static_ip_may_not_be_a_vip() {
        let mut st = base();
        let r = AddService {
            vip: Some("10.0.0.50".into()),
            ..svc("web", "n", &["80"])
        };
        add_svc(&mut st, &r);
        let m = assert_invalid(
            st.plan_connect(&conn("n", "s", Some("10.0.0.50"))),
            "ip",
            "10.0.0.50",
        );
        assert!(
            m.contains("VIP of service \"web\"") && m.contains("\"n\""),
            "{m}"
        );
        // A VIP on another network does not matter.
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        let r = AddService {
            vip: Some("10.1.0.50".into()),
            ..svc("api", "m", &["80"])
        };
        add_svc(&mut st, &r);
        connect(&mut st, "n", "s", Some("10.0.0.51"));
    }

    #[test]
    fn address_usage_counts_vips() {
        let mut st = State::default();
        let r = CreateNetwork {
            ip_range: Some("10.0.0.0/29".into()), // hosts .1-.7, gateway .1: 6 allocatable
            ..req("n", Some("10.0.0.0/24"))
        };
        create_net(&mut st, &r);
        create_sb(&mut st, "s");
        assert_eq!(st.address_usage("n"), Some((6, 0)));
        connect(&mut st, "n", "s", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));
        assert_eq!(st.address_usage("n"), Some((6, 2)));
        // A static VIP outside the range adds to the total, as a static --ip does.
        let r = AddService {
            vip: Some("10.0.0.100".into()),
            ..svc("api", "n", &["80"])
        };
        add_svc(&mut st, &r);
        assert_eq!(st.address_usage("n"), Some((7, 3)));
        let r = AddService {
            mode: Some("dnsrr".into()),
            ..svc("db", "n", &[])
        };
        add_svc(&mut st, &r);
        assert_eq!(st.address_usage("n"), Some((7, 3)), "dnsrr has no VIP");
        st.apply(&st.plan_remove_service("api").unwrap());
        assert_eq!(st.address_usage("n"), Some((6, 2)));
    }

    #[test]
    fn service_ids_and_remove() {
        let mut st = base();
        for n in ["a", "b", "c"] {
            add_svc(&mut st, &svc(n, "n", &["80"]));
        }
        assert_not_found(st.plan_remove_service("x"), "service", "x");
        assert_eq!(
            st.plan_remove_service("b").unwrap(),
            vec![Change::DeleteService("b".into())]
        );
        st.apply(&st.plan_remove_service("b").unwrap());
        let sv = add_svc(&mut st, &svc("d", "n", &["80"]));
        assert_eq!(sv.id, 2, "lowest free id");
        assert_eq!(sv.vip, Some(ip("10.0.0.3")), "b's VIP is free again");
        assert_eq!(add_svc(&mut st, &svc("e", "n", &["80"])).id, 4);
    }

    #[test]
    fn attach_errors() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        create_sb(&mut st, "t");
        connect(&mut st, "m", "t", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));
        assert_not_found(st.plan_attach("x", "s"), "service", "x");
        assert_not_found(
            st.plan_attach("web", "x"),
            "sandbox, endpoint id or endpoint address",
            "x",
        );
        assert_conflict(
            st.plan_attach("web", "t"),
            &[
                "sandbox \"t\" is not connected to network \"n\" (the network of service \"web\")",
                "netctl network connect n t",
            ],
        );
        connect(&mut st, "n", "s", None);
        attach(&mut st, "web", "s");
        assert_conflict(
            st.plan_attach("web", "s"),
            &["sandbox \"s\"", "already a backend", "service \"web\""],
        );
    }

    #[test]
    fn detach_errors() {
        let mut st = base();
        create_sb(&mut st, "t");
        connect(&mut st, "n", "s", None);
        connect(&mut st, "n", "t", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));
        attach(&mut st, "web", "s");
        assert_not_found(st.plan_detach("x", "s"), "service", "x");
        assert_not_found(
            st.plan_detach("web", "x"),
            "sandbox, endpoint id or endpoint address",
            "x",
        );
        assert_conflict(
            st.plan_detach("web", "t"),
            &["sandbox \"t\" is not a backend of service \"web\""],
        );
    }

    #[test]
    fn attach_detach_ids() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        for sb in ["a", "b", "c"] {
            create_sb(&mut st, sb);
        }
        let ea = connect(&mut st, "n", "a", None);
        connect(&mut st, "n", "b", None);
        connect(&mut st, "m", "c", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));
        add_svc(&mut st, &svc("api", "m", &["80"]));

        let b1 = attach(&mut st, "web", "a");
        assert_eq!(
            b1,
            Backend {
                id: 1,
                endpoint: ea.id.clone(),
                sandbox: "a".into(),
                ip: ea.ip,
            }
        );
        assert_eq!(attach(&mut st, "web", "b").id, 2);
        // Ids are unique over all services.
        assert_eq!(attach(&mut st, "api", "c").id, 3);
        assert_eq!(backend_sandboxes(&st, "web"), ["a", "b"]);

        let c = st.plan_detach("web", "a").unwrap();
        let [Change::PutService(sv)] = &c[..] else {
            panic!()
        };
        assert_eq!(sv.backends.len(), 1);
        assert_eq!(sv.backends[0].sandbox, "b");
        assert_eq!(sv.vip, st.services["web"].vip, "only the backends change");
        st.apply(&c);
        // The lowest free id (1) is reused, and the backend goes to the end.
        assert_eq!(attach(&mut st, "web", "a").id, 1);
        assert_eq!(backend_sandboxes(&st, "web"), ["b", "a"]);
        st.apply(&st.plan_detach("api", "c").unwrap());
        assert_eq!(attach(&mut st, "api", "c").id, 3);
    }

    #[test]
    fn disconnect_detaches_backends() {
        let mut st = base();
        create_sb(&mut st, "t");
        let es = connect(&mut st, "n", "s", None);
        connect(&mut st, "n", "t", None);
        for n in ["web", "api", "other"] {
            add_svc(&mut st, &svc(n, "n", &["80"]));
        }
        attach(&mut st, "web", "s");
        attach(&mut st, "web", "t");
        attach(&mut st, "api", "s");
        attach(&mut st, "other", "t");
        let c = st.plan_disconnect("n", "s").unwrap();
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(*c.last().unwrap(), Change::DeleteEndpoint(es.id));
        let mut put: Vec<&Service> = c
            .iter()
            .filter_map(|c| match c {
                Change::PutService(sv) => Some(sv),
                _ => None,
            })
            .collect();
        put.sort_by_key(|sv| sv.name.clone());
        assert_eq!(put[0].name, "api");
        assert!(put[0].backends.is_empty());
        assert_eq!(put[1].name, "web");
        assert_eq!(put[1].backends.len(), 1);
        assert_eq!(put[1].backends[0].sandbox, "t");
        st.apply(&c);
        assert_eq!(backend_sandboxes(&st, "other"), ["t"]);
        assert_eq!(backend_sandboxes(&st, "web"), ["t"]);
    }

    #[test]
    fn remove_sandbox_detaches_backends() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        create_sb(&mut st, "t");
        let e1 = connect(&mut st, "n", "s", None);
        let e2 = connect(&mut st, "m", "s", None);
        connect(&mut st, "n", "t", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));
        add_svc(&mut st, &svc("api", "m", &["80"]));
        attach(&mut st, "web", "s");
        attach(&mut st, "web", "t");
        attach(&mut st, "api", "s");
        let c = st.plan_remove_sandbox("s").unwrap();
        assert_eq!(c.len(), 5, "{c:?}");
        assert!(
            matches!(&c[0], Change::PutService(sv) if sv.name == "api" && sv.backends.is_empty())
        );
        assert!(
            matches!(&c[1], Change::PutService(sv) if sv.name == "web" && sv.backends.len() == 1)
        );
        assert!(c[2..4].contains(&Change::DeleteEndpoint(e1.id)));
        assert!(c[2..4].contains(&Change::DeleteEndpoint(e2.id)));
        assert_eq!(c[4], Change::DeleteSandbox("s".into()));
        st.apply(&c);
        assert_eq!(backend_sandboxes(&st, "web"), ["t"]);
        assert!(st.services["api"].backends.is_empty());
        // No backend refers to a missing endpoint.
        for sv in st.services.values() {
            for b in &sv.backends {
                assert!(st.endpoints.contains_key(&b.endpoint));
            }
        }
    }

    #[test]
    fn remove_network_refused_with_services() {
        let mut st = base();
        add_svc(&mut st, &svc("web", "n", &["80"]));
        connect(&mut st, "n", "s", None);
        // Endpoints are reported first.
        assert_conflict(st.plan_remove_network("n"), &["1 endpoints", "disconnect"]);
        st.apply(&st.plan_disconnect("n", "s").unwrap());
        assert_conflict(
            st.plan_remove_network("n"),
            &[
                "network \"n\" has 1 services (web)",
                "remove them first (netctl service rm NAME)",
            ],
        );
        add_svc(&mut st, &svc("api", "n", &["80"]));
        assert_conflict(st.plan_remove_network("n"), &["2 services (api, web)"]);
        st.apply(&st.plan_remove_service("web").unwrap());
        st.apply(&st.plan_remove_service("api").unwrap());
        assert_eq!(
            st.plan_remove_network("n").unwrap(),
            vec![Change::DeleteNetwork("n".into())]
        );
    }

    #[test]
    fn connect_alias_may_not_be_a_service_name() {
        let mut st = base();
        create_net(&mut st, &req("m", Some("10.1.0.0/24")));
        add_svc(&mut st, &svc("web", "n", &["80"]));
        let mut r = conn("n", "s", None);
        r.aliases = vec!["db".into(), "web".into()];
        assert_conflict(
            st.plan_connect(&r),
            &["alias \"web\"", "service \"web\"", "network \"n\""],
        );
        // On another network the alias is free.
        r.network = "m".into();
        st.apply(&st.plan_connect(&r).unwrap());
        // A sandbox named like the service may connect (DNS answers the service first).
        create_sb(&mut st, "web");
        connect(&mut st, "n", "web", None);
    }

    #[test]
    fn service_planning_is_pure() {
        let mut st = base();
        create_sb(&mut st, "t");
        connect(&mut st, "n", "s", None);
        connect(&mut st, "n", "t", None);
        add_svc(&mut st, &svc("web", "n", &["80"]));
        attach(&mut st, "web", "s");
        let before = st.clone();
        let _ = st.plan_add_service(&svc("api", "n", &["80"]), NOW).unwrap();
        let _ = st
            .plan_add_service(&svc("web", "n", &["80"]), NOW)
            .unwrap_err();
        let _ = st.plan_remove_service("web").unwrap();
        let _ = st.plan_attach("web", "t").unwrap();
        let _ = st.plan_detach("web", "s").unwrap();
        let _ = st.plan_disconnect("n", "s").unwrap();
        let _ = st.plan_remove_sandbox("s").unwrap();
        let _ = st.plan_remove_network("n").unwrap_err();
        assert_eq!(st, before);
    }
}
