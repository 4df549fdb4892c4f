//! A Salesforce REST mock: SOQL `query` and `queryAll` on Opportunity (ordered by
//! SystemModstamp, Id; the `(ts = since AND Id > last) OR ts > since` tie-break;
//! `nextRecordsUrl` batches), OpportunityStage from the fixture, OAuth refresh that
//! returns no new refresh token and names the instance URL, `Sforce-Limit-Info`.
//! A multi-currency org (the default) has `CurrencyIsoCode` on each opportunity; a
//! single-currency one refuses a query naming it with 400 INVALID_FIELD, as the
//! fixture shows.

use super::{Faults, MockServer, OAuthState, fixture, inject, serve};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct SfOpp {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub amount: f64,
    pub modstamp: DateTime<Utc>,
    pub deleted: bool,
    pub contact: Option<(String, String)>,
    /// The opportunity's Account's `Website`; no Account when `None` (served as null).
    pub website: Option<String>,
    /// `CurrencyIsoCode` (served only by a multi-currency org).
    pub currency: String,
}

impl SfOpp {
    pub fn new(id: &str, name: &str, stage: &str, modstamp: DateTime<Utc>) -> Self {
        SfOpp {
            id: id.to_owned(),
            name: name.to_owned(),
            stage: stage.to_owned(),
            amount: 15000.0,
            modstamp: DateTime::from_timestamp_millis(modstamp.timestamp_millis()).unwrap(),
            deleted: false,
            contact: None,
            website: None,
            currency: "USD".to_owned(),
        }
    }

    fn render(&self, multi_currency: bool) -> Value {
        let stamp = self
            .modstamp
            .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
            .to_string();
        let (closed, won) = match self.stage.as_str() {
            "Closed Won" => (true, true),
            "Closed Lost" => (true, false),
            _ => (false, false),
        };
        let mut record = json!({
            "attributes": {"type": "Opportunity", "url": format!("/services/data/v62.0/sobjects/Opportunity/{}", self.id)},
            "Id": self.id, "Name": self.name, "StageName": self.stage, "Amount": self.amount,
            "CloseDate": "2026-03-31", "IsClosed": closed, "IsWon": won, "Probability": 10.0,
            "ForecastCategoryName": "Pipeline", "OwnerId": "005Dn000001Sv6AAAS",
            "Owner": {"attributes": {"type": "User"}, "Name": "Grace Hopper", "Email": "grace@example.com"},
            "CreatedDate": "2026-01-10T09:00:00.000+0000", "LastModifiedDate": stamp,
            "SystemModstamp": stamp, "IsDeleted": self.deleted,
            "Account": self.website.as_ref().map(|website| json!({
                "attributes": {"type": "Account"}, "Website": website
            })),
            "OpportunityContactRoles": self.contact.as_ref().map(|(email, name)| json!({
                "totalSize": 1, "done": true,
                "records": [{"attributes": {"type": "OpportunityContactRole"}, "Contact": {"attributes": {"type": "Contact"}, "Email": email, "Name": name}}]
            })),
        });
        if multi_currency {
            record["CurrencyIsoCode"] = json!(self.currency);
        }
        record
    }
}

pub struct SfState {
    pub opportunities: Mutex<BTreeMap<String, SfOpp>>,
    pub faults: Arc<Faults>,
    pub oauth: OAuthState,
    pub batch: usize,
    pub url: Mutex<String>,
    /// Query locators: id → the records still to serve.
    locators: Mutex<HashMap<String, Vec<Value>>>,
    next_locator: AtomicU64,
    pub api_calls: AtomicU64,
    /// The org has multi-currency (and so the `CurrencyIsoCode` field).
    pub multi_currency: std::sync::atomic::AtomicBool,
    /// Queries refused for naming a field the org does not have.
    pub invalid_field: AtomicU64,
    /// Tasks by their `Dealsync_Ext_Id__c` value: (Id, the fields last written).
    pub tasks: Mutex<BTreeMap<String, (String, Value)>>,
}

pub struct Salesforce {
    pub state: Arc<SfState>,
    pub server: MockServer,
}

impl Salesforce {
    /// `refresh` is the refresh token the mock accepts; no access token is live yet.
    pub async fn start(refresh: &str, batch: usize) -> Salesforce {
        Salesforce::start_with(refresh, batch, false).await
    }

    /// As [`Salesforce::start`]; with `rotate`, each refresh answers a new refresh
    /// token and the one used stops working, as vendors that rotate them do.
    pub async fn start_with(refresh: &str, batch: usize, rotate: bool) -> Salesforce {
        let faults = Arc::new(Faults::default());
        let state = Arc::new(SfState {
            opportunities: Mutex::new(BTreeMap::new()),
            faults: faults.clone(),
            oauth: OAuthState::new("none-yet", refresh, rotate),
            batch,
            url: Mutex::new(String::new()),
            locators: Mutex::new(HashMap::new()),
            next_locator: AtomicU64::new(1),
            api_calls: AtomicU64::new(0),
            multi_currency: std::sync::atomic::AtomicBool::new(true),
            invalid_field: AtomicU64::new(0),
            tasks: Mutex::new(BTreeMap::new()),
        });
        let router = Router::new()
            .route("/services/data/v62.0/query", get(query))
            .route("/services/data/v62.0/queryAll", get(query_all))
            .route("/services/data/v62.0/query/{locator}", get(more))
            .route("/services/oauth2/token", post(token))
            .route(
                "/services/data/v62.0/sobjects/Task/Dealsync_Ext_Id__c/{value}",
                axum::routing::patch(upsert_task),
            )
            .layer(axum::middleware::from_fn_with_state(faults, inject))
            .with_state(state.clone());
        let server = serve(router).await;
        *state.url.lock().unwrap() = server.url();
        Salesforce { state, server }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The tasks upserted so far: external id value → (Id, fields last written).
    pub fn tasks(&self) -> BTreeMap<String, (String, Value)> {
        self.state.tasks.lock().unwrap().clone()
    }

    pub fn put(&self, opportunity: SfOpp) {
        self.state
            .opportunities
            .lock()
            .unwrap()
            .insert(opportunity.id.clone(), opportunity);
    }

    pub fn update(&self, id: &str, change: impl FnOnce(&mut SfOpp)) {
        if let Some(opportunity) = self.state.opportunities.lock().unwrap().get_mut(id) {
            change(opportunity);
        }
    }
}

fn invalid_session() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(fixture("salesforce/error-invalid-session.json")),
    )
        .into_response()
}

fn with_usage(state: &SfState, body: Value) -> Response {
    let used = state.api_calls.fetch_add(1, Ordering::SeqCst) + 1;
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        "Sforce-Limit-Info",
        format!("api-usage={used}/100000").parse().unwrap(),
    );
    response
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let (_, rest) = text.split_once(start)?;
    Some(rest.split_once(end).map_or(rest, |(inside, _)| inside))
}

fn answer(state: &SfState, soql: &str, include_deleted: bool) -> Response {
    if soql.contains("FROM OpportunityStage") {
        return with_usage(state, fixture("salesforce/query-opportunitystage.json"));
    }
    assert!(soql.contains("FROM Opportunity"), "unexpected SOQL {soql}");
    let multi_currency = state.multi_currency.load(Ordering::SeqCst);
    if !multi_currency && let Some(column) = soql.find("CurrencyIsoCode") {
        state.invalid_field.fetch_add(1, Ordering::SeqCst);
        // Salesforce echoes the query with a caret under the field (the fixture's
        // shape, with this query in it).
        let fixture = fixture("salesforce/error-invalid-field-currencyisocode.json");
        let template = fixture["body"][0]["message"].as_str().unwrap();
        let (_, tail) = template.split_once("No such column").unwrap();
        let reason = format!("No such column{tail}");
        let message = format!(
            "\n{soql}\n{caret:>width$}\nERROR at Row:1:Column:{column}\n{reason}",
            caret = "^",
            width = column + 1
        );
        return (
            StatusCode::BAD_REQUEST,
            Json(json!([{"message": message, "errorCode": fixture["body"][0]["errorCode"]}])),
        )
            .into_response();
    }
    assert!(
        soql.ends_with("ORDER BY SystemModstamp, Id"),
        "unordered SOQL {soql}"
    );
    let since = between(soql, "WHERE SystemModstamp > ", " OR").map(|literal| {
        DateTime::parse_from_rfc3339(literal)
            .expect("SOQL datetime literal")
            .with_timezone(&Utc)
    });
    let since_id = between(soql, "Id > '", "'").unwrap_or_default().to_owned();
    let only = between(soql, "WHERE Id = '", "'");
    let all = state.opportunities.lock().unwrap();
    let mut matching: Vec<&SfOpp> = all
        .values()
        .filter(|o| include_deleted || !o.deleted)
        .filter(|o| only.is_none_or(|id| o.id == id))
        .filter(|o| {
            since.is_none_or(|since| o.modstamp > since || (o.modstamp == since && o.id > since_id))
        })
        .collect();
    matching.sort_by(|a, b| (a.modstamp, &a.id).cmp(&(b.modstamp, &b.id)));
    let records: Vec<Value> = matching.iter().map(|o| o.render(multi_currency)).collect();
    serve_batch(state, records)
}

fn serve_batch(state: &SfState, mut records: Vec<Value>) -> Response {
    let total = records.len();
    let rest = if records.len() > state.batch {
        records.split_off(state.batch)
    } else {
        Vec::new()
    };
    let mut body = json!({"totalSize": total, "done": rest.is_empty(), "records": records});
    if !rest.is_empty() {
        let locator = format!(
            "01gRO00000{}-{}",
            state.next_locator.fetch_add(1, Ordering::SeqCst),
            state.batch
        );
        body["nextRecordsUrl"] = json!(format!("/services/data/v62.0/query/{locator}"));
        state.locators.lock().unwrap().insert(locator, rest);
    }
    with_usage(state, body)
}

async fn query(
    State(state): State<Arc<SfState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !state.oauth.accepts(&headers) {
        return invalid_session();
    }
    answer(&state, q.get("q").expect("q"), false)
}

async fn query_all(
    State(state): State<Arc<SfState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !state.oauth.accepts(&headers) {
        return invalid_session();
    }
    answer(&state, q.get("q").expect("q"), true)
}

async fn more(
    State(state): State<Arc<SfState>>,
    headers: HeaderMap,
    Path(locator): Path<String>,
) -> Response {
    if !state.oauth.accepts(&headers) {
        return invalid_session();
    }
    let Some(records) = state.locators.lock().unwrap().remove(&locator) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!([{"message": "invalid query locator", "errorCode": "INVALID_QUERY_LOCATOR"}]),
            ),
        )
            .into_response();
    };
    serve_batch(&state, records)
}

async fn token(
    State(state): State<Arc<SfState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    assert_eq!(form.get("client_id").map(String::as_str), Some("sf-client"));
    let url = state.url.lock().unwrap().clone();
    state.oauth.refresh_response(
        &form,
        json!({"instance_url": url, "id": "https://login.salesforce.com/id/00D/005", "issued_at": "1768912345678", "signature": "c2ln", "scope": "refresh_token api", "token_type": "Bearer"}),
    )
}

/// `PATCH …/sobjects/Task/Dealsync_Ext_Id__c/{value}`: upsert by the external id,
/// case-insensitively as Salesforce matches them: 201 `created: true` for a new task,
/// 200 `created: false` when one with the value exists (the fixture's two answers).
async fn upsert_task(
    State(state): State<Arc<SfState>>,
    headers: HeaderMap,
    Path(value): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if !state.oauth.accepts(&headers) {
        return invalid_session();
    }
    let fixture = super::fixture("salesforce/task-upsert-by-extid.json");
    let strip = |mut answer: Value| {
        if let Some(object) = answer.as_object_mut() {
            object.retain(|key, _| !key.starts_with('_'));
        }
        answer
    };
    if body.get("Id").is_some() || body["WhatId"].as_str().is_none_or(str::is_empty) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!([{"message": "Required fields are missing: [WhatId]", "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["WhatId"]}])),
        )
            .into_response();
    }
    let mut tasks = state.tasks.lock().unwrap();
    let key = value.to_lowercase();
    let (status, mut answer) = match tasks.get_mut(&key) {
        Some((id, fields)) => {
            *fields = body;
            let mut answer = strip(fixture["response_updated"].clone());
            answer["id"] = json!(id.clone());
            (StatusCode::OK, answer)
        }
        None => {
            let id = format!("00TOx00000Qq{:04}MAJ", tasks.len() + 1);
            tasks.insert(key, (id.clone(), body));
            let mut answer = strip(fixture["response_created"].clone());
            answer["id"] = json!(id);
            (StatusCode::CREATED, answer)
        }
    };
    if let Some(object) = answer.as_object_mut() {
        object.remove("_status");
    }
    (status, Json(answer)).into_response()
}
