//! The gateway as a FHIR server and FHIR-native forms: its Questionnaires, `$extract`, and
//! QuestionnaireResponses taken as submissions.

use serde_json::Value;

use super::*;
use crate::common::{self, root, App, FhirServer};

#[test]
fn the_mappings_questionnaires_are_served_as_fhir_with_a_capability_statement() {
    use chartbridge::fhir::validate::validate;
    let app = App::start(None);
    let valid = |v: &Value| {
        validate(v).unwrap_or_else(|o| panic!("{}: {}", v["resourceType"], o.to_json()));
    };
    let (status, capability) = app.get("/metadata");
    assert_eq!(status, 200, "{capability}");
    valid(&capability);
    assert_eq!(
        capability["rest"][0]["resource"][0]["type"],
        "Questionnaire"
    );
    assert_eq!(
        capability["rest"][0]["resource"][1]["operation"][0]["definition"],
        "http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract"
    );

    let url = "https://forms.example-clinic.com/Questionnaire/glp1-intake";
    let (status, q) = app.get("/Questionnaire/glp1-intake-typeform");
    assert_eq!(status, 200, "{q}");
    valid(&q);
    assert_eq!(
        (q["resourceType"].as_str(), q["url"].as_str()),
        (Some("Questionnaire"), Some(url))
    );
    let (status, found) = app.get(&format!("/Questionnaire?url={url}"));
    assert_eq!(status, 200, "{found}");
    valid(&found);
    assert_eq!(found["total"], 1);
    assert_eq!(found["entry"][0]["resource"], q);
    let (_, all) = app.get("/Questionnaire");
    valid(&all);
    let shipped = std::fs::read_dir(root().join("mappings")).unwrap().count();
    assert_eq!(all["total"].as_u64(), Some(shipped as u64));
    // What the mapping's QuestionnaireResponses point at (its golden Bundle) is what is served.
    let golden = common::read_json(
        &root().join("fixtures/glp1-intake-typeform/maya-happy-path.expected.json"),
    );
    let canonical = format!("{url}|{}", q["version"].as_str().unwrap());
    assert!(
        golden
            .to_string()
            .contains(&format!("\"questionnaire\":\"{canonical}\"")),
        "{canonical}"
    );
    // ... and that versioned canonical finds it; another version does not.
    let (_, by_version) = app.get(&format!("/Questionnaire?url={canonical}"));
    assert_eq!(by_version["entry"][0]["resource"], q);
    let (_, other) = app.get(&format!("/Questionnaire?url={url}|999"));
    assert_eq!(other["total"], 0);

    let (status, none) = app.get("/Questionnaire?url=https://example.org/nothing");
    assert_eq!((status, &none["total"]), (200, &serde_json::json!(0)));
    assert!(none.get("entry").is_none());
    valid(&none);
    let (status, outcome) = app.get("/Questionnaire/nothing");
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (404, Some("not-found"))
    );
}

/// A FHIR-native form: the EHR holds a QuestionnaireResponse to one of the mappings'
/// Questionnaires; `$extract` (resolving the Questionnaire by its canonical) gives the
/// Observations as a transaction the real FHIR server accepts, and extracting again updates
/// them instead of adding more.
#[test]
fn extract_turns_a_questionnaire_response_into_observations_the_ehr_accepts() {
    use chartbridge::fhir::validate::validate;
    use serde_json::json;
    let ehr = FhirServer::start();
    let app = App::start(None);
    let (_, q) = app.get("/Questionnaire/glp1-intake-typeform");
    let (status, patient) = ehr.post("/Patient", &json!({"resourceType": "Patient"}));
    assert_eq!(status, 201, "{patient}");
    let (status, qr) = ehr.post(
        "/QuestionnaireResponse",
        &json!({
            "resourceType": "QuestionnaireResponse",
            "identifier": {"system": "https://portal.example-clinic.com/responses", "value": "r-1"},
            "questionnaire": format!("{}|{}", q["url"].as_str().unwrap(), q["version"].as_str().unwrap()),
            "status": "completed",
            "subject": {"reference": format!("Patient/{}", patient["id"].as_str().unwrap())},
            "authored": "2026-11-26T09:30:00Z",
            "item": answering(&q["item"]),
        }),
    );
    assert_eq!(status, 201, "{qr}");

    let (status, bundle, headers) = post_extract(&app, qr.to_string().as_bytes());
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(headers["content-type"], "application/fhir+json");
    assert_eq!(
        bundle["type"], "transaction",
        "no warnings: the Bundle itself"
    );
    validate(&bundle).unwrap_or_else(|o| panic!("{}", o.to_json()));
    let extracted = common::entries_of(&bundle, "Observation");
    assert!(extracted >= 5, "{bundle}");
    let weight = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|o| o["code"]["coding"][0]["code"] == "29463-7")
        .expect("the weight");
    // Midway between the weight's plausible bounds (0.3–650 kg).
    assert_eq!(weight["valueQuantity"]["value"].as_f64(), Some(325.0));
    assert_eq!(
        weight["valueQuantity"]["system"],
        "http://unitsofmeasure.org"
    );
    let qr_ref = format!("QuestionnaireResponse/{}", qr["id"].as_str().unwrap());
    assert_eq!(weight["derivedFrom"][0]["reference"], qr_ref.as_str());
    // The Questionnaire says what the mapping does: each Observation $extract makes has the
    // category and component codes of the one with its code the mapping makes from a vendor
    // payload (the blood pressure panel included; Maya's payload answers all but one).
    let golden = common::read_json(
        &root().join("fixtures/glp1-intake-typeform/maya-happy-path.expected.json"),
    );
    let shape = |o: &Value| {
        let components: Vec<Value> = o["component"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["code"].clone())
            .collect();
        (
            o["code"]["coding"][0]["code"].clone(),
            o["category"].clone(),
            components,
        )
    };
    let mapped: Vec<_> = golden["bundle"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "Observation")
        .map(shape)
        .collect();
    let mut compared = 0;
    for e in bundle["entry"].as_array().unwrap() {
        let extracted = shape(&e["resource"]);
        if let Some(m) = mapped.iter().find(|m| m.0 == extracted.0) {
            assert_eq!(&extracted, m);
            compared += 1;
        }
    }
    assert_eq!(
        compared,
        mapped.len(),
        "every Observation the mapping makes"
    );
    assert!(
        mapped.iter().any(|m| m.2.len() == 2),
        "the BP panel is compared"
    );

    let (status, answer) = ehr.transaction(&bundle);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(count(&ehr, "Observation"), extracted as u64);
    let (status, answer) = ehr.transaction(&bundle);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        count(&ehr, "Observation"),
        extracted as u64,
        "updated, not duplicated"
    );
    assert_eq!(count(&ehr, "Provenance"), 1, "one Provenance per response");
    let found = ehr.search(&format!("Observation?derived-from={qr_ref}&code=29463-7"));
    assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{found}");
}

#[test]
fn extract_takes_parameters_with_an_inline_questionnaire_and_says_what_it_cannot_do() {
    use serde_json::json;
    let app = App::start(None);
    let q =
        common::read_json(&root().join("fixtures/sdc/qObservationSampleWithExtractExtension.json"));
    let qr = common::read_json(&root().join("fixtures/sdc/qrObservationSample.json"));
    // The Questionnaire is not one of the mappings': without it inline, a 422 that says so.
    let (status, outcome, _) = post_extract(&app, qr.to_string().as_bytes());
    assert_eq!(status, 422, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("phq-2-questionnaire") && d.contains("`questionnaire`")),
        "{outcome}"
    );
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "questionnaire-response", "resource": qr},
        {"name": "questionnaire", "resource": q}]});
    let (status, out, _) = post_extract(&app, parameters.to_string().as_bytes());
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["resourceType"], "Parameters");
    assert_eq!(out["parameter"][0]["name"], "return");
    let types: Vec<&str> = out["parameter"][0]["resource"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["resourceType"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "Observation",
            "Observation",
            "Observation",
            "Observation",
            "Provenance"
        ]
    );
    // The response has no identifier: re-extraction would duplicate, and the issues say so.
    assert_eq!(out["parameter"][1]["name"], "issues");
    assert_eq!(
        out["parameter"][1]["resource"]["issue"][0]["severity"],
        "warning"
    );
    // Not a QuestionnaireResponse; not JSON; too deep.
    let (status, outcome, _) = post_extract(
        &app,
        json!({"resourceType": "Patient"}).to_string().as_bytes(),
    );
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (422, Some("invalid"))
    );
    let (status, outcome, _) = post_extract(&app, b"{\"item\": [");
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (400, Some("structure"))
    );
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    let (status, _, _) = post_extract(&app, deep.as_bytes());
    assert_eq!(status, 400);
}

/// SDC 4.0 `member` and `derived` through `$extract`, and the Bundle through the real FHIR
/// server: the panel's `hasMember` and the derived value's `derivedFrom` end up pointing at the
/// Observations the server stored.
#[test]
fn extracted_panels_point_at_their_members_on_the_ehr() {
    use serde_json::json;
    let ehr = FhirServer::start();
    let app = App::start(None);
    let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
    let flag = |v: &str| {
        json!([{"url": "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract",
                "valueCode": v}])
    };
    let q = json!({
        "resourceType": "Questionnaire", "status": "active",
        "url": "https://portal.example/Questionnaire/vitals",
        "item": [{"linkId": "panel", "type": "group", "code": loinc("85353-1"),
                  "extension": flag("independent"), "item": [
            {"linkId": "weight", "type": "decimal", "code": loinc("29463-7"),
             "extension": flag("member")},
            {"linkId": "bmi", "type": "decimal", "code": loinc("39156-5"),
             "extension": flag("derived")}]}]
    });
    let qr = json!({
        "resourceType": "QuestionnaireResponse", "status": "completed",
        "questionnaire": "https://portal.example/Questionnaire/vitals",
        "identifier": {"system": "https://portal.example/qr", "value": "vitals-1"},
        "authored": "2026-11-27T09:00:00Z",
        "item": [{"linkId": "panel", "item": [
            {"linkId": "weight", "answer": [{"valueDecimal": 70.5}]},
            {"linkId": "bmi", "answer": [{"valueDecimal": 23.0}]}]}]
    });
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "questionnaire-response", "resource": qr},
        {"name": "questionnaire", "resource": q}]});
    let (status, bundle, _) = post_extract(&app, parameters.to_string().as_bytes());
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["resourceType"], "Bundle", "no warnings: {bundle}");
    let (status, answer) = ehr.transaction(&bundle);
    assert_eq!(status, 200, "{answer}");
    let find = |code: &str| {
        let found = ehr.search(&format!("Observation?code=http://loinc.org|{code}"));
        assert_eq!(found["total"], 1, "{found}");
        found["entry"][0]["resource"].clone()
    };
    let (panel, weight, bmi) = (find("85353-1"), find("29463-7"), find("39156-5"));
    let id = |o: &Value| format!("Observation/{}", o["id"].as_str().unwrap());
    assert_eq!(panel["hasMember"], json!([{"reference": id(&weight)}]));
    assert_eq!(bmi["derivedFrom"][1], json!({"reference": id(&panel)}));
}

/// A FHIR-native form: the clinic's portal posts a QuestionnaireResponse to one of the
/// mappings' Questionnaires, signed as that mapping's source. It is a submission like any
/// other — durable, then delivered once: the EHR gets its Patient, the response, the extracted
/// Observations and the Provenance, and a re-sent response creates nothing more.
#[test]
fn a_questionnaire_response_is_a_submission_delivered_with_its_observations() {
    a_questionnaire_response_delivered_in_mode("");
}

/// The same resource by resource (an EHR without transactions): every entry a conditional
/// create, references rewritten to the ids the EHR gave.
#[test]
fn a_questionnaire_response_submission_is_delivered_resource_by_resource_too() {
    a_questionnaire_response_delivered_in_mode("mode = \"per_resource\"");
}

fn a_questionnaire_response_delivered_in_mode(ehr_extra: &str) {
    use serde_json::json;
    let ehr = FhirServer::start();
    let app = App::start_with(Some(&ehr.url), ehr_extra);
    let (_, q) = app.get("/Questionnaire/consult-intake-portal");
    let response = portal_response(&q, "resp-42");
    let body = response.to_string().into_bytes();
    let signed = portal_signed;
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &body, &[]);
    assert_eq!(status, 401, "{outcome}");
    let (status, receipt, _) = app.post("/QuestionnaireResponse", &body, &signed(&body));
    assert_eq!(status, 202, "{receipt}");
    let key = "consult-intake-portal/resp-42";
    assert_eq!(receipt["key"], key);
    assert_eq!(receipt["missing"], json!(["reason"]));
    // The mapping's flags, as a vendor payload would raise them: medications listed.
    assert_eq!(
        receipt["flags"],
        json!([
            "medication_reconciliation_needed",
            "more_information_needed"
        ])
    );
    app.wait_for_state(key, "delivered", 30);
    let (_, view) = app.get(&format!("/submissions/{key}"));
    assert_eq!(view["flags"], receipt["flags"], "{view}");
    let observations = count(&ehr, "Observation");
    assert!(observations >= 3, "{}", ehr.counts());
    for kind in ["Patient", "QuestionnaireResponse", "Provenance"] {
        assert_eq!(count(&ehr, kind), 1, "{kind}: {}", ehr.counts());
    }
    let found = ehr.search(
        "QuestionnaireResponse?identifier=https://portal.example-clinic.com/responses|resp-42",
    );
    let stored = &found["entry"][0]["resource"];
    let patient = stored["subject"]["reference"].as_str().unwrap_or_default();
    assert!(patient.starts_with("Patient/"), "{stored}");
    let qr = format!("QuestionnaireResponse/{}", stored["id"].as_str().unwrap());
    let derived = ehr.search(&format!("Observation?derived-from={qr}"));
    assert_eq!(
        derived["entry"].as_array().map(Vec::len),
        Some(observations as usize)
    );
    assert!(derived["entry"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["resource"]["subject"]["reference"] == patient));
    let (status, patients) =
        app.get("/submissions?patient=https://crm.example-clinic.com/patient|pt_fhir_native");
    assert_eq!(status, 200);
    assert_eq!(patients["submissions"][0]["key"], key);

    // Sent again: the same answer, nothing new in the EHR.
    let (status, again, headers) = app.post("/QuestionnaireResponse", &body, &signed(&body));
    assert_eq!((status, &again["key"]), (202, &json!(key)));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    assert_eq!(count(&ehr, "Observation"), observations);
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);

    // The patient adds the reason asked for: a revision, amending the same response.
    let mut amended = response.clone();
    amended["status"] = json!("amended");
    amended["item"] = json!(answering(&q["item"]));
    let amended = amended.to_string().into_bytes();
    let (status, revised, _) = app.post("/QuestionnaireResponse", &amended, &signed(&amended));
    assert_eq!(status, 202, "{revised}");
    assert_eq!(
        (&revised["event"], &revised["revision"], &revised["missing"]),
        (&json!("intake.updated"), &json!(2), &json!([]))
    );
    assert_eq!(
        revised["flags"],
        json!(["medication_reconciliation_needed"])
    );
    let view = app.wait_for_state(key, "delivered", 30);
    assert_eq!(view["revision"], 2, "{view}");
    for kind in ["Patient", "QuestionnaireResponse"] {
        assert_eq!(count(&ehr, kind), 1, "{kind}: {}", ehr.counts());
    }
    assert_eq!(count(&ehr, "Provenance"), 2, "one per revision");
    assert_eq!(count(&ehr, "Observation"), observations);
    let found = ehr.search(
        "QuestionnaireResponse?identifier=https://portal.example-clinic.com/responses|resp-42",
    );
    let stored = &found["entry"][0]["resource"];
    assert_eq!(stored["status"], "amended");
    assert!(stored.to_string().contains("\"reason\""), "{stored}");

    // What cannot be a submission: not a response (422); a Questionnaire not defined here
    // (404); no identifier (422).
    let patient = json!({"resourceType": "Patient"}).to_string().into_bytes();
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &patient, &signed(&patient));
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (422, Some("invalid"))
    );
    let mut other = response.clone();
    other["questionnaire"] = json!("https://example.org/Questionnaire/x|1");
    let other = other.to_string().into_bytes();
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &other, &signed(&other));
    // No mapping defines it: the map it needs is missing.
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (404, Some("not-found"))
    );
    let mut anonymous = response.clone();
    anonymous.as_object_mut().unwrap().remove("identifier");
    let anonymous = anonymous.to_string().into_bytes();
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &anonymous, &signed(&anonymous));
    assert_eq!(status, 422, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("submission id"));
    // Counted under the mapping whose Questionnaire it answers, once that is known.
    let metrics = app.get_text("/metrics");
    for line in [
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"unauthorized\"} 1",
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"accepted\"} 1",
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"duplicate\"} 1",
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"rejected\"} 1",
        "chartbridge_submissions_total{outcome=\"rejected\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}
