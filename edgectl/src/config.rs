//! Where edgectl finds the hub and its token: flags, then the environment
//! (`EDGE_HUB`, `EDGE_TOKEN`), then a config file (`EDGE_CONFIG`, or
//! `$XDG_CONFIG_HOME/edge/config.toml`, or `~/.config/edge/config.toml`),
//! which `edgectl up` writes.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct FileConfig {
    pub hub: Option<String>,
    pub token: Option<String>,
}

pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EDGE_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("edge").join("config.toml"))
}

pub fn load() -> anyhow::Result<FileConfig> {
    let Some(p) = path() else { return Ok(FileConfig::default()) };
    match std::fs::read_to_string(&p) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("cannot read the config file {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read the config file {}", p.display())),
    }
}

pub fn save(c: &FileConfig) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path().context("cannot tell where to write the config file: set EDGE_CONFIG or HOME")?;
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(c)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("cannot write {}", p.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", p.display()))?;
    Ok(p)
}

/// The hub URL and token to use, or an error that says how to provide them.
pub fn resolve(hub: Option<String>, token: Option<String>) -> anyhow::Result<(String, String)> {
    let file = load()?;
    let hub = hub.or(file.hub).unwrap_or_else(|| "http://127.0.0.1:7443".to_string());
    let token = token.or(file.token).context(
        "no API token: pass --token or set EDGE_TOKEN (the hub writes it to DATA_DIR/admin.token), or run `edgectl up`",
    )?;
    Ok((hub, token))
}
