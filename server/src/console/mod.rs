//! The web console: server-rendered pages under `/console`, served by `kernex-server` itself.
//!
//! The console is a view over the REST API's own handlers: every page calls the handlers the API
//! routes call, with the principal of the logged-in session, and renders what they return. So a
//! console action checks exactly the roles, writes exactly the audit events and webhooks, and
//! fails with exactly the errors of the API call it stands for; the database is touched here only
//! to log in (checking the key or password, starting the session, auditing the login) and to find
//! and end sessions.
//!
//! Security: a session is an HttpOnly, SameSite=Strict cookie (Secure unless the server is plain
//! HTTP on loopback) naming a row of `console_sessions`; every form carries the session's CSRF
//! token, a cross-origin `Origin` is refused, pages forbid framing and any script
//! (`Content-Security-Policy`), and failed logins count against the source address like failed
//! API keys (see `api::limits`).

mod pages;
mod render;

use crate::api::AppState;
use crate::db::tokens::{authenticate_api_key, constant_time_eq, Principal};
use crate::db::users::{self, Login, Session};
use crate::error::ApiError;
use axum::extract::{FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use kernex_protocol::{SecretToken, TokenKind};
use std::collections::HashMap;
use std::time::Duration;

pub use render::PageError;

/// The console's settings.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// How long a login lasts.
    pub session_lifetime: Duration,
    /// Mark the session cookie `Secure` (sent over HTTPS only): on whenever the browser reaches
    /// the server over HTTPS, directly or through a proxy.
    pub secure_cookies: bool,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            session_lifetime: Duration::from_secs(12 * 3600),
            secure_cookies: false,
        }
    }
}

const COOKIE: &str = "kernex_console";

/// Every console route as `(method, template)`, for the per-route metrics.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/console"),
    ("GET", "/console/static/console.css"),
    ("GET", "/console/login"),
    ("POST", "/console/login"),
    ("POST", "/console/logout"),
    ("GET", "/console/devices"),
    ("GET", "/console/devices/{id}"),
    ("POST", "/console/devices/{id}/ping"),
    ("POST", "/console/devices/{id}/deregister"),
    ("GET", "/console/tokens"),
    ("POST", "/console/tokens"),
    ("POST", "/console/tokens/{id}/revoke"),
    ("GET", "/console/bundles"),
    ("GET", "/console/deployments"),
    ("POST", "/console/deployments"),
    ("GET", "/console/deployments/{id}"),
    ("POST", "/console/deployments/{id}/{action}"),
    ("GET", "/console/audit"),
    ("GET", "/console/tenant"),
    ("POST", "/console/users"),
    ("POST", "/console/users/{username}/disable"),
    ("GET", "/console/{*rest}"),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/devices") }),
        )
        .route("/console/static/console.css", get(stylesheet))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/devices", get(pages::devices))
        .route("/console/devices/{id}", get(pages::device))
        .route("/console/devices/{id}/ping", post(pages::ping_device))
        .route(
            "/console/devices/{id}/deregister",
            post(pages::deregister_device),
        )
        .route(
            "/console/tokens",
            get(pages::tokens).post(pages::create_token),
        )
        .route("/console/tokens/{id}/revoke", post(pages::revoke_token))
        .route("/console/bundles", get(pages::bundles))
        .route(
            "/console/deployments",
            get(pages::deployments).post(pages::create_deployment),
        )
        .route("/console/deployments/{id}", get(pages::deployment))
        .route(
            "/console/deployments/{id}/{action}",
            post(pages::act_on_deployment),
        )
        .route("/console/audit", get(pages::audit))
        .route("/console/tenant", get(pages::tenant))
        .route("/console/users", post(pages::create_user))
        .route(
            "/console/users/{username}/disable",
            post(pages::disable_user),
        )
        .route("/console/{*rest}", get(not_found))
        .layer(axum::middleware::map_response(secure_headers))
}

/// No framing, no scripts, nothing from elsewhere, no caching of pages that show secrets.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("static/console.css"),
    )
        .into_response()
}

async fn not_found() -> PageError {
    PageError::from(ApiError::not_found(
        "not_found",
        "there is no such page in the console",
    ))
}

/// The logged-in session of a request. A request without one is sent to the login page (a page)
/// or refused (a form post: its data would be lost by a redirect anyway).
#[derive(Debug, Clone)]
pub struct ConsoleSession {
    pub session: Session,
}

impl ConsoleSession {
    pub fn principal(&self) -> &Principal {
        &self.session.principal
    }

    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_form(&self, form: &HashMap<String, String>) -> Result<(), PageError> {
        let sent = form.get("csrf").map(String::as_bytes).unwrap_or_default();
        if constant_time_eq(sent, self.session.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(PageError {
                error: ApiError::forbidden(
                    "invalid_csrf",
                    "the form's CSRF token is missing or not this session's: reload the page and try again",
                ),
                session: Some(Box::new(self.clone())),
            })
        }
    }
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A form posted from another site (an `Origin` that is not this host) is refused whatever it
/// carries. Browsers send `Origin` with every POST; tools that send none are not browsers.
/// "This host" is what the browser addressed: the URI's authority (HTTP/2 has no `Host` header),
/// the `Host` header, or `X-Forwarded-Host` from a proxy that rewrites `Host`. A cross-site form
/// cannot set headers, so none of these can be forged by the page that would profit.
fn same_origin(parts: &Parts) -> bool {
    let Some(origin) = parts.headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin_host) = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest)
    else {
        return false;
    };
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|h: &HeaderValue| h.to_str().ok())
    };
    [
        parts.uri.authority().map(|a| a.as_str()),
        header(header::HOST),
        header(header::HeaderName::from_static("x-forwarded-host")),
    ]
    .into_iter()
    .flatten()
    .any(|host| host.eq_ignore_ascii_case(origin_host))
}

impl FromRequestParts<AppState> for ConsoleSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        if parts.method != axum::http::Method::GET && !same_origin(parts) {
            return Err(PageError::from(ApiError::forbidden(
                "cross_origin",
                "a form from another site was refused",
            ))
            .into_response());
        }
        let found = match cookie_value(&parts.headers, COOKIE) {
            Some(cookie) => users::session(&state.db, cookie)
                .await
                .map_err(|e| PageError::from(ApiError::from(e)).into_response())?,
            None => None,
        };
        match found {
            Some(session) => Ok(ConsoleSession { session }),
            None if parts.method == axum::http::Method::GET => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/console/devices", |p| p.as_str());
                let target = format!(
                    "/console/login?next={}",
                    percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC)
                );
                Err(Redirect::to(&target).into_response())
            }
            None => Err(PageError::from(ApiError::unauthorized(
                "not_logged_in",
                "your session has ended: log in again",
            ))
            .into_response()),
        }
    }
}

/// Only a path inside the console: `next` must not send a fresh login to another site.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with("/console")
                && !n.contains('\\')
                && !n.bytes().any(|b| b < 0x20 || b == 0x7f) =>
        {
            n
        }
        _ => "/console/devices",
    }
}

async fn login_page(
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    render::login(
        safe_next(query.get("next").map(String::as_str)),
        None,
        StatusCode::OK,
    )
}

/// `POST /console/login`: an API key, or a username and password.
async fn login(
    State(state): State<AppState>,
    SameOrigin(same_origin): SameOrigin,
    axum::extract::Form(form): axum::extract::Form<HashMap<String, String>>,
) -> Response {
    let next = safe_next(form.get("next").map(String::as_str)).to_owned();
    if !same_origin {
        return PageError::from(ApiError::forbidden(
            "cross_origin",
            "a form from another site was refused",
        ))
        .into_response();
    }
    let field = |name: &str| form.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let authenticated = match (field("api_key"), field("username")) {
        (Some(key), _) => match SecretToken::parse(TokenKind::ApiKey, key) {
            Ok(key) => authenticate_api_key(&state.db, &key)
                .await
                .map(|p| p.map(|p| (p, Login::ApiKey(key.id().to_owned())))),
            Err(_) => Ok(None),
        },
        (None, Some(username)) => {
            let password = form.get("password").map(String::as_str).unwrap_or_default();
            users::authenticate(&state.db, username, password)
                .await
                .map(|found| found.map(|(id, p)| (p, Login::User(id))))
        }
        (None, None) => {
            return render::login(
                &next,
                Some("Enter an API key, or a username and password."),
                StatusCode::BAD_REQUEST,
            )
        }
    };
    let (principal, login) = match authenticated {
        Ok(Some(found)) => found,
        // A 401: `api::limits` counts it against the source address.
        Ok(None) => {
            return render::login(
                &next,
                Some("That API key, or that username and password, is not valid."),
                StatusCode::UNAUTHORIZED,
            );
        }
        Err(e) => return PageError::from(ApiError::from(e)).into_response(),
    };
    let lifetime = state.console.session_lifetime;
    match users::start_session(&state.db, principal.clone(), &login, lifetime).await {
        Ok((cookie, _)) => {
            crate::db::audit::record(
                &state.db,
                Some(&principal.tenant_id),
                &principal.actor(),
                "console.login",
                &principal.actor(),
                serde_json::json!({}),
            )
            .await;
            let mut response = Redirect::to(&next).into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(&cookie, lifetime.as_secs(), state.console.secure_cookies),
            );
            response
        }
        Err(e) => PageError::from(ApiError::from(e)).into_response(),
    }
}

fn session_cookie(value: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/console; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `POST /console/logout`: ends the session here and in the database.
async fn logout(
    State(state): State<AppState>,
    session: ConsoleSession,
    headers: HeaderMap,
    axum::extract::Form(form): axum::extract::Form<HashMap<String, String>>,
) -> Response {
    if let Err(e) = session.check_form(&form) {
        return e.into_response();
    }
    if let Some(cookie) = cookie_value(&headers, COOKIE) {
        if let Err(e) = users::end_session(&state.db, cookie).await {
            return PageError::from(ApiError::from(e)).into_response();
        }
    }
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie("", 0, state.console.secure_cookies),
    );
    response
}

/// Whether a request's `Origin` is its own host (see [`same_origin`]).
struct SameOrigin(bool);

impl FromRequestParts<AppState> for SameOrigin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(SameOrigin(same_origin(parts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kernex_console=abc; b=2"),
        );
        assert_eq!(cookie_value(&headers, COOKIE), Some("abc"));
        assert_eq!(cookie_value(&headers, "c"), None);
    }

    #[test]
    fn next_stays_in_the_console() {
        assert_eq!(safe_next(Some("/console/tokens")), "/console/tokens");
        for bad in [
            "https://evil.example/",
            "//evil.example",
            "/api/v1/tokens",
            "/console\\@x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/console/devices", "{bad}");
        }
        assert_eq!(safe_next(None), "/console/devices");
    }

    #[test]
    fn the_origin_is_compared_with_what_the_browser_addressed() {
        let parts = |uri: &str, headers: &[(&str, &str)]| {
            let mut request = axum::http::Request::builder().method("POST").uri(uri);
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            request.body(()).unwrap().into_parts().0
        };
        let origin = ("origin", "https://cp.example:8443");
        // HTTP/2: no Host header, the authority is in the URI.
        assert!(same_origin(&parts(
            "https://cp.example:8443/console/login",
            &[origin]
        )));
        assert!(same_origin(&parts(
            "/console/login",
            &[origin, ("host", "cp.example:8443")]
        )));
        // A proxy that rewrites Host and says what the browser asked for.
        assert!(same_origin(&parts(
            "/console/login",
            &[
                origin,
                ("host", "10.0.0.5:8080"),
                ("x-forwarded-host", "cp.example:8443")
            ]
        )));
        assert!(!same_origin(&parts(
            "/console/login",
            &[origin, ("host", "10.0.0.5:8080")]
        )));
        assert!(!same_origin(&parts(
            "https://cp.example:8443/console/login",
            &[("origin", "https://evil.example")]
        )));
        assert!(!same_origin(&parts(
            "/x",
            &[("origin", "null"), ("host", "null")]
        )));
        assert!(
            same_origin(&parts("/console/login", &[("host", "cp.example")])),
            "no Origin"
        );
    }

    #[test]
    fn the_cookie_is_locked_down() {
        let cookie = session_cookie("v", 60, true);
        assert_eq!(
            cookie.to_str().unwrap(),
            "kernex_console=v; Path=/console; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
        );
    }
}
