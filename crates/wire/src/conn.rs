//! The HTTP(S) listeners' accept loop and the limits on their connections (docs/contract.md §7).
//!
//! Every connection is tracked from its accept to its close, in one of three phases: waiting for
//! a request head (from the accept, the TLS handshake included, or from the first byte after an
//! idle time), in a request (from a complete head until the answer is handed over), or idle
//! between requests. The server closes a connection that stays too long in a phase:
//! [`HttpLimits::head_timeout`] waiting for a head, [`HttpLimits::idle_timeout`] idle, and
//! [`HttpLimits::stall_timeout`] with an answer the client does not read. A request body that
//! makes no progress for [`HttpLimits::stall_timeout`] fails the request (see
//! [`stalled`]). When [`HttpLimits::max_connections`] are open, a new connection makes room by
//! closing the one that has used the largest share of its deadline among those waiting for a
//! head, idle, or waiting on the client (a stalled body or an unread answer); connections whose
//! request is being worked on are never closed for room. A source address holding
//! [`HttpLimits::max_connections_per_source`] connections has its further connections closed at
//! once; a connection that carried a request with a valid node credential (an agent's) stops
//! counting toward that cap ([`ConnHandle::exempt_from_source_cap`]), as many agents may share
//! one address.
//!
//! hyper's own header timeout is off: it starts with the previous answer, so it would also close
//! idle keep-alive connections at the head deadline.

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// The limits of one HTTP(S) listener; each is a flag of `bluebatch serve`.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// Connections open at once from one source address; 0: no cap
    /// (`--max-connections-per-source`).
    pub max_connections_per_source: usize,
    /// From the accept (or the first byte after an idle time) to a complete request head
    /// (`--http-head-timeout`).
    pub head_timeout: Duration,
    /// Between an answer and the next request's first byte (`--http-idle-timeout`).
    pub idle_timeout: Duration,
    /// A request body that makes no progress, or an answer the client does not read
    /// (`--http-stall-timeout`).
    pub stall_timeout: Duration,
    /// The request line and header fields, in bytes (`--max-header-bytes`).
    pub max_head_bytes: usize,
    /// Header fields in one request (`--max-headers`).
    pub max_headers: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 256,
            head_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(30),
            max_head_bytes: 32 << 10,
            max_headers: 100,
        }
    }
}

impl HttpLimits {
    /// hyper's own bound on the head, above ours: a head between the two is answered with a
    /// Batch error by the request pipeline; beyond this hyper answers a bare 431. At least
    /// 96 KiB, so that a request target longer than the http crate's 64 KiB still reads hyper's
    /// 414 URI Too Long.
    pub fn hyper_max_head_bytes(&self) -> usize {
        self.max_head_bytes.saturating_mul(2).max(96 << 10)
    }
    /// hyper's own bound on the header count, above ours (as [`Self::hyper_max_head_bytes`]).
    pub fn hyper_max_headers(&self) -> usize {
        self.max_headers.saturating_mul(2).max(self.max_headers + 1)
    }
}

/// How long a shutting-down listener waits for the requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

const AWAITING_HEAD: u64 = 0;
const IN_REQUEST: u64 = 1;
const IDLE: u64 = 2;
const PHASE_SHIFT: u32 = 60;
const MS_MASK: u64 = (1 << PHASE_SHIFT) - 1;

/// One open connection, as the registry sees it.
struct Conn {
    id: u64,
    source: IpAddr,
    epoch: Instant,
    /// The phase (top bits) and when it began (ms since `epoch`), in one word so that a reader
    /// never pairs a phase with another phase's start.
    state: AtomicU64,
    /// 0, or 1 + when (ms since `epoch`) a write to the client began to wait.
    write_waiting: AtomicU64,
    /// 0, or 1 + when (ms since `epoch`) the request body began to wait for the client.
    body_waiting: AtomicU64,
    close: Notify,
    /// Not counted against its source address's cap any more ([`ConnHandle::exempt_from_source_cap`]).
    exempt: std::sync::atomic::AtomicBool,
}

impl Conn {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn enter(&self, phase: u64) {
        self.state.store(
            (phase << PHASE_SHIFT) | (self.now() & MS_MASK),
            Ordering::Release,
        );
    }
    /// (phase, ms since `epoch` when it began)
    fn phase(&self) -> (u64, u64) {
        let s = self.state.load(Ordering::Acquire);
        (s >> PHASE_SHIFT, s & MS_MASK)
    }
    /// Bytes arrived: an idle connection is now waiting for a head.
    fn on_read(&self) {
        let s = self.state.load(Ordering::Acquire);
        if s >> PHASE_SHIFT == IDLE {
            let next = (AWAITING_HEAD << PHASE_SHIFT) | (self.now() & MS_MASK);
            let _ = self
                .state
                .compare_exchange(s, next, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
    fn mark(flag: &AtomicU64, now: u64, waiting: bool) {
        if waiting {
            if flag.load(Ordering::Relaxed) == 0 {
                flag.store(now + 1, Ordering::Relaxed);
            }
        } else if flag.load(Ordering::Relaxed) != 0 {
            flag.store(0, Ordering::Relaxed);
        }
    }
    /// How long (ms) the connection has been waiting on the client for `flag`, if it is.
    fn waited(flag: &AtomicU64, now: u64) -> Option<u64> {
        match flag.load(Ordering::Relaxed) {
            0 => None,
            t => Some(now.saturating_sub(t - 1)),
        }
    }
}

/// Why the server closed a connection (counted for the log).
#[derive(Clone, Copy)]
enum Shed {
    HeadTimeout = 0,
    IdleTimeout = 1,
    Stalled = 2,
    Evicted = 3,
    RefusedPerSource = 4,
}

struct Inner {
    conns: HashMap<u64, Arc<Conn>>,
    per_source: HashMap<IpAddr, usize>,
    next_id: u64,
}

struct Registry {
    limits: HttpLimits,
    epoch: Instant,
    inner: Mutex<Inner>,
    /// A connection closed (room may have been made).
    freed: Notify,
    shed: [AtomicU64; 5],
}

impl Registry {
    fn new(limits: HttpLimits) -> Self {
        Self {
            limits,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                conns: HashMap::new(),
                per_source: HashMap::new(),
                next_id: 0,
            }),
            freed: Notify::new(),
            shed: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn count(&self, why: Shed) {
        self.shed[why as usize].fetch_add(1, Ordering::Relaxed);
        // The process-wide figure scraped from /_bluebatch/metrics (same reason order).
        bluebatch_metrics::global().shed(why as usize);
    }

    /// Whether `source` may open one more connection.
    fn source_has_room(&self, source: IpAddr) -> bool {
        let cap = self.limits.max_connections_per_source;
        cap == 0 || self.lock().per_source.get(&source).copied().unwrap_or(0) < cap
    }

    fn register(&self, source: IpAddr) -> Arc<Conn> {
        let mut g = self.lock();
        g.next_id += 1;
        let conn = Arc::new(Conn {
            id: g.next_id,
            source,
            epoch: self.epoch,
            state: AtomicU64::new(0),
            write_waiting: AtomicU64::new(0),
            body_waiting: AtomicU64::new(0),
            close: Notify::new(),
            exempt: std::sync::atomic::AtomicBool::new(false),
        });
        conn.enter(AWAITING_HEAD);
        g.conns.insert(conn.id, conn.clone());
        *g.per_source.entry(source).or_insert(0) += 1;
        conn
    }

    /// Takes the connection out of the books (its place is free from now on).
    fn remove(g: &mut Inner, id: u64) -> Option<Arc<Conn>> {
        let conn = g.conns.remove(&id)?;
        if conn.exempt.load(Ordering::Acquire) {
            return Some(conn);
        }
        if let Some(n) = g.per_source.get_mut(&conn.source) {
            *n -= 1;
            if *n == 0 {
                g.per_source.remove(&conn.source);
            }
        }
        Some(conn)
    }

    /// Stops counting `conn` against its source address's cap (once, while it is open).
    fn exempt(&self, conn: &Conn) {
        let mut g = self.lock();
        if !g.conns.contains_key(&conn.id) || conn.exempt.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(n) = g.per_source.get_mut(&conn.source) {
            *n -= 1;
            if *n == 0 {
                g.per_source.remove(&conn.source);
            }
        }
    }

    /// What share of its deadline `c` has used in a phase where it may be closed for room
    /// (waiting for a head, idle, or waiting on the client); `None` while its request is being
    /// worked on.
    fn spent(&self, c: &Conn, now: u64) -> Option<f64> {
        let share =
            |waited: u64, limit: Duration| waited as f64 / (limit.as_millis().max(1) as f64);
        let (phase, since) = c.phase();
        let waited = now.saturating_sub(since);
        let mut best = match phase {
            AWAITING_HEAD => Some(share(waited, self.limits.head_timeout)),
            IDLE => Some(share(waited, self.limits.idle_timeout)),
            _ => None,
        };
        for flag in [&c.write_waiting, &c.body_waiting] {
            if let Some(w) = Conn::waited(flag, now) {
                let s = share(w, self.limits.stall_timeout);
                best = Some(best.map_or(s, |b: f64| b.max(s)));
            }
        }
        best
    }

    /// Returns once there is room for one more connection: at once below the bound, else by
    /// closing the connection that has used the largest share of its deadline (see
    /// [`Self::spent`]), else when a connection closes.
    async fn make_room(&self) {
        let max = self.limits.max_connections.max(1);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut g = self.lock();
                if g.conns.len() < max {
                    return;
                }
                let now = self.now();
                let victim = g
                    .conns
                    .values()
                    .filter_map(|c| self.spent(c, now).map(|s| (s, c.id)))
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, id)| id);
                if let Some(conn) = victim.and_then(|id| Self::remove(&mut g, id)) {
                    drop(g);
                    conn.close.notify_one();
                    self.count(Shed::Evicted);
                    return;
                }
            }
            // Every connection is in a request: wait for one to end (bounded, then look again).
            let _ = tokio::time::timeout(Duration::from_millis(250), freed).await;
        }
    }

    /// Closes the connections past a deadline of their phase.
    fn reap(&self) {
        let now = self.now();
        let ms = |d: Duration| d.as_millis() as u64;
        let (head, idle, stall) = (
            ms(self.limits.head_timeout),
            ms(self.limits.idle_timeout),
            ms(self.limits.stall_timeout),
        );
        let mut closed = Vec::new();
        {
            let mut g = self.lock();
            let expired: Vec<(u64, Shed)> = g
                .conns
                .values()
                .filter_map(|c| {
                    let (phase, since) = c.phase();
                    let waited = now.saturating_sub(since);
                    if Conn::waited(&c.write_waiting, now).is_some_and(|w| w >= stall) {
                        Some((c.id, Shed::Stalled))
                    } else if phase == AWAITING_HEAD && waited >= head {
                        Some((c.id, Shed::HeadTimeout))
                    } else if phase == IDLE && waited >= idle {
                        Some((c.id, Shed::IdleTimeout))
                    } else {
                        None
                    }
                })
                .collect();
            for (id, why) in expired {
                if let Some(c) = Self::remove(&mut g, id) {
                    closed.push((c, why));
                }
            }
        }
        for (c, why) in &closed {
            c.close.notify_one();
            self.count(*why);
        }
        if !closed.is_empty() {
            self.freed.notify_waiters();
        }
    }

    /// At shutdown: closes every connection not in a request (those in one finish it).
    fn close_waiting(&self) {
        let mut g = self.lock();
        let ids: Vec<u64> = g
            .conns
            .values()
            .filter(|c| c.phase().0 != IN_REQUEST)
            .map(|c| c.id)
            .collect();
        for id in ids {
            if let Some(c) = Self::remove(&mut g, id) {
                c.close.notify_one();
            }
        }
    }

    /// Checks the deadlines a few times per shortest deadline, and logs (at most every 10 s)
    /// how many connections were shed.
    async fn run_reaper(self: Arc<Self>) {
        let shortest = self
            .limits
            .head_timeout
            .min(self.limits.idle_timeout)
            .min(self.limits.stall_timeout);
        let mut tick = tokio::time::interval(
            (shortest / 10).clamp(Duration::from_millis(50), Duration::from_millis(500)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged = [0u64; 5];
        let mut last_log = Instant::now();
        loop {
            tick.tick().await;
            self.reap();
            if last_log.elapsed() >= Duration::from_secs(10) {
                let now: [u64; 5] = std::array::from_fn(|i| self.shed[i].load(Ordering::Relaxed));
                if now != logged {
                    let d = |i: usize| now[i] - logged[i];
                    let open = self.lock().conns.len();
                    tracing::warn!(
                        target: "bluebatch::http",
                        head_timeout = d(Shed::HeadTimeout as usize),
                        idle_timeout = d(Shed::IdleTimeout as usize),
                        stalled = d(Shed::Stalled as usize),
                        closed_for_room = d(Shed::Evicted as usize),
                        refused_per_source = d(Shed::RefusedPerSource as usize),
                        open,
                        "connections shed"
                    );
                    logged = now;
                }
                last_log = Instant::now();
            }
        }
    }
}

/// Counts a connection in `bluebatch_http_connections_open` from its task's start to its end
/// (however it ends: closed by either side, shed, its task aborted at shutdown).
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        bluebatch_metrics::global()
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        OpenGauge
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        bluebatch_metrics::global()
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives the connection's place back when its task ends.
struct Registered {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Already taken out when it was closed for room or at a deadline: nothing to give back
        // then, but a waiter may look again.
        Registry::remove(&mut self.registry.lock(), self.conn.id);
        self.registry.freed.notify_waiters();
    }
}

/// The socket, seen by the registry: bytes read wake an idle connection into waiting for a
/// head; a write that waits on the client is timed.
struct Tracked<T> {
    io: T,
    conn: Arc<Conn>,
}

impl<T> Tracked<T> {
    fn wrote<R>(&self, r: &Poll<io::Result<R>>) {
        Conn::mark(&self.conn.write_waiting, self.conn.now(), r.is_pending());
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&r);
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.wrote(&r);
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The error a request body yields after [`HttpLimits::stall_timeout`] without progress.
#[derive(Debug)]
pub struct Stalled(pub Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no part of the request body arrived for {:?}", self.0)
    }
}

impl std::error::Error for Stalled {}

/// The [`Stalled`] behind a body read error, if that is what it is.
pub fn stalled<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Stalled> {
    let mut at: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = at {
        if let Some(s) = err.downcast_ref::<Stalled>() {
            return Some(s);
        }
        at = err.source();
    }
    None
}

/// A request body that fails with [`Stalled`] when, while it is read, nothing arrives for
/// `limit`.
struct StallGuarded {
    inner: Incoming,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    conn: Arc<Conn>,
}

impl hyper::body::Body for StallGuarded {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.armed = false;
                Conn::mark(&this.conn.body_waiting, this.conn.now(), false);
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                Conn::mark(&this.conn.body_waiting, this.conn.now(), true);
                let deadline = tokio::time::Instant::now() + this.limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(this.limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StallGuarded {
    fn drop(&mut self) {
        Conn::mark(&self.conn.body_waiting, self.conn.now(), false);
    }
}

/// Marks the connection idle once the answer has been handed over (its body dropped).
struct RequestDone(Arc<Conn>);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.enter(IDLE);
    }
}

/// An answer's body, holding the connection's request open until it is written.
struct Answer {
    body: Body,
    _done: RequestDone,
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> SizeHint {
        hyper::body::Body::size_hint(&self.body)
    }
}

/// What a request handler may know of and do to the connection its request came on: in the
/// extensions of every request served through [`serve`].
#[derive(Clone)]
pub struct ConnHandle {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    stop: watch::Receiver<bool>,
}

impl ConnHandle {
    /// Stops counting this connection against [`HttpLimits::max_connections_per_source`] (an
    /// authenticated agent: many agents may share one address). It still counts toward
    /// [`HttpLimits::max_connections`] and keeps every deadline.
    pub fn exempt_from_source_cap(&self) {
        self.registry.exempt(&self.conn);
    }

    /// Resolves once the listener begins to shut down (a long poll then answers at once).
    pub async fn shutting_down(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|stopping| *stopping).await;
    }
}

/// The service of one connection: the router, with the connection's phases kept.
#[derive(Clone)]
struct PerConn {
    router: Router,
    conn: Arc<Conn>,
    stall: Duration,
    handle: ConnHandle,
}

impl hyper::service::Service<hyper::Request<Incoming>> for PerConn {
    type Response = hyper::Response<Answer>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.conn.enter(IN_REQUEST);
        let done = RequestDone(self.conn.clone());
        let mut router = self.router.clone();
        let (conn, stall) = (self.conn.clone(), self.stall);
        let handle = self.handle.clone();
        Box::pin(async move {
            let mut req = req;
            req.extensions_mut().insert(handle);
            let req = req.map(|inner| {
                Body::new(StallGuarded {
                    inner,
                    limit: stall,
                    timer: None,
                    armed: false,
                    conn,
                })
            });
            let answer = match tower_service::Service::call(&mut router, req).await {
                Ok(a) => a,
                Err(never) => match never {},
            };
            Ok(answer.map(|body| Answer { body, _done: done }))
        })
    }
}

fn http1_builder(l: &HttpLimits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.header_read_timeout(None)
        .keep_alive(true)
        .max_headers(l.hyper_max_headers())
        .max_header_size(l.hyper_max_head_bytes())
        .max_buf_size(l.hyper_max_head_bytes() + (16 << 10));
    b
}

/// Serves one connection until it ends; at shutdown, closes it at once unless a request is in
/// flight (that one is finished first).
async fn drive<I>(
    io: I,
    conn: Arc<Conn>,
    builder: &http1::Builder,
    service: PerConn,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let mut draining = false;
    loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(target: "bluebatch::http", "connection ended: {e}");
                }
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                if conn.phase().0 != IN_REQUEST {
                    return;
                }
                served.as_mut().graceful_shutdown();
            }
        }
    }
}

struct Shared {
    registry: Arc<Registry>,
    builder: http1::Builder,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
}

async fn connection(tcp: TcpStream, conn: Arc<Conn>, shared: Arc<Shared>) {
    let _open = OpenGauge::new();
    let _registered = Registered {
        registry: shared.registry.clone(),
        conn: conn.clone(),
    };
    let _ = tcp.set_nodelay(true);
    let io = Tracked {
        io: tcp,
        conn: conn.clone(),
    };
    let service = PerConn {
        router: shared.router.clone(),
        conn: conn.clone(),
        stall: shared.registry.limits.stall_timeout,
        handle: ConnHandle {
            conn: conn.clone(),
            registry: shared.registry.clone(),
            stop: shared.stop.clone(),
        },
    };
    let run = async {
        match &shared.tls {
            None => {
                drive(
                    io,
                    conn.clone(),
                    &shared.builder,
                    service,
                    shared.stop.clone(),
                )
                .await
            }
            Some(acceptor) => match acceptor.accept(io).await {
                Ok(tls) => {
                    drive(
                        tls,
                        conn.clone(),
                        &shared.builder,
                        service,
                        shared.stop.clone(),
                    )
                    .await
                }
                Err(e) => tracing::debug!(target: "bluebatch::http", "TLS handshake: {e}"),
            },
        }
    };
    tokio::select! {
        _ = run => {}
        _ = conn.close.notified() => {}
    }
}

/// An accept error: a connection that went away before it was accepted is skipped; others
/// (out of file descriptors, …) are logged and waited out briefly.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::warn!(target: "bluebatch::http", "accepting a connection: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The listen backlog: connections the kernel completes before they are accepted. tokio
/// listens with 128, which a burst of connections overflows (the kernel then drops SYNs, and
/// each such client waits a second for its retry); the kernel caps this at `somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

fn with_backlog(listener: TcpListener) -> io::Result<TcpListener> {
    let socket = socket2::Socket::from(listener.into_std()?);
    // Listening again on a listening socket changes its backlog.
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Serves `router` on `listener` (over TLS when `tls` is given) within `limits` until
/// `shutdown` resolves; then stops accepting, closes the connections not in a request, and
/// waits up to [`SHUTDOWN_GRACE`] for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let listener = with_backlog(listener)?;
    let registry = Arc::new(Registry::new(limits.clone()));
    let reaper = tokio::spawn(registry.clone().run_reaper());
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        registry: registry.clone(),
        builder: http1_builder(&limits),
        router,
        tls,
        stop,
    });
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let source = peer.ip().to_canonical();
        if !registry.source_has_room(source) {
            registry.count(Shed::RefusedPerSource);
            drop(tcp);
            continue;
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = registry.make_room() => {}
        }
        let conn = registry.register(source);
        tasks.spawn(connection(tcp, conn, shared.clone()));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    registry.close_waiting();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    reaper.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Shed;

    #[test]
    fn shed_reasons_are_counted_under_the_metrics_labels_of_the_same_order() {
        let labels = bluebatch_metrics::SHED_REASONS;
        for (why, label) in [
            (Shed::HeadTimeout, "head_timeout"),
            (Shed::IdleTimeout, "idle_timeout"),
            (Shed::Stalled, "stalled"),
            (Shed::Evicted, "evicted"),
            (Shed::RefusedPerSource, "refused_per_source"),
        ] {
            assert_eq!(labels[why as usize], label);
        }
        assert_eq!(labels.len(), 5);
    }
}
