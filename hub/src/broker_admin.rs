//! Keeping a broker's logins in step with the hub: bootstrap tokens and node
//! credentials are created and revoked at the broker as they are at the hub.
//!
//! Sans-io: each method returns the MQTT messages to publish; the hub sends
//! them through its session. The embedded broker needs none (it asks the hub
//! at every login, see [`crate::broker`]); Mosquitto is managed over its
//! dynamic-security plugin ([`Dynsec`]).

use edge_api::wire::{self, Channel};
use serde_json::{Value, json};

use crate::hub::Outgoing;

/// What the hub knows a login must exist for, asked when the broker's
/// accounts are compared with the hub's (after each connect).
pub trait Known {
    /// A node that may log in (enrolled, approved, not deleted).
    fn node(&self, name: &str) -> bool;
    /// A bootstrap token that may still enrol devices.
    fn bootstrap(&self, id: &str) -> bool;
}

pub trait BrokerAdmin: Send + Sync {
    /// Lets a device log in as `join-<id>` with `secret` (enrol only).
    fn add_bootstrap(&self, id: &str, secret: &str) -> Vec<Outgoing>;
    fn remove_bootstrap(&self, id: &str) -> Vec<Outgoing>;
    /// Lets node `name` log in with `password` (replacing an older one).
    fn add_node(&self, name: &str, password: &str) -> Vec<Outgoing>;
    /// Revokes a node's login and disconnects it.
    fn remove_node(&self, name: &str) -> Vec<Outgoing>;
    /// After each (re)connect: set up what the broker must have (roles),
    /// and ask for its accounts to compare them with the hub's.
    fn on_connected(&self) -> Vec<Outgoing>;
    /// Topics to subscribe to for the broker's answers.
    fn filters(&self) -> Vec<String> {
        Vec::new()
    }
    /// An answer from the broker: reports failures; removes the logins of
    /// nodes and tokens the hub no longer knows.
    fn on_message(&self, _topic: &str, _payload: &[u8], _known: &dyn Known) -> Vec<Outgoing> {
        Vec::new()
    }
    /// Whether `add_node` makes the login only after the broker answers
    /// (then a node must not be told its credential before that).
    fn makes_logins_later(&self) -> bool {
        false
    }
    /// Nodes whose logins were made (their commands are in the messages
    /// returned so far) since the last call.
    fn logins_made(&self) -> Vec<String> {
        Vec::new()
    }
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

/// Mosquitto's dynamic-security plugin, driven over
/// `$CONTROL/dynamic-security/v1` with the hub's own (admin) login.
///
/// Each node gets a client (user = node name, client id bound to
/// `edge-agent-<node>`) and a role of its own with **literal** topics: its
/// own channels and nothing else (Mosquitto 2.0's dynsec does not expand
/// `%u` in ACLs, and a shared role edited later would disconnect every node).
/// Bootstrap tokens get a client `join-<id>` with the shared `edge-join`
/// role: publish joins, read welcomes (sealed to each device's key). The
/// default ACL stays deny for publishing and subscribing. Clients the hub
/// made carry a `textname` saying so; after each connect the hub lists them
/// and deletes those it no longer knows (a node deleted while the broker was
/// unreachable, say).
#[derive(Default)]
pub struct Dynsec {
    /// Node logins waiting for the broker to say whether the name is free
    /// (or already the hub's): name → password.
    pending: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Node logins whose making was sent, for the hub to welcome them.
    made: std::sync::Mutex<Vec<String>>,
}

/// Node logins waiting for the broker's answer at most (a broker that
/// never answers must not grow the hub).
const PENDING_MAX: usize = 10_000;
const ADD_NODE: &str = "edge-add-node:";
const DEL_NODE: &str = "edge-del-node:";

/// Where dynamic-security commands go, and their answers come back.
pub const DYNSEC_TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const DYNSEC_RESPONSE: &str = "$CONTROL/dynamic-security/v1/response";
/// The role every bootstrap login has.
pub const JOIN_ROLE: &str = "edge-join";
const NODE_TEXT: &str = "edge node ";
const JOIN_TEXT: &str = "edge bootstrap token ";
/// Commands whose failure is expected when the state is already right.
const IDEMPOTENT: &str = "edge-idem";
const SYNC: &str = "edge-sync";

fn node_role(name: &str) -> String {
    format!("edge-node-{name}")
}

fn commands(cmds: Vec<Value>) -> Vec<Outgoing> {
    if cmds.is_empty() {
        return Vec::new();
    }
    vec![Outgoing {
        topic: DYNSEC_TOPIC.to_string(),
        payload: serde_json::to_vec(&json!({ "commands": cmds })).unwrap_or_default(),
        retain: false,
        lossy: false,
    }]
}

fn idem(mut v: Value) -> Value {
    v["correlationData"] = json!(IDEMPOTENT);
    v
}

/// Creates the role of bootstrap logins (a no-op when it exists).
fn join_role() -> Value {
    let acls = json!([
        { "acltype": "publishClientSend", "topic": wire::topic("+", Channel::Join), "allow": true },
        { "acltype": "subscribePattern", "topic": wire::topic("+", Channel::Welcome), "allow": true },
        { "acltype": "publishClientReceive", "topic": wire::topic("+", Channel::Welcome), "allow": true },
    ]);
    idem(json!({ "command": "createRole", "rolename": JOIN_ROLE, "acls": acls }))
}

impl Dynsec {
    /// The commands that (re)make a node's login and role.
    fn make_node(name: &str, password: &str) -> Vec<Outgoing> {
        let role = node_role(name);
        commands(vec![
            idem(json!({ "command": "deleteClient", "username": name })),
            idem(json!({ "command": "deleteRole", "rolename": role })),
            json!({ "command": "createRole", "rolename": role, "acls": Self::node_acls(name) }),
            json!({
                "command": "createClient",
                "username": name,
                "password": password,
                "clientid": format!("edge-agent-{name}"),
                "textname": format!("{NODE_TEXT}{name}"),
                "roles": [{ "rolename": role, "priority": 1 }],
            }),
        ])
    }

    /// The commands that remove a node's login and role.
    fn unmake_node(name: &str) -> Vec<Outgoing> {
        commands(vec![
            idem(json!({ "command": "deleteClient", "username": name })),
            idem(json!({ "command": "deleteRole", "rolename": node_role(name) })),
        ])
    }

    /// The broker's answer to whether a node's login name is free.
    fn on_add_node(&self, name: &str, r: &Value) -> Vec<Outgoing> {
        let Some(password) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(name) else {
            return Vec::new();
        };
        let ours = format!("{NODE_TEXT}{name}");
        let free = r["error"].as_str().is_some_and(|e| e.contains("not found"));
        let hubs = r["error"].is_null() && r["data"]["client"]["textname"].as_str() == Some(ours.as_str());
        if free || hubs {
            self.made.lock().unwrap_or_else(|p| p.into_inner()).push(name.to_string());
            return Self::make_node(name, &password);
        }
        match (r["error"].as_str(), r["data"]["client"]["textname"].as_str()) {
            (Some(e), _) => {
                tracing::warn!(node = name, "cannot check the broker login for the node: {e}");
                Vec::new()
            }
            (None, _) => {
                tracing::warn!(
                    node = name,
                    "the broker has a login of that name the hub did not make; the node cannot log in until it is removed or the node is renamed"
                );
                Vec::new()
            }
        }
    }

    fn node_acls(name: &str) -> Vec<Value> {
        let mut acls = Vec::new();
        for c in Channel::ALL {
            let topic = wire::topic(name, c);
            if c.from_agent() {
                acls.push(json!({ "acltype": "publishClientSend", "topic": topic, "allow": true }));
            } else {
                acls.push(json!({ "acltype": "subscribeLiteral", "topic": topic, "allow": true }));
                acls.push(json!({ "acltype": "publishClientReceive", "topic": topic, "allow": true }));
            }
        }
        acls
    }
}

impl BrokerAdmin for Dynsec {
    fn makes_logins_later(&self) -> bool {
        true
    }

    fn logins_made(&self) -> Vec<String> {
        std::mem::take(&mut *self.made.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn add_bootstrap(&self, id: &str, secret: &str) -> Vec<Outgoing> {
        let user = edge_api::token::bootstrap_user(id);
        commands(vec![
            // This may come before the first `on_connected` (a token made at
            // start): the role it names must exist first.
            join_role(),
            idem(json!({ "command": "deleteClient", "username": user })),
            json!({
                "command": "createClient",
                "username": user,
                "password": secret,
                "textname": format!("{JOIN_TEXT}{id}"),
                "roles": [{ "rolename": JOIN_ROLE, "priority": 1 }],
            }),
        ])
    }

    fn remove_bootstrap(&self, id: &str) -> Vec<Outgoing> {
        let user = edge_api::token::bootstrap_user(id);
        commands(vec![idem(json!({ "command": "deleteClient", "username": user }))])
    }

    fn add_node(&self, name: &str, password: &str) -> Vec<Outgoing> {
        // First ask whether the name is free or already the hub's: a login
        // the operator made (or the hub's own) is never replaced.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= PENDING_MAX && !pending.contains_key(name) {
            tracing::warn!(node = name, "the broker is not answering; node login not made");
            return Vec::new();
        }
        pending.insert(name.to_string(), password.to_string());
        commands(vec![json!({
            "command": "getClient",
            "username": name,
            "correlationData": format!("{ADD_NODE}{name}"),
        })])
    }

    fn remove_node(&self, name: &str) -> Vec<Outgoing> {
        // Only a login the hub made goes: ask first.
        commands(vec![json!({
            "command": "getClient",
            "username": name,
            "correlationData": format!("{DEL_NODE}{name}"),
        })])
    }

    fn on_connected(&self) -> Vec<Outgoing> {
        commands(vec![
            // Whatever no role allows is refused.
            json!({ "command": "setDefaultACLAccess", "acls": [
                { "acltype": "publishClientSend", "allow": false },
                { "acltype": "subscribe", "allow": false },
            ]}),
            join_role(),
            json!({ "command": "listClients", "verbose": true, "correlationData": SYNC }),
        ])
    }

    fn filters(&self) -> Vec<String> {
        vec![DYNSEC_RESPONSE.to_string()]
    }

    fn on_message(&self, topic: &str, payload: &[u8], known: &dyn Known) -> Vec<Outgoing> {
        if topic != DYNSEC_RESPONSE {
            return Vec::new();
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            tracing::warn!("the broker's dynamic-security answer is not JSON");
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in v["responses"].as_array().into_iter().flatten() {
            let command = r["command"].as_str().unwrap_or("?");
            let corr = r["correlationData"].as_str().unwrap_or("");
            if let Some(name) = corr.strip_prefix(ADD_NODE) {
                out.extend(self.on_add_node(name, r));
                continue;
            }
            if let Some(name) = corr.strip_prefix(DEL_NODE) {
                if r["data"]["client"]["textname"].as_str() == Some(format!("{NODE_TEXT}{name}").as_str()) {
                    out.extend(Self::unmake_node(name));
                }
                continue;
            }
            if let Some(e) = r["error"].as_str() {
                if corr == IDEMPOTENT {
                    tracing::debug!(command, "dynamic-security: {e} (expected)");
                } else {
                    tracing::warn!(command, "the broker refused a dynamic-security command: {e}");
                }
                continue;
            }
            if corr != SYNC {
                continue;
            }
            for c in r["data"]["clients"].as_array().into_iter().flatten() {
                let (Some(user), Some(text)) = (c["username"].as_str(), c["textname"].as_str()) else { continue };
                if let Some(node) = text.strip_prefix(NODE_TEXT).filter(|n| *n == user) {
                    if !known.node(node) {
                        tracing::info!(node, "removing the broker login of a node the hub no longer has");
                        out.extend(Self::unmake_node(node));
                    }
                } else if let Some(id) = text.strip_prefix(JOIN_TEXT)
                    && edge_api::token::parse_bootstrap_user(user) == Some(id)
                    && !known.bootstrap(id)
                {
                    tracing::info!(id, "removing the broker login of a bootstrap token no longer valid");
                    out.extend(self.remove_bootstrap(id));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fleet;
    impl Known for Fleet {
        fn node(&self, name: &str) -> bool {
            name == "pi-1"
        }
        fn bootstrap(&self, id: &str) -> bool {
            id == "live01"
        }
    }

    fn cmds(out: &[Outgoing]) -> Vec<Value> {
        out.iter()
            .flat_map(|o| {
                assert_eq!(o.topic, DYNSEC_TOPIC);
                assert!(!o.retain);
                serde_json::from_slice::<Value>(&o.payload).unwrap()["commands"].as_array().unwrap().clone()
            })
            .collect()
    }

    fn answer(name: &str, error: Option<&str>, textname: Option<&str>) -> Vec<u8> {
        let mut r = json!({ "command": "getClient", "correlationData": format!("{ADD_NODE}{name}") });
        if let Some(e) = error {
            r["error"] = json!(e);
        } else {
            r["data"] = json!({ "client": { "username": name, "textname": textname } });
        }
        serde_json::to_vec(&json!({ "responses": [r] })).unwrap()
    }

    #[test]
    fn a_node_login_never_replaces_one_the_hub_did_not_make() {
        let d = Dynsec::default();
        for (error, textname, made) in [
            (Some("Client not found"), None, true),
            (None, Some("edge node pi-1"), true),
            (None, Some("the operator's"), false),
            (None, None, false),
            (Some("Not authorised"), None, false),
        ] {
            let asked = cmds(&d.add_node("pi-1", "pw"));
            assert_eq!(asked[0]["command"], "getClient");
            let out = cmds(&d.on_message(DYNSEC_RESPONSE, &answer("pi-1", error, textname), &Fleet));
            assert_eq!(!out.is_empty(), made, "{error:?} {textname:?}");
            // The hub is told, so the node's welcome goes only after the login exists.
            let told = if made { vec!["pi-1".to_string()] } else { vec![] };
            assert_eq!(d.logins_made(), told, "{error:?} {textname:?}");
            // The password is used once: a second answer makes nothing.
            assert!(d.on_message(DYNSEC_RESPONSE, &answer("pi-1", error, textname), &Fleet).is_empty());
            assert!(d.logins_made().is_empty());
        }
    }

    #[test]
    fn a_node_gets_a_bound_client_and_a_role_of_its_own_literal_topics() {
        let c = cmds(&Dynsec::make_node("pi-1", "pw"));
        let names: Vec<&str> = c.iter().map(|c| c["command"].as_str().unwrap()).collect();
        assert_eq!(names, ["deleteClient", "deleteRole", "createRole", "createClient"]);
        assert_eq!(c[3]["clientid"], "edge-agent-pi-1");
        assert_eq!(c[3]["roles"][0]["rolename"], "edge-node-pi-1");
        let acls = c[2]["acls"].as_array().unwrap();
        for a in acls {
            let t = a["topic"].as_str().unwrap();
            assert!(t.starts_with("edge/v1/nodes/pi-1/") && !t.contains(['+', '#', '%']), "{a}");
        }
        let sends: Vec<&str> =
            acls.iter().filter(|a| a["acltype"] == "publishClientSend").map(|a| a["topic"].as_str().unwrap()).collect();
        assert!(sends.contains(&"edge/v1/nodes/pi-1/status") && !sends.contains(&"edge/v1/nodes/pi-1/desired"));
        // Removal asks first, and removes only a login the hub made.
        let d = Dynsec::default();
        assert_eq!(cmds(&d.remove_node("pi-1"))[0]["command"], "getClient");
        let del = |text: &str| {
            let r = json!({ "responses": [{ "command": "getClient", "correlationData": format!("{DEL_NODE}pi-1"),
                "data": { "client": { "username": "pi-1", "textname": text } } }] });
            cmds(&d.on_message(DYNSEC_RESPONSE, &serde_json::to_vec(&r).unwrap(), &Fleet))
        };
        assert!(del("the operator's").is_empty());
        let removed = del("edge node pi-1");
        assert_eq!(
            (removed[0]["command"].as_str(), removed[0]["username"].as_str()),
            (Some("deleteClient"), Some("pi-1"))
        );
        assert_eq!(removed[1]["rolename"], "edge-node-pi-1");
    }

    #[test]
    fn logins_the_hub_no_longer_knows_are_removed_and_others_left_alone() {
        let answer = json!({ "responses": [
            { "command": "deleteClient", "error": "Client not found", "correlationData": IDEMPOTENT },
            { "command": "listClients", "correlationData": SYNC, "data": { "clients": [
                { "username": "pi-1", "textname": "edge node pi-1" },
                { "username": "pi-2", "textname": "edge node pi-2" },
                { "username": "pi-3", "textname": "edge node pi-2" },
                { "username": "join-live01", "textname": "edge bootstrap token live01" },
                { "username": "join-old001", "textname": "edge bootstrap token old001" },
                { "username": "edge-hub" },
                { "username": "operator-made", "textname": "mine" },
            ]}},
        ]});
        let out = Dynsec::default().on_message(DYNSEC_RESPONSE, &serde_json::to_vec(&answer).unwrap(), &Fleet);
        let c = cmds(&out);
        let targets: Vec<String> = c
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["command"].as_str().unwrap(),
                    c["username"].as_str().or(c["rolename"].as_str()).unwrap()
                )
            })
            .collect();
        assert_eq!(targets, ["deleteClient pi-2", "deleteRole edge-node-pi-2", "deleteClient join-old001"]);
        assert!(Dynsec::default().on_message("other/topic", b"{}", &Fleet).is_empty());
        assert!(Dynsec::default().on_message(DYNSEC_RESPONSE, b"not json", &Fleet).is_empty());
    }
}
