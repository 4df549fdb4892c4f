//! Webhook intake throughput and latency.
//!
//! Starts the app in-process (`App::build` + `App::run`, the path `main` takes) on a
//! fresh SQLite file with one Shopify connection, then drives `POST /webhooks/shop`
//! from a load generator on its own thread (a single-threaded runtime, so its CPU is
//! measured apart from the server's): Shopify-signed checkout payloads of 2–4 KB, each
//! with its own delivery id, written pre-signed and pre-serialized over keep-alive
//! HTTP/1.1 connections (a wrk-style client: one request in flight per connection, no
//! pooling layer). A 2xx means the delivery is committed to the inbox with
//! `synchronous = FULL` (group commit: one fsync per batch).
//!
//! 1. Saturation: `SATURATION` requests over `CONNECTIONS` connections, back to back;
//!    reports accepted events/s.
//! 2. Fixed rate: an open-loop schedule of `RATE` requests/s (or `--rate N`) for `RATE_SECS`
//!    (or `--rate-secs N`: a longer run weighs the database's own checkpoints at that
//!    rate, rather than those the saturation burst left in flight), spread over
//!    `RATE_CONNECTIONS` connections; latency is measured from each request's scheduled
//!    time (no coordinated omission); reports p50, p99 and the maximum, and how many
//!    acknowledgements took over 25 ms in which seconds (the slowest five with their
//!    UTC time, to lay beside the database server's log of checkpoints and vacuums).
//! 3. Redelivery: a sample of already accepted deliveries is sent again; every one must
//!    be acknowledged and none stored twice.
//!
//! Correctness is checked, not assumed: every accepted delivery must be in the inbox
//! once, and once the worker (which runs as in production, on the same two cores) has
//! caught up, every accepted checkout must be one deal. The bench exits non-zero if not.
//! Run with `cargo bench --bench intake`; with `-- --url postgres://USER:PASSWORD@HOST:PORT/DB`
//! the app runs on that PostgreSQL database instead (one replica; a fresh, empty
//! database: the check counts every row of its inbox and deals).
//!
//! With `--url` and `--replicas N`, N apps (replicas: each its own server, pool, intake
//! writers and workers) run in this process on the one database, and the load
//! generator spreads its connections over their addresses.
//!
//! `cargo bench --bench intake -- --bounces` runs the same three phases with Mailgun
//! bounce webhooks instead (a `mailgun` connection; each delivery a permanent failure
//! for its own address, signed in the body with its own token): the check then counts
//! one delivery event (and one suppression) per accepted delivery.
//!
//! `cargo bench --bench intake -- --slow-clients` measures instead what hostile
//! clients cost: `/healthz` latency (a new connection per probe, `PROBES` at
//! `PROBE_RATE`/s, open loop) and saturation throughput (`SLOW_SATURATION` deliveries),
//! first alone, then while `SLOW_CLIENTS` connections are held open by a third thread:
//! half send nothing, half trickle a request header one byte a second, and each
//! reconnects as soon as the server closes it (after `server.header_read_timeout`), as
//! an attacker would. It needs `ulimit -n` of at least 8192 (both ends of every slow
//! connection live in this process).

#![allow(clippy::print_stdout)]

mod common;

use anyhow::{Context, bail};
use common::{cpu_seconds, load_average};
use dealsync::app::App;
use dealsync::connectors::signature::{self, Delivery, Scheme};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "shpss_bench_secret";
const MAILGUN_KEY: &str = "bench-mailgun-signing-key";
const CONNECTIONS: usize = 128;
const SATURATION: u64 = 100_000;
const RATE: u64 = 5_000;
const RATE_SECS: u64 = 10;
const RATE_CONNECTIONS: usize = 64;
const REDELIVERIES: u64 = 2_000;

/// A checkout payload of 2–4 KB: the fixture's checkout with two line items.
fn payload(fixture: &Value, n: u64) -> Vec<u8> {
    let item = &fixture["line_items"][0];
    let line = |title: &str| {
        json!({
            "title": title, "quantity": 1, "price": item["price"], "sku": item["sku"],
            "variant_id": item["variant_id"], "product_id": item["product_id"],
            "variant_title": item["variant_title"], "vendor": item["vendor"],
            "requires_shipping": true, "taxable": true, "grams": 200,
        })
    };
    let body = json!({
        "id": 450789469u64 + n,
        "token": format!("bench-{n:012}"),
        "cart_token": format!("cart-{n:012}"),
        "email": format!("shopper{}@example.com", n % 50_000),
        "buyer_accepts_marketing": n % 3 == 0,
        "created_at": "2026-01-01T10:00:00Z",
        "updated_at": "2026-01-01T10:00:00Z",
        "currency": "USD",
        "presentment_currency": "USD",
        "total_price": "398.00",
        "subtotal_price": "398.00",
        "total_tax": "0.00",
        "total_discounts": "0.00",
        "abandoned_checkout_url": format!("https://shop.example.com/checkouts/bench-{n:012}/recover"),
        "line_items": [line("IPod Nano - 8GB"), line("IPod Nano - 8GB, Gold")],
        "customer": fixture["customer"],
        "billing_address": fixture["billing_address"],
        "shipping_address": fixture["shipping_address"],
        "note_attributes": fixture["note_attributes"],
    });
    serde_json::to_vec(&body).expect("payload")
}

/// The whole HTTP/1.1 request for checkout `n`, signed, ready to write.
fn request(fixture: &Value, addr: SocketAddr, n: u64) -> Vec<u8> {
    let body = payload(fixture, n);
    let id = format!("bench-delivery-{n}");
    let delivery = Delivery {
        method: "POST",
        uri: "",
        body: &body,
        id: &id,
    };
    let headers = signature::sign(
        &Scheme::Shopify,
        SECRET.as_bytes(),
        &delivery,
        SystemTime::now(),
    )
    .expect("signing");
    let mut text = format!(
        "POST /webhooks/shop HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         x-shopify-topic: checkouts/create\r\nx-shopify-shop-domain: shop.example.com\r\n\
         content-length: {}\r\n",
        body.len()
    );
    for (name, value) in &headers {
        text.push_str(&format!(
            "{name}: {}\r\n",
            value.to_str().expect("ASCII header")
        ));
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// The whole HTTP/1.1 request for Mailgun bounce `n`: the shared fixture's permanent
/// failure for its own address, with its own token, signed in the body as Mailgun does.
fn bounce_request(fixture: &Value, addr: SocketAddr, n: u64) -> Vec<u8> {
    let mut body = fixture.clone();
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string();
    let token = format!("bench{n:045}");
    body["signature"] = json!({
        "timestamp": timestamp,
        "token": token,
        "signature": signature::mailgun_signature(MAILGUN_KEY.as_bytes(), &timestamp, &token),
    });
    body["event-data"]["id"] = format!("bench-event-{n}").into();
    body["event-data"]["recipient"] = format!("bounce{n}@example.com").into();
    let body = serde_json::to_vec(&body).expect("payload");
    let mut bytes = format!(
        "POST /webhooks/mg HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// One keep-alive connection: writes a request, reads the whole response, returns the
/// status code.
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buffer: Vec::with_capacity(1024),
        })
    }

    async fn send(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        self.stream.write_all(request).await?;
        self.buffer.clear();
        loop {
            let mut chunk = [0u8; 1024];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("the server closed the connection");
            }
            self.buffer.extend_from_slice(&chunk[..read]);
            let Some(end) = find(&self.buffer, b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&self.buffer[..end]).context("response head")?;
            let status: u16 = head
                .get(9..12)
                .and_then(|code| code.parse().ok())
                .context("status line")?;
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .context("content-length")?;
            // Read the rest of the body, then the connection is ready for the next one.
            while self.buffer.len() < end + 4 + length {
                let read = self.stream.read(&mut chunk).await?;
                if read == 0 {
                    bail!("the server closed the connection mid-response");
                }
                self.buffer.extend_from_slice(&chunk[..read]);
            }
            return Ok(status);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// What a phase of load measured.
struct Outcome {
    ok: u64,
    refused: u64,
    failed: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
    generator_cpu: f64,
    /// With a fixed rate: the acknowledgements second by second.
    seconds: Option<Seconds>,
}

/// When a fixed-rate schedule started, and for each of its seconds the slowest
/// acknowledgement and how many took over `SLOW`: which seconds to lay beside the
/// server's log.
struct Seconds {
    started_at: chrono::DateTime<chrono::Utc>,
    each: Vec<(Duration, u64)>,
}

/// An acknowledgement slower than this counts against its second (the p99 target).
const SLOW: Duration = Duration::from_millis(25);

/// Sends `requests` over `connections` keep-alive connections, spread over `addrs`
/// (one per replica). With `rate`, request `i` is due at `start + i / rate` (open
/// loop) and its latency counts from then; without, each connection sends back to back.
async fn drive(
    addrs: Vec<SocketAddr>,
    requests: Vec<Vec<u8>>,
    connections: usize,
    rate: Option<u64>,
) -> anyhow::Result<Outcome> {
    let cpu_before = cpu_seconds("thread-self");
    let total = requests.len();
    let mut lanes: Vec<Vec<(usize, Vec<u8>)>> = (0..connections).map(|_| Vec::new()).collect();
    for (i, request) in requests.into_iter().enumerate() {
        lanes[i % connections].push((i, request));
    }
    let mut opened = Vec::with_capacity(connections);
    for n in 0..connections {
        opened.push(Connection::open(addrs[n % addrs.len()]).await?);
    }
    let started = Instant::now() + Duration::from_millis(50);
    let started_at = chrono::Utc::now() + chrono::TimeDelta::milliseconds(50);
    let mut tasks = tokio::task::JoinSet::new();
    for (lane, mut connection) in lanes.into_iter().zip(opened) {
        tasks.spawn_local(async move {
            let mut results = Vec::with_capacity(lane.len());
            for (i, request) in lane {
                let due = match rate {
                    Some(rate) => {
                        let due = started + Duration::from_nanos(i as u64 * 1_000_000_000 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                let status = connection.send(&request).await;
                results.push((status.ok(), due.duration_since(started), due.elapsed()));
            }
            results
        });
    }
    let mut outcome = Outcome {
        ok: 0,
        refused: 0,
        failed: 0,
        latencies: Vec::with_capacity(total),
        elapsed: Duration::ZERO,
        generator_cpu: 0.0,
        seconds: rate.map(|_| Seconds {
            started_at,
            each: Vec::new(),
        }),
    };
    while let Some(results) = tasks.join_next().await {
        for (status, due, latency) in results? {
            match status {
                Some(200..=299) => {
                    outcome.ok += 1;
                    outcome.latencies.push(latency);
                    if let Some(seconds) = &mut outcome.seconds {
                        let second = due.as_secs() as usize;
                        if seconds.each.len() <= second {
                            seconds.each.resize(second + 1, (Duration::ZERO, 0));
                        }
                        let (max, slow) = &mut seconds.each[second];
                        *max = (*max).max(latency);
                        *slow += u64::from(latency > SLOW);
                    }
                }
                Some(503) => outcome.refused += 1,
                _ => outcome.failed += 1,
            }
        }
    }
    outcome.elapsed = started.elapsed();
    outcome.latencies.sort();
    outcome.generator_cpu = cpu_seconds("thread-self") - cpu_before;
    Ok(outcome)
}

/// Runs `drive` on a thread of its own with a single-threaded runtime.
fn drive_on_thread(
    addrs: Vec<SocketAddr>,
    requests: Vec<Vec<u8>>,
    connections: usize,
    rate: Option<u64>,
) -> std::thread::JoinHandle<anyhow::Result<Outcome>> {
    std::thread::Builder::new()
        .name("load-generator".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, drive(addrs, requests, connections, rate))
        })
        .expect("spawning the load generator")
}

async fn join(handle: std::thread::JoinHandle<anyhow::Result<Outcome>>) -> anyhow::Result<Outcome> {
    tokio::task::spawn_blocking(move || handle.join().expect("load generator panicked")).await?
}

fn report(name: &str, outcome: &Outcome, process_cpu: f64) {
    let wall = outcome.elapsed.as_secs_f64();
    println!(
        "{name}: {} accepted, {} refused (503), {} failed in {wall:.2} s: {:.0} events/s; \
         latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        outcome.ok,
        outcome.refused,
        outcome.failed,
        outcome.ok as f64 / wall,
        ms(percentile(&outcome.latencies, 0.50)),
        ms(percentile(&outcome.latencies, 0.99)),
        ms(outcome.latencies.last().copied().unwrap_or_default()),
    );
    println!(
        "  CPU: load generator {:.2} s ({:.0}% of one core), whole process {process_cpu:.2} s over {wall:.2} s wall; load average {}",
        outcome.generator_cpu,
        100.0 * outcome.generator_cpu / wall,
        load_average()
    );
    if let Some(Seconds { started_at, each }) = &outcome.seconds {
        let slow: u64 = each.iter().map(|(_, slow)| slow).sum();
        let mut worst: Vec<_> = each
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .collect();
        worst.sort_by_key(|(_, (max, _))| std::cmp::Reverse(*max));
        println!(
            "  over {} ms: {slow} acknowledgements in {} of {} seconds; the slowest seconds:",
            SLOW.as_millis(),
            worst.len(),
            each.len()
        );
        for (second, (max, n)) in worst.into_iter().take(5) {
            let at = *started_at + chrono::TimeDelta::seconds(second as i64);
            println!(
                "    {} UTC (second {second}): max {:.1} ms, {n} over {} ms",
                at.format("%H:%M:%S"),
                ms(*max),
                SLOW.as_millis()
            );
        }
    }
}

/// Waits until the worker has processed every pending row; fails as soon as it makes no
/// progress for 30 s. Polled through the writer's counter: a query per poll would
/// compete with the worker.
async fn drain(store: &dealsync::store::Store) -> anyhow::Result<()> {
    let mut last = (store.inbox_pending(), Instant::now());
    while store.inbox_pending() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pending = store.inbox_pending();
        if pending < last.0 {
            last = (pending, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            bail!("the inbox worker made no progress for 30 s with {pending} rows pending");
        }
    }
    Ok(())
}

const SLOW_CLIENTS: usize = 2_000;
const ROUNDS: usize = 3;
const SLOW_SATURATION: u64 = 50_000;
const PROBES: u64 = 2_000;
const PROBE_RATE: u64 = 200;

/// `/healthz` on a new connection per probe, probe `i` due at `start + i / rate`;
/// latencies count from the due time. Runs on a thread of its own.
fn probe_healthz_on_thread(
    addr: SocketAddr,
    probes: u64,
    rate: u64,
) -> std::thread::JoinHandle<anyhow::Result<Outcome>> {
    std::thread::Builder::new()
        .name("healthz-prober".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let cpu_before = cpu_seconds("thread-self");
                let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").into_bytes();
                let started = Instant::now() + Duration::from_millis(50);
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..probes {
                    let due = started + Duration::from_nanos(i * 1_000_000_000 / rate);
                    let request = request.clone();
                    tasks.spawn_local(async move {
                        tokio::time::sleep_until(due.into()).await;
                        let status = async {
                            let mut connection = Connection::open(addr).await?;
                            connection.send(&request).await
                        }
                        .await;
                        (status.ok(), due.elapsed())
                    });
                }
                let mut outcome = Outcome {
                    ok: 0,
                    refused: 0,
                    failed: 0,
                    latencies: Vec::new(),
                    elapsed: Duration::ZERO,
                    generator_cpu: 0.0,
                    seconds: None,
                };
                while let Some(result) = tasks.join_next().await {
                    match result? {
                        (Some(200), latency) => {
                            outcome.ok += 1;
                            outcome.latencies.push(latency);
                        }
                        (Some(503), _) => outcome.refused += 1,
                        _ => outcome.failed += 1,
                    }
                }
                outcome.elapsed = started.elapsed();
                outcome.latencies.sort();
                outcome.generator_cpu = cpu_seconds("thread-self") - cpu_before;
                Ok(outcome)
            })
        })
        .expect("spawning the prober")
}

/// Holds `count` slow connections open until `stop`: even ones idle, odd ones
/// trickling a header byte per second; each reconnects when the server closes it.
/// Returns how many times the server closed one.
/// Its thread id goes to `tid`, so that its CPU can be told apart from the server's.
fn slow_clients_on_thread(
    addr: SocketAddr,
    count: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tid: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<anyhow::Result<u64>> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("slow-clients".into())
        .spawn(move || {
            let own = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|path| path.file_name()?.to_str()?.parse().ok())
                .unwrap_or(0);
            tid.store(own, Ordering::Relaxed);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let mut tasks = tokio::task::JoinSet::new();
                for n in 0..count {
                    let stop = stop.clone();
                    tasks.spawn_local(async move {
                        let mut closed_by_server = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(mut stream) = TcpStream::connect(addr).await else {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            };
                            let trickle = n % 2 == 1;
                            if trickle
                                && stream
                                    .write_all(b"GET /healthz HTTP/1.1\r\nx-slow: ")
                                    .await
                                    .is_err()
                            {
                                continue;
                            }
                            let mut byte = [0u8; 1];
                            loop {
                                if stop.load(Ordering::Relaxed) {
                                    return closed_by_server;
                                }
                                // Wait a second for the server to close; trickle meanwhile.
                                match tokio::time::timeout(
                                    Duration::from_secs(1),
                                    stream.read(&mut byte),
                                )
                                .await
                                {
                                    Ok(Ok(0)) | Ok(Err(_)) => {
                                        closed_by_server += 1;
                                        break;
                                    }
                                    Ok(Ok(_)) => {}
                                    Err(_) => {
                                        if trickle && stream.write_all(b"a").await.is_err() {
                                            closed_by_server += 1;
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                        closed_by_server
                    });
                    // Spread the connects over ~2 s, so that neither they nor the
                    // server's closes after header_read_timeout come as one burst.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let mut closed = 0;
                while let Some(result) = tasks.join_next().await {
                    closed += result?;
                }
                Ok(closed)
            })
        })
        .expect("spawning the slow clients")
}

fn open_file_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|line| line.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The `--slow-clients` mode: `/healthz` p99 and intake throughput without and with
/// `SLOW_CLIENTS` slow connections held open.
async fn slow_clients(fixture: &Value) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if let Some(limit) = open_file_limit()
        && limit < 8192
    {
        bail!("the open-file limit is {limit}; run `ulimit -n 8192` (or more) first");
    }
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("bench.db");
    // Room for the slow clients and the load: the cap itself is not what is measured.
    let text = format!(
        "[storage]\npath = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4096\n\n\
         [connections.shop]\nconnector = \"shopify\"\nwebhook_secret = \"{SECRET}\"\n",
        db_path.display()
    );
    let config = dealsync::config::parse(
        &dir.path().join("bench.toml"),
        &text,
        &dealsync::config::interpolate::ProcessEnv,
    )
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    println!(
        "slow clients: header_read_timeout {:?}, max_connections {}",
        config.server.header_read_timeout, config.server.max_connections
    );
    let app = App::build(config).await.context("building the app")?;
    let addr = app.local_addr();
    let state = app.state();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let open_connections = || {
        state
            .metrics
            .http_connections
            .get_or_create(&dealsync::telemetry::ListenerLabels {
                listener: "main".into(),
            })
            .get()
    };

    let slow_tid = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // CPU seconds of the slow clients' thread so far (0 while there is none).
    let slow_cpu = || match slow_tid.load(Ordering::Relaxed) {
        0 => 0.0,
        tid => cpu_seconds(&format!("self/task/{tid}")),
    };
    let mut next = 20_000_000u64;
    let mut measure = async |label: &str| -> anyhow::Result<(Outcome, Outcome, f64)> {
        let cpu = cpu_seconds("self");
        let probes = join(probe_healthz_on_thread(addr, PROBES, PROBE_RATE)).await?;
        report(
            &format!("{label}: /healthz, {PROBE_RATE}/s, new connection each"),
            &probes,
            cpu_seconds("self") - cpu,
        );
        println!("  open connections at the end: {}", open_connections());
        let requests: Vec<Vec<u8>> = (next..next + SLOW_SATURATION)
            .map(|n| request(fixture, addr, n))
            .collect();
        next += SLOW_SATURATION;
        let (cpu, slow_before) = (cpu_seconds("self"), slow_cpu());
        let saturation = join(drive_on_thread(vec![addr], requests, CONNECTIONS, None)).await?;
        let process = cpu_seconds("self") - cpu;
        let slow = slow_cpu() - slow_before;
        report(
            &format!("{label}: intake saturation ({CONNECTIONS} connections)"),
            &saturation,
            process,
        );
        let server = process - saturation.generator_cpu - slow;
        let per_event = 1e6 * server / saturation.ok as f64;
        println!(
            "  server CPU (process minus load generator and slow clients {slow:.2} s): {server:.2} s, {per_event:.0} µs per event; open connections at the end: {}",
            open_connections()
        );
        drain(&state.store).await?;
        Ok((probes, saturation, per_event))
    };

    // Alternating rounds, so that what the other users of the machine do falls on
    // both sides alike.
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    for round in 1..=ROUNDS {
        alone.push(measure(&format!("round {round}, without slow clients")).await?);

        let stop = Arc::new(AtomicBool::new(false));
        let slow = slow_clients_on_thread(addr, SLOW_CLIENTS, stop.clone(), slow_tid.clone());
        let holding = Instant::now();
        while open_connections() < SLOW_CLIENTS as i64 {
            if holding.elapsed() > Duration::from_secs(30) {
                bail!(
                    "only {} of {SLOW_CLIENTS} slow connections open after 30 s",
                    open_connections()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The fewest slow connections open at any sample while measuring.
        let fewest = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
        let sampler = {
            let (fewest, state) = (fewest.clone(), state.clone());
            tokio::spawn(async move {
                loop {
                    let open = state
                        .metrics
                        .http_connections
                        .get_or_create(&dealsync::telemetry::ListenerLabels {
                            listener: "main".into(),
                        })
                        .get();
                    fewest.fetch_min(open, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        println!(
            "{SLOW_CLIENTS} slow connections held after {:.2} s",
            holding.elapsed().as_secs_f64()
        );
        beside.push(measure(&format!("round {round}, with {SLOW_CLIENTS} slow clients")).await?);
        sampler.abort();
        stop.store(true, Ordering::Relaxed);
        let closed =
            tokio::task::spawn_blocking(move || slow.join().expect("slow clients panicked"))
                .await??;
        slow_tid.store(0, Ordering::Relaxed);
        println!(
            "  while measuring, at least {} connections were open (slow ones plus the load); the server closed {closed} slow connections (each reconnected)",
            fewest.load(Ordering::Relaxed)
        );
    }

    let throughput = |outcome: &Outcome| outcome.ok as f64 / outcome.elapsed.as_secs_f64();
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let summary = |rounds: &[(Outcome, Outcome, f64)]| {
        (
            median(rounds.iter().map(|r| throughput(&r.1)).collect()),
            median(
                rounds
                    .iter()
                    .map(|r| ms(percentile(&r.0.latencies, 0.99)))
                    .collect(),
            ),
            median(rounds.iter().map(|r| r.2).collect()),
        )
    };
    let (alone_rate, alone_p99, alone_cpu) = summary(&alone);
    let (beside_rate, beside_p99, beside_cpu) = summary(&beside);
    println!(
        "summary (medians of {ROUNDS} rounds): intake {alone_rate:.0}/s alone, {beside_rate:.0}/s beside \
         {SLOW_CLIENTS} slow clients ({:.1} %, target >= 90 %); server CPU {alone_cpu:.0} µs per event \
         alone, {beside_cpu:.0} beside them; /healthz p99 {alone_p99:.2} ms alone, {beside_p99:.2} ms \
         beside them (target <= 25 ms)",
        100.0 * beside_rate / alone_rate,
    );
    shutdown.cancel();
    let _ = server.await;
    let all_answered = alone
        .iter()
        .chain(&beside)
        .flat_map(|(probes, intake, _)| [probes, intake])
        .all(|outcome| outcome.refused == 0 && outcome.failed == 0);
    if !all_answered {
        bail!("some requests were refused or failed (see above)");
    }
    Ok(())
}

/// The word after `name` on the command line, if any.
fn option(name: &str) -> Option<String> {
    std::env::args().skip_while(|arg| arg != name).nth(1)
}

/// The number after `name` on the command line, or `default` (absent or unreadable).
fn number<T: std::str::FromStr>(name: &str, default: T) -> T {
    option(name).and_then(|n| n.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|arg| arg == "--slow-clients") {
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/shopify/webhook-checkouts-create.json"
        ))?)?;
        return slow_clients(&fixture).await;
    }
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("bench.db");
    let url = option("--url");
    let storage = match &url {
        Some(url) => format!("url = \"{url}\""),
        None => format!("path = \"{}\"", db_path.display()),
    };
    let bounces = std::env::args().any(|arg| arg == "--bounces");
    let text = format!(
        "[storage]\n{storage}\n[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [connections.shop]\nconnector = \"shopify\"\nwebhook_secret = \"{SECRET}\"\n\n\
         [connections.mg]\nconnector = \"mailgun\"\nwebhook_secret = \"{MAILGUN_KEY}\"\n"
    );
    let config = dealsync::config::parse(
        &dir.path().join("bench.toml"),
        &text,
        &dealsync::config::interpolate::ProcessEnv,
    )
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    let replicas = number("--replicas", 1usize);
    if replicas > 1 && url.is_none() {
        bail!("--replicas needs --url: replicas share a PostgreSQL database");
    }
    let mut apps = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        apps.push(
            App::build(config.clone())
                .await
                .context("building the app")?,
        );
    }
    let addrs: Vec<SocketAddr> = apps.iter().map(App::local_addr).collect();
    let addr = addrs[0];
    let states: Vec<_> = apps.iter().map(App::state).collect();
    let state = states[0].clone();
    let empty = state.store.inbox_counts().await?;
    if empty.pending + empty.processed + empty.failed > 0 {
        bail!("the database's inbox is not empty: give the bench a fresh database");
    }
    match (&url, replicas) {
        (None, _) => println!("store: SQLite"),
        (Some(_), 1) => println!("store: PostgreSQL (one replica)"),
        (Some(_), n) => println!(
            "store: PostgreSQL ({n} replicas in this process, each its own server, pool \
             and workers; the load generator's connections spread over them)"
        ),
    }
    let shutdown = CancellationToken::new();
    let servers: Vec<_> = apps
        .into_iter()
        .map(|app| tokio::spawn(app.run(shutdown.clone())))
        .collect();

    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/shopify/webhook-checkouts-create.json"
    ))?)?;
    let bounce: Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bounces/mailgun-failed-permanent-webhook.json"
    ))?)?;
    let request = |fixture: &Value, addr, n| {
        if bounces {
            bounce_request(&bounce, addr, n)
        } else {
            request(fixture, addr, n)
        }
    };
    println!(
        "deliveries: {}",
        if bounces {
            "Mailgun bounce webhooks"
        } else {
            "Shopify checkouts"
        }
    );
    let sample = if bounces {
        bounce_request(&bounce, addr, 0).len()
    } else {
        payload(&fixture, 0).len()
    };
    println!(
        "payload: {sample} bytes; {} cores; load average {}",
        std::thread::available_parallelism()?.get(),
        load_average()
    );

    // 1. Saturation.
    let requests: Vec<Vec<u8>> = (0..SATURATION)
        .map(|n| request(&fixture, addr, n))
        .collect();
    let cpu = cpu_seconds("self");
    let saturation = join(drive_on_thread(addrs.clone(), requests, CONNECTIONS, None)).await?;
    report(
        &format!("saturation ({CONNECTIONS} connections)"),
        &saturation,
        cpu_seconds("self") - cpu,
    );

    // Let the worker catch up so the fixed-rate run starts from a quiet machine.
    // Polled through the writer's counter: a query per poll would compete with the worker.
    let catch_up = Instant::now();
    for state in &states {
        drain(&state.store).await?;
    }
    let counts = state.store.inbox_counts().await?;
    println!(
        "worker: {} processed, {} failed, {} pending {:.1} s after the load stopped",
        counts.processed,
        counts.failed,
        counts.pending,
        catch_up.elapsed().as_secs_f64()
    );

    // 2. Fixed rate, open loop.
    let rate = number("--rate", RATE);
    let rate_secs = number("--rate-secs", RATE_SECS);
    let requests: Vec<Vec<u8>> = (0..rate * rate_secs)
        .map(|n| request(&fixture, addr, 10_000_000 + n))
        .collect();
    let cpu = cpu_seconds("self");
    let fixed = join(drive_on_thread(
        addrs.clone(),
        requests,
        RATE_CONNECTIONS,
        Some(rate),
    ))
    .await?;
    report(
        &format!("fixed rate {rate}/s for {rate_secs} s ({RATE_CONNECTIONS} connections)"),
        &fixed,
        cpu_seconds("self") - cpu,
    );

    // 3. Redeliveries of accepted deliveries: acknowledged, never stored again.
    let before = state.store.inbox_counts().await?;
    let requests: Vec<Vec<u8>> = (0..REDELIVERIES)
        .map(|n| request(&fixture, addr, n))
        .collect();
    let redelivered = join(drive_on_thread(addrs.clone(), requests, 16, None)).await?;
    let after = state.store.inbox_counts().await?;
    let stored_again = (after.pending + after.processed + after.failed)
        - (before.pending + before.processed + before.failed);
    println!(
        "redelivery: {} of {REDELIVERIES} acknowledged, {stored_again} stored again",
        redelivered.ok
    );

    // Every accepted delivery is in the inbox once and, once processed, one deal (one
    // delivery event for a bounce).
    let table = if bounces { "delivery_events" } else { "deals" };
    let accepted = saturation.ok + fixed.ok;
    for state in &states {
        drain(&state.store).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (counts, deals) = loop {
        let counts = state.store.inbox_counts().await?;
        let deals: i64 = match &url {
            Some(url) => {
                let (client, connection) =
                    tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await?
                    .get(0)
            }
            None => rusqlite::Connection::open(&db_path)?.query_row(
                &format!("SELECT count(*) FROM {table}"),
                [],
                |row| row.get(0),
            )?,
        };
        let deals = deals.max(0) as u64;
        if counts.pending == 0 || Instant::now() > deadline {
            break (counts, deals);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stored = counts.pending + counts.processed + counts.failed;
    println!(
        "check: {accepted} accepted, {stored} in the inbox, {} processed, {} failed, {deals} {table}",
        counts.processed, counts.failed
    );
    shutdown.cancel();
    for server in servers {
        let _ = server.await;
    }
    if stored != accepted
        || deals != accepted
        || counts.failed != 0
        || redelivered.ok != REDELIVERIES
        || stored_again != 0
    {
        bail!("intake lost, duplicated or failed deliveries (see the check line)");
    }
    println!("check: ok (nothing lost, nothing twice)");
    Ok(())
}
