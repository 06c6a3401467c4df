//! `netctl-bench`: runs the benchmark suites (see BENCHMARKS.md) and the load generator.
mod env;
mod peers;
mod sample;

fn main() {}
