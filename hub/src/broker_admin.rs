//! Keeping a broker's logins in step with the hub: bootstrap tokens and node
//! credentials are created and revoked at the broker as they are at the hub.
//!
//! Sans-io: each method returns the MQTT messages to publish; the hub sends
//! them through its session. The embedded broker needs none (it asks the hub
//! at every login, see [`crate::broker`]); Mosquitto is managed over its
//! dynamic-security plugin ([`Dynsec`]).

use crate::hub::Outgoing;

pub trait BrokerAdmin: Send + Sync {
    /// Lets a device log in as `join-<id>` with `secret` (enrol only).
    fn add_bootstrap(&self, id: &str, secret: &str) -> Vec<Outgoing>;
    fn remove_bootstrap(&self, id: &str) -> Vec<Outgoing>;
    /// Lets node `name` log in with `password` (replacing an older one).
    fn add_node(&self, name: &str, password: &str) -> Vec<Outgoing>;
    /// Revokes a node's login and disconnects it.
    fn remove_node(&self, name: &str) -> Vec<Outgoing>;
    /// After each (re)connect: set up what the broker must have (roles).
    fn on_connected(&self) -> Vec<Outgoing>;
}

/// For the embedded broker (which asks the hub directly) and for external
/// brokers whose logins the operator manages.
pub struct Unmanaged;

impl BrokerAdmin for Unmanaged {
    fn add_bootstrap(&self, _: &str, _: &str) -> Vec<Outgoing> {
        Vec::new()
    }
    fn remove_bootstrap(&self, _: &str) -> Vec<Outgoing> {
        Vec::new()
    }
    fn add_node(&self, _: &str, _: &str) -> Vec<Outgoing> {
        Vec::new()
    }
    fn remove_node(&self, _: &str) -> Vec<Outgoing> {
        Vec::new()
    }
    fn on_connected(&self) -> Vec<Outgoing> {
        Vec::new()
    }
}
