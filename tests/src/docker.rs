//! A real dockerd per test, for the tests of netctl as Docker's network and IPAM plugin.
//!
//! [`Dockerd::start`] runs `dockerd` inside a given network namespace (entered with
//! `nsenter --net`, not `ip netns exec`, which remounts /sys and loses the cgroup mounts),
//! with every directory of its own under `/run/netctl-docker-<prefix>/` (short: exec-root
//! paths end up in unix socket paths), its own containerd (or its own namespace in a system
//! containerd, should one run), no default bridge and no iptables rules. It imports
//! [`IMAGE`], a busybox image built from the host's static busybox.
//!
//! [`Host::with_docker`] gives a test a [`Host`] whose agent serves the plugin
//! `n<prefix>` (Docker plugin names are lowercase) and asks this dockerd for network names.
//!
//! Dropping a [`Dockerd`], also when the test panicked, removes its containers and networks,
//! stops dockerd, its containerd and shims, unmounts whatever they left mounted under its
//! directory (the data root's bind mount, overlay mounts, the containers' network namespaces)
//! and removes the directory.

use std::io::Read;
use std::net::{Ipv4Addr, Shutdown};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Host;

/// The test image: busybox, `CMD ["/bin/sh"]`.
pub const IMAGE: &str = "nt-busybox:1";

/// How long dockerd may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one docker command may take before the test fails (a hung plugin call must not
/// hang the suite).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The same, for the clean-up commands of a drop.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd gets to shut down (and stop its containerd) after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The first dockerd on a machine creates /etc/docker/key.json; two doing it at once can read
/// each other's half-written file and fail. Starts are serialized until the file exists.
static FIRST_START: Mutex<()> = Mutex::new(());

/// The docker client: the one of the docker.io package when present (it matches its
/// dockerd), else `docker` on PATH.
pub fn docker_bin() -> PathBuf {
    let deb = Path::new("/usr/bin/docker");
    if deb.is_file() {
        return deb.to_path_buf();
    }
    find_on_path("docker").unwrap_or_else(|| {
        panic!(
            "no docker client (/usr/bin/docker or docker on PATH): install the Debian package \
             docker.io (`cargo xtask setup` does); the Docker tests need a real dockerd and are \
             never skipped"
        )
    })
}

fn dockerd_bin() -> PathBuf {
    find_on_path("dockerd")
        .or_else(|| Some(PathBuf::from("/usr/sbin/dockerd")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "dockerd is not installed (not on PATH, not /usr/sbin/dockerd): install the \
                 Debian package docker.io (`cargo xtask setup` does); the Docker tests need a \
                 real dockerd and are never skipped"
            )
        })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A dockerd running in a network namespace, with its own directories.
pub struct Dockerd {
    /// `/run/netctl-docker-<prefix>`: data-root `data/`, exec-root `exec/`, `docker.sock`,
    /// `docker.pid`, `dockerd.log`.
    pub dir: PathBuf,
    /// Its API socket (what `DOCKER_HOST` names).
    pub socket: PathBuf,
    /// The namespace it runs in.
    pub netns: String,
    docker: PathBuf,
    child: Option<Child>,
    /// Whether a drop removes containers and networks through the API and lets dockerd shut
    /// down. Off when the plugin's agent is dead: every plugin call would be retried for 30 s.
    graceful: bool,
}

impl Dockerd {
    /// Starts dockerd in `/run/netns/<netns>`, waits until it answers (at most 60 s) and
    /// imports [`IMAGE`]. `prefix` names its directory; it must be unique (`unique_prefix`).
    pub fn start(netns: &str, prefix: &str) -> Dockerd {
        let dockerd = dockerd_bin();
        let docker = docker_bin();
        let dir = PathBuf::from(format!("/run/netctl-docker-{prefix}"));
        // A directory of a dead run whose pid and counter were the same.
        if dir.exists() {
            unmount_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(dir.join("client")).unwrap();
        // Its own (empty) daemon.json: nothing in /etc/docker/daemon.json applies.
        std::fs::write(dir.join("daemon.json"), "{}\n").unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let socket = dir.join("docker.sock");
        let first = (!Path::new("/etc/docker/key.json").exists())
            .then(|| FIRST_START.lock().unwrap_or_else(|e| e.into_inner()));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg(&dockerd)
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            // Should a system containerd run, dockerd uses it instead of starting its own:
            // keep this daemon's containers apart from any other's.
            .arg(format!("--containerd-namespace=netctl-{prefix}"))
            .arg(format!(
                "--containerd-plugins-namespace=netctl-{prefix}-plugins"
            ))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that a kill reaches whatever it forked in it.
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", dockerd.display()));
        // From here on, a panic drops `d`, which stops and removes everything.
        let mut d = Dockerd {
            socket,
            netns: netns.to_owned(),
            docker,
            child: Some(child),
            dir,
            graceful: true,
        };
        d.wait_ready();
        drop(first);
        d.import_image();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping_api(&self.socket) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "dockerd exited with {st} before answering; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer on {} in {} s; log:\n{}",
                self.socket.display(),
                START_TIMEOUT.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Builds a root file system from the host's static busybox (`bin/busybox` and a link per
    /// applet, empty `etc/` and `tmp/`) and imports it as [`IMAGE`].
    fn import_image(&self) {
        let busybox = Path::new("/bin/busybox");
        let bytes = std::fs::read(busybox).unwrap_or_else(|e| {
            panic!(
                "read {}: {e}; install the Debian package busybox-static (`cargo xtask setup` \
                 does)",
                busybox.display()
            )
        });
        assert!(
            elf_is_static(&bytes),
            "{} is not a static executable: install busybox-static (its busybox runs in an \
             image with no libc)",
            busybox.display()
        );
        let root = self.dir.join("rootfs");
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        std::fs::write(bin.join("busybox"), &bytes).unwrap();
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let list = crate::run_ok(busybox.to_str().unwrap(), &["--list"]);
        for applet in list.split_whitespace().filter(|a| *a != "busybox") {
            symlink("busybox", bin.join(applet)).unwrap();
        }
        let tar = self.dir.join("rootfs.tar");
        crate::run_ok(
            "tar",
            &[
                "-C",
                root.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        );
        self.ok(&[
            "import",
            "-c",
            r#"CMD ["/bin/sh"]"#,
            tar.to_str().unwrap(),
            IMAGE,
        ]);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_file(&tar);
    }

    /// dockerd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// dockerd's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// A docker client command for this daemon (`DOCKER_HOST`, a private client config).
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.docker);
        c.env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_API_VERSION")
            .stdin(Stdio::null());
        c
    }

    /// Runs `docker ARGS` against this daemon (failing the test if it takes over 120 s).
    pub fn docker(&self, args: &[&str]) -> Output {
        let (out, timed_out) = output_with_timeout(self.command().args(args), COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("run {}: {e}", self.docker.display()));
        assert!(
            !timed_out,
            "docker {args:?} did not finish in {} s; stdout: {}; stderr: {}",
            COMMAND_TIMEOUT.as_secs(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `docker ARGS` and asserts success; returns stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// Runs `docker ARGS` and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            !o.status.success(),
            "docker {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// `docker run -d --name NAME OPTS... IMAGE CMD...`; returns the container id.
    pub fn run(&self, name: &str, opts: &[&str], cmd: &[&str]) -> String {
        let mut a = vec!["run", "-d", "--name", name];
        a.extend_from_slice(opts);
        a.push(IMAGE);
        a.extend_from_slice(cmd);
        self.ok(&a)
    }

    /// `docker exec CONTAINER ARGS...`.
    pub fn exec(&self, container: &str, args: &[&str]) -> Output {
        let mut a = vec!["exec", container];
        a.extend_from_slice(args);
        self.docker(&a)
    }

    /// `docker exec CONTAINER sh -c SCRIPT`, asserting success; returns stdout.
    pub fn sh(&self, container: &str, script: &str) -> String {
        self.ok(&["exec", container, "sh", "-c", script])
    }

    /// Whether `container` gets replies to two pings of `to`.
    pub fn ping(&self, container: &str, to: Ipv4Addr) -> bool {
        self.exec(
            container,
            &["ping", "-c", "2", "-i", "0.2", "-W", "1", &to.to_string()],
        )
        .status
        .success()
    }

    /// `docker inspect` of one object.
    pub fn inspect(&self, what: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", what])).unwrap();
        v[0].clone()
    }

    /// The address of `container` on `network`.
    pub fn ip(&self, container: &str, network: &str) -> Ipv4Addr {
        let v = self.inspect(container);
        let ip = v["NetworkSettings"]["Networks"][network]["IPAddress"]
            .as_str()
            .unwrap_or_else(|| panic!("{container} is not on {network}: {v}"));
        ip.parse()
            .unwrap_or_else(|_| panic!("{container} on {network}: no address ({ip:?})"))
    }

    /// Docker's EndpointID (64 hex digits) of `container` on `network`.
    pub fn endpoint_id(&self, container: &str, network: &str) -> String {
        let v = self.inspect(container);
        v["NetworkSettings"]["Networks"][network]["EndpointID"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("{container} has no endpoint on {network}: {v}"))
            .to_owned()
    }

    /// Docker's network id (64 hex digits).
    pub fn network_id(&self, network: &str) -> String {
        self.ok(&["network", "inspect", "-f", "{{.ID}}", network])
    }

    /// Processes that belong to this daemon: dockerd, its containerd and the shims.
    pub fn processes(&self) -> Vec<u32> {
        daemon_processes(&self.dir)
    }

    fn cleanup(&mut self) {
        let mut pids = self.processes();
        let mut graceful = self.graceful && ping_api(&self.socket);
        if let Some(mut child) = self.child.take() {
            pids.push(child.id());
            if graceful && !self.remove_objects() {
                graceful = false;
            }
            if graceful {
                // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + STOP_TIMEOUT;
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // SAFETY: as above; -pid is the process group dockerd leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        // containerd and the shims lead groups of their own; after dockerd's shutdown they are
        // normally gone. Also any container init left behind (runc's state names it).
        pids.extend(self.container_inits());
        pids.extend(self.processes());
        if !graceful {
            for p in &pids {
                // SAFETY: as above; these are this daemon's processes.
                unsafe { libc::kill(*p as i32, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let alive: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
            if alive.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for p in &alive {
                    // SAFETY: as above; these are this daemon's processes.
                    unsafe { libc::kill(*p as i32, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(200));
                if Instant::now() >= deadline + Duration::from_secs(5) {
                    eprintln!(
                        "dockerd {}: processes still alive: {alive:?}",
                        self.dir.display()
                    );
                    break;
                }
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.remove_cgroups();
        unmount_under(&self.dir);
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "dockerd log of {} (last 60 lines):\n{}",
                self.dir.display(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("remove {}: {e}", self.dir.display());
        }
    }

    /// `docker rm -f` every container, then `docker network rm` every network it created, all
    /// within 60 s. False if that ran out (the plugin does not answer, say).
    fn remove_objects(&self) -> bool {
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        let docker = |args: &[&str]| -> Option<Output> {
            let left = deadline.saturating_duration_since(Instant::now());
            let (o, timed_out) = match output_with_timeout(self.command().args(args), left) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("docker {args:?}: {e}");
                    return None;
                }
            };
            if timed_out {
                eprintln!("docker {args:?}: no answer within the clean-up's 60 s");
                return None;
            }
            if !o.status.success() {
                eprintln!(
                    "docker {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Some(o)
        };
        let ids = |o: Output| -> Vec<String> {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        let Some(containers) = docker(&["ps", "-aq"]).map(ids) else {
            return false;
        };
        if !containers.is_empty() {
            let mut a = vec!["rm", "-f"];
            a.extend(containers.iter().map(String::as_str));
            if docker(&a).is_none() {
                return false;
            }
        }
        let Some(networks) = docker(&["network", "ls", "-q", "--filter", "type=custom"]).map(ids)
        else {
            return false;
        };
        networks
            .iter()
            .all(|n| docker(&["network", "rm", n]).is_some())
    }

    /// Container ids runc knows under this daemon's exec-root.
    fn container_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("exec/runtime-runc")) {
            for ns in rd.flatten() {
                if let Ok(rd) = std::fs::read_dir(ns.path()) {
                    ids.extend(
                        rd.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned()),
                    );
                }
            }
        }
        ids
    }

    /// Init processes of containers still running (from runc's state), checked against their
    /// cgroup so that a reused pid is never taken for one.
    fn container_inits(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for id in self.container_ids() {
            let Some(ns) = std::fs::read_dir(self.dir.join("exec/runtime-runc"))
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join(&id).join("state.json"))
                .find(|p| p.is_file())
            else {
                continue;
            };
            let Ok(state) = std::fs::read_to_string(ns) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&state) else {
                continue;
            };
            if let Some(pid) = v["init_process_pid"].as_u64() {
                let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                if cg.contains(&id) {
                    pids.push(pid as u32);
                }
            }
        }
        pids
    }

    /// Empty cgroups of this daemon's containers that runc did not get to remove.
    fn remove_cgroups(&self) {
        let ids = self.container_ids();
        if ids.is_empty() {
            return;
        }
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            roots.extend(rd.flatten().map(|e| e.path()));
        }
        for root in roots {
            for id in &ids {
                let _ = std::fs::remove_dir(root.join("docker").join(id));
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A [`Host`] whose agent is the network and IPAM plugin `plugin` of `dockerd`, which runs in
/// the host's namespace. Dereferences to the host. Dropping it removes Docker's containers
/// and networks while the agent still answers, then stops dockerd, then the host.
pub struct DockerHost {
    // Fields drop in this order (after `drop` ran).
    pub dockerd: Dockerd,
    pub host: Host,
    /// The plugin name (`-d` and `--ipam-driver` of `docker network create`).
    pub plugin: String,
    _socket: PluginSocket,
}

/// Removes the plugin's socket file, which a killed agent leaves behind.
struct PluginSocket(PathBuf);

impl Drop for PluginSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Host {
    /// A host with a dockerd in its namespace and an agent started with
    /// `--docker-plugin n<prefix> --docker-host <that dockerd's socket>`.
    pub fn with_docker() -> DockerHost {
        let mut host = Host::without_agent(false, &[]);
        let plugin = format!("n{}", host.prefix);
        let socket = PluginSocket(PathBuf::from(format!("/run/docker/plugins/{plugin}.sock")));
        let dockerd = Dockerd::start(&host.netns, &host.prefix);
        host.args.extend([
            "--docker-plugin".to_owned(),
            plugin.clone(),
            "--docker-host".to_owned(),
            dockerd.socket.display().to_string(),
        ]);
        host.start_agent();
        DockerHost {
            dockerd,
            host,
            plugin,
            _socket: socket,
        }
    }
}

impl DockerHost {
    /// `docker network create -d PLUGIN --ipam-driver PLUGIN --subnet SUBNET OPTS... NAME`,
    /// then waits until the agent lists it under that name; returns the agent's view of it.
    pub fn create_network(&self, name: &str, subnet: &str, opts: &[&str]) -> Value {
        let mut a = vec![
            "network",
            "create",
            "-d",
            &self.plugin,
            "--ipam-driver",
            &self.plugin,
            "--subnet",
            subnet,
        ];
        a.extend_from_slice(opts);
        a.push(name);
        self.dockerd.ok(&a);
        self.wait_network(name)
    }

    /// Waits (at most 15 s) until `netctl network ls` shows a network named `name` (the agent
    /// asks dockerd for a network's name after CreateNetwork returns); returns it.
    pub fn wait_network(&self, name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ls = self.host.json(&["network", "ls"]);
            if let Some(n) = ls.as_array().unwrap().iter().find(|n| n["name"] == name) {
                return n.clone();
            }
            assert!(
                Instant::now() < deadline,
                "network {name} not in `netctl network ls` after 15 s: {ls}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `netctl network inspect NAME`, the one object.
    pub fn netctl_network(&self, name: &str) -> Value {
        self.host.json(&["network", "inspect", name])[0].clone()
    }
}

impl Drop for DockerHost {
    fn drop(&mut self) {
        // A test that killed the agent and failed before starting it again: Docker cannot
        // reach its plugin, so its objects are not removed one by one (the host's namespace
        // goes anyway).
        if self.host.agent.is_none() {
            self.dockerd.graceful = false;
        }
    }
}

impl Deref for DockerHost {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl DerefMut for DockerHost {
    fn deref_mut(&mut self) -> &mut Host {
        &mut self.host
    }
}

/// Runs `cmd` (stdout and stderr captured) for at most `timeout`, then kills it. Returns its
/// output and whether it was killed. Never panics (the clean-up of a drop uses it).
pub fn output_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> std::io::Result<(Output, bool)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = reader(child.stdout.take().map(|r| Box::new(r) as _));
    let err = reader(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            timed_out = true;
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    Ok((output, timed_out))
}

/// `GET /_ping` on a Docker API socket answers `OK`.
fn ping_api(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    use std::io::Write;
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.") && resp.contains(" 200 ") && resp.ends_with("OK")
}

/// Whether `pid` is a live process (a zombie is not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Processes of the dockerd whose directory is `dir`: those whose command line names its
/// data-root or exec-root (or something in them) — dockerd, its containerd, the shims. Not the
/// agent, which names only `dir/docker.sock`.
pub fn daemon_processes(dir: &Path) -> Vec<u32> {
    let mut pids = processes_mentioning(&dir.join("data"));
    pids.extend(processes_mentioning(&dir.join("exec")));
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Processes whose command line mentions `dir` (or a path in it).
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            // Match whole path components: `<dir>` or `<dir>/...`, not `<dir>0`.
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.match_indices(&needle).any(|(i, _)| {
                matches!(
                    cmdline[i + needle.len()..].chars().next(),
                    None | Some('/') | Some(' ') | Some('"')
                )
            }) && alive(pid)
            {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    v
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts (lazily) everything mounted at or under `dir`, deepest first, until nothing is.
fn unmount_under(dir: &Path) {
    for _ in 0..10 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!("still mounted under {}: {left:?}", dir.display());
    }
}

/// Whether an ELF executable has no program interpreter (is statically linked).
fn elf_is_static(b: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let p = phoff + i * phentsize;
        // PT_INTERP = 3
        p + 4 <= b.len() && u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) != 3
    })
}
