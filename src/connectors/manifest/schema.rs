//! The manifest format: serde shapes of `connectors/<name>.toml`, mirrored one to one.
//!
//! Unknown keys are errors, so a typo in a user's manifest is reported with its key
//! instead of silently meaning something else. `docs/connectors.md` is the reference
//! for every key; [`super::validate`] checks what serde cannot (pointers, placeholders,
//! enum targets).

use crate::config::duration::ConfigDuration;
use crate::connectors::signature::SchemeName;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One connector, as a manifest describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The connector name that `[connections.X] connector = "…"` refers to.
    pub name: String,
    /// A human name for logs and docs.
    pub label: Option<String>,
    /// Where the vendor documents its API; informational.
    pub docs: Option<String>,
    /// The vendor's API host; a connection's `base_url` overrides it.
    pub base_url: String,
    /// The canonical pipeline deals go to unless the connection says otherwise.
    pub default_pipeline: Option<String>,
    /// How far every incremental read reaches back before the cursor (default 5m).
    pub lookback: Option<ConfigDuration>,
    /// Request timeout (default 30s); a connection's `settings.request_timeout` overrides it.
    pub timeout: Option<ConfigDuration>,
    /// Currency for amounts whose record names none (default USD; a connection's
    /// `settings.default_currency` overrides it).
    pub default_currency: Option<String>,
    pub auth: Auth,
    #[serde(default)]
    pub rate_limit: RateLimit,
    pub deals: Deals,
    pub pipelines: Option<Pipelines>,
    pub stages: Option<Stages>,
    /// native pipeline → native stage → `pipeline.stage` (canonical).
    #[serde(default)]
    pub default_mappings: BTreeMap<String, BTreeMap<String, String>>,
    pub webhooks: Option<Webhooks>,
    /// How a sent follow-up is recorded on the deal in the CRM, for connections that
    /// turn write-back on.
    pub writeback: Option<Writeback>,
}

/// `[writeback]`: recording a sent follow-up email on its deal (a note, an activity, a
/// task). Every text is a minijinja template over the email (see
/// `manifest::writeback::VARIABLES`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Writeback {
    /// OAuth scopes `dealsync auth` asks for, besides `auth.oauth2.scopes`, for a
    /// connection with write-back on.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Writes the record.
    pub create: WritebackRequest,
    /// Finds the record carrying `{{ key }}`; run before an attempt that follows one
    /// whose outcome is unknown. Required unless `create.idempotent`.
    pub lookup: Option<WritebackRequest>,
}

/// One write-back request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritebackRequest {
    #[serde(default)]
    pub method: WriteMethod,
    /// A path on the base URL (a template; values are percent-encoded).
    pub path: String,
    /// Query parameters (templates).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// A JSON body whose strings are templates.
    pub body: Option<toml::Value>,
    /// Pointer to the record's id (create: in the answer; lookup: in each record).
    pub id: Option<String>,
    /// Lookup: pointer to the list of records in the answer.
    pub records: Option<String>,
    /// Lookup: pointer, inside each record, to the text that carries the key.
    pub marker: Option<String>,
    /// Create: the vendor stores one record however often the request is sent (an
    /// upsert by an external id), so no lookup is needed.
    #[serde(default)]
    pub idempotent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WriteMethod {
    Get,
    #[default]
    Post,
    Patch,
    Put,
}

/// How requests authenticate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// How the connection's `token` is sent when it has no `[oauth]` table.
    pub kind: AuthKind,
    /// Header name (`kind = "header"`) or query parameter (`kind = "query"`).
    pub name: Option<String>,
    /// OAuth2 (authorization code with PKCE, refresh tokens), used when the connection
    /// has an `[oauth]` table.
    pub oauth2: Option<OAuth2>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `<name>: <token>`.
    Header,
    /// `?<name>=<token>`.
    Query,
    /// `Authorization: Basic base64(username:password)`.
    Basic,
    /// No credentials.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2 {
    pub authorize_url: String,
    /// Absolute, or a path (`/oauth/v1/token`) on the connection's base URL.
    pub token_url: String,
    /// How the client authenticates at the token endpoint.
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// A token-response field whose value becomes the API base URL
    /// (Salesforce `instance_url`, Pipedrive `api_domain`).
    pub base_url_from: Option<String>,
    /// Extra parameters for the authorize URL.
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    #[default]
    RequestBody,
    /// `Authorization: Basic base64(client_id:client_secret)`.
    Basic,
}

/// The vendor's documented limits; a connection's `[rate_limit]` overrides them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    /// At most `window_requests` requests in any rolling `window` (HubSpot: 100 or 190
    /// per 10 s): sent as fast as allowed, never more in any such window.
    pub window_requests: Option<u32>,
    pub window: Option<ConfigDuration>,
    pub max_concurrency: Option<u32>,
    /// Share of the remaining daily budget this connection may use (default 0.8).
    pub budget_share: Option<f64>,
    /// Header with the requests left in the daily budget.
    pub budget_remaining_header: Option<String>,
    /// Header with the daily budget.
    pub budget_limit_header: Option<String>,
    /// Header carrying `key=used/limit` pairs (Salesforce `Sforce-Limit-Info`).
    pub budget_usage_header: Option<String>,
    /// The key inside `budget_usage_header` (`api-usage`).
    pub budget_usage_key: Option<String>,
    /// When a spent budget comes back: `midnight` (UTC), `rolling` (24 h window,
    /// rechecked hourly), or `header` (seconds in `budget_reset_header`).
    #[serde(default)]
    pub budget_reset: BudgetReset,
    pub budget_reset_header: Option<String>,
    /// Responses that mean the daily budget is spent (not a burst limit).
    #[serde(default)]
    pub budget_exhausted: Vec<ResponseMatch>,
    /// Header with the wait in milliseconds when a 429 carries no `Retry-After`.
    pub retry_after_ms_header: Option<String>,
    /// Wait after a 429 without any hint (default 10s).
    pub default_retry_after: Option<ConfigDuration>,
    /// Where the numbers come from; informational.
    pub docs: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetReset {
    #[default]
    Midnight,
    Rolling,
    Header,
}

/// A response shape: a status and a text its body contains.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseMatch {
    pub status: u16,
    pub body_contains: Option<String>,
}

/// How deals are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deals {
    /// Records per page (default 100); a connection's `page_size` overrides it up to
    /// `max_page_size`.
    pub page_size: Option<u32>,
    pub max_page_size: Option<u32>,
    /// The record's modification time: the cursor field. Reads must sort on it.
    pub modified: FieldSpec,
    /// Reads everything (the first run, and `sync --full`).
    pub full: Request,
    /// Reads what changed since the cursor, sorted by modification time ascending.
    pub incremental: Option<Request>,
    /// Reads deleted or archived records; every record it returns is marked deleted.
    pub deletes: Option<Deletes>,
    /// Reads one record by `{id}` (for webhooks that carry only ids).
    pub one: Option<Request>,
    /// Follow-up requests that bring related records (contacts, associations).
    #[serde(default)]
    pub enrich: Vec<Enrich>,
    /// Query text only some accounts accept (Salesforce's `CurrencyIsoCode`, which only
    /// multi-currency orgs have), rendered by `{optional}` until the vendor refuses it.
    #[serde(default)]
    pub optional: Vec<OptionalText>,
    pub fields: Fields,
}

/// Text that `{optional}` renders while the vendor accepts it. An answer matching
/// `refused` turns it off for the connection (until a restart or reload) and the
/// request is sent again without it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionalText {
    pub text: String,
    /// The answer that means the account does not have it (`{ status = 400,
    /// body_contains = "No such column 'CurrencyIsoCode'" }`).
    pub refused: ResponseMatch,
    /// Said in the log when it is turned off: what the connection does without it.
    pub without: Option<String>,
}

/// One HTTP request and how to read its answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub method: Method,
    /// A path on the base URL, with placeholders.
    pub path: String,
    /// Query parameters, with placeholders.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// A JSON body, with placeholders in its strings.
    pub body: Option<toml::Value>,
    /// JSON pointer to the array of records ("" for a body that is one record).
    #[serde(default)]
    pub records: String,
    #[serde(default)]
    pub pagination: Pagination,
    /// Results one query may page through before the vendor refuses (HubSpot search:
    /// 10000). Past it, the read restarts at the last modification time seen.
    pub max_results: Option<u64>,
    /// A page size for this request when it differs from `deals.page_size`.
    pub page_size: Option<u32>,
    /// Requests per second for this endpoint when it has its own limit (HubSpot search).
    pub requests_per_second: Option<f64>,
    /// Records to read, over as many pages as it takes, before the enrichments run once
    /// for all of them (HubSpot search: 1,000, what one association batch read takes).
    pub gather: Option<u32>,
    /// Incremental requests only: each next page is a new query from the high-water mark
    /// (the ids read at it skipped), not the vendor's continuation. An offset
    /// continuation (HubSpot search) shifts when a record read earlier is modified and
    /// moves to the end of the order, and the record at the page boundary is skipped.
    #[serde(default)]
    pub keyset: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    #[default]
    Get,
    Post,
}

/// How to get from one page to the next.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pagination {
    #[serde(default)]
    pub kind: PaginationKind,
    /// `cursor`: pointer to the next cursor in the body. `next_url`: pointer to the next URL.
    pub next: Option<String>,
    /// `cursor`, `offset`, `page`: the query parameter that carries it.
    pub param: Option<String>,
    /// `cursor`: the top-level body field that carries it (POST searches).
    pub body_field: Option<String>,
    /// `offset`, `page`: pointer to a has-more flag (otherwise a short page ends).
    pub has_more: Option<String>,
    /// `offset`: pointer to the next offset (otherwise offset + records).
    pub next_offset: Option<String>,
    /// `page`: the first page number (default 1).
    pub first_page: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaginationKind {
    /// One page only.
    #[default]
    None,
    Cursor,
    NextUrl,
    Offset,
    Page,
    LinkHeader,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deletes {
    /// How often the deletes are read (default every run).
    pub every: Option<ConfigDuration>,
    pub request: Request,
}

/// A follow-up request per page: ids collected from the page's records, one batch
/// request, its records matched back by id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrich {
    /// Name by which fields refer to it: `@name/pointer`.
    pub name: String,
    /// Where each record's id for this request is; the first that resolves wins.
    /// A path may start with `@other` to read a previous enrichment.
    pub ids: Vec<String>,
    /// Pointer to the id inside each returned record.
    pub id: String,
    /// Reads in which this runs (`full`, `incremental`, `deletes`, `one`); default all.
    #[serde(default)]
    pub only: Vec<String>,
    /// Largest number of ids per request (default 100).
    pub batch: Option<usize>,
    /// Keeps each record this enrichment read, per id, for this long: incremental and
    /// deletes reads then request only the ids without a fresh record. A full read
    /// requests every id and refreshes what is kept. Off when absent.
    pub cache: Option<ConfigDuration>,
    /// The request lists every record of its kind (HubSpot's owners, Pipedrive's users),
    /// following its `pagination`, instead of taking ids: it is read at most once per
    /// sync run, and only when a record's id is neither kept (`cache`) nor read yet.
    #[serde(default)]
    pub list: bool,
    /// Pointer to a flag inside each returned record; a record where it is false (a
    /// deactivated user) counts as not found.
    pub active: Option<String>,
    pub request: Request,
}

/// Where each canonical field sits in the source record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    pub external_id: FieldSpec,
    pub title: Option<FieldSpec>,
    pub amount: Option<FieldSpec>,
    pub currency: Option<FieldSpec>,
    pub native_pipeline: Option<FieldSpec>,
    pub native_stage: FieldSpec,
    pub contact_email: Option<FieldSpec>,
    pub contact_name: Option<FieldSpec>,
    /// The domain or website of the deal's company record, for the company link.
    pub company_domain: Option<FieldSpec>,
    pub owner: Option<FieldSpec>,
    pub owner_email: Option<FieldSpec>,
    pub created_at: Option<FieldSpec>,
    pub updated_at: Option<FieldSpec>,
    pub stage_changed_at: Option<FieldSpec>,
    pub expected_close: Option<FieldSpec>,
    pub deleted: Option<FieldSpec>,
    /// Maps to `open`, `won`, `lost` or `deleted` (type `enum`).
    pub status: Option<FieldSpec>,
    /// Whether the contact agreed to marketing email: type `bool`, or `enum` mapping the
    /// source's values onto `true` and `false`. Absent, or a value the map does not
    /// name, is no consent.
    pub marketing_consent: Option<FieldSpec>,
}

/// A field: a path, or a table with a type and conversions.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldSpec {
    Path(String),
    Full(FieldTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldTable {
    /// A JSON pointer, or `@enrichment/pointer`.
    pub path: Option<String>,
    /// Alternatives, tried in order; the first non-empty value wins.
    #[serde(default)]
    pub paths: Vec<String>,
    /// A constant, when the source has no such field.
    pub value: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: FieldType,
    /// Used when the path holds nothing.
    pub default: Option<String>,
    /// `enum`: source value → canonical value.
    #[serde(default)]
    pub map: BTreeMap<String, String>,
    /// `join`: several paths joined by this separator (names: first + last).
    pub join: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    #[default]
    String,
    /// A decimal amount (string or number) → minor units of the currency.
    Decimal,
    /// An integer already in the currency's minor units (cents: 12400 is 124.00 EUR).
    MinorUnits,
    /// ISO-8601 / RFC 3339 (any offset), `YYYY-MM-DD HH:MM:SS` (UTC), epoch milliseconds.
    Timestamp,
    /// `YYYY-MM-DD` or a timestamp's date.
    Date,
    /// `true`/`false`, as JSON or as text.
    Bool,
    /// Through `map`.
    Enum,
}

/// Native pipelines, when the source has several.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipelines {
    pub request: Request,
    pub id: String,
    pub label: String,
    /// Pointer to the pipeline's stages inside each pipeline record.
    pub stages: Option<String>,
    /// Pointer to a flag that hides a pipeline (deleted, archived).
    pub hidden: Option<String>,
    /// The stage fields when stages are embedded.
    pub stage: Option<StageFields>,
}

/// Native stages from their own request (Pipedrive, Salesforce).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stages {
    pub request: Request,
    /// Pointer to the stage's pipeline id; without it every stage belongs to `single_pipeline`.
    pub pipeline: Option<String>,
    /// The one native pipeline of sources that have none (id, label).
    pub single_pipeline: Option<[String; 2]>,
    pub fields: StageFields,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFields {
    pub id: String,
    pub label: String,
    pub order: Option<String>,
    pub probability: Option<String>,
    /// Multiplies the probability to percent (HubSpot's 0–1 → 100).
    pub probability_scale: Option<f64>,
    pub closed: Option<String>,
    pub won: Option<String>,
    /// Days without an update before a deal in this stage is rotting.
    pub rot_days: Option<String>,
    /// Flag that enables `rot_days`.
    pub rot_enabled: Option<String>,
    /// Flag that hides a stage (deleted, inactive): true hides.
    pub hidden: Option<String>,
    /// Flag that shows a stage (active): false hides.
    pub active: Option<String>,
}

/// How webhooks to this connector are verified and read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhooks {
    /// How deliveries are signed, by the scheme's name (see [`SchemeName`]).
    pub scheme: SchemeName,
    /// Pointer to the array of events ("" when the body is one event or an array).
    #[serde(default)]
    pub events: String,
    /// Pointers whose values, joined with `.`, name the event kind.
    pub kind: Vec<String>,
    /// Pointer to the record id.
    pub id: String,
    /// Pointer to the full record, for `upsert` actions.
    pub record: Option<String>,
    /// Event kind → what to do with it; kinds not listed are ignored.
    pub actions: BTreeMap<String, EventAction>,
}

/// What a webhook event kind becomes (`webhooks.actions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventAction {
    /// The event carries the full record (at `webhooks.record`): store it.
    Upsert,
    /// The event names the record: read it through `[deals.one]`, then store it.
    Refetch,
    /// The record was deleted at the source.
    Delete,
    /// Nothing to do (listed so the kind is documented as seen and skipped).
    Ignore,
}
