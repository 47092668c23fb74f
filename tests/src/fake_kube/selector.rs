//! Label and field selectors, as in `?labelSelector=` and `?fieldSelector=`.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label and field selector; the empty one matches everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    labels: Vec<Requirement>,
    /// Dotted field paths (`metadata.name`) with a wanted value and
    /// whether it must equal (true) or differ (false).
    fields: Vec<(String, String, bool)>,
}

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let t = term.trim();
    if let Some(k) = t.strip_prefix('!') {
        return Ok(Requirement::NotExists(key(k)?));
    }
    if let Some(open) = t.find('(') {
        let inner = t[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("unterminated set in {t:?}"))?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
        let head = t[..open].trim();
        let (k, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("invalid requirement {t:?}"))?;
        return match op {
            "in" => Ok(Requirement::In(key(k)?, values)),
            "notin" => Ok(Requirement::NotIn(key(k)?, values)),
            _ => Err(format!("unknown operator {op:?}")),
        };
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(Requirement::NotEq(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(Requirement::Eq(key(k)?, v.trim().to_string()));
    }
    Ok(Requirement::Exists(key(t)?))
}

impl Selector {
    /// Parses the two query parameters; an error is a 400's message.
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let mut sel = Selector::default();
        for term in split_top(labels.unwrap_or_default()) {
            if !term.trim().is_empty() {
                sel.labels.push(parse_requirement(term)?);
            }
        }
        for term in fields.unwrap_or_default().split(',') {
            let t = term.trim();
            if t.is_empty() {
                continue;
            }
            let (path, value, eq) = if let Some((p, v)) = t.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (p, v, true)
            } else {
                return Err(format!("invalid field selector {t:?}"));
            };
            sel.fields
                .push((path.trim().to_string(), value.trim().to_string(), eq));
        }
        Ok(sel)
    }

    /// Whether an object matches.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, want, eq)| {
                let ptr = format!("/{}", path.replace('.', "/"));
                let got = match obj.pointer(&ptr) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                };
                (got == *want) == *eq
            })
    }
}
