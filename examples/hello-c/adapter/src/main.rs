//! Writes the WASI preview 1 → preview 2 reactor adapter of wasmtime 48 to
//! the path given, for `wasm-tools component new --adapt`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: write-adapter OUT.wasm");
    std::fs::write(&path, wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER)
        .unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
}
