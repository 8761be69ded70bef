//! Rate limits and the request time limit, as one middleware in front of every route.
//!
//! Who pays for a request:
//! - a request carrying a valid device token counts against its device;
//! - a request carrying an API key (`kxk_…`, valid or not: checking it costs a database lookup)
//!   counts against that key;
//! - anything else (enrollment, `/auth`, probes, requests without credentials) counts against its
//!   source address.
//!
//! Failed authentications (an API key that is unknown, wrong or revoked; a failed console login)
//! also count against their source address in a fourth limiter; once it is exhausted, that
//! address's requests carrying an API key and its console logins are refused before any lookup, so
//! guessing keys or passwords with a fresh string each time stays slow. Requests tried at once
//! all pass that check and are each charged when they fail, so bursts are paid back in waiting.
//! The price: clients sharing an address (NAT, or a proxy without `--forwarded-for`) share this
//! allowance, and one of them failing over and over makes the others' key requests and logins
//! wait too; raise `--rate-limit-failed-auth` (or turn it `off`) where that matters more.
//!
//! Authenticated traffic is not limited per address on purpose: a site's appliances often share one
//! NAT address, and a load balancer in front of the server makes every device look alike. Requests
//! that cost the server most without proving who they are (RSA-signed enrollment and `/auth`,
//! guessed keys) are the ones limited per address.
//!
//! Each limit is a GCRA (generic cell rate algorithm): one timestamp per key, so a million devices
//! cost tens of MiB at most, and idle keys are swept away.

use super::AppState;
use crate::error::ApiError;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hash};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A sustained rate with a burst, e.g. `10/s:30`; `None` in settings means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests allowed per second, sustained.
    pub per_second: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// `N/s`, `N/m` or `N/h`, optionally `:BURST` (default: one second's worth, at least 1).
    fn from_str(text: &str) -> Result<Rate, String> {
        let bad = || {
            format!("invalid rate {text:?}: expected N/s, N/m or N/h, optionally :BURST (e.g. 10/s:30), or `off`")
        };
        let (rate, burst) = match text.split_once(':') {
            Some((rate, burst)) => (rate, Some(burst.parse::<u32>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: f64 = count.trim().parse().map_err(|_| bad())?;
        let seconds = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        if !(count.is_finite() && count > 0.0) || burst == Some(0) {
            return Err(bad());
        }
        let per_second = count / seconds;
        Ok(Rate {
            per_second,
            burst: burst.unwrap_or_else(|| per_second.ceil().max(1.0) as u32),
        })
    }
}

/// A rate, or no limit (`off`), as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit(pub Option<Rate>);

/// Parses a rate or `off` (for command-line options).
pub fn parse_rate(text: &str) -> Result<RateLimit, String> {
    if text == "off" {
        Ok(RateLimit(None))
    } else {
        text.parse().map(|rate| RateLimit(Some(rate)))
    }
}

/// Limits as configured at start.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub per_device: Option<Rate>,
    pub per_api_key: Option<Rate>,
    pub per_address: Option<Rate>,
    /// Failed authentications per source address.
    pub failed_auth_per_address: Option<Rate>,
    /// Longest a request may take to be answered (a download's body streams on after that).
    pub request_timeout: Duration,
    /// Longest a bundle upload may take, body included.
    pub upload_timeout: Duration,
    /// Take the client address from the last `X-Forwarded-For` entry (behind a reverse proxy that
    /// sets it); otherwise the TCP peer.
    pub forwarded_for: bool,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            per_device: Some(Rate {
                per_second: 10.0,
                burst: 30,
            }),
            per_api_key: Some(Rate {
                per_second: 50.0,
                burst: 200,
            }),
            per_address: Some(Rate {
                per_second: 20.0,
                burst: 60,
            }),
            failed_auth_per_address: Some(Rate {
                per_second: 10.0 / 60.0,
                burst: 20,
            }),
            request_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(3600),
            forwarded_for: false,
        }
    }
}

/// Whether [`KeyedLimiter::step`] counts the event.
#[derive(Debug, Clone, Copy)]
enum Count {
    IfAllowed,
    Always,
    Never,
}

/// One GCRA limiter over many keys, sharded so concurrent requests rarely share a lock.
#[derive(Debug)]
pub struct KeyedLimiter {
    /// Nanoseconds between requests at the sustained rate.
    interval: u64,
    /// How far ahead of now a key's theoretical arrival time may run: the burst.
    tolerance: u64,
    epoch: Instant,
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<HashMap<u64, u64>>]>,
}

const SHARDS: usize = 64;

impl KeyedLimiter {
    pub fn new(rate: Rate) -> KeyedLimiter {
        let interval = (1e9 / rate.per_second).max(1.0) as u64;
        KeyedLimiter {
            interval,
            tolerance: interval * u64::from(rate.burst.max(1) - 1),
            epoch: Instant::now(),
            hasher: std::hash::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Counts one request for `key`; `Err(wait)` when over the limit (nothing is counted then).
    pub fn check(&self, key: impl Hash) -> Result<(), Duration> {
        self.check_at(key, self.now())
    }

    fn check_at(&self, key: impl Hash, now: u64) -> Result<(), Duration> {
        self.step(key, now, Count::IfAllowed)
    }

    /// Counts one event for `key` even over the limit, pushing its next allowed time further out:
    /// for failures found only after the fact, so that many tried at once are all paid for.
    pub fn charge(&self, key: impl Hash) {
        let _ = self.step(key, self.now(), Count::Always);
    }

    /// Whether `key` is over the limit now (how long it must wait), without counting anything.
    pub fn exhausted(&self, key: impl Hash) -> Option<Duration> {
        self.step(key, self.now(), Count::Never).err()
    }

    /// The one GCRA step: `Err(wait)` when `key` is over the limit at `now`; the event is counted
    /// as `count` says.
    fn step(&self, key: impl Hash, now: u64, count: Count) -> Result<(), Duration> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shards[hash as usize % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let arrival = shard.get(&hash).copied().unwrap_or(now).max(now);
        let over = arrival - now > self.tolerance;
        let counted = match count {
            Count::IfAllowed => !over,
            Count::Always => true,
            Count::Never => false,
        };
        if counted {
            shard.insert(hash, arrival + self.interval);
        }
        if over {
            Err(Duration::from_nanos(arrival - now - self.tolerance))
        } else {
            Ok(())
        }
    }

    /// Forgets keys whose next arrival time has passed (they are as good as new); returns how many
    /// are left.
    pub fn sweep(&self) -> usize {
        let now = self.now();
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                shard.retain(|_, arrival| *arrival > now);
                shard.len()
            })
            .sum()
    }
}

/// The limiters of a running server.
#[derive(Debug)]
pub struct Limiters {
    pub settings: LimitSettings,
    device: Option<KeyedLimiter>,
    api_key: Option<KeyedLimiter>,
    address: Option<KeyedLimiter>,
    failed_auth: Option<KeyedLimiter>,
}

impl Limiters {
    pub fn new(settings: LimitSettings) -> Limiters {
        Limiters {
            device: settings.per_device.map(KeyedLimiter::new),
            api_key: settings.per_api_key.map(KeyedLimiter::new),
            address: settings.per_address.map(KeyedLimiter::new),
            failed_auth: settings.failed_auth_per_address.map(KeyedLimiter::new),
            settings,
        }
    }

    /// Sweeps idle keys every minute, for as long as the server runs.
    pub fn start_sweeping(self: &std::sync::Arc<Self>) {
        let limiters = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.tick().await;
            loop {
                every.tick().await;
                let Some(limiters) = limiters.upgrade() else {
                    return;
                };
                for limiter in [
                    &limiters.device,
                    &limiters.api_key,
                    &limiters.address,
                    &limiters.failed_auth,
                ]
                .into_iter()
                .flatten()
                {
                    limiter.sweep();
                }
            }
        });
    }
}

/// The client's address: the TCP peer, or the last `X-Forwarded-For` entry when configured.
pub fn client_address(request: &Request, forwarded_for: bool) -> Option<IpAddr> {
    if forwarded_for {
        let forwarded = request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|v| v.trim().parse::<IpAddr>().ok())
            .next_back();
        if forwarded.is_some() {
            return forwarded;
        }
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The middleware: picks who pays, applies that limit, then bounds the time to an answer.
pub async fn limit_requests(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let limiters = &state.limiters;
    // Requests that try a credential: an API key, or a console login.
    let bearer = super::extract::bearer(request.headers());
    let tries_credential = bearer.is_some_and(|b| b.starts_with("kxk_"))
        || (request.method() == axum::http::Method::POST
            && request.uri().path() == "/console/login");
    let failures = match (&limiters.failed_auth, tries_credential) {
        (Some(limiter), true) => {
            client_address(&request, limiters.settings.forwarded_for).map(|a| (limiter, a))
        }
        _ => None,
    };
    if let Some(wait) = failures.and_then(|(limiter, address)| limiter.exhausted(address)) {
        return ApiError::RateLimited {
            scope: "source address after failed authentications",
            retry_after_s: wait.as_secs() + 1,
        }
        .into_response();
    }
    let verdict = match bearer {
        Some(key) if key.starts_with("kxk_") => {
            limiters.api_key.as_ref().map(|l| ("API key", l.check(key)))
        }
        Some(token) => match state
            .device_tokens
            .verify(token, crate::db::now_ms() / 1000)
        {
            Ok(claims) => {
                let verdict = limiters
                    .device
                    .as_ref()
                    .map(|l| ("device", l.check(&claims.device_id)));
                // The device-token extractor takes these instead of checking the HMAC again.
                request.extensions_mut().insert(claims);
                verdict
            }
            Err(_) => by_address(limiters, &request),
        },
        None => by_address(limiters, &request),
    };
    if let Some((scope, Err(wait))) = verdict {
        return ApiError::RateLimited {
            scope,
            retry_after_s: wait.as_secs() + 1,
        }
        .into_response();
    }

    let is_upload = request.method() == axum::http::Method::POST
        && request.uri().path() == concat!("/api/v1", "/bundles");
    let limit = if is_upload {
        limiters.settings.upload_timeout
    } else {
        limiters.settings.request_timeout
    };
    let response = match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout {
            limit_s: limit.as_secs(),
            retry_after_s: 1,
        }
        .into_response(),
    };
    if let Some((limiter, address)) = failures {
        // Charged even past the limit: guesses sent all at once, which all passed the check above
        // before any had failed, each push the address's next chance further away.
        if response.status() == axum::http::StatusCode::UNAUTHORIZED {
            limiter.charge(address);
        }
    }
    response
}

fn by_address(
    limiters: &Limiters,
    request: &Request,
) -> Option<(&'static str, Result<(), Duration>)> {
    let limiter = limiters.address.as_ref()?;
    let address = client_address(request, limiters.settings.forwarded_for)?;
    Some(("source address", limiter.check(address)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_explain_mistakes() {
        assert_eq!(
            "10/s:30".parse::<Rate>(),
            Ok(Rate {
                per_second: 10.0,
                burst: 30
            })
        );
        assert_eq!(
            "120/m".parse::<Rate>(),
            Ok(Rate {
                per_second: 2.0,
                burst: 2
            })
        );
        assert_eq!(parse_rate("off"), Ok(RateLimit(None)));
        for bad in [
            "10", "10/d", "x/s", "0/s", "-1/s", "10/s:0", "10/s:x", "inf/s",
        ] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limiter = KeyedLimiter::new(Rate {
            per_second: 10.0,
            burst: 3,
        });
        let ms = 1_000_000;
        // Three at once pass, the fourth waits 100 ms.
        for _ in 0..3 {
            assert_eq!(limiter.check_at("a", 0), Ok(()));
        }
        assert_eq!(limiter.check_at("a", 0), Err(Duration::from_millis(100)));
        // Another key is not affected.
        assert_eq!(limiter.check_at("b", 0), Ok(()));
        // 100 ms later one more passes, then none.
        assert_eq!(limiter.check_at("a", 100 * ms), Ok(()));
        assert!(limiter.check_at("a", 100 * ms).is_err());
        // A refused request is not counted: after 100 ms more, one passes again.
        assert_eq!(limiter.check_at("a", 200 * ms), Ok(()));
    }

    #[test]
    fn exhausted_looks_without_counting() {
        let limiter = KeyedLimiter::new(Rate {
            per_second: 1.0,
            burst: 2,
        });
        let ms = 1_000_000;
        assert_eq!(limiter.exhausted("a"), None);
        assert_eq!(limiter.check_at("a", 0), Ok(()));
        assert_eq!(limiter.exhausted("a"), None, "one more fits");
        assert_eq!(limiter.check_at("a", 0), Ok(()));
        assert!(limiter.exhausted("a").is_some());
        assert!(limiter.exhausted("a").is_some(), "looking counted nothing");
        assert!(limiter.check_at("a", 500 * ms).is_err());
        // Failures charged past the limit keep pushing the next chance out.
        for _ in 0..3 {
            limiter.charge("b");
        }
        assert!(limiter.exhausted("b").unwrap() > Duration::from_millis(1500));
    }

    #[test]
    fn idle_keys_are_swept() {
        let limiter = KeyedLimiter::new(Rate {
            per_second: 1000.0,
            burst: 1,
        });
        limiter.check("a").unwrap();
        assert_eq!(
            limiter
                .shards
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>(),
            1
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(limiter.sweep(), 0);
    }
}
