//! Shared fixture of the packet-in, packet-out tests (`programs.rs`, `lb_programs.rs`): one
//! loaded, unpinned copy of the eBPF object per test, with the endpoint 10.1.0.2 (net 1,
//! 10.1.0.0/16) behind ifindex 1 and a second network 10.2.0.0/16 (net 2), run through
//! `BPF_PROG_TEST_RUN` (aya's `Program::test_run`). Needs root (CAP_BPF, CAP_NET_ADMIN).
//!
//! `BPF_PROG_TEST_RUN` for TC programs runs with `skb->dev` set to the loopback device when
//! no context is passed (net/bpf/test_run.c), so the endpoint under test is ifindex 1.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netctl_common::{
    COUNTER_SLOTS, Counter, DropReason, EVENTS, IfaceInfo, SLOT_PASS_FROM_ENDPOINT,
    SLOT_PASS_TO_ENDPOINT, SLOT_PASS_UPLINK, SubnetInfo, names,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// What `bpf_redirect` returns; `BPF_PROG_TEST_RUN` does not send the packet.
pub const TC_ACT_REDIRECT: u32 = 7;
/// The loopback ifindex, where `BPF_PROG_TEST_RUN` runs TC programs.
pub const LO: u32 = 1;

pub const EP_MAC: [u8; 6] = [0x02, 0x42, 10, 1, 0, 2];
pub const EP_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

pub fn object() -> Vec<u8> {
    let path = std::env::var("NETCTL_EBPF_OBJECT").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../netctl-ebpf/target/bpfel-unknown-none/release/netctl"
        )
        .to_owned()
    });
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read eBPF object {path}: {e}; run `cargo xtask build-ebpf`"))
}

/// The hook's pass slot of a program.
pub fn pass_slot(prog: &str) -> u32 {
    match prog {
        "from_endpoint" => SLOT_PASS_FROM_ENDPOINT,
        "to_endpoint" => SLOT_PASS_TO_ENDPOINT,
        _ => SLOT_PASS_UPLINK,
    }
}

/// A readable name of a counter slot, for assertion messages.
pub fn slot_name(slot: u32) -> String {
    if let Some((_, n)) = EVENTS.iter().find(|(s, _)| *s == slot) {
        return (*n).to_owned();
    }
    if let Some(r) = DropReason::ALL.iter().find(|r| r.slot() == slot) {
        return format!("drop {}", r.name());
    }
    match slot {
        SLOT_PASS_FROM_ENDPOINT => "pass from_endpoint".to_owned(),
        SLOT_PASS_TO_ENDPOINT => "pass to_endpoint".to_owned(),
        SLOT_PASS_UPLINK => "pass uplink".to_owned(),
        _ => format!("slot {slot}"),
    }
}

/// One loaded copy of the object with the endpoint 10.1.0.2 (net 1, 10.1.0.0/16) behind
/// ifindex 1, and a second network 10.2.0.0/16 (net 2).
pub struct Fixture {
    pub ebpf: Ebpf,
}

impl Fixture {
    pub fn new(flags: u32) -> Self {
        let mut ebpf = Ebpf::load(&object()).expect("load object");
        for name in names::PROGRAMS {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
        }
        let mut f = Fixture { ebpf };
        f.set_iface(Some(IfaceInfo {
            ip: EP_IP.octets(),
            net_id: 1,
            flags,
            mac: EP_MAC,
            _pad: [0; 2],
        }));
        let mut subnets: LpmTrie<_, [u8; 4], SubnetInfo> =
            LpmTrie::try_from(f.ebpf.map_mut(names::MAP_SUBNETS).unwrap()).unwrap();
        for (net, id, fl) in [([10, 1, 0, 0], 1, flags), ([10, 2, 0, 0], 2, 0)] {
            let key = Key::new(16, net);
            subnets
                .insert(
                    &key,
                    SubnetInfo {
                        net_id: id,
                        flags: fl,
                    },
                    0,
                )
                .unwrap();
        }
        f
    }

    pub fn set_iface(&mut self, info: Option<IfaceInfo>) {
        let mut ifaces: HashMap<_, u32, IfaceInfo> =
            HashMap::try_from(self.ebpf.map_mut(names::MAP_IFACES).unwrap()).unwrap();
        match info {
            Some(i) => ifaces.insert(LO, i, 0).unwrap(),
            None => ifaces.remove(&LO).unwrap(),
        }
    }

    /// Runs `prog` on `pkt`; returns the verdict and the packet as the program left it.
    pub fn run(&self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test_run {prog}: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// A counter slot, summed over the CPUs.
    pub fn counter(&self, slot: u32) -> Counter {
        let c: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf.map(names::MAP_COUNTERS).unwrap()).unwrap();
        c.get(&slot, 0)
            .unwrap()
            .iter()
            .fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            })
    }

    /// The packet counts of every slot.
    pub fn packet_counts(&self) -> Vec<u64> {
        (0..COUNTER_SLOTS)
            .map(|s| self.counter(s).packets)
            .collect()
    }

    /// Runs `prog` on `pkt` and checks that exactly the counter slots in `moved` went up, each
    /// by as many packets as it is listed, and no other slot moved. Returns the verdict and
    /// the output packet.
    pub fn run_counted(&self, prog: &str, pkt: &[u8], moved: &[u32]) -> (u32, Vec<u8>) {
        let before = self.packet_counts();
        let (rc, out) = self.run(prog, pkt);
        let after = self.packet_counts();
        for slot in 0..COUNTER_SLOTS {
            let want = moved.iter().filter(|&&s| s == slot).count() as u64;
            let got = after[slot as usize] - before[slot as usize];
            assert_eq!(
                got,
                want,
                "{prog}: counter slot {slot} ({}) moved by {got}, expected {want}",
                slot_name(slot)
            );
        }
        (rc, out)
    }

    /// Runs and asserts the verdict; a pass must leave the bytes untouched. Checks that
    /// exactly the expected counter slot moved by one packet.
    pub fn expect(&self, prog: &str, pkt: &[u8], verdict: Result<(), DropReason>) {
        let slot = match verdict {
            Ok(()) => pass_slot(prog),
            Err(r) => r.slot(),
        };
        let before = self.counter(slot);
        let (rc, out) = self.run_counted(prog, pkt, &[slot]);
        let after = self.counter(slot);
        match verdict {
            Ok(()) => {
                assert_eq!(rc, TC_ACT_OK, "{prog}: expected pass");
                assert_eq!(out, pkt, "{prog}: a passed packet must leave unchanged");
            }
            Err(r) => assert_eq!(rc, TC_ACT_SHOT, "{prog}: expected drop ({})", r.name()),
        }
        assert_eq!(after.bytes, before.bytes + pkt.len() as u64);
    }
}
