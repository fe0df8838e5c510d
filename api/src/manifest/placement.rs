//! `spec.replicas` and `[spec.placement]`: how many replicas, and where.

use serde_json::Value;

use super::{MAX_REPLICAS, Walker, join, type_name};
use crate::model::{ARCHES, Placement, Replicas, Selector, TaintEffect, Toleration};
use crate::names;
use crate::placement::TolerationOp;

impl Walker {
    pub(super) fn replicas(&mut self, v: Option<&Value>) -> Option<Replicas> {
        let expected = format!("a whole number from 1 to {MAX_REPLICAS}, or \"{}\"", Replicas::PER_NODE);
        match v {
            None => Some(Replicas::Count(1)),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(r @ 1..=MAX_REPLICAS) => Some(Replicas::Count(r as u32)),
                _ => {
                    self.err("spec.replicas", format!("must be {expected}, found {n}"));
                    None
                }
            },
            Some(Value::String(s)) if s == Replicas::PER_NODE => Some(Replicas::PerNode),
            Some(other) => {
                let found = match other {
                    Value::String(s) => format!("{s:?}"),
                    other => type_name(other).to_string(),
                };
                self.err("spec.replicas", format!("expected {expected}, found {found}"));
                None
            }
        }
    }

    pub(super) fn placement(&mut self, v: &Value, replicas: Option<Replicas>) -> Option<Placement> {
        const P: &str = "spec.placement";
        let t = self.table(v, P, &["arch", "node_selector", "spread", "anti_affinity", "tolerations"])?;
        let arch = match t.get("arch") {
            None => Some(Vec::new()),
            Some(a) => self.string_list(a, "spec.placement.arch").and_then(|list| {
                let before = self.errors.len();
                for (i, a) in list.iter().enumerate() {
                    if !ARCHES.contains(&a.as_str()) {
                        self.err(
                            &format!("spec.placement.arch[{i}]"),
                            format!("unknown architecture {a:?} (expected one of: {})", ARCHES.join(", ")),
                        );
                    }
                }
                (self.errors.len() == before).then_some(list)
            }),
        };
        let node_selector = match t.get("node_selector") {
            None => Some(Selector::default()),
            Some(Value::String(s)) => match Selector::parse(s) {
                Ok(sel) => Some(sel),
                Err(e) => {
                    self.err("spec.placement.node_selector", e);
                    None
                }
            },
            Some(s @ Value::Object(_)) => {
                self.labels(s, "spec.placement.node_selector").map(|l| Selector::from_labels(&l))
            }
            Some(other) => {
                self.err(
                    "spec.placement.node_selector",
                    format!(
                        "expected a table of labels ({{ role = \"gw\" }}) or a selector (\"site in (a, b), !legacy\"), found {}",
                        type_name(other)
                    ),
                );
                None
            }
        };
        let spread = match t.get("spread") {
            None => Some(None),
            Some(s) => self.string(s, "spec.placement.spread").and_then(|k| {
                if replicas == Some(Replicas::PerNode) {
                    self.err(
                        "spec.placement.spread",
                        "spreads counted replicas; a per-node workload runs on every node it selects",
                    );
                    return None;
                }
                match names::check_label_key(k) {
                    Ok(()) => Some(Some(k.to_string())),
                    Err(e) => {
                        self.err("spec.placement.spread", e);
                        None
                    }
                }
            }),
        };
        let anti_affinity = match t.get("anti_affinity") {
            None => Some(Vec::new()),
            Some(a) => self.string_list(a, "spec.placement.anti_affinity").and_then(|list| {
                let before = self.errors.len();
                for (i, n) in list.iter().enumerate() {
                    if let Err(e) = names::check_name(n) {
                        self.err(&format!("spec.placement.anti_affinity[{i}]"), format!("{e} (name a workload)"));
                    }
                }
                (self.errors.len() == before).then_some(list)
            }),
        };
        let tolerations = match t.get("tolerations") {
            None => Some(Vec::new()),
            Some(Value::Array(items)) => {
                let parsed: Vec<Option<Toleration>> = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.toleration(v, &format!("{P}.tolerations[{i}]")))
                    .collect();
                parsed.into_iter().collect()
            }
            Some(other) => {
                self.err(
                    "spec.placement.tolerations",
                    format!("expected an array of tables, found {}", type_name(other)),
                );
                None
            }
        };
        Some(Placement {
            arch: arch?,
            node_selector: node_selector?,
            spread: spread?,
            anti_affinity: anti_affinity?,
            tolerations: tolerations?,
        })
    }

    /// `{ key = "dedicated", value = "gw", effect = "NoSchedule" }`, or
    /// `{ key = "flaky", operator = "Exists" }`.
    fn toleration(&mut self, v: &Value, path: &str) -> Option<Toleration> {
        let t = self.table(v, path, &["key", "operator", "value", "effect"])?;
        let before = self.errors.len();
        let text =
            |w: &mut Walker, k: &str| t.get(k).and_then(|x| w.string(x, &join(path, k))).unwrap_or("").to_string();
        let (key, op, value, effect) =
            (text(self, "key"), text(self, "operator"), text(self, "value"), text(self, "effect"));
        let operator = match op.as_str() {
            "" | "Equal" => TolerationOp::Equal,
            "Exists" => TolerationOp::Exists,
            other => {
                self.err(&join(path, "operator"), format!("unknown operator {other:?} (expected Equal or Exists)"));
                TolerationOp::Equal
            }
        };
        if key.is_empty() && operator != TolerationOp::Exists {
            self.err(&join(path, "key"), "required, unless operator = \"Exists\" (which then tolerates every taint)");
        } else if let (false, Err(e)) = (key.is_empty(), names::check_label_key(&key)) {
            self.err(&join(path, "key"), e);
        }
        if operator == TolerationOp::Exists && !value.is_empty() {
            self.err(&join(path, "value"), "operator = \"Exists\" matches any value: leave value out");
        } else if let Err(e) = names::check_label_value(&value) {
            self.err(&join(path, "value"), e);
        }
        let effect = match effect.as_str() {
            "" => None,
            e => match TaintEffect::parse(e) {
                Some(e) => Some(e),
                None => {
                    self.err(
                        &join(path, "effect"),
                        format!("unknown effect {e:?} (expected one of: {})", TaintEffect::NAMES.join(", ")),
                    );
                    None
                }
            },
        };
        (self.errors.len() == before).then_some(Toleration { key, operator, value, effect })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::HELLO;
    use crate::manifest::{Origin, parse_json, parse_toml};
    use crate::model::{Replicas, TaintEffect, Toleration};
    use crate::placement::TolerationOp;

    const PER_NODE: &str = r#"
api_version = "edge/v1"
kind = "Workload"
[metadata]
name = "collector"
[spec]
replicas = "per-node"
[spec.wasm]
component = "collector.wasm"
[spec.placement]
node_selector = "role=gw, site in (a, b), !legacy"
anti_affinity = ["db"]
tolerations = [{ key = "dedicated", value = "gw", effect = "NoSchedule" }, { key = "flaky", operator = "Exists" }]
"#;

    #[test]
    fn per_node_workloads_with_selectors_and_tolerations_parse_and_round_trip() {
        let w = parse_toml(PER_NODE, Origin::File).unwrap();
        assert_eq!(w.spec.replicas, Replicas::PerNode);
        let p = &w.spec.placement;
        assert_eq!(p.node_selector.to_string(), "role=gw,site in (a,b),!legacy");
        assert_eq!(p.anti_affinity, ["db"]);
        assert_eq!(
            p.tolerations,
            [
                Toleration {
                    key: "dedicated".into(),
                    operator: TolerationOp::Equal,
                    value: "gw".into(),
                    effect: Some(TaintEffect::NoSchedule)
                },
                Toleration { key: "flaky".into(), operator: TolerationOp::Exists, value: String::new(), effect: None },
            ]
        );
        let json = serde_json::to_string(&w).unwrap();
        assert!(json.contains(r#""replicas":"per-node""#), "{json}");
        assert_eq!(parse_json(&json, Origin::File).unwrap(), w, "what get -o json prints applies again");
        // A table selector stays a table.
        let counted = parse_toml(HELLO, Origin::File).unwrap();
        let json = serde_json::to_value(&counted.spec).unwrap();
        assert_eq!(json["placement"]["node_selector"]["site"], "plant-1");
        assert_eq!(json["replicas"], 2);
        let spread = HELLO.replace("[spec.placement]\n", "[spec.placement]\nspread = \"site\"\n");
        assert_eq!(parse_toml(&spread, Origin::File).unwrap().spec.placement.spread.as_deref(), Some("site"));
    }

    #[test]
    fn bad_placements_name_every_problem() {
        let m = PER_NODE
            .replace("replicas = \"per-node\"", "replicas = \"per-node\"\n")
            .replace("node_selector = \"role=gw, site in (a, b), !legacy\"", "node_selector = \"site in a\"\nspread = \"site\"")
            .replace("anti_affinity = [\"db\"]", "anti_affinity = [\"DB!\"]")
            .replace(
                "{ key = \"flaky\", operator = \"Exists\" }",
                "{ operator = \"Equal\" }, { key = \"x\", operator = \"Exists\", value = \"y\" }, { key = \"z\", operator = \"Maybe\", effect = \"Never\" }",
            );
        let e = parse_toml(&m, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.placement.node_selector",
                "spec.placement.spread",
                "spec.placement.anti_affinity[0]",
                "spec.placement.tolerations[1].key",
                "spec.placement.tolerations[2].value",
                "spec.placement.tolerations[3].operator",
                "spec.placement.tolerations[3].effect",
            ],
            "{e}"
        );
        for (replicas, says) in [("0", "found 0"), ("\"all\"", "found \"all\""), ("true", "found a boolean")] {
            let m = HELLO.replace("replicas = 2", &format!("replicas = {replicas}"));
            let e = parse_toml(&m, Origin::File).unwrap_err();
            assert_eq!(e.0[0].path, "spec.replicas");
            assert!(e.0[0].message.contains(says) && e.0[0].message.contains("per-node"), "{e}");
        }
    }
}
