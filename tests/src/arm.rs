//! ARM agents under qemu-user: the architectures we build the agent for,
//! and how to start one of them on this x86-64 machine.

use std::path::Path;

use crate::{Agent, cross_bin};

pub struct Arch {
    pub triple: &'static str,
    /// OCI notation, as nodes report it.
    pub arch: &'static str,
    /// How the agent runs Wasm there.
    pub mode: &'static str,
    /// The target the hub compiles its code for.
    pub target: &'static str,
    /// The binfmt_misc entry that runs its binaries.
    pub binfmt: &'static str,
    /// Where qemu-user finds the target's dynamic loader and libc (Debian's
    /// cross libc, not multiarch: the two must not be mixed).
    pub ld_prefix: &'static str,
    /// The node name tests give its agent.
    pub node: &'static str,
}

pub const ARCHES: [Arch; 2] = [
    Arch {
        triple: "aarch64-unknown-linux-gnu",
        arch: "arm64",
        mode: "cranelift",
        target: "aarch64",
        binfmt: "qemu-aarch64",
        ld_prefix: "/usr/aarch64-linux-gnu",
        node: "pi4",
    },
    Arch {
        triple: "armv7-unknown-linux-gnueabihf",
        arch: "arm/v7",
        mode: "pulley",
        target: "pulley32",
        binfmt: "qemu-arm",
        ld_prefix: "/usr/arm-linux-gnueabihf",
        node: "pi3",
    },
];

impl Arch {
    /// Panics with what to do unless binfmt_misc runs this arch's binaries.
    pub fn check_binfmt(&self) {
        let p = format!("/proc/sys/fs/binfmt_misc/{}", self.binfmt);
        let status = std::fs::read_to_string(&p).unwrap_or_else(|_| {
            panic!(
                "{p} is missing: install qemu-user-static and binfmt-support, mount binfmt_misc and run update-binfmts --enable {} (scripts/test does)",
                self.binfmt
            )
        });
        assert!(status.starts_with("enabled"), "{p} is not enabled: run update-binfmts --enable {}", self.binfmt);
    }

    /// Starts this arch's agent (from scripts/cross, same profile) under qemu-user.
    pub fn agent(&self, dir: &Path, broker: &str, join: &str) -> Agent {
        // qemu-user backs the pooling allocator's address-space reservations
        // with real memory, so emulated agents allocate instances on demand.
        Agent::start_with(
            &cross_bin(self.triple, "edge-agent"),
            &[("QEMU_LD_PREFIX", self.ld_prefix)],
            dir,
            self.node,
            broker,
            join,
            &["--wasm-pool-slots", "0"],
        )
    }
}
