//! The status page at `/`: one server-rendered HTML page, no JavaScript: the
//! connections with their last sync and health, the funnel of the last 30 days as an
//! inline SVG chart per pipeline, the stalled deals and the outbox.
//!
//! Invariants:
//! - Everything shown goes through minijinja's HTML auto-escaping (deal titles, stage
//!   labels and error texts are untrusted); the template marks nothing `safe`.
//! - Contact and recipient email addresses are not shown; the read API has them.
//! - Access: every request must present `server.api_token` (HTTP Basic with any user
//!   name, or a bearer token); without a configured token the page does not exist (404).
//!   `server.status_page_auth = "local"` is the operator's word that nothing but this
//!   machine reaches the (loopback) listener: a request then sees the page without a
//!   token unless it carries `Forwarded`, `X-Forwarded-For` or `X-Real-IP` (a proxy
//!   forwarded it). A forwarding header can only make a request need the token, never
//!   spare it. `server.status_page = false` turns the page off.

use super::HttpState;
use super::api::{bearer, token_matches};
use super::error::ApiError;
use crate::config::StatusPageAuth;
use crate::report::render::{duration, money, percent};
use crate::report::{ReportOptions, StageReport};
use crate::store::{OutboxFilter, StallCutoff};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::{Arc, OnceLock};

/// The page both templates extend: head, style sheet and body frame.
const PAGE_TEMPLATE: &str = include_str!("page.html");
const TEMPLATE: &str = include_str!("status.html");
const DEAL_TEMPLATE: &str = include_str!("deal.html");
const STALLED_SHOWN: u32 = 25;
const OUTBOX_SHOWN: u32 = 25;
/// Width of the longest funnel bar, in SVG user units.
const BAR_WIDTH: f64 = 400.0;

fn environment() -> &'static minijinja::Environment<'static> {
    static ENVIRONMENT: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let mut environment = minijinja::Environment::new();
        // The name ends in .html, so auto-escaping is HTML.
        environment
            .add_template("page.html", PAGE_TEMPLATE)
            .expect("the built-in template parses");
        environment
            .add_template("status.html", TEMPLATE)
            .expect("the built-in template parses");
        environment
            .add_template("deal.html", DEAL_TEMPLATE)
            .expect("the built-in template parses");
        environment
    })
}

/// `None` when the request may see the page; otherwise the response to send instead.
fn refusal(state: &HttpState, headers: &HeaderMap) -> Option<Response> {
    let config = state.config();
    if !config.server.status_page {
        return Some(ApiError::NotFound("the status page is off".into()).into_response());
    }
    // Config validation refuses "local" on a non-loopback listener; checked again here
    // so that nothing but a loopback listener can ever skip the token.
    let local = config.server.status_page_auth == StatusPageAuth::Local
        && config.server.listen.ip().is_loopback()
        && !forwarded(headers);
    if local {
        return None;
    }
    let Some(expected) = &config.server.api_token else {
        return Some(
            ApiError::NotFound(
                "the status page needs server.api_token (or server.status_page_auth = \"local\" when only this machine reaches the listener)".into(),
            )
            .into_response(),
        );
    };
    if presented_token(headers).is_some_and(|token| token_matches(&token, expected.expose())) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"dealsync\", charset=\"UTF-8\""),
            )],
            "authentication required",
        )
            .into_response(),
    )
}

/// The token a request presents: a bearer token, or the password of HTTP Basic.
pub(super) fn presented_token(headers: &HeaderMap) -> Option<String> {
    bearer(headers)
        .map(str::to_owned)
        .or_else(|| basic_password(headers))
}

/// Whether a proxy forwarded the request (the client is then elsewhere, whatever
/// address the connection came from).
fn forwarded(headers: &HeaderMap) -> bool {
    [header::FORWARDED.as_str(), "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|name| headers.contains_key(*name))
}

fn basic_password(headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_owned())
}

#[derive(Serialize)]
struct ConnectionView {
    name: String,
    connector: String,
    health: &'static str,
    detail: String,
    last_sync: String,
    last_success: String,
}

#[derive(Serialize)]
struct Bar {
    label: String,
    y: u32,
    width: f64,
    entered: u64,
    open: u64,
    note: String,
}

#[derive(Serialize)]
struct Chart {
    key: String,
    label: String,
    height: u32,
    bars: Vec<Bar>,
    bottleneck: Option<String>,
    outcomes: String,
    /// Each stage's label and description (its entry and exit criteria).
    stages: Vec<StageInfo>,
}

#[derive(Serialize)]
struct StageInfo {
    label: String,
    description: String,
}

#[derive(Serialize)]
struct StalledView {
    id: i64,
    title: String,
    connection: String,
    stage: String,
    in_stage: String,
    amount: String,
}

#[derive(Serialize)]
struct EmailView {
    deal_id: i64,
    rule: String,
    step: crate::domain::StepNumber,
    state: String,
    due: String,
    sent: String,
    reason: String,
}

fn when(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match at {
        None => "never".to_owned(),
        Some(at) if at <= now => format!(
            "{} ago ({})",
            duration((now - at).num_seconds() as f64),
            at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        Some(at) => format!(
            "in {} ({})",
            duration((at - now).num_seconds() as f64),
            at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    }
}

fn chart(stages: &[StageReport]) -> (Vec<Bar>, u32) {
    use crate::pipeline::StageKind;
    let shown: Vec<&StageReport> = stages
        .iter()
        .filter(|s| s.kind != StageKind::Lost)
        .collect();
    let most = shown.iter().map(|s| s.entered).max().unwrap_or(0).max(1) as f64;
    let bars: Vec<Bar> = shown
        .iter()
        .enumerate()
        .map(|(at, stage)| Bar {
            label: stage.label.clone(),
            y: at as u32 * 30,
            width: if stage.entered == 0 {
                0.0
            } else {
                (BAR_WIDTH * stage.entered as f64 / most).max(2.0)
            },
            entered: stage.entered,
            open: stage.open_deals,
            note: match stage.conversion {
                Some(_) => format!("→ {}", percent(stage.conversion)),
                None => String::new(),
            },
        })
        .collect();
    let height = bars.len() as u32 * 30 + 4;
    (bars, height)
}

/// `GET /`: the status page.
pub async fn page(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(response) = refusal(&state, &headers) {
        return response;
    }
    match render(&state).await {
        Ok(html) => (
            [(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'",
                ),
            )],
            Html(html),
        )
            .into_response(),
        Err(error) => error.into_response(),
    }
}

async fn render(state: &HttpState) -> Result<String, ApiError> {
    let now = Utc::now();
    let config = state.config();
    let readiness = state.readiness.report();
    let runs = state.store.last_sync_runs().await?;
    let successes = state.store.last_successes().await?;
    let connections: Vec<ConnectionView> = config
        .connections
        .iter()
        .map(|connection| {
            let name = connection.name.as_str();
            let run = runs.iter().find(|r| r.connection == name);
            let success = successes
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, at)| *at);
            let (health, detail) = if !connection.enabled {
                ("disabled", String::new())
            } else if let Some(what) = readiness.attention.get(name) {
                ("attention", what.clone())
            } else if let Some(run) = run {
                match (run.status.as_str(), &run.error) {
                    ("failed", error) => ("failing", error.clone().unwrap_or_default()),
                    ("succeeded", _) => ("ok", String::new()),
                    (other, _) => ("syncing", other.to_owned()),
                }
            } else if readiness.connections.get(name).map(String::as_str) == Some("started") {
                (
                    "ok",
                    "no sync run yet (webhook-only or first run pending)".to_owned(),
                )
            } else {
                ("starting", String::new())
            };
            ConnectionView {
                name: name.to_owned(),
                connector: connection.connector.clone(),
                health,
                detail,
                last_sync: when(run.map(|r| r.finished_at.unwrap_or(r.started_at)), now),
                last_success: when(success, now),
            }
        })
        .collect();

    let report = state
        .store
        .report(config.pipelines.clone(), ReportOptions::last_days(now, 30))
        .await?;
    let charts: Vec<Chart> = report
        .total
        .pipelines
        .iter()
        .map(|pipeline| {
            let (bars, height) = chart(&pipeline.stages);
            Chart {
                key: pipeline.pipeline.clone(),
                label: pipeline.label.clone(),
                height,
                bars,
                bottleneck: pipeline.bottleneck.as_ref().map(|b| {
                    format!(
                        "{} ({})",
                        b.stage,
                        match b.reason {
                            crate::report::BottleneckReason::LowestConversion =>
                                format!("lowest conversion, {}", percent(b.conversion)),
                            crate::report::BottleneckReason::LongestTimeInStage => format!(
                                "longest median time in stage, {}",
                                b.median_seconds.map_or_else(|| "-".to_owned(), duration)
                            ),
                        }
                    )
                }),
                outcomes: format!(
                    "won {}, lost {} (win rate {}), reopened {}",
                    pipeline.outcomes.won,
                    pipeline.outcomes.lost,
                    percent(pipeline.outcomes.win_rate),
                    pipeline.outcomes.reopened
                ),
                stages: config
                    .pipelines
                    .get(&pipeline.pipeline)
                    .map(|found| {
                        found
                            .stages
                            .iter()
                            .map(|stage| StageInfo {
                                label: stage.label.clone(),
                                description: stage.description.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    let forecast: Vec<[String; 4]> = report
        .total
        .forecast
        .iter()
        .map(|row| {
            [
                row.currency.to_string(),
                row.month.clone().unwrap_or_else(|| "unscheduled".into()),
                row.deals.to_string(),
                format!("{} {}", row.weighted.amount, row.currency),
            ]
        })
        .collect();

    let cutoffs = stall_cutoffs(&config.pipelines, now);
    let stalled: Vec<StalledView> = state
        .store
        .stalled_deals(cutoffs, STALLED_SHOWN)
        .await?
        .into_iter()
        .map(|deal| StalledView {
            id: deal.id,
            amount: deal
                .amount()
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            title: deal.title,
            connection: deal.connection.to_string(),
            stage: format!(
                "{}.{}",
                deal.pipeline.map(|p| p.to_string()).unwrap_or_default(),
                deal.stage
            ),
            in_stage: duration((now - deal.stage_entered_at).num_seconds() as f64),
        })
        .collect();
    let emails: Vec<EmailView> = state
        .store
        .outbox_entries(OutboxFilter {
            action: Some("email".to_owned()),
            limit: Some(OUTBOX_SHOWN),
            ..Default::default()
        })
        .await?
        .into_iter()
        .map(|email| EmailView {
            deal_id: email.deal_id,
            rule: email.rule,
            step: email.step,
            state: email.state,
            due: when(Some(email.due_at), now),
            sent: email
                .sent_at
                .map_or_else(|| "-".to_owned(), |at| when(Some(at), now)),
            reason: email.reason.unwrap_or_default(),
        })
        .collect();
    let email_counts = state.store.outbox_counts().await?;
    let deliverability: Vec<[String; 9]> = state
        .store
        .delivery_figures(now)
        .await?
        .into_iter()
        .filter(|line| line.sent > 0 || line.complained > 0 || line.bounced_permanent > 0)
        .map(|line| crate::deliverability::figures_row(&line))
        .collect();
    let paused_rules: Vec<_> = state
        .store
        .rule_pauses()
        .await?
        .into_iter()
        .map(|pause| {
            minijinja::context! {
                rule => pause.rule,
                reason => pause.reason,
                since => when(Some(pause.paused_at), now),
            }
        })
        .collect();

    let context = minijinja::context! {
        generated_at => now.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        since => report.since.format("%Y-%m-%d").to_string(),
        version => env!("CARGO_PKG_VERSION"),
        connections,
        charts,
        forecast,
        cart_recovery => {
            let carts = &report.total.cart_recovery;
            (carts.abandoned > 0).then(|| format!(
                "{} abandoned, {} recovered after a follow-up ({}), recovered revenue {}",
                carts.abandoned, carts.recovered, percent(carts.recovery_rate),
                money(&carts.recovered_revenue)
            ))
        },
        unmapped => report.total.unmapped_open_deals,
        stalled,
        emails,
        email_counts,
        email_attention => readiness.attention.get(crate::health::EMAIL_ATTENTION),
        deliverability,
        paused_rules,
    };
    environment()
        .get_template("status.html")
        .and_then(|template| template.render(context))
        .map_err(|source| ApiError::Render {
            page: "status",
            source,
        })
}

/// `GET /deals/{id}`: one deal with each follow-up rule's decision about it, the
/// status page's view of `dealsync deals show` (same access rules as `/`; no email
/// addresses and no source record, which the read API has).
pub async fn deal_page(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = refusal(&state, &headers) {
        return response;
    }
    let Ok(id) = id.parse::<i64>() else {
        return ApiError::BadRequest(format!("a deal id is a number, got {id:?}")).into_response();
    };
    let now = Utc::now();
    let view =
        match crate::followup::explain::deal_view(&state.store, state.config(), id, now).await {
            Ok(Some(view)) => view,
            Ok(None) => return ApiError::NotFound(format!("no deal {id}")).into_response(),
            Err(error) => return ApiError::from(error).into_response(),
        };
    match render_deal(&view, now) {
        Ok(html) => (
            [(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            )],
            Html(html),
        )
            .into_response(),
        Err(error) => error.into_response(),
    }
}

fn render_deal(
    view: &crate::followup::explain::DealView,
    now: DateTime<Utc>,
) -> Result<String, ApiError> {
    let deal = &view.deal;
    let at = |at: DateTime<Utc>| at.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let stage_of = |pipeline: &Option<crate::domain::PipelineKey>, stage: &str| match pipeline {
        Some(pipeline) => format!("{pipeline}.{stage}"),
        None => stage.to_owned(),
    };
    let context = minijinja::context! {
        as_of => at(view.as_of),
        deal => minijinja::context! {
            id => deal.id,
            title => deal.title,
            connection => deal.connection.as_str(),
            external_id => deal.external_id.as_str(),
            native_pipeline => deal.native_pipeline,
            native_stage => deal.native_stage,
            stage => stage_of(&deal.pipeline, deal.stage.as_str()),
            status => deal.status.to_string(),
            since => when(Some(deal.stage_entered_at), now),
            amount => deal.amount().map_or_else(|| "-".to_owned(), |m| m.to_string()),
            contact => match (&deal.contact_name, &deal.contact_email) {
                (_, None) => "no email address".to_owned(),
                (Some(name), Some(_)) => format!("{name} (has an email address)"),
                (None, Some(_)) => "has an email address".to_owned(),
            },
            consent => match deal.marketing_consent {
                Some(true) => "yes",
                Some(false) => "declined",
                None => "not recorded",
            },
            owner => match (&deal.owner, &deal.owner_email) {
                (Some(name), Some(_)) => format!("{name} (has an email address)"),
                (Some(name), None) => format!("{name} (no email address)"),
                (None, Some(_)) => "has an email address".to_owned(),
                (None, None) => "-".to_owned(),
            },
            deleted => deal.deleted_at.map(|deleted| when(Some(deleted), now)),
        },
        followups => view.followups.iter().map(|f| minijinja::context! {
            rule => f.rule,
            kind => f.kind,
            verdict => f.verdict.as_str(),
            when => f.next_at.map_or_else(|| "-".to_owned(), |next| when(Some(next), now)),
            reason => f.reason,
        }).collect::<Vec<_>>(),
        history => view.history.iter().map(|h| minijinja::context! {
            at => at(h.at),
            from => h.from_stage.as_ref().map_or_else(|| "-".to_owned(), |s| stage_of(&h.from_pipeline, s.as_str())),
            to => stage_of(&h.to_pipeline, h.to_stage.as_str()),
            native => h.native_to,
            cause => h.cause.as_str(),
        }).collect::<Vec<_>>(),
        emails => view.emails.iter().map(|e| minijinja::context! {
            rule => e.rule,
            step => e.step.number(),
            action => e.action.as_str(),
            state => e.state.as_str(),
            due => when(Some(e.due_at), now),
            sent => e.sent_at.map_or_else(|| "-".to_owned(), |sent| when(Some(sent), now)),
            reason => e.reason.clone().unwrap_or_default(),
        }).collect::<Vec<_>>(),
    };
    environment()
        .get_template("deal.html")
        .and_then(|template| template.render(context))
        .map_err(|source| ApiError::Render {
            page: "deal",
            source,
        })
}

/// Each stage's stall cut-off at `now`.
pub fn stall_cutoffs(
    pipelines: &crate::pipeline::Pipelines,
    now: DateTime<Utc>,
) -> Vec<StallCutoff> {
    pipelines
        .iter()
        .flat_map(|pipeline| {
            pipeline.stages.iter().filter_map(move |stage| {
                let limit = chrono::Duration::from_std(stage.stall_after?).ok()?;
                (stage.kind == crate::pipeline::StageKind::Open).then(|| StallCutoff {
                    pipeline: pipeline.key.to_string(),
                    stage: stage.key.to_string(),
                    entered_before: (now - limit).timestamp_millis(),
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_escaped_in_the_page() {
        let template = environment().get_template("status.html").unwrap();
        let html = template
            .render(minijinja::context! {
                generated_at => "now", since => "then", version => "0",
                connections => Vec::<ConnectionView>::new(),
                charts => vec![Chart {
                    key: "sales".into(),
                    label: "<script>alert(1)</script>".into(),
                    height: 34,
                    bars: vec![],
                    bottleneck: None,
                    outcomes: String::new(),
                    stages: vec![StageInfo {
                        label: "Proposal".into(),
                        description: "<b>sent</b>".into(),
                    }],
                }],
                forecast => Vec::<[String; 4]>::new(),
                cart_recovery => Option::<String>::None,
                unmapped => 0,
                stalled => vec![StalledView {
                    id: 1,
                    title: "\"><img src=x onerror=alert(1)>".into(),
                    connection: "crm".into(),
                    stage: "sales.proposal".into(),
                    in_stage: "1d".into(),
                    amount: "-".into(),
                }],
                emails => Vec::<EmailView>::new(),
                email_counts => Vec::<crate::store::OutboxCount>::new(),
            })
            .unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("&lt;b&gt;sent&lt;&#x2f;b&gt;"), "{html}");
    }

    #[test]
    fn basic_credentials_yield_the_password() {
        let mut headers = HeaderMap::new();
        // "anyone:tok:en" — a password may itself hold a colon.
        headers.insert(
            header::AUTHORIZATION,
            "Basic YW55b25lOnRvazplbg==".parse().unwrap(),
        );
        assert_eq!(basic_password(&headers).as_deref(), Some("tok:en"));
    }
}
