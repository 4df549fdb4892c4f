//! Checks the SMTP harness itself, so a failing follow-up test points at the daemon
//! and not at the server it talks to.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::harness::eventually;
use crate::harness::smtp::SmtpServer;

/// Returns a transport that opens a fresh connection to `server` for every send: no
/// pooled connection survives a restart of the server in these tests.
fn mailer(server: &SmtpServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.port())
        .timeout(Some(Duration::from_secs(5)))
        .build()
}

fn message_to(recipient: &str, subject: &str) -> Message {
    let from: Mailbox = "Shop <shop@example.com>"
        .parse()
        .expect("a valid sender address");
    let to: Mailbox = recipient.parse().expect("a valid recipient address");
    Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .body(String::from("Your cart is waiting for you.\r\n"))
        .expect("a valid message")
}

#[tokio::test]
async fn a_message_sent_over_smtp_is_received_exactly_once_with_its_recipient() {
    let server = SmtpServer::start().await;
    assert_eq!(server.url(), format!("smtp://127.0.0.1:{}", server.port()));

    mailer(&server)
        .send(message_to("buyer@example.com", "You left something behind"))
        .await
        .expect("the sink accepts an ordinary recipient");

    let messages = server.messages();
    assert_eq!(messages.len(), 1, "exactly one message: {messages:#?}");
    let received = &messages[0];
    assert_eq!(received.mail_from, "shop@example.com");
    assert_eq!(received.rcpt_to, vec!["buyer@example.com".to_owned()]);
    assert!(
        received.data.contains("Subject: You left something behind"),
        "raw data carries the headers: {}",
        received.data
    );
    assert!(received.data.contains("Your cart is waiting for you."));
}

#[tokio::test]
async fn a_bounce_recipient_is_refused_with_a_permanent_error_and_nothing_is_stored() {
    let server = SmtpServer::start().await;

    let error = mailer(&server)
        .send(message_to("nobody-bounce@example.com", "Hello"))
        .await
        .expect_err("the sink refuses a bounce recipient");

    assert!(
        error.is_permanent(),
        "expected a permanent error: {error:?}"
    );
    assert_eq!(
        error.status().map(|code| code.to_string()),
        Some("550".to_owned())
    );
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn a_tempfail_recipient_is_refused_with_a_transient_error_and_nothing_is_stored() {
    let server = SmtpServer::start().await;

    let error = mailer(&server)
        .send(message_to("busy-tempfail@example.com", "Hello"))
        .await
        .expect_err("the sink refuses a tempfail recipient");

    assert!(
        error.is_transient(),
        "expected a transient error: {error:?}"
    );
    assert_eq!(
        error.status().map(|code| code.to_string()),
        Some("451".to_owned())
    );
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn a_stopped_server_refuses_connections_and_after_a_restart_on_the_same_port_accepts_again() {
    let mut server = SmtpServer::start().await;
    let port = server.port();
    mailer(&server)
        .send(message_to("first@example.com", "Before the outage"))
        .await
        .expect("the sink accepts mail before it stops");

    server.stop().await;
    let error = mailer(&server)
        .send(message_to("second@example.com", "During the outage"))
        .await
        .expect_err("nothing listens while the sink is stopped");
    assert!(
        !error.is_permanent(),
        "an outage is not a permanent refusal: {error:?}"
    );

    server.restart().await;
    assert_eq!(server.port(), port, "the sink comes back on the same port");
    let transport = mailer(&server);
    eventually(
        "the restarted sink to accept mail",
        Duration::from_secs(10),
        || {
            let transport = &transport;
            async move {
                transport
                    .send(message_to("second@example.com", "After the outage"))
                    .await
                    .ok()
            }
        },
    )
    .await;

    let recipients: Vec<Vec<String>> = server
        .messages()
        .into_iter()
        .map(|received| received.rcpt_to)
        .collect();
    assert_eq!(
        recipients,
        vec![
            vec!["first@example.com".to_owned()],
            vec!["second@example.com".to_owned()]
        ],
        "the message from before the outage is kept, and the one after it arrives once"
    );
}

#[tokio::test]
async fn a_recipient_refused_on_its_own_gets_its_reply_while_others_are_accepted() {
    let server = SmtpServer::start().await;
    server.refuse_recipient("Policy@Example.com", Some("550 5.7.1 rejected by policy"));
    server.refuse_recipient("gone@example.com", Some("550 5.1.1 mailbox does not exist"));

    let error = mailer(&server)
        .send(message_to("policy@example.com", "Hello"))
        .await
        .expect_err("the sink refuses the listed recipient");
    assert!(error.is_permanent(), "{error:?}");
    assert!(
        error.to_string().contains("5.7.1 rejected by policy"),
        "{error}"
    );
    let error = mailer(&server)
        .send(message_to("gone@example.com", "Hello"))
        .await
        .expect_err("the sink refuses the other listed recipient");
    assert!(error.to_string().contains("5.1.1"), "{error}");
    mailer(&server)
        .send(message_to("other@example.com", "Hello"))
        .await
        .expect("a recipient not listed is accepted");

    // Lifting one refusal keeps the other.
    server.refuse_recipient("policy@example.com", None);
    mailer(&server)
        .send(message_to("policy@example.com", "Again"))
        .await
        .expect("the recipient is accepted once its refusal is lifted");
    assert!(
        mailer(&server)
            .send(message_to("gone@example.com", "Again"))
            .await
            .is_err()
    );
    let recipients: Vec<Vec<String>> = server
        .messages()
        .into_iter()
        .map(|received| received.rcpt_to)
        .collect();
    assert_eq!(
        recipients,
        vec![
            vec!["other@example.com".to_owned()],
            vec!["policy@example.com".to_owned()]
        ]
    );
}
