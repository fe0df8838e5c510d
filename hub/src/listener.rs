//! The API's listener: admission, TLS, deadlines, and serving each
//! connection with a service, shared by the hub's API and the follower's
//! forwarding ([`crate::ha`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::BoxBody;

/// Accepts connections within `limits` (admission per address and in all,
/// TLS handshake and header deadlines, stalled writers) and serves each
/// with the service `service(peer)` makes, until `shutdown`.
pub async fn accept_loop<S>(
    listener: &TcpListener,
    limits: edge_listen::Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: watch::Receiver<bool>,
    limited: impl Fn(),
    service: impl Fn(std::net::SocketAddr) -> S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<BoxBody>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let admission = edge_listen::Admission::new(limits.max_connections, limits.per_address);
    let refuse_with = |stream, peer, why: edge_listen::Refused| {
        limited();
        tracing::debug!("api connection from {peer} refused: {why}");
        // Over TLS there is no answer without a handshake: just close.
        if tls.is_none() {
            tokio::spawn(refuse(stream, why.to_string()));
        }
    };
    let serve = |stream, peer, admitted| {
        let tls = tls.clone();
        let svc = service(peer);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let io = edge_listen::StallIo::new(stream, limits.stall_timeout);
            let result = match tls {
                None => serve_connection(hyper_util::rt::TokioIo::new(io), svc, &limits, stop).await,
                Some(acceptor) => {
                    // The handshake counts against the header deadline.
                    let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(io)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!("api TLS handshake with {peer} failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("api TLS handshake with {peer} timed out");
                            return;
                        }
                    };
                    serve_connection(hyper_util::rt::TokioIo::new(tls), svc, &limits, stop).await
                }
            };
            if let Err(e) = result {
                tracing::debug!("api connection from {peer} ended: {e}");
            }
        });
    };
    edge_listen::accept_loop(listener, "api", &admission, shutdown.clone(), refuse_with, serve).await;
}

/// Serves one connection; when the listener stops, ends it after the
/// request in progress (a kept-alive connection must not outlive the
/// server it was accepted by: a follower that becomes the leader stops
/// forwarding on it).
async fn serve_connection<I, S>(
    io: I,
    svc: S,
    limits: &edge_listen::Limits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<BoxBody>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let conn = edge_listen::http1(limits).serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Tells a client turned away by the connection limits why (within a
/// second), then closes.
async fn refuse(mut stream: tokio::net::TcpStream, why: String) {
    use tokio::io::AsyncWriteExt;
    let body = format!("{{\"error\":{{\"code\":\"TooManyConnections\",\"message\":{why:?}}}}}\n");
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        use tokio::io::AsyncReadExt;
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the
        // connection before it has read the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
