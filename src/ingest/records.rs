//! Pulled records become deal upserts: each record's stage mapped, and the records
//! that cannot be stored set aside for the quarantine.
//!
//! Invariant: a record nested too deep (`domain::check_depth`) is refused here,
//! whatever the connector, so it is never stored where every later read would have to
//! parse it; a bad record is quarantined and the page goes on.

use super::ConnectionRuntime;
use crate::connectors::BadRecord;
use crate::domain::{ChangeCause, SourceDeal, check_depth};
use crate::store::{DealUpsert, Quarantined};
use tracing::warn;

/// A pulled page's records, mapped.
#[derive(Debug, Default)]
pub struct Pulled {
    /// The records to store, stages mapped (cause `poll`).
    pub upserts: Vec<DealUpsert>,
    /// The records that cannot be stored, with why.
    pub quarantined: Vec<Quarantined>,
}

impl ConnectionRuntime {
    /// Maps a page's records to upserts and sets aside the ones that do not map.
    pub fn pulled(&self, records: Vec<Result<SourceDeal, BadRecord>>) -> Pulled {
        let mut deals = Vec::with_capacity(records.len());
        let mut quarantined = Vec::new();
        for record in records {
            let record = record.and_then(|deal| match check_depth(deal.raw.as_str().as_bytes()) {
                Ok(()) => Ok(deal),
                Err(too_deep) => Err(BadRecord {
                    external_id: Some(deal.external_id.to_string()),
                    reason: too_deep.to_string(),
                    raw: deal.raw,
                }),
            });
            match record {
                Ok(deal) => deals.push(deal),
                Err(bad) => {
                    warn!(connection = %self.name(), external_id = ?bad.external_id, reason = %bad.reason, "record quarantined");
                    quarantined.push(Quarantined {
                        external_id: bad.external_id,
                        error: bad.reason,
                        raw: bad.raw,
                    })
                }
            }
        }
        Pulled {
            upserts: self.upserts(deals, ChangeCause::Poll),
            quarantined,
        }
    }
}
