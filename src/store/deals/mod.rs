//! Deals and their stage history: what a record to store is ([`DealUpsert`]) and what
//! storing a batch did ([`UpsertOutcome`]); the rest lives in one file per idea:
//! - `write`: how a batch (a page, a webhook's records) becomes deal rows and their
//!   history rows inside the caller's transaction (`upsert_all`).
//! - `history`: the `stage_history` rows: the batch's multi-row insert, a move on
//!   dealsync's own account (`move_stage`), reading a deal's history back.
//! - `query`: reading deals: by id, by external id, filtered lists, counts per stage,
//!   the unchanged-record lookup; `DEAL_COLUMNS` and `deal_from_row` for the store's
//!   other readers.
//! - `stage_map`: what a connection's stage map did to its stored deals: native stage
//!   groups, remapping after a changed map, unmapped native stages.
//!
//! Invariants (kept across the files):
//! - One deal per (connection, external id).
//! - Every canonical stage change appends exactly one `stage_history` row, in the same
//!   transaction as the deal's update (the caller's).
//! - Only `history` writes `stage_history`; only `write` and `history` write `deals`
//!   rows (`stage_map` moves deals through `history::move_stage`).

mod history;
mod plan;
mod query;
mod stage_map;
mod write;

pub(crate) use history::move_stage;
pub(in crate::store) use history::{HISTORY_COLUMNS_READ, change_from};
pub(in crate::store) use plan::{
    DealRef, Existing, Write, by_connection, followup_candidates, plan,
};
pub(in crate::store) use query::{Columns, deal_from};
pub(crate) use query::{DEAL_COLUMNS, deal_from_row};
pub use query::{DealFilter, StageCount};
pub use stage_map::{AppliedMapping, NativeStageGroup, StageMove, UnmappedStage};
pub(crate) use write::upsert_all;
pub(super) use write::write_keys;

use crate::domain::{ChangeCause, ConnectionName, DealStatus, SourceDeal, StageRef};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// One source record to store, with its stage already mapped.
#[derive(Debug, Clone)]
pub struct DealUpsert {
    pub connection: ConnectionName,
    pub source: SourceDeal,
    pub target: StageRef,
    pub status: DealStatus,
    pub observed_at: DateTime<Utc>,
    pub cause: ChangeCause,
}

/// What an upsert did, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UpsertOutcome {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Records older than what is stored (an out-of-order delivery), ignored.
    pub stale: u64,
    pub stage_changes: u64,
    pub unmapped: u64,
}

impl UpsertOutcome {
    pub fn add(&mut self, other: UpsertOutcome) {
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.stale += other.stale;
        self.stage_changes += other.stage_changes;
        self.unmapped += other.unmapped;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The records the deal tests of the store write.
    use super::*;
    use crate::domain::{Currency, Money, PipelineKey, StageKey};
    use crate::store::Store;

    #[test]
    fn outcomes_add_up_field_by_field() {
        let mut total = UpsertOutcome {
            created: 1,
            updated: 2,
            unchanged: 3,
            stale: 4,
            stage_changes: 5,
            unmapped: 6,
        };
        total.add(UpsertOutcome {
            created: 10,
            updated: 20,
            unchanged: 30,
            stale: 40,
            stage_changes: 50,
            unmapped: 60,
        });
        let expected = UpsertOutcome {
            created: 11,
            updated: 22,
            unchanged: 33,
            stale: 44,
            stage_changes: 55,
            unmapped: 66,
        };
        assert_eq!(total, expected);
    }

    /// Deal `id` of connection `crm` in `sales.<stage>` (`mystery` is unmapped), 4,200.50 EUR.
    pub(crate) fn upsert(id: &str, stage: &str, at: DateTime<Utc>) -> DealUpsert {
        let mut source = SourceDeal::new(id, format!("Deal {id}"), "default", stage);
        source.amount = Some(Money::new(420050, Currency::parse("EUR").unwrap()));
        source.updated_at = Some(at);
        DealUpsert {
            connection: ConnectionName::new("crm"),
            target: if stage == "mystery" {
                StageRef::unmapped()
            } else {
                StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new(stage),
                }
            },
            status: if stage == "mystery" {
                DealStatus::Unmapped
            } else {
                DealStatus::Open
            },
            source,
            observed_at: at,
            cause: ChangeCause::Poll,
        }
    }

    /// `upsert` with the source saying `status` and the canonical stage `sales.<stage>`.
    pub(super) fn with_status(mut record: DealUpsert, status: DealStatus) -> DealUpsert {
        record.status = status;
        record
    }

    pub(super) fn sales(stage: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new(stage),
        }
    }

    /// The stored deal `external_id` of `connection`, which the test wrote before.
    pub(crate) async fn stored_deal(
        store: &Store,
        connection: &str,
        external_id: &str,
    ) -> crate::domain::Deal {
        store
            .deal_by_external_id(connection, external_id)
            .await
            .unwrap()
            .unwrap()
    }

    pub(super) async fn stage_and_status(
        store: &Store,
        connection: &str,
        id: &str,
    ) -> (String, DealStatus) {
        let deal = stored_deal(store, connection, id).await;
        (deal.stage.as_str().to_owned(), deal.status)
    }
}
