//! What items say of each other, checked once all are known (derivations, conditions), the
//! flags, and `accept_when`.

use std::collections::HashSet;

use super::{At, Compiler};
use crate::mapping::condition::{Cmp, Condition};
use crate::mapping::select::Selector;
use crate::mapping::spec::{self, ConditionSpec};
use crate::mapping::units::{self, Dimension};
use crate::mapping::{AcceptWhen, Derivation, Flag, Item, ItemType};

impl Compiler<'_> {
    pub(super) fn condition(&mut self, at: &At, key: &str, c: ConditionSpec) -> Option<Condition> {
        self.condition_on(at, key, c, None)
    }

    /// A condition on items' answers (`paths` none) or, for `accept_when`, on values of the
    /// payload at JSONPaths (`paths` collects their selectors; the condition names each by
    /// its text).
    pub(super) fn condition_on(
        &mut self,
        at: &At,
        key: &str,
        c: ConditionSpec,
        mut paths: Option<&mut Vec<Selector>>,
    ) -> Option<Condition> {
        let combinators = [c.any.is_some(), c.all.is_some(), c.not.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        let ops = [
            c.equals.is_some(),
            c.contains.is_some(),
            c.one_of.is_some(),
            c.answered.is_some(),
            c.gt.is_some(),
            c.gte.is_some(),
            c.lt.is_some(),
            c.lte.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        let subject = if paths.is_some() { "path" } else { "item" };
        let hint = Some(format!("write {{{subject}: <{}>, equals|contains|in|answered|gt|gte|lt|lte: …}}, or any/all/not of conditions", if paths.is_some() { "JSONPath" } else { "linkId" }));
        let wrong = if paths.is_some() {
            c.item.is_some()
        } else {
            c.path.is_some()
        };
        if wrong {
            let msg = if paths.is_some() {
                "`accept_when` reads the payload: name a `path`, not an `item` (a post it ignores is never mapped)"
            } else {
                "`path` is for `accept_when`; conditions here name an `item`"
            };
            self.err(at, key, msg, hint);
            return None;
        }
        let named = c.item.is_some() || c.path.is_some();
        if combinators + usize::from(named) != 1 || (named && ops != 1) || (!named && ops != 0) {
            self.err(
                at,
                key,
                format!("a condition needs exactly one `{subject}` with one test, or one of any/all/not"),
                hint,
            );
            return None;
        }
        if let Some(list) = c.any {
            let cs: Vec<_> = list
                .into_iter()
                .filter_map(|c| self.condition_on(at, key, c, paths.as_deref_mut()))
                .collect();
            return Some(Condition::Any(cs));
        }
        if let Some(list) = c.all {
            let cs: Vec<_> = list
                .into_iter()
                .filter_map(|c| self.condition_on(at, key, c, paths.as_deref_mut()))
                .collect();
            return Some(Condition::All(cs));
        }
        if let Some(inner) = c.not {
            return self
                .condition_on(at, key, *inner, paths)
                .map(|c| Condition::Not(Box::new(c)));
        }
        let item = match (c.item, c.path, paths) {
            (Some(item), _, _) => item,
            (None, Some(path), Some(paths)) => {
                let selector = self.selector(at, key, &path)?;
                paths.push(selector);
                path
            }
            _ => return None,
        };
        Some(if let Some(v) = c.equals.or(c.contains) {
            Condition::AnyOf {
                item,
                values: vec![v],
            }
        } else if let Some(values) = c.one_of {
            Condition::AnyOf { item, values }
        } else if let Some(answered) = c.answered {
            Condition::Answered { item, answered }
        } else {
            let (op, value) = match (c.gt, c.gte, c.lt, c.lte) {
                (Some(v), ..) => (Cmp::Gt, v),
                (_, Some(v), ..) => (Cmp::Gte, v),
                (_, _, Some(v), _) => (Cmp::Lt, v),
                (.., Some(v)) => (Cmp::Lte, v),
                _ => return None,
            };
            Condition::Compare { item, op, value }
        })
    }

    /// `accept_when`: which posts are submissions (a condition on the payload's values).
    pub(super) fn accept_when(&mut self, c: ConditionSpec) -> Option<AcceptWhen> {
        let at = At {
            line: self.section_line("accept_when"),
            item: "accept_when".into(),
        };
        let mut paths = Vec::new();
        let condition = self.condition_on(&at, "accept_when", c, Some(&mut paths))?;
        Some(AcceptWhen {
            text: condition.describe(),
            condition,
            paths,
        })
    }

    /// Checks what items name of each other (derivations, conditions) once all are known.
    pub(super) fn check_references(&mut self, items: &[Item], parent: &str) {
        for item in items {
            let path = if parent.is_empty() {
                item.link_id.clone()
            } else {
                format!("{parent}/{}", item.link_id)
            };
            let at = At {
                line: item.line,
                item: format!("item `{path}`"),
            };
            if let Some(c) = &item.required_when {
                for id in c.items() {
                    if !self.link_ids.contains_key(id) {
                        self.err(
                            &at,
                            "required_when",
                            format!("`required_when` names unknown item `{id}`"),
                            None,
                        );
                    }
                }
            }
            match &item.derive {
                Some(Derivation::Bmi { weight, height }) => {
                    let dims = [
                        (weight, Dimension::Mass, "weight"),
                        (height, Dimension::Length, "height"),
                    ];
                    for (id, dim, what) in dims {
                        match self.link_ids.get(id.as_str()).cloned() {
                            None => {
                                self.err(&at, "derive", format!("bmi(): unknown item `{id}`"), None)
                            }
                            Some(info)
                                if info.item_type != ItemType::Quantity
                                    || info.unit.as_deref().and_then(units::dimension)
                                        != Some(dim) =>
                            {
                                self.err(
                                    &at,
                                    "derive",
                                    format!(
                                        "bmi(): `{id}` must be a quantity item measuring {what}"
                                    ),
                                    None,
                                )
                            }
                            Some(_) => {}
                        }
                    }
                    if !(item.item_type == ItemType::Decimal
                        || (item.item_type == ItemType::Quantity
                            && item.unit.as_deref() == Some("kg/m2")))
                    {
                        self.err(
                            &at,
                            "derive",
                            "a bmi() item is a quantity in `kg/m2` (or a decimal)",
                            None,
                        );
                    }
                }
                Some(Derivation::SumScores(ids)) => {
                    for id in ids {
                        match self.link_ids.get(id.as_str()).cloned() {
                            None => self.err(
                                &at,
                                "derive",
                                format!("sum_scores(): unknown item `{id}`"),
                                None,
                            ),
                            Some(info) if !info.scored => self.err(
                                &at,
                                "derive",
                                format!("sum_scores(): `{id}` has no scored options"),
                                Some("give its map entries a `score`".to_string()),
                            ),
                            Some(_) => {}
                        }
                    }
                    if !matches!(item.item_type, ItemType::Integer | ItemType::Decimal) {
                        self.err(
                            &at,
                            "derive",
                            "a sum_scores() item is an integer or a decimal",
                            None,
                        );
                    }
                }
                Some(Derivation::Sum(ids)) => {
                    for id in ids {
                        match self.link_ids.get(id.as_str()).map(|i| i.item_type) {
                            None => {
                                self.err(&at, "derive", format!("sum(): unknown item `{id}`"), None)
                            }
                            Some(ItemType::Integer | ItemType::Decimal | ItemType::Quantity) => {}
                            Some(_) => self.err(
                                &at,
                                "derive",
                                format!("sum(): `{id}` is not numeric"),
                                None,
                            ),
                        }
                    }
                }
                None => {}
            }
            self.check_references(&item.children, &path);
        }
    }

    pub(super) fn flags(&mut self, specs: Vec<spec::FlagSpec>) -> Vec<Flag> {
        let mut names = HashSet::new();
        let mut flags = Vec::new();
        self.cursor = 0;
        for f in specs {
            let line = self.find_line("name", &f.name);
            let at = At {
                line,
                item: format!("flag `{}`", f.name),
            };
            if f.name.is_empty()
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                self.err(&at, "name", "flag names are snake_case (a-z, 0-9, _)", None);
            }
            if !names.insert(f.name.clone()) {
                self.err(&at, "name", format!("duplicate flag `{}`", f.name), None);
            }
            if let Some(when) = self.condition(&at, "when", f.when) {
                for id in when.items() {
                    if !self.link_ids.contains_key(id) {
                        self.err(
                            &at,
                            "when",
                            format!("the condition names unknown item `{id}`"),
                            None,
                        );
                    }
                }
                flags.push(Flag {
                    name: f.name,
                    description: f.description,
                    when,
                });
            }
        }
        flags
    }
}
