//! Content-addressed blobs: `DATA_DIR/artifacts/sha256/<hex>`.
//!
//! Architecture invariant: a file under its digest's name always has that
//! digest. Uploads are hashed while they are written to a temporary file,
//! checked against the digest the client named, synced, and only then renamed
//! into place; a mismatch leaves nothing behind.

use std::path::{Path, PathBuf};

use edge_api::digest::{Digest, Hasher};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("upload does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("upload exceeds the {limit}-byte artifact size limit")]
    TooLarge { limit: u64 },
    #[error("artifact I/O failed at {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("upload was interrupted: {0}")]
    Body(String),
}

#[derive(Clone, Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl ArtifactStore {
    pub fn open(dir: &Path) -> Result<Self, ArtifactError> {
        let blobs = dir.join("sha256");
        let tmp = dir.join("tmp");
        for d in [&blobs, &tmp] {
            std::fs::create_dir_all(d).map_err(|source| ArtifactError::Io { path: d.clone(), source })?;
        }
        // Leftovers of uploads interrupted by a crash (not of the uploads of
        // other hubs sharing the directory: those are recent).
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if old.is_some_and(|age| age > std::time::Duration::from_secs(3600)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(ArtifactStore { dir: blobs, tmp })
    }

    /// The directory the store lives in (`DATA_DIR/artifacts`).
    pub fn root(&self) -> PathBuf {
        self.dir.parent().map(Path::to_path_buf).unwrap_or_else(|| self.dir.clone())
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    pub fn size(&self, d: &Digest) -> Option<u64> {
        std::fs::metadata(self.path(d)).ok().map(|m| m.len())
    }

    /// Stores bytes the hub made (blocking; for compile threads): checked
    /// against `digest`, synced, renamed into place.
    pub fn put_sync(&self, digest: Digest, bytes: &[u8]) -> Result<(), ArtifactError> {
        use std::io::Write;
        let actual = Digest::of(bytes);
        if actual != digest {
            return Err(ArtifactError::Mismatch { expected: digest, actual });
        }
        let tmp = self.tmp.join(format!("{}.{}", digest.hex(), edge_api::keys::random_hex(4).unwrap_or_default()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Io { path, source }
        };
        let dest = self.path(&digest);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(&dest)(e)
        })
    }

    /// Starts an upload that must hash to `expected`.
    pub async fn begin(&self, expected: Digest, limit: u64) -> Result<Upload, ArtifactError> {
        let name = format!("{}.{}", expected.hex(), edge_api::keys::random_hex(4).unwrap_or_default());
        let path = self.tmp.join(name);
        let file =
            tokio::fs::File::create(&path).await.map_err(|source| ArtifactError::Io { path: path.clone(), source })?;
        Ok(Upload { store: self.clone(), expected, path, file: Some(file), hasher: Some(Hasher::new()), len: 0, limit })
    }
}

pub struct Upload {
    store: ArtifactStore,
    expected: Digest,
    path: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Option<Hasher>,
    len: u64,
    limit: u64,
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ArtifactError> {
        self.len += chunk.len() as u64;
        if self.len > self.limit {
            return Err(ArtifactError::TooLarge { limit: self.limit });
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(chunk);
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(chunk).await.map_err(|source| ArtifactError::Io { path: self.path.clone(), source })?;
        }
        Ok(())
    }

    /// Verifies, syncs and moves the blob into place.
    pub async fn finish(mut self) -> Result<u64, ArtifactError> {
        let actual = self.hasher.take().map(Hasher::finish).unwrap_or(self.expected);
        if actual != self.expected {
            return Err(ArtifactError::Mismatch { expected: self.expected, actual });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Io { path, source }
        };
        if let Some(f) = self.file.take() {
            f.sync_all().await.map_err(io(&self.path))?;
        }
        let dest = self.store.path(&self.expected);
        tokio::fs::rename(&self.path, &dest).await.map_err(io(&dest))?;
        if let Ok(dir) = tokio::fs::File::open(&self.store.dir).await {
            let _ = dir.sync_all().await;
        }
        Ok(self.len)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Unfinished or refused uploads leave nothing behind; after a
        // successful finish the file has been renamed and this is a no-op.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (ArtifactStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "edge-artifacts-{}-{}",
            std::process::id(),
            edge_api::keys::random_hex(4).unwrap()
        ));
        (ArtifactStore::open(&dir).unwrap(), dir)
    }

    #[tokio::test]
    async fn a_matching_upload_lands_under_its_digest() {
        let (s, dir) = store();
        let d = Digest::of(b"component bytes");
        let mut u = s.begin(d, 1024).await.unwrap();
        u.write(b"component ").await.unwrap();
        u.write(b"bytes").await.unwrap();
        assert_eq!(u.finish().await.unwrap(), 15);
        assert!(s.has(&d));
        assert_eq!(std::fs::read(s.path(&d)).unwrap(), b"component bytes");
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_mismatched_or_oversized_upload_leaves_nothing() {
        let (s, dir) = store();
        let d = Digest::of(b"expected");
        let mut u = s.begin(d, 1024).await.unwrap();
        u.write(b"something else").await.unwrap();
        assert!(matches!(u.finish().await, Err(ArtifactError::Mismatch { .. })));
        let mut u = s.begin(d, 4).await.unwrap();
        assert!(matches!(u.write(b"too long").await, Err(ArtifactError::TooLarge { .. })));
        drop(u);
        assert!(!s.has(&d));
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
