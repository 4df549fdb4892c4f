//! A Pipedrive API v2 mock: deals with cursor paging (`updated_since` inclusive at
//! second resolution, `sort_by=update_time`, `status` including `deleted`), one deal,
//! persons by ids (with `marketing_status` when `include_fields` asks for it), the v1
//! users list (the fixture's users), pipelines and stages (from the fixtures), and the
//! OAuth token endpoint (client credentials in Basic auth; the answer names the
//! `api_domain`).

use super::{Faults, MockServer, OAuthState, fixture, inject, serve, wire_fixture};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct PdDeal {
    pub id: u64,
    pub title: String,
    pub stage_id: u64,
    pub status: String,
    pub value: f64,
    /// Second resolution, like Pipedrive's.
    pub update_time: DateTime<Utc>,
    pub deleted: bool,
    pub person_id: Option<u64>,
    pub owner_id: u64,
}

impl PdDeal {
    pub fn new(id: u64, title: &str, stage_id: u64, update_time: DateTime<Utc>) -> Self {
        PdDeal {
            id,
            title: title.to_owned(),
            stage_id,
            status: "open".into(),
            value: 4200.5,
            update_time: DateTime::from_timestamp(update_time.timestamp(), 0).unwrap(),
            deleted: false,
            person_id: None,
            owner_id: 9001,
        }
    }

    fn render(&self) -> Value {
        let time = self
            .update_time
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        json!({
            "id": self.id, "title": self.title, "creator_user_id": 9001, "owner_id": self.owner_id,
            "person_id": self.person_id, "org_id": 201, "pipeline_id": 1, "stage_id": self.stage_id,
            "value": self.value, "currency": "EUR", "add_time": "2026-01-05T09:00:00Z",
            "update_time": time, "stage_change_time": time, "is_deleted": self.deleted,
            "is_archived": false, "archive_time": null, "status": self.status, "probability": null,
            "lost_reason": null, "visible_to": 3, "close_time": null, "won_time": null, "lost_time": null,
            "expected_close_date": "2026-03-31", "label_ids": [], "origin": "ManuallyCreated",
            "origin_id": null, "channel": null, "channel_id": null, "arr": null, "mrr": null,
            "acv": null, "custom_fields": {}
        })
    }
}

pub struct PdState {
    pub deals: Mutex<BTreeMap<u64, PdDeal>>,
    pub persons: Mutex<BTreeMap<u64, (String, String)>>,
    /// Person id → `marketing_status` (`subscribed`, `unsubscribed`, `no_consent`, …).
    pub marketing: Mutex<BTreeMap<u64, String>>,
    /// `BaseUser` records (the fixture's to start with).
    pub users: Mutex<Vec<Value>>,
    pub faults: Arc<Faults>,
    pub token: String,
    /// With OAuth, API calls need the live bearer token instead of `x-api-token`.
    pub oauth: Option<OAuthState>,
    /// The mock's own URL, returned as the token response's `api_domain`.
    pub url: Mutex<String>,
    /// Notes added (`POST /v1/notes`), as the v1 `Note` the mock answered with.
    pub notes: Mutex<Vec<Value>>,
}

pub struct Pipedrive {
    pub state: Arc<PdState>,
    pub server: MockServer,
}

impl Pipedrive {
    pub async fn start(token: &str) -> Pipedrive {
        Self::start_with(token, None).await
    }

    /// Starts the mock with OAuth: API calls need `Bearer <access token>`.
    pub async fn start_oauth(oauth: OAuthState) -> Pipedrive {
        Self::start_with("", Some(oauth)).await
    }

    async fn start_with(token: &str, oauth: Option<OAuthState>) -> Pipedrive {
        let faults = Arc::new(Faults::default());
        let state = Arc::new(PdState {
            deals: Mutex::new(BTreeMap::new()),
            persons: Mutex::new(BTreeMap::new()),
            marketing: Mutex::new(BTreeMap::new()),
            users: Mutex::new(
                fixture("pipedrive/users-v1-list.json")["data"]
                    .as_array()
                    .expect("the fixture lists users")
                    .clone(),
            ),
            faults: faults.clone(),
            token: token.to_owned(),
            oauth,
            url: Mutex::new(String::new()),
            notes: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/api/v2/deals", get(deals))
            .route("/api/v2/deals/{id}", get(one))
            .route("/api/v2/persons", get(persons))
            .route("/v1/users", get(users))
            .route("/api/v2/pipelines", get(pipelines))
            .route("/api/v2/stages", get(stages))
            .route("/oauth/token", post(token_endpoint))
            .route("/v1/notes", post(add_note).get(list_notes))
            .layer(axum::middleware::from_fn_with_state(faults, inject))
            .with_state(state.clone());
        let server = serve(router).await;
        *state.url.lock().unwrap() = server.url();
        Pipedrive { state, server }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// The notes added so far, in order.
    pub fn notes(&self) -> Vec<Value> {
        self.state.notes.lock().unwrap().clone()
    }

    pub fn put(&self, deal: PdDeal) {
        self.state.deals.lock().unwrap().insert(deal.id, deal);
    }

    pub fn put_person(&self, id: u64, name: &str, email: &str) {
        self.state
            .persons
            .lock()
            .unwrap()
            .insert(id, (name.to_owned(), email.to_owned()));
    }

    /// Sets a person's `marketing_status`.
    pub fn set_marketing_status(&self, id: u64, status: &str) {
        self.state
            .marketing
            .lock()
            .unwrap()
            .insert(id, status.to_owned());
    }

    pub fn update(&self, id: u64, change: impl FnOnce(&mut PdDeal)) {
        if let Some(deal) = self.state.deals.lock().unwrap().get_mut(&id) {
            change(deal);
            deal.update_time = DateTime::from_timestamp(deal.update_time.timestamp(), 0).unwrap();
        }
    }
}

fn authorized(state: &PdState, headers: &HeaderMap) -> bool {
    match &state.oauth {
        Some(oauth) => oauth.accepts(headers),
        None => {
            headers.get("x-api-token").and_then(|v| v.to_str().ok()) == Some(state.token.as_str())
        }
    }
}

/// Pipedrive's token endpoint: the client authenticates with Basic auth.
async fn token_endpoint(
    State(state): State<Arc<PdState>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    use base64::Engine;
    let Some(oauth) = &state.oauth else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("pd-client:pd-secret")
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let domain = state.url.lock().unwrap().clone();
    oauth.refresh_response(&form, json!({"api_domain": domain, "scope": "deals:read"}))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"success": false, "error": "unauthorized access", "errorCode": 401})),
    )
        .into_response()
}

async fn deals(
    State(state): State<Arc<PdState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .min(500);
    let offset: usize = query
        .get("cursor")
        .and_then(|c| c.strip_prefix("o:"))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let statuses: Vec<String> = query
        .get("status")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| vec!["open".into(), "won".into(), "lost".into()]);
    let since = query.get("updated_since").map(|s| {
        DateTime::parse_from_rfc3339(s)
            .expect("updated_since is RFC 3339")
            .with_timezone(&Utc)
    });
    let all = state.deals.lock().unwrap();
    let mut matching: Vec<&PdDeal> = all
        .values()
        .filter(|d| {
            let status = if d.deleted {
                "deleted"
            } else {
                d.status.as_str()
            };
            statuses.iter().any(|s| s == status)
        })
        .filter(|d| since.is_none_or(|since| d.update_time >= since))
        .collect();
    if query.get("sort_by").map(String::as_str) == Some("update_time") {
        matching.sort_by_key(|d| (d.update_time, d.id));
    }
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|d| d.render())
        .collect();
    let next = (offset + limit < matching.len()).then(|| format!("o:{}", offset + limit));
    Json(json!({"success": true, "data": page, "additional_data": {"next_cursor": next}}))
        .into_response()
}

async fn one(
    State(state): State<Arc<PdState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state.deals.lock().unwrap().get(&id) {
        Some(deal) => Json(json!({"success": true, "data": deal.render()})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"success": false, "error": "Deal not found"})),
        )
            .into_response(),
    }
}

async fn persons(
    State(state): State<Arc<PdState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let persons = state.persons.lock().unwrap();
    let marketing = state.marketing.lock().unwrap();
    // Only with `include_fields=marketing_status` (and the Campaigns product).
    let with_marketing = query
        .get("include_fields")
        .is_some_and(|fields| fields.split(',').any(|f| f == "marketing_status"));
    let data: Vec<Value> = query
        .get("ids")
        .map(|ids| ids.split(',').filter_map(|id| id.parse::<u64>().ok()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|id| {
            let (name, email) = persons.get(&id)?;
            let mut person = json!({"id": id, "name": name, "emails": [{"value": email, "primary": true, "label": "work"}]});
            if with_marketing && let Some(status) = marketing.get(&id) {
                person["marketing_status"] = json!(status);
            }
            Some(person)
        })
        .collect();
    Json(json!({"success": true, "data": data, "additional_data": {"next_cursor": null}}))
        .into_response()
}

async fn pipelines(State(state): State<Arc<PdState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    Json(fixture("pipedrive/pipelines-v2.json")).into_response()
}

async fn stages(State(state): State<Arc<PdState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    Json(fixture("pipedrive/stages-v2.json")).into_response()
}

/// `GET /v1/users`: every user of the company, no parameters, no paging.
async fn users(State(state): State<Arc<PdState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let users = state.users.lock().unwrap().clone();
    Json(json!({"success": true, "data": users})).into_response()
}

/// `POST /v1/notes`: `content` and one of the ids (here `deal_id`, an integer) are
/// required; answers 201 `{success, data: Note}` in the fixture's shape.
async fn add_note(
    State(state): State<Arc<PdState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&state, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"success": false, "error": "unauthorized access", "errorCode": 401})),
        )
            .into_response();
    }
    let (Some(content), Some(deal_id)) = (body["content"].as_str(), body["deal_id"].as_u64())
    else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"success": false, "error": "content and deal_id (a number) are required"})),
        )
            .into_response();
    };
    let mut notes = state.notes.lock().unwrap();
    let mut answer = wire_fixture("pipedrive/note-v1-create-response.json");
    let note = &mut answer["data"];
    let now = Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
    note["id"] = json!(3301 + notes.len() as u64);
    note["content"] = json!(content);
    note["deal_id"] = json!(deal_id);
    note["person_id"] = body["person_id"].clone();
    note["add_time"] = body.get("add_time").cloned().unwrap_or(json!(now.clone()));
    note["update_time"] = json!(now);
    notes.push(note.clone());
    (StatusCode::CREATED, Json(answer)).into_response()
}

/// `GET /v1/notes?deal_id=&updated_since=&sort=&limit=`: the deal's notes updated at or
/// after `updated_since` (RFC 3339), newest id first.
async fn list_notes(
    State(state): State<Arc<PdState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let deal_id: u64 = q
        .get("deal_id")
        .and_then(|d| d.parse().ok())
        .expect("deal_id");
    let since = q
        .get("updated_since")
        .map(|s| DateTime::parse_from_rfc3339(s).expect("updated_since is RFC 3339"));
    let mut found: Vec<Value> = state
        .notes
        .lock()
        .unwrap()
        .iter()
        .filter(|note| note["deal_id"] == json!(deal_id))
        .filter(|note| {
            since.is_none_or(|since| {
                let updated = note["update_time"].as_str().unwrap_or_default();
                chrono::NaiveDateTime::parse_from_str(updated, "%Y-%m-%d %H:%M:%S")
                    .is_ok_and(|at| at.and_utc() >= since)
            })
        })
        .cloned()
        .collect();
    found.reverse();
    Json(json!({"success": true, "data": found, "additional_data": {"pagination": {"start": 0, "limit": 100, "more_items_in_collection": false}}})).into_response()
}
