//! What every listener of the hub and the agent needs so that no client can
//! hold it for ever or use it up: a cap on connections in all and per
//! address ([`Admission`]), a deadline for request headers (which, in
//! hyper, also ends idle keep-alive connections), writes that may not stall
//! when a client stops reading ([`StallIo`]), and request bodies that must
//! keep arriving and end in time ([`DeadlineBody`]).
//!
//! Pure building blocks: the servers (the hub's API, the agent's proxy)
//! assemble them, each with its own [`Limits`].

pub mod route;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, in all.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub per_address: usize,
    /// Time for a request's headers to arrive; also how long an idle
    /// keep-alive connection is kept.
    pub header_timeout: Duration,
    /// How long a write may wait for a client that does not read, and a
    /// request body for its next bytes.
    pub stall_timeout: Duration,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{total} connections open in all (limit {max}), {from_address} from {address} (limit {per_address})")]
pub struct Refused {
    pub address: IpAddr,
    pub total: usize,
    pub max: usize,
    pub from_address: usize,
    pub per_address: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Counts open connections, in all and per address.
#[derive(Clone)]
pub struct Admission {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    per_address: usize,
}

impl Admission {
    pub fn new(max_connections: usize, per_address: usize) -> Self {
        Admission { counts: Arc::default(), max: max_connections, per_address }
    }

    /// Admits one more connection from `address`, or says why not. The
    /// connection counts until the returned guard is dropped.
    pub fn admit(&self, address: IpAddr) -> Result<Admitted, Refused> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let from_address = c.by_address.get(&address).copied().unwrap_or(0);
        if c.total >= self.max || from_address >= self.per_address {
            return Err(Refused {
                address,
                total: c.total,
                max: self.max,
                from_address,
                per_address: self.per_address,
            });
        }
        c.total += 1;
        *c.by_address.entry(address).or_insert(0) += 1;
        Ok(Admitted { counts: self.counts.clone(), address })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    counts: Arc<Mutex<Counts>>,
    address: IpAddr,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Admitted({})", self.address)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_address.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_address.remove(&self.address);
            }
        }
    }
}

/// Accepts connections on `listener` until `shutdown` turns true, each
/// admitted within `admission` or turned away: `admitted` gets those that
/// count (with their place, freed when dropped), `refused` the others (to
/// answer, or just to close). Accepted sockets have `TCP_NODELAY`. When
/// accepting fails (out of file descriptors, say) the loop backs off, up
/// to a second, instead of spinning; `what` names the listener in its
/// warnings.
pub async fn accept_loop(
    listener: &tokio::net::TcpListener,
    what: &str,
    admission: &Admission,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut refused: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr, Refused),
    mut admitted: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr, Admitted),
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => {
                        failures = 0;
                        s
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 || failures.is_multiple_of(100) {
                            tracing::warn!(failures, "{what} accept failed: {e}");
                        }
                        let pause = Duration::from_millis(10u64 << failures.min(7)).min(Duration::from_secs(1));
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                };
                match admission.admit(peer.ip()) {
                    Ok(a) => {
                        let _ = stream.set_nodelay(true);
                        admitted(stream, peer, a)
                    }
                    Err(why) => refused(stream, peer, why),
                }
            }
            _ = shutdown.changed() => break,
        }
    }
}

/// An HTTP/1 server connection builder with the header deadline set.
pub fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        // 64 KiB of request head is plenty; a client may not make us buffer more.
        .max_buf_size(64 << 10);
    b
}

/// A stream whose writes may not stall: when the peer stops reading for
/// `stall`, the write fails with `TimedOut` and the connection ends.
pub struct StallIo<T> {
    io: T,
    stall: Duration,
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<T> StallIo<T> {
    pub fn new(io: T, stall: Duration) -> Self {
        StallIo { io, stall, blocked: None }
    }

    fn poll_stalled(&mut self, cx: &mut Context<'_>, pending: bool) -> Option<std::io::Error> {
        if !pending {
            self.blocked = None;
            return None;
        }
        let stall = self.stall;
        let timer = self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the peer read nothing for {}s", stall.as_secs()),
            )),
            Poll::Pending => None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        match self.poll_stalled(cx, r.is_pending()) {
            Some(e) => Poll::Ready(Err(e)),
            None => r,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        match self.poll_stalled(cx, r.is_pending()) {
            Some(e) => Poll::Ready(Err(e)),
            None => r,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError<E> {
    #[error("{0}")]
    Inner(E),
    #[error("the request body stalled: nothing for {0}s")]
    Stalled(u64),
    #[error("the request body did not arrive within {0}s")]
    TooSlow(u64),
}

/// A request body that must keep arriving: each frame within `stall` of
/// the last, all of it by `deadline`.
pub struct DeadlineBody<B> {
    inner: B,
    stall: Duration,
    deadline: Instant,
    total: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, stall: Duration, total: Duration) -> Self {
        let now = Instant::now();
        let deadline = now + total;
        DeadlineBody {
            inner,
            stall,
            deadline,
            total,
            timer: Box::pin(tokio::time::sleep_until((now + stall).min(deadline))),
        }
    }
}

impl<B: Body + Unpin> Body for DeadlineBody<B> {
    type Data = B::Data;
    type Error = BodyError<B::Error>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                let next = (Instant::now() + self.stall).min(self.deadline);
                self.timer.as_mut().reset(next);
                Poll::Ready(f.map(|r| r.map_err(BodyError::Inner)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) if Instant::now() >= self.deadline => {
                    Poll::Ready(Some(Err(BodyError::TooSlow(self.total.as_secs()))))
                }
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Stalled(self.stall.as_secs())))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises this process's soft limit on open files to its hard limit, so
/// that the connection limits, not the file table, decide who is served.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut l = libc_rlimit();
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // rlim_t is 32 bits on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(l.rlim_cur))
}

fn libc_rlimit() -> libc::rlimit {
    libc::rlimit { rlim_cur: 0, rlim_max: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_accept_loop_admits_within_the_limits_refuses_beyond_and_stops() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new(10, 2);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (tx2, counted) = (tx.clone(), admission.clone());
        let looping = tokio::spawn(async move {
            accept_loop(
                &listener,
                "test",
                &counted,
                shutdown,
                move |_, _, why| tx2.send(Err(why)).unwrap(),
                // (The guards are kept: they hold the places.)
                move |s, _, a| tx.send(Ok((s, a))).unwrap(),
            )
            .await
        });
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(rx.recv().await.unwrap());
        }
        let refused: Vec<&Refused> = got.iter().filter_map(|g| g.as_ref().err()).collect();
        assert_eq!(got.iter().filter(|g| g.is_ok()).count(), 2, "two from one address");
        assert_eq!((refused.len(), refused[0].from_address, refused[0].per_address), (1, 2, 2));
        assert!(got.iter().flatten().all(|(s, _)| s.nodelay().unwrap()));
        assert_eq!(admission.open(), 2);
        drop(got);
        assert_eq!(admission.open(), 0, "dropped, their places are free");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), looping).await.expect("the loop stops").unwrap();
    }

    #[test]
    fn admission_counts_in_all_and_per_address_and_frees_on_drop() {
        let a = Admission::new(3, 2);
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = a.admit(x).unwrap();
        let _g2 = a.admit(x).unwrap();
        let e = a.admit(x).unwrap_err();
        assert_eq!((e.from_address, e.per_address), (2, 2));
        let _g3 = a.admit(y).unwrap();
        let e = a.admit(y).unwrap_err();
        assert_eq!((e.total, e.max), (3, 3), "{e}");
        drop(g1);
        let again = a.admit(x);
        assert!(again.is_ok(), "a freed place is reused");
        assert_eq!(a.open(), 3);
        drop(again);
        assert_eq!(a.open(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_to_a_peer_that_never_reads_fails_after_the_stall_timeout() {
        let (client, server) = tokio::io::duplex(1024);
        let mut s = StallIo::new(server, Duration::from_secs(30));
        let big = vec![0u8; 1 << 20];
        let e = s.write_all(&big).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(client);

        // A peer that reads keeps the writes going.
        let (mut client, server) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            client.read_to_end(&mut buf).await.map(|_| buf.len())
        });
        let mut s = StallIo::new(server, Duration::from_secs(30));
        s.write_all(&big).await.unwrap();
        drop(s);
        assert_eq!(reader.await.unwrap().unwrap(), 1 << 20);
    }

    /// A body of one-byte frames, each after the given gap (seconds).
    struct Gaps {
        gaps: Vec<u64>,
        i: usize,
        sleep: Option<Pin<Box<Sleep>>>,
    }

    impl Body for Gaps {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.i >= self.gaps.len() {
                return Poll::Ready(None);
            }
            let secs = self.gaps[self.i];
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_secs(secs))));
            match sleep.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    self.sleep = None;
                    self.i += 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
                }
            }
        }
    }

    fn frames(gaps: Vec<u64>) -> DeadlineBody<Gaps> {
        DeadlineBody::new(Gaps { gaps, i: 0, sleep: None }, Duration::from_secs(10), Duration::from_secs(60))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_must_keep_arriving_and_end_in_time() {
        // Steady: 5 frames 5 s apart arrive whole.
        let got = frames(vec![5; 5]).collect().await.map(|c| c.to_bytes().len()).unwrap();
        assert_eq!(got, 5);
        // A gap longer than the stall timeout.
        let e = frames(vec![1, 11]).collect().await.unwrap_err();
        assert!(matches!(e, BodyError::Stalled(10)), "{e}");
        // Always in time, but never done: the total deadline ends it.
        let e = frames(vec![9; 20]).collect().await.unwrap_err();
        assert!(matches!(e, BodyError::TooSlow(60)), "{e}");
    }
}
