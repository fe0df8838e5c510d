//! Pulling and pushing WebAssembly components as OCI artifacts, in the
//! layout `wkg` and `wasm-tools` use: an image manifest whose config has
//! media type `application/vnd.wasm.config.v0+json` and whose one layer,
//! `application/wasm`, is the component.
//!
//! References look like `oci://registry[:port]/repository[:tag][@sha256:…]`.
//! Registries are reached over HTTPS (system roots, else the Mozilla set),
//! except loopback ones and those named insecure, over plain HTTP.
//! Anonymous bearer tokens (the `WWW-Authenticate: Bearer` flow) are fetched
//! as registries ask for them.

pub mod pinned;
pub mod unpack;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use edge_api::digest::Digest;
pub use edge_api::oci_ref::Reference;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

pub const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_V1: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST_V2: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER: &str = "application/wasm";

/// No answer within this long and the registry is considered unreachable.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot reach registry {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("registry {registry} refused {what}: {status} {body}")]
    Refused { registry: String, what: String, status: u16, body: String },
    #[error("{reference}: the registry sent a manifest with digest {actual}, not the {expected} asked for")]
    ManifestMismatch { reference: String, expected: Digest, actual: Digest },
    #[error("{reference}: the registry sent a blob with digest {actual}, not the {expected} its manifest names")]
    BlobMismatch { reference: String, expected: Digest, actual: Digest },
    #[error("{reference} is not a WebAssembly component artifact: {detail}")]
    NotWasm { reference: String, detail: String },
    #[error("{reference} is not a container image: {detail}")]
    NotImage { reference: String, detail: String },
    #[error("{reference}: the component is {size} bytes, over the {limit}-byte limit")]
    TooLarge { reference: String, size: u64, limit: u64 },
    #[error("{0}")]
    Protocol(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    pub fn normalized(&self) -> edge_api::platform::Platform {
        edge_api::platform::Platform::new(&self.os, &self.architecture, self.variant.as_deref().unwrap_or(""))
    }
}

/// The platform fields of an image's config blob.
#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// What platforms a container image reference offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePlatforms {
    /// The digest of what the reference names: an index, or a single manifest.
    pub digest: Digest,
    /// Each platform with the image manifest for it, in the index's order.
    pub images: Vec<(edge_api::platform::Platform, Descriptor)>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    pub manifests: Vec<Descriptor>,
}

/// The component layer of a manifest.
pub fn wasm_layer<'a>(reference: &Reference, m: &'a Manifest) -> Result<&'a Descriptor, OciError> {
    let wasm: Vec<&Descriptor> = m.layers.iter().filter(|l| l.media_type == WASM_LAYER).collect();
    match wasm.as_slice() {
        [one] => Ok(one),
        [] => Err(OciError::NotWasm {
            reference: reference.to_string(),
            detail: format!(
                "it has no {WASM_LAYER} layer (config {}, layers {})",
                m.config.media_type,
                m.layers.iter().map(|l| l.media_type.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }),
        _ => Err(OciError::NotWasm {
            reference: reference.to_string(),
            detail: "it has several application/wasm layers".into(),
        }),
    }
}

/// From a multi-platform index, the manifest for WebAssembly.
pub fn wasm_manifest<'a>(reference: &Reference, i: &'a Index) -> Result<&'a Descriptor, OciError> {
    i.manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.architecture == "wasm" || p.os.starts_with("wasi")))
        .ok_or_else(|| OciError::NotWasm {
            reference: reference.to_string(),
            detail: "it is a multi-platform index without a wasm/wasi platform".into(),
        })
}

/// The image manifests of a multi-platform index, each with its platform:
/// attestations and entries for an unknown platform left out.
pub fn index_images(index: &Index) -> Vec<(edge_api::platform::Platform, Descriptor)> {
    index
        .manifests
        .iter()
        .filter(|d| d.media_type == MANIFEST_V1 || d.media_type == DOCKER_MANIFEST_V2)
        .filter(|d| d.annotations.get("vnd.docker.reference.type").is_none_or(|t| t != "attestation-manifest"))
        .filter_map(|d| {
            let p = d.platform.as_ref()?;
            (p.os != "unknown" && p.architecture != "unknown").then(|| (p.normalized(), d.clone()))
        })
        .collect()
}

/// Constant-time comparison of two strings (fingerprints).
fn hex_ct_eq(a: &str, b: &str) -> bool {
    edge_api::hex::ct_eq(a.as_bytes(), b.as_bytes())
}

/// The roots `tls_client_config` would trust: the CA certificates of
/// `ca_pem`, or the system's (else the Mozilla set).
pub fn roots(ca_pem: Option<&[u8]>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("the CA file is not PEM certificates: {e}"))?;
                roots.add(cert).map_err(|e| format!("bad CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("the CA file holds no certificate".into());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    Ok(roots)
}

/// [`roots`] from a PEM file (the error names the file).
pub fn roots_file(ca: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("cannot read the CA file {}: {e}", ca.display()))?;
    roots(Some(&pem)).map_err(|e| format!("{}: {e}", ca.display()))
}

/// TLS client settings for registry and broker connections: ring as the
/// crypto provider, and either the CA certificates of `ca_pem` or the
/// system's roots (else the Mozilla set).
pub fn tls_client_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let roots = roots(ca_pem)?;
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// [`tls_client_config`] with the CA certificates read from the PEM file
/// `ca` (the error names the file), or the system's roots.
pub fn tls_client_config_file(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    match ca {
        None => tls_client_config(None),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
            tls_client_config(Some(&pem)).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// A pulled component, its bytes checked against the layer digest.
pub struct Pulled {
    pub manifest_digest: Digest,
    pub layer: Descriptor,
    pub bytes: Bytes,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct Client {
    http: HttpClient<Https, Full<Bytes>>,
    insecure: Vec<String>,
    tokens: Mutex<BTreeMap<String, String>>,
}

fn unreachable(r: &Reference, e: impl fmt::Display) -> OciError {
    let mut detail = e.to_string();
    if detail.is_empty() {
        detail = "no detail".into();
    }
    OciError::Unreachable { registry: r.registry.clone(), detail }
}

fn param<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    let start = header.find(&format!("{name}=\""))? + name.len() + 2;
    let end = header[start..].find('"')? + start;
    Some(&header[start..end])
}

impl Client {
    /// `insecure`: registries (`host:port`) spoken to over plain HTTP.
    pub fn new(insecure: Vec<String>) -> Result<Client, OciError> {
        let tls = tls_client_config(None).map_err(OciError::Protocol)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = builder.https_or_http().enable_http1().wrap_connector(http);
        Ok(Client {
            http: HttpClient::builder(TokioExecutor::new()).build(https),
            insecure,
            tokens: Mutex::new(BTreeMap::new()),
        })
    }

    fn base(&self, r: &Reference) -> String {
        let scheme = if r.is_loopback() || self.insecure.contains(&r.registry) { "http" } else { "https" };
        format!("{scheme}://{}", r.registry)
    }

    /// One request, following the registry's bearer-token challenge once.
    async fn send(
        &self,
        r: &Reference,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        push: bool,
    ) -> Result<hyper::Response<hyper::body::Incoming>, OciError> {
        let scope = format!("repository:{}:{}", r.repository, if push { "pull,push" } else { "pull" });
        let mut tried_token = false;
        loop {
            let token = self.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(&scope).cloned();
            let mut req = hyper::Request::builder().method(method.clone()).uri(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(t) = &token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let req = req.body(Full::new(body.clone())).map_err(|e| OciError::Protocol(e.to_string()))?;
            let resp = tokio::time::timeout(TIMEOUT, self.http.request(req))
                .await
                .map_err(|_| unreachable(r, "no answer"))?
                .map_err(|e| unreachable(r, error_chain(&e)))?;
            if resp.status() != StatusCode::UNAUTHORIZED || tried_token {
                return Ok(resp);
            }
            let challenge =
                resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let Some(realm) = challenge.strip_prefix("Bearer ").and_then(|c| param(c, "realm")) else {
                return Ok(resp);
            };
            let service = challenge.strip_prefix("Bearer ").and_then(|c| param(c, "service")).unwrap_or("");
            let token = self.token(r, realm, service, &scope).await?;
            self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(scope.clone(), token);
            tried_token = true;
        }
    }

    async fn token(&self, r: &Reference, realm: &str, service: &str, scope: &str) -> Result<String, OciError> {
        let url = format!("{realm}?service={service}&scope={scope}");
        let req =
            hyper::Request::get(&url).body(Full::new(Bytes::new())).map_err(|e| OciError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unreachable(r, "the token service did not answer"))?
            .map_err(|e| unreachable(r, error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = read(r, resp.into_body(), 1 << 20).await?;
        if status != 200 {
            return Err(OciError::Refused {
                registry: r.registry.clone(),
                what: "an anonymous token".into(),
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| OciError::Protocol(format!("bad token answer: {e}")))?;
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_string)
            .ok_or_else(|| OciError::Protocol("the token answer holds no token".into()))
    }

    async fn expect_ok(
        &self,
        r: &Reference,
        resp: hyper::Response<hyper::body::Incoming>,
        what: &str,
        ok: &[u16],
    ) -> Result<hyper::Response<hyper::body::Incoming>, OciError> {
        let status = resp.status().as_u16();
        if ok.contains(&status) {
            return Ok(resp);
        }
        let body = read(r, resp.into_body(), 64 << 10).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body).into_owned();
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(OciError::Refused {
            registry: r.registry.clone(),
            what: what.to_string(),
            status,
            body: msg.trim().to_string(),
        })
    }

    /// A manifest or index by tag or digest, checked against the digest
    /// when `target` is one: its digest and its JSON.
    async fn manifest(&self, r: &Reference, target: &str) -> Result<(Digest, u64, serde_json::Value), OciError> {
        let accept = [MANIFEST_V1, INDEX_V1, DOCKER_MANIFEST_V2, DOCKER_LIST_V2].join(", ");
        let url = format!("{}/v2/{}/manifests/{target}", self.base(r), r.repository);
        let resp = self.send(r, Method::GET, &url, &[("accept", &accept)], Bytes::new(), false).await?;
        let resp = self.expect_ok(r, resp, &format!("the manifest {r}"), &[200]).await?;
        let body = read(r, resp.into_body(), 4 << 20).await?;
        let actual = Digest::of(&body);
        let pinned = if target.starts_with("sha256:") { target.parse::<Digest>().ok() } else { None };
        if let Some(expected) = pinned
            && expected != actual
        {
            return Err(OciError::ManifestMismatch { reference: r.to_string(), expected, actual });
        }
        let v = serde_json::from_slice(&body)
            .map_err(|e| OciError::Protocol(format!("{r}: the manifest is not JSON: {e}")))?;
        Ok((actual, body.len() as u64, v))
    }

    /// A blob of at most `limit` bytes, returned only if its digest checks out.
    async fn blob(&self, r: &Reference, d: &Descriptor, limit: u64) -> Result<Bytes, OciError> {
        let url = format!("{}/v2/{}/blobs/{}", self.base(r), r.repository, d.digest);
        let resp = self.send(r, Method::GET, &url, &[], Bytes::new(), false).await?;
        let resp = self.expect_ok(r, resp, &format!("the blob {}", d.digest), &[200]).await?;
        let bytes = read(r, resp.into_body(), limit).await?;
        let got = Digest::of(&bytes);
        if got != d.digest {
            return Err(OciError::BlobMismatch { reference: r.to_string(), expected: d.digest, actual: got });
        }
        Ok(bytes)
    }

    /// An image manifest by its digest (checked), and the bytes of its config.
    pub async fn image_manifest(&self, r: &Reference, digest: &Digest) -> Result<(Manifest, Bytes), OciError> {
        let (_, _, v) = self.manifest(r, &digest.to_string()).await?;
        if v.get("manifests").is_some() {
            return Err(OciError::NotImage {
                reference: r.to_string(),
                detail: format!("{digest} is an index, not an image manifest"),
            });
        }
        let m: Manifest =
            serde_json::from_value(v).map_err(|e| OciError::Protocol(format!("{r}: bad manifest: {e}")))?;
        let config = self.blob(r, &m.config, 1 << 20).await?;
        Ok((m, config))
    }

    /// Streams a blob into `path` (through `path` + `.part`), hashing it on
    /// the way: the file exists only if the digest checked out.
    pub async fn blob_to_file(
        &self,
        r: &Reference,
        d: &Descriptor,
        path: &std::path::Path,
        limit: u64,
    ) -> Result<(), OciError> {
        use tokio::io::AsyncWriteExt;
        let io = |e: std::io::Error| OciError::Protocol(format!("cannot write {}: {e}", path.display()));
        if d.size > limit {
            return Err(OciError::TooLarge { reference: r.to_string(), size: d.size, limit });
        }
        let url = format!("{}/v2/{}/blobs/{}", self.base(r), r.repository, d.digest);
        let resp = self.send(r, Method::GET, &url, &[], Bytes::new(), false).await?;
        let mut body = self.expect_ok(r, resp, &format!("the blob {}", d.digest), &[200]).await?.into_body();
        let part = path.with_extension("part");
        let mut file = tokio::fs::File::create(&part).await.map_err(io)?;
        let mut hasher = edge_api::digest::Hasher::new();
        let mut size = 0u64;
        while let Some(data) = next_data(r, &mut body).await? {
            size += data.len() as u64;
            if size > limit {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(OciError::TooLarge { reference: r.to_string(), size, limit });
            }
            hasher.update(&data);
            file.write_all(&data).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        let got = hasher.finish();
        if got != d.digest {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(OciError::BlobMismatch { reference: r.to_string(), expected: d.digest, actual: got });
        }
        tokio::fs::rename(&part, path).await.map_err(io)
    }

    /// The platforms a container image offers, each with its manifest's
    /// descriptor: from a multi-platform index, or, for a single image
    /// manifest, from its config. Every digest on the way is checked.
    /// Index entries that are not images for a platform (attestations,
    /// `unknown/unknown`) are left out.
    pub async fn image_platforms(&self, r: &Reference) -> Result<ImagePlatforms, OciError> {
        let not_image = |detail: String| OciError::NotImage { reference: r.to_string(), detail };
        let (digest, size, v) = self.manifest(r, &r.target()).await?;
        if v.get("manifests").is_some() {
            let index: Index =
                serde_json::from_value(v).map_err(|e| OciError::Protocol(format!("{r}: bad index: {e}")))?;
            let images = index_images(&index);
            if images.is_empty() {
                return Err(not_image(format!(
                    "its index lists no image for a platform (it has {} entries)",
                    index.manifests.len()
                )));
            }
            return Ok(ImagePlatforms { digest, images });
        }
        let media_type = v["mediaType"].as_str().unwrap_or(MANIFEST_V1).to_string();
        let m: Manifest =
            serde_json::from_value(v).map_err(|e| OciError::Protocol(format!("{r}: bad manifest: {e}")))?;
        if m.config.media_type == WASM_CONFIG {
            return Err(not_image("it is a WebAssembly component; use [spec.wasm]".into()));
        }
        if !m.config.media_type.ends_with("container.image.v1+json")
            && m.config.media_type != "application/vnd.oci.image.config.v1+json"
        {
            return Err(not_image(format!("its config has media type {}", m.config.media_type)));
        }
        let config = self.blob(r, &m.config, 1 << 20).await?;
        let c: ImageConfig = serde_json::from_slice(&config)
            .map_err(|e| OciError::Protocol(format!("{r}: the image config is not valid: {e}")))?;
        if c.os.is_empty() || c.architecture.is_empty() {
            return Err(not_image("its config names no os and architecture".into()));
        }
        let platform = edge_api::platform::Platform::new(&c.os, &c.architecture, c.variant.as_deref().unwrap_or(""));
        let desc = Descriptor {
            media_type,
            digest,
            size,
            platform: Some(Platform { architecture: c.architecture, os: c.os, variant: c.variant }),
            annotations: BTreeMap::new(),
        };
        Ok(ImagePlatforms { digest, images: vec![(platform, desc)] })
    }

    /// Fetches a component, checking every digest on the way: the
    /// manifest's (when the reference pins one) and the layer's.
    pub async fn pull_component(&self, r: &Reference, max_bytes: u64) -> Result<Pulled, OciError> {
        let mut target = r.target();
        for _ in 0..2 {
            let (actual, _, v) = self.manifest(r, &target).await?;
            if v.get("manifests").is_some() {
                let index: Index =
                    serde_json::from_value(v).map_err(|e| OciError::Protocol(format!("{r}: bad index: {e}")))?;
                target = wasm_manifest(r, &index)?.digest.to_string();
                continue;
            }
            let m: Manifest =
                serde_json::from_value(v).map_err(|e| OciError::Protocol(format!("{r}: bad manifest: {e}")))?;
            let layer = wasm_layer(r, &m)?.clone();
            if layer.size > max_bytes {
                return Err(OciError::TooLarge { reference: r.to_string(), size: layer.size, limit: max_bytes });
            }
            let bytes = self.blob(r, &layer, max_bytes).await?;
            return Ok(Pulled { manifest_digest: actual, layer, bytes });
        }
        Err(OciError::Protocol(format!("{r}: an index pointed to another index")))
    }

    async fn push_blob(&self, r: &Reference, bytes: Bytes) -> Result<Descriptor, OciError> {
        let digest = Digest::of(&bytes);
        let head = format!("{}/v2/{}/blobs/{digest}", self.base(r), r.repository);
        let resp = self.send(r, Method::HEAD, &head, &[], Bytes::new(), true).await?;
        if resp.status() == StatusCode::OK {
            return Ok(Descriptor {
                media_type: String::new(),
                digest,
                size: bytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
            });
        }
        let start = format!("{}/v2/{}/blobs/uploads/", self.base(r), r.repository);
        let resp = self.send(r, Method::POST, &start, &[], Bytes::new(), true).await?;
        let resp = self.expect_ok(r, resp, "an upload", &[202]).await?;
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| OciError::Protocol("the registry gave no upload location".into()))?
            .to_string();
        let location = if location.starts_with('/') { format!("{}{location}", self.base(r)) } else { location };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let len = bytes.len().to_string();
        let headers = [("content-type", "application/octet-stream"), ("content-length", len.as_str())];
        let resp = self.send(r, Method::PUT, &put, &headers, bytes.clone(), true).await?;
        self.expect_ok(r, resp, &format!("the blob {digest}"), &[201]).await?;
        Ok(Descriptor {
            media_type: String::new(),
            digest,
            size: bytes.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        })
    }

    /// Publishes a component under the reference's tag; returns the manifest digest.
    pub async fn push_component(&self, r: &Reference, component: Bytes) -> Result<Digest, OciError> {
        let mut layer = self.push_blob(r, component).await?;
        layer.media_type = WASM_LAYER.into();
        let config = serde_json::json!({
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer.digest.to_string()],
        });
        let mut config = self.push_blob(r, Bytes::from(serde_json::to_vec(&config).unwrap_or_default())).await?;
        config.media_type = WASM_CONFIG.into();
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_V1.into()),
            artifact_type: Some(WASM_CONFIG.into()),
            config,
            layers: vec![layer],
        };
        let body = Bytes::from(serde_json::to_vec(&manifest).map_err(|e| OciError::Protocol(e.to_string()))?);
        let digest = Digest::of(&body);
        let target = r.tag.clone().unwrap_or_else(|| digest.to_string());
        let url = format!("{}/v2/{}/manifests/{target}", self.base(r), r.repository);
        let resp = self.send(r, Method::PUT, &url, &[("content-type", MANIFEST_V1)], body, true).await?;
        self.expect_ok(r, resp, &format!("the manifest {r}"), &[201]).await?;
        Ok(digest)
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// The next chunk of a body's data, `None` at its end.
async fn next_data(r: &Reference, body: &mut hyper::body::Incoming) -> Result<Option<Bytes>, OciError> {
    loop {
        let frame = match tokio::time::timeout(TIMEOUT, body.frame()).await {
            Err(_) => return Err(unreachable(r, "the download stalled")),
            Ok(None) => return Ok(None),
            Ok(Some(f)) => f.map_err(|e| unreachable(r, error_chain(&e)))?,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

async fn read(r: &Reference, mut body: hyper::body::Incoming, limit: u64) -> Result<Bytes, OciError> {
    let mut out = bytes::BytesMut::new();
    while let Some(data) = next_data(r, &mut body).await? {
        let size = out.len() as u64 + data.len() as u64;
        if size > limit {
            return Err(OciError::TooLarge { reference: r.to_string(), size, limit });
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("edge-oci-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = tls_client_config_file(Some(&missing)).unwrap_err();
        assert!(e.contains("cannot read the CA file") && e.contains("missing.pem"), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let e = tls_client_config_file(Some(&empty)).unwrap_err();
        assert!(e.contains("empty.pem") && e.contains("holds no certificate"), "{e}");
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap();
        let e = tls_client_config_file(Some(&broken)).unwrap_err();
        assert!(e.contains("broken.pem"), "{e}");
        // The system's roots (or the built-in set) always give a usable config.
        assert!(tls_client_config_file(None).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_wasm_layers_are_taken() {
        let r: Reference = "oci://r.io/x".parse().unwrap();
        let desc = |mt: &str| Descriptor {
            media_type: mt.into(),
            digest: Digest::of(mt.as_bytes()),
            size: 1,
            platform: None,
            annotations: BTreeMap::new(),
        };
        let m = Manifest {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            config: desc(WASM_CONFIG),
            layers: vec![desc(WASM_LAYER)],
        };
        assert_eq!(wasm_layer(&r, &m).unwrap().media_type, WASM_LAYER);
        let img = Manifest { layers: vec![desc("application/vnd.oci.image.layer.v1.tar+gzip")], ..m };
        let e = wasm_layer(&r, &img).unwrap_err().to_string();
        assert!(e.contains("not a WebAssembly component artifact") && e.contains("tar+gzip"), "{e}");
    }
}
