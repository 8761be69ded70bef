//! The webhook sender and the device sweep: one task per server (replica-safe, see
//! `db::webhooks`). Deliveries are signed (HMAC-SHA256 over `<unix time>.<body>`, the scheme of
//! Stripe and GitHub-style receivers, so a captured request cannot be replayed later with another
//! time), sent with a timeout, and retried with exponential backoff and jitter until delivered or
//! given up; every attempt is in the delivery log.

use crate::db::{now_ms, webhooks, Db};
use hmac::{Hmac, Mac as _};
use std::time::Duration;

/// Header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "kernex-webhook-signature";

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Wait after the first failed attempt; doubled after each further one, capped at an hour.
    pub retry_base: Duration,
    /// How often due deliveries are looked for and devices swept.
    pub every: Duration,
    /// Missed intervals after which a device is announced offline (the API's rule).
    pub offline_after: u32,
}

/// The signature header's value for `body` at `unix_s`.
pub fn sign(secret: &str, unix_s: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{unix_s}.").as_bytes());
    mac.update(body);
    let tag = kernex_protocol::token::hex(&mac.finalize().into_bytes());
    format!("t={unix_s},v1={tag}")
}

/// Delay before attempt `attempts + 1` after `attempts` failed ones: base × 2^(attempts-1), at
/// most an hour, with ±20 % jitter so a receiver coming back is not hit by every replica at once.
pub fn backoff(base: Duration, attempts: i64) -> Duration {
    let exponent = attempts.clamp(1, 20) - 1;
    let delay = base
        .saturating_mul(1 << exponent)
        .min(Duration::from_secs(3600));
    delay.mul_f64(0.8 + rand::random::<f64>() * 0.4)
}

/// Starts the sender and the sweep.
pub fn start(db: Db, heartbeats: crate::heartbeat::HeartbeatWriter, settings: WebhookSettings) {
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kernex-server/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "webhooks disabled: building the HTTP client failed");
                return;
            }
        };
        loop {
            // Every beat answered so far counts: none is taken for missed because it is still
            // in SQLite's heartbeat log (a pass whose fold failed announces nothing).
            let sweep = webhooks::sweep_devices(&db, settings.offline_after, heartbeats.fold());
            if let Err(e) = sweep.await {
                tracing::warn!(error = %e, "device sweep failed");
            }
            match webhooks::claim_due(&db, 32, 60_000).await {
                Ok(claimed) => {
                    let sends = claimed
                        .into_iter()
                        .map(|delivery| send(&db, &client, &settings, delivery));
                    futures_util::future::join_all(sends).await;
                }
                Err(e) => tracing::warn!(error = %e, "looking for due webhook deliveries failed"),
            }
            tokio::time::sleep(settings.every).await;
        }
    });
}

async fn send(
    db: &Db,
    client: &reqwest::Client,
    settings: &WebhookSettings,
    delivery: webhooks::Claimed,
) {
    let body = delivery.payload.into_bytes();
    let signature = sign(&delivery.secret, now_ms() / 1000, &body);
    let result = client
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("kernex-event", &delivery.kind)
        .header("kernex-delivery", &delivery.id)
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await;
    let (status, error) = match result {
        Ok(response) if response.status().is_success() => (Some(response.status().as_u16()), None),
        Ok(response) => (
            Some(response.status().as_u16()),
            Some(format!("HTTP {}", response.status())),
        ),
        // Without the URL: it may carry a token of the receiver's.
        Err(e) => (None, Some(describe(&e))),
    };
    let retry_at =
        now_ms() + backoff(settings.retry_base, delivery.attempts + 1).as_millis() as i64;
    if let Some(error) = &error {
        tracing::warn!(delivery = %delivery.id, kind = %delivery.kind, attempt = delivery.attempts + 1, error = %error, "webhook delivery failed");
    }
    if let Err(e) =
        webhooks::record_attempt(db, &delivery.id, status, error.as_deref(), retry_at).await
    {
        tracing::warn!(error = %e, delivery = %delivery.id, "recording a webhook attempt failed");
    }
}

fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() {
        "redirected (not followed)"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_time_and_body() {
        let a = sign("s3cret", 1_700_000_000, b"{}");
        assert!(a.starts_with("t=1700000000,v1="), "{a}");
        assert_eq!(a.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(a, sign("s3cret", 1_700_000_001, b"{}"));
        assert_ne!(a, sign("s3cret", 1_700_000_000, b"{ }"));
        assert_ne!(a, sign("other", 1_700_000_000, b"{}"));
        assert_eq!(a, sign("s3cret", 1_700_000_000, b"{}"));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(5);
        for (attempts, nominal) in [(1, 5.0), (2, 10.0), (3, 20.0), (12, 3600.0), (50, 3600.0)] {
            let d = backoff(base, attempts).as_secs_f64();
            assert!(
                d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                "attempt {attempts}: {d} s"
            );
        }
    }
}
