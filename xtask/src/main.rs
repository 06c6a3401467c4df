//! Build tooling for netctl: `cargo xtask setup | build-ebpf | build | test | up`.
//!
//! A fresh Debian 12 machine with rustup (stable + nightly) needs only these commands: each
//! one detects what is missing (apt packages, nightly's rust-src, bpf-linker, bpffs), installs
//! only that, and says what it did. See /work/shared/TOOLCHAIN.md for why each piece is needed.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// bpf-linker must link the same LLVM major as nightly rustc (1.97 uses LLVM 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_FEATURE: &str = "llvm-22";
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];
/// What the agent and the integration tests call at run time.
const TOOL_PACKAGES: &[&str] = &[
    "bpftool",           // inspect pinned maps and programs
    "iproute2",          // ip, tc
    "iputils-ping",      // ping in integration tests
    "netcat-openbsd",    // nc in integration tests
    "util-linux",        // nsenter, setsid
    "procps",            // ps, pkill in tests
    "ethtool",           // offload settings on veths
    "iptables",          // the tests check netctl made no rules; the bench's peer
    "nftables",          // likewise (`nft list ruleset`); the bench's other peer
    "fonts-dejavu-core", // the font of the bench's charts
    "docker.io",         // dockerd and docker: the Docker plugin tests run their own dockerd
    "busybox-static",    // the Docker tests' image is built from a static busybox
];
/// Packages whose services must not run: the Docker tests start their own dockerd (with its
/// own containerd) per test; a system dockerd would only add a bridge and iptables rules.
/// apt-get install runs under a policy-rc.d that refuses every start, and on a systemd
/// machine the units of these packages, when setup installed them, are disabled.
const NO_SERVICE_PACKAGES: &[(&str, &[&str])] = &[
    ("docker.io", &["docker.service", "docker.socket"]),
    ("containerd", &["containerd.service"]),
];
/// Debian's hook that invoke-rc.d and deb-systemd-invoke ask before starting a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// The eBPF crate's binary target; netctl/build.rs expects this name.
const EBPF_BIN: &str = "netctl";
const BPFFS: &str = "/sys/fs/bpf";
const AGENT_LOG_DIR: &str = "/var/log/netctl";
const AGENT_LOG: &str = "/var/log/netctl/agent.log";
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, test and run netctl",
    after_help = "Environment: NETCTL_EBPF_DIR overrides the eBPF crate directory \
                  (default <repo>/netctl-ebpf); CARGO_TARGET_DIR is honoured."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Detect and install what is missing: apt packages (LLVM 22, bpftool, iproute2, ...),
    /// nightly's rust-src, bpf-linker, and a bpffs mount at /sys/fs/bpf.
    Setup {
        /// Only report; exit with an error if anything is missing.
        #[arg(long)]
        check: bool,
    },
    /// Build the eBPF programs (netctl-ebpf/, with nightly) and print the object's path.
    BuildEbpf {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build the eBPF object, then the netctl binary that embeds it.
    Build {
        /// Build netctl with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, then run `cargo test --workspace` (as root: the integration tests
    /// create namespaces, links and eBPF programs). ARGS go to the test harness.
    Test {
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Set up, build (release), and run the benchmarks side by side with iptables and
    /// nftables. A full run writes bench/results/ and BENCHMARKS.md; --quick (tiny sizes, one
    /// repetition) writes target/bench-quick/ and fails if a scenario cannot run.
    Bench {
        /// Suites: prog, lb, update (default: all).
        suites: Vec<String>,
        #[arg(long)]
        quick: bool,
        /// Extra arguments for netctl-bench run (e.g. --reps 3 --cap 300).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Set up, build, and start `netctl up ARGS` in the background (logs in
    /// /var/log/netctl/agent.log); waits until `netctl status` answers.
    Up {
        /// Build and run netctl with the release profile.
        #[arg(long)]
        release: bool,
        #[arg(last = true, value_name = "AGENT_ARGS")]
        args: Vec<OsString>,
    },
}

fn main() {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    let ws = Workspace::locate()?;
    match cli.cmd {
        Cmd::Setup { check } => {
            let mut setup = Setup::new(check);
            setup.all()?;
            setup.finish()?;
        }
        Cmd::BuildEbpf { debug } => {
            ws.build_ebpf(debug, None)?;
        }
        Cmd::Build { release } => {
            let bin = ws.build(release, None)?;
            println!("netctl binary: {}", bin.display());
        }
        Cmd::Test { args } => return ws.test(&args),
        Cmd::Bench {
            suites,
            quick,
            args,
        } => ws.bench(&suites, quick, &args)?,
        Cmd::Up { release, args } => ws.up(release, &args)?,
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// Setup: detect, then install only what is missing.
// ---------------------------------------------------------------------------------------------

struct Setup {
    check_only: bool,
    apt_updated: bool,
    missing: Vec<String>,
    /// Where the bpf-linker that was found or installed lives (put first on PATH for builds).
    bpf_linker: Option<PathBuf>,
}

impl Setup {
    fn new(check_only: bool) -> Self {
        Setup {
            check_only,
            apt_updated: false,
            missing: Vec::new(),
            bpf_linker: None,
        }
    }

    /// Everything: apt packages, rust-src, bpf-linker, bpffs.
    fn all(&mut self) -> Result<()> {
        let pkgs: Vec<&str> = LLVM_PACKAGES.iter().chain(TOOL_PACKAGES).copied().collect();
        self.apt(&pkgs)?;
        self.rust_src()?;
        self.bpf_linker()?;
        self.bpffs()?;
        Ok(())
    }

    /// What `build-ebpf` needs: rust-src and bpf-linker (and LLVM only to build bpf-linker).
    fn ebpf_toolchain(&mut self) -> Result<()> {
        self.rust_src()?;
        self.bpf_linker()?;
        Ok(())
    }

    /// In check mode, fail if anything was missing.
    fn finish(&self) -> Result<()> {
        if !self.missing.is_empty() {
            bail!(
                "missing: {}; run `cargo xtask setup` as root to install them",
                self.missing.join(", ")
            );
        }
        Ok(())
    }

    fn apt(&mut self, pkgs: &[&str]) -> Result<()> {
        let mut missing = Vec::new();
        for pkg in pkgs {
            match dpkg_version(pkg)? {
                Some(version) => println!("ok: {pkg} {version}"),
                None if self.check_only => {
                    println!("missing: {pkg} (apt)");
                    self.missing.push(pkg.to_string());
                }
                None => {
                    println!("installing: {pkg} (apt)");
                    missing.push(*pkg);
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        require_root(&format!("installing {} with apt-get", missing.join(" ")))?;
        let started = Instant::now();
        if !self.apt_updated {
            run(apt_get().arg("update"), "apt-get update")?;
            self.apt_updated = true;
        }
        // Packages with services (pulled in as dependencies too) that were not there before.
        let mut new_services = Vec::new();
        for (pkg, units) in NO_SERVICE_PACKAGES {
            if dpkg_version(pkg)?.is_none() {
                new_services.push((*pkg, *units));
            }
        }
        {
            let _policy = NoServiceStarts::install()?;
            run(
                apt_get()
                    .args(["install", "-y", "--no-install-recommends"])
                    .args(&missing),
                "apt-get install",
            )?;
        }
        for pkg in &missing {
            match dpkg_version(pkg)? {
                Some(version) => println!("installed: {pkg} {version}"),
                None => bail!("apt-get install succeeded but {pkg} is still not installed"),
            }
        }
        for (pkg, units) in new_services {
            if dpkg_version(pkg)?.is_some() {
                disable_units(pkg, units)?;
            }
        }
        println!("(apt: {} s)", started.elapsed().as_secs());
        Ok(())
    }

    fn rust_src(&mut self) -> Result<()> {
        let out = Command::new(rustup())
            .args(["component", "list", "--toolchain", "nightly", "--installed"])
            .stdin(Stdio::null())
            .output()
            .context("running `rustup` (is rustup installed and on PATH?)")?;
        if !out.status.success() {
            bail!(
                "the nightly toolchain is not usable ({}): the eBPF crate builds with \
                 `cargo +nightly`. This tooling never downloads toolchains \
                 (RUSTUP_AUTO_INSTALL=0); install one with `rustup toolchain install nightly`",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let installed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"));
        let nightly =
            capture(Command::new(rustup()).args(["run", "nightly", "rustc", "--version"]))
                .unwrap_or_else(|_| "nightly".into());
        if installed {
            println!("ok: rust-src ({nightly})");
            return Ok(());
        }
        if self.check_only {
            println!("missing: rust-src ({nightly})");
            self.missing.push("rust-src".into());
            return Ok(());
        }
        println!("installing: rust-src ({nightly})");
        run(
            Command::new(rustup())
                .args(["component", "add", "rust-src", "--toolchain", "nightly"])
                .stdin(Stdio::null()),
            "rustup component add rust-src",
        )
        .context("build-std needs nightly's rust-src")?;
        Ok(())
    }

    fn bpf_linker(&mut self) -> Result<()> {
        if let Some((path, version)) = find_bpf_linker() {
            if version.contains(BPF_LINKER_VERSION) {
                println!("ok: {version} ({})", path.display());
            } else {
                println!(
                    "ok: {version} ({}) -- expected bpf-linker {BPF_LINKER_VERSION}; if linking \
                     fails, remove it and run `cargo xtask setup`",
                    path.display()
                );
            }
            self.bpf_linker = Some(path);
            return Ok(());
        }
        if self.check_only {
            println!("missing: bpf-linker {BPF_LINKER_VERSION}");
            self.missing.push("bpf-linker".into());
            return Ok(());
        }
        // bpf-linker links against LLVM 22's shared library.
        self.apt(LLVM_PACKAGES)?;
        println!("installing: bpf-linker {BPF_LINKER_VERSION} (cargo install, ~70 s)");
        let started = Instant::now();
        let path = prepend_path(Path::new(LLVM_PREFIX).join("bin"))?;
        run(
            Command::new(cargo())
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args([
                    "--locked",
                    "--no-default-features",
                    "--features",
                    LLVM_FEATURE,
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("PATH", path)
                .stdin(Stdio::null()),
            "cargo install bpf-linker",
        )
        .with_context(|| {
            format!(
                "bpf-linker needs LLVM 22 in {LLVM_PREFIX} (apt: {})",
                LLVM_PACKAGES.join(" ")
            )
        })?;
        match find_bpf_linker() {
            Some((path, version)) => {
                println!(
                    "installed: {version} ({}, {} s)",
                    path.display(),
                    started.elapsed().as_secs()
                );
                self.bpf_linker = Some(path);
                Ok(())
            }
            None => bail!(
                "cargo install bpf-linker succeeded but `bpf-linker --version` does not run \
                 (looked on PATH and in {})",
                cargo_bin_dir().display()
            ),
        }
    }

    fn bpffs(&mut self) -> Result<()> {
        if bpffs_mounted()? {
            println!("ok: bpffs mounted at {BPFFS}");
            return Ok(());
        }
        if self.check_only {
            println!("missing: bpffs at {BPFFS}");
            self.missing.push("bpffs".into());
            return Ok(());
        }
        println!("installing: bpffs at {BPFFS} (mount -t bpf bpf {BPFFS})");
        require_root("mounting bpffs")?;
        fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
        run(
            Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
            "mount -t bpf bpf /sys/fs/bpf",
        )
        .context("the agent pins its maps and links in bpffs (needs CAP_SYS_ADMIN)")?;
        if !bpffs_mounted()? {
            bail!("mount reported success but /proc/mounts shows no bpf mount at {BPFFS}");
        }
        Ok(())
    }
}

/// A policy-rc.d that refuses every service start (exit 101) while it lives, unless the
/// machine has one of its own (then that one decides, and stays).
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn install() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(NoServiceStarts { created: false });
        }
        fs::write(
            path,
            "#!/bin/sh\n# cargo xtask setup: no service starts while apt-get installs\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(NoServiceStarts { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("warning: cannot remove {POLICY_RC_D}: {e}");
        }
    }
}

/// On a systemd machine, disables the units of a package setup just installed, so that its
/// service does not start at the next boot either (the install itself started nothing).
fn disable_units(pkg: &str, units: &[&str]) -> Result<()> {
    if !Path::new("/run/systemd/system").is_dir() {
        println!("{pkg}: service not started ({})", units.join(", "));
        return Ok(());
    }
    run(
        Command::new("systemctl")
            .arg("disable")
            .args(units)
            .stdin(Stdio::null()),
        "systemctl disable",
    )?;
    println!(
        "{pkg}: service not started, and disabled ({})",
        units.join(", ")
    );
    Ok(())
}

/// `Some(version)` if dpkg says the package is installed.
fn dpkg_version(pkg: &str) -> Result<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", pkg])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query: this tooling installs with apt (Debian/Ubuntu)")?;
    // Exit 1 with "no packages found" when dpkg has never heard of it.
    let out = String::from_utf8_lossy(&out.stdout);
    let (status, version) = out.split_once('\t').unwrap_or((&out, ""));
    Ok(status
        .contains("install ok installed")
        .then(|| version.to_string()))
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        // Wait for another apt (unattended-upgrades) instead of failing on the lock.
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .stdin(Stdio::null());
    cmd
}

fn find_bpf_linker() -> Option<(PathBuf, String)> {
    let candidates = [
        PathBuf::from("bpf-linker"),
        cargo_bin_dir().join("bpf-linker"),
    ];
    for cand in candidates {
        if let Ok(version) = capture(Command::new(&cand).arg("--version")) {
            let path = if cand.components().count() == 1 {
                which(&cand).unwrap_or(cand)
            } else {
                cand
            };
            return Some((path, version));
        }
    }
    None
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
    }))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root: run this command again as root");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Builds, tests, agent.
// ---------------------------------------------------------------------------------------------

struct Workspace {
    root: PathBuf,
    ebpf_dir: PathBuf,
    target_dir: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let cwd = std::env::current_dir().context("current directory")?;
        let ebpf_dir = match std::env::var_os("NETCTL_EBPF_DIR") {
            Some(d) => cwd.join(d),
            None => root.join("netctl-ebpf"),
        };
        // Cargo resolves a relative CARGO_TARGET_DIR against its working directory; the
        // commands below run in the repo root, so resolve it against ours first.
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(d) if !d.is_empty() => cwd.join(d),
            _ => root.join("target"),
        };
        Ok(Workspace {
            root,
            ebpf_dir,
            target_dir,
        })
    }

    fn ebpf_object(&self, debug: bool) -> PathBuf {
        let profile = if debug { "debug" } else { "release" };
        self.ebpf_dir
            .join("target")
            .join(EBPF_TARGET)
            .join(profile)
            .join(EBPF_BIN)
    }

    /// `cargo +nightly build` inside the eBPF crate (its own .cargo/config.toml sets the
    /// target, build-std and rustflags). Returns the object's path.
    /// `setup`: a `Setup` that already checked the toolchain (else it is checked here).
    fn build_ebpf(&self, debug: bool, setup: Option<&Setup>) -> Result<PathBuf> {
        let dir = &self.ebpf_dir;
        if !dir.join("Cargo.toml").is_file() {
            bail!(
                "no eBPF crate at {}: expected its Cargo.toml there (set NETCTL_EBPF_DIR to \
                 build one elsewhere)",
                dir.display()
            );
        }
        let mut own = Setup::new(false);
        let setup = match setup {
            Some(s) => s,
            None => {
                own.ebpf_toolchain()?;
                &own
            }
        };
        let linker_dir = setup
            .bpf_linker
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(cargo_bin_dir);
        let mut cmd = Command::new(rustup_cargo());
        cmd.args(["+nightly", "build"]);
        if !debug {
            cmd.arg("--release");
        }
        cmd.current_dir(dir)
            // Set by rustup/cargo for this (stable) process; they would override +nightly.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            // The crate's config sets the target and rustflags (link-arg=--btf); env wins
            // over config, so settings meant for the host workspace must not leak in.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            // netctl/build.rs looks for the object under the crate's own target/.
            .env("CARGO_TARGET_DIR", dir.join("target"))
            // rustc runs `bpf-linker` by name.
            .env("PATH", prepend_path(linker_dir)?);
        run(
            &mut cmd,
            &format!("cargo +nightly build in {}", dir.display()),
        )
        .with_context(|| {
            format!(
                "building the eBPF crate in {} failed (errors above); `cargo xtask setup --check` \
                 shows whether the toolchain is complete",
                dir.display()
            )
        })?;
        let obj = self.ebpf_object(debug);
        if !obj.is_file() {
            bail!(
                "the build succeeded but {} does not exist: the eBPF crate's binary target must \
                 be named `{EBPF_BIN}` and its .cargo/config.toml must set target = \"{EBPF_TARGET}\"",
                obj.display()
            );
        }
        let size = fs::metadata(&obj).map(|m| m.len()).unwrap_or(0);
        println!("eBPF object: {} ({size} bytes)", obj.display());
        Ok(obj)
    }

    /// A `cargo` for the host workspace, in the repo root, that embeds `obj`.
    fn host_cargo(&self, obj: &Path) -> Command {
        let mut cmd = Command::new(cargo());
        cmd.current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target_dir);
        // netctl/build.rs reads the default path itself; only name the object when it is
        // elsewhere, so plain `cargo build` and `cargo xtask build` do not rebuild each other.
        if obj
            == self
                .root
                .join("netctl-ebpf")
                .join("target")
                .join(EBPF_TARGET)
                .join("release")
                .join(EBPF_BIN)
        {
            cmd.env_remove("NETCTL_EBPF_OBJECT");
        } else {
            cmd.env("NETCTL_EBPF_OBJECT", obj);
        }
        cmd
    }

    /// build-ebpf (release), then the netctl binaries. Returns the netctl binary's path.
    fn build(&self, release: bool, setup: Option<&Setup>) -> Result<PathBuf> {
        let obj = self.build_ebpf(false, setup)?;
        let mut cmd = self.host_cargo(&obj);
        cmd.args(["build", "-p", "netctl", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        run(&mut cmd, "cargo build -p netctl")?;
        let bin = self
            .target_dir
            .join(if release { "release" } else { "debug" })
            .join("netctl");
        if !bin.is_file() {
            bail!("cargo build succeeded but {} does not exist", bin.display());
        }
        Ok(bin)
    }

    fn bench(&self, suites: &[String], quick: bool, args: &[OsString]) -> Result<()> {
        require_root("benchmarking (namespaces, veths, eBPF programs, iptables and nftables)")?;
        let mut setup = Setup::new(false);
        setup.all()?;
        let netctl = self.build(true, Some(&setup))?;
        let obj = self.ebpf_object(false);
        let mut cmd = self.host_cargo(&obj);
        cmd.args(["build", "--release", "-p", "netctl-bench"]);
        run(&mut cmd, "cargo build --release -p netctl-bench")?;
        let bench = self.target_dir.join("release").join("netctl-bench");
        let out = if quick {
            self.target_dir.join("bench-quick")
        } else {
            self.root.join("bench").join("results")
        };
        let mut cmd = Command::new(&bench);
        cmd.arg("run")
            .args(suites)
            .arg("--out")
            .arg(&out)
            .arg("--netctl")
            .arg(&netctl)
            .arg("--object")
            .arg(&obj)
            .args(args);
        if quick {
            cmd.arg("--quick");
        }
        run(&mut cmd, "netctl-bench run")?;
        if !quick {
            let table = fs::read_to_string(out.join("results.md"))?;
            let doc = format!(
                "# Benchmarks\n\n\
                 The latest full run of `cargo xtask bench` (see the README). Every system runs in \
                 the same run, repetitions interleaved in a rotated order; cells are medians with \
                 [min–max]. Systems: **netctl** (its eBPF data plane, services through its API); \
                 **iptables** (DNAT in kube-proxy's rule shape: a chain per service, a statistic \
                 match per backend; `iptables-restore`, nft backend); **nftables** (kube-proxy's \
                 nftables shape: a verdict map of services, `numgen` per service; `nft -f`); \
                 **floor** (the same client and backends, straight to a backend: no load \
                 balancing, no NAT, no conntrack). IPVS is not compiled into this kernel.\n\n\
                 Reproduce: `cargo xtask bench` (as root; about 40 minutes), or one suite: \
                 `cargo xtask bench lb`. Raw samples: `bench/results/results.json`; charts: \
                 `bench/results/*.png`.\n\n\
                 ![lb new connections](bench/results/lb-new_connections.png)\n\
                 ![lb transactions](bench/results/lb-transactions.png)\n\
                 ![update program_all](bench/results/update-program_all.png)\n\n\
                 {table}"
            );
            fs::write(self.root.join("BENCHMARKS.md"), doc)?;
            println!("wrote BENCHMARKS.md and {}", out.display());
        }
        Ok(())
    }

    fn test(&self, args: &[OsString]) -> Result<i32> {
        require_root("running the integration tests (namespaces, veths, eBPF programs)")?;
        let mut setup = Setup::new(false);
        setup.all()?;
        let bin = self.build(false, Some(&setup))?;
        let obj = self.ebpf_object(false);
        let mut cmd = self.host_cargo(&obj);
        cmd.args(["test", "--workspace", "--"])
            .args(args)
            .env("NETCTL_BIN", &bin);
        println!(
            "==> NETCTL_BIN={} cargo test --workspace -- {}",
            bin.display(),
            join(args)
        );
        // The harness output goes through us so that the run ends with one line of totals
        // over every test binary (the last binary to run may well have no test at all).
        cmd.stdout(Stdio::piped());
        let mut child = cmd.spawn().context("running cargo test")?;
        let mut totals = [0u64; 3];
        if let Some(out) = child.stdout.take() {
            for line in io::BufReader::new(out).lines() {
                let line = line.context("reading the test output")?;
                println!("{line}");
                if let Some(counts) = test_result_counts(&line) {
                    for (t, c) in totals.iter_mut().zip(counts) {
                        *t += c;
                    }
                }
            }
        }
        let status = child.wait().context("waiting for cargo test")?;
        println!();
        println!(
            "tests: {} passed, {} failed, {} skipped",
            totals[0], totals[1], totals[2]
        );
        Ok(exit_code(status))
    }

    fn up(&self, release: bool, args: &[OsString]) -> Result<()> {
        require_root("starting the agent (it creates links and loads eBPF programs)")?;
        let mut setup = Setup::new(false);
        setup.all()?;
        let bin = self.build(release, Some(&setup))?;

        fs::create_dir_all(AGENT_LOG_DIR).with_context(|| format!("creating {AGENT_LOG_DIR}"))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(AGENT_LOG)
            .with_context(|| format!("opening {AGENT_LOG}"))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&bin);
        cmd.arg("up")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log);
        // A new session: no controlling terminal, so closing this shell does not SIGHUP the
        // agent, and the agent leads its own process group (killable as one).
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        println!("==> {} (logs: {AGENT_LOG})", describe(&cmd));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();

        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                print_log_tail(log_start);
                bail!(
                    "the agent exited ({status}) before `netctl status` answered; its log is above"
                );
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let mut status_cmd = Command::new(&bin);
            status_cmd
                .arg("status")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if status_ok(&mut status_cmd, remaining)? && child.try_wait()?.is_none() {
                println!(
                    "netctl agent running (pid {pid}); logs: {AGENT_LOG}; stop with: netctl down"
                );
                println!("netctl binary: {}", bin.display());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        stop_group(&mut child);
        print_log_tail(log_start);
        bail!(
            "the agent did not answer `netctl status` within {} s; stopped it (pid {pid}); its log is above",
            AGENT_START_TIMEOUT.as_secs()
        );
    }
}

/// Runs `cmd` until it exits or `timeout` passes (then kills it); true if it exited 0.
fn status_ok(cmd: &mut Command, timeout: Duration) -> Result<bool> {
    let mut child = cmd.spawn().context("running netctl status")?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM the agent's process group (it is a session leader), then SIGKILL after 5 s.
fn stop_group(child: &mut Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; -pgid names only the group we created.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
}

/// The last 20 lines the agent wrote to the log in this run.
fn print_log_tail(from: u64) {
    let mut text = String::new();
    let read = fs::File::open(AGENT_LOG).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_string(&mut text)
    });
    if let Err(e) = read {
        eprintln!("(cannot read {AGENT_LOG}: {e})");
        return;
    }
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("--- last lines of {AGENT_LOG} ---");
    if lines.is_empty() {
        eprintln!("(empty)");
    }
    for line in &lines[lines.len().saturating_sub(20)..] {
        eprintln!("{line}");
    }
    eprintln!("---");
}

// ---------------------------------------------------------------------------------------------
// Process helpers.
// ---------------------------------------------------------------------------------------------

/// Runs a command with inherited output; an error names it and its exit status.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    println!("==> {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its trimmed stdout if it exits 0.
fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{:?} failed ({})", cmd.get_program(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn join(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or(1)
}

fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join("bin"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cargo/bin"),
    }
}

/// The cargo running this xtask (same toolchain) for the host workspace.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// rustup's `cargo` proxy, which understands `+nightly` (the `CARGO` of this process is the
/// stable toolchain's own binary, which does not).
fn rustup_cargo() -> PathBuf {
    let proxy = cargo_bin_dir().join("cargo");
    if proxy.is_file() {
        proxy
    } else {
        PathBuf::from("cargo")
    }
}

fn rustup() -> PathBuf {
    let proxy = cargo_bin_dir().join("rustup");
    if proxy.is_file() {
        proxy
    } else {
        PathBuf::from("rustup")
    }
}

fn prepend_path(dir: PathBuf) -> Result<OsString> {
    let mut dirs = vec![dir];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).context("building PATH")
}

fn which(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// (passed, failed, ignored) of a libtest summary line
/// (`test result: ok. 7 passed; 0 failed; 1 ignored; ...`).
fn test_result_counts(line: &str) -> Option<[u64; 3]> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut out = [0u64; 3];
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(kind), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match kind {
            "passed" => out[0] = n,
            "failed" => out[1] = n,
            "ignored" => out[2] = n,
            _ => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::test_result_counts;

    #[test]
    fn reads_libtest_summaries() {
        assert_eq!(
            test_result_counts(
                "test result: ok. 7 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.55s"
            ),
            Some([7, 2, 1])
        );
        assert_eq!(test_result_counts("running 7 tests"), None);
    }
}
