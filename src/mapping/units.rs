//! The UCUM units a mapping may name, and conversion between those of one dimension.
//!
//! A closed table, not a UCUM parser: each unit is checked at load, so a conversion that cannot
//! be done (`[lb_av]` → `cm`) is a mapping error, never a payload-time surprise.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Mass,
    Length,
    Pressure,
    Temperature,
    BodyMassIndex,
    Rate,
    Fraction,
    Score,
    Time,
}

struct Unit {
    code: &'static str,
    display: &'static str,
    dim: Dimension,
    /// value_in_base = value * factor + offset
    factor: f64,
    offset: f64,
}

const UNITS: &[Unit] = &[
    Unit {
        code: "kg",
        display: "kg",
        dim: Dimension::Mass,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "g",
        display: "g",
        dim: Dimension::Mass,
        factor: 0.001,
        offset: 0.0,
    },
    Unit {
        code: "[lb_av]",
        display: "lb",
        dim: Dimension::Mass,
        factor: 0.453_592_37,
        offset: 0.0,
    },
    Unit {
        code: "[oz_av]",
        display: "oz",
        dim: Dimension::Mass,
        factor: 0.028_349_523_125,
        offset: 0.0,
    },
    Unit {
        code: "m",
        display: "m",
        dim: Dimension::Length,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "cm",
        display: "cm",
        dim: Dimension::Length,
        factor: 0.01,
        offset: 0.0,
    },
    Unit {
        code: "mm",
        display: "mm",
        dim: Dimension::Length,
        factor: 0.001,
        offset: 0.0,
    },
    Unit {
        code: "[in_i]",
        display: "in",
        dim: Dimension::Length,
        factor: 0.0254,
        offset: 0.0,
    },
    Unit {
        code: "[ft_i]",
        display: "ft",
        dim: Dimension::Length,
        factor: 0.3048,
        offset: 0.0,
    },
    Unit {
        code: "mm[Hg]",
        display: "mmHg",
        dim: Dimension::Pressure,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "Cel",
        display: "°C",
        dim: Dimension::Temperature,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "[degF]",
        display: "°F",
        dim: Dimension::Temperature,
        factor: 5.0 / 9.0,
        offset: -32.0 * 5.0 / 9.0,
    },
    Unit {
        code: "kg/m2",
        display: "kg/m2",
        dim: Dimension::BodyMassIndex,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "/min",
        display: "/min",
        dim: Dimension::Rate,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "%",
        display: "%",
        dim: Dimension::Fraction,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "{score}",
        display: "{score}",
        dim: Dimension::Score,
        factor: 1.0,
        offset: 0.0,
    },
    Unit {
        code: "h",
        display: "h",
        dim: Dimension::Time,
        factor: 3600.0,
        offset: 0.0,
    },
    Unit {
        code: "min",
        display: "min",
        dim: Dimension::Time,
        factor: 60.0,
        offset: 0.0,
    },
    Unit {
        code: "d",
        display: "d",
        dim: Dimension::Time,
        factor: 86400.0,
        offset: 0.0,
    },
    Unit {
        code: "wk",
        display: "wk",
        dim: Dimension::Time,
        factor: 604_800.0,
        offset: 0.0,
    },
    Unit {
        code: "mg",
        display: "mg",
        dim: Dimension::Mass,
        factor: 1e-6,
        offset: 0.0,
    },
];

fn find(code: &str) -> Option<&'static Unit> {
    UNITS.iter().find(|u| u.code == code)
}

/// Whether `code` is a UCUM unit chartbridge knows.
pub fn is_known(code: &str) -> bool {
    find(code).is_some()
}

/// The human display of a known unit (`[lb_av]` → `lb`).
pub fn display(code: &str) -> &str {
    find(code).map(|u| u.display).unwrap_or(code)
}

pub fn dimension(code: &str) -> Option<Dimension> {
    find(code).map(|u| u.dim)
}

/// The units chartbridge knows, for error hints.
pub fn known_codes() -> String {
    UNITS.iter().map(|u| u.code).collect::<Vec<_>>().join(", ")
}

/// Why two units cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitError {
    Unknown(String),
    Incompatible { from: String, to: String },
}

impl std::fmt::Display for UnitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnitError::Unknown(u) => {
                write!(f, "unknown UCUM unit `{u}` (known: {})", known_codes())
            }
            UnitError::Incompatible { from, to } => {
                write!(
                    f,
                    "cannot convert `{from}` to `{to}`: they measure different things"
                )
            }
        }
    }
}

/// Checks that `from` converts to `to`.
/// How people write units in free text (`lbs`, `feet`, `"`), lower case → UCUM code: what a
/// pattern's `unit` capture is read as when the map's `units` does not name it.
#[rustfmt::skip]
const SPELLED: &[(&str, &str)] = &[
    ("kg", "kg"), ("kgs", "kg"), ("kilo", "kg"), ("kilos", "kg"), ("kilogram", "kg"),
    ("kilograms", "kg"), ("g", "g"), ("gram", "g"), ("grams", "g"),
    ("lb", "[lb_av]"), ("lbs", "[lb_av]"), ("pound", "[lb_av]"), ("pounds", "[lb_av]"),
    ("#", "[lb_av]"), ("oz", "[oz_av]"), ("ounce", "[oz_av]"), ("ounces", "[oz_av]"),
    ("m", "m"), ("meter", "m"), ("meters", "m"), ("metre", "m"), ("metres", "m"),
    ("cm", "cm"), ("centimeter", "cm"), ("centimeters", "cm"), ("centimetre", "cm"),
    ("centimetres", "cm"), ("mm", "mm"),
    ("in", "[in_i]"), ("inch", "[in_i]"), ("inches", "[in_i]"), ("\"", "[in_i]"),
    ("ft", "[ft_i]"), ("foot", "[ft_i]"), ("feet", "[ft_i]"), ("'", "[ft_i]"),
    ("mmhg", "mm[Hg]"), ("c", "Cel"), ("°c", "Cel"), ("celsius", "Cel"),
    ("f", "[degF]"), ("°f", "[degF]"), ("fahrenheit", "[degF]"),
    ("bpm", "/min"), ("/min", "/min"), ("%", "%"),
];

/// The UCUM code of a unit as written in free text (`lbs` → `[lb_av]`), if it is a common
/// spelling; case and surrounding whitespace do not matter.
pub fn spelled(text: &str) -> Option<&'static str> {
    let t = text.trim().to_lowercase();
    SPELLED.iter().find(|(s, _)| *s == t).map(|(_, code)| *code)
}

pub fn check(from: &str, to: &str) -> Result<(), UnitError> {
    let a = find(from).ok_or_else(|| UnitError::Unknown(from.to_string()))?;
    let b = find(to).ok_or_else(|| UnitError::Unknown(to.to_string()))?;
    if a.dim != b.dim {
        return Err(UnitError::Incompatible {
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    Ok(())
}

/// Converts `value` from `from` to `to` (both checked at load).
pub fn convert(value: f64, from: &str, to: &str) -> Result<f64, UnitError> {
    check(from, to)?;
    let (Some(a), Some(b)) = (find(from), find(to)) else {
        return Err(UnitError::Unknown(from.to_string()));
    };
    if a.code == b.code {
        return Ok(value);
    }
    let base = value * a.factor + a.offset;
    Ok((base - b.offset) / b.factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_within_a_dimension() {
        let kg = convert(212.0, "[lb_av]", "kg").unwrap();
        assert!((kg - 96.161_582_44).abs() < 1e-6);
        let cm = convert(66.0, "[in_i]", "cm").unwrap();
        assert!((cm - 167.64).abs() < 1e-9);
        let c = convert(98.6, "[degF]", "Cel").unwrap();
        assert!((c - 37.0).abs() < 1e-9);
        assert_eq!(convert(5.0, "kg", "kg").unwrap(), 5.0);
    }

    #[test]
    fn refuses_what_cannot_be_converted() {
        assert!(matches!(
            check("[lb_av]", "cm"),
            Err(UnitError::Incompatible { .. })
        ));
        assert!(matches!(check("stone", "kg"), Err(UnitError::Unknown(_))));
    }
}
