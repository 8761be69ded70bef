//! Helpers for `just bench-heartbeat`:
//! - `noop`: an axum server whose heartbeat route reads the body and answers a fixed response, on
//!   the same runtime settings as kernex-server: the ceiling the real endpoint is compared with.
//! - `enroll-body`: a device key and a signed enrollment body, so a load generator can replay the
//!   (idempotent) enrollment path and measure its cost without generating a key per request.

use anyhow::Context as _;
use axum::body::Bytes;
use axum::routing::post;
use clap::{Parser, Subcommand};
use kernex_protocol::wire::{EnrollRequest, Facts};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "kernex-bench", about = "Benchmark helpers for Kernex.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve POST /api/v1/heartbeat with a fixed answer; prints the address like kernex-server.
    Noop {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Generate a device key and write body.json + signature for a signed enrollment.
    EnrollBody {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Noop { listen } => {
            let app = axum::Router::new().route(
                "/api/v1/heartbeat",
                post(|body: Bytes| async move {
                    std::hint::black_box(body);
                    axum::Json(serde_json::json!({"interval_s": 60, "commands": []}))
                }),
            );
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!(
                "kernex-bench noop listening on http://{}",
                listener.local_addr()?
            );
            axum::serve(listener, app).await?;
            Ok(())
        }
        Command::EnrollBody { tenant, token, out } => {
            let key = kernex_protocol::DeviceKey::generate()?;
            let request = EnrollRequest {
                tenant,
                token,
                hardware_id: "bench-enroll".into(),
                public_key: key.public().to_pem(),
                facts: Facts::default(),
                timestamp: 0,
            };
            let body = serde_json::to_vec(&request)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("body.json"), &body)?;
            std::fs::write(out.join("signature"), key.sign(&body))?;
            Ok(())
        }
    }
}
