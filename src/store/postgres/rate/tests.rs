//! The shared rate limit and daily budget against the real server: several `Database`
//! pools on one test database stand for replicas. Grants are counted by the server
//! times the store returns; the only sleeps are the waits the API answers.

use super::*;
use crate::store::postgres::test_cluster::TestDatabase;
use crate::store::postgres::tests::url_of;
use crate::store::postgres::{Options, test_database};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// `n` replicas' pools on `database`, migrated; 8 connections each, so that three of
/// them and a test running beside stay well within the server's connection slots.
async fn replicas(database: &TestDatabase, n: usize) -> Vec<Database> {
    let options = Options {
        max_connections: 8,
        ..Options::default()
    };
    let mut pools = Vec::new();
    for _ in 0..n {
        pools.push(Database::open(&url_of(database), &options).await.unwrap());
    }
    pools
}

/// What callers saw hammering one bucket.
#[derive(Debug, Default)]
struct Hammered {
    /// Server times of the grants, epoch microseconds, sorted.
    grants: Vec<i64>,
    waits: Vec<Duration>,
}

/// `callers` tasks per replica take tokens of `connection` for `how_long`, each
/// sleeping the wait it is answered before asking again.
async fn hammer(
    replicas: &[Database],
    callers: usize,
    connection: &str,
    rate: Rate,
    how_long: Duration,
) -> Hammered {
    let deadline = Instant::now() + how_long;
    let mut tasks = JoinSet::new();
    for replica in replicas {
        for _ in 0..callers {
            let (replica, connection) = (replica.clone(), connection.to_owned());
            tasks.spawn(async move {
                let mut seen = Hammered::default();
                while Instant::now() < deadline {
                    match replica.try_take(&connection, rate).await.unwrap() {
                        Taken::Granted { at_us } => seen.grants.push(at_us),
                        Taken::Wait { wait } => {
                            seen.waits.push(wait);
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                seen
            });
        }
    }
    let mut all = Hammered::default();
    while let Some(seen) = tasks.join_next().await {
        let seen = seen.unwrap();
        all.grants.extend(seen.grants);
        all.waits.extend(seen.waits);
    }
    all.grants.sort_unstable();
    all
}

/// Every interval between two grants holds at most `burst + rate × interval` grants,
/// by the grants' server times; every wait is positive and at most one token's refill.
fn assert_within(seen: &Hammered, rate: Rate) {
    let grants = &seen.grants;
    for i in 0..grants.len() {
        for j in i..grants.len() {
            let count = (j - i + 1) as f64;
            let interval = (grants[j] - grants[i]) as f64 / 1e6;
            let allowed = f64::from(rate.burst()) + rate.per_second() * interval;
            assert!(
                count <= allowed + 1e-6,
                "{count} grants in {interval:.6} s, more than {allowed:.3} at {} /s with burst {}",
                rate.per_second(),
                rate.burst()
            );
        }
    }
    for wait in &seen.waits {
        assert!(
            *wait > Duration::ZERO && *wait <= rate.period(),
            "wait {wait:?} outside (0, {:?}]",
            rate.period()
        );
    }
}

async fn hammered_by(test: &str, replica_count: usize) {
    let Some(database) = test_database(test) else {
        return;
    };
    let replicas = replicas(&database, replica_count).await;
    let rate = Rate::new(20.0, 4).unwrap();
    let seen = hammer(&replicas, 2, "crm", rate, Duration::from_millis(2500)).await;
    assert_within(&seen, rate);
    // The bucket refilled and was shared: more than the burst, and callers were told
    // to wait (each replica alone would have been granted up to its own burst + rate).
    assert!(
        seen.grants.len() > rate.burst() as usize,
        "{} grants",
        seen.grants.len()
    );
    assert!(!seen.waits.is_empty());
    let span = (seen.grants[seen.grants.len() - 1] - seen.grants[0]) as f64 / 1e6;
    eprintln!(
        "{replica_count} replicas: {} grants in {span:.3} s at 20/s burst 4, {} waits",
        seen.grants.len(),
        seen.waits.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hammering_one_bucket_never_exceed_its_rate_and_burst_together() {
    hammered_by(
        "two_replicas_hammering_one_bucket_never_exceed_its_rate_and_burst_together",
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hammering_one_bucket_never_exceed_its_rate_and_burst_together() {
    hammered_by(
        "three_replicas_hammering_one_bucket_never_exceed_its_rate_and_burst_together",
        3,
    )
    .await;
}

#[tokio::test]
async fn a_spent_bucket_answers_a_wait_after_which_the_next_token_is_there() {
    let Some(database) =
        test_database("a_spent_bucket_answers_a_wait_after_which_the_next_token_is_there")
    else {
        return;
    };
    let store = &replicas(&database, 1).await[0];
    let rate = Rate::new(5.0, 2).unwrap();
    for _ in 0..2 {
        assert!(matches!(
            store.try_take("crm", rate).await.unwrap(),
            Taken::Granted { .. }
        ));
    }
    let Taken::Wait { wait } = store.try_take("crm", rate).await.unwrap() else {
        panic!("a third token within the burst of 2");
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    assert!(matches!(
        store.try_take("crm", rate).await.unwrap(),
        Taken::Granted { .. }
    ));
}

#[tokio::test]
async fn one_connections_bucket_does_not_affect_anothers() {
    let Some(database) = test_database("one_connections_bucket_does_not_affect_anothers") else {
        return;
    };
    let pools = replicas(&database, 2).await;
    // One token per 10 s: nothing refills during the test.
    let rate = Rate::new(0.1, 3).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            pools[0].try_take("crm-a", rate).await.unwrap(),
            Taken::Granted { .. }
        ));
    }
    let Taken::Wait { wait } = pools[1].try_take("crm-a", rate).await.unwrap() else {
        panic!("crm-a's bucket was not shared with the other replica");
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(10),
        "{wait:?}"
    );
    for pool in [&pools[1], &pools[0], &pools[1]] {
        assert!(matches!(
            pool.try_take("crm-b", rate).await.unwrap(),
            Taken::Granted { .. }
        ));
    }
    assert!(matches!(
        pools[0].try_take("crm-b", rate).await.unwrap(),
        Taken::Wait { .. }
    ));
}

fn day(text: &str) -> NaiveDate {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_100_spent_by_three_replicas_at_once_grants_exactly_100() {
    let Some(database) =
        test_database("a_budget_of_100_spent_by_three_replicas_at_once_grants_exactly_100")
    else {
        return;
    };
    let pools = replicas(&database, 3).await;
    let today = day("2026-12-04");
    let mut tasks = JoinSet::new();
    for pool in &pools {
        for _ in 0..100 {
            let pool = pool.clone();
            tasks.spawn(async move { pool.spend("crm", today, 100).await.unwrap() });
        }
    }
    let mut remaining = Vec::new();
    let mut spent = 0;
    while let Some(answer) = tasks.join_next().await {
        match answer.unwrap() {
            BudgetAnswer::Granted { remaining: left } => remaining.push(left),
            BudgetAnswer::Spent => spent += 1,
        }
    }
    remaining.sort_unstable();
    // Each grant saw its own count: 99 left after the first, …, 0 after the last.
    assert_eq!(remaining, (0..100).collect::<Vec<u32>>());
    assert_eq!(spent, 200);
    assert_eq!(
        pools[2].spend("crm", today, 100).await.unwrap(),
        BudgetAnswer::Spent
    );
    let used: i64 = database
        .admin()
        .await
        .query_one(
            "SELECT used FROM request_budgets WHERE connection = 'crm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, 100);
}

#[tokio::test]
async fn a_new_utc_day_starts_at_zero_and_each_connection_has_its_own_budget() {
    let Some(database) =
        test_database("a_new_utc_day_starts_at_zero_and_each_connection_has_its_own_budget")
    else {
        return;
    };
    let pools = replicas(&database, 2).await;
    let (today, tomorrow) = (day("2026-12-31"), day("2027-01-01"));
    assert_eq!(
        pools[0].spend("crm", today, 2).await.unwrap(),
        BudgetAnswer::Granted { remaining: 1 }
    );
    assert_eq!(
        pools[1].spend("crm", today, 2).await.unwrap(),
        BudgetAnswer::Granted { remaining: 0 }
    );
    assert_eq!(
        pools[0].spend("crm", today, 2).await.unwrap(),
        BudgetAnswer::Spent
    );
    assert_eq!(
        pools[1].spend("crm", tomorrow, 2).await.unwrap(),
        BudgetAnswer::Granted { remaining: 1 }
    );
    assert_eq!(
        pools[0].spend("shop", today, 2).await.unwrap(),
        BudgetAnswer::Granted { remaining: 1 }
    );
    // A lowered limit below what was spent grants nothing; a limit of 0 writes nothing.
    assert_eq!(
        pools[0].spend("crm", tomorrow, 1).await.unwrap(),
        BudgetAnswer::Spent
    );
    assert_eq!(
        pools[0].spend("mail", today, 0).await.unwrap(),
        BudgetAnswer::Spent
    );
    let rows: i64 = database
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM request_budgets WHERE connection = 'mail'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[test]
fn a_rate_is_a_positive_number_and_its_burst_at_least_one() {
    for per_second in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(Rate::new(per_second, 5), None, "{per_second}");
    }
    let rate = Rate::new(4.0, 0).unwrap();
    assert_eq!(rate.burst(), 1);
    assert_eq!(rate.period(), Duration::from_millis(250));
}

#[test]
fn the_wait_for_a_token_is_positive_and_at_most_one_refill() {
    let rate = Rate::new(4.0, 2).unwrap();
    assert_eq!(token_wait(0.0, rate), Duration::from_millis(250));
    assert_eq!(token_wait(0.5, rate), Duration::from_millis(125));
    assert_eq!(token_wait(1.0 - 1e-12, rate), Duration::from_micros(1));
    assert_eq!(token_wait(-0.5, rate), Duration::from_millis(250));
}
