//! The emulator's own endpoints under `/_bluebatch`: health (no authentication).

use crate::respond::{Ctx, json_response};
use crate::server::App;
use axum::body::Body;
use axum::http::{Method, Response, request::Parts};
use bluebatch_core::error::{BatchError, Code};
use serde_json::json;

pub async fn handle(
    _app: &App,
    parts: &Parts,
    rest: &str,
    _body: Body,
    _ctx: &Ctx,
) -> Result<Response<Body>, BatchError> {
    match rest {
        "/health" => {
            if parts.method != Method::GET && parts.method != Method::HEAD {
                return Err(BatchError::new(Code::UnsupportedHttpVerb));
            }
            Ok(json_response(
                json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
            ))
        }
        _ => Err(BatchError::new(Code::InvalidUri)),
    }
}
