//! `imagebuilder build`: tenant config + base ISO → `NAME.iso`, `NAME.iso.sha256`, `NAME.build.json`.
//!
//! Nothing is written until everything is validated; the ISO is written to a temporary file in the
//! output directory (mode 0600: it carries a secret) and renamed into place only when complete, so a
//! failure (bad input, full disk) leaves nothing behind.

use crate::render::{render, Templates};
use crate::tenant::Tenant;
use crate::{iso, prepared, validate};
use anyhow::Context as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

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
    /// Where prepared ISOs are kept between builds; `None` prepares one for this build only.
    pub cache_dir: Option<PathBuf>,
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
    pub prepared: PreparedInfo,
}

/// Which prepared ISO the tenant ISO was copied from.
#[derive(Debug, Clone, Serialize)]
pub struct PreparedInfo {
    /// SHA-256 over the base's and agent's hashes, the overlays and the kernel arguments.
    pub key: String,
    /// True when it came from the cache (the build cost one copy).
    pub reused: bool,
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

/// Hex SHA-256 of a file (with a progress bar on a terminal).
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    crate::resumable_sha256::finish(path, crate::resumable_sha256::Midstate::START)
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
    let manifest = IsoManifest {
        tenant: name.clone(),
        server_url: tenant.server_url.clone(),
        token_id: token.id().to_owned(),
        agent_version: agent_version.clone(),
        templates_sha256: options.templates.hash(),
    };
    let slots = prepared::fill_slots(&seed, &manifest)?;
    // What the installer reads is the padded text: validate exactly that.
    let validation = validate::validate_user_data(&slots[0].1, &slots[1].1)?;
    let mut overlay_dirs = vec![options.overlays.clone()];
    overlay_dirs.extend(tenant.overlays.iter().cloned());
    let spec = prepared::PrepareSpec {
        base: &options.base,
        agent: &options.agent,
        overlays: &overlay_dirs,
        kernel_args: &seed.kernel_args,
    };
    let prepared = prepared::obtain(options.cache_dir.as_deref(), &spec)?;

    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("creating output directory {}", options.out_dir.display()))?;
    let tmp = options
        .out_dir
        .join(format!(".{name}.iso.tmp-{}", std::process::id()));
    let guard = TempOutput(Some(tmp.clone()));
    create_private(&tmp)?;
    copy_into(&prepared.iso, &tmp)?;
    prepared.layout.write_slots(&tmp, &slots)?;
    let iso_sha256 = crate::resumable_sha256::finish(&tmp, prepared.layout.hash_prefix)?;

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
                sha256: prepared.base_sha256.clone(),
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
            overlays_sha256: prepared::hash_trees(&overlay_dirs)?,
        },
        tools: Tools {
            imagebuilder: env!("CARGO_PKG_VERSION").to_owned(),
            xorriso: iso::xorriso_version()?,
        },
        validation,
        boot_records: prepared.layout.boot_records.clone(),
        source_date_epoch: prepared.layout.epoch,
        prepared: PreparedInfo {
            key: prepared.key.clone(),
            reused: prepared.reused,
        },
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

/// Copies `from` into the already created (0600) file `to`; the kernel copies without a trip
/// through user space where it can (`copy_file_range`).
fn copy_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let source =
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .with_context(|| format!("opening {}", to.display()))?;
    let len = source.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = crate::progress::bytes(len, "copying prepared ISO");
    // In chunks, so the bar moves; each chunk is still a kernel-side copy.
    loop {
        let copied = std::io::copy(&mut (&source).take(64 << 20), &mut target)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        if copied == 0 {
            break;
        }
        bar.inc(copied);
    }
    bar.finish_and_clear();
    target
        .sync_all()
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(())
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
    fn dynamic_executables_are_recognised() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(
            is_dynamic_elf(&me).unwrap(),
            "test binaries are dynamically linked"
        );
        assert!(is_dynamic_elf(b"#!/bin/sh\n").is_err());
    }
}
