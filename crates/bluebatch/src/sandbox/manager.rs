//! The sandboxed nodes' manager of `bluebatch serve --nodes sandbox`: it makes the service's
//! sandbox pools' capacity out of machines ([`super::Machine`]) on this host.
//!
//! A sandbox pool short of nodes shows *demand* ([`Service::sandbox_demand`]); the manager starts
//! a machine for each missing node (at most [`MAX_STARTING`] starting at once; a machine started
//! and not joined yet counts against its pool's demand). Each machine gets:
//!
//! - a veth pair ([`Net::allocate`]) and, on this host's side of it, a listener serving **only
//!   the node protocol's paths** (`WireConfig::agent_paths_only`): the node's agent reaches the
//!   service there, while the Batch API never leaves loopback;
//! - a join token scoped to the pool (10 minutes), written by the machine into the node's
//!   `var/lib/bluebatch-agent/join-token` (0600): never on a command line, never in an
//!   environment. Once the host joined, the file is removed and the (used) token revoked.
//!
//! Its agent joins, and the pool takes the host at once. A machine whose host backs no node any
//! more and that no pool would take ([`Service::idle_sandbox_hosts`]: the pool was shrunk or
//! deleted, the node removed) is stopped, its host revoked and its files removed. A machine
//! whose agent has not joined within [`JOIN_WITHIN`] is torn down the same way, the tails of its
//! logs logged. A machine whose processes all ended (its init killed) is started again.
//!
//! At start, every machine directory of a previous run whose host the service still knows is
//! started again (its agent says hello with its stored identity; its node comes back); the other
//! directories are removed, and sandbox hosts the service knows with no directory are revoked.
//! A machine of a previous run that fails to start three times is given up: its host revoked
//! (its node leaves the pool, which gets a new one) and its files removed. At shutdown every
//! machine is stopped; the directories stay for the next start.

use super::{AgentLaunch, Machine, MachineInfo, MachineSpec, Net, remove_files};
use bluebatch_protocol::ProviderKind;
use bluebatch_service::{SandboxDemand, Service};
use bluebatch_wire::{App, WireConfig};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

/// Machines starting at once, at most.
pub const MAX_STARTING: usize = 4;
/// How long a started machine's agent may take to join before the machine is torn down.
pub const JOIN_WITHIN: Duration = Duration::from_secs(60);
/// How long a machine's join token lives.
const TOKEN_TTL: Duration = Duration::from_secs(600);
/// The manager's fallback poll (it wakes at once on every change of the service).
const POLL: Duration = Duration::from_millis(500);
/// How long serve waits at start for the machines of its previous run before it answers.
const RESUME_WITHIN: Duration = Duration::from_secs(30);
/// How often the manager checks that every machine still has processes.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// Why a machine is torn down that did not join in time (followed by the time).
const LATE: &str = "its agent did not join within";
/// Lines of each log of a machine logged when it is torn down unjoined.
const LOG_TAIL_LINES: usize = 20;

/// What the manager needs to start machines.
#[derive(Debug, Clone)]
pub struct Options {
    /// `DATA/sandbox`: one directory per machine.
    pub dir: PathBuf,
    /// The bluebatch binary (the machine's init and agent).
    pub exe: PathBuf,
    /// The sshd of every node.
    pub sshd: PathBuf,
    /// `UsePAM` of every node's sshd.
    pub use_pam: bool,
    /// How long a started machine's agent may take to join ([`JOIN_WITHIN`]).
    pub join_within: Duration,
}

/// The running manager; [`Manager::shutdown`] stops every machine.
pub struct Manager {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Manager {
    /// Starts the manager for `app`'s service: resumes the machines of a previous run, then
    /// follows the service's demand.
    pub async fn start(app: Arc<App>, opts: Options) -> Result<Manager, String> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| format!("{}: {e}", opts.dir.display()))?;
        let agent_app = Arc::new(App {
            service: app.service.clone(),
            config: WireConfig {
                agent_paths_only: true,
                ca_fingerprint: None,
                ..app.config.clone()
            },
        });
        let accounts = app.config.accounts.names();
        let mut lp = Loop {
            app: agent_app,
            opts,
            running: HashMap::new(),
            starting: JoinSet::new(),
            starting_for: HashMap::new(),
            queue: VecDeque::new(),
            teardowns: JoinSet::new(),
            leaving: HashSet::new(),
            next_start: Instant::now(),
            failures: 0,
            last_alive_check: Instant::now(),
        };
        lp.resume(&accounts).await;
        let mut seq = 0u64;
        lp.start_resumed(&mut seq).await;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(lp.run(stopped, seq));
        Ok(Manager { stop, task })
    }

    /// Stops every machine (their directories stay) and waits for it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the sandbox manager ended abnormally");
        }
    }
}

/// A machine that runs.
struct Running {
    machine: Option<Machine>,
    name: String,
    dir: PathBuf,
    account: String,
    pool_id: String,
    /// The join token's id (revoked once joined or torn down); `None` for a resumed machine.
    token: Option<String>,
    /// The host id, once the agent joined.
    host: Option<String>,
    /// Whether its host backed a node (until then it counts against its pool's demand: the
    /// service shows a host before its pool takes it).
    assigned: bool,
    since: Instant,
    /// Dropped: the machine's agents-only listener stops.
    _listener: oneshot::Sender<()>,
}

/// A machine to start: new for a pool, or the directory of a previous run.
#[derive(Debug, Clone)]
enum Start {
    New {
        account: String,
        pool_id: String,
    },
    Resume {
        name: String,
        dir: PathBuf,
        account: String,
        host: String,
        index: Option<u32>,
        /// Failed starts so far.
        attempt: u32,
    },
}

/// Starts of a machine of a previous run tried before it is given up (its host revoked, its
/// files removed: its pool gets a new node).
const RESUME_ATTEMPTS: u32 = 3;

/// What a start task answers: its sequence number, the resume it was (to try again), and the
/// machine or why not.
type Started = (u64, Option<Start>, Result<Running, String>);

struct Loop {
    app: Arc<App>,
    opts: Options,
    running: HashMap<String, Running>,
    starting: JoinSet<Started>,
    /// (account, lower-cased pool id) of every start under way, by its sequence number.
    starting_for: HashMap<u64, (String, String)>,
    /// Resumed machines waiting for a start slot.
    queue: VecDeque<Start>,
    /// Tear-downs under way, each answering the host it revokes.
    teardowns: JoinSet<Option<String>>,
    /// Hosts whose machines are being torn down (not "without a machine").
    leaving: HashSet<String>,
    /// No new machine before this (backoff after failed starts).
    next_start: Instant,
    failures: u32,
    last_alive_check: Instant,
}

/// Revokes a machine's host; one already gone (its pool deleted it with its nodes) is no news.
async fn revoke(svc: &Service, account: &str, host: &str) {
    match svc.revoke_host(account, host).await {
        Ok(()) => {}
        Err(e) if e.code == bluebatch_core::error::Code::ResourceNotFound => {
            tracing::debug!(host = %host, "the sandbox host is already gone");
        }
        Err(e) => tracing::warn!(host = %host, error = %e, "revoking the sandbox host"),
    }
}

fn service(app: &App) -> &Service {
    &app.service
}

fn pool_key(account: &str, pool: &str) -> (String, String) {
    (account.to_string(), pool.to_ascii_lowercase())
}

impl Loop {
    /// The directories of a previous run: started again when the service knows their host,
    /// removed otherwise; sandbox hosts with no directory are revoked.
    async fn resume(&mut self, accounts: &[String]) {
        let svc = service(&self.app).clone();
        let mut known: HashMap<String, String> = HashMap::new(); // host id → account
        for a in accounts {
            for h in svc.list_hosts(a) {
                if h.provider == ProviderKind::Sandbox {
                    known.insert(h.id, h.account);
                }
            }
        }
        let mut kept: HashSet<String> = HashSet::new();
        let entries = match std::fs::read_dir(&self.opts.dir) {
            Ok(e) => e.filter_map(Result::ok).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(dir = %self.opts.dir.display(), error = %e, "sandbox directory");
                Vec::new()
            }
        };
        for e in entries {
            let dir = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            match identity_of(&dir) {
                Some((account, host)) if known.get(&host) == Some(&account) => {
                    kept.insert(host.clone());
                    tracing::info!(node = %name, host = %host, "sandboxed node of the last run: starting it again");
                    self.queue.push_back(Start::Resume {
                        index: index_of(&dir),
                        name,
                        dir,
                        account,
                        host,
                        attempt: 0,
                    });
                }
                _ => {
                    tracing::info!(node = %name, "sandboxed node of the last run whose host the service does not know: removing its files");
                    remove_dir_logged(&dir).await;
                }
            }
        }
        for (host, account) in known {
            if !kept.contains(&host) {
                tracing::info!(host = %host, account = %account,
                    "a sandbox host without its machine's files: revoking it");
                if let Err(e) = svc.revoke_host(&account, &host).await {
                    tracing::warn!(host = %host, error = %e, "revoking the sandbox host");
                }
            }
        }
    }

    /// Starts the machines of the previous run before the API answers (at most
    /// [`RESUME_WITHIN`]): until their veths are back, their nodes would be listed `idle` at
    /// addresses nothing on this host routes. A failed start is left to [`Loop::run`]'s retries.
    async fn start_resumed(&mut self, seq: &mut u64) {
        let deadline = tokio::time::Instant::now() + RESUME_WITHIN;
        loop {
            while Instant::now() >= self.next_start
                && self.starting.len() < MAX_STARTING
                && let Some(s) = self.queue.pop_front()
            {
                self.spawn_start(seq, s);
            }
            if self.starting.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, self.starting.join_next()).await {
                Ok(Some(done)) => self.started(done),
                Ok(None) | Err(_) => break,
            }
        }
    }

    async fn run(mut self, mut stopped: watch::Receiver<bool>, mut seq: u64) {
        let mut changed = service(&self.app).capacity_changed();
        let mut watching = true;
        loop {
            if *stopped.borrow() {
                break;
            }
            self.tick(&mut seq).await;
            tokio::select! {
                _ = stopped.changed() => {}
                r = changed.changed(), if watching => watching = r.is_ok(),
                Some(done) = self.starting.join_next(), if !self.starting.is_empty() => {
                    self.started(done);
                }
                Some(done) = self.teardowns.join_next(), if !self.teardowns.is_empty() => {
                    if let Ok(Some(host)) = done {
                        self.leaving.remove(&host);
                    }
                }
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        self.stop_all().await;
    }

    /// One round: collect finished starts, notice joins, tear down what is idle or late, start
    /// what is missing.
    async fn tick(&mut self, seq: &mut u64) {
        while let Some(done) = self.starting.try_join_next() {
            self.started(done);
        }
        let svc = service(&self.app).clone();
        // Demand first, joins second: a host taken by its pool in between is then counted as
        // missing and as joined, so no unjoined machine is taken for surplus by mistake.
        let demand = svc.sandbox_demand();
        self.notice_joins(&svc).await;
        // Hosts revoked by someone else (`bluebatch host revoke`): their machines go.
        let mut known: HashMap<String, HashSet<String>> = HashMap::new();
        let revoked: Vec<String> = self
            .running
            .values()
            .filter(|r| {
                r.host.as_ref().is_some_and(|h| {
                    !known
                        .entry(r.account.clone())
                        .or_insert_with(|| {
                            svc.list_hosts(&r.account)
                                .into_iter()
                                .map(|h| h.id)
                                .collect()
                        })
                        .contains(h)
                })
            })
            .map(|r| r.name.clone())
            .collect();
        for name in revoked {
            if let Some(mut r) = self.running.remove(&name) {
                r.host = None;
                self.teardown(r, "its host was revoked");
            }
        }
        // Idle hosts: their machines go.
        let idle = svc.idle_sandbox_hosts();
        for (account, host) in idle {
            let name = self
                .running
                .iter()
                .find(|(_, r)| r.host.as_deref() == Some(host.as_str()) && r.account == account)
                .map(|(n, _)| n.clone());
            match name {
                Some(n) => {
                    let r = self.running.remove(&n).expect("listed");
                    self.teardown(r, "its host backs no node any more");
                }
                // Not a machine of this server (its files were removed): nothing to stop.
                None if self.queue.is_empty()
                    && self.starting.is_empty()
                    && !self.leaving.contains(&host)
                    && !self.is_unjoined_machine_host(&svc, &account, &host) =>
                {
                    tracing::info!(host = %host, "an idle sandbox host without a machine: revoking it");
                    if let Err(e) = svc.revoke_host(&account, &host).await {
                        tracing::warn!(host = %host, error = %e, "revoking the sandbox host");
                    }
                }
                None => {}
            }
        }
        // Unjoined machines: late ones go, and those their pool no longer needs.
        let missing: HashMap<PoolKey, u32> = demand
            .iter()
            .map(|d| (pool_key(&d.account, &d.pool_id), d.missing))
            .collect();
        let starting: Vec<PoolKey> = self.starting_for.values().cloned().collect();
        let going = unjoined_to_remove(&missing, &starting, &self.seen(), self.opts.join_within);
        if !going.is_empty() {
            tracing::debug!(?demand, starting = ?self.starting_for, ?going,
                unjoined = ?self.running.values().filter(|r| r.host.is_none()).map(|r| &r.name).collect::<Vec<_>>(),
                "unjoined machines to remove");
        }
        for (name, why) in going {
            // Joined meanwhile? Then it is not unjoined (the next round sees it).
            if self
                .running
                .get(&name)
                .is_some_and(|r| joined_host(&svc, r).is_some())
            {
                continue;
            }
            if let Some(r) = self.running.remove(&name) {
                if why.starts_with(LATE) {
                    log_tails(&r.name, &r.dir);
                }
                self.teardown(r, &why);
            }
        }
        self.check_alive().await;
        // Resumed machines first, then the pools' demand (both after a failed start's pause).
        while Instant::now() >= self.next_start
            && self.starting.len() < MAX_STARTING
            && let Some(s) = self.queue.pop_front()
        {
            self.spawn_start(seq, s);
        }
        if Instant::now() < self.next_start {
            return;
        }
        // Read again, after the joins were noticed: a host whose pool took it since shows in
        // neither, instead of in the joins only (which would start one machine too many).
        let demand = svc.sandbox_demand();
        let starting: Vec<PoolKey> = self.starting_for.values().cloned().collect();
        let room = MAX_STARTING.saturating_sub(self.starting.len());
        for (account, pool_id) in to_start(&demand, &starting, &self.seen(), room) {
            self.spawn_start(seq, Start::New { account, pool_id });
        }
    }

    /// The running machines, as [`unjoined_to_remove`] and [`to_start`] see them.
    fn seen(&self) -> Vec<Seen> {
        self.running
            .values()
            .map(|r| Seen {
                name: r.name.clone(),
                pool: pool_key(&r.account, &r.pool_id),
                age: r.since.elapsed(),
                joined: r.host.is_some(),
                assigned: r.assigned,
            })
            .collect()
    }

    /// Whether `host` might be the host of a machine that has not been seen joining yet.
    fn is_unjoined_machine_host(&self, svc: &Service, account: &str, host: &str) -> bool {
        let names: HashSet<&str> = self
            .running
            .values()
            .filter(|r| r.host.is_none())
            .map(|r| r.name.as_str())
            .collect();
        svc.list_hosts(account)
            .iter()
            .any(|h| h.id == host && names.contains(h.hostname.as_str()))
    }

    /// Records the hosts of machines whose agent joined: the join-token file goes, the token is
    /// revoked.
    async fn notice_joins(&mut self, svc: &Service) {
        let waiting: Vec<String> = self
            .running
            .values()
            .filter(|r| !r.assigned)
            .map(|r| r.name.clone())
            .collect();
        for name in waiting {
            let Some(r) = self.running.get_mut(&name) else {
                continue;
            };
            let Some((host, backs)) = joined_host(svc, r) else {
                continue;
            };
            r.assigned = backs;
            if r.host.is_some() {
                continue;
            }
            tracing::info!(node = %r.name, host = %host, pool = %r.pool_id,
                joined_in_ms = r.since.elapsed().as_millis() as u64, "sandboxed node joined");
            r.host = Some(host);
            if let Some(Err(e)) = r.machine.as_ref().map(Machine::remove_join_token) {
                tracing::warn!(node = %r.name, error = %e, "removing the join token file");
            }
            if let Some(token) = r.token.take() {
                let _ = svc.revoke_join_token(&r.account, &token).await;
            }
        }
    }

    /// Machines whose processes all ended are started again (checked every 5 s).
    async fn check_alive(&mut self) {
        if self.last_alive_check.elapsed() < ALIVE_EVERY {
            return;
        }
        self.last_alive_check = Instant::now();
        let dead: Vec<String> = self
            .running
            .iter_mut()
            .filter_map(|(n, r)| {
                r.machine
                    .as_mut()
                    .is_some_and(|m| !m.is_running())
                    .then(|| n.clone())
            })
            .collect();
        for name in dead {
            let Some(mut r) = self.running.remove(&name) else {
                continue;
            };
            log_tails(&r.name, &r.dir);
            let Some(host) = r.host.clone() else {
                self.teardown(r, "every process of it ended before its agent joined");
                continue;
            };
            tracing::warn!(node = %r.name, "every process of the sandboxed node ended: starting it again");
            // Stopped first (what is left of it goes), so that it gets its addresses back.
            if let Some(m) = r.machine.take() {
                stop_machine(&name, m).await;
            }
            self.queue.push_back(Start::Resume {
                index: index_of(&r.dir),
                name: r.name.clone(),
                dir: r.dir.clone(),
                account: r.account.clone(),
                host,
                attempt: 0,
            });
        }
    }

    fn spawn_start(&mut self, seq: &mut u64, s: Start) {
        *seq += 1;
        let id = *seq;
        if let Start::New { account, pool_id } = &s {
            self.starting_for.insert(id, pool_key(account, pool_id));
        }
        let (app, opts) = (self.app.clone(), self.opts.clone());
        let resume = matches!(s, Start::Resume { .. }).then(|| s.clone());
        self.starting
            .spawn(async move { (id, resume, start_machine(app, opts, s).await) });
    }

    fn started(&mut self, done: Result<Started, tokio::task::JoinError>) {
        let (id, resume, result) = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "starting a sandboxed node panicked");
                self.back_off();
                return;
            }
        };
        self.starting_for.remove(&id);
        match result {
            Ok(r) => {
                self.failures = 0;
                self.running.insert(r.name.clone(), r);
            }
            Err(e) => {
                tracing::error!(error = %e, "a sandboxed node did not start");
                self.back_off();
                match resume {
                    Some(Start::Resume {
                        name,
                        dir,
                        account,
                        host,
                        index,
                        attempt,
                    }) if attempt + 1 < RESUME_ATTEMPTS => self.queue.push_back(Start::Resume {
                        name,
                        dir,
                        account,
                        host,
                        index,
                        attempt: attempt + 1,
                    }),
                    Some(Start::Resume {
                        name,
                        dir,
                        account,
                        host,
                        ..
                    }) => {
                        tracing::error!(node = %name, host = %host,
                            "giving the sandboxed node up: its host is revoked and its files removed (its pool gets a new node)");
                        let svc = service(&self.app).clone();
                        self.leaving.insert(host.clone());
                        self.teardowns.spawn(async move {
                            revoke(&svc, &account, &host).await;
                            remove_dir_logged(&dir).await;
                            Some(host)
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    fn back_off(&mut self) {
        self.failures += 1;
        let secs = (1u64 << self.failures.min(5)).min(30);
        self.next_start = Instant::now() + Duration::from_secs(secs);
    }

    /// Stops the machine in the background: revokes its host (when it joined) or its unused
    /// token, and removes its files.
    fn teardown(&mut self, mut r: Running, why: &str) {
        tracing::info!(node = %r.name, host = ?r.host, pool = %r.pool_id, "removing the sandboxed node: {why}");
        let svc = service(&self.app).clone();
        let machine = r.machine.take();
        if let Some(host) = &r.host {
            self.leaving.insert(host.clone());
        }
        self.teardowns.spawn(async move {
            if let Some(m) = machine {
                stop_machine(&r.name, m).await;
            }
            if let Some(host) = &r.host {
                revoke(&svc, &r.account, host).await;
            }
            if let Some(token) = &r.token {
                let _ = svc.revoke_join_token(&r.account, token).await;
            }
            remove_dir_logged(&r.dir).await;
            r.host.clone()
        });
    }

    /// Shutdown: every machine stops (starts under way finish first); the directories stay.
    async fn stop_all(&mut self) {
        while let Some(done) = self.starting.join_next().await {
            self.started(done);
        }
        let n = self.running.len();
        for (name, mut r) in self.running.drain() {
            if let Some(m) = r.machine.take() {
                self.teardowns.spawn(async move {
                    stop_machine(&name, m).await;
                    drop(r);
                    None
                });
            }
        }
        while self.teardowns.join_next().await.is_some() {}
        tracing::info!(machines = n, "every sandboxed node stopped");
    }
}

/// (account, lower-cased pool id).
type PoolKey = (String, String);

/// A running machine, as the plan of a round sees it.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    pool: PoolKey,
    /// Since it started.
    age: Duration,
    /// Its agent joined (the service knows its host).
    joined: bool,
    /// Its host backed a node.
    assigned: bool,
}

/// The unjoined machines to tear down, with why: those not joined within `join_within`, and
/// the newest of those beyond what their pool still lacks (`missing`, less the starts under way
/// and the joined machines the pool has not taken yet).
fn unjoined_to_remove(
    missing: &HashMap<PoolKey, u32>,
    starting: &[PoolKey],
    machines: &[Seen],
    join_within: Duration,
) -> Vec<(String, String)> {
    let mut wanted = missing.clone();
    let joined_unassigned = machines
        .iter()
        .filter(|m| m.joined && !m.assigned)
        .map(|m| &m.pool);
    for k in starting.iter().chain(joined_unassigned) {
        if let Some(w) = wanted.get_mut(k) {
            *w = w.saturating_sub(1);
        }
    }
    let mut unjoined: Vec<&Seen> = machines.iter().filter(|m| !m.joined).collect();
    // Oldest first: they are the nearest to joining.
    unjoined.sort_by_key(|m| std::cmp::Reverse(m.age));
    let mut going = Vec::new();
    for m in unjoined {
        if m.age > join_within {
            let why = format!("{LATE} {} s", join_within.as_secs_f64());
            going.push((m.name.clone(), why));
            continue;
        }
        match wanted.get_mut(&m.pool) {
            Some(w) if *w > 0 => *w -= 1,
            _ => going.push((m.name.clone(), "its pool needs no more nodes".into())),
        }
    }
    going
}

/// The machines to start, (account, pool id) each, at most `room`: what each pool lacks less
/// its starts under way and its machines not taken yet, round-robin over the pools so that a
/// large pool does not hold up the others.
fn to_start(
    demand: &[SandboxDemand],
    starting: &[PoolKey],
    machines: &[Seen],
    room: usize,
) -> Vec<(String, String)> {
    let mut wanted: Vec<(&SandboxDemand, u32)> = demand
        .iter()
        .map(|d| {
            let k = pool_key(&d.account, &d.pool_id);
            let pending = starting.iter().filter(|p| **p == k).count()
                + machines
                    .iter()
                    .filter(|m| !m.assigned && m.pool == k)
                    .count();
            (d, d.missing.saturating_sub(pending as u32))
        })
        .collect();
    let mut out = Vec::new();
    while out.len() < room {
        let mut any = false;
        for (d, w) in wanted.iter_mut() {
            if *w == 0 || out.len() >= room {
                continue;
            }
            *w -= 1;
            any = true;
            out.push((d.account.clone(), d.pool_id.clone()));
        }
        if !any {
            break;
        }
    }
    out
}

/// Starts one machine: its veth pair, its agents-only listener, its join token, the machine.
async fn start_machine(app: Arc<App>, opts: Options, s: Start) -> Result<Running, String> {
    let started = Instant::now();
    let index = match &s {
        Start::Resume { index, .. } => *index,
        Start::New { .. } => None,
    };
    let net = blocking(move || match index {
        Some(i) => Net::allocate_index(i).or_else(|e| {
            tracing::info!(error = %e, "the node's former addresses are taken: new ones");
            Net::allocate()
        }),
        None => Net::allocate(),
    })
    .await??;
    let (host_ip, node_ip) = (net.host_ip, net.node_ip);
    let listener = tokio::net::TcpListener::bind((host_ip, 0))
        .await
        .map_err(|e| format!("listening on {host_ip}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let server = format!("http://{host_ip}:{port}");
    let (stop_listener, listener_stopped) = oneshot::channel::<()>();
    let (serving, shown) = (app.clone(), server.clone());
    tokio::spawn(async move {
        let stopped = async move {
            let _ = listener_stopped.await;
        };
        if let Err(e) = bluebatch_wire::serve(listener, serving, stopped).await {
            tracing::warn!(server = %shown, error = %e, "a sandboxed node's agent listener ended");
        }
    });
    let svc = service(&app).clone();
    let (name, dir, account, pool_id, token, join_token, host) = match s {
        Start::New { account, pool_id } => {
            let name = format!("n{}-{:08x}", net.index, rand::random::<u32>());
            let dir = opts.dir.join(&name);
            let created = svc
                .create_join_token(&account, Some(&pool_id), TOKEN_TTL)
                .await
                .map_err(|e| format!("a join token for pool {pool_id}: {e}"))?;
            (
                name,
                dir,
                account,
                pool_id,
                Some(created.id),
                Some(created.token),
                None,
            )
        }
        Start::Resume {
            name,
            dir,
            account,
            host,
            ..
        } => {
            let pool = svc
                .list_hosts(&account)
                .into_iter()
                .find(|h| h.id == host)
                .and_then(|h| h.nodes.first().map(|(p, _)| p.clone()))
                .unwrap_or_default();
            (name, dir, account, pool, None, None, Some(host))
        }
    };
    let spec = MachineSpec {
        dir: dir.clone(),
        name: name.clone(),
        exe: opts.exe.clone(),
        sshd: opts.sshd.clone(),
        use_pam: opts.use_pam,
        agent: Some(AgentLaunch { server, join_token }),
    };
    let new = host.is_none();
    match blocking(move || Machine::start(spec, net)).await? {
        Ok(machine) => {
            tracing::info!(node = %name, ip = %node_ip, pool = %pool_id, resumed = !new,
                started_in_ms = started.elapsed().as_millis() as u64, "sandboxed node started");
            Ok(Running {
                machine: Some(machine),
                name,
                dir,
                account,
                pool_id,
                token,
                assigned: host.is_some(),
                host,
                since: Instant::now(),
                _listener: stop_listener,
            })
        }
        Err(e) => {
            if let Some(t) = &token {
                let _ = svc.revoke_join_token(&account, t).await;
            }
            if new {
                remove_dir_logged(&dir).await;
            }
            Err(format!("sandboxed node {name}: {e}"))
        }
    }
}

/// The id of the host a machine's agent joined as, if the service knows it: by the node's
/// host name, or by the identity the agent saved.
/// With whether that host backs a node now.
fn joined_host(svc: &Service, r: &Running) -> Option<(String, bool)> {
    let hosts = svc.list_hosts(&r.account);
    let mine = r.machine.as_ref().and_then(Machine::host_id);
    hosts
        .into_iter()
        .filter(|h| h.provider == ProviderKind::Sandbox)
        .find(|h| h.hostname == r.name || mine.as_deref() == Some(h.id.as_str()))
        .map(|h| (h.id, !h.nodes.is_empty()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a sandbox operation panicked: {e}"))
}

async fn stop_machine(name: &str, m: Machine) {
    match blocking(move || m.stop()).await {
        Ok(Ok(())) => tracing::info!(node = %name, "sandboxed node stopped"),
        Ok(Err(e)) => {
            tracing::error!(node = %name, error = %e, "stopping the sandboxed node left something behind")
        }
        Err(e) => tracing::error!(node = %name, error = %e, "stopping the sandboxed node"),
    }
}

async fn remove_dir_logged(dir: &Path) {
    let d = dir.to_path_buf();
    match blocking(move || remove_files(&d)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a sandboxed node's files")
        }
    }
}

/// (account, host id) of the agent identity a machine directory holds.
fn identity_of(dir: &Path) -> Option<(String, String)> {
    let path = dir.join("var/lib/bluebatch-agent/identity.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((
        v.get("account")?.as_str()?.to_string(),
        v.get("hostId")?.as_str()?.to_string(),
    ))
}

/// The network index a machine directory recorded (`machine.json`).
fn index_of(dir: &Path) -> Option<u32> {
    MachineInfo::read(dir).map(|i| i.index)
}

/// The last lines of a machine's logs (init's, sshd's, the agent's), logged.
fn log_tails(name: &str, dir: &Path) {
    for (f, tail) in tails(dir) {
        tracing::warn!(node = %name, log = %f.display(), "the end of the node's log:\n{tail}");
    }
}

/// The last [`LOG_TAIL_LINES`] lines (of its last 64 KiB) of each `*.log` of a machine's
/// `log/` and `var/log/`, the non-empty ones, by path.
fn tails(dir: &Path) -> Vec<(PathBuf, String)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut files: Vec<PathBuf> = Vec::new();
    for sub in ["log", "var/log"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            files.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log")),
            );
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let Ok(mut file) = std::fs::File::open(&f) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut bytes = Vec::new();
        if file
            .seek(SeekFrom::Start(len.saturating_sub(64 << 10)))
            .is_err()
            || file.read_to_end(&mut bytes).is_err()
        {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        if !tail.trim().is_empty() {
            out.push((f, tail));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pool: &str) -> PoolKey {
        pool_key("acct", pool)
    }

    fn seen(name: &str, pool: &str, secs: u64, joined: bool, assigned: bool) -> Seen {
        Seen {
            name: name.into(),
            pool: key(pool),
            age: Duration::from_secs(secs),
            joined,
            assigned,
        }
    }

    fn demand(pool: &str, missing: u32) -> SandboxDemand {
        SandboxDemand {
            account: "acct".into(),
            pool_id: pool.into(),
            missing,
        }
    }

    #[test]
    fn unjoined_machines_beyond_their_pools_needs_go_newest_first_and_late_ones_always() {
        let missing: HashMap<PoolKey, u32> = [(key("a"), 2)].into();
        let machines = [
            seen("old", "a", 5, false, false),
            seen("new", "a", 1, false, false),
            seen("newer", "a", 0, false, false),
            seen("late", "a", 61, false, false),
            seen("gone-pool", "b", 1, false, false),
            seen("joined", "a", 3, true, true),
        ];
        let mut going = unjoined_to_remove(&missing, &[], &machines, JOIN_WITHIN);
        going.sort();
        let going: Vec<(&str, &str)> = going
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            going,
            [
                ("gone-pool", "its pool needs no more nodes"),
                ("late", "its agent did not join within 60 s"),
                ("newer", "its pool needs no more nodes"),
            ]
        );
        // A start under way and a joined machine the pool has not taken yet count against it.
        let machines = [
            seen("old", "a", 5, false, false),
            seen("taken-soon", "a", 3, true, false),
        ];
        let going = unjoined_to_remove(&missing, &[key("A")], &machines, JOIN_WITHIN);
        assert_eq!(
            going,
            [(
                "old".to_string(),
                "its pool needs no more nodes".to_string()
            )]
        );
    }

    #[test]
    fn starts_are_what_pools_lack_less_what_is_pending_round_robin_within_the_room() {
        let d = [demand("a", 5), demand("B", 2), demand("c", 1)];
        // Pool a: one start under way, one machine not taken yet; pool c: its machine taken.
        let machines = [
            seen("x", "a", 1, true, false),
            seen("y", "c", 1, true, true),
        ];
        let starts = to_start(&d, &[key("a")], &machines, 4);
        let pools: Vec<&str> = starts.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(
            pools,
            ["a", "B", "c", "a"],
            "round-robin, pool ids as given"
        );
        assert_eq!(to_start(&d, &[key("a")], &machines, 10).len(), 3 + 2 + 1);
        assert!(to_start(&d, &[], &[], 0).is_empty());
        assert!(to_start(&[demand("a", 1)], &[key("a")], &[], 4).is_empty());
    }

    #[test]
    fn the_tails_of_a_machines_logs_are_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        std::fs::create_dir_all(dir.path().join("var/log")).unwrap();
        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(dir.path().join("var/log/agent.log"), &long).unwrap();
        std::fs::write(dir.path().join("var/log/sshd.log"), "").unwrap();
        std::fs::write(dir.path().join("log/init.log"), "init: up\n").unwrap();
        std::fs::write(dir.path().join("var/log/other.txt"), "not a log\n").unwrap();
        let t = tails(dir.path());
        let names: Vec<String> = t
            .iter()
            .map(|(p, _)| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["log/init.log", "var/log/agent.log"]);
        assert_eq!(t[0].1, "init: up");
        let agent: Vec<&str> = t[1].1.lines().collect();
        assert_eq!(agent.len(), LOG_TAIL_LINES);
        assert_eq!(
            (agent[0], agent[LOG_TAIL_LINES - 1]),
            ("line 80", "line 99")
        );
        assert!(tails(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn identity_and_index_are_read_back_from_a_machine_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(identity_of(dir.path()), None);
        assert_eq!(index_of(dir.path()), None);
        let state = dir.path().join("var/lib/bluebatch-agent");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            state.join("identity.json"),
            r#"{"hostId":"h1","credential":"x","credentialExpires":"2030-01-01T00:00:00Z","account":"acct","provider":"sandbox","slots":1}"#,
        )
        .unwrap();
        assert_eq!(identity_of(dir.path()), Some(("acct".into(), "h1".into())));
        std::fs::write(
            dir.path().join("machine.json"),
            r#"{"name":"n7-1","index":7,"hostIp":"198.19.0.29","nodeIp":"198.19.0.30"}"#,
        )
        .unwrap();
        assert_eq!(index_of(dir.path()), Some(7));
    }
}

#[cfg(test)]
mod machines {
    //! The manager with real machines and a real service (root only): a pool's machines follow
    //! its resizes, a machine whose init was killed comes back, a restart of the manager resumes
    //! the machines with their hosts, and Delete Pool leaves nothing.
    use super::*;
    use bluebatch_core::ServiceClock;
    use bluebatch_node::{SshConfig, SshNodes};
    use bluebatch_service::{Config, HostView, NodeSource};
    use bluebatch_wire::DEV_ACCOUNT;

    /// Everything the test does, at most.
    const TEST_DEADLINE: Duration = Duration::from_secs(240);
    /// Any one awaited change.
    const WAIT: Duration = Duration::from_secs(60);

    use crate::sandbox::machine::tests::{exe, root};

    async fn app(data: &Path) -> Arc<App> {
        let clock = Arc::new(ServiceClock::new());
        let ssh = SshNodes::new(
            SshConfig {
                data_dir: data.join("nodes"),
                ..SshConfig::default()
            },
            clock.clone(),
        );
        let config = Config {
            node_step: Duration::from_millis(20),
            default_nodes: NodeSource::Sandbox,
            sandbox_nodes: true,
            ..Config::default()
        };
        let backend = bluebatch_store::SqliteBackend::in_memory().unwrap();
        let service = Service::start(
            backend,
            clock,
            Arc::new(crate::fabric::SshFabric(ssh)),
            config,
        )
        .await
        .unwrap();
        Arc::new(App {
            service,
            config: WireConfig::default(),
        })
    }

    fn hosts(svc: &Service) -> Vec<HostView> {
        let mut h: Vec<HostView> = svc
            .list_hosts(DEV_ACCOUNT)
            .into_iter()
            .filter(|h| h.provider == ProviderKind::Sandbox)
            .collect();
        h.sort_by(|a, b| a.id.cmp(&b.id));
        h
    }

    fn dirs(data: &Path) -> Vec<PathBuf> {
        let mut d: Vec<PathBuf> = std::fs::read_dir(data.join("sandbox"))
            .map(|e| e.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        d.sort();
        d
    }

    /// The init (`bluebatch sandbox-init --dir DIR …`, not its `unshare`) of a machine.
    fn init_of(dir: &Path) -> Option<u32> {
        let want = dir.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
                (args.get(1) == Some(&b"sandbox-init".as_slice())
                    && args.contains(&want.as_bytes()))
                .then_some(pid)
            })
    }

    /// Every process whose command line names something under `data`.
    fn processes_of(data: &Path) -> Vec<u32> {
        let want = data.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&want))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < until, "not within {WAIT:?}: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Delete Pool `p`: no machine, no host, no files; then the manager and the service stop.
    async fn delete_pool_leaves_nothing(svc: Service, data: &Path, manager: Manager) {
        svc.delete_pool(DEV_ACCOUNT, "p", &|_| Ok(()))
            .await
            .unwrap();
        eventually("nothing left after Delete Pool", || {
            hosts(&svc).is_empty() && dirs(data).is_empty() && processes_of(data).is_empty()
        })
        .await;
        manager.shutdown().await;
        svc.shutdown().await;
    }

    fn backed(svc: &Service, n: usize) -> bool {
        let h = hosts(svc);
        h.len() == n && h.iter().all(|h| h.nodes.len() == 1)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sandbox_manager_follows_resizes_restarts_machines_and_resumes_them() {
        in_scratch(|d| async move { run(&d).await }).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sandbox_manager_tears_down_machines_whose_agent_does_not_join() {
        in_scratch(|d| async move { late(&d).await }).await;
    }

    /// Runs `body` (root only) in a fresh data directory within the test's deadline, then
    /// checks that nothing of its machines runs.
    async fn in_scratch<F, Fut>(body: F)
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        if !root() {
            return;
        }
        let tmp = tempfile::Builder::new()
            .prefix("bb-manager-test-")
            .tempdir()
            .unwrap();
        let data = tmp.path().to_path_buf();
        tokio::time::timeout(TEST_DEADLINE, body(data.clone()))
            .await
            .expect("the test within its deadline");
        assert!(
            processes_of(&data).is_empty(),
            "nothing of the test's machines runs"
        );
    }

    async fn late(data: &Path) {
        let app = app(data).await;
        let svc = app.service.clone();
        // Every join token is revoked as soon as it exists: no agent can join meanwhile.
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let revoker = {
            let (svc, refusing) = (svc.clone(), refusing.clone());
            tokio::spawn(async move {
                while refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    for t in svc.list_join_tokens(DEV_ACCOUNT) {
                        if !t.used {
                            let _ = svc.revoke_join_token(DEV_ACCOUNT, &t.id).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        let opts = Options {
            dir: data.join("sandbox"),
            exe: exe(),
            sshd: PathBuf::from("/usr/sbin/sshd"),
            use_pam: true,
            join_within: Duration::from_secs(2),
        };
        let manager = Manager::start(app.clone(), opts).await.unwrap();
        add_pool(&svc, 1).await;
        let mut first = Vec::new();
        eventually("a machine for the pool", || {
            first = dirs(data);
            first.len() == 1
        })
        .await;
        let first = first.remove(0);
        eventually("the machine whose agent did not join torn down", || {
            !first.exists() && init_of(&first).is_none()
        })
        .await;
        assert!(hosts(&svc).is_empty(), "no host joined");
        // Tokens work again: the pool gets its node.
        refusing.store(false, std::sync::atomic::Ordering::SeqCst);
        revoker.await.unwrap();
        eventually("a machine joined once tokens work", || {
            backed(&svc, 1) && dirs(data).len() == 1
        })
        .await;
        delete_pool_leaves_nothing(svc, data, manager).await;
    }

    async fn add_pool(svc: &Service, nodes: u32) {
        let body = serde_json::json!({
            "id": "p", "vmSize": "standard_d2s_v3", "targetDedicatedNodes": nodes,
            "virtualMachineConfiguration": {
                "imageReference": {"publisher": "Canonical",
                    "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
                "nodeAgentSKUId": "batch.node.ubuntu 22.04"},
        });
        let new = bluebatch_core::pools::parse_add_pool(body.to_string().as_bytes(), 100).unwrap();
        svc.add_pool(DEV_ACCOUNT, new).await.unwrap();
    }

    async fn run(data: &Path) {
        let app = app(data).await;
        let svc = app.service.clone();
        let opts = Options {
            dir: data.join("sandbox"),
            exe: exe(),
            sshd: PathBuf::from("/usr/sbin/sshd"),
            use_pam: true,
            join_within: JOIN_WITHIN,
        };
        let manager = Manager::start(app.clone(), opts.clone()).await.unwrap();
        add_pool(&svc, 3).await;
        eventually(
            "three machines, each backing a node, the pool steady",
            || {
                backed(&svc, 3)
                    && dirs(data).len() == 3
                    && svc.get_pool(DEV_ACCOUNT, "p").is_ok_and(|p| {
                        p.pool.allocation_state == bluebatch_core::model::AllocationState::Steady
                    })
            },
        )
        .await;

        // Shrunk: the machines of the nodes that left go, with their files and processes.
        let resize = bluebatch_core::pools::Resize {
            target_dedicated: 1,
            target_low_priority: 0,
            resize_timeout: None,
        };
        svc.resize_pool(DEV_ACCOUNT, "p", resize, &|_| Ok(()))
            .await
            .unwrap();
        eventually("one machine left after the shrink", || {
            backed(&svc, 1) && dirs(data).len() == 1
        })
        .await;
        let dir = dirs(data).remove(0);
        eventually("only the remaining machine's processes", || {
            let others = processes_of(data);
            let init = init_of(&dir);
            init.is_some()
                && others.iter().all(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy())
                    })
                })
        })
        .await;
        let host = hosts(&svc).remove(0).id;

        // Its init killed: the machine is started again, with the same host.
        let init = init_of(&dir).unwrap();
        // SAFETY: kill(2) of the test's own machine's init.
        assert_eq!(unsafe { libc::kill(init as libc::pid_t, libc::SIGKILL) }, 0);
        eventually(
            "the machine started again after its init was killed",
            || init_of(&dir).is_some_and(|p| p != init),
        )
        .await;
        let ids = |svc: &Service| hosts(svc).into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(&svc), std::slice::from_ref(&host));

        // The manager stopped: nothing runs, the files stay; started again: the same machine
        // and host come back.
        manager.shutdown().await;
        assert!(
            init_of(&dir).is_none(),
            "a stopped manager leaves no machine running"
        );
        assert!(dir.exists(), "a stopped manager keeps the machines' files");
        let restarted = time::OffsetDateTime::now_utc();
        let manager = Manager::start(app.clone(), opts).await.unwrap();
        eventually(
            "the machine resumed, its agent calling with its identity",
            || {
                init_of(&dir).is_some()
                    && hosts(&svc)
                        .first()
                        .and_then(|h| h.last_seen)
                        .is_some_and(|t| t > restarted)
            },
        )
        .await;
        assert_eq!(dirs(data), std::slice::from_ref(&dir));
        assert_eq!(ids(&svc), std::slice::from_ref(&host));

        // Its host revoked by hand: that machine goes, a new one backs the pool's node.
        svc.revoke_host(DEV_ACCOUNT, &host).await.unwrap();
        eventually("a new machine for the revoked host's node", || {
            let d = dirs(data);
            !dir.exists()
                && init_of(&dir).is_none()
                && d.len() == 1
                && backed(&svc, 1)
                && ids(&svc) != [host.clone()]
        })
        .await;

        // Delete Pool: no machine, no host, no files.
        delete_pool_leaves_nothing(svc, data, manager).await;
    }
}
