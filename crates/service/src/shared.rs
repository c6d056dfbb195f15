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
//! - A commit that fails leaves the cache ahead of the database: the cache is marked stale and
//!   read again whole before it is used; the request answers 503 `ServerBusy`.
//! - **Background work** (lifecycle steps, the liveness sweep) runs on the replica that holds the
//!   `background` lease; another takes over once a lost holder's lease expires.

use crate::state::{State, Touched};
use crate::{Inner, Service};
use bluebatch_core::error::{BatchError, Code};
use bluebatch_store::{Change, Locked, Op, SharedBackend};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// How long the background lease lasts without renewal, and how often it is renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// The longest a replica goes without looking for other replicas' commits (NOTIFY wakes it
/// sooner; it is only a wake-up).
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
const BACKGROUND_LEASE: &str = "background";

pub(crate) struct Shared {
    pub backend: Arc<dyn SharedBackend>,
    gate: Arc<tokio::sync::Mutex<()>>,
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
}

pub(crate) struct Held {
    locked: Box<dyn Locked>,
    _gate: OwnedMutexGuard<()>,
    task: Option<tokio::task::Id>,
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
            gate: Arc::new(tokio::sync::Mutex::new(())),
            rev: AtomicU64::new(rev),
            stale: AtomicBool::new(false),
            held: Mutex::new(None),
            replica,
            background: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            accounts: tokio::sync::watch::channel(0).0,
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

impl SharedCommit {
    pub async fn durable(mut self) -> Result<(), BatchError> {
        let Some(inner) = self.inner.upgrade() else {
            return Err(lost_commit("the service is gone"));
        };
        let sh = inner
            .shared
            .as_ref()
            .expect("a shared commit has a shared store");
        let held = match self.held.take() {
            Some(h) => h,
            None => {
                // A write made without the gate: it holds only if nobody committed since the
                // cache it was decided on.
                let gate = sh.gate.clone().lock_owned().await;
                let locked = sh.backend.lock().await.map_err(unavailable)?;
                if locked.rev() != self.base || sh.stale.load(Ordering::Acquire) {
                    sh.stale.store(true, Ordering::Release);
                    return Err(lost_commit("another replica committed first"));
                }
                Held {
                    locked,
                    _gate: gate,
                    task: None,
                }
            }
        };
        let Held { locked, _gate, .. } = held;
        // Declared after the gate, so dropped before it: a commit cancelled here marks the
        // cache stale before another writer can take the gate.
        let mut pending = StaleUnlessDone(&sh.stale, false);
        match locked.commit(std::mem::take(&mut self.ops)).await {
            Ok(rev) => {
                sh.rev.store(rev, Ordering::Release);
                pending.1 = true;
                self.done = true;
                Ok(())
            }
            Err(e) => {
                sh.stale.store(true, Ordering::Release);
                Err(lost_commit(e))
            }
        }
    }
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
        let gate = sh.gate.clone().lock_owned().await;
        let mut locked = sh.backend.lock().await.map_err(unavailable)?;
        self.catch_up_locked(&mut *locked).await?;
        *lock(&sh.held) = Some(Held {
            locked,
            _gate: gate,
            task: me,
        });
        Ok(Gate(Some(Arc::downgrade(&self.inner))))
    }

    /// Brings the cache up to the database's head before a read (a no-op on the embedded
    /// store). Errors are 503 `ServerBusy`.
    pub async fn sync(&self) -> Result<(), BatchError> {
        let Some(sh) = self.shared() else {
            return Ok(());
        };
        let head = sh.backend.head().await.map_err(unavailable)?;
        if head <= sh.rev.load(Ordering::Acquire) && !sh.stale.load(Ordering::Acquire) {
            return Ok(());
        }
        let me = tokio::task::try_id();
        if lock(&sh.held).as_ref().is_some_and(|h| h.task == me) {
            return Ok(()); // the gate caught up already
        }
        let _gate = sh.gate.clone().lock_owned().await;
        let rev = sh.rev.load(Ordering::Acquire);
        if sh.stale.load(Ordering::Acquire) {
            let snap = sh.backend.snapshot().await.map_err(unavailable)?;
            self.reload(snap.rev, snap.records);
            return Ok(());
        }
        match sh.backend.changes_since(rev).await.map_err(unavailable)? {
            Some(changes) => self.apply_changes(changes),
            None => {
                let snap = sh.backend.snapshot().await.map_err(unavailable)?;
                self.reload(snap.rev, snap.records);
            }
        }
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

    /// Applies other replicas' changes to the cache (the caller holds the gate), then wakes
    /// what waits on them.
    fn apply_changes(&self, changes: Vec<Change>) {
        let sh = self.shared().expect("shared");
        let mut touched = Touched::default();
        let mut last = sh.rev.load(Ordering::Acquire);
        {
            let mut st = self.lock();
            for c in &changes {
                if let Err(e) = st.apply(&c.op, &mut touched) {
                    tracing::warn!("{e}");
                }
                last = last.max(c.rev);
            }
            if touched.clock {
                let nanos = st.clock_offset_nanos.unwrap_or(0);
                self.inner
                    .clock
                    .set_offset(time::Duration::nanoseconds(nanos));
            }
        }
        sh.rev.store(last, Ordering::Release);
        self.after_changes(touched);
    }

    /// Replaces the whole cache with a snapshot, keeping what only this replica knows of its
    /// hosts (polls in flight, last sight).
    fn reload(&self, rev: u64, records: Vec<(String, Vec<u8>)>) {
        let sh = self.shared().expect("shared");
        let fresh = match State::load(records) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("the database holds a record this replica cannot read: {e}");
                return;
            }
        };
        let mut touched = Touched::default();
        {
            let mut st = self.lock();
            let old = std::mem::replace(&mut *st, fresh);
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
        }
        sh.rev.store(rev, Ordering::Release);
        sh.stale.store(false, Ordering::Release);
        self.after_changes(touched);
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
            hub.notify(&host);
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
                let _ = Service { inner }.sync().await;
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

fn key_node<'a>(st: &'a State, key: &str) -> Option<&'a bluebatch_core::model::Node> {
    // Fabric keys are ACCOUNT.POOLKEY.NODE; account names and node ids have no '.', but pool
    // ids may: the account is before the first '.', the node after the last.
    let (account, rest) = key.split_once('.')?;
    let (pool, node) = rest.rsplit_once('.')?;
    st.pool(account, pool)?.nodes.get(node).map(|n| &n.node)
}
