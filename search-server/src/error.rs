//! The one error type of the HTTP layer: every failure a client can cause or see becomes a
//! JSON body `{"error": "..."}` with a status that says whose fault it is (4xx: the request;
//! 5xx: the server), so the page and scripts can show the message as is.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// An error answered to the client. The message is written for the person who sent the
/// request: what was wrong and, where it helps, what to send instead.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad query parameter, wrong multipart field, empty body.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// Writes are disabled on this server.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// Body, field or decoded image larger than the configured limits.
    #[error("{0}")]
    TooLarge(String),
    /// A content type this endpoint does not take (e.g. `text/html` posted as an image).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed request whose content cannot be used: not an image, truncated, too small.
    #[error("{0}")]
    Unprocessable(String),
    /// The inference queue is full; the client should retry shortly.
    #[error("{0}")]
    Busy(String),
    /// The gallery's engine (a remote store) cannot be reached; the client should retry
    /// (the server reconnects by itself once the engine is back).
    #[error("{0}")]
    Unavailable(String),
    /// A server-side failure (I/O, model); logged with details.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// An internal error whose details go to the log; the client gets `what` only, so file
    /// system paths and library internals do not leak into responses.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!("{what}: {err}");
        ApiError::Internal(format!("{what}; see the server log"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Busy(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if let ApiError::Unauthorized(_) = self {
            resp.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let ApiError::Busy(_) | ApiError::Unavailable(_) = self {
            resp.insert_header(("Retry-After", "1"));
        }
        resp.json(serde_json::json!({ "error": self.to_string() }))
    }
}

/// `web::block` failed: the blocking pool is gone (shutdown) or the closure panicked.
impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::internal("a background task failed", e)
    }
}

impl ApiError {
    /// A gallery failure: 503 with the engine's message when its engine is unreachable
    /// (see [`crate::backend::is_unavailable`]), else an internal error about `what`.
    pub fn gallery(what: &str, e: anyhow::Error) -> Self {
        if crate::backend::is_unavailable(&e) {
            tracing::warn!("{what}: {e:#}");
            ApiError::Unavailable(format!("{what}: {e}"))
        } else {
            ApiError::internal(what, format!("{e:#}"))
        }
    }
}
