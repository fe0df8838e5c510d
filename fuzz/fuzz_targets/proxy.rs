//! What the agent's proxy does with a request before routing it: its one
//! host, its path normalised or refused, hop-by-hop headers removed, and the
//! route it matches. Input: `Host` values (separated by `\r`), a newline,
//! the request target.
#![no_main]

use edge_listen::route::{HostMatch, Route, Table, normalize_path, request_host, strip_hop_by_hop};
use hyper::header::{CONNECTION, HOST, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fn table() -> Table<&'static str> {
    let routes = [("*", "/"), ("shop.local", "/public"), ("*.example.com", "/api"), ("shop.local", "/")]
        .into_iter()
        .map(|(h, p)| Route { host: HostMatch::parse(h), prefix: p.into(), backend: p, owner: format!("{h}{p}") })
        .collect();
    Table::build(routes).0
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (hosts, target) = text.split_once('\n').unwrap_or(("", text));
    let mut headers = HeaderMap::new();
    for h in hosts.split('\r') {
        if let Ok(v) = HeaderValue::from_str(h) {
            headers.append(HOST, v.clone());
            headers.append(CONNECTION, v);
        }
    }
    let uri: hyper::Uri = target.parse().unwrap_or_default();
    let host = request_host(&uri, &headers);
    if let Ok(h) = &host {
        assert!(h.chars().all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c)), "{h:?}");
        assert_eq!(*h, h.to_ascii_lowercase());
    }
    for raw in [target, uri.path()] {
        if let Ok(p) = normalize_path(raw) {
            assert!(p.starts_with('/'), "{p:?}");
            assert!(!p.split('/').any(|s| s == "." || s == ".."), "dot-segment left in {p:?}");
            assert!(!p.contains("//") && !p.contains('\\'), "{p:?}");
            let lower = p.to_ascii_lowercase();
            assert!(!lower.contains("%2f") && !lower.contains("%2e") && !lower.contains("%5c"), "{p:?}");
            assert_eq!(normalize_path(&p).as_deref(), Ok(p.as_str()), "normalising twice changed {raw:?}");
            if let Some(r) = table().lookup(host.as_deref().unwrap_or(""), &p) {
                let pre = &r.prefix;
                assert!(pre == "/" || p == *pre || p.starts_with(&format!("{pre}/")), "{p:?} routed to {pre:?}");
            }
        }
    }
    let mut stripped = headers.clone();
    strip_hop_by_hop(&mut stripped);
    assert!(stripped.get(CONNECTION).is_none());
});
