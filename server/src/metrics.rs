//! Prometheus metrics at `GET /metrics` (text format 0.0.4).
//!
//! What the request path touches is atomics only (no lock, no allocation): per route template and
//! status code a latency histogram, and a few counters. Fleet gauges (devices by status, rollouts
//! and per-device deployment states, per tenant) are counted by the database when scraped, so every
//! replica reports the same fleet and nothing has to be kept in step.

use crate::db::{now_ms, with_pool, Db};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Status codes counted on their own; any other lands under `other`.
const CODES: [u16; 21] = [
    200, 201, 204, 206, 304, 307, 400, 401, 403, 404, 405, 409, 413, 415, 416, 422, 429, 500, 502,
    503, 504,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// `name_bucket`/`_sum`/`_count` lines with `labels` (already formatted, may be empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let count = self.count.load(Relaxed);
        if count == 0 {
            return;
        }
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// One histogram per status code of one route (and method).
#[derive(Debug, Default)]
struct RouteStats {
    by_code: [Histogram; CODES.len() + 1],
}

/// The server's metrics; one per process, shared by every request.
#[derive(Debug)]
pub struct Metrics {
    /// `METHOD route-template` → stats; built once, read without a lock.
    routes: HashMap<String, RouteStats>,
    unmatched: RouteStats,
    pub heartbeats: AtomicU64,
    pub enrollments: AtomicU64,
    pub bundle_bytes_served: AtomicU64,
    /// Duration of each committed heartbeat batch (the database's share of a heartbeat).
    heartbeat_commits: Histogram,
}

impl Metrics {
    /// Metrics for the routes `(method, template)` the router serves.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a str, &'a str)>) -> Metrics {
        Metrics {
            routes: routes
                .into_iter()
                .map(|(method, path)| (format!("{method} {path}"), RouteStats::default()))
                .collect(),
            unmatched: RouteStats::default(),
            heartbeats: AtomicU64::new(0),
            enrollments: AtomicU64::new(0),
            bundle_bytes_served: AtomicU64::new(0),
            heartbeat_commits: Histogram::default(),
        }
    }

    /// One request served: its route template (None when no route matched), status, duration.
    pub fn request(&self, method: &str, route: Option<&str>, status: u16, elapsed: Duration) {
        let stats = route
            .and_then(|route| {
                // No allocation: the key is looked up through a stack buffer.
                let mut key = [0u8; 160];
                let (m, r) = (method.as_bytes(), route.as_bytes());
                let len = m.len() + 1 + r.len();
                if len > key.len() {
                    return None;
                }
                key[..m.len()].copy_from_slice(m);
                key[m.len()] = b' ';
                key[m.len() + 1..len].copy_from_slice(r);
                std::str::from_utf8(&key[..len])
                    .ok()
                    .and_then(|k| self.routes.get(k))
            })
            .unwrap_or(&self.unmatched);
        let slot = CODES
            .iter()
            .position(|c| *c == status)
            .unwrap_or(CODES.len());
        stats.by_code[slot].observe(elapsed);
    }

    pub fn heartbeat_batch_committed(&self, elapsed: Duration) {
        self.heartbeat_commits.observe(elapsed);
    }

    /// The whole exposition: counters and histograms from memory, fleet gauges from `db`.
    pub async fn render(&self, db: &Db, offline_after: u32) -> Result<String, sqlx::Error> {
        let mut out = String::with_capacity(16 * 1024);
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            &mut out,
            "kernex_heartbeats_total",
            "Heartbeats stored.",
            self.heartbeats.load(Relaxed),
        );
        counter(
            &mut out,
            "kernex_enrollments_total",
            "Enrollments accepted (new and repeated).",
            self.enrollments.load(Relaxed),
        );
        counter(
            &mut out,
            "kernex_bundle_bytes_served_total",
            "Bytes of bundle files sent by this server (not counting presigned S3 downloads).",
            self.bundle_bytes_served.load(Relaxed),
        );

        out.push_str("# HELP kernex_http_request_duration_seconds Requests by route template, method and status.\n");
        out.push_str("# TYPE kernex_http_request_duration_seconds histogram\n");
        let mut routes: Vec<_> = self.routes.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        let unmatched = ("ANY (unmatched)".to_owned(), &self.unmatched);
        for (key, stats) in routes
            .into_iter()
            .map(|(k, v)| (k.clone(), v))
            .chain(std::iter::once(unmatched))
        {
            let (method, route) = key.split_once(' ').unwrap_or(("ANY", &key));
            for (slot, histogram) in stats.by_code.iter().enumerate() {
                let code = CODES
                    .get(slot)
                    .map_or("other".to_owned(), |c| c.to_string());
                let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{code}\"");
                histogram.render(&mut out, "kernex_http_request_duration_seconds", &labels);
            }
        }
        out.push_str("# HELP kernex_heartbeat_commit_duration_seconds Database time of each committed heartbeat batch.\n");
        out.push_str("# TYPE kernex_heartbeat_commit_duration_seconds histogram\n");
        self.heartbeat_commits
            .render(&mut out, "kernex_heartbeat_commit_duration_seconds", "");

        let started = std::time::Instant::now();
        let fleet = fleet(db, offline_after).await;
        let scrape = started.elapsed().as_secs_f64();
        let up = i32::from(fleet.is_ok());
        let _ = writeln!(out, "# HELP kernex_database_up Whether the database answered the scrape's queries.\n# TYPE kernex_database_up gauge\nkernex_database_up {up}");
        let _ = writeln!(out, "# HELP kernex_database_scrape_seconds Time the database took to count the fleet for this scrape.\n# TYPE kernex_database_scrape_seconds gauge\nkernex_database_scrape_seconds {scrape}");
        let fleet = fleet?;
        out.push_str(
            "# HELP kernex_devices Devices by tenant and status.\n# TYPE kernex_devices gauge\n",
        );
        for (tenant, status, n) in &fleet.devices {
            let _ = writeln!(
                out,
                "kernex_devices{{tenant=\"{}\",status=\"{status}\"}} {n}",
                escape(tenant)
            );
        }
        out.push_str("# HELP kernex_deployments Deployments by tenant and state.\n# TYPE kernex_deployments gauge\n");
        for (tenant, state, n) in &fleet.deployments {
            let _ = writeln!(
                out,
                "kernex_deployments{{tenant=\"{}\",state=\"{state}\"}} {n}",
                escape(tenant)
            );
        }
        out.push_str("# HELP kernex_deployment_devices Devices of unfinished deployments by tenant and per-device state.\n# TYPE kernex_deployment_devices gauge\n");
        for (tenant, state, n) in &fleet.deployment_devices {
            let _ = writeln!(
                out,
                "kernex_deployment_devices{{tenant=\"{}\",state=\"{state}\"}} {n}",
                escape(tenant)
            );
        }
        Ok(out)
    }
}

/// Label values: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Fleet {
    devices: Vec<(String, String, i64)>,
    deployments: Vec<(String, String, i64)>,
    deployment_devices: Vec<(String, String, i64)>,
}

/// Counts, in the database, what the fleet gauges show. The device status rule is
/// `devices::Device::status`'s, in SQL.
async fn fleet(db: &Db, offline_after: u32) -> Result<Fleet, sqlx::Error> {
    let now = now_ms();
    let devices_sql = "SELECT t.name, CASE
            WHEN d.deregistered_at IS NOT NULL THEN 'deregistered'
            WHEN h.last_heartbeat IS NULL OR h.interval_s IS NULL THEN 'pending'
            WHEN $1 > h.last_heartbeat + (CASE WHEN h.interval_s < 1 THEN 1 ELSE h.interval_s END) * 1000 * $2 THEN 'offline'
            ELSE 'online' END AS status, COUNT(*)
        FROM devices d JOIN tenants t ON t.id = d.tenant_id
        LEFT JOIN device_heartbeats h ON h.device_id = d.id GROUP BY 1, 2 ORDER BY 1, 2";
    let deployments_sql = "SELECT t.name, d.state, COUNT(*) FROM deployments d
        JOIN tenants t ON t.id = d.tenant_id GROUP BY 1, 2 ORDER BY 1, 2";
    let deployment_devices_sql = "SELECT t.name, dd.state, COUNT(*) FROM deployment_devices dd
        JOIN deployments d ON d.id = dd.deployment_id JOIN tenants t ON t.id = d.tenant_id
        WHERE d.state IN ('running', 'paused') GROUP BY 1, 2 ORDER BY 1, 2";
    with_pool!(db, pool => {
        Ok(Fleet {
            devices: sqlx::query_as(devices_sql).bind(now).bind(i64::from(offline_after)).fetch_all(pool).await?,
            deployments: sqlx::query_as(deployments_sql).fetch_all(pool).await?,
            deployment_devices: sqlx::query_as(deployment_devices_sql).fetch_all(pool).await?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_route_and_status_histograms() {
        let m = Metrics::new([("POST", "/api/v1/heartbeat")]);
        m.request(
            "POST",
            Some("/api/v1/heartbeat"),
            200,
            Duration::from_micros(700),
        );
        m.request(
            "POST",
            Some("/api/v1/heartbeat"),
            200,
            Duration::from_millis(30),
        );
        m.request(
            "POST",
            Some("/api/v1/heartbeat"),
            418,
            Duration::from_millis(1),
        );
        m.request("GET", None, 404, Duration::from_micros(10));
        let mut out = String::new();
        m.routes["POST /api/v1/heartbeat"].by_code[0].render(&mut out, "h", "a=\"b\"");
        assert!(out.contains("h_bucket{a=\"b\",le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{a=\"b\",le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{a=\"b\",le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("h_count{a=\"b\"} 2\n"), "{out}");
        assert_eq!(
            m.routes["POST /api/v1/heartbeat"].by_code[CODES.len()]
                .count
                .load(Relaxed),
            1
        );
        assert_eq!(m.unmatched.by_code[9].count.load(Relaxed), 1); // 404
    }
}
