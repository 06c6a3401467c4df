//! Bad input gets one clear line naming the field and the value, a non-zero exit, and no
//! change to the store or the kernel. Needs root.

use netctl_tests::{Host, netctl_bin, run_ok};

/// A host with a network `<p>good` (10.70.0.0/24) holding sandbox `<p>a` at 10.70.0.2, a
/// full /30 network `<p>tiny`, a spare sandbox `<p>b`, and a host route 10.99.0.0/16.
fn setup() -> Host {
    let h = Host::new();
    h.ok(&[
        "network",
        "create",
        &h.name("good"),
        "--subnet",
        "10.70.0.0/24",
    ]);
    h.ok(&[
        "network",
        "create",
        &h.name("tiny"),
        "--subnet",
        "10.71.0.0/30",
    ]);
    let a = h.sandbox("a");
    h.sandbox("b");
    h.sandbox("c");
    assert_eq!(h.connect(&h.name("good"), &a).to_string(), "10.70.0.2");
    // The /30 has one address besides its gateway: give it to c.
    assert_eq!(
        h.connect(&h.name("tiny"), &h.name("c")).to_string(),
        "10.71.0.2"
    );
    run_ok(
        "ip",
        &["-n", &h.netns, "addr", "add", "10.99.0.1/16", "dev", "lo"],
    );
    h
}

/// Runs a bad command and checks: non-zero exit, one line that contains every `needle`,
/// and nothing changed.
fn rejects(h: &Host, args: &[&str], needles: &[&str]) {
    let before = h.snapshot();
    let err = h.fails(args);
    for n in needles {
        assert!(
            err.contains(n),
            "netctl {args:?}: error {err:?} should mention {n:?}"
        );
    }
    assert_eq!(before, h.snapshot(), "netctl {args:?} changed something");
}

#[test]
fn network_create_rejects_bad_input() {
    let h = setup();
    let x = h.name("x");
    let good = h.name("good");
    let create = |extra: &[&str]| {
        let mut a = vec!["network", "create", x.as_str()];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            create(&["--subnet", "10.1.0.0/33"]),
            vec!["subnet", "10.1.0.0/33"],
        ),
        (
            create(&["--subnet", "not-a-cidr"]),
            vec!["subnet", "not-a-cidr"],
        ),
        (
            create(&["--subnet", "10.1.0.1/24"]),
            vec!["subnet", "10.1.0.1/24"],
        ),
        // Overlaps: another netctl network, a host route.
        (
            create(&["--subnet", "10.70.0.0/16"]),
            vec!["subnet", "10.70.0.0/16", &good],
        ),
        (
            create(&["--subnet", "10.99.3.0/24"]),
            vec!["subnet", "10.99.3.0/24", "10.99.0.0/16"],
        ),
        (
            create(&["--subnet", "10.80.0.0/24", "--ip-range", "10.81.0.0/25"]),
            vec!["ip-range", "10.81.0.0/25"],
        ),
        (
            create(&["--subnet", "10.80.0.0/24", "--gateway", "10.81.0.1"]),
            vec!["gateway", "10.81.0.1"],
        ),
        (
            create(&["--subnet", "10.80.0.0/24", "--gateway", "nope"]),
            vec!["gateway", "nope"],
        ),
        (
            create(&["--subnet", "10.80.0.0/24", "--aux-address", "r=10.81.0.5"]),
            vec!["aux-address", "10.81.0.5"],
        ),
        (
            create(&["--subnet", "10.80.0.0/24", "--aux-address", "no-equals"]),
            vec!["aux-address", "no-equals"],
        ),
        (create(&["-d", "overlay"]), vec!["driver", "overlay"]),
        (create(&["-o", "novalue"]), vec!["opt", "novalue"]),
        (
            create(&["-o", "com.docker.network.bridge.name=abcdefghijklmnopq"]),
            vec!["com.docker.network.bridge.name", "abcdefghijklmnopq"],
        ),
        (
            create(&["-o", "com.docker.network.bridge.name=../x"]),
            vec!["com.docker.network.bridge.name", "../x"],
        ),
    ];
    for (args, needles) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        rejects(&h, &a, &needles);
    }
    // Names: duplicate, empty, too long, unsafe in a path.
    rejects(&h, &["network", "create", &good], &[&good, "exists"]);
    rejects(&h, &["network", "create", ""], &["name", "\"\""]);
    let long = "n".repeat(65);
    rejects(&h, &["network", "create", &long], &["name", &long]);
    for bad in ["a/b", "../etc", "a b", "-x", "x\u{0}y"] {
        if bad.contains('\0') {
            continue; // the OS cannot pass a NUL in an argument
        }
        let args = ["network", "create", "--", bad];
        let before = h.snapshot();
        let o = h.netctl(&args);
        assert!(!o.status.success(), "network create {bad:?} must fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("name") && err.contains(bad), "{err}");
        assert_eq!(before, h.snapshot());
    }
}

#[test]
fn sandboxes_and_endpoints_reject_bad_input() {
    let h = setup();
    let (good, tiny) = (h.name("good"), h.name("tiny"));
    let (a, b) = (h.name("a"), h.name("b"));
    let nosuch = h.name("nosuch");

    // Sandboxes.
    rejects(&h, &["sandbox", "create", &a], &[&a, "exists"]);
    rejects(&h, &["sandbox", "create", ""], &["name", "\"\""]);
    let long = "s".repeat(65);
    rejects(&h, &["sandbox", "create", &long], &["name", &long]);
    for bad in ["a/b", "..", "a b", ".hidden"] {
        rejects(&h, &["sandbox", "create", "--", bad], &["name", bad]);
    }
    rejects(&h, &["sandbox", "rm", &nosuch], &[&nosuch, "not found"]);
    // A namespace that exists but is not netctl's.
    let foreign = h.name("foreign");
    run_ok("ip", &["netns", "add", &foreign]);
    rejects(&h, &["sandbox", "create", &foreign], &[&foreign]);

    // Connect.
    rejects(
        &h,
        &["network", "connect", &nosuch, &b],
        &[&nosuch, "not found"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &nosuch],
        &[&nosuch, "not found"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &a],
        &[&a, &good, "already"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &b, "--ip", "10.72.0.9"],
        &["ip", "10.72.0.9"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &b, "--ip", "10.70.0.2"],
        &["ip", "10.70.0.2"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &b, "--ip", "10.70.0.1"],
        &["ip", "10.70.0.1"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &b, "--ip", "10.70.0.300"],
        &["ip", "10.70.0.300"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &b, "--ip", "10.70.0.255"],
        &["ip", "10.70.0.255"],
    );
    rejects(
        &h,
        &["network", "connect", &good, &b, "--alias", "bad/alias"],
        &["alias", "bad/alias"],
    );
    rejects(
        &h,
        &["network", "connect", &tiny, &b],
        &[&tiny, "no free address"],
    );

    // Disconnect, inspect, rm.
    rejects(
        &h,
        &["network", "disconnect", &good, &b],
        &[&b, &good, "not connected"],
    );
    rejects(
        &h,
        &["network", "disconnect", &nosuch, &b],
        &[&nosuch, "not found"],
    );
    rejects(
        &h,
        &["network", "inspect", &nosuch],
        &[&nosuch, "not found"],
    );
    rejects(&h, &["network", "rm", &nosuch], &[&nosuch, "not found"]);
    rejects(&h, &["network", "rm", &good], &[&good, "endpoint"]);
    rejects(&h, &["network", "rm", ""], &["network", "\"\""]);
    let _ = run_ok("ip", &["netns", "del", &foreign]);
}

#[test]
fn racing_creates_of_one_name_make_exactly_one() {
    let h = std::sync::Arc::new(Host::new());
    for round in 0..3 {
        let net = h.name(&format!("race{round}"));
        let sb = h.name(&format!("rsb{round}"));
        let spawn = |args: Vec<String>| {
            let h = h.clone();
            std::thread::spawn(move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                h.netctl(&a).status.success()
            })
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let t = vec![
            spawn(s(&[
                "network",
                "create",
                &net,
                "--subnet",
                &format!("10.73.{round}.0/24"),
            ])),
            spawn(s(&[
                "network",
                "create",
                &net,
                "--subnet",
                &format!("10.74.{round}.0/24"),
            ])),
            spawn(s(&["sandbox", "create", &sb])),
            spawn(s(&["sandbox", "create", &sb])),
        ];
        let r: Vec<bool> = t.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            r[..2].iter().filter(|x| **x).count(),
            1,
            "one network {net}: {r:?}"
        );
        assert_eq!(
            r[2..].iter().filter(|x| **x).count(),
            1,
            "one sandbox {sb}: {r:?}"
        );
        let nets = h.json(&["network", "ls"]);
        assert_eq!(
            nets.as_array()
                .unwrap()
                .iter()
                .filter(|n| n["name"] == net.as_str())
                .count(),
            1
        );
    }
}

#[test]
fn cli_says_when_the_agent_is_not_running() {
    let sock = std::env::temp_dir().join(format!("netctl-test-none-{}.sock", std::process::id()));
    let o = std::process::Command::new(netctl_bin())
        .args(["network", "ls"])
        .env("NETCTL_SOCKET", &sock)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("not running")
            && err.contains("netctl up")
            && err.contains(&*sock.to_string_lossy()),
        "{err}"
    );
}
