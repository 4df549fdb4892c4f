//! Domain types: parsed once, carried everywhere, no IO.
//!
//! A value that has been checked gets a type, so nobody checks twice or forgets:
//! [`Money`] is integer minor units of one [`Currency`], never a float; names and keys
//! are newtypes so a deal id cannot go where a stage key was meant.

pub mod delivery;
pub mod duration;
pub mod hashing;
mod money;
pub mod people;
mod raw;
mod step;

pub use money::{Currency, Money, MoneyError};
pub use raw::{MAX_DEPTH, RawRecord, TooDeep, check_depth};
pub use step::StepNumber;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A date (UTC midnight) or an RFC 3339 time, as `--since`/`--until` and the report
/// API's `since`/`until` take it.
pub fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|date| date.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| format!("expected a date like 2026-01-31 or an RFC 3339 time, got {text:?}"))
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

string_id!(
    /// The name of a configured connection: the key of `[connections.NAME]`.
    ConnectionName
);
string_id!(
    /// A record's id in its source system (HubSpot deal id, Shopify checkout token, …).
    ExternalId
);
string_id!(
    /// The key of a canonical stage, unique within its pipeline.
    StageKey
);
string_id!(
    /// The key of a canonical pipeline (`sales`, `ecommerce`, …).
    PipelineKey
);

/// The stage key under which a deal whose native stage has no mapping is stored.
pub const UNMAPPED: &str = "unmapped";

/// Where a deal stands overall, derived from its canonical stage's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DealStatus {
    Open,
    Won,
    Lost,
    /// The native stage maps to no canonical stage; kept, counted and reported.
    Unmapped,
    /// Deleted or archived in the source.
    Deleted,
}

impl DealStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DealStatus::Open => "open",
            DealStatus::Won => "won",
            DealStatus::Lost => "lost",
            DealStatus::Unmapped => "unmapped",
            DealStatus::Deleted => "deleted",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "open" => DealStatus::Open,
            "won" => DealStatus::Won,
            "lost" => DealStatus::Lost,
            "unmapped" => DealStatus::Unmapped,
            "deleted" => DealStatus::Deleted,
            _ => return None,
        })
    }
}

impl fmt::Display for DealStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a stage changed; recorded on every history row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeCause {
    /// Seen by a pull sync.
    Poll,
    /// Received by webhook.
    Webhook,
    /// Moved by dealsync itself: a sent follow-up, an abandoned cart, an expiry.
    Followup,
    /// A deal kept as unmapped, moved once the stage map gave its native stage a
    /// canonical stage (a config change).
    Mapping,
}

impl ChangeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeCause::Poll => "poll",
            ChangeCause::Webhook => "webhook",
            ChangeCause::Followup => "followup",
            ChangeCause::Mapping => "mapping",
        }
    }
}

/// An email address, trimmed and lower-cased on the domain part; checked for one `@`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let (local, domain) = value.rsplit_once('@')?;
        if local.is_empty() || domain.is_empty() || !domain.contains('.') && domain != "localhost" {
            return None;
        }
        if value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return None;
        }
        Some(Self(format!("{local}@{}", domain.to_ascii_lowercase())))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        EmailAddress::parse(&value).ok_or_else(|| format!("not an email address: {value:?}"))
    }
}

impl From<EmailAddress> for String {
    fn from(value: EmailAddress) -> Self {
        value.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of a cart or order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineItem {
    pub title: String,
    pub quantity: i64,
    /// Unit price in minor units of the deal's currency.
    pub unit_price_minor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
}

/// A deal as a connector reads it from its source, before stage mapping.
///
/// Connectors produce these and never write to the store; `sync` maps the native
/// stage to a canonical one and commits the page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceDeal {
    pub external_id: ExternalId,
    pub title: String,
    pub amount: Option<Money>,
    /// Native pipeline id (or label when the source has no ids).
    pub native_pipeline: String,
    /// Native stage id (or label when the source has no ids).
    pub native_stage: String,
    pub contact_email: Option<EmailAddress>,
    pub contact_name: Option<String>,
    /// The deal's company as its source names it: the domain or website of a CRM's
    /// company record (a Salesforce Account's `Website`). It decides the deal's company
    /// link; without it the contact's email domain does (`domain::people`).
    #[serde(default)]
    pub company_domain: Option<String>,
    pub owner: Option<String>,
    pub owner_email: Option<EmailAddress>,
    /// Marketing consent as the source records it; `None` when the source says nothing.
    pub marketing_consent: Option<bool>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// When the source says the deal entered its current native stage.
    pub stage_changed_at: Option<DateTime<Utc>>,
    pub expected_close: Option<chrono::NaiveDate>,
    pub recovery_url: Option<String>,
    pub line_items: Vec<LineItem>,
    /// Cart matching keys: checkout token, cart token, session id, order's checkout token.
    pub cart_keys: Vec<String>,
    /// Deleted or archived in the source.
    pub deleted: bool,
    /// The source's status when it states won/lost independently of the stage.
    pub source_status: Option<DealStatus>,
    /// The source's record as the JSON text it sent (for a pull sync, the record's
    /// bytes in the vendor's page, before any enrichment).
    pub raw: RawRecord,
    /// For a pulled record read with its enrichments: a digest of what the record
    /// itself says (see `hashing::fingerprint`), by which a later read of the same
    /// unchanged record is recognised before its enrichments are requested.
    pub fingerprint: Option<i64>,
}

impl SourceDeal {
    /// A deal with only the required fields set; the rest is empty.
    pub fn new(
        external_id: impl Into<String>,
        title: impl Into<String>,
        native_pipeline: impl Into<String>,
        native_stage: impl Into<String>,
    ) -> Self {
        SourceDeal {
            external_id: ExternalId::new(external_id),
            title: title.into(),
            amount: None,
            native_pipeline: native_pipeline.into(),
            native_stage: native_stage.into(),
            contact_email: None,
            contact_name: None,
            company_domain: None,
            owner: None,
            owner_email: None,
            marketing_consent: None,
            created_at: None,
            updated_at: None,
            stage_changed_at: None,
            expected_close: None,
            recovery_url: None,
            line_items: Vec::new(),
            cart_keys: Vec::new(),
            deleted: false,
            source_status: None,
            raw: RawRecord::null(),
            fingerprint: None,
        }
    }
}

/// A canonical stage position: which pipeline, which stage (or [`UNMAPPED`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StageRef {
    pub pipeline: Option<PipelineKey>,
    pub stage: StageKey,
}

impl StageRef {
    pub fn unmapped() -> Self {
        StageRef {
            pipeline: None,
            stage: StageKey::new(UNMAPPED),
        }
    }
    pub fn is_unmapped(&self) -> bool {
        self.stage.as_str() == UNMAPPED
    }
}

/// The canonical record, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    pub id: i64,
    pub connection: ConnectionName,
    pub external_id: ExternalId,
    pub title: String,
    pub amount_minor: Option<i64>,
    pub currency: Option<Currency>,
    pub pipeline: Option<PipelineKey>,
    pub stage: StageKey,
    pub status: DealStatus,
    pub native_pipeline: String,
    pub native_stage: String,
    pub contact_email: Option<EmailAddress>,
    pub contact_name: Option<String>,
    pub owner: Option<String>,
    pub owner_email: Option<EmailAddress>,
    pub marketing_consent: Option<bool>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub stage_entered_at: DateTime<Utc>,
    pub last_activity_at: DateTime<Utc>,
    pub expected_close: Option<chrono::NaiveDate>,
    pub recovery_url: Option<String>,
    pub line_items: Vec<LineItem>,
    pub cart_keys: Vec<String>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub first_seen_at: DateTime<Utc>,
    pub raw: serde_json::Value,
}

impl Deal {
    pub fn amount(&self) -> Option<Money> {
        Some(Money::new(self.amount_minor?, self.currency?))
    }
}

#[cfg(test)]
impl Deal {
    /// An open deal of connection `crm` with no contact, in `at` since `entered`: the
    /// starting point unit tests change the fields they are about on.
    pub(crate) fn example(at: StageRef, entered: DateTime<Utc>) -> Deal {
        Deal {
            id: 7,
            connection: "crm".into(),
            external_id: "7".into(),
            title: "Deal".into(),
            amount_minor: None,
            currency: None,
            pipeline: at.pipeline,
            stage: at.stage,
            status: DealStatus::Open,
            native_pipeline: "p".into(),
            native_stage: "s".into(),
            contact_email: None,
            contact_name: None,
            owner: None,
            owner_email: None,
            marketing_consent: None,
            created_at: None,
            updated_at: None,
            stage_entered_at: entered,
            last_activity_at: entered,
            expected_close: None,
            recovery_url: None,
            line_items: Vec::new(),
            cart_keys: Vec::new(),
            deleted_at: None,
            first_seen_at: entered,
            raw: serde_json::Value::Null,
        }
    }
}

/// One row of a deal's stage history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageChange {
    pub deal_id: i64,
    pub at: DateTime<Utc>,
    pub from_pipeline: Option<PipelineKey>,
    pub from_stage: Option<StageKey>,
    pub to_pipeline: Option<PipelineKey>,
    pub to_stage: StageKey,
    pub native_from: Option<String>,
    pub native_to: String,
    pub cause: ChangeCause,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_address_with_a_control_character_or_space_is_not_one() {
        assert_eq!(
            EmailAddress::parse(" Ada@Example.COM ").unwrap().as_str(),
            "Ada@example.com"
        );
        for bad in [
            "ada\0@example.com",
            "ada\r\nbcc@example.com",
            "ada\u{1b}@example.com",
            "a da@example.com",
            "<ada@example.com>",
            "ada@",
            "ada@example",
        ] {
            assert_eq!(EmailAddress::parse(bad), None, "{bad:?}");
        }
    }
}
