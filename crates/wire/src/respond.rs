//! Building answers: Batch error bodies, OData JSON bodies and the headers every answer carries.

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, ETAG, LAST_MODIFIED, SERVER};
use axum::http::{HeaderName, HeaderValue, Response, StatusCode};
use bluebatch_core::error::BatchError;
use bluebatch_core::timefmt::{iso, rfc1123};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

pub const JSON: &str = "application/json; odata=minimalmetadata";

// Header names known at compile time: no parse of the name per answer.
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("client-request-id");
const DATA_SERVICE_ID: HeaderName = HeaderName::from_static("dataserviceid");

/// Per-request facts every answer needs.
pub struct Ctx {
    pub request_id: uuid::Uuid,
    /// The caller's `client-request-id`, echoed when `return-client-request-id: true`.
    pub echo_client_request_id: Option<String>,
    /// `{scheme}://{host}` as the client addressed us.
    pub base: String,
    pub head: bool,
    /// The account the request acts for, once authenticated (for the request log).
    pub account: Option<String>,
}

/// The Batch error code of an error answer, kept on the response for the request log.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

pub fn error(ctx: &Ctx, e: &BatchError) -> Response<Body> {
    let message = format!(
        "{}\nRequestId:{}\nTime:{}",
        e.text(),
        ctx.request_id,
        iso(OffsetDateTime::now_utc())
    );
    let mut body = Map::new();
    body.insert(
        "odata.metadata".into(),
        json!(format!(
            "{}/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element",
            ctx.base
        )),
    );
    body.insert("code".into(), json!(e.code.as_str()));
    body.insert("message".into(), json!({"lang": "en-US", "value": message}));
    if !e.values.is_empty() {
        let values: Vec<Value> = e
            .values
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        body.insert("values".into(), Value::Array(values));
    }
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = if ctx.head {
        Response::new(Body::empty())
    } else {
        json_response(Value::Object(body))
    };
    *r.status_mut() = status;
    r.extensions_mut().insert(ErrorCode(e.code.as_str()));
    if e.status() == 401 {
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("SharedKey"));
    }
    r
}

pub fn json_response(v: Value) -> Response<Body> {
    json_of(&v)
}

/// A JSON answer of anything that serializes (typed answers skip building a [`Value`]).
pub fn json_of<T: serde::Serialize>(v: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(v).expect("answers always serialize");
    let mut r = Response::new(Body::from(bytes));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// Adds `ETag`, `Last-Modified` and, for writes, `DataServiceId`.
pub fn with_resource(
    mut r: Response<Body>,
    etag: &str,
    last_modified: OffsetDateTime,
    data_service_id: Option<&str>,
) -> Response<Body> {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::try_from(rfc1123(last_modified)) {
        h.insert(LAST_MODIFIED, v);
    }
    if let Some(id) = data_service_id
        && let Ok(v) = HeaderValue::from_str(id)
    {
        h.insert(DATA_SERVICE_ID, v);
    }
    r
}

/// [`with_resource`] of a write's own strings, moved into the headers (no copy of each).
pub fn with_written(
    mut r: Response<Body>,
    etag: String,
    last_modified: OffsetDateTime,
    data_service_id: Option<String>,
) -> Response<Body> {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::try_from(etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::try_from(rfc1123(last_modified)) {
        h.insert(LAST_MODIFIED, v);
    }
    if let Some(id) = data_service_id
        && let Ok(v) = HeaderValue::try_from(id)
    {
        h.insert(DATA_SERVICE_ID, v);
    }
    r
}

/// The headers of every answer, success or error.
pub fn finish(ctx: &Ctx, mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    if let Ok(v) = HeaderValue::from_str(ctx.request_id.hyphenated().encode_lower(&mut id)) {
        h.insert(REQUEST_ID, v);
    }
    if let Some(c) = &ctx.echo_client_request_id
        && let Ok(v) = HeaderValue::from_str(c)
    {
        h.insert(CLIENT_REQUEST_ID, v);
    }
    h.insert(SERVER, HeaderValue::from_static("bluebatch"));
    if ctx.head {
        *r.body_mut() = Body::empty();
    }
    r
}
