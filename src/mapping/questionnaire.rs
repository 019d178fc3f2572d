//! The FHIR `Questionnaire` a mapping defines. The QuestionnaireResponses it produces point at
//! `url|version` of exactly this resource, so definition and data cannot drift.

use serde_json::{json, Value};

use super::plausible::Range;
use super::{Components, Item, ItemType, Mapping, ObservationRule, UnknownOption};
use crate::fhir::UCUM;

// The SDC extensions a Questionnaire says what is extracted with (`extract` reads them).
pub(super) const OBSERVATION_EXTRACT: &str =
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract";
pub(super) const EXTRACT_CATEGORY: &str =
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observation-extract-category";
pub(super) const QUESTIONNAIRE_UNIT: &str =
    "http://hl7.org/fhir/StructureDefinition/questionnaire-unit";
const ITEM_WEIGHT: &str = "http://hl7.org/fhir/StructureDefinition/itemWeight";
// The plausible range of an item, so that a FHIR-native form can hold the patient to it and
// the gateway can check a response against it (`MIN_VALUE` / `MAX_VALUE` for decimals and
// integers, SDC's for quantities).
pub(super) const MIN_VALUE: &str = "http://hl7.org/fhir/StructureDefinition/minValue";
pub(super) const MAX_VALUE: &str = "http://hl7.org/fhir/StructureDefinition/maxValue";
pub(super) const MIN_QUANTITY: &str =
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-minQuantity";
pub(super) const MAX_QUANTITY: &str =
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-maxQuantity";

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
        q["item"] = Value::Array(self.items.iter().map(|i| item(i, false)).collect());
        q
    }
}

/// An item; `component`: its answers are components of its parent's Observation (SDC 4.0
/// observation extraction says so with the code `component`).
fn item(i: &Item, component: bool) -> Value {
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
    // A choice that keeps options its map does not know (as text) is an open choice.
    let open = i.item_type == ItemType::Choice
        && i.rule.map.is_some()
        && i.rule.unknown_option == UnknownOption::Keep;
    v["type"] = json!(if open {
        "open-choice"
    } else {
        i.item_type.fhir_code()
    });
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
    // A free-text answer the mapping splits into components (`142/91`) has no SDC form: SDC
    // extraction would make the whole text the panel's value, so it is not marked.
    if let Some(o) = i
        .observation
        .as_ref()
        .filter(|o| !matches!(o.components, Components::Split { .. }))
    {
        extensions.push(json!({"url": OBSERVATION_EXTRACT, "valueBoolean": true}));
        for c in &o.categories {
            extensions.push(json!({"url": EXTRACT_CATEGORY, "valueCodeableConcept": c}));
        }
    } else if component {
        extensions.push(json!({"url": OBSERVATION_EXTRACT, "valueCode": "component"}));
    }
    if i.item_type == ItemType::Quantity {
        if let Some(u) = &i.unit {
            extensions.push(json!({"url": QUESTIONNAIRE_UNIT, "valueCoding": {
                "system": UCUM, "code": u, "display": super::units::display(u)}}));
        }
    }
    if let Some(r) = &i.range {
        extensions.extend(range_extensions(i, r));
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
        let components: &[String] = match &i.observation {
            Some(ObservationRule {
                components: Components::Children(ids),
                ..
            }) => ids,
            _ => &[],
        };
        v["item"] = Value::Array(
            i.children
                .iter()
                .map(|c| item(c, components.contains(&c.link_id)))
                .collect(),
        );
    }
    v
}

/// The bounds of an item's plausible range as the extensions a form reads.
fn range_extensions(i: &Item, r: &Range) -> Vec<Value> {
    let (min_url, max_url) = if i.item_type == ItemType::Quantity {
        (MIN_QUANTITY, MAX_QUANTITY)
    } else {
        (MIN_VALUE, MAX_VALUE)
    };
    [(min_url, r.min), (max_url, r.max)]
        .into_iter()
        .filter_map(|(url, x)| {
            let n = super::value::rounded(x?, 4)?;
            Some(match (i.item_type, &i.unit) {
                (ItemType::Quantity, Some(u)) => json!({"url": url, "valueQuantity": {
                    "value": n, "unit": super::units::display(u), "system": UCUM, "code": u}}),
                (ItemType::Integer, _) => json!({"url": url, "valueInteger": x?.round() as i64}),
                _ => json!({"url": url, "valueDecimal": n}),
            })
        })
        .collect()
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
