//! Finds the eBPF object built by `cargo xtask build-ebpf` and tells the crate where it is.
//! Without it, the crate still builds (so `cargo check` and clippy work), and the agent
//! refuses to start with a message that says how to build it.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let obj = std::env::var("NETCTL_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            manifest.join("../netctl-ebpf/target/bpfel-unknown-none/release/netctl")
        });
    println!("cargo:rerun-if-env-changed=NETCTL_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("netctl.bpf.o");
    match std::fs::read(&obj) {
        Ok(bytes) => std::fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found; run `cargo xtask build-ebpf` (the agent will not start without it)",
                obj.display()
            );
            std::fs::write(&out, []).unwrap();
        }
    }
}
