//! `netctl-bench`: runs the benchmark suites (see BENCHMARKS.md) and the load generator.
mod loadgen;
mod sample;

fn main() {}
