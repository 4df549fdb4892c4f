//! What a bounce or a complaint says about an address, decided from codes only, and the
//! per-message return path (VERP) that ties a bounce to the outbox row it answers.
//!
//! Invariants:
//! - A bounce is classified by its enhanced status code (RFC 3463 `class.subject.detail`)
//!   or, failing that, by the SMTP reply code in front of a diagnostic; never by the
//!   free text of a diagnostic.
//! - 5.7.x (policy, blocklist, reputation) and 5.2.3 (message too large) are
//!   [`DeliveryClass::Policy`]: the sender's problem, never a reason to suppress the address.
//! - The return path is `<local>+<outbox id>-<recipient local>=<recipient domain>@<domain>`
//!   under the configured bounce address; decoding checks the bounce address's local
//!   part and domain, so another address never decodes.

use serde::Serialize;

/// What one delivery event says about the address it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryClass {
    /// The address does not work (5.1.x, 5.2.1, a provider's hard bounce): suppress it.
    Permanent,
    /// Try later (4.x.x, a full mailbox, a provider's soft bounce): counted, and
    /// suppresses only after repeats.
    Transient,
    /// Refused for the sender's reasons (5.7.x policy or reputation, 5.2.3 too large):
    /// recorded, never suppresses.
    Policy,
    /// A provider could not tell: recorded, never suppresses.
    Undetermined,
    /// The recipient marked the email as spam: suppress, and stop marketing at once.
    Complaint,
    /// The receiving server accepted the email (a provider's delivery event, a DSN's
    /// `Action: delivered`): counted in the figures, nothing else.
    Delivered,
}

impl DeliveryClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryClass::Permanent => "permanent",
            DeliveryClass::Transient => "transient",
            DeliveryClass::Policy => "policy",
            DeliveryClass::Undetermined => "undetermined",
            DeliveryClass::Complaint => "complaint",
            DeliveryClass::Delivered => "delivered",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "permanent" => DeliveryClass::Permanent,
            "transient" => DeliveryClass::Transient,
            "policy" => DeliveryClass::Policy,
            "undetermined" => DeliveryClass::Undetermined,
            "complaint" => DeliveryClass::Complaint,
            "delivered" => DeliveryClass::Delivered,
            _ => return None,
        })
    }
}

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl StatusCode {
    /// Reads `5.1.1` (surrounding spaces allowed); `None` unless the class is 2, 4 or 5
    /// and both other parts are numbers of at most three digits.
    pub fn parse(text: &str) -> Option<StatusCode> {
        let mut parts = text.trim().split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let number = |part: &str| {
            (!part.is_empty() && part.len() <= 3 && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u16>().ok())
                .flatten()
        };
        let class = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        Some(StatusCode {
            class,
            subject: number(subject)?,
            detail: number(detail)?,
        })
    }

    /// What the code says about the address; `None` for a success (2.x.x).
    pub fn classify(self) -> Option<DeliveryClass> {
        Some(match (self.class, self.subject, self.detail) {
            (2, _, _) => return None,
            (4, _, _) => DeliveryClass::Transient,
            // Policy, blocklist, reputation, authentication: the sender's problem.
            (5, 7, _) => DeliveryClass::Policy,
            // Message too large: fix the message, not the list.
            (5, 2, 3) => DeliveryClass::Policy,
            // Mailbox full, delivery time expired: soft even when reported as 5.
            (5, 2, 2) | (5, 4, 7) => DeliveryClass::Transient,
            _ => DeliveryClass::Permanent,
        })
    }
}

impl std::fmt::Display for StatusCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// Classifies a bounce from its `Status` (an enhanced code) and, when that is missing
/// or unreadable, from the codes at the start of its diagnostic (`smtp; 550 5.1.1 …`:
/// the enhanced code after the reply code first, then the reply code itself, 4xx
/// transient and 5xx permanent). The diagnostic's words are never read. Returns the
/// class and the status code it was decided by; `None` for a success or when no code
/// is found.
pub fn classify_bounce(
    status: Option<&str>,
    diagnostic: Option<&str>,
) -> Option<(DeliveryClass, String)> {
    if let Some(code) = status.and_then(StatusCode::parse) {
        return code.classify().map(|class| (class, code.to_string()));
    }
    let diagnostic = diagnostic?;
    // Strip the type prefix (`smtp;`), then look at the first two words only.
    let text = diagnostic
        .split_once(';')
        .map_or(diagnostic, |(_, rest)| rest);
    let mut words = text.split_whitespace();
    let reply = words.next()?;
    if let Some(code) = words.next().and_then(StatusCode::parse) {
        return code.classify().map(|class| (class, code.to_string()));
    }
    if let Some(code) = StatusCode::parse(reply) {
        return code.classify().map(|class| (class, code.to_string()));
    }
    let reply = reply.trim_end_matches('-');
    if reply.len() != 3 || !reply.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match reply.as_bytes().first() {
        Some(b'4') => Some((DeliveryClass::Transient, reply.to_owned())),
        Some(b'5') => Some((DeliveryClass::Permanent, reply.to_owned())),
        _ => None,
    }
}

/// The envelope sender of outbox row `outbox_id` to `recipient`, under the bounce
/// address `bounces@domain`: `bounces+<id>-<local>=<domain>@domain`. `None` when
/// either address has no `@`.
pub fn return_path(bounce_address: &str, outbox_id: i64, recipient: &str) -> Option<String> {
    let (base_local, base_domain) = bounce_address.rsplit_once('@')?;
    let (local, domain) = recipient.rsplit_once('@')?;
    Some(format!(
        "{base_local}+{outbox_id}-{local}={domain}@{base_domain}"
    ))
}

/// What a return path made by [`return_path`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnPath {
    pub outbox_id: i64,
    /// The original recipient, as encoded.
    pub recipient: String,
}

/// Decodes an address made by [`return_path`] under `bounce_address` (compared without
/// regard to case); `None` for any other address.
pub fn decode_return_path(bounce_address: &str, address: &str) -> Option<ReturnPath> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (base_local, base_domain) = bounce_address.rsplit_once('@')?;
    let (local, domain) = address.rsplit_once('@')?;
    if !domain.eq_ignore_ascii_case(base_domain) {
        return None;
    }
    let (prefix, tag) = local.split_once('+')?;
    if !prefix.eq_ignore_ascii_case(base_local) {
        return None;
    }
    let (id, encoded) = tag.split_once('-')?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let outbox_id = id.parse().ok()?;
    let (recipient_local, recipient_domain) = encoded.rsplit_once('=')?;
    if recipient_local.is_empty() || recipient_domain.is_empty() {
        return None;
    }
    Some(ReturnPath {
        outbox_id,
        recipient: format!("{recipient_local}@{recipient_domain}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_code_decides_the_class_and_5_7_never_blames_the_address() {
        let class = |status: &str| classify_bounce(Some(status), None).map(|(c, _)| c);
        assert_eq!(class("5.1.1"), Some(DeliveryClass::Permanent));
        assert_eq!(class("5.1.10"), Some(DeliveryClass::Permanent));
        assert_eq!(class("5.2.1"), Some(DeliveryClass::Permanent));
        assert_eq!(class("4.2.2"), Some(DeliveryClass::Transient));
        assert_eq!(class("5.2.2"), Some(DeliveryClass::Transient));
        assert_eq!(class("4.7.1"), Some(DeliveryClass::Transient));
        assert_eq!(class("5.7.1"), Some(DeliveryClass::Policy));
        assert_eq!(class("5.7.26"), Some(DeliveryClass::Policy));
        assert_eq!(class("5.2.3"), Some(DeliveryClass::Policy));
        assert_eq!(class("2.0.0"), None);
        assert_eq!(class("6.1.1"), None);
        assert_eq!(class("5.1"), None);
    }

    #[test]
    fn without_a_status_the_codes_of_the_diagnostic_decide_never_its_words() {
        let class = |diagnostic: &str| classify_bounce(None, Some(diagnostic));
        assert_eq!(
            class("smtp; 550 5.7.1 user unknown, mailbox not found"),
            Some((DeliveryClass::Policy, "5.7.1".into()))
        );
        assert_eq!(
            class("smtp; 550 5.1.1 <a@b.example>: Recipient address rejected"),
            Some((DeliveryClass::Permanent, "5.1.1".into()))
        );
        assert_eq!(
            class("smtp; 452 mailbox full"),
            Some((DeliveryClass::Transient, "452".into()))
        );
        assert_eq!(class("smtp; user unknown"), None);
        assert_eq!(class("no such user 5.1.1"), None);
        // An unparseable status falls back to the diagnostic.
        assert_eq!(
            classify_bounce(Some("bogus"), Some("smtp; 550 5.1.2 no such domain")),
            Some((DeliveryClass::Permanent, "5.1.2".into()))
        );
    }

    #[test]
    fn a_return_path_decodes_to_its_outbox_row_and_recipient_only_under_its_address() {
        let path = return_path("bounces@shop.example", 9001, "nobody@example.com").unwrap();
        // The convention of the shared DSN fixture.
        assert_eq!(path, "bounces+9001-nobody=example.com@shop.example");
        let decoded = decode_return_path("bounces@shop.example", &format!("<{path}>")).unwrap();
        assert_eq!(
            decoded,
            ReturnPath {
                outbox_id: 9001,
                recipient: "nobody@example.com".into()
            }
        );
        let with_dash = return_path("b@x.example", 7, "ann-marie@y.example").unwrap();
        assert_eq!(
            decode_return_path("B@X.EXAMPLE", &with_dash).map(|p| p.recipient),
            Some("ann-marie@y.example".into())
        );
        for other in [
            "bounces+9001-nobody=example.com@other.example",
            "other+9001-nobody=example.com@shop.example",
            "bounces+x1-nobody=example.com@shop.example",
            "bounces+9001-nobody@shop.example",
            "bounces@shop.example",
            "",
        ] {
            assert_eq!(
                decode_return_path("bounces@shop.example", other),
                None,
                "{other}"
            );
        }
    }
}
