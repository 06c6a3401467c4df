//! The Docker plugin's HTTP handlers against a real agent, without Docker: each test plays
//! dockerd's part (the calls libnetwork makes, in its order, and the moving of the peer
//! into the container's namespace) over the plugin's unix socket.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use netctl_tests::{Host, exec, ping, run_ok};
use serde_json::{Value, json};

/// The plugin's socket path; the file is removed on drop (an agent killed, or stopped by
/// the host's drop, may leave it behind).
struct Sock(PathBuf);

impl std::ops::Deref for Sock {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A host whose agent serves the plugin under a name of this test (and asks a dockerd that
/// does not exist for names, so Docker networks keep their `docker-<id>` names).
fn plugin_host() -> (Host, Sock) {
    plugin_host_with(&[])
}

/// [`plugin_host`] whose agent gets `extra` arguments too.
fn plugin_host_with(extra: &[&str]) -> (Host, Sock) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let probe = format!(
        "ntp{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let mut args = vec![
        "--docker-plugin",
        &probe,
        "--docker-host",
        "/nonexistent/docker.sock",
    ];
    args.extend_from_slice(extra);
    let h = Host::with_args(&args);
    (
        h,
        Sock(PathBuf::from(format!("/run/docker/plugins/{probe}.sock"))),
    )
}

/// `netctl KIND inspect NAME` as one object.
fn inspect(h: &Host, kind: &str, name: &str) -> Value {
    let v = h.json(&[kind, "inspect", name]);
    if v.is_array() { v[0].clone() } else { v }
}

fn inspect_network(h: &Host, name: &str) -> Value {
    inspect(h, "network", name)
}

/// One plugin call as dockerd makes it (POST, no content type); returns (status, body).
fn call_raw(sock: &PathBuf, http: &str, method: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    write!(
        s,
        "{http} /{method} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status: u16 = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/vnd.docker.plugins.v1+json"),
        "{method}: answer without the plugin content type: {head}"
    );
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method}: answer is not JSON ({e}): {body:?}"));
    (status, v)
}

fn call(sock: &PathBuf, method: &str, body: Value) -> Value {
    let (status, v) = call_raw(sock, "POST", method, &body.to_string());
    assert_eq!(status, 200, "{method} {body}: {v}");
    assert!(v.get("Err").is_none(), "{method}: {v}");
    v
}

/// A call that must fail in Docker's error shape; returns the error text.
fn call_err(sock: &PathBuf, method: &str, body: &str) -> String {
    let (status, v) = call_raw(sock, "POST", method, body);
    assert!(
        status >= 400,
        "{method} {body}: expected an error, got {status} {v}"
    );
    let err = v["Err"]
        .as_str()
        .unwrap_or_else(|| panic!("{method}: no Err in {v}"));
    assert!(
        !err.contains('\n'),
        "{method}: error must be one line: {err:?}"
    );
    err.to_string()
}

const NET_ID: &str = "48e996a4be6909b97e0b30ca8da8cf0a2e64c5d481e8a0b963c585115fa73017";
const EP_ID: &str = "573f0be318cc087adfbcb4eaaea7c189f9b41384a936eb1b36eb88f7f612bbc4";

/// RequestPool, gateway, CreateNetwork as `docker network create -d P --ipam-driver P
/// --subnet 10.81.0.0/24 --ip-range 10.81.0.128/25` makes them. Returns the pool id.
fn create_network(sock: &PathBuf) -> String {
    let pool = call(
        sock,
        "IpamDriver.RequestPool",
        json!({"AddressSpace": "netctl-local", "Pool": "10.81.0.0/24",
               "SubPool": "10.81.0.128/25", "Options": {}, "V6": false}),
    );
    let pool_id = pool["PoolID"].as_str().unwrap().to_string();
    assert_eq!(pool["Pool"], "10.81.0.0/24");
    let gw = call(
        sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "",
               "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
    );
    assert_eq!(gw["Address"], "10.81.0.1/24");
    call(
        sock,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": NET_ID,
               "Options": {"com.docker.network.enable_ipv6": false,
                           "com.docker.network.generic": {}},
               "IPv4Data": [{"AddressSpace": "netctl-local", "Pool": "10.81.0.0/24",
                             "Gateway": "10.81.0.1/24", "AuxAddresses": {}}],
               "IPv6Data": []}),
    );
    pool_id
}

#[test]
fn activate_and_capabilities() {
    let (_h, sock) = plugin_host();
    let v = call(&sock, "Plugin.Activate", json!({}));
    assert_eq!(v["Implements"], json!(["NetworkDriver", "IpamDriver"]));
    let v = call(&sock, "NetworkDriver.GetCapabilities", json!({}));
    assert_eq!(v["Scope"], "local");
    let v = call(&sock, "IpamDriver.GetCapabilities", json!({}));
    assert_eq!(v["RequiresMACAddress"], false);
    let v = call(&sock, "IpamDriver.GetDefaultAddressSpaces", json!({}));
    assert_eq!(v["LocalDefaultAddressSpace"], "netctl-local");
    // Docker sends some calls with no body at all.
    let (status, v) = call_raw(&sock, "POST", "NetworkDriver.GetCapabilities", "");
    assert_eq!(status, 200, "{v}");
    for m in ["NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete"] {
        call(&sock, m, json!({"DiscoveryType": 1, "DiscoveryData": {}}));
    }
}

/// Malformed JSON, unknown calls, wrong methods and bad values: Docker's error shape, one
/// line naming the field and value, and nothing changed in the store or the kernel.
#[test]
fn bad_input_gets_docker_errors_and_changes_nothing() {
    let (h, sock) = plugin_host();
    let before = h.snapshot();

    let e = call_err(&sock, "NetworkDriver.CreateNetwork", "{not json");
    assert!(
        e.contains("NetworkDriver.CreateNetwork: malformed request"),
        "{e}"
    );
    let e = call_err(&sock, "NetworkDriver.CreateNetwork", "[1,2]");
    assert!(e.contains("malformed request"), "{e}");
    let e = call_err(&sock, "IpamDriver.RequestPool", r#"{"Pool": 5}"#);
    assert!(e.contains("malformed request"), "{e}");
    let e = call_err(&sock, "NetworkDriver.NoSuchCall", "{}");
    assert!(
        e.contains("NetworkDriver.NoSuchCall: not implemented"),
        "{e}"
    );
    let (status, v) = call_raw(&sock, "GET", "Plugin.Activate", "");
    assert_eq!(status, 405, "{v}");
    assert!(v["Err"].as_str().unwrap().contains("POST"), "{v}");

    let e = call_err(
        &sock,
        "IpamDriver.RequestPool",
        r#"{"Pool": "10.81.0.0/33"}"#,
    );
    assert!(e.contains("Pool") && e.contains("10.81.0.0/33"), "{e}");
    let e = call_err(
        &sock,
        "IpamDriver.RequestPool",
        r#"{"Pool": "10.81.0.0/24", "V6": true}"#,
    );
    assert!(e.contains("V6"), "{e}");
    let e = call_err(
        &sock,
        "IpamDriver.RequestPool",
        r#"{"Pool": "10.81.0.0/24", "SubPool": "10.82.0.0/25"}"#,
    );
    assert!(e.contains("SubPool") && e.contains("10.82.0.0/25"), "{e}");
    let e = call_err(
        &sock,
        "IpamDriver.RequestAddress",
        r#"{"PoolID": "netctl/10.9.9.0/24", "Address": ""}"#,
    );
    assert!(e.contains("pool \"netctl/10.9.9.0/24\" not found"), "{e}");
    let e = call_err(&sock, "IpamDriver.RequestAddress", r#"{"Address": ""}"#);
    assert!(e.contains("PoolID: missing"), "{e}");

    let e = call_err(
        &sock,
        "NetworkDriver.CreateNetwork",
        &json!({"NetworkID": NET_ID, "IPv4Data": [{"Pool": "10.81.0.0/24", "Gateway": "10.99.0.1/24"}]})
            .to_string(),
    );
    assert!(e.contains("gateway") && e.contains("10.99.0.1"), "{e}");
    let e = call_err(
        &sock,
        "NetworkDriver.CreateNetwork",
        &json!({"NetworkID": NET_ID, "IPv4Data": [{"Pool": "10.81.0.0/24"}],
                "IPv6Data": [{"Pool": "fd00::/64"}]})
        .to_string(),
    );
    assert!(e.contains("IPv6Data"), "{e}");
    let e = call_err(
        &sock,
        "NetworkDriver.CreateNetwork",
        &json!({"NetworkID": NET_ID, "IPv4Data": [{"Pool": "10.81.0.0/24"}],
                "Options": {"com.docker.network.generic": {"com.docker.network.bridge.name": "a/b"}}})
        .to_string(),
    );
    assert!(e.contains("com.docker.network.bridge.name=a/b"), "{e}");
    let e = call_err(
        &sock,
        "NetworkDriver.CreateEndpoint",
        &json!({"NetworkID": NET_ID, "EndpointID": EP_ID, "Interface": {"Address": "10.81.0.5/24"}})
            .to_string(),
    );
    assert!(e.contains("network") && e.contains("not found"), "{e}");

    assert_eq!(h.snapshot(), before, "bad plugin calls changed something");
    // The agent is still serving.
    call(&sock, "Plugin.Activate", json!({}));
}

/// The whole life of a Docker network and a container on it, with this test doing what
/// dockerd does: the container's traffic goes through the same data plane as a netctl
/// sandbox's, and removal leaves nothing in the kernel.
#[test]
fn network_endpoint_join_leave_delete() {
    let (h, sock) = plugin_host();
    let maps_before: Vec<u64> = ["SUBNETS", "ENDPOINTS", "IFACES"]
        .iter()
        .map(|m| h.map_entries(m))
        .collect();
    let pool_id = create_network(&sock);
    let net = format!("docker-{}", &NET_ID[..12]);
    let nv = inspect_network(&h, &net);
    assert_eq!(nv["docker"]["id"], NET_ID, "{nv}");
    assert_eq!(nv["ip_range"], "10.81.0.128/25", "the pool's range: {nv}");

    // The address Docker asks for, then the endpoint with it.
    let a = call(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "", "Options": null}),
    );
    assert_eq!(a["Address"], "10.81.0.128/24", "first of the ip-range");
    let ep = call(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID,
               "Interface": {"Address": "10.81.0.128/24", "AddressIPv6": "", "MacAddress": ""},
               "Options": {}}),
    );
    assert_eq!(ep["Interface"]["MacAddress"], "02:42:0a:51:00:80");
    // A retry of the same call is harmless.
    call(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID,
               "Interface": {"Address": "10.81.0.128/24"}}),
    );
    let info = call(
        &sock,
        "NetworkDriver.EndpointOperInfo",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID}),
    );
    assert_eq!(info["Value"]["ip"], "10.81.0.128");

    // The container's namespace (dockerd would make it under its exec root).
    let cont = h.name("c");
    run_ok("ip", &["netns", "add", &cont]);
    let j = call(
        &sock,
        "NetworkDriver.Join",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID,
               "SandboxKey": format!("/run/netns/{cont}"),
               "Options": {"com.docker.network.endpoint.exposedports": [],
                           "com.docker.network.portmap": []}}),
    );
    assert_eq!(j["InterfaceName"]["DstPrefix"], "eth");
    assert_eq!(j["Gateway"], "10.81.0.1");
    let peer = j["InterfaceName"]["SrcName"].as_str().unwrap().to_string();
    call(
        &sock,
        "NetworkDriver.ProgramExternalConnectivity",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID, "Options": {}}),
    );
    // What Docker does with the answer.
    run_ok(
        "ip",
        &["-n", &h.netns, "link", "set", &peer, "netns", &cont],
    );
    run_ok("ip", &["-n", &cont, "link", "set", &peer, "name", "eth0"]);
    run_ok(
        "ip",
        &["-n", &cont, "addr", "add", "10.81.0.128/24", "dev", "eth0"],
    );
    run_ok("ip", &["-n", &cont, "link", "set", "eth0", "up"]);
    run_ok("ip", &["-n", &cont, "link", "set", "lo", "up"]);
    run_ok(
        "ip",
        &["-n", &cont, "route", "add", "default", "via", "10.81.0.1"],
    );

    // A netctl sandbox on the same network reaches the container, with an address that
    // netctl's own IPAM took around the pool's.
    let sb = h.sandbox("s");
    let ip = h.connect(&net, &sb);
    assert_ne!(ip, Ipv4Addr::new(10, 81, 0, 128));
    assert!(ping(&sb, Ipv4Addr::new(10, 81, 0, 128)));
    assert!(ping(&cont, ip));
    // Docker's next address avoids the netctl sandbox's.
    let b = call(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": ""}),
    );
    assert_ne!(b["Address"], format!("{ip}/24"));
    let e = call_err(
        &sock,
        "IpamDriver.RequestAddress",
        &json!({"PoolID": pool_id, "Address": ip.to_string()}).to_string(),
    );
    assert!(e.contains("already in use"), "{e}");

    // Drift: the container's veth deleted by hand is made again, into the container, by
    // the next reconciliation (Docker owns the container side but will not redo it).
    let host_veth = format!("nc{}", &EP_ID[..12]);
    run_ok("ip", &["-n", &h.netns, "link", "del", &host_veth]);
    assert!(!ping(&sb, Ipv4Addr::new(10, 81, 0, 128)));
    let rep = h.json(&["reconcile"]);
    assert!(netctl_tests::repaired(&rep) > 0, "{rep}");
    assert!(ping(&sb, Ipv4Addr::new(10, 81, 0, 128)));
    let inside = run_ok(
        "ip",
        &["-n", &cont, "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(inside.contains("10.81.0.128/24"), "{inside}");
    let routes = run_ok("ip", &["-n", &cont, "route", "show", "default"]);
    assert!(routes.contains("via 10.81.0.1 dev eth0"), "{routes}");
    let rep = h.json(&["reconcile"]);
    assert_eq!(netctl_tests::repaired(&rep), 0, "{rep}");

    // Anti-spoofing covers the container: another source address is dropped.
    let spoofed = h.drops("spoofed_ip");
    run_ok(
        "ip",
        &["-n", &cont, "addr", "add", "10.81.0.99/24", "dev", "eth0"],
    );
    let out = exec(
        &cont,
        &[
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "10.81.0.99",
            &ip.to_string(),
        ],
    );
    assert!(!out.status.success());
    assert!(h.drops("spoofed_ip") > spoofed);

    // An endpoint id prefix and an address are service backend targets.
    h.ok(&[
        "service",
        "add",
        &h.name("web"),
        "--network",
        &net,
        "--port",
        "80",
    ]);
    h.ok(&["service", "attach", &h.name("web"), &EP_ID[..8]]);
    let e = h.fails(&["service", "attach", &h.name("web"), "10.81.0.128"]);
    assert!(e.contains("already a backend"), "{e}");
    h.ok(&["service", "detach", &h.name("web"), "10.81.0.128"]);
    h.ok(&["service", "attach", &h.name("web"), "10.81.0.128"]);

    // Leave: Docker takes the interface back out, then deletes the endpoint.
    call(
        &sock,
        "NetworkDriver.RevokeExternalConnectivity",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID}),
    );
    call(
        &sock,
        "NetworkDriver.Leave",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID}),
    );
    run_ok(
        "ip",
        &["-n", &cont, "link", "set", "eth0", "netns", &h.netns],
    );
    call(
        &sock,
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID}),
    );
    let links = run_ok("ip", &["-n", &h.netns, "-o", "link", "show"]);
    assert!(!links.contains(&host_veth), "{links}");
    assert!(
        !links.contains("eth0"),
        "the peer went with the pair: {links}"
    );
    let sv = inspect(&h, "service", &h.name("web"));
    assert_eq!(
        sv["backends"],
        json!([]),
        "a deleted endpoint leaves its services"
    );
    call(
        &sock,
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": "10.81.0.128"}),
    );

    // DeleteNetwork: Docker has decided, so the netctl service and sandbox endpoint on it
    // go too, and nothing of the network stays in the kernel.
    call(
        &sock,
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": NET_ID}),
    );
    call(&sock, "IpamDriver.ReleasePool", json!({"PoolID": pool_id}));
    assert_eq!(h.json(&["network", "ls"]), json!([]));
    assert_eq!(h.json(&["service", "ls"]), json!([]));
    let links = run_ok("ip", &["-n", &h.netns, "-o", "link", "show"]);
    assert!(!links.contains("netctl1"), "{links}");
    assert!(!links.contains(" nc"), "{links}");
    let maps_after: Vec<u64> = ["SUBNETS", "ENDPOINTS", "IFACES"]
        .iter()
        .map(|m| h.map_entries(m))
        .collect();
    assert_eq!(maps_after, maps_before);
    // The same pool can be had again.
    call(
        &sock,
        "IpamDriver.RequestPool",
        json!({"Pool": "10.81.0.0/24"}),
    );
}

/// Pools, networks and endpoints Docker created survive a SIGKILL of the agent: Docker
/// never repeats CreateNetwork, and the pool's addresses stay taken.
#[test]
fn docker_state_survives_agent_kill() {
    let (mut h, sock) = plugin_host();
    let pool_id = create_network(&sock);
    let a = call(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id}),
    );
    let addr = a["Address"].as_str().unwrap().to_string();
    call(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID, "Interface": {"Address": addr}}),
    );
    let cont = h.name("c");
    run_ok("ip", &["netns", "add", &cont]);
    let j = call(
        &sock,
        "NetworkDriver.Join",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID,
               "SandboxKey": format!("/run/netns/{cont}")}),
    );
    let peer = j["InterfaceName"]["SrcName"].as_str().unwrap().to_string();
    run_ok(
        "ip",
        &["-n", &h.netns, "link", "set", &peer, "netns", &cont],
    );
    run_ok("ip", &["-n", &cont, "addr", "add", &addr, "dev", &peer]);
    run_ok("ip", &["-n", &cont, "link", "set", &peer, "up"]);
    let sb = h.sandbox("s");
    let net = format!("docker-{}", &NET_ID[..12]);
    let ip = h.connect(&net, &sb);
    assert!(ping(&cont, ip));

    h.kill_agent();
    assert!(ping(&cont, ip), "traffic stops with the agent");
    // A stale plugin socket is taken over by the new agent.
    h.start_agent();
    let st = h.json(&["status"]);
    assert_eq!(st["reconcile"]["last_error"], Value::Null, "{st}");
    assert_eq!(netctl_tests::repaired(&st["reconcile"]["last"]), 0, "{st}");
    assert!(ping(&cont, ip));
    let nv = inspect_network(&h, &net);
    assert_eq!(nv["endpoints"].as_array().unwrap().len(), 2, "{nv}");
    // `netctl down` removes every kernel object; the next agent makes the container's
    // veth again, into its namespace.
    h.ok(&["down"]);
    h.kill_agent();
    assert!(!ping(&cont, ip));
    h.start_agent();
    assert!(ping(&cont, ip), "the container is connected again");

    // The pool still knows what it handed out.
    let e = call_err(
        &sock,
        "IpamDriver.RequestAddress",
        &json!({"PoolID": pool_id, "Address": addr.split('/').next().unwrap()}).to_string(),
    );
    assert!(e.contains("already in use"), "{e}");
    let e = call_err(
        &sock,
        "IpamDriver.RequestPool",
        &json!({"Pool": "10.81.0.0/24"}).to_string(),
    );
    assert!(e.contains("overlaps"), "{e}");
}

/// An address whose RequestAddress answer a crash cut off (Docker never uses nor releases
/// it) is reclaimed by a reconciliation once `--docker-address-grace` has passed; the
/// gateway and addresses with endpoints stay.
#[test]
fn a_leaked_address_is_reclaimed() {
    let (h, sock) = plugin_host_with(&["--docker-address-grace", "1s"]);
    let pool_id = create_network(&sock);
    let lost = call(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id}),
    );
    let used = call(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id}),
    );
    call(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET_ID, "EndpointID": EP_ID, "Interface": {"Address": used["Address"]}}),
    );
    let pool_addrs = || -> Vec<String> {
        let nv = inspect_network(&h, &format!("docker-{}", &NET_ID[..12]));
        nv["docker_pool"]["addresses"]
            .as_object()
            .unwrap_or_else(|| panic!("no docker_pool: {nv}"))
            .keys()
            .cloned()
            .collect()
    };
    h.ok(&["reconcile"]);
    assert_eq!(
        pool_addrs().len(),
        3,
        "within the grace nothing is reclaimed"
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let rep = h.json(&["reconcile"]);
    assert!(netctl_tests::repaired(&rep) >= 1, "{rep}");
    let strip = |v: &Value| v.as_str().unwrap().split('/').next().unwrap().to_string();
    let left = pool_addrs();
    assert!(!left.contains(&strip(&lost["Address"])), "{left:?}");
    assert!(left.contains(&strip(&used["Address"])), "{left:?}");
    assert!(left.contains(&"10.81.0.1".to_string()), "{left:?}");
    // The reclaimed address is handed out again.
    let again = call(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id}),
    );
    assert_eq!(again["Address"], lost["Address"]);
}
