//! Wake-ups across replicas with LISTEN/NOTIFY: a replica that committed stage changes
//! or new webhook deliveries announces it on a channel, and every replica listening
//! wakes its idle worker (the follow-up worker enrolls, the inbox worker claims) at
//! once instead of at its next poll.
//!
//! Invariants:
//! - Correctness never depends on a notification: every worker also polls (the
//!   follow-up worker every `email.enroll_interval`, the inbox worker on its timer), so
//!   a notification lost to a restart, a reconnect or a full queue only delays work.
//! - An announcement is sent after the commit it announces, by one task per process
//!   that coalesces a burst into one `NOTIFY` per channel, and never delays or fails
//!   the write: its error is logged at debug.
//! - The listener holds one connection of its own (outside the pool), reconnects with
//!   a bounded backoff (`retry::Backoff`) after losing it, and wakes the workers once
//!   after every reconnect, for what it may have missed.

use super::Database;
use crate::retry::Backoff;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// Stage changes were committed (the follow-up worker's feed has new entries).
pub const STAGE_CHANGES: &str = "dealsync_stage_changes";
/// New webhook deliveries were committed to the inbox.
pub const INBOX: &str = "dealsync_inbox";

/// The listener's reconnect backoff: quick at first, at most every 30 s.
const RECONNECT: Backoff = Backoff::full(Duration::from_millis(200), Duration::from_secs(30));

/// Announcements queued at most; one more of a channel already queued adds nothing.
const QUEUED: usize = 64;

/// Sends the announcements of one process: one task, one pooled connection at a time,
/// and a burst of commits becomes one `NOTIFY` per channel.
pub(super) fn announcer(pool: deadpool_postgres::Pool) -> mpsc::Sender<&'static str> {
    let (sender, mut queued) = mpsc::channel::<&'static str>(QUEUED);
    tokio::spawn(async move {
        while let Some(first) = queued.recv().await {
            let mut channels = vec![first];
            while let Ok(next) = queued.try_recv() {
                if !channels.contains(&next) {
                    channels.push(next);
                }
            }
            if let Err(error) = notify_all(&pool, &channels).await {
                tracing::debug!(error = %error, "announcing to the other replicas failed; they will see it at their next poll");
            }
        }
    });
    sender
}

async fn notify_all(pool: &deadpool_postgres::Pool, channels: &[&str]) -> Result<(), String> {
    let client = pool
        .get()
        .await
        .map_err(|error| crate::telemetry::error_chain(&error))?;
    for channel in channels {
        client
            .execute("SELECT pg_notify($1, '')", &[channel])
            .await
            .map_err(|error| crate::telemetry::error_chain(&error))?;
    }
    Ok(())
}

impl Database {
    /// Announces `channel` to every listening replica, after the commit it follows.
    /// Never waits: queued for this process's announcer, or dropped when the queue is
    /// full (the queued announcements wake the same workers).
    pub fn announce(&self, channel: &'static str) {
        let _ = self.announcements.try_send(channel);
    }

    /// Listens on [`STAGE_CHANGES`] and [`INBOX`] until the returned task is aborted,
    /// calling `wake` with the channel of each notification (and with both after each
    /// reconnect).
    pub fn listen(
        &self,
        wake: impl Fn(&str) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let database = self.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            loop {
                match database.listen_once(&wake, &mut failures).await {
                    Ok(()) => tracing::debug!("the notification connection closed; reconnecting"),
                    Err(error) => {
                        tracing::debug!(error = %crate::telemetry::error_chain(&error), "listening for the other replicas' notifications failed; reconnecting")
                    }
                }
                failures += 1;
                tokio::time::sleep(RECONNECT.delay(failures)).await;
            }
        })
    }

    /// One connection's life: LISTEN, then forward notifications until it ends.
    async fn listen_once(
        &self,
        wake: &(impl Fn(&str) + Send + Sync),
        failures: &mut u32,
    ) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = self.config.connect(self.tls.clone()).await?;
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let statement = format!("LISTEN {STAGE_CHANGES}; LISTEN {INBOX}");
        let listening = client.batch_execute(&statement);
        tokio::pin!(listening);
        // Drive the connection while the LISTEN runs.
        loop {
            tokio::select! {
                done = &mut listening => { done?; break; }
                message = messages.next() => match message {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error),
                    None => return Ok(()),
                },
            }
        }
        *failures = 0;
        // What was committed while not listening.
        wake(STAGE_CHANGES);
        wake(INBOX);
        while let Some(message) = messages.next().await {
            if let AsyncMessage::Notification(notification) = message? {
                wake(notification.channel());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::url_of;
    use super::super::{Options, test_database};
    use crate::store::Store;
    use std::time::Duration;

    /// A stage change and a webhook delivery committed by one process wake the other's
    /// follow-up feed and inbox worker at once; without the listener only this
    /// process's own writes would (PostgreSQL only: SQLite has one process).
    #[tokio::test]
    async fn another_replicas_commits_wake_this_ones_workers() {
        let Some(database) = test_database("another_replicas_commits_wake_this_ones_workers")
        else {
            return;
        };
        let url = url_of(&database);
        let listening = Options {
            listen: true,
            ..Options::default()
        };
        let this = Store::open_postgres_with(&url, &listening).await.unwrap();
        let other = Store::open_postgres(&url).await.unwrap();
        let mut changes = this.stage_changes();
        changes.borrow_and_update();
        // Past the wake-up every (re)connect gives.
        tokio::time::sleep(Duration::from_millis(500)).await;
        changes.borrow_and_update();
        let committed = this.inbox_committed().notified();
        tokio::pin!(committed);
        committed.as_mut().enable();

        let now = chrono::Utc::now();
        other
            .upsert_deals(vec![crate::store::deals::tests::upsert("d-1", "lead", now)])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("woken by the other replica's stage change")
            .unwrap();

        other
            .enqueue_webhook(crate::store::inbox::tests::event("w-1"))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), committed)
            .await
            .expect("woken by the other replica's delivery");
    }
}
