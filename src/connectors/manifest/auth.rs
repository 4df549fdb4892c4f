//! Credentials of a manifest connection: a static token (bearer, header, query,
//! basic) or OAuth2 with refresh tokens, through the `oauth2` crate.
//!
//! Invariants:
//! - One refresh per connection at a time, across processes: a refresh takes the
//!   connection's async mutex (tasks of this process) and its token lock file beside
//!   the database (`crate::lock`: the daemon, `dealsync sync` and `dealsync auth`), then
//!   re-reads the stored tokens (its `TokenStore` handle); when another task or
//!   process refreshed meanwhile, its token is used instead of spending the refresh
//!   token twice (with rotation that answers `invalid_grant` and would lose the
//!   connection).
//! - A refresh response without a refresh token keeps the stored one; a rotated one is
//!   stored together with its access token (see `store::tokens`).
//! - A revoked refresh token (`invalid_grant`) marks only this connection as needing
//!   re-authorization (metric, log line, `/readyz` attention); the others go on.

use super::schema::{AuthKind, ClientAuth, Manifest};
use crate::config::{ConnectionConfig, Secret};
use crate::connectors::handles::TokenStore;
use crate::connectors::vendor_http::{ReceiveError, receive};
use crate::connectors::{ConnectorError, SyncContext};
use crate::lock::{LockError, RefreshLock};
use crate::telemetry::ConnectionLabels;
use base64::Engine;
use chrono::{DateTime, Utc};
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, PkceCodeChallenge, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{error, info, warn};

/// Refresh this long before the access token expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(120);

/// Retries of storing a refreshed token while the store fails transiently: 500 ms
/// doubling up to 10 s, 10 attempts (about a minute of waits, plus the store's busy
/// timeout in each attempt).
const SAVE_RETRIES: crate::retry::Backoff =
    crate::retry::Backoff::equal(Duration::from_millis(500), Duration::from_secs(10)).attempts(10);

/// The longest wait for another process's refresh (its token request times out after
/// 30 s).
const TOKEN_LOCK_WAIT: Duration = Duration::from_secs(60);

/// Token-response fields beyond the standard ones (`instance_url`, `api_domain`, …).
/// Debug shows the values of [`KEPT_EXTRAS`] only; others (an `id_token`, a
/// signature) print as `***`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VendorFields {
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}
impl oauth2::ExtraTokenFields for VendorFields {}

/// The token-response extras that are kept and may be shown: base URLs and ids.
const KEPT_EXTRAS: &[&str] = &["instance_url", "api_domain", "id", "hub_id"];

impl fmt::Debug for VendorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in &self.fields {
            if KEPT_EXTRAS.contains(&key.as_str()) {
                map.entry(key, value);
            } else {
                map.entry(key, &"***");
            }
        }
        map.finish()
    }
}

type TokenResponseWithExtras = StandardTokenResponse<VendorFields, BasicTokenType>;
type OAuthClient<HasAuthUrl> = oauth2::Client<
    BasicErrorResponse,
    TokenResponseWithExtras,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    HasAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What a request carries to authenticate, and the base URL a token may name.
/// Debug shows header and parameter names; their values print as `***`.
#[derive(Clone, Default)]
pub struct Authn {
    pub header: Option<(String, String)>,
    pub query: Option<(String, String)>,
    pub base_url: Option<String>,
    /// The access token used, to tell a stale one from a refreshed one.
    access: Option<String>,
}

/// The credentials of one connection.
pub enum Credentials {
    Static(Authn),
    OAuth(OAuthSession),
}

/// OAuth2 settings resolved from the manifest and the connection.
pub struct OAuthSession {
    client_id: String,
    client_secret: Option<Secret>,
    token_url: url::Url,
    client_auth: ClientAuth,
    base_url_from: Option<String>,
    seed_refresh_token: Option<Secret>,
    /// The connection's `max_response_bytes`, for token responses too.
    max_response_bytes: u64,
    // Serializes refreshes of this connection; held across the token request on purpose.
    refresh_lock: tokio::sync::Mutex<()>,
    // A std mutex: a cache read or written without `.await` inside.
    cached: Mutex<Option<Cached>>,
}

impl fmt::Debug for Authn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted =
            |pair: &Option<(String, String)>| pair.as_ref().map(|(name, _)| format!("{name}: ***"));
        f.debug_struct("Authn")
            .field("header", &redacted(&self.header))
            .field("query", &redacted(&self.query))
            .field("base_url", &self.base_url)
            .field("access", &self.access.as_ref().map(|_| "***"))
            .finish()
    }
}

#[derive(Clone)]
struct Cached {
    access: String,
    expires_at: Option<DateTime<Utc>>,
    base_url: Option<String>,
}

impl fmt::Debug for Cached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cached")
            .field("access", &"***")
            .field("expires_at", &self.expires_at)
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl Credentials {
    /// Resolves the connection's credentials; errors are (config key, message).
    pub fn new(
        manifest: &Manifest,
        connection: &ConnectionConfig,
        base_url: &url::Url,
    ) -> Result<Self, (String, String)> {
        if let Some(oauth) = &connection.oauth {
            let Some(spec) = &manifest.auth.oauth2 else {
                return Err((
                    "oauth".into(),
                    format!("connector {} does not support OAuth2", manifest.name),
                ));
            };
            let token_url = match &oauth.token_url {
                Some(url) => url.clone(),
                None => resolve(base_url, &spec.token_url)
                    .map_err(|message| ("oauth.token_url".to_owned(), message))?,
            };
            return Ok(Credentials::OAuth(OAuthSession {
                client_id: oauth.client_id.clone(),
                client_secret: oauth.client_secret.clone(),
                token_url,
                client_auth: spec.client_auth,
                base_url_from: spec.base_url_from.clone(),
                seed_refresh_token: oauth.refresh_token.clone(),
                max_response_bytes: connection.max_response_bytes,
                refresh_lock: tokio::sync::Mutex::new(()),
                cached: Mutex::new(None),
            }));
        }
        let token = || {
            connection
                .token
                .as_ref()
                .map(|t| t.expose().to_owned())
                .ok_or_else(|| {
                    (
                        "token".to_owned(),
                        format!(
                            "connector {} needs a token (or an [oauth] table)",
                            manifest.name
                        ),
                    )
                })
        };
        let name = || manifest.auth.name.clone().unwrap_or_default();
        let authn = match manifest.auth.kind {
            AuthKind::Bearer => Authn {
                header: Some(("authorization".into(), format!("Bearer {}", token()?))),
                ..Authn::default()
            },
            AuthKind::Header => Authn {
                header: Some((name(), token()?)),
                ..Authn::default()
            },
            AuthKind::Query => Authn {
                query: Some((name(), token()?)),
                ..Authn::default()
            },
            AuthKind::Basic => {
                let user = connection.username.clone().ok_or_else(|| {
                    (
                        "username".to_owned(),
                        "basic auth needs a username".to_owned(),
                    )
                })?;
                let password = connection
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default();
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Authn {
                    header: Some(("authorization".into(), format!("Basic {encoded}"))),
                    ..Authn::default()
                }
            }
            AuthKind::None => Authn::default(),
        };
        Ok(Credentials::Static(authn))
    }

    /// What the next request carries; refreshes an OAuth token that is about to expire.
    pub async fn current(&self, cx: &SyncContext) -> Result<Authn, ConnectorError> {
        match self {
            Credentials::Static(authn) => Ok(authn.clone()),
            Credentials::OAuth(session) => session.current(cx).await,
        }
    }

    /// Called after a 401 with the credentials that were rejected: refreshes once.
    pub async fn rejected(&self, cx: &SyncContext, used: &Authn) -> Result<(), ConnectorError> {
        match self {
            Credentials::Static(_) => {
                attention(
                    cx,
                    "the API token was rejected (401); check the connection's token",
                );
                Err(ConnectorError::Unauthorized {
                    connection: cx.connection.clone(),
                    reason: "the vendor rejected the token (401)".into(),
                })
            }
            Credentials::OAuth(session) => session
                .refresh(cx, used.access.as_deref())
                .await
                .map(|_| ()),
        }
    }
}

fn attention(cx: &SyncContext, what: &str) {
    if let Some(callback) = &cx.attention {
        callback(cx.connection.as_str(), Some(what.to_owned()));
    }
}

fn resolve(base: &url::Url, target: &str) -> Result<url::Url, String> {
    if target.starts_with("http://") || target.starts_with("https://") {
        url::Url::parse(target).map_err(|e| format!("{target:?}: {e}"))
    } else {
        base.join(target).map_err(|e| format!("{target:?}: {e}"))
    }
}

fn tokens_of(cx: &SyncContext) -> Result<&dyn TokenStore, ConnectorError> {
    cx.handles
        .as_ref()
        .map(|handles| handles.tokens.as_ref())
        .ok_or(ConnectorError::NotConfigured {
            what: "OAuth connections need the token store",
        })
}

impl OAuthSession {
    fn cached(&self) -> Option<Cached> {
        self.cached.lock().ok().and_then(|c| c.clone())
    }

    fn authn(cached: &Cached) -> Authn {
        Authn {
            header: Some(("authorization".into(), format!("Bearer {}", cached.access))),
            query: None,
            base_url: cached.base_url.clone(),
            access: Some(cached.access.clone()),
        }
    }

    fn fresh(cached: &Cached) -> bool {
        cached.expires_at.is_none_or(|at| {
            at - chrono::Duration::from_std(REFRESH_MARGIN).expect("small duration") > Utc::now()
        })
    }

    async fn current(&self, cx: &SyncContext) -> Result<Authn, ConnectorError> {
        if let Some(cached) = self.cached()
            && Self::fresh(&cached)
        {
            return Ok(Self::authn(&cached));
        }
        let (stored, _) = self.load(cx, tokens_of(cx)?).await?;
        if let Some(cached) = stored
            && Self::fresh(&cached)
        {
            self.remember(cx, cached.clone());
            return Ok(Self::authn(&cached));
        }
        self.refresh(cx, None).await
    }

    /// The stored access token of the connection as it would be cached, and the stored
    /// refresh token; a token marked for re-authorization is an error.
    async fn load(
        &self,
        cx: &SyncContext,
        tokens: &dyn TokenStore,
    ) -> Result<(Option<Cached>, Option<String>), ConnectorError> {
        let stored = tokens
            .load(cx.connection.as_str())
            .await
            .map_err(|source| ConnectorError::Store {
                action: "reading the stored OAuth token",
                source,
            })?;
        if stored.as_ref().is_some_and(|stored| stored.needs_reauth) {
            return Err(self.revoked_error(cx));
        }
        let cached = stored.as_ref().and_then(|stored| {
            stored.access_token.as_ref().map(|access| Cached {
                access: access.clone(),
                expires_at: stored.expires_at,
                base_url: self.base_from(&stored.extra),
            })
        });
        Ok((cached, stored.and_then(|stored| stored.refresh_token)))
    }

    fn base_from(&self, extra: &serde_json::Value) -> Option<String> {
        let field = self.base_url_from.as_deref()?;
        extra.get(field)?.as_str().map(str::to_owned)
    }

    fn remember(&self, cx: &SyncContext, cached: Cached) {
        if let Some(at) = cached.expires_at {
            cx.metrics
                .vendor
                .token_expiry
                .get_or_create(&ConnectionLabels {
                    connection: cx.connection.to_string(),
                })
                .set(at.timestamp_millis() as f64 / 1000.0);
        }
        if let Ok(mut slot) = self.cached.lock() {
            *slot = Some(cached);
        }
    }

    fn revoked_error(&self, cx: &SyncContext) -> ConnectorError {
        ConnectorError::Unauthorized {
            connection: cx.connection.clone(),
            reason: format!(
                "the refresh token was revoked; run `dealsync auth {}`",
                cx.connection
            ),
        }
    }

    /// Refreshes the access token, once per connection at a time. `stale` is the
    /// access token a caller saw rejected; when another task already replaced it, its
    /// replacement is used instead of refreshing again.
    async fn refresh(
        &self,
        cx: &SyncContext,
        stale: Option<&str>,
    ) -> Result<Authn, ConnectorError> {
        // Both held across the token request: a second refresh with the same refresh
        // token would be refused by vendors that rotate it. The mutex orders this
        // process's tasks, the lock file the processes sharing the database.
        let _guard = self.refresh_lock.lock().await;
        let tokens = tokens_of(cx)?;
        let connection = cx.connection.as_str();
        let _token_lock = lock_tokens(tokens, connection, &cx.shutdown)
            .await
            .map_err(|error| match error {
                LockError::Cancelled { .. } | LockError::CancelledOn { .. } => {
                    ConnectorError::Cancelled
                }
                other => ConnectorError::Transient {
                    vendor: "oauth".into(),
                    reason: format!(
                        "waiting for another dealsync process to refresh the token of connection {connection}: {other}"
                    ),
                    retry_after: None,
                },
            })?;
        // Read under both locks: what another task or process stored is seen here.
        let (cached, stored_refresh) = self.load(cx, tokens).await?;
        if let Some(cached) = cached {
            // The caller saw no fresh token (`stale` is None) or saw `stale`
            // rejected: a fresh one other than that was stored meanwhile.
            let replaced = stale.is_none_or(|stale| stale != cached.access);
            if replaced && Self::fresh(&cached) {
                self.remember(cx, cached.clone());
                return Ok(Self::authn(&cached));
            }
        }
        let refresh_token = stored_refresh
            .or_else(|| {
                self.seed_refresh_token
                    .as_ref()
                    .map(|s| s.expose().to_owned())
            })
            .ok_or_else(|| ConnectorError::Unauthorized {
                connection: cx.connection.clone(),
                reason: format!("no OAuth tokens yet; run `dealsync auth {connection}`"),
            })?;
        let client = token_client(
            &self.client_id,
            self.client_secret.as_ref(),
            &self.token_url,
            self.client_auth,
        );
        let http = OAuthHttp::new(self.max_response_bytes)?;
        let result = client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.clone()))
            .request_async(&http)
            .await;
        let response = match result {
            Ok(response) => response,
            Err(RequestTokenError::ServerResponse(response))
                if *response.error() == BasicErrorResponseType::InvalidGrant =>
            {
                tokens
                    .mark_revoked(connection)
                    .await
                    .map_err(|source| ConnectorError::Store {
                        action: "marking the connection for re-authorization",
                        source,
                    })?;
                if let Ok(mut slot) = self.cached.lock() {
                    *slot = None;
                }
                cx.metrics
                    .vendor
                    .needs_reauth
                    .get_or_create(&ConnectionLabels {
                        connection: connection.to_owned(),
                    })
                    .set(1);
                attention(
                    cx,
                    &format!(
                        "needs re-authorization: the refresh token was revoked; run `dealsync auth {connection}`"
                    ),
                );
                error!(
                    connection,
                    "refresh token revoked (invalid_grant); this connection needs `dealsync auth`"
                );
                return Err(self.revoked_error(cx));
            }
            Err(RequestTokenError::ServerResponse(response)) => {
                return Err(ConnectorError::Unauthorized {
                    connection: cx.connection.clone(),
                    reason: format!("token refresh refused: {}", response.error()),
                });
            }
            Err(RequestTokenError::Request(refused)) => {
                return Err(refused.into_connector_error("oauth", &cx.connection, &self.token_url));
            }
            Err(RequestTokenError::Parse(error, _)) => {
                return Err(ConnectorError::BadResponse {
                    vendor: "oauth".into(),
                    reason: format!("token response unreadable: {error}"),
                });
            }
            Err(other) => {
                return Err(ConnectorError::Transient {
                    vendor: "oauth".into(),
                    reason: format!("token refresh failed: {other}"),
                    retry_after: None,
                });
            }
        };
        let cached = self.save(cx, tokens, &response, &refresh_token).await?;
        cx.metrics
            .vendor
            .needs_reauth
            .get_or_create(&ConnectionLabels {
                connection: connection.to_owned(),
            })
            .set(0);
        if let Some(callback) = &cx.attention {
            callback(connection, None);
        }
        info!(connection, expires_at = ?cached.expires_at, "OAuth access token refreshed");
        Ok(Self::authn(&cached))
    }

    async fn save(
        &self,
        cx: &SyncContext,
        tokens: &dyn TokenStore,
        response: &TokenResponseWithExtras,
        used_refresh_token: &str,
    ) -> Result<Cached, ConnectorError> {
        let (access, refresh, expires_at, extra) = token_parts(response);
        // No refresh token in the answer: the one just used stays valid (Salesforce).
        let refresh = refresh.or_else(|| Some(used_refresh_token.to_owned()));
        // The vendor may have retired the refresh token just used: its successor must
        // reach the store, so a busy or failing store is tried again (still under the
        // token lock) rather than dropping it.
        crate::retry::retry(
            SAVE_RETRIES,
            "storing a refreshed OAuth token",
            crate::store::StoreError::is_transient,
            || {
                tokens.save(
                    cx.connection.as_str(),
                    &access,
                    refresh.as_deref(),
                    expires_at,
                    extra.clone(),
                )
            },
        )
        .await
        .map_err(|source| ConnectorError::Store {
            action: "storing a refreshed OAuth token",
            source,
        })?;
        let stored_extra = tokens
            .load(cx.connection.as_str())
            .await
            .ok()
            .flatten()
            .map(|t| t.extra)
            .unwrap_or(extra);
        let cached = Cached {
            access,
            expires_at,
            base_url: self.base_from(&stored_extra),
        };
        self.remember(cx, cached.clone());
        Ok(cached)
    }
}

/// Takes the cross-process token lock of `connection` (see `TokenStore::lock_refresh`).
async fn lock_tokens(
    tokens: &dyn TokenStore,
    connection: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<RefreshLock, LockError> {
    tokens
        .lock_refresh(connection, TOKEN_LOCK_WAIT, cancel)
        .await
}

fn token_parts(
    response: &TokenResponseWithExtras,
) -> (
    String,
    Option<String>,
    Option<DateTime<Utc>>,
    serde_json::Value,
) {
    let access = response.access_token().secret().to_owned();
    let refresh = response.refresh_token().map(|r| r.secret().to_owned());
    let expires_at = response
        .expires_in()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| Utc::now() + d);
    // Only non-secret extras are kept (base URLs, ids), never a signature or id_token.
    let extra: serde_json::Map<String, serde_json::Value> = response
        .extra_fields()
        .fields
        .iter()
        .filter(|(key, _)| KEPT_EXTRAS.contains(&key.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (
        access,
        refresh,
        expires_at,
        serde_json::Value::Object(extra),
    )
}

fn token_client(
    client_id: &str,
    client_secret: Option<&Secret>,
    token_url: &url::Url,
    client_auth: ClientAuth,
) -> OAuthClient<EndpointNotSet> {
    let mut client = oauth2::Client::new(ClientId::new(client_id.to_owned()))
        .set_token_uri(TokenUrl::from_url(token_url.clone()))
        .set_auth_type(match client_auth {
            ClientAuth::Basic => AuthType::BasicAuth,
            ClientAuth::RequestBody => AuthType::RequestBody,
        });
    if let Some(secret) = client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
    }
    client
}

/// The HTTP client of token requests, in place of `oauth2`'s reqwest integration:
/// redirects only within the token endpoint's origin (one elsewhere would get the
/// client secret and refresh token re-sent there), and answers read up to the
/// connection's `max_response_bytes`.
struct OAuthHttp {
    client: reqwest::Client,
    max_response_bytes: u64,
}

impl OAuthHttp {
    fn new(max_response_bytes: u64) -> Result<Self, ConnectorError> {
        let client = crate::connectors::vendor_http::client_builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| ConnectorError::HttpClient {
                what: "OAuth",
                source,
            })?;
        Ok(OAuthHttp {
            client,
            max_response_bytes,
        })
    }

    async fn fetch(
        &self,
        request: oauth2::HttpRequest,
    ) -> Result<oauth2::HttpResponse, ReceiveError> {
        let response = self.client.execute(request.try_into()?).await?;
        let received = receive(response, self.max_response_bytes).await?;
        let mut answer = oauth2::HttpResponse::new(received.body.to_vec());
        *answer.status_mut() = oauth2::http::StatusCode::from_u16(received.status)
            .expect("the status came from a parsed HTTP answer");
        *answer.headers_mut() = received.headers;
        Ok(answer)
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for OAuthHttp {
    type Error = ReceiveError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, ReceiveError>>
                + Send
                + Sync
                + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(self.fetch(request))
    }
}

/// What `dealsync auth` failed with.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("connection {0} has no [oauth] table; add client_id (and client_secret) first")]
    NotOAuth(String),
    #[error("connector {0} does not support OAuth2")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("listening on 127.0.0.1:{port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("the browser did not come back within {0:?}")]
    TimedOut(Duration),
    #[error("the authorization was refused: {0}")]
    Refused(String),
    #[error("exchanging the code for tokens failed: {0}")]
    Exchange(String),
    #[error("storing the tokens failed: {0}")]
    Store(String),
}

/// The OAuth scopes `dealsync auth` asks for: the connection's `oauth.scopes` when it
/// sets them (then they are all there is), else the manifest's `auth.oauth2.scopes`
/// plus, only when the connection turns write-back on, `writeback.scopes`.
pub fn requested_scopes(manifest: &Manifest, connection: &ConnectionConfig) -> Vec<String> {
    if let Some(oauth) = &connection.oauth
        && !oauth.scopes.is_empty()
    {
        return oauth.scopes.clone();
    }
    let mut scopes = manifest
        .auth
        .oauth2
        .as_ref()
        .map(|spec| spec.scopes.clone())
        .unwrap_or_default();
    if connection.writeback.is_some()
        && let Some(writeback) = &manifest.writeback
    {
        for scope in &writeback.scopes {
            if !scopes.contains(scope) {
                scopes.push(scope.clone());
            }
        }
    }
    scopes
}

/// Runs the authorization-code flow with PKCE and a loopback redirect on 127.0.0.1:
/// prints the URL to open (through `announce`), waits for the redirect, exchanges the
/// code and stores the tokens. Returns the redirect URI that was used.
pub async fn authorize(
    manifest: &Manifest,
    connection: &ConnectionConfig,
    tokens: &dyn TokenStore,
    port: u16,
    wait: Duration,
    announce: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), AuthorizeError> {
    let oauth = connection
        .oauth
        .as_ref()
        .ok_or_else(|| AuthorizeError::NotOAuth(connection.name.to_string()))?;
    let spec = manifest
        .auth
        .oauth2
        .as_ref()
        .ok_or_else(|| AuthorizeError::Unsupported(manifest.name.clone()))?;
    let base = connection
        .base_url
        .clone()
        .map_or_else(|| url::Url::parse(&manifest.base_url), Ok)
        .map_err(|e| AuthorizeError::Invalid(e.to_string()))?;
    let token_url = match &oauth.token_url {
        Some(url) => url.clone(),
        None => resolve(&base, &spec.token_url).map_err(AuthorizeError::Invalid)?,
    };
    let auth_url = match &oauth.auth_url {
        Some(url) => url.clone(),
        None => resolve(&base, &spec.authorize_url).map_err(AuthorizeError::Invalid)?,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|source| AuthorizeError::Listen { port, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AuthorizeError::Listen { port, source })?
        .port();
    let redirect = format!("http://127.0.0.1:{bound}/callback");
    let client = token_client(
        &oauth.client_id,
        oauth.client_secret.as_ref(),
        &token_url,
        spec.client_auth,
    )
    .set_auth_uri(AuthUrl::from_url(auth_url))
    .set_redirect_uri(
        RedirectUrl::new(redirect.clone()).map_err(|e| AuthorizeError::Invalid(e.to_string()))?,
    );
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let scopes = requested_scopes(manifest, connection);
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .set_pkce_challenge(challenge)
        .add_scopes(scopes.into_iter().map(Scope::new));
    for (key, value) in &spec.authorize_params {
        request = request.add_extra_param(key.clone(), value.clone());
    }
    let (url, state) = request.url();
    announce(&format!(
        "Open this URL in a browser to authorize connection {}:\n\n  {url}\n\nWaiting for the redirect to {redirect} …",
        connection.name
    ));
    let (code, returned_state) = tokio::time::timeout(wait, accept_redirect(&listener))
        .await
        .map_err(|_| AuthorizeError::TimedOut(wait))??;
    if returned_state != *state.secret() {
        return Err(AuthorizeError::Refused(
            "the state parameter did not match (possible CSRF); try again".into(),
        ));
    }
    let http = OAuthHttp::new(connection.max_response_bytes)
        .map_err(|e| AuthorizeError::Exchange(e.to_string()))?;
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => AuthorizeError::Exchange(r.error().to_string()),
            RequestTokenError::Request(refused) => AuthorizeError::Exchange(
                refused
                    .into_connector_error("oauth", &connection.name, &token_url)
                    .to_string(),
            ),
            other => AuthorizeError::Exchange(other.to_string()),
        })?;
    let (access, refresh, expires_at, extra) = token_parts(&response);
    if refresh.is_none() {
        warn!(connection = %connection.name, "the vendor sent no refresh token; the connection will need `dealsync auth` again when the access token expires");
    }
    // Stored under the token lock, so a refresh a running daemon has in flight ends
    // (and stores, or marks the old token revoked) before these tokens are written.
    let _token_lock = lock_tokens(
        tokens,
        connection.name.as_str(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .map_err(|e| AuthorizeError::Store(e.to_string()))?;
    tokens
        .save(
            connection.name.as_str(),
            &access,
            refresh.as_deref(),
            expires_at,
            extra,
        )
        .await
        .map_err(|e| AuthorizeError::Store(e.to_string()))?;
    Ok(())
}

/// Accepts connections until one carries `code` (or `error`) in its query.
async fn accept_redirect(
    listener: &tokio::net::TcpListener,
) -> Result<(String, String), AuthorizeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let mut buffer = vec![0u8; 8192];
        let mut filled = 0;
        while filled < buffer.len() {
            match socket.read(&mut buffer[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    filled += n;
                    if buffer[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        let head = String::from_utf8_lossy(&buffer[..filled]);
        let target = head
            .lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("/");
        let Ok(url) = url::Url::parse(&format!("http://127.0.0.1{target}")) else {
            continue;
        };
        let query: std::collections::HashMap<String, String> =
            url.query_pairs().into_owned().collect();
        let (status, body, outcome) = match (query.get("code"), query.get("error")) {
            (Some(code), _) => (
                "200 OK",
                "dealsync: authorized. You can close this window.",
                Some(Ok((
                    code.clone(),
                    query.get("state").cloned().unwrap_or_default(),
                ))),
            ),
            (None, Some(error)) => (
                "400 Bad Request",
                "dealsync: the authorization was refused.",
                Some(Err(AuthorizeError::Refused(error.clone()))),
            ),
            (None, None) => ("404 Not Found", "not the OAuth redirect", None),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = socket.write_all(response.as_bytes()).await;
        let _ = socket.shutdown().await;
        if let Some(outcome) = outcome {
            return outcome;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubspot_connection(extra: &str) -> (std::sync::Arc<Manifest>, ConnectionConfig) {
        let text = format!(
            "[connections.hs]\nconnector = \"hubspot\"\n[connections.hs.oauth]\nclient_id = \"c\"\n{extra}"
        );
        let env = crate::config::interpolate::tests::MapEnv(Default::default());
        let config = crate::config::parse(std::path::Path::new("t.toml"), &text, &env)
            .unwrap_or_else(|error| panic!("{error}"));
        let catalog = crate::connectors::manifest::Catalog::load(None).unwrap();
        (
            catalog.get("hubspot").unwrap(),
            config.connections[0].clone(),
        )
    }

    /// The write scope is asked for only when the connection turns write-back on; a
    /// connection's own `oauth.scopes` are taken as written.
    #[test]
    fn write_scopes_are_requested_only_with_write_back_on() {
        let reads = [
            "crm.objects.deals.read",
            "crm.objects.contacts.read",
            "crm.objects.owners.read",
        ];
        let (manifest, off) = hubspot_connection("");
        assert_eq!(requested_scopes(&manifest, &off), reads);
        let (manifest, on) = hubspot_connection("[connections.hs.writeback]\nenabled = true\n");
        let mut with_write: Vec<&str> = reads.to_vec();
        with_write.push("crm.objects.contacts.write");
        assert_eq!(requested_scopes(&manifest, &on), with_write);
        let (manifest, disabled) =
            hubspot_connection("[connections.hs.writeback]\nenabled = false\n");
        assert_eq!(requested_scopes(&manifest, &disabled), reads);
        let (manifest, own) = hubspot_connection(
            "scopes = [\"crm.objects.deals.read\"]\n[connections.hs.writeback]\nenabled = true\n",
        );
        assert_eq!(
            requested_scopes(&manifest, &own),
            ["crm.objects.deals.read"]
        );
    }

    #[test]
    fn debug_of_credentials_and_token_responses_prints_stars_for_secrets() {
        let authn = Authn {
            header: Some(("x-api-token".into(), "header-secret-1".into())),
            query: Some(("api_token".into(), "query-secret-2".into())),
            base_url: Some("https://api.example.com".into()),
            access: Some("access-secret-3".into()),
        };
        let cached = Cached {
            access: "access-secret-4".into(),
            expires_at: None,
            base_url: None,
        };
        let response: TokenResponseWithExtras = serde_json::from_value(serde_json::json!({
            "access_token": "access-secret-5",
            "refresh_token": "refresh-secret-6",
            "token_type": "bearer",
            "id_token": "id-secret-7",
            "instance_url": "https://na1.example.com",
        }))
        .unwrap();
        let shown = format!("{authn:?} {cached:?} {response:?}");
        for secret in 1..=7 {
            assert!(!shown.contains(&format!("secret-{secret}")), "{shown}");
        }
        assert!(shown.contains("x-api-token: ***"), "{shown}");
        assert!(shown.contains("\"id_token\": \"***\""), "{shown}");
        assert!(
            shown.contains("https://na1.example.com"),
            "kept extras stay readable: {shown}"
        );
    }
}
