//! Templates: `{kind}`, `{params}` and `{id}` filled into paths
//! (percent-encoded) and into JSON bodies (as JSON values).

use serde_json::Value;
use std::fmt::Write;

/// What a template may refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placeholder {
    Kind,
    Params,
    /// `{id}`, or `{+id}` (RFC 6570 reserved expansion: `/` kept).
    Id,
}

/// The values at hand for one request.
#[derive(Clone, Copy, Default)]
pub(crate) struct Vars<'a> {
    pub kind: Option<&'a str>,
    pub params: Option<&'a Value>,
    pub id: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    Var(Placeholder),
    /// `{+id}`: slashes kept, for APIs whose ids are resource paths.
    IdKeepSlash,
}

/// A path (and query) template, parsed once.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Path {
    pieces: Vec<Piece>,
}

impl Path {
    /// Parses `/v1/{id}:cancel`; only the `allowed` placeholders may appear,
    /// and the text must be fit for a request line.
    pub(crate) fn parse(template: &str, allowed: &[Placeholder]) -> Result<Path, String> {
        if !template.starts_with('/') {
            return Err(format!("must start with `/` (got `{template}`)"));
        }
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            push_text(&mut pieces, &rest[..open])?;
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?
                + open;
            let name = &rest[open..=close];
            let piece = match name {
                "{kind}" => Piece::Var(Placeholder::Kind),
                "{params}" => Piece::Var(Placeholder::Params),
                "{id}" => Piece::Var(Placeholder::Id),
                "{+id}" => Piece::IdKeepSlash,
                _ => {
                    return Err(format!(
                    "unknown placeholder `{name}` (known: {{kind}}, {{params}}, {{id}}, {{+id}})"
                ))
                }
            };
            let placeholder = match piece {
                Piece::Var(p) => p,
                _ => Placeholder::Id,
            };
            if !allowed.contains(&placeholder) {
                return Err(format!("`{name}` cannot be used here"));
            }
            pieces.push(piece);
            rest = &rest[close + 1..];
        }
        push_text(&mut pieces, rest)?;
        Ok(Path { pieces })
    }

    pub(crate) fn has(&self, placeholder: Placeholder) -> bool {
        self.pieces.iter().any(|p| match p {
            Piece::Var(v) => *v == placeholder,
            Piece::IdKeepSlash => placeholder == Placeholder::Id,
            Piece::Text(_) => false,
        })
    }

    /// The path with every value percent-encoded (the template's own text
    /// is kept as written).
    pub(crate) fn render(&self, vars: Vars<'_>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(Placeholder::Kind) => {
                    encode_into(&mut out, vars.kind.unwrap_or(""), false)
                }
                Piece::Var(Placeholder::Params) => {
                    let text = vars.params.map(Value::to_string).unwrap_or_default();
                    encode_into(&mut out, &text, false)
                }
                Piece::Var(Placeholder::Id) => encode_into(&mut out, vars.id.unwrap_or(""), false),
                Piece::IdKeepSlash => encode_into(&mut out, vars.id.unwrap_or(""), true),
            }
        }
        out
    }
}

fn push_text(pieces: &mut Vec<Piece>, text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Ok(());
    }
    if let Some(c) = text
        .chars()
        .find(|&c| !c.is_ascii_graphic() || matches!(c, '#' | '}'))
    {
        return Err(format!(
            "`{c}` cannot appear in a path as written (percent-encode it)"
        ));
    }
    pieces.push(Piece::Text(text.to_string()));
    Ok(())
}

/// Percent-encodes all but RFC 3986's unreserved characters (and `/` if
/// `keep_slash`).
pub(crate) fn encode_into(out: &mut String, value: &str, keep_slash: bool) {
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// A body template filled in: a string that is exactly a placeholder
/// becomes its JSON value (`"{params}"` the params object, `"{kind}"` and
/// `"{id}"` strings); inside a longer string a placeholder is replaced by
/// its text. Object keys are kept as written; a placeholder with no value
/// at hand is kept as written.
pub(crate) fn fill(template: &Value, vars: Vars<'_>) -> Value {
    match template {
        Value::String(s) => fill_string(s, vars),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, vars)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn fill_string(s: &str, vars: Vars<'_>) -> Value {
    match (s, vars) {
        (
            "{params}",
            Vars {
                params: Some(p), ..
            },
        ) => return p.clone(),
        ("{kind}", Vars { kind: Some(k), .. }) => return Value::String(k.into()),
        ("{id}" | "{+id}", Vars { id: Some(i), .. }) => return Value::String(i.into()),
        _ => {}
    }
    if !s.contains('{') {
        return Value::String(s.into());
    }
    let mut out = s.to_string();
    if let Some(k) = vars.kind {
        out = out.replace("{kind}", k);
    }
    if let Some(p) = vars.params {
        out = out.replace("{params}", &p.to_string());
    }
    if let Some(i) = vars.id {
        out = out.replace("{+id}", i).replace("{id}", i);
    }
    Value::String(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALL: &[Placeholder] = &[Placeholder::Kind, Placeholder::Params, Placeholder::Id];

    fn render(template: &str, id: &str) -> String {
        Path::parse(template, ALL).unwrap().render(Vars {
            id: Some(id),
            kind: Some("re port"),
            ..Vars::default()
        })
    }

    #[test]
    fn paths_encode_values_not_the_template() {
        assert_eq!(render("/v1/{id}", "jobs/7"), "/v1/jobs%2F7");
        assert_eq!(render("/v1/{id}:cancel", "a b/c"), "/v1/a%20b%2Fc:cancel");
        assert_eq!(
            render("/v1/{+id}:cancel", "operations/a b"),
            "/v1/operations/a%20b:cancel"
        );
        assert_eq!(
            render("/x?kind={kind}&id={id}", "é?&#%"),
            "/x?kind=re%20port&id=%C3%A9%3F%26%23%25"
        );
        assert_eq!(render("/v1/{id}", "A-z_0.9~"), "/v1/A-z_0.9~");
    }

    #[test]
    fn bad_path_templates_are_refused() {
        assert!(Path::parse("v1/{id}", ALL)
            .unwrap_err()
            .contains("start with `/`"));
        assert!(Path::parse("/v1/{id", ALL)
            .unwrap_err()
            .contains("unclosed"));
        assert!(Path::parse("/v1/{name}", ALL)
            .unwrap_err()
            .contains("unknown placeholder `{name}`"));
        assert!(Path::parse("/v1/a b", ALL).unwrap_err().contains("` `"));
        assert!(Path::parse("/v1/{id}", &[Placeholder::Kind])
            .unwrap_err()
            .contains("cannot be used here"));
        assert!(Path::parse("/v1/{+id}", ALL).unwrap().has(Placeholder::Id));
        assert!(!Path::parse("/v1/jobs", ALL).unwrap().has(Placeholder::Id));
    }

    #[test]
    fn bodies_take_json_values_whole_and_text_inside_strings() {
        let params = json!({"n": 3, "tags": ["a"]});
        let vars = Vars {
            kind: Some("report"),
            params: Some(&params),
            id: None,
        };
        let template = json!({
            "type": "{kind}",
            "input": "{params}",
            "label": "a {kind} of {params}",
            "list": ["{params}", 1, null, true],
            "{kind}": "key kept",
            "id": "{id}",
        });
        assert_eq!(
            fill(&template, vars),
            json!({
                "type": "report",
                "input": {"n": 3, "tags": ["a"]},
                "label": "a report of {\"n\":3,\"tags\":[\"a\"]}",
                "list": [{"n": 3, "tags": ["a"]}, 1, null, true],
                "{kind}": "key kept",
                "id": "{id}",
            })
        );
        let vars = Vars {
            id: Some("jobs/1"),
            ..Vars::default()
        };
        assert_eq!(
            fill(&json!({"name": "{id}", "why": "stop {id}"}), vars),
            json!({"name": "jobs/1", "why": "stop jobs/1"})
        );
        assert_eq!(
            fill(
                &json!("{params}"),
                Vars {
                    params: Some(&params),
                    ..Vars::default()
                }
            ),
            params
        );
    }
}
