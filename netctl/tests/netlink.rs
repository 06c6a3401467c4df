//! Integration test of netctl::netlink. Needs root; works only inside namespaces it creates
//! (a "host" namespace for the bridge and the host side of the veths, two sandboxes).

use std::net::Ipv4Addr;
use std::process::Command;

use ipnet::Ipv4Net;
use netctl::netlink::{
    Netlink, VethSpec, delete_netns, ensure_netns, in_netns, list_netns, netns_exists,
};

/// Deletes the test namespaces on drop, so a failing test leaves nothing behind
/// (deleting a namespace destroys the bridge and veths in it).
struct Guard(Vec<String>);

impl Drop for Guard {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn ip_ok(args: &[&str]) -> String {
    let (ok, out) = ip(args);
    assert!(ok, "ip {args:?} failed: {out}");
    out
}

fn ping(from: &str, to: Ipv4Addr) -> bool {
    Command::new("ip")
        .args(["netns", "exec", from, "ping", "-c1", "-W2", &to.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run ping")
        .success()
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the agent does for an endpoint: ensure the pair, then bring the host side up.
async fn ensure(nl: &Netlink, spec: &VethSpec) -> (u32, bool) {
    let (idx, changed) = nl.ensure_veth(spec).await.unwrap();
    let up = nl.ensure_up(&spec.host_ifname).await.unwrap();
    (idx, changed || up)
}

#[tokio::test]
async fn bridge_veths_and_repairs() {
    let pid = std::process::id();
    let host = format!("nltst{pid}h");
    let sa = format!("nltst{pid}a");
    let sb = format!("nltst{pid}b");
    let _guard = Guard(vec![sa.clone(), sb.clone(), host.clone()]);

    // Namespaces.
    for n in [&host, &sa, &sb] {
        assert!(!netns_exists(n));
        assert!(ensure_netns(n).await.unwrap(), "{n} created");
        assert!(netns_exists(n));
        assert!(!ensure_netns(n).await.unwrap(), "{n} unchanged");
        assert!(ip_ok(&["-n", n, "link", "show", "lo"]).contains("UP"));
    }
    let listed = list_netns();
    assert!([&host, &sa, &sb].iter().all(|n| listed.contains(n)));

    // Errors name the object.
    let e = in_netns(&format!("nltst{pid}none"), || async {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&format!("nltst{pid}none")), "{e}");

    let (h, a, b) = (host.clone(), sa.clone(), sb.clone());
    in_netns(&host, move || async move { body(pid, &h, &a, &b).await })
        .await
        .unwrap();

    for n in [&host, &sa, &sb] {
        delete_netns(n).await.unwrap();
        assert!(!netns_exists(n));
        delete_netns(n).await.unwrap();
    }
    let listed = list_netns();
    assert!([&host, &sa, &sb].iter().all(|n| !listed.contains(n)));
}

/// Runs with the thread inside the "host" namespace.
async fn body(pid: u32, host: &str, sa: &str, sb: &str) {
    let x = (pid % 250) as u8;
    let br = format!("nlb{pid}");
    let gw = Ipv4Addr::new(10, 201, x, 1);
    let gw_net = Ipv4Net::new(gw, 24).unwrap();
    let subnet: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(10, 201, x, 0), 24).unwrap();
    let nl = Netlink::new().await.unwrap();

    // Bridge.
    assert_eq!(nl.link_index(&br).await.unwrap(), None);
    let (br_idx, changed) = nl.ensure_bridge(&br, gw_net).await.unwrap();
    assert!(changed);
    assert_eq!(
        nl.ensure_bridge(&br, gw_net).await.unwrap(),
        (br_idx, false)
    );
    assert_eq!(nl.link_index(&br).await.unwrap(), Some(br_idx));
    assert!(nl.link_names().await.unwrap().contains(&br));
    let out = ip_ok(&["-n", host, "addr", "show", "dev", &br]);
    assert!(out.contains(&format!("inet {gw_net} ")), "{out}");
    assert!(out.contains("UP"), "{out}");
    assert!(!out.contains("inet6"), "ipv6 should be disabled: {out}");
    // A foreign address on the bridge is removed.
    ip_ok(&["-n", host, "addr", "add", "10.202.0.1/24", "dev", &br]);
    assert_eq!(nl.ensure_bridge(&br, gw_net).await.unwrap(), (br_idx, true));
    let out = ip_ok(&["-n", host, "-4", "addr", "show", "dev", &br]);
    assert!(!out.contains("10.202.0.1"), "{out}");
    // Bridge down is repaired.
    ip_ok(&["-n", host, "link", "set", &br, "down"]);
    assert_eq!(nl.ensure_bridge(&br, gw_net).await.unwrap(), (br_idx, true));

    // Host prefixes.
    let p = nl.host_prefixes(&[]).await.unwrap();
    assert!(p.contains(&subnet), "{p:?}");
    assert!(!p.iter().any(|n| n.prefix_len() == 0), "{p:?}");
    let p = nl.host_prefixes(std::slice::from_ref(&br)).await.unwrap();
    assert!(!p.contains(&subnet), "{p:?}");

    // Veths.
    let spec_a = VethSpec {
        host_ifname: format!("nlva{pid}"),
        bridge: br.clone(),
        netns: sa.to_string(),
        ifname: "eth1".into(),
        address: Ipv4Net::new(Ipv4Addr::new(10, 201, x, 2), 24).unwrap(),
        mac: [0x02, 0x42, 0x0a, 0xc9, x, 2],
        gateway: Some(gw),
    };
    let spec_b = VethSpec {
        host_ifname: format!("nlvb{pid}"),
        bridge: br.clone(),
        netns: sb.to_string(),
        ifname: "eth0".into(),
        address: Ipv4Net::new(Ipv4Addr::new(10, 201, x, 3), 24).unwrap(),
        mac: [0x02, 0x42, 0x0a, 0xc9, x, 3],
        gateway: Some(gw),
    };
    // A new pair's host side stays down until the caller says so.
    let (ia, changed) = nl.ensure_veth(&spec_a).await.unwrap();
    assert!(changed);
    let out = ip_ok(&["-n", host, "link", "show", &spec_a.host_ifname]);
    assert!(out.contains("state DOWN"), "{out}");
    assert!(nl.ensure_up(&spec_a.host_ifname).await.unwrap());
    assert!(!nl.ensure_up(&spec_a.host_ifname).await.unwrap());
    let (ib, changed) = ensure(&nl, &spec_b).await;
    assert!(changed);
    let mut with_prefix = nl.links_with_prefix("nlv").await.unwrap();
    with_prefix.sort();
    assert_eq!(
        with_prefix,
        vec![spec_a.host_ifname.clone(), spec_b.host_ifname.clone()]
    );

    let check = |spec: &VethSpec| {
        let out = ip_ok(&["-n", &spec.netns, "addr", "show", "dev", &spec.ifname]);
        assert!(out.contains(&format!("inet {} ", spec.address)), "{out}");
        assert!(out.contains(&mac_str(spec.mac)), "{out}");
        assert!(out.contains("UP"), "{out}");
        assert!(!out.contains("inet6"), "ipv6 should be disabled: {out}");
        let out = ip_ok(&["-n", &spec.netns, "route", "show", "default"]);
        assert!(
            out.contains(&format!("default via {gw} dev {}", spec.ifname)),
            "{out}"
        );
        let out = ip_ok(&["-n", host, "link", "show", &spec.host_ifname]);
        assert!(out.contains(&format!("master {br}")), "{out}");
        assert!(out.contains("state UP"), "{out}");
        // The temporary peer name is gone everywhere.
        let tmp = format!(
            "ncp{}",
            &spec.host_ifname[spec.host_ifname.len().saturating_sub(12)..]
        );
        assert!(!ip(&["-n", host, "link", "show", &tmp]).0);
        assert!(!ip(&["-n", &spec.netns, "link", "show", &tmp]).0);
    };
    check(&spec_a);
    check(&spec_b);
    assert!(ping(sa, spec_b.address.addr()), "a -> b");
    assert!(ping(sb, spec_a.address.addr()), "b -> a");
    assert!(ping(sa, gw), "a -> gateway");

    // Idempotent.
    assert_eq!(ensure(&nl, &spec_a).await, (ia, false));
    assert_eq!(ensure(&nl, &spec_b).await, (ib, false));

    // Repairs: address flushed; default route deleted; host side detached and down;
    // wrong MAC; extra address.
    ip_ok(&["-n", sa, "addr", "flush", "dev", "eth1"]);
    assert_eq!(ensure(&nl, &spec_a).await, (ia, true));
    ip_ok(&["-n", sb, "route", "del", "default"]);
    assert_eq!(ensure(&nl, &spec_b).await, (ib, true));
    ip_ok(&["-n", host, "link", "set", &spec_a.host_ifname, "nomaster"]);
    ip_ok(&["-n", host, "link", "set", &spec_a.host_ifname, "down"]);
    assert_eq!(ensure(&nl, &spec_a).await, (ia, true));
    ip_ok(&[
        "-n",
        sb,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:00:00:99",
    ]);
    ip_ok(&["-n", sb, "addr", "add", "10.203.0.9/24", "dev", "eth0"]);
    assert_eq!(ensure(&nl, &spec_b).await, (ib, true));
    assert!(!ip_ok(&["-n", sb, "addr", "show", "dev", "eth0"]).contains("10.203.0.9"));
    check(&spec_a);
    check(&spec_b);
    assert!(ping(sa, spec_b.address.addr()), "a -> b after repairs");

    // Peer gone from the sandbox (moved away): the pair is recreated.
    ip_ok(&[
        "-n", sa, "link", "set", "eth1", "netns", host, "name", "strayp",
    ]);
    let (ia2, changed) = ensure(&nl, &spec_a).await;
    assert!(changed);
    assert_ne!(ia2, 0);
    assert!(
        !ip(&["-n", host, "link", "show", "strayp"]).0,
        "stray peer deleted"
    );
    check(&spec_a);
    assert!(ping(sa, spec_b.address.addr()), "a -> b after recreate");
    assert_eq!(ensure(&nl, &spec_a).await, (ia2, false));

    // Failure paths leave nothing behind and name the object.
    let bad = VethSpec {
        host_ifname: format!("nlvc{pid}"),
        bridge: format!("nlnobr{pid}"),
        ..spec_a.clone()
    };
    let e = nl.ensure_veth(&bad).await.unwrap_err();
    assert!(e.to_string().contains(&bad.host_ifname), "{e}");
    // Sandbox interface name taken by a non-veth link: creation fails, pair is deleted.
    ip_ok(&["-n", sb, "link", "add", "eth7", "type", "bridge"]);
    let bad = VethSpec {
        host_ifname: format!("nlvc{pid}"),
        ifname: "eth7".into(),
        ..spec_b.clone()
    };
    let e = nl.ensure_veth(&bad).await.unwrap_err();
    assert!(e.to_string().contains("eth7"), "{e}");
    assert_eq!(nl.link_index(&bad.host_ifname).await.unwrap(), None);
    assert!(!ip_ok(&["-n", sb, "link", "show"]).contains("ncp"));

    // Deletion.
    nl.delete_link(&spec_a.host_ifname).await.unwrap();
    nl.delete_link(&spec_b.host_ifname).await.unwrap();
    nl.delete_link(&spec_b.host_ifname).await.unwrap();
    assert!(!ip(&["-n", sa, "link", "show", "eth1"]).0);
    assert!(!ip(&["-n", sb, "link", "show", "eth0"]).0);
    assert!(nl.links_with_prefix("nlv").await.unwrap().is_empty());
    nl.delete_link(&br).await.unwrap();
    assert_eq!(nl.link_index(&br).await.unwrap(), None);
}
