//! OCI platforms (`linux/arm/v7`) and which of an image's platforms a node
//! can run, following containerd's rules so that an image behaves here as
//! it does under any container runtime.
//!
//! A node runs images of its own OS and architecture. Variants are
//! normalised (`arm64/v8` is `arm64`, bare `arm` is `arm/v7` as Debian's
//! armhf is), and older variants run on newer CPUs: an `arm/v7` node runs
//! `arm/v6` and `arm/v5` images too, and an `arm64` node also runs 32-bit
//! `arm` images, as 64-bit ARM kernels do, but only when nothing native is
//! offered.

use std::fmt;
use std::str::FromStr;

/// Serialized as its text form (`linux/arm/v7`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// Empty when the architecture has none (or its default).
    pub variant: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a platform (expected os/architecture[/variant] or architecture[/variant], e.g. linux/arm64 or arm/v7)"
)]
pub struct PlatformError(pub String);

impl Platform {
    /// A platform from OCI fields, normalised (aliases and default variants).
    pub fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        let os = os.to_ascii_lowercase();
        let lower = architecture.to_ascii_lowercase();
        let (architecture, variant) = match (lower.as_str(), variant.to_ascii_lowercase()) {
            ("x86_64" | "x86-64" | "amd64", v) => ("amd64", if v == "v1" { String::new() } else { v }),
            ("aarch64" | "arm64", v) => ("arm64", if v == "v8" { String::new() } else { v }),
            ("armhf", _) => ("arm", "v7".to_string()),
            ("armel", _) => ("arm", "v6".to_string()),
            ("arm", v) => ("arm", if v.is_empty() { "v7".to_string() } else { v }),
            ("i386" | "i486" | "i586" | "i686" | "x86" | "386", v) => ("386", v),
            (other, v) => (other, v),
        };
        Platform { os, architecture: architecture.to_string(), variant }
    }

    /// A node's platform from the architecture it reports (`arm/v7`).
    pub fn linux(arch: &str) -> Platform {
        let (a, v) = arch.split_once('/').unwrap_or((arch, ""));
        Platform::new("linux", a, v)
    }

    /// How well an image for `self` suits `node`: `None` if it cannot run
    /// there; otherwise lower is better (0: exactly the node's platform).
    pub fn rank_on(&self, node: &Platform) -> Option<u32> {
        if self.os != node.os {
            return None;
        }
        if self == node {
            return Some(0);
        }
        let arm_level =
            |v: &str| v.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()).filter(|n| (5..=8).contains(n));
        match (node.architecture.as_str(), self.architecture.as_str()) {
            // Older ARM variants run on newer 32-bit ARM CPUs.
            ("arm", "arm") => {
                let (n, i) = (arm_level(&node.variant)?, arm_level(&self.variant)?);
                n.checked_sub(i)
            }
            // A 64-bit ARM kernel runs 32-bit ARM binaries, after native ones.
            ("arm64", "arm") if node.variant.is_empty() => {
                let i = arm_level(&self.variant).filter(|i| *i <= 7)?;
                Some(10 + (7 - i))
            }
            _ => None,
        }
    }

    /// The best of `offered` for `node`: its index, or `None` if none runs there.
    pub fn best<'a>(offered: impl IntoIterator<Item = &'a Platform>, node: &Platform) -> Option<usize> {
        offered.into_iter().enumerate().filter_map(|(i, p)| p.rank_on(node).map(|r| (r, i))).min().map(|(_, i)| i)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;
    /// `linux/arm/v7`, `linux/amd64`, or without the OS (`arm64`, `arm/v7`): Linux.
    fn from_str(s: &str) -> Result<Self, PlatformError> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        if !parts.iter().all(|p| ok(p)) {
            return Err(PlatformError(s.to_string()));
        }
        let known_os = |p: &str| matches!(p, "linux" | "windows" | "darwin" | "freebsd" | "wasip1" | "wasip2" | "wasi");
        match parts.as_slice() {
            [os, a] if known_os(os) => Ok(Platform::new(os, a, "")),
            [os, a, v] if known_os(os) => Ok(Platform::new(os, a, v)),
            [a] => Ok(Platform::new("linux", a, "")),
            [a, v] => Ok(Platform::new("linux", a, v)),
            _ => Err(PlatformError(s.to_string())),
        }
    }
}

impl serde::Serialize for Platform {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Platform {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn parsing_normalises_aliases_and_default_variants() {
        for (input, want) in [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/arm64/v8", "linux/arm64"),
            ("aarch64", "linux/arm64"),
            ("linux/arm", "linux/arm/v7"),
            ("armhf", "linux/arm/v7"),
            ("armel", "linux/arm/v6"),
            ("arm/v6", "linux/arm/v6"),
            ("linux/ARM64", "linux/arm64"),
            ("windows/amd64", "windows/amd64"),
            ("i686", "linux/386"),
        ] {
            assert_eq!(p(input).to_string(), want, "{input}");
        }
        for bad in ["", "/", "linux/", "linux/arm/v7/extra", "linux arm", "a/b/c"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?} parsed");
        }
        assert!(PlatformError("x".into()).to_string().contains("linux/arm64"));
    }

    #[test]
    fn nodes_run_their_own_platform_and_compatible_older_ones() {
        // (image, node, runs: rank)
        let table: &[(&str, &str, Option<u32>)] = &[
            ("linux/amd64", "amd64", Some(0)),
            ("linux/amd64/v1", "amd64", Some(0)),
            ("linux/amd64/v3", "amd64", None), // needs CPU features the node does not claim
            ("linux/arm64", "amd64", None),
            ("linux/386", "amd64", None),
            ("windows/amd64", "amd64", None),
            ("linux/arm64", "arm64", Some(0)),
            ("linux/arm64/v8", "arm64", Some(0)),
            ("linux/arm/v7", "arm64", Some(10)),
            ("linux/arm/v6", "arm64", Some(11)),
            ("linux/amd64", "arm64", None),
            ("linux/arm/v7", "arm/v7", Some(0)),
            ("linux/arm", "arm/v7", Some(0)),
            ("linux/arm/v6", "arm/v7", Some(1)),
            ("linux/arm/v5", "arm/v7", Some(2)),
            ("linux/arm/v8", "arm/v7", None),
            ("linux/arm64", "arm/v7", None),
            ("linux/arm/v7", "arm/v6", None),
            ("linux/arm/v6", "arm/v6", Some(0)),
            ("linux/riscv64", "riscv64", Some(0)),
            ("linux/riscv64", "arm64", None),
        ];
        for (image, node, want) in table {
            assert_eq!(p(image).rank_on(&Platform::linux(node)), *want, "{image} on {node}");
        }
    }

    #[test]
    fn the_best_offer_is_native_then_the_closest_variant() {
        let offered: Vec<Platform> = ["linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64"].map(p).to_vec();
        let pick = |node: &str| Platform::best(&offered, &Platform::linux(node)).map(|i| offered[i].to_string());
        assert_eq!(pick("amd64").as_deref(), Some("linux/amd64"));
        assert_eq!(pick("arm64").as_deref(), Some("linux/arm64"));
        assert_eq!(pick("arm/v7").as_deref(), Some("linux/arm/v7"));
        assert_eq!(pick("arm/v6").as_deref(), Some("linux/arm/v6"));
        assert_eq!(pick("riscv64"), None);
        let only32: Vec<Platform> = ["linux/arm/v6", "linux/arm/v7"].map(p).to_vec();
        let i = Platform::best(&only32, &Platform::linux("arm64")).unwrap();
        assert_eq!(only32[i].to_string(), "linux/arm/v7", "a 64-bit ARM node takes the newest 32-bit variant");
    }
}
