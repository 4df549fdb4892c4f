//! Sending: claims one due outbox row, renders it and hands it to the mailer.
//!
//! Invariants:
//! - Every send-time check (stage, order, suppression, consent, quiet hours, cap, late
//!   grace) is decided by `policy` inside the store's claim transaction; only a row the
//!   claim moved to `sending` is rendered and sent.
//! - A marketing email to a CRM contact is preceded by a fresh read of the deal at its
//!   source; without one the step waits, and is skipped past the late grace.
//! - What a send did is recorded through `record` (retried while the store is busy):
//!   sent (with the step's stage move, in one transaction), retry, failed (a hard
//!   bounce suppresses the address) or uncertain (never resent).
//! - A message that cannot be composed or built fails its row with the reason; it is
//!   never left `sending`.

use super::{Worker, email_backoff, record, sender_name, unknown_outcome_reason};
use crate::config::{Config, EmailConfig};
use crate::domain::Deal;
use crate::domain::delivery::return_path;
use crate::followup::FollowupError;
use crate::followup::mailer::{MailError, Mailer, Outgoing};
use crate::followup::policy::{self, CAP_WINDOW, Policy};
use crate::followup::rules::{Recipient, Rule, RuleKind};
use crate::followup::templates::{EmailContext, Templates};
use crate::followup::unsubscribe;
use crate::store::{ClaimDecision, ClaimQuery, OutboxRow, StoreError};
use chrono::{DateTime, Utc};
use tracing::{debug, error, info, warn};

impl Worker {
    /// Claims one due row and carries it out.
    pub(super) async fn process(&self, id: i64, rule_name: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        let Some(rule) = self.rules.get(rule_name).cloned() else {
            let reason = format!("rule {rule_name} is no longer configured");
            self.store
                .claim(id, now, ClaimQuery::default(), move |_| {
                    ClaimDecision::Skip(reason)
                })
                .await?;
            return Ok(());
        };
        let email = &self.config.email;
        if rule.kind == RuleKind::Marketing
            && let Some(pause) = self
                .store
                .rule_pauses()
                .await?
                .into_iter()
                .find(|pause| pause.rule == rule.name)
        {
            // Paused for its complaint rate: the step waits for an operator's resume,
            // and is skipped once it is later than the grace, as any late step.
            let grace = chrono::Duration::from_std(rule.late_grace.unwrap_or(email.late_grace))
                .unwrap_or(chrono::Duration::MAX);
            // Looked at again as often as an operator's retry is picked up.
            let until = now + chrono::Duration::from_std(email.enroll_interval).unwrap_or_default();
            self.store
                .claim(id, now, ClaimQuery::default(), move |facts| {
                    if now - facts.row.due_at > grace {
                        ClaimDecision::Skip(format!(
                            "rule paused past the late grace: {}",
                            pause.reason
                        ))
                    } else {
                        ClaimDecision::Defer {
                            until,
                            reason: format!(
                                "rule paused (`dealsync deliverability resume {}` resumes it): {}",
                                pause.rule, pause.reason
                            ),
                        }
                    }
                })
                .await?;
            self.count(&rule.name, "deferred");
            return Ok(());
        }
        if rule.kind == RuleKind::Marketing
            && rule.to == Recipient::Contact
            && let Some(source) = &self.source
            && let Some(deal) = self.store.outbox_email_deal(id).await?
            && let Err(reason) = source
                .reread(
                    deal.connection.as_str(),
                    deal.external_id.as_str(),
                    &self.shutdown,
                )
                .await
        {
            // Consent is the source's to say: without a fresh read the step waits,
            // and is skipped once it is later than the grace.
            let grace = chrono::Duration::from_std(rule.late_grace.unwrap_or(email.late_grace))
                .unwrap_or(chrono::Duration::MAX);
            let retry = email_backoff(email).delay(1);
            let until = now + chrono::Duration::from_std(retry).unwrap_or_default();
            warn!(rule = %rule.name, outbox_id = id, deal_id = deal.id, %reason, "could not read the deal again at its source to confirm consent; the step waits");
            self.store
                .claim(id, now, ClaimQuery::default(), move |facts| {
                    if now - facts.row.due_at > grace {
                        ClaimDecision::Skip(format!(
                            "consent could not be confirmed at the source within the late grace: {reason}"
                        ))
                    } else {
                        ClaimDecision::Defer {
                            until,
                            reason: format!("confirming consent at the source: {reason}"),
                        }
                    }
                })
                .await?;
            self.count(&rule.name, "deferred");
            return Ok(());
        }
        let query = claim_query(&rule, &self.config.email);
        let decider = rule.clone();
        let config = self.config.clone();
        let Some(claim) = self
            .store
            .claim(id, now, query, move |facts| {
                send_policy(&decider, &config.email, now).decide(facts)
            })
            .await?
        else {
            return Ok(());
        };
        match (&claim.decision, claim.sending) {
            (ClaimDecision::Send, Some((row, deal))) => self.deliver(&rule, row, deal).await,
            (ClaimDecision::Skip(reason) | ClaimDecision::Stop(reason), _) => {
                self.count(&rule.name, "skipped");
                info!(rule = %rule.name, outbox_id = id, reason = %reason, "follow-up skipped");
                Ok(())
            }
            (ClaimDecision::Defer { until, reason }, _) => {
                self.count(&rule.name, "deferred");
                debug!(rule = %rule.name, outbox_id = id, %until, reason = %reason, "follow-up deferred");
                Ok(())
            }
            (ClaimDecision::Expire(to), _) => {
                self.count(&rule.name, "expired");
                info!(rule = %rule.name, outbox_id = id, to = %policy::describe(to), "deal expired after its follow-ups");
                Ok(())
            }
            (ClaimDecision::Send, None) => Ok(()),
        }
    }

    /// Renders, sends and records one claimed email.
    pub(super) async fn deliver(
        &self,
        rule: &Rule,
        row: OutboxRow,
        deal: Deal,
    ) -> Result<(), StoreError> {
        let step = row.step;
        let key = idempotency_key(&row);
        let outgoing = match self.compose(rule, &row, &deal) {
            Ok(outgoing) => outgoing,
            Err(error) => {
                let reason = format!("could not compose the email: {error}");
                error!(rule = %rule.name, deal_id = deal.id, %reason, "follow-up failed");
                self.count(&rule.name, "failed");
                return self
                    .store
                    .mark_failed(row.id, reason, None, Utc::now())
                    .await;
            }
        };
        let message_id = self.mailer.message_id(&key);
        let message = match self.mailer.build(&outgoing) {
            Ok(message) => message,
            Err(error) => {
                self.count(&rule.name, "failed");
                return self
                    .store
                    .mark_failed(row.id, error.to_string(), None, Utc::now())
                    .await;
            }
        };
        if self.config.email.dry_run {
            info!(rule = %rule.name, deal_id = deal.id, %step, subject = %outgoing.subject, "dry run: follow-up rendered, not sent");
            self.count(&rule.name, "dry_run");
            return self
                .store
                .mark_dry_run(row.id, message_id, Utc::now())
                .await;
        }
        // The per-message return path (VERP) ties a later bounce to this row.
        let return_path = self
            .config
            .deliverability
            .return_path
            .as_ref()
            .and_then(|base| return_path(base.as_str(), row.id, &row.recipient));
        let sent = self
            .mailer
            .send_from(message, &key, return_path.as_deref())
            .await;
        self.note_delivery(&sent, &rule.name);
        match sent {
            Ok(()) => {
                // A connection that writes back gets the email recorded on the deal in
                // its CRM: queued with the sent mark, carried out by `writeback`.
                let writeback = self
                    .config
                    .connections
                    .iter()
                    .any(|c| c.name == deal.connection && c.writeback.is_some())
                    .then(|| outgoing.subject.clone());
                // The status follows the stage: a won deal moved to post-sale stays won.
                let move_to = rule
                    .steps
                    .get(step.index())
                    .and_then(|s| s.move_to.clone())
                    .map(|to| {
                        let status = self.config.pipelines.status_of(&to);
                        (to, status)
                    });
                record("a sent follow-up", || {
                    self.store.mark_sent(
                        row.id,
                        message_id.clone(),
                        Utc::now(),
                        move_to.clone(),
                        rule.active.clone(),
                        writeback.clone(),
                    )
                })
                .await?;
                info!(rule = %rule.name, deal_id = deal.id, %step, "follow-up sent");
                self.count(&rule.name, "sent");
                Ok(())
            }
            Err(MailError::Transient(reason))
                if (row.attempts as u32) < self.config.email.max_attempts =>
            {
                let email = &self.config.email;
                let delay = email_backoff(email).delay(row.attempts as u32);
                let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                warn!(rule = %rule.name, deal_id = deal.id, attempt = row.attempts, retry_in_ms = delay.as_millis() as u64, %reason, "follow-up delivery failed, retrying");
                self.count(&rule.name, "retried");
                record("a follow-up retry", || {
                    self.store
                        .mark_retry(row.id, at, format!("retrying: {reason}"), Utc::now())
                })
                .await
            }
            Err(MailError::Unknown(reason)) => {
                warn!(rule = %rule.name, deal_id = deal.id, %reason, "follow-up outcome unknown; marked uncertain, not resent");
                self.count(&rule.name, "uncertain");
                record("an uncertain follow-up", || {
                    self.store
                        .mark_uncertain(row.id, unknown_outcome_reason(&reason), Utc::now())
                })
                .await
            }
            Err(MailError::Permanent {
                reason,
                hard_bounce,
            }) => {
                warn!(rule = %rule.name, deal_id = deal.id, hard_bounce, %reason, "follow-up refused by the server");
                self.count(&rule.name, "failed");
                let suppress = hard_bounce.then(|| row.recipient.clone());
                record("a refused follow-up", || {
                    self.store
                        .mark_failed(row.id, reason.clone(), suppress.clone(), Utc::now())
                })
                .await
            }
            Err(error) => {
                let reason = format!("gave up after {} attempts: {error}", row.attempts);
                warn!(rule = %rule.name, deal_id = deal.id, %reason, "follow-up failed");
                record("a failed follow-up", || {
                    self.store
                        .mark_failed(row.id, reason.clone(), None, Utc::now())
                })
                .await
            }
        }
    }
}

/// Renders the email of a row.
pub fn compose(
    config: &Config,
    templates: &Templates,
    mailer: &Mailer,
    rule: &Rule,
    row: &OutboxRow,
    deal: &Deal,
) -> Result<Outgoing, FollowupError> {
    let step = row.step;
    let template = &rule
        .steps
        .get(step.index())
        .ok_or_else(|| FollowupError::NoSuchStep {
            rule: rule.name.clone(),
            step,
        })?
        .template;
    let to = crate::domain::EmailAddress::parse(&row.recipient).ok_or_else(|| {
        FollowupError::NoRecipient {
            rule: rule.name.clone(),
        }
    })?;
    let unsubscribe = match rule.kind {
        RuleKind::Marketing => {
            let secret = config.email.unsubscribe_secret.as_ref().ok_or_else(|| {
                FollowupError::Unsubscribe("email.unsubscribe_secret is not set".into())
            })?;
            let base =
                config.server.public_url.as_ref().ok_or_else(|| {
                    FollowupError::Unsubscribe("server.public_url is not set".into())
                })?;
            let token = unsubscribe::sign(secret.expose(), &to);
            let url = base
                .join(&format!("unsubscribe/{token}"))
                .map_err(|error| FollowupError::Unsubscribe(error.to_string()))?;
            let mailto = config
                .email
                .unsubscribe_mailto
                .clone()
                .unwrap_or_else(|| mailer.from_address());
            Some((url.to_string(), mailto))
        }
        RuleKind::Transactional => None,
    };
    let sender = sender_name(config);
    let context = EmailContext::new(
        deal,
        rule,
        step,
        unsubscribe.as_ref().map(|(url, _)| url.clone()),
        sender,
        Utc::now(),
    )
    .with_stage_label(&config.pipelines);
    let rendered = templates.render(template, &context)?;
    let to_name = match rule.to {
        Recipient::Contact => deal.contact_name.clone(),
        Recipient::Owner => deal.owner.clone(),
        Recipient::Fixed(_) => None,
    };
    // A transactional note to the contact is the owner's (the shipped post-sale
    // note is signed by the owner): a reply goes to the owner, not to `email.from`.
    let reply_to = match (rule.kind, &rule.to, &deal.owner_email) {
        (RuleKind::Transactional, Recipient::Contact, Some(owner)) => {
            Some((deal.owner.clone(), owner.clone()))
        }
        _ => None,
    };
    Ok(Outgoing {
        to,
        to_name,
        subject: rendered.subject,
        text: rendered.text,
        html: rendered.html,
        idempotency_key: idempotency_key(row),
        unsubscribe,
        reply_to,
        outbox_id: Some(row.id),
    })
}

/// `<deal>-<rule>-<step>` (the step counted from 1): names an outbox row everywhere
/// (`.eml` file, Message-ID, `X-Dealsync-Idempotency-Key`), stable across restarts.
pub fn idempotency_key(row: &OutboxRow) -> String {
    format!("{}-{}-{}", row.deal_id, row.rule, row.step)
}

/// The facts the send-time decision of `rule` needs from the store.
pub fn claim_query(rule: &Rule, email: &EmailConfig) -> ClaimQuery {
    ClaimQuery {
        order_pipeline: if rule.stop_on_purchase {
            rule.trigger.pipeline.clone()
        } else {
            None
        },
        cap_window: email.max_per_recipient_per_day.map(|_| CAP_WINDOW),
        skip_if_open_in: rule.skip_if_open_in.clone(),
    }
}

/// The send-time policy of `rule` at `now`: what the worker decides a due row with.
pub fn send_policy<'a>(rule: &'a Rule, email: &'a EmailConfig, now: DateTime<Utc>) -> Policy<'a> {
    Policy {
        rule,
        now,
        late_grace: rule.late_grace.unwrap_or(email.late_grace),
        cap: email.max_per_recipient_per_day,
        quiet: email.quiet_hours.map(|q| (q, email.time_zone)),
        recipient_zone_fields: &email.recipient_time_zone,
    }
}
