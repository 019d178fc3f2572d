//! The FHIR `Questionnaire` a mapping defines. The QuestionnaireResponses it produces point at
//! `url|version` of exactly this resource, so definition and data cannot drift.

use serde_json::{json, Value};

use super::{Item, ItemType, Mapping};
use crate::fhir::UCUM;

const OBSERVATION_EXTRACT: &str =
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract";
const QUESTIONNAIRE_UNIT: &str = "http://hl7.org/fhir/StructureDefinition/questionnaire-unit";
const ITEM_WEIGHT: &str = "http://hl7.org/fhir/StructureDefinition/itemWeight";

impl Mapping {
    /// The Questionnaire resource.
    pub fn questionnaire(&self) -> Value {
        let mut q = json!({
            "resourceType": "Questionnaire",
            "id": fhir_id(&self.id),
            "url": self.url,
            "version": self.version,
            "name": computable_name(&self.id),
            "title": self.title,
            "status": "active",
            "subjectType": ["Patient"],
        });
        if let Some(d) = &self.description {
            q["description"] = json!(d);
        }
        q["item"] = Value::Array(self.items.iter().map(item).collect());
        q
    }
}

fn item(i: &Item) -> Value {
    let mut v = json!({"linkId": i.link_id});
    let obs_codes = i
        .observation
        .as_ref()
        .map(|o| o.codes.clone())
        .unwrap_or_default();
    let codes: Vec<Value> = if obs_codes.is_empty() {
        i.code.iter().cloned().collect()
    } else {
        obs_codes
    };
    if !codes.is_empty() {
        v["code"] = json!(codes);
    }
    if let Some(t) = &i.text {
        v["text"] = json!(t);
    }
    v["type"] = json!(i.item_type.fhir_code());
    if i.required {
        v["required"] = json!(true);
    }
    if i.repeats {
        v["repeats"] = json!(true);
    }
    if i.derive.is_some() {
        v["readOnly"] = json!(true);
    }
    let mut extensions = Vec::new();
    if i.observation.is_some() {
        extensions.push(json!({"url": OBSERVATION_EXTRACT, "valueBoolean": true}));
    }
    if i.item_type == ItemType::Quantity {
        if let Some(u) = &i.unit {
            extensions.push(json!({"url": QUESTIONNAIRE_UNIT, "valueCoding": {
                "system": UCUM, "code": u, "display": super::units::display(u)}}));
        }
    }
    if !extensions.is_empty() {
        v["extension"] = Value::Array(extensions);
    }
    if i.item_type == ItemType::Choice {
        let options: Vec<Value> = i
            .rule
            .map
            .iter()
            .flat_map(|m| m.codings())
            .map(|c| {
                let mut o = json!({"valueCoding": c.to_coding().to_value()});
                if let Some(s) = c.score {
                    o["extension"] = json!([{"url": ITEM_WEIGHT, "valueDecimal": s}]);
                }
                o
            })
            .fold(Vec::new(), |mut acc: Vec<Value>, o| {
                // Several vendor labels may map to one Coding: list it once.
                if !acc.iter().any(|x| x["valueCoding"] == o["valueCoding"]) {
                    acc.push(o);
                }
                acc
            });
        if !options.is_empty() {
            v["answerOption"] = Value::Array(options);
        }
    }
    if !i.children.is_empty() {
        v["item"] = Value::Array(i.children.iter().map(item).collect());
    }
    v
}

/// A FHIR id (`[A-Za-z0-9\-\.]{1,64}`) from a mapping id.
fn fhir_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

/// `glp1-intake-typeform` → `Glp1IntakeTypeform`.
fn computable_name(id: &str) -> String {
    id.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut cs = p.chars();
            cs.next()
                .map(|f| f.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect()
}
