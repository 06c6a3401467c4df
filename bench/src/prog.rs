//! Suite `prog`: nanoseconds per packet of each path through netctl's TC programs, measured
//! in the kernel by `BPF_PROG_TEST_RUN` (aya's `Program::test_run`), each at several sizes
//! of the maps the path reads.
//!
//! What `duration` is: the kernel (net/bpf/test_run.c, `bpf_test_timer_continue`) runs the
//! program `repeat` times on one skb and returns the time spent divided by `repeat`,
//! truncated to whole nanoseconds (a `u32`); aya hands it over unchanged. The time includes
//! the loop's own per-run work (`local_bh_disable/enable`, the run context), which is why
//! the floor (a program that only counts) is measured beside the real paths; time spent in
//! `cond_resched` is excluded, interrupts are not.
//!
//! The skb is reused across the `repeat` runs, so a rewrite made by run i is the input of
//! run i+1. A DNAT'd packet would then be addressed to the backend and take the plain
//! "allowed" path from the second run on. To make every run take the measured path, the
//! bench's service is its own backend under a second port: VIP:80 -> backend VIP:8080 and
//! VIP:8080 -> backend VIP:80 (one backend whose address is the VIP). Each run rewrites the
//! destination address (VIP -> VIP, same helper calls and checksum updates as any address),
//! the port (80 <-> 8080) and the MAC, so the packet alternates between two flows that both
//! take the path. Every measurement is checked afterwards: the counters must show exactly
//! `repeat` packets on the path's event slot (and nothing else), and the packet left by the
//! last run must be the one the alternation predicts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, PerCpuArray};
use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use netctl_common::{
    BackendInfo, COUNTER_SLOTS, CT_DEFAULT_SIZE, CT_DIR_FWD, CT_ESTABLISHED, CT_TIMEOUT_SYN,
    Counter, CtEntry, CtKey, DropReason, EndpointInfo, EndpointKey, IfaceInfo, MAGLEV_M,
    MAX_BACKENDS, MAX_ENDPOINTS, MAX_IFACES, MAX_SERVICE_PORTS, MAX_SUBNETS, MAX_VIPS,
    SLOT_LB_CT_HIT, SLOT_LB_NEW, SLOT_PASS_FROM_ENDPOINT, SLOT_PASS_TO_ENDPOINT, SLOT_PASS_UPLINK,
    SLOT_REV_NAT, SubnetInfo, SvcInfo, SvcKey, VIP_MAC, VipInfo, names,
};

use crate::sample::Sample;

pub struct ProgOpts {
    /// The eBPF object (netctl-ebpf/target/bpfel-unknown-none/release/netctl).
    pub object: PathBuf,
    /// Entries in each map a path reads, e.g. [10, 100_000]; quick: [10].
    pub sizes: Vec<u64>,
    /// Repetitions; each records one sample per (scenario, size).
    pub reps: u32,
    /// `test_run` repeat count per measurement, e.g. 1_000_000; quick: 10_000.
    pub repeat: u32,
}

impl ProgOpts {
    /// The full run: 10 and 100k entries, 5 repetitions of 1M runs.
    pub fn full(object: PathBuf) -> Self {
        ProgOpts {
            object,
            sizes: vec![10, 100_000],
            reps: 5,
            repeat: 1_000_000,
        }
    }

    /// The CI run: 10 entries, one repetition of 10k runs.
    pub fn quick(object: PathBuf) -> Self {
        ProgOpts {
            object,
            sizes: vec![10],
            reps: 1,
            repeat: 10_000,
        }
    }
}

/// The object's default path in the repository.
pub fn default_object() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../netctl-ebpf/target/bpfel-unknown-none/release/netctl")
}

const SUITE: &str = "prog";
const UNIT: &str = "ns/packet";

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// What `bpf_redirect` returns; test-run does not send the packet.
const TC_ACT_REDIRECT: u32 = 7;
/// test-run runs TC programs with `skb->dev` = loopback, so the endpoint is ifindex 1.
const LO: u32 = 1;

type Ip = [u8; 4];

/// The endpoint under test, in network 1 (10.1.0.0/24).
const CLIENT: Ip = [10, 1, 0, 2];
const EP_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 2];
/// A peer in the endpoint's network (not a VIP).
const PEER: Ip = [10, 1, 0, 3];
const PEER_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 3];
/// A source address the endpoint does not own.
const SPOOFED: Ip = [10, 1, 0, 99];
const VIP: Ip = [10, 1, 0, 100];
const PORT_A: u16 = 80;
const PORT_B: u16 = 8080;
/// The measured service's row in MAGLEV and its one backend (the VIP itself, see above),
/// on a local veth (redirect).
const SVC_ID: u32 = 1;
const BACKEND_ID: u32 = 1;
const BACKEND_IFINDEX: u32 = 7;
/// MAGLEV rows in use: SERVICES entries share them (row = 1 + i % ROWS).
const ROWS: u32 = 16;

const SPORT_ALLOWED: u16 = 40_000;
const SPORT_NEW: u16 = 41_000;
const SPORT_TRACKED: u16 = 42_000;

const TCP: u8 = 6;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Noop,
    Allowed,
    LbNewFlow,
    LbConntrackHit,
    ReverseNat,
    DropSpoofed,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Noop,
        Scenario::Allowed,
        Scenario::LbNewFlow,
        Scenario::LbConntrackHit,
        Scenario::ReverseNat,
        Scenario::DropSpoofed,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Noop => "noop_count_only",
            Scenario::Allowed => "allowed",
            Scenario::LbNewFlow => "lb_new_flow",
            Scenario::LbConntrackHit => "lb_conntrack_hit",
            Scenario::ReverseNat => "reverse_nat",
            Scenario::DropSpoofed => "drop_spoofed",
        }
    }

    fn system(self) -> &'static str {
        match self {
            Scenario::Noop => "noop",
            _ => "netctl",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Scenario::Noop => names::PROG_UPLINK_INGRESS,
            Scenario::ReverseNat => names::PROG_TO_ENDPOINT,
            _ => names::PROG_FROM_ENDPOINT,
        }
    }

    /// The measured packet, and the packet one run turns it into (the same packet when the
    /// path does not rewrite; the other flow of the alternation when it does).
    fn packets(self) -> (Vec<u8>, Vec<u8>) {
        let allowed = || tcp(PEER_MAC, EP_MAC, CLIENT, SPORT_ALLOWED, PEER, 80, ACK);
        match self {
            Scenario::Noop | Scenario::Allowed => (allowed(), allowed()),
            Scenario::LbNewFlow => (
                tcp(VIP_MAC, EP_MAC, CLIENT, SPORT_NEW, VIP, PORT_A, SYN),
                tcp(VIP_MAC, EP_MAC, CLIENT, SPORT_NEW, VIP, PORT_B, SYN),
            ),
            Scenario::LbConntrackHit => (
                tcp(VIP_MAC, EP_MAC, CLIENT, SPORT_TRACKED, VIP, PORT_A, ACK),
                tcp(VIP_MAC, EP_MAC, CLIENT, SPORT_TRACKED, VIP, PORT_B, ACK),
            ),
            Scenario::ReverseNat => (
                tcp(EP_MAC, VIP_MAC, VIP, PORT_B, CLIENT, SPORT_TRACKED, ACK),
                tcp(EP_MAC, VIP_MAC, VIP, PORT_A, CLIENT, SPORT_TRACKED, ACK),
            ),
            Scenario::DropSpoofed => {
                let p = tcp(PEER_MAC, EP_MAC, SPOOFED, SPORT_ALLOWED, PEER, 80, ACK);
                (p.clone(), p)
            }
        }
    }

    fn verdict(self) -> u32 {
        match self {
            Scenario::Noop | Scenario::Allowed | Scenario::ReverseNat => TC_ACT_OK,
            Scenario::LbNewFlow | Scenario::LbConntrackHit => TC_ACT_REDIRECT,
            Scenario::DropSpoofed => TC_ACT_SHOT,
        }
    }

    /// Counter slots one run moves by one packet each; no other slot may move.
    fn slots(self) -> Vec<u32> {
        match self {
            Scenario::Noop => vec![SLOT_PASS_UPLINK],
            Scenario::Allowed => vec![SLOT_PASS_FROM_ENDPOINT],
            Scenario::LbNewFlow => vec![SLOT_PASS_FROM_ENDPOINT, SLOT_LB_NEW],
            Scenario::LbConntrackHit => vec![SLOT_PASS_FROM_ENDPOINT, SLOT_LB_CT_HIT],
            Scenario::ReverseNat => vec![SLOT_PASS_TO_ENDPOINT, SLOT_REV_NAT],
            Scenario::DropSpoofed => vec![DropReason::SpoofedIp.slot()],
        }
    }

    fn note(self) -> &'static str {
        match self {
            Scenario::Noop => {
                "the floor: the object has no no-op program, so this is uplink_ingress, which \
                 counts one per-CPU counter and passes (reads no map but COUNTERS)"
            }
            Scenario::Allowed => {
                "from_endpoint, TCP ACK endpoint -> peer in its network: IFACES, VIPS (miss), \
                 SUBNETS (LPM, /24 prefixes), COUNTERS"
            }
            Scenario::LbNewFlow => {
                "from_endpoint, TCP SYN to VIP:port without a live conntrack entry: IFACES, \
                 VIPS, CONNTRACK (reply miss, forward expired), SERVICES, MAGLEV, BACKENDS, two \
                 CONNTRACK inserts, DNAT, redirect. test_run repeats one skb, so \
                 CT_TIMEOUTS[CT_TIMEOUT_SYN] = 1 ns makes the entry the previous run inserted \
                 expired at the next lookup (a found-but-expired entry, not an absent key; the \
                 inserts replace it)"
            }
            Scenario::LbConntrackHit => {
                "from_endpoint, TCP ACK of an established flow to VIP:port: IFACES, VIPS, \
                 CONNTRACK (reply miss, forward hit), SERVICES, BACKENDS, DNAT, redirect"
            }
            Scenario::ReverseNat => {
                "to_endpoint, the backend's TCP ACK of a tracked flow: IFACES, SUBNETS, \
                 CONNTRACK (reply hit, forward hit), source rewritten to VIP:port"
            }
            Scenario::DropSpoofed => {
                "from_endpoint, TCP with a source IP the endpoint does not own: IFACES, drop \
                 (spoofed_ip)"
            }
        }
    }
}

/// One loaded copy of the object with its maps filled for one size.
struct Bed {
    size: u64,
    ebpf: Ebpf,
    note: String,
}

pub fn run(opts: &ProgOpts) -> Result<Vec<Sample>> {
    ensure!(opts.reps > 0, "prog: reps must be at least 1");
    ensure!(opts.repeat > 0, "prog: repeat must be at least 1");
    ensure!(!opts.sizes.is_empty(), "prog: no sizes");
    let object = std::fs::read(&opts.object).with_context(|| {
        format!(
            "read eBPF object {} (build it: cd netctl-ebpf && cargo +nightly build --release)",
            opts.object.display()
        )
    })?;
    let pin = Pinned::to_last_cpu()?;
    let beds = opts
        .sizes
        .iter()
        .map(|&size| Bed::new(&object, size))
        .collect::<Result<Vec<_>>>()?;
    for bed in &beds {
        for s in Scenario::ALL {
            bed.check(s)?;
        }
    }
    let mut samples = Vec::new();
    let n = Scenario::ALL.len();
    for rep in 0..opts.reps {
        // Rotate the order of scenarios each repetition, and alternate the order of sizes.
        for i in 0..n {
            let s = Scenario::ALL[(i + rep as usize) % n];
            let order: Vec<&Bed> = if rep.is_multiple_of(2) {
                beds.iter().collect()
            } else {
                beds.iter().rev().collect()
            };
            for bed in order {
                let ns = bed.measure(s, opts.repeat)?;
                let mut sample = Sample::new(SUITE, s.name(), s.system(), bed.size, UNIT);
                sample.note = format!(
                    "{}; {}; repeat {}, pinned to CPU {}; kernel's per-run average, whole ns",
                    s.note(),
                    bed.note,
                    opts.repeat,
                    pin.cpu
                );
                samples.push(sample.value(rep, ns));
            }
        }
    }
    drop(pin);
    Ok(samples)
}

/// The calling thread pinned to one CPU until dropped (then its old affinity is restored).
struct Pinned {
    cpu: usize,
    old: nix::sched::CpuSet,
}

impl Pinned {
    /// The highest CPU the thread may run on (CPU 0 takes most interrupts).
    fn to_last_cpu() -> Result<Self> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let old = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let cpu = (0..CpuSet::count())
            .rev()
            .find(|&c| old.is_set(c).unwrap_or(false))
            .context("no CPU in the affinity mask")?;
        let mut set = CpuSet::new();
        set.set(cpu).context("CpuSet::set")?;
        sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")?;
        Ok(Pinned { cpu, old })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.old);
    }
}

impl Bed {
    fn new(object: &[u8], size: u64) -> Result<Self> {
        ensure!(size >= 10, "prog: size {size} is below 10 entries");
        let n = u32::try_from(size).context("prog: size above u32")?;
        let mut loader = EbpfLoader::new();
        let mut raised = Vec::new();
        for (name, compiled) in [
            (names::MAP_IFACES, MAX_IFACES),
            (names::MAP_SUBNETS, MAX_SUBNETS),
            (names::MAP_ENDPOINTS, MAX_ENDPOINTS),
            (names::MAP_SERVICES, MAX_SERVICE_PORTS),
            (names::MAP_VIPS, MAX_VIPS),
            (names::MAP_BACKENDS, MAX_BACKENDS),
            (names::MAP_CONNTRACK, CT_DEFAULT_SIZE),
        ] {
            if n > compiled {
                loader.map_max_entries(name, n);
                raised.push(format!("{name} {compiled}"));
            }
        }
        let mut ebpf = loader
            .load(object)
            .with_context(|| format!("load the eBPF object (size {size})"))?;
        for name in names::PROGRAMS {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} not in the object"))?
                .try_into()?;
            p.load().with_context(|| format!("load program {name}"))?;
        }
        let mut note = format!(
            "{size} entries in each of IFACES, SUBNETS, ENDPOINTS, SERVICES, VIPS, BACKENDS, \
             CONNTRACK (the measured packet's among them); MAGLEV keeps its size ({} rows of \
             {MAGLEV_M}, an array indexed by service id), the SERVICES entries share {ROWS} \
             filled rows",
            netctl_common::MAX_SERVICES
        );
        if !raised.is_empty() {
            note.push_str(&format!(
                "; max_entries raised to {size} (from the compiled value) for {}",
                raised.join(", ")
            ));
        }
        let mut bed = Bed { size, ebpf, note };
        bed.fill(n)?;
        Ok(bed)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} not in the object"))
    }

    fn fill(&mut self, n: u32) -> Result<()> {
        let subnet = |i: u32| u32::from_be_bytes([10, 1, 0, 0]) + (i << 8);
        let at = |base: u32, off: u32| (base + off).to_be_bytes();
        let mac = |ip: Ip| [0x02, 0x42, ip[0], ip[1], ip[2], ip[3]];

        // IFACES: the endpoint under test on ifindex 1, others on 2..=n.
        {
            let mut m: HashMap<_, u32, IfaceInfo> =
                HashMap::try_from(self.map_mut(names::MAP_IFACES)?)?;
            for i in 0..n {
                let ip = if i == 0 { CLIENT } else { at(subnet(i), 2) };
                let info = IfaceInfo {
                    ip,
                    net_id: i + 1,
                    flags: 0,
                    mac: mac(ip),
                    _pad: [0; 2],
                };
                m.insert(LO + i, info, 0).context("fill IFACES")?;
            }
        }
        // SUBNETS: n distinct /24 prefixes from 10.1.0.0/24 (network 1, the endpoint's) on.
        {
            let mut m: LpmTrie<_, Ip, SubnetInfo> =
                LpmTrie::try_from(self.map_mut(names::MAP_SUBNETS)?)?;
            for i in 0..n {
                let info = SubnetInfo {
                    net_id: i + 1,
                    flags: 0,
                };
                m.insert(&Key::new(24, subnet(i).to_be_bytes()), info, 0)
                    .context("fill SUBNETS")?;
            }
        }
        // ENDPOINTS: one endpoint in each network (no measured path reads this map).
        {
            let mut m: HashMap<_, EndpointKey, EndpointInfo> =
                HashMap::try_from(self.map_mut(names::MAP_ENDPOINTS)?)?;
            for i in 0..n {
                let ip = if i == 0 { CLIENT } else { at(subnet(i), 2) };
                let key = EndpointKey { net_id: i + 1, ip };
                let info = EndpointInfo {
                    ifindex: LO + i,
                    node_id: 0,
                    mac: mac(ip),
                    _pad: [0; 2],
                };
                m.insert(key, info, 0).context("fill ENDPOINTS")?;
            }
        }
        // VIPS: the measured VIP and n - 1 others (172.16.0.1 on).
        let vip = |i: u32| {
            if i == 0 {
                VIP
            } else {
                at(u32::from_be_bytes([172, 16, 0, 0]), i)
            }
        };
        {
            let mut m: HashMap<_, Ip, VipInfo> = HashMap::try_from(self.map_mut(names::MAP_VIPS)?)?;
            for i in 0..n {
                let info = VipInfo {
                    net_id: 1,
                    flags: 0,
                };
                m.insert(vip(i), info, 0).context("fill VIPS")?;
            }
        }
        // SERVICES: VIP:80 -> 8080 and VIP:8080 -> 80 (the measured pair, row 1), and n - 2
        // others on the other VIPs, sharing rows 2..=ROWS.
        {
            let mut m: HashMap<_, SvcKey, SvcInfo> =
                HashMap::try_from(self.map_mut(names::MAP_SERVICES)?)?;
            let svc = |svc_id, target_port| SvcInfo {
                svc_id,
                target_port,
                backend_count: 1,
                net_id: 1,
                flags: 0,
            };
            let key = |vip, port| SvcKey {
                vip,
                port,
                proto: TCP,
                _pad: 0,
            };
            m.insert(key(VIP, PORT_A), svc(SVC_ID, PORT_B), 0)?;
            m.insert(key(VIP, PORT_B), svc(SVC_ID, PORT_A), 0)?;
            for i in 2..n {
                m.insert(key(vip(i - 1), 80), svc(2 + i % (ROWS - 1), 8080), 0)
                    .context("fill SERVICES")?;
            }
        }
        // BACKENDS: the measured service's one backend (the VIP, see the module doc) and
        // n - 1 others, backend id k in row 2 + k % (ROWS - 1).
        let row_of = |k: u32| 2 + k % (ROWS - 1);
        {
            let mut m: HashMap<_, u32, BackendInfo> =
                HashMap::try_from(self.map_mut(names::MAP_BACKENDS)?)?;
            let own = BackendInfo {
                ip: VIP,
                svc_id: SVC_ID,
                ifindex: BACKEND_IFINDEX,
                mac: VIP_MAC,
                _pad: [0; 2],
            };
            m.insert(BACKEND_ID, own, 0)?;
            for k in 2..=n {
                let ip = at(subnet(k % n), 11);
                let info = BackendInfo {
                    ip,
                    svc_id: row_of(k),
                    ifindex: 0,
                    mac: mac(ip),
                    _pad: [0; 2],
                };
                m.insert(k, info, 0).context("fill BACKENDS")?;
            }
        }
        // MAGLEV: row 1 all the measured backend; rows 2..=ROWS cycle over their backends.
        {
            let mut m: Array<_, u32> = Array::try_from(self.map_mut(names::MAP_MAGLEV)?)?;
            for row in 1..=ROWS {
                let ids: Vec<u32> = if row == SVC_ID {
                    vec![BACKEND_ID]
                } else {
                    (2..=n).filter(|&k| row_of(k) == row).take(3).collect()
                };
                if ids.is_empty() {
                    continue;
                }
                for s in 0..MAGLEV_M {
                    m.set(row * MAGLEV_M + s, ids[s as usize % ids.len()], 0)
                        .context("fill MAGLEV")?;
                }
            }
        }
        // CONNTRACK: n - 8 established flows of other clients; the measured flows add 8
        // entries below (forward and reply of two tracked flows, two new flows).
        {
            let mut m: HashMap<_, CtKey, CtEntry> =
                HashMap::try_from(self.map_mut(names::MAP_CONNTRACK)?)?;
            let now = monotonic_ns()?;
            for i in 0..n.saturating_sub(8) {
                let key = CtKey {
                    src: at(u32::from_be_bytes([10, 128, 0, 0]), i),
                    dst: VIP,
                    sport: 10_000 + (i % 50_000) as u16,
                    dport: PORT_A,
                    proto: TCP,
                    dir: CT_DIR_FWD,
                    _pad: [0; 2],
                };
                let e = CtEntry {
                    last_seen_ns: now,
                    backend_id: BACKEND_ID,
                    nat_ip: VIP,
                    nat_port: PORT_B,
                    state: CT_ESTABLISHED,
                    flags: 0,
                    orig: key.src,
                };
                m.insert(key, e, 0).context("fill CONNTRACK")?;
            }
        }
        // The tracked flows (client:SPORT_TRACKED to VIP:80 and to VIP:8080), opened and
        // established by the program itself with the default timeouts.
        for port in [PORT_A, PORT_B] {
            for flags in [SYN, ACK] {
                let p = tcp(VIP_MAC, EP_MAC, CLIENT, SPORT_TRACKED, VIP, port, flags);
                let (rc, _) = self.run_once(names::PROG_FROM_ENDPOINT, &p, 1)?;
                ensure!(
                    rc == TC_ACT_REDIRECT,
                    "prog: opening the tracked flow to port {port} returned {rc}"
                );
            }
        }
        // From here on a SYN_SENT entry expires at once: every lb_new_flow run is new.
        let mut t: Array<_, u64> = Array::try_from(self.map_mut(names::MAP_CT_TIMEOUTS)?)?;
        t.set(CT_TIMEOUT_SYN, 1, 0)?;
        // The new flows' entries, so that CONNTRACK holds n entries while measuring.
        for port in [PORT_A, PORT_B] {
            let p = tcp(VIP_MAC, EP_MAC, CLIENT, SPORT_NEW, VIP, port, SYN);
            self.run_once(names::PROG_FROM_ENDPOINT, &p, 1)?;
        }
        let m: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(names::MAP_CONNTRACK).context("CONNTRACK")?)?;
        let len = m.keys().count() as u32;
        ensure!(
            len == n.max(8),
            "prog: CONNTRACK holds {len} entries, expected {n}"
        );
        Ok(())
    }

    /// Runs `prog` `repeat` times on `pkt`; the verdict, the packet the last run left, and
    /// the kernel's average nanoseconds per run.
    fn run_once(&self, prog: &str, pkt: &[u8], repeat: u32) -> Result<(u32, Vec<u8>)> {
        let (rc, out, _) = self.test_run(prog, pkt, repeat)?;
        Ok((rc, out))
    }

    fn test_run(&self, prog: &str, pkt: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
        let p: &SchedClassifier = self
            .ebpf
            .program(prog)
            .with_context(|| format!("program {prog}"))?
            .try_into()?;
        let mut out = vec![0u8; pkt.len() + 256];
        let mut attempt = 0;
        loop {
            let r = p.test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            });
            match r {
                Ok(r) => {
                    out.truncate(r.data_size_out as usize);
                    return Ok((r.return_value, out, r.duration.as_nanos() as f64));
                }
                // A signal interrupts a long run; try again.
                Err(ProgramError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::Interrupted && attempt < 3 =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e).with_context(|| format!("test_run {prog}")),
            }
        }
    }

    fn counters(&self) -> Result<Vec<u64>> {
        let c: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf.map(names::MAP_COUNTERS).context("COUNTERS")?)?;
        (0..COUNTER_SLOTS)
            .map(|s| Ok(c.get(&s, 0)?.iter().map(|c| c.packets).sum()))
            .collect()
    }

    /// Runs `s` `repeat` times and checks that the path was taken on every run: the verdict,
    /// exactly `repeat` packets on each of the path's counter slots and none elsewhere, and
    /// the packet the alternation predicts. Returns ns per packet.
    fn run_checked(&self, s: Scenario, repeat: u32) -> Result<(f64, Vec<u8>)> {
        let (pkt, alt) = s.packets();
        let before = self.counters()?;
        let (rc, out, ns) = self.test_run(s.program(), &pkt, repeat)?;
        let after = self.counters()?;
        let ctx = || format!("prog: {} at size {}", s.name(), self.size);
        if rc != s.verdict() {
            bail!(
                "{}: verdict {rc}, expected {} (the path under test did not happen)",
                ctx(),
                s.verdict()
            );
        }
        let want_slots = s.slots();
        for slot in 0..COUNTER_SLOTS {
            let want = u64::from(repeat) * want_slots.iter().filter(|&&w| w == slot).count() as u64;
            let got = after[slot as usize] - before[slot as usize];
            if got != want {
                bail!(
                    "{}: counter slot {slot} moved by {got} over {repeat} runs, expected {want} \
                     (not every run took the path)",
                    ctx()
                );
            }
        }
        let want = if repeat.is_multiple_of(2) { &pkt } else { &alt };
        if &out != want {
            bail!(
                "{}: after {repeat} runs the packet is {out:02x?}, expected {want:02x?}",
                ctx()
            );
        }
        Ok((ns, out))
    }

    /// The sanity check before timing: one run, then two.
    fn check(&self, s: Scenario) -> Result<()> {
        self.run_checked(s, 1)?;
        self.run_checked(s, 2)?;
        Ok(())
    }

    fn measure(&self, s: Scenario, repeat: u32) -> Result<f64> {
        let (ns, _) = self.run_checked(s, repeat)?;
        ensure!(
            ns.is_finite() && ns > 0.0,
            "prog: {} at size {}: duration {ns} ns",
            s.name(),
            self.size
        );
        Ok(ns)
    }
}

/// CLOCK_MONOTONIC in ns: what `bpf_ktime_get_ns` returns.
fn monotonic_ns() -> Result<u64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error()).context("clock_gettime");
    }
    Ok(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

// Packets: `netctl_tests::packet`, every checksum computed from scratch (RFC 1071), shared
// with the packet tests.
use netctl_tests::packet::tcp;
#[cfg(test)]
use netctl_tests::packet::{fold, sum16};

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick run: every scenario runs, takes its path and yields a positive finite
    /// value. Needs root and the eBPF object; skipped (with a message) without them.
    #[test]
    fn quick_run_measures_every_scenario() {
        let object = std::env::var_os("NETCTL_EBPF_OBJECT")
            .map(PathBuf::from)
            .unwrap_or_else(default_object);
        if !object.exists() {
            eprintln!(
                "SKIP: eBPF object {} missing (cd netctl-ebpf && cargo +nightly build --release)",
                object.display()
            );
            return;
        }
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (BPF_PROG_TEST_RUN)");
            return;
        }
        let opts = ProgOpts {
            object,
            sizes: vec![10],
            reps: 1,
            repeat: 1000,
        };
        let samples = run(&opts).expect("prog suite");
        for s in Scenario::ALL {
            let got: Vec<&Sample> = samples.iter().filter(|x| x.scenario == s.name()).collect();
            assert_eq!(got.len(), 1, "{}: one sample", s.name());
            let v = got[0].value;
            assert!(v.is_finite() && v > 0.0, "{}: value {v}", s.name());
            assert!(got[0].ok);
            assert_eq!(got[0].system, s.system());
            assert_eq!(got[0].unit, UNIT);
        }
    }

    /// The full run (sizes 10 and 100k, 5 reps of 1M runs), printing median (min, max) per
    /// scenario and size, until the driver reports it:
    /// `cargo test -p netctl-bench --release -- --ignored --nocapture full_run`.
    #[test]
    #[ignore]
    fn full_run() {
        let object = std::env::var_os("NETCTL_EBPF_OBJECT")
            .map(PathBuf::from)
            .unwrap_or_else(default_object);
        let samples = run(&ProgOpts::full(object)).expect("prog suite");
        println!("{}", samples[0].note);
        for s in Scenario::ALL {
            for size in [10, 100_000] {
                let mut v: Vec<f64> = samples
                    .iter()
                    .filter(|x| x.scenario == s.name() && x.size == size)
                    .map(|x| x.value)
                    .collect();
                v.sort_by(f64::total_cmp);
                println!(
                    "{:<18} {:>7} entries: median {:>4} ns (min {}, max {}) {:?}",
                    s.name(),
                    size,
                    v[v.len() / 2],
                    v[0],
                    v[v.len() - 1],
                    v
                );
            }
        }
    }

    #[test]
    fn packets_are_checksummed() {
        let p = tcp(VIP_MAC, EP_MAC, CLIENT, 1, VIP, 80, SYN);
        assert_eq!(fold(sum16(&p[14..34])), 0xffff);
        let seg = &p[34..];
        let pseudo = sum16(&CLIENT) + sum16(&VIP) + u32::from(TCP) + seg.len() as u32;
        assert_eq!(fold(pseudo + sum16(seg)), 0xffff);
    }
}
