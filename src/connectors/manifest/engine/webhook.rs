//! Webhooks of manifest connectors: the signature scheme, turning a delivery into
//! actions, and reading one record on its own (a webhook's refetch).
//!
//! Invariants:
//! - A body that is not JSON or holds no events is a [`BadRecord`]; events of kinds
//!   the manifest does not name are ignored.
//! - One delivery refetches each id once.
//! - A record id goes into a request only when it is made of the characters vendors
//!   use in ids (letters, digits, `-`, `_`); a 404 reads as "no such record".

use super::ManifestConnector;
use super::paging::{CallError, split_records};
use crate::connectors::manifest::fields::{lookup, text_of};
use crate::connectors::manifest::schema::EventAction;
use crate::connectors::manifest::template::Vars;
use crate::connectors::{BadRecord, ConnectorError, SyncContext, WebhookAction, WebhookEvent};
use crate::domain::{RawRecord, SourceDeal};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};

impl ManifestConnector {
    /// [`Connector::webhook_scheme`](crate::connectors::Connector::webhook_scheme).
    pub(super) fn scheme(&self) -> Option<crate::connectors::signature::Scheme> {
        Some(self.manifest.webhooks.as_ref()?.scheme.scheme())
    }

    /// [`Connector::parse_webhook`](crate::connectors::Connector::parse_webhook).
    pub(super) fn webhook_actions(
        &self,
        event: &WebhookEvent,
    ) -> Result<Vec<WebhookAction>, BadRecord> {
        let bad = |reason: String, raw: Value| BadRecord {
            external_id: None,
            reason,
            raw: RawRecord::from_value(&raw),
        };
        let Some(spec) = &self.manifest.webhooks else {
            return Ok(Vec::new());
        };
        let body: Value = serde_json::from_slice(&event.body).map_err(|e| {
            bad(
                format!("webhook body is not JSON: {e}"),
                Value::String(String::from_utf8_lossy(&event.body).into_owned()),
            )
        })?;
        let events: Vec<&Value> = match lookup(&body, &spec.events) {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(single @ Value::Object(_)) => vec![single],
            _ => return Err(bad("webhook body holds no events".into(), body.clone())),
        };
        let mut actions = Vec::new();
        let mut refetch_seen = HashSet::new();
        for item in events {
            let kind: Vec<String> = spec
                .kind
                .iter()
                .filter_map(|p| lookup(item, p).and_then(text_of))
                .collect();
            let kind = kind.join(".");
            let Some(action) = spec.actions.get(&kind) else {
                continue;
            };
            let id = lookup(item, &spec.id).and_then(text_of);
            match action {
                EventAction::Refetch => {
                    let id = id.ok_or_else(|| {
                        bad(
                            format!("{kind} event has no id at {}", spec.id),
                            item.clone(),
                        )
                    })?;
                    if refetch_seen.insert(id.clone()) {
                        actions.push(WebhookAction::Refetch { external_id: id });
                    }
                }
                EventAction::Delete => {
                    let id = id.ok_or_else(|| {
                        bad(
                            format!("{kind} event has no id at {}", spec.id),
                            item.clone(),
                        )
                    })?;
                    actions.push(WebhookAction::Delete { external_id: id });
                }
                EventAction::Upsert => {
                    let record = spec
                        .record
                        .as_deref()
                        .and_then(|p| lookup(item, p))
                        .filter(|v| v.is_object())
                        .ok_or_else(|| {
                            bad(format!("{kind} event carries no record"), item.clone())
                        })?;
                    let deal = self.to_deal(record, &HashMap::new(), false)?;
                    actions.push(WebhookAction::Upsert(Box::new(deal)));
                }
                EventAction::Ignore => {}
            }
        }
        Ok(actions)
    }

    /// [`Connector::fetch_one`](crate::connectors::Connector::fetch_one).
    pub(super) async fn read_one(
        &self,
        cx: &SyncContext,
        external_id: &str,
    ) -> Result<Option<SourceDeal>, ConnectorError> {
        let Some(request) = &self.manifest.deals.one else {
            return Err(self.bad(format!(
                "no [deals.one] request to read record {external_id} on its own"
            )));
        };
        // The id goes into a path or a query (Salesforce: inside a SOQL literal): only
        // the characters vendors use in ids are let through.
        if external_id.is_empty()
            || !external_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.bad(format!(
                "{external_id:?} is not a record id this connector can look up"
            )));
        }
        let mut vars = Vars::default();
        vars.set("id", json!(external_id))
            .set("page_size", json!(1));
        // Read like a list page, so the stored text is the vendor's here too; a
        // single-record endpoint that wraps its record (Pipedrive's `{"data": {…}}`)
        // has the object itself at the pointer.
        let split = |bytes: &[u8]| -> Result<Option<Vec<RawRecord>>, serde_json::Error> {
            if let Some(page) = split_records(bytes, &request.records)? {
                return Ok(Some(page.records));
            }
            let body: Value = serde_json::from_slice(bytes)?;
            Ok(lookup(&body, &request.records)
                .filter(|record| record.is_object())
                .map(|record| vec![RawRecord::from_value(record)]))
        };
        let records = match self
            .call_with(cx, request, &Value::Null, &vars, split)
            .await
        {
            Ok((Some(records), _)) => records,
            Ok((None, _)) => {
                return Err(self.bad(format!(
                    "{}: {:?} is not a record or an array of records",
                    request.path, request.records
                )));
            }
            Err(CallError::Status(404, _)) => return Ok(None),
            Err(error) => return Err(error.into_connector(&self.manifest.name, &request.path)),
        };
        let Some(raw) = records.into_iter().next() else {
            return Ok(None);
        };
        let record = self
            .plan
            .prune(raw.as_str())
            .map_err(|error| self.bad(format!("record {external_id}: {error}")))?;
        // A record read on its own (a webhook's refetch) reads its enrichments fresh.
        let enriched = self.enrich(cx, "one", &[&record], None).await?;
        let read = self.read_record(raw, Ok(record), false, true);
        self.finish_record(read, &enriched[0], false)
            .map(Some)
            .map_err(|bad| self.bad(format!("record {}: {}", external_id, bad.reason)))
    }
}
