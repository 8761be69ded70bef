//! `imagebuilder build`: tenant config + base ISO → `NAME.iso`, `NAME.iso.sha256`, `NAME.build.json`.
//!
//! Nothing is written until everything is validated; the ISO is written to a temporary file in the
//! output directory (mode 0600: it carries a secret) and renamed into place only when complete, so a
//! failure (bad input, full disk) leaves nothing behind.

use crate::render::{patch_grub_cfg, render, Seed, Templates};
use crate::tenant::Tenant;
use crate::{iso, validate};
use anyhow::Context as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Menu timeout of the remastered ISO, in seconds: zero touch, but a technician can still pick.
const GRUB_TIMEOUT_S: u32 = 3;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub tenant: String,
    pub base: PathBuf,
    pub tenants_dir: PathBuf,
    pub out_dir: PathBuf,
    pub force: bool,
    /// The static kernex-agent to install.
    pub agent: PathBuf,
    /// Files laid into the installed system (the systemd unit); tenant overlays come on top.
    pub overlays: PathBuf,
    pub templates: Templates,
}

/// The JSON build record: every input's hash, the tools, what was checked. No secrets.
#[derive(Debug, Clone, Serialize)]
pub struct BuildRecord {
    pub tenant: String,
    pub iso: PathBuf,
    pub iso_sha256: String,
    pub token_id: String,
    /// SHA-256 of the whole token: identifies it without revealing it.
    pub token_sha256: String,
    pub agent_version: String,
    pub inputs: Inputs,
    pub tools: Tools,
    pub validation: validate::Validation,
    pub boot_records: String,
    pub source_date_epoch: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    pub base_iso: FileHash,
    pub agent: FileHash,
    pub tenant_config: FileHash,
    pub templates_sha256: String,
    pub overlays_sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileHash {
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tools {
    pub imagebuilder: String,
    pub xorriso: String,
}

/// What goes onto the ISO next to the seed: public facts for `imagebuilder inspect`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct IsoManifest {
    pub tenant: String,
    pub server_url: String,
    pub token_id: String,
    pub agent_version: String,
    pub templates_sha256: String,
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(kernex_protocol::token::hex(&hasher.finalize()))
}

/// Deletes the temporary output unless the build completes.
struct TempOutput(Option<PathBuf>);

impl Drop for TempOutput {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub fn build(options: &BuildOptions) -> anyhow::Result<BuildRecord> {
    let tenant = Tenant::load(&options.tenants_dir, &options.tenant)?;
    let name = &tenant.name;
    let iso_path = options.out_dir.join(format!("{name}.iso"));
    let sha_path = options.out_dir.join(format!("{name}.iso.sha256"));
    let record_path = options.out_dir.join(format!("{name}.build.json"));
    for path in [&iso_path, &sha_path, &record_path] {
        if path.exists() && !options.force {
            anyhow::bail!(
                "{} already exists; pass --force to replace it",
                path.display()
            );
        }
    }
    iso::check_ubuntu_layout(&options.base)?;
    let agent_version = check_agent(&options.agent)?;
    let token = tenant.bootstrap_token()?;
    let seed = render(&options.templates, &tenant, &token)?;
    let validation = validate::validate_user_data(&seed.user_data, &seed.meta_data)?;

    let stage = tempfile::Builder::new()
        .prefix(".imagebuilder-")
        .tempdir_in(&options.out_dir)
        .with_context(|| {
            format!(
                "creating a staging directory in {} (does it exist and is it writable?)",
                options.out_dir.display()
            )
        })?;
    let extracted = iso::extract(
        &options.base,
        &["/boot/grub/grub.cfg", "/md5sum.txt"],
        stage.path(),
    )?;
    let grub = std::fs::read_to_string(&extracted[0]).context("reading the base's grub.cfg")?;
    let grub = patch_grub_cfg(&grub, &seed.kernel_args, GRUB_TIMEOUT_S)
        .with_context(|| format!("base ISO {}: /boot/grub/grub.cfg", options.base.display()))?;
    let manifest = IsoManifest {
        tenant: name.clone(),
        server_url: tenant.server_url.clone(),
        token_id: token.id().to_owned(),
        agent_version: agent_version.clone(),
        templates_sha256: options.templates.hash(),
    };
    let mut overlay_dirs = vec![options.overlays.clone()];
    overlay_dirs.extend(tenant.overlays.iter().cloned());
    let staged = stage_files(
        stage.path(),
        &seed,
        &grub,
        &manifest,
        &options.agent,
        &overlay_dirs,
    )?;
    let md5 = update_md5sums(
        &std::fs::read_to_string(&extracted[1]).context("reading the base's md5sum.txt")?,
        &staged,
    )?;
    std::fs::write(stage.path().join("md5sum.txt"), md5).context("writing md5sum.txt")?;

    let epoch = iso::volume_epoch(&options.base)?;
    set_mtimes(stage.path(), epoch)?;
    let tmp = options
        .out_dir
        .join(format!(".{name}.iso.tmp-{}", std::process::id()));
    let guard = TempOutput(Some(tmp.clone()));
    create_private(&tmp)?;
    let maps = vec![
        (stage.path().join("nocloud"), "/nocloud".to_owned()),
        (stage.path().join("kernex"), "/kernex".to_owned()),
        (
            stage.path().join("grub.cfg"),
            "/boot/grub/grub.cfg".to_owned(),
        ),
        (stage.path().join("md5sum.txt"), "/md5sum.txt".to_owned()),
    ];
    iso::remaster(&options.base, &tmp, &maps, epoch)?;
    let boot_records = iso::boot_report(&tmp)?;
    check_boot_records(&iso::boot_report(&options.base)?, &boot_records)?;
    let iso_sha256 = sha256_file(&tmp)?;

    let record = BuildRecord {
        tenant: name.clone(),
        iso: iso_path.clone(),
        iso_sha256: iso_sha256.clone(),
        token_id: token.id().to_owned(),
        token_sha256: kernex_protocol::token::hex(&Sha256::digest(token.expose().as_bytes())),
        agent_version,
        inputs: Inputs {
            base_iso: FileHash {
                path: options.base.clone(),
                sha256: sha256_file(&options.base)?,
            },
            agent: FileHash {
                path: options.agent.clone(),
                sha256: sha256_file(&options.agent)?,
            },
            tenant_config: FileHash {
                path: tenant.file.clone(),
                sha256: sha256_file(&tenant.file)?,
            },
            templates_sha256: options.templates.hash(),
            overlays_sha256: hash_tree(&stage.path().join("kernex/overlays"))?,
        },
        tools: Tools {
            imagebuilder: env!("CARGO_PKG_VERSION").to_owned(),
            xorriso: iso::xorriso_version()?,
        },
        validation,
        boot_records,
        source_date_epoch: epoch,
    };
    std::fs::write(&sha_path, format!("{iso_sha256}  {name}.iso\n"))
        .with_context(|| format!("writing {}", sha_path.display()))?;
    std::fs::write(&record_path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", record_path.display()))?;
    std::fs::rename(&tmp, &iso_path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), iso_path.display()))?;
    std::mem::forget(guard);
    Ok(record)
}

/// The agent must be a static executable (the installed system may lack its libraries). Returns its
/// version as `kernex-agent --version` prints it.
fn check_agent(agent: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(agent)
        .with_context(|| format!("reading agent binary {}", agent.display()))?;
    if is_dynamic_elf(&bytes).with_context(|| {
        format!(
            "agent binary {} is not an x86-64 ELF executable",
            agent.display()
        )
    })? {
        anyhow::bail!(
            "agent binary {} is dynamically linked; build the static one with `just agent`",
            agent.display()
        );
    }
    let out = iso::run(std::process::Command::new(agent).arg("--version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// True when the ELF file has a program interpreter (`PT_INTERP`), i.e. needs a dynamic loader.
fn is_dynamic_elf(bytes: &[u8]) -> anyhow::Result<bool> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(0..5) != Some(b"\x7fELF\x02") {
        anyhow::bail!("not a 64-bit ELF file");
    }
    let phoff = u64_at(0x20).context("truncated ELF header")? as usize;
    let phentsize = u16_at(0x36).context("truncated ELF header")? as usize;
    let phnum = u16_at(0x38).context("truncated ELF header")? as usize;
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize).context("truncated program headers")? == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Lays out `nocloud/`, `kernex/` and `grub.cfg` in `stage`; returns the ISO paths of every regular
/// file staged (for md5sum.txt), with their host paths.
fn stage_files(
    stage: &Path,
    seed: &Seed,
    grub: &str,
    manifest: &IsoManifest,
    agent: &Path,
    overlays: &[PathBuf],
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    use std::os::unix::fs::PermissionsExt as _;
    let nocloud = stage.join("nocloud");
    let kernex = stage.join("kernex");
    std::fs::create_dir_all(&nocloud)?;
    std::fs::create_dir_all(kernex.join("overlays"))?;
    let write = |path: PathBuf, text: &str, mode: u32| -> anyhow::Result<()> {
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write(nocloud.join("user-data"), &seed.user_data, 0o444)?;
    write(nocloud.join("meta-data"), &seed.meta_data, 0o444)?;
    write(kernex.join("bootstrap.toml"), &seed.bootstrap_toml, 0o400)?;
    write(
        kernex.join("manifest.json"),
        &(serde_json::to_string_pretty(manifest)? + "\n"),
        0o444,
    )?;
    write(stage.join("grub.cfg"), grub, 0o444)?;
    std::fs::copy(agent, kernex.join("kernex-agent"))
        .with_context(|| format!("copying {}", agent.display()))?;
    std::fs::set_permissions(
        kernex.join("kernex-agent"),
        std::fs::Permissions::from_mode(0o555),
    )?;
    for dir in overlays {
        copy_tree(dir, &kernex.join("overlays"))
            .with_context(|| format!("copying overlay {}", dir.display()))?;
    }
    let mut files = vec![("/boot/grub/grub.cfg".to_owned(), stage.join("grub.cfg"))];
    for root in ["nocloud", "kernex"] {
        for path in walk(&stage.join(root))? {
            let relative = path
                .strip_prefix(stage)
                .expect("walked under stage")
                .to_string_lossy()
                .into_owned();
            files.push((format!("/{relative}"), path));
        }
    }
    Ok(files)
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

/// SHA-256 over relative paths and contents of every file under `dir`.
fn hash_tree(dir: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    for path in walk(dir)? {
        h.update(
            path.strip_prefix(dir)
                .expect("walked under dir")
                .to_string_lossy()
                .as_bytes(),
        );
        h.update([0]);
        h.update(std::fs::read(&path)?);
        h.update([0]);
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
        let sum = md5_file(host)?;
        if lines.insert(key.clone(), sum).is_none() {
            order.push(key);
        }
    }
    Ok(order
        .iter()
        .map(|p| format!("{}  {p}\n", lines[p]))
        .collect())
}

fn md5_file(path: &Path) -> anyhow::Result<String> {
    let out = iso::run(std::process::Command::new("md5sum").arg(path))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
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

fn create_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
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
    }

    #[test]
    fn boot_record_comparison_ignores_dates_and_intervals() {
        let base = "-V 'A'\n--modification-date=2024\n-b '/boot/grub/i386-pc/eltorito.img'\n-append_partition 2 0xef --interval:local_fs:100d-200d::'b.iso'\n";
        let same = "-V 'A'\n--modification-date=2026\n-b '/boot/grub/i386-pc/eltorito.img'\n-append_partition 2 0xef --interval:local_fs:300d-400d::'o.iso'\n";
        assert!(check_boot_records(base, same).is_ok());
        assert!(check_boot_records(base, "-V 'A'\n").is_err());
    }

    #[test]
    fn dynamic_executables_are_recognised() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(
            is_dynamic_elf(&me).unwrap(),
            "test binaries are dynamically linked"
        );
        assert!(is_dynamic_elf(b"#!/bin/sh\n").is_err());
    }
}
