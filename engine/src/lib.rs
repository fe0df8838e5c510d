//! The wasmtime configuration agents run components with, and the hub
//! compiles them with for each agent's target.
//!
//! A precompiled component is only as good as the match between the engine
//! that compiled it and the one that loads it: same wasmtime, same target,
//! same settings. Both sides build their `Config` here, and name the result
//! by [`Target::fingerprint`], so the hub can compile for a device it has
//! never seen and the device can tell, before it asks, what it needs.
//!
//! Code is compiled for a target's baseline CPU (plus what every CPU of
//! that class has, see [`Target::isa_flags`]), never for the features of
//! the machine that compiles it: the same bytes run on every device of the
//! target, whoever compiled them.

use std::fmt;

pub use wasmtime;
use wasmtime::Config;

/// The wasmtime this build links (also in every fingerprint).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Whether this build can compile components (Cranelift is linked in).
pub const CAN_COMPILE: bool = cfg!(feature = "compiler");

/// The settings every engine gets, in the words of the fingerprint: change
/// one and the fingerprints change with it, so no old artifact is offered.
const SETTINGS: &str = "epoch-interruption component-model";

/// What code is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// 64-bit x86 Linux, Cranelift, for the x86-64-v2 level.
    X86_64,
    /// 64-bit x86 Linux, Cranelift, for CPUs below x86-64-v2 (and virtual
    /// CPU models that hide its features).
    X86_64Baseline,
    /// 64-bit ARM Linux, Cranelift.
    Aarch64,
    /// Pulley bytecode for 32-bit hosts (32-bit ARM), interpreted.
    Pulley32,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::X86_64, Target::X86_64Baseline, Target::Aarch64, Target::Pulley32];

    /// The target of this machine: Cranelift where it has a backend (on
    /// x86-64, the v2 level if this CPU has it), Pulley on 32-bit hosts.
    /// `None`: an architecture no agent is built for.
    pub fn host() -> Option<Target> {
        if cfg!(target_arch = "x86_64") {
            Some(if x86_64_v2() { Target::X86_64 } else { Target::X86_64Baseline })
        } else if cfg!(target_arch = "aarch64") {
            Some(Target::Aarch64)
        } else if cfg!(all(target_pointer_width = "32", target_endian = "little")) {
            Some(Target::Pulley32)
        } else {
            None
        }
    }

    /// The triple given to wasmtime.
    pub fn triple(self) -> &'static str {
        match self {
            Target::X86_64 | Target::X86_64Baseline => "x86_64-unknown-linux-gnu",
            Target::Aarch64 => "aarch64-unknown-linux-gnu",
            Target::Pulley32 => "pulley32",
        }
    }

    /// `x86_64`, `aarch64`, `pulley32`: as shown to users.
    pub fn name(self) -> &'static str {
        match self {
            Target::X86_64 => "x86_64",
            Target::X86_64Baseline => "x86_64-baseline",
            Target::Aarch64 => "aarch64",
            Target::Pulley32 => "pulley32",
        }
    }

    /// How code runs: `cranelift` (native code) or `pulley` (interpreted).
    pub fn mode(self) -> &'static str {
        match self {
            Target::Pulley32 => "pulley",
            _ => "cranelift",
        }
    }

    /// CPU features code may use beyond the target's baseline. x86-64: the
    /// x86-64-v2 level (SSE4.2, POPCNT), which every x86-64 CPU made since
    /// 2009 has (Atoms since 2013); a CPU without it is `X86_64Baseline`.
    /// (wasmtime also checks, when it loads code, that the CPU has them.)
    pub fn isa_flags(self) -> &'static [&'static str] {
        match self {
            Target::X86_64 => &X86_64_V2,
            Target::X86_64Baseline | Target::Aarch64 | Target::Pulley32 => &[],
        }
    }

    /// Names an engine's output: wasmtime version, target, settings.
    /// `wasmtime-48.0.8-x86_64-1f2e3d4c`.
    pub fn fingerprint(self) -> String {
        let mut h = Fnv::new();
        h.write(SETTINGS.as_bytes());
        h.write(b"\0");
        h.write(self.triple().as_bytes());
        for f in self.isa_flags() {
            h.write(b"\0");
            h.write(f.as_bytes());
        }
        format!("wasmtime-{WASMTIME_VERSION}-{}-{:08x}", self.name(), h.0 as u32)
    }

    /// The target a fingerprint names, if this build's wasmtime made it.
    pub fn from_fingerprint(fp: &str) -> Option<Target> {
        // Asked of every node's report at every hub tick: the fingerprints
        // are computed once.
        static KNOWN: std::sync::OnceLock<Vec<(Target, String)>> = std::sync::OnceLock::new();
        let known = KNOWN.get_or_init(|| Target::ALL.into_iter().map(|t| (t, t.fingerprint())).collect());
        known.iter().find(|(_, f)| f == fp).map(|(t, _)| *t)
    }

    /// Parses a target's [`name`](Target::name).
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const X86_64_V2: [&str; 5] = ["has_sse3", "has_ssse3", "has_sse41", "has_sse42", "has_popcnt"];

/// Whether this CPU has the x86-64-v2 features [`Target::X86_64`] code uses.
fn x86_64_v2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sse3")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("sse4.2")
            && std::arch::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// FNV-1a: the same in every build, for names.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// The configuration code for `target` is compiled and run with. Runtime
/// choices that do not change compiled code (the instance allocator) are
/// the caller's.
pub fn config(target: Target) -> wasmtime::Result<Config> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.target(target.triple())?;
    #[cfg(feature = "compiler")]
    for flag in target.isa_flags() {
        // SAFETY: these flags only say which instructions the code may use;
        // wasmtime checks them against the CPU before it runs such code.
        unsafe {
            config.cranelift_flag_enable(flag);
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_target_and_name_their_target() {
        let fps: Vec<String> = Target::ALL.iter().map(|t| t.fingerprint()).collect();
        for (t, fp) in Target::ALL.iter().zip(&fps) {
            assert!(fp.starts_with(&format!("wasmtime-{WASMTIME_VERSION}-{}-", t.name())), "{fp}");
            assert_eq!(Target::from_fingerprint(fp), Some(*t));
        }
        let distinct: std::collections::BTreeSet<&String> = fps.iter().collect();
        assert_eq!(distinct.len(), fps.len(), "{fps:?}");
        assert_eq!(Target::from_fingerprint("wasmtime-47.0.0-x86_64-00000000"), None);
        assert_eq!(Target::X86_64.fingerprint(), Target::X86_64.fingerprint(), "stable");
    }

    #[test]
    fn this_host_has_a_target_and_its_configuration_makes_an_engine() {
        let t = Target::host().expect("agents run on x86_64, aarch64 and 32-bit ARM");
        wasmtime::Engine::new(&config(t).unwrap()).unwrap();
    }
}
