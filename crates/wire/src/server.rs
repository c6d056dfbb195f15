//! The HTTP front: every request goes through [`handle`], which checks it in the contract's order
//! (route → api-version → authentication → query and headers → body) and hands a typed command
//! to the handlers; nothing past this point sees an unauthenticated request.

use crate::accounts::Accounts;
use crate::auth;
use crate::conn::HttpLimits;
use crate::endpoint::route;
use crate::handlers;
use crate::query;
use crate::respond::{self, Ctx};
use crate::sharedkey::Signed;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Response, request::Parts};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_metrics::Operation;
use bluebatch_service::Service;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::field::display;

/// The emulator's own paths live under this prefix, which no Azure path uses.
pub const CONTROL_PREFIX: &str = "/_bluebatch";

/// After an answer given before the request body was read (413, 401, 501, …), the server reads
/// and discards up to this much of the rest of the body, within [`DRAIN_TIME`], so a client that
/// writes its whole body before reading (Python's http.client) reads the answer instead of a
/// broken pipe. A body longer than this, or slower, is cut off and the connection closed.
pub const DRAIN_MAX_BYTES: u64 = 8 << 20;
/// See [`DRAIN_MAX_BYTES`].
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct WireConfig {
    pub accounts: Accounts,
    /// Accept any api-version (as Azurite's --skipApiVersionCheck).
    pub accept_any_api_version: bool,
    pub max_body_bytes: usize,
    pub scheme: &'static str,
    /// Bearer-token verification; `None` refuses bearer tokens.
    pub bearer: Option<Arc<crate::bearer::Bearer>>,
    /// The limits on the listener's connections and request heads (docs/contract.md §7).
    pub limits: HttpLimits,
    /// The fingerprint (`sha256:…`) of the CA certificate of the service's HTTPS listener, for
    /// agents to pin at join; `None` when the service serves no HTTPS.
    pub ca_fingerprint: Option<String>,
    /// This listener serves the node protocol's paths only (`/_bluebatch/agent/…`): every other
    /// path answers 404 `ResourceNotFound`, so the Batch API and the control endpoints are not
    /// reachable through it (the listener `--nodes sandbox` binds on a sandboxed node's veth).
    /// The refusal of agent calls over plain HTTP when the service serves HTTPS does not apply
    /// here: such a listener is reachable from its own node only.
    pub agent_paths_only: bool,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            accounts: Accounts::dev(),
            accept_any_api_version: false,
            max_body_bytes: 1 << 20,
            scheme: "http",
            bearer: None,
            limits: HttpLimits::default(),
            ca_fingerprint: None,
            agent_paths_only: false,
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
        account: None,
    };
    tracing::error!(request_id = %ctx.request_id, "a request handler panicked");
    respond::finish(
        &ctx,
        respond::error(&ctx, &BatchError::new(Code::InternalError)),
    )
}

async fn handle(State(app): State<Arc<App>>, req: Request) -> Response<Body> {
    let started = Instant::now();
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
        account: None,
    };
    // A request whose body we answer without reading leaves the connection unusable: say so,
    // or the client would send its next request on a connection the server is closing.
    let has_body = parts.headers.contains_key("transfer-encoding")
        || parts
            .headers
            .get("content-length")
            .is_some_and(|v| v.as_bytes() != b"0");
    // What is left of the body once the answer is known: drained before answering, so a client
    // still writing it reads the answer instead of a reset.
    let mut body = Unread::Body(body);
    let mut op = Operation::Unrouted;
    let answer = match process(&app, &parts, &mut body, &mut ctx, &mut op).await {
        Ok(r) => r,
        Err(e) => {
            if e.code == Code::InternalError {
                tracing::error!(request_id = %ctx.request_id, "internal error: {e}");
            }
            respond::error(&ctx, &e)
        }
    };
    let mut answer = respond::finish(&ctx, answer);
    if has_body {
        let clean = match body {
            Unread::Read => true,
            Unread::Lost => false,
            Unread::Body(mut rest) => drain(&parts.headers, &mut rest).await,
        };
        if !clean {
            answer
                .headers_mut()
                .insert("connection", axum::http::HeaderValue::from_static("close"));
        }
    }
    let elapsed = started.elapsed();
    bluebatch_metrics::global().request(op, answer.status().as_u16(), elapsed);
    log_request(&parts, &ctx, &answer, elapsed);
    answer
}

/// Where the request body stands once the answer is known.
pub(crate) enum Unread {
    /// Not read, or read in part: what is left can be drained.
    Body(Body),
    /// Read to its end.
    Read,
    /// Handed to code that may have left part of it unread.
    Lost,
}

/// Reads and discards the rest of a body the answer did not need, within [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_TIME`]; whether it reached the end (the connection can then be reused). A client that
/// asked `Expect: 100-continue` has sent nothing yet and waits for the answer: nothing to drain.
async fn drain(headers: &HeaderMap, body: &mut Body) -> bool {
    let expects_continue = headers
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if expects_continue || declared.is_some_and(|n| n > DRAIN_MAX_BYTES) {
        return false;
    }
    let read_all = async {
        let mut seen: u64 = 0;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > DRAIN_MAX_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIME, read_all)
        .await
        .unwrap_or(false)
}

/// One info line per request (target `bluebatch::http`): method, path (the query string is left
/// out but for `api-version`), status, the Batch error code of an error, duration, request-id and
/// the account once authenticated. Never headers or bodies.
fn log_request(parts: &Parts, ctx: &Ctx, answer: &Response<Body>, elapsed: Duration) {
    // Nothing is built for a line nobody reads (the level is off in benchmarks and most serves).
    if !tracing::enabled!(target: "bluebatch::http", tracing::Level::INFO) {
        return;
    }
    let path: String = parts.uri.path().chars().take(512).collect();
    let api_version = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .map(|v| {
            if v.len() <= 32
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                v
            } else {
                "(invalid)"
            }
        })
        .unwrap_or("");
    let status = answer.status().as_u16();
    let duration_ms = (elapsed.as_secs_f64() * 10_000.0).round() / 10.0;
    // Fields that are `None` are left out of the line.
    let code = answer
        .extensions()
        .get::<respond::ErrorCode>()
        .map(|c| display(c.0));
    let account = ctx.account.as_deref().map(display);
    tracing::info!(
        target: "bluebatch::http",
        method = %parts.method,
        path = %path,
        api_version = %api_version,
        status,
        code,
        duration_ms,
        request_id = %ctx.request_id,
        account,
        "request"
    );
}

/// `op` is set to the operation the request is for once that is known (it stays
/// [`Operation::Unrouted`] for a request refused before).
async fn process(
    app: &App,
    parts: &Parts,
    body: &mut Unread,
    ctx: &mut Ctx,
    op: &mut Operation,
) -> Result<Response<Body>, BatchError> {
    check_head(parts, &app.config.limits)?;
    let raw_path = parts.uri.path();
    let raw_query = parts.uri.query().unwrap_or("");
    let agent_path = crate::agents::is_agent_path(raw_path);
    if app.config.agent_paths_only && !agent_path {
        return Err(BatchError::new(Code::ResourceNotFound).message(
            "This listener serves the node protocol only (/_bluebatch/agent/...); the Batch API \
             is served on the service's own address.",
        ));
    }
    if agent_path {
        *op = Operation::Agent;
        return match crate::agents::handle(app, parts, body, ctx).await {
            Err(e) if e.status() == 401 => {
                let mut answer = respond::error(ctx, &e);
                crate::agents::challenge(&mut answer);
                Ok(answer)
            }
            answer => answer,
        };
    }
    if crate::console::is_console_path(raw_path) {
        *op = Operation::Control;
        return crate::console::handle(app, parts, body, ctx).await;
    }
    if let Some(rest) = raw_path.strip_prefix(CONTROL_PREFIX) {
        *op = Operation::Control;
        return crate::controls::handle(app, parts, rest, body, ctx).await;
    }
    let endpoint = route(&parts.method, raw_path)?;
    // The query string is decoded once, here, for the api-version check, Shared Key and `parse`.
    let params = query::Params::parse(raw_query)?;
    let api_version = query::api_version(&params, app.config.accept_any_api_version)?;
    match auth::authenticate_with(
        &Signed {
            method: &parts.method,
            raw_path,
            raw_query,
            headers: &parts.headers,
        },
        &params,
        &app.config,
        OffsetDateTime::now_utc(),
    ) {
        Ok(account) => {
            // Refused before this point (path, verb, api-version, credentials), it is `Unrouted`.
            *op = endpoint.operation();
            ctx.account = Some(account);
        }
        Err(e) => return Ok(auth::refusal(ctx, &parts.headers, &app.config, &e)),
    };
    let query = query::parse(&params, &endpoint, api_version)?;
    drop(params);
    ctx.echo_client_request_id = client_request_id(&parts.headers)?;
    let body = if endpoint.has_body() {
        read_body(&parts.headers, body, app.config.max_body_bytes).await?
    } else {
        Bytes::new()
    };
    // On a shared store (PostgreSQL), what every replica committed before this request (a
    // write that decides under the gate catches up there, in its lock's round trip).
    if !endpoint.decides_under_the_gate() {
        app.service.sync().await?;
    }
    let ctx: &Ctx = ctx;
    let account = ctx.account.as_deref().unwrap_or_default();
    handlers::dispatch(app, ctx, account, endpoint, &query, &parts.headers, body).await
}

/// The request line and header fields against [`HttpLimits::max_headers`] and
/// [`HttpLimits::max_head_bytes`] (each field counted as `name: value` and its CRLF): 400
/// `InvalidHeaderValue` naming the limit beyond them.
fn check_head(parts: &Parts, limits: &HttpLimits) -> Result<(), BatchError> {
    let too_large = |max: usize, reason: String| {
        BatchError::new(Code::InvalidHeaderValue)
            .message("The request line and header fields are too large.")
            .with("MaxLimit", max.to_string())
            .with("Reason", reason)
    };
    let count = parts.headers.len();
    if count > limits.max_headers {
        return Err(too_large(
            limits.max_headers,
            format!(
                "the request has {count} header fields; at most {} are accepted",
                limits.max_headers
            ),
        ));
    }
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let mut largest: (usize, &str) = (0, "");
    let fields: usize = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let n = name.as_str().len() + 2 + value.len() + 2;
            if n > largest.0 {
                largest = (n, name.as_str());
            }
            n
        })
        .sum();
    let size = line + fields + 2;
    if size > limits.max_head_bytes {
        return Err(too_large(
            limits.max_head_bytes,
            format!(
                "the request line and header fields take {size} bytes; at most {} are accepted",
                limits.max_head_bytes
            ),
        )
        .with("HeaderName", largest.1.to_string()));
    }
    Ok(())
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

/// Refuses a body whose Content-Type is given and is not JSON (none, or empty, is JSON).
pub(crate) fn json_content_type(h: &HeaderMap) -> Result<(), BatchError> {
    if let Some(ct) = h.get("content-type") {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        if !ct.is_empty() && !ct.contains("json") {
            return Err(BatchError::new(Code::InvalidHeaderValue)
                .with("HeaderName", "Content-Type")
                .with("HeaderValue", ct.chars().take(100).collect::<String>())
                .with("Reason", "request bodies are JSON (application/json)"));
        }
    }
    Ok(())
}

/// Reads the whole body, at most `max` bytes. On an error the rest stays in `body` (to drain).
pub(crate) async fn read_body(
    h: &HeaderMap,
    body: &mut Unread,
    max: usize,
) -> Result<Bytes, BatchError> {
    declared_length_fits(h, max)?;
    json_content_type(h)?;
    read_rest(body, max).await
}

/// [`read_body`] whatever the content type (the control endpoints take what `curl -d` sends).
pub(crate) async fn read_any_body(
    h: &HeaderMap,
    body: &mut Unread,
    max: usize,
) -> Result<Bytes, BatchError> {
    declared_length_fits(h, max)?;
    read_rest(body, max).await
}

/// A `Content-Length` over `max` is refused before any byte of the body is read.
fn declared_length_fits(h: &HeaderMap, max: usize) -> Result<(), BatchError> {
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
    Ok(())
}

async fn read_rest(body: &mut Unread, max: usize) -> Result<Bytes, BatchError> {
    let Unread::Body(b) = body else {
        return Ok(Bytes::new());
    };
    let mut buf = Vec::new();
    while let Some(frame) = b.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                // What is left cannot be drained: the connection closes after the answer.
                let stalled = crate::conn::stalled(&e).map(|s| s.0);
                *body = Unread::Lost;
                return Err(match stalled {
                    Some(limit) => BatchError::new(Code::InvalidRequestBody)
                        .message("The request body did not arrive in time.")
                        .with(
                            "Reason",
                            format!(
                                "no part of the request body arrived for {} s",
                                limit.as_secs_f64()
                            ),
                        ),
                    None => BatchError::bad_body("the request body could not be read"),
                });
            }
        };
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > max {
                return Err(too_large(max));
            }
            buf.extend_from_slice(data);
        }
    }
    *body = Unread::Read;
    Ok(Bytes::from(buf))
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight finish
/// (at most [`crate::conn::SHUTDOWN_GRACE`]), within `app.config.limits` (see [`crate::conn`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = app.config.limits.clone();
    crate::conn::serve(listener, router(app), limits, None, shutdown).await
}

/// As [`serve`], over TLS with `tls` (the handshake counts within the head deadline).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = app.config.limits.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    crate::conn::serve(listener, router(app), limits, Some(acceptor), shutdown).await
}
