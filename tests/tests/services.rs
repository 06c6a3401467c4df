//! Services end to end: a VIP balanced in eBPF over backends in real sandboxes, with real
//! agents and real traffic from Rust sockets created inside the sandboxes. Needs root.
//! (DNS names, dnsrr and the packet-level tests of the load balancer are elsewhere.)

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use netctl_tests::{Host, Server, dial, exec, in_netns, name_server_tcp, name_server_udp, run};
use serde_json::Value;

/// A network `<p>n` (10.OCTET.0.0/24) with a client sandbox `<p>c` and backends `<p>b1`..,
/// and a vip service `<p>web` with the given ports and every backend attached.
struct Setup {
    net: String,
    svc: String,
    vip: Ipv4Addr,
    client: String,
    client_ip: Ipv4Addr,
    /// (sandbox, address), in attach order.
    backends: Vec<(String, Ipv4Addr)>,
}

impl Setup {
    fn names(&self) -> Vec<String> {
        self.backends.iter().map(|(b, _)| b.clone()).collect()
    }
}

fn setup(h: &Host, octet: u8, backends: usize, ports: &[&str]) -> Setup {
    let net = h.name("n");
    let subnet = format!("10.{octet}.0.0/24");
    h.ok(&["network", "create", &net, "--subnet", &subnet]);
    let client = h.sandbox("c");
    let client_ip = h.connect(&net, &client);
    let backends: Vec<(String, Ipv4Addr)> = (1..=backends)
        .map(|i| {
            let b = h.sandbox(&format!("b{i}"));
            let ip = h.connect(&net, &b);
            (b, ip)
        })
        .collect();
    let svc = h.name("web");
    let vip = add_service(h, &svc, &net, ports);
    for (b, _) in &backends {
        h.ok(&["service", "attach", &svc, b]);
    }
    Setup {
        net,
        svc,
        vip,
        client,
        client_ip,
        backends,
    }
}

/// `service add NAME --network NET --port P...`; checks the output `NAME VIP`, returns the VIP.
fn add_service(h: &Host, svc: &str, net: &str, ports: &[&str]) -> Ipv4Addr {
    let mut args = vec!["service", "add", svc, "--network", net];
    for p in ports {
        args.extend(["--port", p]);
    }
    let out = h.ok(&args);
    let mut w = out.split_whitespace();
    assert_eq!(w.next(), Some(svc), "service add printed {out:?}");
    let vip = w.next().expect("a VIP").parse().expect("the VIP parses");
    assert_eq!(w.next(), None, "service add printed {out:?}");
    vip
}

/// What a name server says when a connection opens.
#[derive(Debug, Clone)]
struct Greeting {
    backend: String,
    /// The client's address as the backend sees it.
    peer: SocketAddr,
    /// The backend's own address of the connection.
    local: SocketAddr,
}

/// A client connection to a name server (see `name_server_tcp`).
struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    /// Reads the greeting (5 s at most).
    fn open(s: TcpStream) -> std::io::Result<(Conn, Greeting)> {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let w = s.try_clone()?;
        let mut c = Conn {
            r: BufReader::new(s),
            w,
        };
        let line = c.line()?;
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 3, "greeting {line:?}");
        let g = Greeting {
            backend: f[0].to_owned(),
            peer: f[1].parse().unwrap(),
            local: f[2].parse().unwrap(),
        };
        Ok((c, g))
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        Ok(l.trim_end().to_owned())
    }

    /// Sends `msg`, returns the answer line.
    fn exchange(&mut self, msg: &str) -> std::io::Result<String> {
        writeln!(self.w, "{msg}")?;
        self.line()
    }

    fn peer(&self) -> SocketAddr {
        self.w.peer_addr().unwrap()
    }

    fn local(&self) -> SocketAddr {
        self.w.local_addr().unwrap()
    }
}

/// Opens `n` connections from `sandbox` to `to`, each with its greeting.
fn open_many(sandbox: &str, to: SocketAddr, n: usize) -> Vec<(Conn, Greeting)> {
    in_netns(sandbox, move || {
        (0..n)
            .map(|i| {
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
                Conn::open(s).unwrap_or_else(|e| panic!("greeting on connection {i}: {e}"))
            })
            .collect()
    })
}

/// One UDP query from a fresh socket (so a fresh source port) in the current namespace:
/// returns the answer and where it came from. Retries on the same socket (same flow) when
/// an answer is late.
fn udp_query(to: SocketAddr, msg: &str) -> (String, SocketAddr, SocketAddr) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        s.send_to(msg.as_bytes(), to).unwrap();
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                return (answer, from, s.local_addr().unwrap());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("UDP query {msg:?} to {to}: {e}"),
        }
    }
    panic!("UDP query {msg:?} to {to}: no answer in 3 tries");
}

/// Every backend got between 75% and 125% of an even share of `total`, and nobody else
/// answered.
fn assert_even(what: &str, counts: &BTreeMap<String, u32>, backends: &[String], total: u32) {
    eprintln!(
        "{what}: {total} over {} backends: {counts:?}",
        backends.len()
    );
    let share = total / backends.len() as u32;
    let (lo, hi) = (share * 3 / 4, share * 5 / 4);
    for k in counts.keys() {
        assert!(
            backends.contains(k),
            "{what}: answer from {k:?}: {counts:?}"
        );
    }
    for b in backends {
        let n = counts.get(b).copied().unwrap_or(0);
        assert!(
            (lo..=hi).contains(&n),
            "{what}: backend {b} got {n}, not in [{lo}, {hi}]: {counts:?}"
        );
    }
    assert_eq!(counts.values().sum::<u32>(), total);
}

#[test]
fn tcp_connections_spread_evenly_over_three_backends() {
    let h = Host::new();
    let s = setup(&h, 81, 3, &["80"]);
    let _servers: Vec<Server> = s
        .backends
        .iter()
        .map(|(b, _)| name_server_tcp(b, 80, b))
        .collect();
    let o = exec(&s.client, &["sysctl", "-w", "net.ipv4.tcp_timestamps=2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let to = SocketAddr::from((s.vip, 80));
    let counts = in_netns(&s.client, move || {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for i in 0..600 {
            let st = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
            let (c, g) = Conn::open(st).unwrap_or_else(|e| panic!("greeting {i}: {e}"));
            assert_eq!(c.peer(), to, "connection {i}: the client's peer");
            *counts.entry(g.backend).or_default() += 1;
            // Dropping `c` closes the connection.
        }
        counts
    });
    assert_even("TCP connections", &counts, &s.names(), 600);
    // Each flow left a forward and a reply entry (closing, kept 10 s): status shows the
    // conntrack table filling.
    let st = h.json(&["status"]);
    let ct = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "CONNTRACK")
        .unwrap();
    assert!(ct["entries"].as_u64().unwrap() >= 600, "{ct}");
    assert_eq!(ct["max_entries"], 262_144, "{ct}");
}

#[test]
fn udp_queries_spread_evenly_over_three_backends() {
    let h = Host::new();
    let s = setup(&h, 82, 3, &["7000/udp"]);
    let _servers: Vec<Server> = s
        .backends
        .iter()
        .map(|(b, _)| name_server_udp(b, 7000, b))
        .collect();
    let to = SocketAddr::from((s.vip, 7000));
    let counts = in_netns(&s.client, move || {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for i in 0..600 {
            let q = format!("q{i}");
            let (answer, from, local) = udp_query(to, &q);
            assert_eq!(from, to, "query {i}: the answer's source");
            let f: Vec<&str> = answer.split(' ').collect();
            assert_eq!(f.len(), 3, "answer {answer:?}");
            assert_eq!(f[2], q, "answer {answer:?} to {q}");
            assert_eq!(f[1].parse::<SocketAddr>().unwrap().port(), local.port());
            *counts.entry(f[0].to_owned()).or_default() += 1;
        }
        counts
    });
    assert_even("UDP queries", &counts, &s.names(), 600);
}

#[test]
fn backend_sees_the_client_and_client_sees_the_vip() {
    let h = Host::new();
    let s = setup(&h, 83, 2, &["80:8080"]);
    // The target port answers with the backend's name; port 80 of the backends with a
    // decoy name, so a packet that was not rewritten to 8080 would show.
    let mut servers: Vec<Server> = Vec::new();
    for (b, _) in &s.backends {
        servers.push(name_server_tcp(b, 8080, b));
        servers.push(name_server_tcp(b, 80, "port80"));
    }

    // What inspect says.
    let inspect: Value = serde_json::from_str(&h.ok(&["service", "inspect", &s.svc])).unwrap();
    let sv = &inspect[0];
    assert_eq!(sv["name"], s.svc.as_str(), "{inspect}");
    assert_eq!(sv["network"], s.net.as_str());
    assert_eq!(sv["mode"], "vip");
    assert_eq!(sv["vip"], s.vip.to_string());
    assert_eq!(
        sv["ports"],
        serde_json::json!([{"port": 80, "target": 8080, "proto": "tcp"}])
    );
    let bk: Vec<(String, String)> = sv["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["sandbox"].as_str().unwrap().to_owned(),
                b["ip"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = s
        .backends
        .iter()
        .map(|(b, ip)| (b.clone(), ip.to_string()))
        .collect();
    assert_eq!(bk, want);

    let vip80 = SocketAddr::from((s.vip, 80));
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for (i, (c, g)) in open_many(&s.client, vip80, 20).into_iter().enumerate() {
        assert_eq!(
            c.peer(),
            vip80,
            "connection {i}: the client's getpeername()"
        );
        assert_eq!(
            g.peer,
            c.local(),
            "connection {i}: the backend must see the client's own address and port"
        );
        assert_eq!(g.peer.ip(), s.client_ip);
        let ip = s
            .backends
            .iter()
            .find(|(b, _)| *b == g.backend)
            .unwrap_or_else(|| panic!("connection {i} answered by {:?}", g.backend))
            .1;
        assert_eq!(
            g.local,
            SocketAddr::from((ip, 8080)),
            "connection {i}: the backend's end is its address and the target port"
        );
        *seen.entry(g.backend).or_default() += 1;
    }
    eprintln!("peer address: 20 connections, all checked: {seen:?}");
}

#[test]
fn long_lived_connections_keep_their_backend_across_attach_and_detach() {
    let h = Host::new();
    let s = setup(&h, 84, 3, &["80"]);
    let b4 = h.sandbox("b4");
    h.connect(&s.net, &b4);
    let mut servers: Vec<Server> = s
        .backends
        .iter()
        .map(|(b, _)| name_server_tcp(b, 80, b))
        .collect();
    servers.push(name_server_tcp(&b4, 80, &b4));
    let names = s.names();
    let to = SocketAddr::from((s.vip, 80));

    let mut conns = open_many(&s.client, to, 30);
    let mut spread: BTreeMap<String, u32> = BTreeMap::new();
    for (_, g) in &conns {
        *spread.entry(g.backend.clone()).or_default() += 1;
    }
    eprintln!("30 long-lived connections: {spread:?}");
    for b in &names {
        assert!(spread.contains_key(b), "no connection on {b}: {spread:?}");
    }
    assert!(!spread.contains_key(&b4));

    let check_all = |conns: &mut Vec<(Conn, Greeting)>, round: &str, skip: Option<&str>| {
        for (i, (c, g)) in conns.iter_mut().enumerate() {
            if skip == Some(g.backend.as_str()) {
                continue;
            }
            let msg = format!("{round}-{i}");
            let answer = c
                .exchange(&msg)
                .unwrap_or_else(|e| panic!("{round}: connection {i} on {}: {e}", g.backend));
            assert_eq!(
                answer,
                format!("{} {msg}", g.backend),
                "{round}: connection {i} must stay on {}",
                g.backend
            );
        }
    };
    check_all(&mut conns, "before", None);

    h.ok(&["service", "attach", &s.svc, &b4]);
    check_all(&mut conns, "after-attach", None);

    let victim = names[0].clone();
    let inspect = h.json(&["service", "inspect", &s.svc]);
    let victim_id = inspect[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["sandbox"] == victim.as_str())
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let ct_backends = || -> Vec<u64> {
        let pin = h.pin_dir.join("v1/maps/CONNTRACK");
        let out = netctl_tests::run_ok(
            "bpftool",
            &["-j", "map", "dump", "pinned", pin.to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["formatted"]["value"]["backend_id"].as_u64().unwrap())
            .collect()
    };
    assert!(
        ct_backends().contains(&victim_id),
        "the victim's flows are tracked"
    );
    h.ok(&["service", "detach", &s.svc, &victim]);
    // The detach itself purges every conntrack entry naming the removed backend
    // (cilium#32472: stale entries black-holing flows).
    assert!(
        !ct_backends().contains(&victim_id),
        "no conntrack entry names the detached backend {victim_id}"
    );
    check_all(&mut conns, "after-detach", Some(&victim));

    // The victim's connections end: an error or EOF on the next exchange; never an answer.
    let mut ended: BTreeMap<&str, u32> = BTreeMap::new();
    for (i, (c, g)) in conns.iter_mut().enumerate() {
        if g.backend != victim {
            continue;
        }
        let how = match c.exchange(&format!("orphan-{i}")) {
            Ok(answer) => panic!(
                "connection {i} was on the detached {victim} and still got an answer: {answer:?}"
            ),
            Err(e) => match e.kind() {
                ErrorKind::UnexpectedEof => "eof",
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => "reset",
                ErrorKind::WouldBlock | ErrorKind::TimedOut => "no answer in 5 s",
                _ => panic!("connection {i}: unexpected error {e}"),
            },
        };
        *ended.entry(how).or_default() += 1;
    }
    eprintln!("connections on the detached backend {victim}: {ended:?}");
    // The survivors are still fine after that.
    check_all(&mut conns, "after-orphans", Some(&victim));

    let mut fresh: BTreeMap<String, u32> = BTreeMap::new();
    for (_, g) in open_many(&s.client, to, 60) {
        *fresh.entry(g.backend).or_default() += 1;
    }
    eprintln!("60 new connections after the detach: {fresh:?}");
    assert!(
        !fresh.contains_key(&victim),
        "a new connection reached the detached {victim}: {fresh:?}"
    );
    assert!(
        fresh.contains_key(&b4),
        "the attached {b4} got none: {fresh:?}"
    );
    let backends: Vec<String> = h.json(&["service", "ls"])[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["sandbox"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(backends, [names[1].clone(), names[2].clone(), b4.clone()]);
    drop(conns);
    drop(servers);
}

#[test]
fn hairpin_backend_reaches_its_own_service() {
    let h = Host::new();
    let s = setup(&h, 85, 3, &["80"]);
    let _servers: Vec<Server> = s
        .backends
        .iter()
        .map(|(b, _)| name_server_tcp(b, 80, b))
        .collect();
    let (me, my_ip) = s.backends[0].clone();
    let to = SocketAddr::from((s.vip, 80));
    let mut landed: BTreeMap<String, u32> = BTreeMap::new();
    for (i, (mut c, g)) in open_many(&me, to, 40).into_iter().enumerate() {
        assert_eq!(c.peer(), to, "hairpin connection {i}: the peer");
        assert!(
            s.names().contains(&g.backend),
            "answered by {:?}",
            g.backend
        );
        // On itself the flow comes from the VIP; on another backend, from the backend.
        let src = g.peer.ip();
        assert!(
            src == s.vip || src == my_ip,
            "hairpin connection {i}: {} saw {src}",
            g.backend
        );
        let answer = c.exchange(&format!("hp-{i}")).unwrap();
        assert_eq!(answer, format!("{} hp-{i}", g.backend));
        *landed.entry(g.backend).or_default() += 1;
    }
    eprintln!("hairpin: 40 connections from {me} to its own VIP: {landed:?}");
    assert!(
        landed.contains_key(&me),
        "no connection from {me} landed on itself: {landed:?}"
    );
}

#[test]
fn udp_service_and_a_service_with_tcp_and_udp_ports() {
    let h = Host::new();
    let s = setup(&h, 86, 2, &["53:5353/udp"]);
    let mut servers: Vec<Server> = Vec::new();
    for (b, _) in &s.backends {
        servers.push(name_server_udp(b, 5353, b));
        servers.push(name_server_udp(b, 53, "port53"));
    }
    let to = SocketAddr::from((s.vip, 53));
    let names = s.names();
    let client_ip = s.client_ip;
    let answers = in_netns(&s.client, move || {
        (0..10)
            .map(|i| {
                let (answer, from, local) = udp_query(to, &format!("u{i}"));
                assert_eq!(from, to, "UDP answer {i}: its source");
                let f: Vec<&str> = answer.split(' ').collect();
                assert_eq!(f.len(), 3, "{answer:?}");
                assert!(names.iter().any(|n| n == f[0]), "answer {answer:?}");
                assert_eq!(
                    f[1].parse::<SocketAddr>().unwrap(),
                    SocketAddr::from((client_ip, local.port()))
                );
                assert_eq!(f[2], format!("u{i}"));
                f[0].to_owned()
            })
            .collect::<Vec<_>>()
    });
    eprintln!("UDP 53:5353: 10 answers from {answers:?}");

    // Two ports on one VIP: 7000/tcp to 7000, 7000/udp to 7001.
    let mix = h.name("mix");
    let vip2 = add_service(&h, &mix, &s.net, &["7000", "7000:7001/udp"]);
    assert_ne!(vip2, s.vip);
    let inspect: Value = serde_json::from_str(&h.ok(&["service", "inspect", &mix])).unwrap();
    assert_eq!(
        inspect[0]["ports"],
        serde_json::json!([
            {"port": 7000, "target": 7000, "proto": "tcp"},
            {"port": 7000, "target": 7001, "proto": "udp"}
        ])
    );
    for (b, _) in &s.backends {
        h.ok(&["service", "attach", &mix, b]);
        servers.push(name_server_tcp(b, 7000, b));
        servers.push(name_server_udp(b, 7001, b));
    }
    let tcp_to = SocketAddr::from((vip2, 7000));
    for (c, g) in open_many(&s.client, tcp_to, 5) {
        assert_eq!(c.peer(), tcp_to);
        assert!(s.names().contains(&g.backend), "{g:?}");
        assert_eq!(g.local.port(), 7000);
    }
    let answers = in_netns(&s.client, move || {
        (0..5)
            .map(|i| {
                let (answer, from, _) = udp_query(tcp_to, &format!("m{i}"));
                assert_eq!(from, tcp_to);
                answer
            })
            .collect::<Vec<_>>()
    });
    for a in &answers {
        let who = a.split(' ').next().unwrap();
        assert!(s.names().iter().any(|n| n == who), "{a:?}");
    }
    // 7001 is a target, not a published port.
    assert!(
        dial(&s.client, vip2, 7001).is_err(),
        "VIP:7001 is not published and must not connect"
    );
    eprintln!("two-port service {vip2}: TCP 7000 and UDP 7000->7001 answered");
    drop(servers);
}

/// The store's view, the kernel's, and the services.
fn snap(h: &Host) -> Value {
    serde_json::json!({
        "host": h.snapshot(),
        "services": h.json(&["service", "ls"]),
    })
}

fn rejects(h: &Host, args: &[&str], needles: &[&str]) {
    let before = snap(h);
    let err = h.fails(args);
    for n in needles {
        assert!(
            err.contains(n),
            "netctl {args:?}: error {err:?} should mention {n:?}"
        );
    }
    assert_eq!(before, snap(h), "netctl {args:?} changed something");
}

#[test]
fn services_reject_bad_input() {
    let h = Host::new();
    let (good, other) = (h.name("good"), h.name("other"));
    h.ok(&["network", "create", &good, "--subnet", "10.87.0.0/24"]);
    h.ok(&["network", "create", &other, "--subnet", "10.87.1.0/24"]);
    let (a, b, c, d) = (
        h.sandbox("a"),
        h.sandbox("b"),
        h.sandbox("c"),
        h.sandbox("d"),
    );
    assert_eq!(h.connect(&good, &a).to_string(), "10.87.0.2");
    h.connect(&good, &d);
    h.connect(&other, &b);
    let s1 = h.name("s1");
    let vip = add_service(&h, &s1, &good, &["80"]);
    h.ok(&["service", "attach", &s1, &a]);
    let s2 = h.name("s2");
    let nosuch = h.name("nosuch");
    let add = |extra: &[&str]| {
        let mut v = vec!["service", "add", s2.as_str(), "--network", good.as_str()];
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let vip_s = vip.to_string();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        // A duplicate name.
        (
            vec!["service", "add", &s1, "--network", &good, "--port", "81"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            vec![&s1, "exists"],
        ),
        // An unknown network.
        (
            vec!["service", "add", &s2, "--network", &nosuch, "--port", "80"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            vec!["network", &nosuch],
        ),
        // VIPs: outside the subnet, an endpoint's address, another service's VIP, the
        // gateway, not an address; --vip with dnsrr.
        (
            add(&["--port", "80", "--vip", "10.87.5.5"]),
            vec!["vip", "10.87.5.5"],
        ),
        (
            add(&["--port", "80", "--vip", "10.87.0.2"]),
            vec!["vip", "10.87.0.2", &a],
        ),
        (
            add(&["--port", "80", "--vip", &vip_s]),
            vec!["vip", &vip_s, &s1],
        ),
        (
            add(&["--port", "80", "--vip", "10.87.0.1"]),
            vec!["vip", "10.87.0.1"],
        ),
        (add(&["--port", "80", "--vip", "nope"]), vec!["vip", "nope"]),
        (
            add(&["--port", "80", "--mode", "dnsrr", "--vip", "10.87.0.50"]),
            vec!["vip", "10.87.0.50"],
        ),
        (
            add(&["--port", "80", "--mode", "ipvs"]),
            vec!["mode", "ipvs"],
        ),
        // Ports: 0, above 65535 (port and target), a bad protocol, repeated, none.
        (add(&["--port", "0"]), vec!["port", "\"0\""]),
        (add(&["--port", "65536"]), vec!["port", "65536"]),
        (add(&["--port", "80:0"]), vec!["port", "80:0"]),
        (add(&["--port", "80:65536"]), vec!["port", "80:65536"]),
        (add(&["--port", "80/sctp"]), vec!["port", "80/sctp"]),
        (add(&["--port", "http"]), vec!["port", "http"]),
        (
            add(&["--port", "80", "--port", "80"]),
            vec!["port", "80", "repeated"],
        ),
        (
            add(&["--port", "80/tcp", "--port", "80:8080"]),
            vec!["port", "80:8080", "repeated"],
        ),
        (add(&[]), vec!["port"]),
    ];
    for (args, needles) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        rejects(&h, &a, needles);
    }
    // Attach and detach.
    rejects(
        &h,
        &["service", "attach", &s1, &nosuch],
        &["sandbox", &nosuch],
    );
    rejects(
        &h,
        &["service", "attach", &nosuch, &a],
        &["service", &nosuch],
    );
    // b is on another network, c on none.
    rejects(&h, &["service", "attach", &s1, &b], &[&b, &good]);
    rejects(&h, &["service", "attach", &s1, &c], &[&c, &good]);
    rejects(&h, &["service", "attach", &s1, &a], &[&a, &s1, "already"]);
    rejects(&h, &["service", "detach", &s1, &d], &[&d, &s1]);
    rejects(
        &h,
        &["service", "detach", &s1, &nosuch],
        &["sandbox", &nosuch],
    );
    rejects(
        &h,
        &["service", "detach", &nosuch, &a],
        &["service", &nosuch],
    );
    // Removal of an unknown service; inspect of one.
    rejects(&h, &["service", "rm", &nosuch], &["service", &nosuch]);
    rejects(&h, &["service", "inspect", &nosuch], &["service", &nosuch]);

    // And the good ones still work after all that.
    h.ok(&["service", "attach", &s1, &d]);
    h.ok(&["service", "detach", &s1, &d]);
    assert_eq!(h.json(&["service", "ls"]).as_array().unwrap().len(), 1);
}

/// `cmd` is on the PATH.
fn have(cmd: &str) -> bool {
    run("sh", &["-c", &format!("command -v {cmd}")])
        .status
        .success()
}

#[test]
fn no_iptables_nftables_or_ipvs() {
    let h = Host::new();
    let s = setup(&h, 88, 2, &["80", "5353/udp"]);
    let mut servers: Vec<Server> = Vec::new();
    for (b, _) in &s.backends {
        servers.push(name_server_tcp(b, 80, b));
        servers.push(name_server_udp(b, 5353, b));
    }
    // The service carries traffic.
    let to = SocketAddr::from((s.vip, 80));
    assert_eq!(open_many(&s.client, to, 4).len(), 4);
    let udp_to = SocketAddr::from((s.vip, 5353));
    in_netns(&s.client, move || udp_query(udp_to, "x"));

    let vip = s.vip.to_string();
    let mut namespaces = vec![h.netns.clone(), s.client.clone()];
    namespaces.extend(s.names());
    let mut checked = Vec::new();
    for ns in &namespaces {
        for (cmd, args) in [
            ("iptables-save", vec![]),
            ("iptables-legacy-save", vec![]),
            ("nft", vec!["list", "ruleset"]),
        ] {
            // `cargo xtask setup` installs iptables and nftables: these checks must run.
            assert!(
                have(cmd),
                "{cmd} is missing: run `cargo xtask setup` (it installs iptables and nftables)"
            );
            let mut a = vec![cmd];
            a.extend(args);
            let o = exec(ns, &a);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{cmd} in {ns}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                !out.contains(&vip),
                "{cmd} in {ns} mentions the VIP:\n{out}"
            );
            assert!(
                !out.to_ascii_lowercase().contains("dnat"),
                "{cmd} in {ns} holds a DNAT:\n{out}"
            );
            // A namespace this test made holds no rule at all.
            let empty = if cmd == "nft" {
                out.trim().is_empty()
            } else {
                !out.lines().any(|l| l.starts_with("-A "))
            };
            assert!(empty, "{cmd} in {ns} holds rules:\n{out}");
            checked.push(format!("{cmd}@{ns}"));
        }
        // Without the tools, the kernel's own view: no legacy iptables table was made in
        // the namespace, and no netfilter conntrack entry is about the VIP (kernel NAT
        // would track its flows there).
        let o = exec(ns, &["cat", "/proc/net/ip_tables_names"]);
        if o.status.success() {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.trim().is_empty(), "iptables tables in {ns}: {out:?}");
            checked.push(format!("ip_tables_names@{ns}"));
        }
        let o = exec(ns, &["cat", "/proc/net/nf_conntrack"]);
        if o.status.success() {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                !out.contains(&format!("={vip} ")),
                "netfilter conntrack in {ns} tracks the VIP:\n{out}"
            );
            checked.push(format!("nf_conntrack@{ns}"));
        }
        let o = exec(ns, &["cat", "/proc/net/ip_vs"]);
        if o.status.success() {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                !out.lines()
                    .any(|l| l.starts_with("TCP") || l.starts_with("UDP") || l.starts_with("FWM")),
                "/proc/net/ip_vs in {ns} holds services:\n{out}"
            );
            checked.push(format!("ip_vs@{ns}"));
        }
    }
    eprintln!(
        "no iptables/nftables/IPVS: checked {checked:?} (commands absent are skipped: \
         iptables-save {}, nft {}, /proc/net/ip_vs {})",
        have("iptables-save"),
        have("nft"),
        std::path::Path::new("/proc/net/ip_vs").exists()
    );
    drop(servers);
}

#[test]
fn service_rm_removes_the_vip_from_the_data_plane() {
    let h = Host::new();
    let s = setup(&h, 89, 2, &["80"]);
    let _servers: Vec<Server> = s
        .backends
        .iter()
        .map(|(b, _)| name_server_tcp(b, 80, b))
        .collect();
    let to = SocketAddr::from((s.vip, 80));
    assert_eq!(open_many(&s.client, to, 3).len(), 3);
    assert_eq!(h.map_entries("SERVICES"), 1);
    assert_eq!(h.map_entries("VIPS"), 1);
    assert_eq!(h.map_entries("BACKENDS"), 2);

    assert_eq!(h.ok(&["service", "rm", &s.svc]).trim(), s.svc);
    assert!(
        dial(&s.client, s.vip, 80).is_err(),
        "the VIP must not connect after service rm"
    );
    for m in ["SERVICES", "VIPS", "BACKENDS"] {
        assert_eq!(h.map_entries(m), 0, "map {m} after service rm");
    }
    assert_eq!(h.json(&["service", "ls"]), serde_json::json!([]));
    // The backends themselves are still reachable directly.
    let (b1, ip1) = s.backends[0].clone();
    let (_, g) = Conn::open(dial(&s.client, ip1, 80).unwrap()).unwrap();
    assert_eq!(g.backend, b1);
}
