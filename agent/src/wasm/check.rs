//! Command probes of Wasm workloads: the replica's own component, run as a
//! command (its `wasi:cli/run` export) in a fresh instance with the
//! replica's environment, key-value namespace, secrets and limits, and the
//! probe's arguments. Exit code 0 passes. What it printed last is the
//! probe's text (not the replica's log: a probe every few seconds would
//! bury it).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use edge_api::reason::Reason;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::{Capabilities, Host, Limits, classify, new_store};

/// The bytes of output a probe keeps: the end of what it printed.
const TAIL: usize = 512;

/// The last [`TAIL`] bytes written to a probe's stdout and stderr.
#[derive(Clone, Default)]
pub(super) struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, buf: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let keep = &buf[buf.len().saturating_sub(TAIL)..];
        let over = (t.len() + keep.len()).saturating_sub(TAIL);
        t.drain(..over);
        t.extend(keep);
    }

    /// The last line printed, trimmed (empty if nothing was).
    fn last_line(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = t.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        line.chars().filter(|c| !c.is_control()).take(200).collect()
    }
}

impl IsTerminal for Tail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Tail {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for Tail {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What a command probe of a Wasm command replica runs: its component,
/// capabilities and limits.
pub struct CommandCheck {
    pub(super) pre: CommandPre<Host>,
    pub(super) caps: Capabilities,
    pub(super) limits: Limits,
    /// argv\[0\] of every run: the workload's name, as for the replica.
    pub(super) program: String,
    /// One probe instance at a time: the scheduler reserved memory for
    /// the replica and one probe beside it.
    one: tokio::sync::Mutex<()>,
}

impl CommandCheck {
    pub fn new(pre: CommandPre<Host>, caps: Capabilities, limits: Limits, program: String) -> Self {
        CommandCheck { pre, caps, limits, program, one: tokio::sync::Mutex::new(()) }
    }

    /// Runs the component with `args` after argv\[0\]; the caller bounds
    /// the time (dropping the future ends the instance at its next yield).
    pub async fn run(&self, args: &[String]) -> Result<String, String> {
        let _one = self.one.lock().await;
        run(&self.pre, &self.caps, &self.limits, &self.program, args).await
    }
}

/// One command probe run: `Ok("exit 0")`, or why it failed with the last
/// line the component printed.
pub(super) async fn run(
    pre: &CommandPre<Host>,
    caps: &Capabilities,
    limits: &Limits,
    program: &str,
    args: &[String],
) -> Result<String, String> {
    let tail = Tail::default();
    let argv: Vec<String> = std::iter::once(program.to_string()).chain(args.iter().cloned()).collect();
    let mut store = new_store(pre.engine(), caps, limits, &argv, Some(&tail)).map_err(|e| format!("{e:#}"))?;
    let result = match pre.instantiate_async(&mut store).await {
        Ok(cmd) => cmd.wasi_cli_run().call_run(&mut store).await,
        Err(e) => {
            let (reason, message) = classify(&e, store.data(), Reason::InstantiateError);
            return Err(format!("{reason}: {message}"));
        }
    };
    let said = |code: i32| {
        let line = tail.last_line();
        if line.is_empty() { format!("exit {code}") } else { format!("exit {code}: {line}") }
    };
    match result {
        Ok(Ok(())) => Ok(said(0)),
        Ok(Err(())) => Err(said(1)),
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) if exit.0 == 0 => Ok(said(0)),
            Some(exit) => Err(said(exit.0)),
            None => {
                let (reason, message) = classify(&e, store.data(), Reason::Trap);
                Err(format!("{reason}: {message}"))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_keeps_the_end_of_what_it_printed() {
        let t = Tail::default();
        assert_eq!(t.last_line(), "");
        t.push(b"starting\nsensor stale: 42 s\n\n");
        assert_eq!(t.last_line(), "sensor stale: 42 s");
        t.push(&vec![b'x'; 2_000]);
        assert_eq!(t.0.lock().unwrap().len(), TAIL, "bounded");
        assert_eq!(t.last_line().len(), 200, "one line, cut");
        t.push(b"\nok\x1b[0m\n");
        assert_eq!(t.last_line(), "ok[0m", "control characters dropped");
    }
}
