//! Pipeline discovery: the vendor's native pipelines and stages, read from the
//! manifest's `pipelines` and `stages` requests.
//!
//! Invariants:
//! - Hidden pipelines and hidden or inactive stages are left out; with a `pipelines`
//!   request, a stage of a pipeline it does not list (deleted or hidden) is dropped.
//! - Stages are ordered by their `order`, then their label.

use super::ManifestConnector;
use super::mapping::{bool_at, number_at};
use crate::connectors::manifest::fields::{self, lookup, text_of};
use crate::connectors::manifest::schema::StageFields;
use crate::connectors::{ConnectorError, SyncContext};
use crate::pipeline::{NativePipeline, NativeStage, StageKind};
use serde_json::Value;
use std::time::Duration;

fn native_stage(record: &Value, spec: &StageFields) -> Option<NativeStage> {
    if bool_at(record, &spec.hidden) == Some(true) || bool_at(record, &spec.active) == Some(false) {
        return None;
    }
    let id = lookup(record, &spec.id).and_then(text_of)?;
    let label = record
        .pointer(&spec.label)
        .and_then(text_of)
        .unwrap_or_else(|| id.clone());
    let probability = number_at(record, &spec.probability).map(|p| {
        (p * spec.probability_scale.unwrap_or(1.0))
            .round()
            .clamp(0.0, 100.0) as u8
    });
    let closed = bool_at(record, &spec.closed);
    let won = bool_at(record, &spec.won);
    let kind = match (closed, won) {
        (_, Some(true)) => Some(StageKind::Won),
        (Some(true), Some(false)) => Some(StageKind::Lost),
        (Some(true), None) => match probability {
            Some(100) => Some(StageKind::Won),
            Some(0) => Some(StageKind::Lost),
            _ => None,
        },
        (Some(false), _) => Some(StageKind::Open),
        (None, _) => None,
    };
    let rot_enabled = bool_at(record, &spec.rot_enabled).unwrap_or(true);
    let rot_after = number_at(record, &spec.rot_days)
        .filter(|days| rot_enabled && *days > 0.0)
        .map(|days| Duration::from_secs_f64(days * 86_400.0));
    Some(NativeStage {
        id,
        label,
        order: number_at(record, &spec.order).map_or(0, |o| o as i64),
        probability,
        kind,
        rot_after,
    })
}

impl ManifestConnector {
    /// [`Connector::discover_pipelines`](crate::connectors::Connector::discover_pipelines).
    pub(super) async fn discover(
        &self,
        cx: &SyncContext,
    ) -> Result<Vec<NativePipeline>, ConnectorError> {
        let mut pipelines = match &self.manifest.pipelines {
            Some(spec) => {
                let bodies = self.read_all(cx, &spec.request).await?;
                self.parse_pipelines(&bodies)
            }
            None => Vec::new(),
        };
        if let Some(spec) = &self.manifest.stages {
            let bodies = self.read_all(cx, &spec.request).await?;
            for body in &bodies {
                for record in self.records(body, &spec.request)? {
                    let Some(stage) = native_stage(record, &spec.fields) else {
                        continue;
                    };
                    let (pipeline_id, pipeline_label) =
                        match (&spec.pipeline, &spec.single_pipeline) {
                            (Some(pointer), _) => match lookup(record, pointer).and_then(text_of) {
                                Some(id) => (id.clone(), id),
                                None => continue,
                            },
                            (None, Some([id, label])) => (id.clone(), label.clone()),
                            (None, None) => ("default".to_owned(), "Default".to_owned()),
                        };
                    match pipelines.iter_mut().find(|p| p.id == pipeline_id) {
                        Some(pipeline) => pipeline.stages.push(stage),
                        None if self.manifest.pipelines.is_none() => {
                            pipelines.push(NativePipeline {
                                id: pipeline_id,
                                label: pipeline_label,
                                stages: vec![stage],
                            })
                        }
                        // A stage of a pipeline that is deleted or hidden.
                        None => {}
                    }
                }
            }
        }
        for pipeline in &mut pipelines {
            pipeline
                .stages
                .sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.label.cmp(&b.label)));
        }
        Ok(pipelines)
    }

    fn parse_pipelines(&self, body_pages: &[Value]) -> Vec<NativePipeline> {
        let Some(spec) = &self.manifest.pipelines else {
            return Vec::new();
        };
        let mut pipelines = Vec::new();
        for body in body_pages {
            let Ok(records) = self.records(body, &spec.request) else {
                continue;
            };
            for record in records {
                let hidden = spec
                    .hidden
                    .as_deref()
                    .and_then(|p| lookup(record, p))
                    .and_then(|v| {
                        v.as_bool()
                            .or_else(|| text_of(v).and_then(|t| fields::parse_bool(&t)))
                    })
                    .unwrap_or(false);
                let (Some(id), Some(label)) = (
                    lookup(record, &spec.id).and_then(text_of),
                    lookup(record, &spec.label).and_then(text_of),
                ) else {
                    continue;
                };
                if hidden {
                    continue;
                }
                let mut stages = Vec::new();
                if let (Some(pointer), Some(fields)) = (&spec.stages, &spec.stage)
                    && let Some(Value::Array(items)) = lookup(record, pointer)
                {
                    stages.extend(items.iter().filter_map(|item| native_stage(item, fields)));
                }
                pipelines.push(NativePipeline { id, label, stages });
            }
        }
        pipelines
    }
}
