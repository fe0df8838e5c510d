//! OCI references: `oci://registry[:port]/repository[:tag][@sha256:…]`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an OCI reference: {1} (expected oci://registry/repository[:tag][@sha256:...])")]
pub struct ReferenceError(pub String, pub &'static str);

/// `oci://registry/repository[:tag][@sha256:…]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        let err = |why| ReferenceError(s.to_string(), why);
        let rest = s.strip_prefix("oci://").ok_or_else(|| err("it must start with oci://"))?;
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                (r, Some(d.parse::<Digest>().map_err(|_| err("the digest must be sha256:<64 hex digits>"))?))
            }
            None => (rest, None),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(|| err("the repository is missing"))?;
        if registry.is_empty() || !registry.bytes().all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c)) {
            return Err(err("the registry host is not valid"));
        }
        // A tag follows the last ':' of the last path segment.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !repository.split('/').all(component_ok) {
            return Err(err("the repository must be lowercase path components of [a-z0-9._-]"));
        }
        if let Some(t) = &tag {
            let ok = t.len() <= 128
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(err("the tag must be up to 128 of [A-Za-z0-9._-]"));
            }
        }
        Ok(Reference { registry: registry.to_string(), repository: repository.to_string(), tag, digest })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Reference {
    /// What to ask the registry for: the digest if pinned, else the tag (default `latest`).
    pub fn target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    pub fn host(&self) -> &str {
        let r = self.registry.as_str();
        if let Some(v6) = r.strip_prefix('[') {
            return v6.split(']').next().unwrap_or("");
        }
        r.rsplit_once(':').map(|(h, _)| h).unwrap_or(r)
    }

    /// Registries on loopback are spoken to over plain HTTP, as Docker does.
    pub fn is_loopback(&self) -> bool {
        let h = self.host();
        h == "localhost" || h.starts_with("127.") || h == "::1"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_registry_repository_tag_and_digest() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            ("oci://ghcr.io/acme/hello:v1", "ghcr.io", "acme/hello", Some("v1")),
            ("oci://127.0.0.1:5000/hello", "127.0.0.1:5000", "hello", None),
            ("oci://localhost:5000/a/b/c:1.0-rc", "localhost:5000", "a/b/c", Some("1.0-rc")),
        ];
        for (s, reg, repo, tag) in cases {
            let r: Reference = s.parse().unwrap();
            assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), (*reg, *repo, *tag), "{s}");
            assert_eq!(r.to_string(), *s);
        }
        let r: Reference = format!("oci://ghcr.io/acme/hello:v1@{d}").parse().unwrap();
        assert_eq!(r.target(), d);
        assert!(!r.is_loopback());
        assert!("oci://127.0.0.1:5000/x".parse::<Reference>().unwrap().is_loopback());
        assert_eq!("oci://r.io/x".parse::<Reference>().unwrap().target(), "latest");
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (bad, why) in [
            ("ghcr.io/x", "oci://"),
            ("oci://ghcr.io", "repository is missing"),
            ("oci://ghcr.io/Upper", "lowercase"),
            ("oci://ghcr.io/x:bad tag", "tag"),
            ("oci://ghcr.io/x@sha256:12", "digest"),
            ("oci://bad host/x", "registry host"),
        ] {
            let e = bad.parse::<Reference>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
