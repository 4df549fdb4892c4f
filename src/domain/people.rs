//! People and companies across connections: the one home of the normalisation that
//! links a deal to a person (its contact's address) and a company (its contact's
//! domain), so the same customer in two CRMs and a shop is one person.
//!
//! Invariants:
//! - A person key is a pure function of an address: the same address always gives the
//!   same key, in the store's write path, its migration backfill, the claim-time facts
//!   and the `people show` lookup.
//! - A person key is the address without surrounding whitespace, lowercased, with a
//!   `+tag` removed from the local part only where the domain is in
//!   [`PLUS_ADDRESSING_DOMAINS`] (mailboxes known to deliver `name+tag@` to `name@`);
//!   elsewhere a `+` is part of the mailbox name and is kept.
//! - A company key is the address's lowercased domain, except for the domains of
//!   [`SHARED_MAILBOX_DOMAINS`] (free mail and internet providers' personal
//!   mailboxes), which never make a company: two strangers at gmail.com are not one
//!   company.
//! - Input that is not an address (no `@`, an empty side, a control character or
//!   whitespace inside) has no key; nothing here panics on any input.

/// Domains whose mailboxes ignore a `+tag` in the local part (`ann+shop@gmail.com`
/// reaches `ann@gmail.com`). Only these lose the tag: elsewhere `+` may be part of the
/// mailbox's real name.
pub const PLUS_ADDRESSING_DOMAINS: &[&str] = &[
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "icloud.com",
    "me.com",
    "mac.com",
    "fastmail.com",
    "proton.me",
    "protonmail.com",
];

/// Domains of free mail and of internet providers' personal mailboxes: an address
/// there says nothing about the company a person works for, so it links no company.
pub const SHARED_MAILBOX_DOMAINS: &[&str] = &[
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "hotmail.co.uk",
    "hotmail.de",
    "hotmail.fr",
    "live.com",
    "msn.com",
    "yahoo.com",
    "yahoo.co.uk",
    "yahoo.de",
    "yahoo.fr",
    "ymail.com",
    "aol.com",
    "icloud.com",
    "me.com",
    "mac.com",
    "proton.me",
    "protonmail.com",
    "fastmail.com",
    "gmx.de",
    "gmx.net",
    "gmx.com",
    "web.de",
    "t-online.de",
    "mail.com",
    "mail.ru",
    "yandex.ru",
    "yandex.com",
    "qq.com",
    "163.com",
    "126.com",
    "zoho.com",
    "comcast.net",
    "verizon.net",
    "att.net",
    "orange.fr",
    "free.fr",
    "laposte.net",
    "libero.it",
    "btinternet.com",
];

/// The longest address that gets a key (RFC 5321's path limit); longer input is not
/// an address anyone can receive mail at.
const MAX_ADDRESS_LEN: usize = 254;

/// The local part and lowercased domain of `address`, when it is one.
fn split(address: &str) -> Option<(String, String)> {
    let address = address.trim();
    if address.is_empty() || address.len() > MAX_ADDRESS_LEN {
        return None;
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
    {
        return None;
    }
    let (local, domain) = address.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.').to_lowercase();
    if local.is_empty() || domain.is_empty() || domain.starts_with('.') {
        return None;
    }
    Some((local.to_lowercase(), domain))
}

/// The person key of an address: see the module's invariants.
pub fn person_key(address: &str) -> Option<String> {
    let (local, domain) = split(address)?;
    let local = if PLUS_ADDRESSING_DOMAINS.contains(&domain.as_str()) {
        match local.split_once('+') {
            // `+tag@gmail.com` has no mailbox name left: keep it whole.
            Some((name, _)) if !name.is_empty() => name.to_owned(),
            _ => local,
        }
    } else {
        local
    };
    Some(format!("{local}@{domain}"))
}

/// The company key of an address: its domain, unless a shared mailbox's.
pub fn company_key(address: &str) -> Option<String> {
    let (_, domain) = split(address)?;
    company_domain(&domain)
}

/// The company key of a domain as a user names it (`deals list --company`): trimmed,
/// lowercased, without a leading `@` or `www.` and a trailing dot; `None` for a shared
/// mailbox domain or one that is not a domain.
/// The company key of a company record's domain or website as a CRM stores it
/// ("acme.example", "https://www.Acme.example/about"): its host, as [`company_domain`].
pub fn website_domain(website: &str) -> Option<String> {
    let text = website.trim();
    let text = text.split_once("://").map_or(text, |(_, rest)| rest);
    let host = text.split(['/', '?', '#']).next().unwrap_or_default();
    // user:password@host:port
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    let host = host.split(':').next().unwrap_or_default();
    company_domain(host)
}

pub fn company_domain(domain: &str) -> Option<String> {
    let domain = domain.trim().trim_start_matches('@').trim_end_matches('.');
    let mut domain = domain.to_lowercase();
    while let Some(rest) = domain.strip_prefix("www.") {
        domain = rest.to_owned();
    }
    if domain.is_empty()
        || domain.len() > MAX_ADDRESS_LEN
        || domain.starts_with('.')
        || domain
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '/')
        || SHARED_MAILBOX_DOMAINS.contains(&domain.as_str())
    {
        return None;
    }
    Some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn case_and_surrounding_whitespace_never_make_two_people() {
        assert_eq!(
            person_key("  Ann.Lee@Acme.Example \n").as_deref(),
            Some("ann.lee@acme.example")
        );
        assert_eq!(
            person_key("ANN.LEE@ACME.EXAMPLE."),
            person_key("ann.lee@acme.example")
        );
    }

    #[test]
    fn a_plus_tag_is_dropped_only_where_the_domain_ignores_it() {
        assert_eq!(
            person_key("Ann+Shop@GMail.com").as_deref(),
            Some("ann@gmail.com")
        );
        assert_eq!(
            person_key("ann+a+b@googlemail.com").as_deref(),
            Some("ann@googlemail.com")
        );
        // Elsewhere `+` may be part of the mailbox: two mailboxes, two people.
        assert_eq!(
            person_key("ann+shop@acme.example").as_deref(),
            Some("ann+shop@acme.example")
        );
        // Nothing left of the name: kept whole rather than made `@gmail.com`.
        assert_eq!(
            person_key("+tag@gmail.com").as_deref(),
            Some("+tag@gmail.com")
        );
    }

    #[test]
    fn a_company_records_website_gives_its_host_as_the_company() {
        for website in [
            "acme.example",
            "https://www.Acme.example/about?x=1",
            "http://user:pw@acme.example:8080",
            " ACME.example. ",
        ] {
            assert_eq!(
                website_domain(website).as_deref(),
                Some("acme.example"),
                "{website:?}"
            );
        }
        for nothing in ["", "https://", "https://gmail.com", "not a domain"] {
            assert_eq!(website_domain(nothing), None, "{nothing:?}");
        }
    }

    #[test]
    fn free_mail_and_shared_mailboxes_make_no_company() {
        assert_eq!(company_key("ann@gmail.com"), None);
        assert_eq!(company_key("bob@T-Online.de"), None);
        assert_eq!(
            company_key("ann@Acme.Example").as_deref(),
            Some("acme.example")
        );
        assert_eq!(
            company_domain(" www.ACME.example. ").as_deref(),
            Some("acme.example")
        );
        assert_eq!(
            company_domain("@acme.example").as_deref(),
            Some("acme.example")
        );
        assert_eq!(company_domain("gmail.com"), None);
    }

    #[test]
    fn hostile_input_has_no_key() {
        for bad in [
            "",
            "   ",
            "@",
            "ann@",
            "@acme.example",
            "ann@.",
            "ann @acme.example",
            "ann@acme\u{0}.example",
            "<ann@acme.example>",
            "no-at-sign",
        ] {
            assert_eq!(person_key(bad), None, "{bad:?}");
            assert_eq!(company_key(bad), None, "{bad:?}");
        }
        let long = format!("{}@acme.example", "a".repeat(300));
        assert_eq!(person_key(&long), None);
        assert_eq!(company_domain("a/b"), None);
    }

    proptest! {
        #[test]
        fn keys_never_panic_and_are_fixed_points(text in "\\PC{0,80}") {
            if let Some(key) = person_key(&text) {
                prop_assert_eq!(person_key(&key), Some(key.clone()));
            }
            if let Some(company) = company_key(&text) {
                prop_assert_eq!(company_domain(&company), Some(company.clone()));
            }
        }
    }
}
