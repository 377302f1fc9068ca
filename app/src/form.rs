//! The start form of one kind, as plain data: which control each property
//! gets, what the form starts from (its `default`), and the params the
//! form's text makes (or what is wrong with it) — per-type parsing, then
//! the kind's [`Schema::check`](crate::kinds::Schema::check), then the
//! simulator's own rule for `simulate`. The views (`ui`) render and call
//! this; nothing here touches the DOM, so it is tested natively.

use crate::kinds::{KindInfo, ParamsError, PropType, Property};
use crate::simulate::{simulate_rules, KIND_SIMULATE};
use serde_json::{Map, Value};

/// The control a property gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// `<input type=number>`; `integer`: whole numbers only.
    Number { integer: bool },
    /// `<input type=text>`.
    Text,
    /// `<input type=checkbox>` (its value is `"true"` or `""`).
    Checkbox,
    /// `<select>` of the property's `enum` (option values are JSON text).
    Select,
}

pub fn control(p: &Property) -> Control {
    if p.one_of.is_some() {
        return Control::Select;
    }
    match p.kind {
        Some(PropType::Integer) => Control::Number { integer: true },
        Some(PropType::Number) => Control::Number { integer: false },
        Some(PropType::Boolean) => Control::Checkbox,
        Some(PropType::String) | None => Control::Text,
    }
}

/// An `enum` value as an `<option value>`: its JSON text.
pub fn option_value(v: &Value) -> String {
    v.to_string()
}

/// An `enum` value as the option's text: strings as they are.
pub fn option_label(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The form's text for a property's `default` (empty without one).
pub fn initial_value(p: &Property) -> String {
    let Some(d) = &p.default else {
        return String::new();
    };
    match control(p) {
        Control::Select => option_value(d),
        Control::Checkbox => {
            if d.as_bool() == Some(true) {
                "true".into()
            } else {
                String::new()
            }
        }
        Control::Text => d.as_str().map_or_else(|| d.to_string(), str::to_string),
        Control::Number { .. } => d.to_string(),
    }
}

/// One field's text as a JSON value; empty text is no value (`None`).
pub fn parse_field(name: &str, p: &Property, raw: &str) -> Result<Option<Value>, ParamsError> {
    let fail = |message: String| ParamsError {
        field: Some(name.to_string()),
        message,
    };
    let label = p.label(name);
    let text = raw.trim();
    match control(p) {
        Control::Checkbox => Ok(Some(Value::Bool(text == "true"))),
        _ if text.is_empty() => Ok(None),
        Control::Select => serde_json::from_str(text)
            .map(Some)
            .map_err(|_| fail(format!("{label}: choose one of the list"))),
        Control::Text => Ok(Some(Value::String(raw.to_string()))),
        Control::Number { integer } => {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Some(Value::from(i)));
            }
            if let Ok(u) = text.parse::<u64>() {
                return Ok(Some(Value::from(u)));
            }
            if integer {
                return Err(fail(format!("{label} must be a whole number")));
            }
            text.parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(|n| Some(Value::Number(n)))
                .ok_or_else(|| fail(format!("{label} must be a number")))
        }
    }
}

/// The params of a start of `kind` from the form's text (one entry per
/// property, in schema order), or the first thing wrong with them.
pub fn form_params(kind: &KindInfo, values: &[String]) -> Result<Value, ParamsError> {
    let Some(schema) = &kind.params else {
        return Ok(Value::Object(Map::new()));
    };
    let mut params = Map::new();
    for ((name, p), raw) in schema.properties.iter().zip(values) {
        if let Some(v) = parse_field(name, p, raw)? {
            params.insert(name.clone(), v);
        }
    }
    let params = Value::Object(params);
    schema.check(&params)?;
    if kind.name == KIND_SIMULATE {
        simulate_rules(&params)?;
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::simulate_kind;
    use serde_json::json;

    fn kind() -> KindInfo {
        serde_json::from_str(
            r#"{"name": "mix", "params": {
                "type": "object",
                "required": ["n"],
                "properties": {
                    "n": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5, "title": "How many"},
                    "label": {"type": "string", "maxLength": 3},
                    "mode": {"enum": ["fast", 2], "default": "fast"},
                    "ratio": {"type": "number"},
                    "loud": {"type": "boolean", "default": true}
                }
            }}"#,
        )
        .unwrap()
    }

    fn start_values(k: &KindInfo) -> Vec<String> {
        let s = k.params.as_ref().unwrap();
        s.properties.iter().map(|(_, p)| initial_value(p)).collect()
    }

    #[test]
    fn the_form_starts_from_the_defaults() {
        let k = kind();
        assert_eq!(start_values(&k), ["5", "", "\"fast\"", "", "true"]);
        assert_eq!(
            form_params(&k, &start_values(&k)).unwrap(),
            json!({"n": 5, "mode": "fast", "loud": true})
        );
        let sim = simulate_kind();
        assert_eq!(start_values(&sim), ["10000", "100", ""]);
    }

    #[test]
    fn each_type_is_parsed() {
        let k = kind();
        let v = |a: [&str; 5]| a.map(str::to_string).to_vec();
        assert_eq!(
            form_params(&k, &v(["7", "ab", "2", "0.5", ""])).unwrap(),
            json!({"n": 7, "label": "ab", "mode": 2, "ratio": 0.5, "loud": false})
        );
        let field = |a| form_params(&k, &v(a)).unwrap_err();
        let e = field(["1.5", "", "", "", ""]);
        assert_eq!(e.field.as_deref(), Some("n"));
        assert_eq!(e.message, "How many must be a whole number");
        assert_eq!(field(["", "", "", "", ""]).message, "How many is required");
        assert_eq!(
            field(["101", "", "", "", ""]).message,
            "How many must be from 1 to 100"
        );
        assert_eq!(
            field(["1", "abcd", "", "", ""]).field.as_deref(),
            Some("label")
        );
        assert_eq!(
            field(["1", "", "", "x", ""]).field.as_deref(),
            Some("ratio")
        );
        assert_eq!(
            field(["1", "", "\"slow\"", "", ""]).field.as_deref(),
            Some("mode")
        );
    }

    #[test]
    fn simulate_keeps_its_fail_at_rule() {
        let sim = simulate_kind();
        let v = |a: [&str; 3]| a.map(str::to_string).to_vec();
        assert_eq!(
            form_params(&sim, &v(["1000", "10", ""])).unwrap(),
            json!({"duration_ms": 1000, "steps": 10})
        );
        assert_eq!(
            form_params(&sim, &v(["1000", "10", "11"]))
                .unwrap_err()
                .field
                .as_deref(),
            Some("fail_at")
        );
        assert_eq!(
            form_params(&sim, &v(["0", "10", ""]))
                .unwrap_err()
                .field
                .as_deref(),
            Some("duration_ms")
        );
    }

    #[test]
    fn a_kind_without_a_schema_sends_no_params() {
        let k = KindInfo {
            name: "free".into(),
            title: None,
            params: None,
        };
        assert_eq!(form_params(&k, &[]).unwrap(), json!({}));
    }
}
