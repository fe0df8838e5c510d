//! The hub as an OCI image (deploy/container/build-image.sh): built without
//! a registry or daemon, reproducible, pushed to a real registry with
//! skopeo, and run by a real OCI runtime (runc) on a read-only root as a
//! non-root user, with agents outside the container joining it.

use std::path::{Path, PathBuf};
use std::process::Command;

use edge_tests::*;

fn build(out: &Path, extra: &[&str]) -> (bool, String) {
    let o = Command::new(repo().join("deploy/container/build-image.sh"))
        .arg("--binary")
        .arg(bin("edge-hub"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run build-image.sh");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn json_blob(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

/// Removes the container whatever happens to the test.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc").args(["delete", "--force", &self.0]).output();
    }
}

fn runc_available() -> bool {
    Command::new("runc").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn the_hub_image_builds_reproducibly_and_runs_under_runc() {
    let t = TempDir::new("container");
    let image = t.path().join("edge-hub.oci.tar");
    let (ok, text) = build(&image, &["--tag", "test"]);
    assert!(ok, "{text}");
    let manifest_digest = text.split("manifest ").nth(1).and_then(|s| s.split(',').next()).expect("digest").to_string();
    let again = t.path().join("again.oci.tar");
    let (ok, text) = build(&again, &["--tag", "test"]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(&image).unwrap(), std::fs::read(&again).unwrap(), "the same inputs give the same image");

    // Bad input: refused, naming what is wrong; no image written.
    let bad = t.path().join("bad.oci.tar");
    let plain = t.path().join("plain-file");
    std::fs::write(&plain, "not a program").unwrap();
    for (args, want) in [
        (vec!["--tag", "no good"], "is not an image tag"),
        (vec!["--binary", plain.to_str().unwrap()], "plain-file is not an executable"),
        (vec!["--binary", repo().join("deploy/install.sh").to_str().unwrap()], "is not an ELF executable"),
        (vec!["--frobnicate"], "unknown argument --frobnicate"),
    ] {
        let (ok, text) = build(&bad, &args);
        assert!(!ok && text.contains(want), "{args:?}: {text}");
        assert!(!bad.exists());
    }

    // The layout: one manifest for linux/amd64, the hub as entrypoint.
    let layout = t.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    assert!(Command::new("tar").arg("-xf").arg(&image).arg("-C").arg(&layout).status().unwrap().success());
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(entry["digest"], manifest_digest.as_str());
    assert_eq!(entry["platform"]["architecture"], "amd64");
    assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "test");
    let image_manifest = json_blob(&layout, &manifest_digest);
    let config = json_blob(&layout, image_manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/edge-hub");

    // The Containerfile (built where there is a container engine and network)
    // makes the same image: the same files, and the same settings.
    let files = t.path().join("rootfs-files");
    let (ok, text) = build(&files, &["--rootfs", files.to_str().unwrap()]);
    assert!(ok, "{text}");
    use std::os::unix::fs::MetadataExt;
    assert!(files.join("usr/local/bin/edge-hub").is_file());
    assert_eq!(std::fs::metadata(files.join("var/lib/edge-hub")).unwrap().uid(), 65532);
    let containerfile = std::fs::read_to_string(repo().join("deploy/container/Containerfile")).unwrap();
    let c = &config["config"];
    assert!(containerfile.contains(&format!("\nUSER {}\n", c["User"].as_str().unwrap())));
    let mut env_block = Vec::new();
    for line in containerfile.lines().skip_while(|l| !l.starts_with("ENV ")) {
        env_block.push(line.trim_start_matches("ENV ").trim().trim_end_matches('\\').trim().to_string());
        if !line.ends_with('\\') {
            break;
        }
    }
    let image_env: Vec<String> = c["Env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
    assert_eq!(env_block, image_env, "the Containerfile's ENV");
    assert!(containerfile.contains(&format!("\nENTRYPOINT {}\n", c["Entrypoint"])));
    assert!(containerfile.contains(&format!("\nCMD {}\n", c["Cmd"])));
    assert!(containerfile.contains("\nVOLUME /var/lib/edge-hub\n") && c["Volumes"]["/var/lib/edge-hub"].is_object());
    assert!(containerfile.contains("\nEXPOSE 7443 1883\n"));

    // skopeo (the containers/image library podman and CRI-O use) reads it and
    // pushes it to a registry unchanged.
    let (_registry, addr) = registry(t.path());
    let dest = format!("docker://{addr}/edge/hub:test");
    let copy = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", image.display()))
        .arg(&dest)
        .output()
        .expect("skopeo (apt-get install skopeo; the test command installs it)");
    assert!(copy.status.success(), "{}", String::from_utf8_lossy(&copy.stderr));
    let inspect = Command::new("skopeo").args(["inspect", "--tls-verify=false", &dest]).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspected["Digest"], manifest_digest.as_str(), "the registry holds the very image built");

    if !runc_available() {
        panic!("runc is not installed: apt-get install runc (the test command installs it)");
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "running a container with runc needs root");
    let bundle = t.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let layer = layout.join("blobs/sha256").join(&image_manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
    assert!(Command::new("tar").arg("-xzf").arg(&layer).arg("-C").arg(&rootfs).status().unwrap().success());
    let spec = runtime_spec(&bundle, &config, &t.path().join("hub"));
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();

    let id = format!("edge-hub-test-{}", std::process::id());
    let container = Container(id.clone());
    let proc = Proc::spawn(
        "edge-hub (runc)",
        Command::new("runc").args(["run", "--bundle"]).arg(&bundle).arg(&container.0),
        t.path().join("hub.log"),
    );
    // PID 1 in its own PID namespace: hub.json names that, not runc's pid.
    let mut hub = Hub::attach(t.path(), proc, Some(1), HubOpts::default());
    assert_eq!(std::fs::metadata(t.path().join("hub/join.token")).unwrap().uid(), 65532, "the hub runs as uid 65532");

    // An agent outside the container joins it and runs a workload from it.
    let _agent = Agent::start(t.path(), "box-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("box-1", "Ready");
    hub.hello_runs_on(t.path(), "box-1");

    // Tokens come out of the running container without a shell in it.
    let out = Command::new("runc")
        .args(["exec", "--user", "65532:65532", &id, "/usr/local/bin/edge-hub", "token", "join"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hub.join, "{}", String::from_utf8_lossy(&out.stderr));

    // `runc run` passes SIGTERM on; the hub, as PID 1, shuts down cleanly.
    let status = hub.proc.stop().expect("runc ran");
    assert!(status.success(), "the hub did not exit cleanly: {status}\n{}", hub.proc.log_text());
    drop(container);
    let state = Command::new("runc").args(["state", &id]).output().unwrap();
    assert!(!state.status.success(), "the container is gone");
}

/// An OCI runtime spec as a container engine would derive it from the image
/// config: its entrypoint, environment and user, a read-only root, the state
/// volume bound to `state`; the host's network, so the test reaches it on
/// loopback.
fn runtime_spec(bundle: &Path, image: &serde_json::Value, state: &PathBuf) -> serde_json::Value {
    let out = Command::new("runc").arg("spec").current_dir(bundle).output().expect("runc spec");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let c = &image["config"];
    let mut args: Vec<serde_json::Value> = c["Entrypoint"].as_array().unwrap().clone();
    args.extend(c["Cmd"].as_array().unwrap().iter().cloned());
    let mut env: Vec<serde_json::Value> = c["Env"].as_array().unwrap().clone();
    env.push(format!("EDGE_HUB_API_ADDR=127.0.0.1:{}", free_port()).into());
    env.push(format!("EDGE_HUB_MQTT_ADDR=127.0.0.1:{}", free_port()).into());
    env.push("EDGE_HUB_HEARTBEAT=1s".into());
    let (uid, gid) = c["User"].as_str().unwrap().split_once(':').unwrap();
    spec["process"]["args"] = args.into();
    spec["process"]["env"] = env.into();
    spec["process"]["terminal"] = false.into();
    spec["process"]["cwd"] = c["WorkingDir"].clone();
    spec["process"]["user"] =
        serde_json::json!({ "uid": uid.parse::<u32>().unwrap(), "gid": gid.parse::<u32>().unwrap() });
    spec["root"] = serde_json::json!({ "path": "rootfs", "readonly": true });
    let volume = c["Volumes"].as_object().unwrap().keys().next().unwrap().clone();
    std::fs::create_dir_all(state).unwrap();
    std::os::unix::fs::chown(state, Some(65532), Some(65532)).unwrap();
    spec["mounts"].as_array_mut().unwrap().push(
        serde_json::json!({ "destination": volume, "type": "bind", "source": state, "options": ["rbind", "rw"] }),
    );
    spec["linux"]["namespaces"].as_array_mut().unwrap().retain(|n| n["type"] != "network");
    spec
}
