//! Retry pacing: exponential backoff with full jitter (a random wait between zero and the capped
//! exponential), so a fleet that lost its server does not come back in lockstep; a server's
//! `Retry-After` is a floor.

use rand::Rng as _;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

/// Shortest wait, so a burst of failures never spins.
const FLOOR: Duration = Duration::from_millis(100);

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The wait before the next attempt after one more failure.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let jittered = rand::thread_rng().gen_range(Duration::ZERO..=ceiling);
        jittered
            .max(FLOOR)
            .max(retry_after.unwrap_or(Duration::ZERO))
    }

    /// The largest wait the next failure can give.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(30));
        self.base.saturating_mul(factor).min(self.cap)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `interval` ± 10 %, so devices that booted together spread out.
pub fn jittered(interval: Duration) -> Duration {
    let spread = interval.as_secs_f64() * 0.1;
    let offset = rand::thread_rng().gen_range(-spread..=spread);
    Duration::from_secs_f64((interval.as_secs_f64() + offset).max(0.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let ceilings: Vec<u64> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay(None);
                assert!(d <= c.max(FLOOR), "{d:?} > {c:?}");
                c.as_secs()
            })
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));
        assert!(b.next_delay(Some(Duration::from_secs(30))) >= Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(60));
            assert!(
                d >= Duration::from_secs(54) && d <= Duration::from_secs(66),
                "{d:?}"
            );
        }
    }
}
