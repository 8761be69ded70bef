//! The OpenAPI document of the REST API and the device protocol, generated from the handlers'
//! `#[utoipa::path]` attributes and the `ToSchema` derives of the types they read and answer, and
//! served at `GET /api/v1/openapi.json`.
//!
//! The answers every route can give whatever it does (401 on authenticated routes, 429, 503, 500,
//! 400 for bodies, queries and path parameters, 413 / 415 for bodies) are added here by
//! [`CommonResponses`], from what each operation declares (security, body, parameters), so that
//! the attributes list only what is particular to the route.
//! `every_route_of_the_router_is_documented` keeps the document and the router in step.

use super::{bundles, deployments, device, rest, users, webhooks};
use axum::http::header;
use axum::response::IntoResponse;
use kernex_protocol::wire::ErrorBody;
use std::sync::LazyLock;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kernex-server",
        description = "The Kernex control plane: the operator REST API (bearer API keys, \
            `kxk_...`) and the device protocol (signed enrollment and auth, then bearer device \
            tokens). Every error answers `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}` \
            with a stable `code`; 429 and 503 carry `Retry-After`."
    ),
    paths(
        openapi_json,
        device::enroll,
        device::auth,
        device::heartbeat,
        rest::list_tenants,
        rest::get_tenant,
        rest::list_tokens,
        rest::create_token,
        rest::get_token,
        rest::revoke_token,
        rest::list_api_keys,
        rest::create_api_key,
        rest::revoke_api_key,
        users::list,
        users::create,
        users::disable,
        rest::list_devices,
        rest::get_device,
        rest::deregister_device,
        rest::list_commands,
        rest::queue_command,
        rest::get_command,
        deployments::put_labels,
        rest::list_audit,
        bundles::list_publisher_keys,
        bundles::add_publisher_key,
        bundles::revoke_publisher_key,
        bundles::list,
        bundles::upload,
        bundles::get,
        bundles::content,
        deployments::list,
        deployments::create,
        deployments::get,
        deployments::pause,
        deployments::resume,
        deployments::cancel,
        deployments::rollback,
        deployments::report,
        webhooks::list,
        webhooks::create,
        webhooks::delete,
        webhooks::deliveries,
        rest::healthz,
        rest::readyz,
        rest::metrics,
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes, &CommonResponses),
    tags(
        (name = "device protocol", description = "What agents call: enrollment, auth, heartbeats, deployment reports"),
        (name = "tenants"),
        (name = "tokens", description = "Bootstrap tokens that enroll devices"),
        (name = "apikeys", description = "API keys of the REST API"),
        (name = "users", description = "Console user accounts (admin)"),
        (name = "devices"),
        (name = "audit"),
        (name = "bundles", description = "Publisher keys, signed bundles and their download"),
        (name = "deployments"),
        (name = "webhooks", description = "Signed event deliveries to the tenant's receivers (admin)"),
        (name = "probes", description = "Liveness, readiness and Prometheus metrics (no authentication)"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The document, built once: it depends on nothing but the code.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serializes")
});

/// The OpenAPI document as a value (for tests and tools).
pub fn document() -> Document {
    ApiDoc::openapi()
}

/// `GET /api/v1/openapi.json`: this document. Open like `/healthz`: it describes, it grants nothing.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "probes",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server.", body = Object)))]
pub async fn openapi_json() -> axum::response::Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

#[derive(Debug)]
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "api_key",
            bearer("An API key (`kxk_...`) from `kernex-server apikey create` or `POST /api/v1/apikeys`"),
        );
        components.add_security_scheme(
            "device_token",
            bearer("A device token from `POST /api/v1/auth`"),
        );
    }
}

/// Adds the answers that do not depend on what a route does (see the module comment).
#[derive(Debug)]
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, doc: &mut Document) {
        for item in doc.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                add_common_responses(operation);
            }
        }
    }
}

fn add_common_responses(operation: &mut Operation) {
    let secured = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    let json_body = operation.request_body.as_ref().is_some_and(|body| {
        body.content
            .keys()
            .any(|content_type| content_type == "application/json")
    });
    let has_parameter = |place: fn(&ParameterIn) -> bool| {
        operation
            .parameters
            .as_ref()
            .is_some_and(|parameters| parameters.iter().any(|p| place(&p.parameter_in)))
    };
    let has_query = has_parameter(|p| matches!(p, ParameterIn::Query));
    let has_path = has_parameter(|p| matches!(p, ParameterIn::Path));
    let responses = &mut operation.responses.responses;
    let mut add = |status: u16, description: &str, retry_after: bool| {
        let mut response = ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        );
        if retry_after {
            response = response.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(
                        utoipa::openapi::ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::Integer),
                    )
                    .description(Some("Seconds to wait before retrying"))
                    .build(),
            );
        }
        match responses.entry(status.to_string()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(response.build().into());
            }
            // The route lists its own codes for this status; the shared ones are added to them.
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                if let utoipa::openapi::RefOr::T(own) = slot.get_mut() {
                    own.description = format!("{} Also: {description}", own.description);
                }
            }
        }
    };
    if json_body || has_query || has_path {
        add(
            400,
            "The request is malformed: `malformed_json`, `invalid_request`, `invalid_query`, \
             `invalid_path` (a path parameter that is not UTF-8).",
            false,
        );
    }
    if secured {
        add(
            401,
            "No valid credentials: `invalid_api_key` or `invalid_device_token`.",
            false,
        );
    }
    if operation.request_body.is_some() {
        add(
            413,
            "`payload_too_large`: the body is over the server's limit.",
            false,
        );
    }
    if json_body {
        add(
            415,
            "`unsupported_media_type`: the body must be `application/json`.",
            false,
        );
    }
    add(
        429,
        "`rate_limited`: over the rate limit of this device, API key or address.",
        true,
    );
    add(
        500,
        "`internal`: a server fault (details are logged, never returned).",
        false,
    );
    add(
        503,
        "Not served now: `database_unavailable`, `overloaded`, `timeout` or `not_ready`.",
        true,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_valid_json_with_every_schema_it_refers_to() {
        let doc: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = DOCUMENT.as_str();
        for reference in text.split("\"$ref\":\"").skip(1) {
            let name = reference
                .split('"')
                .next()
                .unwrap()
                .strip_prefix("#/components/schemas/")
                .unwrap();
            assert!(schemas.contains_key(name), "dangling $ref to {name}");
        }
        // The error body of DESIGN.md, with its code.
        assert_eq!(
            doc["components"]["schemas"]["ErrorDetail"]["required"],
            serde_json::json!(["code", "message"])
        );
    }
}
