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

/// The SNS envelope fields the signature covers (and where the key comes from).
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnsEnvelope {
    #[serde(rename = "Type")]
    pub kind: String,
    pub message_id: String,
    pub topic_arn: String,
    pub subject: Option<String>,
    pub message: String,
    pub timestamp: String,
    pub signature_version: String,
    pub signature: String,
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    pub token: Option<String>,
    #[serde(rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
}

impl SnsEnvelope {
    /// Reads the envelope of a delivery's body; `None` when it is not one.
    pub fn parse(body: &[u8]) -> Option<SnsEnvelope> {
        serde_json::from_slice(body).ok()
    }

    /// The canonical string SNS signs: `Key\nValue\n` for the keys of the message type,
    /// in order (a Notification's `Subject` only when present).
    pub fn string_to_sign(&self) -> Option<String> {
        let mut fields: Vec<(&str, &str)> =
            vec![("Message", &self.message), ("MessageId", &self.message_id)];
        match self.kind.as_str() {
            "Notification" => {
                if let Some(subject) = &self.subject {
                    fields.push(("Subject", subject));
                }
            }
            "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
                fields.push(("SubscribeURL", self.subscribe_url.as_deref()?));
            }
            _ => return None,
        }
        fields.push(("Timestamp", &self.timestamp));
        if self.kind != "Notification" {
            fields.push(("Token", self.token.as_deref()?));
        }
        fields.push(("TopicArn", &self.topic_arn));
        fields.push(("Type", &self.kind));
        Some(
            fields
                .iter()
                .map(|(key, value)| format!("{key}\n{value}\n"))
                .collect(),
        )
    }
}

/// The RSA public key (PKCS#1 DER) of a PEM certificate, as [`verify_sns`] takes it.
pub fn rsa_key_of_certificate(pem: &[u8]) -> Result<Vec<u8>, String> {
    use x509_cert::der::DecodePem as _;
    let certificate = x509_cert::Certificate::from_pem(pem)
        .map_err(|error| format!("not a PEM certificate: {error}"))?;
    let key = &certificate.tbs_certificate.subject_public_key_info;
    // rsaEncryption
    if key.algorithm.oid.to_string() != "1.2.840.113549.1.1.1" {
        return Err("the certificate's key is not an RSA key".to_owned());
    }
    key.subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "the certificate's key is not a whole number of bytes".to_owned())
}

/// SNS: the secrets are the RSA keys of the certificate the envelope names (fetched by
/// the connector from an allowed host before this runs); RSA PKCS#1 v1.5 with SHA-1
/// (`SignatureVersion` 1) or SHA-256 (2) over [`SnsEnvelope::string_to_sign`]. The
/// message id is the delivery id (SNS retries with the same one).
pub(super) fn verify_sns(
    secrets: &[&[u8]],
    request: &Request<'_>,
) -> Result<Verified, SignatureError> {
    const WHERE: &str = "Signature (in the body)";
    let envelope = SnsEnvelope::parse(request.body).ok_or(malformed(
        WHERE,
        "expected an SNS message (JSON with Type, MessageId, Signature, …)",
    ))?;
    let algorithm: &'static dyn ring::signature::VerificationAlgorithm =
        match envelope.signature_version.as_str() {
            "1" => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            "2" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            _ => return Err(malformed(WHERE, "SignatureVersion must be 1 or 2")),
        };
    let signed = envelope
        .string_to_sign()
        .ok_or(malformed(WHERE, "unknown Type or a missing field it signs"))?;
    let signature = BASE64
        .decode(envelope.signature.trim())
        .map_err(|_| malformed(WHERE, "expected a base64 signature"))?;
    let index = secrets
        .iter()
        .position(|key| {
            !key.is_empty()
                && ring::signature::UnparsedPublicKey::new(algorithm, key)
                    .verify(signed.as_bytes(), &signature)
                    .is_ok()
        })
        .ok_or(SignatureError::Mismatch)?;
    Ok(Verified {
        delivery_id: Some(format!("sns:{}", envelope.message_id)),
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

#[cfg(test)]
mod sns_tests {
    use super::*;

    #[test]
    fn the_string_to_sign_of_the_shared_envelope_is_the_documented_one() {
        let read = |name: &str| {
            std::fs::read(format!(
                "{}/tests/fixtures/bounces/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        let envelope = SnsEnvelope::parse(&read("ses-sns-envelope-notification.json")).unwrap();
        let expected: serde_json::Value =
            serde_json::from_slice(&read("ses-sns-string-to-sign-notification.json")).unwrap();
        assert_eq!(
            envelope.string_to_sign().as_deref(),
            expected["string_to_sign"].as_str()
        );
        // The test certificate's key reads; a key is not a certificate.
        assert!(rsa_key_of_certificate(&read("sns-test-cert.pem")).is_ok());
        assert!(rsa_key_of_certificate(&read("sns-test-key.pem")).is_err());
    }
}
