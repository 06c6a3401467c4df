//! The embedded DNS server of each network, end to end: sandboxes resolve through the
//! resolv.conf netctl writes for them, names of other networks are NXDOMAIN, dnsrr and
//! `tasks.NAME` rotate, and other names are forwarded upstream. Needs root.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use netctl::dns::{DnsServer, Records};
use netctl_tests::{Host, exec, in_netns};

/// Asks `server` for the A records of `name` from inside `sandbox`; returns the response
/// code, the addresses in answer order and the smallest TTL.
fn query(sandbox: &str, server: Ipv4Addr, name: &str) -> (ResponseCode, Vec<Ipv4Addr>, u32) {
    let name = name.to_owned();
    let sock = in_netns(sandbox, || UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut m = Message::new(0x4e54, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(&name).unwrap(),
        RecordType::A,
    ));
    sock.send_to(&m.to_vec().unwrap(), SocketAddr::from((server, 53)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("an answer from the DNS server");
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x4e54);
    let mut ttl = u32::MAX;
    let addrs = r
        .answers
        .iter()
        .filter_map(|rec| {
            ttl = ttl.min(rec.ttl);
            match &rec.data {
                RData::A(a) => Some(a.0),
                _ => None,
            }
        })
        .collect();
    (r.metadata.response_code, addrs, ttl)
}

/// What `getent ahostsv4 NAME` prints inside the sandbox (through its resolv.conf).
fn getent(sandbox: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
    let o = exec(sandbox, &["getent", "ahostsv4", name]);
    if !o.status.success() {
        return None;
    }
    let mut v: Vec<Ipv4Addr> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    v.sort();
    v.dedup();
    Some(v)
}

/// Polls `f` until it returns `want` (DNS follows service changes within 200 ms); at most
/// 5 s, then asserts.
fn eventually<T: PartialEq + std::fmt::Debug>(what: &str, want: T, f: impl Fn() -> T) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = f();
        if got == want || std::time::Instant::now() > deadline {
            assert_eq!(got, want, "{what}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn names_services_isolation_rotation_and_forwarding() {
    let h = Host::with_args(&["--dns-upstream", "127.0.0.1:5300"]);
    // The upstream: a stub server on the host's loopback that knows one outside name.
    let mut outside = Records::default();
    outside
        .names
        .insert("outside.example".into(), vec![Ipv4Addr::new(192, 0, 2, 7)]);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let netns = h.netns.clone();
    let stub = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let srv = DnsServer::start(
                    "127.0.0.1:5300".parse().unwrap(),
                    "127.0.0.0/8".parse().unwrap(),
                    vec![],
                    outside,
                )
                .await
                .expect("stub upstream");
                tokio::task::spawn_blocking(move || stop_rx.recv())
                    .await
                    .ok();
                srv.stop().await;
            });
        })
    });

    let (n1, n2) = (h.name("n1"), h.name("n2"));
    h.ok(&["network", "create", &n1, "--subnet", "10.95.0.0/24"]);
    h.ok(&["network", "create", &n2, "--subnet", "10.96.0.0/24"]);
    let (a, b, c) = (h.sandbox("a"), h.sandbox("b"), h.sandbox("c"));
    let ip_a = h.connect(&n1, &a);
    let out = h.ok(&["network", "connect", &n1, &b, "--alias", "db"]);
    let ip_b: Ipv4Addr = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ip_c = h.connect(&n2, &c);
    let web = h.ok(&["service", "add", "web", "--network", &n1, "--port", "80"]);
    let vip: Ipv4Addr = web.split_whitespace().nth(1).unwrap().parse().unwrap();
    h.ok(&["service", "add", "rr", "--network", &n1, "--mode", "dnsrr"]);
    let other = h.ok(&["service", "add", "other", "--network", &n2, "--port", "80"]);
    let vip_other: Ipv4Addr = other.split_whitespace().nth(1).unwrap().parse().unwrap();
    for s in ["web", "rr"] {
        h.ok(&["service", "attach", s, &a]);
        h.ok(&["service", "attach", s, &b]);
    }
    let (gw1, gw2) = (Ipv4Addr::new(10, 95, 0, 1), Ipv4Addr::new(10, 96, 0, 1));

    // The sandbox's resolver is its network's gateway.
    let conf = std::fs::read_to_string(format!("/etc/netns/{a}/resolv.conf")).unwrap();
    assert!(conf.contains("nameserver 10.95.0.1"), "{conf}");

    // Through resolv.conf, as a program in the sandbox resolves.
    let mut both = vec![ip_a, ip_b];
    both.sort();
    eventually("rr has both backends", Some(both.clone()), || {
        getent(&a, "rr")
    });
    assert_eq!(getent(&a, "web"), Some(vec![vip]), "service name -> VIP");
    assert_eq!(getent(&a, &b), Some(vec![ip_b]), "sandbox name");
    assert_eq!(getent(&a, "db"), Some(vec![ip_b]), "alias");
    assert_eq!(getent(&a, "tasks.web"), Some(both.clone()), "tasks.NAME");
    assert_eq!(getent(&a, "rr"), Some(both.clone()), "dnsrr -> backends");
    assert_eq!(
        getent(&a, "outside.example"),
        Some(vec![Ipv4Addr::new(192, 0, 2, 7)]),
        "forwarded upstream"
    );

    // Answers are short-lived and dnsrr rotates.
    let (rc, addrs, ttl) = query(&a, gw1, "web");
    assert_eq!((rc, addrs), (ResponseCode::NoError, vec![vip]));
    assert!(ttl <= 10, "TTL {ttl}");
    let firsts: Vec<Ipv4Addr> = (0..4).map(|_| query(&a, gw1, "rr").1[0]).collect();
    assert!(
        firsts.contains(&ip_a) && firsts.contains(&ip_b),
        "dnsrr rotates: {firsts:?}"
    );

    // Another network: its own names only.
    assert_eq!(query(&c, gw2, "other").1, vec![vip_other]);
    for name in ["web", "rr", "tasks.web", a.as_str(), "db"] {
        assert_eq!(
            query(&c, gw2, name).0,
            ResponseCode::NXDomain,
            "{name} from the other network"
        );
    }
    assert_eq!(getent(&c, "web"), None);
    assert_eq!(getent(&c, &c), Some(vec![ip_c]));

    // A change shows at once.
    h.ok(&["service", "detach", "rr", &b]);
    eventually("rr after the detach", vec![ip_a], || query(&a, gw1, "rr").1);
    h.ok(&["service", "rm", "web"]);
    // Nobody knows "web" now: it goes upstream, which has no answer for it either.
    eventually("web after its removal", Vec::new(), || {
        query(&a, gw1, "web").1
    });

    stop_tx.send(()).unwrap();
    stub.join().unwrap();
}
