//! `[spec.rollout]`: how a new revision reaches the replicas; and
//! `[spec.node_loss]`: what happens to them when their node is lost.

use serde_json::Value;

use super::{Walker, join, type_name};
use crate::lease::{MIN_RESCHEDULE_AFTER, NodeLossSpec};
use crate::model::{Amount, Millis, Replicas, RolloutSpec};
use crate::names;

impl Walker {
    /// A count from `min`, or a percentage from `min_percent` to 100.
    fn amount(&mut self, v: &Value, path: &str, min: u32, min_percent: u32) -> Option<Amount> {
        let parsed = match v {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).map(Amount::Count),
            Value::String(s) => Amount::parse(s),
            other => {
                self.err(path, format!("expected a number or a percentage (\"25%\"), found {}", type_name(other)));
                return None;
            }
        };
        match parsed {
            Some(Amount::Count(n)) if n >= min => Some(Amount::Count(n)),
            Some(Amount::Percent(p)) if p >= min_percent => Some(Amount::Percent(p)),
            _ => {
                let found = match v {
                    Value::String(s) => format!("{s:?}"),
                    other => other.to_string(),
                };
                self.err(
                    path,
                    format!(
                        "must be a whole number from {min}, or a percentage from {min_percent}% to 100%, found {found}"
                    ),
                );
                None
            }
        }
    }

    pub(super) fn rollout(&mut self, v: &Value, replicas: Option<Replicas>) -> Option<RolloutSpec> {
        const P: &str = "spec.rollout";
        let t = self.table(
            v,
            P,
            &[
                "max_unavailable",
                "max_surge",
                "canary",
                "batch",
                "by_label",
                "min_ready",
                "progress_deadline",
                "auto_rollback",
            ],
        )?;
        let before = self.errors.len();
        let per_node = replicas == Some(Replicas::PerNode);
        for (k, for_per_node) in
            [("max_unavailable", false), ("max_surge", false), ("canary", true), ("batch", true), ("by_label", true)]
        {
            if t.contains_key(k) && replicas.is_some() && for_per_node != per_node {
                let why = if for_per_node {
                    "is for per-node workloads (replicas = \"per-node\"), which roll out in waves"
                } else {
                    "is for counted replicas; a per-node workload rolls out in waves (canary, batch, by_label)"
                };
                self.err(&join(P, k), why);
            }
        }
        let amount = |w: &mut Walker, k: &str, min: u32, min_percent: u32| match t.get(k) {
            None => Some(None),
            Some(x) => w.amount(x, &join(P, k), min, min_percent).map(Some),
        };
        let max_unavailable = amount(self, "max_unavailable", 0, 0);
        let max_surge = amount(self, "max_surge", 0, 0);
        let canary = amount(self, "canary", 1, 1);
        let batch = amount(self, "batch", 1, 1);
        if matches!((max_unavailable, max_surge), (Some(Some(a)), Some(Some(b))) if a.of(100, false) == 0 && b.of(100, true) == 0)
        {
            self.err(&join(P, "max_surge"), "max_unavailable and max_surge cannot both be 0: nothing could be updated");
        }
        let by_label = match t.get("by_label") {
            None => Some(None),
            Some(_) if t.contains_key("batch") => {
                self.err(&join(P, "by_label"), "give batch or by_label, not both");
                None
            }
            Some(x) => self.string(x, &join(P, "by_label")).and_then(|k| match names::check_label_key(k) {
                Ok(()) => Some(Some(k.to_string())),
                Err(e) => {
                    self.err(&join(P, "by_label"), e);
                    None
                }
            }),
        };
        let min_ready = match t.get("min_ready") {
            None => Some(Millis(0)),
            Some(x) => self.duration_in(x, &join(P, "min_ready"), Millis(0), Millis(3_600_000)),
        };
        let progress_deadline = match t.get("progress_deadline") {
            None => Some(RolloutSpec::DEFAULT_DEADLINE),
            Some(x) => self.duration_in(x, &join(P, "progress_deadline"), Millis(1_000), Millis(86_400_000)),
        };
        if let (Some(m), Some(d)) = (min_ready, progress_deadline)
            && m >= d
        {
            self.err(
                &join(P, "progress_deadline"),
                format!("{d} must be longer than min_ready ({m}): no wave could pass"),
            );
        }
        let auto_rollback = match t.get("auto_rollback") {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.err(&join(P, "auto_rollback"), format!("expected true or false, found {}", type_name(other)));
                None
            }
        };
        let spec = RolloutSpec {
            max_unavailable: max_unavailable?,
            max_surge: max_surge?,
            canary: canary?,
            batch: batch?,
            by_label: by_label?,
            min_ready: min_ready?,
            progress_deadline: progress_deadline?,
            auto_rollback: auto_rollback?,
        };
        (self.errors.len() == before).then_some(spec)
    }
}

impl Walker {
    pub(super) fn node_loss(&mut self, v: &Value, replicas: Option<Replicas>) -> Option<NodeLossSpec> {
        const P: &str = "spec.node_loss";
        let t = self.table(v, P, &["reschedule_after", "singleton"])?;
        let reschedule_after = match t.get("reschedule_after") {
            None => Some(None),
            Some(_) if replicas == Some(Replicas::PerNode) => {
                self.err(
                    &join(P, "reschedule_after"),
                    "a per-node workload runs on its node or nowhere: it is never rescheduled",
                );
                None
            }
            Some(x) => {
                self.duration_in(x, &join(P, "reschedule_after"), MIN_RESCHEDULE_AFTER, Millis(86_400_000)).map(Some)
            }
        };
        let singleton = match t.get("singleton") {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.err(&join(P, "singleton"), format!("expected true or false, found {}", type_name(other)));
                None
            }
        };
        if singleton == Some(true) && matches!(replicas, Some(Replicas::Count(n)) if n > 1) {
            self.err(&join(P, "singleton"), "a singleton has one replica: set spec.replicas = 1");
        }
        Some(NodeLossSpec { reschedule_after: reschedule_after?, singleton: singleton? })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::HELLO;
    use crate::manifest::{Origin, parse_json, parse_toml};
    use crate::model::{Amount, Millis};

    #[test]
    fn rollouts_parse_and_round_trip() {
        let per_node = HELLO.replace("replicas = 2", "replicas = \"per-node\"")
            + "[spec.rollout]\ncanary = 1\nbatch = \"25%\"\nmin_ready = \"10s\"\nprogress_deadline = \"5m\"\nauto_rollback = true\n";
        let w = parse_toml(&per_node, Origin::File).unwrap();
        let r = &w.spec.rollout;
        assert_eq!(
            (r.canary, r.batch, r.by_label.as_deref()),
            (Some(Amount::Count(1)), Some(Amount::Percent(25)), None)
        );
        assert_eq!((r.min_ready, r.progress_deadline, r.auto_rollback), (Millis(10_000), Millis(300_000), true));
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(parse_json(&json, Origin::File).unwrap(), w);
        let counted = HELLO.to_string() + "[spec.rollout]\nmax_unavailable = 0\nmax_surge = \"50%\"\n";
        let w = parse_toml(&counted, Origin::File).unwrap();
        assert_eq!(
            (w.spec.rollout.max_unavailable, w.spec.rollout.max_surge),
            (Some(Amount::Count(0)), Some(Amount::Percent(50)))
        );
        let by_site =
            HELLO.replace("replicas = 2", "replicas = \"per-node\"") + "[spec.rollout]\nby_label = \"site\"\n";
        assert_eq!(parse_toml(&by_site, Origin::File).unwrap().spec.rollout.by_label.as_deref(), Some("site"));
        // Without [spec.rollout], nothing is written.
        let plain = parse_toml(HELLO, Origin::File).unwrap();
        assert!(serde_json::to_value(&plain.spec).unwrap().get("rollout").is_none());
    }

    #[test]
    fn node_loss_parses_and_bad_values_are_named() {
        let one = HELLO.replace("replicas = 2", "replicas = 1");
        let m = one.clone() + "[spec.node_loss]\nreschedule_after = \"30s\"\nsingleton = true\n";
        let w = parse_toml(&m, Origin::File).unwrap();
        assert_eq!((w.spec.node_loss.reschedule_after, w.spec.node_loss.singleton), (Some(Millis(30_000)), true));
        assert_eq!(parse_json(&serde_json::to_string(&w).unwrap(), Origin::File).unwrap(), w);
        let bad = HELLO.to_string() + "[spec.node_loss]\nreschedule_after = \"1s\"\nsingleton = true\nnever = 1\n";
        let e = parse_toml(&bad, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.node_loss.never", "spec.node_loss.reschedule_after", "spec.node_loss.singleton"],
            "{e}"
        );
        let per_node =
            HELLO.replace("replicas = 2", "replicas = \"per-node\"") + "[spec.node_loss]\nreschedule_after = \"30s\"\n";
        assert!(parse_toml(&per_node, Origin::File).unwrap_err().0[0].message.contains("never rescheduled"));
    }

    #[test]
    fn bad_rollouts_name_every_problem() {
        let m = HELLO.to_string()
            + "[spec.rollout]\nmax_unavailable = 0\nmax_surge = \"0%\"\ncanary = 0\nbatch = \"150%\"\nby_label = \"site\"\nmin_ready = \"10m\"\nprogress_deadline = \"1m\"\nauto_rollback = \"yes\"\nwaves = 3\n";
        let e = parse_toml(&m, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.rollout.waves",
                "spec.rollout.canary",
                "spec.rollout.batch",
                "spec.rollout.by_label",
                "spec.rollout.canary",
                "spec.rollout.batch",
                "spec.rollout.max_surge",
                "spec.rollout.by_label",
                "spec.rollout.progress_deadline",
                "spec.rollout.auto_rollback",
            ],
            "{e}"
        );
        let per_node = HELLO.replace("replicas = 2", "replicas = \"per-node\"") + "[spec.rollout]\nmax_surge = 1\n";
        let e = parse_toml(&per_node, Origin::File).unwrap_err();
        assert!(e.0[0].path == "spec.rollout.max_surge" && e.0[0].message.contains("waves"), "{e}");
    }
}
