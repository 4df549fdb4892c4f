//! The email providers' webhook schemes (`Scheme::Mailgun`, `Scheme::SendGrid`); the
//! helpers and invariants of the parent module apply.
//!
//! - Mailgun signs inside the body: `signature = hex(HMAC-SHA256(signing key,
//!   timestamp + token))` in the body's `signature` object. The body is parsed as JSON
//!   only to read that object; nothing else of it is read before the signature matches.
//!   The token (50 random characters) is the delivery id, so a replayed delivery is a
//!   duplicate; the timestamp must be within the tolerance.
//! - SendGrid's signed event webhook: `X-Twilio-Email-Event-Webhook-Signature`, a base64
//!   DER ECDSA P-256 / SHA-256 signature over `timestamp + body`, checked with the public
//!   key from the SendGrid settings (base64 DER SubjectPublicKeyInfo) as the secret; the
//!   timestamp header must be within the tolerance (the SDK has no replay window).

use super::{
    BASE64, Duration, Request, SignatureError, SystemTime, Verified, check_window, hmac_sha256,
    malformed, match_secret, parse_timestamp, required_str, to_hex,
};
use base64::Engine as _;

pub const SENDGRID_SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
pub const SENDGRID_TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, a
/// 66-byte BIT STRING); the uncompressed point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The uncompressed P-256 point of a base64 DER SubjectPublicKeyInfo.
pub(super) fn sendgrid_key(secret: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let text = std::str::from_utf8(secret).map_err(|_| SignatureError::BadSecret {
        reason: "expected the base64 public key from the SendGrid settings",
    })?;
    let der = BASE64
        .decode(text.trim())
        .map_err(|_| SignatureError::BadSecret {
            reason: "expected the base64 public key from the SendGrid settings",
        })?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point.first() == Some(&4) => Ok(point.to_vec()),
        _ => Err(SignatureError::BadSecret {
            reason: "expected a P-256 public key (base64 DER SubjectPublicKeyInfo)",
        }),
    }
}

pub(super) fn verify_sendgrid(
    secrets: &[&[u8]],
    request: &Request<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    let signature = required_str(request.headers, SENDGRID_SIGNATURE)?;
    let timestamp = required_str(request.headers, SENDGRID_TIMESTAMP)?;
    let signature = BASE64
        .decode(signature.trim())
        .map_err(|_| malformed(SENDGRID_SIGNATURE, "expected a base64 DER signature"))?;
    let message = [timestamp.as_bytes(), request.body].concat();
    let mut any_usable = false;
    let mut matched = None;
    for (index, secret) in secrets.iter().enumerate() {
        let Ok(point) = sendgrid_key(secret) else {
            continue;
        };
        any_usable = true;
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            point,
        );
        if key.verify(&message, &signature).is_ok() {
            matched = Some(index);
            break;
        }
    }
    let index = match (matched, any_usable) {
        (Some(index), _) => index,
        (None, true) => return Err(SignatureError::Mismatch),
        (None, false) => {
            return Err(SignatureError::BadSecret {
                reason: "no usable SendGrid public key is configured",
            });
        }
    };
    let signed_at = parse_timestamp(timestamp, Duration::from_secs, SENDGRID_TIMESTAMP)?;
    check_window(signed_at, now, tolerance)?;
    Ok(Verified {
        signed_at: Some(signed_at),
        secret_index: Some(index),
        ..Verified::default()
    })
}

/// The body's `signature` object, read as JSON and nothing more.
#[derive(serde::Deserialize)]
struct MailgunBody<'a> {
    #[serde(borrow)]
    signature: MailgunSignature<'a>,
}

#[derive(serde::Deserialize)]
struct MailgunSignature<'a> {
    timestamp: std::borrow::Cow<'a, str>,
    token: std::borrow::Cow<'a, str>,
    signature: std::borrow::Cow<'a, str>,
}

/// Mailgun's signature of `timestamp + token` under `key`, as hex.
pub fn mailgun_signature(key: &[u8], timestamp: &str, token: &str) -> String {
    to_hex(&hmac_sha256(key, &[timestamp.as_bytes(), token.as_bytes()]))
}

pub(super) fn verify_mailgun(
    secrets: &[&[u8]],
    request: &Request<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    const WHERE: &str = "signature (in the body)";
    let body: MailgunBody<'_> = serde_json::from_slice(request.body).map_err(|_| {
        malformed(
            WHERE,
            "expected a JSON body with signature.timestamp, .token and .signature",
        )
    })?;
    let presented = super::decode_hex_digest(&body.signature.signature)
        .ok_or(malformed(WHERE, "expected a hex HMAC-SHA256"))?;
    let index = match_secret(secrets, &[presented], |key| {
        hmac_sha256(
            key,
            &[
                body.signature.timestamp.as_bytes(),
                body.signature.token.as_bytes(),
            ],
        )
    })?;
    let signed_at = parse_timestamp(&body.signature.timestamp, Duration::from_secs, WHERE)?;
    check_window(signed_at, now, tolerance)?;
    Ok(Verified {
        delivery_id: Some(format!("mailgun:{}", body.signature.token)),
        signed_at: Some(signed_at),
        secret_index: Some(index),
        ..Verified::default()
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Scheme, verify};
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn fixture(name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(format!(
            "{}/tests/fixtures/bounces/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sendgrid(
        timestamp: &str,
        signature: &str,
        body: &[u8],
        key: &str,
        now: SystemTime,
    ) -> Result<Verified, SignatureError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            SENDGRID_TIMESTAMP,
            HeaderValue::from_str(timestamp).unwrap(),
        );
        headers.insert(
            SENDGRID_SIGNATURE,
            HeaderValue::from_str(signature).unwrap(),
        );
        let request = Request {
            method: "POST",
            uri: "/webhooks/sg",
            headers: &headers,
            body,
        };
        let scheme = Scheme::SendGrid {
            tolerance: super::super::DEFAULT_TOLERANCE,
        };
        verify(&scheme, &[key.as_bytes()], &request, now)
    }

    #[test]
    fn the_official_sendgrid_vector_verifies_and_its_negative_cases_do_not() {
        let vector = fixture("sendgrid-signature-vector-official.json");
        let key = vector["public_key_b64_der"].as_str().unwrap();
        let timestamp = vector["header_X-Twilio-Email-Event-Webhook-Timestamp"]
            .as_str()
            .unwrap();
        let signature = vector["header_X-Twilio-Email-Event-Webhook-Signature"]
            .as_str()
            .unwrap();
        let body = vector["raw_body"].as_str().unwrap().as_bytes();
        let signed = timestamp.parse::<u64>().unwrap();
        let verified = sendgrid(timestamp, signature, body, key, at(signed + 10)).unwrap();
        assert_eq!(verified.secret_index, Some(0));
        assert_eq!(
            sendgrid(timestamp, signature, b"payload", key, at(signed)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            sendgrid("timestamp", signature, body, key, at(signed)),
            Err(SignatureError::Mismatch)
        );
        // Authentic but outside our replay window.
        assert!(matches!(
            sendgrid(timestamp, signature, body, key, at(signed + 3600)),
            Err(SignatureError::Stale { .. })
        ));
        // A key that is not a P-256 public key is a configuration error.
        assert!(matches!(
            super::super::validate_secret(
                &Scheme::SendGrid {
                    tolerance: Duration::ZERO
                },
                b"bm90IGEga2V5"
            ),
            Err(SignatureError::BadSecret { .. })
        ));
    }

    #[test]
    fn the_mailgun_vector_verifies_with_its_token_as_the_delivery_id() {
        let vector = fixture("mailgun-signature-vector-selfcomputed.json");
        let key = vector["signing_key"].as_str().unwrap();
        assert_eq!(
            mailgun_signature(
                key.as_bytes(),
                vector["timestamp"].as_str().unwrap(),
                vector["token"].as_str().unwrap()
            ),
            vector["expected_hex_hmac_sha256"].as_str().unwrap()
        );
        let body = std::fs::read(format!(
            "{}/tests/fixtures/bounces/mailgun-failed-permanent-webhook.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let headers = HeaderMap::new();
        let request = Request {
            method: "POST",
            uri: "/webhooks/mg",
            headers: &headers,
            body: &body,
        };
        let scheme = Scheme::Mailgun {
            tolerance: super::super::DEFAULT_TOLERANCE,
        };
        let now = at(1_770_920_772 + 60);
        let verified = verify(&scheme, &[b"old-key", key.as_bytes()], &request, now).unwrap();
        assert_eq!(verified.secret_index, Some(1));
        assert_eq!(
            verified.delivery_id.as_deref(),
            Some("mailgun:e0b5477167110d68991efc6b9f89f0a11066af27834600e123")
        );
        assert_eq!(
            verify(&scheme, &[b"other-key"], &request, now),
            Err(SignatureError::Mismatch)
        );
        let tampered = String::from_utf8(body.clone())
            .unwrap()
            .replace("1770920772", "1770920773");
        let request = Request {
            body: tampered.as_bytes(),
            ..request
        };
        assert_eq!(
            verify(&scheme, &[key.as_bytes()], &request, now),
            Err(SignatureError::Mismatch)
        );
        let request = Request {
            body: b"not json",
            ..request
        };
        assert!(matches!(
            verify(&scheme, &[key.as_bytes()], &request, now),
            Err(SignatureError::Malformed { .. })
        ));
    }
}
