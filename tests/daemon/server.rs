//! The HTTP server as a hostile or careless client meets it, over real sockets: header,
//! body and connection limits, running out of file descriptors, slow clients beside
//! real traffic, and who may read the status page and `/metrics`.

use crate::harness::daemon::{KEEP_METRICS_AUTH_DEFAULT, TestDaemon, run_cli};
use crate::harness::{eventually, free_port};
use crate::webhooks::{SHOP_SECRET, checkout, count, post, shopify, shopify_headers};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "test-token-0123456789abcdef";

fn addr(daemon: &TestDaemon) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], daemon.port))
}

/// Reads until the peer closes (EOF or reset) or `timeout` passes; returns what
/// arrived and whether the peer closed.
async fn read_until_closed(
    reader: &mut (impl AsyncRead + Unpin),
    timeout: Duration,
) -> (String, bool) {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&received).into_owned(), true);
            }
            Ok(Ok(read)) => received.extend_from_slice(&chunk[..read]),
        }
    }
}

/// `GET path` on a connection of its own with `Connection: close`; the whole answer,
/// or `None` when none came within `timeout`.
async fn get_on_new_connection(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let (answer, closed) = read_until_closed(&mut stream, timeout).await;
    (closed && !answer.is_empty()).then_some(answer)
}

#[tokio::test]
async fn half_sent_request_headers_are_closed_after_the_header_timeout_while_healthz_answers() {
    // Arrange: 300 sockets that each send half a request header and then nothing.
    let daemon = TestDaemon::start("header_read_timeout = \"1s\"\n").await;
    let closed = Arc::new(AtomicUsize::new(0));
    let earliest_close = Arc::new(std::sync::Mutex::new(Duration::MAX));
    let sent_at = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(addr(&daemon)).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-half: ")
            .await
            .expect("half a header");
        let (closed, earliest_close) = (closed.clone(), earliest_close.clone());
        readers.spawn(async move {
            let (_, by_server) = read_until_closed(&mut stream, Duration::from_secs(60)).await;
            if by_server {
                let mut earliest = earliest_close.lock().unwrap();
                *earliest = (*earliest).min(sent_at.elapsed());
                closed.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    // Act and assert: /healthz answers beside them (that it answers while they are
    // held, not after they are let go, is shown by the test of hundreds of idle and
    // trickling connections, which holds them as long as it needs).
    for _ in 0..5 {
        let (status, _) = daemon.get("/healthz").await;
        assert_eq!(status, 200);
    }
    // The server closes every half-sent request, after (not before) the timeout.
    eventually(
        "the server to close all 300 half-sent requests",
        Duration::from_secs(20),
        || {
            let closed = closed.load(Ordering::SeqCst);
            async move { (closed == 300).then_some(()) }
        },
    )
    .await;
    let earliest = *earliest_close.lock().unwrap();
    assert!(
        earliest >= Duration::from_millis(900),
        "closed after {earliest:?}, before header_read_timeout"
    );
    readers.shutdown().await;
    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503_and_service_resumes_when_others_go() {
    // Arrange: every slot taken by a connection that sends nothing.
    let daemon = TestDaemon::start(
        "max_connections = 8\nheader_read_timeout = \"30s\"\nidle_timeout = \"30s\"\n",
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr(&daemon)).await.expect("connect"));
    }

    // Act: new connections, until the server has accepted the idle ones (a probe
    // accepted before them is answered 200 and closed, freeing its slot).
    let refusal = eventually(
        "a connection past the cap to be answered 503",
        Duration::from_secs(10),
        || async {
            get_on_new_connection(addr(&daemon), "/healthz", Duration::from_secs(5))
                .await
                .filter(|answer| answer.starts_with("HTTP/1.1 503"))
        },
    )
    .await;

    // Assert: a clear answer, then the connection is closed (get_on_new_connection saw it).
    let head = refusal.to_ascii_lowercase();
    assert!(head.contains("retry-after: 1"), "{refusal}");
    assert!(head.contains("connection: close"), "{refusal}");
    assert!(refusal.contains("too many connections"), "{refusal}");

    // Once the others go, service resumes.
    drop(idle);
    let answer = eventually("service to resume", Duration::from_secs(10), || async {
        get_on_new_connection(addr(&daemon), "/healthz", Duration::from_secs(5))
            .await
            .filter(|answer| answer.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(answer.contains("\"ok\""), "{answer}");
    let (_, metrics) = daemon.get("/metrics").await;
    let refused = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("dealsync_http_connections_refused_total{listener=\"main\"} ")
        })
        .and_then(|count| count.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
}

#[tokio::test]
async fn a_trickling_webhook_body_is_cut_off_with_408_and_nothing_is_stored() {
    // Arrange: a validly signed delivery whose body arrives one byte per 100 ms.
    let daemon = TestDaemon::start(&format!(
        "body_read_timeout = \"1s\"\n{}",
        shopify("shop", "1h")
    ))
    .await;
    let body = checkout("trickle-1", "2026-01-01T10:00:00Z", "slow@example.com");
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "delivery-trickle-1", &body);
    let mut head = format!(
        "POST /webhooks/shop HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let stream = TcpStream::connect(addr(&daemon)).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();

    // Act: trickle until the server answers (the whole body would take minutes).
    let trickle = async {
        for byte in &body {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::future::pending::<()>().await;
    };
    let (answer, _) = tokio::select! {
        answer = read_until_closed(&mut reader, Duration::from_secs(10)) => answer,
        _ = trickle => unreachable!("the trickle never ends by itself"),
    };

    // Assert
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 0);
    assert_eq!(
        count(&daemon, "SELECT count(*) FROM webhook_dead_letters"),
        0
    );
    // The same delivery sent at once is taken.
    let (status, text) = post(&daemon, "shop", headers, body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 1);
}

#[tokio::test]
async fn out_of_file_descriptors_the_listener_pauses_and_accepts_again() {
    // Arrange: the daemon may open only a few more files, and more clients than that
    // connect and send half a request header.
    let daemon = TestDaemon::start("header_read_timeout = \"1s\"\n").await;
    let open_now = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .expect("/proc/PID/fd")
        .count();
    let limit = open_now + 16;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", daemon.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let mut half_sent = Vec::new();
    for _ in 0..48 {
        let mut stream = TcpStream::connect(addr(&daemon)).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-half: ")
            .await
            .expect("half a header");
        half_sent.push(stream);
    }
    daemon
        .wait_for_log("accept error", Duration::from_secs(10))
        .await;

    // Act and assert: the listener goes on once descriptors are free again.
    let answer = eventually(
        "/healthz on a new connection",
        Duration::from_secs(30),
        || async {
            get_on_new_connection(addr(&daemon), "/healthz", Duration::from_secs(5))
                .await
                .filter(|answer| answer.starts_with("HTTP/1.1 200"))
        },
    )
    .await;
    assert!(answer.contains("\"ok\""), "{answer}");
    assert!(
        daemon.logs().contains("Too many open files"),
        "{}",
        daemon.logs()
    );
}

#[tokio::test]
async fn hundreds_of_idle_and_trickling_connections_leave_healthz_and_webhook_intake_answering() {
    // Arrange: 200 connections that send nothing and 200 that send a header byte every
    // 200 ms, held open while real clients use the server: the header timeout is long,
    // so nothing but the test lets them go.
    let daemon = TestDaemon::start(&format!(
        "header_read_timeout = \"10m\"\nidle_timeout = \"10m\"\n{}",
        shopify("shop", "1h")
    ))
    .await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr(&daemon)).await.expect("connect"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tricklers = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr(&daemon)).await.expect("connect");
        let stop = stop.clone();
        tricklers.spawn(async move {
            let _ = stream
                .write_all(b"POST /webhooks/shop HTTP/1.1\r\nx-slow: ")
                .await;
            while !stop.load(Ordering::SeqCst) {
                if stream.write_all(b"a").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let held = || async {
        let (_, metrics) = daemon.get("/metrics").await;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("dealsync_http_connections{listener=\"main\"} "))
            .and_then(|open| open.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually(
        "the server to hold the 400 slow connections",
        Duration::from_secs(10),
        || async { (held().await >= 400).then_some(()) },
    )
    .await;

    // Act and assert: health checks and signed deliveries are answered beside them.
    for n in 0..20 {
        let (status, _) = daemon.get("/healthz").await;
        assert_eq!(status, 200);

        let body = checkout(
            &format!("busy-{n}"),
            "2026-01-01T10:00:00Z",
            "busy@example.com",
        );
        let headers = shopify_headers(
            SHOP_SECRET,
            "checkouts/create",
            &format!("busy-delivery-{n}"),
            &body,
        );
        let (status, text) = post(&daemon, "shop", headers, body).await;
        assert_eq!(status, 200, "{text}");
    }
    // Every answer came while the slow connections were held, not after they went.
    let still = held().await;
    assert!(still >= 400, "{still} connections held after the answers");
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 20);
    stop.store(true, Ordering::SeqCst);
    tricklers.shutdown().await;
}

/// GET with optional `Authorization`; returns status, `WWW-Authenticate` and body.
async fn get_with(url: &str, authorization: Option<&str>) -> (u16, String, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.expect("GET");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    (status, challenge, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn by_default_the_status_page_and_metrics_need_the_token_even_from_this_machine() {
    // A loopback listener and a request without any forwarding header: what a reverse
    // proxy on this machine sends with nginx's plain proxy_pass.
    let daemon = TestDaemon::start(&format!(
        "api_token = \"{TOKEN}\"\n{KEEP_METRICS_AUTH_DEFAULT}"
    ))
    .await;

    let (status, challenge, body) = get_with(&daemon.url("/"), None).await;
    assert_eq!(status, 401, "{body}");
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    let (status, _, body) = get_with(&daemon.url("/"), Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("dealsync status"), "{body}");

    let (status, challenge, body) = get_with(&daemon.url("/metrics"), None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(challenge, "Bearer");
    assert!(!body.contains("dealsync_"), "{body}");
    let (status, _, _) = get_with(
        &daemon.url("/metrics"),
        Some("Bearer wrong-token-0123456789"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, body) =
        get_with(&daemon.url("/metrics"), Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("dealsync_build_info"), "{body}");
    assert!(
        !daemon.logs().contains(TOKEN),
        "the token leaked into the logs"
    );
}

#[tokio::test]
async fn with_status_page_auth_local_a_request_straight_to_the_loopback_listener_needs_no_token() {
    let daemon = TestDaemon::start(&format!(
        "api_token = \"{TOKEN}\"\nstatus_page_auth = \"local\"\n"
    ))
    .await;
    let (status, _, body) = get_with(&daemon.url("/"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("dealsync status"), "{body}");
    // A forwarded request still needs the token.
    let response = reqwest::Client::new()
        .get(daemon.url("/"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn with_metrics_listen_metrics_answer_on_that_listener_and_not_on_the_main_one() {
    let metrics_port = free_port();
    let daemon = TestDaemon::start(&format!(
        "metrics_listen = \"127.0.0.1:{metrics_port}\"\nmetrics_auth = \"none\"\n"
    ))
    .await;
    let metrics_url = |path: &str| format!("http://127.0.0.1:{metrics_port}{path}");

    let (status, _, body) = get_with(&metrics_url("/metrics"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("dealsync_build_info"), "{body}");
    let (status, _, _) = get_with(&metrics_url("/healthz"), None).await;
    assert_eq!(status, 404, "the metrics listener serves /metrics alone");
    let (status, _, body) = get_with(&daemon.url("/metrics"), None).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = get_with(&daemon.url("/healthz"), None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_old_remote_status_page_auth_is_refused_with_what_to_write_now() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n\n[server]\napi_token = \"{TOKEN}\"\nstatus_page_auth = \"remote\"\n",
            dir.path().join("dealsync.db").display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["--config", config.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("server.status_page_auth"), "{stderr}");
    assert!(stderr.contains("\"local\""), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
}
