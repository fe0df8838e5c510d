//! `edgectl apply -f`: validate locally, upload local components the hub
//! does not have, then create or update each workload.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use edge_api::digest::Digest;
use edge_api::manifest::{self, Document, Origin};
use edge_api::model::{ArtifactRef, Runtime, Workload};
use hyper::Method;

use crate::client::Hub;

/// A manifest read from a file (or stdin), validated, with its origin for messages.
pub struct Loaded {
    pub source: String,
    pub dir: PathBuf,
    pub doc: Document,
}

/// A workload manifest, ready to send.
pub struct LoadedWorkload {
    pub source: String,
    pub dir: PathBuf,
    pub workload: Workload,
}

/// Expands directories into the manifests they hold (`*.toml`, `*.json`).
pub fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("toml" | "json")))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{} holds no manifests (*.toml or *.json)", p.display());
            }
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let (text, source, dir) = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the manifest from stdin")?;
        (s, "<stdin>".to_string(), std::env::current_dir()?)
    } else {
        let s = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (s, path.display().to_string(), dir)
    };
    let is_json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let doc = manifest::parse_document(&text, is_json, Origin::File)
        .map_err(|e| anyhow::anyhow!("{source} is invalid: {e}"))?;
    Ok(Loaded { source, dir, doc })
}

/// What a file's first bytes say it is.
pub fn check_component(bytes: &[u8], shown: &str) -> anyhow::Result<()> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 0x0d, 0x00, 0x01, 0x00]) => Ok(()),
        Some([0, b'a', b's', b'm', 0x01, 0x00, 0x00, 0x00]) => bail!(
            "{shown} is a core WebAssembly module, not a component: build for wasm32-wasip2, or convert it with `wasm-tools component new`"
        ),
        _ => bail!("{shown} is not a WebAssembly component (it does not start with the \\0asm component header)"),
    }
}

/// Replaces a local component path with its digest, uploading it if needed.
async fn resolve_component(hub: &Hub, l: &mut LoadedWorkload, quiet: bool) -> anyhow::Result<()> {
    let Runtime::Wasm(w) = &mut l.workload.spec.runtime else { return Ok(()) };
    let ArtifactRef::Path(rel) = &w.component else { return Ok(()) };
    let path = l.dir.join(rel);
    let bytes = std::fs::read(&path)
        .with_context(|| format!("{}: spec.wasm.component: cannot read {}", l.source, path.display()))?;
    check_component(&bytes, &format!("{}: spec.wasm.component: {}", l.source, path.display()))?;
    let digest = Digest::of(&bytes);
    if !hub.has_artifact(&digest.to_string()).await? {
        if !quiet {
            eprintln!(
                "uploading {} ({}, {})",
                rel,
                edge_api::quantity::Memory(bytes.len() as u64).human(),
                digest.short()
            );
        }
        upload(hub, digest, bytes).await?;
    }
    w.source = Some(rel.clone());
    w.component = ArtifactRef::Digest(digest);
    Ok(())
}

pub async fn upload(hub: &Hub, digest: Digest, bytes: Vec<u8>) -> anyhow::Result<()> {
    let _: serde_json::Value = hub
        .json(Method::PUT, &format!("/v1/artifacts/{digest}"), Some(("application/wasm", Bytes::from(bytes))))
        .await?;
    Ok(())
}

/// Applies one validated manifest; returns the hub's verdict (`created`, `configured`, `unchanged`).
pub async fn apply_one(hub: &Hub, mut l: LoadedWorkload, quiet: bool) -> anyhow::Result<(String, String)> {
    resolve_component(hub, &mut l, quiet).await?;
    let name = l.workload.metadata.name.clone();
    let body = serde_json::to_vec(&l.workload)?;
    let resp: serde_json::Value = hub
        .json(Method::PUT, &format!("/v1/workloads/{name}"), Some(("application/json", Bytes::from(body))))
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", l.source))?;
    Ok((name, resp["result"].as_str().unwrap_or("applied").to_string()))
}

pub async fn wait_for(hub: &Hub, name: &str, cond: &str, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let path = format!("/v1/workloads/{name}/wait?for={cond}&timeout_ms={}", timeout.as_millis());
    // The hub answers within `timeout`; allow for the trip on top.
    Ok(hub.json_within(hyper::Method::GET, &path, None, timeout + Duration::from_secs(30)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_told_apart_from_modules_and_junk() {
        assert!(check_component(b"\0asm\x0d\x00\x01\x00rest", "x").is_ok());
        let e = check_component(b"\0asm\x01\x00\x00\x00", "m.wasm").unwrap_err().to_string();
        assert!(e.contains("core WebAssembly module"), "{e}");
        let e = check_component(b"#!/bin/sh", "s.wasm").unwrap_err().to_string();
        assert!(e.contains("not a WebAssembly component"), "{e}");
    }
}
