//! Load benchmark of `chartbridge serve` (release build, its own process) on this machine:
//! accepted submissions per second and p50/p99 latency of `POST /submissions/{id}` with the
//! durable flush, beside the bare `POST /echo` route of the same server in the same run. The EHR
//! is a fast local sink (its own thread and runtime) that answers every transaction at once;
//! when the load stops the bench prints how many submissions the outbox delivered meanwhile and
//! how many still wait — accepted/s alone would flatter a gateway whose deliveries fall behind.
//!
//!     cargo bench --bench load            # LOAD_SECONDS (10), LOAD_CONNECTIONS (64),
//!                                         # LOAD_EHR_CONCURRENCY (8): deliveries at once,
//!                                         # LOAD_NO_EHR=1: no EHR, deliveries wait in the outbox
//!                                         # LOAD_SERVER=path: measure that build of
//!                                         # `chartbridge` instead (A/B against an older commit)
//!
//! Loopback only, bounded in time; it prints a table and stops by itself.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use common::or_exit;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The EHR: answers every transaction with a transaction-response, immediately, on a thread
/// and runtime of its own (so that the load client does not slow it down).
fn sink() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("sink runtime");
        runtime.block_on(async move {
            let url = serve_sink().await;
            tx.send(url).expect("sink url");
            std::future::pending::<()>().await
        })
    });
    rx.recv().expect("sink started")
}

async fn serve_sink() -> String {
    let app = Router::new().fallback(post(|| async {
        Json(
            json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201", "location": "QuestionnaireResponse/1/_history/1"}}]}),
        )
    }));
    let listener = or_exit(
        tokio::net::TcpListener::bind("127.0.0.1:0").await,
        "binding the EHR sink",
    );
    let url = format!(
        "http://{}/fhir",
        or_exit(listener.local_addr(), "the EHR sink's address")
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

struct Run {
    name: &'static str,
    requests: u64,
    errors: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
}

impl Run {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

async fn load(
    name: &'static str,
    url: String,
    body: Arc<String>,
    unique: bool,
    connections: u64,
    seconds: u64,
) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections as usize)
        .build()
        .expect("client");
    let seq = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url, body, seq, errors) = (
                client.clone(),
                url.clone(),
                Arc::clone(&body),
                Arc::clone(&seq),
                Arc::clone(&errors),
            );
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let payload = if unique {
                        body.replace("b7e1c9d24f6a38e0c5b1d7f29a4e6c83", &format!("load-{n:020}"))
                    } else {
                        body.to_string()
                    };
                    let t = Instant::now();
                    let ok = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-api-key", "bench")
                        .body(payload)
                        .send()
                        .await
                        .map(|r| r.status().as_u16() == 202)
                        .unwrap_or(false);
                    if ok {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                lat
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap_or_default());
    }
    latencies_us.sort_unstable();
    Run {
        name,
        requests: latencies_us.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        latencies_us,
    }
}

fn main() {
    let seconds = env_or("LOAD_SECONDS", 10);
    let connections = env_or("LOAD_CONNECTIONS", 64);
    let no_ehr = env_or("LOAD_NO_EHR", 0) == 1;
    let ehr_concurrency = env_or("LOAD_EHR_CONCURRENCY", 8);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let body = Arc::new(or_exit(
        std::fs::read_to_string(
            root.join("fixtures/glp1-intake-typeform/maya-happy-path.input.json"),
        ),
        "the fixture",
    ));
    let dir = or_exit(tempfile::tempdir(), "a temporary directory");

    let runs = runtime.block_on(async {
        let ehr = sink();
        let config = dir.path().join("load.toml");
        or_exit(std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nmappings_dir = {:?}\n{}[sources.\"*\"]\ntype = \"api_key\"\nkey = \"bench\"\n",
                dir.path().join("data"),
                root.join("mappings"),
                if no_ehr { String::new() } else { format!("[ehr]\nbase_url = \"{ehr}\"\nconcurrency = {ehr_concurrency}\n") },
            ),
        ), "writing the config");
        let mut child = or_exit(
            Command::new(
                std::env::var_os("LOAD_SERVER")
                    .unwrap_or_else(|| env!("CARGO_BIN_EXE_chartbridge").into()),
            )
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "error")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn(),
            "starting chartbridge serve",
        );
        // `serve` prints one JSON line with its URL once it listens.
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            or_exit(BufReader::new(stdout).read_line(&mut line), "reading serve's first line");
        }
        let ready: Value = or_exit(serde_json::from_str(&line), "serve's first line");
        let url = or_exit(ready["url"].as_str().ok_or("no `url`"), "serve's first line").to_string();

        // Warm up both routes, then measure each in turn.
        load("warm-up", format!("{url}/echo"), Arc::clone(&body), false, connections, 1).await;
        let echo = load("POST /echo (baseline)", format!("{url}/echo"), Arc::clone(&body), false, connections, seconds).await;
        let submit = load("POST /submissions (durable)", format!("{url}/submissions/glp1-intake-typeform"), Arc::clone(&body), true, connections, seconds).await;
        // What the outbox did meanwhile: delivered, and still waiting, when the load stopped.
        let metrics = match reqwest::get(format!("{url}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("# unavailable: {e}"),
        };
        let figure = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
        println!("\noutbox when the load stopped: {} delivered (mean EHR round trip {:.1} ms), {} waiting; store: {} writes in {} rounds", figure("chartbridge_deliveries_total "), 1000.0 * figure("chartbridge_delivery_seconds_sum ") / figure("chartbridge_delivery_seconds_count "), figure("chartbridge_outbox_depth "), figure("chartbridge_store_commits_total "), figure("chartbridge_store_commit_rounds_total "));
        let _ = child.kill();
        let _ = child.wait();
        vec![echo, submit]
    });

    println!(
        "\n{connections} connections, {seconds} s each, 1 client thread; server: release build, 2 cores shared with the client; EHR: {}\n",
        if no_ehr { "none (outbox holds)" } else { "local sink" }
    );
    println!(
        "{:<30} {:>10} {:>8} {:>10} {:>10}",
        "route", "req/s", "errors", "p50 ms", "p99 ms"
    );
    for r in &runs {
        println!(
            "{:<30} {:>10.0} {:>8} {:>10.2} {:>10.2}",
            r.name,
            r.requests as f64 / r.seconds,
            r.errors,
            r.pct(0.5),
            r.pct(0.99)
        );
    }
    if let [echo, submit] = &runs[..] {
        let (e, s) = (
            echo.requests as f64 / echo.seconds,
            submit.requests as f64 / submit.seconds,
        );
        println!("\nsubmissions/s ÷ echo/s = {:.2}", s / e);
    }
}
