//! The device protocol: enrollment, authentication, heartbeats.

use super::extract::{bearer, DeviceJson, SignedBody};
use super::AppState;
use crate::db::bundles;
use crate::db::devices;
use crate::db::tokens::TokenState;
use crate::db::{audit, new_id, now_ms, tenants, tokens, with_pool};
use crate::device_token::DeviceClaims;
use crate::error::ApiError;
use crate::heartbeat::{Beat, BeatOutcome};
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use kernex_protocol::wire::{
    codes, AuthRequest, AuthResponse, EnrollRequest, EnrollResponse, HeartbeatRequest,
    HeartbeatResponse, MAX_INTERVAL_S, MIN_INTERVAL_S,
};
use kernex_protocol::{DevicePublicKey, SecretToken, SigningError, TokenKind, MAX_CLOCK_SKEW_S};
use serde_json::json;

/// Most command results accepted in one heartbeat.
const MAX_ACKS: usize = 64;

fn invalid_token() -> ApiError {
    ApiError::unauthorized(
        "invalid_token",
        "the bootstrap token is not valid for this tenant",
    )
}

fn deregistered() -> ApiError {
    ApiError::forbidden(
        codes::DEVICE_DEREGISTERED,
        "this device has been deregistered",
    )
}

fn signature_error(e: SigningError) -> ApiError {
    match e {
        SigningError::WrongKeySize { .. } | SigningError::PublicKeyPem(_) => {
            ApiError::bad_request("invalid_public_key", e.to_string())
        }
        _ => ApiError::unauthorized("bad_signature", e.to_string()),
    }
}

/// `POST /api/v1/enroll`. Idempotent: the same key, or the same hardware id with a new key (a
/// re-installed appliance), gets the same device back.
#[utoipa::path(post, path = "/api/v1/enroll", tag = "device protocol", request_body = kernex_protocol::wire::EnrollRequest, params(("kernex-signature" = String, Header, description = "Base64 RSA signature of the exact body by the device key")), responses((status = 201, description = "Enrolled a new device.", body = kernex_protocol::wire::EnrollResponse), (status = 200, description = "The same device again (same key, or same hardware id re-keyed).", body = kernex_protocol::wire::EnrollResponse), (status = 400, description = "`invalid_public_key`, `invalid_hardware_id`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 401, description = "`missing_signature`, `bad_signature`, `invalid_token`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`token_revoked`, `token_expired`, `token_exhausted`, `device_deregistered`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`enrollment_conflict`: retry.", body = kernex_protocol::wire::ErrorBody)))]
pub async fn enroll(
    State(state): State<AppState>,
    body: SignedBody,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let request: EnrollRequest = body.json()?;
    // Proof of possession first: nothing below runs for a body the key did not sign.
    let public_key = DevicePublicKey::from_pem(&request.public_key).map_err(signature_error)?;
    public_key
        .verify(&body.bytes, &body.signature)
        .map_err(signature_error)?;
    if request.hardware_id.trim().is_empty() || request.hardware_id.len() > 256 {
        return Err(ApiError::bad_request(
            "invalid_hardware_id",
            "hardware_id must be 1 to 256 characters",
        ));
    }
    let token =
        SecretToken::parse(TokenKind::Bootstrap, &request.token).map_err(|_| invalid_token())?;
    let tenant = tenants::by_name(&state.db, &request.tenant)
        .await?
        .ok_or_else(invalid_token)?;
    let token_row = tokens::bootstrap_token(&state.db, &tenant.id, token.id())
        .await?
        .filter(|row| row.matches(&token))
        .ok_or_else(invalid_token)?;
    let now = now_ms();
    let token_state = token_row.state(now);
    if token_state == TokenState::Revoked {
        return Err(ApiError::forbidden(
            "token_revoked",
            "the bootstrap token has been revoked",
        ));
    }
    let fingerprint = public_key.fingerprint();
    let facts = serde_json::to_string(&request.facts).map_err(anyhow::Error::from)?;

    // A retry of an enrollment that succeeded (the response was lost): same device, no use spent.
    if let Some(device) = devices::by_fingerprint(&state.db, &tenant.id, &fingerprint).await? {
        if device.deregistered_at.is_some() {
            return Err(deregistered());
        }
        return Ok((
            StatusCode::OK,
            Json(EnrollResponse {
                device_id: device.id,
                publisher_keys: bundles::trusted_pems(&state.db, &tenant.id).await?,
                tenant: tenant.name,
                created: false,
            }),
        ));
    }
    match token_state {
        TokenState::Expired => {
            return Err(ApiError::forbidden(
                "token_expired",
                "the bootstrap token has expired",
            ))
        }
        TokenState::Exhausted => return Err(exhausted()),
        TokenState::Active | TokenState::Revoked => {}
    }

    let outcome = with_pool!(&state.db, pool => {
        let mut tx = pool.begin().await?;
        // Spend one use atomically; the conditions repeat the checks above against concurrent enrollments.
        let spent = sqlx::query(
            "UPDATE bootstrap_tokens SET uses = uses + 1 WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL
             AND (expires_at IS NULL OR expires_at > $3) AND (uses_allowed IS NULL OR uses < uses_allowed)")
            .bind(&token_row.id)
            .bind(&tenant.id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if spent.rows_affected() == 0 {
            return Err(exhausted());
        }
        let existing: Option<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT id, key_fingerprint, deregistered_at FROM devices WHERE tenant_id = $1 AND hardware_id = $2")
            .bind(&tenant.id)
            .bind(&request.hardware_id)
            .fetch_optional(&mut *tx)
            .await?;
        let outcome = match existing {
            Some((_, _, Some(_))) => return Err(deregistered()),
            Some((id, old_fingerprint, None)) => {
                sqlx::query(
                    "UPDATE devices SET public_key = $1, key_fingerprint = $2, facts = $3, enrolled_with = $4,
                     last_auth_nonce = NULL WHERE id = $5")
                    .bind(public_key.to_pem())
                    .bind(&fingerprint)
                    .bind(&facts)
                    .bind(&token_row.id)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                Enrolled::Rekeyed { id, old_fingerprint }
            }
            None => {
                let id = new_id();
                let inserted = sqlx::query(
                    "INSERT INTO devices (id, tenant_id, hardware_id, key_fingerprint, public_key, facts, enrolled_at, enrolled_with)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                    .bind(&id)
                    .bind(&tenant.id)
                    .bind(&request.hardware_id)
                    .bind(&fingerprint)
                    .bind(public_key.to_pem())
                    .bind(&facts)
                    .bind(now)
                    .bind(&token_row.id)
                    .execute(&mut *tx)
                    .await;
                match inserted {
                    Ok(_) => {
                        sqlx::query(crate::db::devices::INSERT_HEARTBEAT_ROW)
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                        Enrolled::Created { id }
                    }
                    Err(e) if crate::db::is_unique_violation(&e) => {
                        return Err(ApiError::conflict("enrollment_conflict", "a concurrent enrollment of this device won; retry"))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        tx.commit().await?;
        Ok::<_, ApiError>(outcome)
    })?;

    let actor = format!("token:{}", token_row.id);
    let (device_id, status) = match outcome {
        Enrolled::Created { id } => {
            audit::record(
                &state.db,
                Some(&tenant.id),
                &actor,
                "device.enrolled",
                &id,
                json!({"hardware_id": request.hardware_id, "key_fingerprint": fingerprint}),
            )
            .await;
            crate::db::webhooks::emit(
                &state.db,
                &tenant.id,
                "device.enrolled",
                json!({"device_id": id, "hardware_id": request.hardware_id}),
            )
            .await;
            tracing::info!(device = %id, tenant = %tenant.name, "device enrolled");
            (id, StatusCode::CREATED)
        }
        Enrolled::Rekeyed {
            id,
            old_fingerprint,
        } => {
            audit::record(&state.db, Some(&tenant.id), &actor, "device.rekeyed", &id,
                json!({"hardware_id": request.hardware_id, "before": {"key_fingerprint": old_fingerprint},
                       "after": {"key_fingerprint": fingerprint}})).await;
            tracing::warn!(device = %id, tenant = %tenant.name, "device re-enrolled with a new key");
            (id, StatusCode::OK)
        }
    };
    state
        .metrics
        .enrollments
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok((
        status,
        Json(EnrollResponse {
            device_id,
            publisher_keys: bundles::trusted_pems(&state.db, &tenant.id).await?,
            tenant: tenant.name,
            created: status == StatusCode::CREATED,
        }),
    ))
}

enum Enrolled {
    Created { id: String },
    Rekeyed { id: String, old_fingerprint: String },
}

fn exhausted() -> ApiError {
    ApiError::forbidden("token_exhausted", "the bootstrap token has no uses left")
}

/// `POST /api/v1/auth`: one RSA verification, then a bearer token for heartbeats.
#[utoipa::path(post, path = "/api/v1/auth", tag = "device protocol", request_body = kernex_protocol::wire::AuthRequest, params(("kernex-signature" = String, Header, description = "Base64 RSA signature of the exact body by the device key")), responses((status = 200, description = "A device token for heartbeats.", body = kernex_protocol::wire::AuthResponse), (status = 400, description = "`malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 401, description = "`missing_signature`, `bad_signature`, `clock_skew`, `replayed_request`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`device_deregistered`.", body = kernex_protocol::wire::ErrorBody), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody)))]
pub async fn auth(
    State(state): State<AppState>,
    body: SignedBody,
) -> Result<Json<AuthResponse>, ApiError> {
    let request: AuthRequest = body.json()?;
    let device = devices::by_id(&state.db, &request.device_id)
        .await?
        .ok_or_else(unknown_device)?;
    if device.deregistered_at.is_some() {
        return Err(deregistered());
    }
    let public_key = DevicePublicKey::from_pem(&device.public_key).map_err(anyhow::Error::from)?;
    public_key
        .verify(&body.bytes, &body.signature)
        .map_err(signature_error)?;
    let now_s = now_ms() / 1000;
    if (now_s - request.timestamp).abs() > MAX_CLOCK_SKEW_S {
        return Err(ApiError::unauthorized(
            "clock_skew",
            format!("request timestamp {} is more than {MAX_CLOCK_SKEW_S} s from the server's clock {now_s}", request.timestamp),
        ));
    }
    if request.nonce.len() < 16
        || !devices::accept_auth_nonce(&state.db, &device.id, &request.nonce).await?
    {
        return Err(ApiError::unauthorized(
            "replayed_request",
            "the auth request's nonce was already used",
        ));
    }
    let ttl = state.settings.device_token_ttl.as_secs();
    let publisher_keys = bundles::trusted_pems(&state.db, &device.tenant_id).await?;
    let token = state.device_tokens.issue(&DeviceClaims {
        device_id: device.id,
        tenant_id: device.tenant_id,
        expires_at: now_s + ttl as i64,
    });
    Ok(Json(AuthResponse {
        token,
        expires_in_s: ttl,
        publisher_keys,
    }))
}

fn unknown_device() -> ApiError {
    ApiError::not_found(codes::UNKNOWN_DEVICE, "no such device; enroll again")
}

/// The claims of the device token in `Authorization`.
pub struct DeviceAuth(pub DeviceClaims);

impl axum::extract::FromRequestParts<AppState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already checked by the rate limiter, which needed the device id.
        if let Some(claims) = parts.extensions.remove::<DeviceClaims>() {
            return Ok(DeviceAuth(claims));
        }
        let token = bearer(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized(
                codes::INVALID_DEVICE_TOKEN,
                "a device token is required (Authorization: Bearer ...)",
            )
        })?;
        state
            .device_tokens
            .verify(token, now_ms() / 1000)
            .map(DeviceAuth)
    }
}

/// What is stored of a heartbeat's telemetry: the samples and, beside them, the user-VM links
/// (shown as the device's `vms`).
#[derive(serde::Serialize)]
struct StoredTelemetry<'a> {
    #[serde(flatten)]
    telemetry: &'a kernex_protocol::wire::Telemetry,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    vms: &'a [kernex_protocol::vmlink::VmStatus],
}

/// `POST /api/v1/heartbeat`: store telemetry and acks, answer with the interval and open commands.
#[utoipa::path(post, path = "/api/v1/heartbeat", tag = "device protocol", request_body = kernex_protocol::wire::HeartbeatRequest, responses((status = 200, description = "The next interval and the open commands.", body = kernex_protocol::wire::HeartbeatResponse), (status = 400, description = "`too_many_acks`, `invalid_interval`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`device_deregistered`.", body = kernex_protocol::wire::ErrorBody), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody)), security(("device_token" = [])))]
pub async fn heartbeat(
    State(state): State<AppState>,
    DeviceJson(claims, request): DeviceJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    if request.acks.len() > MAX_ACKS {
        return Err(ApiError::bad_request(
            "too_many_acks",
            format!("at most {MAX_ACKS} acks per heartbeat"),
        ));
    }
    let suggested = state
        .settings
        .heartbeat_interval
        .as_secs()
        .clamp(1, u64::from(MAX_INTERVAL_S)) as u32;
    let interval_s = request.interval_s.unwrap_or(suggested);
    if !(MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&interval_s) {
        return Err(ApiError::bad_request(
            "invalid_interval",
            format!("interval_s must be between {MIN_INTERVAL_S} and {MAX_INTERVAL_S}"),
        ));
    }
    let mem_percent = match request.telemetry.mem_total_bytes {
        0 => 0.0,
        total => {
            100.0 * total.saturating_sub(request.telemetry.mem_available_bytes) as f64
                / total as f64
        }
    };
    // Before the write (which takes the id): a refused beat's sample does no harm.
    state.samples.record(
        &claims.device_id,
        request.telemetry.cpu_percent,
        mem_percent,
    );
    let beat = Beat {
        device_id: claims.device_id,
        agent_version: request.agent_version.chars().take(64).collect(),
        interval_s,
        telemetry_json: serde_json::to_string(&StoredTelemetry {
            telemetry: &request.telemetry,
            vms: &request.vms,
        })
        .map_err(anyhow::Error::from)?,
        acks: request.acks,
    };
    match state.heartbeats.submit(beat).await? {
        BeatOutcome::Accepted { commands } => Ok(Json(HeartbeatResponse {
            interval_s: suggested,
            commands,
        })),
        BeatOutcome::Deregistered => Err(deregistered()),
        BeatOutcome::UnknownDevice => Err(unknown_device()),
    }
}
