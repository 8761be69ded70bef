//! Telemetry from `/proc` and `statvfs`: no external commands, a few small reads per heartbeat.

use kernex_protocol::wire::Telemetry;
use std::path::PathBuf;

/// Samples telemetry; keeps the previous CPU counters so CPU % covers the time between beats.
#[derive(Debug)]
pub struct Sampler {
    disk_path: PathBuf,
    /// Where the deployer keeps bundles (`<name>/current`), for the active versions.
    bundles_root: Option<PathBuf>,
    previous_cpu: Option<CpuTimes>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl Sampler {
    /// `disk_path`: a path on the file system whose size and free space are reported.
    pub fn new(disk_path: PathBuf) -> Sampler {
        let mut sampler = Sampler {
            disk_path,
            bundles_root: None,
            previous_cpu: None,
        };
        sampler.previous_cpu = read("/proc/stat").and_then(|s| parse_cpu(&s));
        sampler
    }

    /// Also reports the active version of every bundle under `root`.
    pub fn with_bundles(self, root: PathBuf) -> Sampler {
        Sampler {
            bundles_root: Some(root),
            ..self
        }
    }

    /// Missing sources give zeros rather than failing the heartbeat.
    pub fn sample(&mut self) -> Telemetry {
        let mut t = Telemetry::default();
        if let Some(now) = read("/proc/stat").and_then(|s| parse_cpu(&s)) {
            if let Some(before) = self.previous_cpu {
                t.cpu_percent = cpu_percent(before, now);
            }
            self.previous_cpu = Some(now);
        }
        if let Some(text) = read("/proc/meminfo") {
            t.mem_total_bytes = meminfo_kib(&text, "MemTotal:") * 1024;
            t.mem_available_bytes = meminfo_kib(&text, "MemAvailable:") * 1024;
        }
        if let Some((l1, l5, l15)) = read("/proc/loadavg").and_then(|s| parse_loadavg(&s)) {
            (t.load1, t.load5, t.load15) = (l1, l5, l15);
        }
        if let Some(up) =
            read("/proc/uptime").and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        {
            t.uptime_s = up as u64;
        }
        if let Ok(fs) = rustix::fs::statvfs(&self.disk_path) {
            t.disk_total_bytes = fs.f_blocks * fs.f_frsize;
            t.disk_free_bytes = fs.f_bavail * fs.f_frsize;
        }
        if let Some(root) = &self.bundles_root {
            t.bundles = crate::deploy::active_versions(root);
        }
        t
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The aggregate `cpu` line of `/proc/stat`: idle = idle + iowait, busy = the rest.
fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 4 {
        return None;
    }
    // guest and guest_nice (fields 9, 10) are already counted in user and nice.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

fn cpu_percent(before: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(before.busy);
    ((busy as f64 / total as f64) * 1000.0).round() / 10.0
}

fn meminfo_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn parse_loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(
            parse_cpu(stat),
            Some(CpuTimes {
                busy: 150,
                total: 1000
            })
        );
        let later = CpuTimes {
            busy: 250,
            total: 1200,
        };
        assert_eq!(
            cpu_percent(
                CpuTimes {
                    busy: 150,
                    total: 1000
                },
                later
            ),
            50.0
        );
        assert_eq!(cpu_percent(later, later), 0.0);
        let meminfo = "MemTotal:       16318076 kB\nMemFree:  1 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal:"), 16318076);
        assert_eq!(meminfo_kib(meminfo, "MemAvailable:"), 8000000);
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            Some((0.52, 0.58, 0.59))
        );
        assert_eq!(parse_loadavg("garbage"), None);
    }

    #[test]
    fn samples_this_machine() {
        let mut sampler = Sampler::new(std::env::temp_dir());
        let t = sampler.sample();
        assert!(t.mem_total_bytes > 0 && t.mem_available_bytes <= t.mem_total_bytes);
        assert!(t.disk_total_bytes > 0 && t.disk_free_bytes <= t.disk_total_bytes);
        assert!(t.uptime_s > 0);
        assert!((0.0..=100.0).contains(&t.cpu_percent));
    }
}
