//! Derived items — BMI from a weight and a height, a questionnaire's total score, a sum — and
//! the answers a `required_when` asks for: the second pass over a payload's answers, once every
//! item has been read. A derivation from a missing or implausible answer is not computed: it is
//! missing too, never a number made of a guess.

use super::answers::{Node, Run};
use super::condition::Answers;
use super::engine::MissingAnswer;
use super::value::{self, Answer};
use super::{Derivation, Item, ItemType};
use crate::fhir::Issue;

impl<'m> Run<'m, '_> {
    /// Fills derived items (in file order, so a derivation may use an earlier one) and drops
    /// those that could not be computed.
    pub(super) fn derive(&mut self, nodes: &mut Vec<Node<'m>>, flat: &mut Answers<'m>) {
        for node in nodes.iter_mut() {
            self.derive(&mut node.children, flat);
            let Some(d) = &node.item.derive else { continue };
            let derived = self.derived_value(node.item, d, flat);
            let Some(a) = derived else {
                self.note_missing(node.item);
                continue;
            };
            // A value derived from plausible ones may still not be (a BMI of 300).
            let checked = self.plausible(node.item, vec![a]);
            if let Some(why) = checked.unreadable {
                self.note_unreadable(node.item, &node.key.clone(), why);
            }
            for a in checked.answers {
                flat.entry(node.item.link_id.as_str())
                    .or_default()
                    .push(a.clone());
                node.answers.push(a);
            }
        }
        nodes.retain(|n| !n.answers.is_empty() || !n.children.is_empty());
    }

    /// Every derived value the answers allow, children first and in item order (a later
    /// derivation may read an earlier one), in place of an answer given for it.
    pub(super) fn derive_all(&mut self, items: &'m [Item], flat: &mut Answers<'m>) {
        for item in items {
            self.derive_all(&item.children, flat);
            let Some(d) = &item.derive else { continue };
            if let Some(a) = self.derived_value(item, d, flat) {
                flat.insert(item.link_id.as_str(), vec![a]);
            }
        }
    }

    fn derived_value(
        &mut self,
        item: &'m Item,
        d: &Derivation,
        flat: &Answers<'m>,
    ) -> Option<Answer<'m>> {
        let first_quantity = |id: &str, to: &str| {
            flat.get(id)?.iter().find_map(|a| match a {
                Answer::Quantity(n, u) => super::units::convert(n.as_f64()?, u, to).ok(),
                _ => None,
            })
        };
        let places = item.precision;
        let out = |x: f64, places: u32| -> Option<Answer<'m>> {
            match item.item_type {
                ItemType::Integer if x.fract() == 0.0 => Some(Answer::Int(x as i64)),
                ItemType::Quantity => value::rounded(x, places)
                    .map(|n| Answer::Quantity(n, item.unit.as_deref().unwrap_or("1"))),
                _ => value::rounded(x, places).map(Answer::Dec),
            }
        };
        match d {
            Derivation::Bmi { weight, height } => {
                let kg = first_quantity(weight, "kg")?;
                let m = first_quantity(height, "m")?;
                if m <= 0.0 {
                    self.issues.push(
                        Issue::warning("value", "BMI not computed: height is zero")
                            .at(item.link_id.clone()),
                    );
                    return None;
                }
                out(kg / (m * m), places.unwrap_or(1))
            }
            Derivation::SumScores(ids) => {
                let mut total = 0.0;
                let unanswered: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|id| !flat.contains_key(id))
                    .collect();
                if !unanswered.is_empty() {
                    self.issues.push(
                        Issue::warning(
                            "incomplete",
                            format!("total not computed: {} unanswered", unanswered.join(", ")),
                        )
                        .at(item.link_id.clone()),
                    );
                    return None;
                }
                for a in ids.iter().filter_map(|id| flat.get(id.as_str())).flatten() {
                    match a {
                        Answer::Coding(c) => total += c.score.unwrap_or(0.0),
                        _ => return None,
                    }
                }
                out(total, places.unwrap_or(2))
            }
            Derivation::Sum(ids) => {
                let values: Vec<f64> = ids
                    .iter()
                    .filter_map(|id| flat.get(id.as_str()))
                    .flatten()
                    .filter_map(Answer::as_f64)
                    .collect();
                if values.is_empty() {
                    return None;
                }
                out(values.iter().sum(), places.unwrap_or(2))
            }
        }
    }

    pub(super) fn required_when(&mut self, items: &'m [Item], flat: &Answers<'m>) {
        for item in items {
            if let Some(c) = &item.required_when {
                if !flat.contains_key(item.link_id.as_str()) && c.eval(flat) && !item.required {
                    self.missing.push(MissingAnswer {
                        link_id: item.link_id.clone(),
                        text: item.text.clone(),
                        reason: None,
                    });
                }
            }
            self.required_when(&item.children, flat);
        }
    }
}
