//! What this machine is: architecture, OS, CPUs, memory, and what of it
//! workloads may use.

use edge_api::model::{Labels, NodeFacts};
use edge_api::quantity::{Cpu, Memory};

/// The architecture in OCI platform notation.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm/v7",
        "riscv64" => "riscv64",
        "x86" => "386",
        other => other,
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn mem_total() -> u64 {
    read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn os_release() -> String {
    read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default()
}

/// The machine's host name, lowercased (a default node name).
pub fn hostname() -> String {
    read("/proc/sys/kernel/hostname").trim().to_ascii_lowercase()
}

pub fn gather(labels: Labels, reserve_memory: Memory, reserve_cpu: Cpu) -> NodeFacts {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let memory = Memory(mem_total());
    NodeFacts {
        arch: arch().into(),
        os: std::env::consts::OS.into(),
        os_release: os_release(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpus,
        memory,
        allocatable_memory: Memory(memory.0.saturating_sub(reserve_memory.0)),
        allocatable_cpu: Cpu((u64::from(cpus) * 1000).saturating_sub(reserve_cpu.0)),
        labels,
        runtimes: vec![crate::wasm::runtime_info()],
        agent_version: env!("CARGO_PKG_VERSION").into(),
        wasm_instances: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_describe_this_machine() {
        let f = gather(Labels::new(), Memory::mib(128), Cpu(0));
        assert!(f.memory.0 > 0 && f.cpus > 0);
        assert_eq!(f.allocatable_memory.0, f.memory.0 - (128 << 20));
        assert!(edge_api::model::ARCHES.contains(&f.arch.as_str()) || f.arch == "386");
        assert!(f.supports("wasm"));
    }
}
