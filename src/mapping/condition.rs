//! Declarative conditions on answers: ops flags and conditional requirements.

use std::collections::HashMap;

use serde_json::Value;

use super::value::Answer;

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Some answer of the item equals one of the values (a Coding matches its code or map key).
    AnyOf {
        item: String,
        values: Vec<Value>,
    },
    Answered {
        item: String,
        answered: bool,
    },
    Compare {
        item: String,
        op: Cmp,
        value: f64,
    },
    Any(Vec<Condition>),
    All(Vec<Condition>),
    Not(Box<Condition>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Gt,
    Gte,
    Lt,
    Lte,
}

/// Answers by linkId, every occurrence.
pub type Answers<'m> = HashMap<&'m str, Vec<Answer<'m>>>;

/// A payload's value as a condition compares it (`accept_when`): booleans and numbers as
/// such, also when a vendor writes them as text (`"true"`, `"1"`); other text as text.
pub fn plain_answer<'m>(v: &Value) -> Option<Answer<'m>> {
    Some(match v {
        Value::Bool(b) => Answer::Bool(*b),
        Value::Number(n) => Answer::Dec(n.clone()),
        Value::String(s) => match s.trim() {
            "" => return None,
            "true" => Answer::Bool(true),
            "false" => Answer::Bool(false),
            t => match super::value::number(v) {
                Some(n) => Answer::Dec(n),
                None => Answer::Str(t.to_string()),
            },
        },
        _ => return None,
    })
}

impl Condition {
    pub fn eval(&self, answers: &Answers<'_>) -> bool {
        let of = |item: &str| answers.get(item).map(Vec::as_slice).unwrap_or(&[]);
        match self {
            Condition::AnyOf { item, values } => {
                of(item).iter().any(|a| values.iter().any(|v| a.matches(v)))
            }
            Condition::Answered { item, answered } => of(item).is_empty() != *answered,
            Condition::Compare { item, op, value } => of(item)
                .iter()
                .filter_map(Answer::as_f64)
                .any(|x| match op {
                    Cmp::Gt => x > *value,
                    Cmp::Gte => x >= *value,
                    Cmp::Lt => x < *value,
                    Cmp::Lte => x <= *value,
                }),
            Condition::Any(cs) => cs.iter().any(|c| c.eval(answers)),
            Condition::All(cs) => cs.iter().all(|c| c.eval(answers)),
            Condition::Not(c) => !c.eval(answers),
        }
    }

    /// The condition as a mapping file would write it (`$.finalized equals true`), for
    /// messages; values are the map's own, never a payload's.
    pub fn describe(&self) -> String {
        let list = |cs: &[Condition], word: &str| {
            let parts: Vec<String> = cs.iter().map(|c| format!("({})", c.describe())).collect();
            parts.join(&format!(" {word} "))
        };
        match self {
            Condition::AnyOf { item, values } if values.len() == 1 => {
                format!("{item} equals {}", values[0])
            }
            Condition::AnyOf { item, values } => {
                let vs: Vec<String> = values.iter().map(Value::to_string).collect();
                format!("{item} in [{}]", vs.join(", "))
            }
            Condition::Answered { item, answered } => {
                format!(
                    "{item} {}",
                    if *answered {
                        "answered"
                    } else {
                        "not answered"
                    }
                )
            }
            Condition::Compare { item, op, value } => {
                let op = match op {
                    Cmp::Gt => ">",
                    Cmp::Gte => ">=",
                    Cmp::Lt => "<",
                    Cmp::Lte => "<=",
                };
                format!("{item} {op} {value}")
            }
            Condition::Any(cs) => list(cs, "or"),
            Condition::All(cs) => list(cs, "and"),
            Condition::Not(c) => format!("not ({})", c.describe()),
        }
    }

    /// The linkIds the condition reads.
    pub fn items(&self) -> Vec<&str> {
        match self {
            Condition::AnyOf { item, .. }
            | Condition::Answered { item, .. }
            | Condition::Compare { item, .. } => vec![item.as_str()],
            Condition::Any(cs) | Condition::All(cs) => {
                cs.iter().flat_map(Condition::items).collect()
            }
            Condition::Not(c) => c.items(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn evaluates_false_answers_and_absence() {
        let mut a: Answers = HashMap::new();
        a.insert("fam", vec![Answer::Bool(false)]);
        a.insert("bmi", vec![Answer::Int(31)]);
        let eq_true = Condition::AnyOf {
            item: "fam".into(),
            values: vec![json!(true)],
        };
        let eq_false = Condition::AnyOf {
            item: "fam".into(),
            values: vec![json!(false)],
        };
        assert!(!eq_true.eval(&a));
        assert!(eq_false.eval(&a));
        assert!(Condition::Answered {
            item: "x".into(),
            answered: false
        }
        .eval(&a));
        assert!(Condition::Compare {
            item: "bmi".into(),
            op: Cmp::Gte,
            value: 30.0
        }
        .eval(&a));
        assert!(Condition::Any(vec![eq_true.clone(), eq_false]).eval(&a));
        assert!(Condition::Not(Box::new(eq_true)).eval(&a));
    }
}
