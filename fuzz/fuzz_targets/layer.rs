//! Image layers as the agent unpacks them (tar, possibly hostile: `..`,
//! absolute paths, symlinks and hard links pointing out, whiteouts): nothing
//! may be written outside the image root, and nothing may panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fn only(dir: &Path, name: &str) {
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, [name], "something was written outside the root, in {}", dir.display());
}

fuzz_target!(|data: &[u8]| {
    let base = std::env::temp_dir().join(format!("edge-fuzz-layer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("a/b/root");
    std::fs::create_dir_all(&root).unwrap();
    let _ = edge_oci::unpack::unpack(|| Ok::<_, String>(std::io::Cursor::new(data)), &root);
    only(&base, "a");
    only(&base.join("a"), "b");
    only(&base.join("a/b"), "root");
    for parts in [&["etc", "passwd"][..], &["etc", "group"]] {
        let _ = edge_oci::unpack::read_in_image(&root, parts, 1 << 20);
    }
    let _ = std::fs::remove_dir_all(&base);
});
