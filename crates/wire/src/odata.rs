//! The OData subset Batch list operations need: `$filter` with `eq`/`ne`, `startswith(…)`,
//! `and`/`or`/`not` and parentheses; `$select` of top-level properties.

use bluebatch_core::error::{BatchError, Code};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Eq(String, String),
    Ne(String, String),
    StartsWith(String, String),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    /// `field` gives a property's value as text (case-insensitive comparison, as Batch compares
    /// ids and enum values).
    pub fn eval(&self, field: &dyn Fn(&str) -> Option<String>) -> bool {
        let get = |f: &str| field(f).unwrap_or_default().to_lowercase();
        match self {
            Filter::Eq(f, v) => get(f) == v.to_lowercase(),
            Filter::Ne(f, v) => get(f) != v.to_lowercase(),
            Filter::StartsWith(f, v) => get(f).starts_with(&v.to_lowercase()),
            Filter::And(a, b) => a.eval(field) && b.eval(field),
            Filter::Or(a, b) => a.eval(field) || b.eval(field),
            Filter::Not(a) => !a.eval(field),
        }
    }
}

impl Filter {
    /// The value `field` must equal for the filter to hold (`field eq 'v'`, alone or in an
    /// `and`), which a store can use to narrow a query; `None` when the filter requires none.
    pub fn required_eq(&self, field: &str) -> Option<&str> {
        match self {
            Filter::Eq(f, v) if f == field => Some(v),
            Filter::And(a, b) => a.required_eq(field).or_else(|| b.required_eq(field)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Open,
    Close,
    Comma,
}

fn bad(reason: impl Into<String>) -> BatchError {
    BatchError::new(Code::InvalidQueryParameterValue)
        .with("QueryParameterName", "$filter")
        .with("Reason", reason)
}

fn lex(s: &str) -> Result<Vec<Tok>, BatchError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '\t' => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            ',' => {
                chars.next();
                out.push(Tok::Comma);
            }
            '\'' => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            v.push('\'');
                        }
                        Some('\'') => break,
                        Some(c) => v.push(c),
                        None => return Err(bad("unterminated string literal")),
                    }
                }
                out.push(Tok::Str(v));
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' => {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' {
                        w.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word(w));
            }
            other => return Err(bad(format!("unexpected character '{other}'"))),
        }
        if out.len() > 200 {
            return Err(bad("the filter is too long"));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    fields: &'a [&'a str],
    depth: usize,
}

impl Parser<'_> {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, t: Tok) -> Result<(), BatchError> {
        if self.next() == Some(t.clone()) {
            Ok(())
        } else {
            Err(bad(format!("expected {t:?}")))
        }
    }

    fn field(&mut self) -> Result<String, BatchError> {
        match self.next() {
            Some(Tok::Word(w)) => {
                let known = self.fields.iter().find(|f| f.eq_ignore_ascii_case(&w));
                known.map(|f| f.to_string()).ok_or_else(|| {
                    bad(format!(
                        "filtering on '{w}' is not supported; use one of {}",
                        self.fields.join(", ")
                    ))
                })
            }
            _ => Err(bad("expected a property name")),
        }
    }

    fn literal(&mut self) -> Result<String, BatchError> {
        match self.next() {
            Some(Tok::Str(s)) | Some(Tok::Word(s)) => Ok(s),
            _ => Err(bad("expected a value")),
        }
    }

    fn or(&mut self) -> Result<Filter, BatchError> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, BatchError> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, BatchError> {
        self.depth += 1;
        if self.depth > 32 {
            return Err(bad("the filter is nested too deeply"));
        }
        let f = if self.peek_word("not") {
            self.pos += 1;
            Filter::Not(Box::new(self.unary()?))
        } else if self.toks.get(self.pos) == Some(&Tok::Open) {
            self.pos += 1;
            let f = self.or()?;
            self.expect(Tok::Close)?;
            f
        } else if self.peek_word("startswith") {
            self.pos += 1;
            self.expect(Tok::Open)?;
            let field = self.field()?;
            self.expect(Tok::Comma)?;
            let v = self.literal()?;
            self.expect(Tok::Close)?;
            Filter::StartsWith(field, v)
        } else {
            let field = self.field()?;
            let op = match self.next() {
                Some(Tok::Word(op)) => op.to_ascii_lowercase(),
                _ => return Err(bad("expected eq or ne")),
            };
            let v = self.literal()?;
            match op.as_str() {
                "eq" => Filter::Eq(field, v),
                "ne" => Filter::Ne(field, v),
                other => {
                    return Err(bad(format!(
                        "the operator '{other}' is not supported; use eq or ne"
                    )));
                }
            }
        };
        self.depth -= 1;
        Ok(f)
    }
}

/// Parses a `$filter` over the given filterable properties.
pub fn parse_filter(s: &str, fields: &[&str]) -> Result<Filter, BatchError> {
    let mut p = Parser {
        toks: lex(s)?,
        pos: 0,
        fields,
        depth: 0,
    };
    let f = p.or()?;
    if p.pos != p.toks.len() {
        return Err(bad("unexpected text after the expression"));
    }
    Ok(f)
}

/// Keeps only the `$select`ed top-level properties (comma-separated, case-sensitive as Batch).
pub fn select(obj: &mut Map<String, Value>, select: Option<&str>) {
    if let Some(sel) = select {
        let keep: Vec<&str> = sel.split(',').map(str::trim).collect();
        obj.retain(|k, _| keep.contains(&k.as_str()) || k.starts_with("odata."));
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_required_equality_is_found_only_where_the_filter_needs_it() {
        let f = |s: &str| parse_filter(s, &["state", "id"]).unwrap();
        assert_eq!(f("state eq 'idle'").required_eq("state"), Some("idle"));
        assert_eq!(
            f("id eq 'a' and (state eq 'Idle')").required_eq("state"),
            Some("Idle")
        );
        for loose in [
            "state eq 'idle' or id eq 'a'",
            "not (state eq 'idle')",
            "state ne 'idle'",
            "startswith(state, 'idle')",
            "id eq 'a'",
        ] {
            assert_eq!(f(loose).required_eq("state"), None, "{loose}");
        }
    }

    use super::*;

    const FIELDS: &[&str] = &["id", "state"];

    fn eval(f: &str, id: &str, state: &str) -> bool {
        let f = parse_filter(f, FIELDS).unwrap();
        f.eval(&|k| match k {
            "id" => Some(id.to_string()),
            "state" => Some(state.to_string()),
            _ => None,
        })
    }

    #[test]
    fn filters_evaluate() {
        assert!(eval("state eq 'idle'", "n", "idle"));
        assert!(!eval("state eq 'idle'", "n", "running"));
        assert!(eval(
            "state eq 'idle' or state eq 'running'",
            "n",
            "running"
        ));
        assert!(eval(
            "startswith(id,'ab') and state ne 'offline'",
            "abc",
            "idle"
        ));
        assert!(eval("not (state eq 'idle')", "n", "offline"));
        assert!(eval("id eq 'it''s'", "it's", "x"));
    }

    #[test]
    fn bad_filters_are_invalid_query_values() {
        for f in [
            "state gt 'a'",
            "color eq 'x'",
            "state eq",
            "(state eq 'a'",
            "state eq 'a' junk",
            "'",
            "a ~ b",
            &"(".repeat(100),
        ] {
            let e = parse_filter(f, FIELDS).unwrap_err();
            assert_eq!(e.code, Code::InvalidQueryParameterValue, "{f}");
        }
    }
}
