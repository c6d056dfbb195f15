//! One node's state: the accounts it enforces, its live connections, its failed-login records
//! and its running endpoint.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bluebatch_core::NodeAccount;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::AccountChange;
use crate::Inner;
use crate::session::Leader;

/// How long failed logins are counted, and how long a source is refused once over the limit.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

pub(crate) struct Node {
    pub key: String,
    accounts: RwLock<AccountState>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    failures: Mutex<HashMap<IpAddr, FailureWindow>>,
    /// Serialises start/stop/reimage/remove; holds the running endpoint.
    pub lifecycle: tokio::sync::Mutex<Option<Endpoint>>,
    /// Mirror of the running endpoint for the synchronous getters, and the listener task.
    running: Mutex<Option<RunningInfo>>,
    open_conns: AtomicUsize,
    conns_gone: Notify,
}

#[derive(Default)]
struct AccountState {
    revision: Option<u64>,
    accounts: HashMap<String, NodeAccount>,
}

struct ConnEntry {
    user: Option<String>,
    ctl: Arc<ConnCtl>,
}

struct FailureWindow {
    started: Instant,
    count: u32,
    refused_until: Option<Instant>,
}

struct RunningInfo {
    addr: SocketAddr,
    host_public_key: String,
    abort: tokio::task::AbortHandle,
}

/// A running endpoint: the listener task (which owns the only socket an idle node has).
pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub listener: JoinHandle<()>,
}

impl Endpoint {
    /// Stops accepting, ends every session of the node and frees the port.
    pub async fn stop(self, inner: &Inner, node: &Node) {
        self.listener.abort();
        let _ = self.listener.await;
        inner.release_port(self.addr.port());
        *node.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
        node.end_all_sessions(Duration::from_secs(2)).await;
    }
}

/// Control of one connection, shared by its task, its handler and the node.
#[derive(Default)]
pub(crate) struct ConnCtl {
    kill: Notify,
    killed: AtomicBool,
    logged_in: AtomicBool,
    leaders: Mutex<Vec<Arc<Leader>>>,
}

impl ConnCtl {
    /// Ends the connection: kills its processes now and asks its task to disconnect.
    pub fn terminate(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        for leader in leaders.iter() {
            leader.signal(libc::SIGKILL);
        }
        drop(leaders);
        self.kill.notify_one();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    pub fn set_logged_in(&self) {
        self.logged_in.store(true, Ordering::SeqCst);
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in.load(Ordering::SeqCst)
    }

    pub async fn killed(&self) {
        self.kill.notified().await
    }

    pub fn add_leader(&self, leader: Arc<Leader>) {
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        leaders.retain(|l| l.is_alive());
        leaders.push(leader);
        if self.is_killed() {
            for leader in leaders.iter() {
                leader.signal(libc::SIGKILL);
            }
        }
    }

    /// The client went away: hang up its remaining processes, as a terminal would.
    pub fn hang_up(&self) {
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        for leader in leaders.iter() {
            leader.signal(libc::SIGHUP);
        }
    }
}

/// Counts a connection of the node; released on drop.
pub(crate) struct ConnSlot {
    node: Arc<Node>,
    id: u64,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut conns = self.node.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(&self.id);
        drop(conns);
        if self.node.open_conns.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.node.conns_gone.notify_waiters();
        }
    }
}

impl Node {
    pub fn new(key: String) -> Self {
        Node {
            key,
            accounts: RwLock::new(AccountState::default()),
            conns: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            lifecycle: tokio::sync::Mutex::new(None),
            running: Mutex::new(None),
            open_conns: AtomicUsize::new(0),
            conns_gone: Notify::new(),
        }
    }

    // ---- accounts -------------------------------------------------------------------------

    pub fn apply(&self, revision: u64, change: AccountChange, now: OffsetDateTime) -> u64 {
        let mut state = self.accounts.write().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = state.revision
            && revision < current
        {
            return current;
        }
        match change {
            AccountChange::Upsert(account) => {
                state.accounts.insert(account.name.clone(), account);
            }
            AccountChange::Remove(name) => {
                state.accounts.remove(&name);
            }
            AccountChange::ReplaceAll(accounts) => {
                state.accounts = accounts.into_iter().map(|a| (a.name.clone(), a)).collect();
            }
        }
        state.revision = Some(revision);
        drop(state);
        self.enforce(now);
        revision
    }

    pub fn applied_revision(&self) -> Option<u64> {
        self.accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .revision
    }

    pub fn accounts(&self) -> Vec<NodeAccount> {
        let state = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<NodeAccount> = state.accounts.values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn account(&self, name: &str) -> Option<NodeAccount> {
        let state = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        state.accounts.get(name).cloned()
    }

    fn may_stay(&self, user: &str, now: OffsetDateTime) -> bool {
        let state = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        state
            .accounts
            .get(user)
            .is_some_and(|a| !a.is_expired_at(now))
    }

    /// Ends the sessions of accounts that are gone or expired at `now`.
    pub fn enforce(&self, now: OffsetDateTime) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for entry in conns.values() {
            if let Some(user) = &entry.user
                && !entry.ctl.is_killed()
                && !self.may_stay(user, now)
            {
                tracing::debug!(node = %self.key, user = %user, "ending session: account removed or expired");
                entry.ctl.terminate();
            }
        }
    }

    // ---- connections ----------------------------------------------------------------------

    /// Registers a new connection, unless the node already has `max` of them.
    pub fn open_conn(self: &Arc<Self>, id: u64, ctl: Arc<ConnCtl>, max: usize) -> Option<ConnSlot> {
        if self.open_conns.fetch_add(1, Ordering::SeqCst) >= max {
            if self.open_conns.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.conns_gone.notify_waiters();
            }
            return None;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.insert(id, ConnEntry { user: None, ctl });
        Some(ConnSlot {
            node: self.clone(),
            id,
        })
    }

    /// Marks the connection as logged in as `user`, then checks the account again so that a
    /// concurrent removal cannot slip between the login check and this registration (`apply`
    /// updates the accounts before it scans the connections). Returns false if the login must
    /// be refused after all.
    pub fn login(&self, id: u64, user: &str, now: OffsetDateTime) -> bool {
        {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = conns.get_mut(&id) else {
                return false;
            };
            entry.user = Some(user.to_string());
        }
        if self.may_stay(user, now) {
            return true;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = conns.get_mut(&id) {
            entry.user = None;
        }
        false
    }

    pub fn has_sessions(&self) -> bool {
        self.open_conns.load(Ordering::SeqCst) > 0
    }

    pub fn terminate_all(&self) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for entry in conns.values() {
            entry.ctl.terminate();
        }
    }

    /// Ends every connection and waits (up to `wait`) until their tasks are gone.
    pub async fn end_all_sessions(&self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let gone = self.conns_gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if self.open_conns.load(Ordering::SeqCst) == 0 {
                return;
            }
            self.terminate_all();
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                tracing::warn!(node = %self.key, "sessions still closing after stop");
                return;
            }
        }
    }

    // ---- failed logins --------------------------------------------------------------------

    /// Whether logins from `ip` are refused right now.
    pub fn refused(&self, ip: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures
            .get(&ip)
            .and_then(|f| f.refused_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Counts a failed login from `ip`; at `max` within a minute, refuses it for a minute
    /// (`max == 0`: no limit).
    pub fn record_failure(&self, ip: IpAddr, max: u32) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let window = failures.entry(ip).or_insert(FailureWindow {
            started: now,
            count: 0,
            refused_until: None,
        });
        let over = match window.refused_until {
            Some(until) => now >= until,
            None => now.duration_since(window.started) >= FAILURE_WINDOW,
        };
        if over {
            *window = FailureWindow {
                started: now,
                count: 0,
                refused_until: None,
            };
        }
        window.count = window.count.saturating_add(1);
        if max > 0 && window.count >= max && window.refused_until.is_none() {
            tracing::debug!(node = %self.key, %ip, "too many failed logins: refusing this source for a minute");
            window.refused_until = Some(now + FAILURE_WINDOW);
        }
    }

    pub fn prune_failures(&self) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.retain(|_, f| {
            now.duration_since(f.started) < FAILURE_WINDOW
                || f.refused_until.is_some_and(|until| now < until)
        });
    }

    // ---- endpoint -------------------------------------------------------------------------

    pub fn set_running(
        &self,
        addr: SocketAddr,
        host_public_key: String,
        abort: tokio::task::AbortHandle,
    ) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(RunningInfo {
            addr,
            host_public_key,
            abort,
        });
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.as_ref().map(|r| r.addr)
    }

    pub fn host_public_key(&self) -> Option<String> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.as_ref().map(|r| r.host_public_key.clone())
    }

    pub fn abort_listener(&self) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.as_ref() {
            r.abort.abort();
        }
    }
}
