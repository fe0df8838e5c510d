//! What a replica's probes have shown, and what follows from it. Pure: the
//! supervisor runs the probes ([`crate::probe`]) and feeds the results in.
//!
//! The rules are Kubernetes': until the startup probe has passed once, the
//! readiness and liveness results do not count; a replica with a readiness
//! probe is not ready until it passes, and stops being ready after
//! `failure_threshold` failures in a row; `failure_threshold` failures in a
//! row of the startup or liveness probe restart it.
//!
//! Architecture invariant: probes run on the node; the hub hears only
//! changes (ready or not, and the probe's last word when that changed).

use std::collections::BTreeMap;

use edge_api::model::{HealthSpec, Millis, Probe, ProbeCheck, ProbeKind, Runtime, WorkloadSpec};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The startup probe passed (or there is none).
    pub started: bool,
    /// The readiness probe passes (or there is none); see [`Health::serving`].
    pub ready: bool,
    failures: BTreeMap<ProbeKind, u32>,
    /// The last result worth telling: `readiness: HTTP GET /healthz: 503`.
    pub last: Option<String>,
}

/// What the probe results call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Nothing,
    /// Stop the run and restart it (with the usual back-off), saying why.
    Restart(String),
}

impl Health {
    pub fn new(spec: &HealthSpec) -> Self {
        Health {
            started: spec.startup.is_none(),
            ready: spec.readiness.is_none(),
            failures: BTreeMap::new(),
            last: None,
        }
    }

    /// Whether it may get traffic and counts as ready: started, and ready.
    pub fn serving(&self) -> bool {
        self.started && self.ready
    }

    /// Takes one probe's result: `Ok` with what it saw, or `Err` why it failed.
    pub fn record(&mut self, spec: &HealthSpec, kind: ProbeKind, result: Result<String, String>) -> Verdict {
        let probe = match kind {
            ProbeKind::Startup => &spec.startup,
            ProbeKind::Readiness => &spec.readiness,
            ProbeKind::Liveness => &spec.liveness,
        };
        let Some(probe) = probe else { return Verdict::Nothing };
        if (kind == ProbeKind::Startup) == self.started {
            return Verdict::Nothing; // startup is over, or has not passed yet
        }
        let what = &probe.check;
        match result {
            Ok(_) => {
                let failed_before = self.failures.remove(&kind).is_some();
                let passed = format!("{kind}: {what}: passed");
                match kind {
                    ProbeKind::Startup => {
                        self.started = true;
                        self.last = Some(passed);
                    }
                    ProbeKind::Readiness if !self.ready || failed_before => {
                        self.ready = true;
                        self.last = Some(passed);
                    }
                    ProbeKind::Liveness if failed_before => self.last = Some(passed),
                    _ => {}
                }
                Verdict::Nothing
            }
            Err(why) => {
                let n = self.failures.entry(kind).or_insert(0);
                *n += 1;
                let n = *n;
                // The count stops at the threshold, so a probe that keeps
                // failing does not change the status (and resend it) each period.
                let shown = n.min(probe.failure_threshold);
                let text = format!("{kind}: {what}: {why} ({shown} of {} in a row)", probe.failure_threshold);
                self.last = Some(text.clone());
                if n < probe.failure_threshold {
                    return Verdict::Nothing;
                }
                match kind {
                    ProbeKind::Readiness => {
                        self.ready = false;
                        Verdict::Nothing
                    }
                    ProbeKind::Startup | ProbeKind::Liveness => {
                        self.failures.clear();
                        Verdict::Restart(text)
                    }
                }
            }
        }
    }
}

/// Tries of the check of a service without probes before it is restarted.
pub const IMPLICIT_STARTUP_TRIES: u32 = 60;

/// The probes a replica runs: its own, or for a Wasm service without any,
/// a startup check that it instantiates (`HttpService::instantiates`: no
/// request is made, which could have effects), once a second until it does;
/// status and rollouts treat it like any startup probe.
pub fn effective(spec: &WorkloadSpec) -> HealthSpec {
    match (&spec.runtime, &spec.http) {
        (Runtime::Wasm(_), Some(_)) if spec.health.is_empty() => HealthSpec {
            startup: Some(Probe {
                check: ProbeCheck::Instantiates,
                period: Millis(1_000),
                timeout: Millis(5_000),
                failure_threshold: IMPLICIT_STARTUP_TRIES,
            }),
            ..HealthSpec::default()
        },
        _ => spec.health.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::model::{Millis, Probe, ProbeCheck};

    fn probe(threshold: u32) -> Option<Probe> {
        Some(Probe {
            check: ProbeCheck::Http { path: "/healthz".into(), port: None },
            period: Millis(1_000),
            timeout: Millis(100),
            failure_threshold: threshold,
        })
    }

    #[test]
    fn a_probe_that_keeps_failing_says_the_same_thing_each_time() {
        let spec = HealthSpec { readiness: probe(2), ..HealthSpec::default() };
        let mut h = Health::new(&spec);
        h.record(&spec, ProbeKind::Readiness, Ok("200".into()));
        let texts: Vec<String> = (0..5)
            .map(|_| {
                h.record(&spec, ProbeKind::Readiness, Err("503".into()));
                h.last.clone().unwrap()
            })
            .collect();
        assert_eq!(texts[1..].iter().collect::<std::collections::BTreeSet<_>>().len(), 1, "{texts:?}");
        assert_eq!(texts[4], "readiness: HTTP GET /healthz: 503 (2 of 2 in a row)");
        h.record(&spec, ProbeKind::Readiness, Ok("200".into()));
        assert_eq!(h.last.as_deref(), Some("readiness: HTTP GET /healthz: passed"));
    }

    #[test]
    fn without_probes_a_running_replica_is_ready_and_never_restarted() {
        let spec = HealthSpec::default();
        let mut h = Health::new(&spec);
        assert!(h.started && h.ready);
        assert_eq!(h.record(&spec, ProbeKind::Liveness, Err("500".into())), Verdict::Nothing);
        assert!(h.ready && h.last.is_none());
    }

    #[test]
    fn readiness_comes_with_a_pass_and_goes_after_the_threshold() {
        let spec = HealthSpec { readiness: probe(2), ..HealthSpec::default() };
        let mut h = Health::new(&spec);
        assert!(!h.ready, "not ready before the first pass");
        let steps: &[(Result<&str, &str>, bool)] = &[
            (Err("503"), false),
            (Ok("200"), true),
            (Err("503"), true),
            (Ok("200"), true),
            (Err("503"), true),
            (Err("timed out"), false),
            (Ok("200"), true),
        ];
        for (i, (r, ready)) in steps.iter().enumerate() {
            let v = h.record(&spec, ProbeKind::Readiness, r.map(str::to_string).map_err(str::to_string));
            assert_eq!(v, Verdict::Nothing);
            assert_eq!(h.ready, *ready, "step {i}: {r:?}");
        }
        assert_eq!(h.last.as_deref(), Some("readiness: HTTP GET /healthz: passed"));
    }

    #[test]
    fn liveness_restarts_after_the_threshold_and_startup_holds_the_others_back() {
        let spec = HealthSpec { startup: probe(2), liveness: probe(3), ..HealthSpec::default() };
        let mut h = Health::new(&spec);
        assert!(!h.started && h.ready && !h.serving(), "no traffic before startup passed");
        // Liveness does not count before startup passed.
        for _ in 0..5 {
            assert_eq!(h.record(&spec, ProbeKind::Liveness, Err("500".into())), Verdict::Nothing);
        }
        assert_eq!(h.record(&spec, ProbeKind::Startup, Err("refused".into())), Verdict::Nothing);
        assert_eq!(h.record(&spec, ProbeKind::Startup, Ok("200".into())), Verdict::Nothing);
        assert!(h.started && h.serving());
        assert_eq!(h.record(&spec, ProbeKind::Startup, Err("late".into())), Verdict::Nothing, "startup is over");
        assert_eq!(h.record(&spec, ProbeKind::Liveness, Err("500".into())), Verdict::Nothing);
        assert_eq!(h.record(&spec, ProbeKind::Liveness, Ok("200".into())), Verdict::Nothing, "a pass resets");
        assert_eq!(h.record(&spec, ProbeKind::Liveness, Err("500".into())), Verdict::Nothing);
        assert_eq!(h.record(&spec, ProbeKind::Liveness, Err("500".into())), Verdict::Nothing);
        assert_eq!(
            h.record(&spec, ProbeKind::Liveness, Err("500".into())),
            Verdict::Restart("liveness: HTTP GET /healthz: 500 (3 of 3 in a row)".into())
        );
        assert_eq!(h.last.as_deref(), Some("liveness: HTTP GET /healthz: 500 (3 of 3 in a row)"));
        // A startup probe that never passes restarts it too.
        let mut h = Health::new(&spec);
        assert_eq!(h.record(&spec, ProbeKind::Startup, Err("refused".into())), Verdict::Nothing);
        assert!(matches!(h.record(&spec, ProbeKind::Startup, Err("refused".into())), Verdict::Restart(_)));
    }
}
