//! Publisher keys and bundles: streamed upload (hashed and checked on the way, visible only once
//! valid), listing, and download with Range and ETag for operators and for the devices a
//! deployment released.

use super::device::DeviceAuth;
use super::extract::{bearer, ApiPath};
use super::AppState;
use crate::db::bundles::{self, Bundle};
use crate::db::tokens::{Principal, Role};
use crate::db::{audit, deployments, now_ms};
use crate::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt as _;
use kernex_protocol::bundle::{self as format, PublisherPublicKey, Splitter};
use serde_json::{json, Value};

type ApiResult<T> = Result<T, ApiError>;

/// Archive bytes kept in memory during an upload to read the manifest from: the manifest is the
/// first entry and at most 64 KiB, so its compressed form fits with room to spare.
const MANIFEST_HEAD: usize = 128 * 1024;

/// `POST /api/v1/publisher-keys`: the body is a PEM public key; the tenant's agents trust it.
#[utoipa::path(post, path = "/api/v1/publisher-keys", tag = "bundles", request_body(content = String, content_type = "text/plain", description = "PEM public key (RSA) of a bundle publisher"), responses((status = 201, description = "Trusted.", body = crate::db::bundles::PublisherKeyView), (status = 200, description = "Already trusted.", body = crate::db::bundles::PublisherKeyView), (status = 400, description = "`invalid_key`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn add_publisher_key(
    State(state): State<AppState>,
    principal: Principal,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Admin)?;
    let pem = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("invalid_key", "the body is not a PEM text"))?;
    let key = PublisherPublicKey::from_pem(pem)
        .map_err(|e| ApiError::bad_request("invalid_key", format!("publisher key: {e}")))?;
    let (stored, created) = bundles::add_publisher_key(
        &state.db,
        &principal.tenant_id,
        &key.fingerprint(),
        &key.to_pem(),
        &principal.actor(),
    )
    .await?;
    if created {
        audit::record(
            &state.db,
            Some(&principal.tenant_id),
            &principal.actor(),
            "publisher_key.added",
            &stored.id,
            json!({"fingerprint": stored.fingerprint}),
        )
        .await;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(stored.view())))
}

#[utoipa::path(get, path = "/api/v1/publisher-keys", tag = "bundles", responses((status = 200, description = "The tenant's publisher keys.", body = [crate::db::bundles::PublisherKeyView])), security(("api_key" = [])))]
pub async fn list_publisher_keys(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let keys = bundles::publisher_keys(&state.db, &principal.tenant_id).await?;
    Ok(Json(json!(keys
        .iter()
        .map(|k| k.view())
        .collect::<Vec<_>>())))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PublisherKeyRevoked {
    id: String,
    /// Always true: agents stop trusting the key with their next `/auth` or deployment.
    revoked: bool,
}

#[utoipa::path(post, path = "/api/v1/publisher-keys/{id}/revoke", tag = "bundles", params(("id" = String, Path, description = "Publisher key id")), responses((status = 200, description = "Revoked.", body = PublisherKeyRevoked), (status = 404, description = "`unknown_publisher_key`: none active with this id.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn revoke_publisher_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<PublisherKeyRevoked>> {
    principal.require(Role::Admin)?;
    if !bundles::revoke_publisher_key(&state.db, &principal.tenant_id, &id).await? {
        return Err(ApiError::not_found(
            "unknown_publisher_key",
            format!("no active publisher key `{id}`"),
        ));
    }
    audit::record_change(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "publisher_key.revoked",
        &id,
        json!({"revoked": false}),
        json!({"revoked": true}),
    )
    .await;
    Ok(Json(PublisherKeyRevoked { id, revoked: true }))
}

/// `POST /api/v1/bundles`: the packed file, streamed. Written to the store while its archive is
/// hashed; visible only after the signature, the manifest and the version have been checked.
#[utoipa::path(post, path = "/api/v1/bundles", tag = "bundles", request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The packed bundle (`kernex-server bundle pack`), streamed"), responses((status = 201, description = "Stored and verified.", body = crate::db::bundles::BundleView), (status = 400, description = "`invalid_bundle`, `invalid_signature`, `upload_interrupted`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`no_publisher_keys`, `version_not_newer`, `bundle_exists` (a concurrent upload of the same version won).", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn upload(
    State(state): State<AppState>,
    principal: Principal,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Operator)?;
    let trusted: Vec<PublisherPublicKey> = bundles::trusted_pems(&state.db, &principal.tenant_id)
        .await?
        .iter()
        .filter_map(|pem| PublisherPublicKey::from_pem(pem).ok())
        .collect();
    if trusted.is_empty() {
        return Err(ApiError::conflict(
            "no_publisher_keys",
            "the tenant trusts no publisher key yet: add one with POST /api/v1/publisher-keys",
        ));
    }
    // The id is drawn before the upload so that the object is written under its final key; it
    // stays invisible there until the commit below.
    let id = crate::db::new_id();
    let object_key = format!("{}/{id}", principal.tenant_id);
    let mut writer = state.store.writer(&object_key).await?;
    let received = receive(&state, body, &mut writer).await;
    let (sealed, head, size) = match received {
        Ok(received) => received,
        Err(err) => {
            writer.abort().await;
            return Err(err);
        }
    };
    let checked = check(&state, &principal, &trusted, &sealed, &head).await;
    let (manifest, publisher) = match checked {
        Ok(checked) => checked,
        Err(err) => {
            writer.abort().await;
            return Err(err);
        }
    };
    let bundle = Bundle {
        id: id.clone(),
        tenant_id: principal.tenant_id.clone(),
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: sealed.sha256.clone(),
        size: size as i64,
        archive_bytes: sealed.archive_bytes as i64,
        manifest: serde_json::to_string(&manifest).map_err(anyhow::Error::from)?,
        publisher,
        object_key,
        created_by: principal.actor(),
        created_at: now_ms(),
        deleted_at: None,
    };
    writer.commit().await?;
    if let Err(err) = bundles::insert(&state.db, &bundle).await {
        let _ = state.store.delete(&bundle.object_key).await;
        return Err(err);
    }
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "bundle.uploaded",
        &bundle.id,
        json!({"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256}),
    )
    .await;
    retire_old_versions(&state, &principal.tenant_id, &bundle.name).await;
    Ok((StatusCode::CREATED, Json(json!(bundle.view()))))
}

/// Streams the body into `writer`: returns the sealed end, the archive's first bytes, the size.
async fn receive(
    state: &AppState,
    body: Body,
    writer: &mut crate::store::ObjectWriter,
) -> ApiResult<(format::Sealed, Vec<u8>, u64)> {
    let limit = state.settings.max_bundle_bytes;
    let mut splitter = Splitter::default();
    let mut head = Vec::with_capacity(MANIFEST_HEAD);
    let mut keep_head = |archive: &[u8]| {
        let room = MANIFEST_HEAD.saturating_sub(head.len());
        head.extend_from_slice(&archive[..room.min(archive.len())]);
        Ok::<_, ApiError>(())
    };
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(
                "upload_interrupted",
                format!("reading the upload failed: {e}"),
            )
        })?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::PayloadTooLarge {
                limit: limit as usize,
            });
        }
        splitter.push(&chunk, &mut keep_head)?;
        writer.write(&chunk).await?;
    }
    let sealed = splitter
        .finish(&mut keep_head)?
        .map_err(|e| ApiError::bad_request("invalid_bundle", e.to_string()))?;
    Ok((sealed, head, size))
}

/// Signature, manifest and version: everything that must hold before the bundle is visible.
async fn check(
    state: &AppState,
    principal: &Principal,
    trusted: &[PublisherPublicKey],
    sealed: &format::Sealed,
    head: &[u8],
) -> ApiResult<(format::Manifest, String)> {
    let publisher = sealed.verify(trusted).map_err(|e| {
        ApiError::bad_request(
            "invalid_signature",
            format!("{e} (archive sha256 {})", sealed.sha256),
        )
    })?;
    let manifest = format::read_manifest(head)
        .map_err(|e| ApiError::bad_request("invalid_bundle", e.to_string()))?;
    let new = manifest.semver();
    let newest = bundles::versions(&state.db, &principal.tenant_id, &manifest.name)
        .await?
        .iter()
        .map(|v| bundles::semver_of(v))
        .max();
    if let Some(newest) = newest.filter(|newest| *newest >= new) {
        return Err(ApiError::conflict(
            "version_not_newer",
            format!(
                "{} {} is not newer than {newest}, the newest version uploaded",
                manifest.name, manifest.version
            ),
        ));
    }
    Ok((manifest, publisher))
}

/// Keeps the newest `bundle_retention` versions of `name` (and any a deployment still uses).
async fn retire_old_versions(state: &AppState, tenant_id: &str, name: &str) {
    let retire =
        match bundles::retirable(&state.db, tenant_id, name, state.settings.bundle_retention).await
        {
            Ok(retire) => retire,
            Err(err) => {
                tracing::warn!(error = %err, bundle = name, "bundle retention failed");
                return;
            }
        };
    for bundle in retire {
        if let Err(err) = bundles::mark_retired(&state.db, &bundle.id).await {
            tracing::warn!(error = %err, bundle = %bundle.id, "retiring a bundle failed");
            continue;
        }
        if let Err(err) = state.store.delete(&bundle.object_key).await {
            tracing::warn!(error = %err, bundle = %bundle.id, "deleting a retired bundle failed");
        }
    }
}

#[utoipa::path(get, path = "/api/v1/bundles", tag = "bundles", responses((status = 200, description = "The tenant's stored bundles.", body = [crate::db::bundles::BundleView])), security(("api_key" = [])))]
pub async fn list(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    let list = bundles::list(&state.db, &principal.tenant_id).await?;
    Ok(Json(json!(list
        .iter()
        .map(Bundle::view)
        .collect::<Vec<_>>())))
}

#[utoipa::path(get, path = "/api/v1/bundles/{id}", tag = "bundles", params(("id" = String, Path, description = "Bundle id")), responses((status = 200, description = "The bundle.", body = crate::db::bundles::BundleView), (status = 404, description = "`unknown_bundle`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let bundle = bundles::get(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_bundle(&id))?;
    Ok(Json(json!(bundle.view())))
}

fn unknown_bundle(id: &str) -> ApiError {
    ApiError::not_found("unknown_bundle", format!("no bundle `{id}`"))
}

/// `GET /api/v1/bundles/{id}/content`: the packed file, with `Range` (resume) and `ETag`, for an
/// operator (API key) or for a device (bearer token from `/auth`) the bundle was released to. A
/// device is redirected (`307`) to a presigned URL when the store hands them out: it follows the
/// redirect with the same `Range` and `If-Range`, and S3 answers them (with its own `ETag`).
#[utoipa::path(get, path = "/api/v1/bundles/{id}/content", tag = "bundles", params(("id" = String, Path, description = "Bundle id"), ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=100-`"), ("If-Range" = Option<String>, Header, description = "The ETag the download began with"), ("If-None-Match" = Option<String>, Header, description = "An ETag the client holds")), responses((status = 200, description = "The whole packed file.", body = Vec<u8>, content_type = "application/octet-stream"), (status = 206, description = "The requested range.", body = Vec<u8>, content_type = "application/octet-stream"), (status = 304, description = "Not modified (`If-None-Match`)."), (status = 307, description = "A device is sent to a presigned URL of the object store."), (status = 404, description = "`unknown_bundle`: none, or not released to this device.", body = kernex_protocol::wire::ErrorBody), (status = 416, description = "`range_not_satisfiable`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = []), ("device_token" = [])))]
pub async fn content(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    request: axum::extract::Request,
) -> ApiResult<Response> {
    let (mut parts, _) = request.into_parts();
    let is_api_key = bearer(&parts.headers).is_some_and(|b| {
        kernex_protocol::SecretToken::parse(kernex_protocol::TokenKind::ApiKey, b).is_ok()
    });
    // The tenant, and the device when a device asks.
    let (tenant_id, device_id) = if is_api_key {
        let principal = Principal::from_request_parts(&mut parts, &state).await?;
        (principal.tenant_id, None)
    } else {
        let DeviceAuth(claims) = DeviceAuth::from_request_parts(&mut parts, &state).await?;
        (claims.tenant_id, Some(claims.device_id))
    };
    let bundle = bundles::get(&state.db, &tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_bundle(&id))?;
    if let Some(device_id) = device_id {
        // Not released to this device: as if it did not exist.
        if !deployments::device_may_fetch(&state.db, &device_id, &bundle.id).await? {
            return Err(unknown_bundle(&id));
        }
        if let Some(url) = state.store.download_url(&bundle.object_key).await? {
            let location = HeaderValue::try_from(url).map_err(anyhow::Error::from)?;
            return Ok((
                StatusCode::TEMPORARY_REDIRECT,
                [
                    (header::LOCATION, location),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
            )
                .into_response());
        }
    }
    serve_object(&state, &bundle, &parts.headers).await
}

async fn serve_object(
    state: &AppState,
    bundle: &Bundle,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let size = bundle.size as u64;
    let etag = bundle.etag();
    let header_str = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if header_str(header::IF_NONE_MATCH)
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    // If-Range: resume only when the file is still the one the client began with.
    let range_applies = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let range = match header_str(header::RANGE).filter(|_| range_applies) {
        None => None,
        Some(value) => match parse_range(value, size) {
            RangeRequest::Satisfiable(start, end) => Some((start, end)),
            RangeRequest::Ignore => None,
            RangeRequest::Unsatisfiable => {
                let mut response = ApiError::RangeNotSatisfiable {
                    message: format!(
                        "range {value:?} is outside the {size} bytes of bundle {}",
                        bundle.id
                    ),
                }
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(response);
            }
        },
    };
    let (status, start, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, size),
    };
    let reader = state.store.read(&bundle.object_key, start, len).await?;
    state
        .metrics
        .bundle_bytes_served
        .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
    let body = Body::from_stream(reader);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// First and last byte, inclusive.
    Satisfiable(u64, u64),
    /// Not a single byte range we serve partially (several ranges, another unit): send it all.
    Ignore,
    Unsatisfiable,
}

/// One `bytes=` range: `a-b`, `a-` or `-n` (the last n bytes).
fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    if spec.contains(',') {
        return RangeRequest::Ignore;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignore;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => match parse(last) {
            Some(0) | None => return RangeRequest::Unsatisfiable,
            Some(n) => (size.saturating_sub(n), size.saturating_sub(1)),
        },
        (false, true) => match parse(first) {
            Some(a) => (a, size.saturating_sub(1)),
            None => return RangeRequest::Ignore,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a <= b => (a, b.min(size.saturating_sub(1))),
            _ => return RangeRequest::Ignore,
        },
        (true, true) => return RangeRequest::Ignore,
    };
    if size == 0 || start >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Satisfiable(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-99", 1000), Satisfiable(0, 99));
        assert_eq!(parse_range("bytes=500-", 1000), Satisfiable(500, 999));
        assert_eq!(parse_range("bytes=-100", 1000), Satisfiable(900, 999));
        assert_eq!(parse_range("bytes=900-5000", 1000), Satisfiable(900, 999));
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ignore);
        assert_eq!(parse_range("items=0-1", 1000), Ignore);
        assert_eq!(parse_range("bytes=5-1", 1000), Ignore);
    }
}
