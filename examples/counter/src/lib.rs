//! Counts visits in `wasi:keyvalue`, which the agent keeps on the node's
//! disk: the count survives agent restarts, updates and reboots.
//!
//! ```text
//! GET /        counts this visit and says which it was
//! GET /count   the count, without counting
//! ```

use std::io::Write as _;

use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

// The agent's host world, from the repository's wit/ directory.
wit_bindgen::generate!({ path: "../../wit", world: "edge:host/host", generate_all });

use wasi::keyvalue::{atomics, store};

wasip2::http::proxy::export!(Counter);

struct Counter;

fn respond(out: ResponseOutparam, status: u16, body: String) {
    let resp = OutgoingResponse::new(Fields::new());
    let _ = resp.set_status_code(status);
    let Ok(outgoing) = resp.body() else { return };
    ResponseOutparam::set(out, Ok(resp));
    if let Ok(mut stream) = outgoing.write() {
        let _ = stream.write_all(body.as_bytes());
        let _ = stream.flush();
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

fn count(bucket: &store::Bucket) -> Result<u64, store::Error> {
    Ok(bucket
        .get("visits")?
        .and_then(|v| v.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0))
}

impl wasip2::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let node = std::env::var("EDGE_NODE").unwrap_or_default();
        let bucket = match store::open("default") {
            Ok(b) => b,
            Err(e) => return respond(out, 500, format!("cannot open the store: {e:?}\n")),
        };
        let path = request.path_with_query().unwrap_or_default();
        let result = if path.starts_with("/count") {
            count(&bucket).map(|n| format!("{n} visits so far on {node}\n"))
        } else {
            atomics::increment(&bucket, "visits", 1).map(|n| format!("visit {n} on {node}\n"))
        };
        match result {
            Ok(text) => respond(out, 200, text),
            Err(e) => respond(out, 500, format!("key-value error: {e:?}\n")),
        }
    }
}
