//! Where edgectl finds the hub, its token and the CA its certificate is
//! signed by: flags, then the environment (`EDGE_HUB`, `EDGE_TOKEN` or
//! `EDGE_TOKEN_FILE`, `EDGE_CA`), then a config file (`EDGE_CONFIG`, or
//! `$XDG_CONFIG_HOME/edge/config.toml`, or `~/.config/edge/config.toml`),
//! which `edgectl up` and `edgectl config set-hub` write.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct FileConfig {
    pub hub: Option<String>,
    pub token: Option<String>,
    /// The CA certificate (PEM) the hub's is pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct Target {
    pub hub: String,
    pub token: String,
    pub ca: Option<PathBuf>,
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

/// A token read from a file (the first line, trimmed).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
    Ok(token)
}

/// The hub to use, or an error that says how to name it.
pub fn resolve(
    hub: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Target> {
    let file = load()?;
    let hub = hub.or(file.hub).unwrap_or_else(|| "https://127.0.0.1:7443".to_string());
    let token = match (token, token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(read_token(&f)?),
        (None, None) => file.token,
    };
    let token = token.context(
        "no API token: set EDGE_TOKEN or EDGE_TOKEN_FILE, pass --token-file (the hub writes an admin token to DATA_DIR/admin.token), or run `edgectl config set-hub` or `edgectl up`",
    )?;
    Ok(Target { hub, token, ca: ca.or(file.ca) })
}

/// Points edgectl at a hub: its URL, the CA its certificate is signed by
/// (copied next to the config file) and the token from `token_file`.
pub fn set_hub(
    url: &str,
    ca: Option<&std::path::Path>,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(url.starts_with("https://") || url.starts_with("http://"), "{url:?} is not an http(s):// URL");
    let mut c = load()?;
    c.hub = Some(url.trim_end_matches('/').to_string());
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read the CA file {}", ca.display()))?;
        edge_oci::roots(Some(&pem)).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
        let p = path().context("cannot tell where to write the config file: set EDGE_CONFIG or HOME")?;
        let dest = p.with_file_name("hub-ca.pem");
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&dest, pem).with_context(|| format!("cannot write {}", dest.display()))?;
        c.ca = Some(dest);
    }
    if let Some(f) = token_file {
        c.token = Some(read_token(f)?);
    }
    save(&c)
}
