//! The listeners: accept connections and serve each with hyper's HTTP/1.1, within
//! limits that hold against any client on the internet.
//!
//! Invariants:
//! - At most `server.max_connections` connections are served at once per listener
//!   (a `Semaphore` permit lives as long as its connection). One more is accepted,
//!   answered `503 Service Unavailable` with `Retry-After` and `Connection: close`, and
//!   closed; at most [`REFUSALS_AT_ONCE`] such answers are in progress, a connection
//!   past those is closed at once. Nothing is left waiting in the accept backlog.
//! - A new connection must deliver its first request header within
//!   `server.header_read_timeout`, or it is closed. A keep-alive connection must deliver
//!   its next request header within `server.idle_timeout` of the previous response:
//!   that is hyper's header-read timer, which starts as soon as hyper waits for a
//!   request head (so on a keep-alive connection it spans the idle wait and the header
//!   alike; hyper has no separate idle timer). The first-request timer here is the
//!   one addition, so that a new connection gets the shorter bound.
//! - A request must be answered within `server.body_read_timeout` of its header (the
//!   `TimeoutLayer` of [`super::with_layers`]): a body that stalls or trickles gets
//!   408 and its handler, which had not finished reading it, stores nothing.
//! - A panicking handler is answered 500, logged and counted
//!   (`dealsync_http_handler_panics_total`); the connection and the daemon go on.
//! - An accept error (no file descriptor left, …) is logged, counted
//!   (`dealsync_http_accept_errors_total`) and followed by a pause that doubles from
//!   10 ms to 1 s; the listener never stops for one.
//! - Shutdown: the listener stops accepting, idle connections close, requests in
//!   progress finish; `serve` returns once every connection has ended.

use crate::config::ServerConfig;
use crate::telemetry::{ListenerLabels, Metrics};
use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, error, warn};

/// Connections past the cap that are answered 503 at the same time; further ones are
/// closed without an answer, so refusing costs a bounded number of descriptors.
pub const REFUSALS_AT_ONCE: usize = 64;
/// How long answering one refused connection may take in all.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);
/// The pause after an accept error starts here and doubles up to `ACCEPT_PAUSE_MAX`.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one "connection limit reached" warning per this interval.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The limits of one listener, from `[server]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Largest request body read (and dropped) from a refused connection.
    pub max_body_bytes: usize,
}

impl Limits {
    pub fn of(server: &ServerConfig) -> Limits {
        Limits {
            header_read_timeout: server.header_read_timeout,
            body_read_timeout: server.body_read_timeout,
            idle_timeout: server.idle_timeout,
            max_connections: server.max_connections,
            max_body_bytes: server.max_body_bytes,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled and every connection
/// has ended. `name` labels the listener in metrics and logs ("main", "metrics").
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    name: &'static str,
    shutdown: CancellationToken,
) {
    let labels = ListenerLabels {
        listener: name.to_owned(),
    };
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let connections = TaskTracker::new();
    let mut pause = ACCEPT_PAUSE_MIN;
    let mut refusals = RefusalWarning::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                pause = ACCEPT_PAUSE_MIN;
                stream
            }
            // The client gave up between connect and accept: nothing to do.
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                metrics.http_accept_errors.get_or_create(&labels).inc();
                error!(
                    listener = name,
                    %error,
                    pause_ms = pause.as_millis() as u64,
                    "accept error; accepting again after a pause (if out of file descriptors: raise LimitNOFILE= or `ulimit -n`, or lower server.max_connections)"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                connections.spawn(serve_connection(
                    stream,
                    router.clone(),
                    limits.clone(),
                    metrics.clone(),
                    labels.clone(),
                    permit,
                    shutdown.clone(),
                ));
            }
            Err(_) => {
                metrics
                    .http_connections_refused
                    .get_or_create(&labels)
                    .inc();
                refusals.note(name, limits.max_connections);
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    connections.spawn(refuse(stream, limits.clone(), permit));
                }
                // Otherwise `stream` drops here: closed at once.
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Rate-limits the warning about refused connections to one per interval.
#[derive(Default)]
struct RefusalWarning {
    last: Option<Instant>,
    since_last: u64,
}

impl RefusalWarning {
    fn note(&mut self, listener: &str, max_connections: usize) {
        self.since_last += 1;
        if self
            .last
            .is_some_and(|last| last.elapsed() < REFUSAL_WARNING_EVERY)
        {
            return;
        }
        warn!(
            listener,
            max_connections,
            refused = self.since_last,
            "connection limit reached: new connections are answered 503 (server.max_connections)"
        );
        self.last = Some(Instant::now());
        self.since_last = 0;
    }
}

/// Errors of one incoming connection rather than of the listener.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, holding its permit.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    labels: ListenerLabels,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let gauge = metrics.http_connections.get_or_create(&labels).clone();
    gauge.inc();
    // Set when hyper hands over the first request, i.e. its header is complete.
    let first_request = Arc::new(AtomicBool::new(false));
    let service = {
        let first_request = first_request.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            first_request.store(true, Ordering::Relaxed);
            router.clone().oneshot(request.map(Body::new))
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let first_header = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(first_header);
    let mut waiting_for_first = true;
    let mut shutting_down = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    debug!(listener = %labels.listener, %error, "connection ended with an error");
                }
                break;
            }
            _ = &mut first_header, if waiting_for_first => {
                waiting_for_first = false;
                if !first_request.load(Ordering::Relaxed) {
                    debug!(
                        listener = %labels.listener,
                        "closing a connection that sent no request header within server.header_read_timeout"
                    );
                    break;
                }
            }
            _ = shutdown.cancelled(), if !shutting_down => {
                // Closes the connection once idle; a request in progress finishes first.
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
    gauge.dec();
}

/// Answers a connection past the cap with 503 and closes it.
async fn refuse(stream: TcpStream, limits: Limits, _permit: OwnedSemaphorePermit) {
    let max_body_bytes = limits.max_body_bytes;
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        async move {
            // Read (and drop) what the client sends, within the body limit: closing a
            // socket with unread bytes resets it, and the client might not see the 503.
            use http_body_util::BodyExt;
            let mut body = request.into_body();
            let mut left = max_body_bytes;
            while let Some(Ok(frame)) = body.frame().await {
                let size = frame.data_ref().map_or(0, |data| data.len());
                if size >= left {
                    break;
                }
                left -= size;
            }
            Ok::<_, Infallible>(too_many_connections())
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.min(REFUSAL_DEADLINE))
        .keep_alive(false);
    let answered = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, answered).await;
}

fn too_many_connections() -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Body::from(
        r#"{"error":"too many connections; retry later"}"#,
    ));
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Warns when the process may run out of file descriptors before it reaches the
/// connection caps: `connections` served at once, plus the database, the outbound
/// vendor and SMTP connections and the refusals in progress. Linux only (reads
/// `/proc/self/limits`); elsewhere it says nothing.
pub fn check_open_file_limit(connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let Some(soft) = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok())
    else {
        return;
    };
    let needed = connections + REFUSALS_AT_ONCE + OTHER_FILES;
    if soft < needed {
        warn!(
            open_file_limit = soft,
            needed,
            "the open-file limit is below what server.max_connections needs; past it, accepts fail until connections close: raise LimitNOFILE= (systemd) or `ulimit -n`, or lower server.max_connections"
        );
    }
}

/// Descriptors besides the listeners' connections: SQLite files (database, WAL, shm,
/// inbox), vendor HTTP and SMTP connections, the log, the runtime's own.
pub const OTHER_FILES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            max_connections: 8,
            max_body_bytes: 1024,
        }
    }

    /// Sends one request on `stream` and reads the response head and body (which the
    /// routes below keep short and give a content-length).
    async fn exchange(stream: &mut TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut received = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(read > 0, "closed: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&chunk[..read]);
            let text = String::from_utf8_lossy(&received).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return text;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_and_counted_and_the_connection_goes_on() {
        // Arrange: the production layer stack around a route that panics, served by
        // the production accept loop on a real loopback socket.
        let metrics = Arc::new(Metrics::new());
        let routes = Router::new()
            .route(
                "/boom",
                get(|| async {
                    let empty: Vec<u8> = Vec::new();
                    // An index out of bounds, as a slicing bug on vendor input would be.
                    let byte = empty[3];
                    byte.to_string()
                }),
            )
            .route("/fine", get(|| async { "fine" }));
        let router = super::super::with_layers(routes, &limits(), metrics.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            router,
            limits(),
            metrics.clone(),
            "main",
            shutdown.clone(),
        ));

        // Act
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let panicked = exchange(&mut stream, "/boom").await;
        let after = exchange(&mut stream, "/fine").await;

        // Assert
        assert!(
            panicked.starts_with("HTTP/1.1 500"),
            "a panic must be answered 500: {panicked}"
        );
        assert!(panicked.contains("internal error"), "{panicked}");
        assert!(
            !panicked.contains("index out of bounds"),
            "the panic message stays in the log: {panicked}"
        );
        assert!(after.starts_with("HTTP/1.1 200"), "{after}");
        assert!(after.ends_with("fine"), "{after}");
        assert_eq!(metrics.http_handler_panics.get(), 1);
        let scraped = metrics.encode();
        assert!(
            scraped.contains("dealsync_http_handler_panics_total 1"),
            "{scraped}"
        );
        assert!(
            scraped.contains(
                "dealsync_http_requests_total{route=\"/boom\",method=\"GET\",status=\"500\"} 1"
            ),
            "{scraped}"
        );
        shutdown.cancel();
        drop(stream);
        server.await.unwrap();
    }
}
