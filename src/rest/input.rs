//! Request bodies parsed field by field, so every mistake names its field, and a batch keeps its
//! valid items when others are malformed. The documented schema is the typed `Object`; the
//! parsing is [`FromJson`] on the raw JSON.

use std::borrow::Cow;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{ParseFromJSON, ParseResult, ToJSON, Type};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;

/// A body type read from raw JSON with errors that name the field.
pub trait FromJson: Sized {
    fn from_json(value: &Value) -> Result<Self, ApiError>;
}

/// A JSON body documented as `T` but accepted as any JSON, then checked with
/// [`FromJson`]: poem-openapi's own parse errors do not name the field, and a batch must not
/// fail as a whole because one item is malformed.
pub struct Checked<T> {
    value: Value,
    _of: PhantomData<fn() -> T>,
}

impl<T> Checked<T> {
    /// The body read as `U` (the documented `T` or its validated form), or what is wrong with
    /// which field.
    pub fn parse_as<U: FromJson>(&self) -> Result<U, ApiError> {
        U::from_json(&self.value)
    }

    /// The raw JSON.
    pub fn raw(&self) -> &Value {
        &self.value
    }
}

impl<T: Type> Type for Checked<T> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Value;
    type RawElementValueType = Value;

    fn name() -> Cow<'static, str> {
        T::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Value> {
        Some(&self.value)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Value> + 'a> {
        Box::new(std::iter::once(&self.value))
    }
}

impl<T: Type> ParseFromJSON for Checked<T> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        Ok(Self {
            value: value.unwrap_or(Value::Null),
            _of: PhantomData,
        })
    }
}

impl<T: Type> ToJSON for Checked<T> {
    fn to_json(&self) -> Option<Value> {
        Some(self.value.clone())
    }
}

/// The fields of one JSON object.
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The object's fields; `what` names the value when it is not an object.
    pub fn of(value: &'a Value, what: &str) -> Result<Self, ApiError> {
        match value {
            Value::Object(object) => Ok(Self { object }),
            other => Err(ApiError::invalid(
                what,
                format!("must be a JSON object (got {})", kind(other)),
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name).filter(|v| !v.is_null())
    }

    /// A field's raw JSON; `null` counts as absent.
    pub fn get_raw(&self, name: &str) -> Option<&'a Value> {
        self.get(name)
    }

    fn required(&self, name: &str) -> Result<&'a Value, ApiError> {
        self.get(name)
            .ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    /// A required string.
    pub fn string(&self, name: &str) -> Result<&'a str, ApiError> {
        match self.required(name)? {
            Value::String(s) => Ok(s),
            other => Err(ApiError::invalid(
                name,
                format!("must be a string (got {})", kind(other)),
            )),
        }
    }

    /// A required non-blank string of at most `max` characters, trimmed.
    pub fn text(&self, name: &str, max: usize) -> Result<String, ApiError> {
        let s = self.string(name)?.trim();
        if s.is_empty() {
            return Err(ApiError::invalid(name, "must not be empty"));
        }
        if s.chars().count() > max {
            return Err(ApiError::invalid(
                name,
                format!("must be at most {max} characters"),
            ));
        }
        Ok(s.to_owned())
    }

    /// A required integer.
    pub fn integer(&self, name: &str) -> Result<i64, ApiError> {
        let v = self.required(name)?;
        v.as_i64().ok_or_else(|| {
            ApiError::invalid(name, format!("must be an integer (got {})", describe(v)))
        })
    }

    /// A required number.
    pub fn number(&self, name: &str) -> Result<f64, ApiError> {
        let v = self.required(name)?;
        v.as_f64().ok_or_else(|| {
            ApiError::invalid(name, format!("must be a number (got {})", describe(v)))
        })
    }

    /// An optional UUID.
    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Uuid::parse_str(s)
                .map(Some)
                .map_err(|_| ApiError::invalid(name, format!("must be a UUID (got {s:?})"))),
            Some(other) => Err(ApiError::invalid(
                name,
                format!("must be a UUID string (got {})", kind(other)),
            )),
        }
    }

    /// A required RFC 3339 time with an offset.
    pub fn time(&self, name: &str) -> Result<DateTime<Utc>, ApiError> {
        let s = self.string(name)?;
        parse_rfc3339(s).ok_or_else(|| {
            ApiError::invalid(
                name,
                format!("must be an RFC 3339 time such as 2020-08-18T10:37:06Z (got {s:?})"),
            )
        })
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Number(n) => format!("{n}"),
        other => kind(other).to_owned(),
    }
}

/// An RFC 3339 time with an offset (`Z` or `±hh:mm`).
pub fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let v = json!({"a": "x", "n": 1.5, "i": "7", "t": "yesterday", "u": 3});
        let f = Fields::of(&v, "body").expect("object");
        let err = |r: Result<(), ApiError>| r.expect_err("must fail");
        let e = err(f.integer("n").map(drop));
        assert_eq!(
            (e.field.as_deref(), e.message.as_str()),
            (Some("n"), "must be an integer (got 1.5)")
        );
        let e = err(f.integer("i").map(drop));
        assert_eq!(e.message, "must be an integer (got the string \"7\")");
        let e = err(f.number("missing").map(drop));
        assert_eq!(
            (e.field.as_deref(), e.message.as_str()),
            (Some("missing"), "is required")
        );
        assert_eq!(err(f.time("t").map(drop)).field.as_deref(), Some("t"));
        assert_eq!(err(f.uuid("u").map(drop)).field.as_deref(), Some("u"));
        assert_eq!(
            err(f.text("missing", 5).map(drop)).field.as_deref(),
            Some("missing")
        );
        assert_eq!(f.string("a").ok(), Some("x"));
        assert_eq!(f.number("n").ok(), Some(1.5));
        let e = Fields::of(&json!([1]), "events[3]")
            .err()
            .expect("not an object");
        assert_eq!(e.field.as_deref(), Some("events[3]"));
    }

    #[test]
    fn times_need_an_offset() {
        assert!(parse_rfc3339("2020-08-18T10:37:06Z").is_some());
        assert!(parse_rfc3339("2020-08-18T12:37:06+02:00").is_some());
        assert!(parse_rfc3339("2020-08-18T10:37:06").is_none());
    }
}
