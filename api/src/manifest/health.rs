//! `[spec.health]`: the startup, readiness and liveness probes.

use serde_json::Value;

use super::{Walker, join};
use crate::model::{ContainerNetwork, HealthSpec, Millis, Probe, ProbeCheck, Runtime};

impl Walker {
    /// `service`: the workload has `[spec.http]`.
    pub(super) fn health(&mut self, v: &Value, runtime: Option<&Runtime>, service: bool) -> Option<HealthSpec> {
        let t = self.table(v, "spec.health", &["startup", "readiness", "liveness"])?;
        let mut probe = |name: &str| match t.get(name) {
            None => Some(None),
            Some(p) => self.probe(p, &format!("spec.health.{name}"), runtime, service).map(Some),
        };
        let (startup, readiness, liveness) = (probe("startup"), probe("readiness"), probe("liveness"));
        Some(HealthSpec { startup: startup?, readiness: readiness?, liveness: liveness? })
    }

    fn probe(&mut self, v: &Value, path: &str, runtime: Option<&Runtime>, service: bool) -> Option<Probe> {
        let t = self.table(v, path, &["http", "tcp", "command", "period", "timeout", "failure_threshold"])?;
        let container = match runtime {
            Some(Runtime::Container(c)) => Some(c),
            _ => None,
        };
        // A Wasm command (no [spec.http]) has nothing to ask over HTTP or TCP.
        let wasm_command = container.is_none() && !service;
        let given: Vec<&str> = ["http", "tcp", "command"].into_iter().filter(|k| t.contains_key(*k)).collect();
        if let (true, ["http"] | ["tcp"]) = (wasm_command, given.as_slice()) {
            self.err(
                &join(path, given[0]),
                "a Wasm component without [spec.http] serves nothing to ask: probe it with command = [ARGS...] (the component run with these arguments)",
            );
            return None;
        }
        // HTTP and TCP probes reach a container at its address, which it has
        // on a network, and which the agent learns with spec.container.port.
        if let (Some(c), ["http"] | ["tcp"]) = (container, given.as_slice()) {
            if c.network == ContainerNetwork::None {
                self.err(
                    &join(path, given[0]),
                    "network = \"none\" leaves the container unreachable; probe it with command",
                );
            } else if c.port.is_none() {
                self.err(
                    &join(path, given[0]),
                    "needs spec.container.port: the probe reaches the container at its address, known from its port",
                );
            }
        }
        let check = match given.as_slice() {
            ["http"] => {
                let p = format!("{path}.http");
                self.table(&t["http"], &p, &["path", "port"]).and_then(|h| {
                    let probe_path = self.required(h, &p, "path").and_then(|x| self.string(x, &join(&p, "path")));
                    let probe_path = probe_path.and_then(|x| {
                        let ok = x.starts_with('/') && x.len() <= 1024 && !x.chars().any(char::is_control);
                        if !ok {
                            self.err(&join(&p, "path"), format!("{x:?} must be a path starting with /"));
                        }
                        ok.then(|| x.to_string())
                    });
                    let port = match h.get("port") {
                        None => Some(None),
                        Some(_) if container.is_none() => {
                            self.err(&join(&p, "port"), "a Wasm service is probed in process: it has no port");
                            None
                        }
                        Some(x) => self.number_in(x, &join(&p, "port"), 1, 65535).map(|n| Some(n as u16)),
                    };
                    Some(ProbeCheck::Http { path: probe_path?, port: port? })
                })
            }
            ["tcp"] => {
                let p = format!("{path}.tcp");
                if container.is_none() {
                    self.err(&p, "TCP probes are for containers; probe a Wasm service with http");
                    None
                } else {
                    self.number_in(&t["tcp"], &p, 1, 65535).map(|n| ProbeCheck::Tcp(n as u16))
                }
            }
            // In a container: the program and its arguments, run inside it.
            // For a Wasm component: the arguments it is run with (argv[0]
            // is the workload's name, as for spec.wasm.args); none is fine.
            ["command"] => {
                let p = format!("{path}.command");
                self.string_list(&t["command"], &p).and_then(|argv| {
                    if argv.is_empty() && container.is_some() {
                        self.err(&p, "must name the program to run");
                        None
                    } else if argv.len() > 64 || argv.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
                        self.err(&p, "at most 64 arguments of at most 4096 bytes each, without NUL");
                        None
                    } else {
                        Some(ProbeCheck::Command(argv))
                    }
                })
            }
            [] => {
                self.err(path, "say what to check: http = { path = \"/healthz\" }, tcp = PORT or command = [...]");
                None
            }
            _ => {
                self.err(path, format!("give one of http, tcp or command, not {}", given.join(" and ")));
                None
            }
        };
        let period = match t.get("period") {
            None => Some(Probe::DEFAULT_PERIOD),
            Some(x) => self.duration_in(x, &join(path, "period"), Millis(500), Millis(3_600_000)),
        };
        let timeout = match t.get("timeout") {
            None => Some(Probe::DEFAULT_TIMEOUT),
            Some(x) => self.duration_in(x, &join(path, "timeout"), Millis(100), Millis(600_000)),
        };
        if let (Some(p), Some(to)) = (period, timeout)
            && to > p
        {
            self.err(&join(path, "timeout"), format!("{to} is longer than the period ({p}): probes would overlap"));
        }
        let failure_threshold = match t.get("failure_threshold") {
            None => Some(Probe::DEFAULT_FAILURE_THRESHOLD),
            Some(x) => self.number_in(x, &join(path, "failure_threshold"), 1, 100).map(|n| n as u32),
        };
        Some(Probe { check: check?, period: period?, timeout: timeout?, failure_threshold: failure_threshold? })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{CONTAINER, HELLO};
    use crate::manifest::{Origin, parse_toml};
    use crate::model::{Millis, Probe, ProbeCheck, WorkloadSpec};

    #[test]
    fn health_probes_parse_with_defaults_and_round_trip() {
        let m = format!(
            "{HELLO}[spec.http]\npaths = [\"/\"]\n[spec.health.readiness]\nhttp = {{ path = \"/healthz\" }}\nperiod = \"2s\"\ntimeout = \"1s\"\nfailure_threshold = 3\n[spec.health.liveness]\nhttp = {{ path = \"/\" }}\n"
        );
        let w = parse_toml(&m, Origin::File).unwrap();
        let r = w.spec.health.readiness.clone().unwrap();
        assert_eq!(r.check, ProbeCheck::Http { path: "/healthz".into(), port: None });
        assert_eq!((r.period, r.timeout, r.failure_threshold), (Millis(2_000), Millis(1_000), 3));
        let l = w.spec.health.liveness.clone().unwrap();
        assert_eq!((l.period, l.timeout, l.failure_threshold), (Probe::DEFAULT_PERIOD, Probe::DEFAULT_TIMEOUT, 3));
        assert!(w.spec.health.startup.is_none());
        let json = serde_json::to_value(&w.spec).unwrap();
        assert_eq!(json["health"]["readiness"]["http"]["path"], "/healthz");
        assert_eq!(json["health"]["readiness"]["period"], "2s");
        let back: WorkloadSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, w.spec);
        // Without [spec.health], nothing is written: old documents stay byte-identical.
        let plain = parse_toml(HELLO, Origin::File).unwrap();
        assert!(serde_json::to_value(&plain.spec).unwrap().get("health").is_none());
        // Containers take tcp, command and http on a port.
        let c = CONTAINER.replace("[spec.container]\n", "[spec.container]\nport = 8080\n")
            + "[spec.health.startup]\ntcp = 8080\n[spec.health.liveness]\ncommand = [\"/bin/check\", \"-q\"]\n[spec.health.readiness]\nhttp = { path = \"/ready\", port = 9090 }\n";
        let w = parse_toml(&c, Origin::File).unwrap();
        assert_eq!(w.spec.health.startup.unwrap().check, ProbeCheck::Tcp(8080));
        assert_eq!(w.spec.health.liveness.unwrap().check, ProbeCheck::Command(vec!["/bin/check".into(), "-q".into()]));
        assert_eq!(
            w.spec.health.readiness.unwrap().check,
            ProbeCheck::Http { path: "/ready".into(), port: Some(9090) }
        );
    }

    #[test]
    fn bad_probes_name_every_problem() {
        let m = format!(
            "{HELLO}[spec.http]\npaths = [\"/\"]\n[spec.health.readiness]\nhttp = {{ path = \"healthz\", port = 80 }}\nperiod = \"1s\"\ntimeout = \"2s\"\nfailure_threshold = 0\n[spec.health.liveness]\ntcp = 80\n[spec.health.startup]\nperiod = \"forever\"\n[spec.health.other]\n"
        );
        let e = parse_toml(&m, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.health.other",
                "spec.health.startup",
                "spec.health.startup.period",
                "spec.health.readiness.http.path",
                "spec.health.readiness.http.port",
                "spec.health.readiness.timeout",
                "spec.health.readiness.failure_threshold",
                "spec.health.liveness.tcp",
            ],
            "{e}"
        );
        let both = format!(
            "{HELLO}[spec.http]\npaths = [\"/\"]\n[spec.health.liveness]\ntcp = 80\nhttp = {{ path = \"/\" }}\n"
        );
        let e = parse_toml(&both, Origin::File).unwrap_err();
        assert!(e.0[0].message.contains("not http and tcp"), "{e}");
        let portless = format!("{CONTAINER}[spec.health.liveness]\nhttp = {{ path = \"/\" }}\n");
        let e = parse_toml(&portless, Origin::File).unwrap_err();
        assert_eq!(e.0[0].path, "spec.health.liveness.http", "{e}");
        assert!(e.0[0].message.contains("needs spec.container.port"), "{e}");
        let unreachable = CONTAINER.replace("[spec.container]\n", "[spec.container]\nport = 80\nnetwork = \"none\"\n")
            + "[spec.health.liveness]\ntcp = 80\n";
        let e = parse_toml(&unreachable, Origin::File).unwrap_err();
        assert!(e.0[0].path == "spec.health.liveness.tcp" && e.0[0].message.contains("unreachable"), "{e}");
        // A Wasm command serves nothing: only command probes.
        for check in ["http = { path = \"/\" }", "tcp = 80"] {
            let command = format!("{HELLO}[spec.health.liveness]\n{check}\n");
            let e = parse_toml(&command, Origin::File).unwrap_err();
            let kind = check.split(' ').next().unwrap();
            assert_eq!(e.0[0].path, format!("spec.health.liveness.{kind}"), "{e}");
            assert!(e.0[0].message.contains("probe it with command"), "{e}");
        }
        let many = format!("{HELLO}[spec.health.liveness]\ncommand = [{}]\n", vec!["\"-v\""; 65].join(", "));
        let e = parse_toml(&many, Origin::File).unwrap_err();
        assert!(e.0[0].path == "spec.health.liveness.command" && e.0[0].message.contains("at most 64"), "{e}");
    }

    #[test]
    fn wasm_components_are_probed_by_running_them_as_commands() {
        // A long-running Wasm command: its component, run with these arguments.
        let m = format!(
            "{HELLO}[spec.health.liveness]\ncommand = [\"--check\", \"sensor\"]\n[spec.health.readiness]\ncommand = []\n"
        );
        let w = parse_toml(&m, Origin::File).unwrap();
        // Room for the replica and one probe instance beside it.
        assert_eq!(w.spec.reserved().memory.0, 2 * w.spec.resources.memory.0);
        assert_eq!(parse_toml(HELLO, Origin::File).unwrap().spec.reserved().memory, w.spec.resources.memory);
        assert_eq!(w.spec.health.liveness.unwrap().check, ProbeCheck::Command(vec!["--check".into(), "sensor".into()]));
        assert_eq!(w.spec.health.readiness.unwrap().check, ProbeCheck::Command(vec![]));
        // A service too (if its component also exports wasi:cli/run).
        let m = format!("{HELLO}[spec.http]\npaths = [\"/\"]\n[spec.health.readiness]\ncommand = [\"--ready\"]\n");
        let w = parse_toml(&m, Origin::File).unwrap();
        assert_eq!(w.spec.health.readiness.unwrap().check, ProbeCheck::Command(vec!["--ready".into()]));
        // A container needs the program.
        let e = parse_toml(&format!("{CONTAINER}[spec.health.liveness]\ncommand = []\n"), Origin::File).unwrap_err();
        assert!(e.0[0].message.contains("must name the program"), "{e}");
    }
}
