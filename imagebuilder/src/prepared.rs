//! The fast per-tenant path. What differs between two tenants' ISOs is a few KiB: the seed, the
//! bootstrap file, the manifest and md5sum.txt. So the expensive part (remastering the base with the
//! agent, overlays and the autoinstall grub.cfg) is done once per (base, agent, overlays, kernel
//! arguments) into a *prepared ISO* whose per-tenant files are fixed-size slots, and cached. A tenant
//! ISO is then a copy of it with the slots' bytes overwritten in place: one copy, no xorriso.
//!
//! Slot contents are padded to their size with a trailing comment line (`#` in YAML and TOML,
//! spaces in JSON), so every file keeps a length the ISO's directory records already state.

use crate::build::{sha256_file, IsoManifest};
use crate::iso;
use crate::render::{patch_grub_cfg, Seed};
use anyhow::Context as _;
use md5::{Digest as _, Md5};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Menu timeout of the remastered ISO, in seconds: zero touch, but a technician can still pick.
const GRUB_TIMEOUT_S: u32 = 3;

/// The per-tenant files and their reserved sizes, in the order of [`fill_slots`]'s result.
pub const SLOTS: [(&str, usize); 4] = [
    ("/nocloud/user-data", 64 * 1024),
    ("/nocloud/meta-data", 4 * 1024),
    ("/kernex/bootstrap.toml", 32 * 1024),
    ("/kernex/manifest.json", 4 * 1024),
];

/// The inputs a prepared ISO depends on.
#[derive(Debug)]
pub struct PrepareSpec<'a> {
    pub base: &'a Path,
    pub agent: &'a Path,
    /// The shared overlays first, then the tenant's.
    pub overlays: &'a [PathBuf],
    pub kernel_args: &'a str,
}

/// Where each slot and md5sum.txt sit in a prepared ISO.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    /// (ISO path, byte offset, size) of each slot, in [`SLOTS`] order.
    pub slots: Vec<(String, u64, u64)>,
    pub md5sum_offset: u64,
    /// md5sum.txt as prepared; per tenant only the slots' sums change (same length).
    pub md5sum_text: String,
    pub boot_records: String,
    pub epoch: i64,
    /// SHA-256 state of everything before the first slot: tenant builds hash only the rest.
    pub hash_prefix: crate::resumable_sha256::Midstate,
}

#[derive(Debug)]
pub struct Prepared {
    pub iso: PathBuf,
    pub layout: Layout,
    pub key: String,
    pub base_sha256: String,
    pub reused: bool,
    /// Holds an uncached prepared ISO until the build is done.
    _scratch: Option<tempfile::TempDir>,
}

/// The slot contents for one tenant, padded to their reserved sizes.
pub fn fill_slots(
    seed: &Seed,
    manifest: &IsoManifest,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let manifest = serde_json::to_string_pretty(manifest)? + "\n";
    let texts = [
        &seed.user_data,
        &seed.meta_data,
        &seed.bootstrap_toml,
        &manifest,
    ];
    SLOTS
        .iter()
        .zip(texts)
        .map(|(&(path, size), text)| Ok((path, pad(path, text, size)?)))
        .collect()
}

/// `text` plus a comment line that brings it to exactly `size` bytes.
fn pad(path: &str, text: &str, size: usize) -> anyhow::Result<String> {
    let mut out = text.to_owned();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    let marker = if path.ends_with(".json") { " " } else { "#" };
    if out.len() + 2 > size {
        anyhow::bail!(
            "{path} is {} bytes; its reserved slot holds {}",
            text.len(),
            size - 2
        );
    }
    out.push_str(marker);
    out.push_str(&" ".repeat(size - out.len() - 1));
    out.push('\n');
    Ok(out)
}

impl Layout {
    /// Overwrites the slots and md5sum.txt of the copy at `iso` with `slots`.
    pub fn write_slots(&self, iso: &Path, slots: &[(&str, String)]) -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(iso)
            .with_context(|| format!("opening {}", iso.display()))?;
        let mut md5sum = self.md5sum_text.clone();
        for ((path, offset, size), (slot_path, text)) in self.slots.iter().zip(slots) {
            anyhow::ensure!(
                path == slot_path && text.len() as u64 == *size,
                "slot {path} does not fit the prepared layout"
            );
            file.write_all_at(text.as_bytes(), *offset)
                .with_context(|| format!("writing {path} into {}", iso.display()))?;
            md5sum = replace_md5(&md5sum, path, &md5_hex(text.as_bytes()))?;
        }
        anyhow::ensure!(
            md5sum.len() == self.md5sum_text.len(),
            "md5sum.txt changed length"
        );
        file.write_all_at(md5sum.as_bytes(), self.md5sum_offset)
            .with_context(|| format!("writing md5sum.txt into {}", iso.display()))?;
        file.sync_all()
            .with_context(|| format!("writing {}", iso.display()))?;
        Ok(())
    }
}

fn replace_md5(md5sum: &str, iso_path: &str, sum: &str) -> anyhow::Result<String> {
    let suffix = format!("  .{iso_path}");
    let mut found = false;
    let text = md5sum
        .lines()
        .map(|line| {
            if line.ends_with(&suffix) {
                found = true;
                format!("{sum}{suffix}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    anyhow::ensure!(found, "md5sum.txt has no line for {iso_path}");
    Ok(text + "\n")
}

fn md5_hex(bytes: &[u8]) -> String {
    kernex_protocol::token::hex(&Md5::digest(bytes))
}

/// The cache directory's default: `$XDG_CACHE_HOME/kernex/imagebuilder` or `~/.cache/...`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("kernex/imagebuilder"))
}

/// The prepared ISO for `spec`: from `cache_dir` when it is there, else built (and cached).
pub fn obtain(cache_dir: Option<&Path>, spec: &PrepareSpec<'_>) -> anyhow::Result<Prepared> {
    let base_sha256 = base_sha256(cache_dir, spec.base)?;
    let mut key = Sha256::new();
    for part in [
        env!("CARGO_PKG_VERSION"),
        &base_sha256,
        &sha256_file(spec.agent)?,
        &hash_trees(spec.overlays)?,
        spec.kernel_args,
        &format!("{SLOTS:?}"),
    ] {
        key.update(part.as_bytes());
        key.update([0]);
    }
    let key = kernex_protocol::token::hex(&key.finalize());
    let (dir, scratch) = match cache_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating cache directory {}", dir.display()))?;
            (dir.to_owned(), None)
        }
        None => {
            let scratch = tempfile::tempdir().context("creating a scratch directory")?;
            (scratch.path().to_owned(), Some(scratch))
        }
    };
    let iso = dir.join(format!("prepared-{key}.iso"));
    let layout_path = dir.join(format!("prepared-{key}.json"));
    if let (true, Ok(text)) = (iso.is_file(), std::fs::read_to_string(&layout_path)) {
        if let Ok(layout) = serde_json::from_str::<Layout>(&text) {
            return Ok(Prepared {
                iso,
                layout,
                key,
                base_sha256,
                reused: true,
                _scratch: scratch,
            });
        }
    }
    let tmp = dir.join(format!(".prepared-{key}.iso.tmp-{}", std::process::id()));
    let result = build_prepared(spec, &tmp);
    let layout = match result {
        Ok(layout) => layout,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::write(&layout_path, serde_json::to_string_pretty(&layout)?)
        .with_context(|| format!("writing {}", layout_path.display()))?;
    std::fs::rename(&tmp, &iso)
        .with_context(|| format!("renaming {} to {}", tmp.display(), iso.display()))?;
    Ok(Prepared {
        iso,
        layout,
        key,
        base_sha256,
        reused: false,
        _scratch: scratch,
    })
}

/// SHA-256 of the base ISO, remembered in the cache by (path, size, modification time): hashing a
/// 3 GB ISO on every build would cost more than the build.
fn base_sha256(cache_dir: Option<&Path>, base: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(base).with_context(|| format!("reading {}", base.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos());
    let canonical = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_owned());
    let id = format!("{}\0{}\0{:?}", canonical.display(), meta.len(), modified);
    let memo = cache_dir.map(|d| {
        d.join(format!(
            "base-{}.sha256",
            kernex_protocol::token::hex(&Sha256::digest(id.as_bytes()))
        ))
    });
    if let Some(memo) = &memo {
        if let Ok(text) = std::fs::read_to_string(memo) {
            if text.trim().len() == 64 {
                return Ok(text.trim().to_owned());
            }
        }
    }
    let sum = sha256_file(base)?;
    if let Some(memo) = memo {
        let _ = std::fs::create_dir_all(memo.parent().unwrap_or(Path::new(".")));
        let _ = std::fs::write(memo, &sum);
    }
    Ok(sum)
}

/// Remasters the base into `out` with the agent, overlays, patched grub.cfg and placeholder slots.
fn build_prepared(spec: &PrepareSpec<'_>, out: &Path) -> anyhow::Result<Layout> {
    let stage = tempfile::Builder::new()
        .prefix(".imagebuilder-stage-")
        .tempdir()
        .context("creating a staging directory")?;
    let stage = stage.path();
    let extracted = iso::extract(spec.base, &["/boot/grub/grub.cfg", "/md5sum.txt"], stage)?;
    let grub = std::fs::read_to_string(&extracted[0]).context("reading the base's grub.cfg")?;
    let grub = patch_grub_cfg(&grub, spec.kernel_args, GRUB_TIMEOUT_S)
        .with_context(|| format!("base ISO {}: /boot/grub/grub.cfg", spec.base.display()))?;
    std::fs::write(stage.join("grub.cfg"), grub).context("staging grub.cfg")?;
    let kernex = stage.join("kernex");
    std::fs::create_dir_all(stage.join("nocloud"))?;
    std::fs::create_dir_all(kernex.join("overlays"))?;
    for (path, size) in SLOTS {
        let placeholder = pad(
            path,
            &format!("# kernex: reserved for the tenant's {path}\n"),
            size,
        )?;
        std::fs::write(stage.join(&path[1..]), placeholder)
            .with_context(|| format!("staging {path}"))?;
    }
    std::fs::copy(spec.agent, kernex.join("kernex-agent"))
        .with_context(|| format!("copying {}", spec.agent.display()))?;
    set_mode(&kernex.join("kernex-agent"), 0o555)?;
    set_mode(&kernex.join("bootstrap.toml"), 0o400)?;
    for dir in spec.overlays {
        copy_tree(dir, &kernex.join("overlays"))
            .with_context(|| format!("copying overlay {}", dir.display()))?;
    }
    let mut staged = vec![("/boot/grub/grub.cfg".to_owned(), stage.join("grub.cfg"))];
    for root in ["nocloud", "kernex"] {
        for path in walk(&stage.join(root))? {
            let relative = path
                .strip_prefix(stage)
                .expect("walked under stage")
                .to_string_lossy()
                .into_owned();
            staged.push((format!("/{relative}"), path));
        }
    }
    let base_md5 =
        std::fs::read_to_string(&extracted[1]).context("reading the base's md5sum.txt")?;
    let md5sum_text = update_md5sums(&base_md5, &staged)?;
    std::fs::write(stage.join("md5sum.txt"), &md5sum_text).context("staging md5sum.txt")?;

    let epoch = iso::volume_epoch(spec.base)?;
    set_mtimes(stage, epoch)?;
    let maps = vec![
        (stage.join("nocloud"), "/nocloud".to_owned()),
        (stage.join("kernex"), "/kernex".to_owned()),
        (stage.join("grub.cfg"), "/boot/grub/grub.cfg".to_owned()),
        (stage.join("md5sum.txt"), "/md5sum.txt".to_owned()),
    ];
    iso::remaster(spec.base, out, &maps, epoch)?;
    let boot_records = iso::boot_report(out)?;
    check_boot_records(&iso::boot_report(spec.base)?, &boot_records)?;
    let mut wanted: Vec<&str> = SLOTS.iter().map(|(p, _)| *p).collect();
    wanted.push("/md5sum.txt");
    let extents = iso::file_extents(out, &wanted)?;
    let find = |path: &str| {
        extents
            .iter()
            .find(|(p, _, _)| p == path)
            .map(|(_, offset, len)| (*offset, *len))
            .with_context(|| format!("{path} not found in {}", out.display()))
    };
    let mut slots = Vec::new();
    for (path, size) in SLOTS {
        let (offset, len) = find(path)?;
        anyhow::ensure!(
            len == size as u64,
            "{path} is {len} bytes in the prepared ISO, expected {size}"
        );
        slots.push((path.to_owned(), offset, len));
    }
    let (md5sum_offset, md5_len) = find("/md5sum.txt")?;
    anyhow::ensure!(
        md5_len == md5sum_text.len() as u64,
        "md5sum.txt has an unexpected size in {}",
        out.display()
    );
    let first_slot = slots
        .iter()
        .map(|(_, offset, _)| *offset)
        .chain([md5sum_offset])
        .min()
        .unwrap_or(0);
    let hash_prefix = crate::resumable_sha256::prefix(out, first_slot)?;
    Ok(Layout {
        slots,
        md5sum_offset,
        md5sum_text,
        boot_records,
        epoch,
        hash_prefix,
    })
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for path in walk(from)? {
        let target = to.join(path.strip_prefix(from).expect("walked under from"));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
    }
    Ok(())
}

/// SHA-256 over the relative paths and contents of every file under each of `dirs`, in order.
pub fn hash_trees(dirs: &[PathBuf]) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    for dir in dirs {
        for path in walk(dir)? {
            h.update(
                path.strip_prefix(dir)
                    .expect("walked under dir")
                    .to_string_lossy()
                    .as_bytes(),
            );
            h.update([0]);
            h.update(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
            h.update([0]);
        }
        h.update([1]);
    }
    Ok(kernex_protocol::token::hex(&h.finalize()))
}

/// Ubuntu's md5sum.txt with the lines of changed files replaced and new files added, so "check disc
/// for defects" still passes.
fn update_md5sums(original: &str, staged: &[(String, PathBuf)]) -> anyhow::Result<String> {
    let mut lines: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for line in original.lines().filter(|l| !l.trim().is_empty()) {
        if let Some((sum, path)) = line.split_once("  ") {
            order.push(path.to_owned());
            lines.insert(path.to_owned(), sum.to_owned());
        }
    }
    for (iso_path, host) in staged {
        let key = format!(".{iso_path}");
        let sum =
            md5_hex(&std::fs::read(host).with_context(|| format!("reading {}", host.display()))?);
        if lines.insert(key.clone(), sum).is_none() {
            order.push(key);
        }
    }
    Ok(order
        .iter()
        .map(|p| format!("{}  {p}\n", lines[p]))
        .collect())
}

/// The output must boot the same ways the base did: same El Torito entries, same partitions; only
/// dates and sizes may differ.
fn check_boot_records(base: &str, output: &str) -> anyhow::Result<()> {
    let essential = |report: &str| -> Vec<String> {
        report
            .lines()
            .filter(|l| !l.starts_with("--modification-date") && !l.starts_with("-V "))
            .map(|l| {
                // Intervals name block ranges that move when files are added.
                match l.find("--interval:") {
                    Some(at) => l[..at].to_owned(),
                    None => l.to_owned(),
                }
            })
            .collect()
    };
    let (before, after) = (essential(base), essential(output));
    if before != after {
        anyhow::bail!(
            "the remastered ISO's boot records differ from the base's:\nbase:\n{}\noutput:\n{}",
            before.join("\n"),
            after.join("\n")
        );
    }
    Ok(())
}

fn set_mtimes(dir: &Path, epoch: i64) -> anyhow::Result<()> {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch.max(0) as u64);
    for path in walk(dir)? {
        std::fs::File::options()
            .write(true)
            .open(&path)
            .or_else(|_| std::fs::File::open(&path))
            .and_then(|f| f.set_modified(time))
            .with_context(|| format!("setting the date of {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5sums_replace_and_add() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g");
        std::fs::write(&f, "x").unwrap();
        let out = update_md5sums(
            "aaa  ./boot/grub/grub.cfg\nbbb  ./casper/vmlinuz\n",
            &[
                ("/boot/grub/grub.cfg".into(), f.clone()),
                ("/nocloud/user-data".into(), f),
            ],
        )
        .unwrap();
        let x = "9dd4e461268c8034f5c8564e155c67a6";
        assert_eq!(
            out,
            format!("{x}  ./boot/grub/grub.cfg\nbbb  ./casper/vmlinuz\n{x}  ./nocloud/user-data\n")
        );
        let replaced = replace_md5(&out, "/nocloud/user-data", &"0".repeat(32)).unwrap();
        assert_eq!(replaced.len(), out.len());
        assert!(replace_md5(&out, "/nope", "x").is_err());
    }

    #[test]
    fn boot_record_comparison_ignores_dates_and_intervals() {
        let base = "-V 'A'\n--modification-date=2024\n-b '/boot/grub/i386-pc/eltorito.img'\n-append_partition 2 0xef --interval:local_fs:100d-200d::'b.iso'\n";
        let same = "-V 'A'\n--modification-date=2026\n-b '/boot/grub/i386-pc/eltorito.img'\n-append_partition 2 0xef --interval:local_fs:300d-400d::'o.iso'\n";
        assert!(check_boot_records(base, same).is_ok());
        assert!(check_boot_records(base, "-V 'A'\n").is_err());
    }

    #[test]
    fn padding_fills_slots_exactly_and_refuses_overflow() {
        let padded = pad("/nocloud/user-data", "a: 1", 64).unwrap();
        assert_eq!(padded.len(), 64);
        assert!(padded.starts_with("a: 1\n#") && padded.ends_with(" \n"));
        let json = pad("/kernex/manifest.json", "{}", 16).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json).unwrap(),
            serde_json::json!({})
        );
        let err = pad("/nocloud/meta-data", &"x".repeat(63), 64)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/nocloud/meta-data is 63 bytes; its reserved slot holds 62"
        );
    }
}
