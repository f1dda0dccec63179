//! One JSON error shape everywhere (`{code, message, field?}`): for the handlers' own errors,
//! for what poem and poem-openapi reject before a handler runs (bad parameters, bad JSON,
//! unknown paths, oversize bodies), and never a 500 for a client's mistake.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use crate::auth::AuthError;
use crate::error::{ApiError, ErrorCode};

/// An error answer.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(rename = "Error")]
pub struct ErrorBody {
    /// `invalid_argument`, `unauthenticated`, `permission_denied`, `not_found`,
    /// `already_exists`, `payload_too_large`, `unsupported_media_type`, `unavailable` or
    /// `internal`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault (body field, path or query parameter), when there is one.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<&ApiError> for ErrorBody {
    fn from(e: &ApiError) -> Self {
        Self {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
            field: e.field.clone(),
        }
    }
}

/// The error answers of every operation.
#[derive(Debug, ApiResponse)]
pub enum ErrorResponse {
    /// A field is malformed, of the wrong type or out of range; `field` names it.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No bearer token, or one that is not valid (expired, signed with another key, not a
    /// JWT): `field` is `authorization`, and `WWW-Authenticate` says why (RFC 6750 §3).
    #[oai(status = 401)]
    Unauthorized(
        Json<ErrorBody>,
        /// `Bearer realm="udaconnect"`, with `error="invalid_token"` and its description when
        /// a token was sent and refused.
        #[oai(header = "WWW-Authenticate")]
        String,
    ),
    /// The caller's role may not do this (an attendee reading or posting for another person,
    /// a gateway reading anyone's data); the message says what is refused, `field` where.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The person, location or episode named does not exist.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The `event_id` was already used for a different report (person, place or time).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body or the batch is too large.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The body is not sent as `Content-Type: application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// PostgreSQL, the broker or the owning process does not answer, or the pipeline has not
    /// started yet; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
    /// A bug on our side.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
}

impl From<ApiError> for ErrorResponse {
    fn from(e: ApiError) -> Self {
        let body = Json(ErrorBody::from(&e));
        match e.code {
            ErrorCode::InvalidArgument => Self::BadRequest(body),
            ErrorCode::NotFound => Self::NotFound(body),
            ErrorCode::AlreadyExists => Self::Conflict(body),
            ErrorCode::PayloadTooLarge => Self::PayloadTooLarge(body),
            ErrorCode::UnsupportedMediaType => Self::UnsupportedMediaType(body),
            ErrorCode::Unavailable => Self::Unavailable(body),
            ErrorCode::Unauthenticated => Self::Unauthorized(body, AuthError::Missing.challenge()),
            ErrorCode::PermissionDenied => Self::Forbidden(body),
            ErrorCode::Internal => Self::Internal(body),
        }
    }
}

impl ErrorResponse {
    /// The 401 of a request whose bearer token is missing or refused.
    pub fn unauthorized(e: &AuthError) -> Self {
        Self::Unauthorized(Json(ErrorBody::from(&e.api_error())), e.challenge())
    }
}

impl From<crate::store::StoreError> for ErrorResponse {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

/// The REST result of an operation.
pub type RestResult<T> = Result<T, ErrorResponse>;

/// Turns any error poem or poem-openapi raised before (or around) a handler into the JSON
/// shape, naming the parameter when the error is about one.
pub fn poem_error_response(err: poem::Error, templates: &PathTemplates, path: &str) -> Response {
    use poem_openapi::error::{ParseParamError, ParsePathError, ParseRequestPayloadError};

    // A handler's own error answer, already in the shape.
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let (code, field, message) = if let Some(e) = err.downcast_ref::<ParseParamError>() {
        (
            ErrorCode::InvalidArgument,
            Some(e.name.to_owned()),
            format!("{}: {}", e.name, e.reason),
        )
    } else if let Some(e) = err.downcast_ref::<ParsePathError>() {
        // poem-openapi names path parameters by position (`param0`); find the real name.
        let name = e
            .name
            .strip_prefix("param")
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| templates.param_name(path, n))
            .unwrap_or(e.name)
            .to_owned();
        let message = format!("{name}: {}", e.reason);
        (ErrorCode::InvalidArgument, Some(name), message)
    } else if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
        (
            ErrorCode::InvalidArgument,
            Some("body".to_owned()),
            format!("the request body is not valid: {}", e.reason),
        )
    } else {
        let code = match status {
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => ErrorCode::NotFound,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthenticated,
            StatusCode::FORBIDDEN => ErrorCode::PermissionDenied,
            StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
            s if s.is_client_error() => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        };
        let message = match status {
            StatusCode::NOT_FOUND => "no such path; see /docs for the API".to_owned(),
            StatusCode::PAYLOAD_TOO_LARGE => format!(
                "the request body is larger than the {} bytes allowed",
                super::MAX_BODY_BYTES
            ),
            _ => err.to_string(),
        };
        (code, None, message)
    };
    if code == ErrorCode::Internal {
        tracing::error!(error = %err, "request failed");
    }
    let body = ErrorBody {
        code: code.as_str().to_owned(),
        message,
        field,
    };
    // Keep the status poem chose (405, 415 stay what they are); the body is the shared shape.
    let status = if status.is_success() {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        status
    };
    poem::web::Json(body).with_status(status).into_response()
}

/// The path templates of the API (`/v1/persons/{person_id}`), to name path parameters.
#[derive(Debug, Default)]
pub struct PathTemplates(Vec<Vec<String>>);

impl PathTemplates {
    /// The templates of an OpenAPI document.
    pub fn from_spec(spec: &str) -> Self {
        let spec: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let templates = spec["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .keys()
                    .map(|p| p.trim_matches('/').split('/').map(str::to_owned).collect())
                    .collect()
            })
            .unwrap_or_default();
        Self(templates)
    }

    /// The name of the `n`th path parameter of the template `path` matches.
    pub fn param_name(&self, path: &str, n: usize) -> Option<&str> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let is_param = |t: &str| t.starts_with('{') && t.ends_with('}');
        let template = self.0.iter().find(|t| {
            t.len() == segments.len() && t.iter().zip(&segments).all(|(t, s)| is_param(t) || t == s)
        })?;
        template
            .iter()
            .filter(|t| is_param(t))
            .nth(n)
            .map(|t| t.trim_start_matches('{').trim_end_matches('}'))
    }
}
