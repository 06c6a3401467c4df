//! Test hosts built from network namespaces, each with its own netctl agent.
//!
//! A [`Host`] is a network namespace (`<prefix>h`) in which a real `netctl up` runs (entered
//! with `nsenter --net`, so it shares the root bpffs and pins under its own directory), with
//! its own store, socket and pin directory. Sandboxes the tests create carry the host's
//! prefix (`t<pid>x<n>`), so two runs of the suite (different pids) and two tests of one run
//! (different n) never share a name. Dropping the host stops its agent and removes every
//! namespace, pin and file it made, also when the test failed.
//!
//! [`docker`] adds a real dockerd per test, in the host's namespace, talking to the host's
//! agent as its network and IPAM plugin ([`Host::with_docker`]).

pub mod docker;
pub mod packet;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A prefix no other test of any run uses: `t<pid>x<n>`, n counting up within this process.
pub fn unique_prefix() -> String {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("t{}x{n}", std::process::id())
}

/// The netctl binary under test: `$NETCTL_BIN` (set by `cargo xtask test`), else the
/// workspace's debug build.
pub fn netctl_bin() -> PathBuf {
    std::env::var_os("NETCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug/netctl")
        })
}

pub struct Host {
    /// Prefix of every name this host's test makes (`t<pid>x<n>`).
    pub prefix: String,
    /// The host's network namespace.
    pub netns: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    uplink: bool,
    /// Extra arguments of `netctl up`.
    args: Vec<String>,
    agent: Option<Child>,
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    /// A new host namespace with a running agent.
    pub fn new() -> Host {
        Self::build(false, &[])
    }

    /// A host whose agent gets these extra `netctl up` arguments.
    pub fn with_args(args: &[&str]) -> Host {
        Self::build(false, args)
    }

    /// A host whose agent runs with `--uplink <prefix>u0`, a veth whose peer `<prefix>u1`
    /// sits in a namespace `<prefix>peer` at 192.0.2.2/24 (the host side is 192.0.2.1/24).
    pub fn with_uplink() -> Host {
        Self::build(true, &[])
    }

    pub fn uplink(&self) -> String {
        format!("{}u0", self.prefix)
    }

    fn build(uplink: bool, args: &[&str]) -> Host {
        let mut h = Self::without_agent(uplink, args);
        h.start_agent();
        h
    }

    /// The host's namespace (and uplink), with no agent yet: [`Host::start_agent`] starts it.
    fn without_agent(uplink: bool, args: &[&str]) -> Host {
        let prefix = unique_prefix();
        let netns = format!("{prefix}h");
        let dir = std::env::temp_dir().join(format!("netctl-test-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok("ip", &["netns", "add", &netns]);
        run_ok("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        if uplink {
            let (u0, u1, peer) = (
                format!("{prefix}u0"),
                format!("{prefix}u1"),
                format!("{prefix}peer"),
            );
            run_ok("ip", &["netns", "add", &peer]);
            run_ok(
                "ip",
                &[
                    "-n", &netns, "link", "add", &u0, "type", "veth", "peer", "name", &u1, "netns",
                    &peer,
                ],
            );
            run_ok(
                "ip",
                &["-n", &netns, "addr", "add", "192.0.2.1/24", "dev", &u0],
            );
            run_ok("ip", &["-n", &netns, "link", "set", &u0, "up"]);
            run_ok(
                "ip",
                &["-n", &peer, "addr", "add", "192.0.2.2/24", "dev", &u1],
            );
            run_ok("ip", &["-n", &peer, "link", "set", &u1, "up"]);
        }
        Host {
            uplink,
            args: args.iter().map(|a| a.to_string()).collect(),
            socket: dir.join("netctl.sock"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/netctl-test-{prefix}")),
            prefix,
            netns,
            dir,
            agent: None,
        }
    }

    /// A name for a sandbox or network of this test.
    pub fn name(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }

    /// Starts `netctl up` inside the host namespace and waits until it answers.
    ///
    /// Unless the test's arguments name a Docker plugin, the agent gets `--docker-plugin off`:
    /// otherwise every test agent would serve `/run/docker/plugins/netctl.sock`.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let mut args = self.args.clone();
        if !args.iter().any(|a| a == "--docker-plugin") {
            args.extend(["--docker-plugin".to_owned(), "off".to_owned()]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(netctl_bin())
            .args(["up", "--state-dir"])
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(if self.uplink {
                vec!["--uplink".to_owned(), self.uplink()]
            } else {
                vec![]
            })
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start netctl up");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.netctl(&["status"]).status.success() {
                return;
            }
            if let Some(st) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {st}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer in 30 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the agent with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs the CLI against this host's agent.
    pub fn netctl(&self, args: &[&str]) -> Output {
        Command::new(netctl_bin())
            .args(args)
            .env("NETCTL_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run netctl")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.netctl(args);
        assert!(
            o.status.success(),
            "netctl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs the CLI and asserts a failure reported on exactly one stderr line; returns it.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.netctl(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !o.status.success(),
            "netctl {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "netctl {args:?}: error must be one line, got: {err:?}"
        );
        err.trim_end().to_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    /// Drops counted for `reason`.
    pub fn drops(&self, reason: &str) -> u64 {
        self.json(&["stats"])["drops"][reason]["packets"]
            .as_u64()
            .unwrap()
    }

    /// Entries in the pinned map `name`, as `netctl status` reports them.
    pub fn map_entries(&self, name: &str) -> u64 {
        let st = self.json(&["status"]);
        st["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no map {name} in status"))["entries"]
            .as_u64()
            .unwrap()
    }

    /// Creates a sandbox named `<prefix><s>` and returns its name.
    pub fn sandbox(&self, s: &str) -> String {
        let name = self.name(s);
        self.ok(&["sandbox", "create", &name]);
        name
    }

    /// Connects and returns the endpoint address.
    pub fn connect(&self, network: &str, sandbox: &str) -> Ipv4Addr {
        let out = self.ok(&["network", "connect", network, sandbox]);
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// What a bad request must leave untouched: the store's view, links in the host, the
    /// namespaces of this test and the map fill.
    pub fn snapshot(&self) -> Value {
        let links = Command::new("ip")
            .args(["-n", &self.netns, "-o", "link", "show"])
            .output()
            .unwrap();
        let mut links: Vec<String> = String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
            .collect();
        links.sort();
        let mut netns: Vec<String> = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        netns.sort();
        let status = self.json(&["status"]);
        serde_json::json!({
            "networks": self.json(&["network", "ls"]),
            "sandboxes": self.json(&["sandbox", "ls"]),
            "links": links,
            "netns": netns,
            "maps": status["maps"],
            "programs": status["programs"],
        })
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Nothing here may panic: a panic while the test unwinds aborts the whole test
        // process, and every other test's clean-up with it.
        if self.agent.is_some() {
            let _ = Command::new(netctl_bin())
                .arg("down")
                .env("NETCTL_SOCKET", &self.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.kill_agent();
        // Whatever `down` could not remove (or the agent was dead): every namespace of this
        // test, then the pins.
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&self.prefix) {
                    let _ = Command::new("ip")
                        .args(["netns", "del", &n])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        remove_tree(&self.pin_dir);
        // Resolver files of this test's sandboxes (`ip netns exec` reads /etc/netns/NAME).
        if let Ok(rd) = std::fs::read_dir("/etc/netns") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "agent log of {}:\n{}",
                self.prefix,
                self.log()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bare network namespace `<prefix>n` (no agent), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}n");
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run_ok("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The names of the links in a namespace (without the `@peer` suffix of veths).
pub fn links(netns: &str) -> Vec<String> {
    let out = run_ok("ip", &["-n", netns, "-o", "link", "show"]);
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|s| s.trim().split('@').next().unwrap_or("").to_owned())
        .collect();
    v.sort();
    v
}

/// Removes a directory tree on bpffs (unlinking a pin releases the object).
fn remove_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                remove_tree(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command inside a sandbox (`ip netns exec`).
pub fn exec(sandbox: &str, args: &[&str]) -> Output {
    let mut a = vec!["netns", "exec", sandbox];
    a.extend_from_slice(args);
    run("ip", &a)
}

pub fn ping(from: &str, to: Ipv4Addr) -> bool {
    exec(
        from,
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", &to.to_string()],
    )
    .status
    .success()
}

/// Runs `f` on a thread that has entered the network namespace `/run/netns/<name>`: sockets
/// it creates belong to that namespace and can then be used from any thread.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

/// A TCP listener in a sandbox.
pub fn listen(sandbox: &str, port: u16) -> TcpListener {
    in_netns(sandbox, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind in sandbox")
    })
}

/// A TCP connection from a sandbox.
pub fn dial(sandbox: &str, to: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    in_netns(sandbox, move || {
        TcpStream::connect_timeout(&(to, port).into(), Duration::from_secs(3))
    })
}

/// Deterministic pseudo-random bytes (xorshift64*, Vigna 2014) for transfer payloads.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `data` over a fresh connection from `client` to `server_ip:port` (a listener in
/// the server's sandbox); returns the CRC-32 the server computed over what it received and
/// the byte count.
pub fn transfer(
    listener: TcpListener,
    client: &str,
    server_ip: Ipv4Addr,
    port: u16,
    data: Vec<u8>,
) -> (u32, usize) {
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0;
        loop {
            let r = s.read(&mut buf).unwrap();
            if r == 0 {
                break;
            }
            h.update(&buf[..r]);
            n += r;
        }
        (h.finalize(), n)
    });
    let mut c = dial(client, server_ip, port).expect("connect");
    c.write_all(&data).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    server.join().unwrap()
}

/// Objects a reconciliation report (`netctl reconcile`, `status.reconcile.last`) says it
/// created, fixed or removed.
pub fn repaired(report: &Value) -> u64 {
    ["netlink", "maps", "links", "store"]
        .iter()
        .flat_map(|k| ["added", "updated", "removed"].map(|f| report[k][f].as_u64().unwrap_or(0)))
        .sum()
}

/// A TCP stream of known bytes from one sandbox to another, checked byte for byte on
/// arrival, for tests that must show traffic is not interrupted.
pub struct Stream {
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: std::thread::JoinHandle<Result<u64, String>>,
    client: std::thread::JoinHandle<Result<u64, String>>,
}

impl Stream {
    /// Starts a server on `server_ip:port` in `server` and a client in `client` writing 16 KiB
    /// every 2 ms.
    pub fn start(client: &str, server: &str, server_ip: Ipv4Addr, port: u16) -> Stream {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = listen(server, port);
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let received = received.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 64 * 1024];
                let mut at: u64 = 0;
                loop {
                    let r = s
                        .read(&mut buf)
                        .map_err(|e| format!("read after {at} bytes: {e}"))?;
                    if r == 0 {
                        return Ok(at);
                    }
                    for &byte in &buf[..r] {
                        if byte != (at % 251) as u8 {
                            return Err(format!("corrupt byte at offset {at}"));
                        }
                        at += 1;
                    }
                    received.store(at, Ordering::SeqCst);
                }
            })
        };
        let mut conn = dial(client, server_ip, port).expect("connect");
        let client = {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let mut sent: u64 = 0;
                let mut chunk = vec![0u8; 16 * 1024];
                while !stop.load(Ordering::SeqCst) {
                    for (i, b) in chunk.iter_mut().enumerate() {
                        *b = ((sent + i as u64) % 251) as u8;
                    }
                    conn.write_all(&chunk)
                        .map_err(|e| format!("write after {sent} bytes: {e}"))?;
                    sent += chunk.len() as u64;
                    std::thread::sleep(Duration::from_millis(2));
                }
                conn.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())?;
                Ok(sent)
            })
        };
        Stream {
            received,
            stop,
            server,
            client,
        }
    }

    /// Waits until another MiB has arrived (at most 20 s; a stall fails the test).
    pub fn wait_progress(&self) {
        use std::sync::atomic::Ordering;
        let from = self.received.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.received.load(Ordering::SeqCst) < from + 1024 * 1024 {
            assert!(
                Instant::now() < deadline,
                "the stream stalled at {from} bytes"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the client and checks that every byte sent arrived, in order, with no reset.
    pub fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = self.client.join().unwrap().expect("client");
        let got = self.server.join().unwrap().expect("server");
        assert_eq!(got, sent, "every byte sent arrived, in order");
    }
}

/// A server thread (and the threads it spawned) running until it is dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server in `sandbox` on `port` that greets each connection with one line
/// `NAME PEER LOCAL` (its own name, the peer address and its local address as it sees them),
/// then answers each line `L` it receives with `NAME L`, until the peer closes or the server
/// is dropped.
pub fn name_server_tcp(sandbox: &str, port: u16, name: &str) -> Server {
    let l = listen(sandbox, port);
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (st, name) = (stop.clone(), name.to_owned());
    let thread = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !st.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, peer)) => {
                    let (st, name) = (st.clone(), name.clone());
                    conns.push(std::thread::spawn(move || serve_name(s, peer, &name, &st)));
                    conns.retain(|c: &JoinHandle<()>| !c.is_finished());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}

fn serve_name(s: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let local = s.local_addr().unwrap();
    let mut w = s.try_clone().unwrap();
    if writeln!(w, "{name} {peer} {local}").is_err() {
        return;
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writeln!(w, "{name} {}", line.trim_end()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server in `sandbox` on `port` that answers each datagram `D` with `NAME PEER D`
/// (its own name and the sender's address as it sees it), until it is dropped.
pub fn name_server_udp(sandbox: &str, port: u16, name: &str) -> Server {
    let sock = in_netns(sandbox, move || {
        UdpSocket::bind(("0.0.0.0", port)).expect("bind UDP in sandbox")
    });
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (st, name) = (stop.clone(), name.to_owned());
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let msg = format!("{name} {peer} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = sock.send_to(msg.as_bytes(), peer);
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}
