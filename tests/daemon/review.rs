//! The weekly pipeline review (`review = "DAY HH:MM:SS"`): sent once per week to its
//! fixed address, even across a restart, with the figures `dealsync report` gives for
//! the same two weeks.
//!
//! The history is tests/fixtures/report_history.sql (docs/report.md, "Worked
//! example"), moved in time so that its February 1 falls on the review's slot: the week
//! reviewed is then its January 25–February 1, and the week before January 18–25.

use crate::emails::read;
use crate::followups::{CANARY_RULE, config, header, messages_to, put_deal, store};
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::smtp::SmtpServer;
use crate::harness::{clear_of_utc_midnight, eventually};
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const TO: &str = "sales-ops@example.com";

fn review_rule(slot: DateTime<Utc>) -> String {
    format!(
        r#"
[followups.weekly]
kind = "transactional"
to = "{TO}"
template = "weekly_review"
review = "{}"
time_zone = "UTC"
late_grace = "1h"
"#,
        slot.format("%A %H:%M:%S")
    )
}

/// Loads the report fixture into the daemon's database, its times moved by `shift`.
fn load_shifted_fixture(daemon: &TestDaemon, shift: chrono::Duration) {
    let db = daemon.db();
    db.execute_batch(crate::report::FIXTURE)
        .expect("loading the fixture");
    let ms = shift.num_milliseconds();
    for sql in [
        "UPDATE stage_history SET at = at + ?1",
        "UPDATE outbox SET due_at = due_at + ?1, created_at = created_at + ?1,
             updated_at = updated_at + ?1, sent_at = sent_at + ?1, anchor_at = anchor_at + ?1,
             next_attempt_at = next_attempt_at + ?1",
    ] {
        db.execute(sql, [ms]).expect(sql);
    }
    // The fixture leaves every deal's stage entry at 0: its last history row's time.
    db.execute(
        "UPDATE deals SET stage_entered_at = (SELECT max(at) FROM stage_history h
             WHERE h.deal_id = deals.id)
         WHERE id IN (SELECT deal_id FROM stage_history)",
        [],
    )
    .expect("stage entry times");
}

async fn report(daemon: &TestDaemon, since: DateTime<Utc>, until: DateTime<Utc>) -> Value {
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (since, until) = (
        since.to_rfc3339_opts(SecondsFormat::Secs, true),
        until.to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    let args = [
        "--config", &config, "report", "--since", &since, "--until", &until, "--format", "json",
    ];
    let (code, stdout, stderr) = run_cli(&args, &[]).await;
    assert_eq!(code, 0, "report: {stderr}");
    serde_json::from_str(&stdout).expect("report JSON")
}

fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{:.0} %", v * 100.0))
}

fn days(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s / 86_400.0))
}

fn money(totals: &Value) -> Vec<String> {
    totals
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{} {}",
                t["amount"].as_str().unwrap(),
                t["currency"].as_str().unwrap()
            )
        })
        .collect()
}

fn pipeline<'v>(report: &'v Value, key: &str) -> &'v Value {
    report["total"]["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pipeline"] == key)
        .unwrap()
}

#[tokio::test]
async fn the_weekly_review_arrives_once_a_week_with_the_figures_of_report_for_both_weeks() {
    clear_of_utc_midnight(Duration::from_secs(90)).await;
    let smtp = SmtpServer::start().await;
    let mut daemon = TestDaemon::start(&config(&smtp, "", "")).await;
    // The slot a few seconds ago, to the second: the daemon catches it up at once.
    let slot = Utc
        .timestamp_opt(Utc::now().timestamp() - 5, 0)
        .single()
        .unwrap();
    let february = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
    load_shifted_fixture(&daemon, slot - february);
    daemon
        .kill_and_restart_with_config(&config(
            &smtp,
            "",
            &format!("{}{CANARY_RULE}", review_rule(slot)),
        ))
        .await;

    let mails = eventually("the weekly review", WAIT, || async {
        let mails = messages_to(&smtp, TO);
        (!mails.is_empty()).then_some(mails)
    })
    .await;
    assert_eq!(mails.len(), 1);
    let day = slot.date_naive().to_string();
    assert_eq!(
        header(&mails[0].data, "X-Dealsync-Idempotency-Key").unwrap(),
        format!("digest-weekly-{day}-{TO}")
    );
    let email = read(&mails[0].data);
    email.assert_well_formed();

    // The same two weeks through `dealsync report`.
    let week = chrono::Duration::days(7);
    let this = report(&daemon, slot - week, slot).await;
    let before = report(&daemon, slot - week - week, slot - week).await;
    for key in ["sales", "ecommerce"] {
        let (p, b) = (pipeline(&this, key), pipeline(&before, key));
        for (stage, earlier) in p["stages"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["stages"].as_array().unwrap())
            .filter(|(s, _)| s["kind"] == "open")
        {
            let (entered, entered_before) = (
                stage["entered"].as_i64().unwrap(),
                earlier["entered"].as_i64().unwrap(),
            );
            let change = entered - entered_before;
            let line = format!(
                "{}: entered {entered} (before {entered_before}, {}), conversion {} ({}), median days {} ({})",
                stage["label"].as_str().unwrap(),
                if change > 0 {
                    format!("+{change}")
                } else {
                    change.to_string()
                },
                percent(&stage["conversion"]),
                percent(&earlier["conversion"]),
                days(&stage["time_in_stage"]["median_seconds"]),
                days(&earlier["time_in_stage"]["median_seconds"]),
            );
            assert!(
                email.text.contains(&line),
                "{line:?} missing in\n{}",
                email.text
            );
        }
        let (o, ob) = (&p["outcomes"], &b["outcomes"]);
        let won = format!(
            "Won {} (the week before: {})",
            o["won"].as_i64().unwrap(),
            ob["won"].as_i64().unwrap()
        );
        assert!(
            email.text.contains(&won),
            "{won:?} missing in\n{}",
            email.text
        );
        for value in money(&o["won_value"]) {
            assert!(email.text.contains(&value), "{value} missing");
        }
        if let Some(stage) = p["bottleneck"]["stage"].as_str() {
            let label = p["stages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["stage"] == stage)
                .unwrap()["label"]
                .as_str()
                .unwrap();
            assert!(
                email.text.contains(&format!("Bottleneck: {label} (")),
                "bottleneck {label} missing in\n{}",
                email.text
            );
        }
    }
    // Figures the fixture makes non-trivial, so the comparison above compares something:
    // in the week reviewed D and M entered proposal, C was won the week before.
    assert!(
        email.text.contains("Proposal: entered 2 (before 0, +2)"),
        "{}",
        email.text
    );
    assert!(
        email.text.contains("Won 0 (the week before: 1)"),
        "{}",
        email.text
    );
    assert!(
        email.text.contains("8000.00 USD"),
        "C's value, won the week before"
    );
    // B's needs-assessment stall (14 days after Jan 14) fell within the week.
    assert!(
        email
            .text
            .contains("- Moves backwards (crm-eu): Needs Assessment"),
        "{}",
        email.text
    );
    let carts = &this["total"]["cart_recovery"];
    let line = format!(
        "Cart recovery: {} abandoned (before: {})",
        carts["abandoned"].as_i64().unwrap(),
        before["total"]["cart_recovery"]["abandoned"]
            .as_i64()
            .unwrap()
    );
    assert!(
        email.text.contains(&line),
        "{line:?} missing in\n{}",
        email.text
    );
    eventually("the review recorded as sent", WAIT, || async {
        (daemon.count("SELECT count(*) FROM digests WHERE state = 'sent'") == 1).then_some(())
    })
    .await;

    // A crash and restart in the same week: the week was assembled, nothing is resent.
    // The canary alert shows the worker made a pass after the restart (digest assembly
    // comes first in every pass).
    daemon.kill_and_restart().await;
    put_deal(
        &store(&daemon),
        "k1",
        "closing",
        None,
        chrono::Duration::zero(),
        1,
    )
    .await;
    eventually("the canary alert after the restart", WAIT, || async {
        (!messages_to(&smtp, "canary@example.com").is_empty()).then_some(())
    })
    .await;
    assert_eq!(messages_to(&smtp, TO).len(), 1);
    assert_eq!(daemon.count("SELECT count(*) FROM digests"), 1);
    assert_eq!(daemon.count("SELECT count(*) FROM digest_runs"), 1);
}
