//! Per-replica logs: `DATA_DIR/logs/<workload>.<replica>.log`.
//!
//! Each line is `<RFC 3339 time> <stream> <text>`, the shape CRI runtimes
//! use, so a reader can show or strip timestamps. A file is rotated to
//! `.log.1` when it passes [`ROTATE_BYTES`]; nothing is fsynced (logs are
//! not worth the flash wear). Every write bumps a counter readers can wait on.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// 1 MiB per file, two files per replica: bounded space on small cards.
pub const ROTATE_BYTES: u64 = 1 << 20;

/// Longest line kept whole; longer output is split (a guest printing without
/// newlines must not grow the agent's memory).
const MAX_LINE: usize = 16 << 10;

pub struct Logs {
    dir: PathBuf,
    sinks: Mutex<HashMap<String, Arc<LogSink>>>,
}

impl Logs {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Logs { dir: dir.to_path_buf(), sinks: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.log"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LogSink>>> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sink for a replica, shared by all its runs.
    pub fn sink(&self, key: &str) -> Arc<LogSink> {
        self.lock()
            .entry(key.to_string())
            .or_insert_with(|| {
                let (tx, _) = watch::channel(0);
                Arc::new(LogSink { path: self.path(key), inner: Mutex::new(SinkInner::default()), written: tx })
            })
            .clone()
    }

    /// A counter that changes whenever the replica's log grows.
    pub fn watch(&self, key: &str) -> watch::Receiver<u64> {
        self.sink(key).written.subscribe()
    }

    /// Deletes a replica's logs (it was removed from this node).
    pub fn remove(&self, key: &str) {
        self.lock().remove(key);
        let p = self.path(key);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(rotated(&p));
    }
}

fn rotated(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

#[derive(Default)]
struct SinkInner {
    file: Option<File>,
    size: u64,
    partial: HashMap<&'static str, Vec<u8>>,
}

pub struct LogSink {
    path: PathBuf,
    inner: Mutex<SinkInner>,
    written: watch::Sender<u64>,
}

impl LogSink {
    /// Appends guest output; complete lines are written, a trailing partial
    /// line waits for its newline (or [`LogSink::flush_partial`]).
    pub fn write(&self, stream: &'static str, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = inner.partial.remove(stream).unwrap_or_default();
        buf.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let rest = buf.split_off(pos + 1);
            buf.pop();
            lines.push(std::mem::replace(&mut buf, rest));
        }
        while buf.len() > MAX_LINE {
            let rest = buf.split_off(MAX_LINE);
            lines.push(std::mem::replace(&mut buf, rest));
        }
        if !buf.is_empty() {
            inner.partial.insert(stream, buf);
        }
        for line in lines {
            self.append(&mut inner, stream, &line);
        }
    }

    /// Writes any unterminated output (at the end of a run).
    pub fn flush_partial(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let partial: Vec<(&'static str, Vec<u8>)> = inner.partial.drain().collect();
        for (stream, line) in partial {
            self.append(&mut inner, stream, &line);
        }
    }

    /// Lines from the agent itself about this replica (exits, traps); a
    /// multi-line text (a backtrace) becomes several entries.
    pub fn note(&self, text: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for line in text.lines() {
            self.append(&mut inner, "edge", line.as_bytes());
        }
    }

    fn append(&self, inner: &mut SinkInner, stream: &str, line: &[u8]) {
        if inner.file.is_none() || inner.size >= ROTATE_BYTES {
            if inner.size >= ROTATE_BYTES {
                inner.file = None;
                let _ = std::fs::rename(&self.path, rotated(&self.path));
            }
            match OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(f) => {
                    inner.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    inner.file = Some(f);
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot open log: {e}");
                    return;
                }
            }
        }
        let mut out = Vec::with_capacity(line.len() + 40);
        out.extend_from_slice(edge_api::time::rfc3339(edge_api::time::now_ms()).as_bytes());
        out.push(b' ');
        out.extend_from_slice(stream.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&String::from_utf8_lossy(line).into_owned().into_bytes());
        out.push(b'\n');
        if let Some(f) = inner.file.as_mut()
            && f.write_all(&out).is_ok()
        {
            inner.size += out.len() as u64;
            self.written.send_modify(|n| *n += out.len() as u64);
        }
    }
}

/// The last `tail` lines (all if `None`) of a replica's log, across rotation,
/// and the offset in the current file where following should continue.
pub fn read_tail(path: &Path, tail: Option<u64>) -> std::io::Result<(String, u64)> {
    let mut text = Vec::new();
    if let Ok(mut f) = File::open(rotated(path)) {
        f.read_to_end(&mut text)?;
    }
    let mut f = File::open(path)?;
    f.read_to_end(&mut text)?;
    let end = f.stream_position()?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let out = match tail {
        None => text,
        Some(n) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n as usize);
            let mut s = lines[from..].join("\n");
            if !s.is_empty() {
                s.push('\n');
            }
            s
        }
    };
    Ok((out, end))
}

/// What was appended since `offset`; restarts at 0 when the file was rotated.
pub fn read_from(path: &Path, offset: u64) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = if len < offset { 0 } else { offset };
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), start + buf.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs() -> (Logs, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "edge-logs-{}-{}",
            std::process::id(),
            edge_api::keys::random_hex(4).unwrap()
        ));
        (Logs::open(&dir).unwrap(), dir)
    }

    #[test]
    fn lines_are_stamped_and_split_per_stream() {
        let (l, dir) = logs();
        let s = l.sink("a.0");
        s.write("stdout", b"hel");
        s.write("stderr", b"oops\n");
        s.write("stdout", b"lo\nwor");
        s.flush_partial();
        let (text, _) = read_tail(&l.path("a.0"), None).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, ["stderr oops", "stdout hello", "stdout wor"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tail_spans_rotation_and_follow_restarts_after_it() {
        let (l, dir) = logs();
        let s = l.sink("a.0");
        let line = vec![b'x'; 1000];
        let n = (ROTATE_BYTES / 1000) as usize + 10;
        for _ in 0..n {
            s.write("stdout", &[&line[..], b"\n"].concat());
        }
        assert!(rotated(&l.path("a.0")).exists());
        let (all, end) = read_tail(&l.path("a.0"), None).unwrap();
        assert_eq!(all.lines().count(), n);
        let (last, _) = read_tail(&l.path("a.0"), Some(3)).unwrap();
        assert_eq!(last.lines().count(), 3);
        s.write("stdout", b"new\n");
        let (more, _) = read_from(&l.path("a.0"), end).unwrap();
        assert!(more.ends_with("stdout new\n"), "{more}");
        l.remove("a.0");
        assert!(!l.path("a.0").exists() && !rotated(&l.path("a.0")).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn endless_output_without_newlines_is_bounded() {
        let (l, dir) = logs();
        let s = l.sink("a.0");
        s.write("stdout", &vec![b'y'; MAX_LINE * 3 + 5]);
        let (text, _) = read_tail(&l.path("a.0"), None).unwrap();
        assert_eq!(text.lines().count(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
