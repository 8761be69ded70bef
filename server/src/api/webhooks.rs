//! `/api/v1/webhooks`: subscriptions (admin only: a URL may carry the receiver's credentials) and
//! their delivery log.

use super::extract::{ApiJson, ApiPath};
use super::AppState;
use crate::db::audit;
use crate::db::tokens::{Principal, Role};
use crate::db::webhooks::{self, EVENT_KINDS};
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookBody {
    url: String,
    /// Event kinds, or `["*"]`; all when absent.
    #[serde(default)]
    events: Vec<String>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CreatedWebhook {
    /// HMAC-SHA256 key of `kernex-webhook-signature`: shown this once.
    secret: String,
    #[serde(flatten)]
    details: webhooks::WebhookView,
}

/// Checks a receiver URL: absolute http(s) with a host, no fragment.
fn check_url(url: &str) -> ApiResult<()> {
    let invalid =
        |why: &str| ApiError::bad_request("invalid_webhook", format!("url {url:?}: {why}"));
    let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("only http and https receivers are supported"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    if parsed.fragment().is_some() {
        return Err(invalid("a fragment is never sent; remove it"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = CreateWebhookBody, responses((status = 201, description = "Subscribed; `secret` (the signing key) is shown this once.", body = CreatedWebhook), (status = 400, description = "`invalid_webhook`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateWebhookBody>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Admin)?;
    check_url(&body.url)?;
    if let Some(unknown) = body
        .events
        .iter()
        .find(|e| e.as_str() != "*" && !EVENT_KINDS.contains(&e.as_str()))
    {
        return Err(ApiError::bad_request(
            "invalid_webhook",
            format!(
                "unknown event kind {unknown:?}; known: {}, or \"*\"",
                EVENT_KINDS.join(", ")
            ),
        ));
    }
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let hook = webhooks::create(
        &state.db,
        &principal.tenant_id,
        &body.url,
        &webhooks::events_column(&body.events),
        &secret,
    )
    .await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "webhook.created",
        &hook.id,
        json!({"events": hook.view().events}),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            // The signing secret, shown this once.
            secret,
            details: hook.view(),
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks", responses((status = 200, description = "The tenant's webhooks (never their secrets).", body = [crate::db::webhooks::WebhookView]), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn list(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    let hooks = webhooks::list(&state.db, &principal.tenant_id).await?;
    Ok(Json(json!(hooks
        .iter()
        .map(|h| h.view())
        .collect::<Vec<_>>())))
}

fn unknown_webhook(id: &str) -> ApiError {
    ApiError::not_found("unknown_webhook", format!("no webhook `{id}`"))
}

#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "Webhook id")), responses((status = 204, description = "Deleted."), (status = 404, description = "`unknown_webhook`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    principal.require(Role::Admin)?;
    let before = webhooks::get(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_webhook(&id))?;
    if !webhooks::delete(&state.db, &principal.tenant_id, &id).await? {
        return Err(unknown_webhook(&id));
    }
    audit::record_change(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "webhook.deleted",
        &id,
        json!(before.view()),
        json!(null),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// The delivery log: the newest 100 deliveries with their attempts, status and error.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks", params(("id" = String, Path, description = "Webhook id")), responses((status = 200, description = "The newest 100 deliveries with their attempts, status and error.", body = [crate::db::webhooks::DeliveryView]), (status = 404, description = "`unknown_webhook`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn deliveries(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    webhooks::get(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_webhook(&id))?;
    let log = webhooks::deliveries(&state.db, &id, 100).await?;
    Ok(Json(json!(log
        .iter()
        .map(|d| d.view())
        .collect::<Vec<_>>())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_urls_are_checked() {
        assert!(check_url("https://hooks.example.com/kernex?token=x").is_ok());
        assert!(check_url("http://127.0.0.1:9000/").is_ok());
        for (bad, why) in [
            ("ftp://example.com/", "only http and https"),
            ("hooks.example.com", "relative URL"),
            ("https://example.com/#frag", "fragment"),
        ] {
            let err = check_url(bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }
}
