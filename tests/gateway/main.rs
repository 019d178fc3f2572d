//! The gateway end to end: `chartbridge serve` as a process on a random port, the real FHIR test
//! server as the EHR, sled on disk, crashes and restarts. One test binary (one FHIR server
//! install, one build) of feature files; this one holds what they share.

#[path = "../common/mod.rs"]
mod common;
mod delivery;
mod events;
mod fhir_native;
mod in_process;
mod intake_safety;
mod operators;
#[path = "../common/receiver.rs"]
mod receiver;
mod response_fit;
mod robustness;
mod sources;

use common::{root, App, FhirServer};
use serde_json::Value;

const MAYA: &str = "fixtures/glp1-intake-typeform/maya-happy-path.input.json";

const KEY: &str = "glp1-intake-typeform/b7e1c9d24f6a38e0c5b1d7f29a4e6c83";

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(root().join(path)).expect("fixture")
}

/// The states a submission went through, in order.
fn states(view: &Value) -> Vec<&str> {
    view["transitions"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["state"].as_str()).collect())
        .unwrap_or_default()
}

/// Waits until `key` is delivered and checks the EHR stored its QuestionnaireResponse.
fn delivered_with_a_questionnaire_response(app: &App, key: &str) {
    let view = app.wait_for_state(key, "delivered", 30);
    assert!(
        view["ehr"]
            .as_array()
            .is_some_and(|refs| refs.iter().any(|r| r["reference"]
                .as_str()
                .is_some_and(|r| r.starts_with("QuestionnaireResponse/")))),
        "{view}"
    );
}

fn count(server: &FhirServer, kind: &str) -> u64 {
    server.counts()[kind].as_u64().unwrap_or(0)
}

/// POSTs `body` to `$extract`.
fn post_extract(app: &App, body: &[u8]) -> (u16, Value, reqwest::header::HeaderMap) {
    app.post("/QuestionnaireResponse/$extract", body, &[])
}

/// An answer of `item`'s type (what a form renderer would post), or none for a group.
fn some_answer(item: &Value) -> Option<Value> {
    use serde_json::json;
    let unit = item["extension"].as_array().and_then(|es| {
        es.iter()
            .find(|e| e["url"] == "http://hl7.org/fhir/StructureDefinition/questionnaire-unit")
    });
    // A plausible number: inside the item's bounds when it has them (81.5 without).
    let bound = |which: &str| {
        item["extension"].as_array().and_then(|es| {
            es.iter()
                .find(|e| e["url"].as_str().is_some_and(|u| u.ends_with(which)))
                .and_then(|e| e["valueQuantity"]["value"].as_f64())
        })
    };
    let value = match (bound("minQuantity"), bound("maxQuantity")) {
        (Some(low), Some(high)) => ((low + high) / 2.0).round(),
        _ => 81.5,
    };
    Some(match item["type"].as_str()? {
        "quantity" => {
            let u = &unit?["valueCoding"];
            json!({"valueQuantity": {"value": value, "unit": u["display"], "system": u["system"], "code": u["code"]}})
        }
        "decimal" => json!({"valueDecimal": 1.5}),
        "integer" => json!({"valueInteger": 0}),
        "boolean" => json!({"valueBoolean": false}),
        "date" => json!({"valueDate": "1990-04-02"}),
        "string" | "text" => json!({"valueString": "ça va"}),
        "choice" => json!({"valueCoding": item["answerOption"][0]["valueCoding"].clone()}),
        _ => return None,
    })
}

/// A QuestionnaireResponse answering every question of `questionnaire`'s items.
fn answering(items: &Value) -> Vec<Value> {
    items
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            let mut r = serde_json::json!({"linkId": item["linkId"]});
            if let Some(a) = some_answer(item) {
                r["answer"] = serde_json::json!([a]);
            }
            if item.get("item").is_some() {
                r["item"] = Value::from(answering(&item["item"]));
            }
            r
        })
        .collect()
}

/// The clinic portal's QuestionnaireResponse `id` to the consult intake's Questionnaire `q`:
/// every question answered but the reason for the visit (required).
fn portal_response(q: &Value, id: &str) -> Value {
    serde_json::json!({
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": "https://portal.example-clinic.com/responses", "value": id},
        "questionnaire": format!("{}|{}", q["url"].as_str().unwrap(), q["version"].as_str().unwrap()),
        "status": "completed",
        "subject": {"identifier": {"system": "https://crm.example-clinic.com/patient", "value": "pt_fhir_native"}},
        "authored": "2026-11-26T09:30:00Z",
        "item": answering(&q["item"])
            .into_iter()
            .filter(|i| i["linkId"] != "reason")
            .collect::<Vec<_>>(),
    })
}

/// The Standard Webhooks headers the portal signs `body` with, now.
fn portal_signed(body: &[u8]) -> Vec<(&'static str, String)> {
    portal_signed_at(body, unix_now())
}

/// The same, signed at `ts` (Unix seconds).
fn portal_signed_at(body: &[u8], ts: u64) -> Vec<(&'static str, String)> {
    let signature =
        chartbridge::http::auth::sign_standard_webhooks(common::PORTAL_SECRET, "msg_1", ts, body);
    vec![
        ("webhook-id", "msg_1".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ]
}

/// Now, in Unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
