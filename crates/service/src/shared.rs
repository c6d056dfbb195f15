//! The service on a store shared by replicas (PostgreSQL): the database is the truth and the
//! in-memory state a cache of it, brought up to date before every answer.
//!
//! - **Reads** compare the cache's revision with the database's head and catch up first (the
//!   changes after the cache's revision, or the whole snapshot), so a replica sees every write
//!   any replica answered.
//! - **Writes** take the gate: this replica's writers one at a time, holding the store-wide write
//!   lock (a row lock of the database) from before the request reads the cache until its commit.
//!   The gate catches up first, so the rules are checked against the database's state as it is,
//!   and nobody can commit meanwhile. The first commit of a request releases both.
//! - **Group commit**: a write that finds other writers of this replica queued at the gate does
//!   not commit alone: it leaves its decided ops in the open transaction (the write lock still
//!   held) and hands the gate to the next writer, who decides on the cache that already holds
//!   them, adds its own ops, and so on; the last of the queue (or the first to come back to the
//!   gate) commits them all as one revision, and every write of the batch is answered by that
//!   commit's outcome. One transaction, one WAL flush and one lock hand-over for the batch,
//!   instead of one each: this is what lets replicas scale when the row lock (held across each
//!   flush) is the bottleneck. Nothing is acknowledged before the commit that holds it.
//! - A commit that fails leaves the cache ahead of the database: the cache is marked stale and
//!   read again whole before it is used; the request answers 503 `ServerBusy`.
//! - **Background work** (lifecycle steps, the liveness sweep) runs on the replica that holds the
//!   `background` lease; another takes over once a lost holder's lease expires.

use crate::state::{State, Touched};
use crate::{Inner, Service};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_store::{Change, Locked, Op, SharedBackend};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedMutexGuard, oneshot};

/// How long the background lease lasts without renewal, and how often it is renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// The longest a replica goes without looking for other replicas' commits (NOTIFY wakes it
/// sooner; it is only a wake-up).
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
const BACKGROUND_LEASE: &str = "background";

pub(crate) struct Shared {
    pub backend: Arc<dyn SharedBackend>,
    /// The gate; while a batch is being gathered it holds the batch's open transaction.
    gate: Arc<tokio::sync::Mutex<Option<Carry>>>,
    /// Writers queued in [`Service::gate`] (they join the current batch).
    waiting: AtomicUsize,
    /// The revision the cache is at.
    rev: AtomicU64,
    /// The cache may differ from the database (a commit failed): read it again whole.
    stale: AtomicBool,
    /// The write lock of the gate's holder, until its first commit.
    held: Mutex<Option<Held>>,
    /// This replica's name in leases.
    pub replica: String,
    /// Whether this replica holds the background lease.
    background: AtomicBool,
    /// Shutting down: no more background work, no more lease renewals.
    stopped: AtomicBool,
    /// Bumped when the accounts in the store change.
    accounts: tokio::sync::watch::Sender<u64>,
    /// Catch-up reads of [`Service::sync`], one at a time: the number started, the number of
    /// the last one applied, and the turn (a sync is served by any read started after it
    /// was called, so concurrent requests share one read instead of one each).
    reads_started: AtomicU64,
    reads_done: AtomicU64,
    reading: tokio::sync::Mutex<()>,
}

/// The most writes and ops one batch gathers before it commits anyway.
const BATCH_WRITES: usize = 64;
const BATCH_OPS: usize = 4096;

type Outcome = Result<u64, String>;

/// A batch: the open transaction holding the write lock, and the decided ops of the writes
/// waiting for its commit.
pub(crate) struct Carry {
    locked: Box<dyn Locked>,
    ops: Vec<Op>,
    /// Writes in `ops` (one per submit).
    writes: usize,
    waiters: Vec<oneshot::Sender<Outcome>>,
}

impl Carry {
    fn new(locked: Box<dyn Locked>) -> Carry {
        Carry {
            locked,
            ops: Vec::new(),
            writes: 0,
            waiters: Vec::new(),
        }
    }
}

pub(crate) struct Held {
    /// `None` once moved out (committed or handed on).
    carry: Option<Carry>,
    gate: OwnedMutexGuard<Option<Carry>>,
    task: Option<tokio::task::Id>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(c) = self.carry.take()
            && c.writes > 0
        {
            // Other writes' ops are in it: left for the next holder of the gate (a writer of
            // the batch comes back for it) rather than rolled back.
            *self.gate = Some(c);
        }
        // Else dropping the transaction rolls it back and releases the write lock.
    }
}

/// Counts a task queued at the gate while it waits (a cancelled wait uncounts too).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Queued(n)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A write's commit on the shared store (see [`crate::Pending`]).
pub(crate) struct SharedCommit {
    inner: Weak<Inner>,
    ops: Vec<Op>,
    held: Option<Held>,
    base: u64,
    /// Committed. A commit dropped before that (its request cancelled by a client that went,
    /// or an error on the way) leaves the cache holding a change the database may not have:
    /// the cache is marked stale and read again whole.
    done: bool,
}

/// Marks the cache stale when dropped, unless its flag says the commit went through.
struct StaleUnlessDone<'a>(&'a AtomicBool, bool);

impl Drop for StaleUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::Release);
        }
    }
}

impl Drop for SharedCommit {
    fn drop(&mut self) {
        if !self.done
            && let Some(inner) = self.inner.upgrade()
            && let Some(sh) = &inner.shared
        {
            sh.stale.store(true, Ordering::Release);
        }
    }
}

/// Holds the gate for a request; released by its first commit, or when dropped.
#[must_use]
pub(crate) struct Gate(Option<Weak<Inner>>);

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take().and_then(|w| w.upgrade())
            && let Some(sh) = &inner.shared
        {
            let mut held = lock(&sh.held);
            if held
                .as_ref()
                .is_some_and(|h| h.task == tokio::task::try_id())
            {
                // Not committed: rolled back, lock and gate released.
                held.take();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BatchError {
    tracing::warn!("store unavailable: {e}");
    BatchError::new(Code::ServerBusy).message(
        "The server cannot reach its database right now. Retry the request; nothing of it was applied.",
    )
}

fn lost_commit(e: impl std::fmt::Display) -> BatchError {
    tracing::warn!("store commit failed: {e}");
    BatchError::new(Code::ServerBusy).message(
        "The server could not make the change durable. Retry the request; read the resource first, since the outcome is unknown.",
    )
}

impl Shared {
    pub fn new(backend: Arc<dyn SharedBackend>, rev: u64, replica: String) -> Self {
        Shared {
            backend,
            gate: Arc::new(tokio::sync::Mutex::new(None)),
            waiting: AtomicUsize::new(0),
            rev: AtomicU64::new(rev),
            stale: AtomicBool::new(false),
            held: Mutex::new(None),
            replica,
            background: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            accounts: tokio::sync::watch::channel(0).0,
            reads_started: AtomicU64::new(0),
            reads_done: AtomicU64::new(0),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn holds_background(&self) -> bool {
        self.background.load(Ordering::Acquire) && !self.stopped.load(Ordering::Acquire)
    }

    /// Called under the state lock by [`Service::submit`]: the commit to await.
    pub fn submit(&self, inner: Weak<Inner>, ops: Vec<Op>) -> SharedCommit {
        let mut held = lock(&self.held);
        let mine = held
            .as_ref()
            .is_some_and(|h| h.task == tokio::task::try_id());
        SharedCommit {
            inner,
            ops,
            held: if mine { held.take() } else { None },
            base: self.rev.load(Ordering::Acquire),
            done: false,
        }
    }
}

/// Commits a batch: the new revision, or why not (then the cache is stale). Every write of the
/// batch gets the outcome.
async fn commit_carry(sh: &Shared, c: Carry) -> Outcome {
    let Carry {
        locked,
        ops,
        writes,
        waiters,
    } = c;
    // A commit cancelled midway marks the cache stale (its outcome is unknown).
    let mut pending = StaleUnlessDone(&sh.stale, false);
    let t0 = std::time::Instant::now();
    let r = locked.commit(ops).await.map_err(|e| e.to_string());
    match &r {
        Ok(rev) => {
            bluebatch_metrics::global().commit(writes, t0.elapsed());
            sh.rev.fetch_max(*rev, Ordering::AcqRel);
            pending.1 = true;
        }
        Err(_) => sh.stale.store(true, Ordering::Release),
    }
    for w in waiters {
        let _ = w.send(r.clone());
    }
    r
}

/// Commits the batch left in the gate, if any (its writes are decided; what follows must not
/// read past it or around it).
async fn settle(sh: &Shared, gate: &mut OwnedMutexGuard<Option<Carry>>) {
    if let Some(c) = gate.take() {
        let _ = commit_carry(sh, c).await;
    }
}

impl SharedCommit {
    pub async fn durable(mut self) -> Result<(), BatchError> {
        let Some(inner) = self.inner.upgrade() else {
            return Err(lost_commit("the service is gone"));
        };
        let sh = inner
            .shared
            .as_ref()
            .expect("a shared commit has a shared store");
        let mut held = match self.held.take() {
            Some(h) => h,
            None => {
                // A write made without the gate: it holds only if nobody committed since the
                // cache it was decided on.
                let mut gate = sh.gate.clone().lock_owned().await;
                settle(sh, &mut gate).await;
                let locked = sh.backend.lock().await.map_err(unavailable)?;
                if locked.rev() != self.base || sh.stale.load(Ordering::Acquire) {
                    sh.stale.store(true, Ordering::Release);
                    return Err(lost_commit("another replica committed first"));
                }
                Held {
                    carry: Some(Carry::new(locked)),
                    gate,
                    task: None,
                }
            }
        };
        let mut carry = held.carry.take().expect("a held gate has its transaction");
        carry.ops.append(&mut self.ops);
        carry.writes += 1;
        // From here the change's fate is the batch's: its commit marks the cache stale if it
        // fails or is cancelled.
        self.done = true;
        let more = sh.waiting.load(Ordering::Acquire) > 0
            && carry.writes < BATCH_WRITES
            && carry.ops.len() < BATCH_OPS;
        let outcome = if more {
            // Others wait at the gate: they join this batch; the last of them commits it.
            let (tx, rx) = oneshot::channel();
            carry.waiters.push(tx);
            *held.gate = Some(carry);
            drop(held);
            // Back in the queue (uncounted), on a task of its own so that a request that goes
            // cannot leave the batch unfinished: if the batch is still there when this turn
            // comes (everyone after it left without writing), it is committed then.
            let gate = sh.gate.clone();
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                let mut gate = gate.lock_owned().await;
                if let Some(c) = gate.take() {
                    drop(gate);
                    if let Some(inner) = weak.upgrade() {
                        spawn_commit(&inner, c);
                    }
                }
            });
            rx.await
                .unwrap_or_else(|_| Err("the batch's commit was abandoned".into()))
        } else if carry.waiters.is_empty() {
            // Alone: committed right here, the gate released after it.
            let r = commit_carry(sh, carry).await;
            drop(held);
            r
        } else {
            // The batch's commit must not depend on this request staying (its client may go):
            // it runs on a task of its own, the gate released at once.
            let (tx, rx) = oneshot::channel();
            carry.waiters.push(tx);
            drop(held);
            spawn_commit(&inner, carry);
            rx.await
                .unwrap_or_else(|_| Err("the batch's commit was abandoned".into()))
        };
        outcome.map(|_| ()).map_err(lost_commit)
    }
}

fn spawn_commit(inner: &Arc<Inner>, c: Carry) {
    let inner = inner.clone();
    tokio::spawn(async move {
        if let Some(sh) = &inner.shared {
            let _ = commit_carry(sh, c).await;
        }
    });
}

impl Service {
    pub(crate) fn shared(&self) -> Option<&Shared> {
        self.inner.shared.as_ref()
    }

    /// Whether this replica runs background work (always, on the embedded store).
    pub(crate) fn runs_background(&self) -> bool {
        self.shared().is_none_or(|s| s.holds_background())
    }

    /// Takes the gate (see the module's comment); a no-op on the embedded store and for a task
    /// that already holds it.
    pub(crate) async fn gate(&self) -> Result<Gate, BatchError> {
        let Some(sh) = self.shared() else {
            return Ok(Gate(None));
        };
        let me = tokio::task::try_id();
        if lock(&sh.held).as_ref().is_some_and(|h| h.task == me) {
            return Ok(Gate(None));
        }
        let mut gate = {
            let _queued = Queued::new(&sh.waiting);
            sh.gate.clone().lock_owned().await
        };
        if gate.is_some() && sh.stale.load(Ordering::Acquire) {
            // The cache holds a change that was dropped before its commit: the batch goes
            // first, then the cache is read again whole.
            settle(sh, &mut gate).await;
        }
        let carry = match gate.take() {
            // Joining the batch: the write lock is held since it began and the cache holds its
            // ops, so there is nothing to catch up.
            Some(c) => c,
            None => {
                let after = sh.rev.load(Ordering::Acquire);
                let mut locked = sh.backend.lock_after(after).await.map_err(unavailable)?;
                self.catch_up_locked(&mut *locked).await?;
                Carry::new(locked)
            }
        };
        *lock(&sh.held) = Some(Held {
            carry: Some(carry),
            gate,
            task: me,
        });
        Ok(Gate(Some(Arc::downgrade(&self.inner))))
    }

    /// Brings the cache up to the database's head before a read (a no-op on the embedded
    /// store). Errors are 503 `ServerBusy`.
    ///
    /// The changes read are applied without the gate: whatever this replica's writers hold in
    /// the cache uncommitted, they decided it under the write lock after catching up, so every
    /// change committed before is at or below the cache's revision and skipped (see
    /// [`Service::apply_changes`]); a change above it was committed while no batch of this
    /// replica held the write lock, so no uncommitted op of it can be overwritten. Readers thus
    /// never wait for a batch's commit (nor force one early), and another replica's commit is
    /// in the cache one round trip after its NOTIFY.
    pub async fn sync(&self) -> Result<(), BatchError> {
        let Some(sh) = self.shared() else {
            return Ok(());
        };
        if !sh.stale.load(Ordering::Acquire) {
            // A read started from now on holds every commit answered before this request.
            let need = sh.reads_started.load(Ordering::Acquire) + 1;
            let turn = sh.reading.lock().await;
            let mut whole = false;
            if sh.reads_done.load(Ordering::Acquire) < need {
                let ticket = sh.reads_started.fetch_add(1, Ordering::AcqRel) + 1;
                // One round trip: the changes after the cache's revision, read with the head
                // (none: the cache is up to date).
                let rev = sh.rev.load(Ordering::Acquire);
                match sh.backend.changes_since(rev).await.map_err(unavailable)? {
                    Some(c) => {
                        if !c.is_empty() {
                            self.apply_changes(c);
                        }
                        sh.reads_done.fetch_max(ticket, Ordering::AcqRel);
                    }
                    // The log no longer goes back that far: the whole snapshot, below.
                    None => whole = true,
                }
            }
            drop(turn);
            if !whole && !sh.stale.load(Ordering::Acquire) {
                return Ok(());
            }
        }
        let me = tokio::task::try_id();
        if lock(&sh.held).as_ref().is_some_and(|h| h.task == me) {
            return Ok(()); // the gate caught up already
        }
        let mut gate = sh.gate.clone().lock_owned().await;
        // A batch being gathered goes first: the snapshot below comes after it.
        settle(sh, &mut gate).await;
        self.reload_unlocked().await?;
        drop(gate);
        Ok(())
    }

    /// The database answers (the readiness probe).
    pub async fn ready(&self) -> Result<(), BatchError> {
        match self.shared() {
            None => Ok(()),
            Some(sh) => sh.backend.ping().await.map_err(unavailable),
        }
    }

    async fn catch_up_locked(&self, locked: &mut dyn Locked) -> Result<(), BatchError> {
        let sh = self.shared().expect("shared");
        let rev = sh.rev.load(Ordering::Acquire);
        if sh.stale.load(Ordering::Acquire) {
            let snap = locked.snapshot().await.map_err(unavailable)?;
            self.reload(snap.rev, snap.records);
        } else if locked.rev() > rev {
            match locked.changes_since(rev).await.map_err(unavailable)? {
                Some(changes) => self.apply_changes(changes),
                None => {
                    let snap = locked.snapshot().await.map_err(unavailable)?;
                    self.reload(snap.rev, snap.records);
                }
            }
        }
        Ok(())
    }

    /// Applies the changes above the cache's revision to the cache, then wakes what waits on
    /// them. Those at or below it are skipped: already applied by another sync or by the gate's
    /// catch-up, or this replica's own commit (its ops are in the cache since they were
    /// decided). The revision moves under the state lock with the records, so two syncs (or a
    /// sync and the gate) applying overlapping reads apply each change once, in order.
    fn apply_changes(&self, changes: Vec<Change>) {
        let sh = self.shared().expect("shared");
        let mut touched = Touched::default();
        {
            let mut st = self.lock();
            let base = sh.rev.load(Ordering::Acquire);
            let mut last = base;
            for c in changes.iter().filter(|c| c.rev > base) {
                if let Err(e) = st.apply(&c.op, &mut touched) {
                    tracing::warn!("{e}");
                }
                last = last.max(c.rev);
            }
            if last == base {
                return;
            }
            if touched.clock {
                let nanos = st.clock_offset_nanos.unwrap_or(0);
                self.inner
                    .clock
                    .set_offset(time::Duration::nanoseconds(nanos));
            }
            sh.rev.fetch_max(last, Ordering::AcqRel);
        }
        self.after_changes(touched);
    }

    /// Applies changes that came with a wake-up, if those above the cache's revision follow
    /// it without a gap (every revision after it, each whole, in order) and the cache is not
    /// stale: whether the cache is now at least at their last revision.
    fn apply_pushed(&self, changes: Vec<Change>) -> bool {
        let sh = self.shared().expect("shared");
        if sh.stale.load(Ordering::Acquire) {
            return false;
        }
        let mut touched = Touched::default();
        {
            let mut st = self.lock();
            let base = sh.rev.load(Ordering::Acquire);
            let mut cur = base;
            for c in changes.iter().filter(|c| c.rev > base) {
                if c.rev == cur + 1 {
                    cur = c.rev;
                } else if c.rev != cur || cur == base {
                    return false;
                }
            }
            if cur == base {
                // All at or below the cache's revision (this replica's own commits).
                return true;
            }
            for c in changes.iter().filter(|c| c.rev > base) {
                if let Err(e) = st.apply(&c.op, &mut touched) {
                    tracing::warn!("{e}");
                }
            }
            if touched.clock {
                let nanos = st.clock_offset_nanos.unwrap_or(0);
                self.inner
                    .clock
                    .set_offset(time::Duration::nanoseconds(nanos));
            }
            sh.rev.fetch_max(cur, Ordering::AcqRel);
        }
        self.after_changes(touched);
        true
    }

    /// Replaces the whole cache with a snapshot, keeping what only this replica knows of its
    /// hosts (polls in flight, last sight).
    fn reload(&self, rev: u64, records: Vec<(String, Vec<u8>)>) {
        if let Some(fresh) = load_state(records) {
            // Read under the write lock: at the head, never behind the cache.
            let _ = self.install(fresh, rev, true);
        }
    }

    /// The whole cache again, read outside the write lock (the gate held, the cache stale or
    /// the change log too short): a snapshot, then the changes committed since, until what is
    /// installed is not behind what a concurrent sync applied meanwhile (the cache never goes
    /// back in time for a request that saw a newer revision).
    async fn reload_unlocked(&self) -> Result<(), BatchError> {
        let sh = self.shared().expect("shared");
        'snapshot: loop {
            let snap = sh.backend.snapshot().await.map_err(unavailable)?;
            let Some(mut fresh) = load_state(snap.records) else {
                return Ok(());
            };
            let mut at = snap.rev;
            loop {
                fresh = match self.install(fresh, at, false) {
                    Ok(()) => return Ok(()),
                    Err(f) => f,
                };
                let Some(changes) = sh.backend.changes_since(at).await.map_err(unavailable)? else {
                    continue 'snapshot;
                };
                let mut ignored = Touched::default();
                for c in changes {
                    if let Err(e) = fresh.apply(&c.op, &mut ignored) {
                        tracing::warn!("{e}");
                    }
                    at = at.max(c.rev);
                }
            }
        }
    }

    /// Installs `fresh` (at revision `rev`) as the cache; unless `force`, refused (and given
    /// back) when the cache's revision is above `rev`.
    fn install(&self, fresh: Box<State>, rev: u64, force: bool) -> Result<(), Box<State>> {
        let sh = self.shared().expect("shared");
        let mut touched = Touched::default();
        {
            let mut st = self.lock();
            if !force && sh.rev.load(Ordering::Acquire) > rev {
                return Err(fresh);
            }
            let old = std::mem::replace(&mut *st, *fresh);
            for (id, h) in old.hub.hosts {
                if let Some(n) = st.hub.hosts.get_mut(&id) {
                    n.polls = h.polls;
                    n.last_seen = h.last_seen;
                }
                touched.hosts.insert(id);
            }
            for (account, acct) in &st.accounts {
                for (pkey, p) in &acct.pools {
                    touched.pools.insert((account.clone(), pkey.clone()));
                    for n in p.nodes.values() {
                        if let Some(host) = &n.node.host {
                            touched.agent_nodes.push((
                                crate::state::node_key(account, &p.pool.id, &n.node.id),
                                host.clone(),
                            ));
                        }
                    }
                }
            }
            let nanos = st.clock_offset_nanos.unwrap_or(0);
            self.inner
                .clock
                .set_offset(time::Duration::nanoseconds(nanos));
            touched.clock = true;
            // The accounts may have changed too (the wire's live accounts follow this).
            touched.accounts = true;
            // With the records, under the state lock (see `apply_changes`).
            sh.rev.store(rev, Ordering::Release);
            sh.stale.store(false, Ordering::Release);
        }
        self.after_changes(touched);
        Ok(())
    }

    /// Wakes the long polls and the writes waiting for acknowledgements that the changes
    /// concern; the background holder schedules the steps of the pools they touched.
    fn after_changes(&self, touched: Touched) {
        let hub = &self.inner.hub;
        if touched.accounts
            && let Some(sh) = self.shared()
        {
            sh.accounts.send_modify(|v| *v += 1);
        }
        if touched.clock {
            hub.notify_all();
        }
        for host in &touched.hosts {
            hub.notify(host);
        }
        let applied: Vec<(String, String, Option<u64>)> = {
            let st = self.lock();
            touched
                .agent_nodes
                .iter()
                .map(|(key, host)| {
                    let applied = key_node(&st, key).and_then(|n| n.applied_revision);
                    (key.clone(), host.clone(), applied)
                })
                .collect()
        };
        for (key, revision, failures) in touched.failures {
            hub.acked(&key, None, Some((revision, failures)));
        }
        for (key, host, applied) in applied {
            hub.notify_node(&host, &key);
            if applied.is_some() {
                hub.acked(&key, applied, None);
            }
        }
        if self.runs_background() {
            for (account, pkey) in touched.pools {
                if self.is_busy(&account, &pkey) {
                    self.schedule(&account, &pkey);
                }
            }
        }
    }

    /// Starts following other replicas' commits and competing for the background lease.
    pub(crate) fn start_shared_tasks(&self) {
        if let Some(mut notices) = self.shared().and_then(|sh| sh.backend.ack_notices()) {
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                loop {
                    let notice = match notices.recv().await {
                        Ok(n) => n,
                        // Missed ones: their commits tell the same.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    let Some(inner) = weak.upgrade() else { return };
                    if inner
                        .shared
                        .as_ref()
                        .is_some_and(|sh| sh.replica == notice.replica)
                    {
                        continue;
                    }
                    for (key, applied) in &notice.acks {
                        inner.hub.acked_early(key, *applied);
                    }
                }
            });
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let backend = match weak.upgrade() {
                    Some(inner) => inner.shared.as_ref().map(|s| s.backend.clone()),
                    None => return,
                };
                let Some(backend) = backend else { return };
                backend.changed(FOLLOW_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                let svc = Service { inner };
                // Changes that came with the wake-ups and follow the cache's revision without
                // a gap need no read of the log (a request's own sync still reads the head).
                if let Some(pushed) = backend.take_pushed()
                    && !pushed.is_empty()
                    && svc.apply_pushed(pushed)
                {
                    continue;
                }
                let _ = svc.sync().await;
            }
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let svc = Service { inner };
                if svc
                    .shared()
                    .is_none_or(|s| s.stopped.load(Ordering::Acquire))
                {
                    return;
                }
                svc.renew_background().await;
                drop(svc);
                tokio::time::sleep(LEASE_RENEW).await;
            }
        });
    }

    async fn renew_background(&self) {
        let sh = self.shared().expect("shared");
        let held = sh
            .backend
            .claim_lease(BACKGROUND_LEASE, &sh.replica, LEASE_TTL)
            .await
            .unwrap_or(false);
        let had = sh.background.swap(held, Ordering::AcqRel);
        if held && !had {
            tracing::info!(replica = %sh.replica, "this replica runs the background work");
            if self.sync().await.is_ok() {
                self.resume_pools();
            }
        } else if had && !held {
            tracing::warn!(replica = %sh.replica, "background lease lost");
        }
    }

    /// On a shared store, the Batch accounts live in the database (so replicas cannot drift):
    /// adds those of `given` it does not have yet (an accounts file only seeds them) and
    /// answers every account it holds, with its base64 keys. On the embedded store: `given`.
    /// With `replace`, the store's accounts become exactly `given` instead: keys replaced (a
    /// rotation), accounts `given` does not name removed; every replica follows at once.
    pub async fn seed_accounts(
        &self,
        given: Vec<(String, Vec<String>)>,
        replace: bool,
    ) -> Result<Vec<(String, Vec<String>)>, BatchError> {
        if self.shared().is_none() {
            return Ok(given);
        }
        let _gate = self.gate().await?;
        let pending = {
            let mut st = self.lock();
            let mut ops = Vec::new();
            if replace {
                let gone: Vec<String> = st
                    .account_keys
                    .keys()
                    .filter(|n| !given.iter().any(|(g, _)| g == *n))
                    .cloned()
                    .collect();
                for name in gone {
                    st.account_keys.remove(&name);
                    ops.push(bluebatch_store::Op::Delete {
                        key: format!("account/{name}"),
                    });
                }
            }
            for (name, keys) in given {
                if st
                    .account_keys
                    .get(&name)
                    .is_some_and(|r| !replace || r.keys == keys)
                {
                    continue;
                }
                let rec = crate::state::AccountRecord { keys };
                ops.push(crate::put_json(format!("account/{name}"), &rec));
                st.account_keys.insert(name, rec);
            }
            (!ops.is_empty()).then(|| self.submit(ops))
        };
        if let Some(p) = pending {
            p.durable().await?;
        }
        Ok(self.stored_accounts())
    }

    /// The accounts in the store (shared store: name, base64 keys).
    pub fn stored_accounts(&self) -> Vec<(String, Vec<String>)> {
        self.lock()
            .account_keys
            .iter()
            .map(|(n, r)| (n.clone(), r.keys.clone()))
            .collect()
    }

    /// Changes whenever another replica adds accounts to the shared store (`None`: the
    /// embedded store, whose accounts come from this process alone).
    pub fn accounts_changed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.shared().map(|s| s.accounts.subscribe())
    }

    /// A replica shutting down: it takes no more background work and gives up the background
    /// lease, so another replica takes over at once rather than when the lease expires.
    pub async fn shutdown(&self) {
        let Some(sh) = self.shared() else {
            return;
        };
        sh.stopped.store(true, Ordering::Release);
        if sh.background.swap(false, Ordering::AcqRel) {
            let _ = sh
                .backend
                .release_lease(BACKGROUND_LEASE, &sh.replica)
                .await;
        }
    }
}

/// A snapshot's records as a state (`None`, logged, when one cannot be read).
fn load_state(records: Vec<(String, Vec<u8>)>) -> Option<Box<State>> {
    match State::load(records) {
        Ok(s) => Some(Box::new(s)),
        Err(e) => {
            tracing::error!("the database holds a record this replica cannot read: {e}");
            None
        }
    }
}

fn key_node<'a>(st: &'a State, key: &str) -> Option<&'a bluebatch_core::model::Node> {
    // Fabric keys are ACCOUNT.POOLKEY.NODE; account names and node ids have no '.', but pool
    // ids may: the account is before the first '.', the node after the last.
    let (account, rest) = key.split_once('.')?;
    let (pool, node) = rest.rsplit_once('.')?;
    st.pool(account, pool)?.nodes.get(node).map(|n| &n.node)
}
