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
    for (key, path) in manifest.named_files() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// One raw tar entry: path bytes written as-is (no validation), type, data, link target.
    struct Raw<'a> {
        path: &'a str,
        kind: tar::EntryType,
        data: &'a [u8],
        link: Option<&'a str>,
        mode: u32,
    }

    fn file<'a>(path: &'a str, data: &'a [u8]) -> Raw<'a> {
        Raw {
            path,
            kind: tar::EntryType::Regular,
            data,
            link: None,
            mode: 0o644,
        }
    }

    fn special<'a>(path: &'a str, kind: tar::EntryType, link: Option<&'a str>) -> Raw<'a> {
        Raw {
            path,
            kind,
            data: b"",
            link,
            mode: 0o644,
        }
    }

    const INSTALL: &[u8] = b"#!/bin/sh\nexit 0\n";

    /// A manifest whose counts match `entries` plus the install script, unless overridden.
    fn manifest_for(entries: &[Raw<'_>], files: Option<u64>, bytes: Option<u64>) -> String {
        let payload: u64 = entries
            .iter()
            .filter(|e| e.kind == tar::EntryType::Regular)
            .map(|e| e.data.len() as u64)
            .sum::<u64>()
            + INSTALL.len() as u64;
        format!(
            "name = \"t\"\nversion = \"1.0.0\"\npayload_bytes = {}\nfiles = {}\n[scripts]\ninstall = \"install.sh\"\n",
            bytes.unwrap_or(payload),
            files.unwrap_or(entries.len() as u64 + 1)
        )
    }

    fn header(raw: &Raw<'_>, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        let name = &mut header.as_old_mut().name;
        name[..raw.path.len()].copy_from_slice(raw.path.as_bytes());
        header.set_entry_type(raw.kind);
        header.set_mode(raw.mode);
        header.set_size(size);
        if let Some(link) = raw.link {
            let linkname = &mut header.as_old_mut().linkname;
            linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        header
    }

    fn archive(dir: &Path, manifest: &str, entries: &[Raw<'_>]) -> PathBuf {
        let path = dir.join("bundle.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        let m = file(MANIFEST, manifest.as_bytes());
        tar.append(&header(&m, m.data.len() as u64), m.data)
            .unwrap();
        let mut install = file("install.sh", INSTALL);
        install.mode = 0o4755; // setuid: must be dropped
        tar.append(&header(&install, INSTALL.len() as u64), INSTALL)
            .unwrap();
        for raw in entries {
            tar.append(&header(raw, raw.data.len() as u64), raw.data)
                .unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        path
    }

    /// Every path under `dir`, to prove a refused archive wrote nothing anywhere.
    fn tree(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.clone());
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                out.extend(tree(&path));
            }
        }
        out.sort();
        out
    }

    /// Extracts into `<tmp>/dest` and returns the error text; checks nothing was left anywhere.
    fn refused_with(archive_of: impl FnOnce(&Path) -> PathBuf, limits: Limits) -> String {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("sentinel")).unwrap();
        let path = archive_of(tmp.path());
        let before = tree(tmp.path());
        let dest = tmp.path().join("dest");
        let err = extract(&path, &dest, &limits).unwrap_err().to_string();
        assert!(!dest.exists(), "{err}: dest left behind");
        assert_eq!(tree(tmp.path()), before, "{err}: something was written");
        err
    }

    fn hostile(entries: &[Raw<'_>], expected: &str) {
        let err = refused_with(
            |dir| archive(dir, &manifest_for(entries, None, None), entries),
            Limits::default(),
        );
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    }

    #[test]
    fn a_good_bundle_extracts_with_modes_and_internal_links() {
        let tmp = tempfile::tempdir().unwrap();
        let entries = [
            special("bin", tar::EntryType::Directory, None),
            Raw {
                mode: 0o755,
                ..file("bin/tool", b"#!/bin/sh\n")
            },
            file("etc/conf/app.toml", b"a = 1\n"),
            special("current-tool", tar::EntryType::Symlink, Some("bin/tool")),
            special("same-tool", tar::EntryType::Link, Some("bin/tool")),
        ];
        let path = archive(tmp.path(), &manifest_for(&entries, None, None), &entries);
        let dest = tmp.path().join("dest");
        let manifest = extract(&path, &dest, &Limits::default()).unwrap();
        assert_eq!(manifest.name, "t");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &str| {
            std::fs::metadata(dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("install.sh"), 0o755, "setuid dropped");
        assert_eq!(mode("etc/conf/app.toml"), 0o644);
        assert_eq!(
            std::fs::read_link(dest.join("current-tool")).unwrap(),
            Path::new("bin/tool")
        );
        assert_eq!(
            std::fs::read(dest.join("same-tool")).unwrap(),
            b"#!/bin/sh\n"
        );
    }

    #[test]
    fn paths_that_leave_the_bundle_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside-evil").display().to_string();
        hostile(&[file(&outside, b"x")], "is absolute");
        hostile(&[file("../evil", b"x")], "leaves the bundle");
        hostile(&[file("a/../../evil", b"x")], "leaves the bundle");
        hostile(&[file("./a/./../../../evil", b"x")], "leaves the bundle");
    }

    #[test]
    fn links_that_leave_the_bundle_are_refused() {
        hostile(
            &[special("etc", tar::EntryType::Symlink, Some("/etc"))],
            "absolute path /etc",
        );
        hostile(
            &[special("up", tar::EntryType::Symlink, Some("../../x"))],
            "leaves the bundle",
        );
        hostile(
            &[special("d/up", tar::EntryType::Symlink, Some("../.."))],
            "leaves the bundle",
        );
        hostile(
            &[special("dot", tar::EntryType::Symlink, Some("."))],
            "leaves the bundle",
        );
        // A link that stays inside, then an entry written through it.
        hostile(
            &[
                special("sub", tar::EntryType::Directory, None),
                special("here", tar::EntryType::Symlink, Some("sub")),
                file("here/x", b"x"),
            ],
            "which is not a directory",
        );
        hostile(
            &[special("pw", tar::EntryType::Link, Some("/etc/passwd"))],
            "leaves the bundle",
        );
        hostile(
            &[special("pw", tar::EntryType::Link, Some("../outside"))],
            "leaves the bundle",
        );
        hostile(
            &[special("pw", tar::EntryType::Link, Some("later"))],
            "not a file extracted before",
        );
    }

    #[test]
    fn devices_fifos_and_duplicates_are_refused() {
        hostile(
            &[special("null", tar::EntryType::Char, None)],
            "not allowed",
        );
        hostile(
            &[special("sda", tar::EntryType::Block, None)],
            "not allowed",
        );
        hostile(
            &[special("pipe", tar::EntryType::Fifo, None)],
            "not allowed",
        );
        hostile(&[file("a", b"1"), file("a", b"2")], "appears twice");
        hostile(&[file("install.sh", b"again")], "appears twice");
    }

    #[test]
    fn bombs_and_lying_manifests_stop_before_writing_past_the_limits() {
        // 64 MiB of zeros compresses to ~64 KiB; the limit stops it at the header.
        let zeros = vec![0u8; 64 << 20];
        let limits = Limits {
            max_bytes: 1 << 20,
            max_files: 100,
        };
        let err = refused_with(
            |dir| {
                let entries = [file("zeros", &zeros)];
                archive(dir, &manifest_for(&entries, None, None), &entries)
            },
            limits,
        );
        assert!(err.contains("would exceed the 1048576 bytes"), "{err}");
        let many: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
        let err = refused_with(
            |dir| {
                let entries: Vec<Raw<'_>> = many.iter().map(|p| file(p, b"x")).collect();
                archive(dir, &manifest_for(&entries, None, None), &entries)
            },
            Limits {
                max_bytes: 1 << 20,
                max_files: 3,
            },
        );
        assert!(err.contains("more entries than the 3"), "{err}");
        // The manifest understates the payload: refused at the entry that exceeds it.
        let err = refused_with(
            |dir| {
                let entries = [file("big", &[1u8; 1000])];
                archive(dir, &manifest_for(&entries, None, Some(100)), &entries)
            },
            Limits::default(),
        );
        assert!(err.contains("would exceed the 100 bytes"), "{err}");
        // The manifest overstates the file count: refused at the end.
        let err = refused_with(
            |dir| {
                let entries = [file("a", b"x")];
                archive(dir, &manifest_for(&entries, Some(9), None), &entries)
            },
            Limits::default(),
        );
        assert!(err.contains("announces 9 entries"), "{err}");
    }

    #[test]
    fn malformed_archives_and_manifests_are_refused() {
        let err = refused_with(
            |dir| {
                let path = dir.join("b.tar.gz");
                std::fs::write(&path, b"this is not gzip").unwrap();
                path
            },
            Limits::default(),
        );
        assert!(err.contains("bundle archive"), "{err}");
        let err = refused_with(
            |dir| {
                let good = archive(
                    dir,
                    &manifest_for(&[], None, None),
                    &[file("a", &[5u8; 5000])],
                );
                let bytes = std::fs::read(&good).unwrap();
                std::fs::write(&good, &bytes[..bytes.len() / 2]).unwrap();
                good
            },
            Limits::default(),
        );
        assert!(err.contains("bundle"), "{err}");
        let err = refused_with(|dir| archive(dir, "name = \"t\"\n", &[]), Limits::default());
        assert!(err.contains("missing field `version`"), "{err}");
        let err = refused_with(
            |dir| {
                let path = dir.join("b.tar.gz");
                let gz = flate2::write::GzEncoder::new(
                    std::fs::File::create(&path).unwrap(),
                    flate2::Compression::fast(),
                );
                let mut tar = tar::Builder::new(gz);
                tar.append(&header(&file("readme", b"hi"), 2), &b"hi"[..])
                    .unwrap();
                tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
                path
            },
            Limits::default(),
        );
        assert!(
            err.contains("the first entry must be manifest.toml"),
            "{err}"
        );
        let err = refused_with(
            |dir| {
                let path = dir.join("b.tar.gz");
                let gz = flate2::write::GzEncoder::new(
                    std::fs::File::create(&path).unwrap(),
                    flate2::Compression::fast(),
                );
                tar::Builder::new(gz)
                    .into_inner()
                    .unwrap()
                    .finish()
                    .unwrap();
                path
            },
            Limits::default(),
        );
        assert!(err.contains("empty"), "{err}");
        // The install script the manifest names is missing.
        let err = refused_with(
            |dir| {
                let path = dir.join("b.tar.gz");
                let gz = flate2::write::GzEncoder::new(
                    std::fs::File::create(&path).unwrap(),
                    flate2::Compression::fast(),
                );
                let mut tar = tar::Builder::new(gz);
                let text =
                    "name = \"t\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"install.sh\"\n";
                tar.append(
                    &header(&file(MANIFEST, text.as_bytes()), text.len() as u64),
                    text.as_bytes(),
                )
                .unwrap();
                tar.into_inner().unwrap().finish().unwrap();
                path
            },
            Limits::default(),
        );
        assert!(
            err.contains("scripts.install names no regular file"),
            "{err}"
        );
    }
}
