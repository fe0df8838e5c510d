//! Resource quantities in the Kubernetes notation users already know:
//! memory as `64Mi`, `1Gi`, `500M`, `1048576`; CPU as `250m`, `0.5`, `2`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Memory(pub u64);

/// CPU in thousandths of a core.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cpu(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error("{0:?} is not a memory size (use e.g. 64Mi, 1Gi, 500M or a number of bytes)")]
    Memory(String),
    #[error("{0:?} is not a CPU amount (use e.g. 250m, 0.5 or 2)")]
    Cpu(String),
}

const MEMORY_SUFFIXES: &[(&str, u64)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

/// Parses a non-negative decimal with at most `max_frac` fractional digits
/// into (integer part, fraction scaled to `10^max_frac`).
fn decimal(s: &str, max_frac: u32) -> Option<(u64, u64)> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|c| c.is_ascii_digit()) || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if frac.len() as u32 > max_frac || (s.contains('.') && frac.is_empty()) {
        return None;
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let scale = 10u64.pow(max_frac - frac.len() as u32);
    let frac: u64 = if frac.is_empty() { 0 } else { frac.parse::<u64>().ok()? * scale };
    Some((int, frac))
}

impl FromStr for Memory {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || QuantityError::Memory(s.to_string());
        let (num, mult) =
            MEMORY_SUFFIXES.iter().find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m))).unwrap_or((s, 1));
        // Up to 6 fractional digits so that "1.5Gi" works; bytes must come out whole.
        let (int, frac) = decimal(num, 6).ok_or_else(err)?;
        let whole = int.checked_mul(mult).ok_or_else(err)?;
        let part = (frac as u128 * mult as u128) / 1_000_000;
        if !(frac as u128 * mult as u128).is_multiple_of(1_000_000) {
            return Err(err());
        }
        let total = whole.checked_add(part as u64).ok_or_else(err)?;
        Ok(Memory(total))
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suf, m) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{suf}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Memory {
    pub const fn mib(n: u64) -> Memory {
        Memory(n << 20)
    }
    /// Rounded, for humans: `61.2Mi`.
    pub fn human(&self) -> String {
        let b = self.0 as f64;
        for (suf, m) in [("Gi", (1u64 << 30) as f64), ("Mi", (1u64 << 20) as f64), ("Ki", 1024.0)] {
            if b >= m {
                let v = b / m;
                return if v.fract() == 0.0 { format!("{v:.0}{suf}") } else { format!("{v:.1}{suf}") };
            }
        }
        format!("{}", self.0)
    }
}

impl FromStr for Cpu {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || QuantityError::Cpu(s.to_string());
        if let Some(m) = s.strip_suffix('m') {
            let (int, frac) = decimal(m, 0).ok_or_else(err)?;
            debug_assert_eq!(frac, 0);
            return Ok(Cpu(int));
        }
        let (int, frac) = decimal(s, 3).ok_or_else(err)?;
        let total = int.checked_mul(1000).and_then(|v| v.checked_add(frac)).ok_or_else(err)?;
        Ok(Cpu(total))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) { write!(f, "{}", self.0 / 1000) } else { write!(f, "{}m", self.0) }
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(Memory);
string_serde!(Cpu);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_parses_binary_decimal_and_plain_sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("64Mi", Some(64 << 20)),
            ("1Gi", Some(1 << 30)),
            ("1.5Gi", Some(3 << 29)),
            ("512Ki", Some(512 << 10)),
            ("500M", Some(500_000_000)),
            ("2k", Some(2_000)),
            ("1048576", Some(1 << 20)),
            ("0", Some(0)),
            ("", None),
            ("Mi", None),
            ("-1Mi", None),
            ("64MB", None),
            ("1.Mi", None),
            ("0.1", None), // a tenth of a byte
            ("99999999999Ti", None),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Memory>().ok().map(|m| m.0), *want, "{input:?}");
        }
    }

    #[test]
    fn memory_displays_in_the_largest_exact_binary_unit() {
        assert_eq!(Memory(64 << 20).to_string(), "64Mi");
        assert_eq!(Memory(1 << 30).to_string(), "1Gi");
        assert_eq!(Memory(1_000_000).to_string(), "1000000");
        assert_eq!(Memory(3 << 29).human(), "1.5Gi");
    }

    #[test]
    fn cpu_parses_millicores_and_decimal_cores() {
        let cases: &[(&str, Option<u64>)] = &[
            ("250m", Some(250)),
            ("0.5", Some(500)),
            ("2", Some(2000)),
            ("1.125", Some(1125)),
            (".5", Some(500)),
            ("0.0005", None),
            ("1.5m", None),
            ("m", None),
            ("two", None),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Cpu>().ok().map(|c| c.0), *want, "{input:?}");
        }
        assert_eq!(Cpu(500).to_string(), "500m");
        assert_eq!(Cpu(2000).to_string(), "2");
    }

    #[test]
    fn quantities_serialize_as_their_canonical_strings() {
        let m: Memory = serde_json::from_str("\"1024Ki\"").unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"1Mi\"");
        assert!(serde_json::from_str::<Cpu>("\"lots\"").is_err());
    }
}
