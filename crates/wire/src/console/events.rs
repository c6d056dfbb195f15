//! `GET /_bluebatch/console/events`: server-sent events telling a signed-in page that something
//! of its account changed. The first event is `ready` with the account's current revision; then
//! `changed` with the new one whenever it moves (looked at every [`POLL`]), and a comment every
//! [`KEEP_ALIVE`] so proxies and the browser keep the stream open. The revision is a digest of
//! what the pages show (pools, nodes, users and what the nodes applied, their login activity,
//! the clock's offset): it tells "different", not "newer".

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Response, StatusCode};
use bluebatch_service::Service;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::LazyLock;
use std::time::Duration;
use tokio::time::Instant;

pub const POLL: Duration = Duration::from_millis(500);
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Nodes looked at per pool for the digest (a console page shows no more).
pub const MAX_NODES: usize = 1000;

/// Set once the service stops: every stream ends, so an open console tab does not hold the
/// shutdown for its grace period (the browser reconnects to the next process).
static CLOSING: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Ends every event stream of this process (called when the service begins to stop).
pub fn close_all() {
    CLOSING.send_replace(true);
}

/// A digest of what `account`'s pages show.
pub fn revision(svc: &Service, account: &str) -> u64 {
    let mut h = DefaultHasher::new();
    svc.clock().offset().whole_nanoseconds().hash(&mut h);
    let (pools, _) = svc.list_pools(account, &|_| true, None, 10_000);
    for p in &pools {
        p.pool.id.hash(&mut h);
        p.pool.etag.hash(&mut h);
        p.current_dedicated.hash(&mut h);
        p.current_low_priority.hash(&mut h);
        let Ok((nodes, _)) = svc.list_nodes(account, &p.pool.id, &|_| true, None, MAX_NODES) else {
            continue;
        };
        for n in &nodes {
            n.node.id.hash(&mut h);
            n.node.etag.hash(&mut h);
            n.node.state.as_str().hash(&mut h);
            n.node.users_revision.hash(&mut h);
            if let Ok(u) = svc.node_users(account, &p.pool.id, &n.node.id) {
                u.applied_revision.hash(&mut h);
                u.applied.len().hash(&mut h);
                u.login_lockouts.len().hash(&mut h);
                for l in &u.login_lockouts {
                    l.failures.hash(&mut h);
                }
            }
            // The newest login outcome's number: the list itself is not copied.
            if let Ok(seq) = svc.node_last_login_seq(account, &p.pool.id, &n.node.id) {
                seq.hash(&mut h);
            }
        }
    }
    h.finish()
}

struct Stream {
    svc: Service,
    account: String,
    last: Option<u64>,
    next_keep_alive: Instant,
    closing: tokio::sync::watch::Receiver<bool>,
}

/// The event stream for `account`; it ends when the client goes away (the body is dropped).
pub fn response(svc: Service, account: String) -> Response<Body> {
    let start = Stream {
        svc,
        account,
        last: None,
        next_keep_alive: Instant::now() + KEEP_ALIVE,
        closing: CLOSING.subscribe(),
    };
    let events = futures_util::stream::unfold(start, |mut s| async move {
        loop {
            if *s.closing.borrow_and_update() {
                return None;
            }
            let rev = revision(&s.svc, &s.account);
            let chunk = match s.last {
                None => Some(format!("retry: 2000\nevent: ready\ndata: {rev}\n\n")),
                Some(last) if last != rev => Some(format!("event: changed\ndata: {rev}\n\n")),
                _ if Instant::now() >= s.next_keep_alive => Some(": keep-alive\n\n".to_string()),
                _ => None,
            };
            if let Some(chunk) = chunk {
                s.last = Some(rev);
                s.next_keep_alive = Instant::now() + KEEP_ALIVE;
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), s));
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = s.closing.changed() => {}
            }
        }
    });
    let mut r = Response::new(Body::from_stream(events));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}
