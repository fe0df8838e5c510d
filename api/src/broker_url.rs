//! `mqtt[s]://[user[:password]@]host[:port]`: how the hub and agents name a
//! broker. `mqtts://` is MQTT over TLS (port 8883 by default).

use std::fmt;
use std::str::FromStr;

#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// MQTT over TLS.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid broker URL {url:?}: {why} (expected mqtt[s]://[user[:password]@]host[:port])")]
pub struct BrokerUrlError {
    pub url: String,
    pub why: &'static str,
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| BrokerUrlError { url: s.to_string(), why };
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://").or_else(|| s.strip_prefix("tcp://")) {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://").or_else(|| s.strip_prefix("ssl://")) {
            (true, r)
        } else {
            return Err(err("the scheme must be mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (Some(user.to_string()), Some(pass.to_string())),
                None => (Some(u.to_string()), None),
            },
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(|| err("unclosed [ in an IPv6 address"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(err("the host is missing"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p.parse().map_err(|_| err("the port is not a number from 1 to 65535"))?,
        };
        if port == 0 {
            return Err(err("the port is not a number from 1 to 65535"));
        }
        Ok(BrokerUrl { tls, host, port, username, password })
    }
}

impl fmt::Display for BrokerUrl {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "mqtts://" } else { "mqtt://" })?;
        if let Some(u) = &self.username {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_credentials() {
        let u: BrokerUrl = "mqtt://hub:s3cret@10.0.0.1:8883".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("10.0.0.1", 8883));
        assert_eq!(u.username.as_deref(), Some("hub"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.to_string(), "mqtt://hub@10.0.0.1:8883");
        let u: BrokerUrl = "mqtt://broker.local".parse().unwrap();
        assert_eq!(u.port, 1883);
        let u: BrokerUrl = "mqtt://[::1]:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1884));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let u: BrokerUrl = "mqtts://agent:pw@broker.example".parse().unwrap();
        assert!(u.tls && u.port == 8883);
        assert_eq!(u.to_string(), "mqtts://agent@broker.example:8883");
        for (bad, why) in [
            ("http://x", "scheme"),
            ("mqtt://", "host"),
            ("mqtt://x:port", "port"),
            ("mqtt://x:0", "port"),
            ("x:1883", "scheme"),
        ] {
            let e = bad.parse::<BrokerUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
