//! Unpacking image layers into a root directory, and reading files of an
//! image as its container would see them. Every path is resolved inside the
//! root, following the symlinks already unpacked as if the root were `/`:
//! nothing a layer holds is written, and nothing an image names is read,
//! outside it.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// A text file of the image, found as the container would find it: every
/// symlink resolved inside the image root (never on the host), a regular
/// file only (not a FIFO or a device: opened without blocking), at most
/// `limit` bytes. `None` if there is none.
pub fn read_in_image(root: &Path, parts: &[&str], limit: u64) -> Result<Option<String>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = format!("/{}", parts.join("/"));
    let parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
    let path = resolve_in(root, &parts).map_err(|e| format!("the image's {shown}: {e}"))?;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the image's {shown}: {e}")),
    };
    let meta = file.metadata().map_err(|e| format!("cannot read the image's {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("the image's {shown} is not a regular file"));
    }
    if meta.len() > limit {
        return Err(format!("the image's {shown} is larger than {limit} bytes"));
    }
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text).map_err(|e| format!("cannot read the image's {shown}: {e}"))?;
    if text.len() as u64 > limit {
        return Err(format!("the image's {shown} is larger than {limit} bytes"));
    }
    Ok(Some(text))
}

/// The relative, normalised form of a path in a layer; `..` is refused.
fn layer_path(p: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err(format!("entry {} climbs out of the image root", p.display())),
            Component::Prefix(_) => return Err(format!("entry {} is not a Unix path", p.display())),
        }
    }
    Ok(out)
}

/// The directory `parts` names inside `root`, following symlinks in every
/// component as if `root` were `/`: the result is always under `root`.
/// (An entry's own name is never followed: it is replaced.)
pub fn resolve_in(root: &Path, parts: &[String]) -> Result<PathBuf, String> {
    let mut resolved: Vec<String> = Vec::new();
    let mut todo: std::collections::VecDeque<String> = parts.iter().cloned().collect();
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let candidate = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!("too many symlinks resolving {}", parts.join("/")));
                }
                let target = std::fs::read_link(&candidate).map_err(|e| e.to_string())?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut t: Vec<String> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                t.extend(todo.drain(..));
                todo = t.into();
            }
            _ => resolved.push(part),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()))
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn open_layer(blob: &Path, media_type: &str) -> Result<Box<dyn Read>, String> {
    let mut f = std::fs::File::open(blob).map_err(|e| e.to_string())?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| e.to_string())?;
    std::io::Seek::rewind(&mut f).map_err(|e| e.to_string())?;
    if n == 2 && magic == [0x1f, 0x8b] {
        return Ok(Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f))));
    }
    if media_type.contains("zstd") {
        return Err(format!("layers compressed with zstd are not supported yet ({media_type})"));
    }
    Ok(Box::new(std::io::BufReader::new(f)))
}

/// Applies one layer to `root`: whiteouts first (they hide what lower
/// layers put there), then every entry, each resolved inside `root`.
pub fn unpack_layer(blob: &Path, media_type: &str, root: &Path) -> Result<(), String> {
    unpack(|| open_layer(blob, media_type), root)
}

/// Applies the layer `open` reads (called twice: whiteouts, then entries) to `root`.
pub fn unpack<R: Read>(mut open: impl FnMut() -> Result<R, String>, root: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut archive = tar::Archive::new(open()?);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let parts = layer_path(&path)?;
        let Some(name) = parts.last() else { continue };
        let Some(hidden) = name.strip_prefix(".wh.") else { continue };
        let dir = resolve_in(root, &parts[..parts.len() - 1])?;
        if hidden == ".wh..opq" {
            if let Ok(children) = std::fs::read_dir(&dir) {
                for c in children.flatten() {
                    remove_any(&c.path());
                }
            }
        } else {
            remove_any(&dir.join(hidden));
        }
    }
    let mut archive = tar::Archive::new(open()?);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let parts = layer_path(&path)?;
        let Some(name) = parts.last().cloned() else { continue };
        if name.starts_with(".wh.") {
            continue;
        }
        let parent = resolve_in(root, &parts[..parts.len() - 1])?;
        std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", path.display()))?;
        let target = parent.join(&name);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        if kind.is_dir() {
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&target);
                    std::fs::create_dir(&target).map_err(err)?;
                }
                Err(_) => std::fs::create_dir(&target).map_err(err)?,
            }
        } else if kind.is_file() {
            remove_any(&target);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(err)?;
            std::io::copy(&mut entry, &mut f).map_err(err)?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(err)?
                .ok_or_else(|| format!("{}: a symlink without a target", path.display()))?;
            remove_any(&target);
            std::os::unix::fs::symlink(&link, &target).map_err(err)?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(err)?
                .ok_or_else(|| format!("{}: a hard link without a target", path.display()))?;
            let lparts = layer_path(&link)?;
            let Some((lname, ldir)) = lparts.split_last() else {
                return Err(format!("{}: an empty link target", path.display()));
            };
            let source = resolve_in(root, ldir)?.join(lname);
            remove_any(&target);
            std::fs::hard_link(&source, &target).map_err(err)?;
            continue;
        } else {
            // Devices, FIFOs: containers get their /dev from the runtime.
            continue;
        }
        if as_root {
            let (uid, gid) = (header.uid().unwrap_or(0) as u32, header.gid().unwrap_or(0) as u32);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(err)?;
        }
        if !kind.is_symlink() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack(dir: &Path, n: usize, entries: &[(&str, tar::EntryType, &str)]) -> Result<(), String> {
        let blob = dir.join(format!("layer-{n}.tar"));
        std::fs::write(&blob, tar_of(entries)).unwrap();
        unpack_layer(&blob, "application/vnd.oci.image.layer.v1.tar", &dir.join("root"))
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            let link = kind.is_symlink() || kind.is_hard_link();
            let body: &[u8] = if link { &[] } else { data.as_bytes() };
            if link {
                h.set_link_name(data).unwrap();
            }
            h.set_size(body.len() as u64);
            // set_path refuses `..`; write the raw name for hostile cases.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_stack_with_whiteouts_and_never_write_outside_the_root() {
        use tar::EntryType::{Directory as D, Regular as F, Symlink as L};
        let dir = std::env::temp_dir().join(format!("edge-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        unpack(
            &dir,
            0,
            &[
                ("etc/", D, ""),
                ("etc/gone", F, "old"),
                ("etc/kept", F, "kept"),
                ("data/", D, ""),
                ("data/old", F, "old"),
                ("usr/lib/", D, ""),
                ("lib", L, "usr/lib"),
                ("escape", L, "/../../../outside"),
            ],
        )
        .unwrap();
        unpack(
            &dir,
            1,
            &[
                ("etc/.wh.gone", F, ""),
                ("data/.wh..wh..opq", F, ""),
                ("data/new", F, "new"),
                ("lib/libx.so", F, "through the link"),
                // Through a symlink pointing out of the root: lands inside it.
                ("escape/file", F, "contained"),
            ],
        )
        .unwrap();
        let root = dir.join("root");
        assert!(!root.join("etc/gone").exists(), "whited out");
        assert_eq!(std::fs::read_to_string(root.join("etc/kept")).unwrap(), "kept");
        assert!(!root.join("data/old").exists(), "an opaque directory hides lower layers");
        assert_eq!(std::fs::read_to_string(root.join("data/new")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(root.join("usr/lib/libx.so")).unwrap(), "through the link");
        assert_eq!(std::fs::read_to_string(root.join("outside/file")).unwrap(), "contained");
        assert!(!dir.join("outside").exists() && !Path::new("/outside").exists());

        let e = unpack(&dir, 2, &[("../evil", F, "x")]).unwrap_err();
        assert!(e.contains("climbs out"), "{e}");
        assert!(!dir.join("evil").exists());
        let e = unpack(&dir, 3, &[("a/../../evil2", F, "x")]).unwrap_err();
        assert!(e.contains("climbs out"), "{e}");
        // A hard link may only point inside the root too.
        unpack(&dir, 4, &[("hl", tar::EntryType::Link, "../../../etc/passwd")]).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
