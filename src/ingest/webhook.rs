//! Webhook deliveries become deal changes: a delivery is parsed by its connection's
//! connector and each action it names is planned against the connection's stage map.
//!
//! Carts and orders (records with cart keys) go through the cart rules, other records
//! through the plain upsert, deletions mark the deal deleted, and id-only payloads are
//! fetched through the pull connector first; all with cause `webhook`. Planning writes
//! nothing: the webhook worker commits a pass's changes in one transaction.
//!
//! Invariant: a record nested too deep (a fetched one: bodies are checked at intake)
//! is never stored.

use super::ConnectionRuntime;
use crate::connectors::{ConnectorError, SyncContext, WebhookAction, WebhookEvent};
use crate::domain::{ChangeCause, ConnectionName, SourceDeal, check_depth};
use crate::store::{DealChange, InboxRow};
use tracing::{debug, info};

/// Why a delivery could not be planned. [`PlanError::is_permanent`] says whether
/// another attempt can help.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Fetching an id-only payload's record failed: retried unless the vendor's answer
    /// was unusable.
    #[error("fetching {external_id}: {source}")]
    Fetch {
        external_id: String,
        #[source]
        source: Box<ConnectorError>,
    },
    /// The body no longer parses as the connector's payload.
    #[error("malformed payload: {reason}")]
    Malformed { reason: String },
    /// A fetched record nests too deep to store.
    #[error("record {external_id}: {source}")]
    TooDeep {
        external_id: crate::domain::ExternalId,
        #[source]
        source: crate::domain::TooDeep,
    },
}

impl PlanError {
    /// Whether no later attempt can work (the body or the fetched record is unusable);
    /// a failed fetch is worth retrying unless the vendor's answer was unusable.
    pub fn is_permanent(&self) -> bool {
        match self {
            PlanError::Fetch { source, .. } => {
                matches!(**source, ConnectorError::BadResponse { .. })
            }
            PlanError::Malformed { .. } | PlanError::TooDeep { .. } => true,
        }
    }
}

impl ConnectionRuntime {
    /// Turns one delivery, as the inbox keeps it, into the changes to write, through the
    /// connector: carts and orders go through the cart rules, other records are
    /// upserted, deletions mark the deal deleted, id-only payloads are fetched first.
    /// Writes nothing.
    pub async fn plan_webhook(
        &self,
        row: &InboxRow,
        cx: &SyncContext,
    ) -> Result<Vec<DealChange>, PlanError> {
        let event = WebhookEvent {
            connection: ConnectionName::new(row.connection.clone()),
            delivery_id: row.delivery_id.clone(),
            topic: row.topic.clone(),
            headers: row.headers.clone(),
            body: row.body.clone(),
            received_at: row.received_at,
        };
        let actions = self
            .connector
            .parse_webhook(&event)
            .map_err(|bad| PlanError::Malformed { reason: bad.reason })?;
        let mut ops = Vec::new();
        for action in actions {
            match action {
                WebhookAction::Upsert(deal) => ops.push(self.webhook_record(*deal)?),
                WebhookAction::Delete { external_id } => ops.push(self.deletion(external_id)),
                WebhookAction::Delivery(event) => ops.push(DealChange::Delivery {
                    event,
                    policy: self.delivery_policy.clone(),
                }),
                WebhookAction::ConfirmSubscription { url } => {
                    self.connector
                        .confirm_subscription(cx, &url)
                        .await
                        .map_err(|source| PlanError::Fetch {
                            external_id: "the subscription confirmation".to_owned(),
                            source: Box::new(source),
                        })?;
                    info!(connection = self.name(), "subscription confirmed");
                }
                WebhookAction::Refetch { external_id } => {
                    match self.connector.fetch_one(cx, &external_id).await {
                        Ok(Some(deal)) => ops.push(self.webhook_record(deal)?),
                        Ok(None) => ops.push(self.deletion(external_id)),
                        Err(source) => {
                            return Err(PlanError::Fetch {
                                external_id,
                                source: Box::new(source),
                            });
                        }
                    }
                }
            }
        }
        debug!(connection = self.name(), delivery_id = %event.delivery_id, ops = ops.len(), "webhook planned");
        Ok(ops)
    }

    /// A record to write: carts (records with cart keys) through the cart rules. A
    /// record nested too deep (a fetched one: bodies are checked at intake) is never
    /// stored.
    fn webhook_record(&self, deal: SourceDeal) -> Result<DealChange, PlanError> {
        if let Err(source) = check_depth(deal.raw.as_str().as_bytes()) {
            return Err(PlanError::TooDeep {
                external_id: deal.external_id,
                source,
            });
        }
        let is_cart = !deal.cart_keys.is_empty();
        let upsert = self
            .upserts(vec![deal], ChangeCause::Webhook)
            .pop()
            .expect("one record in, one upsert out");
        Ok(if is_cart {
            DealChange::Cart(upsert)
        } else {
            DealChange::Upsert(upsert)
        })
    }

    fn deletion(&self, external_id: String) -> DealChange {
        DealChange::Delete {
            connection: self.name().to_owned(),
            external_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::{BadRecord, Connector, Page};
    use crate::domain::{ConnectionName, DealStatus};
    use crate::store::{CartRules, InboxRow, NewWebhook, Store};
    use async_trait::async_trait;
    use chrono::Utc;
    use std::sync::{Arc, Mutex};
    use tokio_util::sync::CancellationToken;

    /// Applies one inbox row on its own (parse, fetch, write, mark processed).
    async fn apply_row(
        store: &Store,
        runtime: &ConnectionRuntime,
        row: &InboxRow,
        cx: &SyncContext,
    ) -> Result<(), PlanError> {
        let ops = runtime.plan_webhook(row, cx).await?;
        store
            .apply_webhook_batch(vec![(row.id, ops)], CartRules::default(), Utc::now())
            .await
            .expect("the store writes");
        Ok(())
    }

    /// A CRM-like connector whose webhooks carry only ids: `{"refetch": "7"}`,
    /// `{"delete": "7"}`; `fetch_one` answers from a map and fails while `down`.
    struct IdOnlyCrm {
        records: Mutex<Vec<SourceDeal>>,
        down: Mutex<bool>,
    }

    #[async_trait]
    impl Connector for IdOnlyCrm {
        fn kind(&self) -> &str {
            "crm-test"
        }
        fn default_pipeline(&self) -> Option<&str> {
            Some("sales")
        }
        async fn fetch_page(
            &self,
            _cx: &SyncContext,
            _cursor: Option<&serde_json::Value>,
        ) -> Result<Page, ConnectorError> {
            Err(ConnectorError::NotConfigured { what: "not used" })
        }
        fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
            let body: serde_json::Value = serde_json::from_slice(&event.body).unwrap();
            Ok(match (body.get("refetch"), body.get("delete")) {
                (Some(id), _) => vec![WebhookAction::Refetch {
                    external_id: id.as_str().unwrap().to_owned(),
                }],
                (_, Some(id)) => vec![WebhookAction::Delete {
                    external_id: id.as_str().unwrap().to_owned(),
                }],
                _ => Vec::new(),
            })
        }
        async fn fetch_one(
            &self,
            _cx: &SyncContext,
            external_id: &str,
        ) -> Result<Option<SourceDeal>, ConnectorError> {
            if *self.down.lock().unwrap() {
                return Err(ConnectorError::Transient {
                    vendor: "crm-test".into(),
                    reason: "503".into(),
                    retry_after: None,
                });
            }
            Ok(self
                .records
                .lock()
                .unwrap()
                .iter()
                .find(|d| d.external_id.as_str() == external_id)
                .cloned())
        }
    }

    async fn row(store: &Store, id: &str, body: serde_json::Value) -> InboxRow {
        store
            .enqueue_webhook(NewWebhook {
                connection: "crm".into(),
                delivery_id: id.into(),
                topic: None,
                headers: Vec::new(),
                body_sha256: None,
                body: serde_json::to_vec(&body).unwrap().into(),
                received_at: Utc::now(),
            })
            .await
            .unwrap();
        store
            .due_webhooks(Utc::now(), 100)
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.delivery_id == id)
            .unwrap()
    }

    #[tokio::test]
    async fn an_id_only_crm_webhook_is_fetched_then_stored_and_a_deletion_marks_the_deal_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[connections.crm]\nconnector = \"demo\"\n[connections.crm.stage_map.default]\nproposal = \"proposal\"\n",
            &crate::config::interpolate::ProcessEnv,
        )
        .unwrap();
        let mut deal = SourceDeal::new("7", "Big deal", "default", "proposal");
        deal.updated_at = Some(Utc::now());
        let connector = Arc::new(IdOnlyCrm {
            records: Mutex::new(vec![deal]),
            down: Mutex::new(true),
        });
        let runtime = ConnectionRuntime::new(
            config.connections[0].clone(),
            connector.clone(),
            config.pipelines.clone(),
        );
        let cx = SyncContext::new(ConnectionName::new("crm"), CancellationToken::new());

        // While the CRM is down, the refetch is a retryable failure and nothing is stored.
        let refetch = row(&store, "e-1", serde_json::json!({"refetch": "7"})).await;
        let failed = apply_row(&store, &runtime, &refetch, &cx).await;
        assert!(
            matches!(&failed, Err(error) if !error.is_permanent()),
            "{failed:?}"
        );
        assert!(
            store
                .deal_by_external_id("crm", "7")
                .await
                .unwrap()
                .is_none()
        );

        *connector.down.lock().unwrap() = false;
        apply_row(&store, &runtime, &refetch, &cx).await.unwrap();
        let stored = store
            .deal_by_external_id("crm", "7")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.stage.as_str(), "proposal");
        let history = store.history(stored.id).await.unwrap();
        assert_eq!(history[0].cause, ChangeCause::Webhook);

        let delete = row(&store, "e-2", serde_json::json!({"delete": "7"})).await;
        apply_row(&store, &runtime, &delete, &cx).await.unwrap();
        let deleted = store
            .deal_by_external_id("crm", "7")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deleted.status, DealStatus::Deleted);
        assert!(deleted.deleted_at.is_some());
    }
}
