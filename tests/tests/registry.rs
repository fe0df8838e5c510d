//! Components from an OCI registry (Debian's docker-registry, the CNCF
//! distribution server, on loopback): edgectl pushes them in the Wasm
//! artifact layout, the hub pulls them at apply time and pins the digest.

use std::path::Path;

use edge_tests::*;

fn push(hub: &Hub, file: &Path, reference: &str) -> String {
    let out = hub.ctl(&["push", file.to_str().unwrap(), reference]);
    out.trim().to_string()
}

#[test]
fn components_are_pulled_from_a_registry_and_pinned() {
    let t = TempDir::new("registry");
    let (_reg, addr) = registry(t.path());
    let hub = Hub::start(t.path(), HubOpts::default());
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    let proxy = agent.proxy();

    let pinned = push(&hub, &repo().join("examples/hello-http.wasm"), &format!("oci://{addr}/edge/hello:v1"));
    assert!(pinned.starts_with(&format!("oci://{addr}/edge/hello:v1@sha256:")), "{pinned}");

    let m = |component: &str| service_manifest("web", component, &["web.local"], &["/"], "");
    let file = t.path().join("web.toml");
    std::fs::write(&file, m(&format!("oci://{addr}/edge/hello:v1"))).unwrap();
    hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
    hub.wait("web", "Running");
    assert_eq!(get(&proxy, "web.local", "/").1.trim(), "Hello from web v1 on pi-1");
    let w = hub.workload("web").unwrap();
    let component = w["spec"]["wasm"]["component"].as_str().unwrap().to_string();
    let hello_digest = edge_api::digest::Digest::of(&std::fs::read(repo().join("examples/hello-http.wasm")).unwrap());
    assert_eq!(component, hello_digest.to_string(), "the workload is pinned to the layer's digest");
    assert_eq!(w["spec"]["wasm"]["source"], pinned.as_str());
    let describe = hub.ctl(&["describe", "workload", "web"]);
    assert!(describe.contains(&format!("(from {pinned})")), "{describe}");

    // Applying again is a no-op while the tag stays.
    let out = hub.edgectl(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "workload/web unchanged");

    // The tag moves to another component: applying again rolls it out.
    push(&hub, &repo().join("examples/counter.wasm"), &format!("oci://{addr}/edge/hello:v1"));
    let out = hub.edgectl(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "workload/web configured");
    hub.wait("web", "Running");
    assert_eq!(hub.workload("web").unwrap()["metadata"]["generation"], 2);

    // A pinned digest the registry does not have is refused; nothing changes.
    let wrong = format!("oci://{addr}/edge/hello:v1@sha256:{}", "0".repeat(64));
    std::fs::write(&file, m(&wrong)).unwrap();
    let out = hub.edgectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.wasm.component") && err.contains("manifest unknown"), "{err}");
    assert_eq!(hub.workload("web").unwrap()["metadata"]["generation"], 2);

    // An unreachable registry is reported as such.
    std::fs::write(&file, m(&format!("oci://127.0.0.1:{}/edge/hello:v1", free_port()))).unwrap();
    let err = String::from_utf8_lossy(&hub.edgectl(&["apply", "-f", file.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("cannot reach registry"), "{err}");
}

/// A registry that answers every manifest request with the same document,
/// whatever digest was asked for (a real one cannot be made to lie).
fn lying_registry() -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.wasm.config.v0+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    addr
}

#[test]
fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let t = TempDir::new("liar");
    let hub = Hub::start(t.path(), HubOpts::default());
    let liar = lying_registry();
    let file = t.path().join("web.toml");
    let want = format!("sha256:{}", "ab".repeat(32));
    std::fs::write(
        &file,
        service_manifest("web", &format!("oci://{liar}/edge/hello@{want}"), &["w.local"], &["/"], ""),
    )
    .unwrap();
    let out = hub.edgectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("not the {want} asked for")), "{err}");
    assert!(hub.workload("web").is_none());
}
