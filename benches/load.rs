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
//!                                         # LOAD_MAPPINGS=dir: the mappings it loads
//!                                         # LOAD_SERVER=path: measure that build of
//!                                         # `chartbridge` instead (A/B against an older commit)
//!                                         # LOAD_CLIENT=wrk|builtin: the load generator
//!                                         # (default: wrk when installed)
//!                                         # LOAD_LOG: the server's RUST_LOG (default info,
//!                                         # as `serve` runs; its lines are dropped)
//!                                         # LOAD_BODY=compact: the Typeform payload without
//!                                         # the fixture's indentation (8 KB instead of 14 KB)
//!
//! Loopback only, bounded in time; it prints a table and stops by itself.

use std::io::{BufRead, BufReader};
use std::path::Path;
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

/// The user + system CPU time process `pid` has used, in seconds (Linux `/proc`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) closed by the last `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let per_second = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    Some(ticks / per_second)
}

/// One route's figures: answered as expected (`202`, or `200` for echo), the rest, and p50/p99.
struct Run {
    name: &'static str,
    requests: u64,
    errors: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The marker in the fixture that each submission replaces with its own id.
const MARKER: &str = "b7e1c9d24f6a38e0c5b1d7f29a4e6c83";

/// Which program makes the load. wrk (Debian's `wrk`, C and epoll) takes a fraction of the CPU a
/// reqwest client takes, and the client shares the two cores with the server.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    Wrk,
    Builtin,
}

impl Client {
    /// `LOAD_CLIENT=wrk|builtin`; by default wrk when it is installed.
    fn choose() -> Client {
        match std::env::var("LOAD_CLIENT").as_deref() {
            Ok("builtin") => Client::Builtin,
            Ok("wrk") => Client::Wrk,
            _ if Command::new("wrk").arg("--version").output().is_ok() => Client::Wrk,
            _ => Client::Builtin,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Client::Wrk => "wrk, 1 thread",
            Client::Builtin => "reqwest in the bench, 1 thread",
        }
    }
}

/// What one load needs.
struct Load {
    name: &'static str,
    url: String,
    body: Arc<String>,
    /// Each request gets its own submission id (else the same body every time).
    unique: bool,
    connections: u64,
    seconds: u64,
}

impl Load {
    async fn run(self, client: Client, dir: &Path) -> Run {
        match client {
            Client::Builtin => load(self).await,
            Client::Wrk => {
                let dir = dir.to_path_buf();
                or_exit(
                    tokio::task::spawn_blocking(move || wrk(self, &dir)).await,
                    "running wrk",
                )
            }
        }
    }
}

/// The load from wrk: a Lua script gives each submission its own id; its `--latency` report is
/// read back.
fn wrk(load: Load, dir: &Path) -> Run {
    let body_path = dir.join("load-body.json");
    or_exit(
        std::fs::write(&body_path, load.body.as_bytes()),
        "writing the body for wrk",
    );
    let script = dir.join("load.lua");
    or_exit(
        std::fs::write(
            &script,
            format!(
                r#"local f = assert(io.open({body:?}, "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "bench"
if {unique} then
  local s, e = body:find("{MARKER}", 1, true)
  local prefix, suffix = body:sub(1, s - 1), body:sub(e + 1)
  local n = 0
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, prefix .. string.format("load-%020d", n) .. suffix)
  end
end
"#,
                body = body_path.to_string_lossy(),
                unique = load.unique,
            ),
        ),
        "writing the wrk script",
    );
    let out = or_exit(
        Command::new("wrk")
            .args(["--latency", "-t1", "--timeout", "10s"])
            .arg(format!("-c{}", load.connections))
            .arg(format!("-d{}s", load.seconds))
            .arg("-s")
            .arg(&script)
            .arg(&load.url)
            .output(),
        "running wrk (LOAD_CLIENT=builtin uses the bench's own client)",
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        report
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let ms = |prefix: &str| field(prefix).and_then(millis).unwrap_or(f64::NAN);
    // "123456 requests in 10.00s, 1.23MB read"
    let (total, seconds) = report
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(" requests in ")?;
            let secs = rest.split(',').next()?.trim().strip_suffix('s')?;
            Some((n.parse::<u64>().ok()?, secs.parse::<f64>().ok()?))
        })
        .unwrap_or_else(|| {
            eprintln!(
                "bench: wrk's report was not understood:\n{report}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::process::exit(1)
        });
    let not_2xx = field("Non-2xx or 3xx responses:")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket_errors: u64 = field("Socket errors:")
        .map(|l| {
            l.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Run {
        name: load.name,
        requests: total.saturating_sub(not_2xx),
        errors: not_2xx + socket_errors,
        seconds,
        p50_ms: ms("50%"),
        p99_ms: ms("99%"),
    }
}

/// wrk's durations: `850.00us`, `3.21ms`, `1.02s`.
fn millis(text: &str) -> Option<f64> {
    let unit_at = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = text.split_at(unit_at);
    let n: f64 = n.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}

/// The load from the bench's own reqwest client.
async fn load(
    Load {
        name,
        url,
        body,
        unique,
        connections,
        seconds,
    }: Load,
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
                        body.replace(MARKER, &format!("load-{n:020}"))
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
    let pct = |p: f64| {
        let i = ((latencies_us.len() as f64 - 1.0) * p).round() as usize;
        latencies_us
            .get(i)
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    Run {
        name,
        requests: latencies_us.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

fn main() {
    let seconds = env_or("LOAD_SECONDS", 10);
    let connections = env_or("LOAD_CONNECTIONS", 64);
    let no_ehr = env_or("LOAD_NO_EHR", 0) == 1;
    let ehr_concurrency = env_or("LOAD_EHR_CONCURRENCY", 8);
    let client = Client::choose();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = or_exit(
        std::fs::read_to_string(
            root.join("fixtures/glp1-intake-typeform/maya-happy-path.input.json"),
        ),
        "the fixture",
    );
    // The fixture is pretty-printed (14 KB); a webhook on the wire is compact JSON (8 KB).
    let compact = std::env::var("LOAD_BODY").is_ok_and(|b| b == "compact");
    let body = Arc::new(if compact {
        let parsed: Value = or_exit(serde_json::from_str(&fixture), "the fixture");
        or_exit(serde_json::to_string(&parsed), "the fixture, compact")
    } else {
        fixture
    });
    let dir = or_exit(tempfile::tempdir(), "a temporary directory");

    let runs = runtime.block_on(async {
        let ehr = sink();
        let config = dir.path().join("load.toml");
        or_exit(std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nmappings_dir = {:?}\n{}[sources.\"*\"]\ntype = \"api_key\"\nkey = \"bench\"\n",
                dir.path().join("data"),
                std::env::var_os("LOAD_MAPPINGS").map_or_else(|| root.join("mappings"), Into::into),
                if no_ehr { String::new() } else { format!("[ehr]\nbase_url = \"{ehr}\"\nconcurrency = {ehr_concurrency}\n") },
            ),
        ), "writing the config");
        // `serve`'s own default level (its lines are dropped); `LOAD_LOG=error` shows errors.
        let log = std::env::var("LOAD_LOG").unwrap_or_else(|_| "info".into());
        let mut child = or_exit(
            Command::new(
                std::env::var_os("LOAD_SERVER")
                    .unwrap_or_else(|| env!("CARGO_BIN_EXE_chartbridge").into()),
            )
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", &log)
                .env("CHARTBRIDGE_ECHO_ROUTE", "1")
                .stdout(Stdio::piped())
                .stderr(if log == "error" { Stdio::inherit() } else { Stdio::null() })
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
        let route = |name, path: &str, unique, seconds| Load { name, url: format!("{url}{path}"), body: Arc::clone(&body), unique, connections, seconds };
        route("warm-up", "/echo", false, 1).run(client, dir.path()).await;
        let pid = child.id();
        let before = cpu_seconds(pid);
        let echo = route("POST /echo (baseline)", "/echo", false, seconds).run(client, dir.path()).await;
        let between = cpu_seconds(pid);
        let submit = route("POST /submissions (durable)", "/submissions/glp1-intake-typeform", true, seconds).run(client, dir.path()).await;
        let after = cpu_seconds(pid);
        // The server's CPU time per request: steadier than requests/s on a machine whose
        // speed wanders (what other tenants take is not in it).
        if let (Some(b), Some(m), Some(a)) = (before, between, after) {
            println!("\nserver CPU per request: echo {:.0} µs; submission {:.0} µs (its accept and the deliveries meanwhile)", 1e6 * (m - b) / echo.requests.max(1) as f64, 1e6 * (a - m) / submit.requests.max(1) as f64);
        }
        // What the outbox did meanwhile: delivered, and still waiting, when the load stopped.
        let metrics = match reqwest::get(format!("{url}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("# unavailable: {e}"),
        };
        let figure = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
        println!("\noutbox when the load stopped: {} delivered (mean EHR round trip {:.1} ms), {} waiting; store: {} writes in {} rounds ({:.1} s in sled's flush, {:.1} s in its fdatasync)", figure("chartbridge_deliveries_total "), 1000.0 * figure("chartbridge_delivery_seconds_sum ") / figure("chartbridge_delivery_seconds_count "), figure("chartbridge_outbox_depth "), figure("chartbridge_store_commits_total "), figure("chartbridge_store_commit_rounds_total "), figure("chartbridge_store_flush_seconds_total "), figure("chartbridge_store_fdatasync_seconds_total "));
        let _ = child.kill();
        let _ = child.wait();
        vec![echo, submit]
    });

    println!(
        "\n{connections} connections, {seconds} s each, client: {}; server: release build, 2 cores shared with the client; EHR: {}; body: the Typeform intake, {} ({} bytes)\n",
        client.describe(),
        if no_ehr { "none (outbox holds)" } else { "local sink" },
        if compact { "compact" } else { "pretty-printed" },
        body.len()
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
            r.p50_ms,
            r.p99_ms
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
