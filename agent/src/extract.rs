//! Safe extraction of a bundle archive (gzip tar, `manifest.toml` first) into a new directory.
//!
//! An archive is hostile until proven otherwise: every entry is checked before anything is
//! written, nothing is ever written through a symlink or outside the destination, and the manifest's
//! own counts (`files`, `payload_bytes`) bound what is written, so a lying or bombed archive stops at
//! the first entry that exceeds them. On any error the destination is removed entirely.

use kernex_protocol::bundle::{
    check_relative_path, BundleError, Manifest, MANIFEST, MAX_MANIFEST_BYTES,
};
use std::collections::HashSet;
use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

/// Bounds on what one bundle may unpack to, whatever its manifest says.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 30,
            max_files: 100_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("bundle entry {path}: {reason}")]
    Refused { path: String, reason: String },
    #[error("bundle archive: {0}")]
    Archive(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] BundleError),
}

fn refused(path: impl std::fmt::Display, reason: impl Into<String>) -> ExtractError {
    ExtractError::Refused {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Extracts `archive` into `dest`, which must not exist (its parent must). Returns the manifest.
pub fn extract(archive: &Path, dest: &Path, limits: &Limits) -> Result<Manifest, ExtractError> {
    std::fs::create_dir(dest).map_err(io(dest))?;
    let result = extract_into(archive, dest, limits);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn extract_into(archive: &Path, dest: &Path, limits: &Limits) -> Result<Manifest, ExtractError> {
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut entries = tar
        .entries()
        .map_err(|e| ExtractError::Archive(format!("not a tar.gz archive: {e}")))?;
    let bad_archive = |e: std::io::Error| ExtractError::Archive(format!("unreadable: {e}"));

    let mut first = entries
        .next()
        .ok_or_else(|| ExtractError::Archive("the archive is empty".into()))?
        .map_err(bad_archive)?;
    let first_path = first.path().map_err(bad_archive)?.into_owned();
    if first_path != Path::new(MANIFEST) || first.header().entry_type() != tar::EntryType::Regular {
        return Err(refused(
            first_path.display(),
            format!("the first entry must be {MANIFEST}"),
        ));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(refused(
            MANIFEST,
            format!("larger than {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    let mut text = String::new();
    first
        .by_ref()
        .take(MAX_MANIFEST_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| refused(MANIFEST, format!("unreadable: {e}")))?;
    let manifest = Manifest::parse(&text)?;
    std::fs::write(dest.join(MANIFEST), &text).map_err(io(&dest.join(MANIFEST)))?;

    let max_files = manifest.files.min(limits.max_files);
    let max_bytes = manifest.payload_bytes.min(limits.max_bytes);
    let mut seen: HashSet<PathBuf> = HashSet::from([PathBuf::from(MANIFEST)]);
    let mut files: HashSet<PathBuf> = HashSet::new();
    let mut count = 0u64;
    let mut bytes = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(bad_archive)?;
        let raw = entry.path().map_err(bad_archive)?.into_owned();
        let shown = raw.display().to_string();
        count += 1;
        if count > max_files {
            return Err(refused(
                &shown,
                format!("more entries than the {max_files} the manifest and limits allow"),
            ));
        }
        let rel = normalize(&raw).map_err(|why| refused(&shown, why))?;
        if !seen.insert(rel.clone()) {
            return Err(refused(&shown, "appears twice"));
        }
        let target = dest.join(&rel);
        ensure_parents(dest, &rel).map_err(|why| refused(&shown, why))?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                bytes = bytes.saturating_add(size);
                if bytes > max_bytes {
                    return Err(refused(&shown, format!(
                        "the payload would exceed the {max_bytes} bytes the manifest and limits allow"
                    )));
                }
                let mode = entry.header().mode().unwrap_or(0o644);
                write_file(&mut entry, &target, size, mode)?;
                files.insert(rel);
            }
            tar::EntryType::Directory => match std::fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(refused(&shown, "a directory where something else exists")),
                Err(_) => std::fs::create_dir(&target).map_err(io(&target))?,
            },
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(bad_archive)?
                    .ok_or_else(|| refused(&shown, "a symlink without a target"))?
                    .into_owned();
                if link.is_absolute() {
                    return Err(refused(
                        &shown,
                        format!("symlink to the absolute path {}", link.display()),
                    ));
                }
                let parent = rel.parent().unwrap_or(Path::new(""));
                if normalize(&parent.join(&link)).is_err() {
                    return Err(refused(
                        &shown,
                        format!("symlink to {} leaves the bundle", link.display()),
                    ));
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io(&target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(bad_archive)?
                    .ok_or_else(|| refused(&shown, "a hardlink without a target"))?
                    .into_owned();
                let link_rel = normalize(&link).map_err(|_| {
                    refused(
                        &shown,
                        format!("hardlink to {} leaves the bundle", link.display()),
                    )
                })?;
                if !files.contains(&link_rel) {
                    return Err(refused(
                        &shown,
                        format!(
                            "hardlink to {}, which is not a file extracted before it",
                            link.display()
                        ),
                    ));
                }
                std::fs::hard_link(dest.join(&link_rel), &target).map_err(io(&target))?;
                files.insert(rel);
            }
            other => {
                return Err(refused(
                    &shown,
                    format!("{other:?} entries (devices, fifos and the like) are not allowed"),
                ))
            }
        }
    }
    if count != manifest.files || bytes != manifest.payload_bytes {
        return Err(ExtractError::Archive(format!(
            "the manifest announces {} entries and {} bytes, the archive holds {count} and {bytes}",
            manifest.files, manifest.payload_bytes
        )));
    }
    for (key, path) in [
        ("scripts.install", Some(&manifest.scripts.install)),
        ("scripts.health", manifest.scripts.health.as_ref()),
        ("scripts.rollback", manifest.scripts.rollback.as_ref()),
        ("agent_binary", manifest.agent_binary.as_ref()),
    ] {
        if let Some(path) = path {
            let is_file = normalize(Path::new(path))
                .ok()
                .and_then(|rel| std::fs::symlink_metadata(dest.join(rel)).ok())
                .is_some_and(|m| m.is_file());
            if !is_file {
                return Err(refused(
                    path,
                    format!("{key} names no regular file in the bundle"),
                ));
            }
        }
    }
    Ok(manifest)
}

/// A relative path with `.` dropped; refuses absolute paths, `..` and empty paths.
fn normalize(path: &Path) -> Result<PathBuf, String> {
    let text = path.to_string_lossy();
    check_relative_path(&text).map_err(str::to_owned)?;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err("leaves the bundle".into()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("is empty".into());
    }
    Ok(out)
}

/// Creates the missing parents of `rel` under `dest`, refusing to pass through anything that is
/// not a real directory (a symlink planted by an earlier entry, or a file).
fn ensure_parents(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut current = dest.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "passes through {}, which is not a directory",
                    current.display()
                ))
            }
            Err(_) => std::fs::create_dir(&current)
                .map_err(|e| format!("creating {}: {e}", current.display()))?,
        }
    }
    Ok(())
}

/// Writes exactly `size` bytes to a new file (never through an existing path), executable only if
/// the archive said so, never setuid/setgid.
fn write_file(
    entry: &mut impl std::io::Read,
    target: &Path,
    size: u64,
    mode: u32,
) -> Result<(), ExtractError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(perm)
        .open(target)
        .map_err(io(target))?;
    let written = std::io::copy(&mut entry.take(size), &mut file).map_err(io(target))?;
    if written != size {
        return Err(ExtractError::Archive(format!(
            "{} is truncated ({written} of {size} bytes)",
            target.display()
        )));
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(perm)).map_err(io(target))?;
    Ok(())
}
