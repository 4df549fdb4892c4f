//! Daily digests: assembled once per rule and local day, then claimed and sent like
//! outbox rows.
//!
//! Invariants:
//! - A day is assembled once (`Store::assemble_digests` records it in `digest_runs`);
//!   a slot further back than the rule's late grace is recorded as missed, not sent late.
//! - Claiming re-reads the deals a digest lists and the suppression list in one
//!   transaction; a digest with no deal left, or past its grace, is skipped.
//! - Every outcome is recorded through `record`, as for follow-ups; an unknown outcome
//!   is `uncertain` and never resent.

use super::{Worker, email_backoff, record, sender_name, unknown_outcome_reason};
use crate::followup::FollowupError;
use crate::followup::digest::{
    DigestContent, DigestContext, DigestRecipient, DigestRule, MAX_LISTED,
};
use crate::followup::mailer::MailError;
use crate::followup::review;
use crate::store::{AssembleOutcome, DigestClaim, DigestFinish, DigestWatch, StoreError};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tracing::{error, info, warn};

impl Worker {
    /// Assembles each digest rule's latest slot once per local day; a slot further
    /// back than the rule's late grace (downtime) is recorded as missed.
    pub(super) async fn assemble_digests(
        &self,
        assembled: &mut HashMap<String, chrono::NaiveDate>,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        for rule in self.digests.values() {
            let (day, slot) = rule.latest_slot(now);
            if assembled.get(&rule.name) == Some(&day) {
                continue;
            }
            let late = (now - slot).to_std().unwrap_or_default();
            let missed = late > rule.late_grace;
            let outcome = self
                .store
                .assemble_digests(
                    rule.name.clone(),
                    day.to_string(),
                    slot,
                    now,
                    digest_watch(rule, now),
                    digest_fixed(rule),
                    missed,
                )
                .await?;
            match outcome {
                AssembleOutcome::Assembled { recipients } => {
                    info!(rule = %rule.name, %day, recipients, "daily digest assembled");
                }
                AssembleOutcome::Missed => {
                    self.count(&rule.name, "missed");
                    info!(rule = %rule.name, %day, late_s = late.as_secs(), "daily digest missed: the daemon was not running within the late grace of its time; not sent late");
                }
                AssembleOutcome::AlreadyDone => {}
            }
            assembled.insert(rule.name.clone(), day);
        }
        Ok(())
    }

    /// Claims one due digest (re-reading its deals) and sends it.
    pub(super) async fn process_digest(&self, id: i64, rule_name: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        let Some(rule) = self.digests.get(rule_name).cloned() else {
            let reason = format!("digest rule {rule_name} is no longer configured");
            return self.store.skip_digest(id, reason, now).await;
        };
        let by_owner = rule.to == DigestRecipient::Owner;
        let claim = self
            .store
            .claim_digest(
                id,
                now,
                rule.late_grace,
                digest_watch(&rule, now),
                by_owner,
                MAX_LISTED,
            )
            .await?;
        let (row, deals, total) = match claim {
            DigestClaim::Gone => return Ok(()),
            DigestClaim::Skipped(reason) => {
                self.count(&rule.name, "skipped");
                info!(rule = %rule.name, digest_id = id, %reason, "daily digest skipped");
                return Ok(());
            }
            DigestClaim::Send { row, deals, total } => (row, deals, total),
        };
        let key = rule.idempotency_key(&row.day, &row.recipient);
        let message_id = self.mailer.message_id(&key);
        let (rendered, to_name) = match rule.content {
            DigestContent::Stalled => {
                let context = DigestContext::new(
                    &rule,
                    &row.recipient,
                    deals,
                    total,
                    &self.config.pipelines,
                    &row.day,
                    sender_name(&self.config),
                    now,
                );
                let rendered = self.templates.render(&rule.template, &context);
                (rendered, context.owner.name)
            }
            DigestContent::Review => {
                let gathered = review::gather(
                    &self.store,
                    &self.config.pipelines,
                    &rule,
                    &row.recipient,
                    row.slot_at,
                    sender_name(&self.config),
                )
                .await;
                match gathered {
                    Ok(context) => (self.templates.render(&rule.template, &context), None),
                    Err(error) => {
                        // Claimed but not sent: back to pending for a later attempt.
                        let delay = email_backoff(&self.config.email).delay(row.attempts as u32);
                        warn!(rule = %rule.name, digest_id = id, %error, "reading the weekly review's figures failed; trying again later");
                        let finish = DigestFinish::Retry {
                            at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
                            reason: format!("reading the review's figures: {error}"),
                        };
                        return record("a digest's outcome", || {
                            self.store.finish_digest(id, finish.clone(), Utc::now())
                        })
                        .await;
                    }
                }
            }
        };
        let built = rendered.map_err(FollowupError::from).and_then(|rendered| {
            let to = crate::domain::EmailAddress::parse(&row.recipient).ok_or_else(|| {
                FollowupError::NoRecipient {
                    rule: rule.name.clone(),
                }
            })?;
            let outgoing =
                crate::followup::digest::outgoing(&rule, to, to_name, &row.day, rendered);
            Ok(self.mailer.build(&outgoing)?)
        });
        let message = match built {
            Ok(message) => message,
            Err(error) => {
                self.count(&rule.name, "failed");
                error!(rule = %rule.name, digest_id = id, %error, "daily digest failed");
                let finish = DigestFinish::Failed {
                    reason: format!("could not compose the digest: {error}"),
                    suppress: false,
                };
                return self.store.finish_digest(id, finish, Utc::now()).await;
            }
        };
        if self.config.email.dry_run {
            self.count(&rule.name, "dry_run");
            info!(rule = %rule.name, digest_id = id, deals = total, "dry run: digest rendered, not sent");
            let finish = DigestFinish::DryRun { message_id };
            return self.store.finish_digest(id, finish, Utc::now()).await;
        }
        let sent = self.mailer.send(message, &key).await;
        self.note_delivery(&sent, &rule.name);
        let finish = match sent {
            Ok(()) => {
                self.count(&rule.name, "sent");
                info!(rule = %rule.name, digest_id = id, deals = total, day = %row.day, "daily digest sent");
                DigestFinish::Sent { message_id }
            }
            Err(MailError::Transient(reason))
                if (row.attempts as u32) < self.config.email.max_attempts =>
            {
                let email = &self.config.email;
                let delay = email_backoff(email).delay(row.attempts as u32);
                self.count(&rule.name, "retried");
                warn!(rule = %rule.name, digest_id = id, attempt = row.attempts, retry_in_ms = delay.as_millis() as u64, %reason, "digest delivery failed, retrying");
                DigestFinish::Retry {
                    at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
                    reason: format!("retrying: {reason}"),
                }
            }
            Err(MailError::Unknown(reason)) => {
                self.count(&rule.name, "uncertain");
                warn!(rule = %rule.name, digest_id = id, %reason, "digest outcome unknown; marked uncertain, not resent");
                DigestFinish::Uncertain {
                    reason: unknown_outcome_reason(&reason),
                }
            }
            Err(MailError::Permanent {
                reason,
                hard_bounce,
            }) => {
                self.count(&rule.name, "failed");
                warn!(rule = %rule.name, digest_id = id, hard_bounce, %reason, "digest refused by the server");
                DigestFinish::Failed {
                    reason,
                    suppress: hard_bounce,
                }
            }
            Err(error) => {
                self.count(&rule.name, "failed");
                DigestFinish::Failed {
                    reason: format!("gave up after {} attempts: {error}", row.attempts),
                    suppress: false,
                }
            }
        };
        record("a digest's outcome", || {
            self.store.finish_digest(id, finish.clone(), Utc::now())
        })
        .await
    }
}

/// What a digest lists at `now`: each watched stage with its idle cut-off.
pub fn digest_watch(rule: &DigestRule, now: DateTime<Utc>) -> Vec<DigestWatch> {
    rule.cutoffs(now)
        .into_iter()
        .map(|(stage, entered_before)| DigestWatch {
            stage,
            entered_before,
        })
        .collect()
}

fn digest_fixed(rule: &DigestRule) -> Option<String> {
    match &rule.to {
        DigestRecipient::Owner => None,
        DigestRecipient::Fixed(address) => Some(address.as_str().to_lowercase()),
    }
}
