//! The web console, under `/_bluebatch/console/` on the service's own listeners (HTTP and HTTPS):
//! server-rendered pages, one stylesheet and one small script, all inside the binary.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /_bluebatch/console/sign-in` | the sign-in form (fields `account`, `key`); with `?once=TOKEN`, the one-time sign-in printed at start-up |
//! | `POST /_bluebatch/console/sign-in` | signs in: 303 to the pools with the session cookie, or 401 with the form again |
//! | `POST /_bluebatch/console/sign-out` | ends the session |
//! | `GET /_bluebatch/console/` | the account's pools |
//! | `GET /_bluebatch/console/pools/{p}` | a pool's nodes |
//! | `POST /_bluebatch/console/pools/{p}/resize` | Resize pool (`targetDedicatedNodes`) |
//! | `GET /_bluebatch/console/pools/{p}/nodes/{n}` | a node, its users as the node enforces them, the Add user form |
//! | `POST /_bluebatch/console/pools/{p}/nodes/{n}/users` | Add user (`name`, `password`, `sshPublicKey`, `expiryTime`, `isAdmin`) |
//! | `GET /_bluebatch/console/events` | server-sent events: `ready`, then `changed` when the account's state moves |
//! | `GET /_bluebatch/console/assets/console.css`, `…/console.js` | the assets |
//!
//! A page asked with `?fragment=main` answers the inner HTML of its `<main>` only (the script
//! swaps it in on each `changed` event). Pages need a session (else 303 to the sign-in); every
//! POST but the sign-in needs the session's CSRF token in the field `csrf` (else 403, nothing
//! changed). Actions go through the same service calls as the API's handlers, with the same
//! rules and Batch errors, for the signed-in account only.

pub mod events;
pub mod pages;
pub mod session;

use crate::handlers::hash;
use crate::percent::decode;
use crate::respond::Ctx;
use crate::server::{App, Unread, read_any_body};
use axum::body::Body;
use axum::http::{HeaderValue, Method, Response, StatusCode, request::Parts};
use bluebatch_core::Clock;
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::model::Os;
use bluebatch_core::timefmt::iso;
use bluebatch_core::users::parse_add_user;
use bluebatch_service::{NodeView, Service, UserAddr};
use pages::{Endpoint, Frame, UserForm};
use serde_json::{Map, Value, json};
use session::Session;

/// Where the console lives.
pub const PREFIX: &str = "/_bluebatch/console";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Whether `path` is the console's.
pub fn is_console_path(path: &str) -> bool {
    path == PREFIX || path.starts_with("/_bluebatch/console/")
}

/// A one-time sign-in path for `account` (`/_bluebatch/console/sign-in?once=…`), usable once
/// within ten minutes; the caller prefixes the listener's scheme and address.
pub fn one_time_sign_in_path(account: &str) -> String {
    format!("{PREFIX}/sign-in?once={}", session::one_time(account))
}

type Answer = Result<Response<Body>, BatchError>;

/// What a request of the console carries.
struct Req<'a> {
    app: &'a App,
    /// Path segments after the prefix, percent-decoded.
    segs: Vec<String>,
    /// `?fragment=main`: the inner HTML of `<main>` only.
    fragment: bool,
    session: Option<(String, Session)>,
}

pub(crate) async fn handle(app: &App, parts: &Parts, body: &mut Unread, ctx: &mut Ctx) -> Answer {
    let rest = parts.uri.path().strip_prefix(PREFIX).unwrap_or("");
    let mut segs = Vec::new();
    for s in rest.split('/').filter(|s| !s.is_empty()) {
        segs.push(decode(s).ok_or_else(|| BatchError::new(Code::InvalidUri))?);
    }
    let query = form_pairs(parts.uri.query().unwrap_or(""));
    let fragment = query.iter().any(|(k, v)| k == "fragment" && v == "main");
    let session = parts
        .headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| session::cookie(c, session::COOKIE))
        .and_then(|id| session::lookup(id).map(|s| (id.to_string(), s)))
        // An account removed from the accounts file signs its sessions out.
        .filter(|(_, s)| app.config.accounts.keys(&s.account).is_some());
    if let Some((_, s)) = &session {
        ctx.account = Some(s.account.clone());
    }
    let r = Req {
        app,
        segs,
        fragment,
        session,
    };
    let m = &parts.method;
    let seg: Vec<&str> = r.segs.iter().map(String::as_str).collect();
    let get = *m == Method::GET || *m == Method::HEAD;
    match (get, seg.as_slice()) {
        (true, ["assets", "console.css"]) => Ok(asset(CSS, "text/css; charset=utf-8")),
        (true, ["assets", "console.js"]) => Ok(asset(JS, "text/javascript; charset=utf-8")),
        (true, ["sign-in"]) => match query.iter().find(|(k, _)| k == "once") {
            Some((_, token)) => match session::redeem(token) {
                Some(account) if app.config.accounts.keys(&account).is_some() => {
                    Ok(signed_in(&r, &account))
                }
                _ => Ok(sign_in_page(
                    &r,
                    StatusCode::UNAUTHORIZED,
                    "",
                    Some("This one-time sign-in link was used already or has expired."),
                )),
            },
            None => Ok(sign_in_page(&r, StatusCode::OK, "", None)),
        },
        (false, ["sign-in"]) if *m == Method::POST => {
            let form = read_form(parts, body).await?;
            let account = value(&form, "account");
            let key = value(&form, "key");
            if session::key_matches(&app.config.accounts, account, key) {
                Ok(signed_in(&r, account))
            } else {
                Ok(sign_in_page(
                    &r,
                    StatusCode::UNAUTHORIZED,
                    account,
                    Some("Wrong account name or key."),
                ))
            }
        }
        (true, _) => {
            let Some((_, s)) = &r.session else {
                return Ok(redirect(&format!("{PREFIX}/sign-in")));
            };
            let s = s.clone();
            app.service.sync().await?;
            match seg.as_slice() {
                [] => Ok(pools_page(&r, &s, None)),
                ["events"] => Ok(events::response(app.service.clone(), s.account.clone())),
                ["pools", pool] => Ok(nodes_page(&r, &s, pool)),
                ["pools", pool, "nodes", node] => Ok(node_page(
                    &r,
                    &s,
                    pool,
                    node,
                    &UserForm::default(),
                    StatusCode::OK,
                )),
                _ => Ok(problem(
                    &r,
                    StatusCode::NOT_FOUND,
                    "Not found",
                    "The console has no such page.",
                )),
            }
        }
        (false, _) if *m == Method::POST => {
            let Some((id, s)) = r.session.clone() else {
                return Ok(problem(
                    &r,
                    StatusCode::FORBIDDEN,
                    "Sign in first",
                    "This change needs a signed-in console session; sign in and try again.",
                ));
            };
            let form = read_form(parts, body).await?;
            let given = value(&form, "csrf");
            if !session::same(given.as_bytes(), s.csrf.as_bytes()) {
                return Ok(problem(
                    &r,
                    StatusCode::FORBIDDEN,
                    "Refused",
                    "The form's CSRF token is missing or wrong, so nothing was changed. Reload \
                     the page and try again.",
                ));
            }
            app.service.sync().await?;
            match seg.as_slice() {
                ["sign-out"] => {
                    session::remove(&id);
                    let mut resp = redirect(&format!("{PREFIX}/sign-in"));
                    set_cookie(&mut resp, "", Some(0), app.config.scheme == "https");
                    Ok(resp)
                }
                ["pools", pool, "resize"] => resize(&r, &s, pool, &form).await,
                ["pools", pool, "nodes", node, "users"] => {
                    add_user(&r, &s, pool, node, &form).await
                }
                ["pools", pool, "nodes", node, "users", user, "update"] => {
                    update_user(&r, &s, pool, node, user, &form).await
                }
                ["pools", pool, "nodes", node, action] => {
                    node_action(&r, &s, pool, node, action, &form).await
                }
                ["pools", pool, "nodes", node, "users", user, "delete"] => {
                    let svc = &app.service;
                    let at = UserAddr {
                        account: &s.account,
                        pool,
                        node,
                        timeout: None,
                    };
                    node_outcome(&r, &s, pool, node, svc.delete_user(at, user).await)
                }
                ["clock", "advance"] => {
                    let by = value(&form, "by");
                    let outcome = match crate::controls::parse_duration(by) {
                        Some(d) => app.service.advance_clock(d).await.map(|_| ()),
                        None => Err(BatchError::property(
                            Code::InvalidPropertyValue,
                            "by",
                            "a duration such as 2d, 36h, 1d12h30m or 90s",
                        )),
                    };
                    match outcome {
                        Ok(()) => Ok(redirect(&format!("{PREFIX}/"))),
                        Err(e) => Ok(pools_page(&r, &s, Some(e))),
                    }
                }
                _ => Ok(problem(
                    &r,
                    StatusCode::NOT_FOUND,
                    "Not found",
                    "The console has no such action.",
                )),
            }
        }
        _ => Err(BatchError::new(Code::UnsupportedHttpVerb)),
    }
}

/// `a=1&b=x+y` decoded (`+` is a space); a pair that does not decode is left out.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode(&k.replace('+', " "))?, decode(&v.replace('+', " "))?))
        })
        .collect()
}

fn value<'a>(form: &'a [(String, String)], name: &str) -> &'a str {
    form.iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

async fn read_form(parts: &Parts, body: &mut Unread) -> Result<Vec<(String, String)>, BatchError> {
    let bytes = read_any_body(&parts.headers, body, 64 * 1024).await?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| BatchError::bad_body("the form is not UTF-8"))?;
    Ok(form_pairs(text))
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // The one-time sign-in token is in a URL: never sent on to another site.
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(text));
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn redirect(to: &str) -> Response<Body> {
    let mut r = html(StatusCode::SEE_OTHER, String::new());
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert("location", v);
    }
    r
}

fn set_cookie(r: &mut Response<Body>, id: &str, max_age: Option<u64>, secure: bool) {
    let mut c = format!(
        "{}={id}; Path={PREFIX}; HttpOnly; SameSite=Strict",
        session::COOKIE
    );
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        c.push_str("; Secure");
    }
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append("set-cookie", v);
    }
}

/// A new session for `account`: 303 to the pools with its cookie.
fn signed_in(r: &Req<'_>, account: &str) -> Response<Body> {
    let id = session::create(account);
    let mut resp = redirect(&format!("{PREFIX}/"));
    set_cookie(&mut resp, &id, None, r.app.config.scheme == "https");
    resp
}

fn frame<'a>(r: &Req<'_>, title: &'a str, s: Option<&'a Session>) -> Frame<'a> {
    let clock = r.app.service.clock();
    let off = clock.offset();
    Frame {
        title,
        account: s.map(|s| s.account.as_str()),
        csrf: s.map_or("", |s| s.csrf.as_str()),
        clock: iso(clock.now()),
        offset: if off.is_zero() {
            "wall clock".into()
        } else {
            format!("wall clock + {}", human(off))
        },
    }
}

/// `1d 2h 3m 4s` for a non-negative duration.
fn human(d: time::Duration) -> String {
    let s = d.whole_seconds().max(0);
    let (days, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    let mut out = Vec::new();
    for (n, unit) in [(days, "d"), (h, "h"), (m, "m"), (sec, "s")] {
        if n > 0 {
            out.push(format!("{n}{unit}"));
        }
    }
    if out.is_empty() {
        "0s".into()
    } else {
        out.join(" ")
    }
}

/// The page, or only its `<main>` for `?fragment=main`.
fn render(r: &Req<'_>, status: StatusCode, f: &Frame<'_>, main: &str) -> Response<Body> {
    if r.fragment {
        let mut resp = html(status, main.to_string());
        // The header's clock is outside `<main>`: the script sets it from this.
        if let Ok(v) = HeaderValue::from_str(&format!("{} ({})", f.clock, f.offset)) {
            resp.headers_mut().insert("x-console-clock", v);
        }
        resp
    } else {
        html(status, pages::page(f, main))
    }
}

fn sign_in_page(
    r: &Req<'_>,
    status: StatusCode,
    account: &str,
    error: Option<&str>,
) -> Response<Body> {
    let f = frame(r, "Sign in", None);
    render(r, status, &f, &pages::sign_in(account, error))
}

fn problem(r: &Req<'_>, status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let s = r.session.as_ref().map(|(_, s)| s);
    let f = frame(r, title, s);
    render(r, status, &f, &pages::problem(title, text))
}

/// A Batch error of a read (pool or node not found) as a page.
fn batch_problem(r: &Req<'_>, e: &BatchError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    problem(r, status, e.code.as_str(), &pages::error_text(e))
}

fn pools_page(r: &Req<'_>, s: &Session, clock_error: Option<BatchError>) -> Response<Body> {
    let svc = &r.app.service;
    let (pools, _) = svc.list_pools(&s.account, &|_| true, None, 10_000);
    let with_nodes: Vec<_> = pools
        .into_iter()
        .map(|p| {
            let nodes = svc
                .list_nodes(&s.account, &p.pool.id, &|_| true, None, events::MAX_NODES)
                .map(|(n, _)| n)
                .unwrap_or_default();
            (p, nodes)
        })
        .collect();
    let f = frame(r, "Pools", Some(s));
    let status = clock_error.as_ref().map_or(StatusCode::OK, |e| {
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    });
    let clock = pages::clock_form(&s.csrf, clock_error.as_ref());
    render(r, status, &f, &pages::pools(&with_nodes, &clock))
}

/// Where a node's SSH endpoint is reached (as Get Remote Login Settings answers).
fn endpoint(svc: &Service, account: &str, v: &NodeView) -> Endpoint {
    if v.os != Os::Linux {
        return None;
    }
    svc.remote_login_settings(account, &v.pool_id, &v.node.id)
        .ok()
        .map(|(ip, port, _)| (ip, port))
}

fn nodes_page(r: &Req<'_>, s: &Session, pool: &str) -> Response<Body> {
    let svc = &r.app.service;
    let p = match svc.get_pool(&s.account, pool) {
        Ok(p) => p,
        Err(e) => return batch_problem(r, &e),
    };
    let nodes = match svc.list_nodes(&s.account, pool, &|_| true, None, events::MAX_NODES) {
        Ok((n, _)) => n,
        Err(e) => return batch_problem(r, &e),
    };
    let nodes: Vec<_> = nodes
        .into_iter()
        .map(|v| {
            let ep = endpoint(svc, &s.account, &v);
            (v, ep)
        })
        .collect();
    let title = format!("Pool {}", p.pool.id);
    let f = frame(r, &title, Some(s));
    render(r, StatusCode::OK, &f, &pages::nodes(&p, &nodes, &s.csrf))
}

fn node_page(
    r: &Req<'_>,
    s: &Session,
    pool: &str,
    node: &str,
    form: &UserForm,
    status: StatusCode,
) -> Response<Body> {
    let svc = &r.app.service;
    let v = match svc.get_node(&s.account, pool, node) {
        Ok(v) => v,
        Err(e) => return batch_problem(r, &e),
    };
    let users = match svc.node_users(&s.account, pool, node) {
        Ok(u) => u,
        Err(e) => return batch_problem(r, &e),
    };
    let logins = svc.node_logins(&s.account, pool, node).unwrap_or_default();
    let ep = endpoint(svc, &s.account, &v);
    let title = format!("Node {}", v.node.id);
    let f = frame(r, &title, Some(s));
    render(
        r,
        status,
        &f,
        &pages::node(&v, &ep, &users, &logins, form, &s.csrf),
    )
}

/// The API's body for a user form: empty fields are left out (a password or key left empty is
/// none; an expiry left empty is the default, one day from now).
fn user_body(form: &[(String, String)]) -> Value {
    let mut o = Map::new();
    for k in ["name", "password", "sshPublicKey", "expiryTime"] {
        let v = value(form, k);
        let v = if k == "password" { v } else { v.trim() };
        if !v.is_empty() {
            o.insert(k.into(), json!(v));
        }
    }
    if matches!(value(form, "isAdmin"), "true" | "on") {
        o.insert("isAdmin".into(), json!(true));
    }
    Value::Object(o)
}

async fn add_user(
    r: &Req<'_>,
    s: &Session,
    pool: &str,
    node: &str,
    form: &[(String, String)],
) -> Answer {
    let svc = &r.app.service;
    let outcome = async {
        let body = serde_json::to_vec(&user_body(form))
            .map_err(|_| BatchError::new(Code::InternalError))?;
        let user = parse_add_user(&body)?;
        let at = UserAddr {
            account: &s.account,
            pool,
            node,
            timeout: None,
        };
        if user.password.is_some() {
            svc.check_user_target(&at, None, &user)?;
        }
        let hash = hash(user.password.as_deref()).await?;
        svc.add_user(at, user, hash).await
    }
    .await;
    match outcome {
        Ok(_) => Ok(redirect(&node_path(pool, node))),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let again = UserForm {
                name: value(form, "name").to_string(),
                ssh_public_key: value(form, "sshPublicKey").to_string(),
                expiry_time: value(form, "expiryTime").to_string(),
                is_admin: matches!(value(form, "isAdmin"), "true" | "on"),
                error: Some(e),
                ..UserForm::default()
            };
            Ok(node_page(r, s, pool, node, &again, status))
        }
    }
}

async fn resize(r: &Req<'_>, s: &Session, pool: &str, form: &[(String, String)]) -> Answer {
    let svc = &r.app.service;
    let text = value(form, "targetDedicatedNodes").trim();
    let outcome = async {
        let n: u64 = text.parse().map_err(|_| {
            BatchError::property(
                Code::InvalidPropertyValue,
                "targetDedicatedNodes",
                "a whole number of nodes",
            )
        })?;
        let body = serde_json::to_vec(&json!({"targetDedicatedNodes": n}))
            .map_err(|_| BatchError::new(Code::InternalError))?;
        let resize = bluebatch_core::pools::parse_resize(&body, svc.config().max_nodes_per_pool)?;
        svc.resize_pool(&s.account, pool, resize, &|_| Ok(())).await
    }
    .await;
    match outcome {
        Ok(()) => Ok(redirect(&format!(
            "{PREFIX}/pools/{}",
            crate::percent::encode(pool)
        ))),
        Err(e) => Ok(batch_problem(r, &e)),
    }
}

/// After a node action: 303 back to the node's page, or the page with the refusal above the
/// actions.
fn node_outcome(
    r: &Req<'_>,
    s: &Session,
    pool: &str,
    node: &str,
    outcome: Result<(), BatchError>,
) -> Answer {
    match outcome {
        Ok(()) => Ok(redirect(&node_path(pool, node))),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let form = UserForm {
                action: Some(e),
                ..UserForm::default()
            };
            Ok(node_page(r, s, pool, node, &form, status))
        }
    }
}

fn node_path(pool: &str, node: &str) -> String {
    format!(
        "{PREFIX}/pools/{}/nodes/{}",
        crate::percent::encode(pool),
        crate::percent::encode(node)
    )
}

/// Reboot, Reimage, Disable or Enable scheduling, Set state (field `state`).
async fn node_action(
    r: &Req<'_>,
    s: &Session,
    pool: &str,
    node: &str,
    action: &str,
    form: &[(String, String)],
) -> Answer {
    let svc = &r.app.service;
    let a = s.account.as_str();
    let outcome = match action {
        "reboot" => svc.reboot_node(a, pool, node).await,
        "reimage" => svc.reimage_node(a, pool, node).await,
        "disable-scheduling" => svc.disable_scheduling(a, pool, node).await,
        "enable-scheduling" => svc.enable_scheduling(a, pool, node).await,
        "state" => match bluebatch_core::model::NodeState::parse(value(form, "state")) {
            Some(st) => svc.set_node_state(a, pool, node, st).await,
            None => Err(BatchError::property(
                Code::InvalidPropertyValue,
                "state",
                "one of the ComputeNodeState values, e.g. idle, starting, rebooting",
            )),
        },
        _ => {
            return Ok(problem(
                r,
                StatusCode::NOT_FOUND,
                "Not found",
                "The console has no such action.",
            ));
        }
    };
    node_outcome(r, s, pool, node, outcome)
}

/// Update user: the form's password, key and expiry replace the user's (empty: removed, or
/// the default expiry), as the API's Update User does.
async fn update_user(
    r: &Req<'_>,
    s: &Session,
    pool: &str,
    node: &str,
    user: &str,
    form: &[(String, String)],
) -> Answer {
    let svc = &r.app.service;
    let outcome = async {
        let mut o = user_body(form);
        if let Value::Object(m) = &mut o {
            m.remove("name");
            m.remove("isAdmin");
        }
        let body = serde_json::to_vec(&o).map_err(|_| BatchError::new(Code::InternalError))?;
        let body = bluebatch_core::users::parse_update_user(&body)?;
        let at = UserAddr {
            account: &s.account,
            pool,
            node,
            timeout: None,
        };
        if body.password.is_some() {
            svc.check_user_target(&at, Some(user), &body)?;
        }
        let hash = hash(body.password.as_deref()).await?;
        svc.update_user(at, user, body, hash).await
    }
    .await;
    match outcome {
        Ok(_) => Ok(redirect(&node_path(pool, node))),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let form = UserForm {
                update: Some((user.to_string(), e)),
                ..UserForm::default()
            };
            Ok(node_page(r, s, pool, node, &form, status))
        }
    }
}
