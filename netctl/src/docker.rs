//! Docker's remote network driver and IPAM plugin API (libnetwork's "remote" driver), served
//! on `/run/docker/plugins/NAME.sock`.
//!
//! Docker POSTs JSON to `/Plugin.Activate`, `/NetworkDriver.*` and `/IpamDriver.*` (without
//! a content type, so bodies are read as bytes, not through axum's `Json`). Every failure
//! is answered in Docker's error shape, `{"Err": "..."}`, which Docker shows to the user as
//! its error line; nothing here panics on input. Each call is translated to an agent
//! operation on the same model, store and data plane as the CLI's.
//!
//! Docker does not tell drivers a network's name, so after CreateNetwork the agent asks
//! dockerd (`--docker-host`) for it and renames the network (see [`spawn_namer`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::Method;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::agent::{AgentError, Shared};
use crate::model::CreateNetwork;

/// The content type of plugin answers.
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// Docker's address spaces for this IPAM driver.
pub const LOCAL_SPACE: &str = "netctl-local";
pub const GLOBAL_SPACE: &str = "netctl-global";
/// Docker's option keys.
const OPT_GENERIC: &str = "com.docker.network.generic";
const OPT_INTERNAL: &str = "com.docker.network.internal";
const OPT_IPV6: &str = "com.docker.network.enable_ipv6";
const OPT_PORTMAP: &str = "com.docker.network.portmap";
const OPT_ADDRESS_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";

/// The socket Docker finds a plugin named `name` at.
pub fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/docker/plugins/{name}.sock"))
}

/// A plugin name Docker accepts and that is safe in a path.
pub fn check_plugin_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.'
        })
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "docker-plugin: invalid value {name:?}: expected 1 to 64 of a-z 0-9 _ . - (starting with a letter or digit), or \"off\""
        ))
    }
}

#[derive(Clone)]
struct Ctx {
    agent: Shared,
    docker_host: PathBuf,
}

/// A plugin failure: Docker's error shape with an HTTP status.
struct PluginError(StatusCode, String);

impl IntoResponse for PluginError {
    fn into_response(self) -> Response {
        answer(self.0, json!({ "Err": format!("netctl: {}", self.1) }))
    }
}

impl From<AgentError> for PluginError {
    fn from(e: AgentError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        PluginError(status, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> PluginError {
    PluginError(StatusCode::BAD_REQUEST, msg.into())
}

fn answer(status: StatusCode, v: Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    r
}

type Reply = Result<Value, PluginError>;

/// Decodes a request body; an empty body is `{}` (Docker sends none to some calls).
fn decode<T: DeserializeOwned>(call: &str, body: &Bytes) -> Result<T, PluginError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad(format!("{call}: malformed request: {e}")))
}

/// A required string field, named as Docker names it.
fn required<'a>(field: &str, v: &'a Option<String>) -> Result<&'a str, PluginError> {
    match v.as_deref() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(bad(format!("{field}: missing"))),
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RequestPool {
    address_space: Option<String>,
    pool: Option<String>,
    sub_pool: Option<String>,
    #[serde(rename = "V6", default)]
    v6: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct PoolRef {
    #[serde(rename = "PoolID")]
    pool_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RequestAddress {
    #[serde(rename = "PoolID")]
    pool_id: Option<String>,
    address: Option<String>,
    options: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct IpamData {
    pool: Option<String>,
    gateway: Option<String>,
    #[serde(default)]
    aux_addresses: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct CreateNetworkReq {
    #[serde(rename = "NetworkID")]
    network_id: Option<String>,
    #[serde(rename = "Options", default)]
    options: Option<BTreeMap<String, Value>>,
    #[serde(rename = "IPv4Data", default)]
    ipv4: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data", default)]
    ipv6: Option<Vec<Value>>,
}

#[derive(Deserialize, Default)]
struct NetworkRef {
    #[serde(rename = "NetworkID")]
    network_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Iface {
    address: Option<String>,
    #[serde(rename = "AddressIPv6")]
    address_ipv6: Option<String>,
    mac_address: Option<String>,
}

#[derive(Deserialize, Default)]
struct EndpointReq {
    #[serde(rename = "NetworkID")]
    network_id: Option<String>,
    #[serde(rename = "EndpointID")]
    endpoint_id: Option<String>,
    #[serde(rename = "Interface")]
    interface: Option<Iface>,
    #[serde(rename = "SandboxKey")]
    sandbox_key: Option<String>,
    #[serde(rename = "Options")]
    options: Option<BTreeMap<String, Value>>,
}

/// Docker's address `IP/LEN` without the length.
fn strip_len(s: &str) -> &str {
    s.split_once('/').map_or(s, |(a, _)| a)
}

/// Docker's CreateNetwork as netctl's network create (the name is the agent's to choose).
fn network_request(req: &CreateNetworkReq) -> Result<CreateNetwork, PluginError> {
    if req.ipv6.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(bad(
            "IPv6Data: netctl networks are IPv4 only; drop --ipv6 and IPv6 subnets",
        ));
    }
    let opts = req.options.clone().unwrap_or_default();
    if opts.get(OPT_IPV6).and_then(Value::as_bool) == Some(true) {
        return Err(bad(format!(
            "{OPT_IPV6}: netctl networks are IPv4 only; drop --ipv6"
        )));
    }
    let v4 = req.ipv4.as_deref().unwrap_or_default();
    let [d] = v4 else {
        return Err(bad(format!(
            "IPv4Data: netctl takes exactly one IPv4 subnet per network, got {}",
            v4.len()
        )));
    };
    let mut options = Vec::new();
    if let Some(generic) = opts.get(OPT_GENERIC) {
        let Some(map) = generic.as_object() else {
            return Err(bad(format!(
                "{OPT_GENERIC}: expected an object, got {generic}"
            )));
        };
        for (k, v) in map {
            match v {
                Value::String(s) => options.push(format!("{k}={s}")),
                other => options.push(format!("{k}={other}")),
            }
        }
    }
    Ok(CreateNetwork {
        name: String::new(),
        driver: None,
        subnet: Some(required("IPv4Data.Pool", &d.pool)?.to_string()),
        ip_range: None,
        gateway: non_empty(&d.gateway).map(|g| strip_len(g).to_string()),
        aux_addresses: d
            .aux_addresses
            .iter()
            .map(|(k, v)| format!("{k}={}", strip_len(v)))
            .collect(),
        options,
        internal: opts.get(OPT_INTERNAL).and_then(Value::as_bool) == Some(true),
    })
}

async fn call(
    State(c): State<Ctx>,
    http: Method,
    UrlPath(method): UrlPath<String>,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let reply = if http == Method::POST {
        dispatch(&c, &method, &body).await
    } else {
        Err(PluginError(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method}: plugin calls are POST, not {http}"),
        ))
    };
    tracing::debug!(call = %method, us = started.elapsed().as_micros() as u64, ok = reply.is_ok(), "docker: call");
    match reply {
        Ok(v) => answer(StatusCode::OK, v),
        Err(e) => {
            tracing::warn!(call = %method, "docker: {}", e.1);
            e.into_response()
        }
    }
}

async fn dispatch(c: &Ctx, method: &str, body: &Bytes) -> Reply {
    match method {
        "Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
        "NetworkDriver.GetCapabilities" => {
            Ok(json!({ "Scope": "local", "ConnectivityScope": "local" }))
        }
        "NetworkDriver.CreateNetwork" => {
            let req: CreateNetworkReq = decode(method, body)?;
            let id = required("NetworkID", &req.network_id)?.to_string();
            let net = network_request(&req)?;
            c.agent.lock().await.docker_create_network(&id, net).await?;
            spawn_namer(c.agent.clone(), c.docker_host.clone(), id);
            Ok(json!({}))
        }
        "NetworkDriver.DeleteNetwork" => {
            let req: NetworkRef = decode(method, body)?;
            let id = required("NetworkID", &req.network_id)?;
            c.agent.lock().await.docker_delete_network(id).await?;
            Ok(json!({}))
        }
        "NetworkDriver.CreateEndpoint" => {
            let req: EndpointReq = decode(method, body)?;
            let net = required("NetworkID", &req.network_id)?;
            let id = required("EndpointID", &req.endpoint_id)?;
            let iface = req.interface.unwrap_or_default();
            if non_empty(&iface.address_ipv6).is_some() {
                return Err(bad("Interface.AddressIPv6: netctl endpoints are IPv4 only"));
            }
            let addr = required("Interface.Address", &iface.address)?;
            let mac = non_empty(&iface.mac_address);
            let ep = c
                .agent
                .lock()
                .await
                .docker_create_endpoint(net, id, addr, mac)
                .await?;
            // Docker refuses a MAC from the driver when it chose one itself.
            Ok(match mac {
                Some(_) => json!({}),
                None => json!({ "Interface": { "MacAddress": ep.mac } }),
            })
        }
        "NetworkDriver.EndpointOperInfo" => {
            let req: EndpointReq = decode(method, body)?;
            let net = required("NetworkID", &req.network_id)?;
            let id = required("EndpointID", &req.endpoint_id)?;
            let a = c.agent.lock().await;
            let ep = a.docker_endpoint(net, id)?;
            Ok(json!({ "Value": {
                "id": ep.id, "network": ep.network, "ip": ep.ip.to_string(),
                "mac": ep.mac, "host_ifname": ep.host_ifname,
            }}))
        }
        "NetworkDriver.DeleteEndpoint" => {
            let req: EndpointReq = decode(method, body)?;
            let net = required("NetworkID", &req.network_id)?;
            let id = required("EndpointID", &req.endpoint_id)?;
            c.agent.lock().await.docker_delete_endpoint(net, id).await?;
            Ok(json!({}))
        }
        "NetworkDriver.Join" => {
            let req: EndpointReq = decode(method, body)?;
            let net = required("NetworkID", &req.network_id)?;
            let id = required("EndpointID", &req.endpoint_id)?;
            let key = required("SandboxKey", &req.sandbox_key)?;
            let j = c.agent.lock().await.docker_join(net, id, key).await?;
            Ok(json!({
                "InterfaceName": { "SrcName": j.peer, "DstPrefix": "eth" },
                "Gateway": j.gateway.map(|g| g.to_string()).unwrap_or_default(),
                "DisableGatewayService": false,
            }))
        }
        "NetworkDriver.Leave" => {
            let req: EndpointReq = decode(method, body)?;
            let net = required("NetworkID", &req.network_id)?;
            let id = required("EndpointID", &req.endpoint_id)?;
            c.agent.lock().await.docker_leave(net, id)?;
            Ok(json!({}))
        }
        "NetworkDriver.ProgramExternalConnectivity" => {
            let req: EndpointReq = decode(method, body)?;
            let published = req
                .options
                .as_ref()
                .and_then(|o| o.get(OPT_PORTMAP))
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            if published {
                return Err(bad(format!(
                    "{OPT_PORTMAP}: netctl does not publish ports (-p) yet; use a netctl service instead"
                )));
            }
            Ok(json!({}))
        }
        "NetworkDriver.RevokeExternalConnectivity"
        | "NetworkDriver.DiscoverNew"
        | "NetworkDriver.DiscoverDelete" => {
            let _: Value = decode(method, body)?;
            Ok(json!({}))
        }
        "IpamDriver.GetCapabilities" => {
            Ok(json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false }))
        }
        "IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
            "LocalDefaultAddressSpace": LOCAL_SPACE,
            "GlobalDefaultAddressSpace": GLOBAL_SPACE,
        })),
        "IpamDriver.RequestPool" => {
            let req: RequestPool = decode(method, body)?;
            if req.v6 {
                return Err(bad("V6: netctl's IPAM hands out IPv4 pools only"));
            }
            if let Some(s) = non_empty(&req.address_space)
                && s != LOCAL_SPACE
                && s != GLOBAL_SPACE
            {
                return Err(bad(format!(
                    "AddressSpace: unknown address space {s:?} (netctl has {LOCAL_SPACE} and {GLOBAL_SPACE})"
                )));
            }
            let p = c
                .agent
                .lock()
                .await
                .ipam_request_pool(non_empty(&req.pool), non_empty(&req.sub_pool))
                .await?;
            Ok(json!({ "PoolID": p.id, "Pool": p.subnet.to_string(), "Data": {} }))
        }
        "IpamDriver.ReleasePool" => {
            let req: PoolRef = decode(method, body)?;
            let id = required("PoolID", &req.pool_id)?;
            c.agent.lock().await.ipam_release_pool(id)?;
            Ok(json!({}))
        }
        "IpamDriver.RequestAddress" => {
            let req: RequestAddress = decode(method, body)?;
            let id = required("PoolID", &req.pool_id)?;
            let gateway = req
                .options
                .as_ref()
                .and_then(|o| o.get(OPT_ADDRESS_TYPE))
                .is_some_and(|t| t == GATEWAY_TYPE);
            let a =
                c.agent
                    .lock()
                    .await
                    .ipam_request_address(id, non_empty(&req.address), gateway)?;
            Ok(json!({ "Address": a.to_string(), "Data": {} }))
        }
        "IpamDriver.ReleaseAddress" => {
            let req: RequestAddress = decode(method, body)?;
            let id = required("PoolID", &req.pool_id)?;
            let addr = required("Address", &req.address)?;
            c.agent.lock().await.ipam_release_address(id, addr)?;
            Ok(json!({}))
        }
        other => Err(PluginError(
            StatusCode::NOT_FOUND,
            format!("{other}: not implemented by this plugin"),
        )),
    }
}

/// The plugin's routes: every call is `POST /Interface.Method`.
pub fn router(agent: Shared, docker_host: PathBuf) -> Router {
    Router::new()
        .route("/{method}", any(call))
        .fallback(|| async {
            PluginError(
                StatusCode::NOT_FOUND,
                "not a plugin call (POST /Interface.Method)".into(),
            )
        })
        .with_state(Ctx { agent, docker_host })
}

/// Serves the plugin on `path` until the process ends.
pub async fn serve(
    agent: Shared,
    listener: tokio::net::UnixListener,
    docker_host: PathBuf,
) -> anyhow::Result<()> {
    axum::serve(listener, router(agent, docker_host)).await?;
    Ok(())
}

/// Asks dockerd for the name of network `id` (GET /networks/ID on its socket) until it
/// answers or two minutes pass, then renames the netctl network. Docker stores a network
/// only after the driver's CreateNetwork returns, hence the polling.
pub fn spawn_namer(agent: Shared, docker_host: PathBuf, id: String) {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let last = match docker_network_name(&docker_host, &id).await {
                Ok(Some(name)) => {
                    if let Err(e) = agent.lock().await.docker_rename(&id, &name).await {
                        tracing::warn!(docker = %id, "docker: naming the network: {e}");
                    }
                    return;
                }
                Ok(None) => "dockerd does not know it yet".to_string(),
                Err(e) => e,
            };
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(docker = %id, docker_host = %docker_host.display(),
                    "docker: could not learn the network's name ({last}); it keeps its netctl name");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// The `Name` of Docker network `id`, None while dockerd answers 404.
async fn docker_network_name(docker_host: &Path, id: &str) -> Result<Option<String>, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    let stream = tokio::net::UnixStream::connect(docker_host)
        .await
        .map_err(|e| format!("connect {}: {e}", docker_host.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(format!("http://docker/networks/{id}"))
        .header("host", "docker")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("dockerd answered {status}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(v.get("Name").and_then(Value::as_str).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> CreateNetworkReq {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn create_network_translates_docker_options() {
        let r = req(json!({
            "NetworkID": "b397b9b377e04c221c034392cc216d74bbe36e2cbdcfce48ec3f49642a343922",
            "Options": {
                "com.docker.network.enable_ipv6": false,
                "com.docker.network.generic": {"com.docker.network.bridge.name": "brx", "mtu": 1400},
                "com.docker.network.internal": true
            },
            "IPv4Data": [{"AddressSpace": "netctl-local", "AuxAddresses": {"a": "10.99.0.5/24"},
                          "Gateway": "10.99.0.1/24", "Pool": "10.99.0.0/24"}],
            "IPv6Data": []
        }));
        let n = network_request(&r).unwrap_or_else(|e| panic!("{}", e.1));
        assert_eq!(n.subnet.as_deref(), Some("10.99.0.0/24"));
        assert_eq!(n.gateway.as_deref(), Some("10.99.0.1"));
        assert_eq!(n.aux_addresses, vec!["a=10.99.0.5".to_string()]);
        assert!(n.internal);
        assert!(
            n.options
                .contains(&"com.docker.network.bridge.name=brx".to_string())
        );
        assert!(n.options.contains(&"mtu=1400".to_string()));
    }

    #[test]
    fn create_network_refuses_ipv6_and_several_subnets() {
        let v6 = req(
            json!({"NetworkID": "x", "IPv4Data": [{"Pool": "10.0.0.0/24"}],
            "IPv6Data": [{"Pool": "fd00::/64"}]}),
        );
        assert!(
            network_request(&v6)
                .err()
                .unwrap()
                .1
                .starts_with("IPv6Data:")
        );
        let two = req(json!({"NetworkID": "x",
            "IPv4Data": [{"Pool": "10.0.0.0/24"}, {"Pool": "10.0.1.0/24"}]}));
        assert!(network_request(&two).err().unwrap().1.contains("got 2"));
        let none = req(json!({"NetworkID": "x"}));
        assert!(network_request(&none).err().unwrap().1.contains("got 0"));
    }

    #[test]
    fn decode_names_the_call_and_accepts_an_empty_body() {
        let e = decode::<NetworkRef>(
            "NetworkDriver.DeleteNetwork",
            &Bytes::from_static(b"{not json"),
        )
        .err()
        .unwrap();
        assert!(e.1.starts_with("NetworkDriver.DeleteNetwork: malformed request"));
        let r: NetworkRef = decode("x", &Bytes::new()).unwrap_or_else(|e| panic!("{}", e.1));
        assert!(r.network_id.is_none());
        let wrong = decode::<NetworkRef>("x", &Bytes::from_static(b"{\"NetworkID\": 5}"));
        assert!(wrong.is_err());
    }

    #[test]
    fn plugin_names() {
        assert!(check_plugin_name("netctl").is_ok());
        assert!(check_plugin_name("nt123x4").is_ok());
        for bad in ["", "Netctl", "a/b", "../x", "-x"] {
            assert!(check_plugin_name(bad).is_err(), "{bad}");
        }
    }
}
