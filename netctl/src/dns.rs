//! The embedded DNS server of a network: one per network, on the network's gateway address,
//! port 53, UDP and TCP. Sandboxes on the network use it as their resolver.
//!
//! The agent computes the [`Records`] from its state and pushes them with
//! [`DnsServer::update`]; this module only serves them:
//! - a name in [`Records::names`]: the A records (authoritative, TTL [`TTL_SECS`]), rotated per
//!   query for the names in [`Records::rotate`]; any other type for such a name: NODATA;
//! - a name in [`Records::nxdomain`]: NXDOMAIN (authoritative), never forwarded;
//! - anything else: forwarded as it came to the upstreams, first that answers; SERVFAIL if none.
//!
//! Only clients inside the network's subnet are answered (others: REFUSED). Packets are parsed
//! and built with hickory-proto's message types only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable};
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, trace, warn};

/// TTL of the local answers, in seconds. Short, so that clients see changes quickly.
pub const TTL_SECS: u32 = 5;

/// How long one upstream gets to answer a forwarded query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP connection may stay idle (or take to send one message) before it is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries over UDP being answered at once; more are dropped (the client retries).
const MAX_UDP_INFLIGHT: usize = 512;
/// TCP connections open at once; more are closed at once.
const MAX_TCP_CONNS: usize = 128;
/// The UDP payload size advertised in our EDNS answers.
const OUR_EDNS_PAYLOAD: u16 = 1232;

/// What one network's server answers. Names are lowercase, without the trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    /// name -> IPv4 addresses (A records), in the order to answer.
    pub names: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Names whose answer order rotates by one on every query (DNS round robin).
    pub rotate: BTreeSet<String>,
    /// Names that exist elsewhere (another network's services or sandboxes): answered NXDOMAIN,
    /// never forwarded.
    pub nxdomain: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listening socket could not be set up.
    #[error("{op} {addr}/{proto}: {source}")]
    Socket {
        op: &'static str,
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A name as looked up: lowercase, without the trailing dot.
fn normalize(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    match lower.strip_suffix('.') {
        Some(s) => s.to_string(),
        None => lower,
    }
}

/// The records in the form served: normalized names, one rotation counter per rotating name.
struct Table {
    names: HashMap<String, Vec<Ipv4Addr>>,
    rotate: HashMap<String, AtomicUsize>,
    nxdomain: HashSet<String>,
}

impl Table {
    fn new(records: Records) -> Table {
        Table {
            names: records
                .names
                .into_iter()
                .map(|(k, v)| (normalize(&k), v))
                .collect(),
            rotate: records
                .rotate
                .iter()
                .map(|k| (normalize(k), AtomicUsize::new(0)))
                .collect(),
            nxdomain: records.nxdomain.iter().map(|k| normalize(k)).collect(),
        }
    }

    /// The addresses of a local name, in this query's order; `None` if not local. Only A
    /// queries advance the rotation (a resolver sends A and AAAA together: counting both would
    /// give the same first address every time with two addresses).
    fn lookup(&self, name: &str, advance: bool) -> Option<Vec<Ipv4Addr>> {
        let mut addrs = self.names.get(name)?.clone();
        if advance
            && let Some(counter) = self.rotate.get(name)
            && !addrs.is_empty()
        {
            let n = counter.fetch_add(1, Ordering::Relaxed) % addrs.len();
            addrs.rotate_left(n);
        }
        Some(addrs)
    }
}

struct Shared {
    table: RwLock<Arc<Table>>,
    clients: Ipv4Net,
    upstreams: Vec<SocketAddr>,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn allowed(&self, src: SocketAddr) -> bool {
        let ip = match src.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(ip) => ip,
                None => return false,
            },
        };
        self.clients.contains(&ip)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

/// One network's DNS server: a UDP and a TCP listener on the same address and port.
pub struct DnsServer {
    shared: Arc<Shared>,
    local: SocketAddr,
    stop: watch::Sender<bool>,
    udp_task: JoinHandle<()>,
    tcp_task: JoinHandle<()>,
}

impl DnsServer {
    /// Binds UDP and TCP on bind:port and serves until stopped. Answers only clients whose
    /// source address is inside `clients` (others: REFUSED).
    ///
    /// With port 0, UDP gets an ephemeral port and TCP binds the same one.
    pub async fn start(
        bind: SocketAddr,
        clients: Ipv4Net,
        upstreams: Vec<SocketAddr>,
        records: Records,
    ) -> Result<DnsServer, DnsError> {
        let (udp, tcp) = bind_both(bind).await?;
        let local = udp.local_addr().map_err(|source| DnsError::Socket {
            op: "bind",
            addr: bind,
            proto: "udp",
            source,
        })?;
        // Never forward to ourselves.
        let upstreams: Vec<SocketAddr> = upstreams.into_iter().filter(|u| *u != local).collect();
        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(Table::new(records))),
            clients,
            upstreams,
        });
        let (stop, stop_rx) = watch::channel(false);
        let udp_task = tokio::spawn(serve_udp(Arc::new(udp), shared.clone(), stop_rx.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, shared.clone(), stop_rx));
        debug!(%local, %clients, upstreams = ?shared.upstreams, "dns server started");
        Ok(DnsServer {
            shared,
            local,
            stop,
            udp_task,
            tcp_task,
        })
    }

    /// Replaces the records (atomic swap); takes effect for the next query.
    pub fn update(&self, records: Records) {
        let table = Arc::new(Table::new(records));
        *self.shared.table.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    /// The address the server listens on (UDP and TCP), with the actual port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops both listeners (and the queries and connections in flight) and waits for the
    /// tasks. Dropping the server without `stop` stops it too, without waiting.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in [self.udp_task, self.tcp_task] {
            if let Err(e) = task.await
                && e.is_panic()
            {
                warn!(local = %self.local, "dns listener task panicked: {e}");
            }
        }
        debug!(local = %self.local, "dns server stopped");
    }
}

/// Binds UDP then TCP on the same address and port. When the port is 0 and TCP cannot get the
/// port UDP got, tries again with another one.
async fn bind_both(bind: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let udp = UdpSocket::bind(bind)
            .await
            .map_err(|source| DnsError::Socket {
                op: "bind",
                addr: bind,
                proto: "udp",
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Socket {
            op: "bind",
            addr: bind,
            proto: "udp",
            source,
        })?;
        match listen_tcp(addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if bind.port() == 0 && tries < 8 => {
                debug!(%addr, "tcp on the udp port failed, trying another port: {e}");
            }
            Err(e) => return Err(e),
        }
    }
}

fn listen_tcp(addr: SocketAddr) -> Result<TcpListener, DnsError> {
    let err = |op, source| DnsError::Socket {
        op,
        addr,
        proto: "tcp",
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| err("socket", e))?;
    socket.set_reuseaddr(true).map_err(|e| err("bind", e))?;
    socket.bind(addr).map_err(|e| err("bind", e))?;
    socket.listen(128).map_err(|e| err("listen", e))
}

async fn serve_udp(sock: Arc<UdpSocket>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let local = sock.local_addr().ok();
    let inflight = Arc::new(Semaphore::new(MAX_UDP_INFLIGHT));
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 65535];
    loop {
        while tasks.try_join_next().is_some() {}
        let (n, src) = tokio::select! {
            _ = stop.changed() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(?local, "dns udp receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            debug!(%src, "dns: too many queries in flight, dropping one");
            continue;
        };
        let packet = buf[..n].to_vec();
        let (sock, shared) = (sock.clone(), shared.clone());
        tasks.spawn(async move {
            let _permit = permit;
            if let Some(reply) = handle(&shared, src, &packet, Proto::Udp).await
                && let Err(e) = sock.send_to(&reply, src).await
            {
                debug!(%src, "dns udp send: {e}");
            }
        });
    }
    tasks.shutdown().await;
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let local = listener.local_addr().ok();
    let conns = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, src) = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(?local, "dns tcp accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            debug!(%src, "dns: too many tcp connections, closing one");
            continue;
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp_conn(stream, src, &shared).await {
                trace!(%src, "dns tcp connection: {e}");
            }
        });
    }
    tasks.shutdown().await;
}

/// Answers the messages of one TCP connection in order, until the client closes it, sends
/// something that is not a query, or stays idle.
async fn serve_tcp_conn(mut stream: TcpStream, src: SocketAddr, shared: &Shared) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let mut packet = vec![0u8; len as usize];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "message not received in time")
            })??;
        let Some(reply) = handle(shared, src, &packet, Proto::Tcp).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return Err(io::Error::other("answer larger than 64 KiB"));
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        stream.write_all(&out).await?;
    }
}

/// The answer to one received packet, encoded; `None` to drop it (no parsable query header, or
/// not a query).
async fn handle(shared: &Shared, src: SocketAddr, packet: &[u8], proto: Proto) -> Option<Vec<u8>> {
    let header = match Header::read(&mut BinDecoder::new(packet)) {
        Ok(h) => h,
        Err(e) => {
            trace!(%src, "dns: dropping unparsable packet: {e}");
            return None;
        }
    };
    if header.metadata.message_type != MessageType::Query {
        trace!(%src, "dns: dropping a message that is not a query");
        return None;
    }
    let parsed = Message::from_vec(packet);
    if !shared.allowed(src) {
        debug!(%src, "dns: refusing a client outside {}", shared.clients);
        let mut reply = Message::error_msg(header.id, header.op_code, ResponseCode::Refused);
        if let Ok(req) = &parsed {
            reply.add_queries(req.queries.iter().cloned());
        }
        return Some(finish(reply, 512, proto));
    }
    let req = match parsed {
        Ok(req) => req,
        Err(e) => {
            debug!(%src, "dns: malformed query: {e}");
            let reply = Message::error_msg(header.id, header.op_code, ResponseCode::FormErr);
            return Some(finish(reply, 512, proto));
        }
    };
    let limit = req.max_payload() as usize;
    if req.op_code != OpCode::Query {
        let mut reply = Message::error_msg(req.id, req.op_code, ResponseCode::NotImp);
        reply.add_queries(req.queries.iter().cloned());
        return Some(finish(reply, limit, proto));
    }
    let [query] = req.queries.as_slice() else {
        let reply = Message::error_msg(req.id, req.op_code, ResponseCode::FormErr);
        return Some(finish(reply, limit, proto));
    };
    let name = normalize(&query.name().to_ascii());
    let table = shared.table();
    let wants_a = query.query_type() == RecordType::A && query.query_class() == DNSClass::IN;
    if let Some(addrs) = table.lookup(&name, wants_a) {
        let mut reply = local_reply(&req, query);
        if wants_a {
            reply.add_answers(
                addrs
                    .into_iter()
                    .map(|ip| Record::from_rdata(query.name().clone(), TTL_SECS, RData::A(A(ip)))),
            );
        }
        trace!(%src, %name, qtype = %query.query_type(), answers = reply.answers.len(), "dns: local");
        return Some(finish(reply, limit, proto));
    }
    if table.nxdomain.contains(&name) {
        let mut reply = local_reply(&req, query);
        reply.metadata.response_code = ResponseCode::NXDomain;
        trace!(%src, %name, "dns: nxdomain");
        return Some(finish(reply, limit, proto));
    }
    drop(table);
    match forward(shared, packet, &req, proto).await {
        Some(answer) if proto == Proto::Tcp || answer.len() <= limit => Some(answer),
        Some(answer) => Some(truncate_forwarded(&answer, &req)),
        None => {
            let mut reply = Message::error_msg(req.id, req.op_code, ResponseCode::ServFail);
            reply.metadata.recursion_desired = req.recursion_desired;
            reply.metadata.recursion_available = true;
            reply.add_query(query.clone());
            Some(finish(reply, limit, proto))
        }
    }
}

/// An authoritative NOERROR answer to `req` with no records yet.
fn local_reply(req: &Message, query: &Query) -> Message {
    let mut reply = Message::response(req.id, req.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = req.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.checking_disabled = req.checking_disabled;
    reply.add_query(query.clone());
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

/// Encodes `reply`; over UDP, truncated (TC) if it is larger than `limit`.
fn finish(reply: Message, limit: usize, proto: Proto) -> Vec<u8> {
    let fallback = |reply: &Message| {
        let mut m = Message::error_msg(reply.id, reply.op_code, ResponseCode::ServFail);
        m.add_queries(reply.queries.iter().cloned());
        m.to_vec().unwrap_or_default()
    };
    let bytes = match reply.to_vec() {
        Ok(b) => b,
        Err(e) => {
            warn!("dns: encoding an answer: {e}");
            return fallback(&reply);
        }
    };
    if proto == Proto::Udp && bytes.len() > limit {
        return reply
            .truncate()
            .to_vec()
            .unwrap_or_else(|_| fallback(&reply));
    }
    bytes
}

/// A forwarded answer too large for the client's UDP limit: its header with TC set, the
/// question, no records.
fn truncate_forwarded(answer: &[u8], req: &Message) -> Vec<u8> {
    let mut reply = match Message::from_vec(answer) {
        Ok(m) => m.truncate(),
        Err(_) => {
            let mut m = Message::response(req.id, req.op_code);
            if let Ok(h) = Header::read(&mut BinDecoder::new(answer)) {
                m.metadata = h.metadata;
            }
            m.metadata.truncation = true;
            m.add_queries(req.queries.iter().cloned());
            m
        }
    };
    reply.metadata.id = req.id;
    reply.to_vec().unwrap_or_default()
}

/// `packet` with its header's id replaced; `None` if the header does not parse.
fn with_id(packet: &[u8], id: u16) -> Option<Vec<u8>> {
    let mut decoder = BinDecoder::new(packet);
    let mut header = Header::read(&mut decoder).ok()?;
    let body = packet.get(decoder.index()..)?;
    header.metadata.id = id;
    let mut out = header.to_bytes().ok()?;
    out.extend_from_slice(body);
    Some(out)
}

/// Sends the query to the upstreams in order (under a fresh id) and returns the first answer,
/// with the client's id restored. Over the client's transport.
async fn forward(shared: &Shared, packet: &[u8], req: &Message, proto: Proto) -> Option<Vec<u8>> {
    if shared.upstreams.is_empty() {
        debug!(
            "dns: no upstreams to forward {:?} to",
            req.queries.first().map(|q| q.name())
        );
        return None;
    }
    for &upstream in &shared.upstreams {
        let id: u16 = rand::random();
        let out = with_id(packet, id)?;
        let attempt = async {
            match proto {
                Proto::Udp => forward_udp(upstream, &out, id, req).await,
                Proto::Tcp => forward_tcp(upstream, &out, id, req).await,
            }
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            Ok(Ok(answer)) => {
                trace!(%upstream, "dns: forwarded");
                return with_id(&answer, req.id);
            }
            Ok(Err(e)) => debug!(%upstream, ?proto, "dns: upstream failed: {e}"),
            Err(_) => debug!(%upstream, ?proto, "dns: upstream timed out"),
        }
    }
    None
}

/// Whether `answer` is the upstream's answer to our query with id `id`.
fn is_answer_to(answer: &[u8], id: u16, req: &Message) -> bool {
    let Ok(header) = Header::read(&mut BinDecoder::new(answer)) else {
        return false;
    };
    if header.id != id || header.message_type != MessageType::Response {
        return false;
    }
    // The question must match when the answer parses; an answer that hickory cannot fully
    // parse is still passed on as is.
    match Message::from_vec(answer) {
        Ok(m) => m.queries.is_empty() || m.queries == req.queries,
        Err(_) => true,
    }
}

async fn forward_udp(
    upstream: SocketAddr,
    out: &[u8],
    id: u16,
    req: &Message,
) -> io::Result<Vec<u8>> {
    let any: IpAddr = if upstream.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = UdpSocket::bind((any, 0)).await?;
    sock.connect(upstream).await?;
    sock.send(out).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if is_answer_to(&buf[..n], id, req) {
            buf.truncate(n);
            return Ok(buf);
        }
        trace!(%upstream, "dns: ignoring a datagram that is not the answer");
    }
}

async fn forward_tcp(
    upstream: SocketAddr,
    out: &[u8],
    id: u16,
    req: &Message,
) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(out.len()).map_err(|_| io::Error::other("query larger than 64 KiB"))?;
    let mut framed = Vec::with_capacity(out.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(out);
    stream.write_all(&framed).await?;
    loop {
        let len = stream.read_u16().await?;
        let mut buf = vec![0u8; len as usize];
        stream.read_exact(&mut buf).await?;
        if is_answer_to(&buf, id, req) {
            return Ok(buf);
        }
    }
}

/// The nameservers of a resolv.conf (port 53), skipping unparsable lines. Empty if the file is
/// missing.
pub fn upstreams_from_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("reading {}: {e}", path.display());
            }
            return Vec::new();
        }
    };
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn records() -> Records {
        let mut r = Records::default();
        r.names
            .insert("web".into(), vec![Ipv4Addr::new(10, 1, 0, 2)]);
        r.names.insert(
            "api.svc".into(),
            vec![
                Ipv4Addr::new(10, 1, 0, 10),
                Ipv4Addr::new(10, 1, 0, 11),
                Ipv4Addr::new(10, 1, 0, 12),
            ],
        );
        r.rotate.insert("api.svc".into());
        r.nxdomain.insert("elsewhere".into());
        r
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn clients() -> Ipv4Net {
        "127.0.0.1/32".parse().unwrap()
    }

    async fn start(upstreams: Vec<SocketAddr>, records: Records) -> DnsServer {
        DnsServer::start(localhost(), clients(), upstreams, records)
            .await
            .unwrap()
    }

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m
    }

    /// Sends raw bytes over UDP from `from` and returns the raw answer, if one comes in 2 s.
    async fn udp_raw(
        from: IpAddr,
        server: SocketAddr,
        bytes: &[u8],
        wait: Duration,
    ) -> Option<Vec<u8>> {
        let sock = UdpSocket::bind((from, 0)).await.unwrap();
        sock.send_to(bytes, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        buf.truncate(n);
        Some(buf)
    }

    async fn udp_from(from: IpAddr, server: SocketAddr, q: &Message) -> Message {
        let raw = udp_raw(from, server, &q.to_vec().unwrap(), TIMEOUT)
            .await
            .expect("an answer");
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.id, q.id, "answer id");
        assert_eq!(m.message_type, MessageType::Response);
        m
    }

    async fn udp(server: SocketAddr, q: &Message) -> Message {
        udp_from(Ipv4Addr::LOCALHOST.into(), server, q).await
    }

    async fn tcp(server: SocketAddr, q: &Message) -> Message {
        let mut s = TcpStream::connect(server).await.unwrap();
        let bytes = q.to_vec().unwrap();
        s.write_u16(bytes.len() as u16).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let len = tokio::time::timeout(TIMEOUT, s.read_u16())
            .await
            .unwrap()
            .unwrap();
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.id, q.id);
        m
    }

    fn addrs(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn answers_local_names_case_insensitively() {
        let server = start(vec![], records()).await;
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        for name in ["web", "web.", "WeB.", "WEB"] {
            let m = udp(addr, &query(name, RecordType::A)).await;
            assert_eq!(m.response_code, ResponseCode::NoError, "{name}");
            assert!(m.authoritative, "{name}");
            assert!(!m.truncation);
            assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 2)], "{name}");
            for r in &m.answers {
                assert!(r.ttl <= 10 && r.ttl == TTL_SECS);
                assert_eq!(r.record_type(), RecordType::A);
            }
            assert_eq!(m.queries.len(), 1);
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn rotates_round_robin_names() {
        let server = start(vec![], records()).await;
        let mut firsts = Vec::new();
        for _ in 0..3 {
            let m = udp(server.local_addr(), &query("api.svc", RecordType::A)).await;
            let a = addrs(&m);
            assert_eq!(a.len(), 3);
            firsts.push(a[0]);
        }
        let distinct: BTreeSet<_> = firsts.iter().collect();
        assert_eq!(distinct.len(), 3, "{firsts:?}");
        // A and AAAA pairs (as getaddrinfo sends them) still rotate the A answers.
        let mut firsts = Vec::new();
        for _ in 0..3 {
            let m = udp(server.local_addr(), &query("api.svc", RecordType::A)).await;
            firsts.push(addrs(&m)[0]);
            let m = udp(server.local_addr(), &query("api.svc", RecordType::AAAA)).await;
            assert!(m.answers.is_empty());
        }
        let distinct: BTreeSet<_> = firsts.iter().collect();
        assert_eq!(distinct.len(), 3, "{firsts:?}");
        // A non-rotating name keeps its order.
        let mut r = records();
        r.names.insert(
            "fixed".into(),
            vec![Ipv4Addr::new(10, 1, 0, 20), Ipv4Addr::new(10, 1, 0, 21)],
        );
        server.update(r);
        for _ in 0..2 {
            let m = udp(server.local_addr(), &query("fixed", RecordType::A)).await;
            assert_eq!(
                addrs(&m),
                vec![Ipv4Addr::new(10, 1, 0, 20), Ipv4Addr::new(10, 1, 0, 21)]
            );
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn nxdomain_and_nodata() {
        let server = start(vec![], records()).await;
        let m = udp(server.local_addr(), &query("Elsewhere.", RecordType::A)).await;
        assert_eq!(m.response_code, ResponseCode::NXDomain);
        assert!(m.authoritative);
        assert!(m.answers.is_empty());

        for t in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let m = udp(server.local_addr(), &query("web", t)).await;
            assert_eq!(m.response_code, ResponseCode::NoError, "{t}");
            assert!(m.authoritative);
            assert!(m.answers.is_empty(), "{t}: {:?}", m.answers);
        }
        // Not local and no upstreams: SERVFAIL.
        let m = udp(
            server.local_addr(),
            &query("outside.example", RecordType::A),
        )
        .await;
        assert_eq!(m.response_code, ResponseCode::ServFail);
        server.stop().await;
    }

    #[tokio::test]
    async fn forwards_to_upstream_then_servfail() {
        let mut up = Records::default();
        up.names
            .insert("outside.example".into(), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        let upstream = start(vec![], up).await;
        // A dead upstream first (a port nobody listens on): the next one is tried.
        let dead = {
            let s = std::net::UdpSocket::bind(localhost()).unwrap();
            s.local_addr().unwrap()
        };
        let server = start(vec![dead, upstream.local_addr()], records()).await;

        let q = query("Outside.Example.", RecordType::A);
        let m = udp(server.local_addr(), &q).await;
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        assert_eq!(m.id, q.id);
        assert!(m.authoritative, "the upstream's answer comes back as is");
        // Over TCP too.
        let q = query("outside.example", RecordType::A);
        let m = tcp(server.local_addr(), &q).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        // The upstream's own NODATA comes back as is.
        let m = udp(
            server.local_addr(),
            &query("outside.example", RecordType::AAAA),
        )
        .await;
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // Local nxdomain names are never forwarded.
        let m = udp(server.local_addr(), &query("elsewhere", RecordType::A)).await;
        assert_eq!(m.response_code, ResponseCode::NXDomain);

        upstream.stop().await;
        let q = query("outside.example", RecordType::A);
        let m = udp(server.local_addr(), &q).await;
        assert_eq!(m.response_code, ResponseCode::ServFail);
        assert_eq!(m.id, q.id);
        let m = tcp(server.local_addr(), &q).await;
        assert_eq!(m.response_code, ResponseCode::ServFail);
        server.stop().await;
    }

    #[tokio::test]
    async fn silent_upstream_times_out_and_the_next_answers() {
        let mut up = Records::default();
        up.names
            .insert("outside.example".into(), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        let upstream = start(vec![], up).await;
        // Bound, never answers.
        let silent = UdpSocket::bind(localhost()).await.unwrap();
        let server = start(
            vec![silent.local_addr().unwrap(), upstream.local_addr()],
            records(),
        )
        .await;

        let q = query("outside.example", RecordType::A);
        let t0 = std::time::Instant::now();
        let (m, seen) = tokio::join!(udp(server.local_addr(), &q), async {
            let mut buf = vec![0u8; 65535];
            let (n, _) = silent.recv_from(&mut buf).await.unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        });
        let took = t0.elapsed();
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        assert_eq!(m.id, q.id);
        assert!(
            took >= UPSTREAM_TIMEOUT && took < UPSTREAM_TIMEOUT * 2,
            "{took:?}"
        );
        // The upstream got the query as it came, under another id.
        let sent = Message::from_vec(&q.to_vec().unwrap()).unwrap();
        assert_eq!(seen.queries, sent.queries);
        assert!(seen.recursion_desired);
        assert_eq!(seen.message_type, MessageType::Query);
        server.stop().await;
        upstream.stop().await;
    }

    #[tokio::test]
    async fn update_swaps_records() {
        let server = start(vec![], records()).await;
        let m = udp(server.local_addr(), &query("db", RecordType::A)).await;
        assert_eq!(m.response_code, ResponseCode::ServFail);

        let mut r = records();
        r.names.remove("web");
        r.names
            .insert("db".into(), vec![Ipv4Addr::new(10, 1, 0, 3)]);
        r.nxdomain.insert("web".into());
        server.update(r);

        let m = udp(server.local_addr(), &query("db", RecordType::A)).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 3)]);
        let m = udp(server.local_addr(), &query("web", RecordType::A)).await;
        assert_eq!(m.response_code, ResponseCode::NXDomain);

        server.update(Records::default());
        let m = udp(server.local_addr(), &query("db", RecordType::A)).await;
        assert_eq!(m.response_code, ResponseCode::ServFail);
        server.stop().await;
    }

    #[tokio::test]
    async fn refuses_clients_outside_the_subnet() {
        let server = start(vec![], records()).await;
        let q = query("web", RecordType::A);
        let m = udp_from(Ipv4Addr::new(127, 0, 0, 2).into(), server.local_addr(), &q).await;
        assert_eq!(m.response_code, ResponseCode::Refused);
        assert!(m.answers.is_empty());
        // Over TCP as well.
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(server.local_addr()).await.unwrap();
        let bytes = q.to_vec().unwrap();
        s.write_u16(bytes.len() as u16).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let len = tokio::time::timeout(TIMEOUT, s.read_u16())
            .await
            .unwrap()
            .unwrap();
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.response_code, ResponseCode::Refused);
        // The allowed client is still answered.
        let m = udp(server.local_addr(), &q).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 2)]);
        server.stop().await;
    }

    #[tokio::test]
    async fn tcp_queries_and_udp_truncation() {
        let mut r = records();
        let many: Vec<Ipv4Addr> = (1..=100).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect();
        r.names.insert("big".into(), many.clone());
        let server = start(vec![], r).await;

        let m = tcp(server.local_addr(), &query("WEB.", RecordType::A)).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 2)]);
        assert!(m.authoritative);

        // Over UDP without EDNS: more than 512 bytes, so TC and no records.
        let m = udp(server.local_addr(), &query("big", RecordType::A)).await;
        assert!(m.truncation);
        assert!(m.answers.is_empty());
        // With EDNS 4096 it fits.
        let mut q = query("big", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        let m = udp(server.local_addr(), &q).await;
        assert!(!m.truncation);
        assert_eq!(addrs(&m), many);
        // Over TCP, everything.
        let m = tcp(server.local_addr(), &query("big", RecordType::A)).await;
        assert!(!m.truncation);
        assert_eq!(addrs(&m), many);

        // Several queries on one connection.
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        for name in ["web", "big", "web"] {
            let q = query(name, RecordType::A);
            let bytes = q.to_vec().unwrap();
            s.write_u16(bytes.len() as u16).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            let len = s.read_u16().await.unwrap();
            let mut buf = vec![0u8; len as usize];
            s.read_exact(&mut buf).await.unwrap();
            let m = Message::from_vec(&buf).unwrap();
            assert_eq!(m.id, q.id);
            assert!(!m.answers.is_empty());
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_does_not_break_the_server() {
        let server = start(vec![], records()).await;
        let addr = server.local_addr();
        let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
        let short = Duration::from_millis(300);

        // Shorter than a header: dropped.
        for bytes in [&b""[..], b"\x00", b"garbage!"] {
            assert!(udp_raw(lo, addr, bytes, short).await.is_none());
        }
        // A query header with a question that does not parse: FORMERR with the id.
        let mut header = query("web", RecordType::A).to_vec().unwrap();
        let id = Header::read(&mut BinDecoder::new(&header)).unwrap().id;
        header.truncate(12);
        header.extend_from_slice(b"\x3fnot a name");
        let raw = udp_raw(lo, addr, &header, TIMEOUT).await.expect("formerr");
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.response_code, ResponseCode::FormErr);
        assert_eq!(m.id, id);
        // No question at all: FORMERR.
        let mut q = query("web", RecordType::A);
        q.queries.clear();
        assert_eq!(udp(addr, &q).await.response_code, ResponseCode::FormErr);
        // A response sent to us: dropped.
        let mut resp = query("web", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        assert!(
            udp_raw(lo, addr, &resp.to_vec().unwrap(), short)
                .await
                .is_none()
        );
        // Pseudo-random junk of many sizes.
        let mut x: u32 = 0x9e37_79b9;
        for len in 0..200usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let sock = UdpSocket::bind((lo, 0)).await.unwrap();
            sock.send_to(&bytes, addr).await.unwrap();
        }
        // Garbage over TCP: the connection is closed, the server goes on.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x00\x05hello\x00\x02").await.unwrap();
        drop(s);

        let m = udp(addr, &query("web", RecordType::A)).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 2)]);
        let m = tcp(addr, &query("web", RecordType::A)).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 2)]);
        server.stop().await;
    }

    #[tokio::test]
    async fn stop_frees_the_port_and_bind_errors_name_the_address() {
        let server = start(vec![], records()).await;
        let addr = server.local_addr();
        let err = DnsServer::start(addr, clients(), vec![], Records::default())
            .await
            .err()
            .expect("port in use");
        let text = err.to_string();
        assert!(text.starts_with(&format!("bind {addr}/udp: ")), "{text}");
        server.stop().await;
        let again = DnsServer::start(addr, clients(), vec![], records())
            .await
            .unwrap();
        assert_eq!(again.local_addr(), addr);
        let m = tcp(addr, &query("web", RecordType::A)).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(10, 1, 0, 2)]);
        again.stop().await;
    }

    #[test]
    fn resolv_conf() {
        let dir = std::env::temp_dir().join(format!("netctl-dns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver   2001:db8::1 # v6\n\
             nameserver not-an-ip\nnameserver\noptions ndots:2\n  nameserver 127.0.0.53\n",
        )
        .unwrap();
        let got = upstreams_from_resolv_conf(&path);
        assert_eq!(
            got,
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
                "127.0.0.53:53".parse().unwrap(),
            ]
        );
        assert!(upstreams_from_resolv_conf(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
