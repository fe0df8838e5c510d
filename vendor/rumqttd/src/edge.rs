//! edge patch: hooks through which the program embedding the broker admits
//! sockets, wraps them (TLS), authenticates a CONNECT to a principal, and
//! authorizes each publish and subscription of that principal. Upstream
//! rumqttd has a login callback only. See VENDORED.md.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::link::network::N;
use crate::protocol::ConnectReturnCode;

/// A byte stream the broker speaks MQTT over (plain TCP or TLS).
pub type Stream = Box<dyn N>;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a CONNECT asks for.
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    /// The Last Will's topic, whether it is retained, and its size.
    pub will: Option<(&'a str, bool, usize)>,
    pub keep_alive: u16,
    pub peer: SocketAddr,
}

pub trait Hooks: Send + Sync + 'static {
    /// Called for each accepted socket before anything is read from it.
    /// `None` closes it at once (too many connections); the value returned
    /// is kept for the life of the connection (a counter's guard).
    fn admit(&self, peer: SocketAddr) -> Option<Box<dyn Send + Sync>>;
    /// Wraps the socket, for TLS. Bounded by [`Hooks::handshake_timeout`].
    fn wrap(&self, stream: TcpStream) -> BoxFuture<io::Result<Stream>>;
    /// How long a client may take from TCP accept to a wrapped stream.
    fn handshake_timeout(&self) -> Duration;
    /// The longest keep-alive the broker honours: a client asking for more
    /// is held to this (it is disconnected after 1.5× of silence).
    fn max_keep_alive(&self) -> u16;
    /// Authenticates a CONNECT; the error is the CONNACK code to refuse with.
    fn connect(&self, c: &ConnectInfo) -> Result<Arc<dyn Grant>, ConnectReturnCode>;
}

/// What one authenticated connection may do. A denied publish or
/// subscription ends the connection (the error says why, for the log).
pub trait Grant: Send + Sync {
    fn publish(&self, topic: &str, retain: bool, len: usize) -> Result<(), String>;
    fn subscribe(&self, filter: &str) -> Result<(), String>;
    /// Resolves when the connection must end (its credential was revoked).
    fn revoked(&self) -> BoxFuture<()>;
}

/// Checks the packets a client sent against its grant.
pub(crate) fn check(grant: &dyn Grant, packet: &crate::protocol::Packet) -> Result<(), String> {
    use crate::protocol::Packet;
    match packet {
        Packet::Publish(p, _) => {
            let topic = std::str::from_utf8(&p.topic).map_err(|_| "topic is not UTF-8".to_string())?;
            grant.publish(topic, p.retain, p.payload.len())
        }
        Packet::Subscribe(s, _) => s.filters.iter().try_for_each(|f| grant.subscribe(&f.path)),
        _ => Ok(()),
    }
}
