//! `OperationOutcome`: the one shape in which chartbridge reports what is wrong with an input.
//!
//! An issue says what (`code`, `diagnostics`) and where (`expression`: the linkId, the JSONPath,
//! the mapping file and line). It never carries a submitted value: only its JSON type.

use serde_json::{json, Value};

/// FHIR `IssueSeverity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl IssueSeverity {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueSeverity::Fatal => "fatal",
            IssueSeverity::Error => "error",
            IssueSeverity::Warning => "warning",
            IssueSeverity::Information => "information",
        }
    }
}

/// One issue of an OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: IssueSeverity,
    /// FHIR `IssueType` code: `required`, `value`, `invalid`, `structure`, `not-found`, `code-invalid`, …
    pub code: &'static str,
    pub diagnostics: String,
    /// Where: linkId, JSONPath, `file:line:column`, …
    pub expression: Vec<String>,
}

impl Issue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: IssueSeverity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    pub fn warning(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: IssueSeverity::Warning,
            ..Issue::error(code, diagnostics)
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }

    pub fn is_error(&self) -> bool {
        matches!(self.severity, IssueSeverity::Error | IssueSeverity::Fatal)
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "severity": self.severity.as_str(),
            "code": self.code,
            "diagnostics": self.diagnostics,
        });
        if !self.expression.is_empty() {
            v["expression"] = json!(self.expression);
        }
        v
    }
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.severity.as_str())?;
        if !self.expression.is_empty() {
            write!(f, "{}: ", self.expression.join(" "))?;
        }
        write!(f, "{}", self.diagnostics)
    }
}

/// A list of issues, rendered as a FHIR `OperationOutcome`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    pub fn new(issues: Vec<Issue>) -> Self {
        OperationOutcome { issues }
    }

    pub fn has_errors(&self) -> bool {
        self.issues.iter().any(Issue::is_error)
    }

    /// The resource. An empty outcome gets one `information` issue: FHIR requires at least one.
    pub fn to_json(&self) -> Value {
        let issues: Vec<Value> = if self.issues.is_empty() {
            vec![json!({"severity": "information", "code": "informational", "diagnostics": "ok"})]
        } else {
            self.issues.iter().map(Issue::to_json).collect()
        };
        json!({"resourceType": "OperationOutcome", "issue": issues})
    }
}

/// The JSON type of a value, for messages that must not echo the (possibly PHI) value itself.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_issues_with_expressions() {
        let oo = OperationOutcome::new(vec![Issue::error("value", "not a number").at("weight")]);
        let v = oo.to_json();
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["expression"][0], "weight");
        assert!(oo.has_errors());
        assert_eq!(
            OperationOutcome::default().to_json()["issue"][0]["severity"],
            "information"
        );
    }
}
