//! The cart sweeper: Checkout Started → Cart Abandoned once a cart has been idle longer
//! than its connection's `abandon_after` without an order, and, as a safety net behind
//! the follow-up rules, abandoned or followed-up carts older than `expire_after` →
//! Expired. It applies to every connection's carts in the `ecommerce` pipeline, the
//! `demo` connector's included.
//!
//! Stages are found by key in the configured `ecommerce` pipeline (`checkout_started`,
//! `cart_abandoned`, `expired`), falling back to position (first open stage, second open
//! stage, first lost stage) when a config renames them. Moves are recorded with cause
//! `followup`: dealsync itself decided them.
//!
//! A worker of its own beside `sync`, `webhooks` and `followup`: it moves stored carts
//! as time passes, whatever way their records arrived (pull, webhook, the demo), so it
//! belongs neither to the webhook worker nor to `ingest`, which maps records. The SQL
//! is `store::carts`'s.
//!
//! Invariants: a pass reads the connections in force, so a reload applies to the next
//! pass; each move re-checks the cart's stage in its transaction (`store::carts`), so
//! a cart an order reached a moment earlier stays purchased.

use crate::connectors::ecommerce::PIPELINE;
use crate::domain::StageRef;
use crate::health::WorkerHealth;
use crate::ingest::{ConnectionRuntime, Connections};
use crate::pipeline::{Pipeline, StageKind};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Most carts moved per connection and pass.
const LIMIT: u32 = 1000;

/// The cart stages the sweeper works with.
#[derive(Debug, Clone, PartialEq)]
pub struct CartStages {
    pub started: StageRef,
    pub abandoned: StageRef,
    /// Abandoned and the follow-up stages after it: where carts wait for an order.
    pub waiting: Vec<StageRef>,
    pub expired: StageRef,
}

impl CartStages {
    /// Finds the stages in a pipeline; `None` when it has too few open stages.
    pub fn of(pipeline: &Pipeline) -> Option<CartStages> {
        let at = |key: &str| StageRef {
            pipeline: Some(pipeline.key.clone()),
            stage: crate::domain::StageKey::new(key),
        };
        let open: Vec<&str> = pipeline
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::Open)
            .map(|s| s.key.as_str())
            .collect();
        fn by_key_or<'p>(
            pipeline: &'p Pipeline,
            key: &str,
            fallback: Option<&&'p str>,
        ) -> Option<&'p str> {
            match pipeline.stage(key) {
                Some(stage) => Some(stage.key.as_str()),
                None => fallback.copied(),
            }
        }
        let started = by_key_or(pipeline, "checkout_started", open.first())?;
        let abandoned = by_key_or(pipeline, "cart_abandoned", open.get(1))?;
        let expired = match pipeline.stage("expired") {
            Some(stage) => stage.key.as_str(),
            None => pipeline.first_of_kind(StageKind::Lost)?.key.as_str(),
        };
        let from = open.iter().position(|key| *key == abandoned)?;
        Some(CartStages {
            started: at(started),
            abandoned: at(abandoned),
            waiting: open[from..].iter().map(|key| at(key)).collect(),
            expired: at(expired),
        })
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepSummary {
    pub abandoned: usize,
    pub expired: usize,
}

/// One pass over every connection in `connections` at `now`.
pub async fn sweep_once(
    store: &Store,
    connections: &[Arc<ConnectionRuntime>],
    now: DateTime<Utc>,
) -> Result<SweepSummary, StoreError> {
    let mut summary = SweepSummary::default();
    for runtime in connections {
        // Every connection in force maps onto the config's pipelines.
        let Some(stages) = runtime.pipelines().get(PIPELINE).and_then(CartStages::of) else {
            continue;
        };
        let name = runtime.name();
        let idle = chrono::Duration::from_std(runtime.config.abandon_after).unwrap_or_default();
        let abandoned = store
            .abandon_idle_carts(
                name,
                stages.started.clone(),
                stages.abandoned.clone(),
                now - idle,
                now,
                LIMIT,
            )
            .await?;
        if !abandoned.is_empty() {
            info!(
                connection = name,
                carts = abandoned.len(),
                "carts abandoned"
            );
        }
        summary.abandoned += abandoned.len();
        let max_age = chrono::Duration::from_std(runtime.config.expire_after).unwrap_or_default();
        let expired = store
            .expire_stale_carts(
                name,
                stages.waiting.clone(),
                stages.expired.clone(),
                now - max_age,
                now,
                LIMIT,
            )
            .await?;
        if !expired.is_empty() {
            info!(
                connection = name,
                carts = expired.len(),
                "stale carts expired"
            );
        }
        summary.expired += expired.len();
    }
    Ok(summary)
}

/// The pause between passes: a quarter of the shortest `abandon_after`, between 250 ms
/// and 30 s, so a cart is abandoned at most about a quarter late.
pub fn interval(connections: &[Arc<ConnectionRuntime>]) -> Duration {
    connections
        .iter()
        .map(|runtime| runtime.config.abandon_after / 4)
        .min()
        .unwrap_or(Duration::from_secs(30))
        .clamp(Duration::from_millis(250), Duration::from_secs(30))
}

/// Runs passes until `shutdown`. A pass the store fails marks the sweeper degraded in
/// `/readyz` and the next one waits for the longer of the interval and the backoff.
pub async fn run(
    store: Store,
    connections: Connections,
    mut health: WorkerHealth,
    shutdown: CancellationToken,
) {
    info!("cart sweeper started");
    let mut pause = interval(&connections.current());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = match sweep_once(&store, &connections.current(), Utc::now()).await {
            Ok(_) => {
                health.succeeded();
                interval(&connections.current())
            }
            Err(error) => health.failed(&error).max(interval(&connections.current())),
        };
    }
    info!("cart sweeper stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::default_pipelines;

    #[test]
    fn the_default_ecommerce_pipeline_yields_its_cart_stages() {
        let pipelines = default_pipelines();
        let ecommerce = pipelines
            .iter()
            .find(|p| p.key.as_str() == "ecommerce")
            .unwrap();
        let stages = CartStages::of(ecommerce).unwrap();
        assert_eq!(stages.started.stage.as_str(), "checkout_started");
        assert_eq!(stages.abandoned.stage.as_str(), "cart_abandoned");
        assert_eq!(
            stages
                .waiting
                .iter()
                .map(|s| s.stage.as_str())
                .collect::<Vec<_>>(),
            ["cart_abandoned", "follow_up_email", "discount_offer"]
        );
        assert_eq!(stages.expired.stage.as_str(), "expired");
    }
}
