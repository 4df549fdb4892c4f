//! Vendors that misbehave on purpose: [`OtherHost`], a listener on a port of its own
//! that stands for "another host" a vendor redirects to and records what reaches it,
//! and [`HugeBody`], a vendor whose every answer is far larger than any page.

use super::{MockServer, serve};
use axum::extract::{Request, State};
use axum::response::IntoResponse;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Another origin (its own port on 127.0.0.1): answers every request with `200 {}`
/// and records it as `METHOD path?query` followed by each header as `name: value`.
pub struct OtherHost {
    server: MockServer,
    seen: Arc<Mutex<Vec<String>>>,
}

impl OtherHost {
    pub async fn start() -> OtherHost {
        async fn record(
            State(seen): State<Arc<Mutex<Vec<String>>>>,
            request: Request,
        ) -> impl IntoResponse {
            let mut line = format!(
                "{} {}",
                request.method(),
                request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default()
            );
            for (name, value) in request.headers() {
                line.push_str(&format!(
                    "\n{name}: {}",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            seen.lock().unwrap().push(line);
            axum::Json(serde_json::json!({}))
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = axum::Router::new()
            .fallback(record)
            .with_state(seen.clone());
        OtherHost {
            server: serve(router).await,
            seen,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every request received, with its headers.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A vendor answering every request (`200`, JSON content type) with `total` bytes of
/// JSON-looking text, streamed from one 64 KiB buffer so the mock never holds the body:
/// with `Transfer-Encoding: chunked`, or with its `Content-Length` declared up front.
/// Speaks HTTP/1.1 on a raw socket so the body can be cut at any size.
pub struct HugeBody {
    pub addr: std::net::SocketAddr,
    /// Requests received.
    pub requests: Arc<AtomicU64>,
    /// Answers sent to the end; a client that stops reading leaves them unfinished.
    pub completed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

const CHUNK: usize = 64 * 1024;

impl HugeBody {
    pub async fn start(total: u64, chunked: bool) -> HugeBody {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let completed = Arc::new(AtomicU64::new(0));
        let (counted, finished) = (requests.clone(), completed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let (counted, finished) = (counted.clone(), finished.clone());
                tokio::spawn(async move {
                    // A write error is the client hanging up: that connection is done.
                    let _ = answer(socket, total, chunked, &counted, &finished).await;
                });
            }
        });
        HugeBody {
            addr,
            requests,
            completed,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HugeBody {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers each request of one keep-alive connection with the huge body.
async fn answer(
    mut socket: tokio::net::TcpStream,
    total: u64,
    chunked: bool,
    requests: &AtomicU64,
    completed: &AtomicU64,
) -> std::io::Result<()> {
    let filler: Vec<u8> = br#"{"id":1,"title":"filler","value":"12.50"},"#
        .iter()
        .copied()
        .cycle()
        .take(CHUNK)
        .collect();
    let mut pending = Vec::new();
    loop {
        // The request head, then as many body bytes as its Content-Length says.
        let head_end = loop {
            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut buffer = [0u8; 4096];
            let read = socket.read(&mut buffer).await?;
            if read == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buffer[..read]);
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
        let body_length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        while pending.len() < head_end + body_length {
            let mut buffer = [0u8; 4096];
            let read = socket.read(&mut buffer).await?;
            if read == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buffer[..read]);
        }
        pending.drain(..head_end + body_length);
        requests.fetch_add(1, Ordering::SeqCst);

        let framing = if chunked {
            "transfer-encoding: chunked".to_owned()
        } else {
            format!("content-length: {total}")
        };
        socket
            .write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{framing}\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut sent = 0u64;
        while sent < total {
            let size = (total - sent).min(CHUNK as u64) as usize;
            if chunked {
                socket.write_all(format!("{size:x}\r\n").as_bytes()).await?;
                socket.write_all(&filler[..size]).await?;
                socket.write_all(b"\r\n").await?;
            } else {
                socket.write_all(&filler[..size]).await?;
            }
            sent += size as u64;
        }
        if chunked {
            socket.write_all(b"0\r\n\r\n").await?;
        }
        completed.fetch_add(1, Ordering::SeqCst);
    }
}
