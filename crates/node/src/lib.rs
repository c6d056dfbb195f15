//! bluebatch-node: the embedded SSH node provider. Each emulated Linux compute node gets its own
//! SSH endpoint (one listening socket on `bind_ip`, its own port and its own persistent ed25519
//! host key); the accounts set through the Batch API log in there with their password or public
//! key until they expire or are deleted.
//!
//! # What a shell on an emulated node is
//!
//! **It is a real shell on the host, not a container or a VM.** A session runs `/bin/bash` (or
//! `/bin/sh`) as an unprivileged *host* uid:
//!
//! * When the server runs as root, each user of each node has a numeric uid of their own and
//!   each node a gid of its own (every user's primary group on that node), both taken from
//!   [`SshConfig::session_uids`] and kept in the node's private directory, so they stay the
//!   same across restarts. They have no passwd or group entry (`id` shows numbers) and nothing
//!   of the host's `/etc` is changed. Admin accounts (`isAdmin`) additionally get the bare
//!   supplementary gid [`SshConfig::admin_gid`], which is how `isAdmin` shows in `id -G`; that
//!   gid grants nothing by itself. Every other supplementary group is dropped.
//! * Each user has a home of their own, `{data_dir}/{node_key}/home/{user}` (absolute), owned by
//!   the user's uid and the node's gid, mode 0700, created at the user's first session. The
//!   working directory is that home; the environment is built from scratch (`HOME`, `USER`,
//!   `LOGNAME`, `SHELL`, `PATH`, and `TERM` with a PTY) and holds nothing of the server's.
//! * When the server does not run as root, sessions run as the server's own user (it cannot
//!   switch to another one): every node shares that user, which can read whatever the server
//!   can, and `isAdmin` cannot show in `id`.
//!
//! What such a shell **can** reach: everything its uid can — world-readable files of the host
//! (`/etc/passwd`, installed software, other users' world-readable files), every network the
//! host can reach (including services listening on loopback), the names of the other users'
//! homes on the same node. It can run any program installed on the host and start background
//! processes.
//!
//! What it **cannot** reach: root privileges (no set-uid path is opened by us; supplementary
//! groups are reset), other users' and other nodes' files (other uids, homes 0700, `home/`
//! readable by the node's group only), the node's private directory (host key, root-owned, 0700/0600), the
//! server's environment and secrets, and the server's own files unless they are
//! world-readable.
//!
//! `sftp` (and OpenSSH 9's `scp`, which speaks SFTP) is served by a child process started like a
//! session (same uid, groups, home and environment): [`SshConfig::sftp_server`], by default this
//! executable run as `{exe} __sftp-server`, which must call [`sftp::serve_stdio`].
//!
//! Sessions end when the client leaves, when the account is removed or expires (checked at login
//! and by a once-a-second sweep), when the node is stopped, reimaged or removed, and when it
//! enters a Batch state that takes no logins ([`accepts_logins`]; the client is told why, e.g.
//! "node is rebooting"): the processes of the session's process group are killed. Processes
//! that deliberately leave that group (`setsid`, job control in an interactive shell) are not
//! hunted down.
//!
//! # Logins, refusals and the log
//!
//! In a state that takes no logins a node closes each new connection before the SSH banner (as a
//! host that is down). Otherwise a login is refused for an unknown user, a wrong password, an
//! expired account, a key the account does not have, or a source locked out after
//! [`SshConfig::max_failed_logins`] failures within [`SshConfig::failed_login_window`]. Every
//! login accepted or refused is one info line on the `bluebatch::ssh` target (node, user,
//! source, method, reason; a key as its SHA256 fingerprint, never a password or key material),
//! as are a lockout, its end, and a node's state starting or stopping logins. Each node also
//! keeps its last 256 outcomes in memory, numbered, with the service clock's time
//! ([`SshNodes::login_activity`], see [`LoginRecord`] for what is and is not recorded).
//!
//! # Idle and slow connections
//!
//! A connection that has not logged in yet is a *startup* (as in OpenSSH). Each node holds at
//! most [`SshConfig::per_source_max_startups`] startups from one source address (IPv6: one
//! /64) and at most [`SshConfig::max_startups`] in all (OpenSSH's `MaxStartups`
//! start:rate:full); a connection past these caps is closed at once, before the SSH banner,
//! after one line saying why (`bluebatch: too many unauthenticated connections from this
//! source, try again later`), so one address flooding a node costs other addresses nothing.
//! Across every node of the process, startups are bounded too, in all
//! ([`SshConfig::max_startups_total`]) and per source
//! ([`SshConfig::per_source_max_startups_total`]), so that a flood spread over many nodes
//! cannot exhaust the process's descriptors nor one address take every node's startups.
//! A startup that has not logged in within [`SshConfig::login_grace`] is closed (told why in
//! an SSH disconnect once past its key exchange). Logged-in connections (sessions) do not
//! count against the startup caps; they are bounded by [`SshConfig::max_sessions_per_node`]
//! (a login past it is told "too many sessions on this node" and disconnected), each with at
//! most 10 channels. Shed connections are counted in one info line on the `bluebatch::ssh`
//! target at most every 10 s per node.

mod auth;
mod handler;
mod hostkey;
mod logins;
mod node;
mod server;
mod session;
pub mod sftp;
mod sysuser;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use bluebatch_core::{Clock, NodeAccount};

pub use crate::logins::{KEPT as LOGINS_KEPT, LoginRecord};
pub use crate::node::accepts_logins;
use crate::node::{Endpoint, Node};
use crate::sysuser::HostIdentity;

/// Configuration of the embedded SSH node provider.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Address every node listens on. Default `127.0.0.1`.
    pub bind_ip: IpAddr,
    /// Ports the nodes take, one each. Default `20000..=29999`, outside the kernel's ephemeral
    /// range (32768–60999) so outgoing connections never take a node's port.
    pub port_range: RangeInclusive<u16>,
    /// Per node (made absolute): `{data_dir}/{node_key}/private/` (root's, 0700: the persistent
    /// host key `ssh_host_ed25519_key`, `session-gid`, `session-uids`) and
    /// `{data_dir}/{node_key}/home/{user}` (each user's home and working directory, owned by
    /// the user's uid and the node's gid, 0700; `home/` itself is root's, readable by the
    /// node's gid only). When sessions switch uid, `data_dir` and
    /// the node directories get the "others may search" bit (0711) so sessions reach their
    /// homes; every directory above `data_dir` must let them pass too.
    pub data_dir: PathBuf,
    /// The numbers the nodes' sessions run as when the server runs as root: a uid per user of
    /// each node and a gid per node, kept across restarts; numbers the host names as a user or
    /// group are skipped. Default `2000000000..=2000099999`: above every regular, system, dynamic
    /// (systemd) and usual subordinate (`/etc/subuid`) range, below 2^31.
    pub session_uids: RangeInclusive<u32>,
    /// The bare supplementary gid of admin (`isAdmin`) sessions; never given to a node or user.
    /// `None`: the first number of `session_uids` (default `2000000000`).
    pub admin_gid: Option<u32>,
    /// The program (and its arguments) that serves SFTP on stdin/stdout for the `sftp`
    /// subsystem, started as the session's account in its home. `None`: no `sftp` subsystem.
    /// Default: this executable (`/proc/self/exe`) with the argument `__sftp-server`.
    pub sftp_server: Option<(PathBuf, Vec<std::ffi::OsString>)>,
    /// Failed logins per node and source IP that lock the source out: once a source has this
    /// many failures within [`SshConfig::failed_login_window`], every login from it to that node
    /// is refused (even with the right password or key) for that window again. 0: no lockout.
    /// Default 10.
    pub max_failed_logins: u32,
    /// How long failed logins are counted, and how long a locked-out source stays refused
    /// (real time, not the service clock). Default 60 s.
    pub failed_login_window: Duration,
    /// Every rejected authentication request (including a public key the account does not
    /// have) is answered after this constant delay, so that unknown users and wrong passwords
    /// look the same; brute force is bounded by `max_failed_logins` anyway. Default 250 ms.
    pub auth_rejection_delay: Duration,
    /// Sessions (logged-in connections, each with up to 10 channels) per node at once; a login
    /// past it is refused and its connection ended with the reason ("too many sessions on this
    /// node"). Connections not logged in yet are bounded by the startup caps instead. Default 32.
    pub max_sessions_per_node: usize,
    /// A connection that has not logged in within this time is closed, as OpenSSH's
    /// `LoginGraceTime`; it counts from the TCP accept and covers the SSH handshake and every
    /// authentication attempt. Default 30 s.
    pub login_grace: Duration,
    /// Connections not logged in yet (startups) per node at once, as OpenSSH's `MaxStartups`
    /// start:rate:full: past `start`, a new connection is closed at once (before the SSH
    /// banner) with a probability rising from `rate` % to 100 % at `full`. Default `32:30:128`.
    pub max_startups: MaxStartups,
    /// Startups from one source address per node at once, as OpenSSH's `PerSourceMaxStartups`:
    /// more from that address are closed at once (before the banner) while other addresses
    /// still get in. `None`: no per-source cap. Default `Some(10)`; below `max_startups.start`
    /// so that up to three flooding addresses never cost a fourth address its logins.
    pub per_source_max_startups: Option<usize>,
    /// Startups of every node of this process together: more are closed at once (before the
    /// banner). Each startup holds two descriptors, so this bounds what a flood spread over
    /// many nodes costs the process. Default 2048.
    pub max_startups_total: usize,
    /// Startups from one source address (IPv6: one /64) across every node of this process:
    /// more from it are closed at once, so that one address cannot take every node's startups.
    /// `None`: no such cap. Default `Some(64)`.
    pub per_source_max_startups_total: Option<usize>,
}

/// OpenSSH's `MaxStartups` start:rate:full: how many connections that have not logged in yet
/// a node holds at once. With `s` of them open, a new one is taken when `s < start`, closed
/// when `s >= full`, and in between closed with a probability of
/// `rate + (100 - rate) * (s - start) / (full - start)` percent. Written `start:rate:full`, or
/// `N` (a plain cap: `N:100:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    pub start: usize,
    pub rate: u32,
    pub full: usize,
}

impl MaxStartups {
    /// Whether a new connection is shed with `startups` open, `draw` a uniform 0..100.
    pub fn sheds(&self, startups: usize, draw: u32) -> bool {
        if startups < self.start {
            return false;
        }
        if startups >= self.full || self.rate >= 100 {
            return true;
        }
        let span = (self.full - self.start) as u64;
        let p = self.rate as u64 + (100 - self.rate as u64) * (startups - self.start) as u64 / span;
        (draw as u64) < p
    }
}

impl Default for MaxStartups {
    fn default() -> Self {
        MaxStartups {
            start: 32,
            rate: 30,
            full: 128,
        }
    }
}

impl std::fmt::Display for MaxStartups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

impl std::str::FromStr for MaxStartups {
    type Err = String;

    /// `start:rate:full` (1 <= start <= full, rate 0..=100) or `N` (N >= 1).
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: START:RATE:FULL or N, whole numbers"))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let m = match parts[..] {
            [n] => {
                let n = num(n)?;
                MaxStartups {
                    start: n,
                    rate: 100,
                    full: n,
                }
            }
            [a, r, f] => MaxStartups {
                start: num(a)?,
                rate: u32::try_from(num(r)?).unwrap_or(u32::MAX),
                full: num(f)?,
            },
            _ => return Err(format!("{s:?}: START:RATE:FULL (such as 32:30:128) or N")),
        };
        if m.start == 0 || m.start > m.full {
            return Err(format!("{s:?}: START must be 1..=FULL"));
        }
        if m.rate > 100 {
            return Err(format!("{s:?}: RATE is a percentage, 0..=100"));
        }
        Ok(m)
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: 20000..=29999,
            data_dir: PathBuf::from("bluebatch-data/nodes"),
            session_uids: 2_000_000_000..=2_000_099_999,
            admin_gid: None,
            sftp_server: Some((PathBuf::from(sftp::SELF_EXE), vec![sftp::SUBCOMMAND.into()])),
            max_failed_logins: 10,
            failed_login_window: Duration::from_secs(60),
            auth_rejection_delay: Duration::from_millis(250),
            max_sessions_per_node: 32,
            login_grace: Duration::from_secs(30),
            max_startups: MaxStartups::default(),
            per_source_max_startups: Some(10),
            max_startups_total: 2048,
            per_source_max_startups_total: Some(64),
        }
    }
}

/// A change to the accounts a node enforces.
#[derive(Debug, Clone)]
pub enum AccountChange {
    /// Add or replace the account of that name.
    Upsert(NodeAccount),
    /// Remove the account of that name (and end its sessions).
    Remove(String),
    /// Replace every account of the node (reconciliation).
    ReplaceAll(Vec<NodeAccount>),
    /// The node's whole account set as the service holds it, sorted by name: what the service
    /// hands its embedded nodes when a change of one account does not fit (see
    /// [`SshNodes::apply_one_deferred`]).
    Snapshot(Arc<[NodeAccount]>),
}

/// A source a node refuses for too many failed logins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLockout {
    /// The client address refused.
    pub source: IpAddr,
    /// Failed logins counted in the window that locked it out.
    pub failures: u32,
    /// When logins from it are taken again (wall-clock time, not the service clock).
    pub refused_until: time::OffsetDateTime,
}

/// The embedded SSH endpoints of every node of this process. Cheap to share as `Arc<SshNodes>`.
pub struct SshNodes {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: SshConfig,
    pub clock: Arc<dyn Clock>,
    nodes: RwLock<HashMap<String, Arc<Node>>>,
    host: OnceLock<HostIdentity>,
    pub next_conn_id: AtomicU64,
    sweeper_started: AtomicBool,
    /// Ports held by our listeners, skipped when picking a free one.
    held_ports: Mutex<HashSet<u16>>,
    /// The startups of every node, bounded together.
    pub startup_pool: Arc<node::StartupPool>,
}

impl SshNodes {
    /// Creates the provider; nothing listens until [`SshNodes::start_node`]. The async methods
    /// need a tokio runtime (the first `start_node` also starts the once-a-second expiry sweep
    /// on it); `apply` and the getters can be called from anywhere.
    pub fn new(mut config: SshConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        // Homes are given to sessions as $HOME: always absolute.
        if let Ok(abs) = std::path::absolute(&config.data_dir) {
            config.data_dir = abs;
        }
        let startup_pool = Arc::new(node::StartupPool::new(
            config.max_startups_total,
            config.per_source_max_startups_total,
        ));
        Arc::new(SshNodes {
            inner: Arc::new(Inner {
                startup_pool,
                config,
                clock,
                nodes: RwLock::new(HashMap::new()),
                host: OnceLock::new(),
                next_conn_id: AtomicU64::new(1),
                sweeper_started: AtomicBool::new(false),
                held_ports: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Starts the node's SSH endpoint and returns its address. If it is already running, returns
    /// the address it has (sessions are kept). `preferred_port` (the port it had before a
    /// restart) is used when free; otherwise another free port of the range is taken. The host
    /// key is loaded from disk, or generated and saved (mode 0600) the first time.
    pub async fn start_node(
        &self,
        node_key: &str,
        preferred_port: Option<u16>,
    ) -> std::io::Result<SocketAddr> {
        hostkey::validate_node_key(node_key)?;
        self.ensure_sweeper();
        let host = self.host_identity().await?;
        let node = self.inner.node_or_create(node_key);
        let mut endpoint = node.lifecycle.lock().await;
        if let Some(running) = endpoint.as_ref() {
            return Ok(running.addr);
        }
        let started = server::start_endpoint(&self.inner, &node, host, preferred_port).await?;
        let addr = started.addr;
        *endpoint = Some(started);
        Ok(addr)
    }

    /// Stops listening, ends every session of the node and frees its port. Keeps the host key,
    /// the home directory and the applied accounts.
    pub async fn stop_node(&self, node_key: &str) {
        let Some(node) = self.inner.node(node_key) else {
            return;
        };
        let mut endpoint = node.lifecycle.lock().await;
        self.stop_locked(&node, &mut endpoint).await;
    }

    /// The node left its pool: stops it, deletes its directory (host key, home) and forgets its
    /// accounts and revision.
    pub async fn remove_node(&self, node_key: &str) {
        let Some(node) = self.inner.node(node_key) else {
            return;
        };
        let mut endpoint = node.lifecycle.lock().await;
        self.stop_locked(&node, &mut endpoint).await;
        if hostkey::validate_node_key(node_key).is_ok() {
            let dir = self.inner.node_dir(node_key);
            let result = tokio::task::spawn_blocking(move || hostkey::remove_node_dir(&dir)).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(node = node_key, error = %e, "could not delete the node's directory");
            }
            if let Some(host) = self.inner.host() {
                host.release(node_key);
            }
        }
        let mut nodes = self.inner.nodes.write().unwrap_or_else(|e| e.into_inner());
        if nodes.get(node_key).is_some_and(|n| Arc::ptr_eq(n, &node)) {
            nodes.remove(node_key);
        }
    }

    /// Reimages the node: ends its sessions, gives it a new host key and empties its home.
    /// **If the node was running, its endpoint is restarted internally** (on the same port when
    /// it is still free; read [`SshNodes::endpoint`] afterwards); a stopped node stays stopped.
    /// The applied accounts are kept: the store decides what the node holds after a reimage and
    /// pushes it with [`SshNodes::apply`].
    pub async fn reimage_node(&self, node_key: &str) -> std::io::Result<()> {
        hostkey::validate_node_key(node_key)?;
        let host = self.host_identity().await?;
        let node = self.inner.node_or_create(node_key);
        let mut endpoint = node.lifecycle.lock().await;
        let port = endpoint.as_ref().map(|e| e.addr.port());
        self.stop_locked(&node, &mut endpoint).await;
        let dir = self.inner.node_dir(node_key);
        let inner = self.inner.clone();
        let key = node_key.to_string();
        tokio::task::spawn_blocking(move || {
            let run_as = inner.host().map(|h| h.assign(&key)).transpose()?.flatten();
            hostkey::reimage_dir(&dir, run_as)
        })
        .await
        .map_err(std::io::Error::other)??;
        if let Some(port) = port {
            let started = server::start_endpoint(&self.inner, &node, host, Some(port)).await?;
            *endpoint = Some(started);
        }
        Ok(())
    }

    /// Applies a change to the node's accounts, tagged with the store's revision, and returns the
    /// revision now applied (the acknowledgement). A change older than the applied revision is
    /// ignored (it was superseded). Sessions of accounts that are removed, or that are expired at
    /// the service clock's now, end at once. In memory only; never blocks on I/O.
    pub fn apply(&self, node_key: &str, revision: u64, change: AccountChange) -> u64 {
        let node = self.inner.node_or_create(node_key);
        node.apply(revision, change, self.inner.clock.now())
    }

    /// [`SshNodes::apply`] without ending sessions: new logins follow the change at once, and
    /// the sessions it ends end in [`SshNodes::enforce`] (called by the service once out of its
    /// lock).
    pub fn apply_deferred(&self, node_key: &str, revision: u64, change: AccountChange) -> u64 {
        let node = self.inner.node_or_create(node_key);
        node.apply_only(revision, change)
    }

    /// [`SshNodes::apply_deferred`] of a change of one account at `revision` (`Some`: add or
    /// replace the account `name`; `None`: remove it), for a node that has applied exactly
    /// revision `base`: the node changes that account in place (no copy of the others) and
    /// answers `Some(revision)`. A node at a later revision than `revision` answers it (the change
    /// was superseded); at any other revision, or none, `None`, and nothing changed: the caller
    /// hands it the whole set instead. In memory only; never blocks on I/O.
    pub fn apply_one_deferred(
        &self,
        node_key: &str,
        base: u64,
        revision: u64,
        name: &str,
        account: Option<NodeAccount>,
    ) -> Option<u64> {
        let node = self.inner.node(node_key)?;
        node.apply_one_only(base, revision, name, account)
    }

    /// Ends the node's sessions of accounts it no longer has or that are expired at the service
    /// clock's now. In memory only; never blocks on I/O.
    pub fn enforce(&self, node_key: &str) {
        if let Some(node) = self.inner.node(node_key) {
            node.enforce(self.inner.clock.now());
        }
    }

    /// Tells the node its Batch state. In a state that takes no logins (see [`accepts_logins`])
    /// the node closes every new connection before the SSH banner and refuses every
    /// authentication, and entering such a state ends every connection it has. A node never
    /// told its state takes logins. In memory only; never blocks on I/O.
    pub fn set_state(&self, node_key: &str, state: bluebatch_core::model::NodeState) {
        self.inner.node_or_create(node_key).set_state(state);
    }

    /// The Batch state the node was last told, if any.
    pub fn state(&self, node_key: &str) -> Option<bluebatch_core::model::NodeState> {
        self.inner.node(node_key).and_then(|n| n.state())
    }

    /// The sources the node refuses right now for too many failed logins, by address.
    pub fn login_lockouts(&self, node_key: &str) -> Vec<LoginLockout> {
        let Some(node) = self.inner.node(node_key) else {
            return Vec::new();
        };
        let (now, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
        node.lockouts()
            .into_iter()
            .map(|l| LoginLockout {
                source: l.source,
                failures: l.failures,
                refused_until: wall + l.until.saturating_duration_since(now),
            })
            .collect()
    }

    /// The node's login activity: its last [`LOGINS_KEPT`] authentication outcomes, newest
    /// first (empty for a node this provider does not have). In memory only.
    pub fn login_activity(&self, node_key: &str) -> Vec<LoginRecord> {
        self.inner
            .node(node_key)
            .map(|n| n.logins.newest_first())
            .unwrap_or_default()
    }

    /// The `seq` of the node's newest login outcome (0: none, or a node this provider does not
    /// have): what a poller compares to see whether anything is new, without copying the list.
    pub fn last_login_seq(&self, node_key: &str) -> u64 {
        self.inner.node(node_key).map_or(0, |n| n.logins.last_seq())
    }

    /// The revision last applied to the node, if any.
    pub fn applied_revision(&self, node_key: &str) -> Option<u64> {
        self.inner.node(node_key).and_then(|n| n.applied_revision())
    }

    /// The accounts the node enforces, sorted by name.
    pub fn accounts(&self, node_key: &str) -> Vec<NodeAccount> {
        self.inner
            .node(node_key)
            .map(|n| n.accounts())
            .unwrap_or_default()
    }

    /// The address the node listens on, while it is running.
    pub fn endpoint(&self, node_key: &str) -> Option<SocketAddr> {
        self.inner.node(node_key).and_then(|n| n.endpoint())
    }

    /// The node's host public key as an OpenSSH line (`ssh-ed25519 AAAA…`), while it is running:
    /// what a client will see, e.g. for a `known_hosts` entry.
    pub fn host_public_key(&self, node_key: &str) -> Option<String> {
        self.inner.node(node_key).and_then(|n| n.host_public_key())
    }

    /// Stops every node (their files and accounts are kept).
    pub async fn shutdown(&self) {
        let nodes: Vec<Arc<Node>> = {
            let map = self.inner.nodes.read().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        for node in nodes {
            let mut endpoint = node.lifecycle.lock().await;
            self.stop_locked(&node, &mut endpoint).await;
        }
    }

    async fn stop_locked(&self, node: &Arc<Node>, endpoint: &mut Option<Endpoint>) {
        if let Some(running) = endpoint.take() {
            running.stop(&self.inner, node).await;
        } else {
            // Not listening, but sessions of a previous endpoint may still be winding down.
            node.end_all_sessions(Duration::from_secs(2)).await;
        }
    }

    async fn host_identity(&self) -> std::io::Result<&HostIdentity> {
        if let Some(host) = self.inner.host.get() {
            return host.check();
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.host.get_or_init(|| {
                let c = &inner.config;
                let admin_gid = c.admin_gid.unwrap_or(*c.session_uids.start());
                HostIdentity::detect(&c.data_dir, c.session_uids.clone(), admin_gid)
            });
        })
        .await
        .map_err(std::io::Error::other)?;
        self.inner.host.get().expect("initialised above").check()
    }

    fn ensure_sweeper(&self) {
        if self.inner.sweeper_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(sweep(weak));
    }
}

impl Drop for SshNodes {
    fn drop(&mut self) {
        // Without an async context, end what can be ended synchronously.
        let map = self.inner.nodes.read().unwrap_or_else(|e| e.into_inner());
        for node in map.values() {
            node.abort_listener();
            node.terminate_all();
        }
    }
}

impl Inner {
    pub(crate) fn node(&self, key: &str) -> Option<Arc<Node>> {
        let map = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }

    fn node_or_create(&self, key: &str) -> Arc<Node> {
        if let Some(node) = self.node(key) {
            return node;
        }
        let mut map = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_string())
            .or_insert_with(|| Arc::new(Node::new(key.to_string())))
            .clone()
    }

    /// The session account, once a node has started.
    pub(crate) fn host(&self) -> Option<&HostIdentity> {
        self.host.get()
    }

    pub(crate) fn node_dir(&self, key: &str) -> PathBuf {
        self.config.data_dir.join(key)
    }

    pub(crate) fn hold_port(&self, port: u16) {
        self.held_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port);
    }

    pub(crate) fn release_port(&self, port: u16) {
        self.held_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port);
    }

    pub(crate) fn port_held(&self, port: u16) -> bool {
        self.held_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&port)
    }
}

/// Once a second: end the sessions of accounts that expired (time passed or the service clock
/// moved) or disappeared, and lift the failed-login lockouts that are over (logging each); once
/// a minute: forget old failed-login records.
async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let nodes: Vec<Arc<Node>> = {
            let map = inner.nodes.read().unwrap_or_else(|e| e.into_inner());
            map.values().filter(|n| n.has_sessions()).cloned().collect()
        };
        let now = inner.clock.now();
        for node in &nodes {
            node.enforce(now);
        }
        n += 1;
        let window = inner.config.failed_login_window;
        let map = inner.nodes.read().unwrap_or_else(|e| e.into_inner());
        for node in map.values() {
            if node.has_lockouts() || n.is_multiple_of(60) {
                node.prune_failures(window);
            }
        }
        drop(map);
    }
}
