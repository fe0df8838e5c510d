//! Container images' platforms, read from a real registry (Debian's
//! docker-registry) into which skopeo copied images laid out by the test:
//! a multi-platform index (with an attestation entry that is not an image),
//! a single-platform Docker image, and a WebAssembly artifact that is not an
//! image at all. Which platform each node takes follows containerd's rules.

use edge_api::digest::Digest;
use edge_api::platform::Platform;
use edge_oci::{Client, OciError, Reference};
use edge_tests::oci_layout::Layout;
use edge_tests::*;
use serde_json::json;

#[test]
fn image_platforms_come_from_indexes_and_configs_and_nodes_take_the_best() {
    let t = TempDir::new("images");
    let (_registry, addr) = registry(t.path());
    let mut layout = Layout::new(&t.path().join("layout"));
    let files = t.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("hello"), "hello").unwrap();
    let layer = layout.layer_from_dir(&files);
    let run = json!({ "Cmd": ["/hello"] });
    let mut images: Vec<serde_json::Value> = ["linux/amd64", "linux/arm64/v8", "linux/arm/v6", "linux/arm/v7"]
        .iter()
        .map(|p| layout.image(p, std::slice::from_ref(&layer), run.clone()))
        .collect();
    // An attestation, as buildkit adds: an image manifest for unknown/unknown.
    let mut attestation = layout.image("unknown/unknown", std::slice::from_ref(&layer), json!({}));
    attestation["annotations"] = json!({ "vnd.docker.reference.type": "attestation-manifest" });
    images.push(attestation);
    let multi = layout.index(&images);
    layout.tag("multi", &multi);
    let single = layout.image("linux/arm/v7", std::slice::from_ref(&layer), run);
    layout.tag("single", &single);
    layout.push("multi", &format!("{addr}/edge/multi:1"), &[]);
    // Docker's own manifest format, with the platform only in the config.
    layout.push("single", &format!("{addr}/edge/single:1"), &["--format", "v2s2"]);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = Client::new(vec![]).unwrap();
    let platforms = |r: &str| rt.block_on(client.image_platforms(&r.parse::<Reference>().unwrap()));

    let multi = platforms(&format!("oci://{addr}/edge/multi:1")).unwrap();
    let names: Vec<String> = multi.images.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64", "linux/arm/v6", "linux/arm/v7"], "the attestation is left out");
    let offered: Vec<Platform> = multi.images.iter().map(|(p, _)| p.clone()).collect();
    for (node, want) in [
        ("amd64", Some("linux/amd64")),
        ("arm64", Some("linux/arm64")),
        ("arm/v7", Some("linux/arm/v7")),
        ("arm/v6", Some("linux/arm/v6")),
        ("riscv64", None),
    ] {
        let got = Platform::best(&offered, &Platform::linux(node)).map(|i| multi.images[i].0.to_string());
        assert_eq!(got.as_deref(), want, "node {node}");
    }
    // Pinned by the index's digest: the same answer; a wrong pin is refused.
    let pinned = platforms(&format!("oci://{addr}/edge/multi@{}", multi.digest)).unwrap();
    assert_eq!(pinned, multi);
    let wrong = format!("oci://{addr}/edge/multi@{}", Digest::of(b"something else"));
    let e = platforms(&wrong).unwrap_err();
    assert!(matches!(e, OciError::Refused { status: 404, .. } | OciError::ManifestMismatch { .. }), "{e}");

    // One Docker v2 manifest: the platform comes from its config.
    let single = platforms(&format!("oci://{addr}/edge/single:1")).unwrap();
    assert_eq!(single.images.len(), 1);
    assert_eq!(single.images[0].0.to_string(), "linux/arm/v7");
    assert_eq!(single.images[0].1.media_type, "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(single.images[0].1.digest, single.digest);
    assert_eq!(Platform::best([&single.images[0].0], &Platform::linux("arm64")), Some(0), "32-bit on 64-bit ARM");
    assert_eq!(Platform::best([&single.images[0].0], &Platform::linux("amd64")), None);

    // A WebAssembly artifact is not a container image, and says what to use.
    let hub = Hub::start(t.path(), HubOpts::default());
    let wasm = t.path().join("hello.wasm");
    std::fs::copy(repo().join("examples/hello.wasm"), &wasm).unwrap();
    hub.ctl(&["push", wasm.to_str().unwrap(), &format!("oci://{addr}/edge/hello:1")]);
    let e = platforms(&format!("oci://{addr}/edge/hello:1")).unwrap_err().to_string();
    assert!(e.contains("is not a container image") && e.contains("[spec.wasm]"), "{e}");
    // Nothing there: the registry's answer, named.
    let e = platforms(&format!("oci://{addr}/edge/missing:1")).unwrap_err().to_string();
    assert!(e.contains("refused") && e.contains("404"), "{e}");
}
