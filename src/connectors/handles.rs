//! What a connector may keep in or ask of the store: three narrow handles, not the
//! `Store`.
//!
//! - [`TokenStore`]: a connection's OAuth tokens and the lock file that serializes
//!   their refresh across processes. The only handle that writes.
//! - [`EnrichmentCache`]: reads the enrichment records earlier pages kept. What a page
//!   requests goes back in [`Page::cache`](super::Page::cache), which `sync` commits
//!   with the page.
//! - [`UnchangedRecords`]: reads which records the store holds as written from the same
//!   record (by [`fingerprint`](crate::domain::hashing::fingerprint)).
//! - [`SharedRate`]: a turn in the connection's request rate as every process sharing
//!   the store counts it (replicas on PostgreSQL), so the vendor sees one client.
//!
//! Boundary: a connector writes to the store through [`TokenStore`] only; deals,
//! quarantined records, kept enrichment records and cursors reach the store through
//! `sync`, from the [`Page`](super::Page)s a connector returns. The store implements the
//! handles here (`connectors` may name `store`; `store` never names `connectors`), and a
//! test or a second backend may implement them on its own.

use crate::store::{Store, StoreError, StoredToken};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::sync::Arc;

/// A connection's stored OAuth tokens.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// The tokens of `connection`, if any were stored.
    async fn load(&self, connection: &str) -> Result<Option<StoredToken>, StoreError>;

    /// Stores a token response: the access token, the refresh token when the vendor
    /// sent one (else the stored one stays), the expiry and the extras (merged over the
    /// stored ones); clears `needs_reauth`. A rotated refresh token and its access token
    /// are written together.
    async fn save(
        &self,
        connection: &str,
        access_token: &str,
        refresh_token: Option<&str>,
        expires_at: Option<DateTime<Utc>>,
        extra: serde_json::Value,
    ) -> Result<(), StoreError>;

    /// Marks `connection` as needing `dealsync auth` (its refresh token was revoked).
    async fn mark_revoked(&self, connection: &str) -> Result<(), StoreError>;

    /// Takes the lock every process sharing these tokens holds around a refresh of
    /// `connection`, waiting at most `wait`: a lock file beside a SQLite database (see
    /// `crate::lock`), an advisory lock in a PostgreSQL one (any host). Held until the
    /// returned guard is dropped.
    async fn lock_refresh(
        &self,
        connection: &str,
        wait: std::time::Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<crate::lock::RefreshLock, crate::lock::LockError>;
}

/// The enrichment records kept for a connection (HubSpot's contacts, owners).
#[async_trait]
pub trait EnrichmentCache: Send + Sync {
    /// The records kept for `enrichment` among `ids`, as (id, JSON text), that were
    /// read at or after `fresh_since`.
    async fn fresh(
        &self,
        connection: &str,
        enrichment: &str,
        ids: Vec<String>,
        fresh_since: DateTime<Utc>,
    ) -> Result<Vec<(String, String)>, StoreError>;
}

/// Which pulled records the store already holds as the vendor sends them again.
#[async_trait]
pub trait UnchangedRecords: Send + Sync {
    /// Of `candidates` (external id, fingerprint), those whose stored deal was written
    /// from a record with the same fingerprint and needs nothing new from the vendor.
    async fn unchanged(
        &self,
        connection: &str,
        candidates: Vec<(String, i64)>,
    ) -> Result<HashSet<(String, i64)>, StoreError>;
}

/// A connection's request rate shared by every process on the store.
#[async_trait]
pub trait SharedRate: Send + Sync {
    /// Takes one request of `connection`'s rate (`per_second` on average, `burst` at
    /// once) as every process sharing the store counts it: `None` when granted (always
    /// on a store only one daemon uses, whose own limiter is the limit), else how long
    /// to wait before asking again.
    async fn take_turn(
        &self,
        connection: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<std::time::Duration>, StoreError>;
}

/// The handles a connector is given (see the module doc).
#[derive(Clone)]
pub struct StoreHandles {
    pub tokens: Arc<dyn TokenStore>,
    pub enrichment_cache: Arc<dyn EnrichmentCache>,
    pub unchanged: Arc<dyn UnchangedRecords>,
    pub rate: Arc<dyn SharedRate>,
}

impl StoreHandles {
    /// The handles onto `store`.
    pub fn of(store: &Store) -> Self {
        let store = Arc::new(store.clone());
        StoreHandles {
            tokens: store.clone(),
            enrichment_cache: store.clone(),
            unchanged: store.clone(),
            rate: store,
        }
    }
}

#[async_trait]
impl TokenStore for Store {
    async fn load(&self, connection: &str) -> Result<Option<StoredToken>, StoreError> {
        self.oauth_token(connection).await
    }

    async fn save(
        &self,
        connection: &str,
        access_token: &str,
        refresh_token: Option<&str>,
        expires_at: Option<DateTime<Utc>>,
        extra: serde_json::Value,
    ) -> Result<(), StoreError> {
        self.save_oauth_token(connection, access_token, refresh_token, expires_at, extra)
            .await
    }

    async fn mark_revoked(&self, connection: &str) -> Result<(), StoreError> {
        self.mark_needs_reauth(connection).await
    }

    async fn lock_refresh(
        &self,
        connection: &str,
        wait: std::time::Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<crate::lock::RefreshLock, crate::lock::LockError> {
        self.lock_token_refresh(connection, wait, cancel).await
    }
}

#[async_trait]
impl EnrichmentCache for Store {
    async fn fresh(
        &self,
        connection: &str,
        enrichment: &str,
        ids: Vec<String>,
        fresh_since: DateTime<Utc>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.cached_enrichments(connection, enrichment, ids, fresh_since)
            .await
    }
}

#[async_trait]
impl UnchangedRecords for Store {
    async fn unchanged(
        &self,
        connection: &str,
        candidates: Vec<(String, i64)>,
    ) -> Result<HashSet<(String, i64)>, StoreError> {
        self.unchanged_records(connection, candidates).await
    }
}

#[async_trait]
impl SharedRate for Store {
    async fn take_turn(
        &self,
        connection: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<std::time::Duration>, StoreError> {
        self.take_rate_turn(connection, per_second, burst).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        ChangeCause, ConnectionName, DealStatus, EmailAddress, RawRecord, SourceDeal, StageRef,
    };
    use crate::store::DealUpsert;
    use crate::store::tests::temp_store;
    use serde_json::json;

    #[tokio::test]
    async fn the_handles_onto_a_store_read_and_write_that_stores_rows() {
        let (_dir, store) = temp_store();
        let handles = StoreHandles::of(&store);

        handles
            .tokens
            .save(
                "crm",
                "a1",
                Some("r1"),
                None,
                json!({"instance_url": "https://x"}),
            )
            .await
            .unwrap();
        let stored = store.oauth_token("crm").await.unwrap().unwrap();
        assert_eq!(stored.access_token.as_deref(), Some("a1"));
        assert_eq!(
            handles.tokens.load("crm").await.unwrap(),
            Some(stored),
            "the handle reads what the store holds"
        );
        handles.tokens.mark_revoked("crm").await.unwrap();
        assert!(
            store
                .oauth_token("crm")
                .await
                .unwrap()
                .unwrap()
                .needs_reauth
        );
        // The refresh lock is the token lock file beside the database: held while
        // the guard lives, free after.
        let lock_file = crate::lock::token_lock_path(store.path().unwrap(), "crm");
        let held = handles
            .tokens
            .lock_refresh(
                "crm",
                std::time::Duration::from_secs(1),
                &tokio_util::sync::CancellationToken::new(),
            )
            .await
            .unwrap();
        assert!(matches!(
            crate::lock::LockFile::try_lock(&lock_file),
            Err(crate::lock::LockError::Held { .. })
        ));
        drop(held);
        assert!(crate::lock::LockFile::try_lock(&lock_file).is_ok());

        // A committed page: a deal written from a fingerprinted record, with a contact,
        // and one kept enrichment record.
        let before = Utc::now() - chrono::Duration::seconds(1);
        let mut source = SourceDeal::new("1", "Deal 1", "default", "proposal");
        source.contact_email = EmailAddress::parse("ada@acme.example");
        source.fingerprint = Some(7);
        let deal = DealUpsert {
            connection: ConnectionName::new("crm"),
            source,
            target: StageRef::unmapped(),
            status: DealStatus::Unmapped,
            observed_at: Utc::now(),
            cause: ChangeCause::Poll,
        };
        let kept = crate::store::CachedRecord {
            step: "contacts".into(),
            id: "c-1".into(),
            record: RawRecord::from_text(r#"{"id":"c-1"}"#.into()).unwrap(),
        };
        store
            .commit_page("crm", "deals", vec![deal], Vec::new(), vec![kept], None)
            .await
            .unwrap();

        let fresh = handles
            .enrichment_cache
            .fresh("crm", "contacts", vec!["c-1".into(), "c-2".into()], before)
            .await
            .unwrap();
        assert_eq!(
            fresh,
            vec![("c-1".to_owned(), r#"{"id":"c-1"}"#.to_owned())]
        );
        let unchanged = handles
            .unchanged
            .unchanged("crm", vec![("1".into(), 7), ("1".into(), 8)])
            .await
            .unwrap();
        assert_eq!(unchanged, HashSet::from([("1".to_owned(), 7)]));
    }
}
