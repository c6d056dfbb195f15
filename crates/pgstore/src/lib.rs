//! bluebatch-pgstore: the store shared by several `bluebatch serve` replicas, on PostgreSQL 15+
//! (in SQL that CockroachDB and YugabyteDB also run).
//!
//! Records are stored in typed tables (pools, nodes, users: real columns and indexes beside the
//! record's exact bytes) and `bb_records` for every other key. Every commit is one revision:
//! writers of every replica are serialized by a row lock on `bb_head` (`SELECT … FOR UPDATE` in an
//! open transaction), the commit's ops are applied, appended to `bb_changes` under the new
//! revision and `bb_head.rev` is bumped in the same transaction. Readers catch up from
//! `bb_changes`. Singletons (the migration, the background work) are lease rows in `bb_leases`.
//! `NOTIFY bb_changes` is only a wake-up, never needed for correctness (and skipped where the
//! engine has none); so is `NOTIFY bb_acks`, the agents' acknowledgements told to every replica
//! before they are recorded (see [`AckNotice`]).
//!
//! Avoided on purpose: advisory locks, `LOCK TABLE`, sequences, `LISTEN/NOTIFY` for anything but
//! a wake-up, collation-dependent ordering (keys are ordered in Rust, byte-wise).

mod options;
mod rows;
mod schema;
mod tls;

pub use options::{PgHost, PgOptions, SslMode};
pub use schema::SCHEMA_VERSION;

use bluebatch_store::{
    AckNotice, BoxFuture, Change, Locked, Op, Result, SharedBackend, Snapshot, StoreError,
};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use rows::Table;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Revisions kept in the change log by default (older ones are pruned now and then).
pub const DEFAULT_CHANGE_RETENTION: u64 = 100_000;

const KIND_PUT: i16 = 0;
const KIND_DELETE: i16 = 1;
const KIND_DELETE_PREFIX: i16 = 2;

/// How long a transaction may sit idle holding the write lock before the server ends it (a
/// replica stuck while holding it must not stop every other), and how long a statement waits
/// for a row lock.
/// (`client_min_messages=warning`: the notices of `CREATE … IF NOT EXISTS` are not worth a log line.)
const SESSION_OPTIONS: &str = "-c idle_in_transaction_session_timeout=60000 -c lock_timeout=30000 -c client_min_messages=warning";

/// The PostgreSQL store (cheap to clone: one pool and one listener per [`PgStore::connect`]).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    opts: PgOptions,
    tls: Option<MakeRustlsConnect>,
    /// Whether the engine has NOTIFY (CockroachDB has not): only then a listener wakes waiters.
    notify: bool,
    wake: watch::Sender<u64>,
    listener: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    retention: AtomicU64,
    /// The wake-up count when [`SharedBackend::changed`] last returned (`u64::MAX`: never).
    followed: AtomicU64,
    /// What NOTIFY brought since the follower last looked.
    pushed: std::sync::Mutex<Pushed>,
    /// The acknowledgements replicas announce (`NOTIFY bb_acks`).
    notices: tokio::sync::broadcast::Sender<std::sync::Arc<AckNotice>>,
    /// This replica's writers queue here (first come, first served) rather than each holding a
    /// pooled connection while waiting for the database's row lock: one waits there at a time,
    /// and reads always find a connection.
    local_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

fn pg_config(opts: &PgOptions) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    match &opts.host {
        PgHost::Tcp(h) => {
            c.host(h);
        }
        PgHost::Unix(d) => {
            c.host_path(d);
        }
    }
    c.port(opts.port)
        .dbname(&opts.dbname)
        .user(&opts.user)
        .application_name(&opts.application_name)
        .connect_timeout(Duration::from_secs(opts.connect_timeout))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        // Data unacknowledged for 30 s (a server or network gone silent) ends the connection
        // instead of hanging the request on it.
        .tcp_user_timeout(Duration::from_secs(30))
        .options(SESSION_OPTIONS)
        .ssl_mode(match opts.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
    if let Some(p) = &opts.password {
        c.password(p);
    }
    c
}

/// A message for a database error: the SQLSTATE and the server's message, or the client's.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

fn store_err(what: &str, e: &tokio_postgres::Error) -> StoreError {
    StoreError(format!("PostgreSQL: {what}: {}", describe(e)))
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    StoreError(match e {
        PoolError::Backend(e) => format!("PostgreSQL: cannot connect: {}", describe(&e)),
        PoolError::Timeout(_) => "PostgreSQL: no connection within the time allowed".into(),
        other => format!("PostgreSQL: {other}"),
    })
}

/// A serialization failure or deadlock: the transaction may be retried.
fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// The connection is gone (the server restarted, the network): a fresh one may work.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(e.code(), Some(c) if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW)
        || (e.as_db_error().is_none() && e.code().is_none())
}

fn backoff(attempt: u32) -> Duration {
    let base = 5u64 << attempt.min(7);
    let jitter = uuid::Uuid::new_v4().as_u128() as u64 % (base + 1);
    Duration::from_millis(base + jitter)
}

const RETRIES: u32 = 8;

/// A pooled connection inside a transaction: unless [`TxConn::finish`]ed, dropping it discards
/// the connection (the server then rolls the transaction back) instead of handing a connection
/// in an open transaction back to the pool.
struct TxConn(Option<Object>);

impl TxConn {
    /// Hands the connection back to the pool (it is out of any transaction).
    fn finish(mut self) {
        drop(self.0.take());
    }
}

impl Deref for TxConn {
    type Target = Object;
    fn deref(&self) -> &Object {
        self.0.as_ref().expect("connection present until finished")
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            drop(Object::take(o));
        }
    }
}

type PgFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<(), tokio_postgres::Error>> + Send + 'a>>;

/// Runs statements pipelined on one connection, sent in order (each future is polled once, in
/// order, which is when tokio-postgres sends its message; then they are awaited in order); the
/// first error wins.
async fn pipeline(futs: Vec<PgFuture<'_>>) -> std::result::Result<(), tokio_postgres::Error> {
    let mut slots: Vec<Option<PgFuture<'_>>> = futs.into_iter().map(Some).collect();
    let mut first_err: Option<tokio_postgres::Error> = None;
    std::future::poll_fn(|cx| {
        for slot in slots.iter_mut() {
            if let Some(f) = slot
                && let Poll::Ready(r) = f.as_mut().poll(cx)
            {
                if let Err(e) = r
                    && first_err.is_none()
                {
                    first_err = Some(e);
                }
                *slot = None;
            }
        }
        Poll::Ready(())
    })
    .await;
    for f in slots.into_iter().flatten() {
        if let Err(e) = f.await
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl PgStore {
    /// Connects (a pool of up to `pool_size` connections, one more for the change listener),
    /// brings the schema up to date (or refuses a database too far ahead) and answers the store.
    /// A database that cannot be reached fails within the URL's `connect_timeout` (10 s).
    pub async fn connect(
        opts: &PgOptions,
        pool_size: usize,
    ) -> std::result::Result<PgStore, String> {
        let tls = tls::connector(opts)?;
        let cfg = pg_config(opts);
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &tls {
            Some(t) => Manager::from_config(cfg, t.clone(), mgr_cfg),
            None => Manager::from_config(cfg, tokio_postgres::NoTls, mgr_cfg),
        };
        let timeout = Duration::from_secs(opts.connect_timeout);
        let pool = Pool::builder(mgr)
            .max_size(pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(timeout + Duration::from_secs(1)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("the PostgreSQL store {opts}: {e}"))?;
        let server = match &opts.host {
            PgHost::Tcp(h) if h.contains(':') => format!("[{h}]:{}", opts.port),
            PgHost::Tcp(h) => format!("{h}:{}", opts.port),
            PgHost::Unix(d) => format!("the socket in {} (port {})", d.display(), opts.port),
        };
        let conn = pool.get().await.map_err(|e| {
            let why = pool_err(e).0;
            let why = why.trim_start_matches("PostgreSQL: cannot connect: ");
            let mut m = format!(
                "cannot connect to {server} (database {:?} as user {:?}): {why}",
                opts.dbname, opts.user
            );
            if !opts.has_password() && why.contains("password") {
                m.push_str(
                    " (no password was found: --store-password-file, PGPASSWORD, PGPASSFILE or ~/.pgpass)",
                );
            }
            m
        })?;
        // NOTIFY only as a wake-up, and only where the engine has it.
        let notify = conn.batch_execute("NOTIFY bb_changes").await.is_ok();
        drop(conn);
        let (wake, _) = watch::channel(0u64);
        let store = PgStore {
            inner: Arc::new(Inner {
                pool,
                opts: opts.clone(),
                tls,
                notify,
                wake,
                listener: std::sync::Mutex::new(None),
                retention: AtomicU64::new(DEFAULT_CHANGE_RETENTION),
                followed: AtomicU64::new(u64::MAX),
                local_lock: Arc::new(tokio::sync::Mutex::new(())),
                pushed: std::sync::Mutex::new(Pushed::default()),
                notices: tokio::sync::broadcast::channel(1024).0,
            }),
        };
        store.migrate().await?;
        if notify {
            let weak = Arc::downgrade(&store.inner);
            let h = tokio::spawn(listen(weak));
            *store
                .inner
                .listener
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(h.abort_handle());
        }
        Ok(store)
    }

    /// The options it was connected with.
    pub fn options(&self) -> &PgOptions {
        &self.inner.opts
    }

    /// Keeps the changes of the last `revisions` revisions (at least 1); older ones are pruned
    /// now and then, and [`SharedBackend::changes_since`] an older revision answers `None`.
    pub fn set_change_retention(&self, revisions: u64) {
        self.inner
            .retention
            .store(revisions.max(1), Ordering::Relaxed);
    }

    async fn conn(&self) -> Result<Object> {
        self.inner.pool.get().await.map_err(pool_err)
    }

    /// Runs a read or an idempotent write, retrying serialization failures and, once, a lost
    /// connection.
    async fn with_retry<'a, T, F>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(
            Object,
        ) -> Pin<
            Box<dyn Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'a>,
        >,
    {
        let mut attempt = 0;
        loop {
            let conn = self.conn().await?;
            match f(conn).await {
                Ok(v) => return Ok(v),
                Err(e)
                    if attempt < RETRIES
                        && (retryable(&e) || (attempt == 0 && connection_lost(&e))) =>
                {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(store_err(what, &e)),
            }
        }
    }

    async fn migrate(&self) -> std::result::Result<(), String> {
        // Concurrent CREATE TABLE IF NOT EXISTS may collide on the catalog: retry.
        let mut attempt = 0;
        loop {
            let conn = self.conn().await.map_err(|e| e.0)?;
            match conn.batch_execute(schema::LEASES).await {
                Ok(()) => break,
                Err(e)
                    if attempt < 20
                        && matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION
                            || *c == SqlState::DUPLICATE_TABLE
                            || *c == SqlState::DUPLICATE_OBJECT
                            || *c == SqlState::T_R_SERIALIZATION_FAILURE) =>
                {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt.min(4))).await;
                }
                Err(e) => return Err(format!("creating bb_leases: {}", describe(&e))),
            }
        }
        let holder = format!("migrate-{}", uuid::Uuid::new_v4());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self
                .claim_lease("migrate", &holder, Duration::from_secs(60))
                .await
                .map_err(|e| e.0)?
            {
                let r = self.apply_migrations().await;
                let _ = self.release_lease("migrate", &holder).await;
                return r;
            }
            // Another replica migrates: done when the version is ours (or compatible ahead).
            if let Some((v, min)) = self.schema_version().await.map_err(|e| e.0)?
                && v >= SCHEMA_VERSION
            {
                return schema::compatible(SCHEMA_VERSION, v, min);
            }
            if Instant::now() > deadline {
                return Err("another replica has held the migration lease for two minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The database's (version, min_compatible), `None` before the first migration.
    async fn schema_version(&self) -> Result<Option<(i32, i32)>> {
        let conn = self.conn().await?;
        match conn
            .query_opt(
                "SELECT version, min_compatible FROM bb_schema WHERE id = 1",
                &[],
            )
            .await
        {
            Ok(r) => Ok(r.map(|r| (r.get(0), r.get(1)))),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(None),
            Err(e) => Err(store_err("reading the schema version", &e)),
        }
    }

    async fn apply_migrations(&self) -> std::result::Result<(), String> {
        let (version, min) = self
            .schema_version()
            .await
            .map_err(|e| e.0)?
            .unwrap_or((0, 0));
        schema::compatible(SCHEMA_VERSION, version, min)?;
        for m in schema::MIGRATIONS.iter().filter(|m| m.version > version) {
            let conn = TxConn(Some(self.conn().await.map_err(|e| e.0)?));
            let r = async {
                conn.batch_execute("BEGIN").await?;
                conn.batch_execute(m.sql).await?;
                conn.execute(schema::SET_VERSION, &[&m.version, &m.min_compatible])
                    .await?;
                conn.batch_execute("COMMIT").await
            }
            .await;
            match r {
                Ok(()) => conn.finish(),
                Err(e) => {
                    return Err(format!(
                        "migrating the schema to version {}: {}",
                        m.version,
                        describe(&e)
                    ));
                }
            }
            tracing::info!(version = m.version, "store schema migrated");
        }
        Ok(())
    }

    /// Takes the write lock; with `after`, the changes after it are read in the same round
    /// trip (the query pipelined right behind the lock's, so its snapshot is taken once the
    /// lock is granted: it sees every commit before).
    async fn lock_reading(&self, after: Option<u64>) -> Result<Box<dyn Locked>> {
        let local = self.inner.local_lock.clone().lock_owned().await;
        let mut attempt = 0;
        loop {
            let conn = TxConn(Some(self.conn().await?));
            let lock = conn.simple_query(LOCK_SQL);
            let r = match after {
                None => lock.await.map(|m| (m, None)),
                Some(after) => {
                    let (m, changes) =
                        futures_util::future::join(lock, read_changes(&conn, after)).await;
                    // The read's error is the lock's when the lock failed (an aborted
                    // transaction); a read that fails alone is read again on demand.
                    m.map(|m| (m, changes.ok().map(|c| (after, c))))
                }
            };
            match r {
                Ok((msgs, prefetched)) => {
                    let row = msgs.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                            r.get(0).and_then(|v| v.parse::<u64>().ok()),
                            r.get(1).and_then(|v| v.parse::<u64>().ok()),
                        )),
                        _ => None,
                    });
                    let Some((Some(rev), Some(low))) = row else {
                        return Err(StoreError("PostgreSQL: bb_head has no row".into()));
                    };
                    return Ok(Box::new(PgLocked {
                        conn: Some(conn),
                        local: Some(local),
                        rev,
                        low,
                        prefetched,
                        store: self.clone(),
                    }) as Box<dyn Locked>);
                }
                Err(e)
                    if attempt < RETRIES
                        && (retryable(&e) || (attempt < 2 && connection_lost(&e))) =>
                {
                    drop(conn);
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(store_err("taking the write lock", &e)),
            }
        }
    }

    fn woke(&self) {
        self.inner.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Wakes [`SharedBackend::changed`] waiters on every `NOTIFY bb_changes`, on a connection of its
/// own; when that connection is lost it wakes them too (notifications may have been missed) and
/// reconnects.
async fn listen(inner: std::sync::Weak<Inner>) {
    loop {
        let (cfg, tls) = match inner.upgrade() {
            Some(i) => (pg_config(&i.opts), i.tls.clone()),
            None => return,
        };
        let ran = match tls {
            Some(t) => listen_on(cfg.connect(t).await, &inner).await,
            None => listen_on(cfg.connect(tokio_postgres::NoTls).await, &inner).await,
        };
        if !wake(&inner) {
            return;
        }
        if !ran {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Wakes the waiters; false once the store is gone. Without a notification's payload
/// (`None`: a connection lost or made, when notifications may have been missed, or one that
/// carried no changes), what was pushed is incomplete: the follower reads the log.
fn wake(inner: &std::sync::Weak<Inner>) -> bool {
    wake_with(inner, None)
}

fn wake_with(inner: &std::sync::Weak<Inner>, changes: Option<Vec<Change>>) -> bool {
    match inner.upgrade() {
        Some(i) => {
            {
                let mut p = i.pushed.lock().unwrap_or_else(|e| e.into_inner());
                match changes {
                    Some(c) if p.changes.len() + c.len() <= MAX_PUSHED => p.changes.extend(c),
                    _ => {
                        p.changes.clear();
                        p.incomplete = true;
                    }
                }
            }
            i.wake.send_modify(|n| *n = n.wrapping_add(1));
            true
        }
        None => false,
    }
}

async fn listen_on<S, T>(
    connected: std::result::Result<
        (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
        tokio_postgres::Error,
    >,
    inner: &std::sync::Weak<Inner>,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok((client, mut connection)) = connected else {
        return false;
    };
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let listen = client.batch_execute("LISTEN bb_changes; LISTEN bb_acks");
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            r = &mut listen, if !listening => {
                if r.is_err() {
                    return false;
                }
                listening = true;
                // Changes may have happened while no one listened.
                if !wake(inner) {
                    return true;
                }
            }
            m = messages.next() => match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n)))
                    if n.channel() == ACKS_CHANNEL =>
                {
                    let Some(i) = inner.upgrade() else { return true };
                    if let Some(notice) = parse_notice(n.payload()) {
                        let _ = i.notices.send(std::sync::Arc::new(notice));
                    }
                }
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if !wake_with(inner, parse_payload(n.payload())) {
                        return true;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return listening,
            }
        }
    }
}

/// Reads every record in this connection's transaction, keys rebuilt, in key order.
async fn read_all(
    conn: &Object,
) -> std::result::Result<(u64, Vec<(String, Vec<u8>)>), tokio_postgres::Error> {
    let head = conn
        .query_one("SELECT rev FROM bb_head WHERE id = 1", &[])
        .await?;
    let rev: i64 = head.get(0);
    let mut records = Vec::new();
    for t in rows::TYPED {
        let cols = t.key_cols.join(", ");
        let rows = conn
            .query(&format!("SELECT {cols}, value FROM {}", t.name), &[])
            .await?;
        for r in rows {
            let parts: Vec<String> = (0..t.key_cols.len()).map(|i| r.get(i)).collect();
            records.push((rows::key_of(t, &parts), r.get(t.key_cols.len())));
        }
    }
    for r in conn.query("SELECT key, value FROM bb_records", &[]).await? {
        records.push((r.get(0), r.get(1)));
    }
    records.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((rev as u64, records))
}

const CHANGES_SQL: &str = "SELECT h.rev, h.low, c.rev, c.seq, c.kind, c.key, c.value \
     FROM bb_head h LEFT JOIN bb_changes c ON c.rev > $1 AND c.rev <= h.rev AND $1 >= h.low \
     WHERE h.id = 1 ORDER BY c.rev, c.seq";

/// The changes after `after`, read in one statement (one consistent view).
async fn read_changes(
    conn: &Object,
    after: u64,
) -> std::result::Result<Result<Option<Vec<Change>>>, tokio_postgres::Error> {
    let after_i = i64::try_from(after).unwrap_or(i64::MAX);
    let stmt = conn.prepare_cached(CHANGES_SQL).await?;
    let rows = conn.query(&stmt, &[&after_i]).await?;
    let Some(first) = rows.first() else {
        return Ok(Err(StoreError("PostgreSQL: bb_head has no row".into())));
    };
    let head: i64 = first.get(0);
    let low: i64 = first.get(1);
    if after_i < low || after_i > head {
        return Ok(Ok(None));
    }
    let mut out = Vec::new();
    for r in &rows {
        let Some(rev) = r.get::<_, Option<i64>>(2) else {
            continue;
        };
        let kind: i16 = r.get(4);
        let key: String = r.get(5);
        let value: Option<Vec<u8>> = r.get(6);
        let op = match kind {
            KIND_PUT => Op::Put {
                key,
                value: value.unwrap_or_default(),
            },
            KIND_DELETE => Op::Delete { key },
            KIND_DELETE_PREFIX => Op::DeletePrefix { prefix: key },
            k => {
                return Ok(Err(StoreError(format!(
                    "PostgreSQL: bb_changes holds an unknown kind {k}"
                ))));
            }
        };
        out.push(Change {
            rev: rev as u64,
            op,
        });
    }
    let complete = out.last().map_or(after_i == head, |c| c.rev as i64 == head);
    if !complete {
        return Ok(Ok(None));
    }
    Ok(Ok(Some(out)))
}

const LOCK_SQL: &str = "BEGIN; SELECT rev, low FROM bb_head WHERE id = 1 FOR UPDATE";

struct PgLocked {
    conn: Option<TxConn>,
    /// The changes after a revision, read right after the lock was granted
    /// ([`SharedBackend::lock_after`]).
    prefetched: Option<(u64, Result<Option<Vec<Change>>>)>,
    /// Released after the connection's ROLLBACK or COMMIT was sent.
    local: Option<tokio::sync::OwnedMutexGuard<()>>,
    rev: u64,
    low: u64,
    store: PgStore,
}

impl Drop for PgLocked {
    fn drop(&mut self) {
        // Not committed: roll back and hand the connection back, or discard it.
        let local = self.local.take();
        if let Some(mut c) = self.conn.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
            && let Some(obj) = c.0.take()
        {
            rt.spawn(async move {
                let _local = local;
                let c = TxConn(Some(obj));
                if c.batch_execute("ROLLBACK").await.is_ok() {
                    c.finish();
                }
            });
        }
    }
}

impl SharedBackend for PgStore {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot>> {
        Box::pin(async move {
            let mut attempt = 0;
            loop {
                let conn = TxConn(Some(self.conn().await?));
                let r = async {
                    conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        .await?;
                    let all = read_all(&conn).await?;
                    conn.batch_execute("COMMIT").await?;
                    Ok::<_, tokio_postgres::Error>(all)
                }
                .await;
                match r {
                    Ok((rev, records)) => {
                        conn.finish();
                        return Ok(Snapshot { rev, records });
                    }
                    Err(e)
                        if attempt < RETRIES
                            && (retryable(&e) || (attempt == 0 && connection_lost(&e))) =>
                    {
                        drop(conn);
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                    }
                    Err(e) => return Err(store_err("reading the snapshot", &e)),
                }
            }
        })
    }

    fn head(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            self.with_retry("reading the head revision", |c| {
                Box::pin(async move {
                    let s = c
                        .prepare_cached("SELECT rev FROM bb_head WHERE id = 1")
                        .await?;
                    let r = c.query_one(&s, &[]).await?;
                    Ok(r.get::<_, i64>(0) as u64)
                })
            })
            .await
        })
    }

    fn changes_since(&self, after: u64) -> BoxFuture<'_, Result<Option<Vec<Change>>>> {
        Box::pin(async move {
            self.with_retry("reading the change log", |c| {
                Box::pin(async move { read_changes(&c, after).await })
            })
            .await?
        })
    }

    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn Locked>>> {
        Box::pin(self.lock_reading(None))
    }

    fn lock_after(&self, after: u64) -> BoxFuture<'_, Result<Box<dyn Locked>>> {
        Box::pin(self.lock_reading(Some(after)))
    }

    fn claim_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let secs = ttl.as_secs_f64();
            self.with_retry("claiming a lease", move |c| {
                Box::pin(async move {
                    let s = c
                        .prepare_cached(
                            "INSERT INTO bb_leases (name, holder, expires) \
                             VALUES ($1, $2, now() + $3::float8 * interval '1 second') \
                             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires \
                             WHERE bb_leases.expires < now() OR bb_leases.holder = excluded.holder \
                             RETURNING holder",
                        )
                        .await?;
                    Ok(c.query_opt(&s, &[&name, &holder, &secs]).await?.is_some())
                })
            })
            .await
        })
    }

    fn release_lease<'a>(&'a self, name: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.with_retry("releasing a lease", move |c| {
                Box::pin(async move {
                    let s = c
                        .prepare_cached("DELETE FROM bb_leases WHERE name = $1 AND holder = $2")
                        .await?;
                    c.execute(&s, &[&name, &holder]).await?;
                    Ok(())
                })
            })
            .await
        })
    }

    fn changed(&self, max: Duration) -> BoxFuture<'_, ()> {
        // A wake-up that came after the previous call returned (while its caller was reading
        // the changes it announced, say) ends this call at once: a follower calling this in a
        // loop never sleeps through a commit it was not shown.
        let mut rx = self.inner.wake.subscribe();
        let now = *rx.borrow_and_update();
        let followed = self.inner.followed.load(Ordering::Acquire);
        Box::pin(async move {
            if followed == u64::MAX || followed == now {
                let _ = tokio::time::timeout(max, rx.changed()).await;
            }
            let seen = *rx.borrow();
            self.inner.followed.store(seen, Ordering::Release);
        })
    }

    fn take_pushed(&self) -> Option<Vec<Change>> {
        let mut p = self.inner.pushed.lock().unwrap_or_else(|e| e.into_inner());
        let p = std::mem::take(&mut *p);
        (!p.incomplete).then_some(p.changes)
    }

    fn announce_acks<'a>(&'a self, notice: &'a AckNotice) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if !self.inner.notify {
                return;
            }
            let payloads = notice_payloads(notice);
            if payloads.is_empty() {
                return;
            }
            // Autocommit, outside the write lock: it waits for no other replica.
            let Ok(c) = self.conn().await else { return };
            if let Ok(s) = c.prepare_cached(ANNOUNCE_SQL).await {
                let _ = c.execute(&s, &[&payloads]).await;
            }
        })
    }

    fn ack_notices(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<AckNotice>>> {
        self.inner.notify.then(|| self.inner.notices.subscribe())
    }

    fn hosts_seen<'a>(&'a self, hosts: &'a [String]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut hosts: Vec<String> = hosts.to_vec();
            // Sorted and unique: one row is not updated twice, and replicas lock rows in one
            // order (no deadlock).
            hosts.sort();
            hosts.dedup();
            if hosts.is_empty() {
                return Ok(());
            }
            let hosts = &hosts;
            self.with_retry("recording hosts seen", move |c| {
                Box::pin(async move {
                    let s = c
                        .prepare_cached(
                            "INSERT INTO bb_host_seen (host, seen) SELECT h, now() FROM unnest($1::text[]) AS t(h) \
                             ON CONFLICT (host) DO UPDATE SET seen = excluded.seen",
                        )
                        .await?;
                    c.execute(&s, &[hosts]).await?;
                    Ok(())
                })
            })
            .await
        })
    }

    fn host_ages(&self) -> BoxFuture<'_, Result<Vec<(String, Duration)>>> {
        Box::pin(async move {
            self.with_retry("reading hosts seen", |c| {
                Box::pin(async move {
                    let s = c
                        .prepare_cached(
                            "SELECT host, CAST(EXTRACT(EPOCH FROM (now() - seen)) AS float8) FROM bb_host_seen",
                        )
                        .await?;
                    Ok(c.query(&s, &[])
                        .await?
                        .into_iter()
                        .map(|r| {
                            let age: f64 = r.get(1);
                            let age = if age.is_finite() && age > 0.0 { age } else { 0.0 };
                            (r.get::<_, String>(0), Duration::from_secs_f64(age.min(1e12)))
                        })
                        .collect())
                })
            })
            .await
        })
    }

    fn pool_nodes<'a>(
        &'a self,
        account: &'a str,
        pool_key: &'a str,
        after: Option<&'a str>,
        state: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>>> {
        Box::pin(async move {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            self.with_retry("listing a pool's nodes", |c| {
                Box::pin(async move {
                    // On the primary key's index (account, pool_key, node_id), node ids compared
                    // as the key's own column; state on its column.
                    let s = c
                        .prepare_cached(
                            "SELECT value FROM bb_nodes WHERE account = $1 AND pool_key = $2 \
                             AND ($3::text IS NULL OR node_id > $3) \
                             AND ($4::text IS NULL OR state = $4) \
                             ORDER BY node_id LIMIT $5",
                        )
                        .await?;
                    Ok(c.query(&s, &[&account, &pool_key, &after, &state, &limit])
                        .await?
                        .into_iter()
                        .map(|r| r.get::<_, Vec<u8>>(0))
                        .collect())
                })
            })
            .await
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let c = self.conn().await?;
                c.simple_query("SELECT 1")
                    .await
                    .map_err(|e| store_err("ping", &e))?;
                Ok(())
            })
            .await;
            match r {
                Ok(r) => r,
                Err(_) => Err(StoreError("PostgreSQL: no answer within 5 s".into())),
            }
        })
    }
}

/// A statement parameter whose `Debug` (which tokio-postgres logs at debug level with every
/// statement's parameters) never shows the value: records hold password hashes and account keys.
struct Redacted<T>(T);

impl<T> std::fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T: ToSql> ToSql for Redacted<T> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        self.0.to_sql(ty, out)
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        T::accepts(ty)
    }
    fn to_sql_checked(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        self.0.to_sql_checked(ty, out)
    }
}

/// One op's rows, owned so the statements can borrow them while pipelined.
enum Prepared {
    Upsert {
        table: &'static Table,
        keys: Vec<String>,
        doc: Option<serde_json::Value>,
        value: Vec<u8>,
    },
    UpsertRecord {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        table: &'static Table,
        keys: Vec<String>,
    },
    DeleteRecord {
        key: String,
    },
    DeletePrefix {
        typed: Vec<(&'static Table, Vec<String>)>,
        prefix: String,
    },
}

fn upsert_sql(t: &Table) -> String {
    let extra: &[&str] = match t.kind {
        "pool" => &["id", "os", "state", "allocation_state", "vm_size"],
        "node" => &[
            "state",
            "scheduling_state",
            "host",
            "users_revision",
            "applied_revision",
        ],
        _ => &["name", "is_admin", "expiry_time"],
    };
    let cols: Vec<&str> = t.key_cols.iter().chain(extra.iter()).copied().collect();
    let n = cols.len();
    let params: Vec<String> = (1..=n + 2).map(|i| format!("${i}")).collect();
    let set: Vec<String> = extra
        .iter()
        .chain(["doc", "value"].iter())
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {} ({}, doc, value, version) VALUES ({}, 1) ON CONFLICT ({}) DO UPDATE SET {}, version = {}.version + 1",
        t.name,
        cols.join(", "),
        params.join(", "),
        t.key_cols.join(", "),
        set.join(", "),
        t.name
    )
}

fn delete_sql(t: &Table, n: usize) -> String {
    if n == 0 {
        return format!("DELETE FROM {}", t.name);
    }
    let cond: Vec<String> = t.key_cols[..n]
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ${}", i + 1))
        .collect();
    format!("DELETE FROM {} WHERE {}", t.name, cond.join(" AND "))
}

const RECORD_UPSERT: &str = "INSERT INTO bb_records (key, value, version) VALUES ($1, $2, 1) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = bb_records.version + 1";
const RECORD_DELETE: &str = "DELETE FROM bb_records WHERE key = $1";
const RECORD_DELETE_PREFIX: &str = "DELETE FROM bb_records WHERE substr(key, 1, length($1)) = $1";
/// The wake-up of other replicas, carrying the commit's changes when they fit (see
/// [`notify_payload`]).
const NOTIFY_SQL: &str = "SELECT pg_notify('bb_changes', $1)";

/// Largest payload sent with a change (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7900;

/// A commit's NOTIFY payload: `[rev, [[kind, key, value?], …]]` (JSON; values as text), or the
/// revision alone when a value is not UTF-8 or the whole does not fit.
fn notify_payload(rev: u64, ops: &[Op]) -> String {
    let mut list = Vec::with_capacity(ops.len());
    for op in ops {
        list.push(match op {
            Op::Put { key, value } => match std::str::from_utf8(value) {
                Ok(v) => serde_json::json!([KIND_PUT, key, v]),
                Err(_) => return rev.to_string(),
            },
            Op::Delete { key } => serde_json::json!([KIND_DELETE, key]),
            Op::DeletePrefix { prefix } => serde_json::json!([KIND_DELETE_PREFIX, prefix]),
        });
    }
    let s = serde_json::json!([rev, list]).to_string();
    if s.len() > MAX_PAYLOAD {
        rev.to_string()
    } else {
        s
    }
}

/// The changes a payload of [`notify_payload`] carries (`None`: the revision alone, or not
/// ours to read).
fn parse_payload(payload: &str) -> Option<Vec<Change>> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let [rev, ops] = v.as_array()?.as_slice() else {
        return None;
    };
    let rev = rev.as_u64()?;
    let mut out = Vec::new();
    for op in ops.as_array()? {
        let op = op.as_array()?;
        let kind = op.first()?.as_i64()?;
        let key = op.get(1)?.as_str()?.to_string();
        out.push(Change {
            rev,
            op: match kind as i16 {
                KIND_PUT => Op::Put {
                    key,
                    value: op.get(2)?.as_str()?.as_bytes().to_vec(),
                },
                KIND_DELETE => Op::Delete { key },
                KIND_DELETE_PREFIX => Op::DeletePrefix { prefix: key },
                _ => return None,
            },
        });
    }
    (!out.is_empty()).then_some(out)
}

const ACKS_CHANNEL: &str = "bb_acks";
const ANNOUNCE_SQL: &str = "SELECT pg_notify('bb_acks', p) FROM unnest($1::text[]) AS p";
/// A NOTIFY payload must stay under 8000 bytes; one notice is split into payloads of at most
/// this many.
const NOTICE_BYTES: usize = 7000;

/// A notice as NOTIFY payloads: `["replica", [["key", rev], …]]`, each under [`NOTICE_BYTES`].
fn notice_payloads(notice: &AckNotice) -> Vec<String> {
    // `["replica",[` … `]]`: the replica quoted plus 6 bytes; each entry plus its comma.
    let base = serde_json::Value::from(notice.replica.as_str())
        .to_string()
        .len()
        + 6;
    let mut out = Vec::new();
    let mut chunk: Vec<serde_json::Value> = Vec::new();
    let mut size = base;
    for (key, rev) in &notice.acks {
        let entry = serde_json::json!([key, rev]);
        let len = entry.to_string().len() + 1;
        if base + len > NOTICE_BYTES {
            continue;
        }
        if size + len > NOTICE_BYTES {
            out.push(serde_json::json!([notice.replica, std::mem::take(&mut chunk)]).to_string());
            size = base;
        }
        size += len;
        chunk.push(entry);
    }
    if !chunk.is_empty() {
        out.push(serde_json::json!([notice.replica, chunk]).to_string());
    }
    out
}

fn parse_notice(payload: &str) -> Option<AckNotice> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let [replica, acks] = v.as_array()?.as_slice() else {
        return None;
    };
    let acks = acks
        .as_array()?
        .iter()
        .map(|a| match a.as_array()?.as_slice() {
            [k, r] => Some((k.as_str()?.to_string(), r.as_u64()?)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(AckNotice {
        replica: replica.as_str()?.to_string(),
        acks,
    })
}

/// Changes received with NOTIFY since [`SharedBackend::take_pushed`] last took them, and
/// whether they are every commit notified meanwhile.
#[derive(Default)]
struct Pushed {
    changes: Vec<Change>,
    incomplete: bool,
}

/// Most changes kept for the follower; beyond, they are dropped (it reads the log instead).
const MAX_PUSHED: usize = 4096;

const CHANGE_INSERT: &str =
    "INSERT INTO bb_changes (rev, seq, kind, key, value) VALUES ($1, $2, $3, $4, $5)";

fn prepare_ops(ops: &[Op]) -> Result<Vec<Prepared>> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                Op::Put { key, value } => match rows::classify(key) {
                    Some((table, keys)) => Prepared::Upsert {
                        table,
                        keys: keys.into_iter().map(str::to_string).collect(),
                        doc: rows::doc_of(value),
                        value: value.clone(),
                    },
                    None => Prepared::UpsertRecord {
                        key: key.clone(),
                        value: value.clone(),
                    },
                },
                Op::Delete { key } => match rows::classify(key) {
                    Some((table, keys)) => Prepared::Delete {
                        table,
                        keys: keys.into_iter().map(str::to_string).collect(),
                    },
                    None => Prepared::DeleteRecord { key: key.clone() },
                },
                Op::DeletePrefix { prefix } => {
                    if !prefix.ends_with('/') {
                        return Err(StoreError(format!(
                            "a prefix delete's prefix must end with '/': {prefix:?}"
                        )));
                    }
                    Prepared::DeletePrefix {
                        typed: rows::prefix_targets(prefix)
                            .into_iter()
                            .map(|(t, s)| (t, s.into_iter().map(str::to_string).collect()))
                            .collect(),
                        prefix: prefix.clone(),
                    }
                }
            })
        })
        .collect()
}

/// The extracted columns of a typed row, in `upsert_sql`'s order after the key columns.
fn columns(table: &Table, doc: &Option<serde_json::Value>) -> Vec<Box<dyn ToSql + Sync + Send>> {
    use rows::{boolean, int, text, timestamp};
    match table.kind {
        "pool" => vec![
            Box::new(text(doc, "id")),
            Box::new(text(doc, "os")),
            Box::new(text(doc, "state")),
            Box::new(text(doc, "allocation_state")),
            Box::new(text(doc, "vm_size")),
        ],
        "node" => vec![
            Box::new(text(doc, "state")),
            Box::new(text(doc, "scheduling_state")),
            Box::new(text(doc, "host")),
            Box::new(int(doc, "users_revision")),
            Box::new(int(doc, "applied_revision")),
        ],
        _ => vec![
            Box::new(text(doc, "name")),
            Box::new(boolean(doc, "is_admin")),
            Box::new(timestamp(doc, "expiry_time")),
        ],
    }
}

impl Locked for PgLocked {
    fn rev(&self) -> u64 {
        self.rev
    }

    fn changes_since(&mut self, after: u64) -> BoxFuture<'_, Result<Option<Vec<Change>>>> {
        Box::pin(async move {
            // Read with the lock from `from` ≤ `after`: nothing can have committed since, so
            // those after `after` are the answer.
            if let Some((from, Ok(read))) = self.prefetched.take()
                && from <= after
            {
                return Ok(read.map(|mut c| {
                    c.retain(|c| c.rev > after);
                    c
                }));
            }
            let conn = self.conn.as_ref().expect("locked connection");
            read_changes(conn, after)
                .await
                .map_err(|e| store_err("reading the change log", &e))?
        })
    }

    fn snapshot(&mut self) -> BoxFuture<'_, Result<Snapshot>> {
        Box::pin(async move {
            let conn = self.conn.as_ref().expect("locked connection");
            let (rev, records) = read_all(conn)
                .await
                .map_err(|e| store_err("reading the snapshot", &e))?;
            Ok(Snapshot { rev, records })
        })
    }

    fn commit(mut self: Box<Self>, ops: Vec<Op>) -> BoxFuture<'static, Result<u64>> {
        let conn = self.conn.take().expect("locked connection");
        let local = self.local.take();
        let (rev, low) = (self.rev, self.low);
        let store = self.store.clone();
        drop(self);
        Box::pin(async move {
            let _local = local;
            if ops.is_empty() {
                return match conn.batch_execute("ROLLBACK").await {
                    Ok(()) => {
                        conn.finish();
                        Ok(rev)
                    }
                    // The lock is released anyway (the connection is discarded).
                    Err(_) => Ok(rev),
                };
            }
            let prepared = prepare_ops(&ops)?;
            let new_rev = rev + 1;
            let keep = store.inner.retention.load(Ordering::Relaxed);
            let step = (keep / 10).clamp(1, 1000);
            let prune_to = (new_rev.saturating_sub(low) > keep + step).then(|| new_rev - keep);
            match commit_on(
                &conn,
                &prepared,
                &ops,
                new_rev,
                low,
                prune_to,
                store.inner.notify,
            )
            .await
            {
                Ok(()) => {
                    conn.finish();
                    store.woke();
                    Ok(new_rev)
                }
                Err(e) => Err(store_err("committing", &e)),
            }
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn commit_on(
    conn: &Object,
    prepared: &[Prepared],
    ops: &[Op],
    new_rev: u64,
    low: u64,
    prune_to: Option<u64>,
    notify: bool,
) -> std::result::Result<(), tokio_postgres::Error> {
    // Statements first (cached per connection), then every write pipelined, COMMIT last.
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    for t in rows::TYPED {
        upserts.push(conn.prepare_cached(&upsert_sql(t)).await?);
        let mut d = Vec::new();
        for n in 0..=t.key_cols.len() {
            d.push(conn.prepare_cached(&delete_sql(t, n)).await?);
        }
        deletes.push(d);
    }
    let table_index = |t: &Table| {
        rows::TYPED
            .iter()
            .position(|x| x.name == t.name)
            .unwrap_or(0)
    };
    let rec_up = conn.prepare_cached(RECORD_UPSERT).await?;
    let rec_del = conn.prepare_cached(RECORD_DELETE).await?;
    let rec_del_prefix = conn.prepare_cached(RECORD_DELETE_PREFIX).await?;
    let change = conn.prepare_cached(CHANGE_INSERT).await?;
    let head = conn
        .prepare_cached("UPDATE bb_head SET rev = $1, low = $2 WHERE id = 1")
        .await?;
    let prune = conn
        .prepare_cached("DELETE FROM bb_changes WHERE rev <= $1")
        .await?;

    // Owned parameters, built before the pipeline borrows them.
    let rev_i = new_rev as i64;
    let new_low = prune_to.unwrap_or(low) as i64;
    let mut typed_params: Vec<Vec<Box<dyn ToSql + Sync + Send>>> = Vec::new();
    for p in prepared {
        if let Prepared::Upsert {
            table,
            keys,
            doc,
            value,
        } = p
        {
            let mut v: Vec<Box<dyn ToSql + Sync + Send>> = keys
                .iter()
                .map(|k| Box::new(k.clone()) as Box<dyn ToSql + Sync + Send>)
                .collect();
            for c in columns(table, doc) {
                v.push(c);
            }
            v.push(Box::new(Redacted(doc.clone())));
            v.push(Box::new(Redacted(value.clone())));
            typed_params.push(v);
        }
    }
    type ChangeRow<'r> = (i32, i16, &'r str, Redacted<Option<&'r [u8]>>);
    let mut change_params: Vec<ChangeRow<'_>> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        change_params.push(match op {
            Op::Put { key, value } => (
                i as i32,
                KIND_PUT,
                key.as_str(),
                Redacted(Some(value.as_slice())),
            ),
            Op::Delete { key } => (i as i32, KIND_DELETE, key.as_str(), Redacted(None)),
            Op::DeletePrefix { prefix } => (
                i as i32,
                KIND_DELETE_PREFIX,
                prefix.as_str(),
                Redacted(None),
            ),
        });
    }

    let payload = Redacted(notify_payload(new_rev, ops));
    let notify_stmt = if notify {
        Some(conn.prepare_cached(NOTIFY_SQL).await?)
    } else {
        None
    };
    let mut futs: Vec<PgFuture<'_>> = Vec::new();
    let client: &tokio_postgres::Client = conn;
    let mut typed = typed_params.iter();
    for p in prepared {
        match p {
            Prepared::Upsert { table, .. } => {
                let params = typed.next().expect("params per upsert");
                let refs: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let s = &upserts[table_index(table)];
                futs.push(Box::pin(async move {
                    client.execute(s, &refs).await.map(|_| ())
                }));
            }
            Prepared::UpsertRecord { key, value } => {
                let s = &rec_up;
                futs.push(Box::pin(async move {
                    client
                        .execute(s, &[key as &(dyn ToSql + Sync), &Redacted(value)])
                        .await
                        .map(|_| ())
                }));
            }
            Prepared::Delete { table, keys } => {
                let s = &deletes[table_index(table)][keys.len()];
                futs.push(Box::pin(async move {
                    let refs: Vec<&(dyn ToSql + Sync)> =
                        keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
                    client.execute(s, &refs).await.map(|_| ())
                }));
            }
            Prepared::DeleteRecord { key } => {
                let s = &rec_del;
                futs.push(Box::pin(async move {
                    client.execute(s, &[key]).await.map(|_| ())
                }));
            }
            Prepared::DeletePrefix { typed, prefix } => {
                for (table, keys) in typed {
                    let s = &deletes[table_index(table)][keys.len()];
                    futs.push(Box::pin(async move {
                        let refs: Vec<&(dyn ToSql + Sync)> =
                            keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
                        client.execute(s, &refs).await.map(|_| ())
                    }));
                }
                let s = &rec_del_prefix;
                futs.push(Box::pin(async move {
                    client.execute(s, &[prefix]).await.map(|_| ())
                }));
            }
        }
    }
    for (seq, kind, key, value) in &change_params {
        let s = &change;
        let rev_i = &rev_i;
        futs.push(Box::pin(async move {
            client
                .execute(s, &[rev_i, seq, kind, key, value])
                .await
                .map(|_| ())
        }));
    }
    let new_low_ref = &new_low;
    let rev_ref = &rev_i;
    futs.push(Box::pin(async move {
        client
            .execute(&head, &[rev_ref, new_low_ref])
            .await
            .map(|_| ())
    }));
    if prune_to.is_some() {
        futs.push(Box::pin(async move {
            client.execute(&prune, &[new_low_ref]).await.map(|_| ())
        }));
    }
    if let Some(st) = &notify_stmt {
        let payload = &payload;
        futs.push(Box::pin(async move {
            client.query(st, &[payload]).await.map(|_| ())
        }));
    }
    futs.push(Box::pin(
        async move { client.batch_execute("COMMIT").await },
    ));
    pipeline(futs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_notices_split_under_the_payload_limit_and_read_back() {
        let acks: Vec<(String, u64)> = (0..2000)
            .map(|i| (format!("acct.pool-{i}.tvm-{i:010}"), u64::MAX - i))
            .collect();
        let notice = AckNotice {
            replica: "replica \"a\"".into(),
            acks: acks.clone(),
        };
        let payloads = notice_payloads(&notice);
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= NOTICE_BYTES, "{} bytes", p.len());
            let n = parse_notice(p).expect("a payload reads back");
            assert_eq!(n.replica, notice.replica);
            back.extend(n.acks);
        }
        assert_eq!(back, acks);
        // A key too long for any payload is left out, not sent broken.
        let huge = AckNotice {
            replica: "r".into(),
            acks: vec![("k".repeat(NOTICE_BYTES), 1), ("small".into(), 2)],
        };
        let p = notice_payloads(&huge);
        assert_eq!(p.len(), 1);
        assert_eq!(parse_notice(&p[0]).unwrap().acks, vec![("small".into(), 2)]);
        assert!(parse_notice("[\"r\", [[\"k\", -1]]]").is_none());
        assert!(parse_notice("not json").is_none());
    }
}
