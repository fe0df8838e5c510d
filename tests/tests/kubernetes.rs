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

/// A kustomization in the repository and the documents of its resources.
fn kustomized(dir: &str) -> (Value, Vec<Value>) {
    let dir = repo().join(dir);
    let kustomization = yaml_docs(&dir.join("kustomization.yaml")).swap_remove(0);
    let mut docs = Vec::new();
    for r in strs(&kustomization["resources"]) {
        assert!(dir.join(r).exists(), "kustomization.yaml names {r}, which is missing");
        docs.extend(yaml_docs(&dir.join(r)));
    }
    (kustomization, docs)
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
    let (kustomization, docs) = kustomized("deploy/kubernetes");
    let kustomization = &kustomization;
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

/// The container named `name` of a pod spec (containers or initContainers).
fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {list} {name}"))
}

/// The restricted Pod Security Standard, for a pod and each of its containers.
fn assert_restricted(spec: &Value, what: &str) {
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}/{}", c["name"]);
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}/{}", c["name"]);
            assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{what}/{}", c["name"]);
        }
    }
}

/// The mount path of volume `name` in container `c`.
fn mount_of<'a>(c: &'a Value, name: &str) -> &'a str {
    c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["mountPath"].as_str())
        .unwrap_or_else(|| panic!("{} does not mount {name}", c["name"]))
}

/// The value of env variable `name` in container `c` (plain values only).
fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

#[test]
fn the_ha_manifests_fit_the_hub_and_its_etcd() {
    let (kustomization, docs) = kustomized("deploy/kubernetes/ha");
    let kustomization = &kustomization;
    assert_eq!(of_kind(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    let images: Vec<&str> =
        kustomization["images"].as_array().unwrap().iter().filter_map(|i| i["name"].as_str()).collect();
    assert_eq!(images, ["edge-hub", "etcd"]);
    assert_eq!(kustomization["images"][0]["newTag"], env!("CARGO_PKG_VERSION"));

    // Three hubs, any of which the Service may send a request to.
    let deploy = of_kind(&docs, "Deployment");
    let spec = &deploy["spec"]["template"]["spec"];
    assert_eq!(deploy["spec"]["replicas"], 3);
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let svc = docs.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "edge-hub").unwrap();
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects the hubs");
    }
    assert_restricted(spec, "hubs");
    let hub = container(spec, "containers", "hub");
    let init = container(spec, "initContainers", "identity");
    assert_eq!(hub["image"], "edge-hub");
    assert_eq!(init["image"], "edge-hub");
    assert_eq!(strs(&hub["args"]), ["serve"]);

    // Every variable set is one the hub reads.
    let known = hub_env_names();
    let cm = of_kind(&docs, "ConfigMap");
    let config: BTreeMap<String, String> =
        cm["data"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
    assert_eq!(hub["envFrom"][0]["configMapRef"]["name"], cm["metadata"]["name"]);
    for name in config.keys().cloned().chain(
        [hub, init]
            .iter()
            .flat_map(|c| c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string())),
    ) {
        assert!(name == "POD_IP" || known.contains(&name), "the manifests set {name}, which edge-hub does not read");
    }

    // The identity: from the Secret, through `edge-hub init --from`, into the
    // data directory both containers mount.
    let data_dir = env_of(hub, "EDGE_HUB_DATA_DIR").unwrap()["value"].as_str().unwrap();
    assert_eq!(env_of(init, "EDGE_HUB_DATA_DIR").unwrap()["value"], data_dir);
    assert_eq!(mount_of(hub, "data"), data_dir);
    assert_eq!(mount_of(init, "data"), data_dir);
    let args = strs(&init["args"]);
    assert_eq!(args[..2], ["init", "--from"]);
    assert_eq!(args[2], mount_of(init, "identity"));
    let volume = |name: &str| spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap().clone();
    assert_eq!(volume("identity")["secret"]["secretName"], "edge-hub-identity");

    // Where the others forward to: this pod's own address, defined before use.
    let env_names: Vec<&str> = hub["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    let peer = env_of(hub, "EDGE_HUB_PEER_URL").unwrap()["value"].as_str().unwrap();
    assert_eq!(peer, format!("https://$(POD_IP):{}", hub["ports"][0]["containerPort"]));
    assert!(env_names.iter().position(|n| *n == "POD_IP") < env_names.iter().position(|n| *n == "EDGE_HUB_PEER_URL"));
    assert_eq!(env_of(hub, "POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(
        env_of(hub, "EDGE_HUB_API_ADDR").unwrap()["value"],
        format!("0.0.0.0:{}", hub["ports"][0]["containerPort"])
    );

    // The artifacts: one volume every hub mounts read-write.
    let artifacts = env_of(hub, "EDGE_HUB_ARTIFACTS_DIR").unwrap()["value"].as_str().unwrap();
    assert_eq!(mount_of(hub, "artifacts"), artifacts);
    let claim = volume("artifacts")["persistentVolumeClaim"]["claimName"].clone();
    let pvc = docs.iter().find(|d| d["kind"] == "PersistentVolumeClaim" && d["metadata"]["name"] == claim).unwrap();
    assert_eq!(strs(&pvc["spec"]["accessModes"]), ["ReadWriteMany"]);

    // The store names every etcd member, as etcd's own cluster list does.
    let etcd = of_kind(&docs, "StatefulSet");
    assert_eq!(etcd["metadata"]["name"], "etcd");
    assert_eq!(etcd["spec"]["replicas"], 3);
    assert_restricted(&etcd["spec"]["template"]["spec"], "etcd");
    let service = etcd["spec"]["serviceName"].as_str().unwrap();
    let members: Vec<String> = (0..3).map(|i| format!("etcd-{i}.{service}")).collect();
    let store = &config["EDGE_HUB_STORE"];
    assert_eq!(*store, format!("etcd://{}", members.iter().map(|m| format!("{m}:2379")).collect::<Vec<_>>().join(",")));
    let etcd_args = strs(&etcd["spec"]["template"]["spec"]["containers"][0]["args"]);
    let initial = etcd_args.iter().find_map(|a| a.strip_prefix("--initial-cluster=")).unwrap();
    let named: Vec<String> = (0..3).map(|i| format!("etcd-{i}=http://{}:2380", members[i])).collect();
    assert_eq!(initial, named.join(","));
    let headless = docs.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == service).unwrap();
    assert_eq!(headless["spec"]["clusterIP"], "None");

    // The init container, carried out as a kubelet would, with the Secret
    // made as deploy/README.md says.
    let t = TempDir::new("kubernetes-ha");
    let identity = t.path().join("identity");
    let out = Command::new(bin("edge-hub")).args(["init", "--data-dir"]).arg(&identity).env_clear().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data = t.path().join("data");
    let out = Command::new(bin("edge-hub"))
        .args(args.iter().map(|a| if *a == mount_of(init, "identity") { identity.to_str().unwrap() } else { a }))
        .env_clear()
        .env("EDGE_HUB_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["hub.key", "secrets.key", "join.token", "admin.token"] {
        assert_eq!(std::fs::read(data.join(f)).unwrap(), std::fs::read(identity.join(f)).unwrap(), "{f}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(data.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }
    // A Secret without every file is named, not half copied.
    std::fs::remove_file(identity.join("secrets.key")).unwrap();
    let out = Command::new(bin("edge-hub"))
        .args(["init", "--from"])
        .arg(&identity)
        .env_clear()
        .env("EDGE_HUB_DATA_DIR", t.path().join("data-2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("secrets.key"), "{err}");
    assert!(!t.path().join("data-2/hub.key").exists(), "nothing copied from an incomplete identity");
}
