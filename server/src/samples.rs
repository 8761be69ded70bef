//! Recent CPU and memory use per device, for the console's sparklines.
//!
//! The database keeps only each device's latest telemetry (a heartbeat is one row update); the
//! short history a sparkline draws lives here, in memory: [`SAMPLES`] whole-percent pairs per
//! device, about 100 bytes each, keyed by a 64-bit hash of the device id (one hashing per
//! heartbeat, no copy of the id; two devices sharing a hash would share a sparkline, about once in
//! 10^7 fleets of a million devices). It is per replica and starts empty: behind a balancer a sparkline
//! shows the heartbeats this replica received, and after a restart it fills up again.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Mutex;

/// Samples kept per device (at a 60 s interval, the last 40 minutes).
pub const SAMPLES: usize = 40;
const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Ring {
    cpu: [u8; SAMPLES],
    mem: [u8; SAMPLES],
    /// Samples recorded so far, saturating at `SAMPLES`; the next one goes to `next`.
    len: u8,
    next: u8,
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            cpu: [0; SAMPLES],
            mem: [0; SAMPLES],
            len: 0,
            next: 0,
        }
    }
}

/// One device's history, oldest first, in whole percent.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct History {
    pub cpu: Vec<u8>,
    pub mem: Vec<u8>,
}

/// Keys are already hashes: the maps use them as they are.
#[derive(Debug, Default, Clone, Copy)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (u64 keys); fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Shard = HashMap<u64, Ring, std::hash::BuildHasherDefault<Prehashed>>;

#[derive(Debug)]
pub struct Samples {
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            hasher: std::hash::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

fn percent(value: f64) -> u8 {
    if value.is_finite() {
        value.round().clamp(0.0, 100.0) as u8
    } else {
        0
    }
}

impl Samples {
    fn shard(&self, device_id: &str) -> (u64, std::sync::MutexGuard<'_, Shard>) {
        let key = self.hasher.hash_one(device_id);
        // The low bits pick the shard; the map spreads on the whole hash.
        let shard = self.shards[key as usize % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (key, shard)
    }

    /// Records one heartbeat's CPU and memory use (percent).
    pub fn record(&self, device_id: &str, cpu_percent: f64, mem_percent: f64) {
        let (key, mut shard) = self.shard(device_id);
        let ring = shard.entry(key).or_default();
        let at = usize::from(ring.next);
        ring.cpu[at] = percent(cpu_percent);
        ring.mem[at] = percent(mem_percent);
        ring.next = ((at + 1) % SAMPLES) as u8;
        ring.len = (usize::from(ring.len) + 1).min(SAMPLES) as u8;
    }

    /// The device's samples, oldest first (empty if this replica has none).
    pub fn history(&self, device_id: &str) -> History {
        let (key, shard) = self.shard(device_id);
        let Some(ring) = shard.get(&key).copied() else {
            return History::default();
        };
        drop(shard);
        let len = usize::from(ring.len);
        let start = (usize::from(ring.next) + SAMPLES - len) % SAMPLES;
        let order = (0..len).map(|i| (start + i) % SAMPLES);
        History {
            cpu: order.clone().map(|i| ring.cpu[i]).collect(),
            mem: order.map(|i| ring.mem[i]).collect(),
        }
    }

    /// Forgets a device (deregistered).
    pub fn forget(&self, device_id: &str) {
        let (key, mut shard) = self.shard(device_id);
        shard.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_samples_oldest_first() {
        let samples = Samples::default();
        assert_eq!(samples.history("d"), History::default());
        samples.record("d", 10.4, 50.0);
        samples.record("d", 20.6, f64::NAN);
        assert_eq!(
            samples.history("d"),
            History {
                cpu: vec![10, 21],
                mem: vec![50, 0]
            }
        );
        for i in 0..(SAMPLES + 5) {
            samples.record("d", i as f64, 250.0);
        }
        let history = samples.history("d");
        assert_eq!(history.cpu.len(), SAMPLES);
        assert_eq!(history.cpu.first(), Some(&5));
        assert_eq!(history.cpu.last(), Some(&((SAMPLES + 4) as u8)));
        assert!(history.mem.iter().all(|&m| m == 100));
        assert!(samples.history("other").cpu.is_empty());
        samples.forget("d");
        assert!(samples.history("d").cpu.is_empty());
    }
}
