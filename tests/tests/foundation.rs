//! The foundation, end to end: a real agent in a host namespace, real sandboxes, veths,
//! programs and traffic. Needs root.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netctl_tests::{
    Host, Stream, dial, exec, in_netns, listen, payload, ping, repaired, run_ok, transfer,
};

#[test]
fn two_sandboxes_talk_and_other_networks_are_isolated() {
    let h = Host::new();
    let (n1, n2) = (h.name("n1"), h.name("n2"));
    h.ok(&["network", "create", &n1, "--subnet", "10.61.0.0/24"]);
    h.ok(&["network", "create", &n2, "--subnet", "10.62.0.0/24"]);
    let (a, b, c) = (h.sandbox("a"), h.sandbox("b"), h.sandbox("c"));
    let ip_a = h.connect(&n1, &a);
    let ip_b = h.connect(&n1, &b);
    let ip_c = h.connect(&n2, &c);
    assert_eq!(ip_a, Ipv4Addr::new(10, 61, 0, 2));
    assert_eq!(ip_b, Ipv4Addr::new(10, 61, 0, 3));

    // The sandbox side: eth0 with the address, a default route via the gateway.
    let addr =
        String::from_utf8(exec(&a, &["ip", "-4", "-o", "addr", "show", "eth0"]).stdout).unwrap();
    assert!(addr.contains("10.61.0.2/24"), "{addr}");
    let route = String::from_utf8(exec(&a, &["ip", "route", "show", "default"]).stdout).unwrap();
    assert!(route.contains("via 10.61.0.1 dev eth0"), "{route}");

    assert!(ping(&a, ip_b), "a -> b");
    assert!(ping(&b, ip_a), "b -> a");

    // 10 MB over TCP, checked end to end.
    let data = payload(10 * 1024 * 1024, 7);
    let want = crc32fast::hash(&data);
    let l = listen(&b, 5001);
    let (got, n) = transfer(l, &a, ip_b, 5001, data);
    assert_eq!(n, 10 * 1024 * 1024);
    assert_eq!(got, want, "CRC-32 of what b received");

    // Another network reaches neither, and the isolation counter says why.
    let before = h.drops("isolation");
    assert!(!ping(&c, ip_a), "c (other network) must not reach a");
    assert!(!ping(&c, ip_b), "c (other network) must not reach b");
    assert!(!ping(&a, ip_c), "a must not reach c on the other network");
    let _l2 = listen(&b, 5002);
    assert!(
        dial(&c, ip_b, 5002).is_err(),
        "TCP from another network must not connect"
    );
    let after = h.drops("isolation");
    assert!(after >= before + 3, "isolation drops {before} -> {after}");
    // The 10 MB went through the programs (GSO packets: fewer packets than MTU-sized ones,
    // but every byte counted).
    let s = h.json(&["stats"]);
    assert!(
        s["from_endpoints"]["bytes"].as_u64().unwrap() > 10 * 1024 * 1024,
        "{s}"
    );
}

#[test]
fn forged_sources_get_nothing_through() {
    let h = Host::new();
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.63.0.0/24"]);
    let (a, b) = (h.sandbox("a"), h.sandbox("b"));
    let ip_a = h.connect(&n, &a);
    let ip_b = h.connect(&n, &b);
    assert!(ping(&a, ip_b));

    let rx = in_netns(&b, || UdpSocket::bind("0.0.0.0:7000").unwrap());
    rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    // A forged source address: the sandbox adds one and sends from it.
    let forged = Ipv4Addr::new(10, 63, 0, 200);
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &a,
            "ip",
            "addr",
            "add",
            "10.63.0.200/32",
            "dev",
            "eth0",
        ],
    );
    let before_ip = h.drops("spoofed_ip");
    let tx_forged = in_netns(&a, move || UdpSocket::bind((forged, 0)).unwrap());
    for _ in 0..5 {
        tx_forged.send_to(b"forged", (ip_b, 7000)).unwrap();
    }
    // A datagram from the real address after them, on the same path: once it has arrived,
    // anything forged that was going to arrive would have.
    let tx_real = in_netns(&a, move || UdpSocket::bind((ip_a, 0)).unwrap());
    tx_real.send_to(b"real", (ip_b, 7000)).unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    loop {
        let (len, from) = rx.recv_from(&mut buf).expect("the real datagram arrives");
        got.push((buf[..len].to_vec(), from));
        if &buf[..len] == b"real" {
            break;
        }
    }
    assert_eq!(got.len(), 1, "only the real datagram may arrive: {got:?}");
    assert!(h.drops("spoofed_ip") >= before_ip + 5);
    assert!(
        !exec(
            &a,
            &[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                "10.63.0.200",
                &ip_b.to_string()
            ]
        )
        .status
        .success()
    );

    // A forged MAC address: nothing passes, whatever the IP.
    let before_mac = h.drops("spoofed_mac");
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &a,
            "ip",
            "link",
            "set",
            "eth0",
            "address",
            "02:00:00:00:00:99",
        ],
    );
    assert!(!ping(&a, ip_b), "a forged MAC must not get through");
    tx_real
        .send_to(b"real-but-forged-mac", (ip_b, 7000))
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(
        rx.recv_from(&mut buf).is_err(),
        "nothing with a forged MAC arrives"
    );
    assert!(h.drops("spoofed_mac") > before_mac);
}

#[test]
fn fifty_parallel_connects_get_distinct_addresses_and_nothing_leaks() {
    let h = Arc::new(Host::new());
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.64.0.0/24"]);
    let sandboxes: Vec<String> = (0..50).map(|i| h.sandbox(&format!("s{i}"))).collect();

    let connect_all = |h: &Arc<Host>| -> Vec<Ipv4Addr> {
        let threads: Vec<_> = sandboxes
            .iter()
            .map(|s| {
                let (h, n, s) = (h.clone(), n.clone(), s.clone());
                std::thread::spawn(move || h.connect(&n, &s))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };
    let usage = |h: &Host| -> (u64, u64) {
        let v = h.json(&["network", "inspect", &n]);
        (
            v[0]["addresses_used"].as_u64().unwrap(),
            v[0]["endpoints"].as_array().unwrap().len() as u64,
        )
    };

    let first = connect_all(&h);
    let distinct: BTreeSet<_> = first.iter().copied().collect();
    assert_eq!(distinct.len(), 50, "50 distinct addresses: {first:?}");
    assert_eq!(usage(&h), (50, 50));
    // Every endpoint is in the data plane.
    assert_eq!(h.map_entries("IFACES"), 50);

    let threads: Vec<_> = sandboxes
        .iter()
        .map(|s| {
            let (h, n, s) = (h.clone(), n.clone(), s.clone());
            std::thread::spawn(move || h.ok(&["network", "disconnect", &n, &s]))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(usage(&h), (0, 0), "all addresses back after disconnecting");

    let second = connect_all(&h);
    let again: BTreeSet<_> = second.iter().copied().collect();
    assert_eq!(again.len(), 50);
    // Lowest-free allocation: the same 50 addresses, so none leaked.
    assert_eq!(again, distinct, "reconnected set equals the first set");
    assert_eq!(usage(&h), (50, 50));
    // After the churn the kernel equals the desired state: a reconcile finds nothing.
    let report = h.json(&["reconcile"]);
    assert_eq!(repaired(&report), 0, "{report}");
    assert_eq!(h.map_entries("IFACES"), 50);
    // Two of them still talk.
    assert!(ping(&sandboxes[0], second[1]));
}

#[test]
fn sigkill_of_the_agent_does_not_interrupt_a_tcp_stream() {
    let mut h = Host::new();
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.65.0.0/24"]);
    let (a, b) = (h.sandbox("a"), h.sandbox("b"));
    let _ip_a = h.connect(&n, &a);
    let ip_b = h.connect(&n, &b);

    // A stream of known bytes from a to b, checked byte for byte on arrival.
    let stream = Stream::start(&a, &b, ip_b, 6000);
    stream.wait_progress();

    let before = serde_json::json!({
        "networks": h.json(&["network", "ls"]),
        "sandboxes": h.json(&["sandbox", "ls"]),
    });
    let programs_before = h.json(&["status"])["programs"].clone();

    h.kill_agent();
    // No agent at all: the pinned programs keep forwarding.
    stream.wait_progress();
    assert!(
        h.netctl(&["status"]).status.code() != Some(0),
        "the agent is really gone"
    );

    h.start_agent();
    stream.wait_progress();
    stream.finish();

    let after = serde_json::json!({
        "networks": h.json(&["network", "ls"]),
        "sandboxes": h.json(&["sandbox", "ls"]),
    });
    assert_eq!(before, after, "the restarted agent shows the same state");
    let st = h.json(&["status"]);
    assert_eq!(st["agent"]["adopted"], true, "pins adopted, not reloaded");
    assert_eq!(st["programs"], programs_before);
    let last = &st["reconcile"]["last"];
    assert_eq!(
        repaired(last),
        0,
        "nothing to repair after a SIGKILL: {last}"
    );
    // And it works as before: a new endpoint gets a new address, and the count of
    // addresses in use is the live endpoints, no more (moby#27404).
    let c = h.sandbox("c");
    let ip_c = h.connect(&n, &c);
    assert_eq!(ip_c, Ipv4Addr::new(10, 65, 0, 4));
    assert!(ping(&a, ip_c));
    let v = h.json(&["network", "inspect", &n]);
    assert_eq!(v[0]["addresses_used"], 3);
}

#[test]
fn sigkill_during_writes_loses_nothing_acknowledged() {
    let mut h = Host::new();
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.75.0.0/24"]);
    let sandboxes: Vec<String> = (0..40).map(|i| h.sandbox(&format!("s{i}"))).collect();
    // Connect them one after another from another thread, and SIGKILL the agent while it
    // is busy: some connects are acknowledged, one may be cut mid-way, the rest fail.
    let pid = h.agent_pid().unwrap();
    let (socket, list) = (h.socket.clone(), sandboxes.clone());
    let n2 = n.clone();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for s in list {
            let o = std::process::Command::new(netctl_tests::netctl_bin())
                .args(["network", "connect", &n2, &s])
                .env("NETCTL_SOCKET", &socket)
                .output()
                .unwrap();
            if o.status.success() {
                let out = String::from_utf8(o.stdout).unwrap();
                let ip: Ipv4Addr = out.split_whitespace().nth(1).unwrap().parse().unwrap();
                acked.push((s, ip));
            }
        }
        acked
    });
    // Let a few land, then kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = h.json(&["network", "inspect", &n])[0]["addresses_used"]
            .as_u64()
            .unwrap_or(0);
        if used >= 10 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let acked = writer.join().unwrap();
    assert!(
        acked.len() >= 10,
        "some connects were acknowledged: {}",
        acked.len()
    );
    assert!(acked.len() < 40, "the agent died before the end");
    h.kill_agent();
    h.start_agent();

    // Everything acknowledged is there, with its address, and works.
    let v = h.json(&["network", "inspect", &n]);
    let eps = v[0]["endpoints"].as_array().unwrap();
    for (s, ip) in &acked {
        assert!(
            eps.iter()
                .any(|e| e["sandbox"] == s.as_str() && e["ip"] == ip.to_string()),
            "acknowledged endpoint {s} {ip} lost"
        );
    }
    // At most the one connect in flight at the kill may exist without an acknowledgement.
    assert!(
        eps.len() <= acked.len() + 1,
        "{} endpoints, {} acked",
        eps.len(),
        acked.len()
    );
    // No two endpoints share an address, and the kernel matches the store.
    let addrs: BTreeSet<&str> = eps.iter().map(|e| e["ip"].as_str().unwrap()).collect();
    assert_eq!(addrs.len(), eps.len());
    assert_eq!(h.map_entries("IFACES") as usize, eps.len());
    assert!(ping(&acked[0].0, acked[acked.len() - 1].1));
    // The rest connect now, with addresses distinct from the live ones.
    for s in &sandboxes {
        if !eps.iter().any(|e| e["sandbox"] == s.as_str()) {
            h.connect(&n, s);
        }
    }
    let v = h.json(&["network", "inspect", &n]);
    let eps = v[0]["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 40);
    let addrs: BTreeSet<&str> = eps.iter().map(|e| e["ip"].as_str().unwrap()).collect();
    assert_eq!(addrs.len(), 40, "no duplicate address after the crash");
}

#[test]
fn internal_network_stays_internal_across_restart() {
    let mut h = Host::new();
    let (open, internal) = (h.name("open"), h.name("int"));
    h.ok(&["network", "create", &open, "--subnet", "10.66.0.0/24"]);
    h.ok(&[
        "network",
        "create",
        &internal,
        "--subnet",
        "10.67.0.0/24",
        "--internal",
    ]);
    // An address of the host outside every netctl network.
    run_ok(
        "ip",
        &["-n", &h.netns, "addr", "add", "192.0.2.1/32", "dev", "lo"],
    );
    let (a, b, c) = (h.sandbox("a"), h.sandbox("b"), h.sandbox("c"));
    h.connect(&open, &a);
    let ip_b = h.connect(&internal, &b);
    let ip_c = h.connect(&internal, &c);
    // Internal endpoints get no default route (Docker's behaviour); give one by hand to prove
    // the data plane, not the routing table, keeps them in.
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &b,
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.67.0.1",
        ],
    );
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    assert!(ping(&a, outside), "a normal network reaches the host");
    for round in ["before restart", "after restart"] {
        let before = h.drops("internal");
        assert!(!ping(&b, outside), "internal network got out {round}");
        assert!(h.drops("internal") > before, "{round}");
        assert!(ping(&b, ip_c), "inside the internal network {round}");
        if round == "before restart" {
            h.kill_agent();
            h.start_agent();
        }
    }
    let _ = ip_b;
}

#[test]
fn removing_things_removes_them_from_the_kernel() {
    let h = Host::new();
    let n = h.name("n");
    h.ok(&[
        "network",
        "create",
        &n,
        "--subnet",
        "10.68.0.0/24",
        "-o",
        &format!("com.docker.network.bridge.name={}", h.name("br")),
    ]);
    let bridge = h.name("br");
    let links = || run_ok("ip", &["-n", &h.netns, "-o", "link", "show"]);
    assert!(links().contains(&bridge), "the named bridge exists");
    let (a, b) = (h.sandbox("a"), h.sandbox("b"));
    h.connect(&n, &a);
    h.connect(&n, &b);
    assert_eq!(links().matches("master").count(), 2);
    let err = h.fails(&["network", "rm", &n]);
    assert!(err.contains(&n) && err.contains("endpoint"), "{err}");

    h.ok(&["sandbox", "rm", &a]);
    assert!(!std::path::Path::new(&format!("/run/netns/{a}")).exists());
    assert_eq!(links().matches("master").count(), 1, "a's veth is gone");
    h.ok(&["network", "disconnect", &n, &b]);
    assert_eq!(links().matches("master").count(), 0);
    h.ok(&["network", "rm", &n]);
    assert!(!links().contains(&bridge), "the bridge is gone");
    let st = h.json(&["status"]);
    for m in st["maps"].as_array().unwrap() {
        // Arrays always hold all their slots; every hash, LPM and LRU map is empty.
        if !m["kind"].as_str().unwrap().ends_with("array") {
            assert_eq!(m["entries"], 0, "{m}");
        }
    }
    assert_eq!(st["programs"].as_array().unwrap().len(), 0);
}

#[test]
fn reconcile_repairs_drift() {
    let h = Host::new();
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.69.0.0/24"]);
    let (a, b) = (h.sandbox("a"), h.sandbox("b"));
    let ip_a = h.connect(&n, &a);
    let ip_b = h.connect(&n, &b);
    // Break things behind the agent's back: b's address, a's link pins, the bridge's
    // address.
    run_ok(
        "ip",
        &["netns", "exec", &b, "ip", "addr", "flush", "dev", "eth0"],
    );
    let links_dir = h.pin_dir.join("v1/links");
    for e in std::fs::read_dir(&links_dir).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    assert!(!ping(&a, ip_b));
    let report: serde_json::Value = h.json(&["reconcile"]);
    assert!(
        report["netlink"]["updated"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(report["links"]["added"], 4 / 2, "{report}");
    assert!(ping(&a, ip_b) && ping(&b, ip_a));
    let again: serde_json::Value = h.json(&["reconcile"]);
    assert_eq!(repaired(&again), 0, "a second pass finds nothing: {again}");
}

#[test]
fn uplink_program_bpftool_and_down() {
    let mut h = Host::with_uplink();
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.76.0.0/24"]);
    let a = h.sandbox("a");
    let ip_a = h.connect(&n, &a);

    // The uplink carries its program, and status says where everything is attached.
    let st = h.json(&["status"]);
    let progs = st["programs"].as_array().unwrap();
    assert!(
        progs.iter().any(|p| p["program"] == "uplink_ingress"
            && p["interface"] == h.uplink().as_str()
            && p["hook"] == "tcx/ingress"),
        "{progs:?}"
    );
    assert_eq!(progs.len(), 3, "uplink + two per endpoint: {progs:?}");
    let before = h.json(&["stats"])["uplink"]["packets"].as_u64().unwrap();
    assert!(ping(&h.name("peer"), Ipv4Addr::new(192, 0, 2, 1)));
    assert!(h.json(&["stats"])["uplink"]["packets"].as_u64().unwrap() > before);

    // bpftool reads the pinned maps with their BTF: named fields, addresses as bytes.
    let pin = h.pin_dir.join("v1/maps/IFACES");
    let dump = run_ok(
        "bpftool",
        &["-j", "map", "dump", "pinned", pin.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    // With -j, bpftool gives the raw bytes and, from the BTF, the "formatted" view.
    let entry = &v[0]["formatted"]["value"];
    assert_eq!(entry["ip"], serde_json::json!(ip_a.octets()), "{dump}");
    assert_eq!(entry["net_id"], 1, "{dump}");
    let prog = h.pin_dir.join("v1/progs/from_endpoint");
    let info = run_ok(
        "bpftool",
        &["-j", "prog", "show", "pinned", prog.to_str().unwrap()],
    );
    assert!(info.contains("\"btf_id\""), "programs carry BTF: {info}");

    // down: nothing of netctl is left in the kernel, and the agent is gone.
    let out = h.ok(&["down"]);
    assert!(out.contains("down"), "{out}");
    let links = run_ok("ip", &["-n", &h.netns, "-o", "link", "show"]);
    assert!(
        !links.contains("netctl1") && !links.contains("master"),
        "{links}"
    );
    assert!(!std::path::Path::new(&format!("/run/netns/{a}")).exists());
    assert!(!h.pin_dir.exists(), "pins removed");
    assert!(!h.socket.exists(), "socket removed");
    assert!(h.netctl(&["status"]).status.code() != Some(0));
    h.kill_agent();

    // The store kept the desired state: the next agent builds it all again.
    h.start_agent();
    let b = h.sandbox("b");
    let ip_b = h.connect(&n, &b);
    assert!(ping(&b, ip_a), "a is back, with its address");
    assert!(ping(&a, ip_b));
}

#[test]
fn a_new_binary_replaces_pinned_programs_without_interrupting_traffic() {
    let mut h = Host::new();
    let n = h.name("n");
    h.ok(&["network", "create", &n, "--subnet", "10.77.0.0/24"]);
    let (a, b) = (h.sandbox("a"), h.sandbox("b"));
    h.connect(&n, &a);
    let ip_b = h.connect(&n, &b);
    let stream = Stream::start(&a, &b, ip_b, 6001);
    stream.wait_progress();

    // Stand-in for an upgrade: while no agent runs, the pinned from_endpoint is a program
    // that is not this binary's (another of ours, with another tag). The links keep running
    // the program they were attached to.
    h.kill_agent();
    let progs = h.pin_dir.join("v1/progs");
    let pinned = progs.join("from_endpoint");
    let prog_id = |path: &std::path::Path| -> u64 {
        let out = run_ok(
            "bpftool",
            &["-j", "prog", "show", "pinned", path.to_str().unwrap()],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let old_id = prog_id(&pinned);
    std::fs::remove_file(&pinned).unwrap();
    run_ok(
        "bpftool",
        &[
            "prog",
            "pin",
            "pinned",
            progs.join("uplink_ingress").to_str().unwrap(),
            pinned.to_str().unwrap(),
        ],
    );
    stream.wait_progress();

    // The new agent pins this binary's program and moves every ingress link to it.
    h.start_agent();
    stream.wait_progress();
    let new_id = prog_id(&pinned);
    assert_ne!(new_id, old_id, "a freshly loaded program");
    let links = h.pin_dir.join("v1/links");
    for e in std::fs::read_dir(&links).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let out = run_ok(
            "bpftool",
            &["-j", "link", "show", "pinned", e.path().to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if name.ends_with("_in") {
            assert_eq!(v["prog_id"].as_u64(), Some(new_id), "{name}: {out}");
        }
    }
    let st = h.json(&["status"]);
    assert_eq!(st["reconcile"]["last"]["links"]["updated"], 2, "{st}");
    stream.finish();
    // And the new program does its job.
    let before = h.drops("spoofed_ip");
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &a,
            "ip",
            "addr",
            "add",
            "10.77.0.99/32",
            "dev",
            "eth0",
        ],
    );
    assert!(
        !exec(
            &a,
            &[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                "10.77.0.99",
                &ip_b.to_string()
            ]
        )
        .status
        .success()
    );
    assert!(h.drops("spoofed_ip") > before);
}
