//! The agent's built-in HTTP proxy: one listener; requests are routed by
//! host name and path prefix to Wasm services (in-process, no extra hop) or
//! to plain upstream servers.
//!
//! Architecture invariant: the route table is an immutable value, rebuilt
//! whole and swapped in one step; a request sees either the old table or the
//! new one, never a mixture. A request in flight keeps the service it was
//! routed to until it completes, so updates drop no requests.
//!
//! Architecture invariant: routing and forwarding see one and the same
//! request: the path normalised ([`normalize_path`]: dot-segments resolved,
//! encoded `/`, `\` and `.` refused), one host ([`request_host`]: the
//! authority of an absolute-form request, else the single `Host` header),
//! and no hop-by-hop headers. A backend is never handed a path that means
//! something else to it than to the route table.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::wasm::{BoxBody, HttpService, text_response};

/// Where a route sends requests.
#[derive(Clone)]
pub enum Backend {
    Wasm(Arc<HttpService>),
    /// A plain HTTP server: `http://host:port`.
    Upstream(String),
    /// A service that exists but cannot serve yet (starting, backing off).
    Unavailable(String),
}

pub use edge_listen::route::{HostMatch, normalize_path, request_host, strip_hop_by_hop};

/// A route to one of the agent's backends.
pub type Route = edge_listen::route::Route<Backend>;
/// The agent's routing table.
pub type Table = edge_listen::route::Table<Backend>;

/// A request body on its way to a backend: it must keep arriving.
type UpBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

type Upstream = Client<HttpConnector, UpBody>;

/// How long a request to a plain upstream may take to arrive in all.
const UPSTREAM_BODY_DEADLINE: Duration = Duration::from_secs(300);

/// The proxy's listener limits: a device serves its local clients, which may
/// sit behind one address (a NAT, a gateway).
pub const DEFAULT_LIMITS: edge_listen::Limits = edge_listen::Limits {
    max_connections: 4096,
    per_address: 512,
    header_timeout: Duration::from_secs(10),
    stall_timeout: Duration::from_secs(30),
};

fn bad_request(why: String) -> hyper::Response<BoxBody> {
    text_response(400, format!("bad request: {why}\n"))
}

/// A pool of upstream connections for one worker thread.
fn upstream_client() -> Upstream {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(http)
}

pub struct Proxy {
    table: RwLock<Arc<Table>>,
    node: String,
}

impl Proxy {
    pub fn new(node: &str) -> Arc<Proxy> {
        Arc::new(Proxy { table: RwLock::new(Arc::new(Table::default())), node: node.to_string() })
    }

    pub fn set(&self, t: Table) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn handle(
        &self,
        client: &Upstream,
        req: hyper::Request<Incoming>,
        peer: SocketAddr,
        stall: Duration,
    ) -> hyper::Response<BoxBody> {
        let (mut parts, body) = req.into_parts();
        let host = match request_host(&parts.uri, &parts.headers) {
            Ok(h) => h,
            Err(e) => return bad_request(e),
        };
        let path = match normalize_path(parts.uri.path()) {
            Ok(p) => p,
            Err(e) => return bad_request(e),
        };
        // From here on the request is what was routed: its normalised path
        // (with the query), its one host, no hop-by-hop headers.
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        parts.uri = match pq.parse() {
            Ok(u) => u,
            Err(e) => return bad_request(format!("the path: {e}")),
        };
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(v) = hyper::header::HeaderValue::from_str(&host)
            && !host.is_empty()
        {
            parts.headers.insert(hyper::header::HOST, v);
        }
        let table = self.table();
        let Some(route) = table.lookup(&host, &path) else {
            return text_response(404, format!("no route for host {host:?} and path {path:?} on node {}\n", self.node));
        };
        match route.backend.clone() {
            Backend::Wasm(svc) => {
                let body = edge_listen::DeadlineBody::new(body, stall, svc.request_timeout()).map_err(|e| match e {
                    edge_listen::BodyError::Inner(e) => wasmtime_wasi_http::Error::Hyper(e),
                    _ => wasmtime_wasi_http::Error::ConnectionReadTimeout,
                });
                svc.handle(hyper::Request::from_parts(parts, body)).await
            }
            Backend::Unavailable(why) => text_response(503, format!("{why}\n")),
            Backend::Upstream(base) => {
                let body = edge_listen::DeadlineBody::new(body, stall, UPSTREAM_BODY_DEADLINE)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed();
                Self::forward(client, hyper::Request::from_parts(parts, body), &base, &host, peer).await
            }
        }
    }

    async fn forward(
        client: &Upstream,
        req: hyper::Request<UpBody>,
        base: &str,
        host: &str,
        peer: SocketAddr,
    ) -> hyper::Response<BoxBody> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = match format!("{base}{pq}").parse::<hyper::Uri>() {
            Ok(u) => u,
            Err(e) => return text_response(502, format!("bad upstream {base}: {e}\n")),
        };
        parts.uri = uri;
        let fwd = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = hyper::header::HeaderValue::from_str(&fwd) {
            parts.headers.insert("x-forwarded-for", v);
        }
        if let Ok(v) = hyper::header::HeaderValue::from_str(host) {
            parts.headers.insert("x-forwarded-host", v);
        }
        parts.headers.insert("x-forwarded-proto", hyper::header::HeaderValue::from_static("http"));
        match client.request(hyper::Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                hyper::Response::from_parts(
                    parts,
                    body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>).boxed_unsync(),
                )
            }
            Err(e) => text_response(502, format!("upstream {base} failed: {e}\n")),
        }
    }
}

/// Serves the proxy on `listener` until `shutdown` turns true.
///
/// Connections are accepted here and handed to worker threads, one per CPU,
/// each with its own single-threaded runtime and upstream pool: everything
/// a connection does (routing, forwarding, instantiating a component and
/// running it) then stays on one thread, with no cross-thread wake-up per
/// request. This is what keeps the proxy's own latency near nginx's. (One
/// multi-threaded runtime whose workers steal each other's connections was
/// measured against it, with and without other load on the CPUs: lower
/// throughput, higher p50, and no better p99.)
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: edge_listen::Limits,
    shutdown: watch::Receiver<bool>,
) {
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    let mut queues = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        let proxy = proxy.clone();
        let stop = shutdown.clone();
        let spawned =
            std::thread::Builder::new().name(format!("edge-proxy-{i}")).spawn(move || worker(rx, proxy, limits, stop));
        match spawned {
            Ok(_) => queues.push(tx),
            Err(e) => tracing::error!("cannot start proxy worker {i}: {e}"),
        }
    }
    if queues.is_empty() {
        tracing::error!("no proxy workers; the proxy is off");
        return;
    }
    let admission = edge_listen::Admission::new(limits.max_connections, limits.per_address);
    let mut next = 0usize;
    let mut last_refusal: Option<std::time::Instant> = None;
    let refused = |_, peer, why| {
        if last_refusal.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_refusal = Some(std::time::Instant::now());
            tracing::warn!("proxy connection from {peer} refused: {why}");
        }
    };
    let hand_over = |stream: tokio::net::TcpStream, peer, admitted| match stream.into_std() {
        Ok(std) => {
            let _ = queues[next % queues.len()].send(Accepted { stream: std, peer, admitted });
            next = next.wrapping_add(1);
        }
        Err(e) => tracing::warn!("cannot hand a connection to a proxy worker: {e}"),
    };
    edge_listen::accept_loop(&listener, "proxy", &admission, shutdown, refused, hand_over).await;
}

/// A connection for a worker, with its place in the connection count.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    admitted: edge_listen::Admitted,
}

fn worker(
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    proxy: Arc<Proxy>,
    limits: edge_listen::Limits,
    mut stop: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start a proxy worker runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let client = upstream_client();
        loop {
            tokio::select! {
                conn = queue.recv() => {
                    let Some(Accepted { stream, peer, admitted }) = conn else { break };
                    let stream = match tokio::net::TcpStream::from_std(stream) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("proxy worker cannot take a connection: {e}");
                            continue;
                        }
                    };
                    let proxy = proxy.clone();
                    let client = client.clone();
                    tokio::spawn(async move {
                        let _admitted = admitted;
                        let svc = hyper::service::service_fn(move |req| {
                            let proxy = proxy.clone();
                            let client = client.clone();
                            async move { Ok::<_, Infallible>(proxy.handle(&client, req, peer, limits.stall_timeout).await) }
                        });
                        let io = edge_listen::StallIo::new(stream, limits.stall_timeout);
                        let conn = edge_listen::http1(&limits).serve_connection(hyper_util::rt::TokioIo::new(io), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!("proxy connection from {peer} ended: {e}");
                        }
                    });
                }
                _ = stop.changed() => break,
            }
        }
    });
}

/// Parses `--route HOST[/PATH]=http://ADDR` (a static route to a plain server).
pub fn parse_static_route(s: &str) -> Result<(HostMatch, String, String), String> {
    let (lhs, upstream) = s.split_once('=').ok_or_else(|| format!("{s:?} is not HOST[/PATH]=http://ADDR"))?;
    let (host, prefix) = match lhs.find('/') {
        Some(i) => (&lhs[..i], lhs[i..].trim_end_matches('/').to_string()),
        None => (lhs, String::new()),
    };
    let prefix = if prefix.is_empty() { "/".to_string() } else { prefix };
    let u: hyper::Uri = upstream.parse().map_err(|e| format!("{upstream:?} is not a URL: {e}"))?;
    if u.scheme_str() != Some("http") || u.authority().is_none() || u.path().len() > 1 {
        return Err(format!("{upstream:?}: the upstream must be http://host:port, without a path"));
    }
    Ok((HostMatch::parse(host), prefix, upstream.trim_end_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_routes_parse() {
        let (h, p, u) = parse_static_route("db.local/admin=http://127.0.0.1:9000").unwrap();
        assert_eq!(
            (h, p.as_str(), u.as_str()),
            (HostMatch::Exact("db.local".into()), "/admin", "http://127.0.0.1:9000")
        );
        let (h, p, _) = parse_static_route("*=http://10.0.0.1:80/").unwrap();
        assert_eq!((h, p.as_str()), (HostMatch::Any, "/"));
        assert!(parse_static_route("x=https://a:1").is_err());
        assert!(parse_static_route("x=http://a:1/path").is_err());
        assert!(parse_static_route("nothing").is_err());
    }
}
