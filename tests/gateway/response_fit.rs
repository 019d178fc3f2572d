//! A FHIR-native response is charted only if it fits its Questionnaire: refused with a 4xx
//! that names each problem's linkId and FHIRPath (nothing stored, nothing sent), or charted
//! without the answers that must not be (an item `enableWhen` disables, a value outside the
//! item's bounds) — at `$extract` and as a submission alike.

use serde_json::{json, Value};

use crate::common::{App, FhirServer};

/// The consult intake's Questionnaire answered (reason included), then changed by `edit`.
fn consult_response(app: &App, id: &str, edit: impl FnOnce(&mut Vec<Value>)) -> Value {
    let (_, q) = app.get("/Questionnaire/consult-intake-portal");
    let mut r = super::portal_response(&q, id);
    let mut items: Vec<Value> = r["item"].as_array().unwrap().clone();
    items.insert(
        0,
        json!({"linkId": "reason", "answer": [{"valueString": "follow-up"}]}),
    );
    edit(&mut items);
    r["item"] = Value::from(items);
    r
}

/// The vitals group's items of a response being edited.
fn vitals(items: &mut [Value]) -> &mut Vec<Value> {
    items.iter_mut().find(|i| i["linkId"] == "vitals").unwrap()["item"]
        .as_array_mut()
        .unwrap()
}

fn set(items: &mut [Value], link_id: &str, answers: Value) {
    items.iter_mut().find(|i| i["linkId"] == link_id).unwrap()["answer"] = answers;
}

/// Each problem in (diagnostics, FHIRPath).
fn problems(oo: &Value) -> Vec<(String, String)> {
    oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["diagnostics"].as_str().unwrap().to_string(),
                i["expression"][0].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A weight sent as text, two weights, an answer to an item the form has not: refused as a
/// submission (422, stored nowhere) and at `$extract` alike, every problem named.
#[test]
fn a_response_that_does_not_fit_its_questionnaire_is_refused() {
    let app = App::start(None);
    let bad = consult_response(&app, "resp-unfit", |items| {
        let v = vitals(items);
        set(v, "weight", json!([{"valueString": "81.2 kg"}]));
        set(
            v,
            "height",
            json!([
            {"valueQuantity": {"value": 170, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}},
            {"valueQuantity": {"value": 171, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}}]),
        );
        items.push(json!({"linkId": "waist", "answer": [{"valueDecimal": 90}]}));
    });
    let body = bad.to_string().into_bytes();
    let (status, oo, _) = app.post(
        "/QuestionnaireResponse",
        &body,
        &super::portal_signed(&body),
    );
    assert_eq!(status, 422, "{oo}");
    let found = problems(&oo);
    let named = |text: &str, at: &str| found.iter().any(|(d, e)| d.contains(text) && e == at);
    assert!(
        named(
            "item `height` has 2 answers and does not repeat",
            "QuestionnaireResponse.item[1].item[0].answer"
        ),
        "{found:?}"
    );
    assert!(
        named(
            "item `weight`: a valueString answer to a quantity item",
            "QuestionnaireResponse.item[1].item[1].answer[0]"
        ),
        "{found:?}"
    );
    assert!(
        named(
            "item `waist`: the Questionnaire has no such item",
            "QuestionnaireResponse.item[6]"
        ),
        "{found:?}"
    );
    assert!(
        !oo.to_string().contains("81.2 kg"),
        "no submitted value: {oo}"
    );
    assert_eq!(
        app.get("/submissions/consult-intake-portal/resp-unfit").0,
        404
    );
    let metrics = app.get_text("/metrics");
    assert!(metrics.contains("chartbridge_outbox_depth 0"), "{metrics}");

    let (status, oo, _) = super::post_extract(&app, &body);
    assert_eq!(status, 422, "{oo}");
    assert_eq!(problems(&oo).len(), 3, "{oo}");
}

/// A value outside its item's bounds in a FHIR-native submission is not charted: the response
/// goes to the EHR without it, no Observation is made of it, it is listed as missing and
/// flagged implausible; the rest is delivered.
#[test]
fn an_implausible_answer_is_left_out_of_a_submission_and_flagged() {
    let ehr = FhirServer::start();
    let app = App::start(Some(&ehr.url));
    let response = consult_response(&app, "resp-heavy", |items| {
        set(
            vitals(items),
            "weight",
            json!([{"valueQuantity": {
            "value": 2450, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}]),
        );
    });
    let body = response.to_string().into_bytes();
    let (status, receipt, _) = app.post(
        "/QuestionnaireResponse",
        &body,
        &super::portal_signed(&body),
    );
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["missing"], json!(["weight"]), "{receipt}");
    let flags: Vec<&str> = receipt["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        flags.contains(&"implausible_value") && flags.contains(&"more_information_needed"),
        "{flags:?}"
    );
    app.wait_for_state("consult-intake-portal/resp-heavy", "delivered", 30);
    let weights = ehr.search("Observation?code=http://loinc.org|29463-7");
    assert_eq!(weights["total"], 0, "no weight charted: {weights}");
    let heights = ehr.search("Observation?code=http://loinc.org|8302-2");
    assert_eq!(heights["total"], 1, "the rest is: {heights}");
    let qr = ehr.search("QuestionnaireResponse");
    let text = qr.to_string();
    assert!(
        !text.contains("2450"),
        "the response went without it: {text}"
    );
    assert!(
        text.contains("\"linkId\":\"weight\""),
        "the item stays, unanswered: {text}"
    );
}

/// `$extract` of a response whose form disables a question (`enableWhen`): the disabled
/// answer is not extracted, the others are, and a warning says which answer was left out.
#[test]
fn extract_leaves_out_the_answer_to_a_disabled_question() {
    let app = App::start(None);
    let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
    let flag = json!([{"url": "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract", "valueBoolean": true}]);
    let questionnaire = json!({"resourceType": "Questionnaire", "status": "active", "extension": flag, "item": [
        {"linkId": "sex", "type": "choice", "code": loinc("76689-9"), "answerOption": [
            {"valueCoding": {"system": "http://snomed.info/sct", "code": "248152002", "display": "Female"}},
            {"valueCoding": {"system": "http://snomed.info/sct", "code": "248153007", "display": "Male"}}]},
        {"linkId": "pregnant", "type": "boolean", "code": loinc("82810-3"),
         "enableWhen": [{"question": "sex", "operator": "=",
                         "answerCoding": {"system": "http://snomed.info/sct", "code": "248152002"}}]}]});
    let response = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
        "identifier": {"system": "urn:example:responses", "value": "r-1"},
        "subject": {"reference": "Patient/p1"}, "authored": "2026-11-20T10:00:00Z",
        "item": [
            {"linkId": "sex", "answer": [{"valueCoding": {"system": "http://snomed.info/sct", "code": "248153007"}}]},
            {"linkId": "pregnant", "answer": [{"valueBoolean": true}]}]});
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "questionnaire-response", "resource": response},
        {"name": "questionnaire", "resource": questionnaire}]});
    let (status, answer, _) = super::post_extract(&app, params.to_string().as_bytes());
    assert_eq!(status, 200, "{answer}");
    let bundle = answer["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "return")
        .unwrap()["resource"]
        .clone();
    let codes: Vec<&str> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .map(|e| e["resource"]["code"]["coding"][0]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["76689-9"], "{bundle}");
    let issues = answer.to_string();
    assert!(
        issues.contains("item `pregnant` is disabled by its enableWhen"),
        "{issues}"
    );
    assert!(issues.contains("QuestionnaireResponse.item[1]"), "{issues}");
}
