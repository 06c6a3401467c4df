//! `netctl-bench`: the benchmark suites of BENCHMARKS.md, side by side with iptables and
//! nftables, and the load generator they drive. `cargo xtask bench` builds and runs it.
//!
//! - `prog`: ns/packet of each program path through `BPF_PROG_TEST_RUN` (prog.rs).
//! - `lb`: new TCP connections/s and request/response transactions/s from a client sandbox
//!   to the last of N services (1 .. 100k), for netctl, iptables (kube-proxy's shape),
//!   nftables (kube-proxy's shape) and the floor (straight to a backend, no NAT).
//! - `update`: time to program N services, and to add and remove one at size N.
//!
//! Every repetition runs every system, in a rotated order (BENCHMARKING.md: compare in one
//! run, interleaved).
mod env;
mod loadgen;
mod netctl_sys;
mod peers;
mod prog;
mod report;
mod sample;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sample::Sample;

#[derive(Parser, Debug)]
#[command(name = "netctl-bench", about = "netctl's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run suites (prog, lb, update; default all) and write the results.
    Run(RunArgs),
    /// Serve the load generator's protocol (runs in a backend namespace).
    Server(loadgen::ServerArgs),
    /// Generate load and print one JSON report (runs in the client namespace).
    Loadgen(loadgen::LoadArgs),
    /// Rewrite the Markdown and charts from a results.json.
    Report {
        json: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Suites to run: prog, lb, update (default: all).
    suites: Vec<String>,
    /// Tiny sizes, one repetition, short windows: checks every scenario can run.
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and the charts go.
    #[arg(long)]
    out: PathBuf,
    /// The netctl binary (release build).
    #[arg(long)]
    netctl: PathBuf,
    /// The eBPF object.
    #[arg(long, default_value_os_t = prog::default_object())]
    object: PathBuf,
    /// Repetitions (default 5; 1 with --quick).
    #[arg(long)]
    reps: Option<u32>,
    /// Seconds a peer may take to load its rules before it counts as a timeout.
    #[arg(long, default_value_t = 120)]
    cap: u64,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Server(a) => loadgen::server(&a),
        Cmd::Loadgen(a) => loadgen::load(&a).and_then(|r| {
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Cmd::Report { json, out } => report::rewrite(&json, &out),
    };
    if let Err(e) = r {
        eprintln!("netctl-bench: {e:#}");
        std::process::exit(1);
    }
}

/// Settings of one run.
struct Plan {
    quick: bool,
    reps: u32,
    cap: Duration,
    netctl: PathBuf,
    lb_sizes: Vec<usize>,
    update_sizes: Vec<usize>,
    duration: f64,
    warmup: f64,
    concurrency: u32,
}

fn run(a: RunArgs) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmarks build namespaces and load programs: run as root");
    }
    let suites: Vec<String> = if a.suites.is_empty() {
        vec!["prog".into(), "lb".into(), "update".into()]
    } else {
        a.suites.clone()
    };
    for s in &suites {
        if !["prog", "lb", "update"].contains(&s.as_str()) {
            bail!("suite: invalid value {s:?}: expected prog, lb or update");
        }
    }
    let plan = Plan {
        quick: a.quick,
        reps: a.reps.unwrap_or(if a.quick { 1 } else { 5 }),
        cap: Duration::from_secs(a.cap),
        netctl: a.netctl.clone(),
        lb_sizes: if a.quick {
            vec![1, 10]
        } else {
            vec![1, 1_000, 10_000, 100_000]
        },
        update_sizes: if a.quick {
            vec![10]
        } else {
            vec![1_000, 10_000, 100_000]
        },
        duration: if a.quick { 1.0 } else { 3.0 },
        warmup: if a.quick { 0.3 } else { 0.5 },
        concurrency: 64,
    };
    std::fs::create_dir_all(&a.out)?;
    let mut samples: Vec<Sample> = Vec::new();
    for s in &suites {
        eprintln!("== suite {s}");
        let got = match s.as_str() {
            "prog" => {
                let mut o = if a.quick {
                    prog::ProgOpts::quick(a.object.clone())
                } else {
                    prog::ProgOpts::full(a.object.clone())
                };
                o.reps = plan.reps;
                prog::run(&o)?
            }
            "lb" => run_lb(&plan)?,
            _ => run_update(&plan)?,
        };
        samples.extend(got);
        // Keep what is done even if a later suite fails.
        report::write(&samples, &a.out, &settings(&plan))?;
    }
    let failed: Vec<&Sample> = samples
        .iter()
        .filter(|s| !s.ok && s.note.contains("error"))
        .collect();
    report::write(&samples, &a.out, &settings(&plan))?;
    eprintln!("results in {}", a.out.display());
    if !failed.is_empty() {
        bail!(
            "{} scenario(s) could not run, first: {} {} {} at {}: {}",
            failed.len(),
            failed[0].suite,
            failed[0].scenario,
            failed[0].system,
            failed[0].size,
            failed[0].note
        );
    }
    Ok(())
}

fn settings(p: &Plan) -> serde_json::Value {
    serde_json::json!({
        "quick": p.quick,
        "repetitions": p.reps,
        "peer_load_cap_s": p.cap.as_secs(),
        "lb_sizes": p.lb_sizes,
        "update_sizes": p.update_sizes,
        "lb_window_s": p.duration,
        "lb_warmup_s": p.warmup,
        "lb_concurrency": p.concurrency,
        "cpus": "load generator on CPU 0, servers on CPU 1 (all backends share it)",
        "client_sysctls": "tcp_timestamps=2, tcp_tw_reuse=1, ip_local_port_range 1024-65535",
        "peers_bridge_nf": "bridge-nf-call-iptables=1 in the peers' host namespaces (kube-proxy nodes need it)",
        "netctl_hooks": "TC (tcx) on the endpoint veths; no XDP",
    })
}

/// Children killed on drop (servers).
struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("find netctl-bench's own path")
}

/// A server in namespace `ns`, pinned to CPU 1.
fn server(ns: &str, name: &str) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe()?)
        .args([
            "server",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            name,
            "--cpu",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start a server in {ns}"))
}

fn sysctls(ns: &str) -> Result<()> {
    for kv in [
        "net.ipv4.tcp_timestamps=2",
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65535",
    ] {
        let o = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw", kv])
            .output()?;
        if !o.status.success() {
            bail!(
                "sysctl {kv} in {ns}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    Ok(())
}

/// One load-generator run from `client` against `target`.
fn load(
    p: &Plan,
    client: &str,
    target: std::net::SocketAddrV4,
    mode: &str,
) -> Result<loadgen::LoadReport> {
    let o = Command::new("ip")
        .args(["netns", "exec", client])
        .arg(exe()?)
        .args(["loadgen", "--target", &target.to_string(), "--mode", mode])
        .args(["--concurrency", &p.concurrency.to_string()])
        .args(["--duration", &p.duration.to_string()])
        .args(["--warmup", &p.warmup.to_string(), "--cpu", "0"])
        .stdin(Stdio::null())
        .output()
        .context("run the load generator")?;
    if !o.status.success() {
        bail!("loadgen: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    serde_json::from_slice(&o.stdout).context("parse the load generator's report")
}

/// Waits until `target` answers a short rr run (the servers are up, the path works).
fn wait_ready(p: &Plan, client: &str, target: std::net::SocketAddrV4) -> Result<()> {
    let probe = Plan {
        duration: 0.2,
        warmup: 0.0,
        concurrency: 1,
        lb_sizes: vec![],
        update_sizes: vec![],
        netctl: p.netctl.clone(),
        ..*p
    };
    for _ in 0..50 {
        if let Ok(r) = load(&probe, client, target, "rr")
            && r.completed > 0
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{target} does not answer from {client}")
}

const SYSTEMS: [&str; 4] = ["floor", "netctl", "iptables", "nftables"];

fn run_lb(p: &Plan) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    let floor = env::Env::plain("f", "10.150.0.0/24".parse()?, 3, false)?;
    let ipt = env::Env::plain("i", "10.151.0.0/24".parse()?, 3, true)?;
    let nft = env::Env::plain("t", "10.152.0.0/24".parse()?, 3, true)?;
    let mut nc = netctl_sys::NetctlSys::start(&p.netctl, "n", 3)?;
    sysctls(&nc.client)?;
    let mut procs = Procs(Vec::new());
    for e in [&floor, &ipt, &nft] {
        for (i, b) in e.backends.iter().enumerate() {
            procs.0.push(server(b, &format!("b{}", i + 1))?);
        }
    }
    for (i, b) in nc.backends.iter().enumerate() {
        procs.0.push(server(b, &format!("b{}", i + 1))?);
    }
    let backends = |e: &env::Env| -> Vec<(std::net::Ipv4Addr, u16)> {
        e.backend_ips.iter().map(|ip| (*ip, 8080)).collect()
    };
    for &size in &p.lb_sizes {
        eprintln!("-- lb: {size} services");
        // Program every system to `size` services; a peer that cannot load in time is
        // reported as such at this size.
        let mut unavailable: Vec<(&str, String)> = Vec::new();
        for (name, e, peer) in [
            ("iptables", &ipt, peers::Peer::Iptables),
            ("nftables", &nft, peers::Peer::Nftables),
        ] {
            let svcs = peers::services(size, 80, &backends(e));
            match peers::apply(peer, &e.host, &svcs, p.cap)? {
                peers::Outcome::Done(d) => eprintln!("   {name}: loaded in {d:.2?}"),
                peers::Outcome::TimedOut(c) => {
                    eprintln!("   {name}: load timed out after {c:?}");
                    unavailable.push((name, format!("rules did not load within {c:?}")));
                }
            }
        }
        let d = nc.grow_to(size, 80, 8080)?;
        eprintln!("   netctl: programmed in {d:.2?}");
        let vip_last = peers::vips(size)[size - 1];
        let targets = [
            (
                "floor",
                floor.client.clone(),
                std::net::SocketAddrV4::new(floor.backend_ips[0], 8080),
            ),
            (
                "netctl",
                nc.client.clone(),
                std::net::SocketAddrV4::new(nc.services[size - 1].1, 80),
            ),
            (
                "iptables",
                ipt.client.clone(),
                std::net::SocketAddrV4::new(vip_last, 80),
            ),
            (
                "nftables",
                nft.client.clone(),
                std::net::SocketAddrV4::new(vip_last, 80),
            ),
        ];
        for (name, client, target) in &targets {
            if !unavailable.iter().any(|(u, _)| u == name) {
                wait_ready(p, client, *target)?;
            }
        }
        for rep in 0..p.reps {
            for k in 0..SYSTEMS.len() {
                let sys = SYSTEMS[(k + rep as usize) % SYSTEMS.len()];
                let (_, client, target) = targets.iter().find(|(n, ..)| *n == sys).unwrap();
                for (mode, scenario, unit) in [
                    ("crr", "new_connections", "conn/s"),
                    ("rr", "transactions", "trans/s"),
                ] {
                    let mut s = Sample::new("lb", scenario, sys, size as u64, unit);
                    s.rep = rep;
                    if let Some((_, why)) = unavailable.iter().find(|(u, _)| *u == sys) {
                        s.ok = false;
                        s.note = why.clone();
                        out.push(s);
                        continue;
                    }
                    let r = load(p, client, *target, mode)?;
                    s.value = r.per_sec;
                    if r.completed == 0 || r.errors * 100 > r.completed.max(1) {
                        s.ok = false;
                        s.note = format!(
                            "error: {} errors, {} completed: {:?}",
                            r.errors, r.completed, r.error_kinds
                        );
                    } else if r.errors > 0 {
                        s.note = format!("{} errors", r.errors);
                    }
                    eprintln!(
                        "   rep {rep} {sys:8} {scenario:15} {:>10.0} {unit}",
                        r.per_sec
                    );
                    out.push(s);
                }
            }
        }
    }
    let _ = peers::flush(peers::Peer::Iptables, &ipt.host);
    let _ = peers::flush(peers::Peer::Nftables, &nft.host);
    Ok(out)
}

fn run_update(p: &Plan) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    let ipt = env::Env::plain("ui", "10.153.0.0/24".parse()?, 3, true)?;
    let nft = env::Env::plain("ut", "10.154.0.0/24".parse()?, 3, true)?;
    let mut nc = netctl_sys::NetctlSys::start(&p.netctl, "un", 3)?;
    let backends = |e: &env::Env| -> Vec<(std::net::Ipv4Addr, u16)> {
        e.backend_ips.iter().map(|ip| (*ip, 8080)).collect()
    };
    let systems = ["netctl", "iptables", "nftables"];
    for &size in &p.update_sizes {
        // Programming 100k services takes the peers minutes: one repetition there.
        let reps = if size >= 100_000 { 1 } else { p.reps };
        eprintln!("-- update: {size} services, {reps} repetition(s)");
        for rep in 0..reps {
            for k in 0..systems.len() {
                let sys = systems[(k + rep as usize) % systems.len()];
                let mut push = |scenario: &str, d: Duration, ok: bool, note: String| {
                    let mut s = Sample::new("update", scenario, sys, size as u64, "s");
                    s.rep = rep;
                    s.value = d.as_secs_f64();
                    s.ok = ok;
                    s.note = note;
                    eprintln!(
                        "   rep {rep} {sys:8} {scenario:12} {:>10.4} s{}",
                        s.value,
                        if ok { "" } else { " (timed out)" }
                    );
                    out.push(s);
                };
                if sys == "netctl" {
                    nc.clear()?;
                    let d = nc.grow_to(size, 80, 8080)?;
                    push("program_all", d, true, String::new());
                    push(
                        "add_one",
                        nc.add_one("extra", 80, 8080)?,
                        true,
                        String::new(),
                    );
                    push("remove_one", nc.remove_one("extra")?, true, String::new());
                    continue;
                }
                let (e, peer) = if sys == "iptables" {
                    (&ipt, peers::Peer::Iptables)
                } else {
                    (&nft, peers::Peer::Nftables)
                };
                peers::flush(peer, &e.host)?;
                let svcs = peers::services(size + 1, 80, &backends(e));
                let (all, extra) = svcs.split_at(size);
                match peers::apply(peer, &e.host, all, p.cap)? {
                    peers::Outcome::Done(d) => {
                        push("program_all", d, true, String::new());
                        let a = peers::add_one(peer, &e.host, &extra[0], p.cap)?;
                        push("add_one", a.duration(), a.is_done(), String::new());
                        let r = peers::remove_one(peer, &e.host, &extra[0], p.cap)?;
                        push("remove_one", r.duration(), r.is_done(), String::new());
                    }
                    peers::Outcome::TimedOut(c) => {
                        let why = format!("did not load within {c:?}");
                        push("program_all", c, false, why.clone());
                        push("add_one", c, false, why.clone());
                        push("remove_one", c, false, why);
                    }
                }
            }
        }
    }
    let _ = peers::flush(peers::Peer::Iptables, &ipt.host);
    let _ = peers::flush(peers::Peer::Nftables, &nft.host);
    drop(nc);
    Ok(out)
}
