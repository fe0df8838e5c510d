//! Log streams in flight: the hub asks a node for a replica's log, the node
//! answers with numbered chunks on its response channel, and the hub hands
//! them to the waiting HTTP reader.
//!
//! Architecture invariant: a chunk is taken only from the node the stream
//! was opened with, in order, once (MQTT QoS 1 may redeliver); a reader
//! that cannot keep up or went away ends its stream, never blocks the hub.

use std::collections::HashMap;
use std::sync::Mutex;

use edge_api::wire::Response;
use tokio::sync::mpsc;

/// Chunks a reader may fall behind by before its stream is ended.
const READER_BACKLOG: usize = 256;

/// How a log stream reaches the HTTP reader.
#[derive(Debug, PartialEq, Eq)]
pub enum LogChunk {
    Data(String),
    Error(String),
}

/// A response that came from a node other than the one asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("response for stream {id} from {from:?}, expected {expected:?}")]
pub struct WrongNode {
    pub id: String,
    pub from: String,
    pub expected: String,
}

struct Stream {
    node: String,
    tx: mpsc::Sender<LogChunk>,
    next_seq: u64,
}

#[derive(Default)]
pub struct LogStreams {
    streams: Mutex<HashMap<String, Stream>>,
}

impl LogStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stream>> {
        // The map is valid after any panic: each edit is one insert or remove.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts waiting for stream `id` from `node`.
    pub fn open(&self, id: &str, node: &str) -> mpsc::Receiver<LogChunk> {
        let (tx, rx) = mpsc::channel(READER_BACKLOG);
        self.lock().insert(id.to_string(), Stream { node: node.to_string(), tx, next_seq: 0 });
        rx
    }

    /// Forgets a stream; returns the node it was asked of, if it was open.
    pub fn close(&self, id: &str) -> Option<String> {
        self.lock().remove(id).map(|s| s.node)
    }

    /// Streams open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes a node's response to its reader.
    pub fn on_response(&self, node: &str, r: Response) -> Result<(), WrongNode> {
        let mut streams = self.lock();
        let Some(s) = streams.get_mut(&r.id) else {
            return Ok(()); // the reader already left
        };
        if s.node != node {
            return Err(WrongNode { id: r.id, from: node.to_string(), expected: s.node.clone() });
        }
        if r.seq < s.next_seq {
            return Ok(()); // a redelivered duplicate (QoS 1)
        }
        s.next_seq = r.seq + 1;
        let mut ok = true;
        if !r.data.is_empty() {
            ok = s.tx.try_send(LogChunk::Data(r.data)).is_ok();
        }
        if let Some(e) = r.error {
            ok = s.tx.try_send(LogChunk::Error(e)).is_ok() && ok;
        }
        if r.eof || !ok {
            streams.remove(&r.id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(id: &str, seq: u64, data: &str, eof: bool) -> Response {
        Response { id: id.into(), seq, data: data.into(), error: None, eof }
    }

    #[test]
    fn chunks_arrive_in_order_once_and_the_stream_ends_at_eof() {
        let s = LogStreams::default();
        let mut rx = s.open("a", "pi-1");
        s.on_response("pi-1", resp("a", 0, "one\n", false)).unwrap();
        s.on_response("pi-1", resp("a", 0, "one\n", false)).unwrap(); // redelivered
        s.on_response("pi-1", resp("a", 1, "two\n", true)).unwrap();
        assert_eq!(rx.try_recv(), Ok(LogChunk::Data("one\n".into())));
        assert_eq!(rx.try_recv(), Ok(LogChunk::Data("two\n".into())));
        assert!(rx.try_recv().is_err());
        assert!(s.is_empty(), "eof ends the stream");
    }

    #[test]
    fn another_node_cannot_write_into_a_stream() {
        let s = LogStreams::default();
        let mut rx = s.open("a", "pi-1");
        let e = s.on_response("pi-2", resp("a", 0, "forged", false)).unwrap_err();
        assert_eq!(e.to_string(), "response for stream a from \"pi-2\", expected \"pi-1\"");
        assert!(rx.try_recv().is_err());
        assert_eq!(s.len(), 1);
        assert_eq!(s.close("a").as_deref(), Some("pi-1"));
        assert_eq!(s.close("a"), None);
    }

    #[test]
    fn a_reader_that_falls_behind_or_leaves_ends_its_stream() {
        let s = LogStreams::default();
        let rx = s.open("slow", "pi-1");
        for seq in 0..READER_BACKLOG as u64 {
            s.on_response("pi-1", resp("slow", seq, "x", false)).unwrap();
        }
        assert_eq!(s.len(), 1);
        s.on_response("pi-1", resp("slow", READER_BACKLOG as u64, "x", false)).unwrap();
        assert!(s.is_empty(), "one chunk too many ends it");
        drop(rx);
        let gone = s.open("gone", "pi-1");
        drop(gone);
        s.on_response("pi-1", resp("gone", 0, "x", false)).unwrap();
        assert!(s.is_empty());
        // An error reaches the reader, and an unknown stream is no error.
        let mut rx = s.open("e", "pi-1");
        s.on_response("pi-1", Response { error: Some("no such replica".into()), ..resp("e", 0, "", true) }).unwrap();
        assert_eq!(rx.try_recv(), Ok(LogChunk::Error("no such replica".into())));
        s.on_response("pi-1", resp("never-opened", 0, "x", false)).unwrap();
    }
}
