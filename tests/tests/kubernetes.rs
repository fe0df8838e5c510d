//! The Kubernetes manifests in deploy/kubernetes: checked against the hub
//! they deploy (its flags, its image, its probes), then carried out as a
//! kubelet would (the ConfigMap and Secret turned into environment and
//! files, the volumes into directories), against the shipped TLS Mosquitto.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use edge_tests::*;
use serde_json::Value;

/// Every YAML document in `file`, as JSON (PyYAML, a real YAML parser, from
/// Debian's python3-yaml, which the test command installs).
fn yaml_docs(file: &Path) -> Vec<Value> {
    // Debian's python3, which python3-yaml extends (not whichever is first on PATH).
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let out = Command::new(python)
        .args(["-c", "import sys, yaml, json; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{} does not parse as YAML (python3-yaml needed): {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected in {docs:#?}");
    found[0]
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The `[env: NAME=` names `edge-hub serve --help` documents.
fn hub_env_names() -> Vec<String> {
    let out = Command::new(bin("edge-hub")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<String> =
        help.split("[env: ").skip(1).filter_map(|s| s.split('=').next()).map(str::to_string).collect();
    assert!(names.len() >= 8, "{help}");
    names
}

struct Pod {
    env: Vec<(String, Value)>,
    config: BTreeMap<String, String>,
    mounts: BTreeMap<String, String>,
}

/// Checks the manifests hang together and fit the hub; returns what a
/// kubelet needs to run the hub container.
fn checked_manifests() -> Pod {
    let dir = repo().join("deploy/kubernetes");
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    let mut docs = Vec::new();
    for r in strs(&kustomization["resources"]) {
        assert!(dir.join(r).exists(), "kustomization.yaml names {r}, which is missing");
        docs.extend(yaml_docs(&dir.join(r)));
    }
    let ns = of_kind(&docs, "Namespace");
    assert_eq!(ns["metadata"]["name"], kustomization["namespace"]);
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");

    let sts = of_kind(&docs, "StatefulSet");
    let cm = of_kind(&docs, "ConfigMap");
    let svc = of_kind(&docs, "Service");
    let spec = &sts["spec"]["template"]["spec"];
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    for (what, selector) in
        [("StatefulSet", &sts["spec"]["selector"]["matchLabels"]), ("Service", &svc["spec"]["selector"])]
    {
        for (k, v) in selector.as_object().expect("a selector") {
            assert_eq!(&labels[k], v, "the {what} selector {k}={v} does not match the pod");
        }
    }
    assert_eq!(sts["spec"]["replicas"], 1, "one hub owns the desired state");
    assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"]);

    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    // The image the kustomization pins is the one build-image.sh tags by default.
    assert_eq!(c["image"], kustomization["images"][0]["name"]);
    assert_eq!(kustomization["images"][0]["newTag"], env!("CARGO_PKG_VERSION"));
    assert_eq!(strs(&c["args"]), ["serve"]);

    // The restricted Pod Security Standard, and the user the image is built for.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["securityContext"]["runAsUser"], 65532);
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    let containerfile = std::fs::read_to_string(repo().join("deploy/container/Containerfile")).unwrap();
    assert!(containerfile.contains("USER 65532:65532"), "the image runs as the pod's user");

    // Every variable the pod sets is one the hub reads.
    let known = hub_env_names();
    let mut env: Vec<(String, Value)> = Vec::new();
    for (k, v) in cm["data"].as_object().unwrap() {
        env.push((k.clone(), v.clone()));
    }
    for e in c["env"].as_array().unwrap() {
        env.push((e["name"].as_str().unwrap().to_string(), e.clone()));
    }
    for (name, _) in &env {
        assert!(known.contains(name), "the manifests set {name}, which edge-hub serve does not read ({known:?})");
    }
    assert_eq!(c["envFrom"][0]["configMapRef"]["name"], cm["metadata"]["name"]);

    // Ports: the API listens where the container port, the probes and the Service say.
    let var = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let api_addr = var("EDGE_HUB_API_ADDR").expect("the API address")["value"].as_str().unwrap().to_string();
    let port = &c["ports"][0];
    assert_eq!(api_addr, format!("0.0.0.0:{}", port["containerPort"]), "the API must listen on the pod's address");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], port["name"], "{probe}");
        assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS", "{probe}: the API speaks TLS");
    }
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], port["name"]);

    // Volumes: the state directory is the persistent claim; the broker CA
    // file comes from the same secret as the broker URL.
    let mut mounts = BTreeMap::new();
    let claims: Vec<&str> = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["metadata"]["name"].as_str())
        .collect();
    for m in c["volumeMounts"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let declared = spec["volumes"].as_array().unwrap().iter().any(|v| v["name"] == name) || claims.contains(&name);
        assert!(declared, "volume mount {name} has no volume");
        mounts.insert(m["mountPath"].as_str().unwrap().to_string(), name.to_string());
    }
    let data_dir = var("EDGE_HUB_DATA_DIR").unwrap()["value"].as_str().unwrap().to_string();
    assert_eq!(mounts.get(&data_dir).map(String::as_str), Some("state"), "the hub's data dir must be the volume");
    assert!(containerfile.contains(&format!("VOLUME {data_dir}\n")), "the image declares the same data dir");
    let ca_path = var("EDGE_HUB_BROKER_CA").unwrap()["value"].as_str().unwrap().to_string();
    let ca_dir = Path::new(&ca_path).parent().unwrap().to_str().unwrap();
    let broker_volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mounts[ca_dir]).unwrap();
    let url_ref = &var("EDGE_HUB_BROKER").unwrap()["valueFrom"]["secretKeyRef"];
    assert_eq!(broker_volume["secret"]["secretName"], url_ref["name"]);
    let file = Path::new(&ca_path).file_name().unwrap().to_str().unwrap();
    assert!(broker_volume["secret"]["items"].as_array().unwrap().iter().any(|i| i["path"] == file));

    let config = cm["data"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().into())).collect();
    Pod {
        env: env.into_iter().filter(|(n, _)| !cm["data"].as_object().unwrap().contains_key(n)).collect(),
        config,
        mounts,
    }
}

#[test]
fn the_kubernetes_manifests_fit_the_hub_and_run_it_against_the_shipped_broker() {
    let pod = checked_manifests();
    let t = TempDir::new("kubernetes");
    let broker = TlsBroker::prepare(t.path());
    let hub_pass = "hub-password-from-the-secret";
    // The Secret the README says to create, as its keys.
    let secret: BTreeMap<&str, String> = BTreeMap::from([
        ("url", format!("mqtts://edge-hub:{hub_pass}@127.0.0.1:{}", broker.port)),
        ("ca.crt", std::fs::read_to_string(&broker.ca).unwrap()),
    ]);
    // Volumes become directories; the secret volume holds the CA file.
    let volume_dir = |name: &str| match name {
        "state" => t.path().join("hub"),
        other => t.path().join(format!("volume-{other}")),
    };
    let mut remap: Vec<(String, String)> = Vec::new();
    for (path, name) in &pod.mounts {
        let dir = volume_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        if name != "state" {
            std::fs::write(dir.join("ca.crt"), &secret["ca.crt"]).unwrap();
        }
        remap.push((path.clone(), dir.display().to_string()));
    }
    let api_port = free_port();
    let mut cmd = Command::new(bin("edge-hub"));
    cmd.arg("serve").env_clear();
    for (k, v) in &pod.config {
        // The operator sets where agents reach the API (here: loopback).
        let v = if k == "EDGE_HUB_ADVERTISE_URL" { format!("https://127.0.0.1:{api_port}") } else { v.clone() };
        cmd.env(k, v);
    }
    for (name, e) in &pod.env {
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (from, to) in &remap {
                if v.starts_with(from.as_str()) {
                    v = v.replacen(from.as_str(), to, 1);
                }
            }
            // The pod's own address, 0.0.0.0 inside its network namespace, is loopback here.
            v.replace("0.0.0.0:7443", &format!("127.0.0.1:{api_port}"))
        } else {
            let key = e["valueFrom"]["secretKeyRef"]["key"].as_str().expect("a value or a secret key");
            secret[key].clone()
        };
        cmd.env(name, value);
    }
    let proc = Proc::spawn("edge-hub", &mut cmd, t.path().join("hub.log"));
    let pid = proc.pid();
    let hub = Hub::attach(t.path(), proc, Some(pid), HubOpts::default());
    let api = format!("127.0.0.1:{api_port}");
    assert_eq!(hub.api_url, format!("https://{api}"));
    assert_eq!(hub.mqtt_url, format!("mqtts://127.0.0.1:{}", broker.port), "agents are told the broker, over TLS");

    // Live but not ready until the broker is there: the Service sends it no traffic yet.
    assert_eq!(hub.api_get("/healthz").0, 200);
    let (code, body) = hub.api_get("/readyz");
    assert!(code == 503 && body.contains("not connected to the MQTT broker"), "{code} {body}");
    let _mosq = broker.start(&[("edge-hub", hub_pass), ("gw-1", "gw-1-password")]);
    wait_for("the hub to be ready", || (hub.api_get("/readyz").0 == 200).then_some(()));

    // `kubectl exec edge-hub-0 -- edge-hub token join` gives the token agents need.
    let out = Command::new(bin("edge-hub"))
        .args(["token", "join"])
        .env_clear()
        .env("EDGE_HUB_DATA_DIR", volume_dir("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hub.join);

    // A device in the field joins through the broker and runs a workload,
    // fetching its component from the advertised API.
    let ca = broker.ca.display().to_string();
    let url = hub.mqtt_url.replacen("://", "://gw-1:gw-1-password@", 1);
    let _agent = Agent::start(t.path(), "gw-1", &url, &hub.join, &["--broker-ca", &ca]);
    hub.wait_node_state("gw-1", "Ready");
    hub.hello_runs_on(t.path(), "gw-1");
}
