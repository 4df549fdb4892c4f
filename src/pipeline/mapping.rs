//! Stage mapping: (connection, native pipeline, native stage) → canonical stage.
//!
//! Entries come from the connector's manifest (defaults for the vendor's stock
//! pipelines) and from the config (overrides, which win). Native pipelines and stages
//! may be named by id or by label; `*` as the native pipeline matches any pipeline.
//! When discovery says a native stage is closed-won or closed-lost, an otherwise
//! unmapped stage resolves to the canonical pipeline's first won or lost stage.

use super::{Pipelines, StageKind};
use crate::domain::{PipelineKey, StageKey, StageRef};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// Where a mapping entry came from; shown by `dealsync stages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingSource {
    Manifest,
    Config,
    /// Derived from the source's own closed-won / closed-lost flags.
    Discovered,
}

/// One mapping rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageMapEntry {
    /// Native pipeline id or label, or `*` for any.
    pub native_pipeline: String,
    /// Native stage id or label.
    pub native_stage: String,
    pub target: StageRef,
    pub source: MappingSource,
}

/// A native pipeline as a connector discovers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NativePipeline {
    pub id: String,
    pub label: String,
    pub stages: Vec<NativeStage>,
}

/// A native stage as a connector discovers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NativeStage {
    pub id: String,
    pub label: String,
    pub order: i64,
    /// Win probability in percent, when the source has one.
    pub probability: Option<u8>,
    /// Open, won or lost, when the source says.
    pub kind: Option<StageKind>,
    /// The source's own rotting threshold, when it has one.
    #[serde(default, with = "crate::domain::duration::option_serde")]
    pub rot_after: Option<Duration>,
}

/// A config mapping entry that names no discovered native stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmatched<'a> {
    pub entry: &'a StageMapEntry,
    /// True when not even the native pipeline was found.
    pub pipeline_missing: bool,
    /// What discovery found instead: the pipelines' labels, or the stages' labels of
    /// the pipelines the entry names.
    pub known: Vec<String>,
}

/// The resolved mapping of one connection.
#[derive(Debug, Clone, Default)]
pub struct StageMap {
    default_pipeline: Option<PipelineKey>,
    entries: Vec<StageMapEntry>,
    /// (normalized native pipeline, normalized native stage) → index into `entries`.
    index: HashMap<(String, String), usize>,
    native: Vec<NativePipeline>,
}

fn normalize(text: &str) -> String {
    text.trim().to_lowercase()
}

impl StageMap {
    /// Builds a map from manifest defaults then config overrides (later entries win).
    pub fn new(
        default_pipeline: Option<PipelineKey>,
        entries: impl IntoIterator<Item = StageMapEntry>,
    ) -> Self {
        let mut map = StageMap {
            default_pipeline,
            ..StageMap::default()
        };
        for entry in entries {
            map.insert(entry);
        }
        map
    }

    fn insert(&mut self, entry: StageMapEntry) {
        let key = (
            normalize(&entry.native_pipeline),
            normalize(&entry.native_stage),
        );
        match self.index.get(&key) {
            Some(&at) => self.entries[at] = entry,
            None => {
                self.index.insert(key, self.entries.len());
                self.entries.push(entry);
            }
        }
    }

    /// Adds what discovery learnt: labels (so entries may name either) and the
    /// closed-won / closed-lost flags for stages no entry maps.
    pub fn with_native(mut self, native: Vec<NativePipeline>, pipelines: &Pipelines) -> Self {
        self.native = native;
        let Some(default) = self
            .default_pipeline
            .as_ref()
            .and_then(|key| pipelines.get(key.as_str()))
        else {
            return self;
        };
        let mut derived = Vec::new();
        for pipeline in &self.native {
            for stage in &pipeline.stages {
                let Some(kind @ (StageKind::Won | StageKind::Lost)) = stage.kind else {
                    continue;
                };
                if self.lookup(&pipeline.id, &stage.id).is_some() {
                    continue;
                }
                if let Some(target) = default.first_of_kind(kind) {
                    derived.push(StageMapEntry {
                        native_pipeline: pipeline.id.clone(),
                        native_stage: stage.id.clone(),
                        target: StageRef {
                            pipeline: Some(default.key.clone()),
                            stage: target.key.clone(),
                        },
                        source: MappingSource::Discovered,
                    });
                }
            }
        }
        for entry in derived {
            self.insert(entry);
        }
        self
    }

    fn labels_of(&self, pipeline: &str, stage: &str) -> (Option<&str>, Option<&str>) {
        let Some(found) = self
            .native
            .iter()
            .find(|p| p.id == pipeline || normalize(&p.label) == normalize(pipeline))
        else {
            return (None, None);
        };
        let stage_label = found
            .stages
            .iter()
            .find(|s| s.id == stage)
            .map(|s| s.label.as_str());
        (Some(found.label.as_str()), stage_label)
    }

    fn lookup(&self, pipeline: &str, stage: &str) -> Option<&StageMapEntry> {
        let (pipeline_label, stage_label) = self.labels_of(pipeline, stage);
        let pipelines = [Some(pipeline), pipeline_label, Some("*")];
        let stages = [Some(stage), stage_label];
        for p in pipelines.iter().flatten() {
            for s in stages.iter().flatten() {
                if let Some(&at) = self.index.get(&(normalize(p), normalize(s))) {
                    return Some(&self.entries[at]);
                }
            }
        }
        None
    }

    /// Returns the entry that maps a native stage (named by id or label), if any.
    pub fn entry_for(&self, native_pipeline: &str, native_stage: &str) -> Option<&StageMapEntry> {
        self.lookup(native_pipeline, native_stage)
    }

    /// Returns the canonical stage for a native one; unmapped when nothing matches.
    pub fn resolve(&self, native_pipeline: &str, native_stage: &str) -> StageRef {
        self.lookup(native_pipeline, native_stage)
            .map(|entry| entry.target.clone())
            .unwrap_or_else(StageRef::unmapped)
    }

    /// Returns the native stages that discovery found and nothing maps, each once.
    pub fn unmapped_native(&self) -> Vec<(&NativePipeline, &NativeStage)> {
        self.native
            .iter()
            .flat_map(|pipeline| pipeline.stages.iter().map(move |stage| (pipeline, stage)))
            .filter(|(pipeline, stage)| self.lookup(&pipeline.id, &stage.id).is_none())
            .collect()
    }

    /// Returns the discovered native stage a source record names by id or label.
    pub fn find_native(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> Option<(&NativePipeline, &NativeStage)> {
        let pipeline = self.native.iter().find(|p| {
            p.id == pipeline
                || normalize(&p.id) == normalize(pipeline)
                || normalize(&p.label) == normalize(pipeline)
        })?;
        let stage = pipeline.stages.iter().find(|s| {
            s.id == stage
                || normalize(&s.id) == normalize(stage)
                || normalize(&s.label) == normalize(stage)
        })?;
        Some((pipeline, stage))
    }

    /// Returns the config entries that match no discovered native pipeline or stage (a
    /// typo, or a stage renamed in the source), each with what discovery did find
    /// there. Empty until something was discovered: then nothing can be told apart.
    pub fn unmatched_entries(&self) -> Vec<Unmatched<'_>> {
        if self.native.is_empty() {
            return Vec::new();
        }
        let mut unmatched = Vec::new();
        for entry in self
            .entries
            .iter()
            .filter(|entry| entry.source == MappingSource::Config)
        {
            let wanted = normalize(&entry.native_pipeline);
            let pipelines: Vec<&NativePipeline> = self
                .native
                .iter()
                .filter(|p| {
                    wanted == "*" || normalize(&p.id) == wanted || normalize(&p.label) == wanted
                })
                .collect();
            if pipelines.is_empty() {
                unmatched.push(Unmatched {
                    entry,
                    pipeline_missing: true,
                    known: self.native.iter().map(|p| p.label.clone()).collect(),
                });
                continue;
            }
            let stage = normalize(&entry.native_stage);
            let found = pipelines.iter().any(|pipeline| {
                pipeline
                    .stages
                    .iter()
                    .any(|s| normalize(&s.id) == stage || normalize(&s.label) == stage)
            });
            if !found {
                unmatched.push(Unmatched {
                    entry,
                    pipeline_missing: false,
                    known: pipelines
                        .iter()
                        .flat_map(|p| p.stages.iter().map(|s| s.label.clone()))
                        .collect(),
                });
            }
        }
        unmatched
    }

    pub fn entries(&self) -> &[StageMapEntry] {
        &self.entries
    }

    pub fn native(&self) -> &[NativePipeline] {
        &self.native
    }

    pub fn default_pipeline(&self) -> Option<&PipelineKey> {
        self.default_pipeline.as_ref()
    }
}

/// Parses a mapping target: `stage` (in the connection's pipeline) or `pipeline.stage`.
pub fn parse_target(
    text: &str,
    default_pipeline: Option<&PipelineKey>,
    pipelines: &Pipelines,
) -> Result<StageRef, String> {
    let (pipeline, stage) = match text.split_once('.') {
        Some((pipeline, stage)) => (PipelineKey::new(pipeline), stage),
        None => match default_pipeline {
            Some(pipeline) => (pipeline.clone(), text),
            None => {
                return Err(format!(
                    "{text:?} names no pipeline; write \"pipeline.stage\" or set the connection's pipeline"
                ));
            }
        },
    };
    let Some(found) = pipelines.get(pipeline.as_str()) else {
        let known: Vec<_> = pipelines.iter().map(|p| p.key.as_str()).collect();
        return Err(format!(
            "unknown pipeline {:?} (known: {})",
            pipeline.as_str(),
            known.join(", ")
        ));
    };
    if found.stage(stage).is_none() {
        let known: Vec<_> = found.stages.iter().map(|s| s.key.as_str()).collect();
        return Err(format!(
            "pipeline {:?} has no stage {stage:?} (stages: {})",
            pipeline.as_str(),
            known.join(", ")
        ));
    }
    Ok(StageRef {
        pipeline: Some(pipeline),
        stage: StageKey::new(stage),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::default_pipelines;

    fn sales(stage: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new(stage),
        }
    }

    fn entry(p: &str, s: &str, to: &str, source: MappingSource) -> StageMapEntry {
        StageMapEntry {
            native_pipeline: p.into(),
            native_stage: s.into(),
            target: sales(to),
            source,
        }
    }

    #[test]
    fn config_entries_override_manifest_defaults() {
        let map = StageMap::new(
            Some(PipelineKey::new("sales")),
            [
                entry(
                    "default",
                    "qualifiedtobuy",
                    "lead_qualification",
                    MappingSource::Manifest,
                ),
                entry(
                    "default",
                    "QualifiedToBuy",
                    "needs_assessment",
                    MappingSource::Config,
                ),
            ],
        );
        assert_eq!(
            map.resolve("default", "qualifiedtobuy"),
            sales("needs_assessment")
        );
    }

    #[test]
    fn an_unknown_native_stage_resolves_to_unmapped() {
        let map = StageMap::new(Some(PipelineKey::new("sales")), []);
        assert!(map.resolve("default", "mystery").is_unmapped());
    }

    #[test]
    fn entries_may_name_labels_and_closed_flags_map_to_won_and_lost() {
        let pipelines = Pipelines::new(default_pipelines());
        let native = vec![NativePipeline {
            id: "7".into(),
            label: "Software Sales".into(),
            stages: vec![
                NativeStage {
                    id: "71".into(),
                    label: "Product Demo".into(),
                    order: 1,
                    probability: None,
                    kind: Some(StageKind::Open),
                    rot_after: None,
                },
                NativeStage {
                    id: "72".into(),
                    label: "Signed".into(),
                    order: 2,
                    probability: Some(100),
                    kind: Some(StageKind::Won),
                    rot_after: None,
                },
                NativeStage {
                    id: "73".into(),
                    label: "Trial Use".into(),
                    order: 3,
                    probability: None,
                    kind: None,
                    rot_after: None,
                },
            ],
        }];
        let map = StageMap::new(
            Some(PipelineKey::new("sales")),
            [
                entry(
                    "Software Sales",
                    "Product Demo",
                    "needs_assessment",
                    MappingSource::Config,
                ),
                entry("*", "Trial Use", "proposal", MappingSource::Config),
            ],
        )
        .with_native(native, &pipelines);
        assert_eq!(map.resolve("7", "71"), sales("needs_assessment"));
        assert_eq!(map.resolve("7", "72"), sales("won"));
        assert_eq!(map.resolve("7", "73"), sales("proposal"));
    }

    #[test]
    fn config_entries_that_match_no_discovered_stage_are_named_with_what_exists() {
        let pipelines = Pipelines::new(default_pipelines());
        let stage = |id: &str, label: &str| NativeStage {
            id: id.into(),
            label: label.into(),
            order: 0,
            probability: None,
            kind: None,
            rot_after: None,
        };
        let native = vec![NativePipeline {
            id: "software".into(),
            label: "Software Sales".into(),
            stages: vec![stage("s1", "Trial Use"), stage("s2", "Referral Partner")],
        }];
        let entries = [
            entry(
                "Software Sales",
                "Trial Usage",
                "proposal",
                MappingSource::Config,
            ),
            entry("software", "trial use", "proposal", MappingSource::Config),
            entry("Softwear", "Trial Use", "proposal", MappingSource::Config),
            entry(
                "default",
                "appointmentscheduled",
                "proposal",
                MappingSource::Manifest,
            ),
        ];
        let undiscovered = StageMap::new(Some(PipelineKey::new("sales")), entries.clone());
        assert!(undiscovered.unmatched_entries().is_empty());
        let map =
            StageMap::new(Some(PipelineKey::new("sales")), entries).with_native(native, &pipelines);
        let unmatched: Vec<(&str, &str, bool)> = map
            .unmatched_entries()
            .iter()
            .map(|u| {
                (
                    u.entry.native_pipeline.as_str(),
                    u.entry.native_stage.as_str(),
                    u.pipeline_missing,
                )
            })
            .collect();
        assert_eq!(
            unmatched,
            [
                ("Software Sales", "Trial Usage", false),
                ("Softwear", "Trial Use", true)
            ]
        );
        assert_eq!(
            map.unmatched_entries()[0].known,
            ["Trial Use", "Referral Partner"]
        );
        let unmapped: Vec<&str> = map
            .unmapped_native()
            .iter()
            .map(|(_, stage)| stage.label.as_str())
            .collect();
        assert_eq!(unmapped, ["Referral Partner"]);
        assert_eq!(
            map.find_native("Software Sales", "Referral Partner")
                .map(|(_, s)| s.id.as_str()),
            Some("s2")
        );
    }

    #[test]
    fn targets_must_name_an_existing_stage() {
        let pipelines = Pipelines::new(default_pipelines());
        let sales_key = PipelineKey::new("sales");
        assert_eq!(
            parse_target("proposal", Some(&sales_key), &pipelines).unwrap(),
            sales("proposal")
        );
        assert!(parse_target("ecommerce.cart_abandoned", None, &pipelines).is_ok());
        let error = parse_target("propsal", Some(&sales_key), &pipelines).unwrap_err();
        assert!(error.contains("has no stage \"propsal\""), "{error}");
        assert!(
            parse_target("nope.x", None, &pipelines)
                .unwrap_err()
                .contains("unknown pipeline")
        );
    }
}
