//! The agent's built-in HTTP proxy: one listener; requests are routed by
//! host name and path prefix to Wasm services (in-process, no extra hop) or
//! to plain upstream servers.
//!
//! Architecture invariant: the route table is an immutable value, rebuilt
//! whole and swapped in one step; a request sees either the old table or the
//! new one, never a mixture. A request in flight keeps the service it was
//! routed to until it completes, so updates drop no requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

/// How a route matches the `Host` header.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
    Any,
}

impl HostMatch {
    pub fn parse(h: &str) -> HostMatch {
        let h = h.to_ascii_lowercase();
        if h.is_empty() || h == "*" {
            HostMatch::Any
        } else if let Some(s) = h.strip_prefix("*.") {
            HostMatch::Suffix(format!(".{s}"))
        } else {
            HostMatch::Exact(h)
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
            HostMatch::Any => true,
        }
    }

    /// Exact names beat wildcards, which beat any-host.
    fn rank(&self) -> u8 {
        match self {
            HostMatch::Exact(_) => 0,
            HostMatch::Suffix(_) => 1,
            HostMatch::Any => 2,
        }
    }
}

#[derive(Clone)]
pub struct Route {
    pub host: HostMatch,
    /// `/` or `/a/b` (no trailing slash).
    pub prefix: String,
    pub backend: Backend,
    /// Who asked for it: a replica key, or `static` for `--route`.
    pub owner: String,
}

/// Whether `path` lies under `prefix` on a segment boundary.
fn under(prefix: &str, path: &str) -> bool {
    prefix == "/" || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// An immutable routing table.
#[derive(Clone, Default)]
pub struct Table {
    routes: Vec<Route>,
}

impl Table {
    /// Orders the routes by precedence; of two routes for the same host and
    /// prefix the first given wins, and the loser is reported with the reason.
    pub fn build(mut routes: Vec<Route>) -> (Table, Vec<(String, String)>) {
        // Stable sort: among equals, the order given is kept (callers give
        // static routes first, then replicas by key).
        routes.sort_by(|a, b| {
            a.host.rank().cmp(&b.host.rank()).then(b.prefix.len().cmp(&a.prefix.len())).then(a.host.cmp(&b.host))
        });
        let mut kept: Vec<Route> = Vec::new();
        let mut conflicts = Vec::new();
        for r in routes {
            if let Some(winner) = kept.iter().find(|k| k.host == r.host && k.prefix == r.prefix) {
                if winner.owner != r.owner {
                    conflicts.push((
                        r.owner.clone(),
                        format!("route {} is already served by {}", describe(&r), winner.owner),
                    ));
                }
                continue;
            }
            kept.push(r);
        }
        (Table { routes: kept }, conflicts)
    }

    pub fn lookup(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.host.matches(host) && under(&r.prefix, path))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn describe(r: &Route) -> String {
    let host = match &r.host {
        HostMatch::Exact(h) => h.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
        HostMatch::Any => "*".into(),
    };
    format!("{host}{}", r.prefix)
}

/// The host name of a request: `Host` header (or URI authority), port and
/// trailing dot removed, lowercased.
pub fn request_host(req: &hyper::Request<Incoming>) -> String {
    let raw = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or("").to_string()
    } else {
        raw.rsplit_once(':')
            .map(|(h, p)| if p.bytes().all(|c| c.is_ascii_digit()) { h } else { raw.as_str() })
            .unwrap_or(&raw)
            .to_string()
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type Upstream = Client<HttpConnector, Incoming>;

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
    ) -> hyper::Response<BoxBody> {
        let host = request_host(&req);
        let path = req.uri().path().to_string();
        let table = self.table();
        let Some(route) = table.lookup(&host, &path) else {
            return text_response(404, format!("no route for host {host:?} and path {path:?} on node {}\n", self.node));
        };
        match route.backend.clone() {
            Backend::Wasm(svc) => svc.handle(req).await,
            Backend::Unavailable(why) => text_response(503, format!("{why}\n")),
            Backend::Upstream(base) => Self::forward(client, req, &base, &host, peer).await,
        }
    }

    async fn forward(
        client: &Upstream,
        req: hyper::Request<Incoming>,
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
        for h in HOP_BY_HOP {
            parts.headers.remove(*h);
        }
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
                for h in HOP_BY_HOP {
                    parts.headers.remove(*h);
                }
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
/// request. This is what keeps the proxy's own latency near nginx's.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    let mut queues = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
        let proxy = proxy.clone();
        let stop = shutdown.clone();
        let spawned =
            std::thread::Builder::new().name(format!("edge-proxy-{i}")).spawn(move || worker(rx, proxy, stop));
        match spawned {
            Ok(_) => queues.push(tx),
            Err(e) => tracing::error!("cannot start proxy worker {i}: {e}"),
        }
    }
    if queues.is_empty() {
        tracing::error!("no proxy workers; the proxy is off");
        return;
    }
    let mut next = 0usize;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("proxy accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match stream.into_std() {
                    Ok(std) => {
                        let _ = queues[next % queues.len()].send((std, peer));
                        next = next.wrapping_add(1);
                    }
                    Err(e) => tracing::warn!("cannot hand a connection to a proxy worker: {e}"),
                }
            }
            _ = shutdown.changed() => break,
        }
    }
}

fn worker(
    mut queue: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    proxy: Arc<Proxy>,
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
                    let Some((std, peer)) = conn else { break };
                    let stream = match tokio::net::TcpStream::from_std(std) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("proxy worker cannot take a connection: {e}");
                            continue;
                        }
                    };
                    let proxy = proxy.clone();
                    let client = client.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let proxy = proxy.clone();
                            let client = client.clone();
                            async move { Ok::<_, Infallible>(proxy.handle(&client, req, peer).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!("proxy connection ended: {e}");
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

    fn route(host: &str, prefix: &str, owner: &str) -> Route {
        Route {
            host: HostMatch::parse(host),
            prefix: prefix.into(),
            backend: Backend::Unavailable(owner.into()),
            owner: owner.into(),
        }
    }

    fn owner(t: &Table, host: &str, path: &str) -> Option<String> {
        t.lookup(host, path).map(|r| r.owner.clone())
    }

    #[test]
    fn lookup_prefers_exact_hosts_then_wildcards_then_longest_prefix() {
        let (t, conflicts) = Table::build(vec![
            route("", "/", "any-root"),
            route("", "/api", "any-api"),
            route("*.example.com", "/", "wild"),
            route("shop.example.com", "/", "shop"),
            route("shop.example.com", "/cart", "cart"),
        ]);
        assert!(conflicts.is_empty());
        let cases = [
            ("shop.example.com", "/", "shop"),
            ("shop.example.com", "/cart", "cart"),
            ("shop.example.com", "/cart/items", "cart"),
            ("shop.example.com", "/cartoon", "shop"),
            ("blog.example.com", "/api", "wild"),
            ("example.com", "/api/v1", "any-api"),
            ("other", "/apis", "any-root"),
        ];
        for (host, path, want) in cases {
            assert_eq!(owner(&t, host, path).as_deref(), Some(want), "{host}{path}");
        }
    }

    #[test]
    fn without_a_catch_all_unknown_routes_miss() {
        let (t, _) = Table::build(vec![route("hello.local", "/", "hello")]);
        assert_eq!(owner(&t, "hello.local", "/x"), Some("hello".into()));
        assert_eq!(owner(&t, "other.local", "/"), None);
    }

    #[test]
    fn conflicting_routes_keep_the_first_and_report_the_rest() {
        let (t, conflicts) = Table::build(vec![route("a.local", "/", "x.0"), route("a.local", "/", "y.0")]);
        assert_eq!(owner(&t, "a.local", "/"), Some("x.0".into()));
        assert_eq!(conflicts, vec![("y.0".to_string(), "route a.local/ is already served by x.0".to_string())]);
        assert_eq!(t.len(), 1);
    }

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
