//! A HubSpot CRM v3 mock: deals list (cursor paging, inline associations, archived),
//! search (GTE on hs_lastmodifieddate, ascending, 200 per page, HTTP 400 past 10,000
//! results of one query), v4 association and contact batch reads (with the
//! `hs_email_optout` property when asked for), the owners list (cursor paging, the
//! fixture's owners), deal pipelines, one deal by id, the OAuth token endpoint, and
//! notes: create (the fixture's response shape, 201) and search (CONTAINS_TOKEN on
//! `hs_note_body`).

use super::{Faults, MockServer, OAuthState, bearer, fixture, inject, serve, wire_fixture};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct HsDeal {
    pub id: u64,
    pub name: String,
    pub stage: String,
    pub pipeline: String,
    pub amount: Option<String>,
    pub modified_ms: i64,
    pub archived: bool,
    pub contact: Option<u64>,
    pub owner: Option<String>,
    /// Not yet in the search index: search results lag writes.
    pub unindexed: bool,
    /// Extra properties (the benchmark's ~60), shared between deals.
    pub extra: Arc<ExtraProperties>,
}

/// Properties many deals share, with their JSON rendered once: the list endpoint
/// splices the text into each deal instead of building and serializing a tree, so the
/// mock costs little CPU next to the client it serves.
#[derive(Debug, Default)]
pub struct ExtraProperties {
    pairs: Vec<(String, String)>,
    /// `,"key":"value"` for every pair.
    rendered: String,
}

impl ExtraProperties {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        let mut rendered = String::new();
        for (key, value) in &pairs {
            rendered.push(',');
            rendered.push_str(&Value::String(key.clone()).to_string());
            rendered.push(':');
            rendered.push_str(&Value::String(value.clone()).to_string());
        }
        ExtraProperties { pairs, rendered }
    }
}

pub struct HsState {
    pub deals: Mutex<BTreeMap<u64, HsDeal>>,
    pub contacts: Mutex<BTreeMap<u64, (String, String, String)>>,
    /// Contact id → `hs_email_optout` ("true"/"false"); absent: never set.
    pub optouts: Mutex<BTreeMap<u64, String>>,
    /// `PublicOwner` records, in list order (the fixture's to start with).
    pub owners: Mutex<Vec<Value>>,
    pub faults: Arc<Faults>,
    pub token: String,
    pub oauth: Option<OAuthState>,
    /// Results one search query may page through.
    pub search_cap: usize,
    pub search_400s: AtomicU64,
    /// Daily budget (limit, remaining) reported in headers, when set.
    pub budget: Mutex<Option<(u64, u64)>>,
    /// HubSpot's burst limit, when enforced: at most `max` requests per rolling `window`;
    /// beyond it 429 (policy TEN_SECONDLY_ROLLING).
    pub burst: Mutex<Option<Burst>>,
    pub rate_limited: AtomicU64,
    /// Every deal id an association batch read asked for, in order.
    pub association_reads: Mutex<Vec<String>>,
    /// Notes created, as stored: the request's `properties` and `associations` with
    /// the id the mock gave them.
    pub notes: Mutex<Vec<Value>>,
}

pub struct Burst {
    pub max: usize,
    pub window: std::time::Duration,
    pub recent: std::collections::VecDeque<std::time::Instant>,
}

/// Answers 429 when the rolling window is full; otherwise records the request.
fn over_burst(state: &HsState) -> Option<Response> {
    let mut slot = state.burst.lock().unwrap();
    let burst = slot.as_mut()?;
    let now = std::time::Instant::now();
    while burst
        .recent
        .front()
        .is_some_and(|at| now.duration_since(*at) >= burst.window)
    {
        burst.recent.pop_front();
    }
    if burst.recent.len() >= burst.max {
        state.rate_limited.fetch_add(1, Ordering::SeqCst);
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"status": "error", "message": "You have reached your ten_secondly_rolling limit.", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING"})),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(
            "X-HubSpot-RateLimit-Interval-Milliseconds",
            burst.window.as_millis().to_string().parse().unwrap(),
        );
        headers.insert(
            "X-HubSpot-RateLimit-Max",
            burst.max.to_string().parse().unwrap(),
        );
        headers.insert("X-HubSpot-RateLimit-Remaining", "0".parse().unwrap());
        return Some(response);
    }
    burst.recent.push_back(now);
    None
}

pub struct HubSpot {
    pub state: Arc<HsState>,
    pub server: MockServer,
}

fn iso(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl HsDeal {
    pub fn new(id: u64, name: &str, stage: &str, modified_ms: i64) -> Self {
        HsDeal {
            id,
            name: name.to_owned(),
            stage: stage.to_owned(),
            pipeline: "default".to_owned(),
            amount: Some("100.50".to_owned()),
            modified_ms,
            archived: false,
            contact: None,
            owner: Some("9001".to_owned()),
            unindexed: false,
            extra: Arc::new(ExtraProperties::default()),
        }
    }

    pub fn render(&self, with_associations: bool) -> Value {
        let mut properties = serde_json::Map::new();
        properties.insert("dealname".into(), json!(self.name));
        properties.insert("amount".into(), json!(self.amount));
        properties.insert("dealstage".into(), json!(self.stage));
        properties.insert("pipeline".into(), json!(self.pipeline));
        properties.insert("closedate".into(), json!("2026-03-31T00:00:00Z"));
        properties.insert("createdate".into(), json!("2026-01-10T09:00:00Z"));
        properties.insert("hs_lastmodifieddate".into(), json!(iso(self.modified_ms)));
        properties.insert("hs_object_id".into(), json!(self.id.to_string()));
        properties.insert("hubspot_owner_id".into(), json!(self.owner));
        for (key, value) in &self.extra.pairs {
            properties.insert(key.clone(), json!(value));
        }
        let mut record = json!({
            "id": self.id.to_string(),
            "properties": properties,
            "createdAt": "2026-01-10T09:00:00Z",
            "updatedAt": iso(self.modified_ms),
            "archived": self.archived,
        });
        if self.archived {
            record["archivedAt"] = json!(iso(self.modified_ms));
        }
        if with_associations && let Some(contact) = self.contact {
            record["associations"] = json!({"contacts": {"results": [{"id": contact.to_string(), "type": "deal_to_contact"}]}});
        }
        record
    }

    /// Appends the JSON of [`Self::render`] to `out` without building a tree (same
    /// content, HubSpot's key order).
    pub fn write_json(&self, out: &mut String, with_associations: bool) {
        use std::fmt::Write;
        let text = |value: &str| Value::String(value.to_owned()).to_string();
        let optional = |value: &Option<String>| value.as_deref().map_or("null".to_owned(), text);
        let modified = text(&iso(self.modified_ms));
        let _ = write!(
            out,
            r#"{{"id":"{id}","properties":{{"dealname":{name},"amount":{amount},"dealstage":{stage},"pipeline":{pipeline},"closedate":"2026-03-31T00:00:00Z","createdate":"2026-01-10T09:00:00Z","hs_lastmodifieddate":{modified},"hs_object_id":"{id}","hubspot_owner_id":{owner}{extra}}},"createdAt":"2026-01-10T09:00:00Z","updatedAt":{modified},"archived":{archived}"#,
            id = self.id,
            name = text(&self.name),
            amount = optional(&self.amount),
            stage = text(&self.stage),
            pipeline = text(&self.pipeline),
            owner = optional(&self.owner),
            extra = self.extra.rendered,
            archived = self.archived,
        );
        if self.archived {
            let _ = write!(out, r#","archivedAt":{modified}"#);
        }
        if with_associations && let Some(contact) = self.contact {
            let _ = write!(
                out,
                r#","associations":{{"contacts":{{"results":[{{"id":"{contact}","type":"deal_to_contact"}}]}}}}"#
            );
        }
        out.push('}');
    }
}

impl HubSpot {
    /// Starts the mock; API calls need `Bearer <token>` (or the OAuth state's token).
    pub async fn start(token: &str, oauth: Option<OAuthState>) -> HubSpot {
        let faults = Arc::new(Faults::default());
        let state = Arc::new(HsState {
            deals: Mutex::new(BTreeMap::new()),
            contacts: Mutex::new(BTreeMap::new()),
            optouts: Mutex::new(BTreeMap::new()),
            owners: Mutex::new(
                fixture("hubspot/owners-list-page.json")["results"]
                    .as_array()
                    .expect("the fixture lists owners")
                    .clone(),
            ),
            faults: faults.clone(),
            token: token.to_owned(),
            oauth,
            search_cap: 10_000,
            search_400s: AtomicU64::new(0),
            budget: Mutex::new(None),
            burst: Mutex::new(None),
            rate_limited: AtomicU64::new(0),
            association_reads: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/crm/v3/objects/deals", get(list))
            .route("/crm/v3/objects/deals/search", post(search))
            .route("/crm/v3/objects/deals/{id}", get(one))
            .route(
                "/crm/v4/associations/deals/contacts/batch/read",
                post(associations),
            )
            .route("/crm/v3/objects/contacts/batch/read", post(contacts))
            .route("/crm/v3/pipelines/deals", get(pipelines))
            .route("/crm/v3/owners", get(owners))
            .route("/crm/v3/objects/notes", post(create_note))
            .route("/crm/v3/objects/notes/search", post(search_notes))
            .route("/oauth/v1/token", post(token_endpoint))
            .layer(axum::middleware::from_fn_with_state(faults, inject))
            .with_state(state.clone());
        HubSpot {
            state,
            server: serve(router).await,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The notes created so far, in order.
    pub fn notes(&self) -> Vec<Value> {
        self.state.notes.lock().unwrap().clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    pub fn put(&self, deal: HsDeal) {
        self.state.deals.lock().unwrap().insert(deal.id, deal);
    }

    /// Deals `ids` ("Deal ID") in `stage`, last modified an hour ago plus a second
    /// per id, so that each page's order is the ids'.
    pub fn put_deals(&self, ids: impl IntoIterator<Item = u64>, stage: &str) {
        let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
        for id in ids {
            self.put(HsDeal::new(
                id,
                &format!("Deal {id}"),
                stage,
                base + id as i64 * 1000,
            ));
        }
    }

    pub fn put_contact(&self, id: u64, email: &str, first: &str, last: &str) {
        self.state
            .contacts
            .lock()
            .unwrap()
            .insert(id, (email.to_owned(), first.to_owned(), last.to_owned()));
    }

    /// Sets a contact's `hs_email_optout` ("true" after an unsubscribe from all email).
    pub fn set_optout(&self, id: u64, value: &str) {
        self.state
            .optouts
            .lock()
            .unwrap()
            .insert(id, value.to_owned());
    }

    /// Adds an owner shaped like the fixture's (`PublicOwner`).
    pub fn put_owner(&self, id: &str, email: &str, first: &str, last: &str) {
        let mut owner = fixture("hubspot/owners-list-page.json")["results"][1].clone();
        owner["id"] = json!(id);
        owner["email"] = json!(email);
        owner["firstName"] = json!(first);
        owner["lastName"] = json!(last);
        self.state.owners.lock().unwrap().push(owner);
    }

    /// Changes a deal (stage, modification time).
    pub fn update(&self, id: u64, change: impl FnOnce(&mut HsDeal)) {
        if let Some(deal) = self.state.deals.lock().unwrap().get_mut(&id) {
            change(deal);
        }
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"status": "error", "message": "Authentication credentials not found.", "category": "INVALID_AUTHENTICATION"})),
    )
        .into_response()
}

fn authorized(state: &HsState, headers: &HeaderMap) -> bool {
    match &state.oauth {
        Some(oauth) => oauth.accepts(headers),
        None => bearer(headers).as_deref() == Some(state.token.as_str()),
    }
}

fn with_budget(state: &HsState, mut response: Response) -> Response {
    if let Some((limit, remaining)) = state.budget.lock().unwrap().as_mut() {
        *remaining = remaining.saturating_sub(1);
        let headers = response.headers_mut();
        headers.insert(
            "X-HubSpot-RateLimit-Daily",
            limit.to_string().parse().unwrap(),
        );
        headers.insert(
            "X-HubSpot-RateLimit-Daily-Remaining",
            remaining.to_string().parse().unwrap(),
        );
    }
    response
}

async fn list(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if let Some(limited) = over_burst(&state) {
        return limited;
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(10)
        .min(100);
    // `after` is the id to start at (opaque to the client, as HubSpot's is).
    let after: u64 = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let archived = query.get("archived").is_some_and(|a| a == "true");
    let inline = query
        .get("associations")
        .is_some_and(|a| a.contains("contacts"));
    let deals = state.deals.lock().unwrap();
    let mut matching = deals
        .range(after..)
        .map(|(_, d)| d)
        .filter(|d| d.archived == archived);
    let mut body = String::with_capacity(limit * 4096);
    body.push_str(r#"{"results":["#);
    for (n, deal) in matching.by_ref().take(limit).enumerate() {
        if n > 0 {
            body.push(',');
        }
        deal.write_json(&mut body, inline);
    }
    body.push(']');
    if let Some(next) = matching.next() {
        let next = next.id;
        body.push_str(&format!(
            r#","paging":{{"next":{{"after":"{next}","link":"/crm/v3/objects/deals?after={next}"}}}}"#
        ));
    }
    body.push('}');
    drop(deals);
    let response = ([("content-type", "application/json")], body).into_response();
    with_budget(&state, response)
}

async fn search(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Json(request): Json<Value>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if let Some(limited) = over_burst(&state) {
        return limited;
    }
    let limit = request["limit"].as_u64().unwrap_or(10) as usize;
    let after: usize = request["after"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    if limit > 200 || after + limit > state.search_cap {
        state.search_400s.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            Json(fixture("hubspot/error-validation.json")),
        )
            .into_response();
    }
    let filter = &request["filterGroups"][0]["filters"][0];
    assert_eq!(filter["propertyName"], "hs_lastmodifieddate");
    assert_eq!(filter["operator"], "GTE");
    assert_eq!(request["sorts"][0]["direction"], "ASCENDING");
    let since: i64 = filter["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("epoch ms");
    let deals = state.deals.lock().unwrap();
    let mut matching: Vec<&HsDeal> = deals
        .values()
        .filter(|d| !d.archived && !d.unindexed && d.modified_ms >= since)
        .collect();
    matching.sort_by_key(|d| (d.modified_ms, d.id));
    let page: Vec<Value> = matching
        .iter()
        .skip(after)
        .take(limit)
        .map(|d| d.render(false))
        .collect();
    let mut body = json!({ "total": matching.len(), "results": page });
    if after + limit < matching.len() {
        body["paging"] = json!({"next": {"after": (after + limit).to_string(), "link": "?after"}});
    }
    with_budget(&state, Json(body).into_response())
}

async fn one(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state.deals.lock().unwrap().get(&id) {
        Some(deal) if !deal.archived => Json(deal.render(true)).into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"status": "error", "message": "Object not found"})),
        )
            .into_response(),
    }
}

async fn associations(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Json(request): Json<Value>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if let Some(limited) = over_burst(&state) {
        return limited;
    }
    // HubSpot rejects association batch reads of more than 1,000 ids (developer
    // changelog, "Batch Read Limit for HubSpot Associations API", 2025-02-10).
    if let Some(refused) = too_many_inputs(&request, 1_000) {
        return refused;
    }
    let inputs = request["inputs"].as_array().expect("inputs");
    state.association_reads.lock().unwrap().extend(
        inputs
            .iter()
            .filter_map(|input| Some(input["id"].as_str()?.to_owned())),
    );
    let deals = state.deals.lock().unwrap();
    let results: Vec<Value> = inputs
        .iter()
        .filter_map(|input| {
            let id: u64 = input["id"].as_str()?.parse().ok()?;
            let contact = deals.get(&id)?.contact?;
            Some(json!({"from": {"id": id.to_string()}, "to": [{"toObjectId": contact, "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 3, "label": null}]}]}))
        })
        .collect();
    Json(json!({"status": "COMPLETE", "results": results})).into_response()
}

/// A 400 like HubSpot's for a batch request with more than `max` inputs.
fn too_many_inputs(request: &Value, max: usize) -> Option<Response> {
    let count = request["inputs"].as_array().map_or(0, Vec::len);
    (count > max).then(|| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"status": "error", "category": "VALIDATION_ERROR", "message": format!("a batch takes at most {max} inputs, got {count}")})),
        )
            .into_response()
    })
}

async fn contacts(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Json(request): Json<Value>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if let Some(limited) = over_burst(&state) {
        return limited;
    }
    // Object batch reads take at most 100 ids.
    if let Some(refused) = too_many_inputs(&request, 100) {
        return refused;
    }
    let contacts = state.contacts.lock().unwrap();
    let optouts = state.optouts.lock().unwrap();
    let asked_optout = request["properties"]
        .as_array()
        .is_some_and(|names| names.iter().any(|name| name == "hs_email_optout"));
    let results: Vec<Value> = request["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .filter_map(|input| {
            let id: u64 = input["id"].as_str()?.parse().ok()?;
            let (email, first, last) = contacts.get(&id)?;
            let mut record = json!({"id": id.to_string(), "properties": {"email": email, "firstname": first, "lastname": last}, "archived": false});
            // Like every v3 property: returned only when asked for, as a string.
            if asked_optout && let Some(optout) = optouts.get(&id) {
                record["properties"]["hs_email_optout"] = json!(optout);
            }
            Some(record)
        })
        .collect();
    Json(json!({"status": "COMPLETE", "results": results})).into_response()
}

async fn pipelines(State(state): State<Arc<HsState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    Json(fixture("hubspot/pipelines-deals.json")).into_response()
}

async fn token_endpoint(
    State(state): State<Arc<HsState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    match &state.oauth {
        Some(oauth) => {
            assert_eq!(form.get("client_id").map(String::as_str), Some("hs-client"));
            if form.get("grant_type").map(String::as_str) == Some("authorization_code") {
                oauth.code_response(&form)
            } else {
                oauth.refresh_response(&form, json!({}))
            }
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /crm/v3/owners`: `limit` (default 100) and the `after` cursor; `paging` is
/// absent on the last page.
async fn owners(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if let Some(limited) = over_burst(&state) {
        return limited;
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, 500);
    let after: usize = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let owners = state.owners.lock().unwrap();
    let page: Vec<Value> = owners.iter().skip(after).take(limit).cloned().collect();
    let mut body = json!({ "results": page });
    if after + limit < owners.len() {
        let next = after + limit;
        body["paging"] = json!({"next": {"after": next.to_string(), "link": format!("/crm/v3/owners?after={next}&limit={limit}")}});
    }
    with_budget(&state, Json(body).into_response())
}

/// `POST /crm/v3/objects/notes`: stores the note; answers 201 in the fixture's shape
/// with the note's id and properties. `hs_timestamp` is required.
async fn create_note(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if body["properties"]["hs_timestamp"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "error", "message": "Property values were not valid: hs_timestamp is required", "category": "VALIDATION_ERROR"})),
        )
            .into_response();
    }
    let mut notes = state.notes.lock().unwrap();
    let id = (70_001 + notes.len()).to_string();
    let mut stored = body.clone();
    stored["id"] = json!(id);
    notes.push(stored);
    let mut answer = wire_fixture("hubspot/note-create-response.json");
    answer["id"] = json!(id);
    answer["properties"]["hs_object_id"] = json!(id);
    for (key, value) in body["properties"].as_object().into_iter().flatten() {
        answer["properties"][key] = value.clone();
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

/// `POST /crm/v3/objects/notes/search`: the notes whose `hs_note_body` holds the
/// value of a `CONTAINS_TOKEN` filter on it, as search results.
async fn search_notes(
    State(state): State<Arc<HsState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let filter = &body["filterGroups"][0]["filters"][0];
    assert_eq!(filter["propertyName"], "hs_note_body", "{body}");
    assert_eq!(filter["operator"], "CONTAINS_TOKEN", "{body}");
    let token = filter["value"].as_str().unwrap_or_default().to_owned();
    let results: Vec<Value> = state
        .notes
        .lock()
        .unwrap()
        .iter()
        .filter(|note| {
            note["properties"]["hs_note_body"]
                .as_str()
                .is_some_and(|text| text.contains(&token))
        })
        .map(|note| json!({"id": note["id"], "properties": {"hs_note_body": note["properties"]["hs_note_body"]}, "archived": false}))
        .collect();
    Json(json!({"total": results.len(), "results": results})).into_response()
}
