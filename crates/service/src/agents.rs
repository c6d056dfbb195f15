//! The hub: the service's side of agent-backed nodes (hosts joined with `bluebatch agent`).
//!
//! - **Join**: an operator creates a join token (`ID.SECRET`, stored as the SHA-256 of the secret,
//!   scoped to an account and optionally a pool, expiring, usable once); an agent exchanges it
//!   for a node credential: `HOST.EXPIRES.HMAC` (HMAC-SHA256 with a service secret kept in the
//!   store), renewed through the long poll once past half its life. Nothing here logs a secret.
//! - **Desired state**: computed from the store's truth on every poll (every node a host backs,
//!   with its whole account set and revision); the cursor is a digest of it, so any replica and
//!   any restart answer the same cursor for the same state.
//! - **Acknowledgements**: an ack moves the node's applied revision forward durably (never back)
//!   and wakes the writes waiting for it; an ack with failures answers them `InternalError`.
//! - **Liveness**: a host that neither polls nor acknowledges for `Config::agent_grace` has its
//!   nodes `unknown`; its next call puts them back in the state they had.

use crate::pools::set_node_state;
use crate::state::{NodeEntry, State, node_key, node_record, pool_key};
use crate::{Service, put_json};
use bluebatch_core::error::{BatchError, Code, Result};
use bluebatch_core::model::NodeState;
use bluebatch_protocol::{
    AckAnswer, AckRequest, DesiredAccount, DesiredState, HostReport, HostReportAnswer, JoinRequest,
    JoinResponse, MAX_WAIT_SECONDS, NodeDesired, ProviderKind, UserFailure,
};
use bluebatch_store::Op;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;

/// Store keys of the hub's records.
pub(crate) const TOKEN_PREFIX: &str = "agent/token/";
pub(crate) const HOST_PREFIX: &str = "agent/host/";
pub(crate) const SECRET_RECORD: &str = "meta/agent-secret";

/// The most nodes one host backs (`bluebatch agent --simulate N`).
pub const MAX_HOST_SLOTS: u32 = 10_000;
/// The longest a join token lives.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 86_400);

/// A join token just created: `token` is the secret, shown once.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenCreated {
    pub id: String,
    /// `ID.SECRET`: what the agent joins with.
    pub token: String,
    pub pool: Option<String>,
    pub expires: OffsetDateTime,
}

impl std::fmt::Debug for JoinTokenCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenCreated")
            .field("id", &self.id)
            .field("token", &"<secret>")
            .field("pool", &self.pool)
            .field("expires", &self.expires)
            .finish()
    }
}

/// A join token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenView {
    pub id: String,
    pub pool: Option<String>,
    pub expires: OffsetDateTime,
    pub used: bool,
}

/// A joined host as `bluebatch host list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub id: String,
    pub account: String,
    pub hostname: String,
    pub provider: ProviderKind,
    pub address: String,
    pub ssh_port: Option<u16>,
    pub slots: u32,
    /// (pool id, node id) of every node the host backs.
    pub nodes: Vec<(String, String)>,
    pub drained: bool,
    /// Polling now, or within the grace time.
    pub connected: bool,
    /// Wall-clock time of its last call.
    pub last_seen: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenRecord {
    pub id: String,
    pub account: String,
    #[serde(default)]
    pub pool: Option<String>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    #[serde(default)]
    pub used: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HostRecord {
    pub id: String,
    pub account: String,
    /// The pool the host's join token was scoped to (it backs only that pool).
    #[serde(default)]
    pub pool: Option<String>,
    pub hostname: String,
    pub provider: ProviderKind,
    pub slots: u32,
    pub address: String,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    #[serde(default)]
    pub reserved_names: Vec<String>,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub drained: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub joined: OffsetDateTime,
    /// Expiry of the newest credential handed out.
    #[serde(with = "time::serde::rfc3339")]
    pub credential_expires: OffsetDateTime,
    /// When the newest credential was handed out by a renewal: for a while after (a quarter of
    /// its life, at most 10 minutes) every poll answer repeats it, as an answer may be lost.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub renewed_at: Option<OffsetDateTime>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SecretRecord {
    pub key: String,
}

/// A node a host backs: (account, pool key, node id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeRef {
    pub account: String,
    pub pool: String,
    pub node: String,
}

pub(crate) struct HostEntry {
    pub rec: HostRecord,
    pub slots: BTreeMap<u32, NodeRef>,
    pub reserved: HashSet<String>,
    /// Wall-clock time of its last call (in memory; a restart starts the grace afresh).
    pub last_seen: Option<OffsetDateTime>,
    /// Long polls in flight.
    pub polls: u32,
    /// Its nodes were marked `unknown` for want of polls.
    pub away: bool,
}

impl HostEntry {
    pub fn new(rec: HostRecord) -> Self {
        let reserved = rec.reserved_names.iter().cloned().collect();
        HostEntry {
            rec,
            slots: BTreeMap::new(),
            reserved,
            last_seen: None,
            polls: 0,
            away: false,
        }
    }

    /// Whether the host may take a new node of this pool.
    pub fn takes(&self, account: &str, pool: &str, os: bluebatch_core::model::Os) -> bool {
        self.rec.account == account
            && !self.rec.drained
            && self.rec.pool.as_deref().is_none_or(|p| pool_key(p) == pool)
            && (self.rec.provider == ProviderKind::Simulate
                || os == bluebatch_core::model::Os::Linux)
    }

    /// How many of its slots back no node (O(log n) while slots fill from 0 up).
    pub fn free_count(&self) -> u32 {
        let taken = match self.slots.last_key_value() {
            Some((last, _)) if *last >= self.rec.slots => {
                self.slots.range(..self.rec.slots).count() as u32
            }
            _ => self.slots.len() as u32,
        };
        self.rec.slots.saturating_sub(taken)
    }

    /// The lowest slot that backs no node.
    pub fn first_free(&self) -> Option<u32> {
        let len = self.slots.len() as u32;
        let contiguous = self
            .slots
            .last_key_value()
            .is_none_or(|(last, _)| *last + 1 == len);
        let first = if contiguous {
            len
        } else {
            (0..).find(|s| !self.slots.contains_key(s))?
        };
        (first < self.rec.slots).then_some(first)
    }
}

#[derive(Default)]
pub(crate) struct HubState {
    pub secret: Vec<u8>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub hosts: BTreeMap<String, HostEntry>,
}

/// What the waiting writes of a node see.
#[derive(Debug, Clone, Default)]
pub(crate) struct AckSeen {
    pub applied: Option<u64>,
    /// The newest revision acknowledged with failures, with the node's reasons.
    pub failed: Option<(u64, Vec<UserFailure>)>,
}

/// Wake-ups, outside the state lock's data (lock order: state, then these).
#[derive(Default)]
pub(crate) struct Hub {
    notify: Mutex<HashMap<String, watch::Sender<u64>>>,
    acks: Mutex<HashMap<String, watch::Sender<AckSeen>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// The host's desired state may have changed: wake its long poll.
    pub fn notify(&self, host: &str) {
        let mut m = lock(&self.notify);
        if let Some(tx) = m.get(host) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        } else {
            m.insert(host.to_string(), watch::channel(0).0);
        }
    }

    pub fn notify_all(&self) {
        for tx in lock(&self.notify).values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    fn subscribe(&self, host: &str) -> watch::Receiver<u64> {
        lock(&self.notify)
            .entry(host.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn forget_host(&self, host: &str) {
        lock(&self.notify).remove(host);
    }

    /// A receiver of the node's acknowledgements, starting from `applied`.
    pub fn ack_watch(&self, key: &str, applied: Option<u64>) -> watch::Receiver<AckSeen> {
        lock(&self.acks)
            .entry(key.to_string())
            .or_insert_with(|| {
                watch::channel(AckSeen {
                    applied,
                    failed: None,
                })
                .0
            })
            .subscribe()
    }

    /// Records an acknowledgement (never moving the applied revision back).
    fn acked(&self, key: &str, applied: Option<u64>, failed: Option<(u64, Vec<UserFailure>)>) {
        let mut m = lock(&self.acks);
        let tx = m.entry(key.to_string()).or_insert_with(|| {
            watch::channel(AckSeen {
                applied,
                failed: None,
            })
            .0
        });
        tx.send_modify(|seen| {
            if applied > seen.applied {
                seen.applied = applied;
            }
            if let Some((rev, list)) = failed {
                if seen.failed.as_ref().is_none_or(|(r, _)| rev >= *r) {
                    seen.failed = Some((rev, list));
                }
            } else if seen
                .failed
                .as_ref()
                .is_some_and(|(r, _)| seen.applied.is_some_and(|a| a >= *r))
            {
                seen.failed = None;
            }
        });
    }

    pub fn failures(&self, key: &str) -> Vec<UserFailure> {
        lock(&self.acks)
            .get(key)
            .and_then(|tx| tx.borrow().failed.as_ref().map(|(_, l)| l.clone()))
            .unwrap_or_default()
    }

    pub fn forget_node(&self, key: &str) {
        lock(&self.acks).remove(key);
    }
}

/// The answer a write gets when its node's provider failed to apply it.
pub(crate) fn apply_failed(failures: &[UserFailure]) -> BatchError {
    let reasons: Vec<String> = failures
        .iter()
        .map(|f| format!("{}: {}", f.name, f.reason))
        .collect();
    BatchError::new(Code::InternalError).message(format!(
        "The node could not apply the change ({}). The change is recorded; the node retries it.",
        reasons.join("; ")
    ))
}

fn auth_failed(detail: &str) -> BatchError {
    BatchError::new(Code::AuthenticationFailed).with("AuthenticationErrorDetail", detail)
}

fn invalid(property: &str, reason: &str) -> BatchError {
    BatchError::property(Code::InvalidPropertyValue, property, reason)
}

fn not_found(what: &str) -> BatchError {
    BatchError::new(Code::ResourceNotFound).message(format!("The specified {what} does not exist."))
}

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_alnum(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Constant-time equality of two byte strings of the same length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn mac(secret: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    mac
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

fn credential(secret: &[u8], host: &str, expires: OffsetDateTime) -> String {
    let payload = format!("{host}.{}", expires.unix_timestamp());
    let sig = hex(&mac(secret, &payload).finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// The host a credential names, if its signature holds and it has not expired.
fn check_credential(secret: &[u8], cred: &str, now: OffsetDateTime) -> Option<String> {
    let mut parts = cred.split('.');
    let (host, exp, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || host.is_empty() || secret.is_empty() {
        return None;
    }
    let sig = unhex(sig)?;
    mac(secret, &format!("{host}.{exp}"))
        .verify_slice(&sig)
        .ok()?;
    let exp = OffsetDateTime::from_unix_timestamp(exp.parse().ok()?).ok()?;
    (now < exp).then(|| host.to_string())
}

fn check_report(r: &HostReport) -> Result<()> {
    if r.slots == 0 || r.slots > MAX_HOST_SLOTS {
        return Err(invalid(
            "host.slots",
            &format!("A host backs 1 to {MAX_HOST_SLOTS} nodes."),
        ));
    }
    if r.provider == ProviderKind::Linux && r.slots != 1 {
        return Err(invalid(
            "host.slots",
            "A host with the linux provider backs one node.",
        ));
    }
    if r.address.parse::<IpAddr>().is_err() {
        return Err(invalid(
            "host.address",
            "The address must be an IP address.",
        ));
    }
    if r.hostname.len() > 255 || r.version.len() > 255 {
        return Err(invalid("host.hostname", "At most 255 characters."));
    }
    if r.reserved_names.len() > 100_000 || r.reserved_names.iter().any(|n| n.len() > 256) {
        return Err(invalid(
            "host.reservedNames",
            "At most 100000 names of at most 256 bytes.",
        ));
    }
    Ok(())
}

/// The digest a long poll compares its `after` with.
/// A node's accounts are named by its revision (every change of them takes the next one, a
/// reimage too), so the digest leaves them out.
fn cursor_of(nodes: &[NodeDesired], offset: i64, drained: bool) -> String {
    let mut h = Sha256::new();
    for n in nodes {
        for part in [
            n.key.as_str(),
            n.pool_id.as_str(),
            n.node_id.as_str(),
            n.state.as_str(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update([(n.os == bluebatch_core::model::Os::Linux) as u8]);
        for v in [u64::from(n.slot), n.revision, n.boot, n.image] {
            h.update(v.to_le_bytes());
        }
    }
    h.update(offset.to_le_bytes());
    h.update([drained as u8]);
    hex(&h.finalize()[..16])
}

/// (account, pool key).
type PoolRef = (String, String);

/// Ends a long poll's liveness count when dropped.
struct Polling {
    svc: Service,
    host: String,
}

impl Drop for Polling {
    fn drop(&mut self) {
        let mut st = self.svc.lock();
        if let Some(h) = st.hub.hosts.get_mut(&self.host) {
            h.polls = h.polls.saturating_sub(1);
            h.last_seen = Some(OffsetDateTime::now_utc());
        }
    }
}

fn is_waiting_for_ack(s: NodeState) -> bool {
    matches!(
        s,
        NodeState::Starting | NodeState::Rebooting | NodeState::Reimaging
    )
}

impl State {
    /// The node a host's slot backs.
    pub(crate) fn node_of(&self, r: &NodeRef) -> Option<(&crate::state::PoolEntry, &NodeEntry)> {
        let p = self.pool(&r.account, &r.pool)?;
        Some((p, p.nodes.get(&r.node)?))
    }
}

impl Service {
    fn grace(&self) -> time::Duration {
        time::Duration::try_from(self.inner.config.agent_grace).unwrap_or(time::Duration::MINUTE)
    }

    /// Makes the credential secret on first start (stored, so every replica and restart share it).
    pub(crate) async fn ensure_agent_secret(&self) {
        let pending = {
            let mut st = self.lock();
            if !st.hub.secret.is_empty() {
                return;
            }
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            st.hub.secret = key.to_vec();
            self.submit(vec![put_json(
                SECRET_RECORD.to_string(),
                &SecretRecord { key: hex(&key) },
            )])
        };
        let _ = pending.durable().await;
    }

    pub async fn create_join_token(
        &self,
        account: &str,
        pool: Option<&str>,
        ttl: Duration,
    ) -> Result<JoinTokenCreated> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(invalid("ttl", "A join token lives 1 second to 366 days."));
        }
        if let Some(p) = pool
            && (p.is_empty() || p.len() > 64 || p.contains('/'))
        {
            return Err(invalid("pool", "Not a pool id."));
        }
        let now = OffsetDateTime::now_utc();
        let expires = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::DAY);
        let secret = random_alnum(32);
        let (created, pending) = {
            let mut st = self.lock();
            // Tokens a day past their expiry are of no use any more.
            let stale: Vec<String> = st
                .hub
                .tokens
                .values()
                .filter(|t| t.expires + time::Duration::DAY < now)
                .map(|t| t.id.clone())
                .collect();
            let mut ops: Vec<Op> = stale
                .iter()
                .map(|id| Op::Delete {
                    key: format!("{TOKEN_PREFIX}{id}"),
                })
                .collect();
            for id in &stale {
                st.hub.tokens.remove(id);
            }
            let id = loop {
                let id = random_alnum(6);
                if !st.hub.tokens.contains_key(&id) {
                    break id;
                }
            };
            let rec = TokenRecord {
                id: id.clone(),
                account: account.to_string(),
                pool: pool.map(str::to_string),
                hash: sha256_hex(&secret),
                expires,
                used: false,
            };
            ops.push(put_json(format!("{TOKEN_PREFIX}{id}"), &rec));
            st.hub.tokens.insert(id.clone(), rec);
            let created = JoinTokenCreated {
                token: format!("{id}.{secret}"),
                id,
                pool: pool.map(str::to_string),
                expires,
            };
            (created, self.submit(ops))
        };
        pending.durable().await?;
        tracing::info!(account, token = %created.id, pool = ?created.pool, "join token created");
        Ok(created)
    }

    pub fn list_join_tokens(&self, account: &str) -> Vec<JoinTokenView> {
        let st = self.lock();
        st.hub
            .tokens
            .values()
            .filter(|t| t.account == account)
            .map(|t| JoinTokenView {
                id: t.id.clone(),
                pool: t.pool.clone(),
                expires: t.expires,
                used: t.used,
            })
            .collect()
    }

    pub async fn revoke_join_token(&self, account: &str, id: &str) -> Result<()> {
        let pending = {
            let mut st = self.lock();
            if st.hub.tokens.get(id).is_none_or(|t| t.account != account) {
                return Err(not_found("join token"));
            }
            st.hub.tokens.remove(id);
            self.submit(vec![Op::Delete {
                key: format!("{TOKEN_PREFIX}{id}"),
            }])
        };
        pending.durable().await?;
        tracing::info!(account, token = id, "join token revoked");
        Ok(())
    }

    /// Exchanges a join token for a host id and node credential. The token is checked in
    /// constant time, once (its use is durable before the answer), against its expiry.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse> {
        const FORGED: &str = "The join token is not valid.";
        let (id, secret) = req
            .token
            .split_once('.')
            .ok_or_else(|| auth_failed(FORGED))?;
        if id.len() != 6 || !(16..=128).contains(&secret.len()) {
            return Err(auth_failed(FORGED));
        }
        check_report(&req.host)?;
        let now = OffsetDateTime::now_utc();
        let given = Sha256::digest(secret.as_bytes());
        let ttl = time::Duration::try_from(self.inner.config.credential_ttl)
            .unwrap_or(time::Duration::DAY);
        let (answer, pending) = {
            let mut st = self.lock();
            let Some(tok) = st.hub.tokens.get_mut(id) else {
                return Err(auth_failed(FORGED));
            };
            let stored = unhex(&tok.hash).unwrap_or_default();
            if !ct_eq(&stored, &given) {
                return Err(auth_failed(FORGED));
            }
            if tok.used {
                return Err(auth_failed("The join token was already used."));
            }
            if now >= tok.expires {
                return Err(auth_failed("The join token has expired."));
            }
            tok.used = true;
            let tok = tok.clone();
            let host_id = loop {
                let h = format!("host-{}", random_alnum(8));
                if !st.hub.hosts.contains_key(&h) {
                    break h;
                }
            };
            // Whole seconds, as the credential carries it.
            let expires = whole_seconds(now + ttl);
            let rec = HostRecord {
                id: host_id.clone(),
                account: tok.account.clone(),
                pool: tok.pool.clone(),
                hostname: req.host.hostname.clone(),
                provider: req.host.provider,
                slots: req.host.slots,
                address: req.host.address.clone(),
                ssh_port: req.host.ssh_port,
                reserved_names: req.host.reserved_names.clone(),
                version: req.host.version.clone(),
                drained: false,
                joined: now,
                credential_expires: expires,
                renewed_at: None,
            };
            let ops = vec![
                put_json(format!("{TOKEN_PREFIX}{id}"), &tok),
                put_json(format!("{HOST_PREFIX}{host_id}"), &rec),
            ];
            let mut entry = HostEntry::new(rec);
            entry.last_seen = Some(now);
            st.hub.hosts.insert(host_id.clone(), entry);
            let answer = JoinResponse {
                credential: credential(&st.hub.secret, &host_id, expires),
                host_id,
                credential_expires: expires,
                account: tok.account,
                grace_seconds: self.inner.config.agent_grace.as_secs(),
            };
            (answer, self.submit(ops))
        };
        pending.durable().await?;
        tracing::info!(
            host = %answer.host_id,
            account = %answer.account,
            slots = req.host.slots,
            provider = ?req.host.provider,
            "host joined"
        );
        self.fill_short_pools(&answer.account).await;
        Ok(answer)
    }

    /// The host a node credential names; `AuthenticationFailed` for a forged or expired one, or
    /// one of a host that was revoked.
    pub fn authenticate_node(&self, credential: &str) -> Result<String> {
        let st = self.lock();
        check_credential(&st.hub.secret, credential, OffsetDateTime::now_utc())
            .filter(|h| st.hub.hosts.contains_key(h))
            .ok_or_else(|| auth_failed("The node credential is not valid."))
    }

    /// Marks the host alive now; if its nodes were `unknown`, puts them back in the state they
    /// had. Returns the writes to make durable and the pools whose steps resume.
    fn seen(&self, st: &mut State, host: &str) -> Result<(Vec<Op>, Vec<PoolRef>)> {
        let now = self.now();
        let h = st
            .hub
            .hosts
            .get_mut(host)
            .ok_or_else(|| auth_failed("The node credential is not valid."))?;
        h.last_seen = Some(OffsetDateTime::now_utc());
        if !h.away {
            return Ok((Vec::new(), Vec::new()));
        }
        h.away = false;
        let refs: Vec<NodeRef> = h.slots.values().cloned().collect();
        let mut ops = Vec::new();
        let mut pools = BTreeSet::new();
        for r in refs {
            let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                continue;
            };
            let pool_id = p.pool.id.clone();
            let Some(n) = p.nodes.get_mut(&r.node) else {
                continue;
            };
            if n.node.state != NodeState::Unknown {
                continue;
            }
            let back = n
                .node
                .state_before_unknown
                .take()
                .unwrap_or(NodeState::Idle);
            set_node_state(&mut n.node, back, now);
            ops.push(put_json(
                node_record(&r.account, &pool_id, &r.node),
                &n.node,
            ));
            pools.insert((r.account.clone(), r.pool.clone()));
        }
        tracing::info!(host, "host is back: its nodes leave unknown");
        Ok((ops, pools.into_iter().collect()))
    }

    async fn mark_seen(&self, host: &str, poll: bool) -> Result<Option<Polling>> {
        let (pending, pools) = {
            let mut st = self.lock();
            let (ops, pools) = self.seen(&mut st, host)?;
            let guard = if poll {
                if let Some(h) = st.hub.hosts.get_mut(host) {
                    h.polls += 1;
                }
                Some(Polling {
                    svc: self.clone(),
                    host: host.to_string(),
                })
            } else {
                None
            };
            let pending = (!ops.is_empty()).then(|| self.submit(ops));
            ((pending, guard), pools)
        };
        let (pending, guard) = pending;
        if let Some(p) = pending {
            p.durable().await?;
        }
        for (account, pkey) in pools {
            self.schedule(&account, &pkey);
        }
        Ok(guard)
    }

    pub async fn hello(&self, host: &str, report: HostReport) -> Result<HostReportAnswer> {
        check_report(&report)?;
        self.mark_seen(host, false).await?;
        let (account, pending) = {
            let mut st = self.lock();
            let now = self.now();
            let h = st
                .hub
                .hosts
                .get_mut(host)
                .ok_or_else(|| auth_failed("The node credential is not valid."))?;
            h.rec.hostname = report.hostname;
            h.rec.provider = report.provider;
            h.rec.slots = report.slots;
            h.rec.address = report.address;
            h.rec.ssh_port = report.ssh_port;
            h.reserved = report.reserved_names.iter().cloned().collect();
            h.rec.reserved_names = report.reserved_names;
            h.rec.version = report.version;
            let rec = h.rec.clone();
            let refs: Vec<NodeRef> = h.slots.values().cloned().collect();
            let mut ops = vec![put_json(format!("{HOST_PREFIX}{host}"), &rec)];
            for r in refs {
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    continue;
                };
                let pool_id = p.pool.id.clone();
                let Some(n) = p.nodes.get_mut(&r.node) else {
                    continue;
                };
                let port = match rec.provider {
                    ProviderKind::Linux => rec.ssh_port,
                    ProviderKind::Simulate => n.node.ssh_port,
                };
                if n.node.ip_address != rec.address || n.node.ssh_port != port {
                    n.node.ip_address = rec.address.clone();
                    n.node.ssh_port = port;
                    n.node.etag = bluebatch_core::model::new_etag(now);
                    n.node.last_modified = now;
                    ops.push(put_json(
                        node_record(&r.account, &pool_id, &r.node),
                        &n.node,
                    ));
                }
            }
            (rec.account, self.submit(ops))
        };
        pending.durable().await?;
        self.inner.hub.notify(host);
        self.fill_short_pools(&account).await;
        Ok(HostReportAnswer {
            host_id: host.to_string(),
        })
    }

    /// The whole desired state of the host's nodes (not those leaving their pools).
    fn host_snapshot(&self, host: &str) -> Result<(Vec<NodeDesired>, bool)> {
        let st = self.lock();
        let h = st
            .hub
            .hosts
            .get(host)
            .ok_or_else(|| auth_failed("The node credential is not valid."))?;
        let mut nodes = Vec::with_capacity(h.slots.len());
        for (slot, r) in &h.slots {
            let Some((p, n)) = st.node_of(r) else {
                continue;
            };
            if n.node.state == NodeState::LeavingPool {
                continue;
            }
            let mut accounts: Vec<DesiredAccount> = n
                .users
                .values()
                .map(|u| DesiredAccount::from_account(&u.to_account()))
                .collect();
            accounts.sort_by(|a, b| a.name.cmp(&b.name));
            nodes.push(NodeDesired {
                slot: *slot,
                key: node_key(&r.account, &p.pool.id, &r.node),
                pool_id: p.pool.id.clone(),
                node_id: r.node.clone(),
                os: p.pool.os,
                state: n.node.state,
                revision: n.node.users_revision,
                boot: n.node.boot,
                image: n.node.image,
                accounts,
            });
        }
        Ok((nodes, h.rec.drained))
    }

    /// A fresh credential once the newest one handed out is past half its life; repeated in
    /// the answers of a short while after.
    async fn renew_credential(&self, host: &str) -> Result<Option<String>> {
        let ttl = time::Duration::try_from(self.inner.config.credential_ttl)
            .unwrap_or(time::Duration::DAY);
        let now = OffsetDateTime::now_utc();
        let (cred, pending) = {
            let mut st = self.lock();
            let secret = st.hub.secret.clone();
            let Some(h) = st.hub.hosts.get_mut(host) else {
                return Err(auth_failed("The node credential is not valid."));
            };
            if now + ttl / 2 < h.rec.credential_expires {
                let window: time::Duration = (ttl / 4_i32).min(time::Duration::minutes(10));
                return Ok(h
                    .rec
                    .renewed_at
                    .is_some_and(|t| now < t + window)
                    .then(|| credential(&secret, host, h.rec.credential_expires)));
            }
            h.rec.renewed_at = Some(now);
            h.rec.credential_expires = whole_seconds(now + ttl);
            let cred = credential(&secret, host, h.rec.credential_expires);
            let op = put_json(format!("{HOST_PREFIX}{host}"), &h.rec);
            (cred, self.submit(vec![op]))
        };
        pending.durable().await?;
        Ok(Some(cred))
    }

    /// The long poll: the host's whole desired state at once when it differs from `after`,
    /// else when it changes within `wait` (at most `MAX_WAIT_SECONDS`), else `changed: false`
    /// at the end of the wait. Counts as the host's liveness while it lasts.
    pub async fn desired(
        &self,
        host: &str,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<DesiredState> {
        let wait = wait.min(Duration::from_secs(MAX_WAIT_SECONDS));
        let deadline = tokio::time::Instant::now() + wait;
        let guard = self.mark_seen(host, true).await?;
        let mut rx = self.inner.hub.subscribe(host);
        rx.borrow_and_update();
        loop {
            let (nodes, drained) = self.host_snapshot(host)?;
            let offset = self.inner.clock.offset().whole_seconds();
            let cursor = cursor_of(&nodes, offset, drained);
            let changed = after != Some(cursor.as_str());
            if changed || tokio::time::Instant::now() >= deadline {
                let credential = self.renew_credential(host).await?;
                drop(guard);
                return Ok(DesiredState {
                    cursor,
                    changed,
                    nodes,
                    clock_offset_seconds: offset,
                    drained,
                    credential,
                });
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                // The host's channel went (revoked): the next snapshot says so.
                Ok(Err(_)) => rx = self.inner.hub.subscribe(host),
            }
        }
    }

    /// Records what the host's provider enforces. Acks of nodes the host does not back, or of
    /// revisions never asked for, are refused; older revisions (replays) change nothing.
    pub async fn ack(&self, host: &str, ack: AckRequest) -> Result<AckAnswer> {
        self.mark_seen(host, false).await?;
        let now = self.now();
        let mut refused = Vec::new();
        let mut woken = Vec::new();
        let mut pools = BTreeSet::new();
        let pending = {
            let mut st = self.lock();
            let h = st
                .hub
                .hosts
                .get(host)
                .ok_or_else(|| auth_failed("The node credential is not valid."))?;
            // (The fabric key lower-cases the pool id, as the slot's pool key is.)
            let by_key: HashMap<String, NodeRef> = h
                .slots
                .values()
                .map(|r| (node_key(&r.account, &r.pool, &r.node), r.clone()))
                .collect();
            let mut ops = Vec::new();
            for a in ack.nodes {
                let Some(r) = by_key.get(&a.key) else {
                    refused.push(a.key);
                    continue;
                };
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    refused.push(a.key);
                    continue;
                };
                let (pool_id, os) = (p.pool.id.clone(), p.pool.os);
                let Some(n) = p.nodes.get_mut(&r.node) else {
                    refused.push(a.key);
                    continue;
                };
                if a.revision > n.node.users_revision || a.image > n.node.image {
                    refused.push(a.key);
                    continue;
                }
                if a.image < n.node.image {
                    // From before the node's reimage: superseded.
                    continue;
                }
                let mut changed = false;
                if let Some(port) = a.ssh_port
                    && os == bluebatch_core::model::Os::Linux
                    && n.node.ssh_port != Some(port)
                {
                    n.node.ssh_port = Some(port);
                    changed = true;
                }
                if !a.failures.is_empty() {
                    tracing::warn!(
                        node = %a.key,
                        revision = a.revision,
                        failed = a.failures.len(),
                        "node could not apply its accounts"
                    );
                    woken.push((a.key.clone(), None, Some((a.revision, a.failures))));
                } else if n.node.applied_revision.is_none_or(|r| r < a.revision) {
                    n.node.applied_revision = Some(a.revision);
                    changed = true;
                    woken.push((a.key.clone(), Some(a.revision), None));
                }
                if changed {
                    n.node.last_modified = now;
                    ops.push(put_json(
                        node_record(&r.account, &pool_id, &r.node),
                        &n.node,
                    ));
                }
                if is_waiting_for_ack(n.node.state) {
                    pools.insert((r.account.clone(), r.pool.clone()));
                }
            }
            (!ops.is_empty()).then(|| self.submit(ops))
        };
        if let Some(p) = pending {
            p.durable().await?;
        }
        for (key, applied, failed) in woken {
            self.inner.hub.acked(&key, applied, failed);
        }
        for (account, pkey) in pools {
            self.schedule(&account, &pkey);
        }
        Ok(AckAnswer { refused })
    }

    fn host_view(&self, st: &State, h: &HostEntry) -> HostView {
        let grace = self.grace();
        let now = OffsetDateTime::now_utc();
        HostView {
            id: h.rec.id.clone(),
            account: h.rec.account.clone(),
            hostname: h.rec.hostname.clone(),
            provider: h.rec.provider,
            address: h.rec.address.clone(),
            ssh_port: h.rec.ssh_port,
            slots: h.rec.slots,
            nodes: h
                .slots
                .values()
                .filter_map(|r| {
                    st.node_of(r)
                        .map(|(p, _)| (p.pool.id.clone(), r.node.clone()))
                })
                .collect(),
            drained: h.rec.drained,
            connected: !h.away && (h.polls > 0 || h.last_seen.is_some_and(|t| now - t <= grace)),
            last_seen: h.last_seen,
        }
    }

    pub fn list_hosts(&self, account: &str) -> Vec<HostView> {
        let st = self.lock();
        st.hub
            .hosts
            .values()
            .filter(|h| h.rec.account == account)
            .map(|h| self.host_view(&st, h))
            .collect()
    }

    /// The host takes no new pools; its nodes stay until their pools let them go.
    pub async fn drain_host(&self, account: &str, host: &str) -> Result<HostView> {
        let (view, pending) = {
            let mut st = self.lock();
            let h = st
                .hub
                .hosts
                .get_mut(host)
                .filter(|h| h.rec.account == account)
                .ok_or_else(|| not_found("host"))?;
            h.rec.drained = true;
            let op = put_json(format!("{HOST_PREFIX}{host}"), &h.rec);
            let st = &*st;
            (
                self.host_view(st, &st.hub.hosts[host]),
                self.submit(vec![op]),
            )
        };
        pending.durable().await?;
        self.inner.hub.notify(host);
        tracing::info!(account, host, "host drained");
        Ok(view)
    }

    /// The host's credential stops working at once and its nodes leave their pools (which
    /// then look for other hosts to meet their targets).
    pub async fn revoke_host(&self, account: &str, host: &str) -> Result<()> {
        let now = self.now();
        let (pending, pools) = {
            let mut st = self.lock();
            if st
                .hub
                .hosts
                .get(host)
                .is_none_or(|h| h.rec.account != account)
            {
                return Err(not_found("host"));
            }
            let h = st.hub.hosts.remove(host).expect("checked above");
            let mut ops = vec![Op::Delete {
                key: format!("{HOST_PREFIX}{host}"),
            }];
            let mut pools = BTreeSet::new();
            for r in h.slots.values() {
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    continue;
                };
                let pool_id = p.pool.id.clone();
                if let Some(n) = p.nodes.get_mut(&r.node)
                    && n.node.state != NodeState::LeavingPool
                {
                    set_node_state(&mut n.node, NodeState::LeavingPool, now);
                    ops.push(put_json(
                        node_record(&r.account, &pool_id, &r.node),
                        &n.node,
                    ));
                }
                pools.insert((r.account.clone(), r.pool.clone()));
            }
            (self.submit(ops), pools)
        };
        pending.durable().await?;
        self.inner.hub.forget_host(host);
        tracing::info!(account, host, "host revoked");
        for (account, pkey) in pools {
            self.refill_pool(&account, &pkey).await;
        }
        Ok(())
    }

    /// Marks the nodes of hosts silent for longer than the grace time `unknown`.
    pub(crate) async fn sweep_hosts(&self) {
        let wall = OffsetDateTime::now_utc();
        let grace = self.grace();
        let now = self.now();
        let pending = {
            let mut st = self.lock();
            let mut gone = Vec::new();
            for h in st.hub.hosts.values_mut() {
                if h.away || h.polls > 0 || h.last_seen.is_some_and(|t| wall - t <= grace) {
                    continue;
                }
                if h.last_seen.is_none() {
                    // Never seen since this start: the grace starts now.
                    h.last_seen = Some(wall);
                    continue;
                }
                h.away = true;
                tracing::warn!(host = %h.rec.id, "host stopped polling: its nodes are unknown");
                gone.extend(h.slots.values().cloned());
            }
            let mut ops = Vec::new();
            for r in gone {
                let Some(p) = st.pool_mut(&r.account, &r.pool) else {
                    continue;
                };
                let pool_id = p.pool.id.clone();
                let Some(n) = p.nodes.get_mut(&r.node) else {
                    continue;
                };
                if matches!(n.node.state, NodeState::LeavingPool | NodeState::Unknown) {
                    continue;
                }
                n.node.state_before_unknown = Some(n.node.state);
                set_node_state(&mut n.node, NodeState::Unknown, now);
                ops.push(put_json(
                    node_record(&r.account, &pool_id, &r.node),
                    &n.node,
                ));
            }
            (!ops.is_empty()).then(|| self.submit(ops))
        };
        if let Some(p) = pending {
            let _ = p.durable().await;
        }
    }

    /// Whether `name` is an account the node's host has and does not manage.
    pub(crate) fn reserved_on(st: &State, host: Option<&str>, name: &str, windows: bool) -> bool {
        let Some(h) = host.and_then(|h| st.hub.hosts.get(h)) else {
            return false;
        };
        if windows {
            h.reserved.iter().any(|r| r.eq_ignore_ascii_case(name))
        } else {
            h.reserved.contains(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_verify_and_expire() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let now = OffsetDateTime::now_utc();
        let c = credential(secret, "host-abc", now + time::Duration::HOUR);
        assert_eq!(
            check_credential(secret, &c, now).as_deref(),
            Some("host-abc")
        );
        assert_eq!(check_credential(b"other", &c, now), None);
        assert_eq!(
            check_credential(secret, &c, now + time::Duration::HOUR * 2),
            None
        );
        let forged = c.replace("host-abc", "host-abd");
        assert_eq!(check_credential(secret, &forged, now), None);
        assert_eq!(check_credential(secret, "a.b", now), None);
        assert_eq!(check_credential(secret, "a.1.zz", now), None);
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}

#[cfg(test)]
mod send_tests {
    use super::*;

    fn is_send<T: Send>(_: &T) {}

    #[allow(dead_code, unused_must_use)]
    fn futures_are_send(svc: Service, req: JoinRequest, ack: AckRequest, rep: HostReport) {
        is_send(&svc.join(req));
        is_send(&svc.desired("h", None, Duration::ZERO));
        is_send(&svc.ack("h", ack));
        is_send(&svc.hello("h", rep));
        is_send(&svc.create_join_token("a", None, Duration::ZERO));
        is_send(&svc.revoke_join_token("a", "i"));
        is_send(&svc.drain_host("a", "h"));
        is_send(&svc.revoke_host("a", "h"));
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    fn host(slots: u32, taken: &[u32]) -> HostEntry {
        let mut h = HostEntry::new(HostRecord {
            id: "h".into(),
            account: "a".into(),
            pool: None,
            hostname: String::new(),
            provider: ProviderKind::Simulate,
            slots,
            address: "127.0.0.1".into(),
            ssh_port: None,
            reserved_names: Vec::new(),
            version: String::new(),
            drained: false,
            joined: OffsetDateTime::UNIX_EPOCH,
            credential_expires: OffsetDateTime::UNIX_EPOCH,
            renewed_at: None,
        });
        for s in taken {
            h.slots.insert(
                *s,
                NodeRef {
                    account: "a".into(),
                    pool: "p".into(),
                    node: s.to_string(),
                },
            );
        }
        h
    }

    #[test]
    fn free_slots_are_found_with_and_without_gaps() {
        assert_eq!(
            (host(3, &[]).first_free(), host(3, &[]).free_count()),
            (Some(0), 3)
        );
        assert_eq!(host(3, &[0, 1]).first_free(), Some(2));
        assert_eq!(host(3, &[0, 2]).first_free(), Some(1));
        assert_eq!(host(3, &[1, 2]).first_free(), Some(0));
        assert_eq!(
            (host(2, &[0, 1]).first_free(), host(2, &[0, 1]).free_count()),
            (None, 0)
        );
        // Slots beyond a shrunk host's count are not free ones.
        assert_eq!(
            (host(1, &[3]).first_free(), host(1, &[3]).free_count()),
            (Some(0), 1)
        );
        assert_eq!(
            (host(1, &[0, 3]).first_free(), host(1, &[0, 3]).free_count()),
            (None, 0)
        );
    }
}
