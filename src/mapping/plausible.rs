//! Plausible ranges: what a value must lie within to be charted.
//!
//! A patient who skips the feet of a height, types a weight in the wrong box or mistypes a
//! digit produces a number the EHR would chart as a fact (a height of 15 cm, a BMI of 4,140).
//! Such a value is not charted: the item is listed as missing with the reason, and the CRM is
//! told to ask again (`implausible_value`). A map declares a range per item, in the item's
//! unit; the vital signs below have defaults, by the LOINC code the item charts, wide enough
//! for any patient (infants included) and narrow enough to catch a misread unit or a lost part.

use serde_json::Value;

use super::units;

/// The flag raised when a value was held back as implausible.
pub const IMPLAUSIBLE_VALUE: &str = "implausible_value";

/// The values an item may take, in its unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// The item's UCUM unit, for the reason given (none for a plain number).
    pub unit: Option<String>,
    /// Where the range comes from: `None` when the map declares it, else the vital sign whose
    /// default it is (`Body height`).
    pub default_for: Option<&'static str>,
}

impl Range {
    pub fn contains(&self, x: f64) -> bool {
        x.is_finite() && self.min.is_none_or(|m| x >= m) && self.max.is_none_or(|m| x <= m)
    }

    /// `30–272 cm`, `at least 0`, `at most 300 mm[Hg]`: the range, never the value.
    pub fn describe(&self) -> String {
        let unit = self
            .unit
            .as_deref()
            .map(|u| format!(" {}", units::display(u)))
            .unwrap_or_default();
        match (self.min, self.max) {
            (Some(a), Some(b)) => format!("{}–{}{unit}", short(a), short(b)),
            (Some(a), None) => format!("at least {}{unit}", short(a)),
            (None, Some(b)) => format!("at most {}{unit}", short(b)),
            (None, None) => "any value".to_string(),
        }
    }

    /// Why a value outside the range is not charted (the range, never the value).
    pub fn reason(&self) -> String {
        format!("implausible value: outside {}", self.describe())
    }
}

/// A number without trailing zeros (`272`, `0.3`).
pub(super) fn short(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A default range: the LOINC code, what it measures, bounds in `unit`.
struct Default {
    loinc: &'static str,
    name: &'static str,
    min: f64,
    max: f64,
    unit: &'static str,
}

/// Physiological limits, not normal ranges: a value outside them is a misreading.
#[rustfmt::skip]
const DEFAULTS: &[Default] = &[
    Default { loinc: "8302-2", name: "Body height", min: 30.0, max: 272.0, unit: "cm" },
    Default { loinc: "8306-3", name: "Body height (lying)", min: 30.0, max: 272.0, unit: "cm" },
    Default { loinc: "3137-7", name: "Body height (measured)", min: 30.0, max: 272.0, unit: "cm" },
    Default { loinc: "29463-7", name: "Body weight", min: 0.3, max: 650.0, unit: "kg" },
    Default { loinc: "3141-9", name: "Body weight (measured)", min: 0.3, max: 650.0, unit: "kg" },
    Default { loinc: "39156-5", name: "Body mass index", min: 8.0, max: 150.0, unit: "kg/m2" },
    Default { loinc: "8480-6", name: "Systolic blood pressure", min: 40.0, max: 300.0, unit: "mm[Hg]" },
    Default { loinc: "8462-4", name: "Diastolic blood pressure", min: 20.0, max: 200.0, unit: "mm[Hg]" },
    Default { loinc: "8867-4", name: "Heart rate", min: 20.0, max: 300.0, unit: "/min" },
    Default { loinc: "9279-1", name: "Respiratory rate", min: 4.0, max: 80.0, unit: "/min" },
    Default { loinc: "8310-5", name: "Body temperature", min: 25.0, max: 45.0, unit: "Cel" },
    Default { loinc: "2708-6", name: "Oxygen saturation", min: 50.0, max: 100.0, unit: "%" },
    Default { loinc: "59408-5", name: "Oxygen saturation (pulse oximetry)", min: 50.0, max: 100.0, unit: "%" },
    Default { loinc: "8287-5", name: "Head circumference", min: 20.0, max: 80.0, unit: "cm" },
    Default { loinc: "8280-0", name: "Waist circumference", min: 30.0, max: 300.0, unit: "cm" },
];

/// The default range of an item charted with one of `codes` (LOINC Codings), in `unit`; none
/// when no code is a vital sign the gateway knows, or the unit does not measure it.
pub fn default_range(codes: &[&Value], unit: Option<&str>) -> Option<Range> {
    let d = codes.iter().find_map(|c| {
        let system = c.get("system").and_then(Value::as_str)?;
        let code = c.get("code").and_then(Value::as_str)?;
        (system == crate::fhir::LOINC)
            .then(|| DEFAULTS.iter().find(|d| d.loinc == code))
            .flatten()
    })?;
    let to = unit.unwrap_or(d.unit);
    let min = units::convert(d.min, d.unit, to).ok()?;
    let max = units::convert(d.max, d.unit, to).ok()?;
    Some(Range {
        min: Some(min),
        max: Some(max),
        unit: Some(to.to_string()),
        default_for: Some(d.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vital_signs_have_defaults_in_the_items_unit() {
        let height = json!({"system": "http://loinc.org", "code": "8302-2"});
        let r = default_range(&[&height], Some("cm")).unwrap();
        assert!(r.contains(167.64) && !r.contains(15.24) && !r.contains(f64::NAN));
        assert_eq!(r.reason(), "implausible value: outside 30–272 cm");
        let inches = default_range(&[&height], Some("[in_i]")).unwrap();
        assert!(inches.contains(66.0) && !inches.contains(6.0));
        // A unit that does not measure a length, another system, an unknown code: none.
        assert_eq!(default_range(&[&height], Some("kg")), None);
        let other = json!({"system": "urn:x", "code": "8302-2"});
        assert_eq!(default_range(&[&other], Some("cm")), None);
        let unknown = json!({"system": "http://loinc.org", "code": "1-8"});
        assert_eq!(default_range(&[&unknown], Some("cm")), None);
        let temp = json!({"system": "http://loinc.org", "code": "8310-5"});
        let f = default_range(&[&temp], Some("[degF]")).unwrap();
        assert!(f.contains(98.6) && !f.contains(37.0));
    }
}
