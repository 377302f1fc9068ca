//! The task kinds a server offers and the params each takes, as both ends
//! know them: the server checks a `start` against a kind's schema before it
//! asks the backend (`invalid_params` naming the field), and the page
//! renders each kind's form from the same schema and checks it before
//! sending.
//!
//! The schema is a subset of JSON Schema: an object whose properties are
//! `integer`, `number`, `string` or `boolean` (or an `enum` of values), with
//! `minimum`, `maximum`, `maxLength`, `default`, `title`, `description`, and
//! the object's `required` list.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A kind as a client sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KindInfo {
    /// What clients send as `kind`.
    pub name: String,
    /// What the page calls it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Its params; `None`: passed through unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Schema>,
}

impl KindInfo {
    pub fn title(&self) -> &str {
        self.title.as_deref().unwrap_or(&self.name)
    }
}

/// An object schema (the params of one kind).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Always `object`.
    #[serde(rename = "type")]
    pub kind: ObjectType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// In the order the form shows them (TOML and JSON objects keep it).
    #[serde(default, with = "ordered")]
    pub properties: Vec<(String, Property)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectType {
    Object,
}

/// The type of one property.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropType {
    Integer,
    Number,
    String,
    Boolean,
}

/// One property of a schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Property {
    /// Absent only with `enum`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PropType>,
    #[serde(rename = "enum", default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    #[serde(rename = "maxLength", default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What is wrong with some params: the field, when one is to blame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsError {
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ParamsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Schema {
    /// Is the schema itself usable? (Checked once, at start-up.)
    pub fn validate(&self) -> Result<(), String> {
        for name in &self.required {
            if !self.properties.iter().any(|(p, _)| p == name) {
                return Err(format!(
                    "`required` names `{name}`, which is not a property"
                ));
            }
        }
        for (name, p) in &self.properties {
            if p.kind.is_none() && p.one_of.is_none() {
                return Err(format!("property `{name}` needs a `type` or an `enum`"));
            }
            if let (Some(lo), Some(hi)) = (p.minimum, p.maximum) {
                if lo > hi {
                    return Err(format!("property `{name}`: minimum is above maximum"));
                }
            }
            if let Some(d) = &p.default {
                p.check(name, d)
                    .map_err(|e| format!("property `{name}`: its default: {}", e.message))?;
            }
        }
        Ok(())
    }

    /// Checks `params` (an object, or `null` for none). Properties the
    /// schema does not name pass through, and `default` fills nothing in
    /// (JSON Schema's rules: a default is what the form starts from).
    pub fn check(&self, params: &Value) -> Result<(), ParamsError> {
        let empty = Map::new();
        let given = match params {
            Value::Object(m) => m,
            Value::Null => &empty,
            _ => {
                return Err(ParamsError {
                    field: None,
                    message: "params must be an object".into(),
                })
            }
        };
        for (name, p) in &self.properties {
            match given.get(name) {
                Some(v) if !v.is_null() => p.check(name, v)?,
                _ if self.required.contains(name) => {
                    return Err(ParamsError {
                        field: Some(name.clone()),
                        message: format!("{} is required", p.label(name)),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Property {
    /// The form's label: the title, else the name.
    pub fn label<'a>(&'a self, name: &'a str) -> &'a str {
        self.title.as_deref().unwrap_or(name)
    }

    /// Checks one given value.
    pub fn check(&self, name: &str, v: &Value) -> Result<(), ParamsError> {
        let fail = |message: String| {
            Err(ParamsError {
                field: Some(name.to_string()),
                message,
            })
        };
        let label = self.label(name);
        if let Some(allowed) = &self.one_of {
            if !allowed.contains(v) {
                let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
                return fail(format!("{label} must be one of {}", list.join(", ")));
            }
        }
        match self.kind {
            Some(PropType::Integer) => {
                let ok = v.as_i64().is_some() || v.as_u64().is_some();
                if !ok {
                    return fail(format!("{label} must be a whole number"));
                }
            }
            Some(PropType::Number) if !v.is_number() => {
                return fail(format!("{label} must be a number"));
            }
            Some(PropType::String) => match v.as_str() {
                None => return fail(format!("{label} must be text")),
                Some(s) => {
                    if let Some(max) = self.max_length {
                        if s.chars().count() as u64 > max {
                            return fail(format!("{label} must be at most {max} characters"));
                        }
                    }
                }
            },
            Some(PropType::Boolean) if !v.is_boolean() => {
                return fail(format!("{label} must be true or false"));
            }
            _ => {}
        }
        if let Some(n) = v.as_f64() {
            match (self.minimum, self.maximum) {
                (Some(lo), Some(hi)) if n < lo || n > hi => {
                    return fail(format!("{label} must be from {} to {}", num(lo), num(hi)));
                }
                (Some(lo), None) if n < lo => {
                    return fail(format!("{label} must be at least {}", num(lo)));
                }
                (None, Some(hi)) if n > hi => {
                    return fail(format!("{label} must be at most {}", num(hi)));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// 10 rather than 10.0 in messages.
fn num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// `properties` as an ordered list: a map would sort the form's fields.
mod ordered {
    use super::Property;
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(String, Property)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(v.len()))?;
        for (k, p) in v {
            map.serialize_entry(k, p)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Property)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, Property)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of properties")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, Property)> = Vec::new();
                while let Some((k, p)) = m.next_entry::<String, Property>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom(format!("property `{k}` twice")));
                    }
                    out.push((k, p));
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// The `simulate` kind's schema, from the simulator's own bounds.
pub fn simulate_kind() -> KindInfo {
    use crate::simulate::{KIND_SIMULATE, MAX_DURATION_MS, MAX_STEPS};
    let int = |title: &str, min: f64, max: f64, default: Option<u64>| Property {
        kind: Some(PropType::Integer),
        one_of: None,
        minimum: Some(min),
        maximum: Some(max),
        max_length: None,
        default: default.map(Value::from),
        title: Some(title.to_string()),
        description: None,
    };
    KindInfo {
        name: KIND_SIMULATE.into(),
        title: Some("Simulated work".into()),
        params: Some(Schema {
            kind: ObjectType::Object,
            required: vec!["duration_ms".into(), "steps".into()],
            properties: vec![
                (
                    "duration_ms".into(),
                    int("Duration (ms)", 1.0, MAX_DURATION_MS as f64, Some(10_000)),
                ),
                (
                    "steps".into(),
                    int("Steps", 1.0, MAX_STEPS as f64, Some(100)),
                ),
                (
                    "fail_at".into(),
                    int("Fail at step (optional)", 0.0, MAX_STEPS as f64, None),
                ),
            ],
            title: None,
            description: None,
        }),
    }
}

/// Kinds by name, for lookups.
pub fn by_name(kinds: &[KindInfo]) -> BTreeMap<&str, &KindInfo> {
    kinds.iter().map(|k| (k.name.as_str(), k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// From text: `json!` would sort the properties.
    fn schema() -> Schema {
        serde_json::from_str(
            r#"{
            "type": "object",
            "required": ["n"],
            "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": 1000, "title": "Count"},
                "label": {"type": "string", "maxLength": 5, "default": "x"},
                "mode": {"enum": ["fast", "slow"]},
                "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                "loud": {"type": "boolean"}
            }
        }"#,
        )
        .unwrap()
    }

    #[test]
    fn properties_keep_their_order() {
        let s = schema();
        let names: Vec<&str> = s.properties.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["n", "label", "mode", "ratio", "loud"]);
        let back = serde_json::to_string(&s).unwrap();
        let again: Schema = serde_json::from_str(&back).unwrap();
        assert_eq!(again, s);
        s.validate().unwrap();
    }

    #[test]
    fn good_params_pass_and_unnamed_ones_pass_through() {
        schema().check(&json!({"n": 3, "extra": true})).unwrap();
        schema().check(&json!({"n": 3, "fail_at": null})).unwrap();
    }

    #[test]
    fn bad_params_name_the_field() {
        let s = schema();
        let field = |p: Value| s.check(&p).unwrap_err().field;
        assert_eq!(field(json!({})), Some("n".into()));
        assert_eq!(field(json!({"n": 0})), Some("n".into()));
        assert_eq!(field(json!({"n": 1.5})), Some("n".into()));
        assert_eq!(field(json!({"n": "3"})), Some("n".into()));
        assert_eq!(
            field(json!({"n": 2, "label": "toolong"})),
            Some("label".into())
        );
        assert_eq!(
            field(json!({"n": 2, "mode": "medium"})),
            Some("mode".into())
        );
        assert_eq!(field(json!({"n": 2, "ratio": 2})), Some("ratio".into()));
        assert_eq!(field(json!({"n": 2, "loud": "yes"})), Some("loud".into()));
        assert_eq!(s.check(&json!([1])).unwrap_err().field, None);
        let msg = s.check(&json!({"n": 0})).unwrap_err().message;
        assert_eq!(msg, "Count must be from 1 to 1000");
    }

    #[test]
    fn a_broken_schema_is_refused() {
        let bad: Schema = serde_json::from_value(json!({
            "type": "object", "required": ["zz"], "properties": {"a": {"type": "integer"}}
        }))
        .unwrap();
        assert!(bad.validate().is_err());
        let bad_default: Schema = serde_json::from_value(json!({
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "default": 1}}
        }))
        .unwrap();
        assert!(bad_default.validate().is_err());
        assert!(serde_json::from_value::<Schema>(json!({"type": "array"})).is_err());
        assert!(serde_json::from_value::<Schema>(
            json!({"type": "object", "properties": {"a": {"type": "integer", "pattern": "x"}}})
        )
        .is_err());
    }

    #[test]
    fn the_simulate_kind_matches_the_simulators_bounds() {
        let k = simulate_kind();
        let s = k.params.unwrap();
        s.validate().unwrap();
        s.check(&json!({"duration_ms": 10_000, "steps": 100, "fail_at": null}))
            .unwrap();
        assert!(s.check(&json!({})).is_err());
        assert!(s.check(&json!({"duration_ms": 0, "steps": 1})).is_err());
    }
}
