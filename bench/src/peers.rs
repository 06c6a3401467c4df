//! The peers: the data planes a user would otherwise run, set up the way kube-proxy does.
//!
//! * iptables (nft backend) in kube-proxy's iptables shape: `KUBE-SERVICES`, jumped from
//!   nat `PREROUTING` and `OUTPUT`, holds one rule per service port
//!   (`-d VIP/32 -p tcp --dport P -j KUBE-SVC-…`); each `KUBE-SVC-…` chain picks an endpoint
//!   with `-m statistic --mode random --probability 1/(n-i)` (the last unconditional) and
//!   jumps to a `KUBE-SEP-…` chain that DNATs. A new connection walks `KUBE-SERVICES`
//!   linearly.
//! * nftables in kube-proxy's nftables shape: `table ip kube-proxy` with a `service-ips`
//!   verdict map (`ipv4_addr . inet_proto . inet_service : verdict`) looked up once, a
//!   `service-…` chain per service port choosing an endpoint with
//!   `numgen random mod N vmap { … }` and an `endpoint-…` chain per endpoint that DNATs.
//!
//! Both carry kube-proxy's hairpin masquerade (an endpoint connecting to its own service
//! is marked and masqueraded); neither carries the "traffic from outside the cluster CIDR"
//! masquerade rule, which kube-proxy only writes when it knows the cluster CIDR.
//! Chain names follow kube-proxy's (a hash of the service port name, and of the endpoint
//! for endpoint chains), with a 64-bit FNV-1a hash standing in for kube-proxy's SHA-256.
//!
//! Loads run the real tools (`iptables-restore`, `nft -f`) in a namespace, input on stdin,
//! under a time cap; a load that hits the cap is killed and reported as [`Outcome::TimedOut`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The service CIDR the VIPs come from (Kubernetes' default).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);

/// One service port: a VIP and TCP port load-balanced over `backends`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<(Ipv4Addr, u16)>,
}

impl Svc {
    /// The name kube-proxy would give this service port (`<namespace>/<name>:<port name>`);
    /// the VIP makes it unique.
    fn name(&self) -> String {
        format!("default/svc-{}:p{}", self.vip, self.port)
    }
    fn hash(&self) -> String {
        hash32(&format!("{}tcp", self.name()))
    }
    fn ep_hash(&self, ep: (Ipv4Addr, u16)) -> String {
        hash32(&format!("{}tcp{}:{}", self.name(), ep.0, ep.1))
    }
    // iptables
    fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", self.hash())
    }
    fn sep_chain(&self, ep: (Ipv4Addr, u16)) -> String {
        format!("KUBE-SEP-{}", self.ep_hash(ep))
    }
    fn services_rule(&self) -> String {
        format!(
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
            self.name(),
            self.vip,
            self.port,
            self.svc_chain()
        )
    }
    // nftables: kube-proxy's chain names `service-<hash8>-<ns>/<name>/<proto>/<port name>`
    // and `endpoint-<hash8>-<ns>/<name>/<proto>/<port name>__<ip>/<port>`.
    fn nft_svc_chain(&self) -> String {
        format!(
            "service-{}-default/svc-{}/tcp/p{}",
            &self.hash()[..8],
            self.vip,
            self.port
        )
    }
    fn nft_ep_chain(&self, ep: (Ipv4Addr, u16)) -> String {
        format!(
            "endpoint-{}-default/svc-{}/tcp/p{}__{}/{}",
            &self.ep_hash(ep)[..8],
            self.vip,
            self.port,
            ep.0,
            ep.1
        )
    }
}

/// `n` services at the first `n` VIPs of [`vips`], each on `port` over every backend in
/// `backends`.
pub fn services(n: usize, port: u16, backends: &[(Ipv4Addr, u16)]) -> Vec<Svc> {
    vips(n)
        .into_iter()
        .map(|vip| Svc {
            vip,
            port,
            backends: backends.to_vec(),
        })
        .collect()
}

/// `n` distinct addresses in the service CIDR (10.96.0.0/12), from 10.96.0.1 on.
pub fn vips(n: usize) -> Vec<Ipv4Addr> {
    let size = 1u32 << (32 - SERVICE_CIDR.1);
    assert!(
        n < (size - 1) as usize,
        "{n} VIPs do not fit the service CIDR"
    );
    let base = u32::from(SERVICE_CIDR.0);
    (1..=n as u32).map(|i| Ipv4Addr::from(base + i)).collect()
}

/// A 16-character base32 name from two 64-bit FNV-1a hashes (kube-proxy: the first 16
/// base32 characters of a SHA-256).
fn hash32(s: &str) -> String {
    fn fnv(seed: u64, s: &str) -> u64 {
        s.bytes()
            .fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits =
        (fnv(0xcbf2_9ce4_8422_2325, s) as u128) << 64 | fnv(0x8422_2325_cbf2_9ce4, s) as u128;
    (0..16)
        .map(|i| ALPHABET[((bits >> (123 - 5 * i)) & 31) as usize] as char)
        .collect()
}

/// kube-proxy omits the comments on endpoint rules above this many endpoints
/// (`largeClusterEndpointsThreshold`).
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The `:CHAIN - [0:0]` declarations and rules of one service's chains (not its
/// `KUBE-SERVICES` rule).
fn iptables_service(out: &mut String, decl: &mut String, svc: &Svc, large: bool) {
    let name = svc.name();
    let chain = svc.svc_chain();
    let _ = writeln!(decl, ":{chain} - [0:0]");
    let n = svc.backends.len();
    for (i, &ep) in svc.backends.iter().enumerate() {
        let sep = svc.sep_chain(ep);
        let _ = writeln!(decl, ":{sep} - [0:0]");
        let _ = write!(
            out,
            "-A {chain} -m comment --comment \"{name} -> {}:{}\"",
            ep.0, ep.1
        );
        if i + 1 < n {
            let _ = write!(
                out,
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            );
        }
        let _ = writeln!(out, " -j {sep}");
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        let _ = writeln!(out, "-A {sep}{comment} -s {}/32 -j KUBE-MARK-MASQ", ep.0);
        let _ = writeln!(
            out,
            "-A {sep}{comment} -m tcp -p tcp -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

/// A complete `iptables-restore` input for the nat table in kube-proxy's shape. Without
/// `--noflush` it replaces the whole nat table.
pub fn iptables_restore_input(svcs: &[Svc]) -> String {
    let endpoints: usize = svcs.iter().map(|s| s.backends.len()).sum();
    let large = endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mut decl = String::from(
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :INPUT ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut chains = String::new();
    for svc in svcs {
        rules.push_str(&svc.services_rule());
        rules.push('\n');
        iptables_service(&mut chains, &mut decl, svc, large);
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    decl + &rules + &chains + "COMMIT\n"
}

/// `iptables-restore --noflush` input adding one service to a loaded set: its chains and
/// its `KUBE-SERVICES` rule (appended; `KUBE-SERVICES` itself is not rewritten).
fn iptables_add_input(svc: &Svc) -> String {
    let (mut decl, mut chains) = (String::from("*nat\n"), String::new());
    iptables_service(&mut chains, &mut decl, svc, true);
    decl + &svc.services_rule() + "\n" + &chains + "COMMIT\n"
}

/// `iptables-restore --noflush` input removing one service: deletes its `KUBE-SERVICES`
/// rule, then flushes (by declaring) and deletes its chains, as kube-proxy removes stale
/// chains.
fn iptables_remove_input(svc: &Svc) -> String {
    let mut chains = vec![svc.svc_chain()];
    chains.extend(svc.backends.iter().map(|&ep| svc.sep_chain(ep)));
    let mut s = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(&svc.services_rule().replacen("-A ", "-D ", 1));
    s.push('\n');
    for c in &chains {
        let _ = writeln!(s, "-X {c}");
    }
    s + "COMMIT\n"
}

/// `add chain` and `add rule` commands of one service's chains (not its map element).
fn nft_service(out: &mut String, svc: &Svc) {
    let chain = svc.nft_svc_chain();
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    let mut vmap = Vec::with_capacity(svc.backends.len());
    for (i, &ep) in svc.backends.iter().enumerate() {
        let ec = svc.nft_ep_chain(ep);
        let _ = writeln!(out, "add chain ip kube-proxy {ec}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} meta l4proto tcp dnat to {}:{}",
            ep.0, ep.1
        );
        vmap.push(format!("{i} : goto {ec}"));
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        svc.backends.len(),
        vmap.join(" , ")
    );
}

fn nft_element(svc: &Svc) -> String {
    format!(
        "{} . tcp . {} : goto {}",
        svc.vip,
        svc.port,
        svc.nft_svc_chain()
    )
}

/// The table's base chains, masquerade chains, map and dispatch rule.
const NFT_TABLE: &str = "\
table ip kube-proxy {
\tcomment \"rules for kube-proxy\"
\tchain mark-for-masquerade {
\t\tmeta mark set meta mark | 0x4000
\t}
\tchain masquerading {
\t\tmeta mark & 0x4000 == 0 return
\t\tmeta mark set meta mark ^ 0x4000
\t\tmasquerade fully-random
\t}
\tchain services {
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t}
\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}
\tchain nat-output {
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}
\tchain nat-postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tjump masquerading
\t}
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"
\t}
}
";

/// A complete `nft -f` input in kube-proxy's nftables shape: deletes `table ip kube-proxy`
/// if present and recreates it with every service, in one transaction (so it can be
/// applied repeatedly). Like kube-proxy (knftables), chains, rules and map elements are
/// individual `add` commands.
pub fn nft_input(svcs: &[Svc]) -> String {
    let mut s = String::from("add table ip kube-proxy\ndelete table ip kube-proxy\n");
    s.push_str(NFT_TABLE);
    for svc in svcs {
        nft_service(&mut s, svc);
    }
    for svc in svcs {
        let _ = writeln!(
            s,
            "add element ip kube-proxy service-ips {{ {} }}",
            nft_element(svc)
        );
    }
    s
}

fn nft_add_input(svc: &Svc) -> String {
    let mut s = String::new();
    nft_service(&mut s, svc);
    let _ = writeln!(
        s,
        "add element ip kube-proxy service-ips {{ {} }}",
        nft_element(svc)
    );
    s
}

fn nft_remove_input(svc: &Svc) -> String {
    let mut s = format!(
        "delete element ip kube-proxy service-ips {{ {} . tcp . {} }}\n",
        svc.vip, svc.port
    );
    let mut chains = vec![svc.nft_svc_chain()];
    chains.extend(svc.backends.iter().map(|&ep| svc.nft_ep_chain(ep)));
    for c in &chains {
        let _ = writeln!(s, "flush chain ip kube-proxy {c}");
    }
    for c in &chains {
        let _ = writeln!(s, "delete chain ip kube-proxy {c}");
    }
    s
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Iptables,
    Nftables,
}

impl Peer {
    /// The `system` name the samples carry.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Iptables => "iptables",
            Peer::Nftables => "nftables",
        }
    }
}

/// How a timed load ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The loader exited successfully after this wall time.
    Done(Duration),
    /// The loader was still running at the cap (the duration given) and was killed.
    TimedOut(Duration),
}

impl Outcome {
    /// The time taken, or the cap.
    pub fn duration(self) -> Duration {
        match self {
            Outcome::Done(d) | Outcome::TimedOut(d) => d,
        }
    }
    pub fn is_done(self) -> bool {
        matches!(self, Outcome::Done(_))
    }
}

/// Runs `args` in `ns` with `input` on stdin and times it from spawn to exit; kills it at
/// `cap`. A non-zero exit is an error (with its stderr).
fn timed_load(ns: &str, args: &[&str], input: String, cap: Duration) -> Result<Outcome> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {args:?} in {ns}"))?;
    let fd = match crate::env::pidfd(&child) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Feed stdin from a thread so a loader that stops reading cannot block the cap.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = child.wait();
        let _ = tx.send((r, start.elapsed()));
    });
    let (status, elapsed) = match rx.recv_timeout(cap) {
        Ok((r, elapsed)) => (r.context("waiting for the loader")?, elapsed),
        Err(_) => {
            crate::env::kill_pidfd(&fd);
            let _ = waiter.join();
            let _ = writer.join();
            let _ = reader.join();
            return Ok(Outcome::TimedOut(cap));
        }
    };
    let _ = waiter.join();
    let wrote = writer.join().expect("stdin writer");
    let err = reader.join().expect("stderr reader");
    if !status.success() {
        bail!("{args:?} in {ns}: {status}: {}", err.trim());
    }
    wrote.with_context(|| format!("writing {args:?}'s input"))?;
    Ok(Outcome::Done(elapsed))
}

/// Loads every service into `ns` (replacing what the peer had there) and returns the wall
/// time of `iptables-restore` / `nft -f`, or [`Outcome::TimedOut`] if it ran past `cap`
/// (it is then killed and nothing was applied: both commit in one transaction).
pub fn apply(peer: Peer, ns: &str, svcs: &[Svc], cap: Duration) -> Result<Outcome> {
    match peer {
        Peer::Iptables => timed_load(ns, &["iptables-restore"], iptables_restore_input(svcs), cap),
        Peer::Nftables => timed_load(ns, &["nft", "-f", "-"], nft_input(svcs), cap),
    }
}

/// Adds one service to a loaded set as an incremental change: iptables, an
/// `iptables-restore --noflush` of its new chains and its `KUBE-SERVICES` rule; nftables,
/// one `nft -f` adding its chains and its `service-ips` element.
pub fn add_one(peer: Peer, ns: &str, svc: &Svc, cap: Duration) -> Result<Outcome> {
    match peer {
        Peer::Iptables => timed_load(
            ns,
            &["iptables-restore", "--noflush"],
            iptables_add_input(svc),
            cap,
        ),
        Peer::Nftables => timed_load(ns, &["nft", "-f", "-"], nft_add_input(svc), cap),
    }
}

/// Removes one service the same way: iptables, `--noflush` deleting its `KUBE-SERVICES`
/// rule and its chains; nftables, deleting its element and its chains in one `nft -f`.
pub fn remove_one(peer: Peer, ns: &str, svc: &Svc, cap: Duration) -> Result<Outcome> {
    match peer {
        Peer::Iptables => timed_load(
            ns,
            &["iptables-restore", "--noflush"],
            iptables_remove_input(svc),
            cap,
        ),
        Peer::Nftables => timed_load(ns, &["nft", "-f", "-"], nft_remove_input(svc), cap),
    }
}

/// Removes everything the peer loaded in `ns`, including the tables themselves (iptables:
/// the nft backend's `ip nat` table), so no nat hook is left to keep conntrack on.
pub fn flush(peer: Peer, ns: &str) -> Result<()> {
    let cap = Duration::from_secs(600);
    let input = match peer {
        Peer::Iptables => "add table ip nat\ndelete table ip nat\n",
        Peer::Nftables => "add table ip kube-proxy\ndelete table ip kube-proxy\n",
    };
    match timed_load(ns, &["nft", "-f", "-"], input.into(), cap)? {
        Outcome::Done(_) => Ok(()),
        Outcome::TimedOut(d) => bail!("flushing {} in {ns} took over {d:?}", peer.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, in_netns};
    use std::collections::BTreeSet;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const PORT: u16 = 80;
    const BACKEND_PORT: u16 = 8080;

    /// A TCP server in each backend that answers every connection with the backend's name.
    struct Servers {
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Servers {
        fn start(env: &Env) -> Servers {
            let stop = Arc::new(AtomicBool::new(false));
            let mut threads = Vec::new();
            for ns in &env.backends {
                let l = in_netns(ns, || TcpListener::bind(("0.0.0.0", BACKEND_PORT)))
                    .unwrap()
                    .unwrap();
                l.set_nonblocking(true).unwrap();
                let (stop, name) = (stop.clone(), ns.clone());
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match l.accept() {
                            Ok((mut s, _)) => {
                                let _ = s.set_nonblocking(false);
                                let _ = s.write_all(name.as_bytes());
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                }));
            }
            Servers { stop, threads }
        }
    }

    impl Drop for Servers {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Connects from the client to `vip:port` `n` times; returns the answers, checking that
    /// the client's peer is the VIP each time.
    fn ask(env: &Env, vip: Ipv4Addr, port: u16, n: usize) -> std::io::Result<Vec<String>> {
        in_netns(&env.client, move || {
            (0..n)
                .map(|_| {
                    let mut s =
                        TcpStream::connect_timeout(&(vip, port).into(), Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    assert_eq!(s.peer_addr()?, (vip, port).into());
                    let mut answer = String::new();
                    s.read_to_string(&mut answer)?;
                    Ok(answer)
                })
                .collect()
        })
        .unwrap()
    }

    fn backends(env: &Env) -> Vec<(Ipv4Addr, u16)> {
        env.backend_ips
            .iter()
            .map(|&ip| (ip, BACKEND_PORT))
            .collect()
    }

    const CAP: Duration = Duration::from_secs(60);

    fn balances_and_updates(peer: Peer, tag: &str, subnet: &str) {
        let env = Env::plain(tag, subnet.parse().unwrap(), 3, true).unwrap();
        let _servers = Servers::start(&env);
        let svcs = services(10, PORT, &backends(&env));
        let t = apply(peer, &env.host, &svcs, CAP).unwrap();
        assert!(t.is_done(), "{t:?}");
        let last = svcs.last().unwrap();
        let answers: BTreeSet<String> =
            ask(&env, last.vip, PORT, 30).unwrap().into_iter().collect();
        assert_eq!(
            answers,
            env.backends.iter().cloned().collect::<BTreeSet<_>>(),
            "{} through the last VIP",
            peer.name()
        );
        // Applying again replaces the set.
        assert!(apply(peer, &env.host, &svcs[..5], CAP).unwrap().is_done());
        assert!(ask(&env, last.vip, PORT, 1).is_err());
        assert_eq!(ask(&env, svcs[4].vip, PORT, 1).unwrap().len(), 1);

        // Add one, then remove one.
        let added = Svc {
            vip: vips(11)[10],
            port: PORT,
            backends: backends(&env)[1..].to_vec(),
        };
        assert!(ask(&env, added.vip, PORT, 1).is_err());
        assert!(add_one(peer, &env.host, &added, CAP).unwrap().is_done());
        let answers: BTreeSet<String> = ask(&env, added.vip, PORT, 20)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(
            answers,
            env.backends[1..].iter().cloned().collect::<BTreeSet<_>>()
        );
        assert!(
            remove_one(peer, &env.host, &svcs[2], CAP)
                .unwrap()
                .is_done()
        );
        assert!(ask(&env, svcs[2].vip, PORT, 1).is_err());
        assert_eq!(ask(&env, svcs[3].vip, PORT, 3).unwrap().len(), 3);
        assert!(remove_one(peer, &env.host, &added, CAP).unwrap().is_done());
        assert!(ask(&env, added.vip, PORT, 1).is_err());
        // Removing what is not there fails (and is not silently "fast").
        assert!(remove_one(peer, &env.host, &added, CAP).is_err());

        flush(peer, &env.host).unwrap();
        assert!(ask(&env, svcs[3].vip, PORT, 1).is_err());
        flush(peer, &env.host).unwrap();
        let tables = env.exec_ok(&env.host, &["nft", "list", "tables"]).unwrap();
        assert_eq!(tables.trim(), "", "flush leaves no table");
    }

    #[test]
    fn iptables_balances_and_updates() {
        balances_and_updates(Peer::Iptables, "pi", "10.150.20.0/24");
    }

    #[test]
    fn nftables_balances_and_updates() {
        balances_and_updates(Peer::Nftables, "pn", "10.150.21.0/24");
    }

    #[test]
    fn a_load_past_its_cap_is_reported_as_a_timeout() {
        let env = Env::plain("pt", "10.150.22.0/24".parse().unwrap(), 1, true).unwrap();
        let svcs = services(20_000, PORT, &backends(&env));
        let t = apply(Peer::Iptables, &env.host, &svcs, Duration::from_millis(1)).unwrap();
        assert_eq!(t, Outcome::TimedOut(Duration::from_millis(1)));
    }

    #[test]
    fn rule_shapes() {
        let svc = Svc {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            backends: vec![
                (Ipv4Addr::new(10, 150, 0, 3), 8080),
                (Ipv4Addr::new(10, 150, 0, 4), 8080),
                (Ipv4Addr::new(10, 150, 0, 5), 8080),
            ],
        };
        let ipt = iptables_restore_input(std::slice::from_ref(&svc));
        assert!(ipt.contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(ipt.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert_eq!(ipt.matches("--probability").count(), 2);
        assert!(ipt.contains("-d 10.96.0.1/32 --dport 80 -j KUBE-SVC-"));
        assert!(ipt.contains("-j DNAT --to-destination 10.150.0.5:8080"));
        let nft = nft_input(std::slice::from_ref(&svc));
        assert!(nft.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(nft.contains(
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-"
        ));
        println!("{ipt}\n{nft}");
        println!(
            "{}\n{}",
            iptables_add_input(&svc),
            iptables_remove_input(&svc)
        );
        println!("{}\n{}", nft_add_input(&svc), nft_remove_input(&svc));
        assert_eq!(vips(3)[2], Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(vips(300).iter().collect::<BTreeSet<_>>().len(), 300);
    }

    /// Load times at 1k and 10k services of 3 backends (or the comma-separated sizes in
    /// `NB_PEERS_SIZES`), then adding and removing one at that size. Run alone:
    /// `cargo test -p netctl-bench load_times -- --ignored --nocapture --test-threads=1`.
    #[test]
    #[ignore]
    fn load_times() {
        let env = Env::plain("pl", "10.150.23.0/24".parse().unwrap(), 3, true).unwrap();
        let sizes: Vec<usize> = match std::env::var("NB_PEERS_SIZES") {
            Ok(s) => s.split(',').map(|n| n.trim().parse().unwrap()).collect(),
            Err(_) => vec![1_000, 10_000],
        };
        for n in sizes {
            let svcs = services(n, PORT, &backends(&env));
            let extra = Svc {
                vip: vips(n + 1)[n],
                port: PORT,
                backends: backends(&env),
            };
            for peer in [Peer::Iptables, Peer::Nftables] {
                let cap = Duration::from_secs(300);
                let t = apply(peer, &env.host, &svcs, cap).unwrap();
                print!("{} {n}: apply {t:?}", peer.name());
                if t.is_done() {
                    let a = add_one(peer, &env.host, &extra, cap).unwrap();
                    let r = remove_one(peer, &env.host, &extra, cap).unwrap();
                    print!(", add_one {a:?}, remove_one {r:?}");
                    if n < 100_000 {
                        let again = apply(peer, &env.host, &svcs, cap).unwrap();
                        print!(", apply again (replacing) {again:?}");
                    }
                }
                println!();
                let f = Instant::now();
                flush(peer, &env.host).unwrap();
                println!("{} {n}: flush {:?}", peer.name(), f.elapsed());
            }
        }
    }
}
