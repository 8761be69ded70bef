//! Everything that touches an ISO image goes through xorriso, here and nowhere else. The base is
//! never unpacked: files are read out one by one and the output is the base plus mapped files, with
//! the boot records replayed (`-boot_image any replay`).

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Files a base must have to be an Ubuntu live-server ISO we know how to remaster.
pub const REQUIRED_FILES: [&str; 6] = [
    "/casper/vmlinuz",
    "/casper/initrd",
    "/boot/grub/grub.cfg",
    "/.disk/info",
    "/md5sum.txt",
    "/EFI/boot/bootx64.efi",
];

/// Runs `command`; the error names the whole command line and carries its stderr.
pub fn run(command: &mut Command) -> anyhow::Result<std::process::Output> {
    let line = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = command
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !output.status.success() {
        anyhow::bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn xorriso() -> Command {
    let mut c = Command::new("xorriso");
    // Fail on real errors, not on the notes xorriso prints about the media.
    c.args(["-abort_on", "FAILURE", "-return_with", "FAILURE", "32"]);
    c
}

/// `xorriso` version line, for build records.
pub fn xorriso_version() -> anyhow::Result<String> {
    let out = run(Command::new("xorriso").arg("-version"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Refuses a base that lacks the Ubuntu live-server layout, naming what is missing.
pub fn check_ubuntu_layout(base: &Path) -> anyhow::Result<()> {
    if !base.is_file() {
        anyhow::bail!("base ISO {}: no such file", base.display());
    }
    let out = run(xorriso()
        .arg("-indev")
        .arg(base)
        .arg("-lsd")
        .args(REQUIRED_FILES))
    .with_context(|| format!("reading base ISO {}", base.display()))?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| !listed.contains(&format!("'{f}'")))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "base ISO {} is not an Ubuntu live-server ISO: missing {}",
            base.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// Copies single files out of `iso` into `dest_dir` (named by their base names).
pub fn extract(iso: &Path, files: &[&str], dest_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut command = xorriso();
    command.args(["-osirrox", "on"]).arg("-indev").arg(iso);
    let mut outputs = Vec::new();
    for file in files {
        let dest = dest_dir.join(file.rsplit('/').next().unwrap_or(file));
        command.arg("-extract").arg(file).arg(&dest);
        outputs.push(dest);
    }
    run(&mut command)
        .with_context(|| format!("extracting {} from {}", files.join(", "), iso.display()))?;
    Ok(outputs)
}

/// The boot setup of `iso` as mkisofs options (`-report_el_torito as_mkisofs`).
pub fn boot_report(iso: &Path) -> anyhow::Result<String> {
    let out = run(xorriso()
        .arg("-indev")
        .arg(iso)
        .args(["-report_el_torito", "as_mkisofs"]))
    .with_context(|| format!("reading the boot records of {}", iso.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The primary volume descriptor's modification time as Unix seconds: the date given to new files,
/// so identical inputs give identical bytes.
pub fn volume_epoch(iso: &Path) -> anyhow::Result<i64> {
    let out = run(xorriso().arg("-indev").arg(iso).arg("-pvd_info"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let stamp = text
        .lines()
        .find_map(|l| l.strip_prefix("Modif. Time  : "))
        .with_context(|| format!("{}: no volume modification time", iso.display()))?;
    parse_volume_time(stamp.trim())
        .with_context(|| format!("{}: unreadable volume time `{stamp}`", iso.display()))
}

/// `YYYYMMDDhhmmsscc` (UTC) → Unix seconds.
fn parse_volume_time(s: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d, hh, mm, ss) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(8..10)?,
        n(10..12)?,
        n(12..14)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Writes `out`: `base` plus `maps` (host path → path in the ISO), boot records replayed, dates
/// fixed to `epoch`.
pub fn remaster(
    base: &Path,
    out: &Path,
    maps: &[(PathBuf, String)],
    epoch: i64,
) -> anyhow::Result<()> {
    let mut command = xorriso();
    command.env("SOURCE_DATE_EPOCH", epoch.to_string());
    command.arg("-indev").arg(base).arg("-outdev").arg(out);
    for (host, iso_path) in maps {
        command.arg("-map").arg(host).arg(iso_path);
    }
    // Rock Ridge keeps atime, mtime and ctime of every mapped file and directory: pin all three (and
    // those of the directories the maps touched) so they do not carry the build machine's clock.
    let stamp = format!("={epoch}");
    let mut touched: Vec<&str> = maps.iter().map(|(_, p)| p.as_str()).collect();
    touched.extend(["/", "/boot", "/boot/grub"]);
    for kind in ["b", "c"] {
        command
            .args(["-alter_date_r", kind, &stamp])
            .args(&touched)
            .arg("--");
    }
    command.args(["-boot_image", "any", "replay"]);
    let spinner = crate::progress::spinner("remastering the base ISO with xorriso");
    let result = run(&mut command).with_context(|| format!("writing {}", out.display()));
    spinner.finish_and_clear();
    result?;
    Ok(())
}

/// (ISO path, byte offset, size) of each of `paths`, which must be stored as one extent each.
pub fn file_extents(iso: &Path, paths: &[&str]) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut command = xorriso();
    command.arg("-indev").arg(iso);
    for path in paths {
        command.args(["-find", path, "-exec", "report_lba", "--"]);
    }
    let out = run(&mut command).with_context(|| format!("locating files in {}", iso.display()))?;
    let mut extents = Vec::new();
    // File data lba:  0 ,    11250 ,        1 ,     1289 , '/nocloud/user-data'
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("File data lba:"))
    {
        let fields: Vec<&str> = line.splitn(5, ',').map(str::trim).collect();
        let [extent, lba, _blocks, size, path] = fields[..] else {
            continue;
        };
        anyhow::ensure!(
            extent == "0",
            "{path} is stored in several extents in {}",
            iso.display()
        );
        let lba: u64 = lba
            .parse()
            .with_context(|| format!("bad LBA in `{line}`"))?;
        let size: u64 = size
            .parse()
            .with_context(|| format!("bad size in `{line}`"))?;
        extents.push((path.trim_matches('\'').to_owned(), lba * 2048, size));
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_times_parse() {
        assert_eq!(parse_volume_time("1970010100000000"), Some(0));
        assert_eq!(parse_volume_time("2024082714003600"), Some(1_724_767_236));
        assert_eq!(parse_volume_time("garbage"), None);
    }
}
