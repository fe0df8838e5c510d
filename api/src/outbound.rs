//! Outbound HTTP allow-list rules: `scheme://host[:port]`.
//!
//! `host` is a name (`api.example.com`), a wildcard for subdomains
//! (`*.example.com`, which does not match `example.com` itself), an IP
//! address, or `*` for any host. Without a port the scheme's default (80 or
//! 443) is meant; `:*` allows any port.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.suffix`: stored with the leading dot (`.example.com`).
    Subdomains(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub scheme: String,
    pub host: HostPattern,
    /// `None`: any port.
    pub port: Option<u16>,
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

impl FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| {
            format!(
                "{s:?} is not an outbound rule: {why} (expected e.g. https://api.example.com or http://10.0.0.5:8080)"
            )
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| err("the scheme is missing"))?;
        if scheme != "http" && scheme != "https" {
            return Err(err("the scheme must be http or https"));
        }
        if rest.contains('/') && !rest.ends_with('/') || rest.matches('/').count() > 1 {
            return Err(err("give only scheme, host and port, no path"));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(h) = rest.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(|| err("unclosed [ in an IPv6 address"))?;
            (format!("[{h}]"), p.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            None => Some(default_port(scheme)),
            Some("*") => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| err("the port is not a number from 1 to 65535"))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let valid_name = |h: &str| {
            !h.is_empty()
                && h.split('.').all(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_name(suffix) {
                return Err(err("the wildcard must be followed by a domain"));
            }
            HostPattern::Subdomains(format!(".{suffix}"))
        } else if host.starts_with('[') || valid_name(&host) {
            HostPattern::Exact(host)
        } else {
            return Err(err("the host is not a valid name or address"));
        };
        Ok(Rule { scheme: scheme.to_string(), host, port })
    }
}

impl Rule {
    /// Whether a request to `scheme://host:port` is allowed by this rule.
    pub fn allows(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let port = port.unwrap_or_else(|| default_port(scheme));
        let host = host.to_ascii_lowercase();
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => *h == host,
            HostPattern::Subdomains(suffix) => host.ends_with(suffix.as_str()) && host.len() > suffix.len(),
        };
        self.scheme == scheme && host_ok && self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            HostPattern::Any => "*".to_string(),
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Subdomains(s) => format!("*{s}"),
        };
        match self.port {
            None => write!(f, "{}://{host}:*", self.scheme),
            Some(p) => write!(f, "{}://{host}:{p}", self.scheme),
        }
    }
}

/// Whether any of `rules` allows the request.
pub fn allowed(rules: &[Rule], scheme: &str, host: &str, port: Option<u16>) -> bool {
    rules.iter().any(|r| r.allows(scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_scheme_host_and_port() {
        let cases: &[(&str, &str, &str, Option<u16>, bool)] = &[
            ("https://api.example.com", "https", "api.example.com", None, true),
            ("https://api.example.com", "https", "API.example.com", Some(443), true),
            ("https://api.example.com", "http", "api.example.com", None, false),
            ("https://api.example.com", "https", "api.example.com", Some(8443), false),
            ("https://api.example.com", "https", "evil.com", None, false),
            ("http://127.0.0.1:8081", "http", "127.0.0.1", Some(8081), true),
            ("http://127.0.0.1:8081", "http", "127.0.0.1", Some(8082), false),
            ("https://*.example.com", "https", "a.b.example.com", None, true),
            ("https://*.example.com", "https", "example.com", None, false),
            ("https://*.example.com", "https", "badexample.com", None, false),
            ("http://*:*", "http", "anything", Some(1234), true),
            ("http://localhost:*", "http", "localhost", Some(9), true),
        ];
        for (rule, scheme, host, port, want) in cases {
            let r: Rule = rule.parse().unwrap();
            assert_eq!(r.allows(scheme, host, *port), *want, "{rule} vs {scheme}://{host}:{port:?}");
        }
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (bad, why) in [
            ("api.example.com", "scheme is missing"),
            ("ftp://x", "http or https"),
            ("https://x:99999", "port"),
            ("https://x/path", "no path"),
            ("https://*.", "wildcard"),
            ("https://bad host", "not a valid name"),
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!("https://x.io/".parse::<Rule>().unwrap().to_string(), "https://x.io:443");
    }
}
