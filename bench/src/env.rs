//! Namespace environments the suites run in.
//!
//! Every name is prefixed `nb<pid><tag>`: `…h` is the host (a bridge holding the gateway
//! address, the router), `…c` the client and `…b<i>` the backends, each joined to the bridge
//! by a veth. Dropping the [`Env`] kills what [`Env::spawn`] started and deletes every
//! namespace, also when a test panicked or [`Env::plain`] failed half-way.
// Some helpers serve only this module's tests.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;

pub struct Env {
    /// The caller's tag.
    pub tag: String,
    /// `nb<pid><tag>`, the prefix of every namespace of this environment.
    pub prefix: String,
    /// The namespace with the bridge; the router and gateway (where the peers' rules go).
    pub host: String,
    pub client: String,
    pub backends: Vec<String>,
    pub subnet: Ipv4Net,
    pub client_ip: Ipv4Addr,
    pub backend_ips: Vec<Ipv4Addr>,
    /// The bridge's address in `host`, every other namespace's default route.
    pub gateway: Ipv4Addr,
    /// Every namespace created so far (deleted on drop).
    namespaces: Vec<String>,
    /// pidfds of what `spawn` started (killed on drop; a pidfd never names a reused pid).
    children: Mutex<Vec<OwnedFd>>,
}

/// The bridge in the host namespace.
pub const BRIDGE: &str = "br0";
/// The interface of the client and of each backend.
pub const IFACE: &str = "eth0";

impl Env {
    /// A host namespace with a bridge holding the gateway (first) address of `subnet`, a
    /// client (second address) and `n_backends` backends (the addresses after it), each
    /// joined to the bridge by a veth, default routes via the gateway, `ip_forward=1` in the
    /// host, `lo` up everywhere, `tcp_timestamps=2`, a wide `ip_local_port_range` and
    /// `tcp_tw_reuse=1` in the client. `bridge_nf` sets `bridge-nf-call-iptables` in the host
    /// (1 when true, else 0): the iptables/nftables peers need it so the backends' bridged
    /// replies to the client pass conntrack and are un-NATed, as on a kube-proxy node.
    pub fn plain(tag: &str, subnet: Ipv4Net, n_backends: usize, bridge_nf: bool) -> Result<Env> {
        let hosts: Vec<Ipv4Addr> = subnet.hosts().take(n_backends + 2).collect();
        ensure!(
            hosts.len() == n_backends + 2,
            "{subnet} has no room for a gateway, a client and {n_backends} backends"
        );
        let prefix = format!("nb{}{tag}", std::process::id());
        let mut env = Env {
            tag: tag.to_owned(),
            host: format!("{prefix}h"),
            client: format!("{prefix}c"),
            backends: (0..n_backends).map(|i| format!("{prefix}b{i}")).collect(),
            prefix,
            subnet,
            gateway: hosts[0],
            client_ip: hosts[1],
            backend_ips: hosts[2..].to_vec(),
            namespaces: Vec::new(),
            children: Mutex::new(Vec::new()),
        };
        env.build(bridge_nf)?;
        Ok(env)
    }

    fn build(&mut self, bridge_nf: bool) -> Result<()> {
        let host = self.host.clone();
        self.add_ns(&host)?;
        ip(&["-n", &host, "link", "add", BRIDGE, "type", "bridge"])?;
        let gw = format!("{}/{}", self.gateway, self.subnet.prefix_len());
        ip(&["-n", &host, "addr", "add", &gw, "dev", BRIDGE])?;
        ip(&["-n", &host, "link", "set", BRIDGE, "up"])?;
        self.sysctl(
            &host,
            &[
                "net.ipv4.ip_forward=1",
                // The host forwards DNATed packets back out of the interface they came in
                // on; redirects would only be noise.
                "net.ipv4.conf.all.send_redirects=0",
                &format!("net.ipv4.conf.{BRIDGE}.send_redirects=0"),
                &format!(
                    "net.bridge.bridge-nf-call-iptables={}",
                    if bridge_nf { 1 } else { 0 }
                ),
            ],
        )?;
        let members: Vec<(String, Ipv4Addr)> =
            std::iter::once((self.client.clone(), self.client_ip))
                .chain(
                    self.backends
                        .iter()
                        .cloned()
                        .zip(self.backend_ips.iter().copied()),
                )
                .collect();
        for (i, (ns, addr)) in members.iter().enumerate() {
            self.add_ns(ns)?;
            // The host-side end: v0 for the client, v1.. for the backends.
            let v = format!("v{i}");
            ip(&[
                "-n", &host, "link", "add", &v, "type", "veth", "peer", "name", IFACE, "netns", ns,
            ])?;
            ip(&["-n", &host, "link", "set", &v, "master", BRIDGE, "up"])?;
            let a = format!("{addr}/{}", self.subnet.prefix_len());
            ip(&["-n", ns, "addr", "add", &a, "dev", IFACE])?;
            ip(&["-n", ns, "link", "set", IFACE, "up"])?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &self.gateway.to_string(),
            ])?;
        }
        let client = self.client.clone();
        self.sysctl(
            &client,
            &[
                "net.ipv4.tcp_timestamps=2",
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )?;
        Ok(())
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// `sysctl -w` each `key=value` in `ns`.
    pub fn sysctl(&self, ns: &str, settings: &[&str]) -> Result<()> {
        let mut args = vec!["sysctl", "-q", "-w"];
        args.extend_from_slice(settings);
        let out = self.exec(ns, &args)?;
        ensure!(
            out.status.success(),
            "sysctl in {ns} {settings:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Runs `args` in `ns` (`ip netns exec`) to completion and returns its output, whatever
    /// its exit status.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .with_context(|| format!("ip netns exec {ns} {args:?}"))
    }

    /// Runs `args` in `ns` and fails unless it exits 0; returns its stdout.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> Result<String> {
        let out = self.exec(ns, args)?;
        if !out.status.success() {
            bail!(
                "{args:?} in {ns}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `args` in `ns` (a server, a load generator); stdin is null, stdout and stderr
    /// are inherited. `ip netns exec` execs the command, so the child is the command. The
    /// environment kills it (SIGKILL through a pidfd) on drop if it still runs; waiting for
    /// it is the caller's.
    pub fn spawn(&self, ns: &str, args: &[&str]) -> Result<Child> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn in {ns}: {args:?}"))?;
        let fd = match pidfd(&child) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fd);
        Ok(child)
    }

    /// Every namespace of this environment (host, client, backends).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let children = std::mem::take(self.children.get_mut().unwrap_or_else(|p| p.into_inner()));
        for fd in children {
            kill_pidfd(&fd);
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("env cleanup: {e:#}");
            }
        }
    }
}

/// Runs `f` on a fresh thread that has entered the network namespace `ns`: sockets it
/// creates stay in `ns` whichever thread uses them afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let t = std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        Ok(f())
    });
    t.join()
        .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}

/// A pidfd for `child`: unlike its pid, it can never name another process later.
pub fn pidfd(child: &Child) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        bail!("pidfd_open: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILLs the process `fd` names; does nothing if it has exited.
pub fn kill_pidfd(fd: &OwnedFd) {
    // SAFETY: signals the process the pidfd names; fails harmlessly if it has exited.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("ip {args:?}"))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Duration;

    #[test]
    fn plain_env_routes_and_cleans_up() {
        let names;
        {
            let env = Env::plain("e0", "10.150.10.0/24".parse().unwrap(), 2, false).unwrap();
            names = env.namespaces().to_vec();
            assert_eq!(names.len(), 4);
            assert_eq!(env.gateway, Ipv4Addr::new(10, 150, 10, 1));
            assert_eq!(env.client_ip, Ipv4Addr::new(10, 150, 10, 2));
            assert_eq!(
                env.backend_ips,
                [Ipv4Addr::new(10, 150, 10, 3), Ipv4Addr::new(10, 150, 10, 4)]
            );
            for ns in &names {
                assert!(std::path::Path::new(&format!("/run/netns/{ns}")).exists());
            }
            let v = env
                .exec_ok(&env.client, &["sysctl", "-n", "net.ipv4.tcp_timestamps"])
                .unwrap();
            assert_eq!(v.trim(), "2");
            let v = env
                .exec_ok(
                    &env.host,
                    &["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"],
                )
                .unwrap();
            assert_eq!(v.trim(), "0");
            // A backend listens; the client reaches it across the bridge.
            let l = in_netns(&env.backends[1], || {
                std::net::TcpListener::bind(("0.0.0.0", 9000))
            })
            .unwrap()
            .unwrap();
            let to = env.backend_ips[1];
            let s = in_netns(&env.client, move || {
                TcpStream::connect_timeout(&(to, 9000).into(), Duration::from_secs(3))
            })
            .unwrap()
            .unwrap();
            let (a, peer) = l.accept().unwrap();
            assert_eq!(peer.ip(), env.client_ip);
            drop((a, s));
        }
        for ns in &names {
            assert!(
                !std::path::Path::new(&format!("/run/netns/{ns}")).exists(),
                "{ns} left"
            );
        }
    }

    #[test]
    fn a_failed_build_cleans_up() {
        // A /30 has two usable addresses: no room for a backend.
        assert!(Env::plain("e1", "10.150.11.0/30".parse().unwrap(), 1, false).is_err());
        let prefix = format!("nb{}e1", std::process::id());
        let left = std::fs::read_dir("/run/netns")
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
        assert!(!left);
    }
}
