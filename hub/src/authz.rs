//! Who may do what: the role each API call needs, and what each MQTT
//! principal may publish and subscribe to. Pure and table-tested; the API
//! server and the embedded broker ask these functions and nothing else.
//!
//! Architecture invariant: a node may only speak on its own agent → hub
//! channels and only hear its own hub → agent channels. A device that is
//! stolen and imaged yields one node's credential, which reaches that node's
//! topics and nothing more.

use edge_api::model::Role;
use edge_api::wire::{self, Channel};
use hyper::Method;

/// The largest message a node may publish: a status snapshot of a node
/// running a thousand workloads is ~300 KiB; log chunks are 32 KiB.
pub const NODE_MAX_PAYLOAD: usize = 1 << 20;

/// The largest message a device may publish before it is enrolled (a join).
pub const JOINER_MAX_PAYLOAD: usize = 64 << 10;

/// Who an MQTT connection is, once its login was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The hub's own session.
    Hub,
    /// An enrolled node, logged in with its own credential.
    Node(String),
    /// A device enrolling under this name with a bootstrap token.
    Joiner(String),
}

/// The client id each principal must use. Binding the id to the login
/// means no one can take over (and so disconnect) another's session.
pub fn client_id_ok(p: &Principal, client_id: &str) -> bool {
    match p {
        Principal::Hub => client_id.strip_prefix("edge-hub-").is_some_and(|s| !s.is_empty()),
        Principal::Node(n) => client_id.strip_prefix("edge-agent-") == Some(n.as_str()),
        Principal::Joiner(n) => client_id.strip_prefix("edge-join-") == Some(n.as_str()),
    }
}

/// The node name a bootstrap session claims through its client id.
pub fn joiner_name(client_id: &str) -> Option<&str> {
    client_id.strip_prefix("edge-join-").filter(|n| edge_api::names::check_node_name(n).is_ok())
}

/// Why a publish or subscription was refused.
pub fn may_publish(p: &Principal, topic: &str, retain: bool, len: usize) -> Result<(), String> {
    match p {
        Principal::Hub => {
            if topic.starts_with("edge/v1/") && !topic.contains(['+', '#']) {
                Ok(())
            } else {
                Err(format!("the hub publishes only under edge/v1/, not {topic:?}"))
            }
        }
        Principal::Node(n) => {
            let Some((node, ch)) = wire::parse_topic(topic) else {
                return Err(format!("{topic:?} is not one of node {n}'s topics"));
            };
            if node != n || !ch.from_agent() {
                return Err(format!("node {n} may not publish to {topic:?}"));
            }
            if retain && !matches!(ch, Channel::Status | Channel::Presence) {
                return Err(format!("node {n} may not retain messages on {topic:?}"));
            }
            if len > NODE_MAX_PAYLOAD {
                return Err(format!("{len}-byte message exceeds the {NODE_MAX_PAYLOAD}-byte limit for nodes"));
            }
            Ok(())
        }
        Principal::Joiner(n) => {
            if topic != wire::topic(n, Channel::Join) {
                return Err(format!("a device enrolling as {n} may only publish its join, not to {topic:?}"));
            }
            if retain {
                return Err("a join is never retained".into());
            }
            if len > JOINER_MAX_PAYLOAD {
                return Err(format!("{len}-byte join exceeds the {JOINER_MAX_PAYLOAD}-byte limit"));
            }
            Ok(())
        }
    }
}

pub fn may_subscribe(p: &Principal, filter: &str) -> Result<(), String> {
    let ok = match p {
        Principal::Hub => filter.starts_with("edge/v1/"),
        Principal::Node(n) => {
            [Channel::Desired, Channel::Welcome, Channel::Request].iter().any(|c| filter == wire::topic(n, *c))
        }
        Principal::Joiner(n) => filter == wire::topic(n, Channel::Welcome),
    };
    if ok {
        Ok(())
    } else {
        let who = match p {
            Principal::Hub => "the hub".to_string(),
            Principal::Node(n) => format!("node {n}"),
            Principal::Joiner(n) => format!("a device enrolling as {n}"),
        };
        Err(format!("{who} may not subscribe to {filter:?}"))
    }
}

/// Whether a request to the API needs no token at all (probes).
pub fn is_public(method: &Method, segs: &[&str]) -> bool {
    *method == Method::GET && matches!(segs, ["healthz"] | ["readyz"])
}

/// The least role an API call needs.
pub fn required_role(method: &Method, segs: &[&str]) -> Role {
    let read = matches!(*method, Method::GET | Method::HEAD);
    match segs {
        ["v1", "tokens", ..] | ["v1", "audit", ..] => Role::Admin,
        ["v1", "nodes", ..] if !read => Role::Admin,
        ["v1", "workloads", _, "logs"] => Role::Operator,
        _ if read => Role::Viewer,
        _ => Role::Operator,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_fenced_to_their_own_topics() {
        let pi = Principal::Node("pi-1".into());
        let hub = Principal::Hub;
        let joiner = Principal::Joiner("pi-9".into());
        let pubs: &[(&Principal, &str, bool, usize, bool)] = &[
            (&pi, "edge/v1/nodes/pi-1/status", true, 100, true),
            (&pi, "edge/v1/nodes/pi-1/presence", true, 100, true),
            (&pi, "edge/v1/nodes/pi-1/hb", false, 100, true),
            (&pi, "edge/v1/nodes/pi-1/resp", false, 100, true),
            (&pi, "edge/v1/nodes/pi-1/join", false, 100, true),
            (&pi, "edge/v1/nodes/pi-1/hb", true, 100, false),
            (&pi, "edge/v1/nodes/pi-1/desired", true, 100, false),
            (&pi, "edge/v1/nodes/pi-1/req", false, 100, false),
            (&pi, "edge/v1/nodes/pi-2/status", false, 100, false),
            (&pi, "edge/v1/nodes/pi-2/hb", false, 100, false),
            (&pi, "junk/topic", true, 100, false),
            (&pi, "edge/v1/nodes/pi-1/status", false, NODE_MAX_PAYLOAD + 1, false),
            (&joiner, "edge/v1/nodes/pi-9/join", false, 100, true),
            (&joiner, "edge/v1/nodes/pi-9/join", true, 100, false),
            (&joiner, "edge/v1/nodes/pi-9/status", false, 100, false),
            (&joiner, "edge/v1/nodes/pi-1/join", false, 100, false),
            (&hub, "edge/v1/nodes/pi-1/desired", true, 4 << 20, true),
            (&hub, "edge/v1/nodes/+/desired", true, 10, false),
            (&hub, "$SYS/x", false, 10, false),
        ];
        for (p, topic, retain, len, ok) in pubs {
            assert_eq!(may_publish(p, topic, *retain, *len).is_ok(), *ok, "{p:?} publish {topic} retain={retain}");
        }
        let subs: &[(&Principal, &str, bool)] = &[
            (&pi, "edge/v1/nodes/pi-1/desired", true),
            (&pi, "edge/v1/nodes/pi-1/welcome", true),
            (&pi, "edge/v1/nodes/pi-1/req", true),
            (&pi, "edge/v1/nodes/pi-1/status", false),
            (&pi, "edge/v1/nodes/pi-2/desired", false),
            (&pi, "edge/v1/nodes/+/desired", false),
            (&pi, "#", false),
            (&pi, "edge/v1/nodes/pi-1/#", false),
            (&joiner, "edge/v1/nodes/pi-9/welcome", true),
            (&joiner, "edge/v1/nodes/pi-9/desired", false),
            (&hub, "edge/v1/nodes/+/status", true),
            (&hub, "#", false),
        ];
        for (p, filter, ok) in subs {
            assert_eq!(may_subscribe(p, filter).is_ok(), *ok, "{p:?} subscribe {filter}");
        }
    }

    #[test]
    fn client_ids_are_bound_to_the_login() {
        let cases: &[(Principal, &str, bool)] = &[
            (Principal::Node("pi-1".into()), "edge-agent-pi-1", true),
            (Principal::Node("pi-1".into()), "edge-agent-pi-2", false),
            (Principal::Node("pi-1".into()), "edge-join-pi-1", false),
            (Principal::Joiner("pi-1".into()), "edge-join-pi-1", true),
            (Principal::Joiner("pi-1".into()), "edge-agent-pi-1", false),
            (Principal::Hub, "edge-hub-1a2b", true),
            (Principal::Hub, "edge-hub-", false),
            (Principal::Hub, "edge-agent-pi-1", false),
        ];
        for (p, id, ok) in cases {
            assert_eq!(client_id_ok(p, id), *ok, "{p:?} as {id}");
        }
        assert_eq!(joiner_name("edge-join-pi-1"), Some("pi-1"));
        assert_eq!(joiner_name("edge-join-Bad_Name"), None);
        assert_eq!(joiner_name("edge-agent-pi-1"), None);
    }

    #[test]
    fn api_calls_need_their_role() {
        let cases: &[(Method, &str, Role)] = &[
            (Method::GET, "v1/workloads", Role::Viewer),
            (Method::GET, "v1/workloads/x/wait", Role::Viewer),
            (Method::GET, "v1/workloads/x/logs", Role::Operator),
            (Method::PUT, "v1/workloads/x", Role::Operator),
            (Method::DELETE, "v1/workloads/x", Role::Operator),
            (Method::PUT, "v1/artifacts/sha256:x", Role::Operator),
            (Method::HEAD, "v1/artifacts/sha256:x", Role::Viewer),
            (Method::GET, "v1/nodes", Role::Viewer),
            (Method::DELETE, "v1/nodes/pi", Role::Admin),
            (Method::POST, "v1/nodes/pi/approve", Role::Admin),
            (Method::PUT, "v1/nodes/pi/labels", Role::Admin),
            (Method::GET, "v1/tokens", Role::Admin),
            (Method::POST, "v1/tokens", Role::Admin),
            (Method::GET, "v1/audit", Role::Admin),
            (Method::GET, "metrics", Role::Viewer),
        ];
        for (m, path, want) in cases {
            let segs: Vec<&str> = path.split('/').collect();
            assert_eq!(required_role(m, &segs), *want, "{m} {path}");
        }
        assert!(is_public(&Method::GET, &["healthz"]));
        assert!(!is_public(&Method::GET, &["v1", "nodes"]));
    }
}
