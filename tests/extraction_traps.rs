//! The traps peer engines fall into (see notes on SDC extraction), each asserted on real maps
//! and fixtures rather than trusted to a blessed golden file.

mod common;

use chartbridge::fhir::validate::validate;
use chartbridge::mapping::{self, MappedSubmission, Mapping, SubmissionInput};
use common::root;
use serde_json::{json, Value};

fn load(id: &str) -> Mapping {
    mapping::load_file(&root().join(format!("mappings/{id}.yaml"))).expect("mapping loads")
}

/// A mapped submission with its Bundle read back as a `Value` (`out.bundle`).
struct Mapped {
    bundle: Value,
    submission: MappedSubmission,
}

impl std::ops::Deref for Mapped {
    type Target = MappedSubmission;
    fn deref(&self) -> &MappedSubmission {
        &self.submission
    }
}

fn map(m: &Mapping, payload: &Value) -> Mapped {
    let raw = payload.to_string();
    let submission = m
        .map_submission(SubmissionInput {
            payload,
            raw: raw.as_bytes(),
            received_at: "2026-01-01T00:00:00Z",
        })
        .unwrap_or_else(|f| panic!("{f}"));
    let bundle = submission.bundle_json().expect("the Bundle is JSON");
    Mapped { bundle, submission }
}

fn fixture(path: &str) -> Value {
    common::read_json(&root().join("fixtures").join(path))
}

fn resources<'a>(b: &'a Value, kind: &str) -> Vec<&'a Value> {
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == kind)
        .collect()
}

fn by_code<'a>(b: &'a Value, code: &str) -> Vec<&'a Value> {
    resources(b, "Observation")
        .into_iter()
        .filter(|o| o["code"]["coding"][0]["code"] == code)
        .collect()
}

/// The QR answers of a linkId, wherever it is in the tree.
fn qr_answers(b: &Value, link_id: &str) -> Vec<Value> {
    fn walk(items: &Value, link_id: &str, out: &mut Vec<Value>) {
        for i in items.as_array().into_iter().flatten() {
            if i["linkId"] == link_id {
                out.extend(i["answer"].as_array().cloned().unwrap_or_default());
            }
            walk(&i["item"], link_id, out);
        }
    }
    let mut out = Vec::new();
    walk(
        &resources(b, "QuestionnaireResponse")[0]["item"],
        link_id,
        &mut out,
    );
    out
}

#[test]
fn false_and_zero_are_answers_and_observations() {
    let m = load("consult-intake-portal");
    let out = map(
        &m,
        &fixture("consult-intake-portal/complex-intake.input.json"),
    );
    assert_eq!(
        qr_answers(&out.bundle, "smoker"),
        vec![json!({"valueBoolean": false})]
    );
    assert_eq!(
        qr_answers(&out.bundle, "alcohol"),
        vec![json!({"valueInteger": 0})]
    );
    assert_eq!(by_code(&out.bundle, "11287-0")[0]["valueInteger"], json!(0));
    // 5 ft 0 in: the zero inches are summed, not dropped.
    assert_eq!(
        by_code(&out.bundle, "8302-2")[0]["valueQuantity"]["value"],
        json!(152.4)
    );

    let phq = load("phq9-typeform");
    let out = map(&phq, &fixture("phq9-typeform/all-zero.input.json"));
    assert_eq!(by_code(&out.bundle, "44261-6")[0]["valueInteger"], json!(0));
    assert_eq!(by_code(&out.bundle, "44250-9").len(), 1);
}

#[test]
fn decimals_stay_json_numbers_with_their_precision() {
    let m = load("refill-request-portal");
    let out = map(&m, &fixture("refill-request-portal/complete.input.json"));
    let dose = &qr_answers(&out.bundle, "current-dose")[0]["valueQuantity"]["value"];
    assert!(dose.is_number(), "{dose}");
    assert_eq!(dose.to_string(), "0.50");
    let text = serde_json::to_string(&out.bundle).unwrap();
    assert!(
        text.contains(r#""value":0.50"#),
        "decimal serialised as written"
    );

    // Jotform sends "118.4": it becomes the number 118.4, not the string.
    let j = load("glp1-intake-jotform");
    let out = map(
        &j,
        &fixture("glp1-intake-jotform/daniel-pancreatitis.input.json"),
    );
    assert_eq!(
        by_code(&out.bundle, "29463-7")[0]["valueQuantity"]["value"].to_string(),
        "118.4"
    );
}

#[test]
fn unanswered_optional_items_yield_nothing() {
    let m = load("consult-intake-portal");
    let out = map(
        &m,
        &fixture("consult-intake-portal/complex-intake.input.json"),
    );
    assert!(
        qr_answers(&out.bundle, "notes").is_empty(),
        "null is no answer"
    );
    // The third medication has an empty dose: no answer for it, the other two have one each.
    assert_eq!(qr_answers(&out.bundle, "med-dose").len(), 2);
    assert!(!serde_json::to_string(&out.bundle)
        .unwrap()
        .contains("\"notes\""));
    assert!(out.missing.is_empty());

    // Typeform: an optional question left out creates neither an answer nor an Observation.
    let t = load("glp1-intake-typeform");
    let mut p = fixture("glp1-intake-typeform/maya-happy-path.input.json");
    let answers = p["form_response"]["answers"].as_array_mut().unwrap();
    answers
        .retain(|a| a["field"]["ref"] != "goal_weight_lb" && a["field"]["ref"] != "sex_at_birth");
    let out = map(&t, &p);
    assert!(qr_answers(&out.bundle, "goal-weight").is_empty());
    assert!(
        by_code(&out.bundle, "76689-9").is_empty(),
        "no Observation for a skipped question"
    );
    assert_eq!(
        out.missing
            .iter()
            .map(|m| m.link_id.as_str())
            .collect::<Vec<_>>(),
        vec!["sex-at-birth"]
    );
}

#[test]
fn every_answer_of_a_multi_answer_item_is_its_own_observation() {
    let j = load("glp1-intake-jotform");
    let out = map(
        &j,
        &fixture("glp1-intake-jotform/daniel-pancreatitis.input.json"),
    );
    let history = by_code(&out.bundle, "11348-0");
    let codes: Vec<&Value> = history
        .iter()
        .map(|o| &o["valueCodeableConcept"]["coding"][0]["code"])
        .collect();
    assert_eq!(codes, vec!["75694006", "39621005"]);
    let ids: Vec<&Value> = history
        .iter()
        .map(|o| &o["identifier"][0]["value"])
        .collect();
    assert_ne!(ids[0], ids[1], "distinct business identifiers");

    // Healthie joins checkbox answers with newlines.
    let h = load("glp1-intake-healthie");
    let out = map(
        &h,
        &fixture("glp1-intake-healthie/priya-unknown-family-history.input.json"),
    );
    assert_eq!(by_code(&out.bundle, "11348-0").len(), 2);
    assert_eq!(
        qr_answers(&out.bundle, "current-meds")[0]["valueString"],
        "Levothyroxine 75 mcg every morning\nSertraline 50 mg daily"
    );
}

#[test]
fn non_ascii_text_survives() {
    let m = load("consult-intake-portal");
    let out = map(
        &m,
        &fixture("consult-intake-portal/complex-intake.input.json"),
    );
    assert_eq!(
        qr_answers(&out.bundle, "reason")[0]["valueString"],
        "Gewichtsmanagement – je voudrais discuter d'un traitement GLP-1. 体重管理の相談です。"
    );
    let patient = &resources(&out.bundle, "Patient")[0];
    assert_eq!(patient["name"][0]["family"], "Ng-Łukasiewicz");
    assert_eq!(patient["birthDate"], "1990-07-04");
}

#[test]
fn observations_carry_subject_effective_issued_and_derived_from() {
    let m = load("glp1-intake-typeform");
    let out = map(
        &m,
        &fixture("glp1-intake-typeform/maya-happy-path.input.json"),
    );
    let entries = out.bundle["entry"].as_array().unwrap();
    let qr_url = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "QuestionnaireResponse")
        .unwrap()["fullUrl"]
        .clone();
    let patient_url = entries[0]["fullUrl"].clone();
    for e in entries {
        assert!(e["fullUrl"].as_str().unwrap().starts_with("urn:uuid:"));
        assert_eq!(e["request"]["method"], "POST");
        assert!(
            e["request"]["ifNoneExist"].as_str().is_some(),
            "conditional create everywhere"
        );
        let r = &e["resource"];
        if r["resourceType"] == "Observation" {
            assert_eq!(r["subject"]["reference"], patient_url);
            assert_eq!(r["effectiveDateTime"], "2025-11-18T16:09:47Z");
            assert_eq!(r["issued"], "2026-01-01T00:00:00Z");
            assert_eq!(r["derivedFrom"][0]["reference"], qr_url);
            assert!(r["identifier"][0]["value"]
                .as_str()
                .unwrap()
                .starts_with("b7e1c9d24f6a38e0c5b1d7f29a4e6c83/"));
        }
    }
    let qr = &resources(&out.bundle, "QuestionnaireResponse")[0];
    assert_eq!(
        qr["questionnaire"],
        "https://forms.example-clinic.com/Questionnaire/glp1-intake|3"
    );
    assert_eq!(
        qr["identifier"]["value"],
        "b7e1c9d24f6a38e0c5b1d7f29a4e6c83"
    );
    // Blood pressure: one Observation, two components.
    let bp = by_code(&out.bundle, "85354-9");
    assert_eq!(bp.len(), 1);
    assert_eq!(bp[0]["component"][0]["code"]["coding"][0]["code"], "8480-6");
    assert_eq!(bp[0]["component"][1]["valueQuantity"]["value"], json!(82));
    // 212 lb → 96.16 kg; 5 ft 6 in → 167.64 cm; BMI 34.2 (SHAPES.md check value).
    assert_eq!(
        by_code(&out.bundle, "29463-7")[0]["valueQuantity"]["value"],
        json!(96.16)
    );
    assert_eq!(
        by_code(&out.bundle, "39156-5")[0]["valueQuantity"]["value"],
        json!(34.2)
    );
}

#[test]
fn provenance_names_submission_payload_hash_and_mapping() {
    let m = load("glp1-intake-typeform");
    let payload = fixture("glp1-intake-typeform/maya-happy-path.input.json");
    let raw =
        std::fs::read(root().join("fixtures/glp1-intake-typeform/maya-happy-path.input.json"))
            .unwrap();
    let out = m
        .map_submission(SubmissionInput {
            payload: &payload,
            raw: &raw,
            received_at: "2026-01-01T00:00:00Z",
        })
        .unwrap();
    let bundle = out.bundle_json().unwrap();
    let prov = &resources(&bundle, "Provenance")[0];
    let targets = prov["target"].as_array().unwrap().len();
    assert_eq!(
        targets,
        1 + resources(&bundle, "Observation").len(),
        "QR and every Observation"
    );
    assert_eq!(prov["agent"][0]["who"]["type"], "Device");
    assert_eq!(prov["agent"][1]["type"]["coding"][0]["code"], "author");
    let entity = |i: usize| {
        prov["entity"][i]["what"]["identifier"]["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(entity(0), "b7e1c9d24f6a38e0c5b1d7f29a4e6c83");
    assert_eq!(out.payload_sha256, chartbridge::fhir::sha256_hex(&raw));
    assert!(entity(1).starts_with("ni:///sha-256;"));
    assert_eq!(entity(2), "glp1-intake-typeform|3");
    assert_eq!(
        entity(3),
        chartbridge::fhir::provenance::named_information(&m.content_sha256)
    );
}

#[test]
fn same_input_same_bundle_and_every_resource_round_trips_through_fhirbolt() {
    for entry in std::fs::read_dir(root().join("mappings")).unwrap() {
        let m = mapping::load_file(&entry.unwrap().path()).unwrap();
        validate(&m.questionnaire()).unwrap_or_else(|oo| panic!("{}: {:?}", m.id, oo));
        for input in chartbridge::golden::cases(&root().join("fixtures"), &m.id) {
            let raw = std::fs::read(&input).unwrap();
            let a = chartbridge::golden::render(&m, &raw, "2026-01-01T00:00:00Z").unwrap();
            let b = chartbridge::golden::render(&m, &raw, "2026-01-01T00:00:00Z").unwrap();
            assert_eq!(a, b, "{}: deterministic", input.display());
            if let Some(bundle) = a.get("bundle") {
                for e in bundle["entry"].as_array().unwrap() {
                    validate(&e["resource"])
                        .unwrap_or_else(|oo| panic!("{}: {:?}", input.display(), oo));
                }
            }
        }
    }
}

#[test]
fn bad_payloads_get_every_problem_without_values() {
    let m = load("refill-request-portal");
    let p = fixture("refill-request-portal/wrong-types.input.json");
    let raw = p.to_string();
    let f = m
        .map_submission(SubmissionInput {
            payload: &p,
            raw: raw.as_bytes(),
            received_at: "2026-01-01T00:00:00Z",
        })
        .unwrap_err();
    let oo = f.outcome().to_json();
    let where_: Vec<&str> = oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["expression"][0].as_str().unwrap())
        .collect();
    assert_eq!(
        where_,
        vec![
            "source.submitted_at",
            "current-dose",
            "last-dose-date",
            "missed-doses",
            "weight",
        ],
        "an option the map does not know (`hiccups`) in a multi-select is kept, not an error"
    );
    let text = oo.to_string();
    for secret in ["half a milligram", "yesterday evening", "hiccups"] {
        assert!(
            !text.contains(secret),
            "the outcome echoes a submitted value: {secret}"
        );
    }
    // Not an object at all, and a non-JSON Jotform rawRequest.
    let t = load("glp1-intake-typeform");
    assert!(t
        .map_submission(SubmissionInput {
            payload: &json!([1, 2]),
            raw: b"[1,2]",
            received_at: "2026-01-01T00:00:00Z"
        })
        .is_err());
    let j = load("glp1-intake-jotform");
    let bad = json!({"submissionID": "1", "rawRequest": "{not json"});
    let f = j
        .map_submission(SubmissionInput {
            payload: &bad,
            raw: b"",
            received_at: "2026-01-01T00:00:00Z",
        })
        .unwrap_err();
    assert_eq!(f.issues[0].expression, vec!["$.rawRequest"]);
}

/// Parsing only what a map reads (the `Projection`) must map every fixture exactly as the whole
/// document does — the Bundle, flags, missing answers, or the same failure.
#[test]
fn reading_only_what_the_map_reads_changes_nothing() {
    let mut compared = 0;
    for dir in std::fs::read_dir(root().join("fixtures")).unwrap() {
        let dir = dir.unwrap().path();
        let id = dir.file_name().unwrap().to_str().unwrap().to_string();
        if id == "vendors" || id == "sdc" {
            // Vendor bodies as they arrive (multipart and the like), and FHIR-native forms for
            // `$extract`: not a mapping's cases.
            continue;
        }
        let m = load(&id);
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            if !path.to_string_lossy().ends_with(".input.json") {
                continue;
            }
            let raw = std::fs::read(&path).unwrap();
            let whole: Value = serde_json::from_slice(&raw).unwrap();
            let projected = m.parse_payload(&raw).unwrap();
            let run = |payload: &Value| {
                m.map_submission(SubmissionInput {
                    payload,
                    raw: &raw,
                    received_at: "2026-01-01T00:00:00Z",
                })
                .map(|s| (s.bundle, s.flags, serde_json::to_value(&s.missing).unwrap()))
                .map_err(|e| e.to_string())
            };
            assert_eq!(run(&projected), run(&whole), "{}", path.display());
            compared += 1;
        }
    }
    assert!(compared >= 16, "only {compared} fixtures compared");

    // What the Typeform map skips is most of the webhook: the form definition.
    let m = load("glp1-intake-typeform");
    let raw =
        std::fs::read(root().join("fixtures/glp1-intake-typeform/maya-happy-path.input.json"))
            .unwrap();
    let projected = m.parse_payload(&raw).unwrap();
    assert!(projected["form_response"].get("definition").is_none());
    assert!(projected["form_response"]["answers"].is_array());
    assert!(projected.to_string().len() * 2 < raw.len());
    // Each answer only as far as the key and the answer rules look.
    let first = &projected["form_response"]["answers"][0];
    assert_eq!(first["field"]["ref"], "first_name");
    assert!(first["field"].get("id").is_none() && first.get("type").is_none());
}

/// The obvious byte-by-byte scan of JSON text: does it nest deeper than `max`?
fn deeper_byte_by_byte(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        match b {
            _ if in_string && escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            _ if in_string => {}
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The depth limit is counted while parsing, in the parts a map skips as in those it reads: it
/// refuses exactly what a scan of the text finds nested too deep, and changes nothing else.
#[test]
fn the_depth_limit_is_counted_while_parsing_skipped_parts_included() {
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in std::fs::read_dir(root().join("fixtures")).unwrap() {
        let dir = dir.unwrap().path();
        let id = dir.file_name().unwrap().to_str().unwrap().to_string();
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            if path.to_string_lossy().ends_with(".input.json") {
                cases.push((id.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    // Deep where the Typeform map reads, and where it skips; brackets inside strings; numbers
    // (a map inside serde_json) and empty containers.
    for doc in [
        r#"{"form_response": {"answers": [{"a": [[[[1]]]]}]}}"#,
        r#"{"form_response": {"definition": {"fields": [[[[[[{}]]]]]]}}}"#,
        r#"{"form_response": {"token": "[[[[[[{{{{\"", "hidden": {"x": [1.50, -0, 2e3]}}}"#,
        r#"[[[[[[[[[[[[[[]]]]]]]]]]]]]]"#,
        r#"{}"#,
        r#"7"#,
    ] {
        cases.push(("glp1-intake-typeform".into(), doc.as_bytes().to_vec()));
    }
    let mut checked = 0;
    for (id, raw) in &cases {
        let m = load(id);
        let unlimited = m.parse_payload(raw).unwrap();
        for max in 0..16 {
            match m.parse_payload_within(raw, max) {
                Err(mapping::PayloadError::TooDeep(n)) => {
                    assert_eq!(n, max);
                    assert!(deeper_byte_by_byte(raw, max), "{id} refused at {max}");
                }
                Ok(v) => {
                    assert!(!deeper_byte_by_byte(raw, max), "{id} let through at {max}");
                    assert_eq!(v, unlimited);
                }
                Err(e) => panic!("{id}: {e}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 16 * 20, "{checked}");
    let m = load("glp1-intake-typeform");
    assert!(matches!(
        m.parse_payload_within(b"{\"form_response\": [", 8),
        Err(mapping::PayloadError::NotJson { .. })
    ));
}
