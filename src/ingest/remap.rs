//! Remapping: moving a connection's stored deals when its stage map changes.
//!
//! The map last applied to a connection's deals is recorded beside its cursors. When
//! the map differs (a reload, a restart with another config, discovery naming a
//! stage), each deal of a remapped native stage that sits where the recorded mapping
//! put it (or that was kept as unmapped) moves to the new stage, in one transaction
//! with a `mapping` history row, without reading it again.
//!
//! Invariants: [`plan_remap`] is pure; deals a follow-up, an order or the source's
//! won/lost status put elsewhere stay where they are; a mapping taken away moves
//! nothing.

use super::{ConnectionRuntime, SyncDeps};
use crate::domain::{SourceDeal, StageRef};
use crate::store::{AppliedMapping, NativeStageGroup, StageMove, StoreError};
use tracing::{info, warn};

/// What a connection's stage map changes for its stored deals: the moves (deals of a
/// native stage sitting where the previous mapping put them, whose mapping now names
/// another stage) and the map to record as applied.
#[derive(Debug, Clone, Default)]
pub struct RemapPlan {
    pub moves: Vec<StageMove>,
    pub applied: Vec<AppliedMapping>,
}

impl RemapPlan {
    /// How many deals the moves take.
    pub fn deals(&self) -> u64 {
        self.moves.iter().map(|m| m.deals).sum()
    }
}

/// Plans the remap of a connection's stored deals: `groups` are its live deals by
/// native and canonical stage, `applied` the map recorded by the last remap (`None`
/// before the first: a deal then only moves out of `unmapped`, as nothing says where
/// an earlier mapping put the others). Pure.
pub fn plan_remap(
    runtime: &ConnectionRuntime,
    groups: &[NativeStageGroup],
    applied: Option<&[AppliedMapping]>,
) -> RemapPlan {
    use std::collections::BTreeMap;
    let previous: BTreeMap<(&str, &str), StageRef> = applied
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            (
                (entry.native_pipeline.as_str(), entry.native_stage.as_str()),
                StageRef {
                    pipeline: entry.pipeline.clone().map(crate::domain::PipelineKey::new),
                    stage: crate::domain::StageKey::new(entry.stage.clone()),
                },
            )
        })
        .collect();
    // Every native stage known: those holding deals, those discovery named, and those
    // the defaults and the config map by key, so a stage whose first deal arrives later
    // is in the record too.
    let map = runtime.stage_map();
    let mut natives: Vec<(String, String)> = groups
        .iter()
        .map(|g| (g.native_pipeline.clone(), g.native_stage.clone()))
        .collect();
    for pipeline in map.native() {
        natives.extend(
            pipeline
                .stages
                .iter()
                .map(|stage| (pipeline.id.clone(), stage.id.clone())),
        );
    }
    natives.extend(
        map.entries()
            .iter()
            .filter(|entry| entry.native_pipeline != "*")
            .map(|entry| (entry.native_pipeline.clone(), entry.native_stage.clone())),
    );
    natives.sort();
    natives.dedup();
    let mut plan = RemapPlan::default();
    for (native_pipeline, native_stage) in &natives {
        let native = SourceDeal::new("", "", native_pipeline, native_stage);
        let (target, status) = runtime.map(&native);
        let before = previous
            .get(&(native_pipeline.as_str(), native_stage.as_str()))
            .cloned()
            .unwrap_or_else(StageRef::unmapped);
        if !target.is_unmapped() {
            // Deals kept as unmapped are always the mapping's doing.
            for group in groups.iter().filter(|g| {
                &g.native_pipeline == native_pipeline
                    && &g.native_stage == native_stage
                    && g.stage != target
                    && (g.stage == before || g.stage.is_unmapped())
            }) {
                plan.moves.push(StageMove {
                    native_pipeline: native_pipeline.clone(),
                    native_stage: native_stage.clone(),
                    from: group.stage.clone(),
                    to: target.clone(),
                    status,
                    deals: group.deals,
                });
            }
        }
        // A mapping taken away moves nothing: its deals stay where it put them, and the
        // record says so, for when the stage is mapped again.
        let recorded = if target.is_unmapped() { before } else { target };
        plan.applied.push(AppliedMapping {
            native_pipeline: native_pipeline.clone(),
            native_stage: native_stage.clone(),
            pipeline: recorded.pipeline.as_ref().map(|p| p.as_str().to_owned()),
            stage: recorded.stage.as_str().to_owned(),
        });
    }
    plan
}

/// Applies the connection's stage map to its stored deals (see [`plan_remap`]): when
/// the map changed (a reload, a restart with another config, discovery naming a stage),
/// each deal of a remapped native stage that sits where the previous mapping put it
/// moves to the new stage, in one transaction with a `mapping` history row, without
/// reading it again; poll and webhook connections alike. A failure only leaves them
/// where they are until the next pass.
pub async fn remap(runtime: &ConnectionRuntime, deps: &SyncDeps) {
    let name = runtime.name();
    let read = async {
        let groups = deps.store.native_stage_groups(name).await?;
        let applied = deps.store.applied_stage_map(name).await?;
        Ok::<_, StoreError>((groups, applied))
    };
    let (groups, applied) = match read.await {
        Ok(found) => found,
        Err(error) => {
            warn!(connection = %name, %error, "reading the stored deals' stages failed; not remapping now");
            return;
        }
    };
    let plan = plan_remap(runtime, &groups, applied.as_deref());
    if plan.moves.is_empty() && applied.as_deref() == Some(plan.applied.as_slice()) {
        return;
    }
    let moves = plan.moves.clone();
    match deps.store.remap_deals(name, plan.moves, plan.applied).await {
        Ok(counts) => {
            for (change, moved) in moves.iter().zip(counts) {
                if moved > 0 {
                    info!(connection = %name, native_pipeline = %change.native_pipeline, native_stage = %change.native_stage,
                        from = %crate::followup::policy::describe(&change.from), stage = %crate::followup::policy::describe(&change.to), moved,
                        "deals moved to the stage their native stage now maps to");
                }
            }
        }
        Err(error) => {
            warn!(connection = %name, %error, "moving deals to their newly mapped stages failed");
        }
    }
}

#[cfg(test)]
pub(in crate::ingest) mod tests {
    use super::*;
    use crate::domain::{DealStatus, PipelineKey, StageKey, UNMAPPED};
    use crate::pipeline::{NativePipeline, NativeStage};

    fn sales(stage: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new(stage),
        }
    }

    fn group(
        native_pipeline: &str,
        native_stage: &str,
        stage: StageRef,
        deals: u64,
    ) -> NativeStageGroup {
        NativeStageGroup {
            native_pipeline: native_pipeline.into(),
            native_stage: native_stage.into(),
            stage,
            deals,
        }
    }

    fn applied(
        native_pipeline: &str,
        native_stage: &str,
        pipeline: Option<&str>,
        stage: &str,
    ) -> AppliedMapping {
        AppliedMapping {
            native_pipeline: native_pipeline.into(),
            native_stage: native_stage.into(),
            pipeline: pipeline.map(str::to_owned),
            stage: stage.into(),
        }
    }

    /// A demo connection whose config maps three native stages of its `default`
    /// pipeline, and whose discovery named one more stage that nothing maps.
    fn runtime() -> ConnectionRuntime {
        let runtime =
            configured("proposal = \"proposal\"\nmystery = \"negotiation\"\nsigned = \"won\"\n");
        runtime.discovered(board());
        runtime
    }

    /// A discovered pipeline `board` with one stage, `intake`, that nothing maps.
    pub(in crate::ingest) fn board() -> Vec<NativePipeline> {
        vec![NativePipeline {
            id: "board".into(),
            label: "Board".into(),
            stages: vec![NativeStage {
                id: "intake".into(),
                label: "Intake".into(),
                order: 0,
                probability: None,
                kind: None,
                rot_after: None,
            }],
        }]
    }

    /// A demo connection `crm` whose config maps its `default` pipeline's stages by
    /// `stage_map` (TOML lines).
    pub(in crate::ingest) fn configured(stage_map: &str) -> ConnectionRuntime {
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            &format!(
                "[connections.crm]\nconnector = \"demo\"\n\
                 [connections.crm.stage_map.default]\n{stage_map}"
            ),
            &crate::config::interpolate::ProcessEnv,
        )
        .unwrap();
        ConnectionRuntime::build_all(&config)
            .unwrap()
            .pop()
            .map(|runtime| std::sync::Arc::try_unwrap(runtime).ok().unwrap())
            .unwrap()
    }

    /// A changed stage map moves the deals of a remapped native stage that sit where
    /// the recorded mapping put them, or that were kept as unmapped; deals something
    /// else put elsewhere stay, deals already there are not touched, a native stage of
    /// the same name in another pipeline is another stage, and a mapping taken away
    /// moves nothing. The map recorded covers every native stage known: with deals,
    /// discovered, or named by the config.
    #[test]
    fn a_remap_moves_only_the_deals_the_previous_mapping_placed_and_records_every_known_stage() {
        let runtime = runtime();
        let groups = [
            group("default", "mystery", StageRef::unmapped(), 2),
            group("default", "proposal", sales("lead_qualification"), 3),
            // A follow-up or the source's won status put these here: they stay.
            group("default", "proposal", sales("won"), 1),
            group("default", "proposal", sales("proposal"), 4),
            // Its mapping was taken away: its deals stay where it put them.
            group("default", "retired", sales("closing"), 5),
            // Another pipeline's stage of the same name is not mapped.
            group("other", "mystery", StageRef::unmapped(), 6),
        ];
        let before = [
            applied("default", "proposal", Some("sales"), "lead_qualification"),
            applied("default", "retired", Some("sales"), "closing"),
        ];
        let plan = plan_remap(&runtime, &groups, Some(&before));

        assert_eq!(
            plan.moves,
            [
                StageMove {
                    native_pipeline: "default".into(),
                    native_stage: "mystery".into(),
                    from: StageRef::unmapped(),
                    to: sales("negotiation"),
                    status: DealStatus::Open,
                    deals: 2,
                },
                StageMove {
                    native_pipeline: "default".into(),
                    native_stage: "proposal".into(),
                    from: sales("lead_qualification"),
                    to: sales("proposal"),
                    status: DealStatus::Open,
                    deals: 3,
                },
            ]
        );
        assert_eq!(plan.deals(), 2 + 3);
        assert_eq!(
            plan.applied,
            [
                applied("board", "intake", None, UNMAPPED),
                applied("default", "mystery", Some("sales"), "negotiation"),
                applied("default", "proposal", Some("sales"), "proposal"),
                applied("default", "retired", Some("sales"), "closing"),
                applied("default", "signed", Some("sales"), "won"),
                applied("other", "mystery", None, UNMAPPED),
            ]
        );
    }

    /// Before the first remap nothing records where a mapping put the deals, so only
    /// deals kept as unmapped move.
    #[test]
    fn before_any_map_was_recorded_only_unmapped_deals_move() {
        let runtime = runtime();
        let groups = [
            group("default", "mystery", StageRef::unmapped(), 2),
            group("default", "proposal", sales("lead_qualification"), 3),
        ];
        let plan = plan_remap(&runtime, &groups, None);
        let moved: Vec<(&str, u64)> = plan
            .moves
            .iter()
            .map(|m| (m.native_stage.as_str(), m.deals))
            .collect();
        assert_eq!(moved, [("mystery", 2)]);
        assert_eq!(plan.deals(), 2);
    }

    /// The map in force is recorded even when it moves nothing (at the first start, on
    /// an empty store), so that when the config later maps a native stage elsewhere
    /// the deals the old mapping placed move with it.
    #[tokio::test]
    async fn the_map_in_force_is_recorded_so_a_later_change_moves_the_deals_it_placed() {
        let dir = tempfile::tempdir().unwrap();
        let deps = SyncDeps {
            store: crate::store::Store::open(&dir.path().join("db.sqlite")).unwrap(),
            metrics: std::sync::Arc::new(crate::telemetry::Metrics::new()),
            attention: None,
        };
        let first = configured("proposal = \"lead_qualification\"\n");
        remap(&first, &deps).await;
        let recorded = deps.store.applied_stage_map("crm").await.unwrap();
        assert!(
            recorded.as_ref().is_some_and(|map| map.contains(&applied(
                "default",
                "proposal",
                Some("sales"),
                "lead_qualification"
            ))),
            "{recorded:?}"
        );
        // Recorded again unchanged: nothing to do, and nothing changes.
        remap(&first, &deps).await;
        assert_eq!(deps.store.applied_stage_map("crm").await.unwrap(), recorded);

        let mut deal = SourceDeal::new("7", "Big deal", "default", "proposal");
        deal.updated_at = Some(chrono::Utc::now());
        deps.store
            .upsert_deals(first.upserts(vec![deal], crate::domain::ChangeCause::Poll))
            .await
            .unwrap();
        let stage = |deps: SyncDeps| async move {
            let deal = deps
                .store
                .deal_by_external_id("crm", "7")
                .await
                .unwrap()
                .unwrap();
            deal.stage.as_str().to_owned()
        };
        assert_eq!(stage(deps.clone()).await, "lead_qualification");

        let second = configured("proposal = \"proposal\"\n");
        remap(&second, &deps).await;
        assert_eq!(stage(deps.clone()).await, "proposal");
    }
}
