//! The HTTP/JSON API that `edgectl` (and agents, for artifacts) talk to.
//!
//! Every route but `/healthz` and `/readyz` needs an API token (`Authorization:
//! Bearer EA1.…`) whose role covers the call ([`crate::authz::required_role`]),
//! except artifact downloads, which an enrolled agent may instead sign with
//! its node key (`Authorization: EdgeNode <node> <time>.<nonce> <signature>`,
//! each signature accepted once). Every call that changes something is
//! written to the audit log. Errors are JSON:
//! `{"error":{"code":…,"message":…,"details":[…]}}`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use edge_api::digest::Digest;
use edge_api::manifest::{self, Origin};
use edge_api::model::{AuditEntry, Phase, Resources, Role, TokenRequest, WorkloadView};
use edge_api::names;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::error::HubError;
use crate::hub::Hub;
use crate::logstreams::LogChunk;

/// An error as the API answers it: a status code and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: Vec::new() }
    }
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{what} {name:?} not found"))
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(500, "Internal", e.to_string())
    }
}

/// The one place the hub's errors become HTTP.
impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        let (status, code) = match &e {
            HubError::NotFound(_) => (404, "NotFound"),
            HubError::Invalid { .. } => (422, "Invalid"),
            HubError::Conflict { code, .. } => (409, *code),
            HubError::Refused(_) => (403, "Refused"),
            HubError::NodeOffline(_) => (503, "NodeOffline"),
            HubError::StoreUnavailable(_) => (503, "StoreUnavailable"),
            HubError::Internal(_) => (500, "Internal"),
        };
        ApiError { status, code, message: e.to_string(), details: e.details().to_vec() }
    }
}

/// 1 MiB: manifests are a few hundred bytes; this only stops abuse.
const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// How long the hub waits for a node to start answering a log request.
const LOG_FIRST_ANSWER: Duration = Duration::from_secs(10);

/// A follow lease; renewed at a third of it while the reader is connected, so
/// an agent stops streaming within this long after the hub disappears.
const LOG_LEASE: Duration = Duration::from_secs(30);

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A response body fed by a channel: log streams and artifact downloads.
pub struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<BoxBody> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap_or_else(|_| Response::new(full(""))),
        Err(e) => error(ApiError::internal(e)),
    }
}

fn error(e: ApiError) -> Response<BoxBody> {
    let body = serde_json::json!({"error": {"code": e.code, "message": e.message, "details": e.details}});
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(full(serde_json::to_vec_pretty(&body).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, s: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(full(s));
    *r.status_mut() = status;
    r
}

/// The API's listener limits: a hub serves a handful of operators and
/// scripts, and agents' downloads; `logs -f` and `wait` hold a connection
/// each for as long as they last.
pub const DEFAULT_LIMITS: edge_listen::Limits = edge_listen::Limits {
    max_connections: 1024,
    per_address: 256,
    header_timeout: Duration::from_secs(10),
    stall_timeout: Duration::from_secs(30),
};

/// How long an upload may take in all (512 MiB at ~1 MiB/s).
const UPLOAD_DEADLINE: Duration = Duration::from_secs(600);

/// How long a manifest or other small body may take.
const SMALL_BODY_DEADLINE: Duration = Duration::from_secs(30);

/// Serves the API on `listener` until `shutdown` turns true, within
/// `limits`; over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    limits: edge_listen::Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: watch::Receiver<bool>,
) {
    let limited = {
        let hub = hub.clone();
        move || {
            hub.metrics.api_limited.fetch_add(1, Ordering::Relaxed);
        }
    };
    crate::listener::accept_loop(&listener, limits, tls, shutdown, limited, move |peer| {
        let hub = hub.clone();
        hyper::service::service_fn(move |req| handle(hub.clone(), req, Some(peer)))
    })
    .await
}

/// The query's parameters, percent-decoded (`+` is a space, as forms and
/// Go's clients write it).
fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

/// `%XX` and `+` decoded; anything malformed kept as it is.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<T: std::str::FromStr>(q: &[(String, String)], name: &str) -> Result<Option<T>, ApiError> {
    match q.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::new(400, "BadRequest", format!("query parameter {name}={v:?} is not valid"))),
    }
}

fn flag(q: &[(String, String)], name: &str) -> bool {
    q.iter().any(|(k, v)| k == name && (v.is_empty() || v == "1" || v == "true"))
}

/// The credential a request presents.
enum Presented {
    Bearer(String),
    /// An enrolled agent's signature over its name, the request path, a time and a nonce.
    Node {
        node: String,
        stamp: String,
        sig: String,
    },
    None,
}

/// Who a request turned out to be.
#[derive(Clone)]
enum Who {
    Token { id: String, role: Role },
    Node(String),
}

impl Who {
    /// Who made a change, for revisions and records.
    fn name(&self) -> String {
        match self {
            Who::Token { id, .. } => id.clone(),
            Who::Node(n) => n.clone(),
        }
    }
}

fn presented(req: &Request<Incoming>) -> Presented {
    let Some(h) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) else {
        return Presented::None;
    };
    if let Some(t) = h.strip_prefix("Bearer ") {
        return Presented::Bearer(t.trim().to_string());
    }
    let mut parts = h.split_whitespace();
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("EdgeNode"), Some(node), Some(stamp), Some(sig), None) => {
            Presented::Node { node: node.to_string(), stamp: stamp.to_string(), sig: sig.to_string() }
        }
        _ => Presented::None,
    }
}

async fn handle(
    hub: Arc<Hub>,
    req: Request<Incoming>,
    peer: Option<std::net::SocketAddr>,
) -> Result<Response<BoxBody>, Infallible> {
    hub.metrics.api_requests.fetch_add(1, Ordering::Relaxed);
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD);
    let action = format!("{} {}", req.method(), req.uri().path());
    let via = crate::ha::forwarded_client(&hub.public_key(), &req);
    let mut who = None;
    let resp = match route(&hub, req, &mut who).await {
        Ok(r) => r,
        Err(e) => error(e),
    };
    if resp.status().is_client_error() || resp.status().is_server_error() {
        hub.metrics.api_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(status = resp.status().as_u16(), "api: {action}");
    }
    if mutating {
        let (who, role) = match who {
            Some(Who::Token { id, role }) => (id, Some(role)),
            Some(Who::Node(n)) => (format!("node/{n}"), None),
            None => ("-".to_string(), None),
        };
        let entry = AuditEntry {
            ts_ms: edge_api::time::now_ms(),
            who,
            role,
            from: match (via, peer) {
                (Some(client), Some(hub)) => format!("{client} (via {})", hub.ip()),
                (_, peer) => peer.map(|p| p.ip().to_string()).unwrap_or_default(),
            },
            action: action.chars().take(300).collect(),
            status: resp.status().as_u16(),
        };
        hub.audit(entry);
        // What the request changed, and its audit entry, are durable
        // before the answer leaves (group commit: see `durability`).
        hub.durability.settled().await;
    }
    Ok(resp)
}

fn unauthorized() -> ApiError {
    ApiError::new(
        401,
        "Unauthorized",
        "missing, wrong, expired or revoked API token: pass --token, set EDGE_TOKEN, or run `edgectl up`; the hub writes an admin token to DATA_DIR/admin.token",
    )
}

async fn route(
    hub: &Arc<Hub>,
    req: Request<Incoming>,
    who_out: &mut Option<Who>,
) -> Result<Response<BoxBody>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if crate::authz::is_public(&method, &segs) {
        if segs == ["healthz"] {
            return Ok(text(StatusCode::OK, "ok\n"));
        }
        return Ok(if hub.metrics.broker_connected.load(Ordering::Relaxed) {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not connected to the MQTT broker\n")
        });
    }
    let is_artifact_get = matches!(method, Method::GET | Method::HEAD)
        && matches!(segs.as_slice(), ["v1", "artifacts", _] | ["v1", "artifacts", _, "precompiled", _]);
    let who = match presented(&req) {
        Presented::Bearer(t) => hub.authenticate(&t).map(|(id, role)| Who::Token { id, role }),
        Presented::Node { node, stamp, sig } if is_artifact_get => {
            match hub.verify_node_fetch(&node, &path, &stamp, &sig) {
                Ok(()) => Some(Who::Node(node)),
                Err(e) => {
                    tracing::warn!(node, path, "artifact fetch refused: {e}");
                    return Err(ApiError::new(401, "Unauthorized", format!("node signature refused: {e}")));
                }
            }
        }
        Presented::Node { .. } => {
            return Err(ApiError::new(403, "Forbidden", "node credentials only allow artifact downloads"));
        }
        Presented::None => None,
    };
    let Some(who) = who else { return Err(unauthorized()) };
    *who_out = Some(who.clone());
    if let Who::Token { role, .. } = &who {
        let need = crate::authz::required_role(&method, &segs);
        if !role.covers(need) {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("{method} {path} needs the {need} role; this token has the {role} role"),
            ));
        }
    }
    let q = query(&req);
    match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "artifacts", d]) | (&Method::HEAD, ["v1", "artifacts", d]) => {
            get_artifact(hub, d, method == Method::HEAD).await
        }
        (&Method::GET, ["v1", "artifacts", d, "precompiled", fp]) => get_precompiled(hub, d, fp).await,
        _ if matches!(who, Who::Node(_)) => {
            Err(ApiError::new(403, "Forbidden", "node credentials only allow artifact downloads"))
        }
        (&Method::GET, ["v1", "tokens"]) => Ok(json(StatusCode::OK, &hub.tokens())),
        (&Method::POST, ["v1", "tokens"]) => {
            let body = read_body(req, MAX_MANIFEST_BYTES).await?;
            let tr: TokenRequest = serde_json::from_slice(&body)
                .map_err(|e| ApiError::new(400, "BadRequest", format!("token request: {e}")))?;
            let (token, info) = hub.create_token(tr, &who.name())?;
            Ok(json(StatusCode::CREATED, &serde_json::json!({"token": token, "info": info})))
        }
        (&Method::DELETE, ["v1", "tokens", id]) => Ok(json(StatusCode::OK, &hub.revoke_token(id)?)),
        (&Method::GET, ["v1", "audit"]) => Ok(json(StatusCode::OK, &hub.audit_log())),
        (&Method::GET, ["v1", "events"]) => events(hub, &q).await,
        (&Method::POST, ["v1", "nodes", n, "approve"]) => {
            let body = read_body(req, MAX_MANIFEST_BYTES).await?;
            let capacity: Option<Resources> = if body.iter().all(|b| b.is_ascii_whitespace()) {
                None
            } else {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Approve {
                    capacity: Option<Resources>,
                }
                serde_json::from_slice::<Approve>(&body)
                    .map_err(|e| ApiError::new(400, "BadRequest", format!("approval: {e}")))?
                    .capacity
            };
            Ok(json(StatusCode::OK, &hub.approve_node(n, capacity)?))
        }
        (&Method::PATCH, ["v1", "nodes", n, "labels"]) => {
            let body = read_body(req, MAX_MANIFEST_BYTES).await?;
            let changes: std::collections::BTreeMap<String, Option<String>> =
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::new(400, "BadRequest", format!("labels: expected {{\"key\": \"value\" or null}}: {e}"))
                })?;
            Ok(json(StatusCode::OK, &hub.label_node(n, &changes)?))
        }
        (&Method::PATCH, ["v1", "nodes", n, "taints"]) => {
            let body = read_body(req, MAX_MANIFEST_BYTES).await?;
            let changes: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    400,
                    "BadRequest",
                    format!("taints: expected [\"key=value:Effect\" or \"key[:Effect]-\", ...]: {e}"),
                )
            })?;
            Ok(json(StatusCode::OK, &hub.taint_node(n, &changes)?))
        }
        (&Method::POST, ["v1", "nodes", n, verb @ ("cordon" | "uncordon")]) => {
            Ok(json(StatusCode::OK, &hub.cordon_node(n, *verb == "cordon")?))
        }
        (&Method::POST, ["v1", "nodes", n, "drain"]) => Ok(json(StatusCode::OK, &hub.drain_node(n)?)),
        (&Method::GET, ["metrics"]) => {
            let (nodes, phases) = hub.gauges();
            let nodes: Vec<(String, usize)> = nodes.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let phases: Vec<(String, usize)> = phases.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            Ok(text(StatusCode::OK, hub.metrics.render(&nodes, &phases)))
        }
        (&Method::GET, ["v1", "version"]) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "api_version": edge_api::API_VERSION,
                "hub_key_fingerprint": hub.public_key().fingerprint(),
            }),
        )),
        (&Method::GET, ["v1", "nodes"]) => list_nodes(hub, &q),
        (&Method::GET, ["v1", "nodes", n]) => {
            hub.node_view(n).map(|v| json(StatusCode::OK, &v)).ok_or_else(|| ApiError::not_found("node", n))
        }
        (&Method::DELETE, ["v1", "nodes", n]) => {
            hub.delete_node(n)?;
            Ok(json(StatusCode::OK, &serde_json::json!({"deleted": n})))
        }
        (&Method::GET, ["v1", "workloads"]) => Ok(json(StatusCode::OK, &hub.workload_views())),
        (&Method::GET, ["v1", "workloads", w]) => hub
            .workload_view(w, true)
            .map(|v| json(StatusCode::OK, &v))
            .ok_or_else(|| ApiError::not_found("workload", w)),
        (&Method::PUT, ["v1", "workloads", w]) => {
            let w = w.to_string();
            apply(hub, &w, req, &who.name()).await
        }
        (&Method::GET, ["v1", "workloads", w, "rollout"]) => Ok(json(StatusCode::OK, &hub.rollout_view(w)?)),
        (&Method::POST, ["v1", "workloads", w, "rollout", verb @ ("pause" | "resume")]) => {
            Ok(json(StatusCode::OK, &hub.pause_rollout(w, *verb == "pause")?))
        }
        (&Method::GET, ["v1", "workloads", w, "revisions"]) => Ok(json(StatusCode::OK, &hub.revisions(w)?)),
        (&Method::POST, ["v1", "workloads", w, "undo"]) => {
            let body = read_body(req, MAX_MANIFEST_BYTES).await?;
            let to: Option<u64> = if body.iter().all(|b| b.is_ascii_whitespace()) {
                None
            } else {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| ApiError::new(400, "BadRequest", format!("undo: {e}")))?;
                match &v["to_revision"] {
                    serde_json::Value::Null => None,
                    r => Some(r.as_u64().ok_or_else(|| {
                        ApiError::new(400, "BadRequest", "undo: to_revision must be a revision number")
                    })?),
                }
            };
            let (revision, result, view) = hub.undo_workload(w, to, &who.name())?;
            Ok(json(StatusCode::OK, &serde_json::json!({"result": result, "revision": revision, "workload": view})))
        }
        (&Method::DELETE, ["v1", "workloads", w]) => {
            hub.delete_workload(w)?;
            Ok(json(StatusCode::OK, &serde_json::json!({"deleted": w})))
        }
        (&Method::GET, ["v1", "secrets"]) => Ok(json(StatusCode::OK, &hub.secret_views())),
        (&Method::GET, ["v1", "secrets", n]) => {
            hub.secret_view(n).map(|v| json(StatusCode::OK, &v)).ok_or_else(|| ApiError::not_found("secret", n))
        }
        (&Method::PUT, ["v1", "secrets", n]) => {
            let n = n.to_string();
            apply_secret(hub, &n, req).await
        }
        (&Method::DELETE, ["v1", "secrets", n]) => {
            hub.delete_secret(n)?;
            Ok(json(StatusCode::OK, &serde_json::json!({"deleted": n})))
        }
        (&Method::GET, ["v1", "workloads", w, "wait"]) => wait(hub, w, &q).await,
        (&Method::GET, ["v1", "workloads", w, "logs"]) => logs(hub, w, &q).await,
        (&Method::PUT, ["v1", "artifacts", d]) => {
            let d = d.to_string();
            put_artifact(hub, &d, req).await
        }
        _ => Err(ApiError::new(404, "NotFound", format!("no route for {method} {path}"))),
    }
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let body = edge_listen::DeadlineBody::new(req.into_body(), DEFAULT_LIMITS.stall_timeout, SMALL_BODY_DEADLINE);
    let body = http_body_util::Limited::new(body, limit);
    body.collect().await.map(|c| c.to_bytes()).map_err(|e| {
        ApiError::new(413, "TooLarge", format!("request body could not be read (limit {limit} bytes): {e}"))
    })
}

async fn apply(hub: &Arc<Hub>, name: &str, req: Request<Incoming>, by: &str) -> Result<Response<BoxBody>, ApiError> {
    let body = read_body(req, MAX_MANIFEST_BYTES).await?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::new(400, "BadRequest", "manifest is not UTF-8"))?;
    let w = manifest::parse_json(text, Origin::Api).map_err(|inv| {
        let mut e = ApiError::new(422, "Invalid", format!("workload {name:?} is invalid"));
        e.details = inv.0.iter().map(|f| f.to_string()).collect();
        e
    })?;
    if w.metadata.name != name {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!("metadata.name {:?} does not match the URL's {name:?}", w.metadata.name),
        ));
    }
    let mut w = w;
    resolve_oci(hub, &mut w).await?;
    let (result, view) = hub.apply_workload(w, by)?;
    // Compiling for the nodes' targets starts now, not at the next tick.
    hub.want_compiled_for(&view.workload);
    let status = if result == "created" { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json(status, &serde_json::json!({"result": result, "workload": view})))
}

async fn apply_secret(hub: &Arc<Hub>, name: &str, req: Request<Incoming>) -> Result<Response<BoxBody>, ApiError> {
    let body = read_body(req, MAX_SECRET_REQUEST_BYTES).await?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::new(400, "BadRequest", "secret is not UTF-8"))?;
    let s = manifest::parse_secret_json(text).map_err(|inv| {
        let mut e = ApiError::new(422, "Invalid", format!("secret {name:?} is invalid"));
        e.details = inv.0.iter().map(|f| f.to_string()).collect();
        e
    })?;
    if s.metadata.name != name {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!("metadata.name {:?} does not match the URL's {name:?}", s.metadata.name),
        ));
    }
    let (result, view) = hub.apply_secret(s)?;
    let status = if result == "created" { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json(status, &serde_json::json!({"result": result, "secret": view})))
}

/// A secret's values at their limit, JSON-escaped at worst (`\u0000` is 6 bytes).
const MAX_SECRET_REQUEST_BYTES: usize = 6 * edge_api::manifest::MAX_SECRET_BYTES + 64 * 1024;

/// Pulls an `oci://` component into the artifact store and pins the
/// workload to its digest (so every node runs the same bytes, and devices
/// need no access to the registry).
async fn resolve_oci(hub: &Arc<Hub>, w: &mut edge_api::model::Workload) -> Result<(), ApiError> {
    let wasm = match &mut w.spec.runtime {
        edge_api::model::Runtime::Wasm(wasm) => wasm,
        edge_api::model::Runtime::Container(c) => {
            let name = w.metadata.name.clone();
            return resolve_image(hub, &name, c).await;
        }
    };
    let edge_api::model::ArtifactRef::Oci(r) = &wasm.component else { return Ok(()) };
    let reference = r.clone();
    let invalid = |msg: String| {
        let mut e = ApiError::new(422, "Invalid", format!("workload {:?} is invalid", w.metadata.name));
        e.details.push(format!("spec.wasm.component: {msg}"));
        e
    };
    let pulled = match hub.registry.pull_component(&reference, crate::MAX_ARTIFACT_BYTES).await {
        Ok(p) => p,
        Err(e @ edge_oci::OciError::Unreachable { .. }) => {
            return Err(ApiError::new(502, "RegistryUnavailable", e.to_string()));
        }
        Err(e) => return Err(invalid(e.to_string())),
    };
    let digest = pulled.layer.digest;
    if !hub.artifacts.has(&digest) {
        let mut up = hub
            .artifacts
            .begin(digest, crate::MAX_ARTIFACT_BYTES)
            .await
            .map_err(|e| ApiError::new(500, "ArtifactStore", e.to_string()))?;
        up.write(&pulled.bytes).await.map_err(|e| ApiError::new(500, "ArtifactStore", e.to_string()))?;
        up.finish().await.map_err(|e| ApiError::new(500, "ArtifactStore", e.to_string()))?;
    }
    tracing::info!(%reference, %digest, manifest = %pulled.manifest_digest, "pulled component");
    wasm.source = Some(match reference.digest {
        Some(_) => reference.to_string(),
        None => format!("{reference}@{}", pulled.manifest_digest),
    });
    wasm.component = edge_api::model::ArtifactRef::Digest(digest);
    Ok(())
}

/// Reads which platforms a container image offers and pins the workload to
/// the digest it resolved, so every node runs the same image even if the
/// tag moves. Nodes pull the image for their platform themselves.
async fn resolve_image(hub: &Arc<Hub>, name: &str, c: &mut edge_api::model::ContainerSpec) -> Result<(), ApiError> {
    let reference = c.image.clone();
    let found = match hub.registry.image_platforms(&reference).await {
        Ok(p) => p,
        Err(e @ edge_oci::OciError::Unreachable { .. }) => {
            return Err(ApiError::new(502, "RegistryUnavailable", e.to_string()));
        }
        Err(e) => {
            let mut err = ApiError::new(422, "Invalid", format!("workload {name:?} is invalid"));
            err.details.push(format!("spec.container.image: {e}"));
            return Err(err);
        }
    };
    tracing::info!(%reference, digest = %found.digest, platforms = found.images.len(), "resolved image");
    c.source.get_or_insert_with(|| reference.to_string());
    c.image.digest = Some(found.digest);
    c.platforms = found
        .images
        .into_iter()
        .map(|(platform, d)| edge_api::model::ImagePlatform { platform, manifest: d.digest })
        .collect();
    Ok(())
}

/// Whether a workload view satisfies a `wait?for=` condition.
fn satisfied(cond: &str, v: &WorkloadView) -> Result<bool, ApiError> {
    let s = &v.status;
    let current = s.replicas.iter().all(|r| r.up_to_date && r.observed_generation == r.revision);
    Ok(match cond {
        "Running" => s.phase == Phase::Running && current,
        "Succeeded" => s.phase == Phase::Succeeded && current,
        "Failed" => s.phase == Phase::Failed && current,
        "Finished" => s.phase.is_finished() && current,
        "Ready" => s.ready as usize == s.replicas.len(),
        "Scheduled" => s.replicas.iter().all(|r| r.node.is_some()),
        // Every replica runs (or ran) the current generation.
        "Started" => current && s.replicas.iter().all(|r| !matches!(r.phase, Phase::Pending | Phase::Unknown)),
        other => {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!(
                    "unknown condition {other:?} (expected Running, Succeeded, Failed, Finished, Ready, Scheduled, Started or Deleted)"
                ),
            ));
        }
    })
}

async fn wait(hub: &Arc<Hub>, name: &str, q: &[(String, String)]) -> Result<Response<BoxBody>, ApiError> {
    let cond: String = param(q, "for")?.unwrap_or_else(|| "Ready".to_string());
    let timeout_ms: u64 = param(q, "timeout_ms")?.unwrap_or(30_000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms.min(600_000));
    let mut rev = hub.revision();
    loop {
        rev.borrow_and_update();
        match hub.workload_view(name, false) {
            None if cond == "Deleted" => return Ok(json(StatusCode::OK, &serde_json::json!({"deleted": name}))),
            None => return Err(ApiError::not_found("workload", name)),
            Some(v) if cond != "Deleted" && satisfied(&cond, &v)? => return Ok(json(StatusCode::OK, &v)),
            Some(v) => {
                if tokio::time::timeout_at(deadline, rev.changed()).await.is_err() {
                    let mut e = ApiError::new(
                        408,
                        "Timeout",
                        format!("workload {name:?} is not {cond} after {timeout_ms} ms (phase {})", v.status.phase),
                    );
                    if let Some(m) = v.status.message.or(v.status.reason.map(|r| r.to_string())) {
                        e.details.push(m);
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// `GET /v1/events?after=SEQ&for=workload/NAME&wait_ms=N`: the events after
/// a cursor; with `wait_ms`, waits up to that long (at most a minute) for
/// one when there are none yet (a long poll: `edgectl get events -w`).
/// Nodes a page at a time, as kubectl lists: `labelSelector` (kubectl's
/// syntax), `limit`, and `continue` (the `x-edge-continue` header of the
/// page before, when more remain).
fn list_nodes(hub: &Arc<Hub>, q: &[(String, String)]) -> Result<Response<BoxBody>, ApiError> {
    let selector = match q.iter().find(|(k, _)| k == "labelSelector") {
        None => None,
        Some((_, s)) => Some(
            edge_api::placement::Selector::parse(s)
                .map_err(|e| ApiError::new(400, "BadRequest", format!("labelSelector {s:?}: {e}")))?,
        ),
    };
    let limit: usize = param(q, "limit")?.unwrap_or(usize::MAX);
    if limit == 0 {
        return Err(ApiError::new(400, "BadRequest", "limit=0: a page holds at least one node"));
    }
    let after: Option<String> = param(q, "continue")?;
    if let Some(a) = &after {
        names::check_node_name(a)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("continue={a:?} is not a node name: {e}")))?;
    }
    let (page, next) = hub.node_page(selector.as_ref(), after.as_deref(), limit);
    let mut resp = json(StatusCode::OK, &page);
    if let Some(next) = next.and_then(|n| hyper::header::HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert(CONTINUE, next);
    }
    Ok(resp)
}

/// The header naming where the next page of a list starts.
pub const CONTINUE: &str = "x-edge-continue";

async fn events(hub: &Arc<Hub>, q: &[(String, String)]) -> Result<Response<BoxBody>, ApiError> {
    let after: Option<u64> = param(q, "after")?;
    let object: Option<String> = param(q, "for")?;
    if let Some(o) = &object {
        let ok = match o.split_once('/') {
            Some(("workload", n)) => names::check_name(n).is_ok(),
            Some(("node", n)) => names::check_node_name(n).is_ok(),
            None => o == "workload" || o == "node",
            _ => false,
        };
        if !ok {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!("for={o:?}: expected workload/NAME, node/NAME, or workload or node (all of a kind)"),
            ));
        }
    }
    let wait_ms: u64 = param(q, "wait_ms")?.unwrap_or(0).min(60_000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let (list, mut more) = hub.events(after, object.as_deref());
        if !list.is_empty() || wait_ms == 0 {
            return Ok(json(StatusCode::OK, &list));
        }
        more.borrow_and_update();
        if tokio::time::timeout_at(deadline, more.changed()).await.is_err() {
            return Ok(json(StatusCode::OK, &list));
        }
    }
}

async fn logs(hub: &Arc<Hub>, name: &str, q: &[(String, String)]) -> Result<Response<BoxBody>, ApiError> {
    let replica: u32 = param(q, "replica")?.unwrap_or(0);
    let tail: Option<u64> = param(q, "tail")?;
    let follow = flag(q, "follow");
    let (id, node, mut rx) = hub.open_logs(name, replica, tail, follow, LOG_LEASE)?;
    let closer = CloseOnDrop { hub: hub.clone(), id: id.clone() };
    let first = match tokio::time::timeout(LOG_FIRST_ANSWER, rx.recv()).await {
        Err(_) => {
            return Err(ApiError::new(
                504,
                "NodeTimeout",
                format!("node {node} did not answer the log request within {}s", LOG_FIRST_ANSWER.as_secs()),
            ));
        }
        Ok(None) => None,
        Ok(Some(LogChunk::Error(e))) => return Err(ApiError::new(404, "NoLogs", e)),
        Ok(Some(LogChunk::Data(d))) => Some(d),
    };
    let (tx, body_rx) = mpsc::channel(16);
    let hub2 = hub.clone();
    tokio::spawn(async move {
        let _closer = closer;
        if let Some(d) = first
            && tx.send(Ok(Bytes::from(d))).await.is_err()
        {
            return;
        }
        let mut renew = tokio::time::interval(LOG_LEASE / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(LogChunk::Data(d)) => if tx.send(Ok(Bytes::from(d))).await.is_err() { return },
                    Some(LogChunk::Error(e)) => {
                        let _ = tx.send(Ok(Bytes::from(format!("\n[edge] log stream ended: {e}\n")))).await;
                        return;
                    }
                    None => return,
                },
                _ = renew.tick(), if follow => {
                    hub2.send_request(&node, &edge_api::wire::Request::Renew {
                        id: id.clone(),
                        lease_ms: LOG_LEASE.as_millis() as u64,
                        expires_ms: Hub::request_expiry(),
                    });
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; charset=utf-8")
        .body(ChannelBody(body_rx).boxed())
        .unwrap_or_else(|_| Response::new(full(""))))
}

/// Tells the agent to stop streaming when the reader goes away, however it goes.
struct CloseOnDrop {
    hub: Arc<Hub>,
    id: String,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.hub.close_logs(&self.id);
    }
}

fn parse_digest(d: &str) -> Result<Digest, ApiError> {
    d.parse::<Digest>().map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))
}

async fn put_artifact(hub: &Arc<Hub>, d: &str, req: Request<Incoming>) -> Result<Response<BoxBody>, ApiError> {
    let digest = parse_digest(d)?;
    if let Some(size) = hub.artifacts.size(&digest) {
        return Ok(json(StatusCode::OK, &serde_json::json!({"digest": digest, "size": size, "existed": true})));
    }
    let mut upload = hub
        .artifacts
        .begin(digest, crate::MAX_ARTIFACT_BYTES)
        .await
        .map_err(|e| ApiError::new(500, "ArtifactStore", e.to_string()))?;
    let mut body = edge_listen::DeadlineBody::new(req.into_body(), DEFAULT_LIMITS.stall_timeout, UPLOAD_DEADLINE);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::new(400, "BadRequest", format!("upload interrupted: {e}")))?;
        if let Ok(data) = frame.into_data() {
            upload.write(&data).await.map_err(|e| match e {
                crate::artifacts::ArtifactError::TooLarge { .. } => ApiError::new(413, "TooLarge", e.to_string()),
                other => ApiError::new(500, "ArtifactStore", other.to_string()),
            })?;
            hub.metrics.artifact_bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
    let size = upload.finish().await.map_err(|e| match e {
        crate::artifacts::ArtifactError::Mismatch { .. } => ApiError::new(400, "DigestMismatch", e.to_string()),
        other => ApiError::new(500, "ArtifactStore", other.to_string()),
    })?;
    tracing::info!(%digest, size, "artifact stored");
    Ok(json(StatusCode::CREATED, &serde_json::json!({"digest": digest, "size": size, "existed": false})))
}

/// A component compiled for an engine (`fingerprint`), with its seal in
/// `x-edge-seal`; 404 if it will not be made. While it is being compiled
/// the answer waits for it (a long poll, up to `PRECOMPILE_WAIT`), then
/// says 202: ask again.
async fn get_precompiled(hub: &Arc<Hub>, d: &str, fingerprint: &str) -> Result<Response<BoxBody>, ApiError> {
    let digest = parse_digest(d)?;
    if fingerprint.is_empty()
        || fingerprint.len() > 128
        || !fingerprint.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(ApiError::new(400, "BadRequest", format!("{fingerprint:?} is not an engine fingerprint")));
    }
    let until = tokio::time::Instant::now() + PRECOMPILE_WAIT;
    let answer = loop {
        let mut ended = hub.precompiler.ended();
        let h = hub.clone();
        let fp = fingerprint.to_string();
        let answer =
            tokio::task::spawn_blocking(move || h.precompiler.answer(digest, &fp)).await.map_err(ApiError::internal)?;
        match answer {
            crate::precompile::Answer::Pending(_) if tokio::time::Instant::now() < until => {
                let _ = tokio::time::timeout_at(until, ended.changed()).await;
            }
            a => break a,
        }
    };
    match answer {
        crate::precompile::Answer::Ready { seal, path } => {
            let seal = serde_json::to_string(&seal).map_err(ApiError::internal)?;
            let builder = Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/octet-stream")
                .header("x-edge-seal", seal);
            serve_file(hub, builder, path)
        }
        crate::precompile::Answer::Pending(m) => Err(ApiError::new(202, "Compiling", m)),
        crate::precompile::Answer::Unavailable(m) => Err(ApiError::new(404, "NotPrecompiled", m)),
    }
}

/// How long a request for compiled code waits for a compile under way
/// (within the 30 s agents wait for an answer).
const PRECOMPILE_WAIT: Duration = Duration::from_secs(20);

async fn get_artifact(hub: &Arc<Hub>, d: &str, head: bool) -> Result<Response<BoxBody>, ApiError> {
    let digest = parse_digest(d)?;
    let Some(size) = hub.artifacts.size(&digest) else {
        return Err(ApiError::new(404, "NotFound", format!("artifact {digest} is not in the hub's store")));
    };
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/wasm")
        .header("content-length", size)
        .header("docker-content-digest", digest.to_string());
    if head {
        return builder.body(full("")).map_err(ApiError::internal);
    }
    serve_file(hub, builder, hub.artifacts.path(&digest))
}

/// Streams a file of the artifact store as the body of `builder`'s answer.
fn serve_file(
    hub: &Arc<Hub>,
    builder: hyper::http::response::Builder,
    path: std::path::PathBuf,
) -> Result<Response<BoxBody>, ApiError> {
    let (tx, rx) = mpsc::channel(4);
    let hub2 = hub.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    hub2.metrics.artifact_bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    builder.body(ChannelBody(rx).boxed()).map_err(ApiError::internal)
}

#[cfg(test)]
mod query_tests {
    use super::decode;

    #[test]
    fn query_values_are_percent_decoded_and_malformed_ones_kept() {
        assert_eq!(decode("role%3Dgw%2C%21legacy"), "role=gw,!legacy");
        assert_eq!(decode("site+in+(a%2Cb)"), "site in (a,b)");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz%4"), "%zz%4");
        assert_eq!(decode("%e2%9c%93"), "\u{2713}");
        assert_eq!(decode("%ff"), "\u{fffd}", "not UTF-8: replaced, never a panic");
    }
}
