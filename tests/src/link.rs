//! A TCP forwarder that can be cut like a cable, and made slow and
//! uneven: while cut, connections stay open (and new ones are accepted)
//! but no byte passes either way, as when a link drops without telling
//! anyone; with jitter, each piece of data waits a random time (order is
//! kept), as on a congested radio link.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub struct Link {
    pub addr: String,
    up: Arc<AtomicBool>,
    jitter_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// A small xorshift generator: jitter needs no more.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl Link {
    /// Forwards a new loopback port to `target` (`host:port`).
    pub fn to(target: &str) -> Link {
        Self::on("127.0.0.1", target)
    }

    /// Forwards a new port on `ip` to `target` (`host:port`).
    pub fn on(ip: &str, target: &str) -> Link {
        let listener = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind a link");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().unwrap().to_string();
        let (up, jitter_ms, stop) =
            (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (up2, jitter2, stop2, target) = (up.clone(), jitter_ms.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((a, _)) => {
                        let Ok(b) = std::net::TcpStream::connect(&target) else { continue };
                        for (from, to) in [(a.try_clone(), b.try_clone()), (Ok(b), Ok(a))] {
                            let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
                            let (up, jitter, stop) = (up2.clone(), jitter2.clone(), stop2.clone());
                            let mut rng = next(&mut seed) | 1;
                            std::thread::spawn(move || {
                                use std::io::{Read, Write};
                                let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                                let mut buf = [0u8; 16 << 10];
                                while !stop.load(Ordering::Relaxed) {
                                    match from.read(&mut buf) {
                                        Ok(0) => break,
                                        // Cut: what was sent is lost.
                                        Ok(n) if up.load(Ordering::Relaxed) => {
                                            let j = jitter.load(Ordering::Relaxed);
                                            if j > 0 {
                                                std::thread::sleep(Duration::from_millis(next(&mut rng) % (j + 1)));
                                            }
                                            if to.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                        Ok(_) => {}
                                        Err(e)
                                            if matches!(
                                                e.kind(),
                                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                            ) => {}
                                        Err(_) => break,
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Link { addr, up, jitter_ms, stop }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
    }

    pub fn heal(&self) {
        self.up.store(true, Ordering::Relaxed);
    }

    /// Each piece of data waits up to this long (0: none).
    pub fn jitter(&self, max: Duration) {
        self.jitter_ms.store(max.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
