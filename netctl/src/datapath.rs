//! Everything aya: the eBPF object, its pinned maps and programs, and the TCX links that
//! attach the programs to endpoint veths and the uplink.
//!
//! Pins live under `<pin-dir>/v<LAYOUT_VERSION>/` (`maps/NAME`, `progs/NAME`,
//! `links/IFNAME_in|out`; bpffs refuses names with a dot). The first agent loads the object and pins everything; every later
//! agent adopts the pins instead of loading again, so that a restart (or a SIGKILL) never
//! detaches a program or empties a map: the links are pinned too, and the kernel keeps them
//! attached with no process holding them.
//!
//! Only this module touches aya. The reconciler sees it through [`Dataplane`], which has an
//! in-memory implementation for unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;
use netctl_common::{
    BackendInfo, COUNTER_SLOTS, CT_TIMEOUT_SLOTS, Counter, CtEntry, CtKey, DropReason, EVENTS,
    EndpointInfo, EndpointKey, IfaceInfo, LAYOUT_VERSION, MAGLEV_M, MAX_BACKENDS,
    MAX_SERVICE_PORTS, MAX_SERVICES, MAX_VIPS, SLOT_PASS_FROM_ENDPOINT, SLOT_PASS_TO_ENDPOINT,
    SLOT_PASS_UPLINK, SubnetInfo, SvcInfo, SvcKey, VipInfo, names,
};
use serde::Serialize;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netctl.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this netctl binary was built without its eBPF object; run `cargo xtask build` (or `cargo xtask build-ebpf` then rebuild)"
    )]
    NoObject,
    #[error("load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("{what}: {}", chain(source.as_ref()))]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{what}: {}", chain(source.as_ref()))]
    Map {
        what: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pin {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// An error and its sources on one line (aya's errors keep the errno in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Map {
        what,
        source: Box::new(e),
    }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Program {
        what,
        source: Box::new(e),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which way a link faces on an endpoint veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// TC ingress of the host-side veth: packets leaving the sandbox.
    In,
    /// TC egress of the host-side veth: packets entering the sandbox.
    Out,
}

impl Dir {
    fn suffix(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Dir::In => TcAttachType::Ingress,
            Dir::Out => TcAttachType::Egress,
        }
    }
}

/// What repairing one kind of object did; the reconciler sums these into its drift count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Drift {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
}

impl Drift {
    pub fn total(&self) -> u64 {
        self.added + self.updated + self.removed
    }
    pub fn add(&mut self, o: Drift) {
        self.added += o.added;
        self.updated += o.updated;
        self.removed += o.removed;
    }
}

/// A program attachment as `netctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Attachment {
    pub program: String,
    pub interface: String,
    pub hook: String,
    pub pin: String,
}

/// A map as `netctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MapUsage {
    pub name: String,
    /// The kernel map type (`hash`, `lpm_trie`, `percpu_array`).
    pub kind: String,
    pub pin: String,
    pub entries: u64,
    pub max_entries: u32,
}

/// Packets and bytes of one counter, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Stats {
    pub from_endpoints: Count,
    pub to_endpoints: Count,
    pub uplink: Count,
    /// Drops by reason name (every reason present, zero or not).
    pub drops: BTreeMap<String, Count>,
    /// Load-balancing events by name (packets also counted as passed).
    #[serde(default)]
    pub events: BTreeMap<String, Count>,
}

/// The reconciler's view of the data plane: whole-map syncs that add what is missing, fix
/// what differs and remove what is not desired, and link attachment by interface name.
pub trait Dataplane {
    /// The keyed configuration maps, for the whole-map syncs below.
    fn config_maps(&mut self) -> ConfigMaps<'_>;
    /// Rows of the Maglev table by service id (each `MAGLEV_M` backend ids); with `prune`,
    /// rows of services not named are cleared too.
    fn sync_maglev(&mut self, desired: &BTreeMap<u32, Vec<u32>>, prune: bool) -> Result<Drift>;
    /// Deletes the conntrack entries that name a backend in `gone`; returns how many.
    fn purge_conntrack(&mut self, gone: &BTreeSet<u32>) -> Result<u64>;
    /// Rows of services that did not exist hold zeros (they are cleared on removal): a
    /// writer may skip reading them first. A hint; the default ignores it.
    fn assume_empty_rows(&mut self, _ids: &[u32]) {}
    /// Attaches both endpoint programs to each named host-side veth and detaches them from
    /// every veth not named.
    fn sync_endpoint_links(&mut self, desired: &BTreeSet<String>) -> Result<Drift>;

    fn sync_ifaces(&mut self, desired: &BTreeMap<u32, IfaceInfo>) -> Result<Drift> {
        sync(self.config_maps().ifaces, desired, names::MAP_IFACES)
    }
    fn sync_subnets(&mut self, desired: &BTreeMap<Ipv4Net, SubnetInfo>) -> Result<Drift> {
        sync(self.config_maps().subnets, desired, names::MAP_SUBNETS)
    }
    fn sync_endpoints(&mut self, desired: &BTreeMap<EndpointKey, EndpointInfo>) -> Result<Drift> {
        sync(self.config_maps().endpoints, desired, names::MAP_ENDPOINTS)
    }
    /// With `prune` false, only adds and updates (so a backend exists before any table
    /// slot names it, and stays until none does).
    fn sync_backends(
        &mut self,
        desired: &BTreeMap<u32, BackendInfo>,
        prune: bool,
    ) -> Result<Drift> {
        sync_with(
            self.config_maps().backends,
            desired,
            names::MAP_BACKENDS,
            prune,
        )
    }
    fn sync_services(&mut self, desired: &BTreeMap<SvcKey, SvcInfo>) -> Result<Drift> {
        sync(self.config_maps().services, desired, names::MAP_SERVICES)
    }
    /// With `prune` false, only adds and updates.
    fn sync_vips(&mut self, desired: &BTreeMap<[u8; 4], VipInfo>, prune: bool) -> Result<Drift> {
        sync_with(self.config_maps().vips, desired, names::MAP_VIPS, prune)
    }
}

/// The keyed maps userspace configures, borrowed for a sync.
pub struct ConfigMaps<'a> {
    pub ifaces: &'a mut dyn KeyedMap<u32, IfaceInfo>,
    pub subnets: &'a mut dyn KeyedMap<Ipv4Net, SubnetInfo>,
    pub endpoints: &'a mut dyn KeyedMap<EndpointKey, EndpointInfo>,
    pub backends: &'a mut dyn KeyedMap<u32, BackendInfo>,
    pub services: &'a mut dyn KeyedMap<SvcKey, SvcInfo>,
    pub vips: &'a mut dyn KeyedMap<[u8; 4], VipInfo>,
}

/// The loaded (or adopted) object: program and map handles, and the pin root.
pub struct Datapath {
    root: PathBuf,
    /// Whether this agent found everything pinned by an earlier one.
    pub adopted: bool,
    ifaces: HashMap<MapData, u32, IfaceInfo>,
    subnets: LpmTrie<MapData, [u8; 4], SubnetInfo>,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    counters: PerCpuArray<MapData, Counter>,
    services: HashMap<MapData, SvcKey, SvcInfo>,
    vips: HashMap<MapData, [u8; 4], VipInfo>,
    backends: HashMap<MapData, u32, BackendInfo>,
    maglev: Array<MapData, u32>,
    /// An LRU hash: aya's `HashMap` handles both kinds.
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_timeouts: Array<MapData, u64>,
    /// Maglev rows as last written or read, so that a sync compares in memory.
    maglev_rows: BTreeMap<u32, Vec<u32>>,
    /// The MAGLEV map as a plain fd, for batch writes.
    maglev_fd: std::os::fd::OwnedFd,
    /// Rows of the MAGLEV table (service ids 1..max_services).
    max_services: u32,
    from_endpoint: SchedClassifier,
    to_endpoint: SchedClassifier,
    uplink: SchedClassifier,
    /// The uplink the agent attached to (for status and `down`).
    uplink_iface: Option<String>,
}

impl Datapath {
    /// `<pin_dir>/v<LAYOUT_VERSION>`.
    pub fn root_for(pin_dir: &Path) -> PathBuf {
        pin_dir.join(format!("v{LAYOUT_VERSION}"))
    }

    fn map_pin(root: &Path, name: &str) -> PathBuf {
        root.join("maps").join(name)
    }
    fn prog_pin(root: &Path, name: &str) -> PathBuf {
        root.join("progs").join(name)
    }
    fn link_dir(root: &Path) -> PathBuf {
        root.join("links")
    }
    fn link_pin(root: &Path, ifname: &str, dir: Dir) -> PathBuf {
        Self::link_dir(root).join(format!("{ifname}_{}", dir.suffix()))
    }
    fn uplink_pin(root: &Path, ifname: &str) -> PathBuf {
        Self::link_dir(root).join(format!("uplink-{ifname}_in"))
    }

    fn all_pins(root: &Path) -> Vec<PathBuf> {
        names::MAPS
            .iter()
            .map(|n| Self::map_pin(root, n))
            .chain(names::PROGRAMS.iter().map(|n| Self::prog_pin(root, n)))
            .collect()
    }

    /// Loads the embedded object against the maps pinned under `pin_dir` (creating and
    /// pinning those that are missing, so flows, conntrack and counters survive a restart
    /// or an upgrade), and pins its programs: a pinned program with the same tag (the hash
    /// of its instructions) is kept, a different one is replaced, and links attached to it
    /// are moved to the new program atomically by the next link sync (`bpf_link_update`).
    /// The conntrack table is created with `ct_size` entries; a pinned one keeps its size.
    pub fn open(pin_dir: &Path, ct_size: u32, max_services: u32) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let root = Self::root_for(pin_dir);
        ensure_bpffs(pin_dir)?;
        for sub in ["maps", "progs", "links"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let adopted = Self::all_pins(&root).iter().all(|p| p.exists());
        let map_pins: Vec<(&str, PathBuf)> = names::MAPS
            .iter()
            .map(|n| (*n, Self::map_pin(&root, n)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::MAP_CONNTRACK, ct_size);
        // Tables for `max_services` services: a Maglev row each, up to 4 ports and 16
        // backends each on average (pinned maps keep the size they were made with).
        let max = max_services.max(2);
        loader.map_max_entries(names::MAP_MAGLEV, max.saturating_mul(MAGLEV_M));
        loader.map_max_entries(names::MAP_VIPS, max.max(MAX_VIPS));
        loader.map_max_entries(names::MAP_SERVICES, (max * 4).max(MAX_SERVICE_PORTS));
        loader.map_max_entries(names::MAP_BACKENDS, (max * 16).max(MAX_BACKENDS));
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf: Ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let mut replaced = Vec::new();
        for name in names::PROGRAMS {
            let path = Self::prog_pin(&root, name);
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Pin {
                    path: path.clone(),
                    detail: format!("program {name} missing from the object"),
                })?
                .try_into()
                .map_err(prog_err(format!("program {name}")))?;
            prog.load()
                .map_err(prog_err(format!("load program {name}")))?;
            let tag = prog.info().map_err(prog_err("read program info"))?.tag();
            if path.exists() {
                match aya::programs::ProgramInfo::from_pin(&path) {
                    Ok(old) if old.tag() == tag => continue,
                    _ => {
                        std::fs::remove_file(&path).map_err(io_err(&path))?;
                        replaced.push(name);
                    }
                }
            }
            prog.pin(&path).map_err(|e| DatapathError::Pin {
                path: path.clone(),
                detail: chain(&e),
            })?;
        }
        if !replaced.is_empty() {
            tracing::info!(programs = ?replaced, "replaced pinned programs with this binary's");
        }
        tracing::info!(root = %root.display(), adopted, "eBPF object loaded against the pinned maps");
        let mut dp = Self::adopt(&root)?;
        dp.adopted = adopted;
        dp.max_services = aya::maps::MapInfo::from_pin(Self::map_pin(&root, names::MAP_MAGLEV))
            .map(|i| i.max_entries() / MAGLEV_M)
            .unwrap_or(MAX_SERVICES);
        Ok(dp)
    }

    /// Service ids this data plane has Maglev rows for (1..max).
    pub fn max_services(&self) -> u32 {
        self.max_services
    }

    fn open_map(root: &Path, name: &str) -> Result<Map> {
        let path = Self::map_pin(root, name);
        let data = MapData::from_pin(&path).map_err(map_err(format!("open {}", path.display())))?;
        Map::from_map_data(data).map_err(map_err(format!("open {}", path.display())))
    }

    fn open_prog(root: &Path, name: &str) -> Result<SchedClassifier> {
        let path = Self::prog_pin(root, name);
        SchedClassifier::from_pin(&path).map_err(prog_err(format!("open {}", path.display())))
    }

    /// A pinned map as its typed handle.
    fn open_typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
        root: &Path,
        name: &str,
    ) -> Result<T> {
        T::try_from(Self::open_map(root, name)?)
            .map_err(map_err(format!("map {name} has an unexpected type")))
    }

    fn adopt(root: &Path) -> Result<Self> {
        Ok(Self {
            root: root.to_owned(),
            adopted: true,
            ifaces: Self::open_typed(root, names::MAP_IFACES)?,
            subnets: Self::open_typed(root, names::MAP_SUBNETS)?,
            endpoints: Self::open_typed(root, names::MAP_ENDPOINTS)?,
            counters: Self::open_typed(root, names::MAP_COUNTERS)?,
            services: Self::open_typed(root, names::MAP_SERVICES)?,
            vips: Self::open_typed(root, names::MAP_VIPS)?,
            backends: Self::open_typed(root, names::MAP_BACKENDS)?,
            maglev: Self::open_typed(root, names::MAP_MAGLEV)?,
            conntrack: Self::open_typed(root, names::MAP_CONNTRACK)?,
            ct_timeouts: Self::open_typed(root, names::MAP_CT_TIMEOUTS)?,
            maglev_rows: BTreeMap::new(),
            maglev_fd: {
                let p = Self::map_pin(root, names::MAP_MAGLEV);
                raw::obj_get(&p).map_err(io_err(&p))?
            },
            max_services: MAX_SERVICES,
            from_endpoint: Self::open_prog(root, names::PROG_FROM_ENDPOINT)?,
            to_endpoint: Self::open_prog(root, names::PROG_TO_ENDPOINT)?,
            uplink: Self::open_prog(root, names::PROG_UPLINK_INGRESS)?,
            uplink_iface: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn prog(&mut self, dir: Dir) -> &mut SchedClassifier {
        match dir {
            Dir::In => &mut self.from_endpoint,
            Dir::Out => &mut self.to_endpoint,
        }
    }

    /// Ensures `prog` is attached to `ifname` at `attach_type` through a link pinned at
    /// `pin`. A pin whose link no longer runs our program there (the interface was recreated,
    /// or the link was detached by hand) is replaced. Returns whether anything changed.
    fn ensure_link(
        prog: &mut SchedClassifier,
        ifname: &str,
        attach_type: TcAttachType,
        pin: &Path,
    ) -> Result<bool> {
        let prog_id = prog.info().map_err(prog_err("read program info"))?.id();
        if pin.exists() {
            let attached: Vec<u32> = SchedClassifier::query_tcx(ifname, attach_type)
                .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
                .unwrap_or_default();
            if attached.contains(&prog_id) {
                return Ok(false);
            }
            // The link still runs an older program of ours on this interface: move it to
            // this one atomically (bpf_link_update), with no moment without a program.
            let link_prog = PinnedLink::from_pin(pin)
                .ok()
                .and_then(|l| FdLink::from(l).info().ok())
                .map(|i| i.program_id());
            if link_prog.is_some_and(|id| attached.contains(&id)) {
                let link =
                    FdLink::from(PinnedLink::from_pin(pin).map_err(|e| DatapathError::Pin {
                        path: pin.to_owned(),
                        detail: chain(&e),
                    })?);
                let link = aya::programs::tc::SchedClassifierLink::try_from(link).map_err(|e| {
                    DatapathError::Pin {
                        path: pin.to_owned(),
                        detail: chain(&e),
                    }
                })?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(prog_err(format!("replace the program on {ifname}")))?;
                // The pin keeps the link; drop our handle.
                drop(prog.take_link(id));
                tracing::info!(ifname, "moved link to the new program");
                return Ok(true);
            }
            tracing::warn!(pin = %pin.display(), ifname, "stale link pin; re-attaching");
            std::fs::remove_file(pin).map_err(io_err(pin))?;
        }
        let id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(prog_err(format!("attach to {ifname}")))?;
        let link = prog
            .take_link(id)
            .map_err(prog_err(format!("take link on {ifname}")))?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| DatapathError::Pin {
                path: pin.to_owned(),
                detail: chain(&e),
            })?;
        fd.pin(pin).map_err(|e| DatapathError::Pin {
            path: pin.to_owned(),
            detail: chain(&e),
        })?;
        Ok(true)
    }

    /// Unpins (and so detaches) the link pinned at `pin`; absent is success.
    fn remove_link(pin: &Path) -> Result<bool> {
        match PinnedLink::from_pin(pin) {
            Ok(link) => {
                // Dropping the last reference detaches the link from its interface.
                let _fd: FdLink = link.unpin().map_err(io_err(pin))?;
                Ok(true)
            }
            Err(_) if !pin.exists() => Ok(false),
            Err(_) => {
                // Not a link (or unreadable): remove the file so the name is free.
                std::fs::remove_file(pin).map_err(io_err(pin))?;
                Ok(true)
            }
        }
    }

    /// Host-side veths that have link pins.
    fn pinned_endpoint_ifaces(&self) -> Result<BTreeSet<String>> {
        let dir = Self::link_dir(&self.root);
        let mut out = BTreeSet::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("uplink-") {
                continue;
            }
            if let Some((ifname, _)) = name.rsplit_once('_') {
                out.insert(ifname.to_owned());
            }
        }
        Ok(out)
    }

    /// Attaches the uplink program to `ifname` (TC ingress).
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<bool> {
        let pin = Self::uplink_pin(&self.root, ifname);
        let changed = Self::ensure_link(&mut self.uplink, ifname, TcAttachType::Ingress, &pin)?;
        self.uplink_iface = Some(ifname.to_owned());
        Ok(changed)
    }

    /// Every attachment, read from the link pins.
    pub fn attachments(&self) -> Result<Vec<Attachment>> {
        let dir = Self::link_dir(&self.root);
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let Some((base, hook)) = name.rsplit_once('_') else {
                continue;
            };
            let (program, interface, hook) = match (base.strip_prefix("uplink-"), hook) {
                (Some(i), _) => (names::PROG_UPLINK_INGRESS, i, "tcx/ingress"),
                (None, "in") => (names::PROG_FROM_ENDPOINT, base, "tcx/ingress"),
                (None, _) => (names::PROG_TO_ENDPOINT, base, "tcx/egress"),
            };
            out.push(Attachment {
                program: program.to_owned(),
                interface: interface.to_owned(),
                hook: hook.to_owned(),
                pin: dir.join(&name).display().to_string(),
            });
        }
        Ok(out)
    }

    /// Entry counts of every map.
    pub fn map_usage(&self) -> Vec<MapUsage> {
        let pin = |n: &str| Self::map_pin(&self.root, n).display().to_string();
        vec![
            MapUsage {
                name: names::MAP_IFACES.into(),
                kind: "hash".into(),
                pin: pin(names::MAP_IFACES),
                entries: self.ifaces.keys().count() as u64,
                max_entries: netctl_common::MAX_IFACES,
            },
            MapUsage {
                name: names::MAP_SUBNETS.into(),
                kind: "lpm_trie".into(),
                pin: pin(names::MAP_SUBNETS),
                entries: self.subnets.keys().count() as u64,
                max_entries: netctl_common::MAX_SUBNETS,
            },
            MapUsage {
                name: names::MAP_ENDPOINTS.into(),
                kind: "hash".into(),
                pin: pin(names::MAP_ENDPOINTS),
                entries: self.endpoints.keys().count() as u64,
                max_entries: netctl_common::MAX_ENDPOINTS,
            },
            MapUsage {
                name: names::MAP_SERVICES.into(),
                kind: "hash".into(),
                pin: pin(names::MAP_SERVICES),
                entries: self.services.keys().count() as u64,
                max_entries: MAX_SERVICE_PORTS,
            },
            MapUsage {
                name: names::MAP_VIPS.into(),
                kind: "hash".into(),
                pin: pin(names::MAP_VIPS),
                entries: self.vips.keys().count() as u64,
                max_entries: MAX_VIPS,
            },
            MapUsage {
                name: names::MAP_BACKENDS.into(),
                kind: "hash".into(),
                pin: pin(names::MAP_BACKENDS),
                entries: self.backends.keys().count() as u64,
                max_entries: MAX_BACKENDS,
            },
            MapUsage {
                name: names::MAP_MAGLEV.into(),
                kind: "array".into(),
                pin: pin(names::MAP_MAGLEV),
                entries: u64::from(self.max_services * MAGLEV_M),
                max_entries: self.max_services * MAGLEV_M,
            },
            MapUsage {
                name: names::MAP_CONNTRACK.into(),
                kind: "lru_hash".into(),
                pin: pin(names::MAP_CONNTRACK),
                entries: self.conntrack.keys().count() as u64,
                max_entries: self.conntrack_size(),
            },
            MapUsage {
                name: names::MAP_CT_TIMEOUTS.into(),
                kind: "array".into(),
                pin: pin(names::MAP_CT_TIMEOUTS),
                entries: u64::from(CT_TIMEOUT_SLOTS),
                max_entries: CT_TIMEOUT_SLOTS,
            },
            MapUsage {
                name: names::MAP_COUNTERS.into(),
                kind: "percpu_array".into(),
                pin: pin(names::MAP_COUNTERS),
                entries: u64::from(COUNTER_SLOTS),
                max_entries: COUNTER_SLOTS,
            },
        ]
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let slot = |i: u32| -> Result<Count> {
            let per_cpu = self
                .counters
                .get(&i, 0)
                .map_err(map_err(format!("read counter slot {i}")))?;
            Ok(per_cpu.iter().fold(Count::default(), |a, c| Count {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }))
        };
        let mut s = Stats {
            from_endpoints: slot(SLOT_PASS_FROM_ENDPOINT)?,
            to_endpoints: slot(SLOT_PASS_TO_ENDPOINT)?,
            uplink: slot(SLOT_PASS_UPLINK)?,
            drops: BTreeMap::new(),
            events: BTreeMap::new(),
        };
        for r in DropReason::ALL {
            s.drops.insert(r.name().to_owned(), slot(r.slot())?);
        }
        for (i, name) in EVENTS {
            s.events.insert(name.to_owned(), slot(i)?);
        }
        Ok(s)
    }

    /// Capacity of the conntrack table as the kernel has it.
    pub fn conntrack_size(&self) -> u32 {
        aya::maps::MapInfo::from_pin(Self::map_pin(&self.root, names::MAP_CONNTRACK))
            .map(|i| i.max_entries())
            .unwrap_or(0)
    }

    /// Sets the conntrack timeouts (nanoseconds, by `CT_TIMEOUT_*` index).
    pub fn set_ct_timeouts(&mut self, ns: [u64; CT_TIMEOUT_SLOTS as usize]) -> Result<()> {
        for (i, v) in ns.iter().enumerate() {
            self.ct_timeouts
                .set(i as u32, *v, 0)
                .map_err(map_err("write CT_TIMEOUTS"))?;
        }
        Ok(())
    }

    /// Conntrack entries, for inspection and tests.
    pub fn conntrack_entries(&self) -> Vec<(CtKey, CtEntry)> {
        self.conntrack.iter().filter_map(|r| r.ok()).collect()
    }

    /// Detaches every link and removes every pin under the root (`netctl down`).
    pub fn teardown(pin_dir: &Path) -> Result<()> {
        let root = Self::root_for(pin_dir);
        let links = Self::link_dir(&root);
        if let Ok(rd) = std::fs::read_dir(&links) {
            for e in rd.flatten() {
                Self::remove_link(&e.path())?;
            }
        }
        for p in Self::all_pins(&root) {
            if p.exists() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        for sub in ["links", "maps", "progs", ""] {
            let d = root.join(sub);
            let _ = std::fs::remove_dir(&d);
        }
        let _ = std::fs::remove_dir(pin_dir);
        Ok(())
    }
}

/// Mounts bpffs at /sys/fs/bpf if the pin directory lives there and it is not mounted.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mounted = mounts.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, mp, fs) = (f.next(), f.next(), f.next());
            mp == Some("/sys/fs/bpf") && fs == Some("bpf")
        });
        if !mounted {
            nix::mount::mount(
                Some("bpf"),
                bpffs,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| DatapathError::Io {
                path: bpffs.to_owned(),
                source: std::io::Error::from(e),
            })?;
        }
    }
    std::fs::create_dir_all(pin_dir).map_err(io_err(pin_dir))
}

/// A map the reconciler reads whole and writes entry by entry: the pinned maps, and plain
/// `BTreeMap`s in the in-memory data plane.
pub trait KeyedMap<K, V> {
    fn entries(&self) -> BTreeMap<K, V>;
    fn put(&mut self, k: &K, v: &V) -> Result<(), aya::maps::MapError>;
    fn del(&mut self, k: &K) -> Result<(), aya::maps::MapError>;
}

impl<K: aya::Pod + Ord, V: aya::Pod> KeyedMap<K, V> for HashMap<MapData, K, V> {
    fn entries(&self) -> BTreeMap<K, V> {
        self.iter().filter_map(|r| r.ok()).collect()
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), aya::maps::MapError> {
        self.insert(*k, *v, 0)
    }
    fn del(&mut self, k: &K) -> Result<(), aya::maps::MapError> {
        self.remove(k)
    }
}

impl KeyedMap<Ipv4Net, SubnetInfo> for LpmTrie<MapData, [u8; 4], SubnetInfo> {
    fn entries(&self) -> BTreeMap<Ipv4Net, SubnetInfo> {
        self.iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| net_of_key(&k).map(|n| (n, v)))
            .collect()
    }
    fn put(&mut self, k: &Ipv4Net, v: &SubnetInfo) -> Result<(), aya::maps::MapError> {
        self.insert(&lpm_key(k), *v, 0)
    }
    fn del(&mut self, k: &Ipv4Net) -> Result<(), aya::maps::MapError> {
        self.remove(&lpm_key(k))
    }
}

impl<K: Ord + Copy, V: Copy> KeyedMap<K, V> for BTreeMap<K, V> {
    fn entries(&self) -> BTreeMap<K, V> {
        self.clone()
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), aya::maps::MapError> {
        self.insert(*k, *v);
        Ok(())
    }
    fn del(&mut self, k: &K) -> Result<(), aya::maps::MapError> {
        self.remove(k);
        Ok(())
    }
}

/// Which half of a diff to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Entries new or changed in `new`.
    Put,
    /// Entries of `old` absent from `new`.
    Delete,
}

/// Writes one half of the difference between two partial views of a map (the entries of
/// the objects that changed), without reading the map.
pub fn write_diff<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut dyn KeyedMap<K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    phase: Phase,
    name: &str,
) -> Result<Drift> {
    let mut d = Drift::default();
    match phase {
        Phase::Put => {
            for (k, v) in new {
                match old.get(k) {
                    Some(o) if o == v => continue,
                    Some(_) => d.updated += 1,
                    None => d.added += 1,
                }
                map.put(k, v).map_err(map_err(format!("write {name}")))?;
            }
        }
        Phase::Delete => {
            for k in old.keys().filter(|k| !new.contains_key(k)) {
                map.del(k).map_err(map_err(format!("delete from {name}")))?;
                d.removed += 1;
            }
        }
    }
    Ok(d)
}

/// Makes `map` hold exactly `desired`: adds and updates first, removals last (make before
/// break), touching only the entries that differ.
fn sync<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut (impl KeyedMap<K, V> + ?Sized),
    desired: &BTreeMap<K, V>,
    name: &str,
) -> Result<Drift> {
    sync_with(map, desired, name, true)
}

fn sync_with<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut (impl KeyedMap<K, V> + ?Sized),
    desired: &BTreeMap<K, V>,
    name: &str,
    prune: bool,
) -> Result<Drift> {
    let actual = map.entries();
    let mut d = Drift::default();
    for (k, v) in desired {
        match actual.get(k) {
            Some(a) if a == v => continue,
            Some(_) => d.updated += 1,
            None => d.added += 1,
        }
        map.put(k, v).map_err(map_err(format!("write {name}")))?;
    }
    if prune {
        for k in actual.keys().filter(|k| !desired.contains_key(k)) {
            map.del(k).map_err(map_err(format!("delete from {name}")))?;
            d.removed += 1;
        }
    }
    Ok(d)
}

/// Writes the Maglev rows that differ from `cache` (filled from the map on first use) and,
/// with `prune`, clears rows no longer desired.
fn sync_maglev_rows(
    cache: &mut BTreeMap<u32, Vec<u32>>,
    desired: &BTreeMap<u32, Vec<u32>>,
    prune: bool,
    max_services: u32,
    mut read: impl FnMut(u32) -> Result<u32>,
    mut write_row: impl FnMut(u32, &[u32]) -> Result<()>,
) -> Result<Drift> {
    let m = MAGLEV_M as usize;
    let mut d = Drift::default();
    let empty = vec![0u32; m];
    let stale: Vec<u32> = cache
        .keys()
        .filter(|id| prune && !desired.contains_key(id))
        .copied()
        .collect();
    for (id, row) in desired
        .iter()
        .map(|(id, r)| (*id, r))
        .chain(stale.iter().map(|id| (*id, &empty)))
    {
        if id == 0 || id >= max_services || row.len() != m {
            continue;
        }
        let current = match cache.get(&id) {
            Some(c) => c.clone(),
            None => (0..m as u32)
                .map(|slot| read(id * MAGLEV_M + slot))
                .collect::<Result<Vec<u32>>>()?,
        };
        let changed = row != &current;
        if changed {
            // The whole row in one write: slots are read per packet, each is consistent.
            write_row(id, row)?;
        }
        if changed {
            if current.iter().all(|&b| b == 0) {
                d.added += 1;
            } else if row.iter().all(|&b| b == 0) {
                d.removed += 1;
            } else {
                d.updated += 1;
            }
        }
        if row.iter().all(|&b| b == 0) {
            cache.remove(&id);
        } else {
            cache.insert(id, row.clone());
        }
    }
    Ok(d)
}

/// An LPM key for an IPv4 prefix.
fn lpm_key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn net_of_key(k: &Key<[u8; 4]>) -> Option<Ipv4Net> {
    let addr = Ipv4Addr::from(k.data());
    Ipv4Net::new(addr, u8::try_from(k.prefix_len()).ok()?).ok()
}

impl Dataplane for Datapath {
    fn config_maps(&mut self) -> ConfigMaps<'_> {
        ConfigMaps {
            ifaces: &mut self.ifaces,
            subnets: &mut self.subnets,
            endpoints: &mut self.endpoints,
            backends: &mut self.backends,
            services: &mut self.services,
            vips: &mut self.vips,
        }
    }

    fn sync_maglev(&mut self, desired: &BTreeMap<u32, Vec<u32>>, prune: bool) -> Result<Drift> {
        let (map, fd) = (&self.maglev, &self.maglev_fd);
        let pin = Self::map_pin(&self.root, names::MAP_MAGLEV);
        sync_maglev_rows(
            &mut self.maglev_rows,
            desired,
            prune,
            self.max_services,
            |i| {
                map.get(&i, 0)
                    .map_err(map_err(format!("read {}", names::MAP_MAGLEV)))
            },
            |id, row| {
                let keys: Vec<u32> = (0..MAGLEV_M).map(|s| id * MAGLEV_M + s).collect();
                raw::update_batch_u32(fd, &keys, row).map_err(io_err(&pin))
            },
        )
    }

    /// Tells the Maglev cache that these rows hold zeros (rows of services that did not
    /// exist), so that writing them needs no read first.
    fn assume_empty_rows(&mut self, ids: &[u32]) {
        for id in ids {
            self.maglev_rows
                .entry(*id)
                .or_insert_with(|| vec![0; MAGLEV_M as usize]);
        }
    }

    fn purge_conntrack(&mut self, gone: &BTreeSet<u32>) -> Result<u64> {
        let stale: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, e)| gone.contains(&e.backend_id))
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in stale {
            if self.conntrack.remove(&k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn sync_endpoint_links(&mut self, desired: &BTreeSet<String>) -> Result<Drift> {
        let mut d = Drift::default();
        let before = self.pinned_endpoint_ifaces()?;
        for ifname in desired {
            let mut changed = false;
            for dir in [Dir::In, Dir::Out] {
                let pin = Self::link_pin(&self.root, ifname, dir);
                changed |= Self::ensure_link(self.prog(dir), ifname, dir.attach_type(), &pin)?;
            }
            if changed {
                if before.contains(ifname) {
                    d.updated += 1;
                } else {
                    d.added += 1;
                }
            }
        }
        for ifname in before.difference(desired) {
            for dir in [Dir::In, Dir::Out] {
                Self::remove_link(&Self::link_pin(&self.root, ifname, dir))?;
            }
            d.removed += 1;
        }
        Ok(d)
    }
}

/// Two `bpf(2)` commands aya 0.14 does not expose: opening a pinned map as a plain fd, and
/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+), which writes a whole Maglev row in one call
/// instead of one call per slot. Layouts from include/uapi/linux/bpf.h (`union bpf_attr`).
mod raw {
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::path::Path;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a zeroed bpf_attr-sized buffer with the fields the command
        // reads set; the kernel copies at most size_of_val(attr) bytes.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr) as libc::c_uint,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// `BPF_OBJ_GET`: { pathname: u64, bpf_fd: u32, file_flags: u32 }.
    pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes())?;
        let mut attr = [0u64; 16];
        attr[0] = c.as_ptr() as u64;
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_MAP_UPDATE_BATCH` of u32 keys to u32 values: { in_batch, out_batch, keys,
    /// values: u64, count: u32, map_fd: u32, elem_flags: u64, flags: u64 }.
    pub fn update_batch_u32(fd: &OwnedFd, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        assert_eq!(keys.len(), values.len());
        let mut attr = [0u64; 16];
        attr[2] = keys.as_ptr() as u64;
        attr[3] = values.as_ptr() as u64;
        attr[4] = (keys.len() as u64) | ((fd.as_raw_fd() as u32 as u64) << 32);
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map(|_| ())
    }
}

/// An in-memory data plane for unit tests of the reconciler.
#[derive(Debug, Default)]
pub struct MemDataplane {
    pub ifaces: BTreeMap<u32, IfaceInfo>,
    pub subnets: BTreeMap<Ipv4Net, SubnetInfo>,
    pub endpoints: BTreeMap<EndpointKey, EndpointInfo>,
    pub backends: BTreeMap<u32, BackendInfo>,
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub services: BTreeMap<SvcKey, SvcInfo>,
    pub vips: BTreeMap<[u8; 4], VipInfo>,
    /// Conntrack entries as (flow, backend id).
    pub conntrack: BTreeMap<CtKey, u32>,
    pub links: BTreeSet<String>,
}

impl Dataplane for MemDataplane {
    fn config_maps(&mut self) -> ConfigMaps<'_> {
        ConfigMaps {
            ifaces: &mut self.ifaces,
            subnets: &mut self.subnets,
            endpoints: &mut self.endpoints,
            backends: &mut self.backends,
            services: &mut self.services,
            vips: &mut self.vips,
        }
    }
    fn sync_maglev(&mut self, desired: &BTreeMap<u32, Vec<u32>>, prune: bool) -> Result<Drift> {
        let mut cache = self.maglev.clone();
        let d = sync_maglev_rows(
            &mut cache,
            desired,
            prune,
            MAX_SERVICES,
            |_| Ok(0),
            |_, _| Ok(()),
        )?;
        self.maglev = cache;
        Ok(d)
    }
    fn purge_conntrack(&mut self, gone: &BTreeSet<u32>) -> Result<u64> {
        let before = self.conntrack.len();
        self.conntrack.retain(|_, b| !gone.contains(b));
        Ok((before - self.conntrack.len()) as u64)
    }
    fn sync_endpoint_links(&mut self, desired: &BTreeSet<String>) -> Result<Drift> {
        let d = Drift {
            added: desired.difference(&self.links).count() as u64,
            updated: 0,
            removed: self.links.difference(desired).count() as u64,
        };
        self.links = desired.clone();
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the order of writes.
    #[derive(Default)]
    struct Recorder {
        map: BTreeMap<u32, u32>,
        ops: Vec<String>,
    }

    impl KeyedMap<u32, u32> for Recorder {
        fn entries(&self) -> BTreeMap<u32, u32> {
            self.map.clone()
        }
        fn put(&mut self, k: &u32, v: &u32) -> Result<(), aya::maps::MapError> {
            self.ops.push(format!("put {k}={v}"));
            self.map.insert(*k, *v);
            Ok(())
        }
        fn del(&mut self, k: &u32) -> Result<(), aya::maps::MapError> {
            self.ops.push(format!("del {k}"));
            self.map.remove(k);
            Ok(())
        }
    }

    #[test]
    fn sync_writes_only_differences_removals_last() {
        let desired: BTreeMap<u32, u32> = [(1, 10), (2, 20), (3, 30)].into();
        let mut m = Recorder {
            map: [(2, 21), (3, 30), (4, 40)].into(),
            ..Default::default()
        };
        let d = sync(&mut m, &desired, "T").unwrap();
        assert_eq!(m.ops, vec!["put 1=10", "put 2=20", "del 4"]);
        assert_eq!(m.map, desired);
        assert_eq!(
            d,
            Drift {
                added: 1,
                updated: 1,
                removed: 1
            }
        );
        m.ops.clear();
        assert_eq!(sync(&mut m, &desired, "T").unwrap().total(), 0);
        assert!(m.ops.is_empty());
    }

    #[test]
    fn lpm_key_round_trips() {
        let n: Ipv4Net = "172.18.0.0/16".parse().unwrap();
        let k = lpm_key(&n);
        assert_eq!(k.prefix_len(), 16);
        assert_eq!(k.data(), [172, 18, 0, 0]);
        assert_eq!(net_of_key(&k), Some(n));
    }
}
