//! The coordination of replicas (`leases`, `claims`, leadership) against the real
//! server: several `Database` pools on one test database stand for several replicas.
//! Waits are on conditions ([`eventually`], watches), never fixed sleeps; the lease
//! ttl is 2 s so that expiries come quickly.

use super::claims::{self, Claimed};
use super::leases::{self, HeldLease, KeeperTiming, LeaseKeeper};
use super::tests::url_of;
use super::*;
use std::collections::HashSet;
use std::future::Future;
use test_cluster::TestDatabase;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

/// What a statement may add to a bound on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(400);

/// Polls `probe` every 20 ms until it returns `Some`; panics naming `what` once
/// `timeout` has passed.
async fn eventually<T, Fut>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica's own pool on `database`, migrated.
async fn replica(database: &TestDatabase) -> Database {
    Database::open(&url_of(database), &Options::default())
        .await
        .unwrap()
}

/// Waits until `watch` shows the lease held, at most `timeout`.
async fn held(watch: &mut watch::Receiver<Option<HeldLease>>, timeout: Duration) -> HeldLease {
    tokio::time::timeout(timeout, watch.wait_for(Option::is_some))
        .await
        .unwrap_or_else(|_| panic!("the lease was not held within {timeout:?}"))
        .unwrap()
        .clone()
        .unwrap()
}

/// The cursor write a polling replica makes, fenced by its lease: rows changed.
async fn fenced_cursor_write(replica: &Database, lease: &leases::Lease, value: &str) -> u64 {
    let client = replica.client().await.unwrap();
    client
        .execute(
            &format!(
                "UPDATE sync_cursors SET value = $3 WHERE connection = 'crm' AND stream = 'deals'
                   AND {}",
                leases::fence(1, 2)
            ),
            &[&lease.name, &lease.token, &value],
        )
        .await
        .unwrap()
}

async fn cursor(database: &TestDatabase) -> String {
    database
        .admin()
        .await
        .query_one(
            "SELECT value FROM sync_cursors WHERE connection = 'crm' AND stream = 'deals'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn two_holders_racing_for_a_lease_get_it_exactly_once() {
    let Some(database) = test_database("two_holders_racing_for_a_lease_get_it_exactly_once") else {
        return;
    };
    let (a, b) = (replica(&database).await, replica(&database).await);
    for n in 0..20 {
        let name = format!("poll:crm-{n}");
        let (got_a, got_b) = tokio::join!(
            a.try_acquire(&name, "replica-a", TTL),
            b.try_acquire(&name, "replica-b", TTL)
        );
        let (got_a, got_b) = (got_a.unwrap(), got_b.unwrap());
        assert!(
            got_a.is_some() != got_b.is_some(),
            "{name}: {got_a:?} {got_b:?}"
        );
        let winner = got_a.or(got_b).unwrap();
        assert_eq!(winner.token, 1);
        // Re-acquiring one's own live lease is the same acquisition: same token.
        let again = a
            .try_acquire(&name, &winner.holder, TTL)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.token, winner.token);
    }
    let holders = a.holders().await.unwrap();
    assert_eq!(holders.len(), 20, "{holders:?}");
}

#[tokio::test]
async fn a_lease_not_renewed_passes_on_after_its_ttl_with_a_higher_token_and_fences_the_old_holder()
{
    let Some(database) = test_database(
        "a_lease_not_renewed_passes_on_after_its_ttl_with_a_higher_token_and_fences_the_old_holder",
    ) else {
        return;
    };
    let (a, b) = (replica(&database).await, replica(&database).await);
    database
        .admin()
        .await
        .execute(
            "INSERT INTO sync_cursors VALUES ('crm', 'deals', 'page-0', 0)",
            &[],
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut old = a
        .try_acquire("poll:crm", "replica-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fenced_cursor_write(&a, &old, "page-1-by-a").await, 1);

    // Replica b keeps trying, every ttl/3; a never renews (it stalled, or died).
    let shutdown = CancellationToken::new();
    let timing = KeeperTiming::for_ttl(TTL);
    let keeper = LeaseKeeper::spawn(
        b.clone(),
        "poll:crm".to_owned(),
        "replica-b".to_owned(),
        timing,
        shutdown.clone(),
    );
    let new = held(&mut keeper.watch(), TTL * 3).await.lease;
    let took = started.elapsed();
    assert!(
        took <= TTL + timing.renew_every + SLACK,
        "took over after {took:?}"
    );
    assert!(new.token > old.token, "{new:?} after {old:?}");
    // Not before the old lease expired, by the server's clock.
    let holders = b.holders().await.unwrap();
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_eq!(holders[0].holder, "replica-b");
    assert!(
        holders[0].acquired_at >= old.expires_at,
        "{holders:?} {old:?}"
    );

    // The old holder learns it lost the lease, and its fenced write changes nothing.
    assert!(!a.renew(&mut old, TTL).await.unwrap());
    assert_eq!(fenced_cursor_write(&a, &old, "page-2-by-a").await, 0);
    assert_eq!(fenced_cursor_write(&b, &new, "page-2-by-b").await, 1);
    assert_eq!(cursor(&database).await, "page-2-by-b");
    // Releasing what one no longer holds changes nothing either.
    assert!(!a.release(&old).await.unwrap());

    shutdown.cancel();
    keeper.join().await;
    // Released on shutdown: free at once, and the token goes on growing.
    assert!(b.holders().await.unwrap().is_empty());
    let next = a
        .try_acquire("poll:crm", "replica-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.token, new.token + 1);
}

#[tokio::test]
async fn a_keeper_whose_renewals_hang_stops_the_duty_before_the_lease_expires_at_the_server() {
    let Some(database) = test_database(
        "a_keeper_whose_renewals_hang_stops_the_duty_before_the_lease_expires_at_the_server",
    ) else {
        return;
    };
    let replica_a = replica(&database).await;
    let shutdown = CancellationToken::new();
    let keeper = LeaseKeeper::spawn(
        replica_a.clone(),
        "poll:crm".to_owned(),
        "replica-a".to_owned(),
        KeeperTiming::for_ttl(TTL),
        shutdown.clone(),
    );
    let mut watch = keeper.watch();
    let holding = held(&mut watch, TTL).await;

    // The lease row locked by another session: every renewal now waits at the server,
    // as it would on a server that stopped answering.
    let mut admin = database.admin().await;
    let blocker = admin.transaction().await.unwrap();
    blocker
        .execute(
            "SELECT 1 FROM leases WHERE name = 'poll:crm' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    tokio::time::timeout(TTL * 2, holding.lost.cancelled())
        .await
        .expect("the keeper signals the loss");
    // Invariant: the duty was told while the server still counted the lease as held,
    // so no other replica could have started it yet.
    let still_valid: bool = blocker
        .query_one(
            "SELECT expires_at > clock_timestamp() FROM leases WHERE name = 'poll:crm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(still_valid, "the loss came after the lease had expired");
    assert!(watch.borrow().is_none());

    // The server answers again: the keeper holds the lease again.
    blocker.rollback().await.unwrap();
    let again = held(&mut watch, TTL * 3).await;
    assert!(!again.lost.is_cancelled());
    shutdown.cancel();
    keeper.join().await;
    assert!(again.lost.is_cancelled(), "shutdown stops the duty too");
}

#[tokio::test]
async fn a_keeper_whose_lease_was_taken_stops_the_duty_at_its_next_renewal_and_takes_it_back_later()
{
    let Some(database) = test_database(
        "a_keeper_whose_lease_was_taken_stops_the_duty_at_its_next_renewal_and_takes_it_back_later",
    ) else {
        return;
    };
    let replica_a = replica(&database).await;
    let shutdown = CancellationToken::new();
    let timing = KeeperTiming::for_ttl(TTL);
    let keeper = LeaseKeeper::spawn(
        replica_a.clone(),
        "poll:crm".to_owned(),
        "replica-a".to_owned(),
        timing,
        shutdown.clone(),
    );
    let mut watch = keeper.watch();
    let first = held(&mut watch, TTL).await;
    // As if the lease had expired and another replica had taken it.
    let taken = Instant::now();
    database
        .admin()
        .await
        .execute(
            "UPDATE leases SET holder = 'intruder', token = token + 1,
                 expires_at = clock_timestamp() + interval '2 seconds'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::timeout(timing.renew_every + SLACK, first.lost.cancelled())
        .await
        .expect("the next renewal finds the lease taken");
    assert!(taken.elapsed() <= timing.renew_every + SLACK);
    let back = held(&mut watch, TTL * 3).await;
    assert_eq!(back.lease.token, first.lease.token + 2);
    shutdown.cancel();
    keeper.join().await;
}

#[tokio::test]
async fn a_keeper_rides_out_a_terminated_connection_without_losing_its_lease() {
    let Some(database) =
        test_database("a_keeper_rides_out_a_terminated_connection_without_losing_its_lease")
    else {
        return;
    };
    let replica_a = replica(&database).await;
    let shutdown = CancellationToken::new();
    let keeper = LeaseKeeper::spawn(
        replica_a.clone(),
        "poll:crm".to_owned(),
        "replica-a".to_owned(),
        KeeperTiming::for_ttl(TTL),
        shutdown.clone(),
    );
    let holding = held(&mut keeper.watch(), TTL).await;
    let admin = database.admin().await;
    let terminated: i64 = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE usename = $1 AND datname = current_database()",
            &[&test_cluster::PASSWORD_ROLE],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated >= 1);
    let killed_at: chrono::DateTime<chrono::Utc> = chrono::Utc::now();
    // Two renewals after the kill, on new connections.
    eventually(
        "two renewals after the connections were killed",
        TTL * 2,
        || async {
            let renewed_ms: i64 = admin
                .query_one(
                    "SELECT (extract(epoch FROM renewed_at) * 1000)::bigint FROM leases",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (renewed_ms > crate::store::to_ms(killed_at) + TTL.as_millis() as i64 / 3).then_some(())
        },
    )
    .await;
    assert!(!holding.lost.is_cancelled());
    assert_eq!(
        keeper.watch().borrow().as_ref().unwrap().lease.token,
        holding.lease.token
    );
    shutdown.cancel();
    keeper.join().await;
}

#[tokio::test]
async fn leadership_is_exclusive_and_passes_to_another_replica_when_the_leader_dies() {
    let Some(database) =
        test_database("leadership_is_exclusive_and_passes_to_another_replica_when_the_leader_dies")
    else {
        return;
    };
    let (a, b) = (replica(&database).await, replica(&database).await);
    let shutdown = CancellationToken::new();
    let timing = KeeperTiming::for_ttl(TTL);
    let lead = |replica: &Database, holder: &str| {
        LeaseKeeper::spawn(
            replica.clone(),
            leases::leader_lease("cart_sweeper"),
            holder.to_owned(),
            timing,
            shutdown.clone(),
        )
    };
    let (keeper_a, keeper_b) = (lead(&a, "replica-a"), lead(&b, "replica-b"));
    let (watch_a, watch_b) = (keeper_a.watch(), keeper_b.watch());
    // Several tries by each; never both at once.
    let deadline = Instant::now() + timing.renew_every * 4;
    let mut seen_leading = false;
    while Instant::now() < deadline {
        let (leads_a, leads_b) = (watch_a.borrow().is_some(), watch_b.borrow().is_some());
        assert!(!(leads_a && leads_b), "two leaders");
        seen_leading |= leads_a || leads_b;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_leading);
    // A third replica cannot lead either.
    assert!(
        a.try_lead("cart_sweeper", "replica-c", TTL)
            .await
            .unwrap()
            .is_none()
    );

    let (leader, mut follower_watch, leader_db, leader_token) = if watch_a.borrow().is_some() {
        let token = watch_a.borrow().as_ref().unwrap().lease.token;
        (keeper_a, keeper_b.watch(), a.clone(), token)
    } else {
        let token = watch_b.borrow().as_ref().unwrap().lease.token;
        (keeper_b, keeper_a.watch(), b.clone(), token)
    };
    // The leader's process dies: no release, its sessions end.
    let died = Instant::now();
    leader.abort();
    drop(leader_db);
    let follower = held(&mut follower_watch, TTL * 3).await;
    assert!(
        died.elapsed() <= TTL + timing.renew_every + SLACK,
        "{:?}",
        died.elapsed()
    );
    assert!(follower.lease.token > leader_token);
    shutdown.cancel();
}

/// `n` pending inbox rows, each of its own connection (`crm-1`, ...: the inbox claim
/// hands a connection's rows to one replica at a time); their ids.
async fn inbox_rows(database: &TestDatabase, n: i64) -> Vec<i64> {
    database
        .admin()
        .await
        .query(
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
             SELECT 'crm-' || g, 'delivery-' || g, 0 FROM generate_series(1, $1::bigint) g
             RETURNING id",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn three_claimers_share_a_thousand_inbox_rows_each_claimed_exactly_once() {
    let Some(database) =
        test_database("three_claimers_share_a_thousand_inbox_rows_each_claimed_exactly_once")
    else {
        return;
    };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&database).await);
    }
    let mut all = inbox_rows(&database, 1_000).await;
    let now = chrono::Utc::now();
    let tasks: Vec<_> = replicas
        .iter()
        .enumerate()
        .map(|(n, replica)| {
            let replica = replica.clone();
            tokio::spawn(async move {
                let me = format!("replica-{n}");
                let mut mine = Vec::new();
                loop {
                    let Claimed { ids, .. } = replica
                        .claim(&claims::INBOX, &me, Duration::from_secs(60), now, 25)
                        .await
                        .unwrap();
                    if ids.is_empty() {
                        return mine;
                    }
                    mine.extend(ids);
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        claimed.extend(mine);
    }
    let distinct: HashSet<i64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 1_000, "no row twice");
    claimed.sort();
    all.sort();
    assert_eq!(claimed, all, "every row once");
    let by_claimer = database
        .admin()
        .await
        .query(
            "SELECT claimed_by, count(*) FROM webhook_inbox WHERE state = 'claimed'
             GROUP BY claimed_by",
            &[],
        )
        .await
        .unwrap();
    let total: i64 = by_claimer.iter().map(|row| row.get::<_, i64>(1)).sum();
    assert_eq!(total, 1_000);
    assert_eq!(distinct.len(), 1_000);
    // A live claim is handed out to nobody else.
    let again = replicas[0]
        .claim(&claims::INBOX, "replica-x", TTL, now, 100)
        .await
        .unwrap();
    assert_eq!(again, Claimed::default());
}

#[tokio::test]
async fn an_expired_inbox_claim_is_handed_out_again() {
    let Some(database) = test_database("an_expired_inbox_claim_is_handed_out_again") else {
        return;
    };
    let (a, b) = (replica(&database).await, replica(&database).await);
    let short = Duration::from_millis(500);
    let now = chrono::Utc::now();

    // Replica a claims a row and dies; b gets it once the claim expires.
    let inbox = inbox_rows(&database, 1).await;
    let by_a = a
        .claim(&claims::INBOX, "replica-a", short, now, 10)
        .await
        .unwrap();
    assert_eq!(by_a.ids, inbox);
    let by_b = eventually(
        "the expired inbox claim handed out again",
        TTL * 2,
        || async {
            let claimed = b
                .claim(&claims::INBOX, "replica-b", TTL, now, 10)
                .await
                .unwrap();
            (!claimed.ids.is_empty()).then_some(claimed.ids)
        },
    )
    .await;
    assert_eq!(by_b, inbox);
}

#[tokio::test]
async fn an_acquisition_waits_for_a_fenced_write_in_flight_and_the_old_token_is_refused_after() {
    let Some(database) = test_database(
        "an_acquisition_waits_for_a_fenced_write_in_flight_and_the_old_token_is_refused_after",
    ) else {
        return;
    };
    let (a, b) = (replica(&database).await, replica(&database).await);
    let admin = database.admin().await;
    admin
        .execute(
            "INSERT INTO sync_cursors VALUES ('crm', 'deals', 'page-0', 0)",
            &[],
        )
        .await
        .unwrap();
    let short = Duration::from_millis(300);
    let old = a
        .try_acquire("poll:crm", "replica-a", short)
        .await
        .unwrap()
        .unwrap();
    // Replica a, still with the current token, writes a page in a transaction.
    let mut client = a.client().await.unwrap();
    let page = client.transaction().await.unwrap();
    let changed = page
        .execute(
            &format!(
                "UPDATE sync_cursors SET value = $3 WHERE connection = 'crm' AND {}",
                leases::fence(1, 2)
            ),
            &[&old.name, &old.token, &"page-1-by-a"],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    // The lease expires meanwhile; b's acquisition waits for a's transaction.
    let acquiring = tokio::spawn({
        let b = b.clone();
        async move {
            eventually("the lease expired", TTL * 2, || async {
                b.try_acquire("poll:crm", "replica-b", TTL).await.unwrap()
            })
            .await
        }
    });
    eventually("b's acquisition waiting on a's lock", TTL * 3, || async {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE 'INSERT INTO leases%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (waiting == 1).then_some(())
    })
    .await;
    assert!(!acquiring.is_finished());
    page.commit().await.unwrap();
    let new = acquiring.await.unwrap();
    assert_eq!(new.token, old.token + 1);
    // a's page landed before b held the lease; a's next one is refused.
    assert_eq!(cursor(&database).await, "page-1-by-a");
    assert_eq!(fenced_cursor_write(&a, &old, "page-2-by-a").await, 0);
    assert_eq!(cursor(&database).await, "page-1-by-a");
}

/// A page a replica commits after another replica took the connection's poll lease
/// is refused whole (`StoreError::LeaseLost`): the lease's fencing token travels with
/// `Store::commit_page` (`Store::set_fence`), so the late replica cannot overwrite the
/// new holder's cursor. The holder's own pages commit.
#[tokio::test]
async fn a_page_committed_under_a_lost_poll_lease_is_refused_and_the_holders_commits() {
    let Some(database) = test_database(
        "a_page_committed_under_a_lost_poll_lease_is_refused_and_the_holders_commits",
    ) else {
        return;
    };
    let url = url_of(&database);
    let (old, new) = (
        crate::store::Store::open_postgres(&url).await.unwrap(),
        crate::store::Store::open_postgres(&url).await.unwrap(),
    );
    let lease = leases::poll_lease("crm");
    let pool = old.postgres().unwrap();
    let first = pool.try_acquire(&lease, "old", TTL).await.unwrap().unwrap();
    old.set_fence(&lease, Some(first.token));
    // The old holder stalls past its lease; the new one takes it over.
    pool.release(&first).await.unwrap();
    let second = pool.try_acquire(&lease, "new", TTL).await.unwrap().unwrap();
    new.set_fence(&lease, Some(second.token));
    assert!(second.token > first.token);

    let page = |id: &str| vec![crate::store::tests::upsert(id, "lead", chrono::Utc::now())];
    let cursor = |n: i64| Some(serde_json::json!({ "after": n }));
    let refused = old
        .commit_page("crm", "deals", page("late"), vec![], vec![], cursor(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, StoreError::LeaseLost { lease } if lease == "poll:crm"),
        "{refused}"
    );
    new.commit_page("crm", "deals", page("fresh"), vec![], vec![], cursor(2))
        .await
        .unwrap();
    assert!(
        old.deal_by_external_id("crm", "late")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        new.deal_by_external_id("crm", "fresh")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        new.cursor("crm", "deals").await.unwrap(),
        Some(serde_json::json!({ "after": 2 }))
    );
}

/// Two keepers of one lease in one process (a reload starts the new duty while the
/// old one is still stopping): each has a holder name of its own, so the new keeper
/// waits for the old one's release instead of sharing its token, and the old one's
/// release cannot end the new one's lease.
#[tokio::test]
async fn a_reloads_new_keeper_waits_for_the_old_ones_release_and_keeps_the_lease() {
    let Some(database) =
        test_database("a_reloads_new_keeper_waits_for_the_old_ones_release_and_keeps_the_lease")
    else {
        return;
    };
    let store = crate::store::Store::open_postgres(&url_of(&database))
        .await
        .unwrap();
    let (old_token, new_token) = (CancellationToken::new(), CancellationToken::new());
    let old = store
        .lease_keeper("poll:crm".into(), TTL, old_token.clone())
        .unwrap();
    let held = next_held(old.watch()).await;
    let new = store
        .lease_keeper("poll:crm".into(), TTL, new_token.clone())
        .unwrap();
    // Two of the new keeper's attempts: it does not get the lease the old one holds.
    tokio::time::sleep(TTL / 3 * 2 + SLACK).await;
    assert!(new.watch().borrow().is_none(), "two keepers held one lease");
    old_token.cancel();
    old.join().await;
    let taken = next_held(new.watch()).await;
    assert!(taken.lease.token > held.lease.token);
    // Still held a while later: nothing ended it.
    tokio::time::sleep(TTL).await;
    assert!(
        new.watch()
            .borrow()
            .as_ref()
            .is_some_and(|now| !now.lost.is_cancelled())
    );
    new_token.cancel();
    new.join().await;
}

/// The first lease a keeper's watch shows held.
async fn next_held(mut watch: watch::Receiver<Option<HeldLease>>) -> HeldLease {
    eventually("the lease held", TTL * 3, || {
        let held = watch.borrow_and_update().clone();
        async move { held }
    })
    .await
}
