//! Replicas: several `dealsync run` processes of the real binary on one PostgreSQL
//! database (the test process's throwaway cluster), against a mock HubSpot, signed
//! Shopify webhooks and the real SMTP test server. What the issue asks of them: every
//! acknowledged webhook stored once whichever replica took it, each connection polled
//! by one replica at a time and by another within the lease bound after a SIGKILL, no
//! email received twice, every due email sent or recorded uncertain.

use crate::followups;
use crate::harness::daemon::TestDaemon;
use crate::harness::eventually;
use crate::harness::postgres::{self, PASSWORD, PASSWORD_ROLE, TestDatabase};
use crate::harness::postgres_database as database;
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::hubspot::HubSpot;
use crate::webhooks::{SHOP_SECRET, checkout, post, shopify, shopify_headers};
use chrono::Utc;
use dealsync::store::Store;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
/// The lease time the replicas run with (`storage.failover_after`, its minimum).
const FAILOVER_AFTER: Duration = Duration::from_secs(3);
/// The issue's bound on a dead replica's connections being polled again.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);
const PASSWORD_VAR: &str = "DEALSYNC_TEST_PG_PASSWORD";
const API_TOKEN: &str = "replica-api-token-0123";

/// The `[storage]` lines of a replica on `database`, the password through the
/// environment ([`PASSWORD_VAR`]).
fn storage(database: &TestDatabase) -> String {
    format!(
        "url = \"postgres://{PASSWORD_ROLE}:${{{PASSWORD_VAR}}}@127.0.0.1:{}/{}\"\nfailover_after = \"{}s\"",
        database.port,
        database.name,
        FAILOVER_AFTER.as_secs()
    )
}

async fn replica(database: &TestDatabase, body: &str) -> TestDaemon {
    TestDaemon::start_on(&storage(database), body, &[(PASSWORD_VAR, PASSWORD)]).await
}

/// The leases a replica's `/readyz` lists.
async fn leases(daemon: &TestDaemon) -> Vec<String> {
    let (_, body) = daemon.get("/readyz").await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    report["leases"]
        .as_object()
        .map(|leases| leases.keys().cloned().collect())
        .unwrap_or_default()
}

/// Posts `count` signed Shopify checkouts (tokens `prefix-N`) to `daemons` in turn;
/// returns the tokens acknowledged with a 2xx.
async fn post_checkouts(daemons: &[&TestDaemon], prefix: &str, count: usize) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for n in 0..count {
        let token = format!("{prefix}-{n}");
        let body = checkout(
            &token,
            &Utc::now().to_rfc3339(),
            &format!("{token}@example.com"),
        );
        let headers = shopify_headers(SHOP_SECRET, "checkouts/create", &token, &body);
        let (status, answer) = post(daemons[n % daemons.len()], "shop", headers, body).await;
        assert!((200..300).contains(&status), "{token}: {status} {answer}");
        acknowledged.push(token);
    }
    acknowledged
}

/// Two replicas under webhooks, a polled HubSpot and a burst of follow-ups; the one
/// polling HubSpot is SIGKILLed mid-burst. Fails on the old code, where `run` refuses
/// `storage.url`; and without the claims (both replicas send the same rows), the poll
/// lease (both poll, or nobody after the kill) or the reclaim rule (rows the dead
/// replica held stay `sending`).
#[tokio::test]
async fn two_replicas_share_the_work_and_a_sigkilled_one_loses_and_doubles_nothing() {
    share_the_work_through_kills(
        "two_replicas_share_the_work_and_a_sigkilled_one_loses_and_doubles_nothing",
        2,
        1,
    )
    .await;
}

/// Three replicas; the poll holder is SIGKILLed, then the replica that took over: the
/// last one polls, sends and stores what is left.
#[tokio::test]
async fn three_replicas_survive_two_sigkills_one_after_the_other() {
    share_the_work_through_kills(
        "three_replicas_survive_two_sigkills_one_after_the_other",
        3,
        2,
    )
    .await;
}

/// `count` replicas share webhooks, HubSpot's polling and 300 follow-ups; `kills` times
/// the replica holding HubSpot's poll lease is SIGKILLed mid-work, and another must
/// take the lease and poll within the bound. Then: every acknowledged webhook stored
/// once, every source deal once, no email twice, every row sent or uncertain.
async fn share_the_work_through_kills(test: &str, count: usize, kills: usize) {
    let Some(database) = database(test) else {
        return;
    };
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_deals(1001..=1006, "appointmentscheduled");
    let body = format!(
        "api_token = \"{API_TOKEN}\"\n{}{}{}",
        followups::config(
            &smtp,
            // A short SMTP timeout: an email the killed replica was sending becomes
            // `uncertain` ten of it later (`send_claim_ttl`).
            "pool_size = 4\ntimeout = \"1s\"",
            r#"
[followups.owner_alert]
kind = "transactional"
stage = "sales.proposal"
to = "team@example.com"
template = "deal_stalled"
after = "1s"
"#,
        ),
        crate::pull::hubspot_connection("hs", &hubspot.url(), ""),
        shopify("shop", "1h"),
    );
    let mut replicas = Vec::new();
    for _ in 0..count {
        replicas.push(replica(&database, &body).await);
    }
    let admin = database.admin().await;
    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    eventually("the HubSpot deals pulled", WAIT, || async {
        (count("SELECT count(*) FROM deals WHERE connection = 'hs'").await == 6).then_some(())
    })
    .await;

    // Webhooks through every replica, and a burst of follow-ups to send.
    let all: Vec<&TestDaemon> = replicas.iter().collect();
    let mut acknowledged = post_checkouts(&all, "before", 40).await;
    let total = 300;
    let store = Store::open_postgres(
        &dealsync::config::PostgresUrl::parse(&dealsync::config::Secret::new(database.url()))
            .unwrap(),
    )
    .await
    .unwrap();
    let now = Utc::now();
    store
        .upsert_deals((0..total).map(|n| followups::in_proposal(n, now)).collect())
        .await
        .unwrap();

    let mut failovers = Vec::new();
    for kill in 1..=kills {
        eventually("the burst to be under way", WAIT, || async {
            (smtp.messages().len() >= 20 * kill).then_some(())
        })
        .await;
        // Exactly one replica polls HubSpot; SIGKILL it.
        let holder = eventually(
            "one replica to hold the HubSpot poll lease",
            WAIT,
            || async {
                let mut holders = Vec::new();
                for (index, daemon) in replicas.iter().enumerate() {
                    if leases(daemon).await.contains(&"poll:hs".to_owned()) {
                        holders.push(index);
                    }
                }
                (holders.len() == 1).then(|| holders[0])
            },
        )
        .await;
        let mut killed = replicas.remove(holder);
        killed.signal("KILL");
        killed.wait_exit(Duration::from_secs(10)).await;
        let killed_at = Instant::now();
        let polls_before = hubspot.faults().count("/crm/v3/objects/deals");
        eventually(
            "another replica to take the HubSpot poll lease",
            FAILOVER_BOUND,
            || async {
                for daemon in &replicas {
                    if leases(daemon).await.contains(&"poll:hs".to_owned()) {
                        return Some(());
                    }
                }
                None
            },
        )
        .await;
        eventually("HubSpot polled again", FAILOVER_BOUND, || async {
            (hubspot.faults().count("/crm/v3/objects/deals") > polls_before).then_some(())
        })
        .await;
        let failover = killed_at.elapsed();
        assert!(
            failover <= FAILOVER_BOUND,
            "polled again after {failover:?}"
        );
        failovers.push(failover);
        let left: Vec<&TestDaemon> = replicas.iter().collect();
        acknowledged.extend(post_checkouts(&left, &format!("after-{kill}"), 20).await);
    }
    let survivor = &replicas[0];

    let states = || async {
        admin
            .query(
                "SELECT state, count(*) FROM outbox GROUP BY state ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    };
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            let open =
                count("SELECT count(*) FROM outbox WHERE state IN ('pending', 'sending')").await;
            if open == 0 && count("SELECT count(*) FROM outbox").await == total as i64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "every follow-up settled within {WAIT:?}: {:?}\n{}",
        states().await,
        survivor.logs()
    );
    eventually("every acknowledged webhook applied", WAIT, || async {
        (count("SELECT count(*) FROM deals WHERE connection = 'shop'").await
            == acknowledged.len() as i64)
            .then_some(())
    })
    .await;

    // Every acknowledged checkout stored once, as a deal of its own.
    let stored: Vec<String> = admin
        .query(
            "SELECT external_id FROM deals WHERE connection = 'shop' ORDER BY external_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(stored.len(), acknowledged.len(), "one deal per checkout");
    let distinct: std::collections::BTreeSet<&String> = stored.iter().collect();
    assert_eq!(distinct.len(), stored.len(), "no checkout stored twice");
    assert_eq!(
        count("SELECT count(*) FROM deals WHERE connection = 'hs'").await,
        6,
        "each source deal once"
    );

    // No email twice; every row sent or shown as uncertain.
    let mails = smtp.messages();
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for mail in &mails {
        *per_key
            .entry(followups::header(&mail.data, "X-Dealsync-Idempotency-Key").unwrap())
            .or_default() += 1;
    }
    let doubled: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "sent twice: {doubled:?}");
    let sent = count("SELECT count(*) FROM outbox WHERE state = 'sent'").await;
    let uncertain = count("SELECT count(*) FROM outbox WHERE state = 'uncertain'").await;
    assert_eq!(
        sent + uncertain,
        total as i64,
        "every row sent or uncertain"
    );
    assert!(mails.len() as i64 >= sent && mails.len() as i64 <= total as i64);

    // The read API and the status page answer on the survivor from the shared store.
    let read = |path: String| async move {
        let response = survivor
            .http
            .get(survivor.url(&path))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let (status, deals) = read("/api/v1/deals?connection=hs".into()).await;
    assert_eq!(status, 200, "{deals}");
    assert!(deals.contains("\"1001\""), "{deals}");
    let some_deal: i64 = count("SELECT min(id) FROM deals WHERE connection = 'crm'").await;
    let (status, deal) = read(format!("/api/v1/deals/{some_deal}")).await;
    assert_eq!(status, 200, "{deal}");
    assert!(
        deal.contains("owner_alert"),
        "the deal's follow-ups: {deal}"
    );
    for path in ["/api/v1/funnel", "/api/v1/outbox", "/"] {
        let (status, body) = read(path.into()).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, page) = read(format!("/deals/{some_deal}")).await;
    assert_eq!(status, 200, "{page}");
    eprintln!("{test}: failovers {failovers:?}; {sent} sent, {uncertain} uncertain");
}

/// PostgreSQL out of reach under webhook load (a relay in front of the server cut, as
/// a restart or a partition does to this replica), then back: every delivery meanwhile
/// is answered 503 with `Retry-After` or stored, never a 2xx for one that was not
/// committed; the replica reconnects by itself and stores and applies deliveries again.
#[tokio::test]
async fn a_replica_answers_503_with_retry_after_while_postgres_is_away_and_goes_on_after() {
    let test = "a_replica_answers_503_with_retry_after_while_postgres_is_away_and_goes_on_after";
    let Some(database) = database(test) else {
        return;
    };
    let relay = postgres::Relay::start(database.port).await;
    let through_relay = TestDatabase {
        port: relay.port(),
        ..database.clone()
    };
    let daemon = replica(&through_relay, &shopify("shop", "1h")).await;
    let admin = database.admin().await;

    // (token, status, Retry-After) of each delivery, in order.
    let mut answers: Vec<(String, u16, Option<String>)> = Vec::new();
    let post_one = async |n: usize| {
        let token = format!("t-{n}");
        let body = checkout(
            &token,
            &Utc::now().to_rfc3339(),
            &format!("{token}@example.com"),
        );
        let headers = shopify_headers(SHOP_SECRET, "checkouts/create", &token, &body);
        let response = daemon
            .http
            .post(daemon.url("/webhooks/shop"))
            .headers(headers)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST webhook");
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_owned());
        (token, response.status().as_u16(), retry_after)
    };
    for n in 0..20 {
        answers.push(post_one(n).await);
    }
    relay.cut().await;
    for n in 20..40 {
        answers.push(post_one(n).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.restore().await;
    let restored = Instant::now();
    let mut n = 40;
    loop {
        let answer = post_one(n).await;
        n += 1;
        let stored = (200..300).contains(&answer.1);
        answers.push(answer);
        if stored {
            break;
        }
        assert!(
            restored.elapsed() < WAIT,
            "no delivery stored {WAIT:?} after the server came back: {:?}\n{}",
            answers.last(),
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for extra in n..n + 10 {
        answers.push(post_one(extra).await);
    }

    // During the outage: 503 with a Retry-After, or stored (committed before the cut).
    let outage = &answers[20..40];
    assert!(
        outage
            .iter()
            .all(|(_, status, retry_after)| (200..300).contains(status)
                || (*status == 503 && retry_after.is_some())),
        "every delivery during the outage stored or refused with 503 and Retry-After: {outage:?}"
    );
    assert!(
        outage.iter().any(|(_, status, _)| *status == 503),
        "the outage was seen: {outage:?}"
    );
    assert!(
        answers[answers.len() - 10..]
            .iter()
            .all(|(_, status, _)| (200..300).contains(status)),
        "after the server came back every delivery is stored: {:?}",
        &answers[answers.len() - 10..]
    );
    // Every 2xx was committed, and every committed delivery is applied as a deal.
    let acknowledged: std::collections::BTreeSet<String> = answers
        .iter()
        .filter(|(_, status, _)| (200..300).contains(status))
        .map(|(token, _, _)| token.clone())
        .collect();
    let stored = |sql: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect::<std::collections::BTreeSet<String>>()
        }
    };
    let inbox = stored("SELECT delivery_id FROM webhook_inbox").await;
    assert!(
        acknowledged.is_subset(&inbox),
        "acknowledged but not stored: {:?}",
        acknowledged.difference(&inbox).collect::<Vec<_>>()
    );
    eventually("every stored delivery applied", WAIT, || async {
        let open = admin
            .query_one(
                "SELECT count(*) FROM webhook_inbox WHERE state IN ('pending', 'claimed')",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        (open == 0).then_some(())
    })
    .await;
    let deals = stored("SELECT external_id FROM deals WHERE connection = 'shop'").await;
    assert_eq!(deals.len(), inbox.len(), "one deal per stored checkout");
}
