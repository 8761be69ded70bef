//! User accounts of the web console, managed by the tenant's admins (the first one comes from
//! `kernex-server user create`).

use super::extract::{ApiJson, ApiPath};
use super::AppState;
use crate::db::tokens::{Principal, Role};
use crate::db::{audit, users};
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

type ApiResult<T> = Result<T, ApiError>;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    /// 1–64 of a-z, 0-9, `.`, `_`, `@`, `-`, starting with a letter or digit; unique across
    /// tenants.
    username: String,
    /// At least 12 characters; stored as an Argon2id hash.
    password: String,
    role: Role,
}

// By hand: the password must never reach a log line through `{:?}`.
impl std::fmt::Debug for CreateUserBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUserBody")
            .field("username", &self.username)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

#[utoipa::path(get, path = "/api/v1/users", tag = "users", responses((status = 200, description = "The tenant's console users (never their passwords).", body = [crate::db::users::UserView]), (status = 403, description = "`forbidden`: the caller's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn list(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    let rows = users::list(&state.db, &principal.tenant_id).await?;
    Ok(Json(json!(rows
        .iter()
        .map(|u| u.view())
        .collect::<Vec<_>>())))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = CreateUserBody, responses((status = 201, description = "Created; the user can log in to the console.", body = crate::db::users::UserView), (status = 400, description = "`invalid_username`, `weak_password`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`user_exists`: the username is taken (in any tenant).", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the caller's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateUserBody>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Admin)?;
    let user = users::create(
        &state.db,
        &principal.tenant_id,
        &body.username,
        &body.password,
        body.role,
    )
    .await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "user.created",
        &user.username,
        json!({"role": user.role}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(user.view())))
}

#[utoipa::path(post, path = "/api/v1/users/{username}/disable", tag = "users", params(("username" = String, Path, description = "Username")), responses((status = 200, description = "Disabled (idempotent): the user's console sessions have ended.", body = crate::db::users::UserView), (status = 404, description = "`unknown_user`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the caller's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn disable(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(username): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    let find = || async {
        users::list(&state.db, &principal.tenant_id)
            .await
            .map(|all| all.into_iter().find(|u| u.username == username))
    };
    if find().await?.is_none() {
        return Err(ApiError::not_found(
            "unknown_user",
            format!("no user `{username}`"),
        ));
    }
    if users::disable(&state.db, &principal.tenant_id, &username).await? {
        audit::record_change(
            &state.db,
            Some(&principal.tenant_id),
            &principal.actor(),
            "user.disabled",
            &username,
            json!({"disabled": false}),
            json!({"disabled": true}),
        )
        .await;
    }
    let user = find()
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_user", format!("no user `{username}`")))?;
    Ok(Json(json!(user.view())))
}
