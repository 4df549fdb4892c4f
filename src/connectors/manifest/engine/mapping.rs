//! Field mapping: a source record (and its enrichments) becomes a [`SourceDeal`],
//! with the fingerprint that tells an unchanged record from a changed one.
//!
//! Invariants:
//! - Mapping is pure: the same record, enrichments and manifest give the same deal.
//! - A record maps from its pruned parse (the [`Plan`] of what the mapping reads)
//!   exactly as from the whole record.
//! - A record that does not map is a [`BadRecord`] carrying its raw text (quarantined;
//!   the page goes on).
//! - A fingerprint covers the mapping without enrichments and the ids the record gives
//!   the enrichments that look ids up from the record alone.

use super::ManifestConnector;
use crate::connectors::manifest::fields::{self, Scope, lookup, text_of};
use crate::connectors::manifest::records::Plan;
use crate::connectors::manifest::schema::{FieldSpec, FieldType, Manifest};
use crate::connectors::{BadRecord, SyncContext};
use crate::domain::{Currency, DealStatus, EmailAddress, Money, RawRecord, SourceDeal};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use tracing::warn;

/// The JSON pointers into a record that mapping a page's records reads: every field,
/// the modification time, and the ids enrichments look up. Every field of [`Fields`]
/// is named (no `..`), so a new field cannot be left out of the plan.
///
/// [`Fields`]: crate::connectors::manifest::schema::Fields
pub(super) fn record_plan(manifest: &Manifest) -> Plan {
    let crate::connectors::manifest::schema::Fields {
        external_id,
        title,
        amount,
        currency,
        native_pipeline,
        native_stage,
        contact_email,
        contact_name,
        company_domain,
        owner,
        owner_email,
        created_at,
        updated_at,
        stage_changed_at,
        expected_close,
        deleted,
        status,
        marketing_consent,
    } = &manifest.deals.fields;
    let specs = [
        Some(external_id),
        Some(native_stage),
        Some(&manifest.deals.modified),
    ]
    .into_iter()
    .chain(
        [
            title,
            amount,
            currency,
            native_pipeline,
            contact_email,
            contact_name,
            company_domain,
            owner,
            owner_email,
            created_at,
            updated_at,
            stage_changed_at,
            expected_close,
            deleted,
            status,
            marketing_consent,
        ]
        .into_iter()
        .map(Option::as_ref),
    )
    .flatten();
    let mut pointers: Vec<&str> = Vec::new();
    for spec in specs {
        match spec {
            FieldSpec::Path(path) => pointers.push(path),
            FieldSpec::Full(table) => {
                pointers.extend(table.path.as_deref());
                pointers.extend(table.paths.iter().map(String::as_str));
            }
        }
    }
    for step in &manifest.deals.enrich {
        pointers.extend(step.ids.iter().map(String::as_str));
    }
    // Enrichment paths (`@name/…`) are not in the record; `Plan` leaves them out.
    Plan::new(pointers)
}

pub(super) fn bool_at(record: &Value, pointer: &Option<String>) -> Option<bool> {
    pointer
        .as_deref()
        .and_then(|p| lookup(record, p))
        .and_then(|v| {
            v.as_bool()
                .or_else(|| text_of(v).and_then(|t| fields::parse_bool(&t)))
        })
}

pub(super) fn number_at(record: &Value, pointer: &Option<String>) -> Option<f64> {
    pointer
        .as_deref()
        .and_then(|p| lookup(record, p))
        .and_then(|v| v.as_f64().or_else(|| text_of(v)?.trim().parse().ok()))
}

/// One record of a list page on its way to a deal.
pub(super) struct ReadRecord {
    /// The record's text as the vendor sent it.
    raw: RawRecord,
    /// Its parse, pruned to the plan.
    pub(super) record: Result<Value, serde_json::Error>,
    /// Its mapping without enrichments (`None` when it cannot be parsed).
    base: Option<Result<SourceDeal, BadRecord>>,
    fingerprint: Option<i64>,
}

impl ReadRecord {
    /// (external id, fingerprint), when the record maps without its enrichments.
    pub(super) fn key(&self) -> Option<(String, i64)> {
        match (&self.base, self.fingerprint) {
            (Some(Ok(deal)), Some(fingerprint)) => {
                Some((deal.external_id.as_str().to_owned(), fingerprint))
            }
            _ => None,
        }
    }
}

impl ManifestConnector {
    /// Maps one source record to a deal, or explains why it cannot.
    pub fn to_deal(
        &self,
        record: &Value,
        enriched: &HashMap<String, Value>,
        force_deleted: bool,
    ) -> Result<SourceDeal, BadRecord> {
        let raw = || RawRecord::from_value(record);
        let mut deal = self
            .map_fields(record, enriched, force_deleted)
            .map_err(|bad| bad.with_raw(raw()))?;
        deal.raw = raw();
        Ok(deal)
    }

    /// The canonical fields of a record (`raw` left empty; the caller sets it, on a
    /// [`BadRecord`] too).
    pub(crate) fn map_fields(
        &self,
        record: &Value,
        enriched: &HashMap<String, Value>,
        force_deleted: bool,
    ) -> Result<SourceDeal, BadRecord> {
        let spec = &self.manifest.deals.fields;
        let scope = Scope::new(record, enriched);
        let external_id = fields::string(&spec.external_id, &scope).ok().flatten();
        let bad = |reason: String| BadRecord {
            external_id: external_id.clone(),
            reason,
            raw: RawRecord::null(),
        };
        if !record.is_object() {
            return Err(bad("the record is not a JSON object".into()));
        }
        let Some(id) = external_id.clone() else {
            return Err(bad("the record has no id".into()));
        };
        let text = |field: &Option<FieldSpec>| -> Result<Option<String>, BadRecord> {
            field
                .as_ref()
                .map(|f| fields::string(f, &scope))
                .transpose()
                .map(Option::flatten)
                .map_err(bad)
        };
        let time = |field: &Option<FieldSpec>| -> Result<Option<DateTime<Utc>>, BadRecord> {
            field
                .as_ref()
                .map(|f| fields::timestamp(f, &scope))
                .transpose()
                .map(Option::flatten)
                .map_err(bad)
        };
        let mut deal = SourceDeal::new(
            id,
            text(&spec.title)?.unwrap_or_default(),
            text(&spec.native_pipeline)?.unwrap_or_default(),
            fields::string(&spec.native_stage, &scope)
                .map_err(bad)?
                .unwrap_or_default(),
        );
        let currency = match text(&spec.currency)? {
            Some(code) => Currency::parse(&code).map_err(|e| bad(e.to_string()))?,
            None => self.default_currency,
        };
        if let Some(amount) = text(&spec.amount)? {
            let minor_units = matches!(
                &spec.amount,
                Some(FieldSpec::Full(table)) if table.kind == FieldType::MinorUnits
            );
            deal.amount = Some(if minor_units {
                fields::parse_minor_units(&amount)
                    .map(|minor| Money::new(minor, currency))
                    .ok_or_else(|| {
                        bad(format!(
                            "amount: {amount:?} is not a whole number of minor units"
                        ))
                    })?
            } else {
                Money::parse_decimal(&amount, currency).map_err(|e| bad(format!("amount: {e}")))?
            });
        }
        deal.contact_email = text(&spec.contact_email)?.and_then(|e| EmailAddress::parse(&e));
        deal.contact_name = text(&spec.contact_name)?;
        deal.company_domain = text(&spec.company_domain)?;
        deal.owner = text(&spec.owner)?;
        deal.owner_email = text(&spec.owner_email)?.and_then(|e| EmailAddress::parse(&e));
        deal.created_at = time(&spec.created_at)?;
        deal.updated_at =
            time(&spec.updated_at)?.or(fields::timestamp(&self.manifest.deals.modified, &scope)
                .ok()
                .flatten());
        deal.stage_changed_at = time(&spec.stage_changed_at)?;
        deal.expected_close = spec
            .expected_close
            .as_ref()
            .map(|f| fields::date(f, &scope))
            .transpose()
            .map(Option::flatten)
            .map_err(bad)?;
        let deleted = spec
            .deleted
            .as_ref()
            .map(|f| fields::boolean(f, &scope))
            .transpose()
            .map(Option::flatten)
            .map_err(bad)?
            .unwrap_or(false);
        deal.source_status = text(&spec.status)?.and_then(|s| DealStatus::parse(&s));
        deal.marketing_consent = spec
            .marketing_consent
            .as_ref()
            .and_then(|f| fields::consent(f, &scope));
        deal.deleted = force_deleted || deleted || deal.source_status == Some(DealStatus::Deleted);
        Ok(deal)
    }

    /// A record read from a list page: `record` is its parse (pruned to the plan),
    /// `raw` its text as the vendor sent it. With `fingerprint`, maps it without
    /// enrichments first, for its fingerprint, and for the deal itself when it turns
    /// out to have none.
    pub(super) fn read_record(
        &self,
        raw: RawRecord,
        record: Result<Value, serde_json::Error>,
        force_deleted: bool,
        fingerprint: bool,
    ) -> ReadRecord {
        let base = record
            .as_ref()
            .ok()
            .filter(|_| fingerprint)
            .map(|record| self.map_fields(record, &HashMap::new(), force_deleted));
        let fingerprint = match (&base, &record) {
            (Some(Ok(deal)), Ok(record)) => Some(self.fingerprint(deal, record)),
            _ => None,
        };
        ReadRecord {
            raw,
            record,
            base,
            fingerprint,
        }
    }

    /// The deal for a read record and its enrichments, or why there is none.
    pub(super) fn finish_record(
        &self,
        read: ReadRecord,
        enriched: &HashMap<String, Value>,
        force_deleted: bool,
    ) -> Result<SourceDeal, BadRecord> {
        let ReadRecord {
            raw,
            record,
            base,
            fingerprint,
        } = read;
        let mapped = match (record, base) {
            (Err(error), _) => {
                return Err(BadRecord {
                    external_id: None,
                    reason: format!("the record cannot be read: {error}"),
                    raw,
                });
            }
            (Ok(_), Some(base)) if enriched.is_empty() => base,
            (Ok(record), _) => self.map_fields(&record, enriched, force_deleted),
        };
        match mapped {
            Ok(mut deal) => {
                deal.raw = raw;
                deal.fingerprint = fingerprint;
                Ok(deal)
            }
            Err(bad) => Err(bad.with_raw(raw)),
        }
    }

    /// The [`fingerprint`](crate::domain::hashing::fingerprint) of a record: `deal` is
    /// its mapping without enrichments; the keys are the ids it gives the enrichments
    /// that look up ids from the record alone (one reached through another
    /// enrichment, like HubSpot's contact through the association read, depends on the
    /// vendor's state, which moves the record's modification time when it changes).
    fn fingerprint(&self, deal: &SourceDeal, record: &Value) -> i64 {
        let no_enrichment = HashMap::new();
        let scope = Scope::new(record, &no_enrichment);
        let keys: Vec<Option<String>> = self
            .record_keys
            .iter()
            .map(|paths| {
                paths
                    .iter()
                    .find_map(|path| scope.get(path).and_then(text_of))
            })
            .collect();
        let keys: Vec<Option<&str>> = keys.iter().map(Option::as_deref).collect();
        crate::domain::hashing::fingerprint(deal, &keys)
    }

    /// Which of `reads` the store holds unchanged (see
    /// [`UnchangedRecords`](crate::connectors::handles::UnchangedRecords)), as (external
    /// id, fingerprint). A store that cannot answer costs only requests.
    pub(super) async fn unchanged(
        &self,
        cx: &SyncContext,
        reads: &[ReadRecord],
    ) -> HashSet<(String, i64)> {
        let Some(handles) = &cx.handles else {
            return HashSet::new();
        };
        let candidates: Vec<(String, i64)> = reads.iter().filter_map(ReadRecord::key).collect();
        if candidates.is_empty() {
            return HashSet::new();
        }
        match handles
            .unchanged
            .unchanged(cx.connection.as_str(), candidates)
            .await
        {
            Ok(unchanged) => unchanged,
            Err(error) => {
                warn!(connection = %cx.connection, %error, "reading stored fingerprints failed; reading every record in full");
                HashSet::new()
            }
        }
    }

    pub(crate) fn modified_of(
        &self,
        record: &Value,
        enriched: &HashMap<String, Value>,
    ) -> Option<DateTime<Utc>> {
        fields::timestamp(&self.manifest.deals.modified, &Scope::new(record, enriched))
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::manifest::records::split_page;
    use serde_json::json;

    /// The connector of a connection to `connector` with static credentials.
    fn connector(connector: &str, credentials: &str) -> ManifestConnector {
        let text = format!("[connections.c]\nconnector = \"{connector}\"\n{credentials}\n");
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            &text,
            &crate::config::interpolate::ProcessEnv,
        )
        .unwrap();
        let catalog = crate::connectors::manifest::Catalog::load(None).unwrap();
        ManifestConnector::new(catalog.get(connector).unwrap(), &config.connections[0]).unwrap()
    }

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn every_built_in_manifest_maps_the_pruned_record_exactly_like_the_whole_record() {
        let salesforce = "[connections.c.oauth]\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_token = \"z\"";
        for (kind, credentials, pages) in [
            (
                "hubspot",
                "token = \"t\"",
                &[
                    "hubspot/deals-list-page.json",
                    "hubspot/deals-list-last-page.json",
                    "hubspot/deals-search-response.json",
                ][..],
            ),
            (
                "pipedrive",
                "token = \"t\"",
                &[
                    "pipedrive/deals-v2-page.json",
                    "pipedrive/deals-v2-last-page.json",
                ][..],
            ),
            (
                "salesforce",
                salesforce,
                &[
                    "salesforce/query-opportunities-page1.json",
                    "salesforce/query-opportunities-page2.json",
                ][..],
            ),
        ] {
            let connector = connector(kind, credentials);
            let records = &connector.manifest.deals.full.records;
            let mut mapped = 0;
            for page in pages {
                let split = split_page(&fixture(page), records).unwrap();
                assert!(!split.records.is_empty(), "{page}");
                let body: Value = serde_json::from_slice(&fixture(page)).unwrap();
                let whole = lookup(&body, records).and_then(Value::as_array).unwrap();
                assert_eq!(whole.len(), split.records.len(), "{page}");
                for (raw, whole) in split.records.iter().zip(whole) {
                    assert_eq!(&raw.to_value(), whole, "{page}: the raw text is the record");
                    let pruned = connector.plan.prune(raw.as_str()).unwrap();
                    // No enrichment: `@` fields read as absent on both sides alike.
                    let none = HashMap::new();
                    let from_pruned = connector.map_fields(&pruned, &none, false);
                    let from_whole = connector.map_fields(whole, &none, false);
                    match (from_pruned, from_whole) {
                        (Ok(a), Ok(b)) => {
                            assert_eq!(a, b, "{page}");
                            mapped += 1;
                        }
                        (Err(a), Err(b)) => assert_eq!(
                            (a.external_id, a.reason),
                            (b.external_id, b.reason),
                            "{page}"
                        ),
                        (a, b) => panic!("{page}: {a:?} against {b:?}"),
                    }
                    assert_eq!(
                        connector.modified_of(&pruned, &none),
                        connector.modified_of(whole, &none)
                    );
                    for step in &connector.manifest.deals.enrich {
                        for path in step.ids.iter().filter(|path| path.starts_with('/')) {
                            assert_eq!(lookup(&pruned, path), lookup(whole, path), "{page} {path}");
                        }
                    }
                }
            }
            assert!(mapped > 0, "{kind}: no record mapped");
        }
    }

    fn json_fixture(path: &str) -> Value {
        let mut value: Value = serde_json::from_slice(&fixture(path)).unwrap();
        if let Some(object) = value.as_object_mut() {
            object.retain(|key, _| !key.starts_with('_'));
        }
        value
    }

    #[test]
    fn the_built_in_manifests_read_consent_from_each_vendors_own_field() {
        let consent = |connector: &ManifestConnector, record: &Value, step: &str, extra: Value| {
            let enriched = HashMap::from([(step.to_owned(), extra)]);
            connector
                .map_fields(record, &enriched, false)
                .unwrap()
                .marketing_consent
        };
        // HubSpot: the contact's "Unsubscribed from all email", a string property.
        let hubspot = connector("hubspot", "token = \"t\"");
        let page: Value = serde_json::from_slice(&fixture("hubspot/deals-list-page.json")).unwrap();
        let deal = &page["results"][0];
        let mut contact = json_fixture("hubspot/contact-optout-properties.json");
        assert_eq!(
            consent(&hubspot, deal, "contact", contact.clone()),
            Some(false)
        );
        contact["properties"]["hs_email_optout"] = json!("false");
        assert_eq!(
            consent(&hubspot, deal, "contact", contact.clone()),
            Some(true)
        );
        contact["properties"]
            .as_object_mut()
            .unwrap()
            .remove("hs_email_optout");
        assert_eq!(consent(&hubspot, deal, "contact", contact), None);

        // Pipedrive: the person's marketing_status; only `subscribed` may be mailed.
        let pipedrive = connector("pipedrive", "token = \"t\"");
        let page: Value = serde_json::from_slice(&fixture("pipedrive/deals-v2-page.json")).unwrap();
        let deal = &page["data"][0];
        let persons = json_fixture("pipedrive/persons-v2-with-marketing-status.json");
        assert_eq!(persons["data"][0]["marketing_status"], "unsubscribed");
        assert_eq!(
            consent(&pipedrive, deal, "person", persons["data"][0].clone()),
            Some(false)
        );
        assert_eq!(
            consent(&pipedrive, deal, "person", persons["data"][1].clone()),
            Some(true)
        );
        let mut unknown = persons["data"][1].clone();
        unknown["marketing_status"] = json!("bounced");
        assert_eq!(consent(&pipedrive, deal, "person", unknown), None);

        // Salesforce: the primary contact role's Contact.HasOptedOutOfEmail.
        let salesforce = connector(
            "salesforce",
            "[connections.c.oauth]\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_token = \"z\"",
        );
        let page = json_fixture("salesforce/query-opportunity-contact-roles.json");
        let mut opportunity = page["records"][0].clone();
        assert_eq!(
            consent(&salesforce, &opportunity, "none", Value::Null),
            Some(true)
        );
        opportunity["OpportunityContactRoles"]["records"][0]["Contact"]["HasOptedOutOfEmail"] =
            json!(true);
        assert_eq!(
            consent(&salesforce, &opportunity, "none", Value::Null),
            Some(false)
        );
    }
}
