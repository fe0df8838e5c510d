//! Manifests as edgectl and the hub read them (TOML and JSON, workloads and
//! secrets). Nothing may panic; whatever parses, printed as `get -o json`
//! prints it, parses again to the same value.
#![no_main]

use edge_api::manifest::{self, Document, Origin};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for json in [false, true] {
        for origin in [Origin::File, Origin::Api] {
            match manifest::parse_document(text, json, origin) {
                Ok(Document::Workload(w)) => {
                    let printed = serde_json::to_string(&w).unwrap();
                    let again = manifest::parse_json(&printed, origin)
                        .unwrap_or_else(|e| panic!("printed workload does not parse again: {e}\n{printed}"));
                    assert_eq!(again, *w, "{printed}");
                    let _ = w.spec.reserved();
                    let _ = w.spec.secret_names();
                }
                Ok(Document::Secret(s)) => {
                    let printed = serde_json::to_string(&s).unwrap();
                    let again = manifest::parse_secret_json(&printed)
                        .unwrap_or_else(|e| panic!("printed secret does not parse again: {e}"));
                    assert_eq!(again, s);
                }
                Err(e) => {
                    assert!(!e.0.is_empty());
                    let _ = e.to_string();
                }
            }
        }
    }
});
