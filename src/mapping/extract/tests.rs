//! Extraction and response submissions against hand-made and fixture forms.

use super::*;
use crate::mapping::questionnaire::{OBSERVATION_EXTRACT, QUESTIONNAIRE_UNIT};
use crate::mapping::response::{missing_answers, submission, Source};

const RECORDED: &str = "2026-11-27T08:00:00Z";

fn extract(q: &Value, qr: &Value) -> Result<Extraction, ExtractError> {
    super::extract(q, qr, RECORDED)
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/sdc/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The Bundle's entries of `resource_type`.
fn entries<'b>(bundle: &'b Value, resource_type: &str) -> Vec<&'b Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"]["resourceType"] == resource_type)
        .collect()
}

fn observations(bundle: &Value) -> Vec<&Value> {
    entries(bundle, "Observation")
        .into_iter()
        .map(|e| &e["resource"])
        .collect()
}

/// CSIRO's PHQ-2 sample: the Questionnaire's `false` reaches every item that says nothing;
/// an item's `true` reaches its children; an item's own `true` under a `false` parent turns
/// it on again.
#[test]
fn the_flag_is_inherited_and_false_turns_it_off_below() {
    let q = fixture("qObservationSampleWithExtractExtension.json");
    let qr = fixture("qrObservationSample.json");
    let out = extract(&q, &qr).unwrap();
    let ids: Vec<&str> = observations(&out.bundle)
        .iter()
        .map(|o| o["code"]["coding"][0]["code"].as_str().unwrap())
        .collect();
    // phq2-1, phq2-8 (inherits phq2-1's), phq2-4 (its own, under phq2-2's false), phq2-5
    // (its own); not phq2-2, phq2-6 (their own false), phq2-3 (the Questionnaire's false)
    // nor phq2-7 (phq2-3's) — the 4 CSIRO's own test expects.
    assert_eq!(ids.len(), 4, "{:#}", out.bundle);
    assert!(ids.iter().all(|c| *c == "28669007"));
    let first = observations(&out.bundle)[0];
    // As CSIRO's expected `obs-phq2-1`, field by field.
    assert_eq!(first["status"], "final");
    assert_eq!(first["subject"], json!({"reference": "Patient/123"}));
    assert_eq!(
        first["derivedFrom"],
        json!([{"reference": "QuestionnaireResponse/phq2-response"}])
    );
    assert_eq!(first["effectiveDateTime"], "2024-08-29T12:00:00Z");
    assert_eq!(first["issued"], "2024-08-29T12:00:00Z");
    assert_eq!(
        first["valueCodeableConcept"]["coding"],
        json!([{"code": "2", "display": "More than half the days"}])
    );
    assert_eq!(
        first["code"]["coding"],
        json!([{"system": "http://snomed.info/sct", "code": "28669007", "display": "Anhedonia"}])
    );
    // No identifier on the response: plain creates, and a warning that says why.
    assert!(entries(&out.bundle, "Observation")
        .iter()
        .all(|e| e["request"] == json!({"method": "POST", "url": "Observation"})));
    // Their Provenance: every one of them, from the response.
    let provenance = entries(&out.bundle, "Provenance");
    assert_eq!(provenance.len(), 1);
    assert_eq!(
        provenance[0]["request"],
        json!({"method": "POST", "url": "Provenance"})
    );
    let p = &provenance[0]["resource"];
    assert_eq!(p["recorded"], RECORDED);
    assert_eq!(
        p["entity"],
        json!([{"role": "source", "what": {"reference": "QuestionnaireResponse/phq2-response"}}])
    );
    let targets: Vec<&Value> = p["target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["reference"])
        .collect();
    let full_urls: Vec<&Value> = entries(&out.bundle, "Observation")
        .iter()
        .map(|e| &e["fullUrl"])
        .collect();
    assert_eq!(targets, full_urls);
    assert!(out.issues.iter().any(|i| i.code == "incomplete"));
    crate::fhir::validate::validate(&out.bundle).unwrap();
}

/// A child's weight is charted on the child an isSubject item names — and, when that
/// answer is missing or not a reference, on nobody: left out, with the group named.
#[test]
fn a_group_about_another_subject_is_charted_on_it_or_not_at_all() {
    let weight = json!([{"system": "http://loinc.org", "code": "29463-7"}]);
    let q = json!({"resourceType": "Questionnaire", "extension": flag(json!(true)), "item": [
        {"linkId": "mother-weight", "type": "decimal", "code": weight},
        {"linkId": "child", "type": "group", "repeats": true, "item": [
            {"linkId": "child-ref", "type": "reference", "extension": [{
                "url": IS_SUBJECT, "valueBoolean": true}]},
            {"linkId": "child-weight", "type": "decimal", "code": weight}]}]});
    let child = |who: Value| {
        let mut items = vec![json!({"linkId": "child-weight", "answer": [{"valueDecimal": 4.1}]})];
        if !who.is_null() {
            items.insert(0, json!({"linkId": "child-ref", "answer": [who]}));
        }
        json!({"linkId": "child", "item": items})
    };
    let qr = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
        "subject": {"reference": "Patient/mother"}, "item": [
            {"linkId": "mother-weight", "answer": [{"valueDecimal": 70}]},
            child(json!({"valueReference": {"reference": "Patient/baby"}})),
            child(Value::Null),
            child(json!({"valueString": "Bolade"}))]});
    let fit = fit::check(&q, &qr);
    // The third child's subject answered as text is a refusal of its own (wrong type);
    // without it, the second child still has none.
    assert_eq!(fit.refusals.len(), 1);
    let mut qr = qr;
    qr["item"].as_array_mut().unwrap().pop();
    let out = extract(&q, &qr).unwrap();
    let subjects: Vec<&Value> = out.bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .map(|e| &e["resource"]["subject"]["reference"])
        .collect();
    assert_eq!(subjects, [&json!("Patient/mother"), &json!("Patient/baby")]);
    let named: Vec<&Issue> = out
        .issues
        .iter()
        .filter(|i| i.diagnostics.contains("group `child`"))
        .collect();
    assert_eq!(named.len(), 1, "{:?}", out.issues);
    assert_eq!(named[0].expression, ["QuestionnaireResponse.item[2]"]);
}

fn flag(on: Value) -> Value {
    let key = if on.is_boolean() {
        "valueBoolean"
    } else {
        "valueCode"
    };
    json!([{"url": OBSERVATION_EXTRACT, key: on}])
}

/// SDC 4.0 `member` and `derived`: a panel's Observation lists its members in `hasMember`
/// (a group with members and no components still makes one); a derived answer's Observation
/// is `derivedFrom` its parent's and the response; with no parent Observation, a member is
/// extracted on its own, with a warning.
#[test]
fn members_and_derived_observations_are_linked_to_their_parents() {
    let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
    let q = json!({
        "resourceType": "Questionnaire", "status": "active",
        "item": [
            {"linkId": "panel", "type": "group", "code": loinc("85353-1"),
             "extension": flag(json!(true)), "item": [
                {"linkId": "weight", "type": "decimal", "code": loinc("29463-7"),
                 "extension": flag(json!("member"))},
                {"linkId": "height", "type": "decimal", "code": loinc("8302-2"),
                 "extension": flag(json!("member"))},
                {"linkId": "bmi", "type": "decimal", "code": loinc("39156-5"),
                 "extension": flag(json!("derived"))}]},
            {"linkId": "lone", "type": "group", "item": [
                {"linkId": "pulse", "type": "integer", "code": loinc("8867-4"),
                 "extension": flag(json!("member"))}]}]
    });
    let qr = json!({
        "resourceType": "QuestionnaireResponse", "status": "completed",
        "identifier": {"system": "https://portal.example/qr", "value": "r-9"},
        "subject": {"reference": "Patient/p1"}, "authored": "2026-11-27T09:00:00Z",
        "item": [
            {"linkId": "panel", "item": [
                {"linkId": "weight", "answer": [{"valueDecimal": 70.5}]},
                {"linkId": "height", "answer": [{"valueDecimal": 1.75}]},
                {"linkId": "bmi", "answer": [{"valueDecimal": 23.0}]}]},
            {"linkId": "lone", "item": [
                {"linkId": "pulse", "answer": [{"valueInteger": 64}]}]}]
    });
    let out = extract(&q, &qr).unwrap();
    crate::fhir::validate::validate(&out.bundle).unwrap();
    let obs = entries(&out.bundle, "Observation");
    let url_of = |code: &str| {
        obs.iter()
            .find(|e| e["resource"]["code"]["coding"][0]["code"] == code)
            .map(|e| e["fullUrl"].as_str().unwrap().to_string())
            .unwrap()
    };
    let resource = |code: &str| {
        &obs.iter()
            .find(|e| e["resource"]["code"]["coding"][0]["code"] == code)
            .unwrap()["resource"]
    };
    assert_eq!(obs.len(), 5, "the panel, its three, and the pulse");
    let panel = resource("85353-1");
    assert_eq!(
        panel["hasMember"],
        json!([{"reference": url_of("29463-7")}, {"reference": url_of("8302-2")}])
    );
    assert!(panel.get("valueQuantity").is_none());
    // R4's order: hasMember before derivedFrom.
    let keys: Vec<&String> = panel.as_object().unwrap().keys().collect();
    let at = |k: &str| keys.iter().position(|x| *x == k).unwrap();
    assert!(at("hasMember") < at("derivedFrom"), "{keys:?}");
    assert_eq!(
        resource("39156-5")["derivedFrom"],
        json!([{"type": "QuestionnaireResponse",
                "identifier": {"system": "https://portal.example/qr", "value": "r-9"}},
               {"reference": url_of("85353-1")}])
    );
    assert!(resource("29463-7").get("hasMember").is_none());
    assert_eq!(
        resource("8867-4")["derivedFrom"].as_array().unwrap().len(),
        1
    );
    let warned: Vec<String> = out.issues.iter().map(|i| i.to_string()).collect();
    assert!(
        warned
            .iter()
            .any(|w| w.contains("`pulse` is marked `member`")),
        "{warned:?}"
    );
}

fn traps() -> (Value, Value) {
    let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
    let q = json!({
        "resourceType": "Questionnaire", "status": "active",
        "item": [
            {"linkId": "vitals", "type": "group", "extension": [
                {"url": OBSERVATION_EXTRACT, "valueBoolean": true},
                {"url": EXTRACT_CATEGORY, "valueCodeableConcept": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs"}]}}],
             "item": [
                {"linkId": "weight", "type": "decimal", "code": loinc("29463-7"),
                 "extension": [{"url": QUESTIONNAIRE_UNIT, "valueCoding": {
                    "system": "http://unitsofmeasure.org", "code": "kg", "display": "kg"}}]},
                {"linkId": "pulse", "type": "integer", "code": loinc("8867-4")},
                {"linkId": "bp", "type": "group", "code": loinc("85354-9"), "item": [
                    {"linkId": "systolic", "type": "integer", "code": loinc("8480-6"),
                     "extension": flag(json!("component"))}]}]},
            {"linkId": "smoker", "type": "boolean", "code": loinc("72166-2"),
             "extension": flag(json!(true))},
            {"linkId": "score", "type": "decimal", "code": loinc("44261-6"),
             "extension": [
                {"url": OBSERVATION_EXTRACT, "valueCode": "independent"},
                {"url": EXTRACT_CATEGORY, "valueCodeableConcept": {"text": "survey"}},
                {"url": EXTRACT_CATEGORY, "valueCodeableConcept": {"text": "mood"}}]},
            {"linkId": "symptoms", "type": "choice", "repeats": true,
             "extension": flag(json!(true)),
             "code": [{"system": "http://snomed.info/sct", "code": "418799008",
                       "extension": flag(json!(true))},
                      {"system": "http://example.org/local", "code": "sx"}]},
            {"linkId": "meds", "type": "group", "repeats": true, "item": [
                {"linkId": "med-start", "type": "date", "code": loinc("80276-9"),
                 "extension": flag(json!(true))}]},
            {"linkId": "note", "type": "string", "code": loinc("48767-8"),
             "extension": flag(json!(false))},
            {"linkId": "photo", "type": "attachment", "code": loinc("72170-4"),
             "extension": flag(json!(true))},
            {"linkId": "unanswered", "type": "integer", "code": loinc("8310-5"),
             "extension": flag(json!(true))},
            {"linkId": "orphan", "type": "integer", "code": loinc("8462-4"),
             "extension": flag(json!("component"))},
            {"linkId": "drinks", "type": "choice", "repeats": true, "item": [
                {"linkId": "per-week", "type": "integer", "code": loinc("11287-0"),
                 "extension": flag(json!(true))}]}
        ]
    });
    let qr = json!({
        "resourceType": "QuestionnaireResponse", "id": "qr-1", "status": "amended",
        "identifier": {"system": "https://forms.example.org/responses", "value": "r-7"},
        "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
        "author": {"reference": "Practitioner/dr"}, "authored": "2026-11-20",
        "basedOn": [{"reference": "ServiceRequest/s1"}],
        "partOf": [{"reference": "Observation/o9"}, {"reference": "Procedure/x1"}],
        "item": [
            {"linkId": "vitals", "item": [
                {"linkId": "weight", "answer": [{"valueDecimal": 72.50}]},
                {"linkId": "pulse", "answer": [{"valueInteger": 0}]},
                {"linkId": "bp", "item": [
                    {"linkId": "systolic", "answer": [{"valueInteger": 120}]}]}]},
            {"linkId": "smoker", "answer": [{"valueBoolean": false}]},
            {"linkId": "score", "answer": [{"valueDecimal": 7}]},
            {"linkId": "symptoms", "answer": [
                {"valueCoding": {"system": "http://snomed.info/sct", "code": "25064002",
                                 "display": "Headache"}},
                {"valueCoding": {"system": "http://snomed.info/sct", "code": "422587007",
                                 "display": "Nausea"}}]},
            {"linkId": "meds", "item": [
                {"linkId": "med-start", "answer": [{"valueDate": "2026-10-01"}]}]},
            {"linkId": "meds", "item": [
                {"linkId": "med-start", "answer": [{"valueDate": "2026-11-01"}]}]},
            {"linkId": "note", "answer": [{"valueString": "Ünïcode ok"}]},
            {"linkId": "photo", "answer": [{"valueAttachment": {"contentType": "image/png"}}]},
            {"linkId": "unanswered"},
            {"linkId": "orphan", "answer": [{"valueInteger": 80}]},
            {"linkId": "drinks", "answer": [
                {"valueCoding": {"code": "beer"}, "item": [
                    {"linkId": "per-week", "answer": [{"valueInteger": 3}]}]},
                {"valueCoding": {"code": "wine"}, "item": [
                    {"linkId": "per-week", "answer": [{"valueInteger": 2}]}]}]}
        ]
    });
    (q, qr)
}

fn by_code<'b>(bundle: &'b Value, code: &str) -> Vec<&'b Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["code"]["coding"][0]["code"] == code)
        .collect()
}

/// The traps peer engines fall into (notes/sdc-extraction.md), each answered.
#[test]
fn false_zero_decimals_units_and_every_answer_are_extracted() {
    let (q, qr) = traps();
    let out = extract(&q, &qr).unwrap();
    let b = &out.bundle;
    crate::fhir::validate::validate(b).unwrap();
    let weight = &by_code(b, "29463-7")[0]["resource"];
    // A number stays a number; the unit makes it a Quantity; the group's category applies.
    assert_eq!(
        weight["valueQuantity"],
        json!({"value": 72.50, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"})
    );
    assert_eq!(weight["category"][0]["coding"][0]["code"], "vital-signs");
    assert_eq!(
        by_code(b, "8867-4")[0]["resource"]["valueInteger"],
        json!(0)
    );
    assert_eq!(
        by_code(b, "72166-2")[0]["resource"]["valueBoolean"],
        json!(false)
    );
    assert!(by_code(b, "72166-2")[0]["resource"]
        .get("category")
        .is_none());
    // Every category the item names.
    assert_eq!(
        by_code(b, "44261-6")[0]["resource"]["category"],
        json!([{"text": "survey"}, {"text": "mood"}])
    );
    // A decimal without a unit: R4 has no valueDecimal.
    assert_eq!(
        by_code(b, "44261-6")[0]["resource"]["valueQuantity"],
        json!({"value": 7})
    );
    // Only the flagged Coding; each answer its own Observation.
    let symptoms = by_code(b, "418799008");
    assert_eq!(symptoms.len(), 2);
    assert_eq!(
        symptoms[0]["resource"]["code"]["coding"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(symptoms[0]["resource"]["code"]["coding"][0]
        .get("extension")
        .is_none());
    // A repeated group: one Observation per occurrence, dates as dateTimes.
    let starts = by_code(b, "80276-9");
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["resource"]["valueDateTime"], "2026-11-01");
    // A group of components: one panel, its value the components'.
    let bp = &by_code(b, "85354-9")[0]["resource"];
    assert_eq!(
        bp["component"],
        json!([{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueInteger": 120}])
    );
    assert_eq!(bp["category"][0]["coding"][0]["code"], "vital-signs");
    // Off, unanswered, a component (its own or without a parent Observation), an
    // attachment: none. (An answer to an item the Questionnaire has not is refused:
    // `fit`.)
    for code in ["48767-8", "8310-5", "8480-6", "8462-4", "72170-4"] {
        assert!(by_code(b, code).is_empty(), "{code}");
    }
    let codes: Vec<&str> = out.issues.iter().map(|i| i.code).collect();
    assert_eq!(codes, ["not-supported", "incomplete"], "{:?}", out.issues);
    // Under each of several answers: an Observation each.
    assert_eq!(by_code(b, "11287-0").len(), 2);
    assert_eq!(observations(b).len(), 11);
    // What every Observation takes from the response.
    let o = &starts[0]["resource"];
    assert_eq!(o["status"], "amended");
    assert_eq!(o["subject"]["reference"], "Patient/p1");
    assert_eq!(o["encounter"]["reference"], "Encounter/e1");
    assert_eq!(o["performer"], json!([{"reference": "Practitioner/dr"}]));
    assert_eq!(o["effectiveDateTime"], "2026-11-20");
    assert!(o.get("issued").is_none(), "a date is no instant");
    assert_eq!(o["basedOn"], json!([{"reference": "ServiceRequest/s1"}]));
    assert_eq!(o["partOf"], json!([{"reference": "Procedure/x1"}]));
    assert_eq!(
        o["derivedFrom"],
        json!([{"reference": "QuestionnaireResponse/qr-1"}])
    );
}

/// With the response's identifier every Observation has its own, written as a conditional
/// update: the same response extracted again (or amended) updates, never duplicates.
#[test]
fn an_identified_response_yields_conditional_updates_that_repeat_exactly() {
    let (q, qr) = traps();
    let out = extract(&q, &qr).unwrap();
    let again = extract(&q, &qr).unwrap();
    assert_eq!(out.bundle, again.bundle);
    let observed = entries(&out.bundle, "Observation");
    let mut values: Vec<&str> = observed
        .iter()
        .map(|e| e["resource"]["identifier"][0]["value"].as_str().unwrap())
        .collect();
    assert!(values.contains(&"r-7/meds[1]/med-start"));
    assert!(values.contains(&"r-7/symptoms#1"));
    assert!(values.contains(&"r-7/drinks#1/per-week"));
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), observed.len(), "identifiers are unique");
    for e in observed {
        assert_eq!(e["request"]["method"], "PUT");
        let url = e["request"]["url"].as_str().unwrap();
        assert!(
            url.starts_with("Observation?identifier=https://forms.example.org/responses|r-7/"),
            "{url}"
        );
        assert!(!url.contains('#'), "encoded: {url}");
    }
    // One Provenance per response, tagged with its identifier, however often extracted.
    let provenance = entries(&out.bundle, "Provenance");
    assert_eq!(
        provenance[0]["request"],
        json!({"method": "PUT",
               "url": "Provenance?_tag=https://forms.example.org/responses|r-7"})
    );
    assert_eq!(
        provenance[0]["resource"]["meta"]["tag"],
        json!([{"system": "https://forms.example.org/responses", "code": "r-7"}])
    );
}

#[test]
fn nothing_to_extract_is_a_warning_and_wrong_resources_are_refused() {
    let q = json!({"resourceType": "Questionnaire", "item": [{"linkId": "a", "type": "string"}]});
    let qr = json!({"resourceType": "QuestionnaireResponse", "item": [
        {"linkId": "a", "answer": [{"valueString": "x"}]}]});
    let out = extract(&q, &qr).unwrap();
    assert!(out.bundle.get("entry").is_none(), "{}", out.bundle);
    crate::fhir::validate::validate(&out.bundle).unwrap();
    assert!(out.issues.iter().any(|i| i.code == "not-found"));
    assert_eq!(
        extract(&qr, &qr).unwrap_err().to_string(),
        "expected a Questionnaire, got a QuestionnaireResponse"
    );
    assert!(extract(&q, &json!({"item": []})).is_err());
    let mut draft = qr.clone();
    draft["status"] = json!("entered-in-error");
    assert_eq!(
        extract(&q, &draft).unwrap_err(),
        ExtractError::EnteredInError
    );
    draft["status"] = json!("in-progress");
    draft["item"][0]["linkId"] = json!("b");
    let q = json!({"resourceType": "Questionnaire", "item": [{"linkId": "b", "type": "string",
        "code": [{"code": "c"}], "extension": flag(json!(true))}]});
    let out = extract(&q, &draft).unwrap();
    assert_eq!(observations(&out.bundle)[0]["status"], "preliminary");
    // About something an Observation cannot be about: no subject; an author that cannot
    // perform: no performer; a subject known only by identifier: kept.
    draft["subject"] = json!({"reference": "Practitioner/x"});
    draft["author"] = json!({"reference": "Device/d"});
    let obs = &extract(&q, &draft).unwrap().bundle["entry"][0]["resource"];
    assert!(
        obs.get("subject").is_none() && obs.get("performer").is_none(),
        "{obs}"
    );
    draft["subject"] = json!({"identifier": {"system": "urn:s", "value": "v"}});
    let out = extract(&q, &draft).unwrap();
    assert_eq!(
        observations(&out.bundle)[0]["subject"]["identifier"]["value"],
        "v"
    );
}

/// A response posted as a submission: the Patient and the response itself go with the
/// Observations, every reference inside the Bundle; what a submission needs is checked.
#[test]
fn a_response_as_a_submission_carries_its_patient_response_and_provenance() {
    let mapping = crate::mapping::load_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/mappings/glp1-intake-typeform.yaml"
    )))
    .unwrap();
    let source = Source {
        mapping: &mapping,
        payload_sha256: &"ab".repeat(32),
        received_at: RECORDED,
    };
    let (q, mut qr) = traps();
    qr["status"] = json!("completed");
    qr["subject"] = json!({"identifier": {"system": "https://crm.example/p", "value": "p-9"}});
    let out = submission(&q, &qr, source).unwrap();
    crate::fhir::validate::validate(&out.bundle).unwrap();
    assert_eq!(out.submission_id, "r-7");
    assert_eq!(out.patient, ("https://crm.example/p".into(), "p-9".into()));
    let types: Vec<&str> = out.bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"Patient"));
    assert_eq!(types[1], "QuestionnaireResponse");
    assert_eq!(types.last(), Some(&"Provenance"));
    let patient = entries(&out.bundle, "Patient")[0];
    let response = entries(&out.bundle, "QuestionnaireResponse")[0];
    assert_eq!(
        patient["request"]["ifNoneExist"],
        "identifier=https://crm.example/p|p-9"
    );
    assert_eq!(
        response["request"]["ifNoneExist"],
        "identifier=https://forms.example.org/responses|r-7"
    );
    assert!(response["resource"].get("id").is_none());
    assert_eq!(
        response["resource"]["subject"]["reference"],
        patient["fullUrl"]
    );
    for o in observations(&out.bundle) {
        assert_eq!(o["subject"]["reference"], patient["fullUrl"]);
        assert_eq!(o["derivedFrom"][0]["reference"], response["fullUrl"]);
    }
    let provenance = &entries(&out.bundle, "Provenance")[0]["resource"];
    assert_eq!(
        provenance["target"].as_array().unwrap().len(),
        observations(&out.bundle).len() + 1
    );
    assert_eq!(provenance["meta"]["tag"][0]["code"], "r-7");
    // Every entry a conditional create: delivered resource by resource too, a retry matches
    // what the first attempt created.
    for e in out.bundle["entry"].as_array().unwrap() {
        assert_eq!(e["request"]["method"], "POST", "{e}");
        assert!(e["request"]["ifNoneExist"].is_string(), "{e}");
    }

    // What a submission needs.
    let mut bad = qr.clone();
    bad.as_object_mut().unwrap().remove("identifier");
    assert!(matches!(
        submission(&q, &bad, source),
        Err(ExtractError::Unidentified(_))
    ));
    let mut bad = qr.clone();
    bad["subject"] = json!({"reference": "Patient/p1"});
    assert!(matches!(
        submission(&q, &bad, source),
        Err(ExtractError::Unidentified(_))
    ));
    let mut bad = qr.clone();
    bad["status"] = json!("in-progress");
    assert_eq!(
        submission(&q, &bad, source).unwrap_err(),
        ExtractError::NotFinished
    );
}

#[test]
fn missing_answers_are_the_required_questions_of_the_sections_answered() {
    let q = json!({"resourceType": "Questionnaire", "item": [
        {"linkId": "name", "type": "string", "required": true},
        {"linkId": "note", "type": "string"},
        {"linkId": "intro", "type": "display", "required": true},
        {"linkId": "meds", "type": "group", "item": [
            {"linkId": "med", "type": "string", "required": true},
            {"linkId": "dose", "type": "string", "required": true}]},
        {"linkId": "skipped", "type": "group", "item": [
            {"linkId": "why", "type": "string", "required": true}]},
        {"linkId": "consent", "type": "group", "required": true, "item": [
            {"linkId": "agree", "type": "boolean", "required": true}]}]});
    let qr = json!({"resourceType": "QuestionnaireResponse", "item": [
        {"linkId": "meds", "item": [{"linkId": "med", "answer": [{"valueString": "x"}]}]},
        {"linkId": "consent", "item": [{"linkId": "agree", "answer": [{"valueBoolean": false}]}]}]});
    // `false` is an answer; the skipped optional section asks nothing.
    assert_eq!(missing_answers(&q, &qr), ["name", "dose"]);
}
