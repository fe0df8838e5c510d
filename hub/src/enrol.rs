//! Joins: enrolling a new node with a bootstrap token, and refreshing a
//! known one. Pure: it edits [`Durable`] and says what to answer; the caller
//! seals the credential, tells the broker and publishes.
//!
//! Architecture invariant: the hub believes a node only about itself. What a
//! node reports is checked for plausibility; labels under `admin.edge/` are
//! dropped (only the API and the bootstrap token set them); what it may
//! offer is capped by what was approved at enrolment; the generation it
//! says it holds never moves the hub's counter.

use edge_api::model::{NodeFacts, Resources};
use edge_api::quantity::{Cpu, Memory};
use edge_api::token::{hash_secret, parse_presented};
use edge_api::wire::Join;

use crate::controller::{Durable, NodeRecord};
use crate::tokens;

const MAX_NODE_MEMORY: Memory = NodeFacts::MAX_MEMORY;
const MAX_NODE_CPUS: u32 = NodeFacts::MAX_CPUS;

/// What became of a join.
#[derive(Debug, PartialEq, Eq)]
pub struct Joined {
    /// A node the hub did not know before.
    pub new: bool,
    /// Waiting for `edgectl approve node`.
    pub pending: bool,
    /// A credential to seal into the welcome (the one passed in, now recorded).
    pub credential: Option<String>,
    /// What the hub did not believe, for the node's warnings.
    pub warnings: Vec<String>,
}

/// Checks reported facts for plausibility and removes what a node may not
/// say about itself. Returns the facts to keep and what was dropped.
pub fn sanitize(mut f: NodeFacts) -> Result<(NodeFacts, Vec<String>), String> {
    if f.memory.0 > MAX_NODE_MEMORY.0 || f.allocatable_memory.0 > f.memory.0 {
        return Err(format!(
            "implausible memory: {} total, {} allocatable (at most {MAX_NODE_MEMORY}, and allocatable within total)",
            f.memory, f.allocatable_memory
        ));
    }
    if f.cpus == 0 || f.cpus > MAX_NODE_CPUS || f.allocatable_cpu.0 > u64::from(f.cpus) * 1000 {
        return Err(format!(
            "implausible CPUs: {} CPUs, {} allocatable (1 to {MAX_NODE_CPUS}, allocatable within them)",
            f.cpus, f.allocatable_cpu
        ));
    }
    let mut warnings = Vec::new();
    let reserved: Vec<String> = f.labels.keys().filter(|k| edge_api::names::is_admin_label(k)).cloned().collect();
    for k in reserved {
        f.labels.remove(&k);
        warnings.push(format!("reported label {k} ignored: only the API sets admin.edge/ labels"));
    }
    Ok((f, warnings))
}

/// Applies a verified join (the envelope's signature by `j.key` was
/// checked) to durable state. `fresh_credential` is a new random secret,
/// recorded (as a hash) and returned only if the node gets a credential now.
pub fn apply_join(
    d: &mut Durable,
    j: &Join,
    require_approval: bool,
    fresh_credential: &str,
    now_ms: u64,
) -> Result<Joined, String> {
    let (facts, mut warnings) = sanitize(j.facts.clone())?;
    let node = j.node.as_str();
    let presented = match &j.token {
        Some(t) => Some(parse_presented(t).ok_or("malformed bootstrap token")?),
        None => None,
    };
    let mut credential = None;
    let new = match d.nodes.get(node) {
        Some(rec) if rec.key != j.key => {
            return Err(format!(
                "node name {node:?} is already taken by another agent (key {}); delete it first with `edgectl delete node {node}` or choose another --name",
                rec.key.fingerprint()
            ));
        }
        Some(_) => {
            if let Some((id, secret)) = presented {
                // A known node that lost its credential (or never received
                // it) proves itself with a valid bootstrap token again.
                tokens::check(&d.tokens, edge_api::model::TokenKind::Join, id, secret, now_ms)
                    .map_err(|e| format!("invalid join token: {e}"))?;
            }
            false
        }
        None => {
            let Some((id, secret)) = presented else {
                return Err(format!(
                    "node {node:?} is not enrolled (deleted from the hub?): start the agent with a join token (`edgectl token create`) to enrol it"
                ));
            };
            let tok = tokens::check_enrolment(&d.tokens, id, secret, now_ms)
                .map_err(|e| format!("invalid join token: {e}"))?
                .info
                .clone();
            let mut rec = NodeRecord::new(node, j.key, facts.clone(), now_ms);
            rec.admin_labels = tok.labels.clone();
            let offered = Resources { memory: facts.allocatable_memory, cpu: facts.allocatable_cpu };
            rec.capacity = Some(match tok.capacity {
                Some(c) => {
                    Resources { memory: Memory(c.memory.0.min(offered.memory.0)), cpu: Cpu(c.cpu.0.min(offered.cpu.0)) }
                }
                None => offered,
            });
            rec.enrolled_with = Some(tok.id.clone());
            rec.approved = !(require_approval || tok.require_approval);
            if let Some(t) = d.tokens.get_mut(&tok.id) {
                t.info.uses = t.info.uses.saturating_add(1);
            }
            d.nodes.insert(node.to_string(), rec);
            true
        }
    };
    let last_issued = d.last_generation;
    let next = if j.observed_generation > d.nodes.get(node).map_or(0, |r| r.desired_generation) {
        Some(d.next_generation(now_ms))
    } else {
        None
    };
    let Some(rec) = d.nodes.get_mut(node) else {
        return Err(format!("node {node:?} vanished while joining"));
    };
    rec.facts = facts;
    rec.kem = Some(j.kem);
    if let Some(cap) = rec.capacity {
        if rec.facts.allocatable_memory.0 > cap.memory.0 {
            warnings.push(format!(
                "reports {} allocatable memory; capped at {} (approved)",
                rec.facts.allocatable_memory, cap.memory
            ));
        }
        if rec.facts.allocatable_cpu.0 > cap.cpu.0 {
            warnings.push(format!(
                "reports {} allocatable CPU; capped at {} (approved)",
                rec.facts.allocatable_cpu, cap.cpu
            ));
        }
    }
    if j.observed_generation > last_issued {
        warnings.push(format!(
            "reports desired-state generation {}, above any this hub issued ({last_issued}); ignored",
            j.observed_generation
        ));
    }
    // The agent holds a document newer than this record's (the node was
    // deleted and joined again, or the hub's state is older than the
    // node's): a fresh generation from the hub's own counter, which the
    // clock floor keeps above what an older hub issued. Never the node's number.
    if let Some(g) = next {
        rec.desired_generation = g;
    }
    let wants_credential = presented.is_some() || rec.credential_hash.is_none();
    if rec.approved && wants_credential {
        rec.credential_hash = Some(hash_secret(fresh_credential));
        credential = Some(fresh_credential.to_string());
    }
    Ok(Joined { new, pending: !rec.approved, credential, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::TokenRecord;
    use edge_api::keys::SigningKey;
    use edge_api::model::{TokenInfo, TokenKind};
    use edge_api::seal::KemKeyPair;

    fn facts(mem_mib: u64) -> NodeFacts {
        crate::test_facts("arm64", mem_mib, &[])
    }

    fn state() -> Durable {
        let mut d = Durable::default();
        let token = |id: &str, f: &dyn Fn(&mut TokenInfo)| {
            let mut info = TokenInfo::new(id, TokenKind::Join, 0, "t");
            f(&mut info);
            TokenRecord { info, secret_hash: hash_secret("secretsecretsecret") }
        };
        d.tokens.insert("plain001".into(), token("plain001", &|_| {}));
        d.tokens.insert(
            "plant001".into(),
            token("plant001", &|i| {
                i.labels.insert("admin.edge/site".into(), "plant-1".into());
                i.capacity = Some(Resources { memory: Memory::mib(512), cpu: Cpu(1000) });
                i.max_uses = Some(1);
            }),
        );
        d.tokens.insert("review01".into(), token("review01", &|i| i.require_approval = true));
        d
    }

    fn join(node: &str, key: &SigningKey, token: Option<&str>, f: NodeFacts, observed: u64) -> Join {
        Join {
            node: node.into(),
            key: key.public(),
            kem: KemKeyPair::generate().unwrap().public(),
            token: token.map(|t| format!("{t}.secretsecretsecret")),
            session: 1,
            observed_generation: observed,
            facts: f,
        }
    }

    #[test]
    fn a_new_node_needs_a_valid_token_and_gets_its_labels_capacity_and_a_credential() {
        let mut d = state();
        let key = SigningKey::generate().unwrap();
        let e = apply_join(&mut d, &join("pi", &key, None, facts(1024), 0), false, "cred", 5).unwrap_err();
        assert!(e.contains("not enrolled"), "{e}");
        let mut bad = join("pi", &key, Some("plain001"), facts(1024), 0);
        bad.token = Some("plain001.wrongwrongwrongwrong".into());
        assert!(apply_join(&mut d, &bad, false, "cred", 5).unwrap_err().contains("invalid join token"));
        assert!(d.nodes.is_empty(), "nothing recorded for refused joins");

        let mut f = facts(4096);
        f.labels.insert("admin.edge/site".into(), "plant-9".into());
        let out = apply_join(&mut d, &join("pi", &key, Some("plant001"), f, 0), false, "cred", 5).unwrap();
        assert!(out.new && !out.pending);
        assert_eq!(out.credential.as_deref(), Some("cred"));
        assert!(out.warnings.iter().any(|w| w.contains("admin.edge/site ignored")), "{:?}", out.warnings);
        let rec = &d.nodes["pi"];
        assert_eq!(rec.credential_hash.as_deref(), Some(hash_secret("cred").as_str()));
        assert_eq!(rec.admin_labels.get("admin.edge/site").map(String::as_str), Some("plant-1"));
        assert_eq!(rec.capacity, Some(Resources { memory: Memory::mib(512), cpu: Cpu(1000) }));
        assert_eq!(rec.effective_facts().labels.get("admin.edge/site").map(String::as_str), Some("plant-1"));
        assert_eq!(d.tokens["plant001"].info.uses, 1);

        // The token is used up: a second device cannot enrol with it.
        let other = SigningKey::generate().unwrap();
        let e = apply_join(&mut d, &join("pi-2", &other, Some("plant001"), facts(1024), 0), false, "c2", 6);
        assert!(e.unwrap_err().contains("as many nodes as it may"));
        // Nor can anyone take the enrolled name.
        let e = apply_join(&mut d, &join("pi", &other, Some("plain001"), facts(1024), 0), false, "c3", 6);
        assert!(e.unwrap_err().contains("already taken"));
    }

    #[test]
    fn a_known_node_rejoins_without_a_token_and_gets_no_new_credential() {
        let mut d = state();
        let key = SigningKey::generate().unwrap();
        apply_join(&mut d, &join("pi", &key, Some("plain001"), facts(1024), 0), false, "cred", 5).unwrap();
        let out = apply_join(&mut d, &join("pi", &key, None, facts(1024), 0), false, "other", 6).unwrap();
        assert_eq!(out, Joined { new: false, pending: false, credential: None, warnings: vec![] });
        // With a valid token again (it lost its credential): a new one, the old hash replaced.
        let out = apply_join(&mut d, &join("pi", &key, Some("plain001"), facts(1024), 0), false, "renewed", 7).unwrap();
        assert_eq!(out.credential.as_deref(), Some("renewed"));
        assert_eq!(d.tokens["plain001"].info.uses, 1, "a rejoin does not use the token up");
    }

    #[test]
    fn approval_holds_back_the_credential() {
        let mut d = state();
        let key = SigningKey::generate().unwrap();
        let out = apply_join(&mut d, &join("pi", &key, Some("review01"), facts(1024), 0), false, "cred", 5).unwrap();
        assert!(out.pending && out.credential.is_none());
        assert!(!d.nodes["pi"].approved);
        let out = apply_join(
            &mut d,
            &join("pi-2", &SigningKey::generate().unwrap(), Some("plain001"), facts(1), 0),
            true,
            "c",
            5,
        );
        assert!(out.unwrap().pending, "the hub-wide setting applies to every token");
    }

    #[test]
    fn what_a_node_reports_never_moves_the_generation_counter_and_lies_are_capped_or_refused() {
        let mut d = state();
        let key = SigningKey::generate().unwrap();
        apply_join(&mut d, &join("pi", &key, Some("plain001"), facts(1024), 0), false, "cred", 5).unwrap();
        let out = apply_join(&mut d, &join("pi", &key, None, facts(1024), u64::MAX - 1), false, "x", 6).unwrap();
        assert!(out.warnings.iter().any(|w| w.contains("above any this hub issued")), "{:?}", out.warnings);
        assert!(
            d.last_generation < 1 << 40,
            "the counter follows the hub's clock, not the node: {}",
            d.last_generation
        );
        assert_eq!(d.nodes["pi"].desired_generation, d.last_generation);

        let out = apply_join(&mut d, &join("pi", &key, None, facts(8192), 0), false, "x", 7).unwrap();
        assert!(out.warnings.iter().any(|w| w.contains("capped at 1Gi")), "{:?}", out.warnings);
        assert_eq!(d.nodes["pi"].effective_facts().allocatable_memory, Memory::mib(1024));

        let mut huge = facts(1);
        huge.memory = Memory(u64::MAX);
        huge.allocatable_memory = Memory(u64::MAX);
        let e = apply_join(&mut d, &join("pi", &key, None, huge, 0), false, "x", 8).unwrap_err();
        assert!(e.contains("implausible memory"), "{e}");
        let mut cpus = facts(1);
        cpus.allocatable_cpu = Cpu(1 << 40);
        assert!(
            apply_join(&mut d, &join("pi", &key, None, cpus, 0), false, "x", 8)
                .unwrap_err()
                .contains("implausible CPUs")
        );
    }
}
