//! Email delivery: builds the MIME message and hands it to SMTP (lettre, pooled) or
//! writes it as an `.eml` file (the demo's transport).
//!
//! Invariants:
//! - Every message carries a Message-ID and `X-Dealsync-Idempotency-Key:
//!   <deal>-<rule>-<step>`, both stable for a given outbox row.
//! - Marketing messages carry `List-Unsubscribe` (mailto and https) and
//!   `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058).
//! - SMTP replies are classified, so the worker never parses strings: 4xx and
//!   failures to connect are transient, 5xx permanent, and 5.1.x a hard bounce. A
//!   connection that breaks or times out once it is established (no reply at all) is
//!   an *unknown outcome*: the server may have accepted the message, so it is never
//!   retried (see docs/followups.md, "Unknown outcomes").
//! - The file transport writes under the idempotency key and never overwrites, so a
//!   file exists at most once per row.
//! - Vendor text never shapes a header or breaks a part: the recipient's display name
//!   and the subject are folded onto one line with control characters removed
//!   ([`header_text`]), the address is checked by lettre's parser, and the text and
//!   HTML parts carry no NUL, no other control character but tab and line feed, and no
//!   bare CR ([`body_text`]). A message lettre cannot build is a [`MailError::Build`]
//!   (the row is failed with that reason), never a panic.

use crate::config::{EmailConfig, EmailTransport};
use crate::domain::EmailAddress;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::num::NonZeroU32;
use std::path::PathBuf;

/// The header that names the outbox row a message belongs to.
pub const IDEMPOTENCY_HEADER: &str = "X-Dealsync-Idempotency-Key";

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// Try again later: a 4xx reply, a refused or dropped connection, a timeout.
    #[error("transient delivery failure: {0}")]
    Transient(String),
    /// The connection broke or timed out after it was established, without an SMTP
    /// reply: the message may have been accepted. Not retried.
    #[error("delivery outcome unknown: {0}")]
    Unknown(String),
    /// Do not retry: a 5xx reply. `hard_bounce` when the address does not exist.
    #[error("permanent delivery failure: {reason}")]
    Permanent { reason: String, hard_bounce: bool },
    /// The message could not be built (a bad address, say).
    #[error("building the message: {0}")]
    Build(String),
    #[error("email transport: {0}")]
    Setup(String),
}

/// One email, rendered and addressed.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: EmailAddress,
    pub to_name: Option<String>,
    pub subject: String,
    pub text: String,
    pub html: String,
    /// `<deal>-<rule>-<step>`.
    pub idempotency_key: String,
    /// (https URL, mailto address) for marketing messages.
    pub unsubscribe: Option<(String, String)>,
    /// Where replies go instead of `email.from`: the deal's owner on the notes
    /// the owner signs.
    pub reply_to: Option<(Option<String>, EmailAddress)>,
    /// The outbox row a follow-up email is, sent as [`PROVIDER_METADATA_HEADER`] so that
    /// a provider that reports bounces by its own message id (Postmark) names the row.
    pub outbox_id: Option<i64>,
}

/// Postmark copies `X-PM-Metadata-<key>` headers of a message it relays into the
/// `Metadata` of its bounce and complaint webhooks (`connectors::delivery` reads
/// `Metadata.outbox_id`); other servers ignore an unknown `X-` header.
pub const PROVIDER_METADATA_HEADER: &str = "X-PM-Metadata-outbox_id";

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    File(PathBuf),
}

/// Longest display name put in a header, in characters; longer names are cut.
const MAX_DISPLAY_NAME_CHARS: usize = 256;

/// Folds text for a header onto one line: line breaks and tabs (and every other
/// whitespace run) become one space, other control characters (NUL, ESC, DEL, C1)
/// are dropped, and the ends are trimmed. `None` when nothing is left.
pub fn header_text(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for character in text.chars() {
        if character.is_whitespace() {
            pending_space = !out.is_empty();
        } else if !character.is_control() {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(character);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A recipient's display name as it may appear in `To`: [`header_text`], at most
/// [`MAX_DISPLAY_NAME_CHARS`] characters.
pub fn display_name(name: &str) -> Option<String> {
    let folded = header_text(name)?;
    Some(match folded.char_indices().nth(MAX_DISPLAY_NAME_CHARS) {
        Some((at, _)) => folded.get(..at).unwrap_or(&folded).trim_end().to_owned(),
        None => folded,
    })
}

/// Text for a message part: CRLF and bare CR become LF (lettre writes every LF as
/// CRLF), and control characters other than tab and line feed are dropped, NUL
/// included, so a 7-bit part stays valid.
pub fn body_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut characters = text.chars().peekable();
    while let Some(character) = characters.next() {
        match character {
            '\r' => {
                if characters.peek() == Some(&'\n') {
                    characters.next();
                }
                out.push('\n');
            }
            '\n' | '\t' => out.push(character),
            other if other.is_control() => {}
            other => out.push(other),
        }
    }
    out
}

/// Sends messages through the configured transport, within the configured rate.
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// Builds the transport; opens no connection yet.
    pub fn new(config: &EmailConfig) -> Result<Mailer, MailError> {
        let from: Mailbox = config.from.parse().map_err(|_| {
            MailError::Setup(format!("email.from {:?} is not a mailbox", config.from))
        })?;
        let transport = match &config.transport {
            EmailTransport::File { dir } => Transport::File(dir.clone()),
            EmailTransport::Smtp { url } => {
                // The URL may hold credentials: the error must not quote it.
                let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(|_| {
                        MailError::Setup(
                            "email.url is not a usable smtp:// or smtps:// URL".to_owned(),
                        )
                    })?;
                Transport::Smtp(
                    builder
                        .timeout(Some(config.timeout))
                        .pool_config(PoolConfig::new().max_size(config.pool_size))
                        .build(),
                )
            }
        };
        let limiter = config
            .max_per_second
            .and_then(NonZeroU32::new)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate).allow_burst(NonZeroU32::MIN)));
        Ok(Mailer {
            transport,
            from,
            limiter,
        })
    }

    /// A mailer that only builds messages (`outbox preview`): no transport is set up,
    /// so an SMTP URL that is a credential not available here does not matter.
    pub fn composer(config: &EmailConfig) -> Result<Mailer, MailError> {
        let mut offline = config.clone();
        offline.transport = crate::config::EmailTransport::File {
            dir: PathBuf::new(),
        };
        Mailer::new(&offline)
    }

    /// The from address's domain, for Message-IDs.
    fn domain(&self) -> &str {
        self.from.email.domain()
    }

    /// The Message-ID of an outbox row, stable across renders.
    pub fn message_id(&self, idempotency_key: &str) -> String {
        let left = replace_unsafe(idempotency_key, '.');
        format!("<{left}.dealsync@{}>", self.domain())
    }

    /// The default mailto target of List-Unsubscribe.
    pub fn from_address(&self) -> String {
        self.from.email.to_string()
    }

    /// Builds the MIME message: multipart/alternative, text then HTML. The display
    /// name and subject are folded onto one line and the parts cleaned (see the
    /// module's invariants); an unusable address, or anything else lettre refuses,
    /// is a [`MailError::Build`].
    pub fn build(&self, outgoing: &Outgoing) -> Result<Message, MailError> {
        // lettre asserts on some header input rather than returning an error; the
        // inputs are cleaned first, and a panic that still slips through is the
        // same `Build` error, so the row is failed instead of left `sending`.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.build_message(outgoing)
        }))
        .unwrap_or_else(|_| {
            Err(MailError::Build(
                "the email library refused the message's headers".to_owned(),
            ))
        })
    }

    fn build_message(&self, outgoing: &Outgoing) -> Result<Message, MailError> {
        let address = outgoing
            .to
            .as_str()
            .parse()
            .map_err(|error| MailError::Build(format!("recipient address: {error}")))?;
        let to = Mailbox::new(outgoing.to_name.as_deref().and_then(display_name), address);
        let subject = header_text(&outgoing.subject)
            .ok_or_else(|| MailError::Build("the subject is empty".to_owned()))?;
        let header = |name: &'static str, value: String| {
            HeaderValue::new(HeaderName::new_from_ascii_str(name), value)
        };
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(self.message_id(&outgoing.idempotency_key)))
            .raw_header(header(IDEMPOTENCY_HEADER, outgoing.idempotency_key.clone()));
        if let Some((name, address)) = &outgoing.reply_to {
            let address = address
                .as_str()
                .parse()
                .map_err(|error| MailError::Build(format!("reply-to address: {error}")))?;
            builder = builder.reply_to(Mailbox::new(name.clone(), address));
        }
        if let Some(id) = outgoing.outbox_id {
            builder = builder.raw_header(header(PROVIDER_METADATA_HEADER, id.to_string()));
        }
        if let Some((url, mailto)) = &outgoing.unsubscribe {
            builder = builder
                .raw_header(header(
                    "List-Unsubscribe",
                    format!("<mailto:{mailto}?subject=unsubscribe>, <{url}>"),
                ))
                .raw_header(header(
                    "List-Unsubscribe-Post",
                    "List-Unsubscribe=One-Click".to_owned(),
                ));
        }
        builder
            .multipart(MultiPart::alternative_plain_html(
                body_text(&outgoing.text),
                body_text(&outgoing.html),
            ))
            .map_err(|error| MailError::Build(error.to_string()))
    }

    /// Connects as a send would (EHLO, STARTTLS or TLS as the URL says, AUTH when it
    /// carries credentials) and hangs up without a message; the file transport
    /// checks that its directory takes files. For `dealsync check --online`.
    pub async fn test_connection(&self) -> Result<String, MailError> {
        match &self.transport {
            Transport::Smtp(smtp) => match smtp.test_connection().await {
                Ok(true) => Ok("connected, greeted and logged in as configured".to_owned()),
                Ok(false) => Err(MailError::Transient(
                    "the server accepted the connection but did not answer NOOP".to_owned(),
                )),
                Err(error) => Err(MailError::Transient(crate::telemetry::error_chain(&error))),
            },
            Transport::File(dir) => match crate::store::probe_dir(dir) {
                Ok(()) => Ok(format!("{} takes .eml files", dir.display())),
                Err((at, error)) => Err(MailError::Setup(format!(
                    "{} is not writable: {error}",
                    at.display()
                ))),
            },
        }
    }

    /// Waits for the rate limiter, then delivers.
    pub async fn send(&self, message: Message, idempotency_key: &str) -> Result<(), MailError> {
        self.send_from(message, idempotency_key, None).await
    }

    /// Waits for the rate limiter, then delivers with `return_path` as the envelope
    /// sender (`MAIL FROM`; a bounce goes there) instead of the from address. The file
    /// transport writes it as the `Return-Path` header, as a delivering server would.
    pub async fn send_from(
        &self,
        message: Message,
        idempotency_key: &str,
        return_path: Option<&str>,
    ) -> Result<(), MailError> {
        let envelope = match return_path {
            None => None,
            Some(path) => {
                let sender = path
                    .parse::<lettre::Address>()
                    .map_err(|error| MailError::Build(format!("return path {path:?}: {error}")))?;
                let recipients = message.envelope().to().to_vec();
                Some(
                    lettre::address::Envelope::new(Some(sender), recipients)
                        .map_err(|error| MailError::Build(format!("envelope: {error}")))?,
                )
            }
        };
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        match (&self.transport, envelope) {
            (Transport::Smtp(smtp), None) => smtp.send(message).await.map(|_| ()).map_err(classify),
            (Transport::Smtp(smtp), Some(envelope)) => smtp
                .send_raw(&envelope, &message.formatted())
                .await
                .map(|_| ())
                .map_err(classify),
            (Transport::File(dir), envelope) => {
                let mut bytes = Vec::new();
                if let Some(sender) = envelope.as_ref().and_then(|e| e.from()) {
                    bytes.extend_from_slice(format!("Return-Path: <{sender}>\r\n").as_bytes());
                }
                bytes.extend_from_slice(&message.formatted());
                write_eml(dir.clone(), idempotency_key.to_owned(), bytes).await
            }
        }
    }
}

/// Sorts an SMTP error into what the worker must do.
fn classify(error: lettre::transport::smtp::Error) -> MailError {
    let text = error.to_string();
    // lettre's kinds: a reply code (transient/permanent), `Connection` (connecting,
    // TLS set-up: nothing was handed over), `Client` (refused locally), and
    // `Network`/`Response`/timeouts on an established connection, which the pooled
    // transport does not place before or after the end of DATA: unknown.
    let connecting = text.starts_with("Connection error") || text.starts_with("tls error");
    if !connecting && (error.is_response() || error.is_timeout() || is_network(&error)) {
        return MailError::Unknown(text);
    }
    if error.is_client() {
        return MailError::Permanent {
            reason: text,
            hard_bounce: false,
        };
    }
    if error.is_permanent() {
        let code = error.status().map(|c| c.to_string()).unwrap_or_default();
        // 5.1.x: bad destination mailbox/system. Without an enhanced code, 550/551/553
        // are the classic "no such user" replies; 5.7.x policy refusals are not bounces.
        let hard_bounce = text.contains("5.1.")
            || (!text.contains("5.7.") && matches!(code.as_str(), "550" | "551" | "553"));
        MailError::Permanent {
            reason: text,
            hard_bounce,
        }
    } else {
        MailError::Transient(text)
    }
}

/// `key` with every character other than an ASCII letter, digit, `-` or `_` replaced
/// by `with`: an outbox key made safe for a Message-ID's left part or a file name.
fn replace_unsafe(key: &str, with: char) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                with
            }
        })
        .collect()
}

/// lettre has no `is_network`; its Display names the kind.
fn is_network(error: &lettre::transport::smtp::Error) -> bool {
    !error.is_transient()
        && !error.is_permanent()
        && !error.is_client()
        && !error.is_response()
        && error.to_string().starts_with("network error")
}

/// Writes `<dir>/<key>.eml` without ever replacing an existing file: the message is
/// written to a temporary name and then hard-linked into place, which fails when the
/// name exists (a row written before a crash counts as delivered). The directory is
/// created 0700 and each message 0600, whatever the umask (`crate::files`).
async fn write_eml(dir: PathBuf, key: String, bytes: Vec<u8>) -> Result<(), MailError> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let io = |what: &str, error: std::io::Error| {
            MailError::Transient(format!("{what} in {}: {error}", dir.display()))
        };
        crate::files::create_dir_all(&dir).map_err(|e| io("creating the outbox directory", e))?;
        let safe = replace_unsafe(&key, '_');
        let target = dir.join(format!("{safe}.eml"));
        let temporary = dir.join(format!(".{safe}.{}.tmp", std::process::id()));
        // A temporary file left by a crash is replaced, not appended to.
        let _ = std::fs::remove_file(&temporary);
        crate::files::create_new(&temporary)
            .and_then(|mut file| file.write_all(&bytes))
            .map_err(|e| io("writing a message", e))?;
        let linked = std::fs::hard_link(&temporary, &target);
        let _ = std::fs::remove_file(&temporary);
        match linked {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(error) => Err(io("storing a message", error)),
        }
    })
    .await
    .map_err(|error| MailError::Transient(format!("file transport task: {error}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_config(dir: &std::path::Path) -> EmailConfig {
        let text = format!(
            "[email]\ntransport = \"file\"\ndir = \"{}\"\nfrom = \"Shop <shop@example.com>\"\n",
            dir.display()
        );
        crate::config::testing::parse_in(dir, &text).unwrap().email
    }

    fn outgoing(unsubscribe: bool) -> Outgoing {
        Outgoing {
            outbox_id: None,
            to: EmailAddress::parse("ada@example.com").unwrap(),
            to_name: Some("Ada Lovelace".into()),
            subject: "Your cart".into(),
            text: "plain".into(),
            html: "<p>html</p>".into(),
            idempotency_key: "7-cart@checkout-0".into(),
            reply_to: None,
            unsubscribe: unsubscribe.then(|| {
                (
                    "https://shop.example.com/unsubscribe/t".into(),
                    "shop@example.com".into(),
                )
            }),
        }
    }

    #[tokio::test]
    async fn a_file_message_has_both_parts_and_every_header_and_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(&file_config(dir.path())).unwrap();
        let message = mailer.build(&outgoing(true)).unwrap();
        // Unfolded, as a reader of the headers sees them.
        let text = String::from_utf8(message.formatted())
            .unwrap()
            .replace("\r\n ", " ");
        for needle in [
            "Message-ID: <7-cart.checkout-0.dealsync@example.com>",
            "X-Dealsync-Idempotency-Key: 7-cart@checkout-0",
            "List-Unsubscribe: <mailto:shop@example.com?subject=unsubscribe>, <https://shop.example.com/unsubscribe/t>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            "multipart/alternative",
            "text/plain",
            "text/html",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        mailer
            .send(message.clone(), "7-cart@checkout-0")
            .await
            .unwrap();
        mailer.send(message, "7-cart@checkout-0").await.unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".eml"))
            .collect();
        assert_eq!(files, ["7-cart_checkout-0.eml"]);
    }

    #[test]
    fn a_name_with_line_breaks_or_nul_gives_a_one_line_to_and_clean_parts() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(&file_config(dir.path())).unwrap();
        for name in [
            "Ada\r\nBcc: eve@example.com",
            "Ada\nBcc: eve@example.com",
            "Ada\rBcc: eve@example.com",
            "Ada\0Bcc: eve@example.com",
            "\u{2028}Ada\u{85}Bcc:\teve@example.com\u{1b}",
        ] {
            let mut message = outgoing(true);
            message.to_name = Some(name.to_owned());
            message.subject = format!("Your cart, {name}");
            message.text = format!("Hello {name}\r\nbye\rnow\n");
            message.html = format!("<p>{name}</p>\r");
            let text = String::from_utf8(mailer.build(&message).unwrap().formatted()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let to: Vec<&str> = head
                .split("\r\n")
                .filter(|l| l.starts_with("To:"))
                .collect();
            assert_eq!(to.len(), 1, "{head}");
            assert!(
                !head.contains("\nBcc:"),
                "{name:?}: a header was injected\n{head}"
            );
            assert!(!text.contains('\0'), "{name:?}: a NUL reached the message");
            let bare_cr = text
                .as_bytes()
                .windows(2)
                .any(|pair| pair[0] == b'\r' && pair[1] != b'\n');
            assert!(!bare_cr, "{name:?}: a bare CR reached the message");
            assert!(body.contains("Hello "), "{body}");
        }
        assert_eq!(
            display_name("Ada\r\n Lovelace\0").as_deref(),
            Some("Ada Lovelace")
        );
        assert_eq!(display_name("\r\n\0"), None);
        assert_eq!(display_name(&"é".repeat(300)).unwrap().chars().count(), 256);
        assert_eq!(body_text("a\r\nb\rc\0d\te\u{7f}"), "a\nb\ncd\te");
    }

    #[test]
    fn an_address_lettre_refuses_is_a_build_error() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(&file_config(dir.path())).unwrap();
        let mut message = outgoing(false);
        message.to = EmailAddress::parse("a,b@example.com").unwrap();
        assert!(matches!(mailer.build(&message), Err(MailError::Build(_))));
    }

    #[test]
    fn transactional_messages_have_no_unsubscribe_headers() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(&file_config(dir.path())).unwrap();
        let text = String::from_utf8(mailer.build(&outgoing(false)).unwrap().formatted()).unwrap();
        assert!(!text.contains("List-Unsubscribe"), "{text}");
        assert!(text.contains("X-Dealsync-Idempotency-Key"), "{text}");
    }

    mod classify {
        //! How an SMTP server's answers are classified, against a scripted server on
        //! loopback: a hard bounce suppresses the address, a policy refusal does not,
        //! a temporary failure is retried, and a connection lost after the message was
        //! handed over is an unknown outcome (never resent).
        use super::*;
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        use tokio::net::TcpListener;

        /// When the scripted server gives its scripted answer.
        #[derive(Clone, Copy)]
        enum At {
            /// To `RCPT TO`.
            Recipient,
            /// To the end of the message data.
            EndOfData,
        }

        /// What the scripted server does at its point.
        #[derive(Clone, Copy)]
        enum Then {
            Reply(&'static str),
            /// Closes the connection (the client reads an end of stream).
            Close,
            /// Resets the connection (the client's read fails).
            Reset,
        }

        /// Serves SMTP on 127.0.0.1 until the test ends, doing `then` at `at` and
        /// answering 250 to everything else.
        async fn scripted_server(at: At, then: Then) -> u16 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if matches!(then, Then::Reset) {
                            socket.set_zero_linger()?;
                        }
                        let reply = match then {
                            Then::Reply(reply) => Some(reply),
                            Then::Close | Then::Reset => None,
                        };
                        let (read, mut write) = socket.into_split();
                        let mut lines = BufReader::new(read).lines();
                        write.write_all(b"220 scripted ESMTP\r\n").await?;
                        let mut in_data = false;
                        while let Some(line) = lines.next_line().await? {
                            let upper = line.to_ascii_uppercase();
                            let answer: Option<&str> = if in_data {
                                if line != "." {
                                    continue;
                                }
                                in_data = false;
                                match at {
                                    At::EndOfData => reply,
                                    At::Recipient => Some("250 2.0.0 queued"),
                                }
                            } else if upper.starts_with("RCPT") {
                                match at {
                                    At::Recipient => reply,
                                    At::EndOfData => Some("250 2.1.5 ok"),
                                }
                            } else if upper.starts_with("DATA") {
                                in_data = true;
                                Some("354 go ahead")
                            } else if upper.starts_with("QUIT") {
                                write.write_all(b"221 bye\r\n").await?;
                                break;
                            } else {
                                Some("250 ok")
                            };
                            match answer {
                                Some(answer) => {
                                    write.write_all(format!("{answer}\r\n").as_bytes()).await?
                                }
                                None => break,
                            }
                        }
                        if matches!(then, Then::Reset) {
                            // No FIN from the write half: the socket's close resets.
                            write.forget();
                        }
                        Ok::<_, std::io::Error>(())
                    });
                }
            });
            port
        }

        fn smtp_config(port: u16) -> EmailConfig {
            let dir = std::env::temp_dir();
            let text = format!(
                "[email]\ntransport = \"smtp\"\nurl = \"smtp://127.0.0.1:{port}\"\nfrom = \"Shop <shop@example.com>\"\n"
            );
            crate::config::testing::parse_in(&dir, &text).unwrap().email
        }

        async fn send_to(port: u16) -> Result<(), MailError> {
            let mailer = Mailer::new(&smtp_config(port)).unwrap();
            let message = mailer.build(&outgoing(false)).unwrap();
            mailer.send(message, "7-cart@checkout-0").await
        }

        /// Whether the permanent failure that `reply` to RCPT TO gives is a hard bounce.
        async fn permanent(reply: &'static str) -> bool {
            let port = scripted_server(At::Recipient, Then::Reply(reply)).await;
            match send_to(port).await {
                Err(MailError::Permanent { hard_bounce, .. }) => hard_bounce,
                other => panic!("{reply}: expected a permanent failure, got {other:?}"),
            }
        }

        #[tokio::test]
        async fn an_accepted_message_is_sent() {
            let port = scripted_server(At::EndOfData, Then::Reply("250 2.0.0 queued")).await;
            send_to(port).await.unwrap();
        }

        #[tokio::test]
        async fn an_unknown_mailbox_is_a_hard_bounce() {
            assert!(permanent("550 5.1.1 <ada@example.com>: no such user").await);
            assert!(permanent("553 mailbox name not allowed").await);
            assert!(permanent("551 user not local").await);
        }

        #[tokio::test]
        async fn a_policy_refusal_or_a_full_mailbox_is_permanent_but_no_hard_bounce() {
            assert!(!permanent("550 5.7.1 message refused by policy").await);
            assert!(!permanent("554 5.7.1 relay access denied").await);
            assert!(!permanent("552 5.2.2 mailbox full").await);
        }

        #[tokio::test]
        async fn a_temporary_refusal_is_transient() {
            let port = scripted_server(
                At::Recipient,
                Then::Reply("451 4.7.1 greylisted, try later"),
            )
            .await;
            let result = send_to(port).await;
            assert!(matches!(result, Err(MailError::Transient(_))), "{result:?}");
        }

        #[tokio::test]
        async fn a_connection_lost_after_the_message_was_handed_over_is_an_unknown_outcome() {
            for then in [Then::Close, Then::Reset] {
                let port = scripted_server(At::EndOfData, then).await;
                let result = send_to(port).await;
                assert!(matches!(result, Err(MailError::Unknown(_))), "{result:?}");
            }
        }

        #[tokio::test]
        async fn a_connection_that_times_out_before_anything_is_sent_is_transient() {
            // A listener with a backlog of 0 and one connection waiting in its accept
            // queue: the kernel drops further SYNs, so the mailer's connect hangs until
            // its timeout. Nothing was sent, so a retry is safe.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = socket.listen(0).unwrap();
            let address = listener.local_addr().unwrap();
            let _waiting = tokio::net::TcpStream::connect(address).await.unwrap();
            let mut config = smtp_config(address.port());
            config.timeout = std::time::Duration::from_millis(300);
            let mailer = Mailer::new(&config).unwrap();
            let message = mailer.build(&outgoing(false)).unwrap();
            let result = mailer.send(message, "7-cart@checkout-0").await;
            assert!(matches!(result, Err(MailError::Transient(_))), "{result:?}");
        }

        #[tokio::test]
        async fn the_connection_test_reports_a_greeting_server_and_an_unreachable_one() {
            let port = scripted_server(At::Recipient, Then::Reply("250 ok")).await;
            let mailer = Mailer::new(&smtp_config(port)).unwrap();
            assert_eq!(
                mailer.test_connection().await.unwrap(),
                "connected, greeted and logged in as configured"
            );
            let nobody = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().port()
            };
            let mailer = Mailer::new(&smtp_config(nobody)).unwrap();
            let result = mailer.test_connection().await;
            assert!(matches!(result, Err(MailError::Transient(_))), "{result:?}");
        }

        /// The mailer shows up in logs: its from address, never the SMTP URL and its
        /// password.
        #[tokio::test]
        async fn the_mailers_debug_output_names_the_sender_and_hides_the_smtp_password() {
            let mut config = smtp_config(2525);
            config.transport = EmailTransport::Smtp {
                url: crate::config::Secret::new("smtp://shop:hunter2@127.0.0.1:2525"),
            };
            let mailer = Mailer::new(&config).unwrap();
            let shown = format!("{mailer:?}");
            assert!(shown.contains("shop@example.com"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
            // The bare address: the List-Unsubscribe mailto falls back to it.
            assert_eq!(mailer.from_address(), "shop@example.com");
        }

        #[tokio::test]
        async fn a_server_that_cannot_be_reached_is_transient() {
            // A port nobody listens on: bound, then released.
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().port()
            };
            let result = send_to(port).await;
            assert!(matches!(result, Err(MailError::Transient(_))), "{result:?}");
        }
    }
}
