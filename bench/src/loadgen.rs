//! The `lb` suite's load generator and its echo-style server.
//!
//! Wire protocol (both directions newline-terminated, no pipelining):
//! - request: `"<response size> xxx…\n"`, padded with `x` to `--request-size` bytes;
//! - response: `"<server name> ….\n"`, padded with `.` to the requested size (longer when
//!   the name does not fit).
//!
//! Modes:
//! - `crr`: each worker loops connect, one request, the full response, close (the client
//!   closes first, as a user's client does, so TIME_WAIT sits on the client side).
//! - `rr`: each worker keeps one connection and does request/response back to back.
//!
//! Counting: a transaction counts when its full response (the terminating newline) has
//! arrived and that moment lies in the measured window `[start + warmup, start + warmup +
//! duration)` on the monotonic clock. A transaction still unfinished when the window closes
//! is dropped, not counted. Every failure is counted once by kind (`connect:ECONNREFUSED`,
//! `read:eof`, …) and the worker starts a new transaction after a 1 ms pause (so a refusing
//! target does not turn into a busy loop); nothing is retried inside a transaction.
//!
//! What the caller must set in the client's network namespace for `crr` (see
//! /work/shared/BENCHMARKING.md):
//! - `net.ipv4.tcp_timestamps=2`: with per-destination timestamp offsets a reused client
//!   port towards another VIP/backend that still holds the old connection is rejected by
//!   PAWS and the SYN retried a second later; the rate collapses.
//! - `net.ipv4.tcp_tw_reuse=1`: the client closes first and holds TIME_WAIT for 60 s; the
//!   default (2) reuses TIME_WAIT ports only on loopback, so without it a namespace runs
//!   out of ports at about `ports / 60` connections per second.
//! - `net.ipv4.ip_local_port_range="1024 65535"` (wide), and `net.ipv4.tcp_max_tw_buckets`
//!   not below the number of TIME_WAIT sockets the run makes. `connect()` hands out ports
//!   of one parity first, so `distinct_flows` levels off near half the range per
//!   (source, destination) pair (14 116 with the default 32768-60999) and ports in
//!   TIME_WAIT are then reused.
//! - Pin with `--cpu` (or `taskset`) the generator and the servers to different CPUs. A
//!   pinned process runs a single-threaded runtime; unpinned, a multi-threaded one.
//!
//! Both sides raise their soft `RLIMIT_NOFILE` to the hard limit, so thousands of
//! connections fit.

// main.rs wires `server` and `load` as subcommands; until it does they are unused (drop
// this then).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

/// Longest request line the server accepts before dropping the connection.
const MAX_REQUEST: u64 = 1 << 20;
/// Largest response the server agrees to send.
const MAX_RESPONSE: usize = 1 << 20;
/// Listen backlog: a burst of new connections must not overflow the accept queue.
const BACKLOG: u32 = 4096;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Name put in every response (the load generator counts responses by name).
    #[arg(long)]
    pub name: String,
    /// Pin the server to this CPU (single-threaded runtime).
    #[arg(long)]
    pub cpu: Option<usize>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per transaction: connect, request, response, close.
    Crr,
    /// Persistent connections, request/response back to back.
    Rr,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Crr => "crr",
            Mode::Rr => "rr",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Address to connect to (a VIP or a backend), e.g. 10.96.0.1:80.
    #[arg(long)]
    pub target: SocketAddr,
    /// crr (new connection per transaction) or rr (persistent connections).
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Transactions (connections) in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before the measured window (not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Pin the load generator to this CPU (single-threaded runtime).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Request size in bytes (grown to fit the header when smaller).
    #[arg(long, default_value_t = 64)]
    pub request_size: usize,
    /// Response size in bytes (grown to fit the server's name when smaller).
    #[arg(long, default_value_t = 64)]
    pub response_size: usize,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct LoadReport {
    pub mode: String,
    pub target: String,
    pub concurrency: u32,
    /// Length of the measured window on the monotonic clock: completions are counted when
    /// they fall in it.
    pub duration_s: f64,
    /// Transactions whose full response arrived inside the window.
    pub completed: u64,
    /// `completed / duration_s`.
    pub per_sec: f64,
    /// Failed transactions inside the window.
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Per transaction: connect + request + response in crr, request + response in rr.
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    /// Distinct client (addr, port) pairs among the counted transactions: one per
    /// connection in crr, the connections used in rr.
    pub distinct_flows: u64,
    /// Counted responses by server name.
    pub by_server: BTreeMap<String, u64>,
}

// ---------------------------------------------------------------------------------------
// Process setup

/// Pins the calling thread (and the threads it creates later) to `cpu`.
fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("cpu {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("sched_setaffinity to cpu {cpu}"))?;
    Ok(())
}

/// Raises the soft open-files limit to the hard one (1024 by default is too few).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Pinned: one thread on that CPU. Unpinned: a worker thread per CPU.
fn runtime(cpu: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    raise_nofile();
    let rt = match cpu {
        Some(cpu) => {
            pin(cpu)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        }
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    Ok(rt)
}

/// `ECONNREFUSED`, `ETIMEDOUT`, … or the io kind when there is no errno.
fn error_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => format!("{:?}", e.kind()),
    }
}

// ---------------------------------------------------------------------------------------
// Server

/// Runs the server until the process is killed.
pub fn server(args: &ServerArgs) -> anyhow::Result<()> {
    let rt = runtime(args.cpu)?;
    rt.block_on(async {
        let listener = bind_listener(args.listen)
            .await
            .with_context(|| format!("listen on {}", args.listen))?;
        eprintln!(
            "netctl-bench server {} listening on {}",
            args.name,
            listener.local_addr()?
        );
        serve(listener, Arc::from(args.name.as_str())).await;
        Ok(())
    })
}

/// A listener with SO_REUSEADDR and a large backlog. Needs a tokio runtime.
pub async fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts connections forever, one task per connection.
pub async fn serve(listener: TcpListener, name: Arc<str>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let name = name.clone();
                tokio::spawn(async move {
                    // A reset or a malformed request ends that connection only.
                    let _ = serve_connection(stream, &name).await;
                });
            }
            Err(e) => {
                // EMFILE, ENOBUFS, ECONNABORTED…: keep serving what is open.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, name: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::with_capacity(256);
    let mut response = Vec::new();
    let mut response_for = usize::MAX;
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_REQUEST)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(()); // the client closed
        }
        if line.last() != Some(&b'\n') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request"));
        }
        let size = requested_size(&line).min(MAX_RESPONSE);
        if size != response_for {
            response = build_response(name, size);
            response_for = size;
        }
        wr.write_all(&response).await?;
    }
}

/// The response size a request asks for (its first token), 64 when it names none.
fn requested_size(line: &[u8]) -> usize {
    let end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\n')
        .unwrap_or(line.len());
    std::str::from_utf8(&line[..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

fn response_len(name: &str, size: usize) -> usize {
    size.max(name.len() + 2)
}

fn build_response(name: &str, size: usize) -> Vec<u8> {
    let len = response_len(name, size);
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(name.as_bytes());
    r.push(b' ');
    r.resize(len - 1, b'.');
    r.push(b'\n');
    r
}

fn build_request(request_size: usize, response_size: usize) -> Vec<u8> {
    let mut r = format!("{response_size} ").into_bytes();
    let len = request_size.max(r.len() + 1);
    r.resize(len - 1, b'x');
    r.push(b'\n');
    r
}

// ---------------------------------------------------------------------------------------
// Latency histogram

/// Log-bucketed histogram of nanoseconds, HdrHistogram-style: values below 64 exactly, then
/// 64 linear sub-buckets per power of two, so any value is known to within 1/64 (1.6 %)
/// over the whole u64 range in 3776 counters (30 KB). Hand-written rather than the
/// `hdrhistogram` crate: it is 30 lines, needs no new dependency, and one histogram is
/// shared by every worker.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; ((64 - SUB_BITS as usize) + 1) * SUB as usize],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
        ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
    }

    /// The lowest value of bucket `i` and its width.
    fn bucket(i: usize) -> (u64, u64) {
        let (g, sub) = (i as u64 / SUB, i as u64 % SUB);
        if g == 0 {
            return (sub, 1);
        }
        ((SUB + sub) << (g - 1), 1 << (g - 1))
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
    }

    /// The value at quantile `q` (0..=1): the middle of the bucket holding that rank.
    fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = Self::bucket(i);
                return low as f64 + (width - 1) as f64 / 2.0;
            }
        }
        unreachable!("rank <= total")
    }
}

// ---------------------------------------------------------------------------------------
// Load generator

/// What the workers found, shared under one lock: a lock per completion costs far less
/// than the syscalls of a transaction, and is uncontended on a pinned single thread.
struct Stats {
    completed: u64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    latency_ns: Histogram,
    flows: HashSet<SocketAddr>,
    by_server: BTreeMap<String, u64>,
}

struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

/// One finished transaction.
struct Done {
    finished: Instant,
    latency: Duration,
    local: SocketAddr,
}

/// A failed transaction: the step and the error.
struct Failed(String);

impl Failed {
    fn at(step: &str) -> impl FnOnce(io::Error) -> Failed + '_ {
        move |e| Failed(format!("{step}:{}", error_name(&e)))
    }
}

struct Worker {
    target: SocketAddr,
    request: Arc<[u8]>,
    response_size: usize,
    buf: Vec<u8>,
    stats: Arc<Mutex<Stats>>,
}

impl Worker {
    fn record(&self, window: &Window, result: Result<Done, Failed>) {
        let mut s = self.stats.lock().unwrap();
        match result {
            Ok(done) => {
                if !window.contains(done.finished) {
                    return;
                }
                s.completed += 1;
                s.latency_ns.record(done.latency.as_nanos() as u64);
                s.flows.insert(done.local);
                let name = server_name(&self.buf);
                match s.by_server.get_mut(name) {
                    Some(n) => *n += 1,
                    None => {
                        s.by_server.insert(name.to_owned(), 1);
                    }
                }
            }
            Err(Failed(kind)) => {
                if !window.contains(Instant::now()) {
                    return;
                }
                s.errors += 1;
                *s.error_kinds.entry(kind).or_default() += 1;
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, Failed> {
        let stream = TcpStream::connect(self.target)
            .await
            .map_err(Failed::at("connect"))?;
        stream.set_nodelay(true).map_err(Failed::at("connect"))?;
        Ok(stream)
    }

    /// Sends the request and reads one full response into `self.buf`.
    async fn exchange(&mut self, stream: &mut TcpStream) -> Result<(), Failed> {
        stream
            .write_all(&self.request)
            .await
            .map_err(Failed::at("write"))?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.map_err(Failed::at("read"))?;
            if n == 0 {
                return Err(Failed("read:eof".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if chunk[..n].contains(&b'\n') {
                break;
            }
        }
        let name = server_name(&self.buf);
        if self.buf.last() != Some(&b'\n')
            || self.buf.len() != response_len(name, self.response_size)
        {
            return Err(Failed("response:malformed".into()));
        }
        Ok(())
    }

    async fn crr(&mut self, window: &Window) {
        loop {
            let txn = async {
                let begin = Instant::now();
                let mut stream = self.connect().await?;
                let local = stream.local_addr().map_err(Failed::at("connect"))?;
                self.exchange(&mut stream).await?;
                let finished = Instant::now();
                drop(stream); // a normal close: FIN, TIME_WAIT on this side
                Ok(Done {
                    finished,
                    latency: finished - begin,
                    local,
                })
            };
            let Ok(result) = tokio::time::timeout_at(window.end, txn).await else {
                return; // unfinished when the window closed: not counted
            };
            let failed = result.is_err();
            self.record(window, result);
            if failed {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if Instant::now() >= window.end {
                return;
            }
        }
    }

    async fn rr(&mut self, window: &Window) {
        let mut conn: Option<(TcpStream, SocketAddr)> = None;
        loop {
            let txn = async {
                if conn.is_none() {
                    let stream = self.connect().await?;
                    let local = stream.local_addr().map_err(Failed::at("connect"))?;
                    conn = Some((stream, local));
                }
                let (stream, local) = conn.as_mut().expect("connected above");
                let local = *local;
                let begin = Instant::now();
                self.exchange(stream).await?;
                let finished = Instant::now();
                Ok(Done {
                    finished,
                    latency: finished - begin,
                    local,
                })
            };
            let Ok(result) = tokio::time::timeout_at(window.end, txn).await else {
                return;
            };
            let failed = result.is_err();
            self.record(window, result);
            if failed {
                conn = None; // a broken connection is not reused
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if Instant::now() >= window.end {
                return;
            }
        }
    }
}

/// The first token of a response.
fn server_name(response: &[u8]) -> &str {
    let end = response
        .iter()
        .position(|&b| b == b' ' || b == b'\n')
        .unwrap_or(response.len());
    std::str::from_utf8(&response[..end]).unwrap_or("<invalid>")
}

/// Runs the load and returns what it measured (main prints it as one JSON line).
pub fn load(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be positive");
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        bail!("--warmup must not be negative");
    }
    let rt = runtime(args.cpu)?;
    let stats = Arc::new(Mutex::new(Stats {
        completed: 0,
        errors: 0,
        error_kinds: BTreeMap::new(),
        latency_ns: Histogram::new(),
        flows: HashSet::new(),
        by_server: BTreeMap::new(),
    }));
    let request: Arc<[u8]> = build_request(args.request_size, args.response_size).into();
    let measured = rt.block_on(async {
        let start = Instant::now() + Duration::from_secs_f64(args.warmup);
        let window = Arc::new(Window {
            start,
            end: start + Duration::from_secs_f64(args.duration),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..args.concurrency {
            let mut worker = Worker {
                target: args.target,
                request: request.clone(),
                response_size: args.response_size,
                buf: Vec::with_capacity(args.response_size + 64),
                stats: stats.clone(),
            };
            let window = window.clone();
            let mode = args.mode;
            tasks.spawn(async move {
                match mode {
                    Mode::Crr => worker.crr(&window).await,
                    Mode::Rr => worker.rr(&window).await,
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.context("load worker")?;
        }
        anyhow::Ok(window.end - window.start)
    })?;
    drop(rt);

    let s = Arc::try_unwrap(stats)
        .ok()
        .expect("workers are done")
        .into_inner()
        .unwrap();
    let duration_s = measured.as_secs_f64();
    Ok(LoadReport {
        mode: args.mode.as_str().into(),
        target: args.target.to_string(),
        concurrency: args.concurrency,
        duration_s,
        completed: s.completed,
        per_sec: s.completed as f64 / duration_s,
        errors: s.errors,
        error_kinds: s.error_kinds,
        latency_us_p50: s.latency_ns.quantile(0.50) / 1e3,
        latency_us_p99: s.latency_ns.quantile(0.99) / 1e3,
        distinct_flows: s.flows.len() as u64,
        by_server: s.by_server,
    })
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on 127.0.0.1, an ephemeral port, in its own thread for the test's life.
    fn start_server(name: &'static str) -> SocketAddr {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = runtime(None).unwrap();
            rt.block_on(async {
                let l = bind_listener("127.0.0.1:0".parse().unwrap()).await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                serve(l, Arc::from(name)).await;
            });
        });
        rx.recv().unwrap()
    }

    fn args(target: SocketAddr, mode: Mode) -> LoadArgs {
        LoadArgs {
            target,
            mode,
            concurrency: 16,
            duration: 1.0,
            warmup: 0.2,
            cpu: None,
            request_size: 64,
            response_size: 64,
        }
    }

    fn check(r: &LoadReport, name: &str) {
        assert!(r.completed > 0, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.error_kinds.is_empty(), "{r:?}");
        assert_eq!(r.by_server.get(name), Some(&r.completed), "{r:?}");
        assert!((r.duration_s - 1.0).abs() < 1e-6, "{r:?}");
        let rate = r.completed as f64 / r.duration_s;
        assert!((r.per_sec - rate).abs() <= 1e-9 * rate, "{r:?}");
        assert!(r.latency_us_p50 > 0.0 && r.latency_us_p50 <= r.latency_us_p99);
        // The JSON line main prints round-trips.
        let back: LoadReport = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
        assert_eq!(back.completed, r.completed);
    }

    #[test]
    fn crr_counts_new_connections_from_many_flows() {
        let target = start_server("backend-a");
        let r = load(&args(target, Mode::Crr)).unwrap();
        check(&r, "backend-a");
        assert_eq!(r.mode, "crr");
        // A new client port per connection: as many flows as connections, up to the ports
        // the kernel hands out (loopback reuses TIME_WAIT ports).
        assert!(r.distinct_flows > 16, "{r:?}");
        assert!(r.distinct_flows <= r.completed, "{r:?}");
    }

    #[test]
    fn rr_keeps_one_connection_per_worker() {
        let target = start_server("backend-b");
        let r = load(&args(target, Mode::Rr)).unwrap();
        check(&r, "backend-b");
        assert_eq!(r.mode, "rr");
        assert_eq!(r.distinct_flows, 16, "{r:?}");
    }

    #[test]
    fn refused_connections_are_errors_not_completions() {
        // Bind then drop: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut a = args(port, Mode::Crr);
        a.duration = 0.3;
        a.warmup = 0.0;
        let r = load(&a).unwrap();
        assert_eq!(r.completed, 0, "{r:?}");
        assert!(r.errors > 0, "{r:?}");
        assert_eq!(r.error_kinds.get("connect:ECONNREFUSED"), Some(&r.errors));
        assert_eq!(r.per_sec, 0.0);
    }

    #[test]
    fn response_carries_name_and_size() {
        let req = build_request(64, 100);
        assert_eq!(req.len(), 64);
        assert_eq!(requested_size(&req), 100);
        let resp = build_response("srv", 100);
        assert_eq!(resp.len(), 100);
        assert_eq!(server_name(&resp), "srv");
        assert_eq!(
            build_response("a-long-name", 4).len(),
            "a-long-name".len() + 2
        );
        assert_eq!(build_request(1, 64).len(), "64 \n".len());
    }

    #[test]
    fn histogram_is_within_its_precision() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [(0.5, 50_000_000.0), (0.99, 99_000_000.0)] {
            let got = h.quantile(q);
            assert!(
                (got - want).abs() / want < 1.0 / 64.0,
                "q{q}: {got} vs {want}"
            );
        }
        for v in [0, 1, 63, 64, 65, 1000, u64::MAX] {
            let (low, width) = Histogram::bucket(Histogram::index(v));
            assert!(low <= v && v - low < width, "{v}");
        }
    }
}
