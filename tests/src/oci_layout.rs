//! OCI image layouts written by tests (no downloads), copied into a real
//! registry with skopeo.

use std::path::{Path, PathBuf};
use std::process::Command;

use edge_api::digest::Digest;
use serde_json::{Value, json};

pub struct Layout {
    pub dir: PathBuf,
    tags: Vec<Value>,
    n: usize,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.to_path_buf(), tags: Vec::new(), n: 0 }
    }

    /// Stores `bytes` as a blob; returns its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let d = Digest::of(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        json!({ "mediaType": media_type, "digest": d.to_string(), "size": bytes.len() })
    }

    /// A gzip'd layer from a tar archive; returns its descriptor and diff id.
    pub fn layer_from_tar(&mut self, tar: &[u8]) -> (Value, String) {
        self.n += 1;
        let file = self.dir.join(format!("layer-{}.tar", self.n));
        std::fs::write(&file, tar).unwrap();
        let ok = Command::new("gzip").args(["-k", "-n", "-f"]).arg(&file).status().unwrap();
        assert!(ok.success(), "gzip");
        let gz = std::fs::read(file.with_extension("tar.gz")).unwrap();
        (self.blob("application/vnd.oci.image.layer.v1.tar+gzip", &gz), Digest::of(tar).to_string())
    }

    /// A gzip'd layer holding the files under `root` (owned by root).
    pub fn layer_from_dir(&mut self, root: &Path) -> (Value, String) {
        let out = Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "-cf", "-", "-C"])
            .arg(root)
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
        self.layer_from_tar(&out.stdout)
    }

    /// An image manifest for `platform` (`os/arch[/variant]`) with these
    /// layers and this run config (`Entrypoint`, `Cmd`, `Env`, `User`…);
    /// returns its descriptor, with the platform set.
    pub fn image(&self, platform: &str, layers: &[(Value, String)], run: Value) -> Value {
        let p: Vec<&str> = platform.split('/').collect();
        let mut plat = json!({ "os": p[0], "architecture": p[1] });
        if let Some(v) = p.get(2) {
            plat["variant"] = json!(v);
        }
        let mut config = plat.clone();
        config["config"] = run;
        config["rootfs"] =
            json!({ "type": "layers", "diff_ids": layers.iter().map(|l| l.1.clone()).collect::<Vec<_>>() });
        let config = self.blob("application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        });
        let mut d = self.blob("application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
        d["platform"] = plat;
        d
    }

    /// A multi-platform index of these image descriptors.
    pub fn index(&self, images: &[Value]) -> Value {
        let index = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": images,
        });
        self.blob("application/vnd.oci.image.index.v1+json", index.to_string().as_bytes())
    }

    /// Names `desc` `tag` in the layout's index.json.
    pub fn tag(&mut self, tag: &str, desc: &Value) {
        let mut d = desc.clone();
        if let Some(o) = d.as_object_mut() {
            o.remove("platform");
        }
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.tags.push(d);
        std::fs::write(self.dir.join("index.json"), json!({ "schemaVersion": 2, "manifests": self.tags }).to_string())
            .unwrap();
    }

    /// Copies the image tagged `tag` (all platforms) to `dest` (`host:port/repo:tag`).
    pub fn push(&self, tag: &str, dest: &str, extra: &[&str]) {
        let src = format!("oci:{}:{tag}", self.dir.display());
        let out = Command::new("skopeo")
            .args(["copy", "--all", "--dest-tls-verify=false"])
            .args(extra)
            .arg(&src)
            .arg(format!("docker://{dest}"))
            .output()
            .expect("skopeo (apt-get install skopeo; the test command installs it)");
        assert!(out.status.success(), "skopeo copy {src} {dest}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
