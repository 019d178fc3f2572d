//! A revision of a submission, as FHIR: the transaction Bundle a later payload of the same
//! submission maps to, turned into one that amends what the earlier revision's Bundle wrote.
//!
//! - The QuestionnaireResponse and each Observation become conditional updates
//!   (`PUT Type?identifier=…`) on the identifiers they already carry: the EHR gets a new
//!   version of the same resource, never a second one. Those the earlier Bundle held too are
//!   `amended`; an answer new in this revision keeps its status (`final`).
//! - An Observation the earlier Bundle held and this one does not (an answer taken back) is
//!   written again as it was, `entered-in-error` — retracted, not deleted.
//! - The Provenance is this revision's own (its tag names the submission and the revision),
//!   activity `UPDATE`, with the earlier payload's hash as its `revision` entity, and the
//!   retracted Observations among its targets.
//!
//! The Patient stays a conditional create. Without the earlier Bundle (past its retention)
//! every resource is amended and nothing can be retracted. Pure: bytes in, bytes out.

use std::collections::HashSet;

use serde_json::{json, Value};

/// Why a revision's Bundle could not be built (a Bundle that is not one: the store's or the
/// mapping's fault, never the client's).
#[derive(Debug, thiserror::Error)]
#[error("the {which} Bundle: {why}")]
pub struct RevisionError {
    which: &'static str,
    why: String,
}

/// The revision's Bundle and what it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Revision {
    pub bundle: Vec<u8>,
    /// Resources the earlier revision wrote that this one amends.
    pub amended: usize,
    /// Observations the earlier revision wrote that this one retracts.
    pub retracted: usize,
}

const AMENDED: &[&str] = &["QuestionnaireResponse", "Observation"];

/// `current` (a transaction Bundle of conditional creates, as mapped) as revision `number`
/// of the submission whose earlier revision's Bundle was `earlier` (`None`: no longer kept).
pub fn amend(
    earlier: Option<&[u8]>,
    current: &[u8],
    number: u32,
) -> Result<Revision, RevisionError> {
    let read = |which, bytes: &[u8]| {
        serde_json::from_slice::<Value>(bytes).map_err(|e| RevisionError {
            which,
            why: e.to_string(),
        })
    };
    let mut bundle = read("revision's", current)?;
    let earlier = earlier.map(|b| read("earlier revision's", b)).transpose()?;
    let earlier_entries: &[Value] = earlier
        .as_ref()
        .and_then(|b| b["entry"].as_array())
        .map_or(&[], Vec::as_slice);
    let condition = |entry: &Value| -> Option<(String, String)> {
        let kind = entry["resource"]["resourceType"].as_str()?;
        let condition = entry["request"]["ifNoneExist"].as_str()?;
        AMENDED
            .contains(&kind)
            .then(|| (kind.to_string(), condition.to_string()))
    };
    let before: HashSet<(String, String)> = earlier_entries.iter().filter_map(condition).collect();

    let Some(entries) = bundle["entry"].as_array_mut() else {
        return Err(RevisionError {
            which: "revision's",
            why: "it has no entries".into(),
        });
    };
    let mut now = HashSet::new();
    let mut amended = 0;
    for entry in entries.iter_mut() {
        let Some((kind, condition)) = condition(entry) else {
            continue;
        };
        entry["request"] = json!({"method": "PUT", "url": format!("{kind}?{condition}")});
        if earlier.is_none() || before.contains(&(kind.clone(), condition.clone())) {
            entry["resource"]["status"] = json!("amended");
            amended += 1;
        }
        now.insert((kind, condition));
    }

    // What the earlier revision wrote and this one no longer holds: retracted, as it was.
    let mut retractions = Vec::new();
    for entry in earlier_entries {
        let Some((kind, condition)) = condition(entry) else {
            continue;
        };
        if kind != "Observation" || now.contains(&(kind.clone(), condition.clone())) {
            continue;
        }
        let mut resource = entry["resource"].clone();
        resource["status"] = json!("entered-in-error");
        retractions.push(json!({
            "fullUrl": entry["fullUrl"],
            "resource": resource,
            "request": {"method": "PUT", "url": format!("{kind}?{condition}")},
        }));
    }
    // A retraction may only point at what the transaction holds (the earlier revision's
    // fullUrls are the same names — mapping, submission, item — as this one's).
    let urls: HashSet<&str> = entries
        .iter()
        .chain(&retractions)
        .filter_map(|e| e["fullUrl"].as_str())
        .collect();
    let resolved: Vec<bool> = retractions
        .iter()
        .map(|e| references_resolve(&e["resource"], &urls))
        .collect();
    let mut keep = resolved.into_iter();
    retractions.retain(|_| keep.next().unwrap_or(false));
    let retracted = retractions.len();

    let provenance = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == "Provenance");
    let earlier_provenance = earlier_entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Provenance");
    if let Some(p) = provenance {
        let entry = &mut entries[p];
        revise_provenance(
            entry,
            earlier_provenance.map(|e| &e["resource"]),
            &retractions,
            number,
        );
    }
    let at = provenance.unwrap_or(entries.len());
    entries.splice(at..at, retractions);

    let bundle = serde_json::to_vec(&bundle).map_err(|e| RevisionError {
        which: "revision's",
        why: e.to_string(),
    })?;
    Ok(Revision {
        bundle,
        amended,
        retracted,
    })
}

/// The revision's own Provenance: tagged (and matched) as this revision, activity `UPDATE`,
/// the earlier payload's hash as the `revision` entity, retracted resources among the targets.
fn revise_provenance(
    entry: &mut Value,
    earlier: Option<&Value>,
    retractions: &[Value],
    number: u32,
) {
    let suffix = format!("/revision-{number}");
    if let Some(condition) = entry["request"]["ifNoneExist"].as_str() {
        entry["request"]["ifNoneExist"] = json!(format!("{condition}{suffix}"));
    }
    let resource = &mut entry["resource"];
    if let Some(tags) = resource["meta"]["tag"].as_array_mut() {
        for tag in tags {
            if let Some(code) = tag["code"].as_str() {
                tag["code"] = json!(format!("{code}{suffix}"));
            }
        }
    }
    resource["activity"] = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
        "code": "UPDATE",
        "display": "revise"
    }]});
    if let Some(targets) = resource["target"].as_array_mut() {
        for r in retractions {
            targets.push(json!({"reference": r["fullUrl"], "type": "Observation"}));
        }
    }
    // The earlier payload, by its hash: what this revision revises.
    let earlier_payload = earlier
        .and_then(|p| p["entity"].as_array())
        .and_then(|entities| {
            entities.iter().find(|e| {
                e["role"] == "source" && e["what"]["identifier"]["system"] == "urn:ietf:rfc:3986"
            })
        });
    if let (Some(earlier), Some(entities)) = (earlier_payload, resource["entity"].as_array_mut()) {
        entities.push(json!({
            "role": "revision",
            "what": {
                "identifier": earlier["what"]["identifier"],
                "display": format!("revision {}: SHA-256 of its raw payload", number - 1),
            }
        }));
    }
}

/// Whether every `urn:uuid` reference in `value` names one of `urls`.
fn references_resolve(value: &Value, urls: &HashSet<&str>) -> bool {
    match value {
        Value::Object(members) => members.iter().all(|(name, v)| match (name.as_str(), v) {
            ("reference", Value::String(r)) if r.starts_with("urn:uuid:") => {
                urls.contains(r.as_str())
            }
            _ => references_resolve(v, urls),
        }),
        Value::Array(items) => items.iter().all(|v| references_resolve(v, urls)),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, url: &str, condition: &str, extra: Value) -> Value {
        let mut resource = json!({"resourceType": kind, "status": "final"});
        if let (Some(r), Some(extra)) = (resource.as_object_mut(), extra.as_object()) {
            r.extend(extra.clone());
        }
        json!({
            "fullUrl": url,
            "resource": resource,
            "request": {"method": "POST", "url": kind, "ifNoneExist": condition},
        })
    }

    fn bundle(entries: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        )
        .unwrap()
    }

    fn provenance(payload: &str) -> Value {
        let mut p = entry(
            "Provenance",
            "urn:uuid:p",
            "_tag=s|sub-1",
            json!({
                "meta": {"tag": [{"system": "s", "code": "sub-1"}]},
                "target": [{"reference": "urn:uuid:qr"}],
                "entity": [{"role": "source", "what": {"identifier":
                    {"system": "urn:ietf:rfc:3986", "value": payload}}}],
            }),
        );
        p["resource"].as_object_mut().unwrap().remove("status");
        p
    }

    fn observation(item: &str) -> Value {
        entry(
            "Observation",
            &format!("urn:uuid:{item}"),
            &format!("identifier=s|sub-1/{item}"),
            json!({"subject": {"reference": "urn:uuid:pt"},
                   "derivedFrom": [{"reference": "urn:uuid:qr"}]}),
        )
    }

    #[test]
    fn a_revision_amends_adds_and_retracts() {
        let patient = entry("Patient", "urn:uuid:pt", "identifier=crm|7", json!({}));
        let qr = entry(
            "QuestionnaireResponse",
            "urn:uuid:qr",
            "identifier=s|sub-1",
            json!({}),
        );
        let earlier = bundle(vec![
            patient.clone(),
            qr.clone(),
            observation("weight"),
            observation("smoker"),
            provenance("ni:///sha-256;first"),
        ]);
        let current = bundle(vec![
            patient,
            qr,
            observation("weight"),
            observation("height"),
            provenance("ni:///sha-256;second"),
        ]);
        let revision = amend(Some(&earlier), &current, 2).unwrap();
        assert_eq!((revision.amended, revision.retracted), (2, 1));
        let b: Value = serde_json::from_slice(&revision.bundle).unwrap();
        let summary: Vec<(String, String, String)> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["request"]["method"].as_str().unwrap().to_string(),
                    e["request"]["url"].as_str().unwrap().to_string(),
                    e["resource"]["status"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect();
        let s = |m: &str, u: &str, st: &str| (m.to_string(), u.to_string(), st.to_string());
        assert_eq!(
            summary,
            [
                s("POST", "Patient", "final"),
                s("PUT", "QuestionnaireResponse?identifier=s|sub-1", "amended"),
                s("PUT", "Observation?identifier=s|sub-1/weight", "amended"),
                s("PUT", "Observation?identifier=s|sub-1/height", "final"),
                s(
                    "PUT",
                    "Observation?identifier=s|sub-1/smoker",
                    "entered-in-error"
                ),
                s("POST", "Provenance", "-"),
            ]
        );
        let p = &b["entry"][5];
        assert_eq!(p["request"]["ifNoneExist"], "_tag=s|sub-1/revision-2");
        assert_eq!(p["resource"]["meta"]["tag"][0]["code"], "sub-1/revision-2");
        assert_eq!(p["resource"]["activity"]["coding"][0]["code"], "UPDATE");
        assert_eq!(p["resource"]["target"][1]["reference"], "urn:uuid:smoker");
        let entities = p["resource"]["entity"].as_array().unwrap();
        assert_eq!(
            entities[0]["what"]["identifier"]["value"],
            "ni:///sha-256;second"
        );
        assert_eq!(entities[1]["role"], "revision");
        assert_eq!(
            entities[1]["what"]["identifier"]["value"],
            "ni:///sha-256;first"
        );
    }

    #[test]
    fn without_the_earlier_bundle_everything_is_amended_and_nothing_retracted() {
        let current = bundle(vec![observation("weight"), provenance("ni:///sha-256;x")]);
        let revision = amend(None, &current, 3).unwrap();
        assert_eq!((revision.amended, revision.retracted), (1, 0));
        let b: Value = serde_json::from_slice(&revision.bundle).unwrap();
        assert_eq!(b["entry"][0]["resource"]["status"], "amended");
        assert_eq!(
            b["entry"][1]["resource"]["entity"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_retraction_pointing_outside_the_transaction_is_left_out() {
        let mut orphan = observation("bp");
        orphan["resource"]["hasMember"] = json!([{"reference": "urn:uuid:gone"}]);
        let earlier = bundle(vec![orphan, provenance("ni:///sha-256;a")]);
        let current = bundle(vec![provenance("ni:///sha-256;b")]);
        let revision = amend(Some(&earlier), &current, 2).unwrap();
        assert_eq!(revision.retracted, 0);
        assert!(amend(Some(b"{"), &current, 2).is_err());
    }
}
