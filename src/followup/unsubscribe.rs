//! Unsubscribe tokens: the recipient's address, signed with HMAC-SHA256 under
//! `email.unsubscribe_secret`, so a link cannot be forged to unsubscribe someone else
//! and needs no database row. `base64url(address) "." base64url(mac[..16])`.

use crate::domain::EmailAddress;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const CONTEXT: &[u8] = b"dealsync-unsubscribe-v1:";
const MAC_BYTES: usize = 16;

fn mac(secret: &str, address: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(CONTEXT);
    mac.update(address.as_bytes());
    mac
}

/// Returns the token for an address.
pub fn sign(secret: &str, address: &EmailAddress) -> String {
    let tag = mac(secret, address.as_str()).finalize().into_bytes();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(address.as_str()),
        URL_SAFE_NO_PAD.encode(&tag[..MAC_BYTES])
    )
}

/// Returns the address a token was signed for, or `None` when it is malformed or forged.
pub fn verify(secret: &str, token: &str) -> Option<EmailAddress> {
    let (payload, tag) = token.split_once('.')?;
    let address = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    if tag.len() != MAC_BYTES {
        return None;
    }
    // Constant-time comparison of the truncated tag.
    mac(secret, &address).verify_truncated_left(&tag).ok()?;
    EmailAddress::parse(&address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_only_under_its_secret_and_unchanged() {
        let address = EmailAddress::parse("ada@example.com").unwrap();
        let token = sign("a-long-enough-secret", &address);
        assert_eq!(verify("a-long-enough-secret", &token), Some(address));
        assert_eq!(verify("another-secret-value", &token), None);
        let forged = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode("grace@example.com"),
            token.split_once('.').unwrap().1
        );
        assert_eq!(verify("a-long-enough-secret", &forged), None);
        assert_eq!(verify("a-long-enough-secret", "garbage"), None);
        assert_eq!(verify("a-long-enough-secret", "a.b.c"), None);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// An address as `EmailAddress::parse` keeps it: a local part of any characters but
    /// whitespace, control characters and angle brackets, a lower-case domain with a dot.
    fn address() -> impl Strategy<Value = EmailAddress> {
        ("[^\\s<>\\p{Cc}]{1,24}", "[a-z0-9-]{1,12}\\.[a-z]{2,6}").prop_map(|(local, domain)| {
            EmailAddress::parse(&format!("{local}@{domain}")).expect("a valid address")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_token_verifies_to_its_address_under_its_secret(
            address in address(),
            secret in ".{16,40}",
        ) {
            let token = sign(&secret, &address);
            prop_assert_eq!(verify(&secret, &token), Some(address));
        }

        #[test]
        fn a_token_changed_in_one_character_or_under_another_secret_does_not_verify(
            address in address(),
            secret in ".{16,40}",
            other in ".{16,40}",
            at in any::<prop::sample::Index>(),
            replacement in "[A-Za-z0-9_.-]",
        ) {
            let token = sign(&secret, &address);
            prop_assume!(other != secret);
            prop_assert_eq!(verify(&other, &token), None);
            let mut chars: Vec<char> = token.chars().collect();
            let at = at.index(chars.len());
            let replacement = replacement.chars().next().unwrap();
            prop_assume!(chars[at] != replacement);
            chars[at] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert_eq!(verify(&secret, &changed), None);
        }

        #[test]
        fn no_text_panics_the_token_check_or_passes_it(
            token in prop_oneof![any::<String>(), "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,24}"],
            secret in ".{16,40}",
        ) {
            prop_assert_eq!(verify(&secret, &token), None);
        }
    }
}
