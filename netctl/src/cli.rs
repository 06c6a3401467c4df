//! The `netctl` command line, in the habits of `docker network`.
//!
//! Every command but `up` is a client of the agent's socket. Success exits 0; any failure
//! prints one line on stderr and exits non-zero.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::agent::{NetworkView, SandboxView, Status};
use crate::api::{ConnectBody, CreateSandbox, DisconnectBody};
use crate::client::Client;
use crate::datapath::Stats;
use crate::model::{CreateNetwork, Endpoint};

pub const DEFAULT_SOCKET: &str = "/run/netctl/netctl.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netctl";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netctl";

#[derive(Parser, Debug)]
#[command(
    name = "netctl",
    version,
    about = "Container networking with an eBPF data plane, in the habits of `docker network`"
)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "NETCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the node agent (loads and pins the data plane, serves the API).
    Up(UpArgs),
    /// Remove everything netctl put in the kernel and stop the agent (the store is kept).
    Down,
    /// Agent, node, attached programs and map usage.
    Status(FormatArg),
    /// Data-plane counters summed over CPUs: packets, bytes, drops by reason.
    Stats(FormatArg),
    /// Reconcile the kernel with the store now, and show what had to be repaired.
    Reconcile(FormatArg),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage sandboxes (named network namespaces).
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Manage services (a VIP balanced over backends, or DNS round robin).
    #[command(subcommand)]
    Service(ServiceCmd),
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Add a service on a network.
    Add {
        name: String,
        /// The service's network.
        #[arg(long)]
        network: String,
        /// PORT[:TARGET][/tcp|/udp]: VIP:PORT goes to backend:TARGET (default PORT, tcp).
        #[arg(long = "port")]
        port: Vec<String>,
        /// vip (a virtual IP balanced in the data plane) or dnsrr (DNS round robin).
        #[arg(long, default_value = "vip")]
        mode: String,
        /// The VIP (default: the next free address of the network).
        #[arg(long)]
        vip: Option<String>,
    },
    /// Make an endpoint on the service's network a backend. TARGET: a sandbox name, an
    /// endpoint id or a unique prefix of it (Docker's EndpointID), or an endpoint address.
    Attach {
        service: String,
        #[arg(value_name = "TARGET")]
        sandbox: String,
    },
    /// Stop an endpoint being a backend (TARGET as for attach).
    Detach {
        service: String,
        #[arg(value_name = "TARGET")]
        sandbox: String,
    },
    /// List services.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Display a service: VIP, ports, mode, backends (JSON).
    Inspect(InspectArgs),
    /// Remove one or more services.
    #[command(alias = "remove")]
    Rm(NamesArgs),
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the embedded store lives.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Where maps, programs and links are pinned (on bpffs).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The node's uplink interface (gets the uplink program).
    #[arg(long)]
    pub uplink: Option<String>,
    /// Seconds between full reconciliations of the kernel against the store.
    #[arg(long, default_value_t = 30)]
    pub resync_interval: u64,
    /// Services the load-balancing tables are sized for (each takes a Maglev row of 1021
    /// slots: 4 KiB of kernel memory).
    #[arg(long, default_value_t = netctl_common::MAX_SERVICES)]
    pub max_services: u32,
    /// Entries of the conntrack table (an LRU hash) for service flows.
    #[arg(long, default_value_t = netctl_common::CT_DEFAULT_SIZE)]
    pub conntrack_size: u32,
    /// How long an idle established TCP flow to a service is kept (e.g. 6h, 90m).
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    pub ct_timeout_established: Duration,
    /// How long a TCP flow being opened (SYN seen) is kept.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ct_timeout_syn: Duration,
    /// How long a TCP flow is kept after a FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ct_timeout_closing: Duration,
    /// How long an idle UDP flow is kept.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub ct_timeout_udp: Duration,
    /// Upstream DNS server (IP or IP:PORT) for names netctl does not know; repeatable.
    /// Default: the nameservers of /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_parser = parse_upstream)]
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// Serve Docker's network driver and IPAM plugin API as this plugin name, on
    /// /run/docker/plugins/NAME.sock (`docker network create -d NAME --ipam-driver NAME`);
    /// `off` disables it.
    #[arg(long, default_value = "netctl")]
    pub docker_plugin: String,
    /// The dockerd socket, which the agent asks for the names of the networks Docker creates.
    #[arg(long, default_value = "/var/run/docker.sock")]
    pub docker_host: PathBuf,
    /// An address Docker was handed but put on no endpoint for this long is reclaimed as
    /// leaked by a crash (at the next reconciliation).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub docker_address_grace: Duration,
}

fn parse_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("dns-upstream: invalid value {s:?}: expected IP or IP:PORT"))
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `ls`: a table, JSON, or names only.
#[derive(Args, Debug)]
pub struct LsArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Only names.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `inspect NAME...` (JSON, an array as `docker ... inspect` prints).
#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
}

/// `rm NAME...`.
#[derive(Args, Debug)]
pub struct NamesArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        /// Driver to manage the network.
        #[arg(short = 'd', long, default_value = "bridge")]
        driver: String,
        /// Subnet in CIDR format (default: a free one from the default pool).
        #[arg(long)]
        subnet: Option<String>,
        /// Allocate endpoint addresses from this sub-range.
        #[arg(long)]
        ip_range: Option<String>,
        /// Gateway address (default: the first address of the subnet).
        #[arg(long)]
        gateway: Option<String>,
        /// Address IPAM must not hand out, KEY=IP.
        #[arg(long = "aux-address")]
        aux_address: Vec<String>,
        /// Driver option, KEY=VALUE (com.docker.network.bridge.name=NAME names the bridge).
        #[arg(short = 'o', long = "opt")]
        opt: Vec<String>,
        /// Restrict external access to the network.
        #[arg(long)]
        internal: bool,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Display detailed information on one or more networks (JSON).
    Inspect(InspectArgs),
    /// Remove one or more networks.
    #[command(alias = "remove")]
    Rm(NamesArgs),
    /// Connect a sandbox to a network.
    Connect {
        network: String,
        sandbox: String,
        /// IPv4 address (default: the next free one).
        #[arg(long)]
        ip: Option<String>,
        /// Network-scoped alias for the sandbox.
        #[arg(long = "alias")]
        alias: Vec<String>,
    },
    /// Disconnect a sandbox from a network.
    Disconnect { network: String, sandbox: String },
}

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Create a sandbox: a named network namespace with `lo` up.
    Create { name: String },
    /// List sandboxes.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Remove one or more sandboxes (disconnecting them from every network).
    #[command(alias = "remove")]
    Rm(NamesArgs),
}

/// Entry point of the binary: returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    2
                } else {
                    0
                };
            }
            // One line, as for every other error: clap's message without its usage block.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", msg.join(" "));
            return 2;
        }
    };
    if !matches!(cli.cmd, Cmd::Up(_)) {
        // A client piped into `head` should end quietly, as other command-line tools do,
        // not panic on a broken pipe. The agent keeps Rust's default (ignored).
        // SAFETY: setting a signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for c in e.chain().skip(1) {
        let c = c.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s.replace('\n', " ")
}

/// Percent-encodes a name for a URL path segment (RFC 3986 section 2.3 unreserved set
/// passes through). Names are validated by the agent; this only keeps a bad one from
/// changing the path.
fn seg(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A name that is part of a URL path must not be empty (the path would name the list).
fn path_name(kind: &str, name: &str) -> anyhow::Result<String> {
    if name.is_empty() {
        anyhow::bail!("{kind}: invalid value \"\": must not be empty");
    }
    Ok(seg(name))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let c = Client::new(&cli.socket);
    match cli.cmd {
        Cmd::Up(args) => up(cli.socket, args).await,
        Cmd::Down => {
            let _: Value = c.post("/v1/down", &serde_json::json!({})).await?;
            // Return once the agent has stopped answering (it removes its socket on exit).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while tokio::net::UnixStream::connect(&cli.socket).await.is_ok()
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!(
                "netctl is down: its links, programs, maps, bridges, veths and sandboxes are gone; the store is kept"
            );
            Ok(())
        }
        Cmd::Status(f) => {
            let s: Status = c.get("/v1/status").await?;
            print_status(&s, f.format)
        }
        Cmd::Stats(f) => {
            let s: Stats = c.get("/v1/stats").await?;
            print_stats(&s, f.format)
        }
        Cmd::Reconcile(f) => {
            let r: crate::reconcile::Report =
                c.post("/v1/reconcile", &serde_json::json!({})).await?;
            if f.format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                table(
                    &["KIND", "ADDED", "UPDATED", "REMOVED"],
                    [
                        ("netlink", r.netlink),
                        ("maps", r.maps),
                        ("links", r.links),
                        ("store", r.store),
                    ]
                    .iter()
                    .map(|(k, d)| {
                        vec![
                            k.to_string(),
                            d.added.to_string(),
                            d.updated.to_string(),
                            d.removed.to_string(),
                        ]
                    })
                    .collect(),
                );
            }
            Ok(())
        }
        Cmd::Network(n) => network(&c, n).await,
        Cmd::Sandbox(s) => sandbox(&c, s).await,
        Cmd::Service(s) => service(&c, s).await,
    }
}

async fn up(socket: PathBuf, args: UpArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("netctl up must run as root (it loads eBPF programs and creates links)");
    }
    // Bind first: a second agent on the same socket must not touch the kernel at all.
    let listener = crate::api::bind(&socket).await?;
    let plugin = if args.docker_plugin == "off" {
        None
    } else {
        let bound = async {
            crate::docker::check_plugin_name(&args.docker_plugin).map_err(anyhow::Error::msg)?;
            let path = crate::docker::socket_path(&args.docker_plugin);
            let l = crate::api::bind(&path).await?;
            Ok::<_, anyhow::Error>((l, path))
        }
        .await;
        match bound {
            Ok(b) => Some(b),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        }
    };
    let opts = crate::agent::Options {
        state_dir: args.state_dir,
        socket: socket.clone(),
        pin_dir: args.pin_dir,
        uplink: args.uplink,
        resync: Duration::from_secs(args.resync_interval.max(1)),
        conntrack_size: args.conntrack_size,
        ct_syn: args.ct_timeout_syn,
        ct_established: args.ct_timeout_established,
        ct_closing: args.ct_timeout_closing,
        ct_udp: args.ct_timeout_udp,
        max_services: args.max_services,
        docker_address_grace: args.docker_address_grace,
        dns_upstreams: if args.dns_upstream.is_empty() {
            crate::dns::upstreams_from_resolv_conf(std::path::Path::new("/etc/resolv.conf"))
        } else {
            args.dns_upstream
        },
    };
    let agent = match crate::agent::Agent::start(opts.clone()).await {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            if let Some((_, p)) = &plugin {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    crate::agent::spawn_resync(agent.clone(), opts.resync);
    crate::agent::spawn_dns_updater(agent.clone());
    if let Some((l, path)) = plugin {
        for id in agent.lock().await.docker_unnamed() {
            crate::docker::spawn_namer(agent.clone(), args.docker_host.clone(), id);
        }
        tracing::info!(socket = %path.display(), "serving the Docker plugin API");
        let (a, host) = (agent.clone(), args.docker_host.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::docker::serve(a, l, host).await {
                tracing::error!("docker plugin: {e}");
            }
        });
        // Docker finds a plugin by its socket file: take it away when the agent stops.
        let r = serve_api(agent, listener, &socket).await;
        let _ = std::fs::remove_file(&path);
        return r;
    }
    serve_api(agent, listener, &socket).await
}

async fn serve_api(
    agent: crate::agent::Shared,
    listener: tokio::net::UnixListener,
    socket: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    tracing::info!(socket = %socket.display(), "serving the API");
    crate::api::serve(agent, listener, socket)
        .await
        .context("serve the API")
}

async fn network(c: &Client, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            driver,
            subnet,
            ip_range,
            gateway,
            aux_address,
            opt,
            internal,
        } => {
            let req = CreateNetwork {
                name,
                driver: Some(driver),
                subnet,
                ip_range,
                gateway,
                aux_addresses: aux_address,
                options: opt,
                internal,
            };
            let n: NetworkView = c.post("/v1/networks", &req).await?;
            println!("{}", n.network.name);
        }
        NetworkCmd::Ls(LsArgs { format, quiet }) => {
            let ns: Vec<NetworkView> = c.get("/v1/networks").await?;
            print_list(
                &ns,
                format,
                quiet,
                |n| &n.network.name,
                &[
                    "NAME",
                    "DRIVER",
                    "SUBNET",
                    "GATEWAY",
                    "BRIDGE",
                    "INTERNAL",
                    "ENDPOINTS",
                ],
                |n| {
                    vec![
                        n.network.name.clone(),
                        n.network.driver.clone(),
                        n.network.subnet.to_string(),
                        n.network.gateway.to_string(),
                        n.network.bridge.clone(),
                        if n.network.internal { "yes" } else { "no" }.into(),
                        n.endpoints.len().to_string(),
                    ]
                },
            )?;
        }
        NetworkCmd::Inspect(InspectArgs { names, format: _ }) => {
            // Like `docker network inspect`: a JSON array, one object per name.
            let mut out = Vec::new();
            for n in &names {
                let v: NetworkView = c
                    .get(&format!("/v1/networks/{}", path_name("network", n)?))
                    .await?;
                out.push(v);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        NetworkCmd::Rm(NamesArgs { names }) => {
            for n in &names {
                let _: Value = c
                    .delete(&format!("/v1/networks/{}", path_name("network", n)?))
                    .await?;
                println!("{n}");
            }
        }
        NetworkCmd::Connect {
            network,
            sandbox,
            ip,
            alias,
        } => {
            let body = ConnectBody {
                sandbox,
                ip,
                aliases: alias,
            };
            let ep: Endpoint = c
                .post(
                    &format!("/v1/networks/{}/connect", path_name("network", &network)?),
                    &body,
                )
                .await?;
            println!("{} {} {}", ep.ifname, ep.ip, ep.id);
        }
        NetworkCmd::Disconnect { network, sandbox } => {
            let _: Value = c
                .post(
                    &format!(
                        "/v1/networks/{}/disconnect",
                        path_name("network", &network)?
                    ),
                    &DisconnectBody { sandbox },
                )
                .await?;
        }
    }
    Ok(())
}

async fn sandbox(c: &Client, cmd: SandboxCmd) -> anyhow::Result<()> {
    match cmd {
        SandboxCmd::Create { name } => {
            let s: SandboxView = c.post("/v1/sandboxes", &CreateSandbox { name }).await?;
            println!("{}", s.sandbox.name);
        }
        SandboxCmd::Ls(LsArgs { format, quiet }) => {
            let ss: Vec<SandboxView> = c.get("/v1/sandboxes").await?;
            print_list(
                &ss,
                format,
                quiet,
                |s| &s.sandbox.name,
                &["NAME", "NETNS", "ENDPOINTS"],
                |s| {
                    let eps = s
                        .endpoints
                        .iter()
                        .map(|e| format!("{}:{}={}", e.network, e.ifname, e.ip))
                        .collect::<Vec<_>>()
                        .join(",");
                    vec![s.sandbox.name.clone(), s.netns.clone(), eps]
                },
            )?;
        }
        SandboxCmd::Rm(NamesArgs { names }) => {
            for n in &names {
                let _: Value = c
                    .delete(&format!("/v1/sandboxes/{}", path_name("sandbox", n)?))
                    .await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

/// An `ls`: JSON, names only (`-q`), or a table.
fn print_list<T: serde::Serialize>(
    items: &[T],
    format: Format,
    quiet: bool,
    name: impl Fn(&T) -> &String,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else if quiet {
        for i in items {
            println!("{}", name(i));
        }
    } else {
        table(header, items.iter().map(row).collect());
    }
    Ok(())
}

async fn service(c: &Client, cmd: ServiceCmd) -> anyhow::Result<()> {
    use crate::model::{AddService, Service, ServiceMode};
    let path = |n: &str| -> anyhow::Result<String> {
        Ok(format!("/v1/services/{}", path_name("service", n)?))
    };
    match cmd {
        ServiceCmd::Add {
            name,
            network,
            port,
            mode,
            vip,
        } => {
            let req = AddService {
                name,
                network,
                ports: port,
                mode: Some(mode),
                vip,
            };
            let s: Service = c.post("/v1/services", &req).await?;
            match s.vip {
                Some(v) => println!("{} {v}", s.name),
                None => println!("{}", s.name),
            }
        }
        ServiceCmd::Attach { service, sandbox } => {
            let s: Service = c
                .post(
                    &format!("{}/attach", path(&service)?),
                    &crate::api::TargetBody { target: sandbox },
                )
                .await?;
            println!("{} {} backends", s.name, s.backends.len());
        }
        ServiceCmd::Detach { service, sandbox } => {
            let s: Service = c
                .post(
                    &format!("{}/detach", path(&service)?),
                    &crate::api::TargetBody { target: sandbox },
                )
                .await?;
            println!("{} {} backends", s.name, s.backends.len());
        }
        ServiceCmd::Ls(LsArgs { format, quiet }) => {
            let ss: Vec<Service> = c.get("/v1/services").await?;
            print_list(
                &ss,
                format,
                quiet,
                |s| &s.name,
                &["NAME", "NETWORK", "MODE", "VIP", "PORTS", "BACKENDS"],
                |s| {
                    vec![
                        s.name.clone(),
                        s.network.clone(),
                        match s.mode {
                            ServiceMode::Vip => "vip",
                            ServiceMode::Dnsrr => "dnsrr",
                        }
                        .into(),
                        s.vip.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                        s.ports
                            .iter()
                            .map(|p| {
                                let proto = match p.proto {
                                    crate::model::Proto::Tcp => "tcp",
                                    crate::model::Proto::Udp => "udp",
                                };
                                if p.port == p.target {
                                    format!("{}/{proto}", p.port)
                                } else {
                                    format!("{}:{}/{proto}", p.port, p.target)
                                }
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                        s.backends.len().to_string(),
                    ]
                },
            )?;
        }
        ServiceCmd::Inspect(InspectArgs { names, format: _ }) => {
            let mut out = Vec::new();
            for n in &names {
                let v: Service = c.get(&path(n)?).await?;
                out.push(v);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ServiceCmd::Rm(NamesArgs { names }) => {
            for n in &names {
                let _: Value = c.delete(&path(n)?).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_status(s: &Status, f: Format) -> anyhow::Result<()> {
    if f == Format::Json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let a = &s.agent;
    println!("Agent:      running (pid {}, netctl {})", a.pid, a.version);
    println!("Node:       {}", a.node);
    println!("Socket:     {}", a.socket);
    println!("Store:      {}", a.store);
    println!(
        "Pins:       {} ({})",
        a.pin_dir,
        if a.adopted {
            "adopted from an earlier agent"
        } else {
            "loaded by this agent"
        }
    );
    println!("Uplink:     {}", a.uplink.as_deref().unwrap_or("-"));
    println!(
        "State:      {} networks, {} sandboxes, {} endpoints",
        s.networks, s.sandboxes, s.endpoints
    );
    println!(
        "Reconcile:  {} runs, {} objects repaired{}",
        s.reconcile.runs,
        s.reconcile.drift_repaired,
        s.reconcile
            .last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    println!();
    table(
        &["PROGRAM", "INTERFACE", "HOOK"],
        s.programs
            .iter()
            .map(|p| vec![p.program.clone(), p.interface.clone(), p.hook.clone()])
            .collect(),
    );
    println!();
    table(
        &["MAP", "TYPE", "ENTRIES", "MAX", "FULL", "PIN"],
        s.maps
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.kind.clone(),
                    m.entries.to_string(),
                    m.max_entries.to_string(),
                    // An array always holds max_entries slots: "full" means nothing there.
                    if m.kind.ends_with("array") {
                        "-".to_owned()
                    } else {
                        format!(
                            "{:.1}%",
                            100.0 * m.entries as f64 / f64::from(m.max_entries.max(1))
                        )
                    },
                    m.pin.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

fn print_stats(s: &Stats, f: Format) -> anyhow::Result<()> {
    if f == Format::Json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let mut rows = vec![
        vec![
            "pass".into(),
            "from_endpoints".into(),
            s.from_endpoints.packets.to_string(),
            s.from_endpoints.bytes.to_string(),
        ],
        vec![
            "pass".into(),
            "to_endpoints".into(),
            s.to_endpoints.packets.to_string(),
            s.to_endpoints.bytes.to_string(),
        ],
        vec![
            "pass".into(),
            "uplink".into(),
            s.uplink.packets.to_string(),
            s.uplink.bytes.to_string(),
        ],
    ];
    for (event, c) in &s.events {
        rows.push(vec![
            "event".into(),
            event.clone(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    for (reason, c) in &s.drops {
        rows.push(vec![
            "drop".into(),
            reason.clone(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    table(&["VERDICT", "COUNTER", "PACKETS", "BYTES"], rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_docker_style_network_create() {
        let c = Cli::try_parse_from([
            "netctl",
            "network",
            "create",
            "n1",
            "-d",
            "bridge",
            "--subnet",
            "10.9.0.0/24",
            "--ip-range",
            "10.9.0.128/25",
            "--gateway",
            "10.9.0.254",
            "--aux-address",
            "a=10.9.0.5",
            "--aux-address",
            "b=10.9.0.6",
            "-o",
            "com.docker.network.bridge.name=br9",
            "--internal",
        ])
        .unwrap();
        let Cmd::Network(NetworkCmd::Create {
            aux_address,
            opt,
            internal,
            ..
        }) = c.cmd
        else {
            panic!("wrong command")
        };
        assert_eq!(aux_address, vec!["a=10.9.0.5", "b=10.9.0.6"]);
        assert_eq!(opt, vec!["com.docker.network.bridge.name=br9"]);
        assert!(internal);
    }

    #[test]
    fn up_accepts_socket_after_the_subcommand() {
        let c = Cli::try_parse_from([
            "netctl",
            "up",
            "--state-dir",
            "/tmp/x",
            "--socket",
            "/tmp/x.sock",
            "--pin-dir",
            "/sys/fs/bpf/x",
            "--uplink",
            "eth0",
        ])
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("a/b"), "a%2Fb");
        assert_eq!(seg("web-1.x_y"), "web-1.x_y");
        assert!(path_name("network", "").is_err());
    }
}
