//! Canonical pipelines and stage mapping: pure data and maths, no IO.
//!
//! A canonical pipeline is an ordered list of stages, each with a kind (open, won,
//! lost), a win probability for the forecast and a stall threshold. A stage mapping
//! turns a connection's (native pipeline, native stage) into a canonical stage; a
//! native stage with no mapping resolves to [`StageRef::unmapped`], never to nothing.

mod defaults;
mod mapping;

pub use defaults::default_pipelines;
pub use mapping::{
    MappingSource, NativePipeline, NativeStage, StageMap, StageMapEntry, parse_target,
};

use crate::domain::{DealStatus, PipelineKey, StageKey, StageRef, UNMAPPED};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Whether a stage is still in play, or closes the deal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Open,
    Won,
    Lost,
}

impl StageKind {
    pub fn status(self) -> DealStatus {
        match self {
            StageKind::Open => DealStatus::Open,
            StageKind::Won => DealStatus::Won,
            StageKind::Lost => DealStatus::Lost,
        }
    }
}

/// One canonical stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stage {
    pub key: StageKey,
    pub label: String,
    /// Entry and exit criteria, in words.
    pub description: String,
    /// Win probability in percent, 0–100, used by the weighted forecast.
    pub probability: u8,
    /// How long a deal may sit here before it counts as stalled ("rotting").
    #[serde(with = "crate::domain::duration::option_serde")]
    pub stall_after: Option<Duration>,
    pub kind: StageKind,
}

/// A named, ordered list of canonical stages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    pub key: PipelineKey,
    pub label: String,
    pub stages: Vec<Stage>,
}

impl Pipeline {
    pub fn stage(&self, key: &str) -> Option<&Stage> {
        self.stages.iter().find(|stage| stage.key.as_str() == key)
    }

    /// Position of a stage in the pipeline's order.
    pub fn position(&self, key: &str) -> Option<usize> {
        self.stages
            .iter()
            .position(|stage| stage.key.as_str() == key)
    }

    /// The first stage of the given kind, in pipeline order.
    pub fn first_of_kind(&self, kind: StageKind) -> Option<&Stage> {
        self.stages.iter().find(|stage| stage.kind == kind)
    }

    /// Checks the invariants a pipeline must keep; every problem is reported.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.stages.is_empty() {
            problems.push("has no stages".to_owned());
        }
        let mut seen = std::collections::HashSet::new();
        for stage in &self.stages {
            let key = stage.key.as_str();
            if !seen.insert(key) {
                problems.push(format!("stage key {key:?} appears twice"));
            }
            if key == UNMAPPED {
                problems.push(format!("stage key {UNMAPPED:?} is reserved"));
            }
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                problems.push(format!(
                    "stage key {key:?} must be lower-case letters, digits, '_' or '-'"
                ));
            }
            if stage.probability > 100 {
                problems.push(format!(
                    "stage {key:?}: probability {} is outside 0–100",
                    stage.probability
                ));
            }
            if stage.kind == StageKind::Won && stage.probability != 100 {
                problems.push(format!(
                    "stage {key:?} is won, so its probability must be 100"
                ));
            }
            if stage.kind == StageKind::Lost && stage.probability != 0 {
                problems.push(format!(
                    "stage {key:?} is lost, so its probability must be 0"
                ));
            }
        }
        if self.first_of_kind(StageKind::Won).is_none() {
            problems.push("has no stage of kind \"won\"".to_owned());
        }
        if self.first_of_kind(StageKind::Lost).is_none() {
            problems.push("has no stage of kind \"lost\"".to_owned());
        }
        problems
    }
}

/// The set of canonical pipelines in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipelines(Vec<Pipeline>);

impl Pipelines {
    pub fn new(pipelines: Vec<Pipeline>) -> Self {
        Pipelines(pipelines)
    }

    pub fn get(&self, key: &str) -> Option<&Pipeline> {
        self.0.iter().find(|pipeline| pipeline.key.as_str() == key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pipeline> {
        self.0.iter()
    }

    /// The stage a [`StageRef`] points at, if it exists.
    pub fn stage(&self, at: &StageRef) -> Option<&Stage> {
        self.get(at.pipeline.as_ref()?.as_str())?
            .stage(at.stage.as_str())
    }

    /// The deal status implied by a canonical position.
    pub fn status_of(&self, at: &StageRef) -> DealStatus {
        match self.stage(at) {
            Some(stage) => stage.kind.status(),
            None => DealStatus::Unmapped,
        }
    }
}
