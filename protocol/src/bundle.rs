//! Bundles: what operators ship to appliances.
//!
//! A packed bundle is one file:
//!
//! ```text
//! [archive: gzip-compressed tar, `manifest.toml` first, then the payload]
//! [signature: RSASSA-PKCS1-v1_5/SHA-256 by the publisher key over the archive's SHA-256 digest]
//! [trailer: signature length (u32 LE) + magic "KXBUNDL1"]
//! ```
//!
//! The signature signs the archive's SHA-256, so whoever streams the file (the server on upload,
//! the agent on download) hashes the archive on the way and checks the signature at the end without
//! a second pass. The trailer sits at the end so packing is one forward write and a reader of a
//! stream finds it in the last bytes it holds back ([`Splitter`]).

use crate::signing::{DeviceKey, DevicePublicKey, SigningError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the manifest, the first entry of every archive.
pub const MANIFEST: &str = "manifest.toml";
/// The trailer's magic: the format and its version.
pub const MAGIC: &[u8; 8] = b"KXBUNDL1";
/// Signature length (u32 LE) + magic.
pub const TRAILER_LEN: usize = 12;
/// Longest signature accepted (RSA-8192 would be 1024 bytes).
pub const MAX_SIGNATURE_LEN: usize = 1024;
/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// A publisher key signs bundles; the same RSA-4096 keys and scheme as device keys.
pub type PublisherKey = DeviceKey;
/// The public half, trusted per tenant and delivered to its agents.
pub type PublisherPublicKey = DevicePublicKey;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{MANIFEST}: {0}")]
    Manifest(String),
    #[error("not a Kernex bundle: {0}")]
    Format(String),
    #[error("bundle signature: {0}")]
    Signature(#[from] SigningError),
    #[error("the bundle is signed by no key this tenant trusts")]
    UntrustedPublisher,
}

fn io_error(path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> BundleError {
    move |source| BundleError::Io {
        path: path.to_string(),
        source,
    }
}

/// `manifest.toml`, as operators write it. `pack` fills in `payload_bytes` and `files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Semantic version; a deployment installs only a newer one unless it is an explicit rollback.
    pub version: String,
    /// Device classes the bundle runs on; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compatible: Vec<String>,
    /// The bundle carries a new `kernex-agent` at `agent_binary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_binary: Option<String>,
    pub scripts: Scripts,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Total size of the regular files after extraction; written by `pack`, checked on extraction.
    #[serde(default)]
    pub payload_bytes: u64,
    /// Number of entries after the manifest; written by `pack`, checked on extraction.
    #[serde(default)]
    pub files: u64,
}

/// Paths inside the bundle, run with the bundle directory as working directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scripts {
    pub install: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_install", with = "humantime_serde_str")]
    pub install: Duration,
    /// How long the health script may keep failing before the deployment is rolled back.
    #[serde(default = "default_health", with = "humantime_serde_str")]
    pub health: Duration,
    #[serde(default = "default_install", with = "humantime_serde_str")]
    pub rollback: Duration,
}

fn default_install() -> Duration {
    Duration::from_secs(60)
}
fn default_health() -> Duration {
    Duration::from_secs(30)
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            install: default_install(),
            health: default_health(),
            rollback: default_install(),
        }
    }
}

mod humantime_serde_str {
    use serde::{Deserialize as _, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

/// Longest script timeout accepted: an hour.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

impl Manifest {
    /// Parses and validates `manifest.toml` text.
    pub fn parse(text: &str) -> Result<Manifest, BundleError> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| BundleError::Manifest(e.message().to_owned()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |m: String| Err(BundleError::Manifest(m));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(format!(
                "name {:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if let Err(e) = semver::Version::parse(&self.version) {
            return bad(format!(
                "version {:?} is not a semantic version: {e}",
                self.version
            ));
        }
        for (key, path) in self.named_files() {
            if let Err(why) = check_relative_path(path) {
                return bad(format!("{key} = {path:?}: {why}"));
            }
        }
        for (key, value) in [
            ("timeouts.install", self.timeouts.install),
            ("timeouts.health", self.timeouts.health),
            ("timeouts.rollback", self.timeouts.rollback),
        ] {
            if value.is_zero() || value > MAX_TIMEOUT {
                return bad(format!("{key} must be between 1s and 1h"));
            }
        }
        Ok(())
    }

    /// The files the manifest names, with the key naming each: every one must be a regular file
    /// of the bundle (checked by `pack` and again on extraction).
    pub fn named_files(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("scripts.install", Some(&self.scripts.install)),
            ("scripts.health", self.scripts.health.as_ref()),
            ("scripts.rollback", self.scripts.rollback.as_ref()),
            ("agent_binary", self.agent_binary.as_ref()),
        ]
        .into_iter()
        .filter_map(|(key, path)| path.map(|p| (key, p.as_str())))
    }

    pub fn semver(&self) -> semver::Version {
        semver::Version::parse(&self.version).expect("validated at parse")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest serializes")
    }
}

/// A path inside a bundle: relative, normal components only, no `..`, not empty.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.len() > 1024 {
        return Err("is longer than 1024 bytes");
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err("is absolute");
    }
    for component in p.components() {
        match component {
            std::path::Component::Normal(_) | std::path::Component::CurDir => {}
            _ => return Err("leaves the bundle (`..` or a root)"),
        }
    }
    Ok(())
}

/// What `pack` produced.
#[derive(Debug, Clone)]
pub struct Packed {
    pub manifest: Manifest,
    /// Hex SHA-256 of the archive (the signed digest).
    pub sha256: String,
    /// Size of the whole packed file.
    pub bytes: u64,
}

/// Packs directory `dir` (which holds `manifest.toml`) into `out`, signed with `key`.
///
/// The archive is reproducible: entries sorted by path, owner 0, mtime 0, modes kept (0755 or
/// 0644). Only regular files and directories are packed; anything else in `dir` is an error
/// naming it.
pub fn pack(dir: &Path, key: &PublisherKey, out: &Path) -> Result<Packed, BundleError> {
    let manifest_path = dir.join(MANIFEST);
    let text =
        std::fs::read_to_string(&manifest_path).map_err(io_error(manifest_path.display()))?;
    let mut manifest = Manifest::parse(&text)?;
    let mut entries = Vec::new();
    collect(dir, Path::new(""), &mut entries)?;
    entries.retain(|(rel, _)| rel != Path::new(MANIFEST));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    manifest.files = entries.len() as u64;
    manifest.payload_bytes = entries
        .iter()
        .filter(|(_, meta)| meta.is_file())
        .map(|(_, meta)| meta.len())
        .sum();
    for (key, path) in manifest.named_files() {
        if !entries
            .iter()
            .any(|(rel, meta)| meta.is_file() && rel == Path::new(path))
        {
            return Err(BundleError::Manifest(format!(
                "{key} = {path:?} is not a file in {}",
                dir.display()
            )));
        }
    }

    let file = std::fs::File::create(out).map_err(io_error(out.display()))?;
    let mut hashing = HashingWriter {
        inner: std::io::BufWriter::new(file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    {
        let gz = flate2::write::GzEncoder::new(&mut hashing, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let manifest_text = manifest.to_toml();
        append(
            &mut tar,
            Path::new(MANIFEST),
            0o644,
            manifest_text.len() as u64,
            manifest_text.as_bytes(),
        )
        .map_err(io_error(out.display()))?;
        for (rel, meta) in &entries {
            let full = dir.join(rel);
            if meta.is_dir() {
                let mut header = header(tar::EntryType::Directory, 0o755, 0);
                tar.append_data(&mut header, rel, std::io::empty())
                    .map_err(io_error(full.display()))?;
            } else {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                let reader = std::fs::File::open(&full).map_err(io_error(full.display()))?;
                append(&mut tar, rel, mode, meta.len(), reader)
                    .map_err(io_error(full.display()))?;
            }
        }
        tar.into_inner()
            .and_then(|gz| gz.finish())
            .map_err(io_error(out.display()))?;
    }
    let digest: [u8; 32] = hashing.hasher.finalize_reset().into();
    let signature = key.sign_raw(&digest);
    let mut inner = hashing.inner;
    let sig_len = u32::try_from(signature.len()).expect("signature length fits u32");
    inner
        .write_all(&signature)
        .and_then(|_| inner.write_all(&sig_len.to_le_bytes()))
        .and_then(|_| inner.write_all(MAGIC))
        .and_then(|_| inner.flush())
        .and_then(|_| inner.get_ref().sync_all())
        .map_err(io_error(out.display()))?;
    Ok(Packed {
        manifest,
        sha256: crate::token::hex(&digest),
        bytes: hashing.bytes + signature.len() as u64 + TRAILER_LEN as u64,
    })
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    mode: u32,
    size: u64,
    data: impl Read,
) -> std::io::Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, size);
    tar.append_data(&mut header, path, data)
}

/// Walks `dir` (without following symlinks) and refuses anything but files and directories.
fn collect(
    root: &Path,
    rel: &Path,
    out: &mut Vec<(PathBuf, std::fs::Metadata)>,
) -> Result<(), BundleError> {
    let dir = root.join(rel);
    let read = std::fs::read_dir(&dir).map_err(io_error(dir.display()))?;
    for entry in read {
        let entry = entry.map_err(io_error(dir.display()))?;
        let rel = rel.join(entry.file_name());
        let meta = std::fs::symlink_metadata(entry.path()).map_err(io_error(rel.display()))?;
        if meta.is_dir() {
            out.push((rel.clone(), meta));
            collect(root, &rel, out)?;
        } else if meta.is_file() {
            out.push((rel, meta));
        } else {
            return Err(BundleError::Format(format!(
                "{}: only regular files and directories can be packed",
                root.join(&rel).display()
            )));
        }
    }
    Ok(())
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Splits a packed bundle read as a stream into archive and signature: feed every chunk to
/// [`Splitter::push`], which returns the bytes known to be archive (to store or extract) and
/// hashes them; [`Splitter::finish`] parses the trailer from the bytes held back.
#[derive(Debug)]
pub struct Splitter {
    held: Vec<u8>,
    hasher: Sha256,
    archive_bytes: u64,
}

/// The end of a packed bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Hex SHA-256 of the archive.
    pub sha256: String,
    pub digest: [u8; 32],
    pub signature: Vec<u8>,
    pub archive_bytes: u64,
}

const HOLD_BACK: usize = MAX_SIGNATURE_LEN + TRAILER_LEN;

impl Default for Splitter {
    fn default() -> Self {
        Splitter {
            held: Vec::with_capacity(2 * HOLD_BACK),
            hasher: Sha256::new(),
            archive_bytes: 0,
        }
    }
}

impl Splitter {
    /// Takes `chunk`; hands `emit` every byte now known to be archive (all but the last
    /// [`HOLD_BACK`] bytes seen so far).
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if chunk.len() >= HOLD_BACK {
            // Everything held, plus the chunk but its tail, is archive.
            let (body, tail) = chunk.split_at(chunk.len() - HOLD_BACK);
            if !self.held.is_empty() {
                self.hasher.update(&self.held);
                self.archive_bytes += self.held.len() as u64;
                emit(&self.held)?;
                self.held.clear();
            }
            self.hasher.update(body);
            self.archive_bytes += body.len() as u64;
            emit(body)?;
            self.held.extend_from_slice(tail);
        } else {
            self.held.extend_from_slice(chunk);
            if self.held.len() > HOLD_BACK {
                let release = self.held.len() - HOLD_BACK;
                self.hasher.update(&self.held[..release]);
                self.archive_bytes += release as u64;
                emit(&self.held[..release])?;
                self.held.drain(..release);
            }
        }
        Ok(())
    }

    /// Parses the trailer; the held-back bytes before the signature are the archive's last
    /// bytes and go to `emit` first.
    pub fn finish<E>(
        mut self,
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<Result<Sealed, BundleError>, E> {
        let held = std::mem::take(&mut self.held);
        let Some(trailer_at) = held.len().checked_sub(TRAILER_LEN) else {
            return Ok(Err(BundleError::Format("the file is too short".into())));
        };
        let (rest, trailer) = held.split_at(trailer_at);
        if &trailer[4..] != MAGIC {
            return Ok(Err(BundleError::Format(
                "no bundle trailer at the end (was it made by `kernex-server bundle pack`?)".into(),
            )));
        }
        let sig_len = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes")) as usize;
        if sig_len == 0 || sig_len > MAX_SIGNATURE_LEN || sig_len > rest.len() {
            return Ok(Err(BundleError::Format(format!(
                "signature length {sig_len} in the trailer is impossible"
            ))));
        }
        let (archive_tail, signature) = rest.split_at(rest.len() - sig_len);
        self.hasher.update(archive_tail);
        self.archive_bytes += archive_tail.len() as u64;
        emit(archive_tail)?;
        if self.archive_bytes == 0 {
            return Ok(Err(BundleError::Format("the archive is empty".into())));
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        Ok(Ok(Sealed {
            sha256: crate::token::hex(&digest),
            digest,
            signature: signature.to_vec(),
            archive_bytes: self.archive_bytes,
        }))
    }
}

impl Sealed {
    /// The fingerprint of the first of `trusted` that signed this archive.
    pub fn verify(&self, trusted: &[PublisherPublicKey]) -> Result<String, BundleError> {
        trusted
            .iter()
            .find(|key| key.verify_raw(&self.digest, &self.signature).is_ok())
            .map(|key| key.fingerprint())
            .ok_or(BundleError::UntrustedPublisher)
    }
}

/// Splits a whole packed file in one go: the sealed end, with the archive's bytes hashed.
pub fn read_sealed(path: &Path) -> Result<Sealed, BundleError> {
    let mut file = std::fs::File::open(path).map_err(io_error(path.display()))?;
    let mut splitter = Splitter::default();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buffer).map_err(io_error(path.display()))?;
        if n == 0 {
            break;
        }
        splitter.push(&buffer[..n], |_| Ok::<_, BundleError>(()))?;
    }
    splitter.finish(|_| Ok::<_, BundleError>(()))?
}

/// Reads the manifest, the archive's first entry, from a gzip-compressed tar stream.
pub fn read_manifest(archive: impl Read) -> Result<Manifest, BundleError> {
    let gz = flate2::read::GzDecoder::new(archive);
    let mut tar = tar::Archive::new(gz);
    let mut entries = tar
        .entries()
        .map_err(|e| BundleError::Format(format!("not a tar.gz archive: {e}")))?;
    let mut first = match entries.next() {
        Some(Ok(entry)) => entry,
        Some(Err(e)) => return Err(BundleError::Format(format!("not a tar.gz archive: {e}"))),
        None => return Err(BundleError::Format("the archive is empty".into())),
    };
    let path = first
        .path()
        .map_err(|e| BundleError::Format(format!("unreadable first entry: {e}")))?
        .into_owned();
    if path != Path::new(MANIFEST) || first.header().entry_type() != tar::EntryType::Regular {
        return Err(BundleError::Format(format!(
            "the first entry is {}, not {MANIFEST}",
            path.display()
        )));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(BundleError::Manifest(format!(
            "larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    let mut text = String::new();
    first
        .read_to_string(&mut text)
        .map_err(|e| BundleError::Manifest(format!("unreadable: {e}")))?;
    Manifest::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write_bundle_dir(dir: &Path, manifest: &str) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        std::fs::write(dir.join("install.sh"), "#!/bin/sh\necho installed\n").unwrap();
        std::fs::write(dir.join("bin/hello"), "hello world\n").unwrap();
    }

    const MANIFEST_TEXT: &str =
        "name = \"hello\"\nversion = \"1.2.0\"\n[scripts]\ninstall = \"install.sh\"\n";

    fn key() -> PublisherKey {
        // One key for the module's tests: generation takes a second.
        static KEY: std::sync::OnceLock<PublisherKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| PublisherKey::generate().unwrap())
            .clone()
    }

    #[test]
    fn pack_then_split_verifies_and_reads_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_bundle_dir(&src, MANIFEST_TEXT);
        let out = dir.path().join("hello.kxb");
        let packed = pack(&src, &key(), &out).unwrap();
        assert_eq!(packed.manifest.files, 3); // bin/, bin/hello, install.sh
        assert_eq!(packed.manifest.payload_bytes, 12 + 25);
        assert_eq!(packed.bytes, std::fs::metadata(&out).unwrap().len());

        let sealed = read_sealed(&out).unwrap();
        assert_eq!(sealed.sha256, packed.sha256);
        assert_eq!(
            sealed.verify(&[key().public()]).unwrap(),
            key().public().fingerprint()
        );
        let other = PublisherKey::generate().unwrap();
        assert!(matches!(
            sealed.verify(&[other.public()]),
            Err(BundleError::UntrustedPublisher)
        ));

        let bytes = std::fs::read(&out).unwrap();
        let archive = &bytes[..sealed.archive_bytes as usize];
        let manifest = read_manifest(archive).unwrap();
        assert_eq!(manifest, packed.manifest);

        // Same inputs, same bytes.
        let again = dir.path().join("again.kxb");
        pack(&src, &key(), &again).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), bytes);
    }

    #[test]
    fn splitter_gives_the_same_result_for_any_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_bundle_dir(&src, MANIFEST_TEXT);
        let out = dir.path().join("b.kxb");
        pack(&src, &key(), &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let whole = read_sealed(&out).unwrap();
        for chunk in [1, 7, 500, 1036, 1037, 4096, bytes.len()] {
            let mut splitter = Splitter::default();
            let mut archive = Vec::new();
            for piece in bytes.chunks(chunk) {
                splitter
                    .push(piece, |b| {
                        archive.extend_from_slice(b);
                        Ok::<_, ()>(())
                    })
                    .unwrap();
            }
            let sealed = splitter
                .finish(|b| {
                    archive.extend_from_slice(b);
                    Ok::<_, ()>(())
                })
                .unwrap()
                .unwrap();
            assert_eq!(sealed, whole, "chunk size {chunk}");
            assert_eq!(archive, bytes[..whole.archive_bytes as usize]);
        }
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_bundle_dir(&src, MANIFEST_TEXT);
        let out = dir.path().join("b.kxb");
        pack(&src, &key(), &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();

        let truncated = dir.path().join("truncated");
        std::fs::write(&truncated, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_sealed(&truncated).unwrap_err().to_string();
        assert!(err.contains("no bundle trailer"), "{err}");

        let mut flipped = bytes.clone();
        flipped[100] ^= 1;
        let path = dir.path().join("flipped");
        std::fs::write(&path, &flipped).unwrap();
        let err = read_sealed(&path)
            .unwrap()
            .verify(&[key().public()])
            .unwrap_err();
        assert!(matches!(err, BundleError::UntrustedPublisher));
    }

    #[test]
    fn manifests_are_validated_naming_the_key() {
        for (text, expected) in [
            ("name = \"a b\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"i\"\n", "name"),
            ("name = \"a\"\nversion = \"1.0\"\n[scripts]\ninstall = \"i\"\n", "version"),
            ("name = \"a\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"../i\"\n", "scripts.install"),
            ("name = \"a\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"/bin/sh\"\n", "scripts.install"),
            ("name = \"a\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"i\"\n[timeouts]\ninstall = \"soon\"\n", "soon"),
            ("name = \"a\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"i\"\n[timeouts]\nhealth = \"2h\"\n", "timeouts.health"),
            ("name = \"a\"\nversion = \"1.0.0\"\ncolour = \"red\"\n[scripts]\ninstall = \"i\"\n", "colour"),
            ("name = \"a\"\nversion = \"1.0.0\"\n", "scripts"),
        ] {
            let err = Manifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn pack_refuses_missing_scripts_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_bundle_dir(
            &src,
            "name = \"a\"\nversion = \"1.0.0\"\n[scripts]\ninstall = \"install.sh\"\nhealth = \"health.sh\"\n",
        );
        let err = pack(&src, &key(), &dir.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scripts.health = \"health.sh\" is not a file"),
            "{err}"
        );

        write_bundle_dir(&src, MANIFEST_TEXT);
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let err = pack(&src, &key(), &dir.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("link: only regular files and directories"),
            "{err}"
        );
    }
}
