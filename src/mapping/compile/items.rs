//! Items: types, sources, composite sums and their parts, plausible ranges, derivations, the
//! Observations they declare, checked one by one.

use serde_json::Value;

use super::{At, Compiler, LinkInfo};
use crate::mapping::plausible::{self, Range};
use crate::mapping::spec::{self, ItemSpec};
use crate::mapping::units::{self};
use crate::mapping::{
    Components, Derivation, Item, ItemType, ObservationRule, Pattern, SplitPart, SumPart,
    UnknownOption,
};

impl Compiler<'_> {
    pub(super) fn items(&mut self, specs: Vec<ItemSpec>, parent: &str) -> Vec<Item> {
        specs
            .into_iter()
            .filter_map(|s| self.item(s, parent))
            .collect()
    }

    pub(super) fn item(&mut self, s: ItemSpec, parent: &str) -> Option<Item> {
        let line = self.find_line("link_id", &s.link_id);
        let path = if parent.is_empty() {
            s.link_id.clone()
        } else {
            format!("{parent}/{}", s.link_id)
        };
        let at = At {
            line,
            item: format!("item `{path}`"),
        };
        if s.link_id.is_empty() || s.link_id.chars().any(char::is_whitespace) {
            self.err(
                &at,
                "link_id",
                "`link_id` must be non-empty and without spaces",
                None,
            );
        }
        let Some(item_type) = ItemType::parse(&s.item_type) else {
            self.err(
                &at,
                "type",
                format!("unknown item type `{}`", s.item_type),
                Some(format!("one of {}", ItemType::NAMES)),
            );
            return None;
        };
        let unit = s.unit.clone();
        let scored = s
            .value
            .map
            .as_ref()
            .is_some_and(|m| m.values().any(|v| v.get("score").is_some()));
        let info = LinkInfo {
            item_type,
            line,
            unit: unit.clone(),
            scored,
        };
        if let Some(first) = self.link_ids.get(&s.link_id) {
            let msg = format!(
                "duplicate linkId `{}` (first at line {})",
                s.link_id, first.line
            );
            self.err(
                &at,
                "link_id",
                msg,
                Some("linkIds must be unique in the whole mapping".to_string()),
            );
        } else {
            self.link_ids.insert(s.link_id.clone(), info);
        }
        // Declared, even if a selector fails to compile (that error is reported on its own).
        let has_source = s.value.answer.is_some()
            || s.value.path.is_some()
            || s.value.default.is_some()
            || s.sum.is_some()
            || s.derive.is_some();
        let unknown_option_given = s.value.unknown_option.is_some();
        let mut rule = self.value_rule(&at, s.value, item_type);
        // An unexpected option beside the expected ones (an "Other" box's text, an option the
        // form's owner added) must not take a multi-select's other answers with it.
        if !unknown_option_given && item_type == ItemType::Choice && s.repeats {
            rule.unknown_option = UnknownOption::Keep;
        }
        let sum: Vec<SumPart> = s
            .sum
            .unwrap_or_default()
            .into_iter()
            .map(|p| self.sum_part(&at, p, rule.pattern.is_some()))
            .collect();
        if let Some(pattern) = &rule.pattern {
            self.pattern_captures(&at, pattern, &sum, item_type);
        }
        let derive = s.derive.as_deref().and_then(|d| self.derivation(&at, d));

        match item_type {
            ItemType::Group => {
                if s.items.is_empty() {
                    self.err(&at, "items", "a group needs `items`", None);
                }
                if s.repeats && rule.answer.is_none() && rule.path.is_none() {
                    self.err(&at, "repeats", "a repeating group needs `path` (or `answer`) selecting one element per repetition", None);
                }
                if !s.repeats && (rule.answer.is_some() || rule.path.is_some()) {
                    self.err(&at, "path", "only a repeating group selects elements; add `repeats: true` or move the selector to its items", None);
                }
            }
            _ => {
                if !s.items.is_empty() {
                    self.err(
                        &at,
                        "items",
                        format!("a {} item cannot have child items", item_type.fhir_code()),
                        Some("use `type: group`".to_string()),
                    );
                }
                if !has_source {
                    self.err(
                        &at,
                        "answer",
                        "the item has no source",
                        Some("give `answer`, `path`, `sum`, `derive` or `default`".to_string()),
                    );
                }
            }
        }
        if item_type == ItemType::Choice
            && rule
                .map
                .as_ref()
                .is_none_or(|m| m.codings().next().is_none())
            && derive.is_none()
        {
            self.err(
                &at,
                "type",
                "a choice item needs a value map to Codings (`map`)",
                Some("map each vendor label or option id to {system, code, display}".to_string()),
            );
        }
        match item_type {
            ItemType::Quantity => match &unit {
                None => self.err(&at, "type", "a quantity item needs `unit` (UCUM)", None),
                Some(u) if !units::is_known(u) => self.err(
                    &at,
                    "unit",
                    format!("unknown UCUM unit `{u}`"),
                    Some(format!("known: {}", units::known_codes())),
                ),
                Some(u) => {
                    if let Some(from) = &rule.from_unit {
                        if let Err(e) = units::check(from, u) {
                            self.err(&at, "from_unit", e.to_string(), None);
                        }
                    }
                    for part in &sum {
                        if let Err(e) = units::check(&part.unit, u) {
                            self.err(&at, "sum", e.to_string(), None);
                        }
                    }
                    for code in rule.pattern.iter().flat_map(|p| p.units.values()) {
                        if let Err(e) = units::check(code, u) {
                            self.err(&at, "units", e.to_string(), None);
                        }
                    }
                }
            },
            _ => {
                if unit.is_some() {
                    self.err(
                        &at,
                        "unit",
                        format!(
                            "`unit` applies to quantity items, not {}",
                            item_type.fhir_code()
                        ),
                        None,
                    );
                }
                if !sum.is_empty() {
                    self.err(
                        &at,
                        "sum",
                        "`sum` builds a quantity: use `type: quantity`",
                        None,
                    );
                }
            }
        }
        let code = s.code.as_ref().and_then(|c| self.coding(&at, "code", c));
        let required_when = s
            .required_when
            .and_then(|c| self.condition(&at, "required_when", c));
        let children = self.items(s.items, &path);
        let observation = s
            .observation
            .and_then(|o| self.observation(&at, o, item_type, &code, &children, unit.as_deref()));
        let range = self.range(
            &at,
            s.range,
            item_type,
            unit.as_deref(),
            &observation,
            &code,
        );
        Some(Item {
            link_id: s.link_id,
            text: s.text,
            item_type,
            repeats: s.repeats,
            required: s.required,
            required_when,
            line,
            rule,
            sum,
            derive,
            unit,
            precision: s.precision,
            range,
            code,
            observation,
            children,
        })
    }

    /// One `sum` part: an answer of its own, or (with the item's `pattern`) a named capture.
    pub(super) fn sum_part(
        &mut self,
        at: &At,
        p: spec::SumPartSpec,
        item_has_pattern: bool,
    ) -> SumPart {
        match (&p.capture, item_has_pattern) {
            (Some(_), false) => self.err(
                at,
                "capture",
                "a `sum` part with `capture` reads the item's `pattern`: give the item one",
                None,
            ),
            (None, true) => self.err(
                at,
                "sum",
                "with a `pattern`, each `sum` part names the capture it reads (`capture: ft`)",
                None,
            ),
            (Some(_), true) if p.value.answer.is_some() || p.value.path.is_some() => self.err(
                at,
                "capture",
                "a part reads a capture or an answer of its own, not both",
                None,
            ),
            _ => {}
        }
        let rule = self.value_rule(at, p.value, ItemType::Quantity);
        if p.capture.is_none() && rule.answer.is_none() && rule.path.is_none() {
            self.err(
                at,
                "sum",
                "a `sum` part needs `answer`, `path` or `capture`",
                None,
            );
        }
        if !units::is_known(&p.unit) {
            self.err(
                at,
                "sum",
                format!("unknown UCUM unit `{}`", p.unit),
                Some(format!("known: {}", units::known_codes())),
            );
        }
        SumPart {
            rule,
            capture: p.capture,
            unit: p.unit,
        }
    }

    /// The captures a pattern names fit what reads them: with `sum`, each capture is a part's
    /// and each part's capture is in some alternative; without, each alternative has `value`
    /// (and `unit` only for a quantity).
    pub(super) fn pattern_captures(
        &mut self,
        at: &At,
        pattern: &Pattern,
        sum: &[SumPart],
        ty: ItemType,
    ) {
        let used: Vec<&str> = sum.iter().filter_map(|p| p.capture.as_deref()).collect();
        for (i, re) in pattern.alternatives.iter().enumerate() {
            let which = if pattern.alternatives.len() > 1 {
                format!("pattern {}", i + 1)
            } else {
                "`pattern`".to_string()
            };
            let names: Vec<&str> = re.capture_names().flatten().collect();
            for name in &names {
                let ok = if sum.is_empty() {
                    *name == "value" || (*name == "unit" && ty == ItemType::Quantity)
                } else {
                    used.contains(name)
                };
                if !ok {
                    let hint = if sum.is_empty() {
                        "name the number `value` (and, in a quantity, its unit `unit`)"
                    } else {
                        "each capture is read by a `sum` part (`{capture: <name>, unit: …}`)"
                    };
                    self.err(
                        at,
                        "pattern",
                        format!("{which} names a capture `{name}` that nothing uses"),
                        Some(hint.to_string()),
                    );
                }
            }
            if sum.is_empty() && !names.contains(&"value") {
                self.err(
                    at,
                    "pattern",
                    format!("{which} has no capture `value` (the number)"),
                    None,
                );
            }
            if !sum.is_empty() && !names.iter().any(|n| used.contains(n)) {
                self.err(
                    at,
                    "pattern",
                    format!("{which} captures no part of the `sum`"),
                    None,
                );
            }
        }
        for name in &used {
            if !pattern
                .alternatives
                .iter()
                .any(|re| re.capture_names().flatten().any(|n| n == *name))
            {
                self.err(
                    at,
                    "sum",
                    format!("part `{name}` reads a capture that no pattern has"),
                    None,
                );
            }
        }
    }

    /// The item's plausible range: declared (`range`), else the default of the vital sign its
    /// Observation (or, as a component, its code) charts.
    pub(super) fn range(
        &mut self,
        at: &At,
        declared: Option<spec::RangeSpec>,
        ty: ItemType,
        unit: Option<&str>,
        observation: &Option<ObservationRule>,
        code: &Option<Value>,
    ) -> Option<Range> {
        let numeric = matches!(
            ty,
            ItemType::Decimal | ItemType::Integer | ItemType::Quantity
        );
        if let Some(r) = declared {
            return self.declared_range(at, r, numeric, unit);
        }
        if !numeric {
            return None;
        }
        let codes: Vec<&Value> = match observation {
            Some(o) if !o.codes.is_empty() => o.codes.iter().collect(),
            _ => code.iter().collect(),
        };
        plausible::default_range(&codes, unit)
    }

    pub(super) fn declared_range(
        &mut self,
        at: &At,
        r: spec::RangeSpec,
        numeric: bool,
        unit: Option<&str>,
    ) -> Option<Range> {
        if !numeric {
            self.err(
                at,
                "range",
                "`range` applies to decimal, integer and quantity items",
                None,
            );
            return None;
        }
        let ok = match (r.min, r.max) {
            (None, None) => false,
            (Some(a), Some(b)) => a.is_finite() && b.is_finite() && a <= b,
            (Some(x), None) | (None, Some(x)) => x.is_finite(),
        };
        if !ok {
            self.err(
                at,
                "range",
                "`range` needs `min`, `max` or both, with min ≤ max",
                Some("in the item's unit, e.g. {min: 30, max: 272} for a height in cm".to_string()),
            );
            return None;
        }
        Some(Range {
            min: r.min,
            max: r.max,
            unit: unit.map(str::to_string),
            default_for: None,
        })
    }

    pub(super) fn derivation(&mut self, at: &At, d: &str) -> Option<Derivation> {
        let parsed = d
            .trim()
            .strip_suffix(')')
            .and_then(|d| d.split_once('('))
            .map(|(name, args)| {
                let args: Vec<String> = args
                    .split(',')
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect();
                (name.trim().to_string(), args)
            });
        let hint =
            Some("one of bmi(weight, height), sum_scores(item, …), sum(item, …)".to_string());
        match parsed {
            Some((name, args)) if name == "bmi" && args.len() == 2 => Some(Derivation::Bmi {
                weight: args[0].clone(),
                height: args[1].clone(),
            }),
            Some((name, args)) if name == "sum_scores" && !args.is_empty() => {
                Some(Derivation::SumScores(args))
            }
            Some((name, args)) if name == "sum" && !args.is_empty() => Some(Derivation::Sum(args)),
            _ => {
                self.err(at, "derive", format!("unknown derivation `{d}`"), hint);
                None
            }
        }
    }

    pub(super) fn observation(
        &mut self,
        at: &At,
        o: spec::ObservationSpec,
        item_type: ItemType,
        item_code: &Option<Value>,
        children: &[Item],
        _unit: Option<&str>,
    ) -> Option<ObservationRule> {
        let codes = match &o.code {
            Some(Value::Array(list)) if !list.is_empty() => list
                .iter()
                .filter_map(|c| self.coding(at, "code", c))
                .collect(),
            Some(c) => self.coding(at, "code", c).into_iter().collect(),
            None => item_code.iter().cloned().collect::<Vec<_>>(),
        };
        if codes.is_empty() && o.code.is_none() {
            self.err(
                at,
                "observation",
                "an Observation needs a code",
                Some(
                    "give `observation.code` or the item's `code` (a LOINC or SNOMED Coding)"
                        .to_string(),
                ),
            );
        }
        let categories = match &o.category {
            None => Vec::new(),
            Some(Value::Array(list)) => list.iter().filter_map(|c| self.category(at, c)).collect(),
            Some(c) => self.category(at, c).into_iter().collect(),
        };
        let components = match (o.components, o.split_components) {
            (Some(_), Some(_)) => {
                self.err(
                    at,
                    "components",
                    "give `components` or `split_components`, not both",
                    None,
                );
                Components::None
            }
            (Some(ids), None) => {
                if item_type != ItemType::Group {
                    self.err(
                        at,
                        "components",
                        "`components` lists children of a group",
                        None,
                    );
                }
                for id in &ids {
                    match children.iter().find(|c| &c.link_id == id) {
                        None => self.err(
                            at,
                            "components",
                            format!("component `{id}` is not a child item of this group"),
                            None,
                        ),
                        Some(c) if c.code.is_none() => self.err(
                            at,
                            "components",
                            format!("component `{id}` needs a `code`"),
                            Some("e.g. {system: http://loinc.org, code: 8480-6}".to_string()),
                        ),
                        Some(_) => {}
                    }
                }
                Components::Children(ids)
            }
            (None, Some(split)) => {
                if !matches!(item_type, ItemType::String | ItemType::Text) {
                    self.err(
                        at,
                        "split_components",
                        "`split_components` reads a free-text answer: use `type: string`",
                        None,
                    );
                }
                if split.separator.is_empty() || split.parts.is_empty() {
                    self.err(
                        at,
                        "split_components",
                        "`split_components` needs a separator and parts",
                        None,
                    );
                }
                let parts = split
                    .parts
                    .into_iter()
                    .filter_map(|p| {
                        if !units::is_known(&p.unit) {
                            self.err(
                                at,
                                "split_components",
                                format!("unknown UCUM unit `{}`", p.unit),
                                None,
                            );
                        }
                        let code = self.coding(at, "split_components", &p.code)?;
                        let range = match p.range {
                            Some(r) => self.declared_range(at, r, true, Some(&p.unit)),
                            None => plausible::default_range(&[&code], Some(&p.unit)),
                        };
                        Some(SplitPart {
                            code,
                            unit: p.unit,
                            range,
                        })
                    })
                    .collect();
                Components::Split {
                    separator: split.separator,
                    parts,
                }
            }
            (None, None) => {
                if item_type == ItemType::Group {
                    self.err(
                        at,
                        "observation",
                        "an Observation on a group needs `components`",
                        Some("or put the observation on the child items".to_string()),
                    );
                }
                Components::None
            }
        };
        Some(ObservationRule {
            codes,
            categories,
            components,
        })
    }

    pub(super) fn category(&mut self, at: &At, c: &Value) -> Option<Value> {
        const KNOWN: [(&str, &str); 9] = [
            ("social-history", "Social History"),
            ("vital-signs", "Vital Signs"),
            ("imaging", "Imaging"),
            ("laboratory", "Laboratory"),
            ("procedure", "Procedure"),
            ("survey", "Survey"),
            ("exam", "Exam"),
            ("therapy", "Therapy"),
            ("activity", "Activity"),
        ];
        match c {
            Value::String(s) => match KNOWN.iter().find(|(k, _)| k == s) {
                Some((code, display)) => Some(serde_json::json!({"coding": [{
                    "system": crate::fhir::OBSERVATION_CATEGORY, "code": code, "display": display}]})),
                None => {
                    self.err(
                        at,
                        "category",
                        format!("unknown observation category `{s}`"),
                        Some(format!(
                            "one of {}, or a Coding",
                            KNOWN.map(|k| k.0).join(", ")
                        )),
                    );
                    None
                }
            },
            other => self
                .coding(at, "category", other)
                .map(|coding| serde_json::json!({"coding": [coding]})),
        }
    }
}
