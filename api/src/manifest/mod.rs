//! Manifest parsing and validation.
//!
//! A manifest is TOML (or the equivalent JSON, which is what `edgectl get -o
//! json` prints, so its output can be applied again). Validation walks the
//! document by hand rather than through serde so that it can report every
//! problem at once, each with its field path, instead of stopping at the first.
//!
//! ```toml
//! api_version = "edge/v1"
//! kind = "Workload"
//! [metadata]
//! name = "hello"
//! [spec]
//! restart = "on-failure"
//! [spec.wasm]
//! component = "hello.wasm"
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::model::{
    ArtifactRef, ContainerNetwork, ContainerSpec, Env, EnvValue, HealthSpec, HttpSpec, ImagePlatform, Labels, Metadata,
    Millis, Placement, Resources, RestartPolicy, Runtime, Secret, SecretKeyRef, SecretMetadata, SecretMount, WasmSpec,
    Workload, WorkloadSpec,
};
use crate::names;

mod health;
mod placement;
mod rollout;
use crate::quantity::{Cpu, Memory};

/// One problem, with the dotted path of the field it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// Every problem found in one manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<FieldError>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems:", all.len())?;
                for e in all {
                    write!(f, "\n  - {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Invalid {}

/// Where a manifest comes from, which decides what a component may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A file on the user's machine: a component may be a path relative to it.
    File,
    /// The hub API: every component must already be a digest.
    Api,
}

/// Upper bound on replicas: far above any single-site fleet, low enough that a
/// typo (`replicas = 10000000`) is caught rather than scheduled.
pub const MAX_REPLICAS: u64 = 10_000;

/// Upper bound on a service's concurrency.
pub const MAX_INSTANCES: u64 = 1_000;

fn short(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_string(),
    }
}

/// Largest value of one secret key.
pub const MAX_SECRET_VALUE: usize = 64 * 1024;
/// Largest secret, all values together.
pub const MAX_SECRET_BYTES: usize = 256 * 1024;
/// Most keys in one secret.
pub const MAX_SECRET_KEYS: usize = 128;

/// What a manifest file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Workload(Box<Workload>),
    Secret(Secret),
}

impl Document {
    pub fn name(&self) -> &str {
        match self {
            Document::Workload(w) => &w.metadata.name,
            Document::Secret(s) => &s.metadata.name,
        }
    }

    /// `workload` or `secret`, as edgectl names the kinds.
    pub fn kind(&self) -> &'static str {
        match self {
            Document::Workload(_) => "workload",
            Document::Secret(_) => "secret",
        }
    }
}

fn toml_value(text: &str) -> Result<Value, Invalid> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        // Where, and what: never the line itself, which may hold a secret's value.
        let at = e.span().map(|s| {
            let before = &text[..s.start.min(text.len())];
            format!(
                " at line {}, column {}",
                before.matches('\n').count() + 1,
                before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1
            )
        });
        Invalid(vec![FieldError {
            path: String::new(),
            message: format!("not valid TOML{}: {}", at.unwrap_or_default(), e.message().trim_end()),
        }])
    })?;
    serde_json::to_value(table)
        .map_err(|e| Invalid(vec![FieldError { path: String::new(), message: format!("unsupported TOML value: {e}") }]))
}

fn json_value(text: &str) -> Result<Value, Invalid> {
    serde_json::from_str(text)
        .map_err(|e| Invalid(vec![FieldError { path: String::new(), message: format!("not valid JSON: {e}") }]))
}

/// Parses and validates a manifest of any kind (TOML or JSON).
pub fn parse_document(text: &str, json: bool, origin: Origin) -> Result<Document, Invalid> {
    let v = if json { json_value(text)? } else { toml_value(text)? };
    match v.get("kind").and_then(Value::as_str) {
        Some("Secret") => parse_secret_value(&v).map(Document::Secret),
        _ => parse_value(&v, origin).map(|w| Document::Workload(Box::new(w))),
    }
}

/// Parses and validates a Secret sent as JSON.
pub fn parse_secret_json(text: &str) -> Result<Secret, Invalid> {
    parse_secret_value(&json_value(text)?)
}

/// Validates a Secret already parsed into a JSON value.
pub fn parse_secret_value(v: &Value) -> Result<Secret, Invalid> {
    let mut w = Walker { errors: Vec::new(), origin: Origin::Api };
    match w.secret(v) {
        Some(s) if w.errors.is_empty() => Ok(s),
        _ => {
            if w.errors.is_empty() {
                w.err("", "invalid secret");
            }
            Err(Invalid(w.errors))
        }
    }
}

/// Secret keys become file names: `[A-Za-z0-9._-]`, 1–253 characters, not `.` or `..`.
pub fn check_secret_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= 253
        && k != "."
        && k != ".."
        && k.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(format!("{k:?} is not a valid key: use 1-253 of [A-Za-z0-9._-] (not . or ..)")) }
}

/// Parses and validates a TOML manifest.
pub fn parse_toml(text: &str, origin: Origin) -> Result<Workload, Invalid> {
    parse_value(&toml_value(text)?, origin)
}

/// Parses and validates a JSON manifest.
pub fn parse_json(text: &str, origin: Origin) -> Result<Workload, Invalid> {
    parse_value(&json_value(text)?, origin)
}

/// Validates a manifest already parsed into a JSON value.
pub fn parse_value(v: &Value, origin: Origin) -> Result<Workload, Invalid> {
    let mut w = Walker { errors: Vec::new(), origin };
    let workload = w.workload(v);
    match workload {
        Some(wl) if w.errors.is_empty() => Ok(wl),
        _ => {
            if w.errors.is_empty() {
                // Defensive: every `None` above records an error first.
                w.err("", "invalid manifest");
            }
            Err(Invalid(w.errors))
        }
    }
}

struct Walker {
    errors: Vec<FieldError>,
    origin: Origin,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// Levenshtein distance, for "did you mean" hints on misspelt fields.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Walker {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(FieldError { path: path.to_string(), message: message.into() });
    }

    /// Checks that `v` is a table with no keys outside `allowed`.
    fn table<'v>(&mut self, v: &'v Value, path: &str, allowed: &[&str]) -> Option<&'v Map<String, Value>> {
        let Value::Object(map) = v else {
            self.err(path, format!("expected a table, found {}", type_name(v)));
            return None;
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                let hint = allowed
                    .iter()
                    .filter(|a| distance(a, key) <= 2)
                    .min_by_key(|a| distance(a, key))
                    .map(|a| format!("; did you mean `{a}`?"))
                    .unwrap_or_default();
                self.err(&join(path, key), format!("unknown field (expected one of: {}){hint}", allowed.join(", ")));
            }
        }
        Some(map)
    }

    fn required<'v>(&mut self, t: &'v Map<String, Value>, path: &str, key: &str) -> Option<&'v Value> {
        let v = t.get(key);
        if v.is_none() {
            self.err(&join(path, key), "required field is missing");
        }
        v
    }

    fn string<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v str> {
        match v {
            Value::String(s) => Some(s),
            other => {
                self.err(path, format!("expected a string, found {}", type_name(other)));
                None
            }
        }
    }

    /// A duration from `min` to `max` (inclusive), written as `500ms`, `5s`, `2m`.
    fn duration_in(&mut self, v: &Value, path: &str, min: Millis, max: Millis) -> Option<Millis> {
        let s = self.string(v, path)?;
        match crate::time::parse_duration(s) {
            Ok(d) if (min.0 as u128..=max.0 as u128).contains(&d.as_millis()) => Some(Millis(d.as_millis() as u64)),
            Ok(_) => {
                self.err(path, format!("{s:?} must be from {min} to {max}"));
                None
            }
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    /// A whole number from `min` to `max`.
    fn number_in(&mut self, v: &Value, path: &str, min: u64, max: u64) -> Option<u64> {
        match v {
            Value::Number(n) => match n.as_u64().filter(|n| (min..=max).contains(n)) {
                Some(n) => Some(n),
                None => {
                    self.err(path, format!("must be a whole number from {min} to {max}, found {n}"));
                    None
                }
            },
            other => {
                self.err(path, format!("expected a whole number, found {}", type_name(other)));
                None
            }
        }
    }

    fn string_list(&mut self, v: &Value, path: &str) -> Option<Vec<String>> {
        let Value::Array(items) = v else {
            self.err(path, format!("expected an array of strings, found {}", type_name(v)));
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(item, &format!("{path}[{i}]")) {
                Some(s) => out.push(s.to_string()),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn string_map(&mut self, v: &Value, path: &str) -> Option<BTreeMap<String, String>> {
        let Value::Object(map) = v else {
            self.err(path, format!("expected a table of strings, found {}", type_name(v)));
            return None;
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (k, item) in map {
            match self.string(item, &join(path, k)) {
                Some(s) => {
                    out.insert(k.clone(), s.to_string());
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn labels(&mut self, v: &Value, path: &str) -> Option<Labels> {
        let map = self.string_map(v, path)?;
        let before = self.errors.len();
        for (k, val) in &map {
            if let Err(e) = names::check_label_key(k) {
                self.err(&join(path, k), e);
            }
            if let Err(e) = names::check_label_value(val) {
                self.err(&join(path, k), e);
            }
        }
        (self.errors.len() == before).then_some(map)
    }

    fn workload(&mut self, v: &Value) -> Option<Workload> {
        let top = self.table(v, "", &["api_version", "kind", "metadata", "spec", "status", "events"])?;
        if let Some(av) = self.required(top, "", "api_version")
            && let Some(av) = self.string(av, "api_version")
            && av != crate::API_VERSION
        {
            let msg = if av.starts_with("edge/") {
                format!("{av:?} is not supported by this version (it understands {:?})", crate::API_VERSION)
            } else {
                format!("expected {:?}, found {av:?}", crate::API_VERSION)
            };
            self.err("api_version", msg);
        }
        if let Some(kind) = self.required(top, "", "kind")
            && let Some(kind) = self.string(kind, "kind")
            && kind != "Workload"
        {
            self.err("kind", format!("unknown kind {kind:?} (expected \"Workload\" or \"Secret\")"));
        }
        let metadata = self.required(top, "", "metadata").and_then(|m| self.metadata(m));
        let spec = self.required(top, "", "spec").and_then(|s| self.spec(s));
        Some(Workload {
            api_version: crate::API_VERSION.to_string(),
            kind: "Workload".to_string(),
            metadata: metadata?,
            spec: spec?,
        })
    }

    fn metadata(&mut self, v: &Value) -> Option<Metadata> {
        // uid, generation and created_ms are set by the hub; they are accepted
        // (so `get -o json` output can be applied again) and then ignored.
        let (name, labels) = self.name_and_labels(v, &["name", "labels", "uid", "generation", "created_ms"])?;
        Some(Metadata { name, labels, ..Metadata::default() })
    }

    /// `metadata.name` (a DNS label) and `metadata.labels`, with no keys but `allowed`.
    fn name_and_labels(&mut self, v: &Value, allowed: &[&str]) -> Option<(String, Labels)> {
        let t = self.table(v, "metadata", allowed)?;
        let name = self.required(t, "metadata", "name").and_then(|n| self.string(n, "metadata.name"));
        if let Some(n) = name
            && let Err(e) = names::check_name(n)
        {
            self.err("metadata.name", e);
        }
        let labels = match t.get("labels") {
            Some(l) => self.labels(l, "metadata.labels"),
            None => Some(Labels::new()),
        };
        Some((name?.to_string(), labels?))
    }

    fn spec(&mut self, v: &Value) -> Option<WorkloadSpec> {
        let t = self.table(
            v,
            "spec",
            &[
                "replicas",
                "restart",
                "resources",
                "placement",
                "wasm",
                "http",
                "container",
                "health",
                "rerun_interrupted",
                "rollout",
                "node_loss",
            ],
        )?;
        let replicas = self.replicas(t.get("replicas"));
        let node_loss = match t.get("node_loss") {
            None => Some(crate::model::NodeLossSpec::default()),
            Some(n) => self.node_loss(n, replicas),
        };
        let rollout = match t.get("rollout") {
            None => Some(crate::model::RolloutSpec::standard()),
            Some(r) => self.rollout(r, replicas),
        };
        let restart = match t.get("restart") {
            None => Some(RestartPolicy::default()),
            Some(r) => self.string(r, "spec.restart").and_then(|s| {
                let p = RestartPolicy::parse(s);
                if p.is_none() {
                    self.err(
                        "spec.restart",
                        format!("unknown restart policy {s:?} (expected one of: {})", RestartPolicy::NAMES.join(", ")),
                    );
                }
                p
            }),
        };
        let resources = match t.get("resources") {
            None => Some(Resources::default()),
            Some(r) => self.resources(r),
        };
        let placement = match t.get("placement") {
            None => Some(Placement::default()),
            Some(p) => self.placement(p, replicas),
        };
        let runtime = match (t.get("wasm"), t.get("container")) {
            (Some(w), None) => self.wasm(w).map(Runtime::Wasm),
            (None, Some(c)) => self.container(c).map(Runtime::Container),
            (Some(_), Some(_)) => {
                self.err("spec", "give either spec.wasm or spec.container, not both");
                None
            }
            (None, None) => {
                self.err(
                    "spec.wasm",
                    "required: say what to run, e.g. [spec.wasm] component = \"app.wasm\" (or [spec.container] image = \"oci://...\")",
                );
                None
            }
        };
        let http = match t.get("http") {
            None => Some(None),
            Some(h) => self.http(h).map(Some),
        };
        if let (Some(Some(_)), Some(Runtime::Container(c))) = (&http, &runtime) {
            match (c.port, c.network) {
                (None, _) => self.err(
                    "spec.container.port",
                    "required with [spec.http]: the port the container's HTTP server listens on",
                ),
                (Some(_), ContainerNetwork::None) => self.err(
                    "spec.container.network",
                    "\"none\" leaves the container unreachable; [spec.http] needs \"bridge\" (or \"host\")",
                ),
                _ => {}
            }
        }
        let rerun_interrupted = match t.get("rerun_interrupted") {
            None => Some(true),
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.err("spec.rerun_interrupted", format!("expected true or false, found {}", type_name(other)));
                None
            }
        };
        let health = match t.get("health") {
            None => Some(HealthSpec::default()),
            Some(h) => self.health(h, runtime.as_ref(), t.contains_key("http")),
        };
        if let (Some(r), Some(Runtime::Wasm(w))) = (&resources, &runtime)
            && let Some(total) = w.memory_total
            && total.0 < r.memory.0
        {
            self.err(
                "spec.wasm.memory_total",
                format!(
                    "{total} is below spec.resources.memory ({}): one instance could never use its limit",
                    r.memory
                ),
            );
        }
        Some(WorkloadSpec {
            replicas: replicas?,
            restart: restart?,
            resources: resources?,
            placement: placement?,
            runtime: runtime?,
            http: http?,
            health: health?,
            rerun_interrupted: rerun_interrupted?,
            rollout: rollout?,
            node_loss: node_loss?,
        })
    }

    fn resources(&mut self, v: &Value) -> Option<Resources> {
        let t = self.table(v, "spec.resources", &["memory", "cpu"])?;
        let memory = match t.get("memory") {
            None => Some(Resources::DEFAULT_MEMORY),
            Some(m) => self.string(m, "spec.resources.memory").and_then(|s| match s.parse::<Memory>() {
                Ok(m) if m.0 >= 1 << 20 => Some(m),
                Ok(_) => {
                    self.err("spec.resources.memory", format!("{s:?} is too small: a component needs at least 1Mi"));
                    None
                }
                Err(e) => {
                    self.err("spec.resources.memory", e.to_string());
                    None
                }
            }),
        };
        let cpu = match t.get("cpu") {
            None => Some(Resources::DEFAULT_CPU),
            Some(c) => self.string(c, "spec.resources.cpu").and_then(|s| match s.parse::<Cpu>() {
                Ok(c) if c.0 >= 1 => Some(c),
                Ok(_) => {
                    self.err("spec.resources.cpu", format!("{s:?} is zero: give at least 1m"));
                    None
                }
                Err(e) => {
                    self.err("spec.resources.cpu", e.to_string());
                    None
                }
            }),
        };
        Some(Resources { memory: memory?, cpu: cpu? })
    }

    fn wasm(&mut self, v: &Value) -> Option<WasmSpec> {
        let t = self.table(
            v,
            "spec.wasm",
            &[
                "component",
                "args",
                "env",
                "secrets",
                "max_instances",
                "memory_total",
                "cpu_budget",
                "request_timeout",
                "outbound",
                "key_value",
                "source",
            ],
        )?;
        let component = self
            .required(t, "spec.wasm", "component")
            .and_then(|c| self.string(c, "spec.wasm.component"))
            .and_then(|s| self.artifact(s, "spec.wasm.component"));
        let args = self.args(t.get("args"), "spec.wasm.args");
        let env = self.env(t.get("env"), "spec.wasm.env");
        let secrets = self.secret_mounts(t.get("secrets"), "spec.wasm.secrets");
        let max_instances = match t.get("max_instances") {
            None => Some(None),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| (1..=MAX_INSTANCES).contains(&n)) => {
                Some(n.as_u64().map(|n| n as u32))
            }
            Some(other) => {
                self.err(
                    "spec.wasm.max_instances",
                    format!("must be a whole number from 1 to {MAX_INSTANCES}, found {}", short(other)),
                );
                None
            }
        };
        let memory_total = match t.get("memory_total") {
            None => Some(None),
            Some(m) => self.string(m, "spec.wasm.memory_total").and_then(|s| match s.parse::<Memory>() {
                Ok(m) if m.0 >= 1 << 20 => Some(Some(m)),
                Ok(_) => {
                    self.err("spec.wasm.memory_total", format!("{s:?} is below 1Mi"));
                    None
                }
                Err(e) => {
                    self.err("spec.wasm.memory_total", e.to_string());
                    None
                }
            }),
        };
        let cpu_budget = match t.get("cpu_budget") {
            None => Some(None),
            Some(c) => self.duration_in(c, "spec.wasm.cpu_budget", Millis(10), Millis(3_600_000)).map(Some),
        };
        let request_timeout = match t.get("request_timeout") {
            None => Some(None),
            Some(c) => self.duration_in(c, "spec.wasm.request_timeout", Millis(100), Millis(3_600_000)).map(Some),
        };
        let outbound = match t.get("outbound") {
            None => Some(Vec::new()),
            Some(o) => self.string_list(o, "spec.wasm.outbound").and_then(|rules| {
                let before = self.errors.len();
                for (i, r) in rules.iter().enumerate() {
                    if let Err(e) = r.parse::<crate::outbound::Rule>() {
                        self.err(&format!("spec.wasm.outbound[{i}]"), e);
                    }
                }
                (self.errors.len() == before).then_some(rules)
            }),
        };
        let source = match t.get("source") {
            None => Some(None),
            Some(v) => self.string(v, "spec.wasm.source").map(|s| Some(s.chars().take(1024).collect::<String>())),
        };
        let key_value = match t.get("key_value") {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.err("spec.wasm.key_value", format!("expected true or false, found {}", type_name(other)));
                None
            }
        };
        Some(WasmSpec {
            component: component?,
            args: args?,
            env: env?,
            secrets: secrets?,
            max_instances: max_instances?,
            memory_total: memory_total?,
            cpu_budget: cpu_budget?,
            request_timeout: request_timeout?,
            outbound: outbound?,
            key_value: key_value?,
            source: source?,
        })
    }

    /// A list of arguments (no NULs); empty when absent.
    fn args(&mut self, v: Option<&Value>, path: &str) -> Option<Vec<String>> {
        let Some(v) = v else { return Some(Vec::new()) };
        let args = self.string_list(v, path)?;
        let before = self.errors.len();
        for (i, a) in args.iter().enumerate() {
            if a.contains('\0') {
                self.err(&format!("{path}[{i}]"), "must not contain a NUL character");
            }
        }
        (self.errors.len() == before).then_some(args)
    }

    /// Environment variables, each a string or `{ secret, key }`; empty when absent.
    fn env(&mut self, v: Option<&Value>, path: &str) -> Option<Env> {
        let Some(v) = v else { return Some(Env::new()) };
        let Value::Object(map) = v else {
            self.err(path, format!("expected a table of strings or {{ secret, key }}, found {}", type_name(v)));
            return None;
        };
        let before = self.errors.len();
        let mut env = Env::new();
        for (k, val) in map {
            let p = join(path, k);
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                self.err(&p, "variable names must be non-empty and contain no '=' or NUL");
            }
            match val {
                Value::String(s) if s.contains('\0') => self.err(&p, "must not contain a NUL character"),
                Value::String(s) => {
                    env.insert(k.clone(), EnvValue::Text(s.clone()));
                }
                Value::Object(_) => {
                    let Some(t) = self.table(val, &p, &["secret", "key"]) else { continue };
                    let secret = self.required(t, &p, "secret").and_then(|s| self.string(s, &join(&p, "secret")));
                    let key = self.required(t, &p, "key").and_then(|s| self.string(s, &join(&p, "key")));
                    if let Some(s) = secret
                        && let Err(e) = names::check_name(s)
                    {
                        self.err(&join(&p, "secret"), e);
                    }
                    if let Some(k) = key
                        && let Err(e) = check_secret_key(k)
                    {
                        self.err(&join(&p, "key"), e);
                    }
                    if let (Some(secret), Some(key)) = (secret, key) {
                        env.insert(
                            k.clone(),
                            EnvValue::Secret(SecretKeyRef { secret: secret.into(), key: key.into() }),
                        );
                    }
                }
                other => self.err(
                    &p,
                    format!("expected a string or {{ secret = \"NAME\", key = \"KEY\" }}, found {}", type_name(other)),
                ),
            }
        }
        (self.errors.len() == before).then_some(env)
    }

    /// Secrets as read-only directories: `[{ secret, path }]`; empty when absent.
    fn secret_mounts(&mut self, v: Option<&Value>, path: &str) -> Option<Vec<SecretMount>> {
        let Some(v) = v else { return Some(Vec::new()) };
        let Value::Array(items) = v else {
            self.err(path, format!("expected an array of {{ secret, path }}, found {}", type_name(v)));
            return None;
        };
        let before = self.errors.len();
        let mut out: Vec<SecretMount> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(t) = self.table(item, &p, &["secret", "path"]) else { continue };
            let secret = self.required(t, &p, "secret").and_then(|s| self.string(s, &join(&p, "secret")));
            let dest = self.required(t, &p, "path").and_then(|s| self.string(s, &join(&p, "path")));
            if let Some(s) = secret
                && let Err(e) = names::check_name(s)
            {
                self.err(&join(&p, "secret"), e);
            }
            if let Some(d) = dest {
                let bad = !d.starts_with('/')
                    || d == "/"
                    || d.len() > 1024
                    || d.split('/').skip(1).any(|seg| seg.is_empty() || seg == "." || seg == "..")
                    || d.contains(['\0', '\\', ':', ',']);
                if bad {
                    self.err(
                        &join(&p, "path"),
                        format!("{d:?} is not a mount path: use an absolute path such as /run/secrets/db, without . or .. or a trailing /"),
                    );
                } else if out.iter().any(|m| {
                    m.path == d || d.starts_with(&format!("{}/", m.path)) || m.path.starts_with(&format!("{d}/"))
                }) {
                    self.err(&join(&p, "path"), format!("{d:?} overlaps another secret's path"));
                }
            }
            if let (Some(secret), Some(dest)) = (secret, dest) {
                out.push(SecretMount { secret: secret.into(), path: dest.into() });
            }
        }
        (self.errors.len() == before).then_some(out)
    }

    fn secret(&mut self, v: &Value) -> Option<Secret> {
        let top = self.table(v, "", &["api_version", "kind", "metadata", "data"])?;
        if let Some(av) = self.required(top, "", "api_version")
            && let Some(av) = self.string(av, "api_version")
            && av != crate::API_VERSION
        {
            self.err("api_version", format!("expected {:?}, found {av:?}", crate::API_VERSION));
        }
        if let Some(kind) = self.required(top, "", "kind")
            && let Some(kind) = self.string(kind, "kind")
            && kind != "Secret"
        {
            self.err("kind", format!("expected \"Secret\", found {kind:?}"));
        }
        let metadata = self
            .required(top, "", "metadata")
            .and_then(|m| self.name_and_labels(m, &["name", "labels"]))
            .map(|(name, labels)| SecretMetadata { name, labels });
        let data = self.required(top, "", "data").and_then(|d| {
            // Values are never quoted back in errors: only their sizes.
            let Value::Object(map) = d else {
                self.err("data", format!("expected a table of strings, found {}", type_name(d)));
                return None;
            };
            let before = self.errors.len();
            let mut out = BTreeMap::new();
            let mut total = 0usize;
            if map.len() > MAX_SECRET_KEYS {
                self.err("data", format!("has {} keys; at most {MAX_SECRET_KEYS} are allowed", map.len()));
            }
            for (k, val) in map {
                let p = join("data", k);
                if let Err(e) = check_secret_key(k) {
                    self.err(&p, e);
                }
                match val {
                    Value::String(s) if s.len() > MAX_SECRET_VALUE => {
                        self.err(&p, format!("the value has {} bytes; at most {MAX_SECRET_VALUE} are allowed", s.len()))
                    }
                    Value::String(s) => {
                        total += s.len();
                        out.insert(k.clone(), s.clone());
                    }
                    other => self.err(&p, format!("expected a string, found {}", type_name(other))),
                }
            }
            if total > MAX_SECRET_BYTES {
                self.err("data", format!("the values total {total} bytes; at most {MAX_SECRET_BYTES} are allowed"));
            }
            (self.errors.len() == before).then_some(out)
        });
        Some(Secret {
            api_version: crate::API_VERSION.to_string(),
            kind: "Secret".to_string(),
            metadata: metadata?,
            data: data?,
        })
    }

    fn container(&mut self, v: &Value) -> Option<ContainerSpec> {
        let t = self.table(
            v,
            "spec.container",
            &["image", "command", "args", "env", "secrets", "network", "port", "user", "platforms", "source"],
        )?;
        let image = self
            .required(t, "spec.container", "image")
            .and_then(|i| self.string(i, "spec.container.image"))
            .and_then(|s| match s.parse::<crate::oci_ref::Reference>() {
                Ok(r) => Some(r),
                Err(e) => {
                    self.err("spec.container.image", e.to_string());
                    None
                }
            });
        let command = self.args(t.get("command"), "spec.container.command");
        let args = self.args(t.get("args"), "spec.container.args");
        let env = self.env(t.get("env"), "spec.container.env");
        let secrets = self.secret_mounts(t.get("secrets"), "spec.container.secrets");
        let network = match t.get("network") {
            None => Some(ContainerNetwork::Bridge),
            Some(n) => self.string(n, "spec.container.network").and_then(|s| {
                let parsed = ContainerNetwork::parse(s);
                if parsed.is_none() {
                    self.err(
                        "spec.container.network",
                        format!("{s:?} is not one of {}", ContainerNetwork::NAMES.join(", ")),
                    );
                }
                parsed
            }),
        };
        let port = match t.get("port") {
            None => Some(None),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|p| (1..=65535).contains(&p)) => {
                Some(n.as_u64().map(|p| p as u16))
            }
            Some(other) => {
                self.err("spec.container.port", format!("expected a port number 1-65535, found {}", short(other)));
                None
            }
        };
        let user = match t.get("user") {
            None => Some(None),
            Some(u) => self.string(u, "spec.container.user").and_then(|s| {
                let ok = |n: &str| {
                    !n.is_empty() && n.len() <= 10 && n.bytes().all(|c| c.is_ascii_digit()) && n.parse::<u32>().is_ok()
                };
                let valid = match s.split_once(':') {
                    Some((u, g)) => ok(u) && ok(g),
                    None => ok(s),
                };
                if !valid {
                    self.err("spec.container.user", format!("{s:?} is not uid or uid:gid (numbers, e.g. 1000:1000)"));
                }
                valid.then(|| Some(s.to_string()))
            }),
        };
        // Set by the hub; accepted back so `get -o json` output applies again.
        let platforms = match t.get("platforms") {
            None => Some(Vec::new()),
            Some(p) => match serde_json::from_value::<Vec<ImagePlatform>>(p.clone()) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.err("spec.container.platforms", format!("set by the hub; not valid here: {e}"));
                    None
                }
            },
        };
        let source = match t.get("source") {
            None => Some(None),
            Some(v) => self.string(v, "spec.container.source").map(|s| Some(s.chars().take(1024).collect::<String>())),
        };
        Some(ContainerSpec {
            image: image?,
            command: command?,
            args: args?,
            env: env?,
            secrets: secrets?,
            network: network?,
            port: port?,
            user: user?,
            platforms: platforms?,
            source: source?,
        })
    }

    fn http(&mut self, v: &Value) -> Option<HttpSpec> {
        let t = self.table(v, "spec.http", &["hosts", "paths"])?;
        let hosts = match t.get("hosts") {
            None => Some(Vec::new()),
            Some(h) => self.string_list(h, "spec.http.hosts").and_then(|hosts| {
                let before = self.errors.len();
                let hosts: Vec<String> = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
                for (i, h) in hosts.iter().enumerate() {
                    let name = h.strip_prefix("*.").unwrap_or(h);
                    if names::check_node_name(name).is_err() {
                        self.err(
                            &format!("spec.http.hosts[{i}]"),
                            format!("{h:?} is not a host name (use e.g. hello.local or *.example.com, without a port)"),
                        );
                    }
                }
                (self.errors.len() == before).then_some(hosts)
            }),
        };
        let paths = match t.get("paths") {
            None => Some(vec!["/".to_string()]),
            Some(p) => self.string_list(p, "spec.http.paths").and_then(|paths| {
                let before = self.errors.len();
                let mut out = Vec::new();
                for (i, p) in paths.iter().enumerate() {
                    let bad = !p.starts_with('/')
                        || p.contains(['?', '#', ' ', '\\'])
                        || p.split('/').any(|seg| seg == ".." || seg == ".")
                        || p.contains("//");
                    if bad {
                        self.err(
                            &format!("spec.http.paths[{i}]"),
                            format!("{p:?} is not a path prefix (use e.g. / or /api, without query or ..)"),
                        );
                    } else if p.len() > 1 {
                        out.push(p.trim_end_matches('/').to_string());
                    } else {
                        out.push(p.clone());
                    }
                }
                if paths.is_empty() {
                    self.err("spec.http.paths", "must list at least one path prefix (/ for everything)");
                }
                (self.errors.len() == before).then_some(out)
            }),
        };
        Some(HttpSpec { hosts: hosts?, paths: paths? })
    }

    fn artifact(&mut self, s: &str, path: &str) -> Option<ArtifactRef> {
        match ArtifactRef::parse(s) {
            Err(e) => {
                self.err(path, e);
                None
            }
            Ok(ArtifactRef::Path(p)) if self.origin == Origin::Api => {
                self.err(
                    path,
                    format!("{p:?} is a local path; the hub needs a digest (sha256:...) or an oci:// reference. Apply the manifest with edgectl, which uploads local files"),
                );
                None
            }
            Ok(ArtifactRef::Path(p)) if p.trim().is_empty() => {
                self.err(path, "must name a component file or a sha256 digest");
                None
            }
            Ok(r) => Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const HELLO: &str = r#"
api_version = "edge/v1"
kind = "Workload"
[metadata]
name = "hello"
labels = { app = "hello" }
[spec]
replicas = 2
restart = "always"
[spec.wasm]
component = "hello.wasm"
args = ["--name", "edge"]
env = { GREETING = "hi" }
[spec.resources]
memory = "32Mi"
cpu = "250m"
[spec.placement]
arch = ["arm64", "arm/v7"]
node_selector = { site = "plant-1" }
"#;

    #[test]
    fn a_complete_manifest_parses_into_the_model() {
        let w = parse_toml(HELLO, Origin::File).unwrap();
        assert_eq!(w.metadata.name, "hello");
        assert_eq!(w.metadata.labels["app"], "hello");
        assert_eq!(w.spec.replicas, crate::model::Replicas::Count(2));
        assert_eq!(w.spec.restart, RestartPolicy::Always);
        assert_eq!(w.spec.resources.memory, Memory::mib(32));
        assert_eq!(w.spec.resources.cpu, Cpu(250));
        assert_eq!(w.spec.placement.arch, vec!["arm64", "arm/v7"]);
        let Runtime::Wasm(wasm) = &w.spec.runtime else { panic!("a wasm workload") };
        assert_eq!(wasm.component, ArtifactRef::Path("hello.wasm".into()));
        assert_eq!(wasm.args, vec!["--name", "edge"]);
        assert_eq!(wasm.env["GREETING"], EnvValue::from("hi"));
    }

    #[test]
    fn defaults_fill_what_the_manifest_leaves_out() {
        let w = parse_toml(
            "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"a\"\n[spec.wasm]\ncomponent = \"a.wasm\"\n",
            Origin::File,
        )
        .unwrap();
        assert_eq!(w.spec.replicas, crate::model::Replicas::Count(1));
        assert_eq!(w.spec.restart, RestartPolicy::OnFailure);
        assert_eq!(w.spec.resources, Resources::default());
        assert!(w.spec.placement.is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let bad = r#"
api_version = "edge/v2"
kind = "Workload"
[metadata]
name = "Hello_World"
[spec]
replicas = 0
restart = "sometimes"
[spec.wasm]
componnt = "x.wasm"
args = ["ok", 3]
[spec.resources]
memory = "64MB"
cpu = "lots"
[spec.placement]
arch = ["sparc"]
"#;
        let errs = parse_toml(bad, Origin::File).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "api_version",
                "metadata.name",
                "spec.replicas",
                "spec.restart",
                "spec.resources.memory",
                "spec.resources.cpu",
                "spec.placement.arch[0]",
                "spec.wasm.componnt",
                "spec.wasm.component",
                "spec.wasm.args[1]",
            ]
        );
        let unknown = errs.iter().find(|e| e.path == "spec.wasm.componnt").unwrap();
        assert!(unknown.message.contains("did you mean `component`?"), "{}", unknown.message);
        assert!(errs[0].message.contains("not supported by this version"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = parse_toml("api_version = \n", Origin::File).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0].message.starts_with("not valid TOML"), "{}", e);
        assert!(e.to_string().contains("line 1"), "{e}");
        // The offending line is not quoted: in a Secret it holds a value.
        let e =
            parse_document("kind = \"Secret\"\n[data]\npassword = \"hunter2\" x\n", false, Origin::File).unwrap_err();
        assert!(e.to_string().contains("line 3") && !e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = parse_json(
            r#"{"api_version":"edge/v1","kind":"Workload","metadata":{"name":"a","labels":{"x":1}},"spec":"no"}"#,
            Origin::Api,
        )
        .unwrap_err();
        let msgs: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            msgs,
            ["metadata.labels.x: expected a string, found a number", "spec: expected a table, found a string"]
        );
    }

    #[test]
    fn the_api_requires_digests_not_paths() {
        let e = parse_toml(HELLO, Origin::Api).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].path, "spec.wasm.component");
        assert!(e.0[0].message.contains("local path"));
        let digest = crate::digest::Digest::of(b"x");
        let ok = HELLO.replace("\"hello.wasm\"", &format!("\"{digest}\""));
        let w = parse_toml(&ok, Origin::Api).unwrap();
        assert_eq!(w.spec.runtime.artifact().and_then(|a| a.digest()), Some(&digest));
    }

    #[test]
    fn oci_references_are_accepted_everywhere_and_checked() {
        let oci = HELLO.replace("\"hello.wasm\"", "\"oci://ghcr.io/acme/hello:v1\"");
        let w = parse_toml(&oci, Origin::Api).unwrap();
        assert!(matches!(w.spec.runtime.artifact(), Some(ArtifactRef::Oci(r)) if r.repository == "acme/hello"));
        let bad = HELLO.replace("\"hello.wasm\"", "\"oci://ghcr.io/Acme\"");
        let e = parse_toml(&bad, Origin::File).unwrap_err();
        assert_eq!(e.0[0].path, "spec.wasm.component");
        assert!(e.0[0].message.contains("not an OCI reference"), "{e}");
    }

    #[test]
    fn a_bad_digest_is_refused() {
        let bad = HELLO.replace("\"hello.wasm\"", "\"sha256:1234\"");
        let e = parse_toml(&bad, Origin::File).unwrap_err();
        assert_eq!(e.0[0].path, "spec.wasm.component");
    }

    #[test]
    fn output_of_get_can_be_applied_again() {
        let w = parse_toml(HELLO, Origin::File).unwrap();
        let mut v = serde_json::to_value(&w).unwrap();
        v["status"] = serde_json::json!({"phase": "Running"});
        v["metadata"]["uid"] = "abc".into();
        let back = parse_value(&v, Origin::File).unwrap();
        assert_eq!(back.spec, w.spec);
    }

    #[test]
    fn http_services_and_wasm_limits_are_validated() {
        let good = format!(
            "{HELLO}\n[spec.http]\nhosts = [\"Hello.Local\", \"*.example.com\"]\npaths = [\"/api/\", \"/\"]\n"
        )
        .replace(
            "env = { GREETING = \"hi\" }",
            "env = { GREETING = \"hi\" }\nmax_instances = 4\ncpu_budget = \"250ms\"\noutbound = [\"https://api.example.com\"]\nkey_value = true",
        );
        let w = parse_toml(&good, Origin::File).unwrap();
        let http = w.spec.http.unwrap();
        assert_eq!(http.hosts, vec!["hello.local", "*.example.com"]);
        assert_eq!(http.paths, vec!["/api", "/"]);
        let Runtime::Wasm(wasm) = &w.spec.runtime else { panic!("a wasm workload") };
        assert_eq!((wasm.max_instances, wasm.cpu_budget, wasm.key_value), (Some(4), Some(Millis(250)), true));

        let bad = good
            .replace("max_instances = 4", "max_instances = 0")
            .replace("\"250ms\"", "\"forever\"")
            .replace("\"https://api.example.com\"", "\"api.example.com\"")
            .replace("key_value = true", "key_value = \"yes\"")
            .replace("\"Hello.Local\"", "\"hello.local:8080\"")
            .replace("\"/api/\"", "\"api\"");
        let errs = parse_toml(&bad, Origin::File).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.wasm.max_instances",
                "spec.wasm.cpu_budget",
                "spec.wasm.outbound[0]",
                "spec.wasm.key_value",
                "spec.http.hosts[0]",
                "spec.http.paths[0]"
            ]
        );
    }

    #[test]
    fn rerun_interrupted_is_a_yes_or_no_that_defaults_to_yes() {
        assert!(parse_toml(HELLO, Origin::File).unwrap().spec.rerun_interrupted);
        let no = HELLO.replace("[spec]\n", "[spec]\nrerun_interrupted = false\n");
        let w = parse_toml(&no, Origin::File).unwrap();
        assert!(!w.spec.rerun_interrupted);
        assert_eq!(serde_json::to_value(&w.spec).unwrap()["rerun_interrupted"], false);
        assert!(
            serde_json::to_value(&parse_toml(HELLO, Origin::File).unwrap().spec)
                .unwrap()
                .get("rerun_interrupted")
                .is_none()
        );
        let bad = HELLO.replace("[spec]\n", "[spec]\nrerun_interrupted = \"no\"\n");
        let e = parse_toml(&bad, Origin::File).unwrap_err();
        assert_eq!(
            e.to_string().lines().last().unwrap().trim(),
            "spec.rerun_interrupted: expected true or false, found a string",
            "{e}"
        );
    }

    pub(super) const CONTAINER: &str = r#"
api_version = "edge/v1"
kind = "Workload"
[metadata]
name = "sensor"
[spec.container]
image = "oci://registry.example.com/acme/sensor:1.2"
command = ["/bin/sensor"]
args = ["--interval", "5s"]
env = { MODE = "fast" }
user = "1000:1000"
[spec.resources]
memory = "64Mi"
"#;

    #[test]
    fn a_container_manifest_parses_and_round_trips() {
        let w = parse_toml(CONTAINER, Origin::File).unwrap();
        let Runtime::Container(c) = &w.spec.runtime else { panic!("a container workload") };
        assert_eq!(c.image.to_string(), "oci://registry.example.com/acme/sensor:1.2");
        assert_eq!(
            (c.command.as_slice(), c.args.as_slice()),
            (&["/bin/sensor".to_string()][..], &["--interval".to_string(), "5s".to_string()][..])
        );
        assert_eq!((c.env["MODE"].to_string().as_str(), c.user.as_deref()), ("fast", Some("1000:1000")));
        assert_eq!(w.spec.runtime.name(), "oci");
        assert!(w.spec.runtime.artifact().is_none());
        // What the hub stores (with the platforms it resolved) applies again unchanged.
        let mut pinned = w.clone();
        let Runtime::Container(c) = &mut pinned.spec.runtime else { unreachable!() };
        c.platforms = vec![crate::model::ImagePlatform {
            platform: "linux/arm64".parse().unwrap(),
            manifest: crate::digest::Digest::of(b"m"),
        }];
        let json = serde_json::to_string(&pinned).unwrap();
        assert!(json.contains(r#""platform":"linux/arm64""#), "{json}");
        assert_eq!(parse_json(&json, Origin::Api).unwrap(), pinned);
    }

    #[test]
    fn bad_container_manifests_name_every_problem() {
        let bad = CONTAINER
            .replace("oci://registry.example.com/acme/sensor:1.2", "nginx:latest")
            .replace("\"1000:1000\"", "\"nginx\"")
            .replace("command = [\"/bin/sensor\"]", "command = \"/bin/sensor\"\nports = [80]");
        let e = parse_toml(&bad, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.container.ports", "spec.container.image", "spec.container.command", "spec.container.user"],
            "{e}"
        );
        assert!(e.to_string().contains("must start with oci://"), "{e}");

        let both = CONTAINER.replace("[spec.resources]", "[spec.wasm]\ncomponent = \"a.wasm\"\n[spec.resources]");
        let e = parse_toml(&both, Origin::File).unwrap_err();
        assert!(e.0.iter().any(|e| e.path == "spec" && e.message.contains("not both")), "{e}");
        let routed = format!("{CONTAINER}[spec.http]\nhosts = [\"a.local\"]\n");
        let e = parse_toml(&routed, Origin::File).unwrap_err();
        assert!(e.0.iter().any(|e| e.path == "spec.container.port" && e.message.contains("required")), "{e}");
        let isolated = routed.replace("user = ", "port = 8080\nnetwork = \"none\"\nuser = ");
        let e = parse_toml(&isolated, Origin::File).unwrap_err();
        assert!(e.0.iter().any(|e| e.path == "spec.container.network"), "{e}");
        let w = parse_toml(&routed.replace("user = ", "port = 8080\nuser = "), Origin::File).unwrap();
        let Runtime::Container(c) = &w.spec.runtime else { panic!() };
        assert_eq!((c.port, c.network), (Some(8080), ContainerNetwork::Bridge));
        let bad = CONTAINER.replace("user = ", "port = 0\nnetwork = \"nat\"\nuser = ");
        let e = parse_toml(&bad, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.container.network", "spec.container.port"], "{e}");
        let forged =
            CONTAINER.replace("user = \"1000:1000\"", "platforms = [{ platform = \"linux/\", manifest = \"x\" }]");
        let e = parse_toml(&forged, Origin::File).unwrap_err();
        assert!(e.0.iter().any(|e| e.path == "spec.container.platforms"), "{e}");
    }

    const SECRET: &str = r#"
api_version = "edge/v1"
kind = "Secret"
[metadata]
name = "db"
[data]
password = "hunter2"
"ca.crt" = "-----BEGIN CERTIFICATE-----"
"#;

    #[test]
    fn secrets_parse_and_workloads_reference_them() {
        let Document::Secret(s) = parse_document(SECRET, false, Origin::File).unwrap() else { panic!("not a secret") };
        assert_eq!(s.metadata.name, "db");
        assert_eq!(s.data["password"], "hunter2");
        // Debug output names keys, never values.
        assert!(!format!("{s:?}").contains("hunter2"));

        let wl = HELLO.replace(
            "env = { GREETING = \"hi\" }",
            "secrets = [{ secret = \"tls\", path = \"/etc/tls\" }]\nenv = { DB_PASSWORD = { secret = \"db\", key = \"password\" }, MODE = \"x\" }",
        );
        let Document::Workload(w) = parse_document(&wl, false, Origin::File).unwrap() else { panic!() };
        assert_eq!(w.spec.secret_names().into_iter().collect::<Vec<_>>(), ["db", "tls"]);
        let Runtime::Wasm(spec) = &w.spec.runtime else { panic!() };
        assert_eq!(spec.env["MODE"], EnvValue::Text("x".into()));
        assert_eq!(
            spec.env["DB_PASSWORD"],
            EnvValue::Secret(SecretKeyRef { secret: "db".into(), key: "password".into() })
        );
        // The JSON form (what `get -o json` prints) applies again unchanged.
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(parse_json(&json, Origin::File).unwrap(), *w);
    }

    #[test]
    fn bad_secrets_and_references_name_every_problem_without_quoting_values() {
        let big = "x".repeat(MAX_SECRET_VALUE + 1);
        let bad = SECRET
            .replace("name = \"db\"", "name = \"DB\"")
            .replace("password = \"hunter2\"", &format!("\"../x\" = \"hunter2\"\nbig = \"{big}\"\nn = 3"));
        let e = parse_document(&bad, false, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["metadata.name", "data.../x", "data.big", "data.n"], "{e}");
        assert!(!e.to_string().contains("hunter2") && !e.to_string().contains(&big[..100]), "{e}");

        let wl = HELLO.replace(
            "env = { GREETING = \"hi\" }",
            "secrets = [{ secret = \"tls\", path = \"etc\" }, { secret = \"a\", path = \"/x/../y\" }, { secret = \"b\", path = \"/s\" }, { secret = \"c\", path = \"/s/t\" }]\nenv = { A = { secret = \"db\" }, B = { secret = \"Db\", key = \"a/b\", extra = 1 }, C = 5 }",
        );
        let e = parse_toml(&wl, Origin::File).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.wasm.env.A.key",
                "spec.wasm.env.B.extra",
                "spec.wasm.env.B.secret",
                "spec.wasm.env.B.key",
                "spec.wasm.env.C",
                "spec.wasm.secrets[0].path",
                "spec.wasm.secrets[1].path",
                "spec.wasm.secrets[3].path",
            ],
            "{e}"
        );
    }
}
