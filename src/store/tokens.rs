//! OAuth tokens per connection: the access token, the refresh token, when the access
//! token expires, vendor extras from the token response (`instance_url`,
//! `api_domain`), and whether the connection needs re-authorization.
//!
//! Invariant: a rotated refresh token and its access token are written in one
//! statement, so a crash never leaves a new access token beside a refresh token the
//! vendor has already invalidated. A refresh response without a refresh token keeps
//! the stored one.

use super::{Result, Store, StoreError, from_ms, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

/// A connection's stored tokens. Debug prints the tokens as `***`.
#[derive(Clone, PartialEq)]
pub struct StoredToken {
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Extra token-response fields the connector needs (JSON object; only base URLs
    /// and ids are kept).
    pub extra: serde_json::Value,
    pub needs_reauth: bool,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("access_token", &self.access_token.as_ref().map(|_| "***"))
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "***"))
            .field("expires_at", &self.expires_at)
            .field("extra", &self.extra)
            .field("needs_reauth", &self.needs_reauth)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// The extras to store: `extra`'s fields over the stored ones (`stored`, JSON text; an
/// unreadable or non-object one counts as none).
pub(super) fn merged_extras(stored: Option<&str>, extra: &serde_json::Value) -> serde_json::Value {
    let mut merged = stored
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    if let (Some(target), Some(source)) = (merged.as_object_mut(), extra.as_object()) {
        for (key, value) in source {
            target.insert(key.clone(), value.clone());
        }
    }
    merged
}

impl Store {
    /// The tokens of `connection`, if any were stored.
    pub async fn oauth_token(&self, connection: &str) -> Result<Option<StoredToken>> {
        if let Some(database) = self.postgres() {
            return database
                .oauth_token(connection)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        self.read(move |db| {
            let row = db
                .query_row(
                    "SELECT access_token, refresh_token, expires_at, extra, needs_reauth, updated_at
                     FROM oauth_tokens WHERE connection = ?1",
                    [&connection],
                    |row| {
                        Ok((
                            row.get::<_, Option<String>>(0)?,
                            row.get::<_, Option<String>>(1)?,
                            row.get::<_, Option<i64>>(2)?,
                            row.get::<_, String>(3)?,
                            row.get::<_, bool>(4)?,
                            row.get::<_, i64>(5)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(access, refresh, expires, extra, needs_reauth, updated)| {
                Ok(StoredToken {
                    access_token: access,
                    refresh_token: refresh,
                    expires_at: expires.map(from_ms),
                    extra: serde_json::from_str(&extra).map_err(|error| {
                        StoreError::Corrupt(format!("token extras of {connection}: {error}"))
                    })?,
                    needs_reauth,
                    updated_at: from_ms(updated),
                })
            })
            .transpose()
        })
        .await
    }

    /// Stores a token response: the access token, the refresh token when the vendor
    /// sent one (else the stored one stays), the expiry and the extras (merged over
    /// the stored ones). Clears `needs_reauth`.
    pub async fn save_oauth_token(
        &self,
        connection: &str,
        access_token: &str,
        refresh_token: Option<&str>,
        expires_at: Option<DateTime<Utc>>,
        extra: serde_json::Value,
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .save_oauth_token(connection, access_token, refresh_token, expires_at, extra)
                .await;
        }
        let (connection, access, refresh) = (
            connection.to_owned(),
            access_token.to_owned(),
            refresh_token.map(str::to_owned),
        );
        self.write(move |tx| {
            let stored: Option<String> = tx
                .query_row(
                    "SELECT extra FROM oauth_tokens WHERE connection = ?1",
                    [&connection],
                    |row| row.get(0),
                )
                .optional()?;
            let merged = merged_extras(stored.as_deref(), &extra);
            tx.execute(
                "INSERT INTO oauth_tokens (connection, access_token, refresh_token, expires_at, extra, needs_reauth, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)
                 ON CONFLICT (connection) DO UPDATE SET
                   access_token = excluded.access_token,
                   refresh_token = coalesce(excluded.refresh_token, oauth_tokens.refresh_token),
                   expires_at = excluded.expires_at,
                   extra = excluded.extra,
                   needs_reauth = 0,
                   updated_at = excluded.updated_at",
                params![
                    connection,
                    access,
                    refresh,
                    expires_at.map(to_ms),
                    merged.to_string(),
                    to_ms(Utc::now())
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Marks a connection as needing `dealsync auth` (its refresh token was revoked).
    pub async fn mark_needs_reauth(&self, connection: &str) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .mark_needs_reauth(connection)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO oauth_tokens (connection, needs_reauth, updated_at) VALUES (?1, 1, ?2)
                 ON CONFLICT (connection) DO UPDATE SET needs_reauth = 1, access_token = NULL,
                   updated_at = excluded.updated_at",
                params![connection, to_ms(Utc::now())],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::both_backends::on_both;
    use serde_json::json;

    #[tokio::test]
    async fn a_refresh_without_a_new_refresh_token_keeps_the_old_one_and_extras_merge() {
        on_both(
            "a_refresh_without_a_new_refresh_token_keeps_the_old_one_and_extras_merge",
            async |store| {
                store
                    .save_oauth_token(
                        "sf",
                        "a1",
                        Some("r1"),
                        None,
                        json!({"instance_url": "https://x"}),
                    )
                    .await
                    .unwrap();
                store
                    .save_oauth_token("sf", "a2", None, None, json!({}))
                    .await
                    .unwrap();
                let token = store.oauth_token("sf").await.unwrap().unwrap();
                assert_eq!(token.access_token.as_deref(), Some("a2"));
                assert_eq!(token.refresh_token.as_deref(), Some("r1"));
                assert_eq!(token.extra, json!({"instance_url": "https://x"}));
                store.mark_needs_reauth("sf").await.unwrap();
                let token = store.oauth_token("sf").await.unwrap().unwrap();
                assert!(token.needs_reauth);
                assert_eq!(token.access_token, None);
                store
                    .save_oauth_token("sf", "a3", Some("r3"), None, json!({}))
                    .await
                    .unwrap();
                assert!(!store.oauth_token("sf").await.unwrap().unwrap().needs_reauth);
            },
        )
        .await;
    }

    #[test]
    fn debug_of_stored_tokens_prints_stars_for_both_tokens() {
        let token = super::StoredToken {
            access_token: Some("access-secret-1".into()),
            refresh_token: Some("refresh-secret-2".into()),
            expires_at: None,
            extra: json!({"instance_url": "https://x"}),
            needs_reauth: false,
            updated_at: chrono::Utc::now(),
        };
        let shown = format!("{token:?}");
        assert!(!shown.contains("access-secret-1"), "{shown}");
        assert!(!shown.contains("refresh-secret-2"), "{shown}");
        assert!(shown.contains("access_token: Some(\"***\")"), "{shown}");
        assert!(shown.contains("https://x"), "{shown}");
    }
}
