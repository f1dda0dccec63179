//! The one error shape of the front ends: an [`ErrorCode`] that maps to both an HTTP status and
//! a `tonic::Code` (quickwit-proto's `ServiceErrorCode`), a message, and the offending field.

use serde::Serialize;

use crate::store::StoreError;

/// What kind of failure a request met; REST and gRPC derive their status from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed: a field has the wrong type, is out of range or missing.
    InvalidArgument,
    /// The named resource does not exist.
    NotFound,
    /// An id is already taken by something else (an `event_id` reused for a different report).
    AlreadyExists,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The request body is not sent as `Content-Type: application/json`.
    UnsupportedMediaType,
    /// No or a wrong bearer token.
    Unauthenticated,
    /// The caller is known, and the rules ([`crate::auth::Principal::check`]) refuse what it
    /// asks.
    PermissionDenied,
    /// A dependency (PostgreSQL, the broker, the owning process) does not answer; retry later.
    Unavailable,
    /// A bug on our side; never used for client mistakes.
    Internal,
}

impl ErrorCode {
    /// The HTTP status of this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::AlreadyExists => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// The gRPC status code of this code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::PayloadTooLarge => tonic::Code::ResourceExhausted,
            Self::UnsupportedMediaType => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The code's name in error bodies (`invalid_argument`, `not_found`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// A failed request: its code, a message for people, and the field at fault when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    /// A bad value in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// The thing named (by `field`, when given) does not exist.
    pub fn not_found(field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::NotFound,
            message: message.into(),
            field: field.map(str::to_owned),
        }
    }

    /// No person has `id` (404/NOT_FOUND naming `person_id`).
    pub fn unknown_person(id: i64) -> Self {
        Self::not_found(Some("person_id"), format!("no person with id {id}"))
    }

    /// A dependency does not answer.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unavailable,
            message: message.into(),
            field: None,
        }
    }

    /// Any other code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// `field: message`, or the message alone.
    pub fn describe(&self) -> String {
        match &self.field {
            Some(field) => format!("{field}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            // A statement that fails because the server went away is an outage, not a bug.
            StoreError::Unavailable(_) => Self::unavailable(e.to_string()),
            StoreError::Postgres(pg) if pg.is_closed() || pg.code().is_none() => {
                Self::unavailable(e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "store error");
                Self::new(ErrorCode::Internal, e.to_string())
            }
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::from(e).into()
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::from(e).into()
    }
}

impl From<ApiError> for tonic::Status {
    /// The message carries the field first (`lat: must be between …`), and the field also goes
    /// into the `x-error-field` metadata entry.
    fn from(e: ApiError) -> Self {
        let mut status = tonic::Status::new(e.code.grpc_code(), e.describe());
        if let Some(field) = &e.field {
            if let Ok(value) = field.parse() {
                status.metadata_mut().insert("x-error-field", value);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_a_client_or_server_status_consistently() {
        let codes = [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::Unauthenticated,
            ErrorCode::PermissionDenied,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ];
        for code in codes {
            let http = code.http_status();
            let server_side = matches!(code, ErrorCode::Unavailable | ErrorCode::Internal);
            assert_eq!(http >= 500, server_side, "{code:?} → {http}");
            assert_ne!(code.grpc_code(), tonic::Code::Ok);
            assert_eq!(
                serde_json::to_value(code).expect("serializes"),
                serde_json::json!(code.as_str())
            );
        }
    }

    #[test]
    fn grpc_status_names_the_field() {
        let status: tonic::Status = ApiError::invalid("lat", "must be between -90 and 90").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "lat: must be between -90 and 90");
        assert_eq!(
            status
                .metadata()
                .get("x-error-field")
                .and_then(|v| v.to_str().ok()),
            Some("lat")
        );
    }
}
