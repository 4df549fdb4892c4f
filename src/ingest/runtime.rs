//! A connection's runtime: its config, its connector and its current stage map, and
//! the mapping of source records to deal upserts.
//!
//! Invariants:
//! - Every record of a connection, pulled or pushed, maps through [`ConnectionRuntime::map`]:
//!   one stage map, swapped whole when discovery finds new native stages, so a reader
//!   never sees half of one.
//! - A source that says won or lost apart from its stages wins over an open stage.
//! - `build_all` reports every problem of every enabled connection at once, and builds
//!   nothing when there is one.

use super::SyncDeps;
use crate::config::{Config, ConfigError, ConnectionConfig};
use crate::connectors::{Connector, Registry, SyncContext};
use crate::domain::{ChangeCause, DealStatus, SourceDeal, StageRef};
use crate::pipeline::{NativePipeline, Pipelines, StageMap};
use crate::store::DealUpsert;
use chrono::Utc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// One configured connection with its connector and its current stage map.
pub struct ConnectionRuntime {
    pub config: ConnectionConfig,
    pub connector: Arc<dyn Connector>,
    pipelines: Pipelines,
    /// Swapped whole when discovery finds new native stages; readers clone the Arc.
    stage_map: RwLock<Arc<StageMap>>,
    last_discovery: Mutex<Option<Instant>>,
    /// What bounces and complaints received by this connection do.
    pub delivery_policy: crate::store::DeliveryPolicy,
}

impl ConnectionRuntime {
    /// Builds the runtime of every enabled connection, or the first config problem.
    pub fn build_all(config: &Config) -> Result<Vec<Arc<ConnectionRuntime>>, ConfigError> {
        let mut runtimes = Vec::new();
        let mut problems = Vec::new();
        // Every manifest is checked, used or not: a broken user manifest is reported.
        let catalog = Registry::catalog(config)?;
        for connection in config.connections.iter().filter(|c| c.enabled) {
            let connector = match Registry::build_with(connection, config, &catalog) {
                Ok(connector) => connector,
                Err(error) => {
                    problems.extend(error.problems().iter().cloned());
                    continue;
                }
            };
            let mut runtime =
                ConnectionRuntime::new(connection.clone(), connector, config.pipelines.clone());
            runtime.delivery_policy = crate::deliverability::policy(config);
            let default_pipeline = runtime.default_pipeline();
            for entry in &connection.stage_map {
                if let Err(message) = entry.resolve(default_pipeline.as_ref(), &config.pipelines) {
                    let key = entry.key(connection.name.as_str());
                    problems.extend(
                        ConfigError::at(config, key, message)
                            .problems()
                            .iter()
                            .cloned(),
                    );
                }
            }
            runtime.set_native(Vec::new());
            runtimes.push(Arc::new(runtime));
        }
        if problems.is_empty() {
            Ok(runtimes)
        } else {
            Err(ConfigError::invalid(config, problems))
        }
    }

    pub fn new(
        config: ConnectionConfig,
        connector: Arc<dyn Connector>,
        pipelines: Pipelines,
    ) -> Self {
        let runtime = ConnectionRuntime {
            config,
            connector,
            pipelines,
            stage_map: RwLock::new(Arc::new(StageMap::default())),
            last_discovery: Mutex::new(None),
            delivery_policy: crate::deliverability::policy_of(
                &crate::config::DeliverabilityConfig::default(),
                &[],
            ),
        };
        runtime.set_native(Vec::new());
        runtime
    }

    pub fn name(&self) -> &str {
        self.config.name.as_str()
    }

    /// The canonical pipeline of this connection: the config's, else the connector's.
    pub fn default_pipeline(&self) -> Option<crate::domain::PipelineKey> {
        self.config.pipeline.clone().or_else(|| {
            self.connector
                .default_pipeline()
                .filter(|key| self.pipelines.get(key).is_some())
                .map(crate::domain::PipelineKey::new)
        })
    }

    /// Rebuilds the stage map from manifest defaults, config overrides and discovery.
    pub fn set_native(&self, native: Vec<NativePipeline>) {
        let defaults = self
            .connector
            .default_mappings()
            .into_iter()
            // A default pointing at a pipeline the config replaced is dropped.
            .filter(|entry| self.pipelines.stage(&entry.target).is_some());
        let default_pipeline = self.default_pipeline();
        let overrides = self
            .config
            .stage_map
            .iter()
            // Unresolvable overrides were reported by `build_all`.
            .filter_map(|entry| {
                entry
                    .resolve(default_pipeline.as_ref(), &self.pipelines)
                    .ok()
            });
        let entries = defaults.chain(overrides);
        let map =
            StageMap::new(self.default_pipeline(), entries).with_native(native, &self.pipelines);
        if let Ok(mut slot) = self.stage_map.write() {
            *slot = Arc::new(map);
        }
    }

    /// When discovery last refreshed the stage map; `None` before the first discovery
    /// of this runtime (it is built anew at start and on every reload).
    pub fn last_discovery(&self) -> Option<Instant> {
        self.last_discovery.lock().ok().and_then(|last| *last)
    }

    /// Rebuilds the stage map from what discovery found, and notes when.
    pub fn discovered(&self, native: Vec<NativePipeline>) {
        self.set_native(native);
        if let Ok(mut last) = self.last_discovery.lock() {
            *last = Some(Instant::now());
        }
    }

    /// The canonical pipelines this connection maps onto (the config's).
    pub fn pipelines(&self) -> &Pipelines {
        &self.pipelines
    }

    pub fn stage_map(&self) -> Arc<StageMap> {
        self.stage_map
            .read()
            .map(|map| map.clone())
            .unwrap_or_default()
    }

    /// Maps a source record's native stage to a canonical stage and status.
    ///
    /// A source that says won or lost apart from its stages (Pipedrive's deal status)
    /// wins over an open stage: the deal goes to its pipeline's first won or lost stage.
    pub fn map(&self, source: &SourceDeal) -> (StageRef, DealStatus) {
        let target = self
            .stage_map()
            .resolve(&source.native_pipeline, &source.native_stage);
        let status = self.pipelines.status_of(&target);
        if let Some(said @ (DealStatus::Won | DealStatus::Lost)) = source.source_status
            && said != status
        {
            let kind = if said == DealStatus::Won {
                crate::pipeline::StageKind::Won
            } else {
                crate::pipeline::StageKind::Lost
            };
            let pipeline = target.pipeline.clone().or_else(|| self.default_pipeline());
            if let Some(stage) = pipeline
                .as_ref()
                .and_then(|key| self.pipelines.get(key.as_str()))
                .and_then(|found| found.first_of_kind(kind))
            {
                return (
                    StageRef {
                        pipeline,
                        stage: stage.key.clone(),
                    },
                    said,
                );
            }
        }
        (target, status)
    }

    /// Turns source records into upserts for the store.
    pub fn upserts(&self, records: Vec<SourceDeal>, cause: ChangeCause) -> Vec<DealUpsert> {
        let now = Utc::now();
        records
            .into_iter()
            .map(|source| {
                let (target, status) = self.map(&source);
                DealUpsert {
                    connection: self.config.name.clone(),
                    source,
                    target,
                    status,
                    observed_at: now,
                    cause,
                }
            })
            .collect()
    }

    /// What the connector may touch during a run or a webhook refetch.
    pub fn context(&self, deps: &SyncDeps, shutdown: &CancellationToken) -> SyncContext {
        SyncContext {
            connection: self.config.name.clone(),
            shutdown: shutdown.clone(),
            metrics: deps.metrics.clone(),
            handles: Some(crate::connectors::StoreHandles::of(&deps.store)),
            attention: deps.attention.clone(),
            max_attempts: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ingest::remap::tests::{board, configured};
    use std::time::Instant;

    /// Discovery replaces the native stages in force and notes when it ran, which
    /// decides when the next run discovers again; the canonical pipelines stay the
    /// config's.
    #[test]
    fn a_discovery_sets_the_native_stages_and_notes_when() {
        let runtime = configured("proposal = \"proposal\"\n");
        assert_eq!(runtime.last_discovery(), None, "never discovered yet");
        let native = board();
        let before = Instant::now();
        runtime.discovered(native.clone());
        let at = runtime.last_discovery().expect("discovery noted");
        assert!(before <= at && at <= Instant::now());
        assert_eq!(runtime.stage_map().native(), &native[..]);
        let pipelines: Vec<&str> = runtime.pipelines().iter().map(|p| p.key.as_str()).collect();
        assert!(pipelines.contains(&"sales"), "{pipelines:?}");
    }
}
