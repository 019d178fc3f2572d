//! Selectors: JSONPath compiled once at load, and the per-payload answer index.
//!
//! Every path goes through jsonpath-rust's parser at load (so a bad path is a load error with its
//! position). Plain paths (`$.a.b`, `$.a[0]`, `$.a[*].b`, `$['a b']`) then run on a tiny walker
//! of our own; anything richer (filters, recursive descent, slices) runs on the compiled
//! jsonpath-rust query. Nothing is parsed per payload.

use std::collections::HashMap;

use jsonpath_rust::parser::model::JpQuery;
use serde_json::Value;

use super::read::PayloadError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    Wildcard,
}

/// A compiled JSONPath.
#[derive(Debug, Clone)]
pub struct Selector {
    source: String,
    plan: Plan,
}

#[derive(Debug, Clone)]
enum Plan {
    Steps(Vec<Step>),
    Query(Box<JpQuery>),
}

impl Selector {
    /// Compiles `path`. The error is jsonpath-rust's message, with the position of the problem.
    pub fn compile(path: &str) -> Result<Selector, String> {
        let query = jsonpath_rust::parser::parse_json_path(path).map_err(|e| e.to_string())?;
        let plan = match simple_steps(path) {
            Some(steps) => Plan::Steps(steps),
            None => Plan::Query(Box::new(query)),
        };
        Ok(Selector {
            source: path.to_string(),
            plan,
        })
    }

    /// `$`: the value itself.
    pub fn root() -> Selector {
        Selector {
            source: "$".to_string(),
            plan: Plan::Steps(Vec::new()),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether this selector can yield more than one value.
    pub fn is_multi(&self) -> bool {
        match &self.plan {
            Plan::Steps(steps) => steps.contains(&Step::Wildcard),
            Plan::Query(_) => true,
        }
    }

    /// Every value the path selects in `root`, in document order.
    pub fn select<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        match &self.plan {
            Plan::Steps(steps) => {
                let mut out = Vec::new();
                walk(root, steps, &mut out);
                out
            }
            Plan::Query(q) => jsonpath_rust::query::js_path_process(q, root)
                .map(|refs| refs.into_iter().map(|r| r.val()).collect())
                .unwrap_or_default(),
        }
    }

    /// The first value the path selects, if any.
    pub fn first<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        match &self.plan {
            Plan::Steps(steps) if !steps.contains(&Step::Wildcard) => {
                steps.iter().try_fold(root, |v, step| match step {
                    Step::Key(k) => v.get(k.as_str()),
                    Step::Index(i) => v.get(*i),
                    Step::Wildcard => None,
                })
            }
            _ => self.select(root).into_iter().next(),
        }
    }
}

fn walk<'a>(v: &'a Value, steps: &[Step], out: &mut Vec<&'a Value>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push(v);
        return;
    };
    match step {
        Step::Key(k) => {
            if let Some(next) = v.get(k.as_str()) {
                walk(next, rest, out)
            }
        }
        Step::Index(i) => {
            if let Some(next) = v.get(*i) {
                walk(next, rest, out)
            }
        }
        Step::Wildcard => match v {
            Value::Array(items) => items.iter().for_each(|x| walk(x, rest, out)),
            Value::Object(map) => map.values().for_each(|x| walk(x, rest, out)),
            _ => {}
        },
    }
}

/// The parts of a payload a mapping reads, derived at load from every selector that starts at
/// the payload root. Parsing through it (`read`) builds only those parts as a `Value` and skips
/// the rest (still checking that it is JSON): a Typeform webhook carries the whole form
/// definition, most of its bytes, which no mapping reads. Whatever a selector ends on is built
/// whole (or as far as `add_within` says), so every selector selects exactly what it would in
/// the full document. A mapping with any JSONPath richer than plain steps gets
/// `Projection::all()` (the full document).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Projection {
    /// Build this value whole.
    pub(super) all: bool,
    /// Object members to build, and how.
    pub(super) keys: Vec<(String, Projection)>,
    /// How to build every array element and every object member not in `keys`.
    pub(super) any: Option<Box<Projection>>,
}

impl Projection {
    /// Nothing yet: add what is read.
    pub fn none() -> Projection {
        Projection::default()
    }

    /// The whole document.
    pub fn all() -> Projection {
        Projection {
            all: true,
            ..Projection::default()
        }
    }

    pub fn is_all(&self) -> bool {
        self.all
    }

    /// Adds what `selector` reads, and builds whatever it ends on whole. A selector richer
    /// than plain steps makes the projection the whole document.
    pub fn add_whole(&mut self, selector: &Selector) {
        self.add_within(selector, &Projection::all());
    }

    /// Adds what `selector` reads, and builds of whatever it ends on what `inner` names (paths
    /// relative to it). A selector richer than plain steps makes the projection the whole
    /// document.
    pub fn add_within(&mut self, selector: &Selector, inner: &Projection) {
        let Plan::Steps(steps) = &selector.plan else {
            *self = Projection::all();
            return;
        };
        let mut node = self;
        for step in steps {
            if node.all {
                return;
            }
            node = match step {
                Step::Key(k) => match node.keys.iter().position(|(name, _)| name == k) {
                    Some(i) => &mut node.keys[i].1,
                    None => {
                        node.keys.push((k.clone(), Projection::default()));
                        let last = node.keys.len() - 1;
                        &mut node.keys[last].1
                    }
                },
                // An index keeps every element (projected alike): simpler, and never less.
                Step::Index(_) | Step::Wildcard => node.any.get_or_insert_with(Default::default),
            };
        }
        node.merge(inner);
    }

    /// A member named in `keys` is also reached through `any`: it must be built for both.
    /// Call once every selector is added.
    pub fn finish(&mut self) {
        if let Some(any) = self.any.as_deref_mut() {
            any.finish();
        }
        let any = self.any.as_deref().cloned();
        for (_, node) in &mut self.keys {
            if let Some(any) = &any {
                node.merge(any);
            }
            node.finish();
        }
    }

    fn merge(&mut self, other: &Projection) {
        if self.all || other.all {
            *self = Projection::all();
            return;
        }
        for (k, theirs) in &other.keys {
            match self.keys.iter_mut().find(|(name, _)| name == k) {
                Some((_, mine)) => mine.merge(theirs),
                None => self.keys.push((k.clone(), theirs.clone())),
            }
        }
        if let Some(theirs) = &other.any {
            self.any.get_or_insert_with(Default::default).merge(theirs);
        }
    }

    /// Parses `raw` through the projection, refusing JSON nested deeper than `max_depth`
    /// containers — counted in the same pass, skipped parts included (see `read`).
    pub fn parse(&self, raw: &[u8], max_depth: usize) -> Result<Value, PayloadError> {
        super::read::read(self, raw, max_depth)
    }
}

/// Parses the plain subset of JSONPath; `None` for anything else.
fn simple_steps(path: &str) -> Option<Vec<Step>> {
    let mut rest = path.strip_prefix('$')?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(".*") {
            steps.push(Step::Wildcard);
            rest = r;
        } else if let Some(r) = rest.strip_prefix('.') {
            if r.starts_with('.') {
                return None; // recursive descent
            }
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
            {
                return None;
            }
            steps.push(Step::Key(name.to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            if inner == "*" {
                steps.push(Step::Wildcard);
            } else if let Ok(i) = inner.parse::<usize>() {
                steps.push(Step::Index(i));
            } else if let Some(name) = quoted(inner) {
                steps.push(Step::Key(name));
            } else {
                return None;
            }
            rest = &r[end + 1..];
        } else {
            return None;
        }
    }
    Some(steps)
}

fn quoted(s: &str) -> Option<String> {
    let q = s.chars().next()?;
    if (q != '\'' && q != '"') || s.len() < 2 || !s.ends_with(q) {
        return None;
    }
    let inner = &s[1..s.len() - 1];
    if inner.contains(['\\', '\'', '"']) {
        return None;
    }
    Some(inner.to_string())
}

/// Where a map's answers are, compiled: a list of elements with a key path, or an object.
#[derive(Debug, Clone)]
pub enum AnswerSource {
    List { list: Selector, key: Selector },
    Object { object: Selector, decode_json: bool },
}

/// The answers of one payload, indexed by key once, so that items look up in O(1).
pub enum AnswerIndex<'a> {
    Map(HashMap<&'a str, &'a Value>),
    /// Answers that were a JSON document inside a string, decoded once (Jotform `rawRequest`).
    Decoded(Value),
    Borrowed(&'a Value),
    Empty,
}

/// Why a payload's answers could not be indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    NotJson { path: String },
}

impl AnswerSource {
    pub fn index<'a>(&self, payload: &'a Value) -> Result<AnswerIndex<'a>, IndexError> {
        match self {
            AnswerSource::List { list, key } => {
                let mut map = HashMap::new();
                for element in list.select(payload) {
                    if let Some(k) = key.first(element).and_then(Value::as_str) {
                        // The first answer for a key wins, as in document order.
                        map.entry(k).or_insert(element);
                    }
                }
                Ok(AnswerIndex::Map(map))
            }
            AnswerSource::Object {
                object,
                decode_json,
            } => match object.first(payload) {
                None => Ok(AnswerIndex::Empty),
                Some(Value::String(s)) if *decode_json => serde_json::from_str(s)
                    .map(AnswerIndex::Decoded)
                    .map_err(|_| IndexError::NotJson {
                        path: object.source().to_string(),
                    }),
                Some(v) => Ok(AnswerIndex::Borrowed(v)),
            },
        }
    }
}

impl AnswerIndex<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            AnswerIndex::Map(m) => m.get(key).copied(),
            AnswerIndex::Decoded(v) => v.get(key),
            AnswerIndex::Borrowed(v) => v.get(key),
            AnswerIndex::Empty => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_whole_document_reads_as_serde_json_reads_it() {
        let text =
            r#"{"a":[1,-0.50,1e5,true,null,"x\"y\u00e9[{"],"b":{},"c":[],"d":{"e":[{"f":72.50}]}}"#;
        let ours = Projection::all().parse(text.as_bytes(), 8).unwrap();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours.to_string(), theirs.to_string());
        assert!(matches!(
            Projection::all().parse(text.as_bytes(), 3),
            Err(PayloadError::TooDeep(3))
        ));
        assert!(Projection::all().parse(text.as_bytes(), 4).is_ok());
    }

    #[test]
    fn plain_paths_use_the_walker_and_agree_with_jsonpath() {
        let doc = json!({"a": {"b": [{"c": 1}, {"c": 2}], "d e": true}});
        for (path, expected) in [
            ("$.a.b[*].c", vec![json!(1), json!(2)]),
            ("$.a.b[1].c", vec![json!(2)]),
            ("$.a['d e']", vec![json!(true)]),
            ("$.a.b[?(@.c == 2)].c", vec![json!(2)]),
            ("$..c", vec![json!(1), json!(2)]),
        ] {
            let s = Selector::compile(path).unwrap();
            let got: Vec<Value> = s.select(&doc).into_iter().cloned().collect();
            assert_eq!(got, expected, "{path}");
            let reference: Vec<Value> = jsonpath_rust::query::js_path_vals(path, &doc)
                .unwrap()
                .into_iter()
                .cloned()
                .collect();
            assert_eq!(got, reference, "{path} disagrees with jsonpath-rust");
        }
        assert!(matches!(
            Selector::compile("$.a.b").unwrap().plan,
            Plan::Steps(_)
        ));
        assert!(matches!(
            Selector::compile("$..c").unwrap().plan,
            Plan::Query(_)
        ));
    }

    fn projection(paths: &[&str]) -> Projection {
        let mut p = Projection::none();
        for path in paths {
            p.add_whole(&Selector::compile(path).unwrap());
        }
        p.finish();
        p
    }

    #[test]
    fn projection_builds_what_selectors_read_and_nothing_else() {
        let p = projection(&["$.a.b", "$.list[*].k", "$.list[0].x"]);
        let raw = br#"{"skip": {"deep": [1, 2, {"x": "y"}]}, "a": {"b": {"n": 72.50}, "c": 1},
                       "list": [{"k": [1], "x": 2, "z": 3}, {"k": "v"}]}"#;
        let v = p.parse(raw, usize::MAX).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"a":{"b":{"n":72.50}},"list":[{"k":[1],"x":2},{"k":"v"}]}"#
        );
        let whole: Value = serde_json::from_slice(raw).unwrap();
        for path in ["$.a.b", "$.list[*].k", "$.list[0].x", "$.a.b.n"] {
            let s = Selector::compile(path).unwrap();
            assert_eq!(s.select(&v), s.select(&whole), "{path}");
        }
    }

    #[test]
    fn a_member_named_and_reached_by_a_wildcard_is_built_for_both() {
        let p = projection(&["$.m.*.a", "$.m.b.c"]);
        let raw = br#"{"m": {"b": {"a": 1, "c": 2, "z": 3}, "d": {"a": 4, "c": 5}}}"#;
        assert_eq!(
            p.parse(raw, usize::MAX).unwrap().to_string(),
            r#"{"m":{"b":{"a":1,"c":2},"d":{"a":4}}}"#
        );
    }

    #[test]
    fn projection_still_rejects_what_is_not_json() {
        let p = projection(&["$.a"]);
        for bad in [
            &br#"{"a": 1, "skip": [1, }"#[..],
            br#"{"a": 1} trailing"#,
            br#"{"skip": {"x": nul}, "a": 1}"#,
            b"",
        ] {
            assert!(
                p.parse(bad, usize::MAX).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn scalars_where_objects_were_expected_select_nothing_either_way() {
        let paths = ["$.a.b", "$.n.m[*]", "$.x[*]", "$.y.*", "$.z[0]"];
        let p = projection(&paths);
        let raw = br#"{"a": 12.5, "n": "text", "x": 5, "y": 7.25, "z": true}"#;
        let v = p.parse(raw, usize::MAX).unwrap();
        let whole: Value = serde_json::from_slice(raw).unwrap();
        for path in paths {
            let s = Selector::compile(path).unwrap();
            assert!(s.select(&v).is_empty() && s.select(&whole).is_empty());
        }
    }

    #[test]
    fn rich_paths_read_the_whole_document() {
        let p = projection(&["$.a", "$..c"]);
        assert!(p.is_all());
        let p = projection(&["$.a[?(@.x == 1)]"]);
        assert!(p.is_all());
    }

    #[test]
    fn bad_paths_are_rejected_at_compile_time() {
        let err = Selector::compile("$.answers[?(@.x ==").unwrap_err();
        assert!(!err.is_empty());
        assert!(Selector::compile("answers").is_err());
    }

    #[test]
    fn list_index_keys_answers() {
        let src = AnswerSource::List {
            list: Selector::compile("$.answers[*]").unwrap(),
            key: Selector::compile("$.field.ref").unwrap(),
        };
        let payload = json!({"answers": [{"field": {"ref": "a"}, "n": 1}, {"field": {"ref": "b"}, "n": 2}, {"n": 3}]});
        let idx = src.index(&payload).unwrap();
        assert_eq!(idx.get("b").unwrap()["n"], 2);
        assert!(idx.get("c").is_none());
    }

    #[test]
    fn object_index_decodes_json_strings() {
        let src = AnswerSource::Object {
            object: Selector::compile("$.rawRequest").unwrap(),
            decode_json: true,
        };
        let payload = json!({"rawRequest": "{\"q1\": \"x\"}"});
        assert_eq!(src.index(&payload).unwrap().get("q1").unwrap(), "x");
        let bad = json!({"rawRequest": "{nope"});
        assert!(src.index(&bad).is_err());
    }
}
