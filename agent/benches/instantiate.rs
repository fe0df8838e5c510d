//! Instantiation on the request path: a fresh `Store` and instance per
//! request, with a warm `ProxyPre`, exactly as the proxy serves requests
//! (`HttpService::handle`), minus the network.
//!
//! `cargo bench -p edge-agent --bench instantiate [-- N]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_agent::logs::Logs;
use edge_agent::wasm::{Capabilities, HttpService, Limits, NoHub, WasmRuntime};
use edge_api::digest::Digest;
use http_body_util::{BodyExt, Empty};

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = std::env::temp_dir().join(format!("edge-bench-instantiate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let component = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-http.wasm");
    let digest = Digest::of(&std::fs::read(&component).expect("examples/hello-http.wasm"));
    let logs = Logs::open(&dir.join("logs")).expect("logs");
    let node_memory = 4u64 << 30;
    let wasm = WasmRuntime::new(&dir.join("cache"), node_memory, edge_agent::wasm::PoolSize::Auto);
    wasm.cache.in_process.store(true, std::sync::atomic::Ordering::Relaxed);
    let pre = rt
        .block_on(wasm.prepare_proxy(digest, component, &NoHub(edge_api::keys::SigningKey::generate().unwrap())))
        .expect("prepare");
    let caps = Capabilities {
        env: vec![("EDGE_NODE".into(), "bench".into())],
        outbound: Arc::new(vec![]),
        kv: None,
        sink: logs.sink("bench.0"),
        files: Default::default(),
    };
    let limits = Limits {
        memory: 16 << 20,
        budget: None,
        request_timeout: Duration::from_secs(30),
        cpu_budget: Some(Duration::from_secs(1)),
        cpu_share: None,
    };
    let svc = Arc::new(HttpService::new("bench.0".into(), "bench".into(), 1, pre, caps, limits, 64));

    let one = |svc: Arc<HttpService>| async move {
        let req = hyper::Request::get("http://bench.local/").body(Empty::<Bytes>::new()).expect("request");
        let resp = svc.handle(req).await;
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body.starts_with(b"Hello"));
    };
    rt.block_on(async {
        for _ in 0..1000 {
            one(svc.clone()).await;
        }
    });
    let mut times = Vec::with_capacity(n);
    let started = Instant::now();
    rt.block_on(async {
        for _ in 0..n {
            let t = Instant::now();
            one(svc.clone()).await;
            times.push(t.elapsed());
        }
    });
    let total = started.elapsed();
    times.sort();
    println!(
        "instantiate + handle + read body, warm ProxyPre, {} allocator: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs; {:.0} requests/s on one thread (n={n})",
        if wasm.pooled.load(std::sync::atomic::Ordering::Relaxed) { "pooling" } else { "on-demand" },
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.9).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        percentile(&times, 1.0).as_secs_f64() * 1e6,
        n as f64 / total.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
