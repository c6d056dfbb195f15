//! The emulator's own endpoints, under `/_bluebatch` (a prefix no Azure path uses):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /_bluebatch/health` | liveness, no authentication |
//! | `GET /_bluebatch/ready` | readiness, no authentication: 200 `{"status":"ready"}`, or 503 `ServerBusy` while the store (PostgreSQL) cannot be reached |
//! | `GET /_bluebatch/metrics` | this process's figures in the Prometheus text format (0.0.4), no authentication (docs/metrics.md) |
//! | `POST /_bluebatch/reset` | forget every pool, node and user of the calling account |
//! | `GET /_bluebatch/clock` | the service clock |
//! | `POST /_bluebatch/clock/advance` `{"by":"1d12h"}` | move the service clock forward (stored: survives a restart) |
//! | `POST /_bluebatch/clock/reset` | back to the wall clock (offset 0, stored) |
//! | `PUT /_bluebatch/pools/{p}/nodes/{n}/state` `{"state":"rebooting"}` | put a node in any state |
//! | `GET /_bluebatch/pools/{p}/nodes/{n}/users` | the node's users as stored and as applied, the state its SSH endpoint enforces, the sources it locks out, and what a joined host failed to apply (`applyFailures`) |
//! | `GET /_bluebatch/pools/{p}/nodes/{n}/logins` | the node's login activity, newest first: its last 256 SSH authentication outcomes `{"value":[{seq, time, user, source, method, outcome, reason, keyFingerprint}]}` (`seq` numbers a node's outcomes 1, 2, …; service-clock time; `outcome` `accepted` or `refused`; never a password or key material). Embedded nodes only: a node of a joined host answers an empty list |
//! | `POST /_bluebatch/join-tokens` `{"pool":"p1","ttl":"1h"}` | a join token for `bluebatch agent` (both optional; default any pool, 24h; at most 366d; the pool need not exist yet): `{id, token, pool, expires, caFingerprint}` |
//! | `GET /_bluebatch/join-tokens` | the account's tokens `{"value":[{id, pool, expires, used}]}` (never the secret) |
//! | `DELETE /_bluebatch/join-tokens/{id}` | revoke a token: `{id, revoked: true}` |
//! | `GET /_bluebatch/hosts` | the hosts that joined the account `{"value":[{id, account, hostname, provider, address, sshPort, slots, nodes:[{poolId, nodeId}], drained, connected, lastSeen}]}` |
//! | `POST /_bluebatch/hosts/{id}/drain` | the host takes no new pools (its nodes stay until their pools release them): the host |
//! | `POST /_bluebatch/hosts/{id}/revoke` | the host's credential dies, its nodes leave their pools: `{id, revoked: true}` |
//!
//! Everything but health, ready and metrics needs the same Shared Key (or bearer) authentication as the Batch API;
//! `api-version` is not required. The agents' own endpoints (`/_bluebatch/agent/…`) take a node
//! credential instead: see [`crate::agents`].

use crate::auth;
use crate::endpoint::route_segments;
use crate::respond::{Ctx, json_response};
use crate::server::{App, Unread, read_any_body};
use crate::sharedkey::Signed;
use axum::body::Body;
use axum::http::{Method, Response, request::Parts};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::NodeState;
use bluebatch_core::sshkey::fingerprint;
use bluebatch_core::timefmt::iso;
use bluebatch_core::users::parse_object;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

pub(crate) async fn handle(
    app: &App,
    parts: &Parts,
    rest: &str,
    body: &mut Unread,
    ctx: &mut Ctx,
) -> Result<Response<Body>, BatchError> {
    let m = &parts.method;
    if rest == "/health" {
        if m != Method::GET && m != Method::HEAD {
            return Err(BatchError::new(Code::UnsupportedHttpVerb));
        }
        return Ok(json_response(
            json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        ));
    }
    if rest == "/metrics" {
        // Unauthenticated like health, so a Prometheus server scrapes it without an account
        // key: it holds counts only (no id, name, address or secret of any account, pool, node
        // or user), and an operator who wants it private firewalls the port. Answered from
        // this process's registry and hub, before any store round trip: a replica that cannot
        // reach its store still reports why.
        if m != Method::GET && m != Method::HEAD {
            return Err(BatchError::new(Code::UnsupportedHttpVerb));
        }
        return Ok(metrics_response(app));
    }
    if rest == "/ready" {
        // Readiness: whether this replica can reach its store (always, on the embedded one).
        if m != Method::GET && m != Method::HEAD {
            return Err(BatchError::new(Code::UnsupportedHttpVerb));
        }
        app.service.ready().await?;
        return Ok(json_response(json!({"status": "ready"})));
    }
    app.service.sync().await?;
    let segs = route_segments(rest)?;
    let seg: Vec<&str> = segs.iter().map(String::as_str).collect();
    let account = auth::authenticate(
        &Signed {
            method: m,
            raw_path: parts.uri.path(),
            raw_query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
        },
        &app.config,
        OffsetDateTime::now_utc(),
    )?;
    ctx.account = Some(account.clone());
    let body = read_any_body(&parts.headers, body, 64 * 1024).await?;
    let svc = &app.service;
    let verb = |want: Method| {
        if *m == want {
            Ok(())
        } else {
            Err(BatchError::new(Code::UnsupportedHttpVerb))
        }
    };
    match seg.as_slice() {
        ["reset"] => {
            verb(Method::POST)?;
            svc.reset_account(&account).await?;
            Ok(json_response(json!({"account": account, "reset": true})))
        }
        ["clock"] => {
            verb(Method::GET)?;
            Ok(clock_json(app))
        }
        ["clock", "advance"] => {
            verb(Method::POST)?;
            let map = parse_object(&body)?;
            let by = match map.get("by") {
                Some(Value::String(s)) => parse_duration(s).ok_or_else(|| {
                    BatchError::property(
                        Code::InvalidPropertyValue,
                        "by",
                        "a duration such as 2d, 36h, 1d12h30m or 90s",
                    )
                })?,
                Some(Value::Number(n)) if n.as_i64().is_some_and(|s| s >= 0) => {
                    Duration::seconds(n.as_i64().unwrap_or(0))
                }
                None => return Err(BatchError::missing("by")),
                Some(_) => {
                    return Err(BatchError::property(
                        Code::InvalidPropertyValue,
                        "by",
                        "a duration string or whole seconds",
                    ));
                }
            };
            svc.advance_clock(by).await?;
            Ok(clock_json(app))
        }
        ["clock", "reset"] => {
            verb(Method::POST)?;
            svc.reset_clock().await?;
            Ok(clock_json(app))
        }
        ["pools", pool, "nodes", node, "state"] => {
            verb(Method::PUT)?;
            let map = parse_object(&body)?;
            let text = map
                .get("state")
                .and_then(Value::as_str)
                .ok_or_else(|| BatchError::missing("state"))?;
            let state = NodeState::parse(text).ok_or_else(|| {
                BatchError::property(
                    Code::InvalidPropertyValue,
                    "state",
                    "one of the ComputeNodeState values, e.g. idle, starting, rebooting",
                )
            })?;
            svc.set_node_state(&account, pool, node, state).await?;
            Ok(json_response(json!({"id": node, "state": state.as_str()})))
        }
        ["pools", pool, "nodes", node, "users"] => {
            verb(Method::GET)?;
            let u = svc.node_users(&account, pool, node)?;
            let users: Vec<Value> = u
                .stored
                .iter()
                .map(|s| {
                    let applied = u.applied.iter().find(|a| a.name == s.name);
                    json!({
                        "name": s.name,
                        "isAdmin": s.is_admin,
                        "hasPassword": s.password_hash.is_some(),
                        "sshPublicKeyFingerprint": s.ssh_public_key.as_deref().and_then(fingerprint),
                        "expiryTime": iso(s.expiry_time),
                        "loginRefusedFrom": iso(s.login_refused_from),
                        "revision": s.revision,
                        "appliedOnNode": applied.is_some_and(|a| *a == s.to_account()),
                    })
                })
                .collect();
            // What the node's SSH endpoint enforces besides the accounts (Linux nodes).
            let lockouts: Vec<Value> = u
                .login_lockouts
                .iter()
                .map(|l| {
                    json!({
                        "source": l.source.to_string(),
                        "failures": l.failures,
                        "refusedUntil": iso(l.refused_until),
                    })
                })
                .collect();
            let (ssh_state, accepts) = match u.login_state {
                Some((s, accepts)) => (Some(s.as_str()), Some(accepts)),
                None => (None, None),
            };
            // What a joined host reported it could not apply (its last attempt).
            let failures: Vec<Value> = u
                .failures
                .iter()
                .map(|(name, reason)| json!({"name": name, "reason": reason}))
                .collect();
            Ok(json_response(json!({
                "appliedRevision": u.applied_revision,
                "users": users,
                "applyFailures": failures,
                "sshNodeState": ssh_state,
                "acceptsLogins": accepts,
                "loginLockouts": lockouts,
            })))
        }
        ["pools", pool, "nodes", node, "logins"] => {
            verb(Method::GET)?;
            let logins: Vec<Value> = svc
                .node_logins(&account, pool, node)?
                .iter()
                .map(|l| {
                    json!({
                        "seq": l.seq,
                        "time": iso(l.time),
                        "user": l.user,
                        "source": l.source.to_string(),
                        "method": l.method,
                        "outcome": if l.accepted { "accepted" } else { "refused" },
                        "reason": l.reason,
                        "keyFingerprint": l.key_fingerprint,
                    })
                })
                .collect();
            Ok(json_response(json!({ "value": logins })))
        }
        ["join-tokens"] if *m == Method::GET => {
            let tokens: Vec<Value> = svc
                .list_join_tokens(&account)
                .into_iter()
                .map(|t| {
                    json!({"id": t.id, "pool": t.pool, "expires": iso(t.expires), "used": t.used})
                })
                .collect();
            Ok(json_response(json!({ "value": tokens })))
        }
        ["join-tokens"] => {
            verb(Method::POST)?;
            let (pool, ttl) = join_token_body(&body)?;
            let t = svc
                .create_join_token(&account, pool.as_deref(), ttl)
                .await?;
            Ok(json_response(json!({
                "id": t.id,
                "token": t.token,
                "pool": t.pool,
                "expires": iso(t.expires),
                "caFingerprint": app.config.ca_fingerprint,
            })))
        }
        ["join-tokens", id] => {
            verb(Method::DELETE)?;
            svc.revoke_join_token(&account, id).await?;
            Ok(json_response(json!({"id": id, "revoked": true})))
        }
        ["hosts"] => {
            verb(Method::GET)?;
            let hosts: Vec<Value> = svc.list_hosts(&account).iter().map(host_json).collect();
            Ok(json_response(json!({ "value": hosts })))
        }
        ["hosts", host, "drain"] => {
            verb(Method::POST)?;
            let h = svc.drain_host(&account, host).await?;
            Ok(json_response(host_json(&h)))
        }
        ["hosts", host, "revoke"] => {
            verb(Method::POST)?;
            svc.revoke_host(&account, host).await?;
            Ok(json_response(json!({"id": host, "revoked": true})))
        }
        _ => Err(BatchError::new(Code::InvalidUri)),
    }
}

/// The body of `POST /_bluebatch/join-tokens`: `pool` (a pool id, optional) and `ttl` (a
/// duration such as `1h` or whole seconds; default 24h). An empty body is `{}`; other
/// properties are refused.
fn join_token_body(body: &[u8]) -> Result<(Option<String>, std::time::Duration), BatchError> {
    let map = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        parse_object(body)?
    };
    if let Some(k) = map.keys().find(|k| *k != "pool" && *k != "ttl") {
        return Err(BatchError::bad_body(format!(
            "unknown property {k:?}: a join token takes pool and ttl"
        )));
    }
    let pool = match map.get("pool") {
        None | Some(Value::Null) => None,
        // A pool that does not exist (yet) is allowed: an operator may provision hosts before
        // the pool they are for; the host backs it once it is added (its id compared as
        // Batch compares pool ids, ignoring case).
        Some(Value::String(p)) if bluebatch_core::pools::valid_pool_id(p) => Some(p.clone()),
        Some(_) => {
            return Err(BatchError::property(
                Code::InvalidPropertyValue,
                "pool",
                "the id of the pool the host may back: 1 to 64 letters, digits, hyphens and \
                 underscores",
            ));
        }
    };
    let bad_ttl = || {
        BatchError::property(
            Code::InvalidPropertyValue,
            "ttl",
            "a duration longer than zero such as 30m, 2h or 1d12h, or whole seconds",
        )
    };
    let ttl = match map.get("ttl") {
        None | Some(Value::Null) => Duration::days(1),
        Some(Value::String(s)) => parse_duration(s).ok_or_else(bad_ttl)?,
        Some(Value::Number(n)) => Duration::seconds(n.as_i64().ok_or_else(bad_ttl)?),
        Some(_) => return Err(bad_ttl()),
    };
    if ttl <= Duration::ZERO {
        return Err(bad_ttl());
    }
    let ttl = std::time::Duration::try_from(ttl).map_err(|_| bad_ttl())?;
    Ok((pool, ttl))
}

fn host_json(h: &bluebatch_service::HostView) -> Value {
    let nodes: Vec<Value> = h
        .nodes
        .iter()
        .map(|(pool, node)| json!({"poolId": pool, "nodeId": node}))
        .collect();
    json!({
        "id": h.id,
        "account": h.account,
        "hostname": h.hostname,
        "provider": h.provider,
        "address": h.address,
        "sshPort": h.ssh_port,
        "slots": h.slots,
        "nodes": nodes,
        "drained": h.drained,
        "connected": h.connected,
        "lastSeen": h.last_seen.map(iso),
    })
}

/// The media type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /_bluebatch/metrics`: the registry rendered with what only the service knows now
/// (agents connected and known). `Content-Length` is set, so that HEAD tells it too.
fn metrics_response(app: &App) -> Response<Body> {
    let (agents_connected, agents_known) = app.service.agents_connected_and_known();
    let text = bluebatch_metrics::render(
        bluebatch_metrics::global(),
        bluebatch_metrics::Snapshot {
            agents_connected,
            agents_known,
        },
    );
    let len = text.len();
    let mut r = Response::new(Body::from(text));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        axum::http::HeaderValue::from_static(METRICS_CONTENT_TYPE),
    );
    h.insert("content-length", axum::http::HeaderValue::from(len));
    // A scrape must see the figures of now, never a cache's.
    h.insert(
        "cache-control",
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

fn clock_json(app: &App) -> Response<Body> {
    let clock = app.service.clock();
    json_response(json!({
        "now": iso(bluebatch_core::Clock::now(clock.as_ref())),
        "offsetSeconds": clock.offset().whole_seconds(),
    }))
}

/// `2d`, `36h`, `1d12h30m`, `90s`, `1w` → a duration.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'w' => Duration::weeks(1),
            'd' => Duration::days(1),
            'h' => Duration::hours(1),
            'm' => Duration::minutes(1),
            's' => Duration::seconds(1),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(i32::try_from(n).ok()?)?)?;
        any = true;
    }
    (any && num.is_empty()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2d"), Some(Duration::days(2)));
        assert_eq!(
            parse_duration("1d12h30m"),
            Some(Duration::minutes(36 * 60 + 30))
        );
        assert_eq!(parse_duration("90s"), Some(Duration::seconds(90)));
        for bad in ["", "5", "d", "1y", "-1d", "1d 2h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
