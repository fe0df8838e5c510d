//! What arrives over MQTT: topics, envelopes (version, kind, sender,
//! signature) and every message body, as the hub and the agent read them;
//! compact heartbeat and lease frames; sealed boxes opened with a node key.
//! Nothing may panic, no frame nobody signed verifies, and an envelope the
//! hub signs must verify and decode to what was signed.
#![no_main]

use std::sync::OnceLock;

use edge_api::frame::{Frame, FrameKind};
use edge_api::keys::SigningKey;
use edge_api::seal::KemKeyPair;
use edge_api::wire::{self, Kind};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static (SigningKey, KemKeyPair) {
    static K: OnceLock<(SigningKey, KemKeyPair)> = OnceLock::new();
    K.get_or_init(|| (SigningKey::generate().unwrap(), KemKeyPair::from_seed([7; 32])))
}

fuzz_target!(|data: &[u8]| {
    let (key, kem) = keys();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wire::parse_topic(text);
        let _ = text.parse::<edge_api::token::JoinToken>();
        let _ = edge_api::token::parse_presented(text);
    }
    for kind in [FrameKind::Heartbeat, FrameKind::Lease] {
        assert!(Frame::open(data, kind, "pi-1", &key.public()).is_err(), "a frame nobody signed verified");
    }
    let Ok(env) = wire::open(data) else { return };
    let _ = env.verify(&key.public());
    let _ = env.expect_from("pi-1");
    let _ = env.body::<wire::Join>();
    let _ = env.body::<wire::Welcome>();
    let _ = env.body::<wire::NodeStatus>();
    let _ = env.body::<wire::Heartbeat>();
    let _ = env.body::<wire::Presence>();
    let _ = env.body::<wire::Request>();
    let _ = env.body::<wire::Response>();
    if let Ok(w) = env.body::<wire::Welcome>()
        && let Some(sealed) = &w.credential
    {
        assert!(kem.open(&edge_api::seal::credential_info("pi-1"), sealed).is_err(), "a box nobody sealed opened");
    }
    if let Ok(desired) = env.body::<wire::NodeDesired>() {
        for a in &desired.workloads {
            let _ = a.spec.secret_names();
            let _ = a.spec.reserved();
            for (name, s) in &a.secrets {
                let info = edge_api::seal::secret_info("pi-1", name, s.version);
                assert!(kem.open(&info, &s.sealed).is_err(), "a box nobody sealed opened");
            }
        }
        // What the hub signs, the agent verifies and reads back unchanged.
        let signed = wire::seal(Kind::Desired, wire::HUB, env.generation, &desired, Some(key)).unwrap();
        let back = wire::open(&signed).unwrap();
        back.expect(Kind::Desired).unwrap().verify(&key.public()).unwrap();
        assert_eq!(back.body::<wire::NodeDesired>().unwrap(), desired);
    }
});
