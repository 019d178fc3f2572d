//! The fit checks on a small intake form: what fits, what is refused and where, what is left
//! out.

use serde_json::{json, Value};

use super::*;

/// A small intake form: sex, a pregnancy question enabled only for females, a decimal
/// weight in kg with bounds, a choice with two options, a note of at most 20 characters,
/// and a repeating group of medications.
fn form() -> Value {
    json!({"resourceType": "Questionnaire", "status": "active", "item": [
        {"linkId": "sex", "type": "choice", "required": true, "answerOption": [
            {"valueCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "female"}},
            {"valueCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "male"}}]},
        {"linkId": "pregnant", "type": "boolean", "required": true,
         "enableWhen": [{"question": "sex", "operator": "=",
                         "answerCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "female"}}]},
        {"linkId": "weight", "type": "decimal", "extension": [
            {"url": MIN_VALUE, "valueDecimal": 0.3}, {"url": MAX_VALUE, "valueDecimal": 650}]},
        {"linkId": "note", "type": "string", "maxLength": 20},
        {"linkId": "smoker", "type": "string", "answerConstraint": "optionsOnly",
         "answerOption": [{"valueString": "never"}, {"valueString": "former"}, {"valueString": "current"}]},
        {"linkId": "meds", "type": "group", "repeats": true, "item": [
            {"linkId": "med-name", "type": "string"}]}
    ]})
}

fn response(items: Value) -> Value {
    json!({"resourceType": "QuestionnaireResponse", "status": "completed", "item": items})
}

fn sex(code: &str) -> Value {
    json!({"linkId": "sex", "answer": [{"valueCoding": {
        "system": "http://hl7.org/fhir/administrative-gender", "code": code}}]})
}

/// The refusals' locations and texts.
fn refused(items: Value) -> Vec<(String, String)> {
    check(&form(), &response(items))
        .refusals
        .into_iter()
        .map(|i| (i.expression.join(" "), i.diagnostics))
        .collect()
}

#[test]
fn a_response_that_fits_is_neither_refused_nor_trimmed() {
    let fit = check(
        &form(),
        &response(json!([sex("female"),
            {"linkId": "pregnant", "answer": [{"valueBoolean": false}]},
            {"linkId": "weight", "answer": [{"valueDecimal": 81.2}]},
            {"linkId": "meds", "item": [{"linkId": "med-name", "answer": [{"valueString": "metformin"}]}]},
            {"linkId": "meds", "item": [{"linkId": "med-name", "answer": [{"valueString": "lisinopril"}]}]}])),
    );
    assert!(fit.refusals.is_empty(), "{:?}", fit.refusals);
    assert!(fit.left_out.is_empty(), "{:?}", fit.left_out);
}

/// The ways a response does not fit: each refused, named by linkId and FHIRPath.
#[test]
fn what_does_not_fit_is_refused_where_it_is() {
    let weight_as_text =
        refused(json!([{"linkId": "weight", "answer": [{"valueString": "81.2 kg"}]}]));
    assert_eq!(
        weight_as_text[0].0,
        "QuestionnaireResponse.item[0].answer[0]"
    );
    assert!(weight_as_text[0]
        .1
        .contains("item `weight`: a valueString answer to a decimal item"));

    let two_weights = refused(
        json!([{"linkId": "weight", "answer": [{"valueDecimal": 81.2}, {"valueDecimal": 90}]}]),
    );
    assert!(two_weights[0]
        .1
        .contains("item `weight` has 2 answers and does not repeat"));

    let other_version = refused(json!([{"linkId": "waist", "answer": [{"valueDecimal": 90}]}]));
    assert_eq!(other_version[0].0, "QuestionnaireResponse.item[0]");
    assert!(other_version[0]
        .1
        .contains("the Questionnaire has no such item"));

    let misplaced = refused(json!([{"linkId": "med-name", "answer": [{"valueString": "x"}]}]));
    assert!(misplaced[0]
        .1
        .contains("is not where the Questionnaire has it (under item `meds`)"));

    let twice = refused(json!([sex("male"), sex("male")]));
    assert!(twice[0].1.contains("item `sex` occurs 2 times"));

    let not_offered = refused(json!([sex("unknown")]));
    assert!(not_offered[0]
        .1
        .contains("not one of the 2 options the form offers"));
    let other_system = refused(
        json!([{"linkId": "sex", "answer": [{"valueCoding": {"system": "urn:x", "code": "male"}}]}]),
    );
    assert_eq!(other_system.len(), 1);

    let free_text = refused(json!([{"linkId": "smoker", "answer": [{"valueString": "socially"}]}]));
    assert!(free_text[0].1.contains("not one of the 3 options"));
    assert!(
        refused(json!([{"linkId": "smoker", "answer": [{"valueString": "former"}]}])).is_empty()
    );

    let long = refused(json!([{"linkId": "note", "answer": [{"valueString": "x".repeat(21)}]}]));
    assert!(long[0]
        .1
        .contains("an answer of 21 characters; maxLength is 20"));

    let wrong_json = refused(json!([{"linkId": "weight", "answer": [{"valueDecimal": "81.2"}]}]));
    assert!(wrong_json[0].1.contains("`valueDecimal` holds a string"));

    let group_answer = refused(json!([{"linkId": "meds", "answer": [{"valueString": "x"}]}]));
    assert!(group_answer[0].1.contains("is a group and takes no answer"));
}

/// An invalid Questionnaire is refused before any answer is read: duplicate linkIds
/// (que-2), members of the wrong JSON type.
#[test]
fn an_invalid_questionnaire_is_refused() {
    let mut q = form();
    q["item"][3]["linkId"] = json!("weight");
    q["item"][5]["repeats"] = json!("true");
    let fit = check(&q, &response(json!([])));
    let texts: Vec<&str> = fit
        .refusals
        .iter()
        .map(|i| i.diagnostics.as_str())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("two items with linkId `weight` (que-2")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("`repeats` must be a boolean")),
        "{texts:?}"
    );
    assert_eq!(fit.refusals[0].expression, ["Questionnaire.item[3].linkId"]);
}

/// An answer to a disabled item is left out (the rest stays); a number outside its bounds
/// too; a required question that is disabled is not missing.
#[test]
fn disabled_and_out_of_bounds_answers_are_left_out() {
    let r = response(json!([sex("male"),
        {"linkId": "pregnant", "answer": [{"valueBoolean": true}]},
        {"linkId": "weight", "answer": [{"valueDecimal": 2450}]}]));
    let fit = check(&form(), &r);
    assert!(fit.refusals.is_empty());
    assert_eq!(
        fit.left_out,
        [
            LeftOut {
                link_id: "pregnant".into(),
                at: "QuestionnaireResponse.item[1]".into(),
                why: Why::Disabled
            },
            LeftOut {
                link_id: "weight".into(),
                at: "QuestionnaireResponse.item[2].answer[0]".into(),
                why: Why::OutOfRange("0.3–650".into())
            }
        ]
    );
    assert!(fit.left_out[0]
        .issue()
        .diagnostics
        .contains("disabled by its enableWhen"));
    let disabled = disabled_items(&form(), &response(json!([sex("male")])));
    assert!(disabled.contains("pregnant"));
    assert!(disabled_items(&form(), &response(json!([sex("female")]))).is_empty());
    // Unanswered, the question its condition reads has no answer equal to `female`.
    assert!(disabled_items(&form(), &response(json!([]))).contains("pregnant"));
}

/// enableWhen operators, `enableBehavior`, and the nearest occurrence of the question in a
/// repeating group.
#[test]
fn enable_when_reads_the_nearest_answers() {
    let q = json!({"resourceType": "Questionnaire", "item": [
        {"linkId": "child", "type": "group", "repeats": true, "item": [
            {"linkId": "age", "type": "integer"},
            {"linkId": "school", "type": "string",
             "enableWhen": [{"question": "age", "operator": ">=", "answerInteger": 5},
                            {"question": "age", "operator": "exists", "answerBoolean": true}],
             "enableBehavior": "all"},
            {"linkId": "nap", "type": "boolean",
             "enableWhen": [{"question": "age", "operator": "<", "answerInteger": 5}]}]}]});
    let child = |age: i64, school: bool| {
        let mut items = vec![json!({"linkId": "age", "answer": [{"valueInteger": age}]})];
        if school {
            items.push(json!({"linkId": "school", "answer": [{"valueString": "Oak"}]}));
        } else {
            items.push(json!({"linkId": "nap", "answer": [{"valueBoolean": true}]}));
        }
        json!({"linkId": "child", "item": items})
    };
    let fit = check(&q, &response(json!([child(7, true), child(3, false)])));
    assert!(fit.left_out.is_empty(), "{:?}", fit.left_out);
    let fit = check(&q, &response(json!([child(3, true), child(7, false)])));
    let at: Vec<&str> = fit.left_out.iter().map(|l| l.at.as_str()).collect();
    assert_eq!(
        at,
        [
            "QuestionnaireResponse.item[0].item[1]",
            "QuestionnaireResponse.item[1].item[1]"
        ]
    );
}

#[test]
fn quantities_are_bounded_in_their_unit() {
    let q = json!({"resourceType": "Questionnaire", "item": [
        {"linkId": "height", "type": "quantity", "extension": [
            {"url": MIN_QUANTITY, "valueQuantity": {"value": 30, "code": "cm"}},
            {"url": MAX_QUANTITY, "valueQuantity": {"value": 272, "code": "cm"}}]}]});
    let height = |value: f64, code: &str| {
        response(
            json!([{"linkId": "height", "answer": [{"valueQuantity": {"value": value, "code": code}}]}]),
        )
    };
    assert!(check(&q, &height(180.0, "cm")).left_out.is_empty());
    assert!(
        check(&q, &height(71.0, "[in_i]")).left_out.is_empty(),
        "180 cm in inches"
    );
    assert_eq!(
        check(&q, &height(6.0, "[in_i]")).left_out[0].why,
        Why::OutOfRange("11.81–107.09 [in_i]".into())
    );
}
