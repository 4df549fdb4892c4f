//! Footprint benchmark: `dealsync run` on config/demo.toml — time from exec to the
//! first `/readyz` 200, and resident memory once idle.
//!
//!     cargo bench --bench footprint
//!
//! Targets: `/readyz` 200 within 200 ms; idle RSS ≤ 20 MB.

#![allow(clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("config/demo.toml");
    let mut startups = Vec::new();
    let mut rss = Vec::new();
    for run in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = demo
            .replace(
                "path = \"data/demo.db\"",
                &format!("path = \"{}/demo.db\"", dir.path().display()),
            )
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace(
                "dir = \"data/outbox\"",
                &format!("dir = \"{}/outbox\"", dir.path().display()),
            )
            .replace(
                "templates = \"templates\"",
                concat!(
                    "templates = \"",
                    env!("CARGO_MANIFEST_DIR"),
                    "/config/templates\""
                ),
            );
        let config_path = dir.path().join("demo.toml");
        std::fs::write(&config_path, config).unwrap();
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_dealsync"))
            .args([
                "--config",
                config_path.to_str().unwrap(),
                "--log-level",
                "warn",
                "run",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dealsync");
        while !ready(port) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not ready in 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let startup = started.elapsed();
        // Let the demo sync a few times and the follow-up tasks settle, then measure.
        std::thread::sleep(Duration::from_secs(if run == 0 { 20 } else { 8 }));
        let (resident, peak) = (
            status_kb(child.id(), "VmRSS:"),
            status_kb(child.id(), "VmHWM:"),
        );
        println!(
            "run {run}: /readyz 200 after {:>6.1} ms; RSS {:>6.1} MB (peak {:>6.1} MB)",
            startup.as_secs_f64() * 1000.0,
            resident as f64 / 1024.0,
            peak as f64 / 1024.0
        );
        startups.push(startup.as_secs_f64() * 1000.0);
        rss.push(resident as f64 / 1024.0);
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
    }
    startups.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    println!(
        "median: /readyz 200 after {:.1} ms, idle RSS {:.1} MB (max {:.1} MB)",
        startups[startups.len() / 2],
        rss[rss.len() / 2],
        rss[rss.len() - 1]
    );
}
