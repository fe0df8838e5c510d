//! Several hubs over one etcd: one leads, the others forward.
//!
//! Every hub campaigns for `<prefix>leader`, a key bound to its own etcd
//! lease (created only if absent, in one transaction). The winner loads the
//! state from etcd and runs the whole hub (controller, MQTT session,
//! publishing); the others serve the API by forwarding each request to the
//! leader's URL, the value of that key. A leader keeps its lease alive on
//! a thread of its own; when it cannot be sure the lease still holds (the
//! server's expiry comes strictly after the send time of the last answered
//! keep-alive plus the TTL), it stops at once (exit 75), before another hub
//! can win. Its writes are fenced besides ([`crate::etcd::Fence`]), and so
//! are its publications ([`crate::bus`] checks the fence before each): a
//! hub paused past its lease changes nothing and says nothing when it
//! wakes. Its supervisor starts it again, as a follower.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use edge_api::keys::{PublicKey, SigningKey};

use crate::api::BoxBody;
use crate::etcd::{Etcd, Fence};

/// Exit status of a hub that lost (or could not be sure of) its lead.
pub const LOST_LEAD: i32 = 75;

/// The meta key naming the identity (hub key, secrets key) the state in
/// etcd belongs to.
const IDENTITY: &str = "m/identity";

/// The identity of the hubs whose state is under the prefix, if any led yet.
pub fn recorded_identity(etcd: &Etcd) -> anyhow::Result<Option<String>> {
    let key = etcd.key(IDENTITY);
    let r = etcd
        .block(|mut c| async move { c.get(key, None).await })
        .map_err(|e| anyhow::anyhow!("cannot read from etcd: {e}"))?;
    Ok(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Checks that this hub's identity (hub key and secrets key) is that of
/// the cluster: a hub with another key would sign what agents refuse, one
/// with another secrets key could not read the secrets.
pub fn check_identity(etcd: &Etcd, recorded: Option<&str>, identity: &str) -> anyhow::Result<()> {
    let Some(theirs) = recorded else { return Ok(()) };
    if theirs != identity {
        let what = if theirs.split(' ').next() == identity.split(' ').next() {
            "the same hub key but another secrets key"
        } else {
            "another hub key"
        };
        anyhow::bail!(
            "the hubs sharing etcd prefix {:?} have {what} than this one: every hub of a cluster has the \
             same hub.key, secrets.key, join.token and admin.token (`edge-hub init --data-dir DATA_DIR \
             --from DIR` copies them from a hub of the cluster)",
            etcd.prefix
        );
    }
    Ok(())
}

/// Records the identity of a cluster's first leader.
pub fn claim_identity(etcd: &Etcd, fence: &Fence, identity: &str) -> anyhow::Result<()> {
    let key = etcd.key(IDENTITY);
    let (fp, leader, rev) = (identity.to_string(), fence.key.clone(), fence.revision.load(Ordering::SeqCst));
    let r = etcd
        .block(|mut c| async move {
            c.txn(
                Txn::new()
                    .when([
                        Compare::create_revision(leader, CompareOp::Equal, rev),
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([TxnOp::put(key, fp, None)]),
            )
            .await
        })
        .map_err(|e| anyhow::anyhow!("cannot write to etcd: {e}"))?;
    if !r.succeeded() {
        // Recorded before (by this key: checked at start), or the lead is gone.
        if !fence.holds() {
            anyhow::bail!("lost the lead while starting");
        }
    }
    Ok(())
}

/// Campaigns for the lead until won, keeps the lease alive for as long as
/// the process lives, and tells who leads on `leader` meanwhile. `won`
/// fires once. A leader that can no longer be sure of its lease exits.
pub fn campaign(
    etcd: Etcd,
    fence: Arc<Fence>,
    ttl: Duration,
    me: String,
    leader: watch::Sender<Option<String>>,
    won: tokio::sync::oneshot::Sender<()>,
) {
    let e = etcd.clone();
    e.spawn(async move {
        let mut won = Some(won);
        let ttl_s = ttl.as_secs().max(2) as i64;
        let safety = (ttl / 10).max(Duration::from_millis(300));
        while !fence.resigned.load(Ordering::SeqCst) {
            let mut c = etcd.client.clone();
            let sent = Instant::now();
            let lease = match c.lease_grant(ttl_s, None).await {
                Ok(r) => r.id(),
                Err(err) => {
                    tracing::warn!("cannot get an etcd lease ({err}); trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let set_deadline = |from: Instant| {
                let until = (from + ttl).saturating_duration_since(fence.epoch).saturating_sub(safety);
                fence.deadline_ms.store(until.as_millis() as u64, Ordering::SeqCst);
            };
            set_deadline(sent);
            fence.lease.store(lease, Ordering::SeqCst);
            let mut keeper = None;
            let mut next_keepalive = Instant::now() + ttl / 4;
            loop {
                if fence.resigned.load(Ordering::SeqCst) {
                    return;
                }
                if Instant::now() >= next_keepalive {
                    next_keepalive = Instant::now() + ttl / 4;
                    if keeper.is_none() {
                        keeper = match tokio::time::timeout(ttl / 4, c.lease_keep_alive(lease)).await {
                            Ok(Ok(k)) => Some(k),
                            other => {
                                tracing::warn!("cannot keep the etcd lease alive: {other:?}");
                                None
                            }
                        };
                    }
                    if let Some((k, s)) = keeper.as_mut() {
                        let sent = Instant::now();
                        let answered = async {
                            k.keep_alive().await?;
                            s.message().await
                        };
                        match tokio::time::timeout(ttl / 4, answered).await {
                            Ok(Ok(Some(r))) if r.ttl() > 0 => set_deadline(sent),
                            Ok(Ok(Some(_))) => {
                                // The server says the lease is gone.
                                fence.deadline_ms.store(0, Ordering::SeqCst);
                            }
                            other => {
                                tracing::warn!("etcd lease keep-alive failed: {other:?}");
                                keeper = None;
                            }
                        }
                    }
                }
                let leading = fence.revision.load(Ordering::SeqCst) > 0;
                if leading && !fence.holds() {
                    if fence.resigned.load(Ordering::SeqCst) {
                        return;
                    }
                    fence.lost.store(true, Ordering::SeqCst);
                    tracing::error!(
                        "cannot be sure this hub still leads (its etcd lease may have expired): stopping so that \
                         another hub takes over; started again, it follows"
                    );
                    std::process::exit(LOST_LEAD);
                }
                if !leading && expired(&fence) {
                    break; // a new lease, and campaign on
                }
                if !leading {
                    let tried = tokio::time::timeout(ttl / 2, try_lead(&mut c, &fence, lease, &me)).await;
                    match tried.unwrap_or_else(|_| Err(etcd_client::Error::InvalidArgs("no answer in time".into()))) {
                        Ok(None) => {
                            tracing::info!("this hub leads now");
                            leader.send_replace(Some(me.clone()));
                            if let Some(w) = won.take() {
                                let _ = w.send(());
                            }
                        }
                        Ok(Some(other)) => {
                            // This hub's own URL, under a lease of its previous
                            // run that has not expired yet: nobody leads.
                            let other = other.filter(|o| *o != me);
                            leader.send_if_modified(|l| {
                                let changed = l.as_ref() != other.as_ref();
                                if changed {
                                    tracing::info!(leader = other.as_deref().unwrap_or("none"), "the lead moved");
                                }
                                *l = other.clone();
                                changed
                            });
                        }
                        Err(err) => tracing::warn!("etcd campaign call failed: {err}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}

fn expired(fence: &Fence) -> bool {
    (fence.epoch.elapsed().as_millis() as u64) >= fence.deadline_ms.load(Ordering::SeqCst)
}

/// Takes the lead if no hub has it. `Ok(None)`: won; `Ok(Some(url))`: who
/// leads (`None` while nobody does).
async fn try_lead(
    c: &mut etcd_client::Client,
    fence: &Fence,
    lease: i64,
    me: &str,
) -> Result<Option<Option<String>>, etcd_client::Error> {
    let r = c.get(fence.key.clone(), None).await?;
    if let Some(kv) = r.kvs().first() {
        return Ok(Some(Some(String::from_utf8_lossy(kv.value()).into_owned())));
    }
    let key = fence.key.clone();
    let r = c
        .txn(Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            me,
            Some(PutOptions::new().with_lease(lease)),
        )]))
        .await?;
    if !r.succeeded() {
        return Ok(Some(None));
    }
    let revision = r.header().map_or(0, |h| h.revision());
    fence.revision.store(revision, Ordering::SeqCst);
    Ok(None)
}

/// Serves the API on `listener` by forwarding every request to the leader,
/// until `until` resolves; gives the listener back.
pub async fn follow(
    listener: TcpListener,
    leader: watch::Receiver<Option<String>>,
    limits: edge_listen::Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    client_tls: rustls::ClientConfig,
    key: Arc<SigningKey>,
    until: impl std::future::Future<Output = ()>,
) -> TcpListener {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector({
            let mut h = hyper_util::client::legacy::connect::HttpConnector::new();
            h.enforce_http(false);
            h.set_connect_timeout(Some(Duration::from_secs(3)));
            h.set_nodelay(true);
            h
        });
    let client: Forwarder = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https);
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let serving = crate::listener::accept_loop(
            &listener,
            limits,
            tls,
            stop_rx,
            || {},
            move |peer: SocketAddr| {
                let (client, leader, key) = (client.clone(), leader.clone(), key.clone());
                hyper::service::service_fn(move |req| forward(client.clone(), leader.clone(), key.clone(), peer, req))
            },
        );
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => {}
            _ = until => {
                let _ = stop_tx.send(true);
                serving.await;
            }
        }
    }
    listener
}

type Forwarder = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Incoming,
>;

/// Marks a request one hub forwarded to another, with whom for:
/// `<client address> <ms> <signature>` ([`forwarded_for`]).
pub const FORWARDED: &str = "x-edge-forwarded";

/// How far apart in time the hubs' clocks and a forwarded request's
/// journey may be for the leader to believe whom it was forwarded for.
const FORWARDED_FRESH_MS: u64 = 60_000;

fn forwarded_message(ip: std::net::IpAddr, ms: u64, method: &str, path: &str) -> Vec<u8> {
    format!("edge-forwarded\n{ip}\n{ms}\n{method} {path}").into_bytes()
}

/// The [`FORWARDED`] value a follower sends for a request from `ip`: the
/// address, the time and a signature by the cluster's hub key (which every
/// hub of the cluster holds, and no one else) over both and the request's
/// method and path.
pub fn forwarded_for(key: &SigningKey, ip: std::net::IpAddr, now_ms: u64, method: &str, path: &str) -> String {
    let sig = key.sign(&forwarded_message(ip, now_ms, method, path));
    format!("{ip} {now_ms} {}", edge_api::hex::encode(&sig))
}

/// Whom a request a follower forwarded was made by, if a hub of this
/// cluster signed for it (see [`forwarded_from`]).
pub fn forwarded_client<B>(key: &PublicKey, req: &Request<B>) -> Option<std::net::IpAddr> {
    let value = req.headers().get(FORWARDED)?.to_str().ok()?;
    forwarded_from(key, value, edge_api::time::now_ms(), req.method().as_str(), req.uri().path())
}

/// Whom a request was forwarded for, if `value` (a [`FORWARDED`] header)
/// was made by a hub of this cluster for this request within a minute of
/// `now_ms`; None for anything else (a client cannot make the audit log
/// name another address).
pub fn forwarded_from(key: &PublicKey, value: &str, now_ms: u64, method: &str, path: &str) -> Option<std::net::IpAddr> {
    let mut parts = value.split(' ');
    let (ip, ms, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (ip, ms): (std::net::IpAddr, u64) = (ip.parse().ok()?, ms.parse().ok()?);
    if now_ms.abs_diff(ms) > FORWARDED_FRESH_MS {
        return None;
    }
    let sig = edge_api::hex::decode(sig)?;
    key.verify(&forwarded_message(ip, ms, method, path), &sig).then_some(ip)
}

fn unavailable(message: String) -> Response<BoxBody> {
    let body = serde_json::json!({"error": {"code": "NoLeader", "message": message}});
    let mut r = Response::new(
        http_body_util::Full::new(Bytes::from(format!("{body}\n"))).map_err(|never| match never {}).boxed(),
    );
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("2"));
    r
}

/// Ends this hub's lease (at a clean stop), so that another hub takes the
/// lead at once rather than when the lease runs out.
pub fn resign(etcd: &Etcd, fence: &Fence) {
    let lease = fence.lease.load(Ordering::SeqCst);
    if lease == 0 {
        return;
    }
    fence.resigned.store(true, Ordering::SeqCst);
    fence.lost.store(true, Ordering::SeqCst);
    let r = etcd
        .block(move |mut c| async move { tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await });
    match r {
        Ok(Ok(_)) => tracing::info!("gave up the lead"),
        other => tracing::warn!("could not end the etcd lease ({other:?}): another hub leads when it runs out"),
    }
}

/// How long a forwarded request may wait for the leader's answer to begin
/// (long polls answer within 20 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

async fn forward(
    client: Forwarder,
    leader: watch::Receiver<Option<String>>,
    key: Arc<SigningKey>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    if req.uri().path() == "/healthz" {
        // Alive whoever leads: a follower is not restarted for an election.
        let mut r = Response::new(
            http_body_util::Full::new(Bytes::from_static(b"ok\n")).map_err(|never| match never {}).boxed(),
        );
        *r.status_mut() = StatusCode::OK;
        return Ok(r);
    }
    if req.headers().contains_key(FORWARDED) {
        // Two followers that each think the other leads: answer, never loop.
        tracing::debug!("a hub that is not the leader forwarded {} {} here", req.method(), req.uri().path());
        return Ok(unavailable("the hubs disagree about which one leads: try again in a few seconds".into()));
    }
    let Some(base) = leader.borrow().clone() else {
        tracing::debug!("no leader to forward {} {} to", req.method(), req.uri().path());
        return Ok(unavailable(
            "no hub leads at the moment (an election is under way): try again in a few seconds".into(),
        ));
    };
    let (mut parts, body) = req.into_parts();
    let proof = forwarded_for(&key, peer.ip(), edge_api::time::now_ms(), parts.method.as_str(), parts.uri.path());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{path}", base.trim_end_matches('/')).parse() {
        Ok(u) => u,
        Err(e) => return Ok(unavailable(format!("the leader's URL {base:?} is not usable: {e}"))),
    };
    parts.headers.remove(hyper::header::HOST);
    match hyper::header::HeaderValue::from_str(&proof) {
        Ok(v) => parts.headers.insert(FORWARDED, v),
        Err(_) => parts.headers.insert(FORWARDED, hyper::header::HeaderValue::from_static("-")),
    };
    for h in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"] {
        parts.headers.remove(h);
    }
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, client.request(Request::from_parts(parts, body))).await;
    match answer {
        Err(_) => Ok(unavailable(format!("the leading hub at {base} did not answer within {FORWARD_TIMEOUT:?}"))),
        Ok(Ok(resp)) => Ok(resp.map(|b| b.map_err(std::io::Error::other).boxed())),
        Ok(Err(e)) => {
            tracing::debug!("forwarding to the leader at {base} failed: {e}");
            Ok(unavailable(format!("the leading hub at {base} did not answer ({e}): try again in a few seconds")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_hub_of_the_cluster_can_say_whom_it_forwarded_for() {
        let key = SigningKey::generate().unwrap();
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        let now = 1_700_000_000_000;
        let v = forwarded_for(&key, ip, now, "PUT", "/v1/workloads/web");
        let from = |v: &str, k: &PublicKey, at: u64, method: &str, path: &str| forwarded_from(k, v, at, method, path);
        assert_eq!(from(&v, &key.public(), now + 5_000, "PUT", "/v1/workloads/web"), Some(ip));
        // Another key, another request, too late, or tampered with: not believed.
        let other = SigningKey::generate().unwrap();
        assert_eq!(from(&v, &other.public(), now, "PUT", "/v1/workloads/web"), None);
        assert_eq!(from(&v, &key.public(), now, "DELETE", "/v1/workloads/web"), None);
        assert_eq!(from(&v, &key.public(), now, "PUT", "/v1/workloads/db"), None);
        assert_eq!(from(&v, &key.public(), now + 61_000, "PUT", "/v1/workloads/web"), None);
        let swapped = v.replacen("203.0.113.7", "198.51.100.1", 1);
        assert_eq!(from(&swapped, &key.public(), now, "PUT", "/v1/workloads/web"), None);
        for junk in ["", "1", "203.0.113.7 1700000000000", "x y z", &format!("{v} extra")] {
            assert_eq!(from(junk, &key.public(), now, "PUT", "/v1/workloads/web"), None, "{junk:?}");
        }
    }
}
