//! A `wasi:http/proxy` service for the edge orchestrator.
//!
//! ```text
//! GET /                 a greeting naming the node, the workload and $VERSION
//! GET /echo             the request body, back
//! GET /sleep?ms=N       answers after N ms
//! GET /fetch?url=U      fetches U with wasi:http/outgoing-handler; status and body
//! GET /spin             loops forever (a CPU budget stops it)
//! GET /alloc?mib=N      allocates N MiB (a memory limit stops it)
//! GET /recurse          recurses without end (the stack limit stops it)
//! GET /trap             executes `unreachable`
//! ```

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme,
};

wasip2::http::proxy::export!(Service);

struct Service;

fn query<'a>(q: &'a str, name: &str) -> Option<&'a str> {
    q.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain; charset=utf-8".to_vec())])
        .unwrap_or_else(|_| Fields::new());
    let resp = OutgoingResponse::new(headers);
    let _ = resp.set_status_code(status);
    let Ok(outgoing) = resp.body() else { return };
    ResponseOutparam::set(out, Ok(resp));
    if let Ok(mut stream) = outgoing.write() {
        // Chunks of at most 4 KiB, the most a blocking write guarantees.
        for chunk in body.chunks(4096) {
            if stream.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = stream.flush();
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

/// Recurses until the wasm call stack runs out: on purpose, for the stack
/// limit test. Only scalar locals, so Rust's shadow stack in linear memory
/// is not what overflows; two calls, so LLVM cannot turn it into a loop.
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    if n == 0 {
        return 1;
    }
    recurse(n.wrapping_add(1)) ^ recurse(n.wrapping_add(2))
}

fn fetch(url: &str) -> Result<(u16, Vec<u8>), String> {
    let (scheme, rest) = url.split_once("://").ok_or("the url needs a scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|_| "bad method")?;
    req.set_scheme(Some(&if scheme == "https" { Scheme::Https } else { Scheme::Http })).map_err(|_| "bad scheme")?;
    req.set_authority(Some(authority)).map_err(|_| "bad authority")?;
    req.set_path_with_query(Some(path)).map_err(|_| "bad path")?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or("no response")?
        .map_err(|_| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = resp.consume().map_err(|_| "no body")?;
    let mut bytes = Vec::new();
    body.stream().map_err(|_| "no stream")?.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok((status, bytes))
}

impl wasip2::exports::http::incoming_handler::Guest for Service {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let pq = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, q) = pq.split_once('?').unwrap_or((pq.as_str(), ""));
        match path {
            "/echo" => {
                let mut body = Vec::new();
                if let Ok(incoming) = request.consume()
                    && let Ok(mut stream) = incoming.stream()
                {
                    let _ = stream.read_to_end(&mut body);
                }
                respond(out, 200, &body);
            }
            "/sleep" => {
                let ms: u64 = query(q, "ms").and_then(|v| v.parse().ok()).unwrap_or(100);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                respond(out, 200, format!("slept {ms} ms\n").as_bytes());
            }
            "/fetch" => match query(q, "url").map(fetch) {
                Some(Ok((status, body))) => {
                    let mut text = format!("upstream answered {status}\n").into_bytes();
                    text.extend_from_slice(&body);
                    respond(out, 200, &text);
                }
                Some(Err(e)) => respond(out, 502, format!("fetch failed: {e}\n").as_bytes()),
                None => respond(out, 400, b"give ?url=\n"),
            },
            "/spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/alloc" => {
                let mib: usize = query(q, "mib").and_then(|v| v.parse().ok()).unwrap_or(1024);
                let mut blocks = Vec::new();
                for i in 0..mib {
                    blocks.push(vec![i as u8; 1 << 20]);
                }
                respond(out, 200, format!("allocated {} MiB\n", blocks.len()).as_bytes());
            }
            "/recurse" => {
                let n = recurse(1);
                respond(out, 200, format!("{n}\n").as_bytes());
            }
            "/trap" => {
                #[cfg(target_family = "wasm")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_family = "wasm"))]
                respond(out, 500, b"");
            }
            _ => {
                let node = std::env::var("EDGE_NODE").unwrap_or_else(|_| "an unknown node".into());
                let workload = std::env::var("EDGE_WORKLOAD").unwrap_or_else(|_| "hello-http".into());
                let version = std::env::var("VERSION").unwrap_or_else(|_| "v1".into());
                let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
                respond(out, 200, format!("{greeting} from {workload} {version} on {node}\n").as_bytes());
            }
        }
    }
}
