//! `edgectl create secret`, `get secrets`, `describe secret`: values go to
//! the hub and are never shown again (only keys and sizes).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use edge_api::model::{Secret, SecretMetadata, SecretView};
use edge_api::time::{age, now_ms};
use hyper::Method;

use crate::client::Hub;
use crate::output::{Format, table};

/// Sends a secret; returns the hub's verdict (`created`, `configured`, `unchanged`).
pub async fn apply(hub: &Hub, s: &Secret) -> anyhow::Result<String> {
    let body = serde_json::to_vec(s)?;
    let resp: serde_json::Value = hub
        .json(Method::PUT, &format!("/v1/secrets/{}", s.metadata.name), Some(("application/json", Bytes::from(body))))
        .await?;
    Ok(resp["result"].as_str().unwrap_or("applied").to_string())
}

/// A secret from `--from-literal KEY=VALUE` and `--from-file [KEY=]PATH`
/// (the key defaults to the file's name), checked as the hub will.
pub fn from_sources(name: &str, literals: &[String], files: &[String]) -> anyhow::Result<Secret> {
    let mut data = BTreeMap::new();
    let mut add = |k: String, v: String, what: &str| -> anyhow::Result<()> {
        if data.insert(k.clone(), v).is_some() {
            bail!("{what}: key {k:?} is given twice");
        }
        Ok(())
    };
    for l in literals {
        let (k, v) = l.split_once('=').with_context(|| {
            format!("--from-literal {k:?}: expected KEY=VALUE", k = l.split('=').next().unwrap_or(""))
        })?;
        add(k.to_string(), v.to_string(), "--from-literal")?;
    }
    for f in files {
        let (k, path) = match f.split_once('=') {
            Some((k, p)) => (k.to_string(), p.to_string()),
            None => {
                let key = Path::new(f)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("--from-file {f}: cannot take a key from this path; use KEY=PATH"))?;
                (key.to_string(), f.clone())
            }
        };
        let meta = std::fs::metadata(&path).with_context(|| format!("--from-file {path}: cannot read it"))?;
        if meta.len() > edge_api::manifest::MAX_SECRET_VALUE as u64 {
            bail!(
                "--from-file {path}: {} bytes; a secret value holds at most {}",
                meta.len(),
                edge_api::manifest::MAX_SECRET_VALUE
            );
        }
        let bytes = std::fs::read(&path).with_context(|| format!("--from-file {path}: cannot read it"))?;
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("--from-file {path}: not UTF-8 text"))?;
        add(k, text, "--from-file")?;
    }
    if data.is_empty() {
        bail!("give the values: --from-literal KEY=VALUE or --from-file [KEY=]PATH");
    }
    let s = Secret {
        api_version: edge_api::API_VERSION.into(),
        kind: "Secret".into(),
        metadata: SecretMetadata { name: name.to_string(), labels: Default::default() },
        data,
    };
    // The same checks as a manifest, with the same field paths.
    edge_api::manifest::parse_secret_value(&serde_json::to_value(&s)?).map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn print(list: &[SecretView], out: Format) -> anyhow::Result<()> {
    match out {
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(list)?);
            return Ok(());
        }
        Format::Yaml => {
            print!("{}", crate::output::yaml(&serde_json::to_value(list)?));
            return Ok(());
        }
        Format::Name => {
            for s in list {
                println!("secret/{}", s.name);
            }
            return Ok(());
        }
        _ => {}
    }
    if list.is_empty() {
        eprintln!("No secrets. Make one with: edgectl create secret NAME --from-literal KEY=VALUE");
        return Ok(());
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.keys.len().to_string(),
                s.version.to_string(),
                if s.used_by.is_empty() { "<none>".into() } else { s.used_by.join(",") },
                age(now.saturating_sub(s.created_ms)),
            ]
        })
        .collect();
    print!("{}", table(&["NAME", "KEYS", "VERSION", "USED-BY", "AGE"], &rows));
    Ok(())
}

pub fn describe(s: &SecretView) -> String {
    let mut out = String::new();
    let mut field =
        |k: &str, v: String| out.push_str(&format!("{:<14}{}\n", format!("{k}:"), crate::output::clean(&v)));
    field("Name", s.name.clone());
    field("Labels", crate::labels(&s.labels));
    field("Version", s.version.to_string());
    field("Created", crate::when(Some(s.created_ms)));
    field("Updated", crate::when(Some(s.updated_ms)));
    field("Used by", if s.used_by.is_empty() { "<none>".into() } else { s.used_by.join(", ") });
    out.push_str("Data (values are never shown):\n");
    for (k, n) in &s.keys {
        out.push_str(&format!("  {}: {n} bytes\n", crate::output::clean(k)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_make_a_checked_secret() {
        let dir = std::env::temp_dir().join(format!("edgectl-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ca.crt");
        std::fs::write(&f, "PEM").unwrap();
        let s = from_sources("db", &["password=a=b".into()], &[f.display().to_string()]).unwrap();
        assert_eq!(s.data["password"], "a=b");
        assert_eq!(s.data["ca.crt"], "PEM");
        let s = from_sources("db", &[], &[format!("tls.pem={}", f.display())]).unwrap();
        assert_eq!(s.data["tls.pem"], "PEM");

        assert!(from_sources("db", &["novalue".into()], &[]).unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(from_sources("db", &["a=1".into(), "a=2".into()], &[]).unwrap_err().to_string().contains("twice"));
        assert!(from_sources("db", &[], &[]).unwrap_err().to_string().contains("give the values"));
        let e = from_sources("db", &["../x=1".into()], &[]).unwrap_err().to_string();
        assert!(e.contains("data.../x"), "{e}");
        let e = from_sources("Bad", &["a=1".into()], &[]).unwrap_err().to_string();
        assert!(e.contains("metadata.name"), "{e}");
        std::fs::write(&f, vec![b'x'; edge_api::manifest::MAX_SECRET_VALUE + 1]).unwrap();
        let e = from_sources("db", &[], &[f.display().to_string()]).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
