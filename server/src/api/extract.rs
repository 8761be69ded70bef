//! Extractors that turn every malformed request into an [`ApiError`] with a stable code, instead of
//! axum's plain-text rejections.

use super::AppState;
use crate::db::tokens::{authenticate_api_key, Principal};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use kernex_protocol::{SecretToken, TokenKind};
use serde::de::DeserializeOwned;

/// `axum::Json` with JSON errors: 400 `malformed_json` / `invalid_request`, 413, 415.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(ApiError::bad_request("malformed_json", e.body_text()))
            }
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::bad_request("invalid_request", e.body_text()))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType {
                message: "expected Content-Type: application/json".into(),
            }),
            Err(JsonRejection::BytesRejection(e)) => Err(body_error(e, state.settings.body_limit)),
            Err(other) => Err(ApiError::bad_request("invalid_request", other.body_text())),
        }
    }
}

/// A device's JSON body on the heartbeat path, with the claims of its device token. The body is
/// read first, so a refused request never leaves it unread (what the `read_whole_body` layer does
/// for the other routes, without that layer's cost on the hottest route), then the token is
/// checked (HMAC, no database), then the JSON parsed. Errors as [`ApiJson`]'s.
pub struct DeviceJson<T>(pub crate::device_token::DeviceClaims, pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for DeviceJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.settings.body_limit;
        let (mut parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge { limit })?;
        let super::device::DeviceAuth(claims) =
            super::device::DeviceAuth::from_request_parts(&mut parts, state).await?;
        let json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType {
                message: "expected Content-Type: application/json".into(),
            });
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::bad_request(
                "invalid_request",
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            ),
            _ => ApiError::bad_request(
                "malformed_json",
                format!("Failed to parse the request body as JSON: {e}"),
            ),
        })?;
        Ok(DeviceJson(claims, value))
    }
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::bad_request("invalid_body", e.body_text())
    }
}

/// A device request body with its signature header, before anything is parsed: the signature covers
/// the exact bytes.
#[derive(Debug)]
pub struct SignedBody {
    pub bytes: Bytes,
    pub signature: String,
}

impl FromRequest<AppState> for SignedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let signature = req
            .headers()
            .get(kernex_protocol::SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing_signature",
                    format!(
                        "the `{}` header is required",
                        kernex_protocol::SIGNATURE_HEADER
                    ),
                )
            })?;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_error(e, state.settings.body_limit))?;
        Ok(SignedBody { bytes, signature })
    }
}

impl SignedBody {
    /// Parses the body as JSON (after the caller has checked the signature, or to find the key).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.bytes).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                ApiError::bad_request(
                    "malformed_json",
                    format!("request body is not valid JSON: {e}"),
                )
            } else {
                ApiError::bad_request("invalid_request", format!("request body: {e}"))
            }
        })
    }
}

/// The bearer value of the `Authorization` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                "invalid_api_key",
                "a valid API key is required (Authorization: Bearer kxk_...)",
            )
        };
        let key = bearer(&parts.headers)
            .and_then(|value| SecretToken::parse(TokenKind::ApiKey, value).ok())
            .ok_or_else(invalid)?;
        authenticate_api_key(&state.db, &key)
            .await?
            .ok_or_else(invalid)
    }
}

/// `axum::extract::Path` with a JSON 400 `invalid_path` (a parameter that is not UTF-8 once
/// percent-decoded), instead of axum's plain-text rejection.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// `axum::extract::Query` with a JSON 400 `invalid_query` that names the bad parameter.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}
