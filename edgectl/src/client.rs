//! A small client for the hub's HTTP API.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

#[derive(Debug)]
pub enum HubError {
    Unreachable { url: String, detail: String },
    Api { status: u16, message: String, details: Vec<String> },
    Decode(String),
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HubError::Unreachable { url, detail } => write!(
                f,
                "cannot reach the hub at {url}: {detail} (is it running? start one with `edgectl up`, or point --hub / EDGE_HUB at it)"
            ),
            HubError::Api { message, details, .. } => {
                f.write_str(message)?;
                for d in details {
                    write!(f, "\n  - {d}")?;
                }
                Ok(())
            }
            HubError::Decode(e) => write!(f, "unexpected answer from the hub: {e}"),
        }
    }
}

impl std::error::Error for HubError {}

impl HubError {
    pub fn status(&self) -> Option<u16> {
        match self {
            HubError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub struct Hub {
    base: String,
    token: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// How long a single request may take before the hub is considered unreachable
/// (not applied to streams, which last as long as the user wants).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

impl Hub {
    /// A client for the hub at `base`; over HTTPS it trusts the CA in `ca`
    /// (PEM; the hub's own, which `up` and `config set-hub` record), else
    /// the system's roots.
    pub fn new(base: &str, token: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.enforce_http(false);
        // The system's roots cost milliseconds to load: only for an https://
        // hub without a CA of its own.
        let roots = match ca {
            Some(ca) => edge_oci::roots_file(ca).map_err(|e| anyhow::anyhow!("--ca: {e}"))?,
            None if base.starts_with("https://") => edge_oci::roots(None).map_err(anyhow::Error::msg)?,
            None => rustls::RootCertStore::empty(),
        };
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Hub {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<Response<Incoming>, HubError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |detail: String| HubError::Unreachable { url: self.base.clone(), detail };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token));
        let body = match body {
            Some((ct, b)) => {
                req = req.header("content-type", ct);
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| unreachable(format!("bad URL {url}: {e}")))?;
        let resp = self.client.request(req).await.map_err(|e| {
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            unreachable(detail)
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        // (A HEAD answer has no body: say what the status line and headers do.)
        let plain = format!(
            "the hub answered {status} {}{}",
            resp.status().canonical_reason().unwrap_or(""),
            match resp.headers().get("retry-after").and_then(|v| v.to_str().ok()) {
                Some(s) => format!(": try again in {s} s"),
                None => String::new(),
            }
        );
        let bytes = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let e = &v["error"];
        Err(HubError::Api {
            status,
            message: e["message"].as_str().map(str::to_string).unwrap_or(plain),
            details: e["details"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
        })
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<T, HubError> {
        self.json_within(method, path, body, REQUEST_TIMEOUT).await
    }

    /// As `json`, for requests that may take up to `timeout` (waits).
    pub async fn json_within<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        timeout: Duration,
    ) -> Result<T, HubError> {
        let fut = async {
            let resp = self.send(method, path, body).await?;
            let bytes = resp.into_body().collect().await.map_err(|e| HubError::Decode(e.to_string()))?.to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| HubError::Decode(e.to_string()))
        };
        tokio::time::timeout(timeout.max(REQUEST_TIMEOUT), fut)
            .await
            .map_err(|_| HubError::Unreachable { url: self.base.clone(), detail: "no answer".into() })?
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HubError> {
        self.json(Method::GET, path, None).await
    }

    /// One page of a list, and where the next starts (`x-edge-continue`).
    pub async fn get_page<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Option<String>), HubError> {
        let fut = async {
            let resp = self.send(Method::GET, path, None).await?;
            let next = resp.headers().get("x-edge-continue").and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = resp.into_body().collect().await.map_err(|e| HubError::Decode(e.to_string()))?.to_bytes();
            Ok((serde_json::from_slice(&bytes).map_err(|e| HubError::Decode(e.to_string()))?, next))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| HubError::Unreachable { url: self.base.clone(), detail: "no answer".into() })?
    }

    /// Whether the hub has an artifact.
    pub async fn has_artifact(&self, digest: &str) -> Result<bool, HubError> {
        match self.send(Method::HEAD, &format!("/v1/artifacts/{digest}"), None).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Streams a response body to `sink` as it arrives.
    pub async fn stream(&self, path: &str, mut sink: impl FnMut(&[u8])) -> Result<(), HubError> {
        let resp = self.send(Method::GET, path, None).await?;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| HubError::Unreachable { url: self.base.clone(), detail: format!("stream ended: {e}") })?;
            if let Ok(data) = frame.into_data() {
                sink(&data);
            }
        }
        Ok(())
    }
}
