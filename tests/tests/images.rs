//! Container images' platforms, read from a real registry (Debian's
//! docker-registry) into which skopeo copied images laid out by the test:
//! a multi-platform index (with an attestation entry that is not an image),
//! a single-platform Docker image, and a WebAssembly artifact that is not an
//! image at all. Which platform each node takes follows containerd's rules.

use std::path::Path;
use std::process::Command;

use edge_api::digest::Digest;
use edge_api::platform::Platform;
use edge_oci::{Client, OciError, Reference};
use edge_tests::*;
use serde_json::json;

/// Writes `bytes` as a blob of the OCI layout at `dir`; returns its descriptor.
fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let d = Digest::of(bytes);
    std::fs::write(dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    json!({ "mediaType": media_type, "digest": d.to_string(), "size": bytes.len() })
}

/// An image for one platform: a config and one (tiny, real) gzip'd tar layer.
fn image(dir: &Path, os: &str, arch: &str, variant: Option<&str>) -> serde_json::Value {
    let work = dir.join(format!("layer-{arch}{}", variant.unwrap_or("")));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("platform"), format!("{os}/{arch}")).unwrap();
    let tar = work.with_extension("tar");
    let ok = Command::new("tar").arg("-cf").arg(&tar).arg("-C").arg(&work).arg("platform").status().unwrap();
    assert!(ok.success());
    let ok = Command::new("gzip").args(["-k", "-n", "-f"]).arg(&tar).status().unwrap();
    assert!(ok.success());
    let layer_bytes = std::fs::read(work.with_extension("tar.gz")).unwrap();
    let layer = blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &layer_bytes);
    let diff_id = Digest::of(&std::fs::read(&tar).unwrap()).to_string();
    let mut config = json!({
        "os": os, "architecture": arch,
        "config": { "Cmd": ["/bin/true"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    if let Some(v) = variant {
        config["variant"] = json!(v);
    }
    let config = blob(dir, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": [layer],
    });
    let mut d = blob(dir, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
    let mut platform = json!({ "os": os, "architecture": arch });
    if let Some(v) = variant {
        platform["variant"] = json!(v);
    }
    d["platform"] = platform;
    d
}

fn skopeo(args: &[&str]) {
    let out =
        Command::new("skopeo").args(args).output().expect("skopeo (apt-get install skopeo; the test command does)");
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn image_platforms_come_from_indexes_and_configs_and_nodes_take_the_best() {
    let t = TempDir::new("images");
    let (_registry, addr) = registry(t.path());
    let layout = t.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();

    let amd64 = image(&layout, "linux", "amd64", None);
    let arm64 = image(&layout, "linux", "arm64", Some("v8"));
    let armv6 = image(&layout, "linux", "arm", Some("v6"));
    let armv7 = image(&layout, "linux", "arm", Some("v7"));
    // An attestation, as buildkit adds: an image manifest for unknown/unknown.
    let mut attestation = image(&layout, "unknown", "unknown", None);
    attestation["annotations"] = json!({ "vnd.docker.reference.type": "attestation-manifest" });
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd64, arm64, armv6, armv7, attestation],
    });
    let mut multi = blob(&layout, "application/vnd.oci.image.index.v1+json", index.to_string().as_bytes());
    multi["annotations"] = json!({ "org.opencontainers.image.ref.name": "multi" });
    let mut single = image(&layout, "linux", "arm", Some("v7"));
    single.as_object_mut().unwrap().remove("platform");
    single["annotations"] = json!({ "org.opencontainers.image.ref.name": "single" });
    std::fs::write(layout.join("index.json"), json!({ "schemaVersion": 2, "manifests": [multi, single] }).to_string())
        .unwrap();
    let src = |tag: &str| format!("oci:{}:{tag}", layout.display());
    skopeo(&["copy", "--all", "--dest-tls-verify=false", &src("multi"), &format!("docker://{addr}/edge/multi:1")]);
    // Docker's own manifest format, with the platform only in the config.
    skopeo(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &src("single"),
        &format!("docker://{addr}/edge/single:1"),
    ]);

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
