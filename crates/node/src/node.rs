//! One node's state: the accounts it enforces, its Batch state (which decides whether it takes
//! logins), its live connections, its failed-login records and its running endpoint.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bluebatch_core::NodeAccount;
use bluebatch_core::model::NodeState;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::AccountChange;
use crate::Inner;
use crate::session::Leader;

/// Where the node's SSH events go (logins accepted and refused, lockouts, state changes).
pub(crate) const TARGET: &str = "bluebatch::ssh";

/// Whether a node in `state` takes SSH logins. A node that takes none also has no sessions:
/// entering such a state ends every connection of the node.
///
/// Taken: `idle`, `running`, `offline` (scheduling disabled: the VM is up) and
/// `starttaskfailed` (the VM is up; logging in is how a failed start task is investigated).
/// Refused: `creating`, `starting`, `waitingforstarttask`, `rebooting`, `reimaging`,
/// `unusable`, `unknown`, `leavingpool`, `preempted` (the VM is down, being set up, or going).
pub fn accepts_logins(state: NodeState) -> bool {
    matches!(
        state,
        NodeState::Idle | NodeState::Running | NodeState::Offline | NodeState::StartTaskFailed
    )
}

pub(crate) struct Node {
    pub key: String,
    accounts: RwLock<AccountState>,
    conns: Mutex<Conns>,
    /// Connections shed by the startup caps since the last info line about them.
    shed: Mutex<ShedLog>,
    failures: Mutex<HashMap<IpAddr, FailureWindow>>,
    /// Some source is refused right now (the sweep looks for lockouts to lift only then).
    locked_out: AtomicBool,
    /// The Batch state the service last gave the node; `None` (never told) takes logins.
    state: Mutex<Option<NodeState>>,
    /// Serialises start/stop/reimage/remove; holds the running endpoint.
    pub lifecycle: tokio::sync::Mutex<Option<Endpoint>>,
    /// Mirror of the running endpoint for the synchronous getters, and the listener task.
    running: Mutex<Option<RunningInfo>>,
    open_conns: AtomicUsize,
    conns_gone: Notify,
    /// The node's last authentication outcomes (login activity).
    pub logins: crate::logins::LoginLog,
}

/// The node's whole account set, sorted by name (names unique), owned by the node: a change of
/// one account ([`AccountChange::Upsert`], [`AccountChange::Remove`], [`Node::apply_one_only`])
/// replaces, inserts or removes that account in place, copying none of the others.
#[derive(Default)]
struct AccountState {
    revision: Option<u64>,
    accounts: Vec<NodeAccount>,
}

impl AccountState {
    fn position(&self, name: &str) -> Result<usize, usize> {
        self.accounts
            .binary_search_by(|a| a.name.as_str().cmp(name))
    }

    fn find(&self, name: &str) -> Option<&NodeAccount> {
        self.position(name).ok().map(|i| &self.accounts[i])
    }

    /// Adds `account`, or replaces the account of its name.
    fn upsert(&mut self, account: NodeAccount) {
        match self.position(&account.name) {
            Ok(i) => self.accounts[i] = account,
            Err(i) => self.accounts.insert(i, account),
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(i) = self.position(name) {
            self.accounts.remove(i);
        }
    }
}

/// `accounts` sorted by name with unique names (the last of equal names wins).
fn sorted_set(mut accounts: Vec<NodeAccount>) -> Vec<NodeAccount> {
    accounts.reverse();
    accounts.sort_by(|a, b| a.name.cmp(&b.name));
    accounts.dedup_by(|a, b| a.name == b.name);
    accounts
}

/// The node's connections, and how many of them are startups (not logged in yet: counted
/// against the startup caps, overall and per source) or sessions (logged in).
#[derive(Default)]
struct Conns {
    map: HashMap<u64, ConnEntry>,
    startups: usize,
    startups_by_source: HashMap<IpAddr, usize>,
    sessions: usize,
}

impl Conns {
    fn end_startup(&mut self, source: IpAddr) {
        self.startups = self.startups.saturating_sub(1);
        if let Some(n) = self.startups_by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.startups_by_source.remove(&source);
            }
        }
    }
}

struct ConnEntry {
    user: Option<String>,
    ctl: Arc<ConnCtl>,
    source: IpAddr,
    /// Not logged in yet (a startup) rather than a session.
    startup: bool,
    /// Sessions the node takes at once, as configured when the connection came.
    max_sessions: usize,
    /// The process-wide startup count this startup is part of.
    pool: Arc<StartupPool>,
}

/// The startups of every node of this process, bounded in all and per source address, so that
/// a flood spread over many nodes cannot exhaust the process's descriptors (each startup holds
/// two) nor one address take every node's startups.
pub(crate) struct StartupPool {
    counts: Mutex<PoolCounts>,
    max_total: usize,
    per_source: Option<usize>,
}

#[derive(Default)]
struct PoolCounts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl StartupPool {
    pub fn new(max_total: usize, per_source: Option<usize>) -> Self {
        StartupPool {
            counts: Mutex::new(PoolCounts::default()),
            max_total,
            per_source,
        }
    }

    fn admit(&self, source: IpAddr) -> Result<(), Shed> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        if self.per_source.is_some_and(|cap| from_source >= cap) {
            return Err(Shed::ServerPerSource);
        }
        if c.total >= self.max_total {
            return Err(Shed::ServerTotal);
        }
        c.total += 1;
        *c.by_source.entry(source).or_insert(0) += 1;
        Ok(())
    }

    fn release(&self, source: IpAddr) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&source);
            }
        }
    }

    /// Startups of every node right now.
    #[cfg(test)]
    pub fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// The limits a new connection is admitted under.
#[derive(Clone)]
pub(crate) struct Admission {
    /// Startups of the node at once: `MaxStartups` start:rate:full.
    pub max_startups: crate::MaxStartups,
    /// Startups from one source address at once (`None`: no such cap).
    pub per_source: Option<usize>,
    /// Logged-in connections of the node at once.
    pub max_sessions: usize,
    /// The startups of every node of the process.
    pub pool: Arc<StartupPool>,
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Its source already has `per_source` startups.
    PerSource,
    /// The node's startups are at `full`, or past `start` and this one was drawn.
    MaxStartups,
    /// Its source already has that many startups across every node of the process.
    ServerPerSource,
    /// Every node of the process together has its maximum of startups.
    ServerTotal,
}

impl Shed {
    pub fn reason(self) -> &'static str {
        match self {
            Shed::PerSource => "too many unauthenticated connections from this source",
            Shed::MaxStartups => "too many unauthenticated connections to this node",
            Shed::ServerPerSource => {
                "too many unauthenticated connections from this source to this server's nodes"
            }
            Shed::ServerTotal => "too many unauthenticated connections to this server's nodes",
        }
    }
}

/// Why a login that passed its checks is refused after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoginBlocked {
    /// The account went away (or expired) meanwhile.
    AccountGone,
    /// The node has its maximum of sessions; the connection is ended.
    SessionsFull,
}

#[derive(Default)]
struct ShedLog {
    last: Option<Instant>,
    count: u64,
}

struct FailureWindow {
    started: Instant,
    count: u32,
    refused_until: Option<Instant>,
}

/// A source refused for too many failed logins.
pub(crate) struct Lockout {
    pub source: IpAddr,
    pub failures: u32,
    pub until: Instant,
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
    /// Why the node ended the connection (sent in the SSH disconnect message).
    reason: Mutex<Option<String>>,
}

impl ConnCtl {
    /// Ends the connection: asks its task to disconnect and kills its processes now; their exit
    /// is not reported on their channels, so the disconnect naming the reason is what the
    /// client gets.
    pub fn terminate(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.kill.notify_one();
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        for leader in leaders.iter() {
            leader.end();
        }
    }

    /// Ends the connection, telling the client why.
    pub fn terminate_because(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.terminate();
    }

    /// Why the node ended the connection, if it said.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
                leader.end();
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
        if let Some(entry) = conns.map.remove(&self.id) {
            if entry.startup {
                conns.end_startup(entry.source);
                entry.pool.release(entry.source);
            } else {
                conns.sessions = conns.sessions.saturating_sub(1);
                bluebatch_metrics::global()
                    .ssh_sessions_open
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
        drop(conns);
        bluebatch_metrics::global()
            .ssh_connections_open
            .fetch_sub(1, Ordering::Relaxed);
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
            conns: Mutex::new(Conns::default()),
            shed: Mutex::new(ShedLog::default()),
            failures: Mutex::new(HashMap::new()),
            locked_out: AtomicBool::new(false),
            state: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(None),
            running: Mutex::new(None),
            open_conns: AtomicUsize::new(0),
            conns_gone: Notify::new(),
            logins: crate::logins::LoginLog::default(),
        }
    }

    // ---- accounts -------------------------------------------------------------------------

    pub fn apply(&self, revision: u64, change: AccountChange, now: OffsetDateTime) -> u64 {
        let applied = self.apply_only(revision, change);
        if applied == revision {
            self.enforce(now);
        }
        applied
    }

    /// [`Node::apply`] without [`Node::enforce`]: the caller ends the sessions afterwards.
    pub fn apply_only(&self, revision: u64, change: AccountChange) -> u64 {
        let mut state = self.accounts.write().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = state.revision
            && revision < current
        {
            return current;
        }
        match change {
            AccountChange::Upsert(account) => state.upsert(account),
            AccountChange::Remove(name) => state.remove(&name),
            AccountChange::ReplaceAll(accounts) => {
                state.accounts = sorted_set(accounts);
            }
            AccountChange::Snapshot(accounts) => {
                let ordered = accounts.windows(2).all(|w| w[0].name < w[1].name);
                state.accounts = if ordered {
                    accounts.to_vec()
                } else {
                    sorted_set(accounts.to_vec())
                };
            }
        }
        state.revision = Some(revision);
        revision
    }

    /// The change of one account at `revision` (`Some`: add or replace `name`'s account;
    /// `None`: remove it), taken only by a node whose accounts are exactly those of revision
    /// `base`: it is then applied in place and `Some(revision)` returned. A node at a later
    /// revision than `revision` answers that one (the change was superseded); a node at any other
    /// revision (or none) answers `None` and takes nothing: the caller hands it the whole set.
    /// Sessions are not ended (see [`Node::enforce`]).
    pub fn apply_one_only(
        &self,
        base: u64,
        revision: u64,
        name: &str,
        account: Option<NodeAccount>,
    ) -> Option<u64> {
        let mut state = self.accounts.write().unwrap_or_else(|e| e.into_inner());
        match state.revision {
            Some(current) if current > revision => return Some(current),
            Some(current) if current == base && base < revision => {}
            _ => return None,
        }
        match account {
            Some(account) if account.name == name => state.upsert(account),
            Some(_) => return None,
            None => state.remove(name),
        }
        state.revision = Some(revision);
        Some(revision)
    }

    pub fn applied_revision(&self) -> Option<u64> {
        self.accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .revision
    }

    pub fn accounts(&self) -> Vec<NodeAccount> {
        let state = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        state.accounts.clone()
    }

    pub fn account(&self, name: &str) -> Option<NodeAccount> {
        let state = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        state.find(name).cloned()
    }

    fn may_stay(&self, user: &str, now: OffsetDateTime) -> bool {
        let state = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        state.find(user).is_some_and(|a| !a.is_expired_at(now))
    }

    /// Ends the sessions of accounts that are gone or expired at `now`.
    pub fn enforce(&self, now: OffsetDateTime) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for entry in conns.map.values() {
            if let Some(user) = &entry.user
                && !entry.ctl.is_killed()
                && !self.may_stay(user, now)
            {
                tracing::info!(target: TARGET, node = %self.key, user = %user, "ending session: account removed or expired");
                entry
                    .ctl
                    .terminate_because("account removed or expired".into());
            }
        }
    }

    // ---- connections ----------------------------------------------------------------------

    /// Registers a new connection from `source` as a startup (not logged in), unless the
    /// startup caps shed it: `per_source` startups from that source already, or the node's
    /// startups past `MaxStartups` (at `full`, or past `start` and drawn with the rising
    /// probability `rate`..100 %, as OpenSSH's sshd). Sessions (logged in) do not count.
    pub fn open_conn(
        self: &Arc<Self>,
        id: u64,
        ctl: Arc<ConnCtl>,
        source: IpAddr,
        limits: &Admission,
    ) -> Result<ConnSlot, Shed> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let from_source = conns.startups_by_source.get(&source).copied().unwrap_or(0);
        if limits.per_source.is_some_and(|cap| from_source >= cap) {
            return Err(Shed::PerSource);
        }
        if limits
            .max_startups
            .sheds(conns.startups, rand::random::<u32>() % 100)
        {
            return Err(Shed::MaxStartups);
        }
        limits.pool.admit(source)?;
        conns.startups += 1;
        *conns.startups_by_source.entry(source).or_insert(0) += 1;
        conns.map.insert(
            id,
            ConnEntry {
                user: None,
                ctl,
                source,
                startup: true,
                max_sessions: limits.max_sessions,
                pool: limits.pool.clone(),
            },
        );
        self.open_conns.fetch_add(1, Ordering::SeqCst);
        bluebatch_metrics::global()
            .ssh_connections_open
            .fetch_add(1, Ordering::Relaxed);
        Ok(ConnSlot {
            node: self.clone(),
            id,
        })
    }

    /// Counts a connection shed by the startup caps, logging at info the first one and then at
    /// most one summary line every 10 s (a flood is thousands of them), each at debug.
    pub fn log_shed(&self, source: IpAddr, why: Shed) {
        tracing::debug!(target: TARGET, node = %self.key, %source, reason = why.reason(), "ssh connection shed before the banner");
        let now = Instant::now();
        let mut shed = self.shed.lock().unwrap_or_else(|e| e.into_inner());
        shed.count += 1;
        if shed
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return;
        }
        let count = std::mem::take(&mut shed.count);
        shed.last = Some(now);
        drop(shed);
        let (startups, sessions) = self.conn_counts();
        tracing::info!(
            target: TARGET,
            node = %self.key,
            %source,
            reason = why.reason(),
            shed = count,
            startups,
            sessions,
            "ssh connections shed before the banner (login grace time and startup caps)"
        );
    }

    /// (startups, sessions) of the node right now.
    pub fn conn_counts(&self) -> (usize, usize) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        (conns.startups, conns.sessions)
    }

    /// Marks the connection as logged in as `user`, then checks the account again so that a
    /// concurrent removal cannot slip between the login check and this registration (`apply`
    /// updates the accounts before it scans the connections). The connection then stops being
    /// a startup and becomes one of the node's sessions, unless the node has its maximum of
    /// them: then the login is refused and the connection ended, the client told why.
    pub fn login(&self, id: u64, user: &str, now: OffsetDateTime) -> Result<(), LoginBlocked> {
        {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = conns.map.get_mut(&id) else {
                return Err(LoginBlocked::AccountGone);
            };
            entry.user = Some(user.to_string());
        }
        let stays = self.may_stay(user, now);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = conns.sessions;
        let Some(entry) = conns.map.get_mut(&id) else {
            return Err(LoginBlocked::AccountGone);
        };
        if !stays {
            entry.user = None;
            return Err(LoginBlocked::AccountGone);
        }
        if !entry.startup {
            return Ok(());
        }
        if sessions >= entry.max_sessions {
            entry.user = None;
            entry.ctl.terminate_because(format!(
                "too many sessions on this node (at most {})",
                entry.max_sessions
            ));
            return Err(LoginBlocked::SessionsFull);
        }
        entry.startup = false;
        let source = entry.source;
        entry.pool.release(source);
        conns.end_startup(source);
        conns.sessions += 1;
        bluebatch_metrics::global()
            .ssh_sessions_open
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn has_sessions(&self) -> bool {
        self.open_conns.load(Ordering::SeqCst) > 0
    }

    pub fn terminate_all(&self) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for entry in conns.map.values() {
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

    // ---- Batch state ----------------------------------------------------------------------

    /// Records the node's Batch state. Entering a state that takes no logins ends every
    /// connection of the node (the client is told why). Returns whether the state changed.
    pub fn set_state(&self, state: NodeState) -> bool {
        let before = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(state);
        if before == Some(state) {
            return false;
        }
        let was_open = before.is_none_or(accepts_logins);
        // A node's first boot (creating → starting → idle) is no news; later changes are.
        let first_boot = before.is_none_or(|b| {
            matches!(
                b,
                NodeState::Creating | NodeState::Starting | NodeState::WaitingForStartTask
            )
        });
        if accepts_logins(state) {
            if !was_open && !first_boot {
                tracing::info!(target: TARGET, node = %self.key, state = state.as_str(), "node takes logins again");
            }
            return true;
        }
        let reason = format!("node is {}", state.as_str());
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut ended = 0usize;
        for entry in conns.map.values() {
            if !entry.ctl.is_killed() {
                ended += 1;
                entry.ctl.terminate_because(reason.clone());
            }
        }
        drop(conns);
        if (was_open && before.is_some()) || ended > 0 {
            tracing::info!(target: TARGET, node = %self.key, state = state.as_str(), sessions_ended = ended, "node takes no logins in this state");
        }
        true
    }

    /// The node's state, if the service gave one.
    pub fn state(&self) -> Option<NodeState> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state that makes the node refuse logins right now, if any.
    pub fn login_refusal(&self) -> Option<NodeState> {
        self.state().filter(|s| !accepts_logins(*s))
    }

    // ---- failed logins --------------------------------------------------------------------

    /// Whether logins from `ip` are refused right now. A lockout found over is lifted (and
    /// logged) here if the sweep has not done it yet.
    pub fn refused(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let Some(until) = failures.get(&ip).and_then(|f| f.refused_until) else {
            return false;
        };
        if now < until {
            return true;
        }
        failures.remove(&ip);
        self.let_in(ip);
        false
    }

    fn let_in(&self, ip: IpAddr) {
        tracing::info!(target: TARGET, node = %self.key, source = %ip, "failed-login lockout over: source let in again");
    }

    /// Counts a failed login from `ip`; at `max` failures within `window`, refuses that source
    /// for `window` (`max == 0`: no limit, nothing is counted).
    pub fn record_failure(&self, ip: IpAddr, max: u32, window: Duration) {
        if max == 0 {
            return;
        }
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = failures.entry(ip).or_insert(FailureWindow {
            started: now,
            count: 0,
            refused_until: None,
        });
        let over = match entry.refused_until {
            Some(until) => now >= until,
            None => now.duration_since(entry.started) >= window,
        };
        if over {
            if entry.refused_until.is_some() {
                self.let_in(ip);
            }
            *entry = FailureWindow {
                started: now,
                count: 0,
                refused_until: None,
            };
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count >= max && entry.refused_until.is_none() {
            entry.refused_until = Some(now + window);
            self.locked_out.store(true, Ordering::SeqCst);
            tracing::info!(
                target: TARGET,
                node = %self.key,
                source = %ip,
                failures = entry.count,
                refused_for_secs = window.as_secs_f64(),
                "too many failed logins: refusing every login from this source"
            );
        }
    }

    /// Lifts the lockouts that are over (logging each) and forgets failures older than
    /// `window`.
    pub fn prune_failures(&self, window: Duration) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let mut still_locked = false;
        failures.retain(|ip, f| match f.refused_until {
            Some(until) if now >= until => {
                self.let_in(*ip);
                false
            }
            Some(_) => {
                still_locked = true;
                true
            }
            None => now.duration_since(f.started) < window,
        });
        self.locked_out.store(still_locked, Ordering::SeqCst);
    }

    /// Whether some source is (or was, until the next prune) refused.
    pub fn has_lockouts(&self) -> bool {
        self.locked_out.load(Ordering::SeqCst)
    }

    /// The sources refused right now, by address.
    pub fn lockouts(&self) -> Vec<Lockout> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Lockout> = failures
            .iter()
            .filter_map(|(ip, f)| {
                f.refused_until.filter(|u| now < *u).map(|until| Lockout {
                    source: *ip,
                    failures: f.count,
                    until,
                })
            })
            .collect();
        out.sort_by_key(|l| l.source);
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 9));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 10));

    #[test]
    fn lockout_after_max_failures_for_the_window_then_lifted() {
        let node = Node::new("n".into());
        let window = Duration::from_millis(300);
        node.record_failure(IP, 3, window);
        node.record_failure(IP, 3, window);
        assert!(!node.refused(IP) && node.lockouts().is_empty());
        node.record_failure(IP, 3, window);
        assert!(node.refused(IP), "locked out at the 3rd failure");
        assert!(!node.refused(OTHER), "per source");
        let l = node.lockouts();
        assert_eq!((l.len(), l[0].source, l[0].failures), (1, IP, 3));
        assert!(node.has_lockouts());
        std::thread::sleep(window + Duration::from_millis(50));
        node.prune_failures(window);
        assert!(!node.refused(IP) && node.lockouts().is_empty() && !node.has_lockouts());
    }

    #[test]
    fn failures_older_than_the_window_do_not_add_up() {
        let node = Node::new("n".into());
        let window = Duration::from_millis(200);
        node.record_failure(IP, 2, window);
        std::thread::sleep(window + Duration::from_millis(50));
        node.record_failure(IP, 2, window);
        assert!(
            !node.refused(IP),
            "the first failure fell out of the window"
        );
    }

    #[test]
    fn zero_means_no_lockout() {
        let node = Node::new("n".into());
        for _ in 0..100 {
            node.record_failure(IP, 0, Duration::from_secs(60));
        }
        assert!(!node.refused(IP) && node.lockouts().is_empty());
    }

    fn limits(start: usize, full: usize, per_source: Option<usize>, sessions: usize) -> Admission {
        Admission {
            max_startups: crate::MaxStartups {
                start,
                rate: 100,
                full,
            },
            per_source,
            max_sessions: sessions,
            pool: Arc::new(StartupPool::new(1000, None)),
        }
    }

    fn account(name: &str) -> NodeAccount {
        NodeAccount {
            name: name.into(),
            password_hash: None,
            ssh_public_key: None,
            is_admin: false,
            login_refused_from: OffsetDateTime::now_utc() + Duration::from_secs(3600),
        }
    }

    #[test]
    fn per_source_cap_sheds_one_source_and_not_another() {
        let node = Arc::new(Node::new("n".into()));
        let lim = limits(100, 100, Some(3), 10);
        let mut held = Vec::new();
        for id in 0..3 {
            held.push(node.open_conn(id, Arc::default(), IP, &lim).unwrap());
        }
        assert_eq!(
            node.open_conn(3, Arc::default(), IP, &lim).err(),
            Some(Shed::PerSource)
        );
        let other = node.open_conn(4, Arc::default(), OTHER, &lim).unwrap();
        assert_eq!(node.conn_counts(), (4, 0));
        held.pop();
        assert!(
            node.open_conn(5, Arc::default(), IP, &lim).is_ok(),
            "a slot freed"
        );
        drop(other);
        drop(held);
        assert_eq!(node.conn_counts(), (0, 0));
    }

    #[test]
    fn max_startups_caps_the_node_and_sessions_do_not_count() {
        let node = Arc::new(Node::new("n".into()));
        let now = OffsetDateTime::now_utc();
        node.apply(1, AccountChange::Upsert(account("u")), now);
        let lim = limits(2, 2, None, 2);
        let a = node.open_conn(1, Arc::default(), IP, &lim).unwrap();
        let _b = node.open_conn(2, Arc::default(), OTHER, &lim).unwrap();
        assert_eq!(
            node.open_conn(3, Arc::default(), IP, &lim).err(),
            Some(Shed::MaxStartups)
        );
        assert_eq!(node.login(1, "u", now), Ok(()));
        assert_eq!(
            node.conn_counts(),
            (1, 1),
            "a login turns a startup into a session"
        );
        let _c = node.open_conn(3, Arc::default(), IP, &lim).unwrap();
        drop(a);
        assert_eq!(node.conn_counts(), (2, 0));
    }

    #[test]
    fn a_login_past_the_session_bound_is_refused_and_its_connection_ended() {
        let node = Arc::new(Node::new("n".into()));
        let now = OffsetDateTime::now_utc();
        node.apply(1, AccountChange::Upsert(account("u")), now);
        let lim = limits(10, 10, None, 1);
        let _a = node.open_conn(1, Arc::default(), IP, &lim).unwrap();
        let ctl = Arc::new(ConnCtl::default());
        let _b = node.open_conn(2, ctl.clone(), IP, &lim).unwrap();
        assert_eq!(node.login(1, "u", now), Ok(()));
        assert_eq!(node.login(2, "u", now), Err(LoginBlocked::SessionsFull));
        assert!(ctl.is_killed());
        assert!(ctl.reason().unwrap().contains("too many sessions"));
        assert_eq!(node.conn_counts(), (1, 1));
        assert_eq!(node.login(3, "u", now), Err(LoginBlocked::AccountGone));
    }

    #[test]
    fn the_process_wide_pool_bounds_startups_across_nodes() {
        let pool = Arc::new(StartupPool::new(5, Some(3)));
        let mut lim = limits(100, 100, Some(10), 10);
        lim.pool = pool.clone();
        let (a, b) = (
            Arc::new(Node::new("a".into())),
            Arc::new(Node::new("b".into())),
        );
        let mut held = Vec::new();
        for id in 0..3 {
            held.push(a.open_conn(id, Arc::default(), IP, &lim).unwrap());
        }
        assert_eq!(
            b.open_conn(3, Arc::default(), IP, &lim).err(),
            Some(Shed::ServerPerSource),
            "one source's startups count on every node"
        );
        held.push(b.open_conn(4, Arc::default(), OTHER, &lim).unwrap());
        held.push(b.open_conn(5, Arc::default(), OTHER, &lim).unwrap());
        assert_eq!(
            b.open_conn(6, Arc::default(), OTHER, &lim).err(),
            Some(Shed::ServerTotal)
        );
        assert_eq!(pool.total(), 5);
        let now = OffsetDateTime::now_utc();
        b.apply(1, AccountChange::Upsert(account("u")), now);
        assert_eq!(b.login(4, "u", now), Ok(()));
        assert_eq!(pool.total(), 4, "a login leaves the pool");
        drop(held);
        assert_eq!(pool.total(), 0);
    }

    #[test]
    fn max_startups_random_early_drop_as_openssh() {
        let m: crate::MaxStartups = "10:30:100".parse().unwrap();
        assert!(!m.sheds(9, 0), "below start: never");
        assert!(m.sheds(10, 29) && !m.sheds(10, 30), "at start: rate %");
        assert!(m.sheds(55, 64) && !m.sheds(55, 65), "half way: 65 %");
        assert!(m.sheds(100, 99), "at full: always");
        let n: crate::MaxStartups = "7".parse().unwrap();
        assert_eq!((n.start, n.rate, n.full), (7, 100, 7));
        assert!(!n.sheds(6, 99) && n.sheds(7, 0));
        for bad in ["0", "10:30:5", "10:101:100", "10:30", "x", "1:2:3:4"] {
            assert!(bad.parse::<crate::MaxStartups>().is_err(), "{bad}");
        }
        assert_eq!(crate::MaxStartups::default().to_string(), "32:30:128");
    }

    #[test]
    fn states_that_take_logins() {
        let open: Vec<&str> = NodeState::ALL
            .iter()
            .filter(|s| accepts_logins(**s))
            .map(|s| s.as_str())
            .collect();
        assert_eq!(open, ["idle", "running", "starttaskfailed", "offline"]);
        let node = Node::new("n".into());
        assert_eq!(node.login_refusal(), None, "never told: takes logins");
        assert!(node.set_state(NodeState::Rebooting));
        assert_eq!(node.login_refusal(), Some(NodeState::Rebooting));
        assert!(!node.set_state(NodeState::Rebooting), "no change");
        node.set_state(NodeState::Offline);
        assert_eq!(node.login_refusal(), None);
    }
}
