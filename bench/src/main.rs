//! `netctl-bench`: runs the benchmark suites (see BENCHMARKS.md) and the load generator.
<<<<<<< HEAD
mod loadgen;
=======
// The suites are reached only from their tests until `main` dispatches to them; drop this
// when it does.
#![allow(dead_code)]
mod prog;
>>>>>>> wip-benchprog
mod sample;

fn main() {}
