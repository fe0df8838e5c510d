//! Where a workload's replicas may run: how many (`replicas`, a count or one
//! per selected node), which nodes (`[spec.placement]`: architectures, a
//! label selector, tolerations of node taints), and how replicas spread
//! (`spread` over a label's values, `anti_affinity` with workloads).
//!
//! Label selectors use kubectl's syntax, so `-l` on the command line and
//! `node_selector` in a manifest read the same:
//! `role=gw, site in (a, b), tier notin (test), gpu, !legacy`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Labels;
use crate::names;

/// How many replicas a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Replicas {
    /// This many, placed by the scheduler.
    Count(u32),
    /// One on every node the placement selects (a DaemonSet): a node that
    /// joins later and matches gets one; one that stops matching loses it.
    PerNode,
}

impl Replicas {
    pub const PER_NODE: &'static str = "per-node";

    /// The count, for counted workloads.
    pub fn count(self) -> Option<u32> {
        match self {
            Replicas::Count(n) => Some(n),
            Replicas::PerNode => None,
        }
    }

    pub fn is_per_node(self) -> bool {
        self == Replicas::PerNode
    }
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas::Count(1)
    }
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replicas::Count(n) => write!(f, "{n}"),
            Replicas::PerNode => f.write_str(Self::PER_NODE),
        }
    }
}

impl Serialize for Replicas {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Replicas::Count(n) => s.serialize_u32(*n),
            Replicas::PerNode => s.serialize_str(Self::PER_NODE),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Replicas::Count(n)),
            Raw::Word(w) if w == Self::PER_NODE => Ok(Replicas::PerNode),
            Raw::Word(w) => {
                Err(serde::de::Error::custom(format!("replicas: expected a number or \"per-node\", found {w:?}")))
            }
        }
    }
}

/// How a selector requirement compares a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `key=value` (also `key==value`, and every entry of a table).
    Eq,
    /// `key!=value`: also matches nodes without the label.
    NotEq,
    /// `key in (a, b)`.
    In,
    /// `key notin (a, b)`: also matches nodes without the label.
    NotIn,
    /// `key`: the label is present, whatever its value.
    Exists,
    /// `!key`: the label is absent.
    DoesNotExist,
}

/// One condition on one label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    /// One for `Eq`/`NotEq`, one or more for `In`/`NotIn`, none otherwise.
    pub values: Vec<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Op::Eq | Op::In => v.is_some_and(|v| self.values.contains(v)),
            Op::NotEq | Op::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.key;
        match self.op {
            Op::Eq => write!(f, "{k}={}", self.values[0]),
            Op::NotEq => write!(f, "{k}!={}", self.values[0]),
            Op::In => write!(f, "{k} in ({})", self.values.join(",")),
            Op::NotIn => write!(f, "{k} notin ({})", self.values.join(",")),
            Op::Exists => f.write_str(k),
            Op::DoesNotExist => write!(f, "!{k}"),
        }
    }
}

/// Requirements on a node's labels, all of which must hold. Written as a
/// table (`{ role = "gw" }`, equality only) or as a string in kubectl's
/// selector syntax; stored as a table when it is one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    /// Equality on each label of a table.
    pub fn from_labels(labels: &Labels) -> Selector {
        Selector(
            labels.iter().map(|(k, v)| Requirement { key: k.clone(), op: Op::Eq, values: vec![v.clone()] }).collect(),
        )
    }

    /// The table, when every requirement is an equality on a distinct key.
    fn as_labels(&self) -> Option<Labels> {
        let mut out = Labels::new();
        for r in &self.0 {
            if r.op != Op::Eq || out.insert(r.key.clone(), r.values[0].clone()).is_some() {
                return None;
            }
        }
        (out.keys().eq(self.0.iter().map(|r| &r.key))).then_some(out)
    }

    /// Parses kubectl's selector syntax. Keys and values are checked as
    /// label keys and values; the error names the requirement at fault.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut out = Vec::new();
        for part in split_top(s)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("selector {s:?} has an empty requirement"));
            }
            out.push(requirement(part).map_err(|e| format!("in {part:?}: {e}"))?);
        }
        Ok(Selector(out))
    }
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err(format!("selector {s:?}: nested parentheses")),
            ')' if depth == 1 => depth = 0,
            ')' => return Err(format!("selector {s:?}: ')' without '('")),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("selector {s:?}: '(' without ')'"));
    }
    if !s.trim().is_empty() {
        parts.push(&s[start..]);
    }
    Ok(parts)
}

fn key(k: &str) -> Result<String, String> {
    names::check_label_key(k)?;
    Ok(k.to_string())
}

fn value(v: &str) -> Result<String, String> {
    names::check_label_value(v)?;
    Ok(v.to_string())
}

fn requirement(part: &str) -> Result<Requirement, String> {
    if let Some(k) = part.strip_prefix('!') {
        return Ok(Requirement { key: key(k.trim())?, op: Op::DoesNotExist, values: vec![] });
    }
    for (sep, op) in [("!=", Op::NotEq), ("==", Op::Eq), ("=", Op::Eq)] {
        if let Some((k, v)) = part.split_once(sep) {
            return Ok(Requirement { key: key(k.trim())?, op, values: vec![value(v.trim())?] });
        }
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    match words.as_slice() {
        [k] => Ok(Requirement { key: key(k)?, op: Op::Exists, values: vec![] }),
        [k, rest] => {
            let rest = rest.trim_start();
            let (op, list) = if let Some(l) = rest.strip_prefix("notin") {
                (Op::NotIn, l)
            } else if let Some(l) = rest.strip_prefix("in") {
                (Op::In, l)
            } else {
                return Err("expected key=value, key!=value, key in (...), key notin (...), key or !key".into());
            };
            let list = list.trim();
            let inner = list
                .strip_prefix('(')
                .and_then(|l| l.strip_suffix(')'))
                .ok_or_else(|| "the values must be in parentheses: key in (a, b)".to_string())?;
            let values: Vec<String> = inner.split(',').map(|v| value(v.trim())).collect::<Result<_, _>>()?;
            if values.iter().all(String::is_empty) {
                return Err("give at least one value in the parentheses".into());
            }
            Ok(Requirement { key: key(k)?, op, values })
        }
        _ => Err("empty requirement".into()),
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.as_labels() {
            Some(labels) => labels.serialize(s),
            None => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Table(BTreeMap<String, String>),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Table(t) => Ok(Selector::from_labels(&t)),
            Raw::Text(s) => Selector::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// What a taint keeps away.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaintEffect {
    /// No new replica is placed on the node unless it tolerates the taint.
    NoSchedule,
    /// The scheduler avoids the node while others fit.
    PreferNoSchedule,
    /// As `NoSchedule`, and replicas already there that do not tolerate it
    /// are moved away (their agent stops them).
    NoExecute,
}

impl TaintEffect {
    pub const NAMES: &'static [&'static str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];

    pub fn parse(s: &str) -> Option<TaintEffect> {
        match s {
            "NoSchedule" => Some(TaintEffect::NoSchedule),
            "PreferNoSchedule" => Some(TaintEffect::PreferNoSchedule),
            "NoExecute" => Some(TaintEffect::NoExecute),
            _ => None,
        }
    }
}

impl fmt::Display for TaintEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::NAMES[*self as usize])
    }
}

/// A mark on a node that keeps workloads away unless they tolerate it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: TaintEffect,
}

impl fmt::Display for Taint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect)
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect)
        }
    }
}

/// A change to a node's taints, as `kubectl taint` writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaintChange {
    /// `key[=value]:Effect`: adds the taint, or sets the value of the one
    /// with that key and effect.
    Set(Taint),
    /// `key[:Effect]-`: removes the key's taint with that effect, or all of
    /// the key's taints.
    Remove { key: String, effect: Option<TaintEffect> },
}

impl TaintChange {
    pub fn parse(s: &str) -> Result<TaintChange, String> {
        let bad = |e: String| format!("taint {s:?}: {e}");
        if let Some(rest) = s.strip_suffix('-') {
            let (k, effect) = match rest.split_once(':') {
                Some((k, e)) => (k, Some(effect(e).map_err(bad)?)),
                None => (rest, None),
            };
            return Ok(TaintChange::Remove { key: key(k).map_err(bad)?, effect });
        }
        let (kv, e) = s.rsplit_once(':').ok_or_else(|| {
            bad(format!("expected key[=value]:effect, the effect one of {}", TaintEffect::NAMES.join(", ")))
        })?;
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        Ok(TaintChange::Set(Taint {
            key: key(k).map_err(bad)?,
            value: value(v).map_err(bad)?,
            effect: effect(e).map_err(bad)?,
        }))
    }

    /// Applies the change to a node's taints; false when it changed nothing
    /// (removing a taint the node does not have).
    pub fn apply(&self, taints: &mut Vec<Taint>) -> bool {
        match self {
            TaintChange::Set(t) => {
                taints.retain(|x| !(x.key == t.key && x.effect == t.effect));
                taints.push(t.clone());
                taints.sort();
                true
            }
            TaintChange::Remove { key, effect } => {
                let before = taints.len();
                taints.retain(|x| !(x.key == *key && effect.is_none_or(|e| e == x.effect)));
                taints.len() != before
            }
        }
    }
}

fn effect(e: &str) -> Result<TaintEffect, String> {
    TaintEffect::parse(e)
        .ok_or_else(|| format!("unknown effect {e:?} (expected one of: {})", TaintEffect::NAMES.join(", ")))
}

/// How a toleration compares a taint's value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TolerationOp {
    #[default]
    Equal,
    Exists,
}

impl TolerationOp {
    fn is_equal(&self) -> bool {
        *self == TolerationOp::Equal
    }
}

/// Lets a workload's replicas onto nodes with matching taints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Toleration {
    /// The taint's key; empty (with `exists`) tolerates every taint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// `Exists`: any value of the key; `Equal` (the default): `value`.
    #[serde(default, skip_serializing_if = "TolerationOp::is_equal")]
    pub operator: TolerationOp,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// The effect tolerated; none means every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    pub fn tolerates(&self, t: &Taint) -> bool {
        let key = self.key.is_empty() || self.key == t.key;
        let value = self.operator == TolerationOp::Exists || self.value == t.value;
        key && value && self.effect.is_none_or(|e| e == t.effect)
    }
}

/// The first of `taints` with one of `effects` that no toleration lets by.
pub fn untolerated<'a>(tolerations: &[Toleration], taints: &'a [Taint], effects: &[TaintEffect]) -> Option<&'a Taint> {
    taints.iter().find(|t| effects.contains(&t.effect) && !tolerations.iter().any(|tol| tol.tolerates(t)))
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, Hash)]
pub struct Placement {
    /// Allowed node architectures; empty means any (Wasm runs everywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<String>,
    /// Requirements on node labels, all of which must hold.
    #[serde(default, skip_serializing_if = "Selector::is_empty")]
    pub node_selector: Selector,
    /// Counted replicas go first to the value of this node label that has
    /// the fewest of them (one `site` after another); nodes without the
    /// label only when no labelled node fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Workloads whose nodes this one's replicas never share (either way
    /// round); its own name means at most one replica per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<String>,
    /// Node taints its replicas accept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        *self == Placement::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_parse_kubectl_syntax_and_match_like_it() {
        let s = Selector::parse("role=gw, site in (a, b),tier notin (test), gpu, !legacy, zone!=x").unwrap();
        assert_eq!(s.to_string(), "role=gw,site in (a,b),tier notin (test),gpu,!legacy,zone!=x");
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s, "the text form round-trips");
        let base = [("role", "gw"), ("site", "a"), ("gpu", "1")];
        let table: &[(&[(&str, &str)], bool)] = &[
            (&base, true),
            (&[("role", "gw"), ("site", "b"), ("gpu", ""), ("zone", "y"), ("tier", "prod")], true),
            (&[("role", "gw"), ("site", "c"), ("gpu", "1")], false),
            (&[("role", "gw"), ("site", "a")], false),
            (&[("role", "gw"), ("site", "a"), ("gpu", "1"), ("legacy", "")], false),
            (&[("role", "gw"), ("site", "a"), ("gpu", "1"), ("tier", "test")], false),
            (&[("role", "gw"), ("site", "a"), ("gpu", "1"), ("zone", "x")], false),
            (&[("role", "db"), ("site", "a"), ("gpu", "1")], false),
        ];
        for (node, want) in table {
            assert_eq!(s.matches(&labels(node)), *want, "{node:?}");
        }
        assert!(Selector::default().matches(&Labels::new()), "an empty selector selects every node");
        assert!(Selector::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_selectors_name_the_requirement_at_fault() {
        for (bad, says) in [
            ("site in a,b", "in \"site in a\""),
            ("site in (a", "'(' without ')'"),
            ("site)", "')' without '('"),
            ("role=gw,,x", "empty requirement"),
            ("role=g w", "label value"),
            ("-x=1", "label key"),
            ("site in ()", "at least one value"),
            ("site like (a)", "expected key=value"),
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_selector_is_stored_as_a_table_when_it_is_one() {
        let t = Selector::from_labels(&labels(&[("role", "gw"), ("site", "a")]));
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"role":"gw","site":"a"}"#);
        let back: Selector = serde_json::from_str(r#"{"role":"gw","site":"a"}"#).unwrap();
        assert_eq!(back, t);
        let text = Selector::parse("site in (a,b)").unwrap();
        assert_eq!(serde_json::to_string(&text).unwrap(), r#""site in (a,b)""#);
        assert_eq!(serde_json::from_str::<Selector>(r#""site in (a,b)""#).unwrap(), text);
        // Equalities written out of key order, or twice, stay text.
        let odd = Selector::parse("site=a,role=gw").unwrap();
        assert_eq!(serde_json::from_str::<Selector>(&serde_json::to_string(&odd).unwrap()).unwrap(), odd);
    }

    #[test]
    fn replicas_are_a_number_or_per_node() {
        assert_eq!(serde_json::to_string(&Replicas::Count(3)).unwrap(), "3");
        assert_eq!(serde_json::to_string(&Replicas::PerNode).unwrap(), r#""per-node""#);
        assert_eq!(serde_json::from_str::<Replicas>("2").unwrap(), Replicas::Count(2));
        assert_eq!(serde_json::from_str::<Replicas>(r#""per-node""#).unwrap(), Replicas::PerNode);
        assert!(serde_json::from_str::<Replicas>(r#""all""#).is_err());
    }

    #[test]
    fn taints_change_as_kubectl_taint_does_and_tolerations_match() {
        let mut taints = Vec::new();
        let set = |s| TaintChange::parse(s).unwrap();
        assert!(set("dedicated=gw:NoSchedule").apply(&mut taints));
        assert!(set("dedicated=db:NoSchedule").apply(&mut taints), "same key and effect: the value changes");
        assert!(set("flaky:NoExecute").apply(&mut taints));
        assert!(set("dedicated=gw:PreferNoSchedule").apply(&mut taints));
        let shown: Vec<String> = taints.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["dedicated=db:NoSchedule", "dedicated=gw:PreferNoSchedule", "flaky:NoExecute"]);
        assert!(set("dedicated:PreferNoSchedule-").apply(&mut taints));
        assert!(!set("nothing-").apply(&mut taints), "removing what is not there changes nothing");
        assert_eq!(taints.len(), 2);

        let tol = |key: &str, exists: bool, value: &str, effect: Option<TaintEffect>| Toleration {
            key: key.into(),
            operator: if exists { TolerationOp::Exists } else { TolerationOp::Equal },
            value: value.into(),
            effect,
        };
        let db = &taints[0];
        assert!(tol("dedicated", false, "db", None).tolerates(db));
        assert!(!tol("dedicated", false, "gw", None).tolerates(db));
        assert!(tol("dedicated", true, "", Some(TaintEffect::NoSchedule)).tolerates(db));
        assert!(!tol("dedicated", true, "", Some(TaintEffect::NoExecute)).tolerates(db));
        assert!(tol("", true, "", None).tolerates(db), "an empty key with exists tolerates everything");
        let all = [TaintEffect::NoSchedule, TaintEffect::NoExecute];
        assert_eq!(
            untolerated(&[], &taints, &all).map(ToString::to_string).as_deref(),
            Some("dedicated=db:NoSchedule")
        );
        assert_eq!(
            untolerated(&[tol("dedicated", true, "", None)], &taints, &all).map(ToString::to_string).as_deref(),
            Some("flaky:NoExecute")
        );
        assert_eq!(untolerated(&[], &taints, &[TaintEffect::PreferNoSchedule]), None);

        for (bad, says) in [
            ("dedicated=gw", "expected key[=value]:effect"),
            ("dedicated=gw:Never", "unknown effect \"Never\""),
            ("bad key:NoSchedule", "label key"),
            ("k=v v:NoSchedule", "label value"),
            ("k:Sometimes-", "unknown effect"),
        ] {
            let e = TaintChange::parse(bad).unwrap_err();
            assert!(e.contains(says) && e.contains(bad), "{bad:?}: {e}");
        }
    }
}
