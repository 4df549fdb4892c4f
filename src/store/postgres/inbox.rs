//! Settling claimed webhook inbox rows on PostgreSQL: the worker side of the shared
//! inbox (`intake` is the webhook handler's side, `claims::INBOX` hands rows out).
//!
//! Invariant: only the replica that holds a row's claim settles it. A settlement from a
//! replica whose claim expired and was handed to another (it stalled, or was cut off
//! from the server) changes nothing: the holder's outcome stands. Applying a webhook
//! twice is harmless (the deal upsert makes the second a no-op); recording two
//! different outcomes for one row is what the fence prevents.

use super::Database;
use crate::store::{Result, Settlement, to_ms};

impl Database {
    /// Records how `claimer` is done with rows it claimed, in one transaction; returns
    /// the ids it settled (the rows it still held).
    pub async fn settle_claimed_webhooks(
        &self,
        claimer: &str,
        settlements: &[Settlement],
    ) -> Result<Vec<i64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut settled = Vec::with_capacity(settlements.len());
        for settlement in settlements {
            let (id, changed) = match settlement {
                Settlement::Processed { id, at } => (
                    *id,
                    tx.execute(
                        "UPDATE webhook_inbox SET state = 'processed', processed_at = $3,
                             next_attempt_at = NULL, claimed_by = NULL, claimed_until = NULL
                          WHERE id = $1 AND state = 'claimed' AND claimed_by = $2",
                        &[id, &claimer, &to_ms(*at)],
                    )
                    .await?,
                ),
                Settlement::Retry {
                    id,
                    error,
                    next_attempt_at,
                } => (
                    *id,
                    tx.execute(
                        "UPDATE webhook_inbox SET state = 'pending', attempts = attempts + 1,
                             last_error = $3, next_attempt_at = $4,
                             claimed_by = NULL, claimed_until = NULL
                          WHERE id = $1 AND state = 'claimed' AND claimed_by = $2",
                        &[id, &claimer, error, &to_ms(*next_attempt_at)],
                    )
                    .await?,
                ),
                Settlement::Failed { id, error, at } => (
                    *id,
                    tx.execute(
                        "UPDATE webhook_inbox SET state = 'failed', attempts = attempts + 1,
                             last_error = $3, processed_at = $4, next_attempt_at = NULL,
                             claimed_by = NULL, claimed_until = NULL
                          WHERE id = $1 AND state = 'claimed' AND claimed_by = $2",
                        &[id, &claimer, error, &to_ms(*at)],
                    )
                    .await?,
                ),
            };
            if changed == 1 {
                settled.push(id);
            }
        }
        tx.commit().await?;
        Ok(settled)
    }
}

#[cfg(test)]
mod tests {
    use super::super::claims::INBOX;
    use super::super::intake::Intake;
    use super::super::tests::url_of;
    use super::super::{Options, test_database};
    use super::*;
    use chrono::Utc;
    use std::time::Duration;

    /// Rows claimed by one replica are settled by it alone: another replica's
    /// settlement changes nothing, a retried row is due again at its time, and a
    /// replica whose claim expired and was handed on cannot overwrite the new holder's
    /// outcome.
    #[tokio::test]
    async fn only_the_claims_holder_settles_a_row() {
        let Some(test) = test_database("only_the_claims_holder_settles_a_row") else {
            return;
        };
        let database = Database::open(&url_of(&test), &Options::default())
            .await
            .unwrap();
        let intake = Intake::start(database.clone()).await.unwrap();
        for id in ["a", "b", "c", "d"] {
            let event = crate::store::tests::webhook("shop", id);
            intake.enqueue(event).await.unwrap();
        }
        let now = Utc::now();
        let minute = Duration::from_secs(60);
        let claimed = database.claim(&INBOX, "one", minute, now, 3).await.unwrap();
        let [a, b, c] = claimed.ids[..] else {
            panic!("{claimed:?}");
        };
        let later = now + chrono::Duration::minutes(5);
        let settle = |id| {
            [
                Settlement::Processed { id, at: now },
                Settlement::Retry {
                    id: b,
                    error: "vendor 500".into(),
                    next_attempt_at: later,
                },
                Settlement::Failed {
                    id: c,
                    error: "unusable".into(),
                    at: now,
                },
            ]
        };
        let by_other = database
            .settle_claimed_webhooks("two", &settle(a))
            .await
            .unwrap();
        assert!(by_other.is_empty(), "{by_other:?}");
        let by_holder = database
            .settle_claimed_webhooks("one", &settle(a))
            .await
            .unwrap();
        assert_eq!(by_holder, [a, b, c]);
        let states: Vec<(String, i64, Option<String>)> = test
            .admin()
            .await
            .query(
                "SELECT state, attempts, last_error FROM webhook_inbox
                  WHERE id = ANY($1) ORDER BY id",
                &[&vec![a, b, c]],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(
            states,
            [
                ("processed".into(), 0, None),
                ("pending".into(), 1, Some("vendor 500".into())),
                ("failed".into(), 1, Some("unusable".into())),
            ]
        );
        // Not due before its retry time; due at it.
        let early = database
            .claim(&INBOX, "two", minute, now, 10)
            .await
            .unwrap();
        assert_eq!(early.ids.len(), 1, "only d: {early:?}");
        assert!(!early.ids.contains(&b), "{early:?}");
        let due = database
            .claim(&INBOX, "two", minute, later, 10)
            .await
            .unwrap();
        assert_eq!(due.ids, [b]);

        // A claim that expired and was handed on: the first holder's word is void.
        let short = Duration::from_millis(1);
        let stalled = database
            .claim(&INBOX, "three", short, later, 10)
            .await
            .unwrap();
        assert!(
            stalled.ids.is_empty(),
            "b and d are held by two: {stalled:?}"
        );
        test.admin()
            .await
            .execute(
                "UPDATE webhook_inbox SET claimed_until = clock_timestamp() - interval '1 s'
                  WHERE id = $1",
                &[&b],
            )
            .await
            .unwrap();
        let handed_on = database
            .claim(&INBOX, "three", minute, later, 10)
            .await
            .unwrap();
        assert_eq!(handed_on.ids, [b]);
        let late = database
            .settle_claimed_webhooks("two", &[Settlement::Processed { id: b, at: later }])
            .await
            .unwrap();
        assert!(late.is_empty(), "the expired holder settled {late:?}");
        let current = database
            .settle_claimed_webhooks("three", &[Settlement::Processed { id: b, at: later }])
            .await
            .unwrap();
        assert_eq!(current, [b]);
    }
}
