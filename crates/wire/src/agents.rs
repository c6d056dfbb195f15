//! The node protocol's endpoints (`bluebatch_protocol`): what `bluebatch agent` calls.
//!
//! | method and path | authentication | body → answer |
//! |---|---|---|
//! | `POST /_bluebatch/agent/join` | the join token in the body | `JoinRequest` → `JoinResponse` |
//! | `POST /_bluebatch/agent/hello` | `Authorization: BluebatchNode CREDENTIAL` | `HostReport` → `HostReportAnswer` |
//! | `GET /_bluebatch/agent/desired?after=CURSOR&wait=SECONDS[&delta=1]` | node credential | → `DesiredState` |
//! | `POST /_bluebatch/agent/ack` | node credential | `AckRequest` → `AckAnswer` |
//!
//! No `api-version`. Bodies are parsed strictly (unknown properties are refused: 400
//! `InvalidRequestBody`); a wrong verb is 405 `UnsupportedHttpVerb`; errors are Batch error JSON
//! like every other endpoint. When the service also serves HTTPS, its plain HTTP listener refuses
//! every agent call (403 `AuthenticationFailed`): tokens and credentials travel over TLS only
//! (a listener with [`crate::WireConfig::agent_paths_only`] excepted: it serves nothing else).
//! `wait` is whole seconds (`30` or `30s`), cut to
//! [`MAX_WAIT_SECONDS`]; without it the answer comes at once. A long poll in flight when the
//! server shuts down answers at once with what there is. A connection whose request carried a
//! valid node credential no longer counts against `--max-connections-per-source` (many agents
//! may share one address). Neither the token nor the credential is ever logged.

use crate::conn::ConnHandle;
use crate::respond::{Ctx, json_response};
use crate::server::{App, Unread, read_body};
use axum::body::Body;
use axum::http::{HeaderValue, Method, Response, request::Parts};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_protocol::{
    ACK_PATH, AckRequest, CREDENTIAL_SCHEME, DELTA_PARAM, DESIRED_PATH, HELLO_PATH, HostReport,
    JOIN_PATH, JoinRequest, MAX_WAIT_SECONDS,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The largest body an authenticated agent may send (an acknowledgement of 10,000 nodes with
/// failures, a host report with every passwd name); before authentication the server's
/// `--max-body-bytes` applies.
const MAX_AGENT_BODY: usize = 32 << 20;
/// The longest `after` cursor accepted.
const MAX_CURSOR: usize = 512;

/// Whether `path` (the whole request path) is one of the agent endpoints' namespace.
pub fn is_agent_path(path: &str) -> bool {
    path.starts_with("/_bluebatch/agent/") || path == "/_bluebatch/agent"
}

pub(crate) async fn handle(
    app: &App,
    parts: &Parts,
    body: &mut Unread,
    _ctx: &mut Ctx,
) -> Result<Response<Body>, BatchError> {
    let path = parts.uri.path();
    let m = &parts.method;
    let want = match path {
        p if p == JOIN_PATH || p == HELLO_PATH || p == ACK_PATH => Method::POST,
        p if p == DESIRED_PATH => Method::GET,
        _ => return Err(BatchError::new(Code::InvalidUri)),
    };
    if *m != want {
        return Err(BatchError::new(Code::UnsupportedHttpVerb));
    }
    // Tokens and credentials never cross plain HTTP when the service has HTTPS.
    // A listener of the node protocol only (a sandboxed node's own) is reachable from its node
    // alone: plain HTTP is what it serves.
    if app.config.scheme == "http"
        && app.config.ca_fingerprint.is_some()
        && !app.config.agent_paths_only
    {
        return Err(BatchError::new(Code::AuthenticationFailed).with(
            "AuthenticationErrorDetail",
            "This service serves HTTPS: agents must call its HTTPS listener (with the CA \
             fingerprint `bluebatch join-token create` prints pinned), never plain HTTP.",
        ));
    }
    let svc = &app.service;
    // On a shared store: tokens, hosts and nodes as every replica committed them.
    svc.sync().await?;
    if path == JOIN_PATH {
        // The only unauthenticated path: the token in the body is the credential.
        let req: JoinRequest =
            parse(&read_body(&parts.headers, body, app.config.max_body_bytes).await?)?;
        return answer(&svc.join(req).await?);
    }
    let host = authenticate(app, parts)?;
    if let Some(conn) = parts.extensions.get::<ConnHandle>() {
        conn.exempt_from_source_cap();
    }
    match path {
        p if p == HELLO_PATH => {
            let report: HostReport =
                parse(&read_body(&parts.headers, body, MAX_AGENT_BODY).await?)?;
            answer(&svc.hello(&host, report).await?)
        }
        p if p == ACK_PATH => {
            let ack: AckRequest = parse(&read_body(&parts.headers, body, MAX_AGENT_BODY).await?)?;
            answer(&svc.ack(&host, ack).await?)
        }
        _ => {
            let (after, wait, delta) = desired_query(parts.uri.query().unwrap_or(""))?;
            // Synced above, after the request arrived.
            let poll = svc.desired_delta(&host, after.as_deref(), wait, delta, true);
            let state = match parts.extensions.get::<ConnHandle>() {
                Some(conn) if !wait.is_zero() => {
                    tokio::select! {
                        r = poll => r?,
                        // Shutting down: answer now with what there is, so that the agent
                        // reconnects (to this server once it is back, or another replica).
                        _ = conn.shutting_down() => {
                            svc.desired_delta(&host, after.as_deref(), Duration::ZERO, delta, false)
                                .await?
                        }
                    }
                }
                _ => poll.await?,
            };
            answer(&state)
        }
    }
}

/// The node credential of `Authorization: BluebatchNode CREDENTIAL` → the host id.
fn authenticate(app: &App, parts: &Parts) -> Result<String, BatchError> {
    let missing = |detail: &str| {
        BatchError::new(Code::AuthenticationRequired).with("AuthenticationErrorDetail", detail)
    };
    let Some(value) = parts.headers.get("authorization") else {
        return Err(missing(
            "The agent endpoints need an Authorization header: BluebatchNode CREDENTIAL.",
        ));
    };
    let value = value.to_str().map_err(|_| {
        BatchError::new(Code::InvalidAuthenticationInfo).with(
            "AuthenticationErrorDetail",
            "The Authorization header is not ASCII.",
        )
    })?;
    let (scheme, credential) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case(CREDENTIAL_SCHEME) {
        return Err(BatchError::new(Code::InvalidAuthenticationInfo).with(
            "AuthenticationErrorDetail",
            "The agent endpoints take a node credential: Authorization: BluebatchNode CREDENTIAL.",
        ));
    }
    let credential = credential.trim();
    if credential.is_empty() {
        return Err(missing(
            "The Authorization header names the BluebatchNode scheme but carries no credential.",
        ));
    }
    app.service.authenticate_node(credential)
}

/// `after` (opaque, percent-decoded; empty = none) and `wait` (whole seconds, `30` or `30s`, cut
/// to [`MAX_WAIT_SECONDS`]; absent = 0) and whether the agent takes a delta answer
/// ([`DELTA_PARAM`]`=1`; `0` or absent: no). Any other parameter is refused.
pub fn desired_query(raw: &str) -> Result<(Option<String>, Duration, bool), BatchError> {
    let bad = |name: &str, value: &str, reason: &str| {
        BatchError::new(Code::InvalidQueryParameterValue)
            .with("QueryParameterName", name)
            .with(
                "QueryParameterValue",
                value.chars().take(100).collect::<String>(),
            )
            .with("Reason", reason)
    };
    let (mut after, mut wait, mut delta) = (None, None, None);
    for kv in raw.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let value = crate::percent::decode(&v.replace('+', " "))
            .ok_or_else(|| bad(k, v, "not a valid percent-encoded value"))?;
        match k {
            "after" => {
                if after.is_some() {
                    return Err(bad(k, v, "given more than once"));
                }
                if value.len() > MAX_CURSOR {
                    return Err(bad(k, v, "longer than any cursor the service gives"));
                }
                after = Some(value);
            }
            "wait" => {
                if wait.is_some() {
                    return Err(bad(k, v, "given more than once"));
                }
                let digits = value.strip_suffix('s').unwrap_or(&value);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(k, v, "whole seconds, such as 30 or 30s"));
                }
                // Longer asks are cut to the longest wait, however many digits they have.
                let secs = digits.parse::<u64>().unwrap_or(u64::MAX);
                wait = Some(Duration::from_secs(secs.min(MAX_WAIT_SECONDS)));
            }
            DELTA_PARAM => {
                if delta.is_some() {
                    return Err(bad(k, v, "given more than once"));
                }
                delta = Some(match value.as_str() {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(bad(k, v, "1 (a delta is taken) or 0")),
                });
            }
            _ => {
                return Err(BatchError::new(Code::UnsupportedQueryParameter)
                    .with(
                        "QueryParameterName",
                        k.chars().take(100).collect::<String>(),
                    )
                    .with(
                        "Reason",
                        "the desired-state poll takes after, wait and delta only",
                    ));
            }
        }
    }
    Ok((
        after.filter(|a| !a.is_empty()),
        wait.unwrap_or(Duration::ZERO),
        delta.unwrap_or(false),
    ))
}

/// A protocol body, strictly: unknown properties, missing ones and wrong types are 400
/// `InvalidRequestBody` with serde's reason (which names the property, never echoes a value
/// longer than the reason's 200 characters).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, BatchError> {
    if body.is_empty() {
        return Err(BatchError::bad_body("the request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let reason: String = e.to_string().chars().take(200).collect();
        BatchError::bad_body(reason)
    })
}

fn answer<T: Serialize>(v: &T) -> Result<Response<Body>, BatchError> {
    let value = serde_json::to_value(v).map_err(|_| BatchError::new(Code::InternalError))?;
    Ok(json_response(value))
}

/// The `WWW-Authenticate` challenge of a refused agent request (401).
pub fn challenge(r: &mut Response<Body>) {
    r.headers_mut().insert(
        "www-authenticate",
        HeaderValue::from_static(CREDENTIAL_SCHEME),
    );
}

#[cfg(test)]
mod tests {
    use super::desired_query;
    use std::time::Duration;

    #[test]
    fn the_poll_query() {
        assert_eq!(desired_query("").unwrap(), (None, Duration::ZERO, false));
        assert_eq!(
            desired_query("after=7.3&wait=30").unwrap(),
            (Some("7.3".into()), Duration::from_secs(30), false)
        );
        assert_eq!(
            desired_query("wait=30s&after=").unwrap(),
            (None, Duration::from_secs(30), false)
        );
        assert_eq!(
            desired_query("after=7.3&wait=30&delta=1").unwrap(),
            (Some("7.3".into()), Duration::from_secs(30), true)
        );
        assert!(!desired_query("delta=0").unwrap().2);
        assert_eq!(
            desired_query("wait=3600").unwrap().1,
            Duration::from_secs(bluebatch_protocol::MAX_WAIT_SECONDS)
        );
        assert_eq!(
            desired_query("wait=99999999999999999999s").unwrap().1,
            Duration::from_secs(bluebatch_protocol::MAX_WAIT_SECONDS)
        );
        for bad in [
            "wait=-1",
            "wait=1.5",
            "wait=",
            "wait=s",
            "wait=1&wait=2",
            "delta=2",
            "delta=1&delta=1",
            "x=1",
        ] {
            assert!(desired_query(bad).is_err(), "{bad}");
        }
    }
}
