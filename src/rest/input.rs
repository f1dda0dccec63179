//! Request bodies parsed field by field, so every mistake names its field, and a batch keeps its
//! valid items when others are malformed. The documented schema is the typed `Object`; the
//! parsing is [`FromJson`] on the raw JSON (the rules live in [`crate::input`], shared with the
//! ingest command).

use std::borrow::Cow;
use std::marker::PhantomData;

use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{ParseFromJSON, ParseResult, ToJSON, Type};
use serde_json::Value;

use crate::error::ApiError;
use crate::input::FromJson;

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
