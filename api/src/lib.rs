//! Types and protocol shared by the hub, the agent and `edgectl`.
//!
//! This crate is deliberately free of I/O and async runtimes: it holds the
//! object model (workloads, nodes, status), manifest validation, resource
//! quantities, artifact digests, tokens and keys, and the MQTT wire protocol
//! (topics and signed, versioned envelopes). Everything here is pure and
//! tested with tables of cases.

pub mod broker_url;
pub mod digest;
pub mod event;
pub mod frame;
pub mod health;
pub mod hex;
pub mod keys;
pub mod lease;
pub mod manifest;
pub mod model;
pub mod names;
pub mod nonce;
pub mod oci_ref;
pub mod outbound;
pub mod placement;
pub mod platform;
pub mod precompiled;
pub mod quantity;
pub mod reason;
pub mod rollout;
pub mod seal;
pub mod time;
pub mod token;
pub mod wire;

/// The version of the object model spoken by this build (`api_version` in manifests).
pub const API_VERSION: &str = "edge/v1";
