//! The HTTP front: every request goes through [`handle`], which checks it in the contract's order
//! (route → api-version → authentication → query and headers → body) and hands a typed command
//! to the handlers; nothing past this point sees an unauthenticated request.

use crate::accounts::Accounts;
use crate::auth;
use crate::endpoint::route;
use crate::handlers;
use crate::limit::LimitedListener;
use crate::query;
use crate::respond::{self, Ctx};
use crate::sharedkey::Signed;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Response, request::Parts};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_service::Service;
use std::sync::Arc;
use time::OffsetDateTime;
use tower_http::catch_panic::CatchPanicLayer;

/// The emulator's own paths live under this prefix, which no Azure path uses.
pub const CONTROL_PREFIX: &str = "/_bluebatch";

#[derive(Clone)]
pub struct WireConfig {
    pub accounts: Accounts,
    /// Accept any api-version (as Azurite's --skipApiVersionCheck).
    pub accept_any_api_version: bool,
    pub max_body_bytes: usize,
    pub scheme: &'static str,
    /// Bearer-token verification; `None` refuses bearer tokens.
    pub bearer: Option<Arc<crate::bearer::Bearer>>,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            accounts: Accounts::dev(),
            accept_any_api_version: false,
            max_body_bytes: 1 << 20,
            scheme: "http",
            bearer: None,
            max_connections: 4096,
        }
    }
}

pub struct App {
    pub service: Service,
    pub config: WireConfig,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(app)
        .layer(CatchPanicLayer::custom(panicked))
}

/// A panic in a request path is a bug: log it and answer 500 InternalError, details withheld.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let ctx = Ctx {
        request_id: uuid::Uuid::new_v4(),
        echo_client_request_id: None,
        base: String::new(),
        head: false,
    };
    tracing::error!(request_id = %ctx.request_id, "a request handler panicked");
    respond::finish(
        &ctx,
        respond::error(&ctx, &BatchError::new(Code::InternalError)),
    )
}

async fn handle(State(app): State<Arc<App>>, req: Request) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    let mut ctx = Ctx {
        request_id: uuid::Uuid::new_v4(),
        echo_client_request_id: None,
        base: format!("{}://{host}", app.config.scheme),
        head: parts.method == Method::HEAD,
    };
    // A request whose body we answer without reading leaves the connection unusable: say so,
    // or the client would send its next request on a connection the server is closing.
    let has_body = parts.headers.contains_key("transfer-encoding")
        || parts
            .headers
            .get("content-length")
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut body_read = false;
    let answer = match process(&app, &parts, body, &mut ctx, &mut body_read).await {
        Ok(r) => r,
        Err(e) => {
            if e.code == Code::InternalError {
                tracing::error!(request_id = %ctx.request_id, "internal error: {e}");
            }
            respond::error(&ctx, &e)
        }
    };
    let mut answer = respond::finish(&ctx, answer);
    if has_body && !body_read {
        answer
            .headers_mut()
            .insert("connection", axum::http::HeaderValue::from_static("close"));
    }
    answer
}

async fn process(
    app: &App,
    parts: &Parts,
    body: Body,
    ctx: &mut Ctx,
    body_read: &mut bool,
) -> Result<Response<Body>, BatchError> {
    let raw_path = parts.uri.path();
    let raw_query = parts.uri.query().unwrap_or("");
    if let Some(rest) = raw_path.strip_prefix(CONTROL_PREFIX) {
        let answer = crate::controls::handle(app, parts, rest, body, ctx).await;
        *body_read = answer.is_ok();
        return answer;
    }
    let endpoint = route(&parts.method, raw_path)?;
    let api_version = query::api_version(raw_query, app.config.accept_any_api_version)?;
    let account = match auth::authenticate(
        &Signed {
            method: &parts.method,
            raw_path,
            raw_query,
            headers: &parts.headers,
        },
        &app.config,
        OffsetDateTime::now_utc(),
    ) {
        Ok(account) => account,
        Err(e) => return Ok(auth::refusal(ctx, &parts.headers, &app.config, &e)),
    };
    let query = query::parse(raw_query, &endpoint, api_version)?;
    ctx.echo_client_request_id = client_request_id(&parts.headers)?;
    let body = if endpoint.has_body() {
        let bytes = read_body(&parts.headers, body, app.config.max_body_bytes).await?;
        *body_read = true;
        bytes
    } else {
        Bytes::new()
    };
    handlers::dispatch(app, ctx, &account, endpoint, &query, &parts.headers, body).await
}

/// Validates `client-request-id` (a GUID) and `return-client-request-id`; returns the value to
/// echo, if asked for.
fn client_request_id(h: &HeaderMap) -> Result<Option<String>, BatchError> {
    let bad = |name: &str, v: &str| {
        BatchError::new(Code::InvalidHeaderValue)
            .with("HeaderName", name)
            .with("HeaderValue", v.chars().take(100).collect::<String>())
    };
    let crid = match h.get("client-request-id") {
        None => None,
        Some(v) => {
            let s = v.to_str().map_err(|_| bad("client-request-id", ""))?;
            uuid::Uuid::try_parse(s).map_err(|_| bad("client-request-id", s))?;
            Some(s.to_string())
        }
    };
    let ret = match h.get("return-client-request-id") {
        None => false,
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            match s.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(bad("return-client-request-id", s)),
            }
        }
    };
    Ok(if ret { crid } else { None })
}

fn too_large(max: usize) -> BatchError {
    BatchError::new(Code::RequestBodyTooLarge).with("MaxLimit", max.to_string())
}

async fn read_body(h: &HeaderMap, body: Body, max: usize) -> Result<Bytes, BatchError> {
    if let Some(len) = h.get("content-length") {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                BatchError::new(Code::InvalidHeaderValue).with("HeaderName", "Content-Length")
            })?;
        if len > max as u64 {
            return Err(too_large(max));
        }
    }
    if let Some(ct) = h.get("content-type") {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        if !ct.is_empty() && !ct.contains("json") {
            return Err(BatchError::new(Code::InvalidHeaderValue)
                .with("HeaderName", "Content-Type")
                .with("HeaderValue", ct.chars().take(100).collect::<String>())
                .with("Reason", "request bodies are JSON (application/json)"));
        }
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large(max)
        } else {
            BatchError::bad_body("the request body could not be read")
        }
    })
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = app.config.max_connections;
    axum::serve(LimitedListener::new(listener, max), router(app))
        .with_graceful_shutdown(shutdown)
        .await
}
