//! Enrichments: the further reads (owners, contacts, associations) a page's records
//! need before they map, and the records they keep.
//!
//! Invariants:
//! - A page read takes the kept records of an enrichment with a `cache` duration that
//!   are still fresh from memory ([`Recent`]) or the store before it requests them;
//!   what it requests goes into the page's [`EnrichCache`] and is committed with the
//!   page.
//! - A `list` enrichment is read at most once per run; a 403 on it leaves its fields
//!   empty rather than failing the run.
//! - Reading kept records from the store is only a cost when it fails: every id is
//!   then requested from the vendor.

use super::ManifestConnector;
use super::mapping::bool_at;
use super::paging::CallError;
use crate::connectors::manifest::fields::{Scope, lookup, text_of};
use crate::connectors::manifest::schema::Enrich;
use crate::connectors::manifest::template::Vars;
use crate::connectors::{ConnectorError, SyncContext};
use crate::domain::RawRecord;
use crate::store::CachedRecord;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use tracing::warn;

/// Enrichment records kept in memory, at most this many.
const RECENT_RECORDS: usize = 4_096;

/// The enrichment records this connector requested lately, by (enrichment, id), with
/// when: the pages the sync reads ahead of the store have not committed theirs yet, so
/// the store alone would miss them and the same record would be requested again by
/// each page read before that commit. The oldest go first past [`RECENT_RECORDS`];
/// a record missing here is only requested again.
#[derive(Default)]
pub(super) struct Recent {
    records: HashMap<(String, String), (DateTime<Utc>, Value)>,
    order: std::collections::VecDeque<(String, String)>,
    /// The `list` enrichments read since the run began: read at most once per run.
    listed: HashSet<String>,
}

impl Recent {
    fn get(&self, step: &str, id: &str, fresh_since: DateTime<Utc>) -> Option<&Value> {
        // The key is built to look up; a page has at most a few hundred ids.
        self.records
            .get(&(step.to_owned(), id.to_owned()))
            .filter(|(at, _)| *at >= fresh_since)
            .map(|(_, record)| record)
    }

    fn put(&mut self, step: &str, id: &str, at: DateTime<Utc>, record: Value) {
        let key = (step.to_owned(), id.to_owned());
        if self.records.insert(key.clone(), (at, record)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > RECENT_RECORDS {
            if let Some(oldest) = self.order.pop_front() {
                self.records.remove(&oldest);
            }
        }
    }
}

/// How a page read uses the enrichments' kept records (`cache` in the manifest).
pub(super) struct EnrichCache<'a> {
    /// A full read's start: it takes only records read since. `None`: take what is
    /// younger than the enrichment's `cache` duration.
    pub(super) run_started: Option<DateTime<Utc>>,
    /// Records requested for this page, to keep; committed with the page.
    pub(super) kept: &'a mut Vec<CachedRecord>,
}

impl EnrichCache<'_> {
    /// Keeps the record `id` that `step` read, to be committed with the page.
    fn keep(&mut self, step: &str, id: &str, record: &Value) {
        self.kept.push(CachedRecord {
            step: step.to_owned(),
            id: id.to_owned(),
            record: RawRecord::from_value(record),
        });
    }
}

impl ManifestConnector {
    pub(super) fn forget_recent(&self) {
        if let Ok(mut recent) = self.recent.lock() {
            *recent = Recent::default();
        }
    }

    /// Whether the `list` enrichment `name` is still to be read in this run; from now
    /// on it is not.
    fn start_listing(&self, name: &str) -> bool {
        self.recent
            .lock()
            .map(|mut recent| recent.listed.insert(name.to_owned()))
            .unwrap_or(true)
    }

    /// Runs the enrichments for a page's records. With `cache` (a page read, whose
    /// page commits what goes in it), enrichments that keep their records take the
    /// fresh ones from the store instead of requesting them, and put what they
    /// request into `cache`.
    pub(super) async fn enrich(
        &self,
        cx: &SyncContext,
        read: &str,
        records: &[&Value],
        mut cache: Option<EnrichCache<'_>>,
    ) -> Result<Vec<HashMap<String, Value>>, ConnectorError> {
        let mut per_record: Vec<HashMap<String, Value>> = vec![HashMap::new(); records.len()];
        for step in &self.manifest.deals.enrich {
            if !step.only.is_empty() && !step.only.iter().any(|only| only == read) {
                continue;
            }
            self.enrich_step(cx, step, records, &mut per_record, cache.as_mut())
                .await?;
        }
        Ok(per_record)
    }

    /// The records of `step` kept in the store for `ids` that are still fresh.
    async fn cached(
        &self,
        cx: &SyncContext,
        step: &Enrich,
        ids: &[String],
        fresh_since: DateTime<Utc>,
    ) -> HashMap<String, Value> {
        let Some(handles) = &cx.handles else {
            return HashMap::new();
        };
        let rows = match handles
            .enrichment_cache
            .fresh(
                cx.connection.as_str(),
                &step.name,
                ids.to_vec(),
                fresh_since,
            )
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                // Only a cost: every id is requested from the vendor.
                warn!(connection = %cx.connection, enrichment = %step.name, %error, "reading kept enrichment records failed; requesting them all");
                return HashMap::new();
            }
        };
        rows.into_iter()
            .filter_map(|(id, text)| Some((id, serde_json::from_str(&text).ok()?)))
            .collect()
    }

    async fn enrich_step(
        &self,
        cx: &SyncContext,
        step: &Enrich,
        records: &[&Value],
        per_record: &mut [HashMap<String, Value>],
        mut cache: Option<&mut EnrichCache<'_>>,
    ) -> Result<(), ConnectorError> {
        let keys: Vec<Option<String>> = records
            .iter()
            .zip(per_record.iter())
            .map(|(record, enriched)| {
                let scope = Scope::new(record, enriched);
                step.ids
                    .iter()
                    .find_map(|path| scope.get(path).and_then(text_of))
            })
            .collect();
        let mut unique = Vec::new();
        let mut seen = HashSet::new();
        for key in keys.iter().flatten() {
            if seen.insert(key.as_str()) {
                unique.push(key.clone());
            }
        }
        let keep = step.cache.is_some() && cache.is_some();
        let mut found: HashMap<String, Value> = HashMap::new();
        // A `list` enrichment takes kept records in a single-record read too (a webhook's
        // refetch): reading the whole list for each one would cost far more.
        let run_started = cache.as_deref().map(|cache| cache.run_started);
        let lookup_kept = cache.is_some() || step.list;
        if let (Some(ttl), true) = (step.cache, lookup_kept) {
            // A full read takes only what this run read already, so it reads every
            // record once; other reads take what is younger than the manifest's `cache`.
            let fresh_since = match run_started.flatten() {
                Some(started) => started,
                None => Utc::now() - chrono::Duration::from_std(ttl.0).unwrap_or_default(),
            };
            // A std mutex: a short section without an await.
            if let Ok(recent) = self.recent.lock() {
                for id in &unique {
                    if let Some(record) = recent.get(&step.name, id, fresh_since) {
                        found.insert(id.clone(), record.clone());
                    }
                }
            }
            unique.retain(|id| !found.contains_key(id));
            if !unique.is_empty() {
                let stored = self.cached(cx, step, &unique, fresh_since).await;
                unique.retain(|id| !stored.contains_key(id));
                found.extend(stored);
            }
        }
        if step.list {
            if unique.is_empty() || !self.start_listing(&step.name) {
                // Everything was at hand, or the list was read in this run already: an
                // id it did not hold (a deactivated owner) is not asked for again.
                unique.clear();
            } else {
                let wanted: HashSet<&str> = unique.iter().map(String::as_str).collect();
                let now = Utc::now();
                let bodies = match self.read_pages(cx, &step.request).await {
                    Ok(bodies) => bodies,
                    // A token without the scope for this list (HubSpot's
                    // crm.objects.owners.read, Pipedrive's users:read) reads deals on
                    // without these fields rather than failing every run.
                    Err(CallError::Status(403, excerpt)) => {
                        warn!(connection = %cx.connection, enrichment = %step.name, path = %step.request.path, %excerpt,
                            "the vendor refused to list these records (403): the fields read from them stay empty; grant the token the scope to read them");
                        Vec::new()
                    }
                    Err(error) => {
                        return Err(error.into_connector(&self.manifest.name, &step.request.path));
                    }
                };
                for body in bodies {
                    for item in self.take_records(body, &step.request)? {
                        let Some(id) = lookup(&item, &step.id).and_then(text_of) else {
                            continue;
                        };
                        // Every listed record is kept, not only the ones this page
                        // needs: the next pages and runs find theirs without a request.
                        if keep && let Some(cache) = cache.as_deref_mut() {
                            cache.keep(&step.name, &id, &item);
                        }
                        if let Ok(mut recent) = self.recent.lock() {
                            recent.put(&step.name, &id, now, item.clone());
                        }
                        if wanted.contains(id.as_str()) {
                            found.insert(id, item);
                        }
                    }
                }
                unique.clear();
            }
        }
        for chunk in unique.chunks(step.batch.unwrap_or(100).max(1)) {
            let mut vars = Vars::default();
            vars.set("ids", json!(chunk.join(",")))
                .set("ids_json", json!(chunk))
                .set(
                    "ids_objects",
                    Value::Array(chunk.iter().map(|id| json!({ "id": id })).collect()),
                )
                .set("page_size", json!(chunk.len()));
            let (body, _) = self
                .call(cx, &step.request, &Value::Null, &vars)
                .await
                .map_err(|e| e.into_connector(&self.manifest.name, &step.request.path))?;
            for item in self.take_records(body, &step.request)? {
                if let Some(id) = lookup(&item, &step.id).and_then(text_of) {
                    if keep && let Some(cache) = cache.as_deref_mut() {
                        cache.keep(&step.name, &id, &item);
                        if let Ok(mut recent) = self.recent.lock() {
                            recent.put(&step.name, &id, Utc::now(), item.clone());
                        }
                    }
                    found.insert(id, item);
                }
            }
        }
        if step.active.is_some() {
            found.retain(|_, record| bool_at(record, &step.active) != Some(false));
        }
        for (slot, key) in per_record.iter_mut().zip(keys) {
            if let Some(value) = key.and_then(|key| found.get(&key)) {
                slot.insert(step.name.clone(), value.clone());
            }
        }
        Ok(())
    }
}
