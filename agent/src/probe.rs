//! Running one probe of a replica, on the node: a Wasm service is asked in
//! process (a request through the service, no socket); a Wasm component
//! is run as a command (its `wasi:cli/run`, in a fresh instance); a
//! container over its network namespace's address, or inside it (`exec`).
//! Each probe ends within its timeout; what it saw, or why it failed, is
//! one short line.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edge_api::model::ProbeCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wasm::{CommandCheck, HttpService};

/// What a probe talks to.
#[derive(Clone)]
pub enum Target {
    Wasm(Arc<HttpService>),
    /// A Wasm command replica (one that runs until stopped).
    WasmCommand(Arc<CommandCheck>),
    /// A container: its replica key, and its address (`http://ip:port`) if
    /// it is reachable over the network.
    Container {
        key: String,
        upstream: Option<String>,
    },
}

/// The status line of an answer is read up to this many bytes.
const STATUS_LINE_MAX: usize = 1024;

fn passes(status: u16) -> bool {
    (200..400).contains(&status)
}

/// Runs `check` against `target`, within `timeout`.
pub async fn run(
    containers: &crate::container::Containers,
    target: &Target,
    check: &ProbeCheck,
    timeout: Duration,
) -> Result<String, String> {
    match tokio::time::timeout(timeout, attempt(containers, target, check, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn attempt(
    containers: &crate::container::Containers,
    target: &Target,
    check: &ProbeCheck,
    timeout: Duration,
) -> Result<String, String> {
    match (target, check) {
        (Target::Wasm(svc), ProbeCheck::Instantiates) => svc.instantiates(timeout).await,
        (Target::Wasm(svc), ProbeCheck::Http { path, .. }) => {
            let req = hyper::Request::get(format!("http://probe.local{path}"))
                .header("user-agent", "edge-agent-probe")
                .body(http_body_util::Empty::<Bytes>::new())
                .map_err(|e| format!("bad probe path: {e}"))?;
            let status = svc.probe(req).await.status().as_u16();
            if passes(status) { Ok(status.to_string()) } else { Err(format!("answered {status}")) }
        }
        (Target::Container { upstream, .. }, ProbeCheck::Http { path, port }) => {
            let addr = address(upstream.as_deref(), *port)?;
            http_get(&addr, path).await
        }
        (Target::Container { upstream, .. }, ProbeCheck::Tcp(port)) => {
            let addr = address(upstream.as_deref(), Some(*port))?;
            tokio::net::TcpStream::connect(&addr).await.map(|_| "connected".to_string()).map_err(|e| e.to_string())
        }
        (Target::Container { key, .. }, ProbeCheck::Command(argv)) => {
            match containers.exec(key, argv, timeout).await? {
                0 => Ok("exit 0".into()),
                code => Err(format!("exit {code}")),
            }
        }
        (Target::Wasm(svc), ProbeCheck::Command(args)) => svc.run_check(args, timeout).await,
        (Target::WasmCommand(c), ProbeCheck::Command(args)) => c.run(args).await,
        (Target::Wasm(_), other) => Err(format!("a Wasm service cannot be probed with {other}")),
        (Target::WasmCommand(_), other) => Err(format!("a Wasm command is probed with command, not {other}")),
        (Target::Container { .. }, ProbeCheck::Instantiates) => Err("a container is not instantiated".into()),
    }
}

/// `ip:port` of a container from its upstream (`http://ip:port`), with
/// `port` if given.
fn address(upstream: Option<&str>, port: Option<u16>) -> Result<String, String> {
    let base = upstream.and_then(|u| u.strip_prefix("http://")).ok_or("the container has no address")?;
    let (host, own) = base.rsplit_once(':').ok_or("the container has no port")?;
    Ok(match port {
        Some(p) => format!("{host}:{p}"),
        None => format!("{host}:{own}"),
    })
}

/// One plain HTTP/1.1 GET; the status of the answer decides.
async fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edge-agent-probe\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < STATUS_LINE_MAX {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("not an HTTP answer")?;
    if passes(status) { Ok(status.to_string()) } else { Err(format!("answered {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_is_probed_at_its_own_address() {
        assert_eq!(address(Some("http://10.89.0.7:8080"), None).unwrap(), "10.89.0.7:8080");
        assert_eq!(address(Some("http://10.89.0.7:8080"), Some(9090)).unwrap(), "10.89.0.7:9090");
        assert!(address(None, Some(80)).is_err());
    }

    #[tokio::test]
    async fn an_http_probe_passes_on_2xx_and_3xx_and_fails_otherwise() {
        for (answer, want) in [
            ("HTTP/1.1 200 OK\r\n\r\n", Ok("200".to_string())),
            ("HTTP/1.0 302 Found\r\n\r\n", Ok("302".to_string())),
            ("HTTP/1.1 503 Service Unavailable\r\n\r\n", Err("answered 503".to_string())),
            ("SSH-2.0-OpenSSH\r\n", Err("not an HTTP answer".to_string())),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = vec![0u8; 1024];
                let n = s.read(&mut req).await.unwrap();
                s.write_all(answer.as_bytes()).await.unwrap();
                String::from_utf8_lossy(&req[..n]).into_owned()
            });
            assert_eq!(http_get(&addr, "/healthz").await, want, "{answer:?}");
            assert!(server.await.unwrap().starts_with("GET /healthz HTTP/1.1\r\n"));
        }
        // Nobody listening: refused.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert!(http_get(&addr, "/").await.is_err());
    }
}
