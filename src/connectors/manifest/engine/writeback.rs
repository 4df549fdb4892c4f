//! Write-back: records a sent follow-up on its deal through the manifest's
//! `[writeback]` requests.
//!
//! Invariants:
//! - Each request is sent once per attempt: the client's own retries are off
//!   (`max_attempts = 1`), since a create's timeout or 5xx may come after the vendor
//!   stored the note. The caller retries the whole attempt later, with backoff.
//! - An attempt that follows one whose outcome is unknown ([`WritebackJob::may_exist`])
//!   first runs the lookup and creates nothing when a record carrying the key exists; a
//!   manifest without a lookup declares its create idempotent (an upsert by key).
//! - Requests go through `vendor_http` like every read: the connection's rate limit,
//!   its share of the vendor's budget, and its credentials (one refresh on a 401).

use super::ManifestConnector;
use crate::connectors::manifest::auth::Authn;
use crate::connectors::manifest::fields::{lookup, text_of};
use crate::connectors::manifest::schema::{WriteMethod, WritebackRequest};
use crate::connectors::manifest::writeback::{
    body_json, render_json, render_path, render_text, variables,
};
use crate::connectors::vendor_http::{VendorRequest, VendorResponse};
use crate::connectors::{ConnectorError, SyncContext, WritebackError};
use crate::store::WritebackJob;
use serde_json::Value;

/// The start of an answer's body, for a reason a person reads.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(300).collect()
}

impl ManifestConnector {
    /// Whether the manifest declares `[writeback]`.
    pub(super) fn declares_writeback(&self) -> bool {
        self.manifest.writeback.is_some()
    }

    /// Records `job` on its deal; the vendor's id of the record when it said one.
    pub(super) async fn write_back_job(
        &self,
        cx: &SyncContext,
        job: &WritebackJob,
    ) -> Result<Option<String>, WritebackError> {
        let Some(writeback) = &self.manifest.writeback else {
            return Err(WritebackError::Refused {
                reason: format!(
                    "the {} manifest declares no [writeback]",
                    self.manifest.name
                ),
            });
        };
        let vars = variables(job);
        if job.may_exist()
            && let Some(request) = &writeback.lookup
        {
            let response = self.send_writeback(cx, request, &vars).await?;
            let body = self.json_of("lookup", &response)?;
            if let Some(found) = find_marked(request, &body, &job.key) {
                tracing::info!(connection = %cx.connection, deal_id = job.deal_id, key = %job.key,
                    "the write-back of an earlier attempt is in the CRM already; not writing it again");
                return Ok(found);
            }
        }
        let response = self.send_writeback(cx, &writeback.create, &vars).await?;
        let body = self.json_of("create", &response)?;
        Ok(writeback
            .create
            .id
            .as_deref()
            .and_then(|pointer| lookup(&body, pointer))
            .and_then(text_of))
    }

    /// The JSON of a 2xx answer; any other status is a failure, retried or not by kind.
    fn json_of(&self, what: &str, response: &VendorResponse) -> Result<Value, WritebackError> {
        let status = response.status;
        if (200..300).contains(&status) {
            if response.body.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&response.body).map_err(|error| WritebackError::Retry {
                reason: format!("the {what} answer is not JSON: {error}"),
                after: None,
            });
        }
        let reason = format!(
            "{} {what} answered {status}: {}",
            self.manifest.name,
            excerpt(&response.body)
        );
        // 408 and 409 (a conflict the vendor may resolve) pass; the rest of 4xx is a
        // request the vendor refuses as written: sending it again changes nothing.
        if matches!(status, 408 | 409 | 425 | 429) || status >= 500 {
            Err(WritebackError::Retry {
                reason,
                after: None,
            })
        } else {
            Err(WritebackError::Refused { reason })
        }
    }

    async fn send_writeback(
        &self,
        cx: &SyncContext,
        request: &WritebackRequest,
        vars: &minijinja::Value,
    ) -> Result<VendorResponse, WritebackError> {
        // Once per attempt, the caller retries with backoff: a create that timed out
        // may have been stored, and a lookup that failed says nothing either way (the
        // next attempt looks again before it writes).
        let mut cx = cx.clone();
        cx.max_attempts = Some(1);
        let refused = |reason: String| WritebackError::Refused { reason };
        let path = render_path(&request.path, vars).map_err(refused)?;
        let mut query = Vec::with_capacity(request.query.len());
        for (name, value) in &request.query {
            query.push((name.clone(), render_text(value, vars).map_err(refused)?));
        }
        let json = match body_json(request) {
            Some(body) => Some(render_json(&body, vars).map_err(refused)?),
            None => None,
        };
        let build = |authn: &Authn| -> Result<VendorRequest, ConnectorError> {
            let base = self.base(authn)?;
            let text = format!("{}{path}", base.as_str().trim_end_matches('/'));
            let mut url = url::Url::parse(&text)
                .map_err(|e| self.bad(format!("write-back URL {path:?}: {e}")))?;
            {
                let mut pairs = url.query_pairs_mut();
                for (name, value) in &query {
                    pairs.append_pair(name, value);
                }
                if let Some((name, value)) = &authn.query {
                    pairs.append_pair(name, value);
                }
            }
            if url.query() == Some("") {
                url.set_query(None);
            }
            let mut headers = Vec::new();
            if let Some((name, value)) = &authn.header {
                headers.push((name.clone(), value.clone()));
            }
            headers.push(("accept".into(), "application/json".into()));
            Ok(VendorRequest {
                method: match request.method {
                    WriteMethod::Get => reqwest::Method::GET,
                    WriteMethod::Post => reqwest::Method::POST,
                    WriteMethod::Patch => reqwest::Method::PATCH,
                    WriteMethod::Put => reqwest::Method::PUT,
                },
                url,
                headers,
                json: json.clone(),
                endpoint_limit: None,
            })
        };
        self.send_authenticated(&cx, build)
            .await
            .map_err(WritebackError::from)
    }
}

/// The id of the first record of a lookup answer whose marker text carries `key`:
/// `Some(id)` (the id `None` when the record has none at `id`), `None` when no record does.
fn find_marked(request: &WritebackRequest, body: &Value, key: &str) -> Option<Option<String>> {
    let records = request
        .records
        .as_deref()
        .and_then(|pointer| lookup(body, pointer))?
        .as_array()?;
    let marker = request.marker.as_deref()?;
    records
        .iter()
        .find(|record| {
            lookup(record, marker)
                .and_then(Value::as_str)
                .is_some_and(|text| carries(text, key))
        })
        .map(|record| {
            request
                .id
                .as_deref()
                .and_then(|pointer| lookup(record, pointer))
                .and_then(text_of)
        })
}

/// Whether `text` holds `key` as a whole word: `dealsync_outbox_1` is not in a note
/// that carries `dealsync_outbox_12`.
fn carries(text: &str, key: &str) -> bool {
    text.match_indices(key).any(|(at, _)| {
        text.get(at + key.len()..)
            .and_then(|rest| rest.chars().next())
            .is_none_or(|next| !(next.is_alphanumeric() || next == '_'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_lookup_finds_only_the_record_whose_marker_carries_the_whole_key() {
        let request: WritebackRequest = toml::from_str(
            "path = \"/v1/notes\"\nrecords = \"/data\"\nmarker = \"/content\"\nid = \"/id\"\n",
        )
        .unwrap();
        let body = json!({"data": [
            {"id": 1, "content": "other note"},
            {"id": 2, "content": "<p>Sent. ref=dealsync_outbox_12</p>"},
        ]});
        assert_eq!(
            find_marked(&request, &body, "dealsync_outbox_12"),
            Some(Some("2".into()))
        );
        assert_eq!(find_marked(&request, &body, "dealsync_outbox_13"), None);
        assert_eq!(
            find_marked(&request, &body, "dealsync_outbox_1"),
            None,
            "a key is not found inside a longer one"
        );
        assert_eq!(find_marked(&request, &json!({"data": null}), "k"), None);
    }
}
