//! Webhook intake throughput and latency.
//!
//! Starts the app in-process (`App::build` + `App::run`, the path `main` takes) on a
//! fresh SQLite file with one Shopify connection, then drives `POST /webhooks/shop`
//! from a local load generator in the same process: Shopify-signed checkout payloads of
//! 2–4 KB, each with its own delivery id, over many keep-alive connections. A 2xx means
//! the delivery is committed (group commit, `synchronous = FULL` for the batch).
//!
//! 1. Saturation: `CONCURRENCY` senders post back to back for `SATURATION_SECS`;
//!    reports accepted events/s.
//! 2. Fixed rate: an open-loop schedule of `RATE` requests/s for `RATE_SECS`; latency is
//!    measured from each request's scheduled time (no coordinated omission); reports
//!    p50, p99 and the maximum.
//!
//! The inbox worker runs as in production, turning the deliveries into deals on the
//! same two cores. Run with `cargo bench --bench intake`.

#![allow(clippy::print_stdout)]

use anyhow::Context;
use dealsync::app::App;
use dealsync::webhooks::signature::{self, Delivery, Scheme};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "shpss_bench_secret";
const CONCURRENCY: usize = 128;
const SATURATION_SECS: u64 = 10;
const RATE: u64 = 5_000;
const RATE_SECS: u64 = 10;

/// A checkout payload of 2–4 KB: the fixture's checkout with two line items.
fn payload(n: u64) -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/shopify/webhook-checkouts-create.json"
    );
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON");
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

struct Prepared {
    body: Vec<u8>,
    headers: reqwest::header::HeaderMap,
}

fn prepare(from: u64, count: u64) -> Vec<Prepared> {
    (from..from + count)
        .map(|n| {
            let body = payload(n);
            let id = format!("bench-delivery-{n}");
            let delivery = Delivery {
                method: "POST",
                uri: "",
                body: &body,
                id: &id,
            };
            let mut headers = signature::sign(
                &Scheme::Shopify,
                SECRET.as_bytes(),
                &delivery,
                SystemTime::now(),
            )
            .expect("signing");
            headers.insert(
                "x-shopify-topic",
                "checkouts/create".parse().expect("header"),
            );
            headers.insert("content-type", "application/json".parse().expect("header"));
            Prepared { body, headers }
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[storage]\npath = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [connections.shop]\nconnector = \"shopify\"\nwebhook_secret = \"{SECRET}\"\n",
        dir.path().join("bench.db").display()
    );
    let config = dealsync::config::parse(
        &dir.path().join("bench.toml"),
        &text,
        &dealsync::config::interpolate::ProcessEnv,
    )
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    let app = App::build(config).await.context("building the app")?;
    let url = format!("http://{}/webhooks/shop", app.local_addr());
    let state = app.state();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let sample = payload(0).len();
    println!(
        "payload: {sample} bytes; {} cores",
        std::thread::available_parallelism()?.get()
    );

    // 1. Saturation.
    let per_sender = 4_000u64;
    let work: Vec<Vec<Prepared>> = (0..CONCURRENCY as u64)
        .map(|sender| prepare(sender * per_sender, per_sender))
        .collect();
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SATURATION_SECS);
    let started = Instant::now();
    let mut senders = Vec::new();
    for batch in work {
        let (client, url, accepted, failed) = (
            client.clone(),
            url.clone(),
            accepted.clone(),
            failed.clone(),
        );
        senders.push(tokio::spawn(async move {
            for prepared in batch {
                if Instant::now() >= deadline {
                    break;
                }
                let response = client
                    .post(&url)
                    .headers(prepared.headers)
                    .body(prepared.body)
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => accepted.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for sender in senders {
        sender.await?;
    }
    let elapsed = started.elapsed();
    let accepted = accepted.load(Ordering::Relaxed);
    println!(
        "saturation: {accepted} accepted, {} failed in {:.2}s with {CONCURRENCY} connections: {:.0} events/s",
        failed.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64()
    );

    // Let the worker catch up so the fixed-rate run starts from a quiet machine.
    let catch_up = Instant::now();
    loop {
        let counts = state.store.inbox_counts().await?;
        if counts.pending == 0 || catch_up.elapsed() > Duration::from_secs(120) {
            println!(
                "worker: {} processed, {} pending after {:.1}s more",
                counts.processed,
                counts.pending,
                catch_up.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 2. Fixed rate, open loop.
    let total = RATE * RATE_SECS;
    let prepared = prepare(10_000_000, total);
    let start = Instant::now() + Duration::from_millis(100);
    let mut handles = Vec::with_capacity(total as usize);
    for (n, request) in prepared.into_iter().enumerate() {
        let scheduled = start + Duration::from_nanos(n as u64 * 1_000_000_000 / RATE);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, url) = (client.clone(), url.clone());
        handles.push(tokio::spawn(async move {
            let response = client
                .post(&url)
                .headers(request.headers)
                .body(request.body)
                .send()
                .await;
            let ok = matches!(&response, Ok(r) if r.status().is_success());
            (scheduled.elapsed(), ok)
        }));
    }
    let mut latencies = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for handle in handles {
        let (latency, ok) = handle.await?;
        if ok {
            latencies.push(latency);
        } else {
            errors += 1;
        }
    }
    let achieved = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "fixed rate {RATE}/s for {RATE_SECS}s: {} ok, {errors} failed (~{achieved:.0}/s); latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
