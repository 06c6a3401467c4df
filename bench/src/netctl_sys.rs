//! netctl as a system under test: a real agent (the release binary) in a host namespace of
//! its own, a network, a client sandbox and backend sandboxes, and services programmed
//! through the agent's API (the batch call for N at once, the single calls for one).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netctl::client::Client;
use netctl::model::{AddService, BatchService};
use serde_json::Value;

pub struct NetctlSys {
    pub prefix: String,
    pub host: String,
    pub client: String,
    pub backends: Vec<String>,
    pub backend_ips: Vec<Ipv4Addr>,
    pub network: String,
    socket: PathBuf,
    dir: PathBuf,
    pin_dir: PathBuf,
    agent: Option<Child>,
    rt: tokio::runtime::Runtime,
    /// Services programmed so far, in order (names `s0`, `s1`, ...).
    pub services: Vec<(String, Ipv4Addr)>,
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd}"))?;
    if !o.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

impl NetctlSys {
    /// Starts the agent and builds the network: `n_backends` backends and one client on
    /// 10.160.0.0/15 (room for 100k VIPs).
    pub fn start(netctl_bin: &Path, tag: &str, n_backends: usize) -> Result<NetctlSys> {
        let prefix = format!("nb{}{tag}", std::process::id());
        let host = format!("{prefix}-h");
        let dir = std::env::temp_dir().join(format!("netctl-bench-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run("ip", &["netns", "add", &host])?;
        run("ip", &["-n", &host, "link", "set", "lo", "up"])?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut sys = NetctlSys {
            socket: dir.join("netctl.sock"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/netctl-bench-{prefix}")),
            client: format!("{prefix}-c"),
            backends: (1..=n_backends).map(|i| format!("{prefix}-b{i}")).collect(),
            backend_ips: Vec::new(),
            network: format!("{prefix}-n"),
            prefix,
            host,
            dir,
            agent: None,
            rt,
            services: Vec::new(),
        };
        let log = std::fs::File::create(sys.dir.join("agent.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", sys.host))
            .arg(netctl_bin)
            .arg("up")
            .arg("--state-dir")
            .arg(sys.dir.join("state"))
            .arg("--socket")
            .arg(&sys.socket)
            .arg("--pin-dir")
            .arg(&sys.pin_dir)
            // No periodic full resync in the middle of a measurement.
            .args(["--resync-interval", "86400", "--conntrack-size", "1048576"])
            // Tables for the largest size the bench programs.
            .args(["--max-services", "131072"])
            // The bench agent is not Docker's plugin.
            .args(["--docker-plugin", "off"])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start netctl up")?;
        sys.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sys.get("/v1/status").is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the netctl agent did not answer in 30 s (log in {})",
                    sys.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        sys.post(
            "/v1/networks",
            &serde_json::json!({"name": sys.network, "subnet": "10.160.0.0/15"}),
        )?;
        let mut members = vec![sys.client.clone()];
        members.extend(sys.backends.clone());
        for sb in &members {
            sys.post("/v1/sandboxes", &serde_json::json!({ "name": sb }))?;
            let ep = sys.post(
                &format!("/v1/networks/{}/connect", sys.network),
                &serde_json::json!({ "sandbox": sb }),
            )?;
            if sb != &sys.client {
                sys.backend_ips
                    .push(ep["ip"].as_str().unwrap_or_default().parse()?);
            }
        }
        Ok(sys)
    }

    fn get(&self, path: &str) -> Result<Value> {
        let c = Client::new(&self.socket);
        Ok(self.rt.block_on(c.get::<Value>(path))?)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let c = Client::new(&self.socket);
        Ok(self.rt.block_on(c.post::<Value, Value>(path, body))?)
    }

    fn delete(&self, path: &str) -> Result<Value> {
        let c = Client::new(&self.socket);
        Ok(self.rt.block_on(c.delete::<Value>(path))?)
    }

    fn batch(&self, from: usize, to: usize, port: u16, target: u16) -> Vec<BatchService> {
        (from..to)
            .map(|i| BatchService {
                service: AddService {
                    name: format!("s{i}"),
                    network: self.network.clone(),
                    ports: vec![format!("{port}:{target}")],
                    ..Default::default()
                },
                backends: self.backends.clone(),
            })
            .collect()
    }

    /// Programs services until there are `n` (each `port` -> backends' `target`), in one
    /// batch call; returns the time the call took (to the moment the maps hold them).
    pub fn grow_to(&mut self, n: usize, port: u16, target: u16) -> Result<Duration> {
        let have = self.services.len();
        if n <= have {
            return Ok(Duration::ZERO);
        }
        let body = serde_json::json!({ "services": self.batch(have, n, port, target) });
        let t = Instant::now();
        self.post("/v1/services/batch", &body)?;
        let took = t.elapsed();
        let all = self.get("/v1/services")?;
        let mut vips: Vec<(String, Ipv4Addr)> = all
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        Some((
                            s["name"].as_str()?.to_owned(),
                            s["vip"].as_str()?.parse().ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        vips.sort_by_key(|(name, _)| name[1..].parse::<usize>().unwrap_or(usize::MAX));
        self.services = vips;
        Ok(took)
    }

    /// Removes every service (one batch call); returns its time.
    pub fn clear(&mut self) -> Result<Duration> {
        let names: Vec<String> = self.services.iter().map(|(n, _)| n.clone()).collect();
        let t = Instant::now();
        self.post(
            "/v1/services/batch",
            &serde_json::json!({ "remove": names }),
        )?;
        let took = t.elapsed();
        self.services.clear();
        Ok(took)
    }

    /// Adds one service with its backends, as a user would (service add, then one attach
    /// per backend), and returns the time until the last call returned.
    pub fn add_one(&mut self, name: &str, port: u16, target: u16) -> Result<Duration> {
        let body = serde_json::json!({ "services": self.batch(0, 1, port, target)
            .into_iter()
            .map(|mut b| { b.service.name = name.to_owned(); b })
            .collect::<Vec<_>>() });
        let t = Instant::now();
        self.post("/v1/services/batch", &body)?;
        Ok(t.elapsed())
    }

    pub fn remove_one(&mut self, name: &str) -> Result<Duration> {
        let t = Instant::now();
        self.delete(&format!("/v1/services/{name}"))?;
        Ok(t.elapsed())
    }
}

impl Drop for NetctlSys {
    fn drop(&mut self) {
        if self.agent.is_some() {
            let _ = self.post("/v1/down", &serde_json::json!({}));
        }
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&self.prefix) {
                    let _ = run("ip", &["netns", "del", &n]);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/etc/netns") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let _ = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&self.pin_dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
