//! Containers' networks: a network namespace per container, made by the
//! agent, and (for `bridge`) an interface on the node's container bridge
//! from the standard CNI plugins (Debian's `containernetworking-plugins`:
//! `bridge` with `host-local` addresses and masqueraded egress).
//!
//! The namespace is made in a thread of its own (`unshare(CLONE_NEWNET)`
//! changes only the calling thread), its loopback brought up there, and kept
//! alive by a bind mount under the run directory, which the container's
//! runtime spec names. Dropping [`Netns`] removes the mount; the plugins'
//! `DEL` releases the address.

use std::path::{Path, PathBuf};

use serde_json::json;

/// The node's container bridge and its addresses.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Where the CNI plugins are (`/usr/lib/cni`, `/opt/cni/bin`).
    pub plugins: PathBuf,
    pub bridge: String,
    pub subnet: String,
}

/// The name of the CNI network (the host-local address store is per name).
const NETWORK: &str = "edge";

impl BridgeConfig {
    /// The defaults: Debian's plugins, bridge `edge0`, 10.89.0.0/16.
    pub fn detect(subnet: &str) -> BridgeConfig {
        let plugins = ["/usr/lib/cni", "/opt/cni/bin"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.join("bridge").exists())
            .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"));
        BridgeConfig { plugins, bridge: "edge0".into(), subnet: subnet.to_string() }
    }

    /// Whether the plugins `bridge` needs are installed.
    pub fn available(&self) -> bool {
        self.plugins.join("bridge").exists() && self.plugins.join("host-local").exists()
    }

    fn conf(&self) -> serde_json::Value {
        let masquerade =
            ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"].iter().any(|p| Path::new(p).exists());
        json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": masquerade,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": self.subnet }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        })
    }

    /// Gives the namespace an interface on the bridge; returns its address.
    pub async fn add(&self, id: &str, netns: &Path) -> Result<std::net::IpAddr, String> {
        let (this, id, netns) = (self.clone(), id.to_string(), netns.to_path_buf());
        let out = tokio::task::spawn_blocking(move || this.call("ADD", &id, Some(&netns)))
            .await
            .map_err(|e| format!("CNI ADD: {e}"))??;
        let v: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| format!("the CNI bridge plugin answered no JSON: {e}"))?;
        v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .next()
            .ok_or_else(|| format!("the CNI bridge plugin gave no address: {v}"))
    }

    /// Releases what `add` took (the namespace may be gone already). Blocks.
    pub fn del(&self, id: &str, netns: Option<&Path>) {
        if let Err(e) = self.call("DEL", id, netns) {
            tracing::warn!(id, "cannot release the container's network: {e}");
        }
    }

    fn call(&self, command: &str, id: &str, netns: Option<&Path>) -> Result<Vec<u8>, String> {
        use std::io::Write;
        let plugin = self.plugins.join("bridge");
        let mut child = std::process::Command::new(&plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.plugins)
            .env("CNI_NETNS", netns.map(|p| p.as_os_str().to_owned()).unwrap_or_default())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(self.conf().to_string().as_bytes()).map_err(|e| format!("CNI {command}: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("CNI {command}: {e}"))?;
        if !out.status.success() {
            // Errors are JSON ({"code","msg","details"}) on stdout.
            let msg = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| Some(format!("{} {}", v["msg"].as_str()?, v["details"].as_str().unwrap_or(""))))
                .unwrap_or_else(|| {
                    format!("{} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
                });
            return Err(format!("CNI {command} failed: {}", msg.trim()));
        }
        Ok(out.stdout)
    }
}

/// A network namespace held open by a bind mount.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    /// A new namespace at `path` (an empty file is made for the mount),
    /// with its loopback up.
    pub fn create(path: &Path) -> Result<Netns, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // A mount left by a crash is undone first.
        release(path);
        std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let target = path.to_path_buf();
        let made = std::thread::spawn(move || -> Result<(), String> {
            // SAFETY: unshare affects only this thread, which ends below.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("cannot make a network namespace: {}", std::io::Error::last_os_error()));
            }
            loopback_up()?;
            let src = c"/proc/thread-self/ns/net";
            let dst = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
                .map_err(|_| "the namespace path holds a NUL".to_string())?;
            // SAFETY: valid NUL-terminated paths; a bind mount, no data.
            let rc =
                unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
            if rc != 0 {
                return Err(format!("cannot keep the network namespace: {}", std::io::Error::last_os_error()));
            }
            Ok(())
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_string())?;
        match made {
            Ok(()) => Ok(Netns { path: path.to_path_buf() }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        release(&self.path);
    }
}

/// Unmounts and removes a namespace file (nothing if there is none).
pub fn release(path: &Path) {
    if let Ok(p) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid path; failure (not mounted) is fine.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(path);
}

/// Sets `lo` up in the calling thread's network namespace.
fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket and ioctl calls on a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("cannot bring up loopback: {}", std::io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(format!("cannot bring up loopback: {err}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_namespace_is_made_kept_and_released() {
        if !is_root() {
            eprintln!("skipped: network namespaces need root (CI runs as root)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("edge-netns-{}", std::process::id()));
        let path = dir.join("ns");
        let ns = Netns::create(&path).unwrap();
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        // The bind mount is a namespace other than the agent's own.
        let meta = std::fs::metadata(ns.path()).unwrap();
        let self_meta = std::fs::metadata("/proc/self/ns/net").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_ne!(meta.ino(), self_meta.ino(), "{ours:?}");
        drop(ns);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
