//! Binding the router to a socket: plain HTTP or rustls HTTPS, graceful shutdown on SIGINT/SIGTERM.

use crate::api::{app, ApiSettings, AppState, Shared};
use crate::db::{secrets, Db};
use crate::device_token::DeviceTokenKey;
use crate::heartbeat::{HeartbeatWriter, WriterConfig};
use crate::metrics::Metrics;
use crate::rollout::RolloutEngine;
use crate::store::{ObjectStore, StoreConfig};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Name of the device-token HMAC key in `server_secrets`.
pub const DEVICE_TOKEN_SECRET: &str = "device_token_hmac";
/// The device-token key before the last rotation (still accepted).
pub const DEVICE_TOKEN_SECRET_PREVIOUS: &str = "device_token_hmac_previous";

#[derive(Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Certificate chain and private key, both PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub api: ApiSettings,
    /// Where bundle files are kept.
    pub bundle_store: StoreConfig,
    /// How often the rollout engine looks at running deployments when nothing wakes it.
    pub rollout_every: Duration,
    /// Wait after a webhook delivery's first failure (doubled after each further one).
    pub webhook_retry_base: Duration,
    /// How often the shared secrets are read again (to follow a rotation).
    pub secret_reload_interval: Duration,
    /// The web console's sessions.
    pub console: crate::console::ConsoleSettings,
}

pub async fn serve(db: Db, options: ServeOptions) -> anyhow::Result<()> {
    let store = ObjectStore::open(&options.bundle_store).await?;
    tracing::info!(?store, "bundle store ready");
    let secret = secrets::get_or_create(&db, DEVICE_TOKEN_SECRET)
        .await
        .context("loading the device-token key")?;
    let previous = secrets::get(&db, DEVICE_TOKEN_SECRET_PREVIOUS)
        .await
        .context("loading the previous device-token key")?;
    let device_tokens = Arc::new(DeviceTokenKey::with_previous(&secret, previous.as_deref()));
    tokio::spawn(reload_device_token_keys(
        db.clone(),
        device_tokens.clone(),
        options.secret_reload_interval,
    ));
    let metrics = Arc::new(Metrics::new(
        crate::api::ROUTES
            .iter()
            .chain(crate::console::ROUTES)
            .copied(),
    ));
    let heartbeats = HeartbeatWriter::start(&db, WriterConfig::default(), metrics.clone())
        .context("starting the heartbeat writer")?;
    crate::webhooks::start(
        db.clone(),
        heartbeats.clone(),
        crate::webhooks::WebhookSettings {
            retry_base: options.webhook_retry_base,
            every: Duration::from_secs(1),
            offline_after: options.api.offline_after,
        },
    );
    let state = AppState::new(Shared {
        db: db.clone(),
        heartbeats,
        device_tokens,
        limiters: Arc::new(crate::api::limits::Limiters::new(
            options.api.limits.clone(),
        )),
        settings: options.api,
        store,
        rollouts: RolloutEngine::start(db.clone(), options.rollout_every),
        metrics,
        samples: Default::default(),
        console: options.console,
    });
    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();

    let handle = axum_server::Handle::new();
    tokio::spawn(shutdown_on_signal(handle.clone()));
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let announce = {
        let handle = handle.clone();
        let backend = db.backend();
        async move {
            if let Some(addr) = handle.listening().await {
                // Scripts and tests read this line to learn the port when --listen ends in :0.
                println!("kernex-server listening on {scheme}://{addr} ({backend})");
                tracing::info!(%addr, scheme, backend, "listening");
            }
        }
    };
    tokio::spawn(announce);

    match options.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                .await
                .with_context(|| format!("loading TLS certificate {} and key {}", cert.display(), key.display()))?;
            tokio::spawn(reload_tls_on_sighup(config.clone(), cert, key));
            axum_server::bind_rustls(options.listen, config)
                .handle(handle)
                .serve(service)
                .await
        }
        None => {
            if !options.listen.ip().is_loopback() {
                tracing::warn!(addr = %options.listen, "serving plain HTTP on a non-loopback address: bootstrap tokens and device tokens travel unencrypted; use --tls-cert/--tls-key or a TLS proxy");
            }
            axum_server::bind(options.listen).handle(handle).serve(service).await
        }
    }
    .with_context(|| format!("serving on {}", options.listen))?;
    tracing::info!("stopped");
    Ok(())
}

/// Picks up a rotation of the device-token key (`kernex-server secret rotate`, possibly run while
/// this server serves) without a restart.
async fn reload_device_token_keys(db: Db, keys: Arc<DeviceTokenKey>, every: Duration) {
    let mut loaded: Option<(Vec<u8>, Option<Vec<u8>>)> = None;
    loop {
        tokio::time::sleep(every).await;
        let current = secrets::get(&db, DEVICE_TOKEN_SECRET).await;
        let previous = secrets::get(&db, DEVICE_TOKEN_SECRET_PREVIOUS).await;
        match (current, previous) {
            (Ok(Some(current)), Ok(previous)) => {
                let pair = (current, previous);
                if loaded.as_ref() != Some(&pair) {
                    if loaded.is_some() {
                        tracing::info!("device-token key rotated: now signing with the new key");
                    }
                    keys.set(&pair.0, pair.1.as_deref());
                    loaded = Some(pair);
                }
            }
            (Ok(None), _) => tracing::error!("the device-token key is missing from the database"),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "reloading the device-token key failed")
            }
        }
    }
}

/// Renewing the certificate needs no restart: on SIGHUP the files are read again and new
/// connections get the new certificate (connections already open keep theirs). Files that do not
/// load are logged and the previous certificate stays in use.
async fn reload_tls_on_sighup(
    config: axum_server::tls_rustls::RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: TLS certificate reloads need a restart");
        return;
    };
    while hangups.recv().await.is_some() {
        match config.reload_from_pem_file(&cert, &key).await {
            Ok(()) => tracing::info!(cert = %cert.display(), "TLS certificate reloaded"),
            Err(e) => tracing::error!(
                error = %e, cert = %cert.display(), key = %key.display(),
                "reloading the TLS certificate failed; still serving the previous one"
            ),
        }
    }
}

async fn shutdown_on_signal(handle: axum_server::Handle) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
    handle.graceful_shutdown(Some(Duration::from_secs(10)));
}
