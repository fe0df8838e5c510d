//! What a registry answers: image indexes and manifests (the hub resolves
//! platforms from them, the agent picks its image), references and digests.
#![no_main]

use edge_api::platform::Platform;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r: edge_oci::Reference = "oci://registry.example/acme/app:1".parse().unwrap();
    if let Ok(index) = serde_json::from_slice::<edge_oci::Index>(data) {
        let images = edge_oci::index_images(&index);
        for arch in ["amd64", "arm64", "arm/v7", "arm/v6", "riscv64"] {
            if let Some(i) = Platform::best(images.iter().map(|(p, _)| p), &Platform::linux(arch)) {
                assert!(i < images.len());
                assert!(images[i].0.rank_on(&Platform::linux(arch)).is_some());
            }
        }
        let _ = edge_oci::wasm_manifest(&r, &index);
    }
    if let Ok(m) = serde_json::from_slice::<edge_oci::Manifest>(data) {
        let _ = edge_oci::wasm_layer(&r, &m);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(parsed) = text.parse::<edge_oci::Reference>() {
            let again: edge_oci::Reference = parsed.to_string().parse().expect("a reference prints as it parses");
            assert_eq!(again, parsed);
            let _ = parsed.target();
        }
        if let Ok(d) = text.parse::<edge_api::digest::Digest>() {
            assert_eq!(d.to_string().parse::<edge_api::digest::Digest>().unwrap(), d);
        }
    }
});
