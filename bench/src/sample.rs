//! One measurement, as every suite reports it. The report groups samples by everything but
//! `rep` and `value` and gives median, min and max over the repetitions.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// "prog", "lb" or "update".
    pub suite: String,
    /// What was measured, e.g. "lb_new_flow", "new_connections", "program_all".
    pub scenario: String,
    /// "netctl", "iptables", "nftables", "floor" (no load balancing) or "noop".
    pub system: String,
    /// The size axis: entries in the maps read, services configured, services programmed.
    pub size: u64,
    /// Unit of `value`: "ns/packet", "conn/s", "trans/s", "s".
    pub unit: String,
    /// Repetition index (0-based).
    pub rep: u32,
    pub value: f64,
    /// False when the scenario could not complete (e.g. a peer's load hit its time cap);
    /// `value` is then the cap, and `note` says why.
    pub ok: bool,
    #[serde(default)]
    pub note: String,
}

impl Sample {
    pub fn new(suite: &str, scenario: &str, system: &str, size: u64, unit: &str) -> Self {
        Sample {
            suite: suite.into(),
            scenario: scenario.into(),
            system: system.into(),
            size,
            unit: unit.into(),
            rep: 0,
            value: 0.0,
            ok: true,
            note: String::new(),
        }
    }
    pub fn value(mut self, rep: u32, v: f64) -> Self {
        self.rep = rep;
        self.value = v;
        self
    }
}
