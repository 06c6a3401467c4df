//! Everything rtnetlink: bridges, veth pairs, addresses, routes and network namespaces.
//!
//! All functions are idempotent "ensure" operations where that makes sense: they compare the
//! kernel state with the desired one, fix what differs and report whether anything changed.
//!
//! Work inside another network namespace always happens on a dedicated OS thread that
//! `setns()`es into the target namespace and runs its own current-thread tokio runtime and its
//! own rtnetlink connection ([`in_netns`]); the caller's thread never changes namespace.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use tracing::{debug, info, warn};

/// Directory holding the named network namespaces (as `ip netns` does).
pub const NETNS_DIR: &str = "/run/netns";
/// Maximum length of an interface name (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;
/// `statfs` magic of nsfs, the file system of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Errors of this module. `Display` is one line naming the operation and the object, e.g.
/// `create bridge netctl3: File exists`.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel (netlink or a system call) refused an operation with an errno.
    #[error("{op} {object}: {}", .errno.desc())]
    Kernel {
        op: &'static str,
        object: String,
        errno: Errno,
    },
    /// An I/O error on a file (sysctl, namespace file, ...).
    #[error("{op} {object}: {source}")]
    Io {
        op: &'static str,
        object: String,
        #[source]
        source: std::io::Error,
    },
    /// The netlink connection or a message failed without an errno.
    #[error("{op} {object}: {message}")]
    Protocol {
        op: &'static str,
        object: String,
        message: String,
    },
    /// The kernel state conflicts with the request in a way this module will not fix
    /// (e.g. a link of the wrong kind holds the name), or the request is invalid.
    #[error("{op} {object}: {reason}")]
    Conflict {
        op: &'static str,
        object: String,
        reason: String,
    },
}

impl NetlinkError {
    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }

    fn conflict(op: &'static str, object: impl Into<String>, reason: impl Into<String>) -> Self {
        NetlinkError::Conflict {
            op,
            object: object.into(),
            reason: reason.into(),
        }
    }

    fn io(op: &'static str, object: impl Into<String>, source: std::io::Error) -> Self {
        NetlinkError::Io {
            op,
            object: object.into(),
            source,
        }
    }

    fn sys(op: &'static str, object: impl Into<String>, errno: Errno) -> Self {
        NetlinkError::Kernel {
            op,
            object: object.into(),
            errno,
        }
    }

    fn rtnl(op: &'static str, object: impl Into<String>, err: rtnetlink::Error) -> Self {
        let object = object.into();
        match err {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => NetlinkError::Kernel {
                    op,
                    object,
                    errno: Errno::from_raw(-code.get()),
                },
                None => NetlinkError::Protocol {
                    op,
                    object,
                    message: "unexpected netlink ACK".into(),
                },
            },
            other => NetlinkError::Protocol {
                op,
                object,
                message: other.to_string(),
            },
        }
    }
}

fn rtnl_errno(err: &rtnetlink::Error) -> Option<Errno> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// Everything an endpoint needs in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethSpec {
    /// Host-side veth name, e.g. "nc0123456789ab" (<= 15 chars).
    pub host_ifname: String,
    /// Bridge the host side is enslaved to.
    pub bridge: String,
    /// Sandbox name: the namespace is /run/netns/<netns>; or, starting with `/`, the path
    /// of a namespace file someone else made (Docker's SandboxKey).
    pub netns: String,
    /// Name inside the sandbox: "eth0", "eth1", ...
    pub ifname: String,
    /// Endpoint address with the subnet prefix length, e.g. 172.17.0.2/16.
    pub address: Ipv4Net,
    /// MAC of the sandbox-side interface.
    pub mac: [u8; 6],
    /// Some => install a default route via it inside the sandbox.
    pub gateway: Option<Ipv4Addr>,
}

/// A netlink connection bound to the network namespace of the calling process (the agent's).
pub struct Netlink {
    handle: Handle,
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_kind(msg: &LinkMessage) -> Option<&InfoKind> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn link_controller(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    })
}

/// For a veth: the ifindex of its peer (in the peer's namespace).
fn link_peer_index(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn link_mac(msg: &LinkMessage) -> Option<&[u8]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn link_is_up(msg: &LinkMessage) -> bool {
    msg.header.flags.contains(LinkFlags::Up)
}

/// The IPv4 address (with prefix) carried by an address message.
fn addr_v4(msg: &AddressMessage) -> Option<Ipv4Net> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(a)) => Some(*a),
        _ => None,
    });
    let addr = local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(a)) => Some(*a),
            _ => None,
        })
    })?;
    Ipv4Net::new(addr, msg.header.prefix_len).ok()
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_dst(msg: &RouteMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
        _ => None,
    })
}

fn route_gateway(msg: &RouteMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
        _ => None,
    })
}

fn route_oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn check_ifname(op: &'static str, name: &str) -> Result<(), NetlinkError> {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains(['/', ' ', '\0']) {
        return Err(NetlinkError::conflict(
            op,
            name,
            "invalid interface name (1-15 chars, no '/', space or NUL)",
        ));
    }
    Ok(())
}

/// Writes "1" to /proc/sys/net/ipv6/conf/<ifname>/disable_ipv6 of the namespace of the calling
/// thread, if the file exists and does not hold "1" already. Returns whether it wrote.
fn disable_ipv6(ifname: &str) -> Result<bool, NetlinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    let current = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(NetlinkError::io("read ipv6 sysctl of", ifname, e)),
    };
    if current.trim() == "1" {
        return Ok(false);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| NetlinkError::io("disable ipv6 on", ifname, e))?;
    f.write_all(b"1")
        .map_err(|e| NetlinkError::io("disable ipv6 on", ifname, e))?;
    debug!(ifname, "disabled ipv6");
    Ok(true)
}

impl Netlink {
    /// Opens a netlink connection in the network namespace of the calling thread and spawns it
    /// on the current tokio runtime.
    pub async fn new() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetlinkError::io("open", "rtnetlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::rtnl("list", "links", e))
    }

    async fn get_link(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if rtnl_errno(&e) == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::rtnl("get link", name, e)),
        }
    }

    async fn addrs_v4(&self, index: Option<u32>) -> Result<Vec<AddressMessage>, NetlinkError> {
        let mut req = self.handle.address().get();
        req.message_mut().header.family = AddressFamily::Inet;
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let all: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::rtnl("list", "ipv4 addresses", e))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .collect())
    }

    async fn routes_v4_main(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::rtnl("list", "ipv4 routes", e))?;
        Ok(all
            .into_iter()
            .filter(|r| {
                r.header.address_family == AddressFamily::Inet
                    && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .collect())
    }

    async fn set_link(
        &self,
        op: &'static str,
        object: &str,
        msg: LinkMessage,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::rtnl(op, object, e))
    }

    async fn set_up(&self, name: &str, index: u32) -> Result<(), NetlinkError> {
        self.set_link(
            "bring up",
            name,
            LinkUnspec::new_with_index(index).up().build(),
        )
        .await
    }

    /// Makes `index` hold exactly `want` as its IPv4 address. Returns changed.
    async fn ensure_only_addr(
        &self,
        name: &str,
        index: u32,
        want: Ipv4Net,
    ) -> Result<bool, NetlinkError> {
        let mut changed = false;
        let mut present = false;
        for msg in self.addrs_v4(Some(index)).await? {
            if addr_v4(&msg) == Some(want) && !present {
                present = true;
                continue;
            }
            let what = addr_v4(&msg).map(|a| a.to_string()).unwrap_or_default();
            info!(link = name, address = %what, "removing unexpected address");
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if rtnl_errno(&e) == Some(Errno::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(NetlinkError::rtnl(
                        "delete address",
                        format!("{what} on {name}"),
                        e,
                    ));
                }
            }
            changed = true;
        }
        if !present {
            info!(link = name, address = %want, "adding address");
            match self
                .handle
                .address()
                .add(index, IpAddr::V4(want.addr()), want.prefix_len())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if rtnl_errno(&e) == Some(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(NetlinkError::rtnl(
                        "add address",
                        format!("{want} on {name}"),
                        e,
                    ));
                }
            }
            changed = true;
        }
        Ok(changed)
    }

    /// Prefixes the host already uses: destinations of all IPv4 routes in the main table
    /// (skipping the default route) and the network prefix of every IPv4 address, excluding
    /// anything on the interfaces named in `exclude`. Sorted, without duplicates.
    pub async fn host_prefixes(&self, exclude: &[String]) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let excluded: Vec<u32> = self
            .links()
            .await?
            .iter()
            .filter(|l| link_name(l).is_some_and(|n| exclude.iter().any(|e| e == n)))
            .map(|l| l.header.index)
            .collect();
        let mut out = Vec::new();
        for r in self.routes_v4_main().await? {
            let len = r.header.destination_prefix_length;
            if len == 0 || route_oif(&r).is_some_and(|o| excluded.contains(&o)) {
                continue;
            }
            if let Some(net) = route_dst(&r).and_then(|d| Ipv4Net::new(d, len).ok()) {
                out.push(net.trunc());
            }
        }
        for a in self.addrs_v4(None).await? {
            if excluded.contains(&a.header.index) {
                continue;
            }
            if let Some(net) = addr_v4(&a) {
                out.push(net.trunc());
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Names of all links in this namespace.
    pub async fn link_names(&self) -> Result<Vec<String>, NetlinkError> {
        Ok(self
            .links()
            .await?
            .iter()
            .filter_map(|l| link_name(l).map(str::to_owned))
            .collect())
    }

    /// ifindex of a link by name, None if absent.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.get_link(name).await?.map(|l| l.header.index))
    }

    /// Host-side links whose name starts with `prefix` (to find stale endpoint veths).
    pub async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<String>, NetlinkError> {
        let mut names = self.link_names().await?;
        names.retain(|n| n.starts_with(prefix));
        Ok(names)
    }

    /// Deletes a link by name; absent is success.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                info!(link = name, "deleted link");
                Ok(())
            }
            Err(e) if rtnl_errno(&e) == Some(Errno::ENODEV) => Ok(()),
            Err(e) => Err(NetlinkError::rtnl("delete link", name, e)),
        }
    }

    /// Idempotent: the bridge exists, is up, holds exactly `gateway` as its IPv4 address and has
    /// IPv6 disabled. Returns (ifindex, changed).
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Net,
    ) -> Result<(u32, bool), NetlinkError> {
        check_ifname("create bridge", name)?;
        let mut changed = false;
        let link = match self.get_link(name).await? {
            Some(l) => l,
            None => {
                info!(bridge = name, "creating bridge");
                let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if rtnl_errno(&e) == Some(Errno::EEXIST) => {}
                    Err(e) => return Err(NetlinkError::rtnl("create bridge", name, e)),
                }
                changed = true;
                self.get_link(name).await?.ok_or_else(|| {
                    NetlinkError::conflict("create bridge", name, "vanished after creation")
                })?
            }
        };
        if link_kind(&link) != Some(&InfoKind::Bridge) {
            return Err(NetlinkError::conflict(
                "ensure bridge",
                name,
                format!("link exists but is not a bridge ({:?})", link_kind(&link)),
            ));
        }
        let index = link.header.index;
        changed |= disable_ipv6(name)?;
        changed |= self.ensure_only_addr(name, index, gateway).await?;
        if !link_is_up(&link) {
            self.set_up(name, index).await?;
            changed = true;
        }
        if changed {
            info!(bridge = name, index, %gateway, "bridge ensured (changed)");
        }
        Ok((index, changed))
    }

    /// Brings a link up; returns whether it was down.
    pub async fn ensure_up(&self, name: &str) -> Result<bool, NetlinkError> {
        let link = self
            .get_link(name)
            .await?
            .ok_or_else(|| NetlinkError::conflict("bring up", name, "no such link"))?;
        if link_is_up(&link) {
            return Ok(false);
        }
        self.set_up(name, link.header.index).await?;
        Ok(true)
    }

    /// Idempotent: a veth pair exists whose host side is enslaved to the bridge (and left as
    /// it is, up or down: see `ensure_up`), and whose
    /// peer is inside the sandbox, configured as `spec` says. Fixes whatever differs; recreates
    /// the pair if the peer is gone. Returns (host-side ifindex, changed).
    pub async fn ensure_veth(&self, spec: &VethSpec) -> Result<(u32, bool), NetlinkError> {
        check_ifname("ensure veth", &spec.host_ifname)?;
        check_ifname("ensure veth", &spec.ifname)?;
        if !netns_exists(&spec.netns) {
            return Err(NetlinkError::conflict(
                "ensure veth",
                &spec.host_ifname,
                format!("sandbox namespace {} does not exist", spec.netns),
            ));
        }
        let bridge = self.get_link(&spec.bridge).await?.ok_or_else(|| {
            NetlinkError::conflict(
                "ensure veth",
                &spec.host_ifname,
                format!("bridge {} does not exist", spec.bridge),
            )
        })?;
        let bridge_index = bridge.header.index;

        let mut changed = false;
        let mut host = self.get_link(&spec.host_ifname).await?;
        if let Some(h) = &host {
            if link_kind(h) != Some(&InfoKind::Veth) {
                return Err(NetlinkError::conflict(
                    "ensure veth",
                    &spec.host_ifname,
                    format!("link exists but is not a veth ({:?})", link_kind(h)),
                ));
            }
            // Is the peer in the sandbox, under the expected name?
            let host_index = h.header.index;
            let peer_index = link_peer_index(h);
            let ifname = spec.ifname.clone();
            let found = in_netns(&spec.netns, move || async move {
                let nl = Netlink::new().await?;
                Ok::<_, NetlinkError>(nl.get_link(&ifname).await?.is_some_and(|l| {
                    Some(l.header.index) == peer_index && link_peer_index(&l) == Some(host_index)
                }))
            })
            .await??;
            if !found {
                warn!(
                    veth = %spec.host_ifname,
                    netns = %spec.netns,
                    ifname = %spec.ifname,
                    "peer of host veth not found in sandbox; recreating the pair"
                );
                self.delete_link(&spec.host_ifname).await?;
                host = None;
            }
        }

        let host = match host {
            Some(h) => {
                // Pair exists: make sure the sandbox side is configured.
                let s = spec.clone();
                changed |= in_netns(&spec.netns, move || async move {
                    let nl = Netlink::new().await?;
                    nl.configure_sandbox_side(&s, None).await
                })
                .await??;
                h
            }
            None => {
                self.create_veth(spec).await?;
                changed = true;
                self.get_link(&spec.host_ifname).await?.ok_or_else(|| {
                    NetlinkError::conflict("create veth", &spec.host_ifname, "vanished")
                })?
            }
        };

        let index = host.header.index;
        // The host side carries no IPv6 either: its router and neighbour solicitations
        // would only be dropped by the endpoint program (IPv4 and ARP only).
        changed |= disable_ipv6(&spec.host_ifname)?;
        if link_controller(&host) != Some(bridge_index) {
            info!(veth = %spec.host_ifname, bridge = %spec.bridge, "attaching to bridge");
            self.set_link(
                "attach to bridge",
                &spec.host_ifname,
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .build(),
            )
            .await?;
            changed = true;
        }
        // The host side is not brought up here: the caller does that with `ensure_up` once
        // the endpoint's map entry and programs are in place, so that no packet crosses an
        // unfiltered veth (make before break).
        if changed {
            info!(veth = %spec.host_ifname, netns = %spec.netns, ifname = %spec.ifname,
                address = %spec.address, "veth ensured (changed)");
        }
        Ok((index, changed))
    }

    /// The veth of a Docker endpoint: the host side `host` on `bridge` (left down, as in
    /// `ensure_veth`), the peer `peer` with `mac` left in this namespace for Docker to move
    /// into the container. Docker owns the peer once it has moved it, so an existing host
    /// side is only checked (veth, on the bridge, no IPv6); a missing one is created only if
    /// `create`. Returns (host-side ifindex, changed), or None if missing and not created.
    pub async fn ensure_docker_veth(
        &self,
        host: &str,
        peer: &str,
        bridge: &str,
        mac: [u8; 6],
        create: bool,
    ) -> Result<Option<(u32, bool)>, NetlinkError> {
        check_ifname("ensure veth", host)?;
        check_ifname("ensure veth", peer)?;
        let bridge_index = self
            .get_link(bridge)
            .await?
            .ok_or_else(|| {
                NetlinkError::conflict(
                    "ensure veth",
                    host,
                    format!("bridge {bridge} does not exist"),
                )
            })?
            .header
            .index;
        let mut changed = false;
        let link = match self.get_link(host).await? {
            Some(h) if link_kind(&h) != Some(&InfoKind::Veth) => {
                return Err(NetlinkError::conflict(
                    "ensure veth",
                    host,
                    format!("link exists but is not a veth ({:?})", link_kind(&h)),
                ));
            }
            Some(h) => h,
            None if !create => return Ok(None),
            None => {
                // Leftovers of an interrupted earlier attempt.
                self.delete_link(peer).await?;
                info!(veth = %host, peer, "creating veth pair for Docker");
                self.handle
                    .link()
                    .add(LinkVeth::new(host, peer).build())
                    .execute()
                    .await
                    .map_err(|e| NetlinkError::rtnl("create veth", host, e))?;
                let made = async {
                    let p = self.get_link(peer).await?.ok_or_else(|| {
                        NetlinkError::conflict("create veth", peer, "peer missing")
                    })?;
                    self.set_link(
                        "set mac of",
                        peer,
                        LinkUnspec::new_with_index(p.header.index)
                            .address(mac.to_vec())
                            .build(),
                    )
                    .await?;
                    self.get_link(host)
                        .await?
                        .ok_or_else(|| NetlinkError::conflict("create veth", host, "vanished"))
                }
                .await;
                match made {
                    Ok(h) => {
                        changed = true;
                        h
                    }
                    Err(e) => {
                        let _ = self.delete_link(host).await;
                        return Err(e);
                    }
                }
            }
        };
        let index = link.header.index;
        changed |= disable_ipv6(host)?;
        if link_controller(&link) != Some(bridge_index) {
            info!(veth = %host, bridge, "attaching to bridge");
            self.set_link(
                "attach to bridge",
                host,
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .build(),
            )
            .await?;
            changed = true;
        }
        Ok(Some((index, changed)))
    }

    /// In a namespace someone else configures (a Docker container's): the lowest `ethN`
    /// that is free, and whether a default route exists.
    pub async fn free_ifname_and_default(&self) -> Result<(String, bool), NetlinkError> {
        let names = self.link_names().await?;
        let ifname = (0u32..)
            .map(|i| format!("eth{i}"))
            .find(|n| !names.contains(n))
            .expect("a free ethN");
        let has_default = self
            .routes_v4_main()
            .await?
            .iter()
            .any(|r| r.header.destination_prefix_length == 0);
        Ok((ifname, has_default))
    }

    /// Creates the pair, moves and configures the peer; deletes the pair on any failure.
    async fn create_veth(&self, spec: &VethSpec) -> Result<(), NetlinkError> {
        let tail_start = spec.host_ifname.len().saturating_sub(12);
        let tmp = format!("ncp{}", &spec.host_ifname[tail_start..]);
        // Leftovers of an interrupted earlier attempt.
        self.delete_link(&tmp).await?;

        info!(veth = %spec.host_ifname, peer = %tmp, "creating veth pair");
        self.handle
            .link()
            .add(LinkVeth::new(&spec.host_ifname, &tmp).build())
            .execute()
            .await
            .map_err(|e| NetlinkError::rtnl("create veth", &spec.host_ifname, e))?;

        let res = self.place_peer(spec, &tmp).await;
        if res.is_err() {
            if let Err(e) = self.delete_link(&spec.host_ifname).await {
                warn!(veth = %spec.host_ifname, error = %e, "cleanup of failed veth");
            }
            // If the pair was half moved, the host side may have a fresh name only; try both.
            let _ = self.delete_link(&tmp).await;
        }
        res
    }

    async fn place_peer(&self, spec: &VethSpec, tmp: &str) -> Result<(), NetlinkError> {
        let peer = self
            .get_link(tmp)
            .await?
            .ok_or_else(|| NetlinkError::conflict("create veth", tmp, "peer missing"))?;
        self.set_link(
            "set mac of",
            tmp,
            LinkUnspec::new_with_index(peer.header.index)
                .address(spec.mac.to_vec())
                .build(),
        )
        .await?;
        let ns_path = netns_path(&spec.netns);
        let ns = File::open(&ns_path)
            .map_err(|e| NetlinkError::io("open netns", ns_path.display().to_string(), e))?;
        self.set_link(
            "move to sandbox",
            &format!("{tmp} -> {}", spec.netns),
            LinkUnspec::new_with_index(peer.header.index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .await?;
        drop(ns);
        let s = spec.clone();
        let tmp = tmp.to_owned();
        in_netns(&spec.netns, move || async move {
            let nl = Netlink::new().await?;
            nl.configure_sandbox_side(&s, Some(&tmp)).await
        })
        .await??;
        Ok(())
    }

    /// Runs inside the sandbox namespace. Renames `tmp` (if given) to `spec.ifname`, then makes
    /// MAC, IPv6, address, link state and default route match. Returns changed.
    async fn configure_sandbox_side(
        &self,
        spec: &VethSpec,
        tmp: Option<&str>,
    ) -> Result<bool, NetlinkError> {
        let ifname = spec.ifname.as_str();
        let mut changed = false;
        if let Some(tmp) = tmp {
            let l = self
                .get_link(tmp)
                .await?
                .ok_or_else(|| NetlinkError::conflict("rename", tmp, "not in sandbox"))?;
            if let Some(other) = self.get_link(ifname).await? {
                if link_kind(&other) == Some(&InfoKind::Veth) {
                    warn!(netns = %spec.netns, ifname, "removing stale veth holding the name");
                    self.delete_link(ifname).await?;
                } else {
                    return Err(NetlinkError::conflict(
                        "rename",
                        format!("{tmp} -> {ifname} in {}", spec.netns),
                        "name is taken by a non-veth link",
                    ));
                }
            }
            self.set_link(
                "rename",
                &format!("{tmp} -> {ifname} in {}", spec.netns),
                LinkUnspec::new_with_index(l.header.index)
                    .name(ifname)
                    .build(),
            )
            .await?;
            changed = true;
        }
        let obj = format!("{ifname} in {}", spec.netns);
        let link = self
            .get_link(ifname)
            .await?
            .ok_or_else(|| NetlinkError::conflict("configure", &obj, "link missing"))?;
        let index = link.header.index;
        let mut up = link_is_up(&link);

        if link_mac(&link) != Some(&spec.mac[..]) {
            if up {
                self.set_link(
                    "bring down",
                    &obj,
                    LinkUnspec::new_with_index(index).down().build(),
                )
                .await?;
                up = false;
            }
            self.set_link(
                "set mac of",
                &obj,
                LinkUnspec::new_with_index(index)
                    .address(spec.mac.to_vec())
                    .build(),
            )
            .await?;
            changed = true;
        }
        changed |= disable_ipv6(ifname)?;
        changed |= self.ensure_only_addr(&obj, index, spec.address).await?;
        if !up {
            self.set_up(&obj, index).await?;
            changed = true;
        }
        if let Some(gw) = spec.gateway {
            let defaults: Vec<RouteMessage> = self
                .routes_v4_main()
                .await?
                .into_iter()
                .filter(|r| r.header.destination_prefix_length == 0)
                .collect();
            let ok = defaults
                .iter()
                .any(|r| route_gateway(r) == Some(gw) && route_oif(r) == Some(index));
            if !ok {
                info!(netns = %spec.netns, gateway = %gw, dev = ifname, "setting default route");
                let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gw)
                    .output_interface(index)
                    .build();
                self.handle
                    .route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| {
                        NetlinkError::rtnl("add default route via", format!("{gw} in {obj}"), e)
                    })?;
                changed = true;
            }
        }
        Ok(changed)
    }
}

fn netns_path(name: &str) -> PathBuf {
    if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        Path::new(NETNS_DIR).join(name)
    }
}

// The width of f_type differs between architectures, hence the cast.
#[allow(clippy::unnecessary_cast)]
fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == NSFS_MAGIC)
        .unwrap_or(false)
}

/// /run/netns/<name> is a mounted nsfs file.
pub fn netns_exists(name: &str) -> bool {
    is_nsfs(&netns_path(name))
}

/// Names of the mounted namespaces in /run/netns, sorted.
pub fn list_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| is_nsfs(&e.path()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// Makes /run/netns exist and be a shared mount point, as `ip netns add` does, so that namespace
/// mounts propagate to other mount namespaces.
fn prepare_netns_dir() -> Result<(), NetlinkError> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(|e| NetlinkError::io("create", NETNS_DIR, e))?;
    let shared = || {
        nix::mount::mount(
            Some(""),
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => {
            nix::mount::mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| NetlinkError::sys("bind mount", NETNS_DIR, e))?;
            shared().map_err(|e| NetlinkError::sys("make shared", NETNS_DIR, e))
        }
        Err(e) => Err(NetlinkError::sys("make shared", NETNS_DIR, e)),
    }
}

/// Runs on a dedicated thread: creates a new network namespace for this thread and bind-mounts
/// it on /run/netns/<name>.
fn create_netns_blocking(name: &str) -> Result<(), NetlinkError> {
    prepare_netns_dir()?;
    let path = netns_path(name);
    // A file that exists but is not mounted is a leftover: reuse it.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(&path)
        .map_err(|e| NetlinkError::io("create netns file", path.display().to_string(), e))?;
    let res = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetlinkError::sys("unshare netns for", name, e))
        .and_then(|()| {
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| NetlinkError::sys("mount netns", name, e))
        });
    if res.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    res
}

/// Creates /run/netns/<name> (like `ip netns add`) if missing, then makes sure `lo` is up
/// inside. Returns whether anything changed.
///
/// Unlike `rtnetlink::NetworkNamespace::add`, this does not fork (forking a multi-threaded
/// tokio process is unsafe); it unshares a dedicated thread instead.
pub async fn ensure_netns(name: &str) -> Result<bool, NetlinkError> {
    let mut changed = false;
    if !netns_exists(name) {
        let n = name.to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netctl-netns-add".into())
            .spawn(move || {
                let _ = tx.send(create_netns_blocking(&n));
            })
            .map_err(|e| NetlinkError::io("spawn thread for netns", name, e))?;
        rx.await.map_err(|_| {
            NetlinkError::conflict("create netns", name, "worker thread panicked")
        })??;
        info!(netns = name, "created network namespace");
        changed = true;
    }
    let lo_changed = in_netns(name, || async {
        let nl = Netlink::new().await?;
        let lo = nl
            .get_link("lo")
            .await?
            .ok_or_else(|| NetlinkError::conflict("bring up", "lo", "missing"))?;
        if link_is_up(&lo) {
            return Ok(false);
        }
        nl.set_up("lo", lo.header.index).await?;
        Ok::<_, NetlinkError>(true)
    })
    .await??;
    Ok(changed || lo_changed)
}

/// Deletes /run/netns/<name> like `ip netns del`; absent is success.
pub async fn delete_netns(name: &str) -> Result<(), NetlinkError> {
    let path = netns_path(name);
    let n = name.to_owned();
    tokio::task::spawn_blocking(move || {
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(NetlinkError::sys("unmount netns", n, e)),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                info!(netns = %n, "deleted network namespace");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetlinkError::io("delete netns", n, e)),
        }
    })
    .await
    .map_err(|e| NetlinkError::conflict("delete netns", name, e.to_string()))?
}

/// Runs `f` on a new OS thread that has entered /run/netns/<name> (net namespace only), with a
/// current-thread tokio runtime, and returns its result. A panic in `f` is propagated.
pub async fn in_netns<F, Fut, T>(name: &str, f: F) -> Result<T, NetlinkError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let path = netns_path(name);
    let n = name.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            let setup = || -> Result<tokio::runtime::Runtime, NetlinkError> {
                let ns = File::open(&path).map_err(|e| NetlinkError::io("open netns", &n, e))?;
                if !is_nsfs(&path) {
                    return Err(NetlinkError::conflict("enter netns", &n, "not a namespace"));
                }
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetlinkError::sys("enter netns", &n, e))?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| NetlinkError::io("start runtime in netns", &n, e))
            };
            let out = match setup() {
                Ok(rt) => {
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(f())));
                    drop(rt);
                    r.map(Ok)
                }
                Err(e) => Ok(Err(e)),
            };
            let _ = tx.send(out);
        })
        .map_err(|e| NetlinkError::io("spawn thread for netns", name, e))?;
    match rx.await {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(NetlinkError::conflict(
            "run in netns",
            name,
            "worker thread died",
        )),
    }
}
