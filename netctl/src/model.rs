//! Desired state: networks, sandboxes and endpoints, and the validation of every change.
//!
//! Every API change is planned here against the current [`State`] (pure functions, no I/O),
//! which either yields a list of [`Change`]s or a [`ModelError`] naming the field and value.
//! The agent commits the changes to the store in one transaction, applies them to its
//! in-memory `State` with [`State::apply`], then reconciles the kernel.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

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
}

/// The whole desired state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub networks: BTreeMap<String, Network>,
    pub sandboxes: BTreeMap<String, Sandbox>,
    /// Keyed by endpoint id.
    pub endpoints: BTreeMap<String, Endpoint>,
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
