//! Mapping cost against the floor of what any gateway must do with the same bytes: parse the
//! payload and serialise the Bundle. Run with `cargo bench --bench mapping`.
//!
//! - `typeform_glp1/floor`: serde_json parse of the Typeform intake + serialise its Bundle.
//! - `typeform_glp1/chartbridge`: parse + map + serialise.
//! - `synthetic/N`: a form of N decimal answers (N = 100, 1,000) to show the cost is linear.

mod common;

use std::hint::black_box;
use std::path::Path;

use chartbridge::mapping::{self, Mapping, SubmissionInput};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};

use common::or_exit;

const RECEIVED: &str = "2026-01-01T00:00:00Z";

fn map_bytes(m: &Mapping, raw: &[u8]) -> Vec<u8> {
    let payload = or_exit(m.parse_payload(raw), "the payload");
    let mapped = m.map_submission(SubmissionInput {
        payload: &payload,
        raw,
        received_at: RECEIVED,
    });
    or_exit(mapped, "mapping the payload").bundle
}

fn typeform(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let m = or_exit(
        mapping::load_file(&root.join("mappings/glp1-intake-typeform.yaml")),
        "the mapping",
    );
    let raw = or_exit(
        std::fs::read(root.join("fixtures/glp1-intake-typeform/maya-happy-path.input.json")),
        "the fixture",
    );
    let bundle: Value = serde_json::from_slice(&map_bytes(&m, &raw)).expect("bundle");
    let mut g = c.benchmark_group("typeform_glp1");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("floor", |b| {
        b.iter(|| {
            let v: Value = or_exit(serde_json::from_slice(black_box(&raw)), "the fixture");
            black_box(v);
            serde_json::to_vec(black_box(&bundle)).expect("serialise")
        })
    });
    g.bench_function("chartbridge", |b| b.iter(|| map_bytes(&m, black_box(&raw))));
    g.finish();
}

/// A mapping of `n` decimal items keyed like Typeform, and a payload answering all of them.
fn synthetic_form(n: usize) -> (Mapping, Vec<u8>) {
    let mut yaml = String::from(
        "id: synthetic\nversion: 1\ntitle: Synthetic\nurl: https://example.org/Questionnaire/synthetic\n\
         source:\n  submission_id: $.token\n  answers: { list: \"$.answers[*]\", key: $.field.ref }\n\
         \x20 patient:\n    identifier: { system: https://example.org/patient, path: $.patient }\nitems:\n",
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{ link_id: q{i}, type: decimal, answer: f{i}, value: $.number }}\n"
        ));
    }
    let m = mapping::parse(Path::new("synthetic.yaml"), &yaml).expect("synthetic mapping");
    let answers: Vec<Value> = (0..n)
        .map(|i| json!({"type": "number", "number": i as f64 + 0.5, "field": {"id": format!("id{i}"), "ref": format!("f{i}")}}))
        .collect();
    let payload = json!({"token": "t1", "patient": "p1", "answers": answers});
    (m, serde_json::to_vec(&payload).expect("payload"))
}

fn synthetic(c: &mut Criterion) {
    let mut g = c.benchmark_group("synthetic");
    for n in [100usize, 1000] {
        let (m, raw) = synthetic_form(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("chartbridge", n), &raw, |b, raw| {
            b.iter(|| map_bytes(&m, black_box(raw)))
        });
        let bundle: Value = serde_json::from_slice(&map_bytes(&m, &raw)).expect("bundle");
        g.bench_with_input(BenchmarkId::new("floor", n), &raw, |b, raw| {
            b.iter(|| {
                let v: Value = or_exit(serde_json::from_slice(black_box(raw)), "the payload");
                black_box(v);
                serde_json::to_vec(black_box(&bundle)).expect("serialise")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, typeform, synthetic);
criterion_main!(benches);
