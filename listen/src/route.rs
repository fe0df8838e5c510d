//! Request hygiene and routing for the agent's proxy, pure: the one host a
//! request is for, its path normalised (or refused) before anything routes
//! or forwards it, hop-by-hop headers removed, and an immutable table from
//! (host, path prefix) to a backend. Kept apart from the proxy so that it can
//! be fuzzed on its own.

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
pub struct Route<B> {
    pub host: HostMatch,
    /// `/` or `/a/b` (no trailing slash).
    pub prefix: String,
    pub backend: B,
    /// Who asked for it: a replica key, or `static` for `--route`.
    pub owner: String,
}

/// Whether `path` lies under `prefix` on a segment boundary.
fn under(prefix: &str, path: &str) -> bool {
    prefix == "/" || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// An immutable routing table.
#[derive(Clone)]
pub struct Table<B> {
    routes: Vec<Route<B>>,
}

impl<B> Default for Table<B> {
    fn default() -> Self {
        Table { routes: Vec::new() }
    }
}

impl<B> Table<B> {
    /// Orders the routes by precedence; of two routes for the same host and
    /// prefix the first given wins, and the loser is reported with the reason.
    pub fn build(mut routes: Vec<Route<B>>) -> (Table<B>, Vec<(String, String)>) {
        // Stable sort: among equals, the order given is kept (callers give
        // static routes first, then replicas by key).
        routes.sort_by(|a, b| {
            a.host.rank().cmp(&b.host.rank()).then(b.prefix.len().cmp(&a.prefix.len())).then(a.host.cmp(&b.host))
        });
        let mut kept: Vec<Route<B>> = Vec::new();
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

    pub fn lookup(&self, host: &str, path: &str) -> Option<&Route<B>> {
        self.routes.iter().find(|r| r.host.matches(host) && under(&r.prefix, path))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn describe<B>(r: &Route<B>) -> String {
    let host = match &r.host {
        HostMatch::Exact(h) => h.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
        HostMatch::Any => "*".into(),
    };
    format!("{host}{}", r.prefix)
}

/// The host name a request is for: the authority of an absolute-form
/// request (RFC 9112 §3.2.2: it wins over `Host`), else its one `Host`
/// header; port and trailing dot removed, lowercased. Two `Host` headers, or
/// a host that is not a host name or address, are refused.
pub fn request_host(uri: &hyper::Uri, headers: &hyper::HeaderMap) -> Result<String, String> {
    let raw = match uri.authority() {
        Some(a) => a.as_str().rsplit('@').next().unwrap_or("").to_string(),
        None => {
            let mut hosts = headers.get_all(hyper::header::HOST).iter();
            let first = hosts.next();
            if hosts.next().is_some() {
                return Err("more than one Host header".into());
            }
            match first {
                None => String::new(),
                Some(v) => v.to_str().map_err(|_| "the Host header is not text")?.to_string(),
            }
        }
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unbalanced [ in the host")?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.bytes().all(|c| c.is_ascii_digit()))) {
            return Err(format!("{raw:?} is not host[:port]"));
        }
        h.to_string()
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => h.to_string(),
            Some(_) => return Err(format!("{raw:?} is not host[:port]")),
            None => raw.clone(),
        }
    };
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
    if !host.chars().all(ok) {
        return Err(format!("{raw:?} is not a host name or address"));
    }
    Ok(host.trim_end_matches('.').to_ascii_lowercase())
}

/// The path a request is routed and forwarded by: dot-segments resolved
/// (RFC 3986 §5.2.4), repeated slashes merged; refused when it climbs above
/// the root, or hides a separator or a dot in an escape (`%2f`, `%5c`,
/// `%2e`) or a raw backslash, which backends decode differently.
pub fn normalize_path(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(format!("the path {raw:?} does not start with /"));
    }
    let lower = raw.to_ascii_lowercase();
    for (esc, what) in [("%2f", "/"), ("%5c", "\\"), ("%2e", "."), ("%00", "NUL")] {
        if lower.contains(esc) {
            return Err(format!("the path holds an escaped {what} ({esc})"));
        }
    }
    if raw.contains('\\') {
        return Err("the path holds a backslash".into());
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in raw.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(format!("the path {raw:?} climbs above /"));
                }
            }
            s => out.push(s),
        }
    }
    let trailing = raw.len() > 1 && (raw.ends_with('/') || raw.ends_with("/.") || raw.ends_with("/.."));
    let mut path = format!("/{}", out.join("/"));
    if trailing && path != "/" {
        path.push('/');
    }
    Ok(path)
}

/// Removes the headers that describe one connection, not the request (RFC
/// 9110 §7.6.1): the fixed list, and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter(|t| !t.is_empty())
        .collect();
    for h in named {
        headers.remove(h.as_str());
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, prefix: &str, owner: &str) -> Route<()> {
        Route { host: HostMatch::parse(host), prefix: prefix.into(), backend: (), owner: owner.into() }
    }

    fn owner(t: &Table<()>, host: &str, path: &str) -> Option<String> {
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
    fn paths_are_normalised_or_refused_before_routing() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("/", Ok("/")),
            ("/public/a.txt", Ok("/public/a.txt")),
            ("/public/../secret.txt", Ok("/secret.txt")),
            ("/public/./a/../b/", Ok("/public/b/")),
            ("//public///a", Ok("/public/a")),
            ("/public/..", Ok("/")),
            ("/a/b/..", Ok("/a/")),
            ("/..", Err("climbs above /")),
            ("/public/../../etc/passwd", Err("climbs above /")),
            ("/public/%2e%2e/secret.txt", Err("escaped .")),
            ("/public/%2E%2E/secret.txt", Err("escaped .")),
            ("/public/..%2fsecret.txt", Err("escaped /")),
            ("/public/..%2Fsecret.txt", Err("escaped /")),
            ("/public/..%5csecret.txt", Err("escaped \\")),
            ("/public\\..\\secret.txt", Err("backslash")),
            ("/a%00b", Err("NUL")),
            ("/a%20b", Ok("/a%20b")),
            ("*", Err("does not start with /")),
        ];
        for (raw, want) in cases {
            match (normalize_path(raw), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w, "{raw}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{raw}: {e}"),
                (got, want) => panic!("{raw}: got {got:?}, want {want:?}"),
            }
        }
        // Routed by the normalised path, a route for /public serves none of the tricks.
        let (t, _) = Table::build(vec![route("", "/public", "public")]);
        for trick in ["/public/../secret.txt", "/public/x/../../secret.txt"] {
            assert_eq!(owner(&t, "h", &normalize_path(trick).unwrap()), None, "{trick}");
        }
    }

    #[test]
    fn the_host_is_one_host_and_an_absolute_uri_wins() {
        let headers = |hosts: &[&str]| {
            let mut h = hyper::HeaderMap::new();
            for v in hosts {
                h.append(hyper::header::HOST, v.parse().unwrap());
            }
            h
        };
        let origin: hyper::Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&origin, &headers(&["Hello.Local:8080"])), Ok("hello.local".into()));
        assert_eq!(request_host(&origin, &headers(&["[::1]:80"])), Ok("::1".into()));
        assert_eq!(request_host(&origin, &headers(&["example.com."])), Ok("example.com".into()));
        assert_eq!(request_host(&origin, &headers(&[])), Ok(String::new()));
        assert!(request_host(&origin, &headers(&["a.local", "b.local"])).unwrap_err().contains("more than one"));
        assert!(request_host(&origin, &headers(&["a.local, b.local"])).is_err());
        assert!(request_host(&origin, &headers(&["a/b"])).is_err());
        assert!(request_host(&origin, &headers(&["a:b"])).is_err());
        let absolute: hyper::Uri = "http://secret.local:8080/x".parse().unwrap();
        assert_eq!(request_host(&absolute, &headers(&["public.local"])), Ok("secret.local".into()));
        assert_eq!(request_host(&absolute, &headers(&["a", "b"])), Ok("secret.local".into()));
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret-Token"),
            ("connection", "x-other"),
            ("x-secret-token", "s"),
            ("x-other", "o"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "k"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }
}
