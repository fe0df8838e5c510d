//! Downloading artifacts from the hub into `DATA_DIR/artifacts/sha256/<hex>`.
//!
//! The agent signs each request with its node key; the bytes are hashed as
//! they arrive and only a file whose digest matches is moved into place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use edge_api::digest::{Digest, Hasher};
use edge_api::keys::SigningKey;
use edge_api::precompiled::Seal;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

/// No byte for this long means the link is gone; the fetch fails and is retried.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the hub at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the hub answered {status} for {digest}: {body}")]
    Refused { digest: Digest, status: u16, body: String },
    #[error("download of {expected} was corrupt: got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("download of {digest} stalled for {}s", IDLE_TIMEOUT.as_secs())]
    Stalled { digest: Digest },
    #[error("cannot store {digest} at {path}: {source}")]
    Io { digest: Digest, path: PathBuf, source: std::io::Error },
}

pub struct Fetcher {
    dir: PathBuf,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Fetcher {
    /// `tls` is how the hub's API is trusted (its key, pinned at enrolment).
    pub fn new(dir: &Path, tls: rustls::ClientConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Fetcher { dir: dir.to_path_buf(), client: Client::builder(TokioExecutor::new()).build(https) })
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Downloads an artifact, signed with the node key at `hub_now_ms` (the
    /// hub's clock as this node knows it) with a fresh nonce, so the hub
    /// accepts the signature once and only now.
    pub async fn fetch(
        &self,
        api_url: &str,
        node: &str,
        key: &SigningKey,
        digest: Digest,
        hub_now_ms: u64,
    ) -> Result<u64, FetchError> {
        let path = format!("/v1/artifacts/{digest}");
        let (url, resp) = self.get(api_url, &path, node, key, hub_now_ms).await?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(FetchError::Refused { digest, status, body: error_text(resp.into_body()).await });
        }
        let tmp = self.dir.join("tmp").join(format!("{}.{}", digest.hex(), std::process::id()));
        let result = async {
            let (actual, len) = stream_to(resp.into_body(), &tmp, &url, digest, None).await?;
            if actual != digest {
                return Err(FetchError::Mismatch { expected: digest, actual });
            }
            tokio::fs::rename(&tmp, self.path(&digest)).await.map_err(|source| FetchError::Io {
                digest,
                path: tmp.clone(),
                source,
            })?;
            Ok(len)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Asks the hub for `component` compiled for the engine `fingerprint`.
    /// On `Fetched` the bytes are in `dest` (synced), with the seal the hub
    /// sent and their digest and size as measured here; the caller checks
    /// the seal before anything else reads them.
    pub async fn fetch_precompiled(
        &self,
        link: &HubLink<'_>,
        component: Digest,
        fingerprint: &str,
        dest: &Path,
    ) -> Result<Precompiled, FetchError> {
        let path = format!("/v1/artifacts/{component}/precompiled/{fingerprint}");
        let (url, resp) = self.get(&link.api_url, &path, link.node, link.key, link.hub_now_ms).await?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            202 => return Ok(Precompiled::Pending(error_text(resp.into_body()).await)),
            404 | 422 => return Ok(Precompiled::Unavailable(error_text(resp.into_body()).await)),
            _ => {
                return Err(FetchError::Refused {
                    digest: component,
                    status,
                    body: error_text(resp.into_body()).await,
                });
            }
        }
        let seal = resp
            .headers()
            .get(SEAL_HEADER)
            .map(|v| Seal::parse(v.as_bytes()))
            .transpose()
            .map_err(|e| FetchError::Refused { digest: component, status, body: format!("bad seal: {e}") })?;
        let Some(seal) = seal else {
            return Err(FetchError::Refused { digest: component, status, body: format!("no {SEAL_HEADER} header") });
        };
        match stream_to(resp.into_body(), dest, &url, component, Some(seal.size)).await {
            Ok((digest, size)) => Ok(Precompiled::Fetched { seal, digest, size }),
            Err(e) => {
                let _ = tokio::fs::remove_file(dest).await;
                Err(e)
            }
        }
    }

    /// A GET signed with the node key at `hub_now_ms` (the hub's clock as
    /// this node knows it) with a fresh nonce, so the hub accepts the
    /// signature once and only now.
    async fn get(
        &self,
        api_url: &str,
        path: &str,
        node: &str,
        key: &SigningKey,
        hub_now_ms: u64,
    ) -> Result<(String, hyper::Response<hyper::body::Incoming>), FetchError> {
        let url = format!("{}{path}", api_url.trim_end_matches('/'));
        let unreachable = |detail: String| FetchError::Unreachable { url: url.clone(), detail };
        let nonce = edge_api::keys::random_hex(16).map_err(|e| unreachable(e.to_string()))?;
        let msg = edge_api::wire::artifact_fetch_message(node, path, hub_now_ms, &nonce);
        let sig = edge_api::hex::encode(&key.sign(&msg));
        let req = hyper::Request::get(&url)
            .header("authorization", format!("EdgeNode {node} {hub_now_ms}.{nonce} {sig}"))
            .body(Empty::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(IDLE_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| unreachable("no answer".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok((url, resp))
    }
}

/// The header that carries a precompiled artifact's seal (compact JSON).
pub const SEAL_HEADER: &str = "x-edge-seal";

/// Who this node is to the hub, for signed downloads.
pub struct HubLink<'a> {
    pub api_url: String,
    pub node: &'a str,
    pub key: &'a SigningKey,
    pub hub_now_ms: u64,
}

/// What the hub had for a component on an engine.
#[derive(Debug)]
pub enum Precompiled {
    Fetched {
        seal: Seal,
        digest: Digest,
        size: u64,
    },
    /// The hub is compiling it; ask again soon.
    Pending(String),
    /// The hub will not have it (a target or wasmtime it does not compile
    /// for, or the component did not compile); why.
    Unavailable(String),
}

/// The error message of a JSON error answer, or its text.
async fn error_text(body: hyper::body::Incoming) -> String {
    let text = tokio::time::timeout(IDLE_TIMEOUT, http_body_util::Limited::new(body, 64 << 10).collect())
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text)
}

/// Writes a body to `path`, hashing it; synced. Returns its digest and size.
/// A body longer than `limit` is cut off there (it cannot be what was
/// announced, and the hash check that follows refuses it).
async fn stream_to(
    mut body: hyper::body::Incoming,
    path: &Path,
    url: &str,
    digest: Digest,
    limit: Option<u64>,
) -> Result<(Digest, u64), FetchError> {
    let io = |source| FetchError::Io { digest, path: path.to_path_buf(), source };
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut hasher = Hasher::new();
    let mut len = 0u64;
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(FetchError::Stalled { digest }),
            Ok(None) => break,
            Ok(Some(f)) => f.map_err(|e| FetchError::Unreachable { url: url.to_string(), detail: e.to_string() })?,
        };
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            len += data.len() as u64;
            if limit.is_some_and(|l| len > l) {
                break;
            }
            file.write_all(&data).await.map_err(io)?;
        }
    }
    file.sync_all().await.map_err(io)?;
    Ok((hasher.finish(), len))
}
