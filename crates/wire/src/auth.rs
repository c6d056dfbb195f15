//! The one authentication entry point: every Batch request passes here and comes out with the
//! account it acts for, or a Batch error. Handlers never see an unauthenticated request.
//! Shared Key is checked in [`crate::sharedkey`], bearer tokens in [`crate::bearer`].

use crate::query::Params;
use crate::respond::{self, Ctx};
use crate::server::WireConfig;
use crate::sharedkey::{self, Signed};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Response};
use bluebatch_core::error::{BatchError, Code};
use time::OffsetDateTime;

/// Where a token comes from when no tenant is configured (bearer tokens disabled).
const COMMON_AUTHORIZATION_URI: &str = "https://login.microsoftonline.com/common/oauth2/authorize";

/// The token of an `Authorization: Bearer …` header (empty for `Bearer ` or `Bearer` alone).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    scheme.eq_ignore_ascii_case("Bearer").then(|| token.trim())
}

pub fn authenticate(
    req: &Signed<'_>,
    config: &WireConfig,
    now: OffsetDateTime,
) -> Result<String, BatchError> {
    authenticate_with(req, &Params::lenient(req.raw_query), config, now)
}

/// [`authenticate`] with `req.raw_query` already decoded (`params`, once, by the caller).
pub fn authenticate_with(
    req: &Signed<'_>,
    params: &Params<'_>,
    config: &WireConfig,
    now: OffsetDateTime,
) -> Result<String, BatchError> {
    match bearer_token(req.headers) {
        // A refused token like any other: 401 with the invalid_token challenge.
        Some("") => Err(BatchError::new(Code::AuthenticationRequired).with(
            "AuthenticationErrorDetail",
            "The Authorization header names the Bearer scheme but carries no token.",
        )),
        Some(token) => match &config.bearer {
            Some(bearer) => bearer.verify(token, &config.accounts, now),
            None => Err(BatchError::new(Code::AuthenticationRequired).with(
                "AuthenticationErrorDetail",
                "Bearer tokens are not enabled on this server (no \"bearer\" section in the \
                 accounts file); use Shared Key.",
            )),
        },
        None => sharedkey::verify_with(req, params, &config.accounts, now),
    }
}

/// The answer to a request [`authenticate`] refused: the Batch error, and on a 401 the
/// `WWW-Authenticate` challenges — `Bearer …, error="invalid_token"` for a refused token;
/// `SharedKey` (and `Bearer` when tokens are enabled) when credentials are missing.
pub fn refusal(
    ctx: &Ctx,
    headers: &HeaderMap,
    config: &WireConfig,
    e: &BatchError,
) -> Response<Body> {
    let mut r = respond::error(ctx, e);
    if e.status() == 401 {
        let h = r.headers_mut();
        let bearer = if bearer_token(headers).is_some() {
            // A refused token: only the Bearer challenge, with error="invalid_token".
            h.remove("www-authenticate");
            Some(match &config.bearer {
                Some(b) => b.challenge(true),
                None => crate::bearer::challenge(COMMON_AUTHORIZATION_URI, true),
            })
        } else {
            config.bearer.as_ref().map(|b| b.challenge(false))
        };
        if let Some(v) = bearer.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.append("www-authenticate", v);
        }
    }
    r
}
