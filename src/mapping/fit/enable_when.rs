//! `enableWhen`: which items of a response are enabled — their conditions read against the
//! enabled answers nearest to them (R4 leaves "nearest" to the form; HAPI and the SDC
//! implementations read the occurrence that shares the deepest ancestor), `enableBehavior`
//! `all` by default, a disabled parent disabling its children.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::*;

/// The linkIds of the Questionnaire's items that `response` leaves disabled where they would
/// stand (`enableWhen` read against its enabled answers): a required one of them is not missing.
pub fn disabled_items(questionnaire: &Value, response: &Value) -> HashSet<String> {
    let defs = definitions(questionnaire, &mut Vec::new());
    let nodes = nodes_of(response);
    let checker = Checker::new(&defs, &nodes);
    let mut memo = HashMap::new();
    defs.keys()
        .filter(|id| !checker.enabled_absent(id, &mut memo))
        .map(|id| id.to_string())
        .collect()
}

impl Checker<'_, '_> {
    /// Whether response item `i` is enabled: its item's `enableWhen` holds (against enabled
    /// answers, the nearest ones first) and so does its parent's.
    pub(super) fn enabled(
        &self,
        i: usize,
        memo: &mut HashMap<usize, bool>,
        visiting: &mut HashSet<usize>,
    ) -> bool {
        if let Some(&e) = memo.get(&i) {
            return e;
        }
        // A cycle of enableWhen through answers: not enabled (an invalid Questionnaire; not
        // charting is the safe side).
        if !visiting.insert(i) {
            return false;
        }
        let node = &self.nodes[i];
        let parent_ok = node.parent.is_none_or(|p| self.enabled(p, memo, visiting));
        let own = match self.defs.get(node.link_id) {
            Some(def) => self.conditions_hold(def.item, Some(i), memo, visiting),
            None => true,
        };
        visiting.remove(&i);
        let e = parent_ok && own;
        memo.insert(i, e);
        e
    }

    /// Whether an item the response does not have would be enabled: its `enableWhen`, and its
    /// ancestors', read against the whole response.
    fn enabled_absent(&self, link_id: &str, memo: &mut HashMap<usize, bool>) -> bool {
        let mut id = Some(link_id);
        while let Some(current) = id {
            let Some(def) = self.defs.get(current) else {
                return true;
            };
            if !self.conditions_hold(def.item, None, memo, &mut HashSet::new()) {
                return false;
            }
            id = def.parent;
        }
        true
    }

    /// An item's `enableWhen` conditions, combined by `enableBehavior` (`all` when it is not
    /// given: R4's que-12 asks for it with more than one, and holding back is the safe side).
    fn conditions_hold(
        &self,
        item: &Value,
        context: Option<usize>,
        memo: &mut HashMap<usize, bool>,
        visiting: &mut HashSet<usize>,
    ) -> bool {
        let Some(conditions) = item.get("enableWhen").and_then(Value::as_array) else {
            return true;
        };
        if conditions.is_empty() {
            return true;
        }
        let any = item.get("enableBehavior").and_then(Value::as_str) == Some("any");
        let mut results = conditions
            .iter()
            .map(|c| self.condition(c, context, memo, visiting));
        if any {
            results.any(|r| r)
        } else {
            results.all(|r| r)
        }
    }

    /// One `enableWhen`: its question's enabled answers (the occurrences nearest to
    /// `context`) compared with `answer[x]` by `operator` (R4: `exists`, `=`, `!=`, `>`, `<`,
    /// `>=`, `<=`; `!=` holds when no answer is equal).
    fn condition(
        &self,
        c: &Value,
        context: Option<usize>,
        memo: &mut HashMap<usize, bool>,
        visiting: &mut HashSet<usize>,
    ) -> bool {
        let question = c.get("question").and_then(Value::as_str).unwrap_or("");
        let operator = c.get("operator").and_then(Value::as_str).unwrap_or("=");
        let expected = c
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.starts_with("answer")))
            .map(|(k, v)| (format!("value{}", &k["answer".len()..]), v));
        let occurrences: Vec<usize> = self
            .nearest(question, context)
            .into_iter()
            .filter(|&q| self.enabled(q, memo, visiting))
            .collect();
        let answers: Vec<(&str, &Value)> = occurrences
            .iter()
            .flat_map(|&q| answers_of(self.nodes[q].item))
            .filter_map(value_entry)
            .collect();
        if operator == "exists" {
            let wanted = expected.and_then(|(_, v)| v.as_bool()).unwrap_or(true);
            return answers.is_empty() != wanted;
        }
        let Some((kind, expected)) = expected else {
            return false;
        };
        let compared = |(k, v): &(&str, &Value)| -> Option<std::cmp::Ordering> {
            (*k == kind.as_str())
                .then(|| compare(&kind, v, expected))
                .flatten()
        };
        use std::cmp::Ordering::*;
        match operator {
            "=" => answers.iter().any(|a| compared(a) == Some(Equal)),
            "!=" => !answers.iter().any(|a| compared(a) == Some(Equal)),
            ">" => answers.iter().any(|a| compared(a) == Some(Greater)),
            "<" => answers.iter().any(|a| compared(a) == Some(Less)),
            ">=" => answers
                .iter()
                .any(|a| matches!(compared(a), Some(Greater | Equal))),
            "<=" => answers
                .iter()
                .any(|a| matches!(compared(a), Some(Less | Equal))),
            _ => false,
        }
    }

    /// The occurrences of `link_id` nearest to `context` (those sharing its deepest
    /// ancestor); all of them without a context.
    fn nearest(&self, link_id: &str, context: Option<usize>) -> Vec<usize> {
        let Some(all) = self.by_link.get(link_id) else {
            return Vec::new();
        };
        let Some(context) = context else {
            return all.clone();
        };
        let mut ancestors = Vec::new();
        let mut cur = Some(context);
        while let Some(c) = cur {
            ancestors.push(c);
            cur = self.nodes[c].parent;
        }
        // The depth of the deepest ancestor of `context` that is also one of `candidate`'s.
        let shared = |candidate: usize| -> Option<usize> {
            let mut cur = Some(candidate);
            while let Some(c) = cur {
                if ancestors.contains(&c) {
                    return Some(self.nodes[c].depth);
                }
                cur = self.nodes[c].parent;
            }
            None
        };
        let scored: Vec<(usize, Option<usize>)> = all.iter().map(|&c| (c, shared(c))).collect();
        let best = scored.iter().map(|(_, d)| *d).max().flatten();
        scored
            .into_iter()
            .filter(|(_, d)| *d == best)
            .map(|(c, _)| c)
            .collect()
    }
}
