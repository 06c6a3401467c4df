//! A small HTTP/1.1 client of the agent's unix socket (hyper).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::ApiErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the netctl agent is not running (nothing answers on {0}); start it with `netctl up` (or `cargo xtask up`)"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the agent's socket is for root only")]
    Permission(PathBuf),
    #[error("{0}")]
    Api(String),
    #[error("talking to the agent on {path}: {detail}")]
    Transport { path: PathBuf, detail: String },
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
        }
    }

    fn transport(&self, detail: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            path: self.socket.clone(),
            detail: detail.to_string(),
        }
    }

    /// Sends one request; decodes a 2xx body as `T`, anything else as the API's error line.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let stream = match tokio::net::UnixStream::connect(&self.socket).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ClientError::Permission(self.socket.clone()));
            }
            Err(_) => return Err(ClientError::NotRunning(self.socket.clone())),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| self.transport(e))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://netctl{path}"))
            .header("host", "netctl")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| self.transport(e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.transport(e))?
            .to_bytes();
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| self.transport(format!("bad answer: {e}")))
        } else {
            let msg = serde_json::from_slice::<ApiErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
            Err(ClientError::Api(msg))
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::DELETE, path, None).await
    }
}
