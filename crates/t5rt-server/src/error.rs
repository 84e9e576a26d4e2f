//! Errors as Text Generation Inference sends them: `{"error": "...", "error_type": "..."}`
//! with 422 (validation), 429 (overloaded), 503 (shutting down), 424 (generation), 413
//! (body too large) or 400 (unreadable body).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use t5rt::engine::SubmitError;

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
    pub error_type: String,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: message.into(),
                error_type: error_type.into(),
            },
        }
    }

    /// A request that breaks a rule or a limit (422).
    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    /// Generation failed after the request was accepted (424, as TGI).
    pub fn generation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FAILED_DEPENDENCY, "generation", message)
    }

    /// The error type as the metrics label it.
    pub fn kind(&self) -> &str {
        &self.body.error_type
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Invalid(m) => ApiError::validation(m),
            SubmitError::Overloaded(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", m)
            }
            SubmitError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is shutting down",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
