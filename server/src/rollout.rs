//! The rollout engine: a task that steps every running deployment (release devices into free
//! slots, advance finished phases, halt on failures). All its state is in the database, so a
//! restarted server picks up where it stopped, and any number of replicas may run it: each step
//! locks its deployment (see `db::deployments`).

use crate::db::{deployments, Db};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Handle to the engine: wakes it when something happened that may let a rollout move.
#[derive(Debug, Clone)]
pub struct RolloutEngine {
    wake: Arc<Notify>,
}

/// Most steps per deployment per round: a step releases up to `max_in_flight` devices or moves a
/// phase, so a handful always suffices; the bound keeps one deployment from starving the others.
const STEPS_PER_ROUND: usize = 16;

impl RolloutEngine {
    /// Starts the engine, stepping every running deployment at least every `every`.
    pub fn start(db: Db, every: Duration) -> RolloutEngine {
        let wake = Arc::new(Notify::new());
        tokio::spawn(run(db, wake.clone(), every));
        RolloutEngine { wake }
    }

    /// Asks for a round now (a deployment was created, a device reported).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn run(db: Db, wake: Arc<Notify>, every: Duration) {
    loop {
        round(&db).await;
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn round(db: &Db) {
    let ids = match deployments::running(db).await {
        Ok(ids) => ids,
        Err(err) => {
            tracing::warn!(error = %err, "listing running deployments failed");
            return;
        }
    };
    for id in ids {
        for _ in 0..STEPS_PER_ROUND {
            match deployments::step(db, &id).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    tracing::warn!(deployment = %id, error = %err, "rollout step failed");
                    break;
                }
            }
        }
    }
}
